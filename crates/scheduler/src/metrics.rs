//! The pool's Prometheus metrics: agents by state and type, acquisitions by result, and
//! failure detections. Labels are bounded (states, results, kinds, and types up to a cap).

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::error::SchedulerError;
use crate::pool::{PoolStats, Reservation, TickReport};

/// Most agent types given their own label; the rest are counted under `_other`.
pub const MAX_LABELLED_TYPES: usize = 64;

/// The pool's metrics (cheap to clone).
#[derive(Clone)]
pub struct SchedulerMetrics {
    agents: IntGaugeVec,
    agents_by_type: IntGaugeVec,
    slots: IntGaugeVec,
    acquisitions: IntCounterVec,
    detections: IntCounterVec,
}

impl SchedulerMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered twice.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let agents = IntGaugeVec::new(
            Opts::new("scheduler_agents", "Agents in the pool, by state."),
            &["state"],
        )?;
        let agents_by_type = IntGaugeVec::new(
            Opts::new(
                "scheduler_agents_by_type",
                "Live agents (not dead) by type (the first 64 types, then _other).",
            ),
            &["type"],
        )?;
        let slots = IntGaugeVec::new(
            Opts::new(
                "scheduler_slots",
                "Slots of live agents: capacity, in_flight, reserved (open reservations).",
            ),
            &["kind"],
        )?;
        let acquisitions = IntCounterVec::new(
            Opts::new(
                "scheduler_acquisitions_total",
                "AcquireAgent calls by result (acquired, no_agent, full, invalid).",
            ),
            &["result"],
        )?;
        let detections = IntCounterVec::new(
            Opts::new(
                "scheduler_detections_total",
                "Failure detections by kind (suspect, dead by silence, removed).",
            ),
            &["kind"],
        )?;
        for c in [&agents, &agents_by_type, &slots] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(acquisitions.clone()))?;
        registry.register(Box::new(detections.clone()))?;
        Ok(Self {
            agents,
            agents_by_type,
            slots,
            acquisitions,
            detections,
        })
    }

    /// Counts one AcquireAgent.
    pub fn acquired(&self, result: &Result<Reservation, SchedulerError>) {
        let label = match result {
            Ok(_) => "acquired",
            Err(SchedulerError::NoAgent(_)) => "no_agent",
            Err(SchedulerError::Full(_)) => "full",
            Err(_) => "invalid",
        };
        self.acquisitions.with_label_values(&[label]).inc();
    }

    /// Records what a tick found and the pool's counts after it.
    pub fn observe(&self, tick: &TickReport, stats: &PoolStats) {
        let count = |kind: &str, n: usize| {
            self.detections.with_label_values(&[kind]).inc_by(n as u64);
        };
        count("suspect", tick.suspected.len());
        count("dead", tick.died.len());
        count("removed", tick.removed.len());
        for (state, n) in &stats.by_state {
            self.agents.with_label_values(&[state]).set(i64::from(*n));
        }
        self.agents_by_type.reset();
        let mut other = 0i64;
        for (i, (t, n)) in stats.by_type.iter().enumerate() {
            if i < MAX_LABELLED_TYPES {
                self.agents_by_type
                    .with_label_values(&[t])
                    .set(i64::from(*n));
            } else {
                other += i64::from(*n);
            }
        }
        if other > 0 {
            self.agents_by_type
                .with_label_values(&["_other"])
                .set(other);
        }
        let gauge = |kind: &str, v: u64| {
            self.slots
                .with_label_values(&[kind])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge("capacity", stats.capacity);
        gauge("in_flight", stats.in_flight);
        gauge("reserved", stats.reservations);
    }
}
