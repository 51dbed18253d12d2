//! The bounded, sharded, in-memory map from key to limiter state.
//!
//! # Keys
//!
//! An entry is keyed by a 64-bit hash of (limit identity, namespace, key). The identity is the
//! policy name for a policy (the default policy is `default`), or the canonical fixed-width
//! bytes of (algorithm, limit, period, burst) for an inline limit. So the same key under two
//! different limits has two independent states: a caller that checks `user:1` against "10/s"
//! and "1000/day" gets both limits, not one muddled counter, and two inline specs that differ
//! in any field never share state.
//!
//! The hash is chained xxh3: `h0 = xxh3(identity, seed ^ domain)`, `h1 = xxh3(namespace, h0)`,
//! `hash = xxh3(key, h1)`, with a random per-store seed so callers cannot craft collisions and
//! separate seed domains for policy names and inline parameters. Each field is hashed whole, so
//! field boundaries are unambiguous (`("ab", "c")` and `("a", "bc")` differ) without building a
//! concatenated buffer: three short hashes from the `&str` slices, no allocation, about half
//! the cost of copying the fields into a separator-delimited buffer.
//!
//! Each entry also stores a fingerprint of the limit's parameters; when a policy is changed
//! under the same name, old entries no longer match it and read as fresh.
//!
//! # Policies
//!
//! Each shard also carries a copy (an `Arc`) of the current policy set, so a single-item check
//! takes exactly one lock — its shard's — and touches no cache line shared by every core.
//!
//! # Bounds and eviction
//!
//! Each shard holds at most `ceil(max_keys / shards)` entries. When a new key arrives at a full
//! shard, the shard is swept once:
//!
//! 1. every entry *at rest* is dropped — its state is equivalent to a fresh one now (GCRA
//!    `tat <= now`, windows that have fully passed), so nothing is lost (`evicted_idle`);
//! 2. if that freed less than 1/8 of the shard, the entries that will come to rest soonest are
//!    dropped too until 1/8 is free (`evicted_active`). Those keys can be admitted again early —
//!    by at most what they would have regained by their rest time — which is the price of a
//!    hard memory bound under overload.
//!
//! A sweep is O(shard size) but leaves at least 1/8 of the shard free, so it happens at most
//! once per `shard size / 8` new keys: amortised O(1) per insert, and no work at all while keys
//! already present are checked.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::algorithm::{Decision, Params, State, decide};
use crate::config::LimiterConfig;
use crate::hash::PrehashedKey;
use crate::policies::PolicySet;

/// What an entry's state is counted against, besides namespace and key.
#[derive(Debug, Clone, Copy)]
pub enum LimitIdentity<'a> {
    /// A named policy (the default policy is named `default`).
    Policy(&'a str),
    /// An inline limit, identified by its parameters.
    Inline(&'a Params),
}

/// Counters describing the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Entries held now.
    pub entries: u64,
    /// Most entries the store will hold.
    pub capacity: u64,
    /// Entries dropped because they were at rest (no information lost).
    pub evicted_idle: u64,
    /// Entries dropped while still counting, to keep the bound.
    pub evicted_active: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    fingerprint: u64,
    rest_at: u64,
    state: State,
}

type EntryMap = HashMap<u64, Entry, BuildHasherDefault<PrehashedKey>>;

#[derive(Debug)]
struct ShardMap {
    entries: EntryMap,
    policies: PolicySet,
}

/// Keeps each shard's lock on its own cache line.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

/// Seed tweaks that keep policy names and inline parameters in separate hash domains.
const POLICY_DOMAIN: u64 = 0x5054_4f4c_4943_5900;
const INLINE_DOMAIN: u64 = 0x494e_4c49_4e45_0000;

/// The bounded sharded map of limiter states.
#[derive(Debug)]
pub struct Store {
    shards: Box<[Padded<Mutex<ShardMap>>]>,
    /// Shard index bits, taken from the hash above bit 32 so that within a shard the low bits
    /// (bucket index) and top bits (control tag) of the hash map stay uniformly random.
    shard_mask: u64,
    shard_capacity: usize,
    seed: u64,
    evicted_idle: AtomicU64,
    evicted_active: AtomicU64,
}

impl Store {
    /// An empty store sized by `config`, its shards carrying `policies`; memory is allocated as
    /// keys arrive.
    pub fn new(config: &LimiterConfig, policies: &PolicySet) -> Self {
        let shards = config.shard_count();
        Self {
            shards: (0..shards)
                .map(|_| {
                    Padded(Mutex::new(ShardMap {
                        entries: EntryMap::default(),
                        policies: policies.clone(),
                    }))
                })
                .collect(),
            shard_mask: (shards - 1) as u64,
            shard_capacity: config.shard_capacity(),
            seed: RandomState::new().build_hasher().finish(),
            evicted_idle: AtomicU64::new(0),
            evicted_active: AtomicU64::new(0),
        }
    }

    /// The hash an entry is stored under: a chained, seeded xxh3 over identity, namespace and
    /// key (see the module docs).
    pub fn key_hash(&self, namespace: &str, key: &str, identity: LimitIdentity<'_>) -> u64 {
        let inline;
        let (id, domain): (&[u8], u64) = match identity {
            LimitIdentity::Policy(name) => (name.as_bytes(), POLICY_DOMAIN),
            LimitIdentity::Inline(params) => {
                inline = params.canonical_bytes();
                (&inline, INLINE_DOMAIN)
            }
        };
        let h = xxh3_64_with_seed(id, self.seed ^ domain);
        let h = xxh3_64_with_seed(namespace.as_bytes(), h);
        xxh3_64_with_seed(key.as_bytes(), h)
    }

    /// Index of the shard holding `hash`.
    pub(crate) fn shard_of(&self, hash: u64) -> usize {
        // The mask is below MAX_SHARDS, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let index = ((hash >> 32) & self.shard_mask) as usize;
        index
    }

    /// Locks shard `index`. Lock several shards only in increasing index order.
    pub(crate) fn lock(&self, index: usize) -> ShardGuard<'_> {
        ShardGuard {
            map: self.shards[index].0.lock(),
            store: self,
        }
    }

    /// Gives every shard `policies`, one shard at a time.
    pub fn set_policies(&self, policies: &PolicySet) {
        for shard in &self.shards {
            shard.0.lock().policies = policies.clone();
        }
    }

    /// Counts entries (briefly locking each shard) and evictions so far.
    pub fn stats(&self) -> StoreStats {
        let entries: usize = self.shards.iter().map(|s| s.0.lock().entries.len()).sum();
        StoreStats {
            entries: entries as u64,
            capacity: (self.shard_capacity * self.shards.len()) as u64,
            evicted_idle: self.evicted_idle.load(Ordering::Relaxed),
            evicted_active: self.evicted_active.load(Ordering::Relaxed),
        }
    }
}

/// One locked shard.
pub(crate) struct ShardGuard<'a> {
    map: MutexGuard<'a, ShardMap>,
    store: &'a Store,
}

impl ShardGuard<'_> {
    /// This shard's copy of the policies.
    pub(crate) fn policies(&self) -> &PolicySet {
        &self.map.policies
    }

    /// Decides `cost` for the entry under `hash` and stores the result, with one lookup for a
    /// key already present.
    pub(crate) fn decide(
        &mut self,
        hash: u64,
        fingerprint: u64,
        params: &Params,
        now: u64,
        cost: u64,
    ) -> Decision {
        if let Some(entry) = self.map.entries.get_mut(&hash) {
            let state = (entry.fingerprint == fingerprint).then_some(entry.state);
            let decision = decide(params, state.as_ref(), now, cost);
            if let Some(next) = decision.next {
                *entry = Entry {
                    fingerprint,
                    rest_at: next.rest_at(params),
                    state: next,
                };
            }
            return decision;
        }
        let decision = decide(params, None, now, cost);
        if let Some(next) = decision.next {
            self.put(hash, fingerprint, next, params, now);
        }
        decision
    }

    /// The state stored under `hash`, unless it was counted under other parameters.
    pub(crate) fn get(&self, hash: u64, fingerprint: u64) -> Option<State> {
        self.map
            .entries
            .get(&hash)
            .filter(|e| e.fingerprint == fingerprint)
            .map(|e| e.state)
    }

    /// Forgets the state under `hash`; whether there was one.
    pub(crate) fn remove(&mut self, hash: u64) -> bool {
        self.map.entries.remove(&hash).is_some()
    }

    /// Stores `state`, sweeping the shard first if a new key finds it full.
    pub(crate) fn put(
        &mut self,
        hash: u64,
        fingerprint: u64,
        state: State,
        params: &Params,
        now: u64,
    ) {
        let entry = Entry {
            fingerprint,
            rest_at: state.rest_at(params),
            state,
        };
        if let Some(existing) = self.map.entries.get_mut(&hash) {
            *existing = entry;
            return;
        }
        if self.map.entries.len() >= self.store.shard_capacity {
            self.make_room(now);
        }
        self.map.entries.insert(hash, entry);
    }

    fn make_room(&mut self, now: u64) {
        let capacity = self.store.shard_capacity;
        let entries = &mut self.map.entries;
        let before = entries.len();
        entries.retain(|_, e| e.rest_at > now);
        let idle = before - entries.len();
        let want_free = (capacity / 8).max(1);
        let free = capacity.saturating_sub(entries.len());
        let mut active = 0;
        if free < want_free {
            active = (want_free - free).min(entries.len());
            let mut by_rest: Vec<(u64, u64)> =
                entries.iter().map(|(hash, e)| (e.rest_at, *hash)).collect();
            if active > 0 {
                by_rest.select_nth_unstable(active - 1);
            }
            for (_, hash) in &by_rest[..active] {
                entries.remove(hash);
            }
        }
        self.store
            .evicted_idle
            .fetch_add(idle as u64, Ordering::Relaxed);
        self.store
            .evicted_active
            .fetch_add(active as u64, Ordering::Relaxed);
        if active > 0 {
            tracing::debug!(
                evicted_idle = idle,
                evicted_active = active,
                shard_capacity = capacity,
                "rate limit store shard full, evicted active keys"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::spec::{Algorithm, LimitSpec, MAX_KEY_LEN};

    fn gcra(limit: u64) -> Params {
        Params::from_spec(&LimitSpec {
            limit,
            period: Duration::from_secs(1),
            burst: 0,
            algorithm: Algorithm::Gcra,
        })
    }

    fn store(max_keys: usize, shards: usize) -> Store {
        Store::new(&LimiterConfig { max_keys, shards }, &PolicySet::default())
    }

    /// A GCRA state (limit 1) that comes to rest at `rest_at`.
    fn resting_at(rest_at: u64) -> State {
        State::Gcra {
            tat: u128::from(rest_at),
        }
    }

    fn put(store: &Store, hash: u64, rest_at: u64, now: u64) {
        let p = gcra(1);
        store
            .lock(store.shard_of(hash))
            .put(hash, p.fingerprint(), resting_at(rest_at), &p, now);
    }

    fn has(store: &Store, hash: u64) -> bool {
        store
            .lock(store.shard_of(hash))
            .get(hash, gcra(1).fingerprint())
            .is_some()
    }

    #[test]
    fn test_key_hash_separates_namespace_key_and_identity() {
        let s = store(10, 1);
        let p10 = gcra(10);
        let p20 = gcra(20);
        let h = |ns, key, id| s.key_hash(ns, key, id);
        let base = h("ns", "key", LimitIdentity::Policy("a"));
        assert_eq!(base, h("ns", "key", LimitIdentity::Policy("a")));
        assert_ne!(base, h("nsk", "ey", LimitIdentity::Policy("a")));
        assert_ne!(base, h("ns", "key", LimitIdentity::Policy("b")));
        assert_ne!(
            h("ns", "key", LimitIdentity::Inline(&p10)),
            h("ns", "key", LimitIdentity::Inline(&p20))
        );
        assert_eq!(
            h("ns", "key", LimitIdentity::Inline(&p10)),
            h("ns", "key", LimitIdentity::Inline(&gcra(10)))
        );
    }

    #[test]
    fn test_key_hash_is_the_documented_chain_and_handles_long_keys() {
        let s = store(10, 1);
        let key = "k".repeat(MAX_KEY_LEN);
        let expected = xxh3_64_with_seed(
            key.as_bytes(),
            xxh3_64_with_seed(b"ns", xxh3_64_with_seed(b"p", s.seed ^ POLICY_DOMAIN)),
        );
        assert_eq!(s.key_hash("ns", &key, LimitIdentity::Policy("p")), expected);
        let p = gcra(1);
        let expected = xxh3_64_with_seed(
            b"k",
            xxh3_64_with_seed(
                b"ns",
                xxh3_64_with_seed(&p.canonical_bytes(), s.seed ^ INLINE_DOMAIN),
            ),
        );
        assert_eq!(s.key_hash("ns", "k", LimitIdentity::Inline(&p)), expected);
    }

    #[test]
    fn test_changed_parameters_read_as_fresh() {
        let s = store(10, 1);
        put(&s, 7, 100, 0);
        assert!(has(&s, 7));
        assert_eq!(s.lock(0).get(7, gcra(2).fingerprint()), None);
    }

    #[test]
    fn test_eviction_drops_entries_at_rest_first() {
        let s = store(16, 1);
        // 8 entries at rest by t=50, 8 active until t=1000+.
        for hash in 0..8 {
            put(&s, hash, 10 + hash, 0);
        }
        for hash in 8..16 {
            put(&s, hash, 1000 + hash, 0);
        }
        assert_eq!(s.stats().entries, 16);
        put(&s, 100, 2000, 50);
        let stats = s.stats();
        assert_eq!(
            stats,
            StoreStats {
                entries: 9,
                capacity: 16,
                evicted_idle: 8,
                evicted_active: 0,
            }
        );
        assert!((8..16).all(|h| has(&s, h)));
        assert!((0..8).all(|h| !has(&s, h)));
    }

    #[test]
    fn test_eviction_frees_an_eighth_by_dropping_soonest_to_rest() {
        let s = store(16, 1);
        // 15 active entries, 1 at rest: freeing it alone is less than 1/8 (2 slots).
        for hash in 0..15 {
            put(&s, hash, 1000 - hash, 0);
        }
        put(&s, 15, 5, 0);
        put(&s, 100, 5000, 10);
        let stats = s.stats();
        assert_eq!((stats.evicted_idle, stats.evicted_active), (1, 1));
        assert_eq!(stats.entries, 15);
        // Hash 14 comes to rest soonest (t=986).
        assert!(!has(&s, 14));
        assert!((0..14).all(|h| has(&s, h)));
        assert!(has(&s, 100));
    }

    #[test]
    fn test_store_stays_bounded_and_sweeps_rarely() {
        let s = store(1024, 4);
        for hash in 0..100_000u64 {
            // Spread over shards via the bits the store shards on; all stay active.
            put(&s, hash.rotate_left(32) ^ hash, u64::MAX, 0);
            if hash % 1000 == 0 {
                assert!(s.stats().entries <= 1024);
            }
        }
        let stats = s.stats();
        assert!(stats.entries <= 1024, "{stats:?}");
        assert!(stats.entries >= 1024 - 4 * 32, "{stats:?}");
        assert_eq!(stats.evicted_active + stats.entries, 100_000);
        assert_eq!(stats.evicted_idle, 0);
    }

    #[test]
    fn test_updating_an_existing_key_never_evicts() {
        let s = store(2, 1);
        put(&s, 1, 100, 0);
        put(&s, 2, 100, 0);
        for now in 0..10 {
            put(&s, 2, 200 + now, now);
        }
        assert_eq!(s.stats().evicted_active + s.stats().evicted_idle, 0);
        assert!(has(&s, 1));
    }
}
