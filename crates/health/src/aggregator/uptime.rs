//! Time spent serving, per component, in minute buckets (the last hour) and hour buckets (the
//! last week): 228 small buckets per component, whatever the check rate.

use std::collections::VecDeque;
use std::time::Duration;

use crate::model::State;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
const MINUTES: usize = 60;
const HOURS: usize = 168;
/// Check latencies kept per component.
pub const LATENCY_SAMPLES: usize = 128;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Minute or hour number since the epoch.
    index: u64,
    good_ms: u64,
    total_ms: u64,
}

/// Serving time of one component.
#[derive(Clone)]
pub struct Uptime {
    last_ms: u64,
    state: State,
    minutes: Vec<Bucket>,
    hours: Vec<Bucket>,
}

fn add(buckets: &mut [Bucket], index: u64, good: bool, ms: u64) {
    let len = buckets.len() as u64;
    let slot = &mut buckets[usize::try_from(index % len).unwrap_or(0)];
    if slot.index != index {
        *slot = Bucket {
            index,
            ..Bucket::default()
        };
    }
    slot.total_ms += ms;
    if good {
        slot.good_ms += ms;
    }
}

fn percent(good: u64, total: u64) -> f64 {
    if total == 0 {
        -1.0
    } else {
        #[allow(clippy::cast_precision_loss, reason = "milliseconds within a week")]
        let p = good as f64 * 100.0 / total as f64;
        p
    }
}

impl Uptime {
    /// Starts counting at `now_ms` in `state`.
    #[must_use]
    pub fn new(now_ms: u64, state: State) -> Self {
        Self {
            last_ms: now_ms,
            state,
            minutes: vec![Bucket::default(); MINUTES],
            hours: vec![Bucket::default(); HOURS],
        }
    }

    /// Accounts the time since the last call to the state held then, and holds `state` from now.
    pub fn record(&mut self, now_ms: u64, state: State) {
        self.account(now_ms);
        self.state = state;
    }

    /// Accounts the time up to `now_ms`. Only UP, DEGRADED and DOWN count as observed.
    pub fn account(&mut self, now_ms: u64) {
        let counted = matches!(self.state, State::Up | State::Degraded | State::Down);
        let good = self.state.is_serving();
        // Nothing older than the week is kept.
        let mut at = self
            .last_ms
            .max(now_ms.saturating_sub(HOURS as u64 * HOUR_MS));
        self.last_ms = now_ms.max(self.last_ms);
        if !counted {
            return;
        }
        while at < now_ms {
            let end = ((at / MINUTE_MS + 1) * MINUTE_MS).min(now_ms);
            add(&mut self.minutes, at / MINUTE_MS, good, end - at);
            add(&mut self.hours, at / HOUR_MS, good, end - at);
            at = end;
        }
    }

    /// Percent of observed time serving over the last hour (-1: nothing observed).
    #[must_use]
    pub fn last_hour(&self, now_ms: u64) -> f64 {
        let from = (now_ms / MINUTE_MS).saturating_sub(MINUTES as u64 - 1);
        let (good, total) = self
            .minutes
            .iter()
            .filter(|b| b.index >= from && b.total_ms > 0)
            .fold((0, 0), |(g, t), b| (g + b.good_ms, t + b.total_ms));
        percent(good, total)
    }

    /// Percent of observed time serving over the last `hours` hours (at most a week).
    #[must_use]
    pub fn last_hours(&self, now_ms: u64, hours: u64) -> f64 {
        let from = (now_ms / HOUR_MS).saturating_sub(hours.min(HOURS as u64) - 1);
        let (good, total) = self
            .hours
            .iter()
            .filter(|b| b.index >= from && b.total_ms > 0)
            .fold((0, 0), |(g, t), b| (g + b.good_ms, t + b.total_ms));
        percent(good, total)
    }

    /// The last 24 hours, oldest first: percent serving per hour (-1: not observed).
    #[must_use]
    pub fn hour_bars(&self, now_ms: u64) -> Vec<f64> {
        let now_hour = now_ms / HOUR_MS;
        (0..24u64)
            .rev()
            .map(|back| {
                let index = now_hour.saturating_sub(back);
                let slot = self.hours[usize::try_from(index % HOURS as u64).unwrap_or(0)];
                if slot.index == index {
                    percent(slot.good_ms, slot.total_ms)
                } else {
                    -1.0
                }
            })
            .collect()
    }
}

/// The last [`LATENCY_SAMPLES`] check latencies of one component.
#[derive(Clone, Default)]
pub struct Latencies {
    samples: VecDeque<Duration>,
}

impl Latencies {
    /// Records one check's latency.
    pub fn record(&mut self, latency: Duration) {
        if self.samples.len() == LATENCY_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(latency);
    }

    /// The p50 and p99 of the kept samples, if any.
    #[must_use]
    pub fn percentiles(&self) -> Option<(Duration, Duration)> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let at = |q: usize| sorted[((sorted.len() - 1) * q).div_ceil(100)];
        Some((at(50), at(99)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000 * HOUR_MS;

    #[test]
    fn test_uptime_counts_serving_time_over_observed_time() {
        let mut uptime = Uptime::new(T0, State::Up);
        uptime.record(T0 + 45 * MINUTE_MS, State::Down);
        uptime.record(T0 + 60 * MINUTE_MS, State::Up);
        let hour = uptime.last_hour(T0 + 60 * MINUTE_MS - 1);
        assert!((hour - 75.0).abs() < 0.01, "{hour}");
        let day = uptime.last_hours(T0 + 60 * MINUTE_MS - 1, 24);
        assert!((day - 75.0).abs() < 0.01, "{day}");
    }

    #[test]
    fn test_maintenance_and_pending_are_not_observed_time() {
        let mut uptime = Uptime::new(T0, State::Pending);
        uptime.record(T0 + 10 * MINUTE_MS, State::Maintenance);
        assert!(uptime.last_hour(T0 + 20 * MINUTE_MS) < 0.0);
        uptime.record(T0 + 20 * MINUTE_MS, State::Up);
        uptime.account(T0 + 30 * MINUTE_MS);
        assert!((uptime.last_hour(T0 + 30 * MINUTE_MS) - 100.0).abs() < 0.01);
    }

    #[test]
    fn test_hour_bars_show_each_hour_oldest_first() {
        let mut uptime = Uptime::new(T0, State::Down);
        uptime.record(T0 + HOUR_MS, State::Up);
        uptime.account(T0 + 2 * HOUR_MS - 1);
        let bars = uptime.hour_bars(T0 + 2 * HOUR_MS - 1);
        assert_eq!(bars.len(), 24);
        assert!((bars[22] - 0.0).abs() < 0.01);
        assert!((bars[23] - 100.0).abs() < 0.01);
        assert!(bars[0] < 0.0);
    }

    #[test]
    fn test_a_long_gap_costs_at_most_a_week_of_buckets() {
        let mut uptime = Uptime::new(0, State::Up);
        uptime.account(T0);
        assert!((uptime.last_hours(T0, 168) - 100.0).abs() < 0.01);
    }

    #[test]
    fn test_latency_percentiles_of_the_kept_samples() {
        let mut latencies = Latencies::default();
        assert!(latencies.percentiles().is_none());
        for ms in 1..=200 {
            latencies.record(Duration::from_millis(ms));
        }
        let (p50, p99) = latencies.percentiles().unwrap();
        assert_eq!(p50, Duration::from_millis(137));
        assert_eq!(p99, Duration::from_millis(199));
    }
}
