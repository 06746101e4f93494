//! The request path's side of shadow traffic: which shadows mirror a request, the copy they
//! get, and handing it over without waiting.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response};
use http_body::Body as _;

use super::body::ResponseBody;
use crate::detach;
use crate::shadow::{self, Mirror, ShadowTarget};
use crate::upstream::{self, Appended, UpstreamBody};

/// The shadows mirroring one request, as a bit set over `Generation::shadows` (config
/// validation caps shadows at 64).
#[derive(Clone, Copy)]
pub struct Mirrors(u64);

/// A copy of the forwarded request, waiting for the primary's answer.
pub struct PendingMirror {
    mirrors: Mirrors,
    method: Method,
    path_and_query: Option<PathAndQuery>,
    headers: HeaderMap,
    body: Bytes,
    user_id: Option<String>,
}

impl Mirrors {
    /// The shadows that select this user and can take a mirror now. A shadow whose queue
    /// is already full drops the request here, before any copying is done for it, so a
    /// blackholed shadow costs the request path next to nothing.
    pub fn select(shadows: &[Arc<ShadowTarget>], user_id: Option<&str>) -> Mirrors {
        let bits = shadows
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, shadow)| shadow.selects(user_id) && shadow.admits())
            .fold(0u64, |bits, (index, _)| bits | 1 << index);
        Mirrors(bits)
    }

    /// No shadow: an upgraded connection (WebSocket) is not a request a shadow can replay.
    pub fn none() -> Mirrors {
        Mirrors(0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn of(self, shadows: &[Arc<ShadowTarget>]) -> impl Iterator<Item = &ShadowTarget> {
        shadows
            .iter()
            .take(64)
            .enumerate()
            .filter(move |(index, _)| self.0 & (1 << index) != 0)
            .map(|(_, shadow)| shadow.as_ref())
    }

    /// What the mirror keeps from the client's request before it is rewritten for the
    /// primary: the path as the client sent it (shadows add their own prefix), the body if
    /// it is in memory, and the user ID.
    pub fn source(
        self,
        parts: &Parts,
        body: Option<Bytes>,
        user_id: Option<Cow<'_, str>>,
    ) -> Option<MirrorSource> {
        (!self.is_empty()).then(|| MirrorSource {
            mirrors: self,
            path_and_query: parts.uri.path_and_query().cloned(),
            body,
            user_id: user_id.map(Cow::into_owned),
        })
    }
}

/// The parts of a client request a mirror needs, taken before the request is forwarded.
pub struct MirrorSource {
    mirrors: Mirrors,
    path_and_query: Option<PathAndQuery>,
    body: Option<Bytes>,
    user_id: Option<String>,
}

impl MirrorSource {
    /// Completes the copy with the forwarded request's method and headers (hop-by-hop
    /// headers already removed, the forwarding ones appended). Without a body in memory there
    /// is nothing to mirror, and each shadow counts the request as dropped.
    pub fn copy(
        self,
        request: Option<(&Request<UpstreamBody>, Appended<'_>)>,
        shadows: &[Arc<ShadowTarget>],
    ) -> Option<PendingMirror> {
        // Copied, not shared: a mirror may wait in a shadow queue long after the exchange.
        // (The body was copied when it was read.)
        let copy = request.zip(self.body).map(|((request, appended), body)| {
            let mut headers = detach::headers(request.headers());
            upstream::append_to_map(&mut headers, appended);
            if appended.lines.is_some() {
                // They share the client's read buffer.
                headers = detach::headers(&headers);
            }
            PendingMirror {
                mirrors: self.mirrors,
                method: request.method().clone(),
                path_and_query: self.path_and_query.as_ref().map(detach::path_and_query),
                headers,
                body,
                user_id: self.user_id,
            }
        });
        if copy.is_none() {
            self.mirrors.of(shadows).for_each(ShadowTarget::skip);
        }
        copy
    }
}

impl PendingMirror {
    /// Offers the mirror to its shadows, arranging for the primary's body to be captured on
    /// its way to the client when a shadow compares or logs it.
    pub fn dispatch(
        self,
        response: Response<ResponseBody>,
        variant: &str,
        started: Instant,
        shadows: &[Arc<ShadowTarget>],
    ) -> Response<ResponseBody> {
        let capture_limit = self
            .mirrors
            .of(shadows)
            .filter_map(ShadowTarget::wants_primary_body)
            .max();
        let (parts, body) = response.into_parts();
        // What the copy of the primary answer may come to: its declared size when it has
        // one, else the capture limit.
        let primary_bytes = capture_limit.map_or(0, |limit| {
            let declared = body
                .size_hint()
                .upper()
                .and_then(|upper| usize::try_from(upper).ok());
            declared.map_or(limit, |declared| declared.min(limit))
        });
        let (body, primary_body) = match capture_limit {
            Some(limit) => body.capture(limit),
            None => (body, None),
        };
        let latency = started.elapsed();
        let now = SystemTime::now();
        let mirror = Arc::new(Mirror {
            request_id: shadow::request_id(&self.headers),
            user_id: self.user_id,
            variant: variant.to_owned(),
            method: self.method,
            path_and_query: self.path_and_query,
            headers: self.headers,
            body: self.body,
            primary_status: parts.status,
            primary_latency: latency,
            primary_body,
            received: now.checked_sub(latency).unwrap_or(now),
        });
        self.mirrors
            .of(shadows)
            .for_each(|shadow| shadow.offer(mirror.clone(), primary_bytes));
        Response::from_parts(parts, body)
    }
}
