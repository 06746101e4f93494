//! The body abproxy answers with: the upstream's, streamed through (and, for shadows that
//! compare or log, copied on the way), or one of its own.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::{watch, OwnedSemaphorePermit};

pin_project_lite::pin_project! {
    /// An enum rather than a boxed body: no allocation per response.
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Upstream {
            #[pin]
            body: Incoming,
            capture: Option<Capture>,
            // The upstream connection is busy until this body is done: its place in the
            // upstream's connection limit is released with it.
            permit: OwnedSemaphorePermit,
        },
        Full { #[pin] body: Full<Bytes> },
    }
}

impl ResponseBody {
    pub fn upstream(body: Incoming, permit: OwnedSemaphorePermit) -> ResponseBody {
        ResponseBody::Upstream {
            body,
            capture: None,
            permit,
        }
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
                capture: None,
                permit,
            } => {
                let (sender, receiver) = watch::channel(None);
                let capture = Capture {
                    copy: BytesMut::new(),
                    limit,
                    sender: Some(sender),
                };
                (
                    ResponseBody::Upstream {
                        body,
                        capture: Some(capture),
                        permit,
                    },
                    Some(receiver),
                )
            }
            other => (other, None),
        }
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ResponseBodyProj::Upstream {
                mut body,
                capture: Some(capture),
                ..
            } => {
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
            ResponseBodyProj::Upstream {
                body,
                capture: None,
                ..
            } => body.poll_frame(cx),
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
