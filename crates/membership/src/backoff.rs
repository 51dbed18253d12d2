//! Bounded exponential back-off with jitter for retries against etcd.

use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64_with_seed;

const INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// 100 ms doubling up to [`MAX_BACKOFF`], each delay jittered by ±20 % so that many instances
/// do not retry in lockstep after an etcd restart.
pub(crate) struct Backoff {
    next: Duration,
    seed: u64,
    attempt: u64,
}

impl Backoff {
    /// `seed` varies the jitter between instances (e.g. a hash of the instance id).
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            next: INITIAL,
            seed,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        self.attempt += 1;
        // 0..=40 → factor 0.8..=1.2
        let spread = xxh3_64_with_seed(&self.attempt.to_le_bytes(), self.seed) % 41;
        base * u32::try_from(80 + spread).unwrap_or(100) / 100
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_backoff_grows_to_the_bound_and_resets() {
        let mut backoff = Backoff::new(7);
        let first = backoff.next_delay();
        assert!(first >= INITIAL * 8 / 10 && first <= INITIAL * 12 / 10);
        for _ in 0..20 {
            assert!(backoff.next_delay() <= MAX_BACKOFF * 12 / 10);
        }
        assert!(backoff.next_delay() >= MAX_BACKOFF * 8 / 10);
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL * 12 / 10);
    }
}
