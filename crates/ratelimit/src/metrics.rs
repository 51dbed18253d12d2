//! Domain metrics of the rate limiter. Labels are bounded: a result and an algorithm, never a
//! key or namespace.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::limiter::{CheckOutcome, Limiter};

/// Counters resolved once, so recording a decision is a few atomic adds.
#[derive(Clone)]
pub struct RateLimitMetrics {
    allow: IntCounter,
    deny: IntCounter,
    shadow_deny: IntCounter,
    batch_rejected: IntCounter,
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
                "Rate-limit decisions per item: allow, deny, shadow_deny (over limit, allowed in SHADOW mode) and batch_rejected (fitted, but its all_or_nothing batch did not).",
            ),
            &["result"],
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
        for g in [
            &store_entries,
            &store_capacity,
            &evicted_idle,
            &evicted_active,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            allow: decisions.with_label_values(&["allow"]),
            deny: decisions.with_label_values(&["deny"]),
            shadow_deny: decisions.with_label_values(&["shadow_deny"]),
            batch_rejected: decisions.with_label_values(&["batch_rejected"]),
            store_entries,
            store_capacity,
            evicted_idle,
            evicted_active,
        })
    }

    /// Counts the outcomes of one request.
    pub fn record(&self, outcomes: &[CheckOutcome]) {
        for o in outcomes {
            let counter = if o.batch_rejected {
                &self.batch_rejected
            } else if o.allowed && o.over_limit {
                &self.shadow_deny
            } else if o.allowed {
                &self.allow
            } else {
                &self.deny
            };
            counter.inc();
        }
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
