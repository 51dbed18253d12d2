//! The agent pool: registrations with epochs, heartbeat streams, φ-accrual failure detection,
//! drains, reservations of slots, and picking an agent by strategy. Plain Rust behind one
//! lock; the gRPC adapter only converts. Time comes from a [`Clock`], so tests drive it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentmesh_runtime::breaker::{BreakerConfig, BreakerPhase, CircuitBreaker, Permit};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::config::PoolConfig;
use crate::detector::PhiDetector;
use crate::error::SchedulerError;
use crate::events::{EventSink, NoEvents, agent_event};
use crate::select::{Candidate, Picker, Strategy};

/// Monotonic and wall time, in milliseconds.
pub trait Clock: Send + Sync {
    /// Monotonic milliseconds (any origin).
    fn now_ms(&self) -> u64;
    /// Milliseconds since the UNIX epoch.
    fn wall_ms(&self) -> u64;
}

/// The process's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock tests move by hand; wall time is `1.7e12 + now`.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.ms.fetch_add(
            u64::try_from(by.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }

    fn wall_ms(&self) -> u64 {
        1_700_000_000_000 + self.now_ms()
    }
}

/// What an agent says about itself when it registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentSpec {
    /// Stable id.
    pub agent_id: String,
    /// Kind of agent.
    pub agent_type: String,
    /// What it can do.
    pub capabilities: BTreeMap<String, String>,
    /// Free-form tags.
    pub tags: BTreeSet<String>,
    /// Slots, ≥ 1.
    pub capacity: u32,
    /// Relative weight, ≥ 1.
    pub weight: u32,
    /// Failure domain.
    pub zone: String,
    /// Where callers reach it.
    pub endpoint: String,
    /// Its version.
    pub version: String,
    /// Other labels.
    pub labels: BTreeMap<String, String>,
    /// Task types it runs (empty: it takes no tasks).
    pub task_types: BTreeSet<String>,
}

/// An agent's state in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentState {
    /// Registered, no heartbeat stream yet.
    Pending,
    /// Heartbeating; given work.
    Ready,
    /// Heartbeats overdue; no new work.
    Suspect,
    /// No new work; removed at its deadline.
    Draining,
    /// Gone; listed for a while.
    Dead,
}

impl AgentState {
    /// Every state, in order.
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Ready,
        Self::Suspect,
        Self::Draining,
        Self::Dead,
    ];

    /// Lowercase name, for metrics and stats.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Suspect => "suspect",
            Self::Draining => "draining",
            Self::Dead => "dead",
        }
    }
}

/// One heartbeat report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadReport {
    /// Increases by one per report.
    pub sequence: u64,
    /// CPU use, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory, bytes.
    pub memory_bytes: u64,
    /// Running now.
    pub active: u32,
    /// Free slots it reports.
    pub free_slots: u32,
    /// Its own mean latency, if known.
    pub latency: Option<Duration>,
    /// Errors since the last report.
    pub errors: u32,
}

/// An agent as listed.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// What it registered with.
    pub spec: AgentSpec,
    /// Its registration's epoch.
    pub epoch: u64,
    /// Its state.
    pub state: AgentState,
    /// Slots in use.
    pub in_flight: u32,
    /// Slots free.
    pub free_slots: u32,
    /// The pool's latency estimate, ms (0 = none).
    pub latency_ms: f64,
    /// Suspicion level.
    pub phi: f64,
    /// Its circuit breaker.
    pub breaker: BreakerPhase,
    /// The last report.
    pub last_report: Option<LoadReport>,
    /// Wall ms of registration.
    pub registered_wall_ms: u64,
    /// Wall ms of the last sign of life.
    pub last_seen_wall_ms: u64,
    /// Wall ms of its drain deadline, while draining.
    pub drain_deadline_wall_ms: Option<u64>,
}

/// What the pool sends down an agent's heartbeat stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamMessage {
    /// A report was received; the agent's state now.
    Ack {
        /// The report's sequence.
        sequence: u64,
        /// The agent's state.
        state: AgentState,
    },
    /// Stop taking new work; finish by the deadline (wall ms).
    Drain {
        /// Wall ms.
        deadline_wall_ms: u64,
        /// Why.
        reason: String,
    },
    /// Run one attempt of a task.
    Assign(Assignment),
    /// Stop running an attempt.
    Cancel {
        /// The task.
        task_id: String,
        /// The attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// The stream is over (fenced by a newer registration, deregistered, declared dead).
    Close(SchedulerError),
}

/// What happens to a drained agent's unfinished tasks when it leaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnExpiry {
    /// Back to their queues, the lost attempt not counted.
    #[default]
    Requeue,
    /// Cancelled.
    Cancel,
}

/// One attempt of a task, as sent to its agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The task.
    pub task_id: String,
    /// The attempt's number (1 for the first).
    pub attempt: u32,
    /// The task type.
    pub task_type: String,
    /// Its input.
    pub payload: Vec<u8>,
    /// Wall ms by which the attempt must end.
    pub deadline_wall_ms: u64,
    /// Longest silence while running, if required.
    pub heartbeat_timeout: Option<Duration>,
    /// W3C trace context of the submit.
    pub trace_context: BTreeMap<String, String>,
}

/// The label naming the tenant an agent or a task belongs to: set by the scheduler from the
/// caller's token (README "Tenants"), never trusted from a tenant's request.
pub const TENANT_LABEL: &str = "agentmesh.tenant";

/// Which tenants' agents qualify.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TenantScope {
    /// Any agent (a cluster-wide caller).
    #[default]
    Any,
    /// Only agents of this tenant (`None`: agents of no tenant).
    Only(Option<String>),
}

/// Which agents qualify.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Type, if given.
    pub agent_type: Option<String>,
    /// Capabilities with these exact values.
    pub capabilities: BTreeMap<String, String>,
    /// Tags it must all have.
    pub tags: Vec<String>,
    /// Zone, if given.
    pub zone: Option<String>,
    /// A task type the agent must run (set by the task manager, not by callers).
    pub task_type: Option<String>,
    /// Whose agents (set from the caller's token or the task's tenant, not by callers).
    pub tenant: TenantScope,
}

impl Selector {
    fn matches(&self, spec: &AgentSpec) -> bool {
        let tenant_ok = match &self.tenant {
            TenantScope::Any => true,
            TenantScope::Only(tenant) => spec.labels.get(TENANT_LABEL) == tenant.as_ref(),
        };
        tenant_ok
            && self
                .agent_type
                .as_ref()
                .is_none_or(|t| *t == spec.agent_type)
            && self
                .task_type
                .as_ref()
                .is_none_or(|t| spec.task_types.contains(t))
            && self.zone.as_ref().is_none_or(|z| *z == spec.zone)
            && self.tags.iter().all(|t| spec.tags.contains(t))
            && self
                .capabilities
                .iter()
                .all(|(k, v)| spec.capabilities.get(k) == Some(v))
    }
}

/// An AcquireAgent, decoded.
#[derive(Debug, Clone, Default)]
pub struct AcquireRequest {
    /// Which agents qualify.
    pub selector: Selector,
    /// How to pick.
    pub strategy: Strategy,
    /// For consistent hashing.
    pub affinity_key: Vec<u8>,
    /// Agents not to pick.
    pub exclude: Vec<String>,
    /// How long the slot is held.
    pub ttl: Duration,
}

/// A slot held on an agent.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// Its id (128 random bits).
    pub id: u128,
    /// The agent.
    pub agent: AgentView,
    /// Wall ms when it lapses.
    pub expires_wall_ms: u64,
}

/// How a call to an acquired agent went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    #[default]
    Success,
    /// The agent failed it.
    Failure,
    /// Not attempted, or the caller's fault: counts for nothing.
    Cancelled,
}

/// Answer to a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The registration's epoch.
    pub epoch: u64,
    /// How often to report.
    pub heartbeat_interval: Duration,
    /// Longest silence before the agent is dead.
    pub lease: Duration,
}

/// Counts over the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Agents by state.
    pub by_state: BTreeMap<&'static str, u32>,
    /// Live agents (not dead) by type.
    pub by_type: BTreeMap<String, u32>,
    /// Slots of live agents.
    pub capacity: u64,
    /// Slots in use.
    pub in_flight: u64,
    /// Open reservations.
    pub reservations: u64,
}

/// What happened on a tick, for metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Agents that became suspect.
    pub suspected: Vec<String>,
    /// Agents declared dead by the detector (silence).
    pub died: Vec<String>,
    /// Agents removed (drain deadline passed, or dead long enough).
    pub removed: Vec<String>,
    /// Reservations that lapsed.
    pub expired_reservations: usize,
}

/// Peak EWMA of latencies (Finagle's): a slower sample is taken at once, faster ones are
/// averaged in with a weight that decays over [`EWMA_DECAY`].
#[derive(Debug, Clone, Copy, Default)]
struct PeakEwma {
    value_ms: f64,
    at_ms: u64,
}

/// Time constant of the latency estimate.
const EWMA_DECAY_MS: f64 = 10_000.0;
/// A failure counts as at least this slow (ms), so fast failures do not attract work.
const FAILURE_PENALTY_MS: f64 = 1_000.0;

impl PeakEwma {
    #[allow(clippy::cast_precision_loss, reason = "ms spans are small")]
    fn observe(&mut self, sample_ms: f64, now_ms: u64) {
        if sample_ms >= self.value_ms || self.at_ms == 0 && self.value_ms == 0.0 {
            self.value_ms = sample_ms;
        } else {
            let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
            let w = (-elapsed / EWMA_DECAY_MS).exp();
            self.value_ms = self.value_ms * w + sample_ms * (1.0 - w);
        }
        self.at_ms = now_ms;
    }
}

struct AgentEntry {
    spec: AgentSpec,
    epoch: u64,
    state: AgentState,
    registered_ms: u64,
    registered_wall_ms: u64,
    last_seen_wall_ms: u64,
    detector: PhiDetector,
    /// The open heartbeat stream: its generation and its sender.
    stream: Option<(u64, mpsc::Sender<StreamMessage>)>,
    reserved: u32,
    reported_active: u32,
    last_report: Option<LoadReport>,
    latency: PeakEwma,
    breaker: Arc<CircuitBreaker>,
    /// (deadline ms, deadline wall ms).
    drain: Option<(u64, u64)>,
    on_expiry: OnExpiry,
    dead_since_ms: u64,
}

impl AgentEntry {
    fn in_flight(&self) -> u32 {
        self.reserved.max(self.reported_active)
    }

    fn free(&self) -> u32 {
        self.spec.capacity.saturating_sub(self.in_flight())
    }

    fn close_stream(&mut self, why: SchedulerError) {
        if let Some((_, tx)) = self.stream.take() {
            let _ = tx.try_send(StreamMessage::Close(why));
        }
    }

    fn notify(&self, message: StreamMessage) {
        if let Some((_, tx)) = &self.stream {
            let _ = tx.try_send(message);
        }
    }
}

struct Held {
    agent_id: String,
    epoch: u64,
    expires_ms: u64,
    permit: Option<Permit>,
}

struct State {
    agents: BTreeMap<String, AgentEntry>,
    reservations: HashMap<u128, Held>,
    picker: Picker,
    last_epoch: u64,
    next_stream: u64,
    /// Drained agents that left, for the task manager: (agent, epoch, what to do).
    drained_out: Vec<(String, u64, OnExpiry)>,
}

/// Messages buffered per heartbeat stream (acks and orders); a stream that falls behind has
/// acks dropped, never orders it cannot hold (`Close` is sent last).
pub const STREAM_BUFFER: usize = 64;

/// The pool; share it in an `Arc`.
pub struct Pool {
    events: Arc<dyn EventSink>,
    config: PoolConfig,
    clock: Arc<dyn Clock>,
    origin: Instant,
    breaker: BreakerConfig,
    state: Mutex<State>,
    /// Set once an agent of a tenant registered (never reset): placement then cannot conclude
    /// from one task that no agent of its type is free for any task.
    tenants_seen: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool.
    #[must_use]
    pub fn new(config: PoolConfig, clock: Arc<dyn Clock>) -> Self {
        let picker = Picker::new(config.slow_start);
        let last_epoch = clock.wall_ms().saturating_mul(1000);
        Self {
            events: Arc::new(NoEvents),
            config,
            clock,
            origin: Instant::now(),
            breaker: BreakerConfig {
                window: Duration::from_secs(30),
                min_calls: 10,
                failure_rate: 0.5,
                open_base: Duration::from_secs(1),
                open_max: Duration::from_secs(30),
                half_open_probes: 1,
            },
            tenants_seen: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                agents: BTreeMap::new(),
                reservations: HashMap::new(),
                picker,
                last_epoch,
                next_stream: 1,
                drained_out: Vec::new(),
            }),
        }
    }

    /// Tells `events` about agents joining, becoming suspect, dying and leaving.
    #[must_use]
    pub fn with_events(mut self, events: Arc<dyn EventSink>) -> Self {
        self.events = events;
        self
    }

    fn agent_event(&self, kind: &str, spec: &AgentSpec, epoch: u64, reason: &str) {
        self.events.emit(agent_event(
            kind,
            &spec.agent_id,
            &spec.agent_type,
            epoch,
            reason,
        ));
    }

    /// The pool's settings.
    #[must_use]
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The breakers' clock: the pool's monotonic ms as an `Instant`.
    fn instant(&self, now_ms: u64) -> Instant {
        self.origin + Duration::from_millis(now_ms)
    }

    fn registered(&self, epoch: u64) -> Registered {
        Registered {
            epoch,
            heartbeat_interval: self.config.heartbeat_interval,
            lease: self.config.lease,
        }
    }

    /// An agent as listed.
    fn view(&self, entry: &AgentEntry, now: u64) -> AgentView {
        AgentView {
            spec: entry.spec.clone(),
            epoch: entry.epoch,
            state: entry.state,
            in_flight: entry.in_flight(),
            free_slots: entry.free(),
            latency_ms: entry.latency.value_ms,
            phi: if matches!(entry.state, AgentState::Ready | AgentState::Suspect) {
                entry.detector.phi(now)
            } else {
                0.0
            },
            breaker: entry.breaker.phase(self.instant(now)),
            last_report: entry.last_report,
            registered_wall_ms: entry.registered_wall_ms,
            last_seen_wall_ms: entry.last_seen_wall_ms,
            drain_deadline_wall_ms: entry.drain.map(|(_, wall)| wall),
        }
    }

    /// Registers `spec`: `epoch` 0 starts a new epoch (fencing the old registration), another
    /// repeats that registration.
    ///
    /// # Errors
    /// `StaleEpoch` when another epoch is registered; `Full` at `max_agents`.
    pub fn register(&self, spec: AgentSpec, epoch: u64) -> Result<Registered, SchedulerError> {
        if spec.labels.contains_key(TENANT_LABEL) {
            self.tenants_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let mut state = self.state.lock();
        if let Some(existing) = state.agents.get(&spec.agent_id) {
            if epoch != 0 && existing.epoch == epoch {
                return Ok(self.registered(epoch));
            }
            if epoch != 0 {
                return Err(SchedulerError::StaleEpoch {
                    agent_id: spec.agent_id,
                    given: epoch,
                    current: existing.epoch,
                });
            }
        } else if state.agents.len() >= self.config.max_agents {
            return Err(SchedulerError::Full(format!(
                "the pool holds its maximum of {} agents",
                self.config.max_agents
            )));
        }
        let epoch = if epoch == 0 {
            state.last_epoch = state.last_epoch.max(wall.saturating_mul(1000)) + 1;
            state.last_epoch
        } else {
            epoch
        };
        let id = spec.agent_id.clone();
        if let Some(mut old) = state.agents.remove(&id) {
            old.close_stream(SchedulerError::StaleEpoch {
                agent_id: id.clone(),
                given: old.epoch,
                current: epoch,
            });
            drop_reservations(&mut state, &id);
        }
        let entry = AgentEntry {
            spec,
            epoch,
            state: AgentState::Pending,
            registered_ms: now,
            registered_wall_ms: wall,
            last_seen_wall_ms: wall,
            detector: PhiDetector::new(self.config.heartbeat_interval, self.config.min_std_dev),
            stream: None,
            reserved: 0,
            reported_active: 0,
            last_report: None,
            latency: PeakEwma::default(),
            breaker: Arc::new(CircuitBreaker::new(self.breaker.clone(), None)),
            drain: None,
            on_expiry: OnExpiry::Requeue,
            dead_since_ms: 0,
        };
        self.agent_event("joined", &entry.spec, epoch, "registered");
        state.agents.insert(id, entry);
        Ok(self.registered(epoch))
    }

    /// Removes an agent at once (`epoch` 0 = whatever is registered).
    ///
    /// # Errors
    /// `UnknownAgent`; `StaleEpoch` when another epoch is registered.
    pub fn deregister(&self, agent_id: &str, epoch: u64) -> Result<(), SchedulerError> {
        let mut state = self.state.lock();
        let entry = state
            .agents
            .get(agent_id)
            .ok_or_else(|| SchedulerError::UnknownAgent(agent_id.to_owned()))?;
        if epoch != 0 && entry.epoch != epoch {
            return Err(SchedulerError::StaleEpoch {
                agent_id: agent_id.to_owned(),
                given: epoch,
                current: entry.epoch,
            });
        }
        self.agent_event("left", &entry.spec, entry.epoch, "deregistered");
        remove(&mut state, agent_id, "deregistered");
        Ok(())
    }

    /// Opens the heartbeat stream of a registration; returns its generation and what to send
    /// the agent. A newer stream of the same registration replaces an older one.
    ///
    /// # Errors
    /// `UnknownAgent`; `StaleEpoch`.
    pub fn attach(
        &self,
        agent_id: &str,
        epoch: u64,
    ) -> Result<(u64, mpsc::Receiver<StreamMessage>), SchedulerError> {
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let mut state = self.state.lock();
        let generation = state.next_stream;
        state.next_stream += 1;
        let entry = current(&mut state, agent_id, epoch)?;
        entry.close_stream(SchedulerError::StaleEpoch {
            agent_id: agent_id.to_owned(),
            given: epoch,
            current: epoch,
        });
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        if let Some((_, deadline_wall)) = entry.drain {
            let _ = tx.try_send(StreamMessage::Drain {
                deadline_wall_ms: deadline_wall,
                reason: "draining".to_owned(),
            });
        }
        entry.stream = Some((generation, tx));
        // Report sequences count per stream: a reconnected agent starts again from 1 (the load
        // it reported last stays readable).
        if let Some(last) = entry.last_report.as_mut() {
            last.sequence = 0;
        }
        entry.detector.heartbeat(now);
        entry.last_seen_wall_ms = wall;
        if matches!(
            entry.state,
            AgentState::Pending | AgentState::Suspect | AgentState::Dead
        ) {
            entry.state = AgentState::Ready;
        }
        Ok((generation, rx))
    }

    /// Takes a heartbeat report from stream `generation` of a registration.
    ///
    /// # Errors
    /// `UnknownAgent`; `StaleEpoch` (the stream was replaced or fenced).
    pub fn report(
        &self,
        agent_id: &str,
        epoch: u64,
        generation: u64,
        report: LoadReport,
    ) -> Result<(), SchedulerError> {
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let mut state = self.state.lock();
        let entry = current(&mut state, agent_id, epoch)?;
        if entry.stream.as_ref().map(|(g, _)| *g) != Some(generation) {
            return Err(SchedulerError::StaleEpoch {
                agent_id: agent_id.to_owned(),
                given: epoch,
                current: entry.epoch,
            });
        }
        if entry
            .last_report
            .is_some_and(|last| report.sequence <= last.sequence)
        {
            return Ok(()); // an old report, overtaken
        }
        entry.detector.heartbeat(now);
        entry.last_seen_wall_ms = wall;
        entry.reported_active = report.active.min(entry.spec.capacity);
        if let Some(latency) = report.latency.filter(|l| !l.is_zero()) {
            entry.latency.observe(latency.as_secs_f64() * 1000.0, now);
        }
        entry.last_report = Some(report);
        if entry.state == AgentState::Suspect {
            entry.state = AgentState::Ready;
        }
        entry.notify(StreamMessage::Ack {
            sequence: report.sequence,
            state: entry.state,
        });
        Ok(())
    }

    /// The heartbeat stream `generation` ended: the agent is dead at once (unless a newer
    /// stream replaced it).
    pub fn stream_ended(&self, agent_id: &str, epoch: u64, generation: u64) -> bool {
        let now = self.clock.now_ms();
        let mut state = self.state.lock();
        let Some(entry) = state.agents.get_mut(agent_id) else {
            return false;
        };
        if entry.epoch != epoch || entry.stream.as_ref().map(|(g, _)| *g) != Some(generation) {
            return false;
        }
        entry.stream = None;
        if entry.state == AgentState::Draining {
            // A drained agent that stopped is done.
            self.agent_event("left", &entry.spec, epoch, "drained and stopped");
            let out = (agent_id.to_owned(), epoch, entry.on_expiry);
            state.drained_out.push(out);
            remove(&mut state, agent_id, "drained and stopped");
            return true;
        }
        entry.state = AgentState::Dead;
        entry.dead_since_ms = now;
        self.agent_event("dead", &entry.spec, epoch, "heartbeat stream ended");
        true
    }

    /// Drains an agent: no new work; removed `deadline` from now (a shorter deadline than an
    /// earlier drain's wins).
    ///
    /// # Errors
    /// `UnknownAgent`.
    pub fn drain(
        &self,
        agent_id: &str,
        deadline: Duration,
        reason: &str,
        on_expiry: OnExpiry,
    ) -> Result<AgentView, SchedulerError> {
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let mut state = self.state.lock();
        let entry = state
            .agents
            .get_mut(agent_id)
            .ok_or_else(|| SchedulerError::UnknownAgent(agent_id.to_owned()))?;
        let ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let (until, until_wall) = (now.saturating_add(ms), wall.saturating_add(ms));
        let drain = match entry.drain {
            Some((old, old_wall)) if old <= until => (old, old_wall),
            _ => (until, until_wall),
        };
        entry.drain = Some(drain);
        entry.on_expiry = on_expiry;
        if entry.state != AgentState::Dead {
            entry.state = AgentState::Draining;
        }
        entry.notify(StreamMessage::Drain {
            deadline_wall_ms: drain.1,
            reason: reason.to_owned(),
        });
        Ok(self.view(entry, now))
    }

    /// One agent.
    ///
    /// # Errors
    /// `UnknownAgent`.
    pub fn get(&self, agent_id: &str) -> Result<AgentView, SchedulerError> {
        let now = self.clock.now_ms();
        let state = self.state.lock();
        state
            .agents
            .get(agent_id)
            .map(|e| self.view(e, now))
            .ok_or_else(|| SchedulerError::UnknownAgent(agent_id.to_owned()))
    }

    /// Whether an agent of a tenant has registered here.
    #[must_use]
    pub fn tenants_seen(&self) -> bool {
        self.tenants_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Agents matching `selector` (and `only` state), ordered by id, after `after`, at most
    /// `limit`; and whether more follow.
    #[must_use]
    pub fn list(
        &self,
        selector: &Selector,
        only: Option<AgentState>,
        after: &str,
        limit: usize,
    ) -> (Vec<AgentView>, bool) {
        let now = self.clock.now_ms();
        let state = self.state.lock();
        let mut out = Vec::new();
        let range = state
            .agents
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
        for (_, entry) in range {
            if !selector.matches(&entry.spec) || only.is_some_and(|s| s != entry.state) {
                continue;
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(self.view(entry, now));
        }
        (out, false)
    }

    /// Counts over the pool.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        let state = self.state.lock();
        let mut stats = PoolStats {
            reservations: state.reservations.len() as u64,
            ..PoolStats::default()
        };
        for s in AgentState::ALL {
            stats.by_state.insert(s.as_str(), 0);
        }
        for entry in state.agents.values() {
            *stats.by_state.entry(entry.state.as_str()).or_default() += 1;
            if entry.state != AgentState::Dead {
                *stats
                    .by_type
                    .entry(entry.spec.agent_type.clone())
                    .or_default() += 1;
                stats.capacity += u64::from(entry.spec.capacity);
                stats.in_flight += u64::from(entry.in_flight());
            }
        }
        stats
    }

    /// Picks an agent for `request` and holds one of its slots.
    ///
    /// # Errors
    /// `NoAgent` when none qualifies with a free slot; `Full` at `max_reservations`.
    pub fn acquire(&self, request: &AcquireRequest) -> Result<Reservation, SchedulerError> {
        let now = self.clock.now_ms();
        let wall = self.clock.wall_ms();
        let instant = self.instant(now);
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.reservations.len() >= self.config.max_reservations {
            return Err(SchedulerError::Full(format!(
                "the pool holds its maximum of {} reservations",
                self.config.max_reservations
            )));
        }
        let matching: Vec<&AgentEntry> = state
            .agents
            .values()
            .filter(|e| {
                request.selector.matches(&e.spec) && !request.exclude.contains(&e.spec.agent_id)
            })
            .collect();
        let live = matching
            .iter()
            .filter(|e| matches!(e.state, AgentState::Ready | AgentState::Suspect))
            .count();
        let healthy = matching
            .iter()
            .filter(|e| {
                e.state == AgentState::Ready && e.breaker.phase(instant) != BreakerPhase::Open
            })
            .count();
        // Panic mode: with fewer than half healthy, suspicion and open breakers are ignored
        // rather than piling every call onto the few.
        let panic = healthy * 2 < live;
        let mut eligible: Vec<&AgentEntry> = matching
            .into_iter()
            .filter(|e| {
                e.free() > 0
                    && match e.state {
                        AgentState::Ready => {
                            panic || e.breaker.phase(instant) != BreakerPhase::Open
                        }
                        AgentState::Suspect => panic,
                        _ => false,
                    }
            })
            .collect();
        let live_total = live;
        loop {
            let candidates: Vec<Candidate<'_>> = eligible
                .iter()
                .map(|e| Candidate {
                    id: &e.spec.agent_id,
                    weight: e.spec.weight,
                    in_flight: e.in_flight(),
                    capacity: e.spec.capacity,
                    latency_ms: e.latency.value_ms,
                    age_ms: now.saturating_sub(e.registered_ms),
                })
                .collect();
            let Some(index) =
                state
                    .picker
                    .pick(request.strategy, &candidates, &request.affinity_key)
            else {
                return Err(SchedulerError::NoAgent(format!(
                    "no agent matching the selector has a free slot now ({live_total} live match it)"
                )));
            };
            let chosen = eligible[index];
            let permit = if panic {
                chosen.breaker.try_acquire(instant).ok()
            } else {
                match chosen.breaker.try_acquire(instant) {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        // Half-open with its probe out: try the others.
                        eligible.remove(index);
                        continue;
                    }
                }
            };
            let id = chosen.spec.agent_id.clone();
            let epoch = chosen.epoch;
            let ttl_ms = u64::try_from(request.ttl.as_millis()).unwrap_or(u64::MAX);
            let reservation_id = rand::random::<u128>();
            state.reservations.insert(
                reservation_id,
                Held {
                    agent_id: id.clone(),
                    epoch,
                    expires_ms: now.saturating_add(ttl_ms),
                    permit,
                },
            );
            let entry = state.agents.get_mut(&id).expect("chosen from the map");
            entry.reserved += 1;
            return Ok(Reservation {
                id: reservation_id,
                agent: self.view(entry, now),
                expires_wall_ms: wall.saturating_add(ttl_ms),
            });
        }
    }

    /// Gives a slot back with how the call went.
    ///
    /// # Errors
    /// `UnknownReservation`.
    pub fn release(
        &self,
        reservation_id: u128,
        outcome: Outcome,
        latency: Option<Duration>,
    ) -> Result<(), SchedulerError> {
        let now = self.clock.now_ms();
        let instant = self.instant(now);
        let mut state = self.state.lock();
        let held = state
            .reservations
            .remove(&reservation_id)
            .ok_or_else(|| SchedulerError::UnknownReservation(format!("{reservation_id:032x}")))?;
        let Some(entry) = state
            .agents
            .get_mut(&held.agent_id)
            .filter(|e| e.epoch == held.epoch)
        else {
            return Ok(()); // the agent left or registered again meanwhile
        };
        entry.reserved = entry.reserved.saturating_sub(1);
        let latency_ms = latency.map(|l| l.as_secs_f64() * 1000.0);
        match outcome {
            Outcome::Success => {
                if let Some(ms) = latency_ms {
                    entry.latency.observe(ms, now);
                }
            }
            Outcome::Failure => {
                let penalty = latency_ms
                    .unwrap_or(0.0)
                    .max(entry.latency.value_ms * 2.0)
                    .max(FAILURE_PENALTY_MS);
                entry.latency.observe(penalty, now);
            }
            Outcome::Cancelled => {}
        }
        if let Some(permit) = held.permit {
            match outcome {
                Outcome::Success => entry.breaker.record(permit, true, instant),
                Outcome::Failure => entry.breaker.record(permit, false, instant),
                Outcome::Cancelled => entry.breaker.forget(permit),
            }
        }
        Ok(())
    }

    /// Sends `message` down the heartbeat stream of registration (`agent_id`, `epoch`);
    /// false when it has no stream or the stream's buffer is full (the message is dropped).
    pub fn send(&self, agent_id: &str, epoch: u64, message: StreamMessage) -> bool {
        let state = self.state.lock();
        match state.agents.get(agent_id) {
            Some(entry) if entry.epoch == epoch => match &entry.stream {
                Some((_, tx)) => tx.try_send(message).is_ok(),
                None => false,
            },
            _ => false,
        }
    }

    /// For each (agent, epoch): whether that registration is still alive (registered, not
    /// dead). One lock for the whole list.
    #[must_use]
    pub fn alive(&self, agents: &[(&str, u64)]) -> Vec<bool> {
        let state = self.state.lock();
        agents
            .iter()
            .map(|(id, epoch)| {
                state
                    .agents
                    .get(*id)
                    .is_some_and(|e| e.epoch == *epoch && e.state != AgentState::Dead)
            })
            .collect()
    }

    /// Drained agents that left since the last call: (agent, epoch, what to do with their
    /// unfinished tasks).
    pub fn take_drained(&self) -> Vec<(String, u64, OnExpiry)> {
        std::mem::take(&mut self.state.lock().drained_out)
    }

    /// Per task type: live agents (READY or SUSPECT) that run it, and their slots.
    #[must_use]
    pub fn task_type_capacity(&self) -> BTreeMap<String, (u32, u64)> {
        let state = self.state.lock();
        let mut out: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        for e in state.agents.values() {
            if matches!(e.state, AgentState::Ready | AgentState::Suspect) {
                for t in &e.spec.task_types {
                    let entry = out.entry(t.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += u64::from(e.spec.capacity);
                }
            }
        }
        out
    }

    /// The task types of live agents with a free slot now (to know which pending tasks can be
    /// placed).
    #[must_use]
    pub fn task_types_with_free_slots(&self) -> BTreeSet<String> {
        let state = self.state.lock();
        state
            .agents
            .values()
            .filter(|e| e.state == AgentState::Ready && e.free() > 0)
            .flat_map(|e| e.spec.task_types.iter().cloned())
            .collect()
    }

    /// Moves time on: suspicion and death by silence, drain deadlines, removal of the long
    /// dead, lapsed reservations. Call it every 100 ms or so.
    pub fn tick(&self) -> TickReport {
        let now = self.clock.now_ms();
        let mut report = TickReport::default();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let retention_ms =
            u64::try_from(self.config.dead_retention.as_millis()).unwrap_or(u64::MAX);
        let mut gone = Vec::new();
        for (id, entry) in &mut state.agents {
            match entry.state {
                AgentState::Pending => {
                    if now.saturating_sub(entry.registered_ms) >= lease_ms {
                        entry.state = AgentState::Dead;
                        entry.dead_since_ms = now;
                        report.died.push(id.clone());
                    }
                }
                AgentState::Ready | AgentState::Suspect => {
                    let phi = entry.detector.phi(now);
                    if phi >= self.config.dead_phi || entry.detector.silence_ms(now) >= lease_ms {
                        entry.state = AgentState::Dead;
                        entry.dead_since_ms = now;
                        entry.close_stream(SchedulerError::NoAgent(
                            "heartbeats stopped: declared dead".to_owned(),
                        ));
                        report.died.push(id.clone());
                    } else if phi >= self.config.suspect_phi {
                        if entry.state == AgentState::Ready {
                            entry.state = AgentState::Suspect;
                            report.suspected.push(id.clone());
                        }
                    } else if entry.state == AgentState::Suspect {
                        entry.state = AgentState::Ready;
                    }
                }
                AgentState::Draining => {
                    if entry.drain.is_some_and(|(until, _)| now >= until) {
                        gone.push(id.clone());
                    }
                }
                AgentState::Dead => {
                    if now.saturating_sub(entry.dead_since_ms) >= retention_ms {
                        gone.push(id.clone());
                    }
                }
            }
        }
        for id in &report.suspected {
            if let Some(e) = state.agents.get(id) {
                self.agent_event("suspect", &e.spec, e.epoch, "heartbeats overdue");
            }
        }
        for id in &report.died {
            if let Some(e) = state.agents.get(id) {
                self.agent_event("dead", &e.spec, e.epoch, "heartbeats stopped");
            }
        }
        for id in gone {
            if let Some(e) = state.agents.get(&id)
                && e.state == AgentState::Draining
            {
                self.agent_event("left", &e.spec, e.epoch, "drain deadline passed");
                let out = (id.clone(), e.epoch, e.on_expiry);
                state.drained_out.push(out);
            }
            remove(state, &id, "removed");
            report.removed.push(id);
        }
        let expired: Vec<u128> = state
            .reservations
            .iter()
            .filter(|(_, h)| h.expires_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        report.expired_reservations = expired.len();
        for id in expired {
            if let Some(held) = state.reservations.remove(&id)
                && let Some(entry) = state
                    .agents
                    .get_mut(&held.agent_id)
                    .filter(|e| e.epoch == held.epoch)
            {
                entry.reserved = entry.reserved.saturating_sub(1);
                if let Some(permit) = held.permit {
                    entry.breaker.forget(permit);
                }
            }
        }
        report
    }
}

/// The entry of a registration that is current.
fn current<'a>(
    state: &'a mut State,
    agent_id: &str,
    epoch: u64,
) -> Result<&'a mut AgentEntry, SchedulerError> {
    let entry = state
        .agents
        .get_mut(agent_id)
        .ok_or_else(|| SchedulerError::UnknownAgent(agent_id.to_owned()))?;
    if entry.epoch != epoch {
        return Err(SchedulerError::StaleEpoch {
            agent_id: agent_id.to_owned(),
            given: epoch,
            current: entry.epoch,
        });
    }
    Ok(entry)
}

fn drop_reservations(state: &mut State, agent_id: &str) {
    state.reservations.retain(|_, h| h.agent_id != agent_id);
}

fn remove(state: &mut State, agent_id: &str, why: &str) {
    if let Some(mut entry) = state.agents.remove(agent_id) {
        entry.close_stream(SchedulerError::UnknownAgent(format!("{agent_id} ({why})")));
    }
    drop_reservations(state, agent_id);
    state.picker.forget(agent_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (Pool, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        (Pool::new(PoolConfig::default(), clock.clone()), clock)
    }

    fn spec(id: &str, capacity: u32) -> AgentSpec {
        AgentSpec {
            agent_id: id.into(),
            agent_type: "worker".into(),
            capacity,
            weight: 1,
            ..AgentSpec::default()
        }
    }

    fn report(sequence: u64) -> LoadReport {
        LoadReport {
            sequence,
            ..LoadReport::default()
        }
    }

    fn any() -> AcquireRequest {
        AcquireRequest {
            ttl: Duration::from_secs(60),
            ..AcquireRequest::default()
        }
    }

    #[test]
    fn test_registration_is_idempotent_and_a_new_epoch_fences_the_old_stream() {
        let (pool, _) = pool();
        let first = pool.register(spec("a", 1), 0).unwrap();
        assert_eq!(pool.register(spec("a", 1), first.epoch).unwrap(), first);
        let (generation, mut rx) = pool.attach("a", first.epoch).unwrap();
        pool.report("a", first.epoch, generation, report(1))
            .unwrap();
        assert!(matches!(
            rx.try_recv(),
            Ok(StreamMessage::Ack { sequence: 1, .. })
        ));
        let second = pool.register(spec("a", 1), 0).unwrap();
        assert!(second.epoch > first.epoch);
        assert!(matches!(
            rx.try_recv(),
            Ok(StreamMessage::Close(SchedulerError::StaleEpoch { .. }))
        ));
        assert!(matches!(
            pool.report("a", first.epoch, generation, report(2)),
            Err(SchedulerError::StaleEpoch { .. })
        ));
        assert!(matches!(
            pool.register(spec("a", 1), first.epoch),
            Err(SchedulerError::StaleEpoch { .. })
        ));
    }

    #[test]
    fn test_a_reconnected_agent_reports_from_sequence_one_again() {
        let (pool, _) = pool();
        let r = pool.register(spec("a", 1), 0).unwrap();
        let (first, _rx) = pool.attach("a", r.epoch).unwrap();
        pool.report("a", r.epoch, first, report(500)).unwrap();
        pool.stream_ended("a", r.epoch, first);
        // The same registration, a new stream: its reports count from 1 (before, they were
        // taken for old ones until they passed 500, and the agent was declared dead by
        // silence meanwhile).
        assert_eq!(pool.register(spec("a", 1), r.epoch).unwrap().epoch, r.epoch);
        let (second, mut rx) = pool.attach("a", r.epoch).unwrap();
        pool.report("a", r.epoch, second, report(1)).unwrap();
        assert!(matches!(
            rx.try_recv(),
            Ok(StreamMessage::Ack { sequence: 1, .. })
        ));
    }

    #[test]
    fn test_a_silent_agent_is_suspect_then_dead_and_a_closed_stream_is_dead_at_once() {
        let (pool, clock) = pool();
        let mut streams = Vec::new();
        for id in ["a", "z"] {
            let epoch = pool.register(spec(id, 1), 0).unwrap().epoch;
            let (generation, rx) = pool.attach(id, epoch).unwrap();
            streams.push((id, epoch, generation, rx));
        }
        for seq in 1..=10 {
            clock.advance(Duration::from_secs(1));
            for (id, epoch, generation, _) in &streams {
                pool.report(id, *epoch, *generation, report(seq)).unwrap();
            }
        }
        // "a" goes silent; "z" keeps reporting.
        let (_, z_epoch, z_generation, _) = &streams[1];
        let mut seq = 10;
        let mut step = |by: Duration| {
            clock.advance(by);
            seq += 1;
            pool.report("z", *z_epoch, *z_generation, report(seq))
                .unwrap();
        };
        step(Duration::from_millis(1300));
        pool.tick();
        assert_eq!(
            pool.get("a").unwrap().state,
            AgentState::Ready,
            "300 ms late is fine"
        );
        step(Duration::from_millis(700));
        assert_eq!(pool.tick().suspected, ["a"]);
        assert_eq!(pool.get("a").unwrap().state, AgentState::Suspect);
        for _ in 0..10 {
            let r = pool.acquire(&any()).unwrap();
            assert_eq!(r.agent.spec.agent_id, "z", "a suspect gets no new work");
            pool.release(r.id, Outcome::Cancelled, None).unwrap();
        }
        step(Duration::from_secs(1));
        step(Duration::from_secs(1));
        assert_eq!(pool.tick().died, ["a"]);

        let epoch = pool.register(spec("b", 1), 0).unwrap().epoch;
        let (generation, _rx) = pool.attach("b", epoch).unwrap();
        assert!(pool.stream_ended("b", epoch, generation));
        assert_eq!(pool.get("b").unwrap().state, AgentState::Dead);
    }

    #[test]
    fn test_slots_are_reserved_released_and_lapse() {
        let (pool, clock) = pool();
        let epoch = pool.register(spec("a", 2), 0).unwrap().epoch;
        let _stream = pool.attach("a", epoch).unwrap();
        let r1 = pool.acquire(&any()).unwrap();
        let _r2 = pool.acquire(&any()).unwrap();
        assert!(matches!(
            pool.acquire(&any()),
            Err(SchedulerError::NoAgent(_))
        ));
        pool.release(r1.id, Outcome::Success, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(pool.release(r1.id, Outcome::Success, None).is_err());
        let r3 = pool.acquire(&AcquireRequest {
            ttl: Duration::from_millis(500),
            ..any()
        });
        assert!(r3.is_ok());
        assert_eq!(pool.get("a").unwrap().in_flight, 2);
        clock.advance(Duration::from_millis(600));
        // The agent keeps heartbeating; only the short reservation lapses.
        assert_eq!(pool.tick().expired_reservations, 1);
        assert_eq!(pool.get("a").unwrap().in_flight, 1);
    }

    #[test]
    fn test_a_drained_agent_gets_no_work_and_is_removed_at_its_deadline() {
        let (pool, clock) = pool();
        let epoch = pool.register(spec("a", 4), 0).unwrap().epoch;
        let (_, mut rx) = pool.attach("a", epoch).unwrap();
        pool.drain(
            "a",
            Duration::from_secs(5),
            "maintenance",
            OnExpiry::Requeue,
        )
        .unwrap();
        assert!(matches!(rx.try_recv(), Ok(StreamMessage::Drain { .. })));
        assert!(pool.acquire(&any()).is_err());
        clock.advance(Duration::from_secs(5));
        assert_eq!(pool.tick().removed, ["a"]);
        assert!(pool.get("a").is_err());
    }

    #[test]
    fn test_selector_type_capabilities_tags_and_exclude_filter_agents() {
        let (pool, _) = pool();
        let mut gpu = spec("gpu-1", 4);
        gpu.tags.insert("gpu".into());
        gpu.capabilities.insert("model".into(), "big".into());
        for s in [gpu, spec("cpu-1", 4)] {
            let epoch = pool.register(s.clone(), 0).unwrap().epoch;
            std::mem::forget(pool.attach(&s.agent_id, epoch).unwrap());
        }
        let want_gpu = AcquireRequest {
            selector: Selector {
                tags: vec!["gpu".into()],
                capabilities: [("model".to_owned(), "big".to_owned())].into(),
                ..Selector::default()
            },
            ..any()
        };
        for _ in 0..4 {
            assert_eq!(
                pool.acquire(&want_gpu).unwrap().agent.spec.agent_id,
                "gpu-1"
            );
        }
        let not_cpu = AcquireRequest {
            exclude: vec!["cpu-1".into()],
            ..any()
        };
        assert!(matches!(
            pool.acquire(&not_cpu),
            Err(SchedulerError::NoAgent(_))
        ));
    }

    #[test]
    fn test_failures_open_an_agents_breaker_and_adaptive_moves_away() {
        let (pool, _) = pool();
        for id in ["bad", "good"] {
            let epoch = pool.register(spec(id, 100), 0).unwrap().epoch;
            std::mem::forget(pool.attach(id, epoch).unwrap());
        }
        let mut bad_picks = 0;
        for _ in 0..200 {
            let r = pool.acquire(&any()).unwrap();
            if r.agent.spec.agent_id == "bad" {
                bad_picks += 1;
                pool.release(r.id, Outcome::Failure, Some(Duration::from_millis(1)))
                    .unwrap();
            } else {
                pool.release(r.id, Outcome::Success, Some(Duration::from_millis(50)))
                    .unwrap();
            }
        }
        assert!(
            bad_picks < 20,
            "fast failures must not attract work: {bad_picks}"
        );
        // Enough failures open its breaker; then it gets nothing while another is healthy.
        let only_bad = AcquireRequest {
            exclude: vec!["good".into()],
            ..any()
        };
        while pool.get("bad").unwrap().breaker != BreakerPhase::Open {
            let r = pool.acquire(&only_bad).unwrap();
            pool.release(r.id, Outcome::Failure, None).unwrap();
        }
        for _ in 0..50 {
            let r = pool.acquire(&any()).unwrap();
            assert_eq!(r.agent.spec.agent_id, "good");
            pool.release(r.id, Outcome::Success, None).unwrap();
        }
    }
}
