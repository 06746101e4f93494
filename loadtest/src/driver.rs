//! Sends the traffic: one task per connection, paced by a shared [`Schedule`].
//!
//! Each connection is its own hyper HTTP/1 connection over its own `TcpStream` (inside a
//! rustls stream for `https://`), so `--connections N` means exactly N sockets at the proxy (a
//! pooled client would open more under load and hide per-connection limits). With
//! `--new-connections` each task opens a connection per request instead, and closes it after
//! the answer: N is then the number of connections (handshakes) in flight.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::options::{Budget, Mode, Options, OptionsError};
use crate::population::{Population, UserId};
use crate::progress::Progress;
use crate::report::Report;
use crate::request::RequestTemplate;
use crate::stats::{ErrorKind, Recorder, Shared};
use crate::tls::{Negotiated, TlsClient, TlsSetupError};

/// A run that could not take place (as opposed to requests that failed, which are reported).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("cannot resolve {host}:{port}: {source}")]
    Resolve {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("{host}:{port} resolved to no address")]
    NoAddress { host: String, port: u16 },
    #[error("TLS: {0}")]
    Tls(#[from] TlsSetupError),
    #[error("a connection task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the warmup (if any) and the measured phase, and reports on the measured phase.
pub async fn run(options: Options) -> Result<Report, RunError> {
    options.validate()?;
    let addr = resolve(options.target.host(), options.target.port()).await?;
    let tls = if options.target.is_https() {
        Some(TlsClient::new(&options.tls, options.target.host())?)
    } else {
        None
    };
    let plan = Arc::new(Plan {
        addr,
        tls,
        new_connections: options.new_connections,
        template: RequestTemplate::new(
            options.effective_method(),
            options.target.path_and_query().to_owned(),
            options.target.authority().clone(),
            options.id_source.clone(),
            options.body_size,
        )
        .with_headers(options.headers.clone())
        .with_connection_close(options.new_connections),
        population: options.population.clone(),
        variant_header: options.variant_header.clone(),
        timeout: options.timeout,
        // Connect errors come back in microseconds when nothing listens; retrying at that pace
        // would measure the kernel, not the proxy.
        connect_backoff: Duration::from_millis(50),
    });
    let connections: Vec<Connection> = (0..options.connections).map(|_| None).collect();

    let connections = match options.warmup {
        Some(warmup) if !warmup.is_zero() => {
            let phase = Phase {
                mode: options.mode,
                budget: Budget::duration(warmup),
                // A different stream from the measured phase, still derived from the seed.
                seed: options.seed ^ 0xA5A5_A5A5_A5A5_A5A5,
            };
            let shared = Arc::new(Shared::new(options.population.users()));
            let progress = options
                .progress
                .then(|| Progress::start("warmup", phase.budget, shared.clone()));
            let (connections, _unmeasured) = phase.run(&plan, connections, &shared).await?;
            drop(progress);
            connections
        }
        _ => connections,
    };

    let phase = Phase {
        mode: options.mode,
        budget: options.budget.bounded(),
        seed: options.seed,
    };
    let shared = Arc::new(Shared::new(options.population.users()));
    let progress = options
        .progress
        .then(|| Progress::start("run", phase.budget, shared.clone()));
    let started = Instant::now();
    let (_connections, recorders) = phase.run(&plan, connections, &shared).await?;
    let elapsed = started.elapsed();
    drop(progress);

    let mut total = Recorder::new(shared.clone());
    for recorder in &recorders {
        total.merge(recorder);
    }
    Ok(Report::new(
        &options,
        &total,
        &shared.variants.snapshot(),
        &shared.stickiness.summary(),
        elapsed,
    ))
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, RunError> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| RunError::Resolve {
            host: host.to_owned(),
            port,
            source,
        })?;
    addrs.next().ok_or_else(|| RunError::NoAddress {
        host: host.to_owned(),
        port,
    })
}

/// What every connection task needs, fixed for the run.
struct Plan {
    addr: SocketAddr,
    /// `Some` for an `https://` target.
    tls: Option<TlsClient>,
    /// A fresh connection for every request, closed after its answer.
    new_connections: bool,
    template: RequestTemplate,
    population: Population,
    variant_header: http::HeaderName,
    timeout: Duration,
    connect_backoff: Duration,
}

/// An open keep-alive connection, or `None` until the first request (re)opens it.
type Connection = Option<SendRequest<Full<Bytes>>>;

/// One pass of traffic (warmup or measured) over the same connections.
struct Phase {
    mode: Mode,
    budget: Budget,
    seed: u64,
}

impl Phase {
    /// Drives every connection until the budget is spent and hands the connections back, so the
    /// measured phase reuses the sockets the warmup opened.
    async fn run(
        &self,
        plan: &Arc<Plan>,
        connections: Vec<Connection>,
        shared: &Arc<Shared>,
    ) -> Result<(Vec<Connection>, Vec<Recorder>), RunError> {
        let schedule = Arc::new(Schedule::new(self.mode, self.budget, Instant::now()));
        let tasks: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(i, sender)| {
                let worker = Worker {
                    plan: plan.clone(),
                    schedule: schedule.clone(),
                    sender,
                    // Distinct, reproducible user sequences per connection.
                    rng: fastrand::Rng::with_seed(
                        self.seed
                            .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    ),
                    recorder: Recorder::new(shared.clone()),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        let mut connections = Vec::with_capacity(tasks.len());
        let mut recorders = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (sender, recorder) = task.await?;
            connections.push(sender);
            recorders.push(recorder);
        }
        Ok((connections, recorders))
    }
}

/// Hands out request slots to whichever connection is free, until the budget is spent.
///
/// In rate mode slot `k` is due at `start + k / rate` whether or not a connection is free
/// then; a slot claimed late keeps its due time, which is what makes the measurement immune
/// to coordinated omission.
struct Schedule {
    next: AtomicU64,
    limit: u64,
    start: Instant,
    /// `None` when only a request count bounds the run.
    end: Option<Instant>,
    per_second: Option<f64>,
}

/// One request to send.
struct Slot {
    /// When it should go out (rate mode); `None` means now (max mode).
    due: Option<Instant>,
}

impl Schedule {
    fn new(mode: Mode, budget: Budget, start: Instant) -> Self {
        Schedule {
            next: AtomicU64::new(0),
            limit: budget.requests.unwrap_or(u64::MAX),
            start,
            end: budget.duration.map(|d| start + d),
            per_second: match mode {
                Mode::Max => None,
                Mode::Rate { per_second } => Some(per_second),
            },
        }
    }

    fn claim(&self) -> Option<Slot> {
        match self.per_second {
            None => {
                if self.end.is_some_and(|end| Instant::now() >= end) {
                    return None;
                }
                let k = self.next.fetch_add(1, Ordering::Relaxed);
                (k < self.limit).then_some(Slot { due: None })
            }
            Some(per_second) => {
                let k = self.next.fetch_add(1, Ordering::Relaxed);
                if k >= self.limit {
                    return None;
                }
                // Computed from k, not by adding intervals, so rounding never accumulates.
                let due = self.start + Duration::from_secs_f64(k as f64 / per_second);
                if self.end.is_some_and(|end| due >= end) {
                    return None;
                }
                Some(Slot { due: Some(due) })
            }
        }
    }
}

/// One connection's task: claim a slot, send, record, repeat.
struct Worker {
    plan: Arc<Plan>,
    schedule: Arc<Schedule>,
    sender: Connection,
    rng: fastrand::Rng,
    recorder: Recorder,
}

/// What came back for one request, as far as the report cares.
struct Answer {
    status: u16,
    variant: Option<http::HeaderValue>,
}

impl Worker {
    async fn run(mut self) -> (Connection, Recorder) {
        while let Some(slot) = self.schedule.claim() {
            let origin = match slot.due {
                None => Instant::now(),
                Some(due) => {
                    let now = Instant::now();
                    if now < due {
                        // This connection was free before the slot was due, so any lateness
                        // from here on is tokio's 1 ms timer granularity, not the server:
                        // time from the actual wake-up.
                        sleep_until(due).await;
                        Instant::now()
                    } else if now - due > self.plan.timeout {
                        // Waited a full timeout for a connection: a client would have given
                        // up already. Counting it without sending drains a backlog quickly,
                        // so a stalled server cannot stretch the run far past its end.
                        self.recorder.failure(ErrorKind::Timeout);
                        continue;
                    } else {
                        // Queued behind busy connections: the wait is part of the latency.
                        due
                    }
                }
            };
            let user = self.plan.population.sample(&mut self.rng);
            let deadline = origin + self.plan.timeout;
            match self.exchange(user, deadline).await {
                Ok(answer) => self.recorder.answer(
                    user,
                    answer.status,
                    origin.elapsed(),
                    answer.variant.as_ref(),
                ),
                Err(kind) => {
                    self.recorder.failure(kind);
                    let refused = matches!(kind, ErrorKind::Connect | ErrorKind::Tls);
                    if refused && slot.due.is_none() {
                        sleep_until(Instant::now() + self.plan.connect_backoff).await;
                    }
                }
            }
        }
        (self.sender, self.recorder)
    }

    /// Sends one request for `user` and reads the whole answer, all before `deadline`.
    async fn exchange(&mut self, user: UserId, deadline: Instant) -> Result<Answer, ErrorKind> {
        let mut request = self
            .plan
            .template
            .build(user)
            .map_err(|_| ErrorKind::Other)?;
        // At most one retry, and only for a request hyper never wrote: a kept-alive socket the
        // server closed while idle is routine, not an error of the system under test. With
        // --new-connections there is no kept-alive socket, and a retry would be a second
        // handshake for one answer.
        let mut retried = self.plan.new_connections;
        let response = loop {
            let mut sender = self.ready_sender(deadline).await?;
            match timeout_at(deadline, sender.try_send_request(request)).await {
                Err(_elapsed) => return Err(ErrorKind::Timeout),
                Ok(Ok(response)) => {
                    self.sender = Some(sender);
                    break response;
                }
                Ok(Err(mut error)) => match error.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        request = unsent;
                    }
                    _ => return Err(ErrorKind::of_hyper(error.error())),
                },
            }
        };
        let status = response.status().as_u16();
        let variant = response.headers().get(&self.plan.variant_header).cloned();
        // Reading the body is part of the latency and frees the connection for the next request.
        match timeout_at(deadline, drain(response.into_body())).await {
            Err(_elapsed) => {
                self.sender = None;
                Err(ErrorKind::Timeout)
            }
            Ok(Err(error)) => {
                self.sender = None;
                Err(ErrorKind::of_hyper(&error))
            }
            Ok(Ok(())) => {
                if self.plan.new_connections {
                    // It asked for `Connection: close`; dropping the sender lets its task end.
                    self.sender = None;
                }
                Ok(Answer { status, variant })
            }
        }
    }

    /// The kept-alive connection if it is still usable, else a new one.
    async fn ready_sender(
        &mut self,
        deadline: Instant,
    ) -> Result<SendRequest<Full<Bytes>>, ErrorKind> {
        if let Some(mut sender) = self.sender.take() {
            if !sender.is_closed()
                && matches!(timeout_at(deadline, sender.ready()).await, Ok(Ok(())))
            {
                return Ok(sender);
            }
        }
        match connect(&self.plan, deadline).await {
            Ok((sender, negotiated)) => {
                self.recorder.opened(negotiated);
                Ok(sender)
            }
            Err(ConnectFailure::Connect) => Err(ErrorKind::Connect),
            Err(ConnectFailure::Tls(reason)) => {
                self.recorder.tls_failed(reason);
                Err(ErrorKind::Tls)
            }
        }
    }
}

/// Why a new connection could not be used.
enum ConnectFailure {
    /// TCP connect, or the HTTP/1 handshake over it.
    Connect,
    /// The TLS handshake, and why, in rustls's words.
    Tls(String),
}

/// Reads a body to its end, dropping each frame as it arrives: the content is never looked at,
/// so holding a large answer in memory would only cost.
async fn drain(mut body: hyper::body::Incoming) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

/// Connects, shakes hands (TLS, then HTTP/1), and says what TLS settled on.
async fn connect(
    plan: &Plan,
    deadline: Instant,
) -> Result<(SendRequest<Full<Bytes>>, Option<Negotiated>), ConnectFailure> {
    let stream = timeout_at(deadline, TcpStream::connect(plan.addr))
        .await
        .map_err(|_elapsed| ConnectFailure::Connect)?
        .map_err(|_io| ConnectFailure::Connect)?;
    // Requests are small and latency-bound; Nagle would hold them back waiting for ACKs.
    let _ = stream.set_nodelay(true);
    match &plan.tls {
        None => Ok((http1_over(TokioIo::new(stream), deadline).await?, None)),
        Some(tls) => {
            let stream = match timeout_at(deadline, tls.connect(stream)).await {
                Err(_elapsed) => {
                    return Err(ConnectFailure::Tls(
                        "no TLS handshake within the timeout".to_owned(),
                    ))
                }
                // tokio-rustls wraps rustls's error (a refused certificate, an alert) in the
                // io::Error, whose Display is then rustls's: "invalid peer certificate: …".
                Ok(Err(error)) => return Err(ConnectFailure::Tls(error.to_string())),
                Ok(Ok(stream)) => stream,
            };
            let negotiated = Negotiated::of(stream.get_ref().1);
            Ok((
                http1_over(TokioIo::new(stream), deadline).await?,
                Some(negotiated),
            ))
        }
    }
}

/// The HTTP/1 client handshake over a connected (and for https, TLS) stream, its connection
/// driven by a task of its own.
async fn http1_over<T>(io: T, deadline: Instant) -> Result<SendRequest<Full<Bytes>>, ConnectFailure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = timeout_at(deadline, http1::handshake(io))
        .await
        .map_err(|_elapsed| ConnectFailure::Connect)?
        .map_err(|_error| ConnectFailure::Connect)?;
    // The connection task ends by itself once the sender is dropped or the peer closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn max_schedule_hands_out_exactly_the_requested_count() {
        let schedule = Schedule::new(Mode::Max, Budget::requests(3), Instant::now());
        let claimed = std::iter::from_fn(|| schedule.claim()).count();
        assert_eq!(claimed, 3);
        assert!(schedule.claim().is_none());
    }

    #[tokio::test]
    async fn rate_schedule_spaces_slots_evenly_from_the_start() {
        let start = Instant::now();
        let schedule = Schedule::new(
            Mode::Rate { per_second: 100.0 },
            Budget::duration(Duration::from_millis(50)),
            start,
        );
        let dues: Vec<Duration> = std::iter::from_fn(|| schedule.claim())
            .map(|slot| slot.due.map(|due| due - start).unwrap_or_default())
            .collect();
        // Slots at 0, 10, 20, 30, 40 ms; the one at 50 ms is past the end.
        assert_eq!(dues.len(), 5);
        for (k, due) in dues.iter().enumerate() {
            let expected = Duration::from_millis(10 * k as u64);
            assert!(
                due.abs_diff(expected) < Duration::from_micros(1),
                "slot {k}: {due:?}"
            );
        }
    }

    #[tokio::test]
    async fn rate_schedule_stops_at_whichever_limit_comes_first() {
        let budget = Budget {
            duration: Some(Duration::from_secs(10)),
            requests: Some(4),
        };
        let schedule = Schedule::new(Mode::Rate { per_second: 1.0 }, budget, Instant::now());
        assert_eq!(std::iter::from_fn(|| schedule.claim()).count(), 4);
    }

    #[tokio::test]
    async fn max_schedule_stops_at_the_deadline() {
        let start = Instant::now() - Duration::from_secs(2);
        let schedule = Schedule::new(Mode::Max, Budget::duration(Duration::from_secs(1)), start);
        assert!(schedule.claim().is_none());
    }
}
