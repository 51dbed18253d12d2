//! The two tiers together: reads try L1, then L2 (filling L1); writes go to L2 (the
//! compare-and-set, the generations, the sequence number) and then to L1; every instance's L1
//! follows the change feed ([`crate::sync`]). Leases against stampedes are in [`lease`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast};

use crate::config::{
    CacheConfig, MAX_KEY_LEN, MAX_NAMESPACE_LEN, MAX_TAG_LEN, MAX_TAGS, MAX_TTL, MAX_VALUE_LEN,
    TTL_JITTER,
};
use crate::entry::{Body, Entry, Freshness};
use crate::error::{CacheError, FieldViolation};
use crate::l2::{L2Error, L2Store, Scope, Write, Written};
use crate::metrics::CacheMetrics;
use crate::sync::{Change, SyncEvent};

pub mod batch;
pub mod l1;
pub mod lease;

pub use batch::{GetItem, NamespaceStats, SetItem, Stats};
pub use l1::{Applied, L1};
pub use lease::{Lease, LeaseAnswer};

/// Changes kept for `WatchInvalidations` callers that resume.
pub const REPLAY: usize = 4096;
/// Changes a watcher may fall behind by before it is told to flush.
const NOTICES: usize = 65_536;

/// Wall time in milliseconds (a trait so tests drive it).
pub trait WallClock: Send + Sync {
    /// Milliseconds since the UNIX epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        wall_ms()
    }
}

/// Milliseconds since the UNIX epoch.
#[must_use]
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Which tier answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// This process.
    L1,
    /// The shared tier.
    L2,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Consistency {
    /// L1 may answer.
    #[default]
    Default,
    /// Skip L1: ask L2.
    Fresh,
}

/// A value found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The value (decompressed).
    pub value: Bytes,
    /// Its version.
    pub version: u64,
    /// Where it came from.
    pub tier: Tier,
    /// Milliseconds since it was written.
    pub age_ms: u64,
    /// Milliseconds until it expires (0 when stale).
    pub ttl_left_ms: u64,
    /// Past its TTL (inside its grace window), or served from L1 while L2 cannot be reached.
    pub stale: bool,
    /// Its tags.
    pub tags: Vec<String>,
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A value.
    Hit(Hit),
    /// A remembered miss (see `AbandonLease`): this many ms left.
    Negative(u64),
    /// Nothing.
    Miss,
}

impl Found {
    /// The hit, if it is one.
    #[must_use]
    pub fn hit(self) -> Option<Hit> {
        match self {
            Self::Hit(h) => Some(h),
            _ => None,
        }
    }
}

/// How a read treats stale values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Skip L1.
    pub consistency: Consistency,
    /// Serve a value past its TTL that is inside its grace window (marked stale).
    pub allow_stale: bool,
}

/// A write's settings beyond the value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// How long it lives; `None`: the default.
    pub ttl: Option<Duration>,
    /// How long after its TTL it may still be served as stale (stale-while-revalidate).
    pub grace: Duration,
    /// Tags, for `invalidate_tags`.
    pub tags: Vec<String>,
    /// Store only if the key is at this version (0: absent).
    pub if_version: Option<u64>,
}

/// Something `WatchInvalidations` callers are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A change (see [`Change`]).
    Change(Arc<Change>),
    /// Changes may have been missed: drop everything held.
    Flush {
        /// The sequence number from which changes follow again.
        seq: u64,
        /// Why.
        reason: String,
    },
}

/// An entry found in a tier, before it becomes a [`Found`].
struct Looked {
    entry: Arc<Entry>,
    tier: Tier,
    stale: bool,
}

/// The cache; made with [`Cache::start`], shared in an `Arc`.
pub struct Cache {
    l1: L1,
    l2: Arc<dyn L2Store>,
    clock: Arc<dyn WallClock>,
    config: CacheConfig,
    metrics: CacheMetrics,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    notices: broadcast::Sender<Notice>,
    replay: Mutex<VecDeque<Arc<Change>>>,
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("synced", &self.l1.synced())
            .finish_non_exhaustive()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(task) = self.follower.lock().take() {
            task.abort();
        }
    }
}

pub(crate) use crate::l2::ms;

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a namespace and a key, naming every bad field (`prefix` before each name).
pub(crate) fn check_key(namespace: &str, key: &str, prefix: &str, out: &mut Vec<FieldViolation>) {
    if !valid_name(namespace, MAX_NAMESPACE_LEN) {
        out.push(FieldViolation::new(
            format!("{prefix}namespace"),
            format!("must be 1 to {MAX_NAMESPACE_LEN} bytes of visible ASCII without spaces"),
        ));
    }
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        out.push(FieldViolation::new(
            format!("{prefix}key"),
            format!("must be 1 to {MAX_KEY_LEN} bytes, got {}", key.len()),
        ));
    }
}

/// Checks tags.
pub(crate) fn check_tags(tags: &[String], prefix: &str, out: &mut Vec<FieldViolation>) {
    if tags.len() > MAX_TAGS {
        out.push(FieldViolation::new(
            format!("{prefix}tags"),
            format!("at most {MAX_TAGS} tags, got {}", tags.len()),
        ));
    }
    for (i, tag) in tags.iter().enumerate() {
        if !valid_name(tag, MAX_TAG_LEN) {
            out.push(FieldViolation::new(
                format!("{prefix}tags[{i}]"),
                format!("must be 1 to {MAX_TAG_LEN} bytes of visible ASCII without spaces"),
            ));
        }
    }
}

pub(crate) fn check_duration(
    d: Option<Duration>,
    field: &str,
    max: Duration,
    out: &mut Vec<FieldViolation>,
) {
    if d.is_some_and(|t| t.is_zero() || t > max) {
        out.push(FieldViolation::new(
            field,
            format!("must be between 1 ms and {max:?}"),
        ));
    }
}

pub(crate) fn done(violations: Vec<FieldViolation>) -> Result<(), CacheError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(CacheError::InvalidArgument(violations))
    }
}

fn unavailable(e: &L2Error) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

impl Cache {
    /// A cache over `l2` with an L1 bounded by `config`, following L2's change feed from now
    /// on (a task on the current tokio runtime, stopped when the cache is dropped).
    #[must_use]
    pub fn start(
        config: CacheConfig,
        l2: Arc<dyn L2Store>,
        clock: Arc<dyn WallClock>,
        metrics: CacheMetrics,
    ) -> Arc<Self> {
        let feed = l2.watch();
        let cache = Arc::new(Self {
            l1: L1::new(
                config.l1_max_bytes,
                config.l1_max_entries,
                config.l1_max_age,
            ),
            l2,
            clock,
            config,
            metrics,
            waiters: Mutex::default(),
            notices: broadcast::channel(NOTICES).0,
            replay: Mutex::new(VecDeque::with_capacity(REPLAY)),
            follower: Mutex::new(None),
        });
        let task = tokio::spawn(follow(Arc::downgrade(&cache), feed));
        *cache.follower.lock() = Some(task);
        cache
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The metrics.
    #[must_use]
    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// L1.
    #[must_use]
    pub fn l1(&self) -> &L1 {
        &self.l1
    }

    /// Whether L2 is shared with other instances.
    #[must_use]
    pub fn shared(&self) -> bool {
        self.l2.shared()
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The value under `key` in `namespace`.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable` when L1 cannot answer and L2 cannot be read.
    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        options: ReadOptions,
    ) -> Result<Found, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, "", &mut v);
        done(v)?;
        let found = self.look(namespace, key, options).await?;
        let now = self.now();
        Ok(match found {
            Ok(l) => self.found(namespace, &l, now)?,
            Err(_) => {
                self.metrics.read(namespace, "miss");
                Found::Miss
            }
        })
    }

    /// Counts a found entry and makes it a [`Found`].
    fn found(&self, namespace: &str, l: &Looked, now: u64) -> Result<Found, CacheError> {
        if l.entry.negative {
            self.metrics.read(namespace, "negative");
            return Ok(Found::Negative(l.entry.expires_ms.saturating_sub(now)));
        }
        self.metrics.read(
            namespace,
            match (l.tier, l.stale) {
                (_, true) => "stale",
                (Tier::L1, false) => "l1",
                (Tier::L2, false) => "l2",
            },
        );
        Ok(Found::Hit(Hit {
            value: l.entry.value().map_err(CacheError::Unavailable)?,
            version: l.entry.version,
            tier: l.tier,
            age_ms: now.saturating_sub(l.entry.written_ms),
            ttl_left_ms: l.entry.expires_ms.saturating_sub(now),
            stale: l.stale,
            tags: l.entry.tags.iter().map(|(t, _)| t.clone()).collect(),
        }))
    }

    /// Finds the key's entry: `Ok` with it, or `Err` with the sequence number of what was
    /// seen instead (an invalidated or expired entry; 0 for nothing), for a lease.
    async fn look(
        &self,
        namespace: &str,
        key: &str,
        options: ReadOptions,
    ) -> Result<Result<Looked, u64>, CacheError> {
        let now = self.now();
        let id = l1::id(namespace, key);
        let usable = |e: &Entry| match e.freshness(now) {
            Freshness::Fresh => Some(false),
            Freshness::Stale if options.allow_stale => Some(true),
            _ => None,
        };
        if options.consistency == Consistency::Default
            && let Some(entry) = self.l1.get(&id, namespace, true)
            && let Some(stale) = usable(&entry)
        {
            return Ok(Ok(Looked {
                entry,
                tier: Tier::L1,
                stale,
            }));
        }
        let read = match self.l2.get(namespace, key, now).await {
            Ok(read) => read,
            Err(e) => {
                // L2 is down: L1's copy is the best there is (marked stale when the feed that
                // vouches for it is lost too).
                if options.consistency == Consistency::Default
                    && let Some(entry) = self.l1.get(&id, namespace, false)
                    && let Some(stale) = usable(&entry)
                {
                    return Ok(Ok(Looked {
                        entry,
                        tier: Tier::L1,
                        stale: stale || !self.l1.synced(),
                    }));
                }
                return Err(unavailable(&e));
            }
        };
        let Some(read) = read else {
            return Ok(Err(0));
        };
        self.l1.learn(namespace, &read);
        let seq = read.entry.seq;
        if !read.current() {
            return Ok(Err(seq));
        }
        let Some(stale) = usable(&read.entry) else {
            return Ok(Err(seq));
        };
        let entry = Arc::new(read.entry);
        if !stale {
            self.l1.admit(id, entry.clone());
        }
        Ok(Ok(Looked {
            entry,
            tier: Tier::L2,
            stale,
        }))
    }

    /// Stores `value` under `key`; returns the new version.
    ///
    /// # Errors
    /// `InvalidArgument`; `VersionMismatch`; `Unavailable` when L2 cannot be written.
    pub async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        options: &SetOptions,
    ) -> Result<u64, CacheError> {
        let mut v = Vec::new();
        self.check_set(namespace, key, value, options, "", &mut v);
        done(v)?;
        let write = self.write(namespace, key, value, options);
        let result = match self.l2.set(write, None).await.map_err(|e| unavailable(&e)) {
            Ok(Written::Stored(entry)) => Ok(self.keep(namespace, key, entry)),
            Ok(Written::Conflict(current)) => {
                self.l1.forget(&l1::id(namespace, key));
                Err(CacheError::VersionMismatch {
                    expected: options.if_version.unwrap_or(0),
                    current,
                })
            }
            Ok(Written::LeaseLost) => Err(CacheError::Unavailable(
                "L2 answered a plain write as a lease's fill".to_owned(),
            )),
            Err(e) => Err(e),
        };
        self.metrics
            .write(namespace, if result.is_ok() { "stored" } else { "refused" });
        result
    }

    pub(crate) fn check_set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        options: &SetOptions,
        prefix: &str,
        v: &mut Vec<FieldViolation>,
    ) {
        check_key(namespace, key, prefix, v);
        if value.len() > MAX_VALUE_LEN {
            v.push(FieldViolation::new(
                format!("{prefix}value"),
                format!("must be at most {MAX_VALUE_LEN} bytes, got {}", value.len()),
            ));
        }
        check_duration(options.ttl, &format!("{prefix}ttl"), MAX_TTL, v);
        if options.grace > MAX_TTL {
            v.push(FieldViolation::new(
                format!("{prefix}stale_for"),
                format!("must be at most {MAX_TTL:?}"),
            ));
        }
        check_tags(&options.tags, prefix, v);
    }

    /// The L2 write of a value.
    pub(crate) fn write<'a>(
        &self,
        namespace: &'a str,
        key: &'a str,
        value: &[u8],
        options: &'a SetOptions,
    ) -> Write<'a> {
        let ttl = jitter(options.ttl.unwrap_or(self.config.default_ttl));
        let now = self.now();
        let grace = u32::try_from(ms(options.grace)).unwrap_or(u32::MAX);
        let body = Body::new(value, now, now.saturating_add(ms(ttl)), grace);
        self.metrics.stored(value.len(), body.data.len());
        Write {
            namespace,
            key,
            body,
            tags: &options.tags,
            if_version: options.if_version,
            keep: ttl + options.grace,
            now_ms: now,
        }
    }

    /// Puts a stored entry in L1; its version.
    pub(crate) fn keep(&self, namespace: &str, key: &str, entry: Entry) -> u64 {
        let id = l1::id(namespace, key);
        let version = entry.version;
        self.l1.wrote(&id, entry.seq);
        self.l1.admit(id, Arc::new(entry));
        version
    }

    /// Removes `key`; whether it was there.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable` when L2 cannot be written.
    pub async fn delete(&self, namespace: &str, key: &str) -> Result<bool, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, "", &mut v);
        done(v)?;
        self.l1.forget(&l1::id(namespace, key));
        self.l2
            .delete(namespace, key, self.now())
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Invalidates every entry of `namespace` carrying any of `tags` (one generation bump per
    /// tag; nothing is scanned); the sequence number of the invalidation.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable`.
    pub async fn invalidate_tags(
        &self,
        namespace: &str,
        tags: &[String],
    ) -> Result<u64, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, "-", "", &mut v);
        if tags.is_empty() {
            v.push(FieldViolation::new("tags", "name at least one tag"));
        }
        check_tags(tags, "", &mut v);
        done(v)?;
        let change = self
            .l2
            .invalidate(namespace, Scope::Tags(tags), self.now())
            .await
            .map_err(|e| unavailable(&e))?;
        // This instance's L1 at once (the feed brings it again, harmlessly).
        self.l1.raise(&change);
        Ok(change.seq)
    }

    /// Invalidates every entry of `namespace` (one generation bump); the sequence number.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable`.
    pub async fn invalidate_namespace(&self, namespace: &str) -> Result<u64, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, "-", "", &mut v);
        done(v)?;
        let change = self
            .l2
            .invalidate(namespace, Scope::Namespace, self.now())
            .await
            .map_err(|e| unavailable(&e))?;
        // This instance's L1 at once (the feed brings it again, harmlessly).
        self.l1.raise(&change);
        Ok(change.seq)
    }

    /// Up to `limit` (namespace, key) pairs whose key starts with `key_prefix` (a scan of L2).
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn scan_keys(
        &self,
        key_prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, CacheError> {
        self.l2
            .scan(key_prefix, limit)
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Changes from now on, after replaying those after `after_seq` that are still held (a
    /// [`Notice::Flush`] first when some of them are not). `None` for `after_seq`: from now.
    #[must_use]
    pub fn watch(&self, after_seq: Option<u64>) -> BoxStream<'static, Notice> {
        let replay = self.replay.lock();
        let rx = self.notices.subscribe();
        let mut first = Vec::new();
        if let Some(after) = after_seq {
            let oldest = replay.front().map_or(self.l1.last_seq() + 1, |c| c.seq);
            if after.saturating_add(1) < oldest {
                first.push(Notice::Flush {
                    seq: self.l1.last_seq(),
                    reason: format!(
                        "changes after {after} are no longer held (the oldest held is {oldest})"
                    ),
                });
            }
            first.extend(
                replay
                    .iter()
                    .filter(|c| c.seq > after)
                    .map(|c| Notice::Change(c.clone())),
            );
        }
        drop(replay);
        let last = self.l1.last_seq();
        futures::stream::iter(first)
            .chain(
                tokio_stream::wrappers::BroadcastStream::new(rx).map(move |n| match n {
                    Ok(notice) => notice,
                    Err(lagged) => Notice::Flush {
                        seq: last,
                        reason: format!("the watcher fell behind: {lagged}"),
                    },
                }),
            )
            .boxed()
    }

    /// The waiters' bell for a key (for leases).
    pub(crate) fn bell(&self, id: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Drops a key's bell when nobody else waits on it.
    pub(crate) fn unbell(&self, id: &str, bell: Arc<Notify>) {
        let mut waiters = self.waiters.lock();
        // Ours and the map's.
        let last = Arc::strong_count(&bell) <= 2;
        drop(bell);
        if last {
            waiters.remove(id);
        }
    }

    fn on_sync(&self, event: SyncEvent) {
        match event {
            SyncEvent::Synced { seq } => {
                self.l1.resync(seq);
                self.metrics.resync("synced");
                let _ = self.notices.send(Notice::Flush {
                    seq,
                    reason: "the change feed was (re)established".to_owned(),
                });
            }
            SyncEvent::Lost { reason } => {
                tracing::warn!(%reason, "cache change feed lost; L1 answers only when L2 cannot");
                self.l1.lost();
                self.metrics.resync("lost");
            }
            SyncEvent::Change(change) => {
                if self.l1.apply(&change) == Applied::Gap {
                    self.metrics.resync("gap");
                    let _ = self.notices.send(Notice::Flush {
                        seq: change.seq,
                        reason: "sequence numbers were skipped".to_owned(),
                    });
                }
                self.metrics.lag(self.now().saturating_sub(change.sent_ms));
                if let Some(key) = change.key() {
                    let id = l1::id(&change.namespace, key);
                    if let Some(bell) = self.waiters.lock().get(&id) {
                        bell.notify_waiters();
                    }
                }
                let change = Arc::new(change);
                {
                    let mut replay = self.replay.lock();
                    if replay.len() == REPLAY {
                        replay.pop_front();
                    }
                    replay.push_back(change.clone());
                }
                let _ = self.notices.send(Notice::Change(change));
            }
        }
    }
}

/// Applies the feed to the cache until either ends.
async fn follow(cache: Weak<Cache>, mut feed: BoxStream<'static, SyncEvent>) {
    while let Some(event) = feed.next().await {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        cache.on_sync(event);
    }
}

/// `ttl` spread by up to ±[`TTL_JITTER`].
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "a TTL in ms is far below 2^52"
)]
fn jitter(ttl: Duration) -> Duration {
    let spread = 1.0 + TTL_JITTER * (rand::random::<f64>() * 2.0 - 1.0);
    Duration::from_millis(((ms(ttl) as f64 * spread) as u64).max(1))
}

#[cfg(test)]
mod tests;
