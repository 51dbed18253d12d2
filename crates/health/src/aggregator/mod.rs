//! The aggregator's state: every component's computed and shown state with hysteresis, the
//! roll-up to services and the cluster, revisions with a replay ring for watchers, a bounded
//! history of transitions, uptime and check latency. Plain Rust: checks feed it
//! [`Observation`]s, the adapter reads views; time is passed in (milliseconds since the epoch).

pub mod rollup;
pub mod uptime;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::Member;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::config::{HISTORY_LEN, HealthConfig, REPLAY_LEN};
use crate::error::HealthError;
use crate::metrics::HealthMetrics;
use crate::model::{self, CLUSTER_ID, Kind, State};
use rollup::{Counts, Part, RollupRules};
use uptime::{Latencies, Uptime};

/// What a check saw.
#[derive(Debug, Clone)]
pub enum Observation {
    /// A Check (or a dependency's probe) passed.
    CheckPassed {
        /// How long it took.
        latency: Duration,
        /// What it said.
        detail: String,
    },
    /// A Check failed: an error, a timeout or NOT_SERVING.
    CheckFailed {
        /// How long it took.
        latency: Duration,
        /// Why.
        detail: String,
    },
    /// The instance's Watch stream says SERVING.
    WatchServing,
    /// The instance's Watch stream says NOT_SERVING (it is shutting down, or unwell).
    WatchNotServing,
    /// The instance's Watch stream broke or could not be opened.
    WatchBroken {
        /// Why.
        detail: String,
    },
}

/// A component as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentView {
    /// Component id.
    pub id: String,
    /// What it is.
    pub kind: Kind,
    /// Display name.
    pub name: String,
    /// Shown state (MAINTENANCE overrides the computed one).
    pub state: State,
    /// The state the checks compute.
    pub computed: State,
    /// When `state` began, ms since the epoch.
    pub since_ms: u64,
    /// Why it is not UP, root cause first.
    pub cause: String,
    /// The last check's result.
    pub detail: String,
    /// The instance's membership entry.
    pub member: Option<Member>,
    /// For an instance: its service.
    pub service: String,
    /// For a service: instances (not in maintenance) and how many serve.
    pub instances_total: u32,
    /// See `instances_total`.
    pub instances_up: u32,
    /// Uptime percent over 1 h, 24 h, 7 d (-1: not observed).
    pub uptime: [f64; 3],
    /// The last 24 hours, oldest first (-1: not observed).
    pub uptime_hours: Vec<f64>,
    /// Check latency p50 and p99.
    pub latency: Option<(Duration, Duration)>,
    /// Maintenance end (ms) and reason.
    pub maintenance: Option<(u64, String)>,
}

/// The whole cluster at one revision.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// The cluster's state.
    pub state: State,
    /// One line.
    pub summary: String,
    /// The revision.
    pub revision: u64,
    /// Components: the cluster, services with their instances, dependencies.
    pub components: Vec<ComponentView>,
}

/// What one revision changed.
#[derive(Debug, Clone)]
pub struct Delta {
    /// The revision it made.
    pub revision: u64,
    /// Components that appeared or changed.
    pub changed: Vec<ComponentView>,
    /// Ids of components that left.
    pub removed: Vec<String>,
    /// The cluster's state and summary after it.
    pub cluster_state: State,
    /// See `cluster_state`.
    pub summary: String,
}

/// A change of state.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Component id.
    pub component: String,
    /// Before.
    pub from: State,
    /// After.
    pub to: State,
    /// Why, at the time.
    pub cause: String,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// The revision it made.
    pub revision: u64,
}

/// The dependency graph: nodes (id, shown state) and edges (from needs to).
pub type Graph = (Vec<(String, State)>, Vec<(String, String)>);

/// Where a watcher starts.
pub enum WatchStart {
    /// Everything, at this revision.
    Snapshot(ClusterView),
    /// The changes after the requested revision.
    Replay(Vec<Arc<Delta>>),
}

#[derive(Default)]
struct Probe {
    ok_streak: u32,
    fail_streak: u32,
    leaving_since: Option<u64>,
}

struct Record {
    kind: Kind,
    name: String,
    service: String,
    member: Option<Member>,
    computed: State,
    cause: String,
    detail: String,
    shown: State,
    since_ms: u64,
    maintenance: Option<(u64, String)>,
    uptime: Uptime,
    latencies: Latencies,
    probe: Probe,
    counts: Counts,
}

impl Record {
    fn new(kind: Kind, name: &str, service: &str, now_ms: u64) -> Self {
        Self {
            kind,
            name: name.to_owned(),
            service: service.to_owned(),
            member: None,
            computed: State::Pending,
            cause: String::new(),
            detail: String::new(),
            shown: State::Pending,
            since_ms: now_ms,
            maintenance: None,
            uptime: Uptime::new(now_ms, State::Pending),
            latencies: Latencies::default(),
            probe: Probe::default(),
            counts: Counts::default(),
        }
    }

    fn view(&mut self, id: &str, now_ms: u64) -> ComponentView {
        self.uptime.account(now_ms);
        ComponentView {
            id: id.to_owned(),
            kind: self.kind,
            name: self.name.clone(),
            state: self.shown,
            computed: self.computed,
            since_ms: self.since_ms,
            cause: self.cause.clone(),
            detail: self.detail.clone(),
            member: self.member.clone(),
            service: self.service.clone(),
            instances_total: self.counts.total,
            instances_up: self.counts.serving,
            uptime: [
                self.uptime.last_hour(now_ms),
                self.uptime.last_hours(now_ms, 24),
                self.uptime.last_hours(now_ms, 168),
            ],
            uptime_hours: self.uptime.hour_bars(now_ms),
            latency: self.latencies.percentiles(),
            maintenance: self.maintenance.clone(),
        }
    }

    /// Applies a check's observation with hysteresis; the new computed state and cause when it
    /// changes.
    fn judge(
        &mut self,
        observation: Observation,
        config: &HealthConfig,
        now_ms: u64,
    ) -> Option<(State, String)> {
        let leaving = self
            .probe
            .leaving_since
            .is_some_and(|since| now_ms.saturating_sub(since) < duration_ms(config.leave_grace));
        let passed = |record: &mut Self| {
            record.probe.ok_streak += 1;
            record.probe.fail_streak = 0;
            record.probe.leaving_since = None;
            match record.computed {
                State::Up => None,
                State::Down if record.probe.ok_streak < config.rise => None,
                _ => Some((State::Up, String::new())),
            }
        };
        match observation {
            Observation::CheckPassed { latency, detail } => {
                self.latencies.record(latency);
                self.detail = detail;
                passed(self)
            }
            Observation::WatchServing => passed(self),
            Observation::CheckFailed { latency, detail } => {
                self.latencies.record(latency);
                self.detail.clone_from(&detail);
                self.probe.ok_streak = 0;
                self.probe.fail_streak += 1;
                if leaving || self.computed == State::Down {
                    return None;
                }
                (self.probe.fail_streak >= config.fall).then_some((State::Down, detail))
            }
            Observation::WatchNotServing => {
                self.probe.leaving_since.get_or_insert(now_ms);
                None
            }
            Observation::WatchBroken { detail } => {
                if leaving {
                    return None;
                }
                self.probe.ok_streak = 0;
                self.probe.fail_streak = self.probe.fail_streak.max(config.fall);
                (self.computed != State::Down)
                    .then(|| (State::Down, format!("health Watch stream broke: {detail}")))
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Default)]
struct Model {
    records: BTreeMap<String, Record>,
    revision: u64,
    history: VecDeque<Transition>,
    replay: VecDeque<Arc<Delta>>,
    changed: BTreeSet<String>,
    removed: Vec<String>,
    cluster_summary: String,
    /// Per service, instances that left membership while DOWN (killed, crashed, partitioned
    /// longer than the lease) since it last had a new one: a service whose last instances were
    /// lost stays DOWN instead of vanishing from view.
    lost: BTreeMap<String, u32>,
}

/// The health aggregator's state.
pub struct Aggregator {
    config: HealthConfig,
    model: Mutex<Model>,
    updates_tx: broadcast::Sender<Arc<Delta>>,
    metrics: HealthMetrics,
}

impl Aggregator {
    /// An aggregator that knows nothing yet (the cluster UNKNOWN).
    #[must_use]
    pub fn new(config: HealthConfig, metrics: HealthMetrics, now_ms: u64) -> Arc<Self> {
        let mut model = Model::default();
        let mut cluster = Record::new(Kind::Cluster, CLUSTER_ID, "", now_ms);
        cluster.computed = State::Unknown;
        cluster.shown = State::Unknown;
        model.records.insert(CLUSTER_ID.to_owned(), cluster);
        model.cluster_summary = "UNKNOWN: no service discovered yet".to_owned();
        let aggregator = Arc::new(Self {
            config,
            model: Mutex::new(model),
            updates_tx: broadcast::channel(REPLAY_LEN).0,
            metrics,
        });
        // A first roll-up: expected services exist (DOWN) before any instance registers.
        aggregator.change(now_ms, |model| {
            model.changed.insert(CLUSTER_ID.to_owned());
        });
        aggregator
    }

    /// The settings it runs with.
    #[must_use]
    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// A discovered instance (PENDING until checked); an update of its details when known.
    pub fn upsert_instance(&self, member: &Member, now_ms: u64) {
        let id = model::instance_id(&member.service, &member.instance_id);
        self.change(now_ms, |model| {
            if !model.records.contains_key(&id) {
                model.lost.remove(&member.service);
            }
            let record = model.records.entry(id.clone()).or_insert_with(|| {
                Record::new(Kind::Instance, &member.instance_id, &member.service, now_ms)
            });
            if record.member.as_ref() != Some(member) {
                record.member = Some(member.clone());
                model.changed.insert(id);
            }
        });
    }

    /// An instance that left membership: removed, not reported DOWN.
    pub fn remove_instance(&self, service: &str, instance: &str, now_ms: u64) {
        let id = model::instance_id(service, instance);
        self.change(now_ms, |model| {
            if let Some(record) = model.records.remove(&id) {
                if record.computed == State::Down && record.maintenance.is_none() {
                    *model.lost.entry(service.to_owned()).or_default() += 1;
                }
                model.changed.remove(&id);
                model.removed.push(id);
            }
        });
    }

    /// A dependency the aggregator checks ("etcd", "redis").
    pub fn add_dependency(&self, name: &str, now_ms: u64) {
        let id = model::dependency_id(name);
        self.change(now_ms, |model| {
            model
                .records
                .entry(id.clone())
                .or_insert_with(|| Record::new(Kind::Dependency, name, "", now_ms));
            model.changed.insert(id);
        });
    }

    /// Ids of the instances currently known.
    #[must_use]
    pub fn instances(&self) -> Vec<Member> {
        self.model
            .lock()
            .records
            .values()
            .filter_map(|r| r.member.clone())
            .collect()
    }

    /// Feeds one check's result. Unknown components are ignored (an instance that just left).
    pub fn observe(&self, id: &str, observation: Observation, now_ms: u64) {
        self.change(now_ms, |model| {
            let Some(record) = model.records.get_mut(id) else {
                return;
            };
            if let Some((state, cause)) = record.judge(observation, &self.config, now_ms) {
                set_computed(model, &self.metrics, id, state, cause, now_ms);
            }
        });
    }

    /// Periodic work: instances that said NOT_SERVING and did not leave within the grace
    /// period are DOWN; expired maintenance ends.
    pub fn tick(&self, now_ms: u64) {
        let grace = duration_ms(self.config.leave_grace);
        self.change(now_ms, |model| {
            let overdue: Vec<String> = model
                .records
                .iter()
                .filter(|(_, r)| {
                    r.computed != State::Down
                        && r.probe
                            .leaving_since
                            .is_some_and(|since| now_ms.saturating_sub(since) >= grace)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in overdue {
                let cause = "reported NOT_SERVING and did not leave membership".to_owned();
                set_computed(model, &self.metrics, &id, State::Down, cause, now_ms);
            }
            let expired: Vec<String> = model
                .records
                .iter()
                .filter(|(_, r)| {
                    r.maintenance
                        .as_ref()
                        .is_some_and(|(until, _)| *until <= now_ms)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                if let Some(record) = model.records.get_mut(&id) {
                    record.maintenance = None;
                }
                refresh_shown(model, &self.metrics, &id, now_ms);
            }
        });
    }

    /// Puts a component in maintenance until `until_ms` (None: ends it).
    ///
    /// # Errors
    /// `NotFound` for an unknown component; `InvalidArgument` for the cluster.
    pub fn set_maintenance(
        &self,
        id: &str,
        until: Option<(u64, String)>,
        now_ms: u64,
    ) -> Result<ComponentView, HealthError> {
        if id == CLUSTER_ID {
            return Err(HealthError::invalid(
                "component",
                "the cluster cannot be put in maintenance; name a service, an instance or a dependency",
            ));
        }
        let mut found = false;
        self.change(now_ms, |model| {
            let Some(record) = model.records.get_mut(id) else {
                return;
            };
            found = true;
            record.maintenance = until;
            model.changed.insert(id.to_owned());
            refresh_shown(model, &self.metrics, id, now_ms);
        });
        if !found {
            return Err(HealthError::NotFound(format!(
                "no component {id:?}: GetClusterHealth lists them"
            )));
        }
        self.component(id, now_ms)
            .ok_or_else(|| HealthError::NotFound(format!("no component {id:?}")))
    }

    /// One component's view.
    #[must_use]
    pub fn component(&self, id: &str, now_ms: u64) -> Option<ComponentView> {
        let mut model = self.model.lock();
        model.records.get_mut(id).map(|r| r.view(id, now_ms))
    }

    /// True when the component, or the service or instance it belongs to, is in maintenance.
    #[must_use]
    pub fn in_maintenance(&self, id: &str) -> bool {
        let model = self.model.lock();
        let held = |id: &str| {
            model
                .records
                .get(id)
                .is_some_and(|r| r.maintenance.is_some())
        };
        held(id)
            || model
                .records
                .get(id)
                .is_some_and(|r| r.kind == Kind::Instance && held(&model::service_id(&r.service)))
    }

    /// Every component's id and shown state, and the cluster's summary: the cheap read for
    /// alert evaluation (no uptime or latency is computed).
    #[must_use]
    pub fn states(&self) -> (Vec<(String, State)>, String) {
        let model = self.model.lock();
        let states = model
            .records
            .iter()
            .map(|(id, r)| (id.clone(), r.shown))
            .collect();
        (states, model.cluster_summary.clone())
    }

    /// Every component at the current revision.
    #[must_use]
    pub fn snapshot(&self, omit_instances: bool, now_ms: u64) -> ClusterView {
        let mut model = self.model.lock();
        snapshot(&mut model, omit_instances, now_ms)
    }

    /// Starts a watch after `after_revision` (0: a snapshot). The receiver carries every later
    /// change; both are taken under one lock so nothing slips between them.
    #[must_use]
    pub fn watch(
        &self,
        after_revision: u64,
        omit_instances: bool,
        now_ms: u64,
    ) -> (WatchStart, broadcast::Receiver<Arc<Delta>>) {
        let mut model = self.model.lock();
        let updates_rx = self.updates_tx.subscribe();
        let oldest = model.replay.front().map_or(u64::MAX, |d| d.revision);
        let start = if after_revision == 0
            || after_revision > model.revision
            || after_revision + 1 < oldest
        {
            WatchStart::Snapshot(snapshot(&mut model, omit_instances, now_ms))
        } else {
            WatchStart::Replay(
                model
                    .replay
                    .iter()
                    .filter(|d| d.revision > after_revision)
                    .cloned()
                    .collect(),
            )
        };
        (start, updates_rx)
    }

    /// Transitions, newest first: of one component, of ids under a prefix ending in `/`, or
    /// all (empty filter).
    #[must_use]
    pub fn history(&self, filter: &str, limit: usize) -> Vec<Transition> {
        let model = self.model.lock();
        model
            .history
            .iter()
            .rev()
            .filter(|t| {
                filter.is_empty()
                    || t.component == filter
                    || (filter.ends_with('/') && t.component.starts_with(filter))
            })
            .take(limit)
            .cloned()
            .collect()
    }

    /// Nodes (id, shown state) and edges (needs) between known components.
    #[must_use]
    pub fn graph(&self) -> Graph {
        let model = self.model.lock();
        let nodes = model
            .records
            .iter()
            .filter(|(_, r)| r.kind != Kind::Instance)
            .map(|(id, r)| (id.clone(), r.shown))
            .collect();
        let mut edges = Vec::new();
        for (id, record) in &model.records {
            match record.kind {
                Kind::Service => {
                    for need in rollup::needs(&record.name) {
                        if model.records.contains_key(*need) {
                            edges.push((id.clone(), (*need).to_owned()));
                        }
                    }
                    edges.push((CLUSTER_ID.to_owned(), id.clone()));
                }
                Kind::Dependency => edges.push((CLUSTER_ID.to_owned(), id.clone())),
                _ => {}
            }
        }
        (nodes, edges)
    }

    /// Runs `f` on the model, rolls up, and publishes what changed as one revision.
    fn change(&self, now_ms: u64, f: impl FnOnce(&mut Model)) {
        let mut model = self.model.lock();
        f(&mut model);
        if model.changed.is_empty() && model.removed.is_empty() {
            return;
        }
        roll_up(&mut model, &self.config, &self.metrics, now_ms);
        model.revision += 1;
        let revision = model.revision;
        let changed: Vec<String> = std::mem::take(&mut model.changed).into_iter().collect();
        let removed = std::mem::take(&mut model.removed);
        let views = changed
            .iter()
            .filter_map(|id| model.records.get_mut(id).map(|r| r.view(id, now_ms)))
            .collect();
        let cluster_state = model
            .records
            .get(CLUSTER_ID)
            .map_or(State::Unknown, |r| r.shown);
        let delta = Arc::new(Delta {
            revision,
            changed: views,
            removed,
            cluster_state,
            summary: model.cluster_summary.clone(),
        });
        if model.replay.len() == REPLAY_LEN {
            model.replay.pop_front();
        }
        model.replay.push_back(delta.clone());
        self.metrics
            .revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        // No receiver is fine: nobody watches.
        let _ = self.updates_tx.send(delta);
    }
}

fn snapshot(model: &mut Model, omit_instances: bool, now_ms: u64) -> ClusterView {
    let revision = model.revision;
    let summary = model.cluster_summary.clone();
    let state = model
        .records
        .get(CLUSTER_ID)
        .map_or(State::Unknown, |r| r.shown);
    // Cluster, then each service followed by its instances, then dependencies.
    let order = |r: &Record| match r.kind {
        Kind::Cluster => (0, String::new(), 0),
        Kind::Service => (1, r.name.clone(), 0),
        Kind::Instance => (1, r.service.clone(), 1),
        Kind::Dependency => (2, r.name.clone(), 0),
    };
    let mut ids: Vec<(_, String)> = model
        .records
        .iter()
        .filter(|(_, r)| !(omit_instances && r.kind == Kind::Instance))
        .map(|(id, r)| (order(r), id.clone()))
        .collect();
    ids.sort();
    let components = ids
        .into_iter()
        .filter_map(|(_, id)| model.records.get_mut(&id).map(|r| r.view(&id, now_ms)))
        .collect();
    ClusterView {
        state,
        summary,
        revision,
        components,
    }
}

/// Sets a component's computed state and cause; the shown state follows unless in maintenance.
fn set_computed(
    model: &mut Model,
    metrics: &HealthMetrics,
    id: &str,
    state: State,
    cause: String,
    now_ms: u64,
) {
    let Some(record) = model.records.get_mut(id) else {
        return;
    };
    if record.computed == state && record.cause == cause {
        return;
    }
    record.computed = state;
    record.cause = cause;
    model.changed.insert(id.to_owned());
    refresh_shown(model, metrics, id, now_ms);
}

/// Re-derives the shown state (maintenance or computed), recording a transition on a change.
fn refresh_shown(model: &mut Model, metrics: &HealthMetrics, id: &str, now_ms: u64) {
    let revision = model.revision + 1;
    let Some(record) = model.records.get_mut(id) else {
        return;
    };
    let shown = if record.maintenance.is_some() {
        State::Maintenance
    } else {
        record.computed
    };
    if shown == record.shown {
        return;
    }
    let transition = Transition {
        component: id.to_owned(),
        from: record.shown,
        to: shown,
        cause: record.cause.clone(),
        at_ms: now_ms,
        revision,
    };
    record.shown = shown;
    record.since_ms = now_ms;
    record.uptime.record(now_ms, shown);
    metrics.transition(record.kind, shown);
    tracing::info!(component = id, from = %transition.from, to = %shown, cause = %transition.cause, "health transition");
    model.changed.insert(id.to_owned());
    if model.history.len() == HISTORY_LEN {
        model.history.pop_front();
    }
    model.history.push_back(transition);
}

/// Re-derives every service (creating and removing service components as instances come and
/// go) and the cluster.
fn roll_up(model: &mut Model, config: &HealthConfig, metrics: &HealthMetrics, now_ms: u64) {
    let mut services: BTreeMap<String, Counts> = config
        .expected
        .keys()
        .chain(model.lost.keys())
        .map(|s| (s.clone(), Counts::default()))
        .collect();
    let mut states: BTreeMap<String, Vec<(State, bool)>> = BTreeMap::new();
    for record in model.records.values().filter(|r| r.kind == Kind::Instance) {
        let in_maintenance = record.maintenance.is_some();
        states
            .entry(record.service.clone())
            .or_default()
            .push((record.computed, in_maintenance));
    }
    for (service, list) in &states {
        services.insert(service.clone(), Counts::of(list.iter().copied()));
    }
    // Services with neither instances nor an expected count leave.
    let gone: Vec<String> = model
        .records
        .iter()
        .filter(|(_, r)| r.kind == Kind::Service && !services.contains_key(&r.name))
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        model.records.remove(&id);
        model.changed.remove(&id);
        model.removed.push(id);
    }
    // Twice, so a service that needs another service sees its new state.
    for _ in 0..2 {
        for (service, counts) in &services {
            let id = model::service_id(service);
            let record = model
                .records
                .entry(id.clone())
                .or_insert_with(|| Record::new(Kind::Service, service, "", now_ms));
            if record.counts != *counts {
                record.counts = *counts;
                model.changed.insert(id.clone());
            }
            let down_needs: Vec<String> = rollup::needs(service)
                .iter()
                .filter(|need| {
                    model
                        .records
                        .get(**need)
                        .is_some_and(|r| r.shown == State::Down)
                })
                .map(|need| (*need).to_owned())
                .collect();
            let lost = model.lost.get(service).copied().unwrap_or(0);
            let expected = config.expected.get(service).copied();
            let rules = RollupRules {
                min_serving: config.min_serving,
                expected: if lost > 0 {
                    Some(expected.unwrap_or(0).max(lost.min(counts.total.max(1))))
                } else {
                    expected
                },
            };
            let (state, cause) = rollup::service_state(*counts, rules, &down_needs);
            set_computed(model, metrics, &id, state, cause, now_ms);
        }
    }
    let parts: Vec<Part<'_>> = model
        .records
        .values()
        .filter(|r| matches!(r.kind, Kind::Service | Kind::Dependency))
        .map(|r| Part {
            name: &r.name,
            state: r.shown,
            cause: &r.cause,
            is_service: r.kind == Kind::Service,
        })
        .collect();
    let (state, summary) = rollup::cluster_state(&parts);
    let cause = summary
        .split_once(": ")
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_default();
    model.cluster_summary = summary;
    set_computed(model, metrics, CLUSTER_ID, state, cause, now_ms);
    metrics.set_states(
        model
            .records
            .values()
            .map(|r| (r.kind, r.name.as_str(), r.service.as_str(), r.shown)),
    );
}
