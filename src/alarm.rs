//! Deadlines per request, watched by one timer per connection.
//!
//! A tokio timer armed for each request and dropped at its end takes the timer driver's
//! lock twice a request. A connection's requests come one after another, each deadline
//! later than the last: an `Alarm` is armed once, for the first, and when it fires before
//! the deadline in force it is re-armed for that one. It touches the timer wheel once per
//! timeout at most, however many requests pass.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

#[derive(Default)]
pub(crate) struct Alarm {
    /// Boxed, as connections move (in and out of a pool); made at the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// The task the timer wakes: while it is the one waiting and the timer has not fired,
    /// polling the timer again would change nothing.
    waking: Option<Waker>,
}

impl Alarm {
    /// Ready once `deadline` has passed; until then the task is woken by it at the latest.
    pub fn poll_passed(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // A deadline earlier than the one armed (a reload shortened the timeout) re-arms it.
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
            self.waking = None;
        }
        let registered = self
            .waking
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if registered && !timer.is_elapsed() {
            return Poll::Pending;
        }
        self.waking = Some(cx.waker().clone());
        // Unconstrained: a task that has spent its tokio budget would otherwise be told to
        // yield, the timer left unregistered, and the skip above would never poll it again.
        while Pin::new(&mut tokio::task::unconstrained(timer.as_mut()))
            .poll(cx)
            .is_ready()
        {
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn each_deadline_is_kept_though_the_timer_was_armed_for_the_first() {
        let mut alarm = Alarm::default();
        let start = Instant::now();
        // Three requests a second apart, each with a 5 s deadline; the last one times out.
        for request in 0..3 {
            let deadline = Instant::now() + Duration::from_secs(5);
            if request < 2 {
                let waited = tokio::time::timeout(
                    Duration::from_secs(1),
                    poll_fn(|cx| alarm.poll_passed(cx, deadline)),
                )
                .await;
                assert!(waited.is_err(), "request {request} timed out early");
            } else {
                poll_fn(|cx| alarm.poll_passed(cx, deadline)).await;
                assert_eq!(start.elapsed(), Duration::from_secs(7));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_deadline_than_the_one_armed_is_kept() {
        let mut alarm = Alarm::default();
        let start = Instant::now();
        let long = start + Duration::from_secs(30);
        let waited = tokio::time::timeout(
            Duration::from_secs(1),
            poll_fn(|cx| alarm.poll_passed(cx, long)),
        )
        .await;
        assert!(waited.is_err());
        poll_fn(|cx| alarm.poll_passed(cx, start + Duration::from_secs(3))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    /// An upstream connection's alarm serves one client connection's task, then another's.
    #[tokio::test(start_paused = true)]
    async fn the_task_waiting_now_is_the_one_woken() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let mut alarm = Alarm::default();
        // The first task waits a moment, then gives the alarm up (its request ended).
        let mut alarm = tokio::spawn(async move {
            let waited = tokio::time::timeout(
                Duration::from_secs(1),
                poll_fn(|cx| alarm.poll_passed(cx, deadline)),
            )
            .await;
            assert!(waited.is_err());
            alarm
        })
        .await
        .expect("first task");
        // This task must be woken at the deadline, not the first one.
        let woken = tokio::time::timeout(
            Duration::from_secs(60),
            poll_fn(|cx| alarm.poll_passed(cx, deadline)),
        )
        .await;
        assert!(woken.is_ok(), "never woken");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    /// A task that has spent its tokio budget when it first waits (a large upload written
    /// in the same turn) is still woken at the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_task_out_of_budget_is_still_woken() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let mut alarm = Alarm::default();
        let mut spent = false;
        let woken = tokio::time::timeout(
            Duration::from_secs(60),
            poll_fn(|cx| {
                if !spent {
                    spent = true;
                    while std::pin::pin!(tokio::task::consume_budget())
                        .poll(cx)
                        .is_ready()
                    {}
                }
                alarm.poll_passed(cx, deadline)
            }),
        )
        .await;
        assert!(woken.is_ok(), "never woken");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
