//! Domain metrics of the rate limiter. Labels are bounded: never a key; namespaces and policy
//! names only up to a fixed number of distinct values (later ones share the label `_other`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::limiter::{CheckOutcome, Limiter};
use crate::spec::Consistency;

/// Distinct namespaces that get their own `namespace` label; later ones are `_other`.
pub const MAX_LABELLED_NAMESPACES: usize = 64;
/// Distinct policy names that get their own `policy` label; later ones are `_other`.
pub const MAX_LABELLED_POLICIES: usize = 256;
use agentmesh_runtime::metrics::BoundedLabel;
pub use agentmesh_runtime::metrics::OTHER_LABEL;
/// The `policy` label of inline limits.
pub const INLINE_LABEL: &str = "_inline";

/// The namespaces of one request's items, without a string per item: usually a request has
/// one namespace.
#[derive(Debug, Default)]
pub struct ItemNamespaces {
    names: Vec<String>,
    of_item: Vec<u32>,
}

impl ItemNamespaces {
    /// Collects the namespace of each item, in order.
    pub fn of<'a>(namespaces: impl Iterator<Item = &'a str>) -> Self {
        let mut this = Self::default();
        for ns in namespaces {
            let index = match this.names.iter().position(|n| n == ns) {
                Some(i) => i,
                None => {
                    this.names.push(ns.to_owned());
                    this.names.len() - 1
                }
            };
            this.of_item.push(u32::try_from(index).unwrap_or(u32::MAX));
        }
        this
    }

    /// `count` items of one namespace (Envoy: the domain).
    pub fn single(namespace: &str, count: usize) -> Self {
        Self {
            names: vec![namespace.to_owned()],
            of_item: vec![0; count],
        }
    }

    fn get(&self, item: usize) -> &str {
        self.of_item
            .get(item)
            .and_then(|&i| self.names.get(i as usize))
            .map_or("", String::as_str)
    }
}

/// Counters resolved once, so recording a decision is a few atomic adds.
#[derive(Clone)]
pub struct RateLimitMetrics {
    decisions: IntCounterVec,
    /// `ratelimit_check_duration_seconds` by path: local, forwarded, strict, degraded.
    check_seconds: [Histogram; 4],
    namespaces: Arc<BoundedLabel>,
    policies: Arc<BoundedLabel>,
    store_entries: IntGauge,
    store_capacity: IntGauge,
    evicted_idle: IntGauge,
    evicted_active: IntGauge,
}

impl RateLimitMetrics {
    /// Registers the rate limiter's metrics.
    ///
    /// # Errors
    /// Fails when they are already registered in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "ratelimit_decisions_total",
                "Rate-limit decisions per item, counted by the instance the client called: result = allow, deny, shadow_deny (over limit, allowed in SHADOW mode) or batch_rejected (fitted, but its all_or_nothing batch did not); consistency = local, owner or strict; namespace and policy bounded (_other beyond the bound, _inline for inline limits).",
            ),
            &["namespace", "policy", "consistency", "result"],
        )?;
        let check_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ratelimit_check_duration_seconds",
                "Time to answer one check request (a Check, one StreamCheck message or a ShouldRateLimit) at the instance the client called, from its arrival to its answer. path = degraded (an item was answered by its failure policy), forwarded (an item was decided by another instance), strict (an item was decided in Redis) or local, the first that applies.",
            )
            .buckets(agentmesh_runtime::metrics::LATENCY_BUCKETS.to_vec()),
            &["path"],
        )?;
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let store_entries = gauge("ratelimit_store_entries", "Limit states held in memory.")?;
        let store_capacity = gauge(
            "ratelimit_store_capacity",
            "Most limit states held in memory (--ratelimit-max-keys).",
        )?;
        let evicted_idle = gauge(
            "ratelimit_store_evicted_idle",
            "Limit states evicted at rest (no information lost), since start.",
        )?;
        let evicted_active = gauge(
            "ratelimit_store_evicted_active",
            "Limit states evicted before they were at rest because the store was full, since start; raise --ratelimit-max-keys if this grows.",
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(check_seconds.clone()))?;
        for g in [
            &store_entries,
            &store_capacity,
            &evicted_idle,
            &evicted_active,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            decisions,
            check_seconds: CheckPath::ALL.map(|p| check_seconds.with_label_values(&[p.label()])),
            namespaces: Arc::new(BoundedLabel::new(MAX_LABELLED_NAMESPACES)),
            policies: Arc::new(BoundedLabel::new(MAX_LABELLED_POLICIES)),
            store_entries,
            store_capacity,
            evicted_idle,
            evicted_active,
        })
    }

    /// Counts the outcomes of one request, `namespaces` giving each item's namespace. Items
    /// are grouped first, so a batch of one namespace and policy costs one label lookup.
    pub fn record(&self, namespaces: &ItemNamespaces, outcomes: &[CheckOutcome]) {
        // (namespace, policy, consistency, result) → count.
        type Group<'a> = ((&'a str, &'a str, Consistency, &'static str), u64);
        let mut groups: Vec<Group<'_>> = Vec::new();
        for (i, o) in outcomes.iter().enumerate() {
            let result = if o.batch_rejected {
                "batch_rejected"
            } else if o.allowed && o.over_limit {
                "shadow_deny"
            } else if o.allowed {
                "allow"
            } else {
                "deny"
            };
            let key = (namespaces.get(i), o.policy.as_str(), o.consistency, result);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => groups.push((key, 1)),
            }
        }
        for ((namespace, policy, consistency, result), n) in groups {
            let policy = if policy.is_empty() {
                INLINE_LABEL
            } else {
                self.policies.label(policy)
            };
            let consistency = match consistency {
                Consistency::Local => "local",
                Consistency::Owner => "owner",
                Consistency::Strict => "strict",
            };
            self.decisions
                .with_label_values(&[
                    self.namespaces.label(namespace),
                    policy,
                    consistency,
                    result,
                ])
                .inc_by(n);
        }
    }

    /// Observes the time one check request took, `started` being its arrival, on the path of
    /// its outcomes (see [`CheckPath::of`]).
    pub fn observe_check(&self, started: Instant, outcomes: &[CheckOutcome]) {
        self.check_seconds[CheckPath::of(outcomes) as usize]
            .observe(started.elapsed().as_secs_f64());
    }

    /// Copies the store's statistics into the gauges every `period` until the limiter is
    /// dropped everywhere else.
    pub fn spawn_store_sampler(&self, limiter: &Arc<Limiter>, period: Duration) {
        let weak = Arc::downgrade(limiter);
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(limiter) = weak.upgrade() else { break };
                let stats = limiter.stats();
                this.store_entries
                    .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
                this.store_capacity
                    .set(i64::try_from(stats.capacity).unwrap_or(i64::MAX));
                this.evicted_idle
                    .set(i64::try_from(stats.evicted_idle).unwrap_or(i64::MAX));
                this.evicted_active
                    .set(i64::try_from(stats.evicted_active).unwrap_or(i64::MAX));
            }
        });
    }
}

/// The way a check request was answered, for `ratelimit_check_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckPath {
    Local,
    Forwarded,
    Strict,
    Degraded,
}

impl CheckPath {
    const ALL: [Self; 4] = [Self::Local, Self::Forwarded, Self::Strict, Self::Degraded];

    /// The slowest way any of the outcomes took: degraded (its failure policy answered, after
    /// the budget or an open breaker), else forwarded (another instance decided), else strict
    /// (Redis decided), else local.
    fn of(outcomes: &[CheckOutcome]) -> Self {
        if outcomes.iter().any(|o| o.degraded.is_some()) {
            Self::Degraded
        } else if outcomes.iter().any(|o| o.decided_by.is_some()) {
            Self::Forwarded
        } else if outcomes
            .iter()
            .any(|o| o.consistency == Consistency::Strict)
        {
            Self::Strict
        } else {
            Self::Local
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Forwarded => "forwarded",
            Self::Strict => "strict",
            Self::Degraded => "degraded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(consistency: Consistency) -> CheckOutcome {
        CheckOutcome {
            allowed: true,
            over_limit: false,
            batch_rejected: false,
            mode: crate::spec::Mode::Enforce,
            policy: String::new(),
            limit: 1,
            remaining: 0,
            retry_after: None,
            reset_after: Duration::ZERO,
            policy_version: 0,
            degraded: None,
            decided_by: None,
            consistency,
        }
    }

    #[test]
    fn test_a_check_is_timed_on_the_slowest_path_its_items_took() {
        let local = outcome(Consistency::Local);
        let strict = outcome(Consistency::Strict);
        let forwarded = CheckOutcome {
            decided_by: Some("peer".to_owned()),
            ..outcome(Consistency::Owner)
        };
        let degraded = CheckOutcome {
            degraded: Some(crate::limiter::DegradedReason::OwnerUnavailable),
            ..outcome(Consistency::Owner)
        };
        assert_eq!(CheckPath::of(&[]), CheckPath::Local);
        assert_eq!(
            CheckPath::of(std::slice::from_ref(&local)),
            CheckPath::Local
        );
        assert_eq!(
            CheckPath::of(&[local.clone(), strict.clone()]),
            CheckPath::Strict
        );
        assert_eq!(
            CheckPath::of(&[strict, forwarded.clone(), local.clone()]),
            CheckPath::Forwarded
        );
        assert_eq!(
            CheckPath::of(&[forwarded.clone(), degraded]),
            CheckPath::Degraded
        );

        let registry = Registry::new();
        let metrics = RateLimitMetrics::register(&registry).expect("register");
        metrics.observe_check(Instant::now(), &[forwarded]);
        metrics.observe_check(Instant::now(), std::slice::from_ref(&local));
        metrics.observe_check(Instant::now(), &[local]);
        let counts: Vec<(String, u64)> = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "ratelimit_check_duration_seconds")
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                (
                    m.get_label()[0].value().to_owned(),
                    m.get_histogram().get_sample_count(),
                )
            })
            .collect();
        for (path, n) in [
            ("local", 2),
            ("forwarded", 1),
            ("strict", 0),
            ("degraded", 0),
        ] {
            assert!(counts.contains(&(path.to_owned(), n)), "{path}: {counts:?}");
        }
    }

    #[test]
    fn test_item_namespaces_keep_one_string_per_distinct_namespace() {
        let ns = ItemNamespaces::of(["x", "y", "x"].into_iter());
        assert_eq!(ns.names.len(), 2);
        assert_eq!(
            (ns.get(0), ns.get(1), ns.get(2), ns.get(3)),
            ("x", "y", "x", "")
        );
    }
}
