//! The pause timer of a body that streams through: armed only while the body keeps its
//! reader waiting, so a body that flows without pause never touches the timer wheel.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;

/// Polls the pause timer in `slot`, starting it for `limit` if it is not running; true once
/// the pause has lasted `limit`. Clear the slot (`set(None)`) whenever the body moves.
pub fn paused_too_long(
    mut slot: Pin<&mut Option<Sleep>>,
    limit: Duration,
    cx: &mut Context<'_>,
) -> bool {
    if slot.is_none() {
        slot.set(Some(tokio::time::sleep(limit)));
    }
    slot.as_pin_mut()
        .is_some_and(|timer| timer.poll(cx).is_ready())
}
