//! φ-accrual failure detection (Hayashibara et al.; as in Akka and Cassandra): from the
//! intervals between an agent's recent heartbeats, how unlikely it is that the next one is
//! merely late. φ = 1 means a 10% chance it is only late, φ = 3 a 0.1% chance.

use std::collections::VecDeque;
use std::time::Duration;

/// Intervals remembered per agent.
const WINDOW: usize = 100;

/// One agent's heartbeat history.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    intervals: VecDeque<u64>,
    sum: u64,
    sum_sq: u128,
    last_ms: Option<u64>,
    /// Assumed interval until there is history (the announced heartbeat interval).
    expected_ms: u64,
    min_std_dev_ms: f64,
}

impl PhiDetector {
    /// A detector expecting a heartbeat every `expected`, never assuming a standard deviation
    /// below `min_std_dev`.
    #[must_use]
    pub fn new(expected: Duration, min_std_dev: Duration) -> Self {
        Self {
            intervals: VecDeque::with_capacity(WINDOW),
            sum: 0,
            sum_sq: 0,
            last_ms: None,
            expected_ms: millis(expected).max(1),
            min_std_dev_ms: millis(min_std_dev).max(1) as f64,
        }
    }

    /// Records a heartbeat at `now_ms`. An interval shorter than half the expected one (the
    /// first report right after the stream opens, a burst after a stall) only moves the last
    /// heartbeat: counted, it would widen the spread and slow suspicion for a minute.
    pub fn heartbeat(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms {
            let interval = now_ms.saturating_sub(last);
            if interval < self.expected_ms / 2 {
                self.last_ms = Some(now_ms.max(last));
                return;
            }
            if self.intervals.len() == WINDOW
                && let Some(old) = self.intervals.pop_front()
            {
                self.sum -= old;
                self.sum_sq -= u128::from(old) * u128::from(old);
            }
            self.intervals.push_back(interval);
            self.sum += interval;
            self.sum_sq += u128::from(interval) * u128::from(interval);
        }
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(0)));
    }

    /// Milliseconds since the last heartbeat (0 before the first).
    #[must_use]
    pub fn silence_ms(&self, now_ms: u64) -> u64 {
        self.last_ms.map_or(0, |last| now_ms.saturating_sub(last))
    }

    /// The suspicion level at `now_ms` (0 before the first heartbeat).
    #[must_use]
    #[allow(
        clippy::cast_precision_loss,
        reason = "intervals are far below 2^52 ms"
    )]
    pub fn phi(&self, now_ms: u64) -> f64 {
        let Some(last) = self.last_ms else {
            return 0.0;
        };
        let (mean, std_dev) = if self.intervals.is_empty() {
            (self.expected_ms as f64, self.expected_ms as f64 / 4.0)
        } else {
            let n = self.intervals.len() as f64;
            let mean = self.sum as f64 / n;
            let variance = (self.sum_sq as f64 / n - mean * mean).max(0.0);
            (mean, variance.sqrt())
        };
        let std_dev = std_dev.max(self.min_std_dev_ms);
        let elapsed = now_ms.saturating_sub(last) as f64;
        let y = (elapsed - mean) / std_dev;
        // Logistic approximation of the normal CDF (Akka's), accurate to about 1e-4.
        let e = (-y * (1.5976 + 0.070_566 * y * y)).exp();
        let p_later = if elapsed > mean {
            e / (1.0 + e)
        } else {
            1.0 - 1.0 / (1.0 + e)
        };
        -p_later.max(f64::MIN_POSITIVE).log10()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(every_ms: u64, beats: u64) -> PhiDetector {
        let mut d = PhiDetector::new(Duration::from_secs(1), Duration::from_millis(250));
        for i in 0..beats {
            d.heartbeat(i * every_ms);
        }
        d
    }

    #[test]
    fn test_a_300ms_late_heartbeat_is_not_suspected() {
        let d = steady(1000, 30);
        let last = 29 * 1000;
        assert!(d.phi(last + 1300) < 3.0, "phi {}", d.phi(last + 1300));
    }

    #[test]
    fn test_a_silent_agent_is_suspect_within_2s_and_dead_within_4s() {
        let d = steady(1000, 30);
        let last = 29 * 1000;
        let suspect_at = (0..4000).find(|ms| d.phi(last + ms) >= 3.0).unwrap();
        let dead_at = (0..8000).find(|ms| d.phi(last + ms) >= 8.0).unwrap();
        assert!(suspect_at <= 2000, "suspect after {suspect_at} ms");
        assert!(dead_at <= 4000, "dead after {dead_at} ms");
        assert!(suspect_at > 1300 && dead_at > suspect_at);
    }

    #[test]
    fn test_a_report_right_after_the_stream_opens_does_not_widen_the_spread() {
        let mut d = PhiDetector::new(Duration::from_secs(1), Duration::from_millis(250));
        d.heartbeat(0); // the stream opens
        d.heartbeat(3); // the first report, at once
        for i in 1..=3 {
            d.heartbeat(3 + i * 1000);
        }
        let last = 3003;
        let suspect_at = (0..4000).find(|ms| d.phi(last + ms) >= 3.0).unwrap();
        assert!(suspect_at <= 1800, "suspect after {suspect_at} ms");
    }

    #[test]
    fn test_phi_grows_with_silence_and_is_zero_before_any_heartbeat() {
        let fresh = PhiDetector::new(Duration::from_secs(1), Duration::from_millis(250));
        assert!(fresh.phi(10_000).abs() < f64::EPSILON);
        let d = steady(1000, 10);
        let last = 9 * 1000;
        assert!(d.phi(last + 500) < d.phi(last + 1500));
        assert!(d.phi(last + 1500) < d.phi(last + 2500));
    }
}
