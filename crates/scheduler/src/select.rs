//! Selection strategies: which of the eligible agents gets the next call or task. Pure
//! functions of what each agent's load looks like now, plus the small state some strategies
//! keep between picks (a round-robin counter, smooth weighted round robin's current weights).

use std::collections::HashMap;
use std::time::Duration;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// How to pick among eligible agents (see the proto's `Strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Each agent in turn.
    RoundRobin,
    /// In proportion to weight, spread smoothly.
    WeightedRoundRobin,
    /// The lowest share of slots in use.
    LeastLoaded,
    /// The less loaded of two at random.
    PowerOfTwo,
    /// By affinity key, with bounded load.
    ConsistentHash,
    /// Two at random, the lower (in-flight + 1) × peak-EWMA latency ÷ weight.
    #[default]
    Adaptive,
}

/// A key passes to its next agent when its first is above this many times the mean load.
pub const HASH_LOAD_BOUND: f64 = 1.25;

/// What a strategy sees of one eligible agent.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Agent id.
    pub id: &'a str,
    /// Relative weight, ≥ 1.
    pub weight: u32,
    /// Slots in use.
    pub in_flight: u32,
    /// Slots in all, ≥ 1.
    pub capacity: u32,
    /// Peak-EWMA latency estimate, ms (0 = none yet).
    pub latency_ms: f64,
    /// Time since it registered, ms (slow start).
    pub age_ms: u64,
}

/// Latency assumed for an agent with no estimate yet, ms (a new agent is neither favoured as
/// infinitely fast nor avoided).
const DEFAULT_LATENCY_MS: f64 = 10.0;
/// Share of its weight a brand-new agent gets under slow start.
const SLOW_START_FLOOR: f64 = 0.1;

/// The state strategies keep between picks.
#[derive(Debug)]
pub struct Picker {
    next: u64,
    rng: u64,
    current: HashMap<String, i64>,
    slow_start_ms: f64,
}

impl Picker {
    /// A picker whose ADAPTIVE ramps new agents up over `slow_start`.
    #[must_use]
    pub fn new(slow_start: Duration) -> Self {
        Self {
            next: 0,
            rng: rand::random::<u64>() | 1,
            current: HashMap::new(),
            slow_start_ms: slow_start.as_secs_f64() * 1000.0,
        }
    }

    /// Forgets what it kept about `id` (an agent that left).
    pub fn forget(&mut self, id: &str) {
        self.current.remove(id);
    }

    /// The index in `candidates` of the agent to use, or `None` when there is none.
    pub fn pick(
        &mut self,
        strategy: Strategy,
        candidates: &[Candidate<'_>],
        affinity_key: &[u8],
    ) -> Option<usize> {
        match candidates.len() {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        Some(match strategy {
            Strategy::RoundRobin => {
                let i = self.next;
                self.next = self.next.wrapping_add(1);
                usize::try_from(i % candidates.len() as u64).unwrap_or(0)
            }
            Strategy::WeightedRoundRobin => self.smooth_weighted(candidates),
            Strategy::LeastLoaded => least(candidates, load),
            Strategy::PowerOfTwo => {
                let (a, b) = self.two(candidates.len());
                if load(&candidates[b]) < load(&candidates[a]) {
                    b
                } else {
                    a
                }
            }
            Strategy::ConsistentHash => bounded_hash(candidates, affinity_key),
            Strategy::Adaptive => {
                let (a, b) = self.two(candidates.len());
                if self.cost(&candidates[b]) < self.cost(&candidates[a]) {
                    b
                } else {
                    a
                }
            }
        })
    }

    /// nginx's smooth weighted round robin: every pick adds each weight to its agent's
    /// current weight, takes the highest and takes the total off it.
    fn smooth_weighted(&mut self, candidates: &[Candidate<'_>]) -> usize {
        let mut total = 0i64;
        let mut best = 0;
        let mut best_weight = i64::MIN;
        for (i, c) in candidates.iter().enumerate() {
            let weight = i64::from(c.weight.max(1));
            total += weight;
            // Look up before inserting, so a pick allocates no key for known agents.
            if !self.current.contains_key(c.id) {
                self.current.insert(c.id.to_owned(), 0);
            }
            if let Some(current) = self.current.get_mut(c.id) {
                *current += weight;
                if *current > best_weight {
                    best_weight = *current;
                    best = i;
                }
            }
        }
        if let Some(current) = self.current.get_mut(candidates[best].id) {
            *current -= total;
        }
        best
    }

    /// ADAPTIVE's cost: (in-flight + 1) × latency ÷ effective weight.
    #[allow(clippy::cast_precision_loss, reason = "ages and weights are small")]
    fn cost(&self, c: &Candidate<'_>) -> f64 {
        let latency = if c.latency_ms > 0.0 {
            c.latency_ms
        } else {
            DEFAULT_LATENCY_MS
        };
        let ramp = if self.slow_start_ms > 0.0 {
            (c.age_ms as f64 / self.slow_start_ms).clamp(SLOW_START_FLOOR, 1.0)
        } else {
            1.0
        };
        (f64::from(c.in_flight) + 1.0) * latency / (f64::from(c.weight.max(1)) * ramp)
    }

    /// Two distinct indexes below `n` (n ≥ 2), at random.
    fn two(&mut self, n: usize) -> (usize, usize) {
        let a = self.below(n);
        let b = (a + 1 + self.below(n - 1)) % n;
        (a, b)
    }

    fn below(&mut self, n: usize) -> usize {
        // xorshift64*: plenty for spreading picks, and no lock or syscall.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(((u128::from(r) * n as u128) >> 64) as u64).unwrap_or(0)
    }
}

/// Share of an agent's slots in use.
fn load(c: &Candidate<'_>) -> f64 {
    f64::from(c.in_flight) / f64::from(c.capacity.max(1))
}

fn least(candidates: &[Candidate<'_>], key: impl Fn(&Candidate<'_>) -> f64) -> usize {
    let mut best = 0;
    for (i, c) in candidates.iter().enumerate().skip(1) {
        if key(c) < key(&candidates[best]) {
            best = i;
        }
    }
    best
}

/// Rendezvous hashing of `key` over the candidates, skipping those whose load would pass
/// [`HASH_LOAD_BOUND`] × the mean (consistent hashing with bounded loads, Mirrokni et al.).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "loads are small counts"
)]
fn bounded_hash(candidates: &[Candidate<'_>], key: &[u8]) -> usize {
    let total: u64 = candidates.iter().map(|c| u64::from(c.in_flight)).sum();
    let bound = ((total + 1) as f64 / candidates.len() as f64 * HASH_LOAD_BOUND).ceil() as u64;
    let mut ranked: Vec<(u64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (xxh3_64_with_seed(key, xxh3_64(c.id.as_bytes())), i))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked
        .iter()
        .find(|(_, i)| u64::from(candidates[*i].in_flight) < bound.max(1))
        .map_or(ranked[0].1, |(_, i)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(ids: &[String], weight: u32) -> Vec<Candidate<'_>> {
        ids.iter()
            .map(|id| Candidate {
                id,
                weight,
                in_flight: 0,
                capacity: 10,
                latency_ms: 10.0,
                age_ms: 3_600_000,
            })
            .collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("a{i}")).collect()
    }

    #[test]
    fn test_round_robin_takes_each_in_turn() {
        let ids = ids(3);
        let c = agents(&ids, 1);
        let mut p = Picker::new(Duration::ZERO);
        let picks: Vec<usize> = (0..6)
            .map(|_| p.pick(Strategy::RoundRobin, &c, b"").unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn test_smooth_weighted_round_robin_honours_weights_without_bursts() {
        let ids = ids(3);
        let mut c = agents(&ids, 1);
        c[0].weight = 5;
        let mut p = Picker::new(Duration::ZERO);
        let picks: Vec<usize> = (0..7)
            .map(|_| p.pick(Strategy::WeightedRoundRobin, &c, b"").unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 5);
        // nginx's sequence for 5,1,1: a a b a c a a — never three of a in a row at the start.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn test_least_loaded_and_power_of_two_avoid_the_busy_agent() {
        let ids = ids(2);
        let mut c = agents(&ids, 1);
        c[0].in_flight = 9;
        let mut p = Picker::new(Duration::ZERO);
        assert_eq!(p.pick(Strategy::LeastLoaded, &c, b""), Some(1));
        for _ in 0..20 {
            assert_eq!(p.pick(Strategy::PowerOfTwo, &c, b""), Some(1));
        }
    }

    #[test]
    fn test_consistent_hash_is_stable_and_spills_an_overloaded_agent() {
        let ids = ids(8);
        let mut c = agents(&ids, 1);
        let mut p = Picker::new(Duration::ZERO);
        let first = p.pick(Strategy::ConsistentHash, &c, b"user-42").unwrap();
        assert_eq!(
            p.pick(Strategy::ConsistentHash, &c, b"user-42"),
            Some(first)
        );
        c[first].in_flight = 10;
        let spilled = p.pick(Strategy::ConsistentHash, &c, b"user-42").unwrap();
        assert_ne!(
            spilled, first,
            "above 1.25x the mean, the key goes to its next agent"
        );
    }

    #[test]
    fn test_adaptive_prefers_fast_agents_and_ramps_new_ones() {
        let ids = ids(2);
        let mut c = agents(&ids, 1);
        c[0].latency_ms = 2000.0;
        let mut p = Picker::new(Duration::from_secs(30));
        for _ in 0..20 {
            assert_eq!(p.pick(Strategy::Adaptive, &c, b""), Some(1));
        }
        // A brand-new agent (age 0) counts at a tenth of its weight.
        c[0].latency_ms = 10.0;
        c[1].age_ms = 0;
        c[0].in_flight = 5;
        for _ in 0..20 {
            assert_eq!(p.pick(Strategy::Adaptive, &c, b""), Some(0));
        }
    }

    #[test]
    fn test_two_is_always_two_distinct_indexes_below_n() {
        let mut p = Picker::new(Duration::ZERO);
        for n in 2..20 {
            for _ in 0..100 {
                let (a, b) = p.two(n);
                assert!(a < n && b < n && a != b);
            }
        }
    }
}
