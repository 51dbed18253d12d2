//! The three counting algorithms as pure functions: `(params, state, now, cost) -> Decision`.
//!
//! Notation: `L` = limit, `P` = period in ns, `B` = effective burst, `now` in ns since the UNIX
//! epoch, `c` = cost, `n = max(c, 1)` = units that must be available (a cost of 0 is a *peek*:
//! it spends nothing and passes iff one unit is available). All arithmetic is integer, in `u128`;
//! with `L, B <= 1e15 < 2^50`, `P <= 366 days < 2^55`, `now < 2^64` and `c < 2^64` every
//! intermediate stays below `2^121`, so nothing can overflow and nothing rounds away capacity.
//! Results are converted back to `u64` nanoseconds saturating.
//!
//! # GCRA (token bucket with continuous refill)
//!
//! Time is kept *scaled* by `L` (units of `1/L` ns) so the emission interval `P/L` is the exact
//! integer `P`, whatever `L` is (1 per 366 days or 1e15 per ms alike). State: the theoretical
//! arrival time `tat` (scaled). With `now' = now*L`:
//!
//! - `tau = B*P` (the burst tolerance), `horizon = now' + tau`
//! - `base = max(min(tat, horizon), now')` — the `min` handles a clock that jumped backwards:
//!   the bucket is treated as empty (and stored so) rather than locked until the old future
//! - allowed iff `base + n*P <= horizon`; then `tat := base + c*P`
//! - `remaining = floor((horizon - tat_after) / P)`
//! - `reset_after = ceil((tat_after - now') / L)` ns (until the bucket is full again)
//! - `retry_after` = 0 if allowed; never (`None`) if `n*P > tau` (cost > burst); otherwise
//!   `ceil((base + n*P - horizon) / L)` ns
//!
//! # Fixed window (calendar aligned)
//!
//! Window `w = now - now % P`, so `1d` windows are UTC days and `1h` windows clock hours.
//! State: `(window_start, count)`; the count applies if `window_start >= w` and is 0 otherwise.
//! A later start means the clock went backwards: the count is kept, conservatively, but moved
//! to the current window so it lapses when that window ends (the sliding window does the same).
//!
//! - allowed iff `count + n <= L`; then `count += c`, `window_start := w`
//! - `remaining = L - count_after`
//! - `reset_after = w + P - now` if `count_after > 0`, else 0
//! - `retry_after` = 0 if allowed; never if `n > L`; otherwise `w + P - now` (the next window)
//!
//! # Sliding window (weighted counter, as in Cloudflare and envoy)
//!
//! Windows as above; state `(window_start, previous, current)`, rolled to the current window
//! (`previous := current` if exactly one window passed, both 0 if more). With elapsed
//! `e = now - w` and weight `W = P - e` (in `(0, P]`), scaled by `P`:
//!
//! - `estimate*P = previous*W + current*P`
//! - allowed iff `previous*W + (current + n)*P <= L*P`; then `current += c`
//! - `remaining = floor((L*P - estimate_after*P) / P)`
//! - `reset_after` = until both windows have dropped out: `2P - e` if `current > 0`,
//!   `P - e` if only `previous > 0`, else 0
//! - `retry_after` = 0 if allowed; never if `n > L`; otherwise the first instant the estimate
//!   drops far enough. Within this window that needs `W' <= Wmax = floor((L - current - n)*P /
//!   previous)` (if `current + n <= L` and `Wmax >= 1`), giving `W - Wmax`. Otherwise in the next
//!   window `previous' = current`, `current' = 0`: it needs `W'' <= floor((L - n)*P / current)`,
//!   giving `W + (P - min(that, P))` (or just `W` if `current = 0`).

use crate::spec::{Algorithm, LimitSpec, MAX_LIMIT, MAX_PERIOD, MIN_PERIOD};

/// A limit spec reduced to the numbers the algorithms use, always within bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    algorithm: Algorithm,
    limit: u64,
    period_nanos: u64,
    burst: u64,
}

impl Params {
    /// Derives params from a spec. Fields out of bounds (which validation rejects) are clamped
    /// into them, so the algorithms can never divide by zero or overflow.
    pub fn from_spec(spec: &LimitSpec) -> Self {
        let period = spec.period.clamp(MIN_PERIOD, MAX_PERIOD);
        let limit = spec.limit.clamp(1, MAX_LIMIT);
        let burst = match spec.algorithm {
            Algorithm::Gcra if spec.burst == 0 => limit,
            Algorithm::Gcra => spec.burst.min(MAX_LIMIT),
            // Windows ignore burst; zero it so it does not split their state.
            Algorithm::FixedWindow | Algorithm::SlidingWindow => 0,
        };
        Self {
            algorithm: spec.algorithm,
            limit,
            period_nanos: u64::try_from(period.as_nanos()).unwrap_or(u64::MAX),
            burst,
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Units per period, `1..=MAX_LIMIT`.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Period in nanoseconds.
    pub fn period_nanos(&self) -> u64 {
        self.period_nanos
    }

    /// Effective burst for GCRA; 0 for the window algorithms.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Canonical bytes of the params, the identity of an inline limit: algorithm tag, limit,
    /// period (ns) and burst as four little-endian `u64` words.
    pub fn canonical_bytes(&self) -> [u8; 32] {
        // Written word by word: the hash reads whole words back, which the CPU then forwards
        // straight from its store buffer.
        let words = [
            u64::from(self.algorithm_tag()),
            self.limit,
            self.period_nanos,
            self.burst,
        ];
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// A 64-bit mix of the params, stored with each entry so that a policy changed under the
    /// same name reads as fresh. Cheap rather than strong: it only ever separates the params of
    /// entries that already share a key hash.
    pub fn fingerprint(&self) -> u64 {
        self.limit.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self
                .period_nanos
                .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                .rotate_left(21)
            ^ self
                .burst
                .wrapping_mul(0x1656_67B1_9E37_79F9)
                .rotate_left(42)
            ^ u64::from(self.algorithm_tag())
    }

    fn algorithm_tag(&self) -> u8 {
        match self.algorithm {
            Algorithm::Gcra => 1,
            Algorithm::FixedWindow => 2,
            Algorithm::SlidingWindow => 3,
        }
    }
}

/// What the limiter remembers about one key under one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Theoretical arrival time, in units of `1/limit` ns (ns × limit).
    Gcra {
        /// Scaled TAT.
        tat: u128,
    },
    /// Units spent in the window starting at `window_start`.
    FixedWindow {
        /// Start of the window, ns since the epoch.
        window_start: u64,
        /// Units spent in it.
        count: u64,
    },
    /// Units spent in the window starting at `window_start` and in the one before it.
    SlidingWindow {
        /// Start of the current window, ns since the epoch.
        window_start: u64,
        /// Units spent in the previous window.
        previous: u64,
        /// Units spent in the current window.
        current: u64,
    },
}

impl State {
    /// The first instant (ns) at which this state is equivalent to a fresh one: it can be
    /// dropped then without losing information.
    pub fn rest_at(&self, params: &Params) -> u64 {
        let period = params.period_nanos;
        match *self {
            Self::Gcra { tat } => to_u64(div_ceil(tat, u128::from(params.limit))),
            Self::FixedWindow {
                window_start,
                count,
            } => {
                if count == 0 {
                    window_start
                } else {
                    window_start.saturating_add(period)
                }
            }
            Self::SlidingWindow {
                window_start,
                previous,
                current,
            } => {
                if current > 0 {
                    window_start.saturating_add(period.saturating_mul(2))
                } else if previous > 0 {
                    window_start.saturating_add(period)
                } else {
                    window_start
                }
            }
        }
    }
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The limiter's verdict: the cost fits (for a peek: one unit is available).
    pub allowed: bool,
    /// Units still available after this decision.
    pub remaining: u64,
    /// `Some(0)` if allowed, `Some(ns)` until the same cost fits, `None` if it never can.
    pub retry_after_nanos: Option<u64>,
    /// Nanoseconds until the key is back to full capacity.
    pub reset_after_nanos: u64,
    /// The state to store, if it changed: after an allowed cost above 0, or (even when denied)
    /// after moving a state left in the future by a clock that jumped backwards back to now.
    pub next: Option<State>,
}

/// Evaluates `cost` units against `state` (`None` = fresh) at `now`.
///
/// A state of another algorithm than `params` is treated as fresh.
pub fn decide(params: &Params, state: Option<&State>, now: u64, cost: u64) -> Decision {
    match params.algorithm {
        Algorithm::Gcra => {
            let tat = match state {
                Some(State::Gcra { tat }) => Some(*tat),
                _ => None,
            };
            gcra(params, tat, now, cost)
        }
        Algorithm::FixedWindow => {
            let previous = match state {
                Some(State::FixedWindow {
                    window_start,
                    count,
                }) => Some((*window_start, *count)),
                _ => None,
            };
            fixed_window(params, previous, now, cost)
        }
        Algorithm::SlidingWindow => {
            let previous = match state {
                Some(State::SlidingWindow {
                    window_start,
                    previous,
                    current,
                }) => Some((*window_start, *previous, *current)),
                _ => None,
            };
            sliding_window(params, previous, now, cost)
        }
    }
}

fn gcra(params: &Params, tat: Option<u128>, now: u64, cost: u64) -> Decision {
    let limit = u128::from(params.limit);
    let period = u128::from(params.period_nanos);
    let now_scaled = u128::from(now) * limit;
    let tau = u128::from(params.burst) * period;
    let horizon = now_scaled + tau;
    let clamped = tat.is_some_and(|tat| tat > horizon);
    let base = tat.map_or(now_scaled, |tat| tat.min(horizon).max(now_scaled));
    let needed = u128::from(cost.max(1)) * period;
    let allowed = base.saturating_add(needed) <= horizon;
    let after = if allowed {
        base + u128::from(cost) * period
    } else {
        base
    };
    let retry_after_nanos = if allowed {
        Some(0)
    } else if needed > tau {
        None
    } else {
        Some(to_u64(div_ceil(base + needed - horizon, limit)))
    };
    Decision {
        allowed,
        remaining: to_u64(div(horizon - after, period)),
        retry_after_nanos,
        reset_after_nanos: to_u64(div_ceil(after - now_scaled, limit)),
        next: ((allowed && cost > 0) || clamped).then_some(State::Gcra { tat: after }),
    }
}

fn fixed_window(params: &Params, state: Option<(u64, u64)>, now: u64, cost: u64) -> Decision {
    let limit = params.limit;
    let period = params.period_nanos;
    let elapsed = now % period;
    let window_start = now - elapsed;
    let until_next = period - elapsed;
    let moved_back = state.is_some_and(|(start, _)| start > window_start);
    let count = match state {
        Some((start, count)) if start >= window_start => count,
        _ => 0,
    };
    let needed = cost.max(1);
    let allowed = u128::from(count) + u128::from(needed) <= u128::from(limit);
    let after = if allowed { count + cost } else { count };
    let retry_after_nanos = if allowed {
        Some(0)
    } else if needed > limit {
        None
    } else {
        Some(until_next)
    };
    Decision {
        allowed,
        remaining: limit.saturating_sub(after),
        retry_after_nanos,
        reset_after_nanos: if after > 0 { until_next } else { 0 },
        next: ((allowed && cost > 0) || moved_back).then_some(State::FixedWindow {
            window_start,
            count: after,
        }),
    }
}

fn sliding_window(
    params: &Params,
    state: Option<(u64, u64, u64)>,
    now: u64,
    cost: u64,
) -> Decision {
    let period = params.period_nanos;
    let elapsed = now % period;
    let window_start = now - elapsed;
    let moved_back = state.is_some_and(|(start, _, _)| start > window_start);
    let (previous, current) = match state {
        // A later start means the clock went backwards: keep the counts, conservatively.
        Some((start, previous, current)) if start >= window_start => (previous, current),
        Some((start, _, current)) if start.checked_add(period) == Some(window_start) => {
            (current, 0)
        }
        _ => (0, 0),
    };
    let limit = u128::from(params.limit);
    let period_w = u128::from(period);
    let weight = period_w - u128::from(elapsed);
    let capacity = limit * period_w;
    let weighted_previous = u128::from(previous) * weight;
    let needed = cost.max(1);
    let allowed =
        weighted_previous + (u128::from(current) + u128::from(needed)) * period_w <= capacity;
    let after = if allowed { current + cost } else { current };
    let estimate = weighted_previous + u128::from(after) * period_w;
    let retry_after_nanos = if allowed {
        Some(0)
    } else if needed > params.limit {
        None
    } else {
        Some(to_u64(sliding_retry_after(
            limit, period_w, weight, previous, current, needed,
        )))
    };
    let reset_after_nanos = if after > 0 {
        to_u64(weight + period_w)
    } else if previous > 0 {
        to_u64(weight)
    } else {
        0
    };
    Decision {
        allowed,
        remaining: to_u64(div(capacity.saturating_sub(estimate), period_w)),
        retry_after_nanos,
        reset_after_nanos,
        next: ((allowed && cost > 0) || moved_back).then_some(State::SlidingWindow {
            window_start,
            previous,
            current: after,
        }),
    }
}

/// Nanoseconds until `needed` (<= limit) fits, for a denied sliding-window request.
fn sliding_retry_after(
    limit: u128,
    period: u128,
    weight: u128,
    previous: u64,
    current: u64,
    needed: u64,
) -> u128 {
    let (previous, current, needed) = (
        u128::from(previous),
        u128::from(current),
        u128::from(needed),
    );
    // Later in this window, as the previous window's weight shrinks.
    if previous > 0
        && let Some(spare) = limit.checked_sub(current + needed)
    {
        let max_weight = div(spare * period, previous);
        if max_weight >= 1 && max_weight < weight {
            return weight - max_weight;
        }
    }
    // In the next window, where this window's count becomes the weighted one.
    if current == 0 {
        return weight;
    }
    let max_weight = div((limit - needed) * period, current).min(period);
    weight + (period - max_weight)
}

/// `a / b`. A `u128` division is a slow library call; use the CPU's when both fit in 64 bits,
/// as they do for all but extreme limits.
#[inline]
fn div(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) => u128::from(a / b),
        _ => a / b,
    }
}

/// `ceil(a / b)`, fast like `div`.
#[inline]
fn div_ceil(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) => u128::from(a.div_ceil(b)),
        _ => a.div_ceil(b),
    }
}

fn to_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SEC: u64 = 1_000_000_000;
    /// 2024-01-01T00:00:00Z: a whole number of days, hours and minutes since the epoch.
    const T0: u64 = 1_704_067_200 * SEC;

    fn params(algorithm: Algorithm, limit: u64, period: Duration, burst: u64) -> Params {
        Params::from_spec(&LimitSpec {
            limit,
            period,
            burst,
            algorithm,
        })
    }

    /// Runs `cost` at `now`, storing the new state like the limiter does.
    fn run(p: &Params, state: &mut Option<State>, now: u64, cost: u64) -> Decision {
        let d = decide(p, state.as_ref(), now, cost);
        if let Some(next) = d.next {
            *state = Some(next);
        }
        d
    }

    #[test]
    fn test_gcra_denies_after_burst_and_reports_retry_after() {
        // 10 per second, burst 10: one unit every 100ms.
        let p = params(Algorithm::Gcra, 10, Duration::from_secs(1), 0);
        let mut s = None;
        for i in 0..10 {
            let d = run(&p, &mut s, T0, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, 9 - i);
            assert_eq!(d.reset_after_nanos, (i + 1) * 100_000_000);
        }
        let d = run(&p, &mut s, T0, 1);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_after_nanos, Some(100_000_000));
        assert_eq!(d.reset_after_nanos, SEC);
        assert_eq!(d.next, None);
        // Three units need 300ms of refill.
        assert_eq!(run(&p, &mut s, T0, 3).retry_after_nanos, Some(300_000_000));
    }

    #[test]
    fn test_gcra_refills_continuously() {
        let p = params(Algorithm::Gcra, 10, Duration::from_secs(1), 0);
        let mut s = None;
        assert!(run(&p, &mut s, T0, 10).allowed);
        assert!(!run(&p, &mut s, T0 + 99_999_999, 1).allowed);
        let d = run(&p, &mut s, T0 + 100_000_000, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        // 250ms later 2.5 units have refilled: 2 whole.
        let d = decide(&p, s.as_ref(), T0 + 350_000_000, 0);
        assert_eq!(d.remaining, 2);
        // Full after a whole period of rest.
        let d = decide(&p, s.as_ref(), T0 + 10 * SEC, 0);
        assert_eq!(d.remaining, 10);
        assert_eq!(d.reset_after_nanos, 0);
    }

    #[test]
    fn test_gcra_burst_larger_and_smaller_than_limit() {
        // 60 per minute but at most 5 at once.
        let p = params(Algorithm::Gcra, 60, Duration::from_secs(60), 5);
        let mut s = None;
        assert!(run(&p, &mut s, T0, 5).allowed);
        let d = run(&p, &mut s, T0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(SEC));
        assert_eq!(d.reset_after_nanos, 5 * SEC);
        // 1 per second with a burst of 100.
        let p = params(Algorithm::Gcra, 1, Duration::from_secs(1), 100);
        let mut s = None;
        let d = run(&p, &mut s, T0, 100);
        assert!(d.allowed);
        assert_eq!(d.reset_after_nanos, 100 * SEC);
        assert_eq!(decide(&p, None, T0, 101).retry_after_nanos, None);
    }

    #[test]
    fn test_gcra_non_integer_emission_interval_loses_no_capacity() {
        // 3 per second is 333_333_333.3ns per unit; exact scaled math still admits 3 at once.
        let p = params(Algorithm::Gcra, 3, Duration::from_secs(1), 0);
        let mut s = None;
        for _ in 0..3 {
            assert!(run(&p, &mut s, T0, 1).allowed);
        }
        let d = run(&p, &mut s, T0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(333_333_334));
        assert!(!run(&p, &mut s, T0 + 333_333_333, 1).allowed);
        assert!(run(&p, &mut s, T0 + 333_333_334, 1).allowed);
        // Over the next 3 seconds: the 2 units refilled by then, plus exactly 3 per second.
        let mut admitted = 0;
        for ms in 1..=3_000 {
            if run(&p, &mut s, T0 + SEC + ms * 1_000_000, 1).allowed {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 2 + 9);
    }

    #[test]
    fn test_gcra_peek_spends_nothing_and_waits_for_one_unit() {
        let p = params(Algorithm::Gcra, 2, Duration::from_secs(1), 0);
        let mut s = None;
        let d = run(&p, &mut s, T0, 0);
        assert!(d.allowed);
        assert_eq!(d.next, None);
        assert_eq!(d.remaining, 2);
        assert!(run(&p, &mut s, T0, 2).allowed);
        let d = run(&p, &mut s, T0, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(500_000_000));
    }

    #[test]
    fn test_gcra_cost_over_burst_can_never_pass() {
        let p = params(Algorithm::Gcra, 10, Duration::from_secs(1), 0);
        let d = decide(&p, None, T0, 11);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, None);
        assert_eq!(d.remaining, 10);
        let d = decide(&p, None, T0, u64::MAX);
        assert_eq!(d.retry_after_nanos, None);
    }

    #[test]
    fn test_gcra_clock_backwards_treats_bucket_as_empty_not_locked() {
        let p = params(Algorithm::Gcra, 10, Duration::from_secs(1), 0);
        let mut s = None;
        assert!(run(&p, &mut s, T0, 1).allowed);
        let year = 365 * 24 * 3600 * SEC;
        let d = run(&p, &mut s, T0 - year, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(100_000_000));
        assert_eq!(d.reset_after_nanos, SEC);
        assert!(run(&p, &mut s, T0 - year + SEC, 10).allowed);
    }

    #[test]
    fn test_gcra_extreme_specs_do_not_overflow() {
        let year = 366 * 24 * 3600 * SEC;
        // 1 per 366 days.
        let p = params(Algorithm::Gcra, 1, Duration::from_secs(366 * 24 * 3600), 0);
        let mut s = None;
        assert!(run(&p, &mut s, T0, 1).allowed);
        let d = run(&p, &mut s, T0, 1);
        assert_eq!(d.retry_after_nanos, Some(year));
        assert_eq!(d.reset_after_nanos, year);
        assert_eq!(run(&p, &mut s, T0, u64::MAX).retry_after_nanos, None);
        assert!(run(&p, &mut s, T0 + year, 1).allowed);
        // 1e15 per ms: 1e9 units refill every nanosecond.
        let p = params(Algorithm::Gcra, MAX_LIMIT, Duration::from_millis(1), 0);
        let mut s = None;
        let d = run(&p, &mut s, T0, MAX_LIMIT);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after_nanos, 1_000_000);
        let d = run(&p, &mut s, T0 + 1, 1_000_000_000);
        assert!(d.allowed);
        assert!(!run(&p, &mut s, T0 + 1, 1).allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(run(&p, &mut s, T0 + 1, u64::MAX).retry_after_nanos, None);
        // The end of time.
        let d = run(&p, &mut s, u64::MAX, MAX_LIMIT);
        assert!(d.allowed);
        assert_eq!(d.next.unwrap().rest_at(&p), u64::MAX);
    }

    #[test]
    fn test_fixed_window_edges_are_calendar_aligned() {
        let p = params(Algorithm::FixedWindow, 3, Duration::from_secs(3600), 99);
        assert_eq!(p.burst(), 0, "burst is ignored by windows");
        let mut s = None;
        let last_ns = T0 + 3600 * SEC - 1;
        // 10 minutes into the hour: the window still ends on the hour.
        let d = run(&p, &mut s, T0 + 600 * SEC, 2);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
        assert_eq!(d.reset_after_nanos, 3000 * SEC);
        assert!(run(&p, &mut s, last_ns, 1).allowed);
        let d = run(&p, &mut s, last_ns, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(1));
        assert_eq!(d.reset_after_nanos, 1);
        let d = run(&p, &mut s, T0 + 3600 * SEC, 3);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after_nanos, 3600 * SEC);
        assert_eq!(s.unwrap().rest_at(&p), T0 + 7200 * SEC);
    }

    #[test]
    fn test_fixed_window_daily_window_is_a_utc_day() {
        let p = params(Algorithm::FixedWindow, 1, Duration::from_secs(86_400), 0);
        let mut s = None;
        // 23:00 UTC: the window resets in an hour.
        let d = run(&p, &mut s, T0 + 23 * 3600 * SEC, 1);
        assert_eq!(d.reset_after_nanos, 3600 * SEC);
        assert_eq!(
            run(&p, &mut s, T0 + 23 * 3600 * SEC, 1).retry_after_nanos,
            Some(3600 * SEC)
        );
        assert_eq!(decide(&p, s.as_ref(), T0, 2).retry_after_nanos, None);
        assert_eq!(decide(&p, s.as_ref(), T0, u64::MAX).retry_after_nanos, None);
    }

    #[test]
    fn test_fixed_window_peek_and_clock_backwards() {
        let p = params(Algorithm::FixedWindow, 2, Duration::from_secs(60), 0);
        let mut s = None;
        let d = run(&p, &mut s, T0, 0);
        assert!(d.allowed);
        assert_eq!((d.remaining, d.reset_after_nanos, d.next), (2, 0, None));
        assert!(run(&p, &mut s, T0 + 30 * SEC, 2).allowed);
        let d = run(&p, &mut s, T0 + 30 * SEC, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(30 * SEC));
        // A year back: the spent count still applies to the (earlier) current window only.
        let year = 365 * 24 * 3600 * SEC;
        let d = run(&p, &mut s, T0 - year, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(60 * SEC));
        assert!(run(&p, &mut s, T0 - year + 60 * SEC, 1).allowed);
    }

    #[test]
    fn test_sliding_window_weights_previous_window_halfway_through() {
        let p = params(Algorithm::SlidingWindow, 10, Duration::from_secs(60), 0);
        let mut s = None;
        assert!(run(&p, &mut s, T0 + 10 * SEC, 10).allowed);
        assert!(!run(&p, &mut s, T0 + 59 * SEC, 1).allowed);
        // Halfway through the next window the previous 10 weigh 5.
        let half = T0 + 90 * SEC;
        let d = decide(&p, s.as_ref(), half, 0);
        assert_eq!(d.remaining, 5);
        let d = run(&p, &mut s, half, 5);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after_nanos, 90 * SEC);
        let d = run(&p, &mut s, half, 1);
        assert!(!d.allowed);
        // 5 + 10*(W/60s) + 1 <= 10 needs W <= 24s: 6s from now.
        assert_eq!(d.retry_after_nanos, Some(6 * SEC));
        assert!(!run(&p, &mut s, half + 6 * SEC - 1, 1).allowed);
        assert!(run(&p, &mut s, half + 6 * SEC, 1).allowed);
    }

    #[test]
    fn test_sliding_window_retry_after_in_next_window() {
        let p = params(Algorithm::SlidingWindow, 10, Duration::from_secs(60), 0);
        let mut s = None;
        // 8 spent at the start of a fresh window; a cost of 4 waits for the next window and
        // until the 8 weigh at most 6: W'' <= 45s, so 15s into it.
        assert!(run(&p, &mut s, T0, 8).allowed);
        let d = run(&p, &mut s, T0 + 30 * SEC, 4);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, Some(45 * SEC));
        assert!(!run(&p, &mut s, T0 + 75 * SEC - 1, 4).allowed);
        assert!(run(&p, &mut s, T0 + 75 * SEC, 4).allowed);
        // A cost of exactly the limit waits until both windows have passed.
        let mut s = None;
        assert!(run(&p, &mut s, T0, 1).allowed);
        let d = run(&p, &mut s, T0, 10);
        assert_eq!(d.retry_after_nanos, Some(120 * SEC));
        assert_eq!(d.reset_after_nanos, 120 * SEC);
        assert!(!run(&p, &mut s, T0 + 120 * SEC - 1, 10).allowed);
        assert!(run(&p, &mut s, T0 + 120 * SEC, 10).allowed);
    }

    #[test]
    fn test_sliding_window_forgets_after_two_windows_and_never_for_cost_over_limit() {
        let p = params(Algorithm::SlidingWindow, 5, Duration::from_secs(1), 0);
        let mut s = None;
        assert!(run(&p, &mut s, T0, 5).allowed);
        assert_eq!(s.unwrap().rest_at(&p), T0 + 2 * SEC);
        let d = decide(&p, s.as_ref(), T0 + 2 * SEC, 0);
        assert_eq!((d.remaining, d.reset_after_nanos), (5, 0));
        assert_eq!(decide(&p, s.as_ref(), T0, 6).retry_after_nanos, None);
        assert_eq!(decide(&p, s.as_ref(), T0, u64::MAX).retry_after_nanos, None);
    }

    #[test]
    fn test_sliding_window_retry_after_is_exact_for_many_states() {
        // Brute force: the reported retry_after is the first instant the request passes.
        let p = params(
            Algorithm::SlidingWindow,
            7,
            Duration::from_nanos(1_000_000),
            0,
        );
        for spent_prev in 0..=7 {
            for spent_cur in 0..=7 {
                for at in [0, 1, 333_333, 500_000, 999_999] {
                    for cost in 1..=7 {
                        let state = State::SlidingWindow {
                            window_start: T0,
                            previous: spent_prev,
                            current: spent_cur,
                        };
                        let now = T0 + at;
                        let d = decide(&p, Some(&state), now, cost);
                        if d.allowed {
                            continue;
                        }
                        let wait = d.retry_after_nanos.unwrap();
                        assert!(decide(&p, Some(&state), now + wait, cost).allowed);
                        assert!(
                            !decide(&p, Some(&state), now + wait - 1, cost).allowed,
                            "prev {spent_prev} cur {spent_cur} at {at} cost {cost}: {wait}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn test_windows_survive_extreme_clocks_and_costs() {
        for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let p = params(algorithm, MAX_LIMIT, Duration::from_millis(1), 0);
            let mut s = None;
            assert!(run(&p, &mut s, u64::MAX, MAX_LIMIT).allowed);
            assert!(!run(&p, &mut s, u64::MAX, 1).allowed);
            assert!(
                !run(&p, &mut s, 0, 1).allowed,
                "backwards to 1970 is conservative"
            );
            assert!(run(&p, &mut s, 0, 0).retry_after_nanos.is_some());
            assert_eq!(decide(&p, None, T0, u64::MAX).retry_after_nanos, None);
            let p = params(algorithm, 1, Duration::from_secs(366 * 24 * 3600), 0);
            let mut s = None;
            assert!(run(&p, &mut s, T0, 1).allowed);
            let d = run(&p, &mut s, T0, 1);
            assert!(d.retry_after_nanos.unwrap() <= 2 * 366 * 24 * 3600 * SEC);
            let century = 100 * 366 * 24 * 3600 * SEC;
            assert!(run(&p, &mut s, T0 + century, 1).allowed);
        }
    }

    #[test]
    fn test_state_of_another_algorithm_reads_as_fresh() {
        let p = params(Algorithm::Gcra, 1, Duration::from_secs(1), 0);
        let stale = State::FixedWindow {
            window_start: T0,
            count: 1,
        };
        assert!(decide(&p, Some(&stale), T0, 1).allowed);
    }

    #[test]
    fn test_params_clamp_out_of_bounds_specs() {
        let p = params(Algorithm::Gcra, 0, Duration::ZERO, u64::MAX);
        assert_eq!(
            (p.limit(), p.period_nanos(), p.burst()),
            (1, 1_000_000, MAX_LIMIT)
        );
        let p = params(Algorithm::Gcra, u64::MAX, Duration::MAX, 0);
        assert_eq!(p.limit(), MAX_LIMIT);
        assert_eq!(p.burst(), MAX_LIMIT);
        assert_eq!(u128::from(p.period_nanos()), MAX_PERIOD.as_nanos());
        assert_ne!(
            params(Algorithm::Gcra, 1, Duration::from_secs(1), 0).fingerprint(),
            params(Algorithm::FixedWindow, 1, Duration::from_secs(1), 0).fingerprint()
        );
    }
}
