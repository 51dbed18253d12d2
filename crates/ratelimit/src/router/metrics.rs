//! The router's own metrics: degraded answers, forwards, Redis latency and suspected peers.

use std::sync::Arc;

use agentmesh_runtime::Metrics;
use agentmesh_runtime::metrics::BoundedLabel;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};

use crate::metrics::MAX_LABELLED_NAMESPACES;

/// Router metrics: degraded answers by reason, forward and Redis latency.
#[derive(Clone)]
pub(super) struct RouterMetrics {
    pub(super) degraded: IntCounterVec,
    pub(super) forwarded: IntCounterVec,
    pub(super) forward_seconds: Histogram,
    pub(super) redis_seconds: Histogram,
    pub(super) suspect_peers: IntGauge,
    budget_spent: IntCounterVec,
    budget_denied: IntCounterVec,
    budget_namespaces: Arc<BoundedLabel>,
}

impl RouterMetrics {
    pub(super) fn register(metrics: &Metrics) -> Result<Self, prometheus::Error> {
        let degraded = IntCounterVec::new(
            Opts::new(
                "ratelimit_degraded_total",
                "Items answered by their failure policy, by reason and policy.",
            ),
            &["reason", "on_failure"],
        )?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "ratelimit_forwarded_items_total",
                "Items forwarded to their owner, by outcome (ok, failed).",
            ),
            &["outcome"],
        )?;
        let buckets = agentmesh_runtime::metrics::LATENCY_BUCKETS.to_vec();
        let forward_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ratelimit_forward_duration_seconds",
                "Time of one forwarded request to an owner.",
            )
            .buckets(buckets.clone()),
        )?;
        let redis_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ratelimit_redis_duration_seconds",
                "Time of one STRICT call to Redis.",
            )
            .buckets(buckets),
        )?;
        let suspect_peers = IntGauge::new(
            "ratelimit_suspect_peers",
            "Peers whose forward stream just failed: their keys go to the next owner until they answer.",
        )?;
        let budget_spent = IntCounterVec::new(
            Opts::new(
                "ratelimit_budget_spent_total",
                "Cost units committed against cost budgets, by namespace, counted where the budget \
                 lives (its owner): the burn rate is this counter's rate.",
            ),
            &["namespace"],
        )?;
        let budget_denied = IntCounterVec::new(
            Opts::new(
                "ratelimit_budget_denied_total",
                "Budget reservations refused (the budget had too little left), by namespace.",
            ),
            &["namespace"],
        )?;
        let registry = metrics.registry();
        registry.register(Box::new(budget_spent.clone()))?;
        registry.register(Box::new(budget_denied.clone()))?;
        registry.register(Box::new(suspect_peers.clone()))?;
        registry.register(Box::new(degraded.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(forward_seconds.clone()))?;
        registry.register(Box::new(redis_seconds.clone()))?;
        Ok(Self {
            degraded,
            forwarded,
            forward_seconds,
            redis_seconds,
            suspect_peers,
            budget_spent,
            budget_denied,
            budget_namespaces: Arc::new(BoundedLabel::new(MAX_LABELLED_NAMESPACES)),
        })
    }

    /// Counts units spent against a budget of `namespace`.
    pub(super) fn budget_spent(&self, namespace: &str, units: u64) {
        self.budget_spent
            .with_label_values(&[self.budget_namespaces.label(namespace)])
            .inc_by(units);
    }

    /// Counts a refused reservation in `namespace`.
    pub(super) fn budget_denied(&self, namespace: &str) {
        self.budget_denied
            .with_label_values(&[self.budget_namespaces.label(namespace)])
            .inc();
    }
}
