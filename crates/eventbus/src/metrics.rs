//! The bus's metrics, incremented in place where things happen (the pattern every service
//! follows: Prometheus counters are atomics, so counting into them costs what counting into a
//! plain `AtomicU64` did, and nothing has to copy them into the registry later). The bus and
//! its tests read them back with `get()`. Labels are bounded: durability, priority, direction,
//! side; never a subject.

use prometheus::core::Collector;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::event::Priority;

/// `eventbus_cluster_forwards_shed_total`'s help, shared by both sides (the registry merges
/// the sending side, counted by the bus, and the receiving side, counted by the backplane,
/// into one family).
const FORWARD_SHED_HELP: &str = "Forwards dropped because the backplane was full, by priority and side (sending: \
     the queue to Redis; receiving: this bus fell behind the forwards sent to it).";

/// Bus-wide counters, registered by the service with [`BusCounters::register`].
pub struct BusCounters {
    /// Events accepted, ephemeral.
    pub published_ephemeral: IntCounter,
    /// Events accepted, durable.
    pub published_durable: IntCounter,
    /// Duplicates answered.
    pub duplicates: IntCounter,
    /// Shed events by priority index.
    pub shed: [IntCounter; 4],
    /// Expired events.
    pub expired: IntCounter,
    /// Dead-lettered events.
    pub dead_lettered: IntCounter,
    /// Ephemeral events no group was interested in.
    pub no_interest: IntCounter,
    /// Log failures in background work (acks, reads, dead letters).
    pub log_errors: IntCounter,
    /// Ephemeral events handed to other instances (one per instance).
    pub forwarded_out: IntCounter,
    /// Ephemeral events other instances handed to this one.
    pub forwarded_in: IntCounter,
    /// Forwards the backplane could not take (dropped: ephemeral delivery is at most once).
    pub forward_dropped: IntCounter,
    /// Of those, by priority (index 0 = LOW): a full backplane link sheds the lowest first.
    pub forward_shed: [IntCounter; 4],
    /// Client ids the cluster could not be asked about (Redis down or slow): deduplicated on
    /// this instance only.
    pub cluster_dedup_errors: IntCounter,
    /// Open subscriptions.
    pub subscriptions: IntGauge,
    /// The families, for registration.
    families: Vec<Box<dyn CloneCollector>>,
}

impl std::fmt::Debug for BusCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusCounters")
            .field("published_ephemeral", &self.published_ephemeral.get())
            .field("published_durable", &self.published_durable.get())
            .field("subscriptions", &self.subscriptions.get())
            .finish_non_exhaustive()
    }
}

impl Default for BusCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// A collector the counters can hand to a registry more than once (a clone each time).
trait CloneCollector: Send + Sync {
    fn boxed(&self) -> Box<dyn Collector>;
}

impl<C: Collector + Clone + 'static> CloneCollector for C {
    fn boxed(&self) -> Box<dyn Collector> {
        Box::new(self.clone())
    }
}

/// Names, help and labels are constants: making the families cannot fail.
fn vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric family")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

/// The four children of `family` by priority (index 0 = LOW), after `before` labels.
fn by_priority(family: &IntCounterVec, before: &[&str], after: &[&str]) -> [IntCounter; 4] {
    Priority::ALL.map(|p| {
        let labels: Vec<&str> = before
            .iter()
            .copied()
            .chain([p.as_str()])
            .chain(after.iter().copied())
            .collect();
        family.with_label_values(&labels)
    })
}

/// `eventbus_cluster_forwards_shed_total{priority, side}` for one side.
pub fn forward_shed_family(side: &str) -> IntCounterVec {
    IntCounterVec::new(
        Opts::new("eventbus_cluster_forwards_shed_total", FORWARD_SHED_HELP)
            .const_label("side", side),
        &["priority"],
    )
    .expect("valid metric family")
}

/// The children of [`forward_shed_family`] by priority index.
pub fn forward_shed_counters(family: &IntCounterVec) -> [IntCounter; 4] {
    by_priority(family, &[], &[])
}

impl BusCounters {
    /// Fresh counters, not yet registered.
    #[must_use]
    pub fn new() -> Self {
        let published = vec(
            "eventbus_published_total",
            "Events accepted, by durability (ephemeral, durable).",
            &["durability"],
        );
        let shed = vec(
            "eventbus_shed_total",
            "Pending events dropped to stay within a subscription's bound, by priority.",
            &["priority"],
        );
        let forwards = vec(
            "eventbus_cluster_forwards_total",
            "Ephemeral events handed between instances, by direction (out, in, dropped).",
            &["direction"],
        );
        let forward_shed = forward_shed_family("sending");
        let duplicates = counter(
            "eventbus_duplicates_total",
            "Publishes answered as duplicates (id seen within the dedup window).",
        );
        let expired = counter(
            "eventbus_expired_total",
            "Events that expired before they could be delivered.",
        );
        let dead_lettered = counter(
            "eventbus_dead_lettered_total",
            "Events sent to a dead-letter subject.",
        );
        let no_interest = counter(
            "eventbus_no_interest_total",
            "Ephemeral events published with no subscriber interested.",
        );
        let log_errors = counter(
            "eventbus_log_errors_total",
            "Durable log failures in background work (reads, acks, dead letters).",
        );
        let cluster_dedup_errors = counter(
            "eventbus_dedup_cluster_errors_total",
            "Client event ids the cluster could not be asked about (Redis down or slow): \
             deduplicated on this instance only.",
        );
        let subscriptions =
            IntGauge::new("eventbus_subscriptions", "Open subscriptions.").expect("valid metric");
        Self {
            published_ephemeral: published.with_label_values(&["ephemeral"]),
            published_durable: published.with_label_values(&["durable"]),
            shed: by_priority(&shed, &[], &[]),
            forwarded_out: forwards.with_label_values(&["out"]),
            forwarded_in: forwards.with_label_values(&["in"]),
            forward_dropped: forwards.with_label_values(&["dropped"]),
            forward_shed: forward_shed_counters(&forward_shed),
            duplicates: duplicates.clone(),
            expired: expired.clone(),
            dead_lettered: dead_lettered.clone(),
            no_interest: no_interest.clone(),
            log_errors: log_errors.clone(),
            cluster_dedup_errors: cluster_dedup_errors.clone(),
            subscriptions: subscriptions.clone(),
            families: vec![
                Box::new(published),
                Box::new(shed),
                Box::new(forwards),
                Box::new(forward_shed),
                Box::new(duplicates),
                Box::new(expired),
                Box::new(dead_lettered),
                Box::new(no_interest),
                Box::new(log_errors),
                Box::new(cluster_dedup_errors),
                Box::new(subscriptions),
            ],
        }
    }

    /// Registers every family in `registry`.
    ///
    /// # Errors
    /// When a family of the same name is already registered.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        for family in &self.families {
            registry.register(family.boxed())?;
        }
        Ok(())
    }
}

/// `eventbus_queue_wait_seconds{priority}`: fine buckets below a millisecond, where a
/// CRITICAL event's wait should stay.
pub fn queue_wait_histogram() -> HistogramVec {
    let opts = HistogramOpts::new(
        "eventbus_queue_wait_seconds",
        "Time events waited in a subscription's pending queue before delivery, by priority.",
    )
    .buckets(vec![
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
        10.0,
    ]);
    // Valid name, help and label: cannot fail.
    HistogramVec::new(opts, &["priority"]).expect("queue wait histogram")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_counters_are_exported_where_they_are_counted_and_both_shed_sides_share_a_family() {
        let registry = Registry::new();
        let counters = BusCounters::new();
        counters.register(&registry).unwrap();
        let receiving = forward_shed_family("receiving");
        registry.register(Box::new(receiving.clone())).unwrap();
        counters.published_durable.inc_by(3);
        counters.forward_shed[Priority::Low.index()].inc();
        forward_shed_counters(&receiving)[Priority::High.index()].inc_by(2);
        counters.subscriptions.inc();
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "eventbus_published_total{durability=\"durable\"} 3",
            "eventbus_cluster_forwards_shed_total{priority=\"low\",side=\"sending\"} 1",
            "eventbus_cluster_forwards_shed_total{priority=\"high\",side=\"receiving\"} 2",
            "eventbus_subscriptions 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE eventbus_cluster_forwards_shed_total")
                .count(),
            1,
            "one family"
        );
    }
}
