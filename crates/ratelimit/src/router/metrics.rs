//! The router's own metrics: degraded answers, forwards, Redis latency and suspected peers.

use agentmesh_runtime::Metrics;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};

/// Router metrics: degraded answers by reason, forward and Redis latency.
#[derive(Clone)]
pub(super) struct RouterMetrics {
    pub(super) degraded: IntCounterVec,
    pub(super) forwarded: IntCounterVec,
    pub(super) forward_seconds: Histogram,
    pub(super) redis_seconds: Histogram,
    pub(super) suspect_peers: IntGauge,
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
        let registry = metrics.registry();
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
        })
    }
}
