//! The pause timer of a body that streams through: armed only while the body keeps its
//! reader waiting, so a body that flows without pause never touches the timer wheel.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;

/// The timer, boxed the first time the body pauses and then re-armed: a body that never
/// pauses carries a pointer, not the timer, and stays `Unpin` (an upload, which the HTTP/2
/// client sends from a task of its own, must be).
#[derive(Default)]
pub struct PauseTimer(Option<Pin<Box<Option<Sleep>>>>);

impl PauseTimer {
    /// True once the pause has lasted `limit`; starts the timer if it is not running.
    pub fn paused_too_long(&mut self, limit: Duration, cx: &mut Context<'_>) -> bool {
        let mut slot = self.0.get_or_insert_with(|| Box::pin(None)).as_mut();
        if slot.is_none() {
            slot.set(Some(tokio::time::sleep(limit)));
        }
        slot.as_pin_mut()
            .is_some_and(|timer| timer.poll(cx).is_ready())
    }

    /// The body moved: the next pause is timed afresh.
    pub fn reset(&mut self) {
        if let Some(slot) = &mut self.0 {
            slot.set(None);
        }
    }
}
