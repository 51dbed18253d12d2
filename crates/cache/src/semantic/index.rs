//! Vector search in process, one index per (namespace, partition, vector space): exact (a
//! scan) while small, HNSW (hnsw_rs) from [`HNSW_FROM`] entries on, over unit vectors with
//! cosine similarity. The graph is grown with every insert from the first one (about 1 ms per
//! insert at 100k entries), so crossing the threshold costs nothing; it keeps its own copy of
//! the vectors. Removal marks a slot dead; the index is rebuilt when half its slots are.

use std::collections::HashMap;

use hnsw_rs::prelude::{Distance, Hnsw, Neighbour};

use super::embed::dot;

/// Entries from which an index searches with HNSW instead of scanning.
pub const HNSW_FROM: usize = 20_000;
/// HNSW: links per node, and candidates kept while building and searching.
const M: usize = 16;
const EF_CONSTRUCTION: usize = 100;
const EF_SEARCH: usize = 64;
/// Elements an HNSW is sized for (its layer probabilities depend on it).
const HNSW_CAPACITY: usize = 1_000_000;

/// `1 - cosine` of unit vectors (never negative: rounding can put a dot above 1).
#[derive(Debug, Default, Clone, Copy)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - dot(va, vb)).max(0.0)
    }
}

/// What an index entry points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The cache key of the entry (in the index's namespace).
    pub key: String,
    /// The prompt it was stored for (for the guard).
    pub prompt: String,
    /// The entry's version (a change already indexed is not indexed again).
    pub version: u64,
}

/// One index.
pub struct VectorIndex {
    dim: usize,
    slots: Vec<Option<Slot>>,
    vectors: Vec<f32>,
    by_key: HashMap<String, usize>,
    hnsw: Option<Hnsw<'static, f32, UnitCosine>>,
    live: usize,
    force_exact: bool,
    hnsw_from: usize,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dim", &self.dim)
            .field("live", &self.live)
            .field("hnsw", &self.hnsw.is_some())
            .finish_non_exhaustive()
    }
}

impl VectorIndex {
    /// An empty index of `dim`-dimensional vectors.
    #[must_use]
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            slots: Vec::new(),
            vectors: Vec::new(),
            by_key: HashMap::new(),
            hnsw: None,
            live: 0,
            force_exact: false,
            hnsw_from: HNSW_FROM,
        }
    }

    /// An index that switches to HNSW at `n` entries (tests, benches).
    #[must_use]
    pub fn with_hnsw_from(dim: usize, n: usize) -> Self {
        Self {
            hnsw_from: n.max(1),
            ..Self::new(dim)
        }
    }

    /// An index that never switches to HNSW (to measure HNSW's recall against).
    #[must_use]
    pub fn exact(dim: usize) -> Self {
        Self {
            force_exact: true,
            ..Self::new(dim)
        }
    }

    /// Dimensions.
    #[must_use]
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether it holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether it searches with HNSW.
    #[must_use]
    pub fn approximate(&self) -> bool {
        self.hnsw.is_some() && self.live >= self.hnsw_from
    }

    /// The version indexed under `key`.
    #[must_use]
    pub fn version(&self, key: &str) -> Option<u64> {
        let id = *self.by_key.get(key)?;
        self.slots.get(id)?.as_ref().map(|s| s.version)
    }

    /// Adds (or replaces) the entry under `slot.key`.
    pub fn insert(&mut self, slot: Slot, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dim);
        self.remove(&slot.key);
        let id = self.slots.len();
        self.by_key.insert(slot.key.clone(), id);
        self.slots.push(Some(slot));
        self.vectors.extend_from_slice(vector);
        self.live += 1;
        if self.hnsw.is_none() && !self.force_exact {
            self.hnsw = Some(Hnsw::new(M, HNSW_CAPACITY, 16, EF_CONSTRUCTION, UnitCosine));
        }
        if let Some(h) = &self.hnsw {
            h.insert_slice((vector, id));
        }
    }

    /// Removes the entry under `key`; whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let Some(id) = self.by_key.remove(key) else {
            return false;
        };
        self.slots[id] = None;
        self.live -= 1;
        if self.slots.len() > 64 && self.live * 2 < self.slots.len() {
            self.compact();
        }
        true
    }

    /// Removes the oldest live entry; its key.
    pub fn pop_oldest(&mut self) -> Option<String> {
        let key = self.slots.iter().flatten().next()?.key.clone();
        self.remove(&key);
        Some(key)
    }

    fn vector(&self, id: usize) -> &[f32] {
        &self.vectors[id * self.dim..(id + 1) * self.dim]
    }

    /// Rebuilds without the dead slots.
    fn compact(&mut self) {
        let mut fresh = Self {
            force_exact: self.force_exact,
            ..Self::with_hnsw_from(self.dim, self.hnsw_from)
        };
        for (id, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot {
                fresh.insert(slot.clone(), self.vector(id));
            }
        }
        *self = fresh;
    }

    /// The `k` most similar live entries: (slot, cosine similarity), most similar first.
    #[must_use]
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(&Slot, f32)> {
        let graph = self.hnsw.as_ref().filter(|_| self.live >= self.hnsw_from);
        let mut found: Vec<(usize, f32)> = match graph {
            Some(h) => {
                let hits: Vec<Neighbour> = if self.live == self.slots.len() {
                    h.search(query, k, EF_SEARCH.max(k))
                } else {
                    let live = |id: &usize| self.slots.get(*id).is_some_and(Option::is_some);
                    h.search_filter(query, k, EF_SEARCH.max(k), Some(&live))
                };
                hits.into_iter()
                    .map(|n| (n.d_id, 1.0 - n.distance))
                    .collect()
            }
            None => {
                let mut all: Vec<(usize, f32)> = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_some())
                    .map(|(id, _)| (id, dot(query, self.vector(id))))
                    .collect();
                let k = k.min(all.len());
                if k > 0 && k < all.len() {
                    all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                    all.truncate(k);
                }
                all
            }
        };
        found.sort_by(|a, b| b.1.total_cmp(&a.1));
        found
            .into_iter()
            .filter_map(|(id, sim)| Some((self.slots.get(id)?.as_ref()?, sim)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::embed::unit;

    fn random(dim: usize, seed: &mut u64) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                #[allow(clippy::cast_precision_loss, reason = "test noise")]
                let x = (*seed % 2000) as f32 / 1000.0 - 1.0;
                x
            })
            .collect();
        unit(&mut v);
        v
    }

    fn slot(i: usize) -> Slot {
        Slot {
            key: format!("k{i}"),
            prompt: format!("p{i}"),
            version: 1,
        }
    }

    #[test]
    fn test_exact_search_finds_the_nearest_and_forgets_removed_entries() {
        let mut seed = 7;
        let mut index = VectorIndex::new(32);
        let vs: Vec<_> = (0..100).map(|_| random(32, &mut seed)).collect();
        for (i, v) in vs.iter().enumerate() {
            index.insert(slot(i), v);
        }
        let top = index.search(&vs[42], 3);
        assert_eq!(top[0].0.key, "k42");
        assert!((top[0].1 - 1.0).abs() < 1e-5);
        assert!(index.remove("k42"));
        assert_ne!(index.search(&vs[42], 1)[0].0.key, "k42");
        assert_eq!(index.len(), 99);
        assert_eq!(index.pop_oldest().as_deref(), Some("k0"));
    }

    #[test]
    fn test_hnsw_takes_over_when_the_index_grows_and_keeps_recall() {
        let mut seed = 11;
        let mut index = VectorIndex::new(48);
        let mut exact = VectorIndex::exact(48);
        let vs: Vec<_> = (0..HNSW_FROM + 500)
            .map(|_| random(48, &mut seed))
            .collect();
        for (i, v) in vs.iter().enumerate() {
            index.insert(slot(i), v);
            exact.insert(slot(i), v);
        }
        assert!(index.approximate() && !exact.approximate());
        let queries: Vec<_> = (0..200)
            .map(|i| {
                let noise = random(48, &mut seed);
                let mut v: Vec<f32> = vs[i * 7]
                    .iter()
                    .zip(&noise)
                    .map(|(c, n)| c + 0.05 * n)
                    .collect();
                unit(&mut v);
                v
            })
            .collect();
        let agree = queries
            .iter()
            .filter(|q| index.search(q, 1)[0].0 == exact.search(q, 1)[0].0)
            .count();
        assert!(agree >= 190, "recall@1 {agree}/200");
        // Removed entries are filtered out of HNSW answers too.
        let first = index.search(&vs[5], 1)[0].0.key.clone();
        assert_eq!(first, "k5");
        index.remove("k5");
        assert_ne!(index.search(&vs[5], 1)[0].0.key, "k5");
    }
}
