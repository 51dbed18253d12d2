//! The aggregator's metrics. Labels are bounded: components are services, dependencies and the
//! cluster (never an instance id); instances are counted per service and state.

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_runtime::metrics::LATENCY_BUCKETS;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::model::{Kind, State};

/// The aggregator's metrics (cheap to clone).
#[derive(Clone)]
pub struct HealthMetrics {
    status: IntGaugeVec,
    instances: IntGaugeVec,
    transitions: IntCounterVec,
    checks: HistogramVec,
    notifications: IntCounterVec,
    pub(crate) alerts: IntGaugeVec,
    pub(crate) revision: IntGauge,
    pub(crate) watchers: IntGauge,
}

impl HealthMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered twice.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let status = IntGaugeVec::new(
            Opts::new(
                "health_component_status",
                "1 for the state each component (the cluster, each service, each dependency) \
                 is in, 0 for the others.",
            ),
            &["component", "state"],
        )?;
        let instances = IntGaugeVec::new(
            Opts::new("health_instances", "Instances by service and state."),
            &["service", "state"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "health_transitions_total",
                "State transitions by component kind and the state entered.",
            ),
            &["kind", "to"],
        )?;
        let checks = HistogramVec::new(
            HistogramOpts::new(
                "health_check_duration_seconds",
                "Duration of each check by target (instance, etcd, redis) and result (pass, fail).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["target", "result"],
        )?;
        let notifications = IntCounterVec::new(
            Opts::new(
                "health_notifications_total",
                "Alert notifications by channel (webhook, eventbus) and result (sent, failed; a \
                 webhook counts once after its retries).",
            ),
            &["channel", "result"],
        )?;
        let alerts = IntGaugeVec::new(
            Opts::new(
                "health_alerts",
                "Alerts by status (pending, firing, resolved).",
            ),
            &["status"],
        )?;
        let revision = IntGauge::new("health_revision", "The aggregator's current revision.")?;
        let watchers = IntGauge::new("health_watchers", "Open WatchClusterHealth streams.")?;
        registry.register(Box::new(status.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        registry.register(Box::new(notifications.clone()))?;
        registry.register(Box::new(alerts.clone()))?;
        registry.register(Box::new(revision.clone()))?;
        registry.register(Box::new(watchers.clone()))?;
        Ok(Self {
            status,
            instances,
            transitions,
            checks,
            notifications,
            alerts,
            revision,
            watchers,
        })
    }

    /// Metrics in a registry of their own (tests, benchmarks).
    #[must_use]
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).unwrap_or_else(|_| unreachable!("a new registry is empty"))
    }

    pub(crate) fn transition(&self, kind: Kind, to: State) {
        self.transitions
            .with_label_values(&[kind.as_str(), to.as_str()])
            .inc();
    }

    /// Counts one notification.
    pub fn notification(&self, channel: &str, sent: bool) {
        self.notifications
            .with_label_values(&[channel, if sent { "sent" } else { "failed" }])
            .inc();
    }

    /// Sets the alert gauges.
    pub fn set_alerts(&self, alerts: &[crate::alerts::AlertView]) {
        for status in ["pending", "firing", "resolved"] {
            let n = alerts
                .iter()
                .filter(|a| a.record.status.as_str() == status)
                .count();
            self.alerts
                .with_label_values(&[status])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records one check.
    pub fn check(&self, target: &str, passed: bool, took: Duration) {
        self.checks
            .with_label_values(&[target, if passed { "pass" } else { "fail" }])
            .observe(took.as_secs_f64());
    }

    /// Sets the status gauges from every component's (kind, name, service, state).
    pub(crate) fn set_states<'a>(
        &self,
        components: impl Iterator<Item = (Kind, &'a str, &'a str, State)>,
    ) {
        let mut instances: BTreeMap<(&str, State), i64> = BTreeMap::new();
        let mut shown: Vec<(String, State)> = Vec::new();
        for (kind, name, service, state) in components {
            match kind {
                Kind::Instance => *instances.entry((service, state)).or_default() += 1,
                Kind::Cluster => shown.push(("cluster".to_owned(), state)),
                Kind::Service => shown.push((format!("service/{name}"), state)),
                Kind::Dependency => shown.push((format!("dependency/{name}"), state)),
            }
        }
        self.status.reset();
        for (component, state) in &shown {
            for candidate in State::ALL {
                self.status
                    .with_label_values(&[component.as_str(), candidate.as_str()])
                    .set(i64::from(candidate == *state));
            }
        }
        self.instances.reset();
        for ((service, state), count) in instances {
            self.instances
                .with_label_values(&[service, state.as_str()])
                .set(count);
        }
    }
}
