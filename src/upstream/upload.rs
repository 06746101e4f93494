//! The client's request body on its way upstream, timed so that a client who stops sending
//! is told apart from an upstream that stops answering.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::idle::PauseTimer;

/// A streamed upload. It fails when the client sends nothing for `timeout` while the
/// upstream waits for more, and it tells the request path whether, right now, the exchange
/// is waiting on the client (`Upload::waiting_on_client`).
///
/// `Unpin`, as the HTTP/2 client wants its bodies, and so that one never polled can be
/// handed back whole (see `multiplex`).
pub struct Upload {
    body: Incoming,
    // Armed only while the client keeps the upstream waiting.
    stall: PauseTimer,
    timeout: Duration,
    waiting: Arc<AtomicBool>,
}

/// Whether an upload is, at this moment, waiting for the client's next bytes.
#[derive(Debug, Clone, Default)]
pub struct UploadProgress(Arc<AtomicBool>);

impl UploadProgress {
    /// True while the upstream has taken everything the client sent and waits for more: a
    /// timeout then is the client's doing.
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Upload {
    pub fn new(body: Incoming, timeout: Duration) -> (Upload, UploadProgress) {
        let progress = UploadProgress::default();
        let upload = Upload {
            body,
            stall: PauseTimer::default(),
            timeout,
            waiting: progress.0.clone(),
        };
        (upload, progress)
    }
}

/// Why an upload ended early.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the client sent nothing of its request body for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
    #[error(transparent)]
    Read(hyper::Error),
}

impl Body for Upload {
    type Data = Bytes;
    type Error = UploadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UploadError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stall.reset();
                this.waiting.store(false, Ordering::Relaxed);
                Poll::Ready(frame.map(|frame| frame.map_err(UploadError::Read)))
            }
            Poll::Pending => {
                this.waiting.store(true, Ordering::Relaxed);
                if this.stall.paused_too_long(this.timeout, cx) {
                    return Poll::Ready(Some(Err(UploadError::Stalled(this.timeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
