//! Shadow traffic: mirror a copy of requests to candidate backends, compare and log their
//! answers, and never let them touch the primary path.
//!
//! The request path only ever calls `ShadowTarget::offer`, a non-blocking `try_send` into a
//! bounded queue. A fixed pool of `max_concurrency` workers per shadow drains it; what does
//! not fit is dropped and counted. So a slow, down or blackholed shadow costs the primary
//! path neither latency nor unbounded memory.

mod compare;
mod log;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use compare::{compare, Comparison};
pub use log::ShadowLog;

use crate::assign::bucket;
use crate::config::{self, hex};
use crate::metrics::{Metrics, ShadowMetrics};
use crate::upstream::{Appended, UpstreamErrorKind};
use crate::upstream::{SendError, Upstream};

static SHADOW_MARKER: HeaderName = HeaderName::from_static("x-abproxy-shadow");
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Where shadow workers and log writers run, and their shutdown order: workers finish the
/// mirrors they have in hand first, then the writers log what those produced and flush.
#[derive(Clone, Default)]
pub struct Background {
    workers: TaskTracker,
    stop_workers: CancellationToken,
    writers: TaskTracker,
    stop_writers: CancellationToken,
}

impl Background {
    /// Stops all shadow work, waiting at most `limit` for mirrors in flight and log flushes.
    pub async fn shutdown(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        self.stop_workers.cancel();
        self.workers.close();
        if tokio::time::timeout_at(deadline, self.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("mirrors still in flight at exit");
        }
        self.stop_writers.cancel();
        self.writers.close();
        if tokio::time::timeout_at(deadline, self.writers.wait())
            .await
            .is_err()
        {
            tracing::warn!("shadow logs not flushed at exit");
        }
    }
}

/// One `[[shadow]]`: its client, queue, workers, metrics and log.
pub struct ShadowTarget {
    pub config: config::Shadow,
    queue: mpsc::Sender<Job>,
    /// The queue's byte budget, in KiB permits; each queued mirror holds its size.
    budget: Arc<Semaphore>,
    metrics: Arc<ShadowMetrics>,
    log: Option<Arc<ShadowLog>>,
    /// Bytes of the primary answer to keep for comparison and logging.
    capture_limit: usize,
}

/// A mirrored request and what the primary made of it, shared by every shadow it goes to.
pub struct Mirror {
    pub request_id: String,
    pub user_id: Option<String>,
    pub variant: String,
    pub method: Method,
    pub path_and_query: Option<PathAndQuery>,
    /// The client's headers as forwarded to the primary (hop-by-hop headers removed).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub primary_status: StatusCode,
    pub primary_latency: Duration,
    /// The primary's body once it has been delivered, when it is being captured.
    pub primary_body: Option<watch::Receiver<Option<Bytes>>>,
    pub received: SystemTime,
}

impl ShadowTarget {
    /// Builds the shadow and starts its workers; `previous` lends its log when unchanged.
    pub fn start(
        config: &config::Shadow,
        limits: &config::Limits,
        previous: Option<&ShadowTarget>,
        metrics: &Metrics,
        background: &Background,
    ) -> ShadowTarget {
        let metrics = Arc::new(metrics.shadow(&config.name));
        let log = config.log.as_ref().map(|path| {
            previous
                .and_then(|previous| previous.log.as_ref())
                .filter(|log| log.is_for(path, config.log_max_size, config.log_keep))
                .cloned()
                .unwrap_or_else(|| {
                    Arc::new(ShadowLog::open(
                        path,
                        config.log_max_size,
                        config.log_keep,
                        metrics.log_dropped.clone(),
                        background,
                    ))
                })
        });
        let upstream = Arc::new(Upstream::new(config.upstream.clone(), limits));
        let (queue, jobs) = mpsc::channel(config.max_queue);
        let budget_kib = usize::try_from(config.max_queue_bytes / 1024)
            .unwrap_or(usize::MAX)
            .max(1);
        let budget = Arc::new(Semaphore::new(budget_kib.min(Semaphore::MAX_PERMITS)));
        let jobs = Arc::new(Mutex::new(jobs));
        let capture_limit = if config.compare.is_some() {
            usize::try_from(limits.max_body).unwrap_or(usize::MAX)
        } else {
            config.log_body_bytes
        };
        let target = ShadowTarget {
            config: config.clone(),
            queue,
            budget,
            metrics,
            log,
            capture_limit,
        };
        for _ in 0..config.max_concurrency {
            let worker = Worker {
                config: config.clone(),
                upstream: upstream.clone(),
                metrics: target.metrics.clone(),
                log: target.log.clone(),
                response_limit: usize::try_from(limits.max_body).unwrap_or(usize::MAX),
            };
            background
                .workers
                .spawn(worker.run(jobs.clone(), background.stop_workers.clone()));
        }
        target
    }

    /// Whether this shadow mirrors the user: the user's hash salted with the shadow's name,
    /// so a user's whole session is mirrored or none of it.
    pub fn selects(&self, user_id: Option<&str>) -> bool {
        let percent = self.config.percent;
        if percent >= 100.0 {
            return true;
        }
        if percent <= 0.0 {
            return false;
        }
        match user_id {
            Some(user) => f64::from(bucket(&self.config.name, user, 10_000)) < percent * 100.0,
            None => fastrand::f64() * 100.0 < percent,
        }
    }

    /// How much of the primary answer this shadow needs, if any.
    pub fn wants_primary_body(&self) -> Option<usize> {
        (self.config.compare.is_some() || self.log.is_some()).then_some(self.capture_limit)
    }

    /// Whether the queue can take another mirror now; a request it cannot take is counted
    /// as dropped.
    pub fn admits(&self) -> bool {
        let room = self.queue.capacity() > 0;
        if !room {
            self.metrics.dropped.increment(1);
        }
        room
    }

    /// Hands a mirror to the workers without waiting. It is dropped when the queue is full
    /// or its bodies (the request's, and up to `primary_bytes` of the primary answer) do not
    /// fit the queue's byte budget.
    pub fn offer(&self, mirror: Arc<Mirror>, primary_bytes: usize) {
        let kib = (mirror.body.len() + primary_bytes).div_ceil(1024).max(1);
        let budget = u32::try_from(kib)
            .ok()
            .and_then(|kib| self.budget.clone().try_acquire_many_owned(kib).ok());
        let Some(budget) = budget else {
            self.metrics.dropped.increment(1);
            return;
        };
        if self
            .queue
            .try_send(Job {
                mirror,
                _budget: budget,
            })
            .is_err()
        {
            self.metrics.dropped.increment(1);
        }
    }

    /// Counts a request this shadow would have mirrored but could not (its body streamed).
    pub fn skip(&self) {
        self.metrics.dropped.increment(1);
    }
}

/// A queued mirror and the share of the byte budget it holds until a worker is done with it.
struct Job {
    mirror: Arc<Mirror>,
    _budget: OwnedSemaphorePermit,
}

/// A request ID for the shadow log: the client's `x-request-id`, or one made up here.
pub fn request_id(headers: &HeaderMap) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    match headers
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
    {
        Some(id) => id.to_owned(),
        None => format!(
            "abp-{:x}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ),
    }
}

struct Worker {
    config: config::Shadow,
    upstream: Arc<Upstream>,
    metrics: Arc<ShadowMetrics>,
    log: Option<Arc<ShadowLog>>,
    response_limit: usize,
}

/// What the shadow made of a mirror.
enum Answer {
    Answered {
        status: StatusCode,
        body: Bytes,
    },
    Failed {
        kind: UpstreamErrorKind,
        detail: String,
    },
}

impl Worker {
    async fn run(self, jobs: Arc<Mutex<mpsc::Receiver<Job>>>, stop: CancellationToken) {
        loop {
            let job = tokio::select! {
                job = async { jobs.lock().await.recv().await } => job,
                () = stop.cancelled() => None,
            };
            // `None`: shutdown, or the shadow was removed by a reload and its queue is empty.
            let Some(job) = job else { return };
            self.mirror(&job.mirror).await;
        }
    }

    async fn mirror(&self, mirror: &Mirror) {
        let started = Instant::now();
        let answer = match tokio::time::timeout(self.config.timeout, self.exchange(mirror)).await {
            Ok(answer) => answer,
            Err(_) => Answer::Failed {
                kind: UpstreamErrorKind::Timeout,
                detail: "timed out".into(),
            },
        };
        let latency = started.elapsed();
        match &answer {
            Answer::Answered { status, .. } if !status.is_server_error() => {
                self.metrics.ok.increment(1)
            }
            Answer::Failed {
                kind: UpstreamErrorKind::Timeout,
                ..
            } => self.metrics.timeout.increment(1),
            _ => self.metrics.error.increment(1),
        }
        self.metrics.duration.record(latency.as_secs_f64());

        let primary_body = match &mirror.primary_body {
            Some(body) => self.primary_body(body.clone()).await,
            None => None,
        };
        let comparison = match (&self.config.compare, &answer) {
            (Some(pointer), Answer::Answered { body, .. }) => {
                let primary = primary_body.as_deref().and_then(|b| pointer.value_in(b));
                let shadow = pointer.value_in(body);
                let result = compare(primary.as_ref(), shadow.as_ref(), self.config.tolerance);
                self.record(&result);
                Some((result, primary, shadow))
            }
            _ => None,
        };
        if let Some(log) = &self.log {
            log.write(self.log_line(
                mirror,
                &answer,
                latency,
                primary_body.as_deref(),
                comparison,
            ));
        }
    }

    async fn exchange(&self, mirror: &Mirror) -> Answer {
        let request = match self.request(mirror) {
            Ok(request) => request,
            Err(err) => {
                return Answer::Failed {
                    kind: UpstreamErrorKind::Protocol,
                    detail: err.to_string(),
                }
            }
        };
        // The lease lives until the body has been read, as the connection is busy until then.
        let (response, _lease) = match self
            .upstream
            .send(
                request,
                Appended::default(),
                Instant::now().into(),
                self.config.timeout,
            )
            .await
        {
            Ok(answer) => answer,
            Err(SendError::Upstream(err) | SendError::NotSent { source: err, .. }) => {
                return Answer::Failed {
                    kind: err.kind,
                    detail: err.detail,
                }
            }
            // The mirror's body is a buffered copy: it cannot fail, but say so if it did.
            Err(
                err @ (SendError::ClientGone(_)
                | SendError::ClientBody(_)
                | SendError::ClientStalled(_)),
            ) => {
                return Answer::Failed {
                    kind: UpstreamErrorKind::Protocol,
                    detail: err.to_string(),
                }
            }
        };
        let status = response.status();
        // A body over the limit still counts as answered; it just cannot be compared.
        let body = match Limited::new(response.into_body(), self.response_limit)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Answer::Answered { status, body }
    }

    fn request(
        &self,
        mirror: &Mirror,
    ) -> Result<Request<crate::upstream::UpstreamBody>, http::Error> {
        let mut request = Request::new(Either::Right(Full::new(mirror.body.clone())));
        *request.method_mut() = mirror.method.clone();
        let host = self.upstream.host();
        *request.uri_mut() = self
            .upstream
            .uri_for(mirror.path_and_query.as_ref(), host)?;
        let headers = request.headers_mut();
        headers.clone_from(&mirror.headers);
        // The shadow is another host, named in `:authority` over HTTP/2.
        if self.upstream.is_http2() {
            headers.remove(HOST);
        } else {
            headers.insert(HOST, host.clone());
        }
        headers.insert(SHADOW_MARKER.clone(), HeaderValue::from_static("1"));
        if self.upstream.is_http2() {
            *request.version_mut() = http::Version::HTTP_2;
        }
        Ok(request)
    }

    /// Waits, within the shadow's timeout, for the primary answer to finish streaming.
    async fn primary_body(&self, mut body: watch::Receiver<Option<Bytes>>) -> Option<Bytes> {
        let delivered =
            tokio::time::timeout(self.config.timeout, body.wait_for(Option::is_some)).await;
        match delivered {
            Ok(Ok(body)) => body.clone(),
            _ => None,
        }
    }

    fn record(&self, comparison: &Comparison) {
        match comparison {
            Comparison::Match { .. } => self.metrics.matched.increment(1),
            Comparison::Mismatch { .. } => self.metrics.mismatched.increment(1),
            Comparison::Unparsable => self.metrics.unparsable.increment(1),
        }
        if let Some(diff) = comparison.abs_diff() {
            self.metrics.abs_diff.record(diff);
        }
    }

    fn log_line(
        &self,
        mirror: &Mirror,
        answer: &Answer,
        latency: Duration,
        primary_body: Option<&[u8]>,
        comparison: Option<(Comparison, Option<Value>, Option<Value>)>,
    ) -> Vec<u8> {
        let cap = self.config.log_body_bytes;
        let (user_key, user) = match (&mirror.user_id, self.config.log_user_id) {
            (Some(user), true) => ("user_id", Value::from(user.as_str())),
            (Some(user), false) => (
                "user_hash",
                Value::from(hex(&Sha256::digest(user.as_bytes()))),
            ),
            (None, _) => ("user_id", Value::Null),
        };
        let shadow = match answer {
            Answer::Answered { status, body } => json!({
                "status": status.as_u16(),
                "latency_ms": millis(latency),
                "body": truncated(body, cap),
            }),
            Answer::Failed { kind, detail } => json!({
                "status": null,
                "latency_ms": millis(latency),
                "error": kind.as_str(),
                "detail": detail,
            }),
        };
        let mut line = json!({
            "time": humantime::format_rfc3339_millis(mirror.received).to_string(),
            "request_id": mirror.request_id,
            user_key: user,
            "shadow": self.config.name,
            "variant": mirror.variant,
            "method": mirror.method.as_str(),
            "path": mirror.path_and_query.as_ref().map_or("/", PathAndQuery::as_str),
            "request_body": truncated(&mirror.body, cap),
            "primary": {
                "status": mirror.primary_status.as_u16(),
                "latency_ms": millis(mirror.primary_latency),
                "body": primary_body.map(|body| truncated(body, cap)),
            },
            "shadow_answer": shadow,
        });
        if let Some((result, primary, shadow)) = comparison {
            line["compare"] = json!({
                "pointer": self.config.compare,
                "primary": primary,
                "shadow": shadow,
                "outcome": result.outcome(),
                "abs_diff": result.abs_diff(),
            });
        }
        serde_json::to_vec(&line).unwrap_or_default()
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// A body for the log: up to `cap` bytes as text (a character cut in two shows as U+FFFD).
fn truncated(body: &[u8], cap: usize) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(cap)]);
    let mut text = text.into_owned();
    if body.len() > cap {
        text.push('…');
    }
    text
}
