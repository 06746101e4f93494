//! Counting each request exactly once, under the variant it was assigned to, with how it
//! ended.
//!
//! An answer abproxy gives itself, and an upstream's server error, are judged at the response
//! head. Any other upstream answer is judged when its body ends: a stream the upstream cuts
//! short is its failure even though its head said 200, a client that hangs up mid-stream is a
//! 499, and a gRPC call's outcome is in its trailers. The time to the head (first token) and
//! the time to the end are both recorded.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, StatusCode};

use crate::grpc;
use crate::metrics::{Answer, VariantMetrics, CLIENT_CLOSED_REQUEST};
use crate::route::Unit;
use crate::upstream::UpstreamErrorKind;

/// A request on its way through the proxy, not yet counted.
///
/// Dropped uncounted, it is counted as 499: hyper drops the handler, or the response body,
/// when the client hangs up first. Without those, a treatment slow enough for clients to give
/// up on would look better than it is: its worst requests would vanish from the metrics.
/// (Requests cut when the shutdown grace period ends count as 499 too, as the process exits.)
pub struct Tally {
    metrics: Arc<VariantMetrics>,
    unit: Unit,
    started: Instant,
    /// A gRPC call: its outcome is a `grpc-status`, and its errors are answered as gRPC's.
    grpc: bool,
    counted: bool,
}

/// A request not yet assigned to a variant: counted under `variant="none"` if it ends so
/// (refused, or dropped as the client's 499). It borrows the proxy's metrics for those, where
/// a `Tally` of its own would take and give back a reference count on every request.
pub struct Unassigned<'p> {
    metrics: &'p VariantMetrics,
    started: Instant,
    grpc: bool,
    counted: bool,
}

impl<'p> Unassigned<'p> {
    pub fn new(metrics: &'p VariantMetrics, started: Instant, grpc: bool) -> Unassigned<'p> {
        Unassigned {
            metrics,
            started,
            grpc,
            counted: false,
        }
    }

    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// Counted under `variant` from here on.
    pub fn assign(mut self, variant: Arc<VariantMetrics>, unit: Unit) -> Tally {
        self.counted = true;
        Tally {
            metrics: variant,
            unit,
            started: self.started,
            grpc: self.grpc,
            counted: false,
        }
    }

    /// Refused with an answer of abproxy's own: counted now.
    pub fn refused(mut self, status: StatusCode, headers: &HeaderMap) {
        let elapsed = self.started.elapsed();
        self.metrics.head(elapsed);
        let code = if self.grpc {
            grpc::Code::of(headers)
        } else {
            None
        };
        let answer = answer(self.grpc, status, code);
        self.metrics.record(answer, elapsed, Unit::Fixed);
        self.counted = true;
    }
}

impl Drop for Unassigned<'_> {
    fn drop(&mut self) {
        if !self.counted {
            let answer = Answer::http(CLIENT_CLOSED_REQUEST);
            self.metrics
                .record(answer, self.started.elapsed(), Unit::Fixed);
        }
    }
}

impl Tally {
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The request was served by a fallback variant: counted there, but not as the split's
    /// (the fallback was not the user's assignment, so the canary guard leaves it out).
    pub fn served_by(&mut self, fallback: Arc<VariantMetrics>) {
        self.metrics = fallback;
        self.unit = Unit::Fixed;
    }

    /// The response head goes to the client now. Returns the tally back when the answer is
    /// to be judged at the end of its body (`Ending`); counts it now otherwise.
    pub fn head(
        mut self,
        status: StatusCode,
        headers: &HeaderMap,
        streams: bool,
    ) -> Option<Ending> {
        self.metrics.head(self.started.elapsed());
        // Trailers-only: a gRPC answer with no messages carries its status in the head.
        let code = if self.grpc {
            grpc::Code::of(headers)
        } else {
            None
        };
        if streams && code.is_none() && !status.is_server_error() {
            return Some(Ending {
                tally: self,
                status,
                code: None,
            });
        }
        let answer = self.answer(status, code);
        self.finish(answer);
        None
    }

    fn answer(&self, status: StatusCode, code: Option<grpc::Code>) -> Answer {
        answer(self.grpc, status, code)
    }

    fn finish(&mut self, answer: Answer) {
        self.metrics
            .record(answer, self.started.elapsed(), self.unit);
        self.counted = true;
    }
}

/// How an answer counts, by its status and a gRPC call's code.
fn answer(grpc: bool, status: StatusCode, code: Option<grpc::Code>) -> Answer {
    match code {
        Some(code) => Answer::grpc(status, code),
        // A gRPC answer that ends with no status at all is broken (RFC: grpc's `Unknown`).
        None if grpc && status == StatusCode::OK => Answer::grpc(status, grpc::Code::UNKNOWN),
        None => Answer::http(status),
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.counted {
            self.finish(Answer::http(CLIENT_CLOSED_REQUEST));
        }
    }
}

/// An answer streaming to the client, counted when its body ends.
pub struct Ending {
    tally: Tally,
    status: StatusCode,
    code: Option<grpc::Code>,
}

impl Ending {
    pub fn trailers(&mut self, trailers: &HeaderMap) {
        if self.tally.grpc {
            self.code = grpc::Code::of(trailers);
        }
    }

    /// The body went to the client whole.
    pub fn complete(mut self) {
        let answer = self.tally.answer(self.status, self.code);
        self.tally.finish(answer);
    }

    /// The client left mid-answer: counted as 499, not as the variant's failure.
    fn left(&mut self) {
        if !self.tally.counted {
            self.tally.finish(Answer::left_mid_answer());
        }
    }

    /// The upstream broke off its answer (reset, protocol error) or stalled mid-body: the
    /// variant's failure, counted as the 502 or 504 it would have been before the head.
    pub fn upstream_failed(mut self, kind: UpstreamErrorKind) {
        self.tally.metrics.upstream_error(kind);
        let status = match kind {
            UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        self.tally.finish(Answer::http(status));
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.left();
    }
}
