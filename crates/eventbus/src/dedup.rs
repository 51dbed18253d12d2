//! Remembers recently published event ids so a repeated id is acknowledged as a duplicate and
//! not delivered again.
//!
//! The window holds a 128-bit xxh3 hash of (scope, id) per event, never the strings, in 16
//! shards chosen by hash, each a mutex around a time-ordered queue plus a hash set. Entries
//! older than the window are forgotten lazily, from the front of a shard's queue, on every call
//! that touches the shard. Each shard holds at most `max_entries / 16` (rounded up) entries;
//! when one is full its oldest entry is evicted before the window ends and counted in
//! [`DedupWindow::evicted_early`], which means the effective window is shorter than configured
//! under the current load.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::IntCounter;
use xxhash_rust::xxh3::{Xxh3, xxh3_128_with_seed};

/// Default deduplication window.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Number of independently locked shards.
const SHARDS: usize = 16;

/// Keys up to this size are hashed from a stack buffer in one shot.
const INLINE_KEY_BYTES: usize = 256;

/// Whether an event id was seen within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupOutcome {
    /// First time within the window; now remembered.
    New,
    /// Already published within the window; do not deliver again.
    Duplicate,
}

/// A bounded, sharded window of recently seen (scope, id) pairs; shared through `&self`.
#[derive(Debug)]
pub struct DedupWindow {
    shards: Box<[Mutex<Shard>]>,
    window_ms: u64,
    max_per_shard: usize,
    seed: u64,
    /// `eventbus_dedup_evicted_early_total`, counted in place.
    evicted_early: IntCounter,
}

#[derive(Debug, Default)]
struct Shard {
    /// (seen at ms, key), oldest first.
    order: VecDeque<(u64, u128)>,
    keys: HashSet<u128, BuildHasherDefault<KeyHasher>>,
}

impl DedupWindow {
    /// A window of `window` holding about `max_entries` ids (rounded up to a multiple of 16).
    pub fn new(window: Duration, max_entries: usize) -> Self {
        // A per-window random seed keeps crafted ids from piling into one shard or bucket.
        Self::with_seed(window, max_entries, rand::random())
    }

    fn with_seed(window: Duration, max_entries: usize, seed: u64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max_per_shard: max_entries.div_ceil(SHARDS).max(1),
            seed,
            evicted_early: IntCounter::new(
                "eventbus_dedup_evicted_early_total",
                "Ids forgotten before the dedup window ended because it was full.",
            )
            .expect("valid metric"),
        }
    }

    /// Records `id` within `scope` at `now_ms`; `Duplicate` when it was seen within the window.
    pub fn check_and_insert(&self, scope: &str, id: &str, now_ms: u64) -> DedupOutcome {
        let key = self.key(scope, id);
        // The high half picks the shard; the set hashes with the low half.
        let shard = (key >> 64) as usize % SHARDS;
        let mut shard = self.shards[shard].lock();
        shard.expire(now_ms, self.window_ms);
        if shard.keys.contains(&key) {
            return DedupOutcome::Duplicate;
        }
        if shard.order.len() >= self.max_per_shard {
            if let Some((_, oldest)) = shard.order.pop_front() {
                shard.keys.remove(&oldest);
            }
            self.evicted_early.inc();
        }
        shard.order.push_back((now_ms, key));
        shard.keys.insert(key);
        DedupOutcome::New
    }

    /// Ids forgotten before their window ended because a shard was full.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early.get()
    }

    /// The counter behind [`Self::evicted_early`], for registration.
    pub fn evicted_early_counter(&self) -> &IntCounter {
        &self.evicted_early
    }

    /// Ids currently remembered (some may have outlived the window but not yet been dropped).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().order.len()).sum()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.lock().order.is_empty())
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Hash of the length-prefixed scope followed by the id, so ("a", "bc") != ("ab", "c").
    fn key(&self, scope: &str, id: &str) -> u128 {
        let scope_len = (scope.len() as u64).to_le_bytes();
        let total = scope_len.len() + scope.len() + id.len();
        if total <= INLINE_KEY_BYTES {
            let mut buf = [0u8; INLINE_KEY_BYTES];
            let (len_part, rest) = buf.split_at_mut(scope_len.len());
            len_part.copy_from_slice(&scope_len);
            let (scope_part, rest) = rest.split_at_mut(scope.len());
            scope_part.copy_from_slice(scope.as_bytes());
            rest[..id.len()].copy_from_slice(id.as_bytes());
            xxh3_128_with_seed(&buf[..total], self.seed)
        } else {
            let mut hasher = Xxh3::with_seed(self.seed);
            hasher.update(&scope_len);
            hasher.update(scope.as_bytes());
            hasher.update(id.as_bytes());
            hasher.digest128()
        }
    }
}

impl Shard {
    fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while let Some(&(seen_at, key)) = self.order.front()
            && now_ms.saturating_sub(seen_at) >= window_ms
        {
            self.order.pop_front();
            self.keys.remove(&key);
        }
    }
}

/// Keys are already uniform 128-bit hashes: use their low 64 bits as the table hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u128 input, which this set never hashes; fold bytes anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    /// A fixed seed makes shard placement, and so the tests, deterministic.
    fn window(max_entries: usize) -> DedupWindow {
        DedupWindow::with_seed(MIN, max_entries, 42)
    }

    #[test]
    fn test_repeated_id_within_window_is_a_duplicate() {
        let dedup = window(1_000);
        assert_eq!(dedup.check_and_insert("orders", "e1", 0), DedupOutcome::New);
        assert_eq!(
            dedup.check_and_insert("orders", "e1", 59_999),
            DedupOutcome::Duplicate
        );
        assert_eq!(
            dedup.check_and_insert("orders", "e2", 59_999),
            DedupOutcome::New
        );
        assert_eq!(dedup.len(), 2);
        assert_eq!(dedup.window(), MIN);
    }

    #[test]
    fn test_id_is_forgotten_once_the_window_has_passed() {
        let dedup = window(1_000);
        assert_eq!(dedup.check_and_insert("s", "e1", 1_000), DedupOutcome::New);
        assert_eq!(dedup.check_and_insert("s", "e1", 61_000), DedupOutcome::New);
        assert_eq!(
            dedup.check_and_insert("s", "e1", 120_999),
            DedupOutcome::Duplicate
        );
        // Touching every shard after the window drops everything.
        for i in 0..200 {
            dedup.check_and_insert("s", &format!("later-{i}"), 500_000);
        }
        assert_eq!(dedup.len(), 200);
        assert_eq!(dedup.evicted_early(), 0);
    }

    #[test]
    fn test_scopes_are_separate() {
        let dedup = window(1_000);
        assert_eq!(dedup.check_and_insert("a", "bc", 0), DedupOutcome::New);
        assert_eq!(dedup.check_and_insert("ab", "c", 0), DedupOutcome::New);
        assert_eq!(dedup.check_and_insert("other", "bc", 0), DedupOutcome::New);
        assert_eq!(
            dedup.check_and_insert("a", "bc", 0),
            DedupOutcome::Duplicate
        );
    }

    #[test]
    fn test_full_shards_evict_oldest_early_and_count_it() {
        let per_shard = 4;
        let dedup = window(SHARDS * per_shard);
        for i in 0..1_000 {
            assert_eq!(
                dedup.check_and_insert("s", &i.to_string(), i),
                DedupOutcome::New
            );
        }
        let len = dedup.len();
        assert!(len <= SHARDS * per_shard, "len {len}");
        assert_eq!(dedup.evicted_early() + len as u64, 1_000);
        // The newest ids are still remembered; the oldest were evicted early.
        assert_eq!(
            dedup.check_and_insert("s", "999", 1_000),
            DedupOutcome::Duplicate
        );
        assert_eq!(dedup.check_and_insert("s", "0", 1_000), DedupOutcome::New);
    }

    #[test]
    fn test_long_keys_hash_like_short_ones() {
        let dedup = window(1_000);
        let long_id = "x".repeat(1_000);
        assert_eq!(dedup.check_and_insert("s", &long_id, 0), DedupOutcome::New);
        assert_eq!(
            dedup.check_and_insert("s", &long_id, 1),
            DedupOutcome::Duplicate
        );
        // The streaming path and the one-shot path agree on the same bytes.
        let id = "y".repeat(INLINE_KEY_BYTES - 8 - 1);
        let mut hasher = Xxh3::with_seed(dedup.seed);
        hasher.update(&1u64.to_le_bytes());
        hasher.update(b"s");
        hasher.update(id.as_bytes());
        assert_eq!(dedup.key("s", &id), hasher.digest128());
    }

    #[test]
    fn test_window_is_shared_across_threads() {
        let dedup = Arc::new(window(100_000));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let dedup = Arc::clone(&dedup);
                std::thread::spawn(move || {
                    (0..1_000)
                        .filter(|i| {
                            dedup.check_and_insert("s", &i.to_string(), 0) == DedupOutcome::New
                        })
                        .count()
                })
            })
            .collect();
        let new: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(new, 1_000, "each id is new exactly once");
        assert_eq!(dedup.len(), 1_000);
    }
}
