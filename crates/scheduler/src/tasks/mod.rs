//! Tasks (manager/worker): submit, late-binding assignment, attempts, retries, deadlines,
//! cancellation, watching. Plain Rust behind one lock, over the [`Pool`] (which picks the agent
//! and holds its slot) and a [`TaskStore`] (which keeps tasks across a scheduler restart).
//!
//! - **Late binding.** A task waits in its type's queue (priority, then submit order) until an
//!   agent that runs its type, matches its selector and has a free slot *now* can take it:
//!   the pool picks one by the ADAPTIVE strategy and reserves the slot, and the assignment
//!   goes down that agent's heartbeat stream. Queues are tried at submit, when a slot frees
//!   (a task of that type ends) and every tick (100 ms) for the types that have free slots.
//! - **Attempts.** Each assignment is an attempt with a number. An agent's update for another
//!   attempt than the current one (a zombie: an agent given up on that comes back) is refused
//!   and answered with a cancel, so a task ends exactly once.
//! - **Retries.** A failed attempt (the agent said so, its deadline passed, its heartbeat
//!   went silent, or its agent died) is retried on another agent (the ones tried are excluded
//!   while others qualify) after the retry policy's back-off, until `max_attempts`; a
//!   failure the agent calls not retryable ends the task at once.
//! - **Persistence.** A submit is written to the store before it is answered; every later
//!   change is written behind, in order, coalesced per task ([`writer`]). A scheduler that
//!   starts over a store with open tasks ([`Tasks::recover`]) queues them again; attempts that
//!   were running count as lost and are retried.

pub mod model;
pub mod redis_store;
pub mod store;
mod writer;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::error::SchedulerError;
use crate::events::EventSink;
use crate::metrics::TaskMetrics;
use crate::pool::{AcquireRequest, Assignment, Clock, OnExpiry, Outcome, Pool, StreamMessage};
use crate::select::Strategy;
pub use model::{AgentUpdate, Attempt, RetryPolicy, Task, TaskSpec, TaskState, UpdateKind};
pub use store::{InMemoryTaskStore, StoreError, TaskStore};
use writer::Writer;

/// How the task manager behaves.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Most tasks held in memory (ended ones are evicted first, oldest first).
    pub max_tasks: usize,
    /// Most bytes of payloads and outputs held in memory.
    pub max_bytes: usize,
    /// How long an ended task stays in memory (GetTask, ListTasks, WatchTask).
    pub retention: Duration,
    /// How long an ended task stays in the store.
    pub store_retention: Duration,
    /// How long an idempotency key names its task.
    pub idempotency_ttl: Duration,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            max_tasks: 200_000,
            max_bytes: 1 << 30,
            retention: Duration::from_secs(3600),
            store_retention: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Queue entries tried per task type per dispatch pass.
const SCAN: usize = 64;
/// Slack on a task's slot reservation beyond its start-to-close (the manager releases it
/// itself; the pool's expiry only guards against a lost release).
const RESERVATION_SLACK: Duration = Duration::from_secs(30);
/// Longest wait for a submit's write to the store.
const SUBMIT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A task and what the manager keeps beside it (monotonic times, the slot held).
struct Entry {
    task: Task,
    seq: u64,
    /// The slot held on the agent of the current attempt.
    reservation: Option<u128>,
    /// The registration of the current attempt's agent.
    agent_epoch: u64,
    /// When it last became PENDING (for the assignment latency).
    pending_since_ms: u64,
    assigned_ms: u64,
    /// Last word from the agent about the current attempt.
    heard_ms: u64,
    /// While PENDING after a failed attempt.
    not_before_ms: u64,
    /// Its schedule-to-start deadline while PENDING.
    start_by_ms: Option<u64>,
    watch: Option<watch::Sender<Task>>,
    /// The state last announced on the event bus.
    announced: TaskState,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.task.spec.payload.len() + self.task.output.len()
    }

    fn queue_key(&self) -> (Reverse<u32>, u64, String) {
        (
            Reverse(self.task.spec.priority),
            self.seq,
            self.task.id.clone(),
        )
    }
}

#[derive(Default)]
struct Inner {
    tasks: BTreeMap<String, Entry>,
    /// Ready to place, per task type: (priority, submit order, id).
    queues: HashMap<String, BTreeSet<(Reverse<u32>, u64, String)>>,
    /// Waiting out a retry back-off: (not before ms, id).
    delayed: BTreeSet<(u64, String)>,
    /// Schedule-to-start deadlines of queued tasks: (deadline ms, id).
    start_by: BTreeSet<(u64, String)>,
    /// Assigned or running.
    active: HashSet<String>,
    /// Ended, in the order they ended: (ended ms, id).
    ended: VecDeque<(u64, String)>,
    /// Idempotency key → task id, for tasks in memory.
    keys: HashMap<String, String>,
    next_seq: u64,
    bytes: usize,
}

/// What a tick did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskTickReport {
    /// Attempts given up because their agent died.
    pub agent_dead: usize,
    /// Attempts that ran out of time (start-to-close or heartbeat).
    pub timed_out: usize,
    /// Tasks that waited too long for an agent.
    pub not_started: usize,
    /// Tasks assigned.
    pub assigned: usize,
    /// Ended tasks evicted from memory.
    pub evicted: usize,
    /// Tasks of drained agents requeued or cancelled as their agent left.
    pub drained: usize,
}

/// Scaling signals of one task type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeSignals {
    /// Waiting for an agent (back-offs included).
    pub queued: u64,
    /// Assigned or running.
    pub running: u64,
    /// The oldest queued task's wait.
    pub oldest_wait: Duration,
    /// Live agents that run the type.
    pub agents: u32,
    /// Their slots.
    pub slots: u64,
    /// Agents an autoscaler should run for it.
    pub desired_agents: u32,
}

/// The task manager; share it in an `Arc`.
pub struct Tasks {
    pool: Arc<Pool>,
    clock: Arc<dyn Clock>,
    config: TaskConfig,
    store: Arc<dyn TaskStore>,
    writer: Arc<Writer>,
    inner: Mutex<Inner>,
    metrics: Option<TaskMetrics>,
    events: Arc<dyn EventSink>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A new task id: 12 hex digits of wall ms, then 20 random ones (time-ordered).
fn new_id(wall_ms: u64) -> String {
    let random = rand::random::<u128>() & ((1u128 << 80) - 1);
    format!("{:012x}{random:020x}", wall_ms & 0xffff_ffff_ffff)
}

impl Tasks {
    /// A manager over `pool` that keeps tasks in `store`; spawns its store writer.
    #[must_use]
    pub fn new(
        pool: Arc<Pool>,
        clock: Arc<dyn Clock>,
        config: TaskConfig,
        store: Arc<dyn TaskStore>,
    ) -> Self {
        let writer = Writer::start(store.clone(), config.store_retention);
        Self {
            pool,
            clock,
            config,
            store,
            writer,
            inner: Mutex::new(Inner::default()),
            metrics: None,
            events: Arc::new(crate::events::NoEvents),
        }
    }

    /// Announces task state changes on `events`.
    #[must_use]
    pub fn with_events(mut self, events: Arc<dyn EventSink>) -> Self {
        self.events = events;
        self
    }

    /// Counts into `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: TaskMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Submits a task: written to the store, queued, and placed at once if an agent can take
    /// it. With an idempotency key already held, answers the task that holds it and `true`.
    ///
    /// # Errors
    /// `Full` at the memory bounds; `Unavailable` when the store cannot be written.
    pub async fn submit(&self, spec: TaskSpec) -> Result<(Task, bool), SchedulerError> {
        let wall = self.clock.wall_ms();
        let id = new_id(wall);
        if !spec.idempotency_key.is_empty() {
            let known = self.inner.lock().keys.get(&spec.idempotency_key).cloned();
            if let Some(existing) = known {
                return Ok((self.get(&existing).await?, true));
            }
            let claimed = self
                .store
                .claim_key(&spec.idempotency_key, &id, self.config.idempotency_ttl)
                .await
                .map_err(|e| SchedulerError::Unavailable(e.to_string()))?;
            if let Some(existing) = claimed {
                match self.get(&existing).await {
                    Err(SchedulerError::UnknownTask(_)) => {
                        self.take_over_key(&spec.idempotency_key, &existing, &id, wall)
                            .await?;
                    }
                    found => return found.map(|task| (task, true)),
                }
            }
        }
        {
            let inner = self.inner.lock();
            let over = inner.tasks.len() >= self.config.max_tasks
                || inner.bytes + spec.payload.len() > self.config.max_bytes;
            if over && inner.ended.is_empty() {
                return Err(SchedulerError::Full(format!(
                    "the scheduler holds its maximum of {} tasks ({} bytes of payloads and \
                     outputs); none has ended to make room",
                    self.config.max_tasks, self.config.max_bytes
                )));
            }
        }
        let task = Task {
            id: id.clone(),
            spec,
            state: TaskState::Pending,
            attempts: Vec::new(),
            created_wall_ms: wall,
            updated_wall_ms: wall,
            progress: 0.0,
            message: String::new(),
            output: Bytes::new(),
            error: String::new(),
            not_before_wall_ms: None,
        };
        tokio::time::timeout(
            SUBMIT_WRITE_TIMEOUT,
            self.store
                .put(std::slice::from_ref(&task), self.config.store_retention),
        )
        .await
        .map_err(|_| {
            SchedulerError::Unavailable(format!(
                "task store: no answer within {SUBMIT_WRITE_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| SchedulerError::Unavailable(e.to_string()))?;
        if let Some(m) = &self.metrics {
            m.submitted(&task.spec.task_type);
        }
        let now = self.clock.now_ms();
        let mut inner = self.inner.lock();
        Self::make_room(&mut inner, &self.config, task.spec.payload.len());
        let start_by = task
            .spec
            .schedule_to_start
            .map(|d| now.saturating_add(ms(d)));
        let entry = Entry {
            seq: inner.next_seq,
            reservation: None,
            agent_epoch: 0,
            pending_since_ms: now,
            assigned_ms: 0,
            heard_ms: 0,
            not_before_ms: 0,
            start_by_ms: start_by,
            watch: None,
            announced: TaskState::Pending,
            task,
        };
        self.events.emit(crate::events::task_event(&entry.task));
        inner.next_seq += 1;
        inner.bytes += entry.bytes();
        if !entry.task.spec.idempotency_key.is_empty() {
            inner
                .keys
                .insert(entry.task.spec.idempotency_key.clone(), id.clone());
        }
        let task_type = entry.task.spec.task_type.clone();
        if let Some(at) = start_by {
            inner.start_by.insert((at, id.clone()));
        }
        inner
            .queues
            .entry(task_type.clone())
            .or_default()
            .insert(entry.queue_key());
        inner.tasks.insert(id.clone(), entry);
        self.dispatch(&mut inner, Some(&task_type), now);
        let task = inner.tasks.get(&id).map(|e| e.task.clone());
        task.map(|t| (t, false))
            .ok_or(SchedulerError::UnknownTask(id))
    }

    /// The key names task `holder`, which exists nowhere. A submitter that claimed a key either
    /// writes its task within [`SUBMIT_WRITE_TIMEOUT`] or fails; a holder older than that
    /// (ids start with their submit's wall ms) died in between (a leader killed mid-submit), and
    /// the key moves to task `id`. A younger one may still be written: retry later.
    async fn take_over_key(
        &self,
        key: &str,
        holder: &str,
        id: &str,
        wall: u64,
    ) -> Result<(), SchedulerError> {
        let submitted = holder
            .get(..12)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        let in_progress = || {
            SchedulerError::Unavailable(format!(
                "a submit with idempotency key {key:?} is in progress (task {holder}); retry"
            ))
        };
        if wall.saturating_sub(submitted) <= ms(SUBMIT_WRITE_TIMEOUT) {
            return Err(in_progress());
        }
        let moved = self
            .store
            .replace_key(key, holder, id, self.config.idempotency_ttl)
            .await
            .map_err(|e| SchedulerError::Unavailable(e.to_string()))?;
        if moved {
            tracing::info!(%key, ghost = %holder, task = %id, "idempotency key of a task never written taken over");
            Ok(())
        } else {
            Err(in_progress())
        }
    }

    /// One task: from memory, else from the store.
    ///
    /// # Errors
    /// `UnknownTask`; `Unavailable` when the store cannot be read.
    pub async fn get(&self, id: &str) -> Result<Task, SchedulerError> {
        let held = self.inner.lock().tasks.get(id).map(|e| e.task.clone());
        if let Some(task) = held {
            return Ok(task);
        }
        self.store
            .get(id)
            .await
            .map_err(|e| SchedulerError::Unavailable(e.to_string()))?
            .ok_or_else(|| SchedulerError::UnknownTask(id.to_owned()))
    }

    /// Tasks in memory, newest first, before id `before` (empty: from the newest), matching
    /// `state` and `task_type`, at most `limit`; and whether more follow.
    #[must_use]
    pub fn list(
        &self,
        state: Option<TaskState>,
        task_type: Option<&str>,
        before: &str,
        limit: usize,
    ) -> (Vec<Task>, bool) {
        let inner = self.inner.lock();
        let upper = if before.is_empty() {
            std::ops::Bound::Unbounded
        } else {
            std::ops::Bound::Excluded(before)
        };
        let mut out = Vec::new();
        for (_, entry) in inner
            .tasks
            .range::<str, _>((std::ops::Bound::Unbounded, upper))
            .rev()
        {
            if state.is_some_and(|s| s != entry.task.state)
                || task_type.is_some_and(|t| t != entry.task.spec.task_type)
            {
                continue;
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(entry.task.clone());
        }
        (out, false)
    }

    /// Per task type (with tasks or agents): the queue, the work running, the agents and the
    /// agents it would take — slots for everything running and queued, at the type's mean
    /// slots per agent (1 slot per agent when none runs it).
    #[must_use]
    pub fn signals(&self) -> BTreeMap<String, TypeSignals> {
        let now = self.clock.now_ms();
        let capacity = self.pool.task_type_capacity();
        let inner = self.inner.lock();
        let mut out: BTreeMap<String, TypeSignals> = BTreeMap::new();
        for entry in inner.tasks.values() {
            let t = &entry.task;
            let signals = out.entry(t.spec.task_type.clone()).or_default();
            match t.state {
                TaskState::Pending => {
                    signals.queued += 1;
                    let waited = Duration::from_millis(now.saturating_sub(entry.pending_since_ms));
                    signals.oldest_wait = signals.oldest_wait.max(waited);
                }
                TaskState::Assigned | TaskState::Running => signals.running += 1,
                _ => {}
            }
        }
        for (t, (agents, slots)) in capacity {
            let signals = out.entry(t).or_default();
            signals.agents = agents;
            signals.slots = slots;
        }
        for signals in out.values_mut() {
            let work = signals.queued + signals.running;
            let per_agent = if signals.agents == 0 {
                1
            } else {
                (signals.slots / u64::from(signals.agents)).max(1)
            };
            signals.desired_agents = u32::try_from(work.div_ceil(per_agent)).unwrap_or(u32::MAX);
        }
        out
    }

    /// Counts of tasks in memory by state.
    #[must_use]
    pub fn counts(&self) -> BTreeMap<TaskState, u64> {
        let inner = self.inner.lock();
        let mut out: BTreeMap<TaskState, u64> = TaskState::ALL.iter().map(|s| (*s, 0)).collect();
        for entry in inner.tasks.values() {
            *out.entry(entry.task.state).or_default() += 1;
        }
        out
    }

    /// Cancels a task that has not ended (its agent is told); an ended task is answered as
    /// it is.
    ///
    /// # Errors
    /// `UnknownTask`.
    pub fn cancel(&self, id: &str, reason: &str) -> Result<Task, SchedulerError> {
        let now = self.clock.now_ms();
        let mut inner = self.inner.lock();
        let entry = inner
            .tasks
            .get(id)
            .ok_or_else(|| SchedulerError::UnknownTask(id.to_owned()))?;
        if entry.task.state.is_terminal() {
            return Ok(entry.task.clone());
        }
        let reason = if reason.is_empty() {
            "cancelled by caller"
        } else {
            reason
        };
        self.unqueue(&mut inner, id);
        let entry = inner.tasks.get_mut(id).expect("looked up above");
        self.give_up_attempt(entry, Outcome::Cancelled, "cancelled", Some(reason));
        entry.task.error = reason.to_owned();
        self.finish(&mut inner, id, TaskState::Cancelled, now);
        Ok(inner.tasks[id].task.clone())
    }

    /// A live view of one task (in memory): the current state, then every change; the
    /// sender is dropped (the receiver ends) when the task is evicted.
    ///
    /// # Errors
    /// `UnknownTask`.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<Task>, SchedulerError> {
        let mut inner = self.inner.lock();
        let entry = inner
            .tasks
            .get_mut(id)
            .ok_or_else(|| SchedulerError::UnknownTask(id.to_owned()))?;
        let task = entry.task.clone();
        Ok(entry
            .watch
            .get_or_insert_with(|| watch::channel(task).0)
            .subscribe())
    }

    /// Takes an agent's update about an attempt. An update for an attempt that is not the
    /// task's current one on that agent is refused (counted, and the agent told to cancel).
    pub fn agent_update(&self, agent_id: &str, epoch: u64, update: AgentUpdate) {
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let mut inner = self.inner.lock();
        let current = inner.tasks.get(&update.task_id).is_some_and(|e| {
            e.task.agent_id() == Some(agent_id)
                && e.agent_epoch == epoch
                && e.task.attempt() == update.attempt
        });
        if !current {
            if let Some(m) = &self.metrics {
                m.stale_update();
            }
            tracing::debug!(agent = %agent_id, task = %update.task_id, attempt = update.attempt, "update for an attempt that is not current: refused");
            if matches!(
                update.kind,
                UpdateKind::Started | UpdateKind::Progress { .. }
            ) {
                self.pool.send(
                    agent_id,
                    epoch,
                    StreamMessage::Cancel {
                        task_id: update.task_id,
                        attempt: update.attempt,
                        reason: "stale attempt: the task moved on".to_owned(),
                    },
                );
            }
            return;
        }
        let id = update.task_id;
        let entry = inner.tasks.get_mut(&id).expect("checked above");
        entry.heard_ms = now;
        match update.kind {
            UpdateKind::Started => {
                entry.task.state = TaskState::Running;
                if let Some(a) = entry.task.attempts.last_mut() {
                    a.started_wall_ms.get_or_insert(wall);
                }
                self.changed(entry);
            }
            UpdateKind::Progress { progress, message } => {
                if entry.task.state == TaskState::Assigned {
                    entry.task.state = TaskState::Running;
                }
                if let Some(p) = progress {
                    entry.task.progress = p;
                }
                entry.task.message = message;
                self.changed(entry);
            }
            UpdateKind::Succeeded { output } => {
                let latency = Duration::from_millis(now.saturating_sub(entry.assigned_ms));
                if let Some(r) = entry.reservation.take() {
                    let _ = self.pool.release(r, Outcome::Success, Some(latency));
                }
                close_attempt(entry, wall, "succeeded");
                inner.bytes += output.len();
                let entry = inner.tasks.get_mut(&id).expect("checked above");
                entry.task.output = output;
                entry.task.progress = 1.0;
                entry.task.error.clear();
                let task_type = entry.task.spec.task_type.clone();
                self.finish(&mut inner, &id, TaskState::Succeeded, now);
                self.dispatch(&mut inner, Some(&task_type), now);
            }
            UpdateKind::Failed { message, retryable } => {
                let latency = Duration::from_millis(now.saturating_sub(entry.assigned_ms));
                if let Some(r) = entry.reservation.take() {
                    let _ = self.pool.release(r, Outcome::Failure, Some(latency));
                }
                close_attempt(entry, wall, &format!("failed: {message}"));
                let task_type = entry.task.spec.task_type.clone();
                self.retry_or_end(&mut inner, &id, retryable, &message, TaskState::Failed, now);
                self.dispatch(&mut inner, Some(&task_type), now);
            }
        }
    }

    /// Moves time on: dead agents' attempts, attempt and schedule-to-start deadlines, retry
    /// back-offs, placing queued tasks, evicting ended ones. Call it every 100 ms or so.
    pub fn tick(&self) -> TaskTickReport {
        let now = self.clock.now_ms();
        let mut report = TaskTickReport::default();
        let mut inner = self.inner.lock();
        // Drained agents that left: their unfinished tasks are requeued or cancelled.
        for (agent, epoch, on_expiry) in self.pool.take_drained() {
            report.drained += self.drained_out(&mut inner, &agent, epoch, on_expiry, now);
        }
        // Attempts whose agent died, or whose time ran out.
        let active: Vec<(String, String, u64)> = inner
            .active
            .iter()
            .filter_map(|id| {
                let e = inner.tasks.get(id)?;
                Some((id.clone(), e.task.agent_id()?.to_owned(), e.agent_epoch))
            })
            .collect();
        let alive = self.pool.alive(
            &active
                .iter()
                .map(|(_, agent, epoch)| (agent.as_str(), *epoch))
                .collect::<Vec<_>>(),
        );
        for ((id, agent, epoch), alive) in active.into_iter().zip(alive) {
            let entry = inner.tasks.get_mut(&id).expect("active tasks are held");
            let spec = &entry.task.spec;
            let overdue = now.saturating_sub(entry.assigned_ms) >= ms(spec.start_to_close);
            let silent = entry.task.state == TaskState::Running
                && spec
                    .heartbeat_timeout
                    .is_some_and(|hb| now.saturating_sub(entry.heard_ms) >= ms(hb));
            if !alive {
                report.agent_dead += 1;
                tracing::warn!(task = %id, %agent, "the agent of a task attempt died: retrying elsewhere");
                self.give_up_attempt(entry, Outcome::Failure, "agent dead", None);
                self.retry_or_end(
                    &mut inner,
                    &id,
                    true,
                    "its agent died",
                    TaskState::Failed,
                    now,
                );
            } else if overdue || silent {
                report.timed_out += 1;
                let why = if overdue {
                    "start-to-close deadline passed"
                } else {
                    "heartbeat timeout: no update from the agent"
                };
                self.pool.send(
                    &agent,
                    epoch,
                    StreamMessage::Cancel {
                        task_id: id.clone(),
                        attempt: entry.task.attempt(),
                        reason: format!("attempt timed out: {why}"),
                    },
                );
                self.give_up_attempt(entry, Outcome::Failure, &format!("timed out: {why}"), None);
                self.retry_or_end(&mut inner, &id, true, why, TaskState::TimedOut, now);
            }
        }
        // Tasks that waited too long for an agent.
        let due: Vec<String> = inner
            .start_by
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due {
            report.not_started += 1;
            self.unqueue(&mut inner, &id);
            if let Some(entry) = inner.tasks.get_mut(&id) {
                entry.task.error = "no agent could take it within its schedule-to-start".into();
            }
            self.finish(&mut inner, &id, TaskState::TimedOut, now);
        }
        // Back-offs that ended.
        let ready: Vec<(u64, String)> = inner
            .delayed
            .iter()
            .take_while(|(at, _)| *at <= now)
            .cloned()
            .collect();
        for key in ready {
            inner.delayed.remove(&key);
            if let Some(entry) = inner.tasks.get_mut(&key.1) {
                entry.task.not_before_wall_ms = None;
                entry.pending_since_ms = now;
                let (task_type, queue_key) = (entry.task.spec.task_type.clone(), entry.queue_key());
                inner.queues.entry(task_type).or_default().insert(queue_key);
            }
        }
        let before = inner.active.len();
        let types = self.pool.task_types_with_free_slots();
        for t in &types {
            if inner.queues.get(t).is_some_and(|q| !q.is_empty()) {
                self.dispatch(&mut inner, Some(t), now);
            }
        }
        report.assigned = inner.active.len().saturating_sub(before);
        report.evicted = self.evict(&mut inner, now);
        report
    }

    /// Queues again the open tasks of a store a previous scheduler left (call once, before
    /// serving). Attempts that were assigned or running are lost with that scheduler's
    /// reservations: they count as failed and are retried. Returns how many were loaded.
    ///
    /// # Errors
    /// `Unavailable` when the store cannot be read.
    pub async fn recover(&self) -> Result<usize, SchedulerError> {
        let open = self
            .store
            .open()
            .await
            .map_err(|e| SchedulerError::Unavailable(e.to_string()))?;
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let mut inner = self.inner.lock();
        let mut loaded = 0;
        let mut tasks = open;
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        for mut task in tasks {
            if inner.tasks.contains_key(&task.id) || task.state.is_terminal() {
                continue;
            }
            if matches!(task.state, TaskState::Assigned | TaskState::Running) {
                if let Some(a) = task.attempts.last_mut() {
                    a.ended_wall_ms = Some(wall);
                    a.outcome = "lost: the scheduler restarted".to_owned();
                }
                task.state = TaskState::Pending;
            }
            let not_before_ms = task
                .not_before_wall_ms
                .map_or(0, |nb| now.saturating_add(nb.saturating_sub(wall)));
            let entry = Entry {
                seq: inner.next_seq,
                reservation: None,
                agent_epoch: 0,
                pending_since_ms: now,
                assigned_ms: 0,
                heard_ms: 0,
                not_before_ms,
                start_by_ms: None,
                watch: None,
                announced: task.state,
                task,
            };
            inner.next_seq += 1;
            inner.bytes += entry.bytes();
            let id = entry.task.id.clone();
            if !entry.task.spec.idempotency_key.is_empty() {
                inner
                    .keys
                    .insert(entry.task.spec.idempotency_key.clone(), id.clone());
            }
            if not_before_ms > now {
                inner.delayed.insert((not_before_ms, id.clone()));
            } else {
                let (task_type, queue_key) = (entry.task.spec.task_type.clone(), entry.queue_key());
                inner.queues.entry(task_type).or_default().insert(queue_key);
            }
            self.writer.mark(&entry.task);
            inner.tasks.insert(id, entry);
            loaded += 1;
        }
        Ok(loaded)
    }

    /// The unfinished tasks of a drained agent that left: back to their queues (the lost
    /// attempt not counted against `max_attempts`) or cancelled.
    fn drained_out(
        &self,
        inner: &mut Inner,
        agent: &str,
        epoch: u64,
        on_expiry: OnExpiry,
        now: u64,
    ) -> usize {
        let ids: Vec<String> = inner
            .active
            .iter()
            .filter(|id| {
                inner
                    .tasks
                    .get(*id)
                    .is_some_and(|e| e.task.agent_id() == Some(agent) && e.agent_epoch == epoch)
            })
            .cloned()
            .collect();
        for id in &ids {
            let entry = inner.tasks.get_mut(id).expect("active tasks are held");
            match on_expiry {
                OnExpiry::Requeue => {
                    self.give_up_attempt(
                        entry,
                        Outcome::Cancelled,
                        "requeued: its agent's drain deadline passed",
                        None,
                    );
                    // One more attempt than the policy: the agent was taken away, not failed.
                    entry.task.spec.retry.max_attempts =
                        entry.task.spec.retry.max_attempts.saturating_add(1);
                    entry.task.state = TaskState::Pending;
                    entry.pending_since_ms = now;
                    let (task_type, key) = (entry.task.spec.task_type.clone(), entry.queue_key());
                    self.changed(entry);
                    inner.active.remove(id);
                    inner.queues.entry(task_type).or_default().insert(key);
                }
                OnExpiry::Cancel => {
                    self.give_up_attempt(
                        entry,
                        Outcome::Cancelled,
                        "cancelled: its agent's drain deadline passed",
                        None,
                    );
                    entry.task.error = "cancelled: its agent's drain deadline passed".to_owned();
                    self.finish(inner, id, TaskState::Cancelled, now);
                }
            }
        }
        ids.len()
    }

    /// Tries to place up to [`SCAN`] queued tasks of `task_type` (every type when `None`).
    fn dispatch(&self, inner: &mut Inner, task_type: Option<&str>, now: u64) {
        let types: Vec<String> = match task_type {
            Some(t) => vec![t.to_owned()],
            None => inner.queues.keys().cloned().collect(),
        };
        for t in types {
            let Some(queue) = inner.queues.get(&t) else {
                continue;
            };
            let candidates: Vec<(Reverse<u32>, u64, String)> =
                queue.iter().take(SCAN).cloned().collect();
            for key in candidates {
                let Some(entry) = inner.tasks.get_mut(&key.2) else {
                    inner.queues.get_mut(&t).map(|q| q.remove(&key));
                    continue;
                };
                match self.place(entry, now) {
                    Placed::Yes => {
                        inner.queues.get_mut(&t).map(|q| q.remove(&key));
                        if let Some(at) = entry.start_by_ms.take() {
                            inner.start_by.remove(&(at, key.2.clone()));
                        }
                        inner.active.insert(key.2);
                    }
                    // No agent of this type has a free slot: the rest of the queue cannot
                    // be placed either.
                    Placed::NoSlotForType => break,
                    Placed::NotThisOne => {}
                }
            }
            if inner.queues.get(&t).is_some_and(BTreeSet::is_empty) {
                inner.queues.remove(&t);
            }
        }
    }

    /// Picks an agent for a queued task and sends it the assignment.
    fn place(&self, entry: &mut Entry, now: u64) -> Placed {
        let spec = &entry.task.spec;
        let mut selector = spec.selector.clone();
        selector.task_type = Some(spec.task_type.clone());
        // A tenant's task runs on its tenant's agents; a task of no tenant on agents of none.
        selector.tenant =
            crate::pool::TenantScope::Only(spec.labels.get(crate::pool::TENANT_LABEL).cloned());
        let plain = selector.agent_type.is_none()
            && selector.capabilities.is_empty()
            && selector.tags.is_empty()
            && selector.zone.is_none()
            && selector.tenant == crate::pool::TenantScope::Only(None)
            && !self.pool.tenants_seen();
        let mut exclude: Vec<String> = entry
            .task
            .attempts
            .iter()
            .map(|a| a.agent_id.clone())
            .collect();
        exclude.sort();
        exclude.dedup();
        let mut request = AcquireRequest {
            selector,
            strategy: Strategy::Adaptive,
            affinity_key: Vec::new(),
            exclude,
            ttl: spec.start_to_close + RESERVATION_SLACK,
        };
        let reservation = match self.pool.acquire(&request) {
            Ok(r) => r,
            Err(_) if !request.exclude.is_empty() => {
                // Only agents tried before qualify: one of them is better than none.
                request.exclude.clear();
                match self.pool.acquire(&request) {
                    Ok(r) => r,
                    Err(_) => return Placed::NotThisOne,
                }
            }
            Err(_) if plain => return Placed::NoSlotForType,
            Err(_) => return Placed::NotThisOne,
        };
        let wall = self.clock.wall_ms();
        let number = entry.task.attempt() + 1;
        let assignment = Assignment {
            task_id: entry.task.id.clone(),
            attempt: number,
            task_type: entry.task.spec.task_type.clone(),
            payload: entry.task.spec.payload.to_vec(),
            deadline_wall_ms: wall.saturating_add(ms(entry.task.spec.start_to_close)),
            heartbeat_timeout: entry.task.spec.heartbeat_timeout,
            trace_context: entry.task.spec.trace_context.clone(),
        };
        let agent = &reservation.agent;
        if !self.pool.send(
            &agent.spec.agent_id,
            agent.epoch,
            StreamMessage::Assign(assignment),
        ) {
            // Its stream is gone or full: not this agent now.
            let _ = self.pool.release(reservation.id, Outcome::Cancelled, None);
            return Placed::NotThisOne;
        }
        if let Some(m) = &self.metrics {
            m.assigned(Duration::from_millis(
                now.saturating_sub(entry.pending_since_ms),
            ));
        }
        entry.reservation = Some(reservation.id);
        entry.agent_epoch = agent.epoch;
        entry.assigned_ms = now;
        entry.heard_ms = now;
        entry.task.state = TaskState::Assigned;
        entry.task.attempts.push(Attempt {
            number,
            agent_id: agent.spec.agent_id.clone(),
            assigned_wall_ms: wall,
            ..Attempt::default()
        });
        self.changed(entry);
        Placed::Yes
    }

    /// Ends the current attempt without the agent's word: releases its slot with `outcome`,
    /// tells the agent to stop when `cancel_reason` is given, records `why`.
    fn give_up_attempt(
        &self,
        entry: &mut Entry,
        outcome: Outcome,
        why: &str,
        cancel_reason: Option<&str>,
    ) {
        if let Some(r) = entry.reservation.take() {
            let _ = self.pool.release(r, outcome, None);
        }
        if let (Some(reason), Some(agent)) = (cancel_reason, entry.task.agent_id()) {
            self.pool.send(
                agent,
                entry.agent_epoch,
                StreamMessage::Cancel {
                    task_id: entry.task.id.clone(),
                    attempt: entry.task.attempt(),
                    reason: reason.to_owned(),
                },
            );
        }
        if matches!(entry.task.state, TaskState::Assigned | TaskState::Running) {
            close_attempt(entry, self.clock.wall_ms(), why);
        }
    }

    /// After a failed attempt: PENDING again after the back-off, or ended as `last` when no
    /// attempt is left or retrying cannot help.
    fn retry_or_end(
        &self,
        inner: &mut Inner,
        id: &str,
        retryable: bool,
        why: &str,
        last: TaskState,
        now: u64,
    ) {
        inner.active.remove(id);
        let entry = inner.tasks.get_mut(id).expect("held");
        let attempts = entry.task.attempt();
        if !retryable || attempts >= entry.task.spec.retry.max_attempts {
            entry.task.error = if retryable {
                format!(
                    "{why} (attempt {attempts} of {})",
                    entry.task.spec.retry.max_attempts
                )
            } else {
                format!("{why} (not retryable)")
            };
            self.finish(inner, id, last, now);
            return;
        }
        let wait = ms(entry.task.spec.retry.backoff(attempts));
        entry.task.state = TaskState::Pending;
        entry.task.error = why.to_owned();
        if wait == 0 {
            entry.pending_since_ms = now;
            entry.task.not_before_wall_ms = None;
            let (task_type, key) = (entry.task.spec.task_type.clone(), entry.queue_key());
            self.changed(entry);
            inner.queues.entry(task_type).or_default().insert(key);
        } else {
            entry.not_before_ms = now.saturating_add(wait);
            entry.task.not_before_wall_ms = Some(self.clock.wall_ms().saturating_add(wait));
            let at = entry.not_before_ms;
            self.changed(entry);
            inner.delayed.insert((at, id.to_owned()));
        }
    }

    /// Takes a queued or delayed task out of its queue.
    fn unqueue(&self, inner: &mut Inner, id: &str) {
        let Some(entry) = inner.tasks.get_mut(id) else {
            return;
        };
        let key = entry.queue_key();
        let task_type = entry.task.spec.task_type.clone();
        let not_before = entry.not_before_ms;
        let start_by = entry.start_by_ms.take();
        if let Some(q) = inner.queues.get_mut(&task_type) {
            q.remove(&key);
        }
        inner.delayed.remove(&(not_before, id.to_owned()));
        if let Some(at) = start_by {
            inner.start_by.remove(&(at, id.to_owned()));
        }
        inner.active.remove(id);
    }

    /// Puts a task in its terminal state.
    fn finish(&self, inner: &mut Inner, id: &str, state: TaskState, now: u64) {
        inner.active.remove(id);
        let entry = inner.tasks.get_mut(id).expect("held");
        entry.task.state = state;
        entry.task.not_before_wall_ms = None;
        if let Some(m) = &self.metrics {
            m.ended(&entry.task.spec.task_type, state);
        }
        self.changed(entry);
        inner.ended.push_back((now, id.to_owned()));
    }

    /// A task changed: stamp it, write it behind, tell its watchers.
    fn changed(&self, entry: &mut Entry) {
        entry.task.updated_wall_ms = self.clock.wall_ms();
        if entry.task.state != entry.announced {
            entry.announced = entry.task.state;
            self.events.emit(crate::events::task_event(&entry.task));
            match entry.task.state {
                TaskState::Assigned => trace_step(&entry.task, "task assigned"),
                s if s.is_terminal() => trace_step(&entry.task, "task ended"),
                _ => {}
            }
        }
        self.writer.mark(&entry.task);
        if let Some(tx) = &entry.watch {
            tx.send_replace(entry.task.clone());
        }
    }

    /// Drops ended tasks past their retention.
    fn evict(&self, inner: &mut Inner, now: u64) -> usize {
        let retention = ms(self.config.retention);
        let mut evicted = 0;
        while let Some((ended, id)) = inner.ended.front().cloned() {
            if now.saturating_sub(ended) < retention {
                break;
            }
            inner.ended.pop_front();
            if drop_ended(inner, &id) {
                evicted += 1;
            }
        }
        evicted
    }

    /// Makes room for one more task: evicts the oldest ended tasks, retention or not, while
    /// over the memory bounds.
    fn make_room(inner: &mut Inner, config: &TaskConfig, incoming: usize) {
        while (inner.tasks.len() >= config.max_tasks || inner.bytes + incoming > config.max_bytes)
            && let Some((_, id)) = inner.ended.pop_front()
        {
            drop_ended(inner, &id);
        }
    }
}

/// Forgets an ended task (and its idempotency key).
fn drop_ended(inner: &mut Inner, id: &str) -> bool {
    let Some(entry) = inner.tasks.remove(id) else {
        return false;
    };
    inner.bytes = inner.bytes.saturating_sub(entry.bytes());
    let key = &entry.task.spec.idempotency_key;
    if !key.is_empty() && inner.keys.get(key).is_some_and(|holder| holder == id) {
        inner.keys.remove(key);
    }
    true
}

/// A span of the task's trace (parented on the submit's context), recorded at once: the
/// scheduler's steps of a task (assigned, ended) appear in the submit's trace.
fn trace_step(task: &Task, name: &'static str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if task.spec.trace_context.is_empty() {
        return;
    }
    let span = tracing::info_span!(
        "scheduler.task",
        otel.name = name,
        task.id = %task.id,
        task.r#type = %task.spec.task_type,
        task.attempt = task.attempt(),
        task.state = task.state.as_str(),
        agent.id = task.attempts.last().map_or("", |a| a.agent_id.as_str()),
    );
    let _ = span.set_parent(agentmesh_runtime::propagation::extract_from_map(
        &task.spec.trace_context,
    ));
}

/// How placing a task went.
enum Placed {
    Yes,
    /// The pool has no agent of this type with a free slot (for a task without further
    /// conditions): stop scanning the type.
    NoSlotForType,
    /// Not now (its own conditions, or the agent's stream): try the next.
    NotThisOne,
}

fn close_attempt(entry: &mut Entry, wall: u64, outcome: &str) {
    if let Some(a) = entry.task.attempts.last_mut()
        && a.ended_wall_ms.is_none()
    {
        a.ended_wall_ms = Some(wall);
        a.outcome = outcome.to_owned();
    }
}

#[cfg(test)]
mod tests;
