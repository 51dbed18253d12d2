//! L1: this process's copy of entries, kept coherent by the change feed ([`crate::sync`]).
//!
//! An L1 entry is served only while the feed is in sync and no change seen since says
//! otherwise: a change to its key with a higher sequence number drops it; an invalidation of
//! its namespace or of one of its tags raises the generation it is checked against. An entry
//! read from L2 is admitted only if no change to its key with a higher sequence number has been
//! seen meanwhile (a slow read must not put back what a write just replaced).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache as Moka;
use parking_lot::Mutex;

use crate::entry::Entry;
use crate::l2::Read;
use crate::sync::{Change, What};

/// How long a key's last change is remembered (longer than any L2 read may take).
const REMEMBER_CHANGES: Duration = Duration::from_secs(30);
/// Most namespaces and tags whose generations are remembered (then they are all forgotten,
/// with L1).
const MAX_GENERATIONS: usize = 100_000;

#[derive(Default)]
struct Generations {
    by_namespace: HashMap<String, (u64, HashMap<String, u64>)>,
    count: usize,
}

/// What applying a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// In sequence.
    InOrder,
    /// Sequence numbers were skipped: L1 was flushed.
    Gap,
}

/// This process's tier.
pub struct L1 {
    entries: Moka<String, Arc<Entry>>,
    generations: Mutex<Generations>,
    changed: Moka<String, u64>,
    synced: AtomicBool,
    last_seq: AtomicU64,
    evictions: Arc<AtomicU64>,
}

/// The L1 key of a namespace's key.
#[must_use]
pub fn id(namespace: &str, key: &str) -> String {
    format!("{}:{namespace}|{key}", namespace.len())
}

impl L1 {
    /// An L1 of at most `max_bytes` and `max_entries`; entries live at most `max_age`.
    ///
    /// Both bounds with one weigher: an entry weighs its bytes, but at least
    /// `max_bytes / max_entries`, so no more than `max_entries` fit.
    #[must_use]
    pub fn new(max_bytes: u64, max_entries: u64, max_age: Duration) -> Self {
        let floor = u32::try_from(max_bytes / max_entries.max(1)).unwrap_or(u32::MAX);
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let entries = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(move |_k: &String, v: &Arc<Entry>| {
                u32::try_from(v.weight()).unwrap_or(u32::MAX).max(floor)
            })
            .time_to_live(max_age)
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            entries,
            generations: Mutex::default(),
            changed: Moka::builder()
                .max_capacity(1_000_000)
                .time_to_live(REMEMBER_CHANGES)
                .build(),
            synced: AtomicBool::new(false),
            last_seq: AtomicU64::new(0),
            evictions,
        }
    }

    /// Whether the feed is in sync (L1 may answer).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The last sequence number applied.
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// The entry, if held and still current (`trusted` false: whether or not the feed is in
    /// sync, for the fallback when L2 is down).
    #[must_use]
    pub fn get(&self, id: &str, namespace: &str, trusted: bool) -> Option<Arc<Entry>> {
        if trusted && !self.synced() {
            return None;
        }
        let entry = self.entries.get(id)?;
        self.current(namespace, &entry).then_some(entry)
    }

    fn current(&self, namespace: &str, entry: &Entry) -> bool {
        let generations = self.generations.lock();
        let Some((ns_gen, tags)) = generations.by_namespace.get(namespace) else {
            return true;
        };
        entry.ns_gen >= *ns_gen
            && entry
                .tags
                .iter()
                .all(|(t, g)| tags.get(t).is_none_or(|known| g >= known))
    }

    /// Remembers the generations a read from L2 reported.
    pub fn learn(&self, namespace: &str, read: &Read) {
        let mut generations = self.generations.lock();
        let g = &mut *generations;
        if g.count >= MAX_GENERATIONS {
            g.by_namespace.clear();
            g.count = 0;
            self.entries.invalidate_all();
        }
        let (ns_gen, tags) = g
            .by_namespace
            .entry(namespace.to_owned())
            .or_insert_with(|| (0, HashMap::new()));
        *ns_gen = (*ns_gen).max(read.ns_gen);
        for ((tag, _), now) in read.entry.tags.iter().zip(&read.tag_gens) {
            let known = tags.entry(tag.clone()).or_insert_with(|| {
                g.count += 1;
                0
            });
            *known = (*known).max(*now);
        }
    }

    /// Keeps `entry` unless a later change to its key has been seen or the feed is not in sync.
    pub fn admit(&self, id: String, entry: Arc<Entry>) {
        if !self.synced() {
            return;
        }
        if self.changed.get(&id).is_some_and(|seq| seq > entry.seq) {
            return;
        }
        self.entries.insert(id, entry);
    }

    /// Remembers a change this instance made itself (before its message comes back).
    pub fn wrote(&self, id: &str, seq: u64) {
        self.note_change(id, seq);
    }

    fn note_change(&self, id: &str, seq: u64) {
        self.changed
            .entry_by_ref(id)
            .and_upsert_with(|old| old.map_or(seq, |o| o.into_value().max(seq)));
    }

    /// Drops the key from L1 (this instance changed it).
    pub fn forget(&self, id: &str) {
        self.entries.invalidate(id);
    }

    /// Applies one change from the feed.
    pub fn apply(&self, change: &Change) -> Applied {
        let last = self.last_seq.fetch_max(change.seq, Ordering::AcqRel);
        let applied = if change.seq > last.saturating_add(1) {
            self.flush();
            Applied::Gap
        } else {
            Applied::InOrder
        };
        self.raise(change);
        applied
    }

    /// Applies what a change invalidates, without its place in the sequence (for a change
    /// this instance made itself, before the feed brings it).
    pub fn raise(&self, change: &Change) {
        match &change.what {
            What::Written { key, .. } | What::Deleted { key } | What::LeaseEnded { key } => {
                let id = id(&change.namespace, key);
                self.note_change(&id, change.seq);
                if self
                    .entries
                    .get(&id)
                    .is_some_and(|held| held.seq < change.seq)
                {
                    self.entries.invalidate(&id);
                }
            }
            What::Tags(tags) => {
                let mut generations = self.generations.lock();
                let g = &mut *generations;
                let (_, known) = g
                    .by_namespace
                    .entry(change.namespace.clone())
                    .or_insert_with(|| (0, HashMap::new()));
                for (tag, generation) in tags {
                    let k = known.entry(tag.clone()).or_insert_with(|| {
                        g.count += 1;
                        0
                    });
                    *k = (*k).max(*generation);
                }
            }
            What::Namespace { generation } => {
                let mut generations = self.generations.lock();
                let (ns_gen, _) = generations
                    .by_namespace
                    .entry(change.namespace.clone())
                    .or_insert_with(|| (0, HashMap::new()));
                *ns_gen = (*ns_gen).max(*generation);
            }
        }
    }

    /// The feed is (re)established at `seq`: start over.
    pub fn resync(&self, seq: u64) {
        self.flush();
        self.last_seq.store(seq, Ordering::Release);
        self.synced.store(true, Ordering::Release);
    }

    /// The feed is lost: L1 no longer answers first.
    pub fn lost(&self) {
        self.synced.store(false, Ordering::Release);
    }

    /// Drops every entry and every generation remembered.
    pub fn flush(&self) {
        self.entries.invalidate_all();
        let mut generations = self.generations.lock();
        generations.by_namespace.clear();
        generations.count = 0;
    }

    /// Entries held now (moka counts lazily).
    #[must_use]
    pub fn entries(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Bytes held now (as weighed).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    /// Entries evicted for room so far.
    #[must_use]
    pub fn evictions(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.evictions.load(Ordering::Relaxed)
    }
}
