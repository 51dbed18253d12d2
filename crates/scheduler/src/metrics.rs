//! The pool's Prometheus metrics: agents by state and type, acquisitions by result, and
//! failure detections. Labels are bounded (states, results, kinds, and types up to a cap).

use std::sync::Arc;
use std::time::Duration;

use agentmesh_runtime::metrics::BoundedLabel;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::error::SchedulerError;
use crate::pool::{PoolStats, Reservation, TickReport};
use crate::tasks::{TaskState, TypeSignals};

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

/// The task manager's metrics (cheap to clone). Task types are labelled up to
/// [`MAX_LABELLED_TYPES`] (then `_other`).
#[derive(Clone)]
pub struct TaskMetrics {
    tasks: IntGaugeVec,
    queued: IntGaugeVec,
    oldest_wait: prometheus::GaugeVec,
    desired_agents: IntGaugeVec,
    submitted: IntCounterVec,
    ended: IntCounterVec,
    stale_updates: IntCounter,
    assign_wait: Histogram,
    types: Arc<BoundedLabel>,
}

impl TaskMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered twice.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let tasks = IntGaugeVec::new(
            Opts::new("scheduler_tasks", "Tasks held in memory, by state."),
            &["state"],
        )?;
        let queued = IntGaugeVec::new(
            Opts::new(
                "scheduler_task_queue_depth",
                "Tasks waiting for an agent (retry back-offs included), by type.",
            ),
            &["type"],
        )?;
        let oldest_wait = prometheus::GaugeVec::new(
            Opts::new(
                "scheduler_task_queue_oldest_wait_seconds",
                "How long the oldest queued task of each type has waited.",
            ),
            &["type"],
        )?;
        let desired_agents = IntGaugeVec::new(
            Opts::new(
                "scheduler_desired_agents",
                "Agents of each task type an autoscaler should run: slots for the running and \
                 queued tasks at the type's mean slots per agent.",
            ),
            &["type"],
        )?;
        let submitted = IntCounterVec::new(
            Opts::new(
                "scheduler_tasks_submitted_total",
                "Tasks submitted, by type.",
            ),
            &["type"],
        )?;
        let ended = IntCounterVec::new(
            Opts::new(
                "scheduler_tasks_ended_total",
                "Tasks that reached a terminal state, by type and state.",
            ),
            &["type", "state"],
        )?;
        let stale_updates = IntCounter::new(
            "scheduler_task_stale_updates_total",
            "Agent updates refused because they were about an attempt that is not current \
             (a zombie agent, a timed-out attempt).",
        )?;
        let assign_wait = Histogram::with_opts(
            HistogramOpts::new(
                "scheduler_task_assign_seconds",
                "Time from a task becoming PENDING (submit, or a retry's back-off ending) to \
                 its assignment.",
            )
            .buckets(agentmesh_runtime::metrics::LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(oldest_wait.clone()))?;
        registry.register(Box::new(desired_agents.clone()))?;
        registry.register(Box::new(submitted.clone()))?;
        registry.register(Box::new(ended.clone()))?;
        registry.register(Box::new(stale_updates.clone()))?;
        registry.register(Box::new(assign_wait.clone()))?;
        Ok(Self {
            tasks,
            queued,
            oldest_wait,
            desired_agents,
            submitted,
            ended,
            stale_updates,
            assign_wait,
            types: Arc::new(BoundedLabel::new(MAX_LABELLED_TYPES)),
        })
    }

    pub(crate) fn submitted(&self, task_type: &str) {
        self.submitted
            .with_label_values(&[self.types.label(task_type)])
            .inc();
    }

    pub(crate) fn ended(&self, task_type: &str, state: TaskState) {
        self.ended
            .with_label_values(&[self.types.label(task_type), state.as_str()])
            .inc();
    }

    pub(crate) fn stale_update(&self) {
        self.stale_updates.inc();
    }

    pub(crate) fn assigned(&self, waited: Duration) {
        self.assign_wait.observe(waited.as_secs_f64());
    }

    /// Sets the per-type scaling gauges (types beyond the label bound are added up under
    /// `_other`).
    pub fn observe_signals(&self, signals: &std::collections::BTreeMap<String, TypeSignals>) {
        self.queued.reset();
        self.oldest_wait.reset();
        self.desired_agents.reset();
        for (t, s) in signals {
            let label = self.types.label(t);
            let add = |g: &IntGaugeVec, v: u64| {
                g.with_label_values(&[label])
                    .add(i64::try_from(v).unwrap_or(i64::MAX));
            };
            add(&self.queued, s.queued);
            add(&self.desired_agents, u64::from(s.desired_agents));
            let wait = self.oldest_wait.with_label_values(&[label]);
            wait.set(wait.get().max(s.oldest_wait.as_secs_f64()));
        }
    }

    /// Sets the tasks-by-state gauge.
    pub fn observe(&self, counts: &std::collections::BTreeMap<TaskState, u64>) {
        for (s, n) in counts {
            self.tasks
                .with_label_values(&[s.as_str()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}
