//! A client connection that fails its writes once the client has accepted nothing for a while.
//!
//! hyper has no write timeout: a client that stops reading its answer parks the connection
//! task on a full socket, and the response body it holds keeps its upstream connection and
//! its place under `max_upstream_connections`. A few such clients could starve a variant.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pin_project_lite::pin_project! {
    pub struct WriteStallLimit<S, L> {
        #[pin]
        stream: S,
        // Asked each time a write starts to wait, so a reload reaches open connections.
        limit: L,
        // Allocated the first time a write waits, then re-armed: most connections never wait.
        timer: Option<Pin<Box<Sleep>>>,
        // The limit of the wait in progress, if a write is waiting.
        waiting: Option<Duration>,
    }
}

impl<S, L: Fn() -> Duration> WriteStallLimit<S, L> {
    pub fn new(stream: S, limit: L) -> Self {
        WriteStallLimit {
            stream,
            limit,
            timer: None,
            waiting: None,
        }
    }
}

/// Passes a write's outcome through, timing how long it has been pending.
fn watch<T>(
    poll: Poll<io::Result<T>>,
    cx: &mut Context<'_>,
    limit: &dyn Fn() -> Duration,
    timer: &mut Option<Pin<Box<Sleep>>>,
    waiting: &mut Option<Duration>,
) -> Poll<io::Result<T>> {
    if poll.is_ready() {
        *waiting = None;
        return poll;
    }
    let limit = *waiting.get_or_insert_with(|| {
        let limit = limit();
        let deadline = Instant::now() + limit;
        match timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        limit
    });
    let expired = timer
        .as_mut()
        .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
    if !expired {
        return Poll::Pending;
    }
    Poll::Ready(Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the client accepted nothing for {}",
            humantime::format_duration(limit)
        ),
    )))
}

impl<S: AsyncWrite, L: Fn() -> Duration> AsyncWrite for WriteStallLimit<S, L> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.stream.poll_write(cx, buf);
        watch(poll, cx, this.limit, this.timer, this.waiting)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.stream.poll_write_vectored(cx, bufs);
        watch(poll, cx, this.limit, this.timer, this.waiting)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.stream.poll_flush(cx);
        watch(poll, cx, this.limit, this.timer, this.waiting)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.stream.poll_shutdown(cx);
        watch(poll, cx, this.limit, this.timer, this.waiting)
    }
}

impl<S: AsyncRead, L> AsyncRead for WriteStallLimit<S, L> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_the_reader_never_takes_fails_after_the_limit() {
        let (near, _far) = tokio::io::duplex(16);
        let mut stream = WriteStallLimit::new(near, || Duration::from_secs(30));
        let started = Instant::now();
        let err = stream
            .write_all(&[0; 64])
            .await
            .expect_err("the far end never reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    /// A limit that a test can change, as a reload changes the live config's.
    fn reloadable_limit(seconds: u64) -> (Arc<AtomicU64>, impl Fn() -> Duration) {
        let setting = Arc::new(AtomicU64::new(seconds));
        let read = setting.clone();
        (setting, move || {
            Duration::from_secs(read.load(Ordering::Relaxed))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_is_the_one_in_force_when_a_write_starts_to_wait() {
        let (seconds, limit) = reloadable_limit(30);
        let (near, _far) = tokio::io::duplex(16);
        let mut stream = WriteStallLimit::new(near, limit);
        // A reload shortens the limit after the connection was accepted.
        seconds.store(5, Ordering::Relaxed);
        let started = Instant::now();
        let err = stream.write_all(&[0; 64]).await.expect_err("never read");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_under_way_keeps_the_limit_it_started_with() {
        let (seconds, limit) = reloadable_limit(30);
        let (near, _far) = tokio::io::duplex(16);
        let started = Instant::now();
        let write = tokio::spawn(async move {
            let mut stream = WriteStallLimit::new(near, limit);
            stream.write_all(&[0; 64]).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A reload mid-wait: the next wait gets 5 s, this one keeps its 30.
        seconds.store(5, Ordering::Relaxed);
        let err = write.await.expect("task").expect_err("never read");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_keeps_taking_bytes_is_never_cut_off() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut stream = WriteStallLimit::new(near, || Duration::from_secs(1));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut total = 0;
            // 64 reads, 900 ms apart: the whole write takes a minute, each wait under a second.
            while total < 1024 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                total += far.read(&mut buf).await.expect("read");
            }
            total
        });
        stream.write_all(&[0; 1024]).await.expect("write");
        assert_eq!(reader.await.expect("reader"), 1024);
    }
}
