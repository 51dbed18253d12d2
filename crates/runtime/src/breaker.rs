//! A circuit breaker as a tower layer for gRPC client channels.
//!
//! - **Closed**: calls pass; outcomes are counted in a rolling window (ten buckets). When at
//!   least `min_calls` were seen in the window and the failure share reaches `failure_rate`,
//!   the breaker opens.
//! - **Open**: calls fail at once with `UNAVAILABLE` ("circuit open") without touching the
//!   peer. After the open duration the breaker goes half-open. Each consecutive opening doubles
//!   the duration, from `open_base` up to `open_max`.
//! - **Half-open**: at most `half_open_probes` calls are let through; when that many succeed the
//!   breaker closes (and the back-off resets); one failure opens it again.
//!
//! Failures are transport errors and the codes that say the peer is unwell: UNAVAILABLE,
//! DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, DATA_LOSS and RESOURCE_EXHAUSTED. A caller's mistake
//! (INVALID_ARGUMENT, NOT_FOUND, …) is a success for the breaker. The state is exported as
//! `rpc_client_circuit_breaker_state{target}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use parking_lot::Mutex;
use prometheus::IntGauge;
use tower_layer::Layer;
use tower_service::Service;

use crate::metrics::Metrics;
use crate::observe::grpc_status;

const BUCKETS: usize = 10;

/// Circuit breaker settings.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Length of the rolling window of outcomes. Default 10 s.
    pub window: Duration,
    /// Fewest calls in the window before the failure share is judged. Default 20.
    pub min_calls: u32,
    /// Failure share (0–1] that opens the breaker. Default 0.5.
    pub failure_rate: f64,
    /// First open duration. Default 1 s.
    pub open_base: Duration,
    /// Longest open duration after repeated openings. Default 30 s.
    pub open_max: Duration,
    /// Calls let through while half-open. Default 3.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            min_calls: 20,
            failure_rate: 0.5,
            open_base: Duration::from_secs(1),
            open_max: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// The breaker's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerPhase {
    /// Calls pass.
    Closed,
    /// Calls are rejected until the open duration ends.
    Open,
    /// A few probe calls pass.
    HalfOpen,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    successes: u32,
    failures: u32,
}

enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

struct State {
    phase: Phase,
    buckets: [Bucket; BUCKETS],
    openings: u32,
}

/// A shared circuit breaker; see the module docs.
pub struct CircuitBreaker {
    config: BreakerConfig,
    origin: Instant,
    state: Mutex<State>,
    gauge: Option<IntGauge>,
}

/// Permission to make one call, returned by [`CircuitBreaker::try_acquire`].
#[derive(Debug)]
#[must_use]
pub struct Permit {
    probe: bool,
}

impl CircuitBreaker {
    /// A closed breaker; `gauge` (if any) tracks its phase.
    #[must_use]
    pub fn new(config: BreakerConfig, gauge: Option<IntGauge>) -> Self {
        if let Some(g) = &gauge {
            g.set(0);
        }
        Self {
            config,
            origin: Instant::now(),
            state: Mutex::new(State {
                phase: Phase::Closed,
                buckets: [Bucket::default(); BUCKETS],
                openings: 0,
            }),
            gauge,
        }
    }

    /// The current phase (an open breaker whose time is up reports half-open).
    #[must_use]
    pub fn phase(&self, now: Instant) -> BreakerPhase {
        match self.state.lock().phase {
            Phase::Closed => BreakerPhase::Closed,
            Phase::Open { until } if now < until => BreakerPhase::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerPhase::HalfOpen,
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let bucket_nanos = (self.config.window.as_nanos() / BUCKETS as u128).max(1);
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos() / bucket_nanos)
            .unwrap_or(u64::MAX)
    }

    fn set_phase(&self, state: &mut State, phase: Phase) {
        let value = match phase {
            Phase::Closed => 0,
            Phase::Open { .. } => 1,
            Phase::HalfOpen { .. } => 2,
        };
        state.phase = phase;
        if let Some(g) = &self.gauge {
            g.set(value);
        }
    }

    fn open(&self, state: &mut State, now: Instant) {
        let factor = 1u32 << state.openings.min(16);
        let duration = self
            .config
            .open_base
            .saturating_mul(factor)
            .min(self.config.open_max);
        state.openings = state.openings.saturating_add(1);
        state.buckets = [Bucket::default(); BUCKETS];
        self.set_phase(
            state,
            Phase::Open {
                until: now + duration,
            },
        );
    }

    /// Gives back a permit whose call was not made, or whose outcome says nothing about the
    /// target (the caller cancelled): a half-open probe's place is freed, nothing is counted.
    #[allow(
        clippy::needless_pass_by_value,
        reason = "a permit is spent by giving it back"
    )]
    pub fn forget(&self, permit: Permit) {
        let Permit { probe } = permit;
        if !probe {
            return;
        }
        let mut state = self.state.lock();
        if let Phase::HalfOpen {
            ref mut in_flight, ..
        } = state.phase
        {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Closes an open or half-open breaker at once, as a check made out of band (not under a
    /// permit) found the target healthy: the back-off starts over. No effect when closed.
    pub fn close_after_health_check(&self) {
        let mut state = self.state.lock();
        if !matches!(state.phase, Phase::Closed) {
            state.openings = 0;
            state.buckets = [Bucket::default(); BUCKETS];
            self.set_phase(&mut state, Phase::Closed);
        }
    }

    /// Asks to make a call now.
    ///
    /// # Errors
    /// Returns the time left while the breaker is open, or zero when half-open probes are all
    /// in flight.
    pub fn try_acquire(&self, now: Instant) -> Result<Permit, Duration> {
        let mut state = self.state.lock();
        match state.phase {
            Phase::Closed => Ok(Permit { probe: false }),
            Phase::Open { until } if now < until => Err(until - now),
            Phase::Open { .. } => {
                self.set_phase(
                    &mut state,
                    Phase::HalfOpen {
                        in_flight: 1,
                        successes: 0,
                    },
                );
                Ok(Permit { probe: true })
            }
            Phase::HalfOpen {
                ref mut in_flight, ..
            } => {
                if *in_flight < self.config.half_open_probes {
                    *in_flight += 1;
                    Ok(Permit { probe: true })
                } else {
                    Err(Duration::ZERO)
                }
            }
        }
    }

    /// Records the outcome of a call made under `permit`.
    #[allow(
        clippy::needless_pass_by_value,
        reason = "a permit is spent by recording its outcome"
    )]
    pub fn record(&self, permit: Permit, success: bool, now: Instant) {
        let Permit { probe } = permit;
        let mut state = self.state.lock();
        match state.phase {
            Phase::HalfOpen {
                ref mut in_flight,
                ref mut successes,
            } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if !success {
                    self.open(&mut state, now);
                } else {
                    *successes += 1;
                    if *successes >= self.config.half_open_probes {
                        state.openings = 0;
                        state.buckets = [Bucket::default(); BUCKETS];
                        self.set_phase(&mut state, Phase::Closed);
                    }
                }
            }
            Phase::Closed => {
                let slot = self.slot(now);
                let bucket =
                    &mut state.buckets[usize::try_from(slot % BUCKETS as u64).unwrap_or(0)];
                if bucket.slot != slot {
                    *bucket = Bucket {
                        slot,
                        successes: 0,
                        failures: 0,
                    };
                }
                if success {
                    bucket.successes += 1;
                } else {
                    bucket.failures += 1;
                }
                let oldest = slot.saturating_sub(BUCKETS as u64 - 1);
                let (ok, failed) = state
                    .buckets
                    .iter()
                    .filter(|b| b.slot >= oldest && b.slot <= slot)
                    .fold((0u64, 0u64), |(s, f), b| {
                        (s + u64::from(b.successes), f + u64::from(b.failures))
                    });
                let total = ok + failed;
                #[allow(clippy::cast_precision_loss)]
                let failing = total >= u64::from(self.config.min_calls)
                    && failed as f64 >= self.config.failure_rate * total as f64;
                if failing {
                    self.open(&mut state, now);
                }
            }
            // Outcomes of calls started before the breaker opened, or stale probes.
            Phase::Open { .. } | Phase::HalfOpen { .. } => {}
        }
    }
}

/// Whether a gRPC status code counts against the peer.
#[must_use]
pub fn is_peer_failure(code: i32) -> bool {
    matches!(code, 2 | 4 | 8 | 13 | 14 | 15)
}

/// Wraps a client service in a [`CircuitBreaker`].
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    breaker: Arc<CircuitBreaker>,
}

impl CircuitBreakerLayer {
    /// A breaker for `target` (a peer name or address), exporting its state into `metrics`.
    #[must_use]
    pub fn new(target: &str, config: BreakerConfig, metrics: &Metrics) -> Self {
        let gauge = metrics.breaker_state.with_label_values(&[target]);
        Self {
            breaker: Arc::new(CircuitBreaker::new(config, Some(gauge))),
        }
    }

    /// The shared breaker.
    #[must_use]
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// The service made by [`CircuitBreakerLayer`].
#[derive(Clone)]
pub struct CircuitBreakerService<S> {
    inner: S,
    breaker: Arc<CircuitBreaker>,
}

impl<S> std::fmt::Debug for CircuitBreakerService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("phase", &self.breaker.phase(Instant::now()))
            .finish()
    }
}

/// A trailers-only `UNAVAILABLE` response for a rejected call.
fn circuit_open_response<B: Default>(retry_in: Duration) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static("14"));
    let message = format!(
        "circuit%20open%3A%20peer%20failing%2C%20retry%20in%20{}ms",
        retry_in.as_millis()
    );
    if let Ok(v) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", v);
    }
    response
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CircuitBreakerService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.breaker.try_acquire(Instant::now()) {
            Ok(permit) => BreakerFuture {
                inner: Some(self.inner.call(req)),
                permit: Some(permit),
                breaker: self.breaker.clone(),
                rejected: None,
            },
            Err(retry_in) => BreakerFuture {
                inner: None,
                permit: None,
                breaker: self.breaker.clone(),
                rejected: Some(retry_in),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CircuitBreakerService`].
    pub struct BreakerFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<Permit>,
        breaker: Arc<CircuitBreaker>,
        rejected: Option<Duration>,
    }
}

impl<F, B, E> Future for BreakerFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Ok(circuit_open_response(this.rejected.unwrap_or_default())));
        };
        let result = ready!(inner.poll(cx));
        if let Some(permit) = this.permit.take() {
            let success = match &result {
                Ok(response) => !grpc_status(response.headers()).is_some_and(is_peer_failure),
                Err(_) => false,
            };
            this.breaker.record(permit, success, Instant::now());
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_calls: 4,
            failure_rate: 0.5,
            open_base: Duration::from_secs(1),
            open_max: Duration::from_secs(4),
            half_open_probes: 2,
        }
    }

    fn call(b: &CircuitBreaker, ok: bool, now: Instant) {
        let permit = b.try_acquire(now).expect("permitted");
        b.record(permit, ok, now);
    }

    #[test]
    fn test_breaker_opens_after_failure_rate_with_minimum_calls() {
        let b = CircuitBreaker::new(config(), None);
        let t = Instant::now();
        call(&b, false, t);
        call(&b, false, t);
        call(&b, false, t);
        assert_eq!(b.phase(t), BreakerPhase::Closed, "below min_calls");
        call(&b, true, t);
        assert_eq!(b.phase(t), BreakerPhase::Open);
        assert_eq!(
            b.try_acquire(t + Duration::from_millis(500)).unwrap_err(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn test_half_open_limits_probes_and_closes_after_successes() {
        let b = CircuitBreaker::new(config(), None);
        let t = Instant::now();
        for _ in 0..4 {
            call(&b, false, t);
        }
        let later = t + Duration::from_secs(1);
        let p1 = b.try_acquire(later).unwrap();
        let p2 = b.try_acquire(later).unwrap();
        assert!(b.try_acquire(later).is_err(), "only two probes");
        b.record(p1, true, later);
        assert_eq!(b.phase(later), BreakerPhase::HalfOpen);
        b.record(p2, true, later);
        assert_eq!(b.phase(later), BreakerPhase::Closed);
    }

    #[test]
    fn test_failed_probe_reopens_with_doubled_duration_capped() {
        let b = CircuitBreaker::new(config(), None);
        let mut t = Instant::now();
        for _ in 0..4 {
            call(&b, false, t);
        }
        for expected in [2u64, 4, 4] {
            t += Duration::from_secs(4);
            let probe = b.try_acquire(t).unwrap();
            b.record(probe, false, t);
            assert_eq!(b.try_acquire(t).unwrap_err(), Duration::from_secs(expected));
        }
    }

    #[test]
    fn test_a_passed_health_check_closes_at_once_and_restarts_the_back_off() {
        let b = CircuitBreaker::new(config(), None);
        let mut t = Instant::now();
        for _ in 0..4 {
            call(&b, false, t);
        }
        t += Duration::from_secs(1);
        let probe = b.try_acquire(t).unwrap();
        b.record(probe, false, t);
        assert_eq!(b.phase(t), BreakerPhase::Open, "open for 2 s now");
        b.close_after_health_check();
        assert_eq!(b.phase(t), BreakerPhase::Closed);
        // The next opening is the first again: 1 s, not 4 s.
        for _ in 0..4 {
            call(&b, false, t);
        }
        assert_eq!(b.try_acquire(t).unwrap_err(), Duration::from_secs(1));
    }

    #[test]
    fn test_old_failures_leave_the_window() {
        let b = CircuitBreaker::new(config(), None);
        let t = Instant::now();
        call(&b, false, t);
        call(&b, false, t);
        call(&b, false, t);
        let later = t + Duration::from_secs(11);
        call(&b, false, later);
        assert_eq!(b.phase(later), BreakerPhase::Closed);
    }

    #[test]
    fn test_caller_mistakes_do_not_count_as_peer_failures() {
        assert!(!is_peer_failure(3));
        assert!(!is_peer_failure(5));
        assert!(is_peer_failure(14));
    }
}
