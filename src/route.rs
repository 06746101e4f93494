//! The routing table of one config generation: buckets → variant, with everything a request
//! needs prebuilt (upstream clients, header values, metric handles).
//!
//! A `Generation` is immutable once built; reloads build a new one and swap it in whole.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

use crate::assign::{hash, OnMissing, Split};
use crate::canary::Guard;
use crate::config::{Config, Loaded};
use crate::head::RequestHead;
use crate::metrics::{Metrics, VariantMetrics};
use crate::prediction::Predictions;
use crate::shadow::{Background, ShadowTarget};
use crate::upstream::Upstream;

/// One config, ready to serve.
pub struct Generation {
    /// Counts up from 1 with each successful load.
    pub number: u64,
    /// Hex SHA-256 of the file this generation came from.
    pub sha256: String,
    pub config: Config,
    pub split: Split,
    pub routes: Box<[Route]>,
    pub shadows: Box<[Arc<ShadowTarget>]>,
    /// True when a `json:` source may need the request body read before routing.
    pub reads_body: bool,
    /// True when nothing copies a request's head before it is rewritten for its upstream (a
    /// mirror's copy, a fallback's): requests whose fields came as lines (see `head`) then
    /// keep them, and `forward::upstream_request` decides by the upstream whether they go on
    /// as they came.
    pub passes_lines: bool,
}

/// One variant as the request path sees it.
pub struct Route {
    pub name: String,
    /// The variant's name as a ready-made response header value.
    pub header_value: HeaderValue,
    pub upstream: Arc<Upstream>,
    /// Shared with the bodies of answers in flight, which count their request when they end.
    pub metrics: Arc<VariantMetrics>,
    /// Index into `Generation::routes` of the variant that serves requests this one could
    /// not send.
    pub fallback: Option<usize>,
    /// Reads predictions out of successful answers, when `[metrics] prediction` is set.
    pub predictions: Option<Arc<Predictions>>,
}

/// The outcome of assignment for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Assignment<'a> {
    /// Index into `Generation::routes`.
    pub route: usize,
    pub user_id: Option<Cow<'a, str>>,
    /// The user's bucket, when the variant was chosen by hash.
    pub bucket: Option<u32>,
    pub unit: Unit,
}

/// What the canary guard's sample-ratio check counts a request as: the split randomises
/// users, so a user is one unit however many requests they send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A user, by a 64-bit hash of their ID.
    User(u64),
    /// No user ID, and a random bucket: every such request is a draw of its own.
    Anonymous,
    /// Not assigned at random (forced by the override header, or `on_missing = "first"`).
    Fixed,
}

/// Why a request cannot be assigned; both are the client's doing, so both are 4xx.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignError {
    #[error("no user ID in the request (looked for {0})")]
    MissingUserId(String),
    #[error("{header} names unknown variant {name:?}")]
    UnknownVariant { header: HeaderName, name: String },
}

impl Generation {
    /// Builds generation `number`, reusing `previous`'s upstream clients and shadows where
    /// unchanged, so a reload neither reconnects nor restarts what it did not touch.
    pub fn build(
        number: u64,
        loaded: Loaded,
        previous: Option<&Generation>,
        metrics: &Metrics,
        background: &Background,
        guard: &Guard,
    ) -> Generation {
        let Loaded { config, sha256 } = loaded;
        let routes = build_routes(&config, previous, metrics, guard);
        let shadows = build_shadows(&config, previous, metrics, background);
        let passes_lines =
            shadows.is_empty() && routes.iter().all(|route| route.fallback.is_none());
        Generation {
            number,
            sha256,
            split: Split::from_counts(config.variants.iter().map(|variant| variant.buckets)),
            reads_body: config
                .assignment
                .sources
                .iter()
                .any(|source| source.needs_body()),
            config,
            routes,
            shadows,
            passes_lines,
        }
    }

    /// Whether this request's user ID may be in its body: a `json:` source comes before any
    /// source that already found one. A header that decides spares the body from buffering.
    pub fn needs_body<'a>(&self, head: impl Into<RequestHead<'a>>) -> bool {
        let head = head.into();
        self.reads_body
            && !self
                .config
                .assignment
                .sources
                .iter()
                .take_while(|source| !source.needs_body())
                .any(|source| source.extract(head, None).is_some())
    }

    /// Picks the variant for a request: override header, then user ID sources, then `on_missing`.
    pub fn assign<'a>(
        &self,
        head: impl Into<RequestHead<'a>>,
        body: Option<&[u8]>,
    ) -> Result<Assignment<'a>, AssignError> {
        let head = head.into();
        let assignment = &self.config.assignment;
        let user_id = assignment
            .sources
            .iter()
            .find_map(|source| source.extract(head, body));
        if let Some(forced) = self.forced_route(head)? {
            return Ok(Assignment {
                route: forced,
                user_id,
                bucket: None,
                unit: Unit::Fixed,
            });
        }
        let Some(user_id) = user_id else {
            let (route, unit) = match assignment.on_missing {
                OnMissing::Random => (
                    self.split
                        .variant_of(fastrand::u32(0..self.split.buckets())),
                    Unit::Anonymous,
                ),
                OnMissing::First => (0, Unit::Fixed),
                OnMissing::Reject => {
                    return Err(AssignError::MissingUserId(self.describe_sources()))
                }
            };
            return Ok(Assignment {
                route,
                user_id: None,
                bucket: None,
                unit,
            });
        };
        let (bucket, fingerprint) = hash(&assignment.salt, &user_id, assignment.buckets);
        Ok(Assignment {
            route: self.split.variant_of(bucket),
            user_id: Some(user_id),
            bucket: Some(bucket),
            unit: Unit::User(fingerprint),
        })
    }

    /// The route named by the override header, when one is configured and present.
    fn forced_route(&self, head: RequestHead<'_>) -> Result<Option<usize>, AssignError> {
        let Some(header) = &self.config.assignment.override_header else {
            return Ok(None);
        };
        let Some(value) = head.get(header) else {
            return Ok(None);
        };
        // Only visible ASCII names a variant (as `HeaderValue::to_str` reads it).
        let name = if value
            .iter()
            .all(|&byte| byte == b'\t' || (b' '..=b'~').contains(&byte))
        {
            std::str::from_utf8(value).unwrap_or_default()
        } else {
            ""
        };
        let name = name.trim();
        self.routes
            .iter()
            .position(|route| route.name == name)
            .map(Some)
            .ok_or_else(|| AssignError::UnknownVariant {
                header: header.clone(),
                name: name.to_owned(),
            })
    }

    fn describe_sources(&self) -> String {
        let sources: Vec<String> = self
            .config
            .assignment
            .sources
            .iter()
            .map(ToString::to_string)
            .collect();
        sources.join(", ")
    }
}

/// One route per variant; an upstream client is shared by variants (and kept from the
/// previous generation) when its URL and limits are the same.
fn build_routes(
    config: &Config,
    previous: Option<&Generation>,
    metrics: &Metrics,
    guard: &Guard,
) -> Box<[Route]> {
    let mut upstreams: Vec<Arc<Upstream>> = previous
        .map(|previous| {
            previous
                .routes
                .iter()
                .map(|route| route.upstream.clone())
                .collect()
        })
        .unwrap_or_default();
    let routes = config
        .variants
        .iter()
        .map(|variant| {
            let existing = upstreams
                .iter()
                .find(|u| u.serves(&variant.upstream, &config.limits));
            let upstream = match existing {
                Some(existing) => existing.clone(),
                None => {
                    let created = Arc::new(Upstream::new(variant.upstream.clone(), &config.limits));
                    upstreams.push(created.clone());
                    created
                }
            };
            let window = guard.window(config, &variant.name);
            let predictions = (!config.metrics.prediction.is_empty()).then(|| {
                Arc::new(Predictions::new(
                    &config.metrics,
                    &variant.name,
                    metrics,
                    window.clone(),
                ))
            });
            let metrics = metrics.variant(&variant.name, variant.fallback.as_deref(), window);
            metrics.set_weight(variant.weight);
            let fallback = variant.fallback.as_ref().and_then(|fallback| {
                config
                    .variants
                    .iter()
                    .position(|other| &other.name == fallback)
            });
            Route {
                header_value: HeaderValue::from_str(&variant.name)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                name: variant.name.clone(),
                upstream,
                metrics: Arc::new(metrics),
                fallback,
                predictions,
            }
        })
        .collect();
    // A removed variant's weight gauge would otherwise keep its last value forever.
    let removed = previous
        .into_iter()
        .flat_map(|previous| previous.routes.iter())
        .filter(|old| config.variant(&old.name).is_none());
    for route in removed {
        route.metrics.set_weight(0.0);
    }
    routes
}

/// One target per shadow; an unchanged shadow keeps its queue, workers and log running.
fn build_shadows(
    config: &Config,
    previous: Option<&Generation>,
    metrics: &Metrics,
    background: &Background,
) -> Box<[Arc<ShadowTarget>]> {
    let limits_unchanged = previous.is_some_and(|previous| previous.config.limits == config.limits);
    config
        .shadows
        .iter()
        .map(|shadow| {
            let old = previous.and_then(|previous| {
                previous
                    .shadows
                    .iter()
                    .find(|old| old.config.name == shadow.name)
            });
            match old {
                Some(old) if limits_unchanged && old.config == *shadow => old.clone(),
                _ => Arc::new(ShadowTarget::start(
                    shadow,
                    &config.limits,
                    old.map(AsRef::as_ref),
                    metrics,
                    background,
                )),
            }
        })
        .collect()
}
