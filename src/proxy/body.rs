//! The body abproxy answers with: the upstream's, streamed through (and, for shadows that
//! compare or log, captured on the way), or one of its own.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::watch;

pin_project_lite::pin_project! {
    /// An enum rather than a boxed body: no allocation per response.
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Upstream { #[pin] body: Incoming },
        Captured { #[pin] body: Incoming, capture: Capture },
        Full { #[pin] body: Full<Bytes> },
    }
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody::Full {
            body: Full::new(bytes),
        }
    }

    /// Streams an upstream body to the client while copying up to `limit` bytes of it for
    /// shadows; abproxy's own answers (errors) have nothing to capture.
    pub fn capture(self, limit: usize) -> (ResponseBody, Option<watch::Receiver<Option<Bytes>>>) {
        match self {
            ResponseBody::Upstream { body } => {
                let (sender, receiver) = watch::channel(None);
                let capture = Capture {
                    copy: BytesMut::new(),
                    limit,
                    sender: Some(sender),
                };
                (ResponseBody::Captured { body, capture }, Some(receiver))
            }
            other => (other, None),
        }
    }
}

impl From<Incoming> for ResponseBody {
    fn from(body: Incoming) -> Self {
        ResponseBody::Upstream { body }
    }
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
        if self.sender.is_none() {
            return;
        }
        if self.copy.len() + data.len() > self.limit {
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ResponseBodyProj::Upstream { body } => body.poll_frame(cx),
            ResponseBodyProj::Captured { mut body, capture } => {
                let frame = body.as_mut().poll_frame(cx);
                match &frame {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            capture.push(data);
                        }
                        // hyper stops polling once the body reports its end.
                        if body.is_end_stream() {
                            capture.finish();
                        }
                    }
                    Poll::Ready(None) => capture.finish(),
                    Poll::Ready(Some(Err(_))) | Poll::Pending => {}
                }
                frame
            }
            ResponseBodyProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body } | ResponseBody::Captured { body, .. } => {
                body.is_end_stream()
            }
            ResponseBody::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body } | ResponseBody::Captured { body, .. } => {
                body.size_hint()
            }
            ResponseBody::Full { body } => body.size_hint(),
        }
    }
}
