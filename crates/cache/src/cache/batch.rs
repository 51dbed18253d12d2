//! Batch forms and statistics.

use std::collections::BTreeMap;

use futures::future::join_all;

use super::{Cache, Found, ReadOptions, SetOptions, check_key, done};
use crate::config::MAX_BATCH;
use crate::error::{CacheError, FieldViolation};

/// One read of a batch.
#[derive(Debug, Clone)]
pub struct GetItem {
    /// Namespace.
    pub namespace: String,
    /// Key.
    pub key: String,
    /// How.
    pub options: ReadOptions,
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub struct SetItem {
    /// Namespace.
    pub namespace: String,
    /// Key.
    pub key: String,
    /// Value.
    pub value: Vec<u8>,
    /// TTL, tags, condition.
    pub options: SetOptions,
}

/// Counts for one namespace (see `StatsResponse` in the proto).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceStats {
    /// The namespace's label (`_other` beyond the 64 labelled).
    pub namespace: String,
    /// Reads by result (`l1`, `l2`, `stale`, `negative`, `miss`).
    pub reads: BTreeMap<String, u64>,
    /// Writes by result (`stored`, `refused`).
    pub writes: BTreeMap<String, u64>,
    /// GetOrLease outcomes.
    pub leases: BTreeMap<String, u64>,
    /// Semantic reads by result.
    pub semantic: BTreeMap<String, u64>,
}

impl NamespaceStats {
    /// Share of reads that found a value.
    #[must_use]
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn hit_rate(&self) -> f64 {
        let get = |k: &str| self.reads.get(k).copied().unwrap_or(0);
        let hits = get("l1") + get("l2") + get("stale");
        let all: u64 = self.reads.values().sum();
        if all == 0 {
            0.0
        } else {
            hits as f64 / all as f64
        }
    }
}

/// This instance's statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Per namespace.
    pub namespaces: Vec<NamespaceStats>,
    /// L1 entries now.
    pub l1_entries: u64,
    /// L1 bytes now.
    pub l1_bytes: u64,
    /// L1 evictions since start.
    pub l1_evictions: u64,
    /// Feed in sync.
    pub feed_synced: bool,
    /// Feed events since start: synced, lost, gap.
    pub feed_events: BTreeMap<String, u64>,
    /// Last sequence applied.
    pub last_seq: u64,
}

fn check_batch(len: usize, out: &mut Vec<FieldViolation>) {
    if len == 0 || len > MAX_BATCH {
        out.push(FieldViolation::new(
            "items",
            format!("must hold 1 to {MAX_BATCH} items, got {len}"),
        ));
    }
}

impl Cache {
    /// Reads in a batch, answered in order.
    ///
    /// # Errors
    /// `InvalidArgument` naming each bad item (`items[i].key`); `Unavailable` when one read
    /// cannot be answered.
    pub async fn get_many(&self, items: &[GetItem]) -> Result<Vec<Found>, CacheError> {
        let mut v = Vec::new();
        check_batch(items.len(), &mut v);
        for (i, item) in items.iter().enumerate() {
            check_key(&item.namespace, &item.key, &format!("items[{i}]."), &mut v);
        }
        done(v)?;
        join_all(
            items
                .iter()
                .map(|i| self.get(&i.namespace, &i.key, i.options)),
        )
        .await
        .into_iter()
        .collect()
    }

    /// Writes in a batch; each is stored or refused on its own.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad batch size (bad items are refused one by one).
    pub async fn set_many(
        &self,
        items: &[SetItem],
    ) -> Result<Vec<Result<u64, CacheError>>, CacheError> {
        let mut v = Vec::new();
        check_batch(items.len(), &mut v);
        done(v)?;
        Ok(join_all(
            items
                .iter()
                .map(|i| self.set(&i.namespace, &i.key, &i.value, &i.options)),
        )
        .await)
    }

    /// Deletes in a batch; whether each key was there.
    ///
    /// # Errors
    /// `InvalidArgument` naming each bad item; `Unavailable`.
    pub async fn delete_many(&self, items: &[(String, String)]) -> Result<Vec<bool>, CacheError> {
        let mut v = Vec::new();
        check_batch(items.len(), &mut v);
        for (i, (namespace, key)) in items.iter().enumerate() {
            check_key(namespace, key, &format!("items[{i}]."), &mut v);
        }
        done(v)?;
        join_all(items.iter().map(|(n, k)| self.delete(n, k)))
            .await
            .into_iter()
            .collect()
    }

    /// L1's entries, bytes and evictions now (also set as gauges).
    pub fn sample(&self) -> (u64, u64, u64) {
        let (entries, bytes, evictions) = (self.l1.entries(), self.l1.bytes(), self.l1.evictions());
        let m = &self.metrics;
        m.l1_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        m.l1_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        m.l1_evictions
            .set(i64::try_from(evictions).unwrap_or(i64::MAX));
        (entries, bytes, evictions)
    }

    /// This instance's statistics; only `namespace` when given.
    #[must_use]
    pub fn stats(&self, namespace: Option<&str>) -> Stats {
        let mut by_ns: BTreeMap<String, NamespaceStats> = BTreeMap::new();
        for (ns, family, result, count) in self.metrics.counts() {
            if namespace.is_some_and(|n| n != ns) {
                continue;
            }
            let s = by_ns.entry(ns.clone()).or_insert_with(|| NamespaceStats {
                namespace: ns,
                ..NamespaceStats::default()
            });
            let map = match family {
                "reads" => &mut s.reads,
                "writes" => &mut s.writes,
                "leases" => &mut s.leases,
                _ => &mut s.semantic,
            };
            *map.entry(result).or_default() += count;
        }
        let (l1_entries, l1_bytes, l1_evictions) = self.sample();
        let m = &self.metrics;
        Stats {
            namespaces: by_ns.into_values().collect(),
            l1_entries,
            l1_bytes,
            l1_evictions,
            feed_synced: self.l1.synced(),
            feed_events: m.feed_events().into_iter().collect(),
            last_seq: self.l1.last_seq(),
        }
    }
}
