//! The canary webhook: a JSON event POSTed to an optional URL on each canary state change,
//! for a deployer or a chat relay to act on.
//!
//! The guard only queues an event; one task per webhook delivers them in order, one at a
//! time, retrying failures. A slow, failing or blackholed receiver therefore never holds up
//! the guard, nor requests: the worst it can do is have events dropped, each with a warning.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Uri};
use serde_json::Value;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::http_client::{self, CallError};

/// Events waiting for delivery. State changes are minutes apart, so a full queue means the
/// receiver has been failing for a while; dropping beats holding events without bound.
pub const QUEUE_CAPACITY: usize = 64;
/// How long one attempt may take, connect included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The waits before the second, third and fourth attempts; after the fourth, the event is
/// dropped. Enough to ride out a receiver's restart, short enough that the next state change
/// is not held back for long.
pub const BACKOFF: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
];

/// How deliveries are attempted; tests shorten it.
#[derive(Debug, Clone, Copy)]
struct Retry {
    attempt_timeout: Duration,
    backoff: &'static [Duration],
}

const RETRY: Retry = Retry {
    attempt_timeout: ATTEMPT_TIMEOUT,
    backoff: &BACKOFF,
};

/// The sending end of a webhook: cheap to call from the guard, never waits.
#[derive(Debug)]
pub struct Webhook {
    url: Uri,
    events: mpsc::Sender<Value>,
}

impl Webhook {
    /// Spawns the sender task on the current tokio runtime; it stops when `stop` is cancelled
    /// (after at most finishing the attempt in flight) or when the Webhook is dropped (after
    /// delivering the events already queued: they record state changes that did happen).
    ///
    /// Must be called within a tokio runtime, as `tokio::spawn`.
    pub fn start(url: Uri, stop: CancellationToken) -> Webhook {
        Webhook::spawn(url, stop, RETRY).0
    }

    fn spawn(url: Uri, stop: CancellationToken, retry: Retry) -> (Webhook, JoinHandle<()>) {
        let (events, queue) = mpsc::channel(QUEUE_CAPACITY);
        let task = tokio::spawn(deliver_all(url.clone(), queue, stop, retry));
        (Webhook { url, events }, task)
    }

    /// Queues `event` for delivery; never waits. A full queue drops the event with a warning.
    pub fn notify(&self, event: Value) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => tracing::warn!(
                url = %self.url,
                event = event_name(&event),
                queued = QUEUE_CAPACITY,
                "canary webhook queue is full (the receiver is slow or failing); event dropped"
            ),
            // Only after `stop`: the process is shutting down.
            Err(TrySendError::Closed(event)) => tracing::debug!(
                url = %self.url,
                event = event_name(&event),
                "canary webhook stopped; event dropped"
            ),
        }
    }
}

/// The event's `"event"` field, which names it in logs.
fn event_name(event: &Value) -> &str {
    event.get("event").and_then(Value::as_str).unwrap_or("-")
}

async fn deliver_all(
    url: Uri,
    mut queue: mpsc::Receiver<Value>,
    stop: CancellationToken,
    retry: Retry,
) {
    loop {
        let event = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            event = queue.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        deliver(&url, &event, retry, &stop).await;
    }
}

/// Delivers one event, retrying as `retry` says; gives up with a warning.
async fn deliver(url: &Uri, event: &Value, retry: Retry, stop: &CancellationToken) {
    let body = Bytes::from(event.to_string());
    let mut waits = retry.backoff.iter();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = http_client::call(
            Method::POST,
            url,
            Some(body.clone()),
            None,
            retry.attempt_timeout,
        )
        .await;
        let failure = match sent {
            Ok(reply) if reply.status.is_success() => return,
            Ok(reply) => {
                let answer = String::from_utf8_lossy(&reply.body);
                let answer: String = answer.trim().chars().take(200).collect();
                format!("the receiver answered {}: {answer}", reply.status)
            }
            // Trying again cannot fix the URL.
            Err(err @ (CallError::InvalidUrl(_) | CallError::InvalidToken)) => {
                return give_up(url, event, attempts, &err.to_string());
            }
            Err(err) => err.to_string(),
        };
        let Some(wait) = waits.next().filter(|_| !stop.is_cancelled()) else {
            return give_up(url, event, attempts, &failure);
        };
        tracing::debug!(
            %url,
            event = event_name(event),
            attempts,
            error = %failure,
            retry_in = %humantime::format_duration(*wait),
            "canary webhook attempt failed"
        );
        tokio::select! {
            biased;
            () = stop.cancelled() => return give_up(url, event, attempts, &failure),
            () = tokio::time::sleep(*wait) => {}
        }
    }
}

fn give_up(url: &Uri, event: &Value, attempts: u32, error: &str) {
    tracing::warn!(
        %url,
        event = event_name(event),
        attempts,
        error,
        "canary webhook not delivered"
    );
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use http::header::CONTENT_TYPE;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use serde_json::json;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Retries without the production waits.
    const QUICK: Retry = Retry {
        attempt_timeout: Duration::from_secs(5),
        backoff: &[Duration::from_millis(10); 3],
    };

    /// Bounds every wait on a test server, so a broken webhook fails the test rather than
    /// hanging it.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// One POST as the receiver saw it, and the status it answered.
    #[derive(Debug)]
    struct Arrival {
        content_type: Option<String>,
        body: Value,
        answered: StatusCode,
    }

    /// A real hyper receiver on 127.0.0.1 that answers `statuses` in turn, then 200s.
    async fn receiver(statuses: &[StatusCode]) -> (Uri, mpsc::UnboundedReceiver<Arrival>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let statuses = Arc::new(statuses.to_vec());
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (arrived, statuses, served) =
                    (arrived.clone(), statuses.clone(), served.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let (arrived, statuses, served) =
                        (arrived.clone(), statuses.clone(), served.clone());
                    async move {
                        let content_type = request
                            .headers()
                            .get(CONTENT_TYPE)
                            .and_then(|value| value.to_str().ok())
                            .map(str::to_owned);
                        let body = request.into_body().collect().await.expect("body");
                        let body = serde_json::from_slice(&body.to_bytes()).expect("JSON body");
                        let answered = statuses
                            .get(served.fetch_add(1, Ordering::SeqCst))
                            .copied()
                            .unwrap_or(StatusCode::OK);
                        let _ = arrived.send(Arrival {
                            content_type,
                            body,
                            answered,
                        });
                        let mut response = Response::new(Full::new(Bytes::from_static(
                            b"{\"error\":\"scripted\"}",
                        )));
                        *response.status_mut() = answered;
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (url.parse().expect("url"), arrivals)
    }

    /// A receiver that accepts connections and never answers; each accept is reported.
    async fn blackhole() -> (Uri, mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let (accepted, accepts) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                let _ = accepted.send(());
            }
        });
        (url.parse().expect("url"), accepts)
    }

    async fn next<T>(queue: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(PATIENCE, queue.recv())
            .await
            .expect("in time")
            .expect("server running")
    }

    #[tokio::test]
    async fn an_event_arrives_as_json_in_order() {
        let (url, mut arrivals) = receiver(&[]).await;
        let stop = CancellationToken::new();
        let webhook = Webhook::start(url, stop.clone());
        webhook.notify(json!({"event": "rolled_back", "variant": "treatment", "weight": 0.0}));
        webhook.notify(json!({"event": "paused"}));
        let first = next(&mut arrivals).await;
        assert_eq!(first.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            first.body,
            json!({"event": "rolled_back", "variant": "treatment", "weight": 0.0})
        );
        assert_eq!(next(&mut arrivals).await.body, json!({"event": "paused"}));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_failing_receiver_gets_the_event_on_the_third_attempt() {
        let error = StatusCode::INTERNAL_SERVER_ERROR;
        let (url, mut arrivals) = receiver(&[error, error]).await;
        let stop = CancellationToken::new();
        let (webhook, task) = Webhook::spawn(url, stop.clone(), QUICK);
        webhook.notify(json!({"event": "promoted"}));
        webhook.notify(json!({"event": "next"}));
        let attempts: Vec<_> = [
            next(&mut arrivals).await,
            next(&mut arrivals).await,
            next(&mut arrivals).await,
        ]
        .into_iter()
        .map(|arrival| (arrival.body, arrival.answered))
        .collect();
        let promoted = json!({"event": "promoted"});
        assert_eq!(
            attempts,
            [
                (promoted.clone(), error),
                (promoted.clone(), error),
                (promoted, StatusCode::OK)
            ]
        );
        // Delivered, so the next event follows, once.
        assert_eq!(next(&mut arrivals).await.body, json!({"event": "next"}));
        drop(webhook);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("stops")
            .expect("no panic");
        assert!(arrivals.try_recv().is_err(), "no attempt after success");
    }

    #[tokio::test]
    async fn a_receiver_that_fails_every_attempt_gets_four() {
        let error = StatusCode::SERVICE_UNAVAILABLE;
        let (url, mut arrivals) = receiver(&[error; 8]).await;
        let (webhook, task) = Webhook::spawn(url, CancellationToken::new(), QUICK);
        webhook.notify(json!({"event": "rolled_back"}));
        drop(webhook);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("gives up")
            .expect("no panic");
        let mut attempts = 0;
        while arrivals.try_recv().is_ok() {
            attempts += 1;
        }
        assert_eq!(attempts, 1 + BACKOFF.len());
    }

    #[tokio::test]
    async fn a_blackholed_receiver_never_blocks_notify() {
        let (url, mut accepts) = blackhole().await;
        let stop = CancellationToken::new();
        let retry = Retry {
            attempt_timeout: Duration::from_millis(300),
            backoff: QUICK.backoff,
        };
        let (webhook, task) = Webhook::spawn(url, stop.clone(), retry);
        let started = Instant::now();
        // Far more than the queue holds: the rest are dropped, not waited for.
        for step in 0..4 * QUEUE_CAPACITY {
            webhook.notify(json!({"event": "step", "index": step}));
        }
        let notifying = started.elapsed();
        assert!(
            notifying < retry.attempt_timeout,
            "notify waited: {notifying:?}"
        );
        assert_eq!(webhook.events.capacity(), 0, "the queue is full");
        // Meanwhile deliveries are being attempted, and time out.
        next(&mut accepts).await;
        next(&mut accepts).await;
        stop.cancel();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("stops")
            .expect("no panic");
    }

    #[tokio::test]
    async fn cancelling_stops_after_the_attempt_in_flight() {
        let (url, mut accepts) = blackhole().await;
        let stop = CancellationToken::new();
        // Were the task to retry after the cancel, the test would time out.
        const RETRY: Retry = Retry {
            attempt_timeout: Duration::from_millis(300),
            backoff: &[Duration::from_secs(60); 3],
        };
        let (webhook, task) = Webhook::spawn(url, stop.clone(), RETRY);
        webhook.notify(json!({"event": "first"}));
        webhook.notify(json!({"event": "second"}));
        next(&mut accepts).await;
        stop.cancel();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("stops")
            .expect("no panic");
        assert!(accepts.try_recv().is_err(), "nothing sent after the cancel");
        // The task is gone: notifying still returns at once.
        webhook.notify(json!({"event": "late"}));
    }

    #[tokio::test]
    async fn dropping_stops_once_the_queue_is_delivered() {
        let (url, mut arrivals) = receiver(&[]).await;
        let (webhook, task) = Webhook::spawn(url, CancellationToken::new(), QUICK);
        webhook.notify(json!({"event": "last words"}));
        drop(webhook);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("stops")
            .expect("no panic");
        assert_eq!(
            next(&mut arrivals).await.body,
            json!({"event": "last words"})
        );
    }

    #[tokio::test]
    async fn an_https_url_is_given_up_at_once() {
        // Retrying would take a minute.
        const RETRY: Retry = Retry {
            attempt_timeout: Duration::from_secs(5),
            backoff: &[Duration::from_secs(60)],
        };
        let (webhook, task) = Webhook::spawn(
            "https://127.0.0.1:1/hook".parse().expect("url"),
            CancellationToken::new(),
            RETRY,
        );
        webhook.notify(json!({"event": "promoted"}));
        drop(webhook);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("no retries")
            .expect("no panic");
    }
}
