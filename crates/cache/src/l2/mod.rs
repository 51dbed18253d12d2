//! L2: the tier every instance shares — Redis ([`RedisL2`]), or in memory ([`InMemoryL2`])
//! without `--redis` (then it is as local as L1, and says so).
//!
//! Every change L2 makes is decided in one step (a Lua script in Redis) and numbered with the
//! cluster-wide write sequence: a write's compare-and-set, the version, the generations it is
//! stamped with, the sequence number and the message telling every instance about it
//! ([`crate::sync`]). Tag and namespace invalidations bump generation counters (O(1), no scan);
//! an entry written under an older generation is no longer served. Leases (against stampedes)
//! live beside the entries, with fencing tokens from one counter.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::entry::{Body, Entry};
use crate::sync::{Change, SyncEvent};

mod memory;
mod redis;

pub use memory::InMemoryL2;
pub use redis::{CHANNEL, PREFIX, RedisL2, entry_key};

/// A write: the value's body and where it goes.
#[derive(Debug, Clone)]
pub struct Write<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Key.
    pub key: &'a str,
    /// The value as stored, made by the writer.
    pub body: Body,
    /// Tags (stamped with their generations by L2).
    pub tags: &'a [String],
    /// Store only if the key is at this version (0: absent).
    pub if_version: Option<u64>,
    /// How long L2 keeps it: its TTL plus its grace window.
    pub keep: Duration,
    /// Wall ms now.
    pub now_ms: u64,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Stored: the entry as L2 holds it.
    Stored(Entry),
    /// Not stored: the key is at this version (0: absent).
    Conflict(u64),
    /// Not stored: the lease named is not held (expired, taken over, or never granted).
    LeaseLost,
}

/// An entry read from L2 with the current generations of its namespace and of each of its
/// tags (in the entry's tag order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The entry as stored.
    pub entry: Entry,
    /// The namespace's generation now.
    pub ns_gen: u64,
    /// Each tag's generation now.
    pub tag_gens: Vec<u64>,
}

impl Read {
    /// Whether no invalidation has happened since the entry was written.
    #[must_use]
    pub fn current(&self) -> bool {
        self.entry.ns_gen >= self.ns_gen
            && self
                .entry
                .tags
                .iter()
                .zip(&self.tag_gens)
                .all(|((_, written), now)| written >= now)
    }
}

/// What asking for a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Granted: compute the value and fill it with this fencing token.
    Granted(u64),
    /// Another caller holds it for this many more ms.
    Held(u64),
    /// The key was written after the caller looked: read it again.
    Filled,
}

/// What an invalidation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every entry carrying any of these tags.
    Tags(&'a [String]),
    /// Every entry of the namespace.
    Namespace,
}

/// An L2 that cannot be reached or answered wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("L2: {0}")]
pub struct L2Error(pub String);

/// The shared tier.
pub trait L2Store: Send + Sync {
    /// The entry under the key (fresh, or stale inside its grace window), with the current
    /// generations.
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Option<Read>, L2Error>>;

    /// Stores a write as the key's next version (see [`Write`]). With `lease` it is a lease's
    /// fill: stored only while that lease is held, which it ends.
    fn set<'a>(
        &'a self,
        write: Write<'a>,
        lease: Option<u64>,
    ) -> BoxFuture<'a, Result<Written, L2Error>>;

    /// Removes the key; whether it was there.
    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<bool, L2Error>>;

    /// Bumps the generation of the tags or of the namespace; the change made (as the feed
    /// delivers it).
    fn invalidate<'a>(
        &'a self,
        namespace: &'a str,
        scope: Scope<'a>,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Change, L2Error>>;

    /// A lease on the key for `ttl`, unless one is held or the key has been written with a
    /// sequence number above `seen_seq` (what the caller found: 0 for nothing).
    fn lease<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        ttl: Duration,
        seen_seq: u64,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseState, L2Error>>;

    /// Ends a lease without a value; whether it was held with `token`.
    fn abandon<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        token: u64,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<bool, L2Error>>;

    /// Up to `limit` (namespace, key) pairs of entries whose key starts with `key_prefix`, in
    /// every namespace (a scan: for rebuilding in-process indexes, not for requests).
    fn scan<'a>(
        &'a self,
        key_prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, L2Error>>;

    /// Every change from now on, in sequence order, with the resynchronisations and losses of
    /// the feed (see [`SyncEvent`]). Ends when L2 is dropped.
    fn watch(&self) -> BoxStream<'static, SyncEvent>;

    /// Whether this L2 is shared with other instances (Redis) or local to this process.
    fn shared(&self) -> bool;
}

/// Milliseconds of a duration, saturating.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
