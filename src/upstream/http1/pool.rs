//! Keep-alive connections waiting for a request.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Context;
use std::time::{Duration, Instant};

use super::Connection;
use crate::clock;

/// How long an idle upstream connection stays in the pool.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections to one upstream, the most recently used last.
#[derive(Default)]
pub(in crate::upstream) struct Pool(Mutex<VecDeque<(Box<Connection>, Instant)>>);

impl Pool {
    /// The warmest connection the upstream has not closed, if any, at `now` (the request's
    /// own clock read). Checking one costs no system call unless its socket turned readable
    /// while it was idle.
    pub fn take(&self, cx: &mut Context<'_>, now: Instant) -> Option<Box<Connection>> {
        loop {
            let (mut connection, since) = self.lock().pop_back()?;
            // `since` may be later than `now`: put back while this request was on its way.
            if now.saturating_duration_since(since) <= IDLE_TIMEOUT && connection.is_usable(cx) {
                return Some(connection);
            }
        }
    }

    pub fn put(&self, mut connection: Box<Connection>) {
        connection.reused = true;
        connection.trim();
        let now = clock::coarse_now();
        let mut idle = self.lock();
        // The oldest are at the front: close those idle for too long.
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        idle.push_back((connection, now));
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(Box<Connection>, Instant)>> {
        // Nothing panics while holding the lock, and the list is valid whatever happened.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
