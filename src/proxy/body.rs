//! The body abproxy answers with: the upstream's, streamed through (and, for shadows that
//! compare or log, copied on the way), or one of its own.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tokio::sync::watch;

use super::tally::Ending;
use crate::prediction::{Inspection, Predictions};
use crate::upstream::{self, Lease, PauseTimer, UpstreamErrorKind};
use crate::wire::Fields;
use std::sync::Arc;

pin_project_lite::pin_project! {
    /// An enum rather than a boxed body: no allocation per response.
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Upstream {
            #[pin]
            body: upstream::Body,
            // Armed only while the upstream keeps the body waiting, so a body that streams
            // without pause never touches the timer wheel. It, the shadows' copy and the
            // prediction's reader are boxed: most answers have none of them, and the answer
            // moves several times on its way to the client.
            stall: PauseTimer,
            idle_timeout: Duration,
            capture: Option<Box<Capture>>,
            inspection: Option<Box<Inspection>>,
            // Counts the request when the body ends (or, dropped first, as the client's 499).
            ending: Option<Ending>,
            // The exchange's place in the upstream's connection limit, until this body is done.
            lease: Lease,
        },
        Full { #[pin] body: Full<Bytes> },
    }
}

impl ResponseBody {
    /// An upstream body that fails once the upstream sends nothing for `idle_timeout`, so a
    /// backend that stalls mid-body cannot hold its connection (and permit) forever.
    pub fn upstream(body: upstream::Body, idle_timeout: Duration, lease: Lease) -> ResponseBody {
        ResponseBody::Upstream {
            body,
            stall: PauseTimer::default(),
            idle_timeout,
            capture: None,
            inspection: None,
            ending: None,
            lease,
        }
    }

    /// Whether this is an upstream's body still to be streamed, as opposed to one of
    /// abproxy's own answers or an empty body.
    pub fn streams(&self) -> bool {
        matches!(self, ResponseBody::Upstream { body, .. } if !body.is_end_stream())
    }

    /// The upstream answer's fields, when they pass through as they came rather than in the
    /// response's map: abproxy's HTTP/1.1 server writes them from here.
    pub(crate) fn fields(&self) -> Option<&Fields> {
        match self {
            ResponseBody::Upstream { body, .. } => body.fields(),
            ResponseBody::Full { .. } => None,
        }
    }

    /// Lets go of the answer's fields once they are written: they hold the upstream
    /// connection's read buffer, which a long stream would otherwise grow anew.
    pub(crate) fn take_fields(&mut self) -> Option<Fields> {
        match self {
            ResponseBody::Upstream { body, .. } => body.take_fields(),
            ResponseBody::Full { .. } => None,
        }
    }

    /// Counts the request with `ending` when the body ends.
    pub fn count_at_end(&mut self, counted: Ending) {
        if let ResponseBody::Upstream { ending, .. } = self {
            *ending = Some(counted);
        }
    }

    /// Reads the answer's prediction once the whole body has gone to the client; an empty
    /// body has none.
    pub fn inspect(mut self, predictions: Arc<Predictions>) -> ResponseBody {
        if let ResponseBody::Upstream {
            body, inspection, ..
        } = &mut self
        {
            if !body.is_end_stream() {
                *inspection = Some(Box::new(Inspection::new(predictions)));
            }
        }
        self
    }

    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody::Full {
            body: Full::new(bytes),
        }
    }

    /// Copies up to `limit` bytes of an upstream body for shadows as it streams to the
    /// client; abproxy's own answers (errors) have nothing to capture.
    pub fn capture(self, limit: usize) -> (ResponseBody, Option<watch::Receiver<Option<Bytes>>>) {
        match self {
            ResponseBody::Upstream {
                body,
                stall,
                idle_timeout,
                capture: None,
                inspection,
                ending,
                lease,
            } => {
                let (sender, receiver) = watch::channel(None);
                let capture = Some(Box::new(Capture {
                    copy: BytesMut::new(),
                    limit,
                    sender: Some(sender),
                }));
                let body = ResponseBody::Upstream {
                    body,
                    stall,
                    idle_timeout,
                    capture,
                    inspection,
                    ending,
                    lease,
                };
                (body, Some(receiver))
            }
            other => (other, None),
        }
    }
}

/// Moves the fields an upstream answer carries as they came into its map (empty until then:
/// the variant's field is its writer's to add), less the hop-by-hop ones (as
/// `client_response` leaves the map): for a writer that reads only the map (hyper's server,
/// for h2 clients and the HTTP/1.1 connections it serves) or a reader of a field (a gRPC
/// status).
pub(crate) fn fields_into_map(response: &mut Response<ResponseBody>) {
    let Some(fields) = response.body_mut().take_fields() else {
        return;
    };
    let headers = response.headers_mut();
    fields.append_to(headers);
    super::forward::client_response_headers(headers);
}

/// A bounded copy of the primary answer. Delivered when the body ends; a body that is cut
/// off or over the limit delivers nothing, and its comparison counts as unparsable.
pub struct Capture {
    copy: BytesMut,
    limit: usize,
    sender: Option<watch::Sender<Option<Bytes>>>,
}

impl Capture {
    fn push(&mut self, data: &Bytes) {
        let Some(sender) = &self.sender else { return };
        // No shadow is waiting (all dropped it, or gave up): stop copying.
        if sender.is_closed() || self.copy.len() + data.len() > self.limit {
            self.sender = None;
            self.copy = BytesMut::new();
        } else {
            self.copy.extend_from_slice(data);
        }
    }

    fn finish(&mut self) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(Some(std::mem::take(&mut self.copy).freeze()));
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ResponseBodyProj::Upstream {
                mut body,
                stall,
                idle_timeout,
                capture,
                inspection,
                ending,
                lease: _,
            } => {
                let frame = match body.as_mut().poll_frame(cx) {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        if stall.paused_too_long(*idle_timeout, cx) {
                            if let Some(ending) = ending.take() {
                                ending.upstream_failed(UpstreamErrorKind::Timeout);
                            }
                            return Poll::Ready(Some(Err(BodyError::Stalled(*idle_timeout))));
                        }
                        return Poll::Pending;
                    }
                };
                stall.reset();
                // hyper stops polling once the body reports its end.
                let ended = match &frame {
                    // Trailers come last; hyper polls no further after them, nor, once the
                    // declared length is written to an HTTP/1.1 client, after the last byte
                    // (whose stream may end only in a later, empty frame).
                    Some(Ok(frame)) => {
                        frame.is_trailers()
                            || body.is_end_stream()
                            || body.size_hint().exact() == Some(0)
                    }
                    None => true,
                    Some(Err(_)) => false,
                };
                let (data, trailers, failure) = match &frame {
                    Some(Ok(frame)) => (frame.data_ref(), frame.trailers_ref(), None),
                    Some(Err(err)) => (None, None, Some(err)),
                    None => (None, None, None),
                };
                if let Some(data) = data {
                    if let Some(inspection) = inspection.as_mut() {
                        inspection.push(data);
                    }
                    if let Some(capture) = capture.as_mut() {
                        capture.push(data);
                    }
                }
                if let (Some(trailers), Some(ending)) = (trailers, ending.as_mut()) {
                    ending.trailers(trailers);
                }
                if ended {
                    if let Some(inspection) = inspection.as_mut() {
                        inspection.complete();
                    }
                    if let Some(capture) = capture.as_mut() {
                        capture.finish();
                    }
                    if let Some(ending) = ending.take() {
                        ending.complete();
                    }
                } else if let Some(err) = failure {
                    match (err, ending.take()) {
                        (upstream::BodyError::Upstream(err), Some(ending)) => {
                            ending.upstream_failed(err.kind);
                        }
                        // The client's upload failed beside the answer: counted as the
                        // client's (499), as the ending is dropped.
                        (upstream::BodyError::Client(_), ending) => drop(ending),
                        (_, None) => {}
                    }
                }
                Poll::Ready(frame.map(|frame| frame.map_err(BodyError::Upstream)))
            }
            ResponseBodyProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full { body } => body.size_hint(),
        }
    }
}

/// Why a response body ended early; the client sees its connection cut.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body failed: {0}")]
    Upstream(upstream::BodyError),
    #[error("upstream sent nothing for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
}
