//! The rule engine: runs on the scheduler leader only.
//!
//! Enabled rules are grouped by stimulus (subject filter, types, headers); each group is one
//! subscription on the event bus in the queue group `sys-rules-<hash of the stimulus>` — the
//! same name on every leader, so a new leader resumes a durable subject where the old one
//! acknowledged. Each delivered event is evaluated against the group's rules; the responses
//! run (publish: an event whose id is the response's idempotency key, which the bus
//! deduplicates; submit task: the key is the task's idempotency key), and only then is the
//! event acknowledged (fire, then ack). A redelivered event (a failover before its ack, or a
//! response that failed) fires again, and the idempotency keys make every response happen
//! once. A response that keeps failing is retried with back-off (1 s, 5 s, 30 s) and after
//! five deliveries the bus dead-letters the stimulus on `sys.rules.deadletter`.
//!
//! A rule is indexed once per stimulus it listens to ([`CompiledRule::entries`]): its own, a
//! correlation's second one, each delayed response's cancelling one. Correlated events go
//! through the store's `correlate` (one atomic step per event); delayed responses, cascades
//! waiting for a task and `not_followed_by` timeouts are records in the [`DelayStore`], run by
//! [`Engine::run_delayed`] on whichever scheduler leads when they come due. [`Engine::step`]
//! runs one response — or records it when delayed — then its cascade, and its fallback on the
//! last try; immediate and delayed responses share it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_runtime::peers::PeerSet;
use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::{HistogramVec, IntCounterVec};
use serde_json::{Value as Json, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tracing::Instrument as _;

use super::delayed::{
    Canceller, DelayStore, Delayed, Kind, Need, Observed, Pending, Side, from_hex, to_hex,
};
use super::eval::{Variables, holds, render, stimulus_json, value_text};
use super::index::{RuleSet, plan};
use super::model::{
    CompiledAction, CompiledResponse, CompiledRule, CorrelationMode, Role, RuleError, Stimulus,
    compile,
};
use super::store::RuleStore;
use crate::error::SchedulerError;
use crate::leader::Role as Leadership;
use crate::tasks::{RetryPolicy, TaskSpec, TaskState, Tasks};

/// Subject that stimuli whose responses kept failing are dead-lettered on.
pub const DEAD_LETTER_SUBJECT: &str = "sys.rules.deadletter";
/// Firings kept for the latency percentiles, per rule.
const LATENCY_WINDOW: usize = 4096;
/// Distinct rule names given their own metric label (then `_other`).
const MAX_RULE_LABELS: usize = 256;
/// How stimuli whose responses failed are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Delays before the n-th redelivery (the last repeats); at most 16, each ≤ 1 h.
    pub backoff: Vec<Duration>,
    /// Deliveries before the bus dead-letters the stimulus (1–1000); on the last one a failing
    /// response's fallback runs.
    pub max_deliveries: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            max_deliveries: 5,
        }
    }
}
/// How often due delayed responses are looked for.
const DELAY_TICK: Duration = Duration::from_millis(100);
/// How often a cascade looks whether the task it waits for ended.
const AWAIT_POLL: Duration = Duration::from_millis(500);

/// When the bus accepted `event` (its `time`), else now; milliseconds since the Unix epoch.
fn accepted_ms(event: &bus::Event) -> u64 {
    event
        .time
        .as_ref()
        .and_then(|t| {
            Some(u64::try_from(t.seconds).ok()? * 1000 + u64::try_from(t.nanos / 1_000_000).ok()?)
        })
        .unwrap_or_else(now_ms)
}

/// Time since the bus accepted `event` (to the nanosecond; zero when it has no time).
fn since_accepted(event: &bus::Event) -> Duration {
    event
        .time
        .as_ref()
        .and_then(|t| {
            let at = UNIX_EPOCH
                + Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
            SystemTime::now().duration_since(at).ok()
        })
        .unwrap_or_default()
}

/// The W3C trace context in an event's headers.
fn trace_of(event: &bus::Event) -> BTreeMap<String, String> {
    event
        .headers
        .iter()
        .filter(|(k, _)| *k == "traceparent" || *k == "tracestate")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Longest wait for the event bus to accept a response's event.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries unacknowledged at once, per stimulus group.
const IN_FLIGHT: u32 = 64;

/// Counters of one rule since this leader was elected.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub matched: u64,
    pub fired: u64,
    pub skipped: u64,
    pub failed: u64,
    pub responses: u64,
    /// Fallbacks run (a response still failing on the stimulus's last delivery).
    pub fallbacks: u64,
    /// Stimuli taken into a correlation that has not fired.
    pub correlating: u64,
    /// Delayed responses and timeouts cancelled.
    pub cancelled: u64,
    /// Stimulus accepted by the bus → responses done, most recent last.
    latencies: VecDeque<Duration>,
}

impl Stats {
    /// The `q` quantile (0–1) of the recent latencies.
    #[must_use]
    pub fn latency(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort();
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let at = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted.get(at).copied()
    }
}

/// The engine's metrics.
#[derive(Clone, Debug)]
pub struct RuleMetrics {
    stimuli: IntCounterVec,
    responses: IntCounterVec,
    latency: HistogramVec,
    labelled: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl RuleMetrics {
    /// Registers `rules_stimuli_total{rule,outcome}`, `rules_responses_total{rule,action,result}`
    /// and `rules_fire_seconds{rule}`.
    ///
    /// # Errors
    /// When a metric is registered twice.
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let stimuli = IntCounterVec::new(
            prometheus::Opts::new(
                "rules_stimuli_total",
                "Stimuli delivered to each rule, by outcome (fired, skipped: condition false, failed: condition or response failed, correlating: taken into a correlation that has not fired, cancelled: cancelled a rule's pending delayed responses or timeouts).",
            ),
            &["rule", "outcome"],
        )?;
        let responses = IntCounterVec::new(
            prometheus::Opts::new(
                "rules_responses_total",
                "Responses run, by action (publish, submit_task, webhook) and result (ok, duplicate: done before, fallback: failed and its fallback ran, failed).",
            ),
            &["rule", "action", "result"],
        )?;
        let latency = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "rules_fire_seconds",
                "Stimulus accepted by the event bus → the rule's responses done.",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            &["rule"],
        )?;
        registry.register(Box::new(stimuli.clone()))?;
        registry.register(Box::new(responses.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self {
            stimuli,
            responses,
            latency,
            labelled: Arc::default(),
        })
    }

    fn label(&self, rule: &str) -> String {
        let mut labelled = self.labelled.lock();
        if labelled.contains(rule) || labelled.len() < MAX_RULE_LABELS {
            labelled.insert(rule.to_owned());
            rule.to_owned()
        } else {
            "_other".to_owned()
        }
    }
}

/// The rule engine of this scheduler instance.
pub struct Engine {
    store: Arc<dyn RuleStore>,
    tasks: Arc<Tasks>,
    buses: PeerSet,
    metrics: Option<RuleMetrics>,
    stats: Mutex<BTreeMap<String, Stats>>,
    leading: watch::Sender<bool>,
    firings: broadcast::Sender<Firing>,
    done: Mutex<Recent>,
    retry: RetryConfig,
    delays: Arc<dyn DelayStore>,
    /// The enabled rules by name, for delayed responses coming due.
    /// `None` until the first load: records coming due wait for it (not dropped as rules gone).
    by_name: Mutex<Option<Arc<HashMap<String, CompiledRule>>>>,
}

/// Firings that completed lately (fired or skipped), so a stimulus redelivered because
/// another rule of its group failed does not evaluate these again (their responses would
/// only be duplicates, and the statistics would count them twice). Bounded: the oldest go.
#[derive(Debug, Default)]
struct Recent {
    set: std::collections::HashSet<String>,
    order: VecDeque<String>,
}

/// Completed firings remembered.
const RECENT: usize = 65_536;

impl Recent {
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > RECENT
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

/// One firing, as `WatchFirings` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// `<rule>/<event id>`.
    pub id: String,
    pub rule: String,
    pub event_id: String,
    pub subject: String,
    /// When it was evaluated, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// fired, skipped or failed.
    pub outcome: &'static str,
    /// What each response did, e.g. `alert: publish ok: event <id>`.
    pub responses: Vec<String>,
}

/// Firings buffered for each watcher; a slower watcher misses the oldest (counted in
/// `WatchFirings` as a gap it is told about).
pub const WATCH_BUFFER: usize = 4096;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// A group's subscription task and the rules it evaluates.
struct Group {
    rules: watch::Sender<Arc<RuleSet>>,
    task: tokio::task::JoinHandle<()>,
}

/// Response events published over one PublishStream, pipelined: each call queues its request
/// and waits for its answer (the bus answers in order). Cheaper than a unary call per event
/// under load. When the stream breaks, every waiting call fails (its stimulus is redelivered).
struct Pipeline {
    sender: tokio::sync::Mutex<(mpsc::Sender<bus::PublishRequest>, Waiters)>,
}

/// The calls waiting for their answers, oldest first.
type Waiters = Arc<Mutex<VecDeque<tokio::sync::oneshot::Sender<bus::PublishResponse>>>>;

impl Pipeline {
    async fn open(
        client: &mut bus::event_bus_client::EventBusClient<
            agentmesh_runtime::client::ClientChannel,
        >,
    ) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel::<bus::PublishRequest>(1024);
        let mut answers = client
            .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let waiting: Waiters = Arc::default();
        let reader = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(answer)) = answers.next().await {
                let Some(waiter) = reader.lock().pop_front() else {
                    break;
                };
                let _ = waiter.send(answer);
            }
            // Broken: the waiting calls see their senders dropped.
            reader.lock().clear();
        });
        Ok(Self {
            sender: tokio::sync::Mutex::new((tx, waiting)),
        })
    }

    async fn publish(&self, event: bus::Event) -> Result<bus::PublishResponse, String> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        {
            let guard = self.sender.lock().await;
            guard.1.lock().push_back(done_tx);
            guard
                .0
                .send(bus::PublishRequest { event: Some(event) })
                .await
                .map_err(|_| "the publish stream closed".to_owned())?;
        }
        let answer = tokio::time::timeout(PUBLISH_TIMEOUT, done_rx)
            .await
            .map_err(|_| "the event bus did not answer in time".to_owned())?
            .map_err(|_| "the publish stream broke".to_owned())?;
        match answer.error {
            Some(e) => Err(format!("{}: {}", e.code, e.message)),
            None => Ok(answer),
        }
    }
}

/// The idempotency key of one response of one firing (at most 128 bytes: longer ones are
/// hashed).
#[must_use]
pub fn response_key(firing_id: &str, response: &str) -> String {
    let key = format!("{firing_id}/{response}");
    if key.len() <= 128 {
        key
    } else {
        format!("rules-{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
    }
}

/// The queue group of a stimulus: the same on every leader.
#[must_use]
pub fn group_name(stimulus: &Stimulus) -> String {
    let text = serde_json::to_string(stimulus).unwrap_or_default();
    format!(
        "sys-rules-{:016x}",
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    )
}

impl Engine {
    /// An engine over `store`, submitting into `tasks` and publishing through `buses`.
    #[must_use]
    pub fn new(
        store: Arc<dyn RuleStore>,
        tasks: Arc<Tasks>,
        buses: PeerSet,
        metrics: Option<RuleMetrics>,
        retry: RetryConfig,
        delays: Arc<dyn DelayStore>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            tasks,
            buses,
            metrics,
            stats: Mutex::default(),
            leading: watch::channel(false).0,
            firings: broadcast::channel(WATCH_BUFFER).0,
            done: Mutex::default(),
            retry,
            delays,
            by_name: Mutex::default(),
        })
    }

    /// Whether this instance evaluates rules now.
    #[must_use]
    pub fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Firings from now on.
    #[must_use]
    pub fn watch(&self) -> broadcast::Receiver<Firing> {
        self.firings.subscribe()
    }

    /// Each rule's counters (`name` empty: all).
    #[must_use]
    pub fn stats(&self, name: &str) -> Vec<(String, Stats)> {
        self.stats
            .lock()
            .iter()
            .filter(|(n, _)| name.is_empty() || n.as_str() == name)
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    /// Waits until `role` says this instance leads, then evaluates rules until the process
    /// ends (a leader that loses its lease exits).
    pub async fn run(self: Arc<Self>, mut role: watch::Receiver<Leadership>) {
        while *role.borrow_and_update() != Leadership::Leader {
            if role.changed().await.is_err() {
                return;
            }
        }
        self.leading.send_replace(true);
        tracing::info!("leading: evaluating reactive rules");
        tokio::spawn(self.clone().run_delayed());
        let mut changes = self.store.changes();
        let mut groups: HashMap<Stimulus, Group> = HashMap::new();
        loop {
            changes.mark_unchanged();
            match self.load().await {
                Ok(rules) => self.apply(&mut groups, plan(rules)),
                Err(e) => {
                    tracing::warn!(error = %e, "loading rules failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Enabled rules, compiled.
    async fn load(&self) -> Result<Vec<CompiledRule>, RuleError> {
        let mut rules = Vec::new();
        for stored in self.store.list().await? {
            if stored.def.disabled {
                continue;
            }
            let name = stored.def.name.clone();
            match compile(stored.def, stored.version) {
                Ok(rule) => rules.push(rule),
                Err(e) => {
                    tracing::warn!(rule = %name, error = %e, "a stored rule does not compile: not evaluated");
                }
            }
        }
        Ok(rules)
    }

    /// Starts, updates and stops group subscriptions to match `planned` (see [`plan`]).
    fn apply(
        self: &Arc<Self>,
        groups: &mut HashMap<Stimulus, Group>,
        planned: Vec<(Stimulus, Vec<CompiledRule>)>,
    ) {
        *self.by_name.lock() = Some(Arc::new(
            planned
                .iter()
                .flat_map(|(_, rules)| rules.iter())
                .filter(|r| r.role == Role::Primary)
                .map(|r| (r.def.name.clone(), r.clone()))
                .collect(),
        ));
        let mut by_stimulus: HashMap<Stimulus, Vec<CompiledRule>> = planned.into_iter().collect();
        groups.retain(|stimulus, group| {
            if let Some(rules) = by_stimulus.remove(stimulus) {
                group.rules.send_replace(Arc::new(RuleSet::new(rules)));
                true
            } else {
                group.task.abort();
                false
            }
        });
        for (stimulus, rules) in by_stimulus {
            let (tx, rx) = watch::channel(Arc::new(RuleSet::new(rules)));
            let engine = self.clone();
            let task = tokio::spawn(engine.subscribe(stimulus.clone(), rx));
            groups.insert(stimulus, Group { rules: tx, task });
        }
    }

    /// One group's subscription, reopened (on any event bus member) whenever it breaks.
    async fn subscribe(self: Arc<Self>, stimulus: Stimulus, rules: watch::Receiver<Arc<RuleSet>>) {
        let group = group_name(&stimulus);
        let mut delay = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            if let Err(e) = self.subscribe_once(&stimulus, &group, &rules).await {
                tracing::warn!(subject = %stimulus.subject, group = %group, error = %e, "rule subscription interrupted; reopening");
            }
            if started.elapsed() > Duration::from_secs(10) {
                delay = Duration::from_millis(200);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscribe_once(
        &self,
        stimulus: &Stimulus,
        group: &str,
        rules: &watch::Receiver<Arc<RuleSet>>,
    ) -> Result<(), String> {
        let channel = self.bus_channel()?;
        let mut client = bus::event_bus_client::EventBusClient::new(channel.clone());
        let (tx, rx) = mpsc::channel::<bus::SubscribeRequest>(256);
        let open = bus::SubscribeOpen {
            subject: stimulus.subject.clone(),
            queue_group: group.to_owned(),
            types: stimulus.types.clone(),
            headers: stimulus.headers.clone().into_iter().collect(),
            max_in_flight: IN_FLIGHT,
            // Long enough for the slowest firing (a cascade of webhooks runs inline); a leader
            // that dies ends the subscription, and the bus redelivers at once then.
            ack_wait: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            max_deliveries: self.retry.max_deliveries,
            backoff: self
                .retry
                .backoff
                .iter()
                .map(|d| prost_types::Duration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(3600),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                })
                .collect(),
            dead_letter_subject: DEAD_LETTER_SUBJECT.to_owned(),
            ..bus::SubscribeOpen::default()
        };
        tx.send(bus::SubscribeRequest {
            kind: Some(bus::subscribe_request::Kind::Open(open)),
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut stream = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let publisher =
            Pipeline::open(&mut bus::event_bus_client::EventBusClient::new(channel)).await?;
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let Some(bus::subscribe_response::Kind::Deliveries(batch)) = message.kind else {
                continue;
            };
            // The batch's stimuli fire concurrently; one Ack for those done, a Nak each for
            // the others.
            let current = rules.borrow().clone();
            let outcomes = futures::future::join_all(batch.deliveries.into_iter().filter_map(|delivery| {
                let event = delivery.event?;
                let last_try = delivery.delivery_count >= self.retry.max_deliveries;
                let (current, publisher) = (&current, &publisher);
                Some(async move {
                    let outcome = self.fire(current, &event, publisher, last_try).await;
                    if let Err(e) = &outcome {
                        tracing::warn!(event = %event.id, subject = %event.subject, attempt = delivery.delivery_count, error = %e, "a rule's response failed; the stimulus will be redelivered");
                    }
                    (delivery.delivery_id, outcome.is_ok())
                })
            }))
            .await;
            let done: Vec<u64> = outcomes
                .iter()
                .filter(|(_, ok)| *ok)
                .map(|(id, _)| *id)
                .collect();
            if !done.is_empty() {
                tx.send(bus::SubscribeRequest {
                    kind: Some(bus::subscribe_request::Kind::Ack(bus::Ack {
                        delivery_ids: done,
                    })),
                })
                .await
                .map_err(|e| e.to_string())?;
            }
            for (id, _) in outcomes.iter().filter(|(_, ok)| !*ok) {
                tx.send(bus::SubscribeRequest {
                    kind: Some(bus::subscribe_request::Kind::Nak(bus::Nak {
                        delivery_id: *id,
                        delay: None,
                    })),
                })
                .await
                .map_err(|e| e.to_string())?;
            }
        }
        Err("the event bus closed the subscription".to_owned())
    }

    /// Evaluates `rules` for one event and runs the responses of those that fire. `Err` when a
    /// response failed (the event is then redelivered; responses already done are not repeated).
    async fn fire(
        &self,
        set: &RuleSet,
        event: &bus::Event,
        publisher: &Pipeline,
        last_try: bool,
    ) -> Result<(), String> {
        let vars = Variables::new(event);
        let mut failure = None;
        for (index, fires) in set.decide(&vars, event) {
            let rule = &set.rules()[index];
            let name = &rule.def.name;
            let entry_id = entry_id(rule, &event.id);
            if self.done.lock().contains(&entry_id) {
                continue;
            }
            let label = self.label(name);
            let mut out = Outcome::default();
            let outcome = match fires {
                Ok(false) => "skipped",
                Err(e) => {
                    tracing::warn!(rule = %name, event = %event.id, error = %e, "a rule's condition failed to evaluate");
                    out.notes.push(format!("condition: {e}"));
                    "failed"
                }
                Ok(true) => {
                    self.evaluate(rule, event, &vars, publisher, last_try, &label, &mut out)
                        .await
                }
            };
            // A condition that fails to evaluate fails the same way on a redelivery: only a
            // failed response has the stimulus delivered again.
            if let Some(e) = out.failed.take() {
                failure = Some(e);
            } else if outcome != "failed" {
                self.done.lock().insert(entry_id);
            }
            // An event of a cancelling or follow stimulus that had nothing to cancel is not
            // the rule's stimulus: not counted, not shown.
            if outcome == "skipped" && matches!(rule.role, Role::Cancel(_) | Role::Follow) {
                continue;
            }
            let latency = (outcome == "fired").then(|| since_accepted(event));
            self.record(
                name,
                &label,
                format!("{name}/{}", event.id),
                event,
                outcome,
                &out,
                latency,
            );
        }
        failure.map_or(Ok(()), Err)
    }

    /// What one entry of a rule does with an event whose condition held: its outcome.
    #[allow(clippy::too_many_arguments)]
    async fn evaluate(
        &self,
        rule: &CompiledRule,
        event: &bus::Event,
        vars: &Variables,
        publisher: &Pipeline,
        last_try: bool,
        label: &str,
        out: &mut Outcome,
    ) -> &'static str {
        let name = &rule.def.name;
        let correlation = rule.correlation.as_ref();
        // The key an event has in a correlation or a cancelling stimulus.
        let key_of = |program: &Arc<cel::Program>| {
            value_text(program, &vars.for_condition(name)).map_err(|e| format!("key: {e}"))
        };
        match (&rule.role, correlation) {
            (Role::Cancel(response), _) => {
                let Some(cancel) = rule.find(response).and_then(|r| r.cancel.as_ref()) else {
                    return "skipped";
                };
                match key_of(&cancel.key) {
                    // An event without the key cancels nothing.
                    Err(e) => {
                        out.notes.push(format!("cancel {response}: {e}"));
                        "skipped"
                    }
                    Ok(key) => {
                        self.cancel(name, &format!("{name}/{response}/{key}"), event, out)
                            .await
                    }
                }
            }
            (Role::Follow, Some(c)) => match key_of(&c.key) {
                Err(e) => {
                    out.notes.push(format!("not_followed_by: {e}"));
                    "skipped"
                }
                Ok(key) => self.cancel(name, &follow_key(name, &key), event, out).await,
            },
            (Role::Primary | Role::Together, Some(c)) => {
                let key = match key_of(&c.key) {
                    Ok(key) => key,
                    Err(e) => {
                        out.notes.push(format!("correlation {e}"));
                        return "skipped";
                    }
                };
                if c.mode != CorrelationMode::NotFollowedBy {
                    return self
                        .correlate(rule, c, &key, event, vars, publisher, last_try, label, out)
                        .await;
                }
                let record = Delayed {
                    vars: json!({"correlation": {"key": key, "count": 1, "events": [event.id]}})
                        .to_string(),
                    cancel: follow_key(name, &key),
                    ..delayed(
                        event,
                        response_key(&format!("{name}/{}", event.id), "#timeout"),
                        name,
                        "",
                        Kind::Timeout,
                        accepted_ms(event) + millis(c.window),
                    )
                };
                match self.delays.add(record).await {
                    Ok(_) => {
                        out.notes.push(format!(
                            "waiting {} ms for what follows {key}",
                            c.window.as_millis()
                        ));
                        self.stats
                            .lock()
                            .entry(name.clone())
                            .or_default()
                            .correlating += 1;
                        "correlating"
                    }
                    Err(e) => {
                        out.failed = Some(format!("{name}: scheduling its timeout: {e}"));
                        "failed"
                    }
                }
            }
            _ => {
                self.run_responses(
                    rule,
                    event,
                    vars,
                    json!({}),
                    publisher,
                    last_try,
                    label,
                    out,
                )
                .await
            }
        }
    }

    /// Offers `event` to its correlation key (a count or together correlation); fires the
    /// rule when that completes it.
    #[allow(clippy::too_many_arguments)]
    async fn correlate(
        &self,
        rule: &CompiledRule,
        c: &super::model::CompiledCorrelation,
        key: &str,
        event: &bus::Event,
        vars: &Variables,
        publisher: &Pipeline,
        last_try: bool,
        label: &str,
        out: &mut Outcome,
    ) -> &'static str {
        let name = &rule.def.name;
        let observed = Observed {
            rule: name,
            key,
            event_id: &event.id,
            side: if rule.role == Role::Together {
                Side::Second
            } else {
                Side::First
            },
            at_ms: accepted_ms(event),
            window_ms: millis(c.window),
            need: match c.mode {
                CorrelationMode::Count(n) => Need::Count(n),
                _ => Need::Both,
            },
        };
        match self.delays.correlate(observed).await {
            Err(e) => {
                out.failed = Some(format!("{name}: correlation: {e}"));
                "failed"
            }
            Ok(ids) if ids.is_empty() => {
                out.notes.push(format!("correlating {key}"));
                self.stats
                    .lock()
                    .entry(name.clone())
                    .or_default()
                    .correlating += 1;
                "correlating"
            }
            Ok(ids) => {
                let extra = json!({"correlation": {"key": key, "count": ids.len(), "events": ids}});
                self.run_responses(rule, event, vars, extra, publisher, last_try, label, out)
                    .await
            }
        }
    }

    /// Cancels what is indexed under `cancel`: "cancelled", or "skipped" when nothing was.
    async fn cancel(
        &self,
        rule: &str,
        cancel: &str,
        event: &bus::Event,
        out: &mut Outcome,
    ) -> &'static str {
        let by = Canceller {
            event_id: &event.id,
            at_ms: accepted_ms(event),
        };
        match self.delays.cancel(cancel, by).await {
            Ok(removed) if removed.is_empty() => "skipped",
            Ok(removed) => {
                self.stats
                    .lock()
                    .entry(rule.to_owned())
                    .or_default()
                    .cancelled += removed.len() as u64;
                out.notes
                    .extend(removed.iter().map(|d| format!("cancelled {}", d.key)));
                "cancelled"
            }
            Err(e) => {
                out.failed = Some(format!("{rule}: cancelling: {e}"));
                "failed"
            }
        }
    }

    /// Runs a rule's responses for `event` (its condition held): "fired" or "failed".
    #[allow(clippy::too_many_arguments)]
    async fn run_responses(
        &self,
        rule: &CompiledRule,
        event: &bus::Event,
        vars: &Variables,
        extra: Json,
        publisher: &Pipeline,
        last_try: bool,
        label: &str,
        out: &mut Outcome,
    ) -> &'static str {
        let name = &rule.def.name;
        let firing_id = format!("{name}/{}", event.id);
        // A span per firing, a child of the stimulus's trace; the responses carry its
        // context, so a tracing UI shows stimulus → rule fire → response.
        let span = tracing::info_span!(
            "rules.fire",
            otel.name = "rule fire",
            rule = %name,
            firing.id = %firing_id,
            stimulus.subject = %event.subject,
        );
        let ctx = Ctx {
            rule,
            event,
            vars,
            trace: span_trace(&span, event),
            firing_id,
            publisher,
            last_try,
            extra,
            base_ms: accepted_ms(event),
            span,
            label,
        };
        for response in &rule.responses {
            self.step(&ctx, response, None, false, out).await;
            if out.failed.is_some() {
                break;
            }
        }
        self.stats.lock().entry(name.clone()).or_default().responses += out.ran;
        if out.failed.is_some() {
            "failed"
        } else {
            "fired"
        }
    }

    /// Runs one response of a firing — or schedules it when it is delayed — then its cascade;
    /// its fallback when it fails on the last try. `due` says a delayed response came due (its
    /// guard held when it was scheduled). Failures are left in `out.failed`.
    fn step<'a>(
        &'a self,
        c: &'a Ctx<'a>,
        response: &'a CompiledResponse,
        output: Option<Json>,
        due: bool,
        out: &'a mut Outcome,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let name = &c.rule.def.name;
            let extra = c.extra_with(output.as_ref());
            let key = response_key(&c.firing_id, &response.name);
            let (guard, cancel) = if due || (response.when.is_none() && response.cancel.is_none()) {
                (Ok(true), Ok(String::new()))
            } else {
                let scope = c.vars.for_step(name, &c.firing_id, &response.name, &extra);
                let guard = match (&response.when, due) {
                    (Some(when), false) => holds(when, &scope).map_err(|e| format!("guard: {e}")),
                    _ => Ok(true),
                };
                let cancel = match &response.cancel {
                    Some(cancel) if !due => value_text(&cancel.key, &scope)
                        .map(|k| format!("{name}/{}/{k}", response.name))
                        .map_err(|e| format!("cancel key: {e}")),
                    _ => Ok(String::new()),
                };
                (guard, cancel)
            };
            match guard {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    out.notes.push(format!("{}: {e}", response.name));
                    out.failed = Some(format!("{name}: response {}: {e}", response.name));
                    return;
                }
            }
            if !due && let Some(delay) = response.delay {
                let cancel = match cancel {
                    Ok(cancel) => cancel,
                    Err(e) => {
                        out.notes.push(format!("{}: {e}", response.name));
                        out.failed = Some(format!("{name}: response {}: {e}", response.name));
                        return;
                    }
                };
                // A cascade step's delay counts from when its predecessor completed.
                let base = if output.is_some() {
                    now_ms()
                } else {
                    c.base_ms
                };
                let record = Delayed {
                    vars: vars_text(&extra),
                    cancel,
                    ..delayed(
                        c.event,
                        key.clone(),
                        name,
                        &response.name,
                        Kind::Run,
                        base + millis(delay),
                    )
                };
                match self.delays.add(record).await {
                    Ok(added) => out.notes.push(format!(
                        "{}: delayed {} ms{}",
                        response.name,
                        delay.as_millis(),
                        if added { "" } else { " (scheduled before)" }
                    )),
                    Err(e) => {
                        out.notes
                            .push(format!("{}: scheduling failed: {e}", response.name));
                        out.failed = Some(format!(
                            "{name}: response {}: scheduling: {e}",
                            response.name
                        ));
                    }
                }
                return;
            }
            let done = match self.act(c, response, &key, &extra).await {
                Ok(done) => done,
                Err((action, e)) => {
                    match (&response.fallback, c.last_try) {
                        // Its retries are spent: the fallback runs instead.
                        (Some(fallback), true) => {
                            let why = format!("{action} failed: {e}");
                            self.fallback(
                                c,
                                response,
                                fallback,
                                json!({"error": e}),
                                &why,
                                action,
                                out,
                            )
                            .await;
                        }
                        _ => {
                            out.notes
                                .push(format!("{}: {action} failed: {e}", response.name));
                            out.failed = Some(format!("{name}: response {}: {e}", response.name));
                            self.count(c.label, action, "failed");
                        }
                    }
                    return;
                }
            };
            let result = if done.duplicate { "duplicate" } else { "ok" };
            out.notes.push(format!(
                "{}: {} {result}: {}",
                response.name, done.action, done.detail
            ));
            self.count(c.label, done.action, result);
            out.ran += 1;
            if let Some(task_id) = done.task
                && (!response.then.is_empty() || response.fallback.is_some())
            {
                // Its cascade (or fallback) waits for the task to end, durably: the stimulus
                // is acknowledged meanwhile.
                let record = Delayed {
                    vars: vars_text(&extra),
                    ..delayed(
                        c.event,
                        format!("{key}#await"),
                        name,
                        &response.name,
                        Kind::Await {
                            task_id: task_id.clone(),
                        },
                        now_ms() + millis(AWAIT_POLL),
                    )
                };
                match self.delays.add(record).await {
                    Ok(_) => out
                        .notes
                        .push(format!("{}: awaiting task {task_id}", response.name)),
                    Err(e) => {
                        out.failed = Some(format!(
                            "{name}: response {}: recording the wait for its task: {e}",
                            response.name
                        ));
                    }
                }
                return;
            }
            for next in &response.then {
                self.step(c, next, Some(done.output.clone()), false, out)
                    .await;
                if out.failed.is_some() {
                    return;
                }
            }
        })
    }

    /// Runs `response`'s fallback (`output` is what its templates see as `output`).
    #[allow(clippy::too_many_arguments)]
    async fn fallback(
        &self,
        c: &Ctx<'_>,
        response: &CompiledResponse,
        fallback: &CompiledResponse,
        output: Json,
        why: &str,
        action: &'static str,
        out: &mut Outcome,
    ) {
        let name = &c.rule.def.name;
        let key = response_key(
            &c.firing_id,
            &format!("{}.{}", response.name, fallback.name),
        );
        let ran = self
            .act(c, fallback, &key, &c.extra_with(Some(&output)))
            .await;
        self.stats.lock().entry(name.clone()).or_default().fallbacks += 1;
        match ran {
            Ok(done) => {
                out.notes.push(format!(
                    "{}: {why}; fallback {}: {} ok: {}",
                    response.name, fallback.name, done.action, done.detail
                ));
                self.count(c.label, action, "fallback");
            }
            Err((_, e)) => {
                out.notes.push(format!(
                    "{}: {why}; fallback {} failed: {e}",
                    response.name, fallback.name
                ));
                out.failed = Some(format!(
                    "{name}: response {} and its fallback failed: {e}",
                    response.name
                ));
                self.count(c.label, action, "failed");
            }
        }
    }

    /// Runs `response`'s action in the firing's span, its templates seeing `extra`.
    async fn act(
        &self,
        c: &Ctx<'_>,
        response: &CompiledResponse,
        key: &str,
        extra: &Json,
    ) -> Result<Done, (&'static str, String)> {
        let name = &c.rule.def.name;
        let scope = c.vars.for_step(name, &c.firing_id, &response.name, extra);
        self.respond(
            name,
            &response.action,
            &scope,
            c.event,
            key,
            &c.trace,
            c.publisher,
        )
        .instrument(c.span.clone())
        .await
    }

    fn label(&self, rule: &str) -> String {
        self.metrics
            .as_ref()
            .map(|m| m.label(rule))
            .unwrap_or_default()
    }

    fn count(&self, label: &str, action: &str, result: &str) {
        if let Some(m) = &self.metrics {
            m.responses
                .with_label_values(&[label, action, result])
                .inc();
        }
    }

    /// Statistics, metrics and watchers of one firing.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        name: &str,
        label: &str,
        id: String,
        event: &bus::Event,
        outcome: &'static str,
        out: &Outcome,
        latency: Option<Duration>,
    ) {
        {
            let mut stats = self.stats.lock();
            let s = stats.entry(name.to_owned()).or_default();
            s.matched += 1;
            match outcome {
                "fired" => {
                    s.fired += 1;
                    if let Some(latency) = latency {
                        if s.latencies.len() == LATENCY_WINDOW {
                            s.latencies.pop_front();
                        }
                        s.latencies.push_back(latency);
                    }
                }
                "skipped" => s.skipped += 1,
                "failed" => s.failed += 1,
                _ => {}
            }
        }
        self.announce(name, id, event, outcome, &out.notes);
        if let Some(m) = &self.metrics {
            m.stimuli.with_label_values(&[label, outcome]).inc();
            if let Some(latency) = latency {
                m.latency
                    .with_label_values(&[label])
                    .observe(latency.as_secs_f64());
            }
        }
    }

    /// Tells the watchers about a firing.
    fn announce(
        &self,
        name: &str,
        id: String,
        event: &bus::Event,
        outcome: &'static str,
        notes: &[String],
    ) {
        if self.firings.receiver_count() > 0 {
            let _ = self.firings.send(Firing {
                id,
                rule: name.to_owned(),
                event_id: event.id.clone(),
                subject: event.subject.clone(),
                at_ms: now_ms(),
                outcome,
                responses: notes.to_vec(),
            });
        }
    }

    /// Pending delayed work of `rule`.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn delayed_pending(&self, rule: &str) -> Result<Pending, String> {
        self.delays.pending(rule).await
    }

    /// Runs delayed responses as they come due, until the process ends (leader only).
    async fn run_delayed(self: Arc<Self>) {
        let mut pipeline: Option<Pipeline> = None;
        loop {
            tokio::time::sleep(DELAY_TICK).await;
            if self.by_name.lock().is_none() {
                continue; // the rules are not loaded yet
            }
            let due = match self.delays.due(now_ms(), 256).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "reading delayed responses failed");
                    continue;
                }
            };
            if due.is_empty() {
                continue;
            }
            if pipeline.is_none() {
                pipeline = self.open_pipeline().await.ok();
            }
            let Some(p) = &pipeline else { continue };
            let results =
                futures::future::join_all(due.into_iter().map(|d| self.run_one(d, p))).await;
            if results.iter().any(|broke| *broke) {
                pipeline = None;
            }
        }
    }

    async fn open_pipeline(&self) -> Result<Pipeline, String> {
        Pipeline::open(&mut bus::event_bus_client::EventBusClient::new(
            self.bus_channel()?,
        ))
        .await
    }

    /// A channel to an event bus member.
    fn bus_channel(&self) -> Result<agentmesh_runtime::client::ClientChannel, String> {
        let member = self
            .buses
            .snapshot()
            .members
            .keys()
            .next()
            .cloned()
            .ok_or("no event bus member")?;
        let (_, channel) = self.buses.channel(&member).map_err(|e| e.to_string())?;
        Ok(channel)
    }

    /// Runs one delayed record that came due (a delayed response, a cascade waiting for its
    /// task, a `not_followed_by` timeout); whether the publish stream seems broken.
    async fn run_one(&self, mut d: Delayed, pipeline: &Pipeline) -> bool {
        let Some(rules) = self.by_name.lock().clone() else {
            return false; // not loaded yet: it stays due
        };
        let found = rules.get(&d.rule).and_then(|rule| {
            let response = match d.kind {
                Kind::Timeout => None,
                _ => Some(rule.find(&d.response)?),
            };
            let event = from_hex(&d.event_hex)
                .and_then(|bytes| <bus::Event as prost::Message>::decode(bytes.as_slice()).ok())?;
            Some((rule, response, event))
        });
        let Some((rule, response, event)) = found else {
            tracing::info!(key = %d.key, "a delayed response whose rule or response is gone (or disabled) is dropped");
            let _ = self.delays.remove(&d.key).await;
            return false;
        };
        let name = &rule.def.name;
        let label = self.label(name);
        let vars = Variables::new(&event);
        // Its own span, a child of the stimulus's trace.
        let span = tracing::info_span!(
            "rules.delayed",
            otel.name = "rule delayed",
            rule = %name,
            record = %d.key,
            stimulus.subject = %event.subject,
        );
        let ctx = Ctx {
            rule,
            event: &event,
            vars: &vars,
            trace: span_trace(&span, &event),
            firing_id: format!("{name}/{}", event.id),
            publisher: pipeline,
            last_try: d.attempts + 1 >= self.retry.max_deliveries,
            extra: serde_json::from_str(&d.vars).unwrap_or_else(|_| json!({})),
            base_ms: d.due_ms,
            span,
            label: &label,
        };
        let mut out = Outcome::default();
        // Whether retrying cannot help (a task that ended without success and no fallback).
        let mut final_failure = false;
        let mut timeout = false;
        match (&d.kind, response) {
            (Kind::Run, Some(response)) => {
                self.step(&ctx, response, None, true, &mut out).await;
            }
            (Kind::Await { task_id }, Some(response)) => match self.tasks.get(task_id).await {
                Ok(task) if !task.state.is_terminal() => {
                    // Looked at again soon for a young task, less often for an old one (a
                    // tenth of its age, at most every 5 s).
                    let age = now_ms().saturating_sub(task.created_wall_ms);
                    d.due_ms = now_ms() + (age / 10).clamp(millis(AWAIT_POLL), 5_000);
                    let _ = self.delays.update(d).await;
                    return false;
                }
                Ok(task) if task.state == TaskState::Succeeded => {
                    let output = output_json(&task.output);
                    out.notes
                        .push(format!("{}: task {task_id} succeeded", response.name));
                    for next in &response.then {
                        self.step(&ctx, next, Some(output.clone()), false, &mut out)
                            .await;
                        if out.failed.is_some() {
                            break;
                        }
                    }
                }
                Ok(task) => {
                    let state = task.state.as_str().to_ascii_uppercase();
                    let why = format!("task {task_id} ended {state}");
                    if let Some(fallback) = &response.fallback {
                        let output =
                            json!({"task_id": task_id, "state": state, "error": task.error});
                        self.fallback(
                            &ctx,
                            response,
                            fallback,
                            output,
                            &why,
                            "submit_task",
                            &mut out,
                        )
                        .instrument(ctx.span.clone())
                        .await;
                    } else {
                        out.notes.push(format!("{}: {why}", response.name));
                        out.failed = Some(format!("{name}: response {}: {why}", response.name));
                        final_failure = true;
                    }
                }
                Err(SchedulerError::UnknownTask(_)) => {
                    out.notes.push(format!(
                        "{}: task {task_id} is gone: its cascade is dropped",
                        response.name
                    ));
                }
                Err(e) => {
                    out.failed = Some(format!("reading task {task_id}: {e}"));
                }
            },
            (Kind::Timeout, _) => {
                timeout = true;
                out.notes.push("not followed in time".to_owned());
                for response in &rule.responses {
                    self.step(&ctx, response, None, false, &mut out).await;
                    if out.failed.is_some() {
                        break;
                    }
                }
            }
            _ => {}
        }
        {
            let mut stats = self.stats.lock();
            let s = stats.entry(name.clone()).or_default();
            s.responses += out.ran;
            if timeout && out.failed.is_none() {
                s.fired += 1;
            }
        }
        let Some(e) = out.failed.take() else {
            let _ = self.delays.remove(&d.key).await;
            self.announce(name, ctx.firing_id.clone(), &event, "fired", &out.notes);
            return false;
        };
        d.attempts += 1;
        self.stats.lock().entry(name.clone()).or_default().failed += 1;
        let broke = e.contains("stream");
        if d.attempts < self.retry.max_deliveries && !final_failure {
            let step = usize::try_from(d.attempts - 1)
                .unwrap_or(0)
                .min(self.retry.backoff.len().saturating_sub(1));
            let wait = self
                .retry
                .backoff
                .get(step)
                .copied()
                .unwrap_or(Duration::from_secs(1));
            d.due_ms = now_ms() + millis(wait);
            out.notes.push(format!("will retry: {e}"));
            let _ = self.delays.update(d).await;
        } else {
            let dead = bus::Event {
                id: format!("{}.dead", d.key),
                subject: DEAD_LETTER_SUBJECT.to_owned(),
                r#type: "agentmesh.rules.delayed_failed".to_owned(),
                source: "agentmesh/rules".to_owned(),
                correlation_id: event.id.clone(),
                content_type: "application/json".to_owned(),
                data: json!({"key": d.key, "rule": name, "response": d.response,
                    "attempts": d.attempts, "error": e, "stimulus": event.id})
                .to_string()
                .into_bytes(),
                ..bus::Event::default()
            };
            if let Err(dead_error) = pipeline.publish(dead).await {
                // Kept, to dead-letter on a later run.
                tracing::warn!(key = %d.key, error = %dead_error, "dead-lettering a delayed response failed; retrying");
                d.due_ms = now_ms() + 5_000;
                out.notes.push(format!(
                    "failed {} times: {e}; dead-lettering failed: {dead_error}",
                    d.attempts
                ));
                let _ = self.delays.update(d).await;
                self.announce(name, ctx.firing_id.clone(), &event, "failed", &out.notes);
                return true;
            }
            out.notes
                .push(format!("failed {} times: {e}; dead-lettered", d.attempts));
            let _ = self.delays.remove(&d.key).await;
        }
        self.announce(name, ctx.firing_id.clone(), &event, "failed", &out.notes);
        broke
    }

    /// Runs one action.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &self,
        rule: &str,
        action: &CompiledAction,
        scope: &cel::Context<'_, '_>,
        event: &bus::Event,
        key: &str,
        trace: &BTreeMap<String, String>,
        publisher: &Pipeline,
    ) -> Result<Done, (&'static str, String)> {
        match action {
            CompiledAction::Publish {
                subject,
                event_type,
                data,
                content_type,
                headers,
            } => {
                let fail = |e: String| ("publish", e);
                let subject = render(subject, scope).map_err(fail)?;
                let event_type = render(event_type, scope).map_err(fail)?;
                let (data, content_type) = match data {
                    None => (
                        event.data.clone(),
                        if content_type.is_empty() {
                            event.content_type.clone()
                        } else {
                            content_type.clone()
                        },
                    ),
                    Some(t) => (
                        render(t, scope).map_err(fail)?.into_bytes(),
                        if content_type.is_empty() {
                            "application/json".to_owned()
                        } else {
                            content_type.clone()
                        },
                    ),
                };
                let mut all_headers: std::collections::HashMap<String, String> =
                    trace.clone().into_iter().collect();
                all_headers.extend(render_map(headers, scope).map_err(fail)?);
                all_headers.insert("agentmesh-rule-firing".to_owned(), key.to_owned());
                let out = bus::Event {
                    id: key.to_owned(),
                    subject,
                    r#type: if event_type.is_empty() {
                        "agentmesh.rules.fired".to_owned()
                    } else {
                        event_type
                    },
                    source: "agentmesh/rules".to_owned(),
                    correlation_id: event.id.clone(),
                    headers: all_headers,
                    content_type,
                    data,
                    ..bus::Event::default()
                };
                let response = publisher.publish(out).await.map_err(fail)?;
                Ok(Done {
                    action: "publish",
                    duplicate: response.duplicate,
                    detail: format!("event {}", response.id),
                    output: json!({"event_id": response.id}),
                    task: None,
                })
            }
            CompiledAction::SubmitTask {
                task_type,
                payload,
                priority,
                labels,
                timeout,
                max_attempts,
            } => {
                let fail = |e: String| ("submit_task", e);
                let payload = match payload {
                    None => Bytes::from(event.data.clone()),
                    Some(t) => Bytes::from(render(t, scope).map_err(fail)?),
                };
                let mut rendered: BTreeMap<String, String> = render_map(labels, scope)
                    .map_err(fail)?
                    .into_iter()
                    .collect();
                rendered.insert("agentmesh.rule".to_owned(), rule.to_owned());
                let mut spec = TaskSpec {
                    task_type: task_type.clone(),
                    payload,
                    idempotency_key: key.to_owned(),
                    priority: *priority,
                    labels: rendered,
                    trace_context: trace.clone(),
                    ..TaskSpec::default()
                };
                if let Some(timeout) = timeout {
                    spec.start_to_close = *timeout;
                }
                if *max_attempts > 0 {
                    spec.retry = RetryPolicy {
                        max_attempts: *max_attempts,
                        ..RetryPolicy::default()
                    };
                }
                let (task, existing) = self
                    .tasks
                    .submit(spec)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                Ok(Done {
                    action: "submit_task",
                    duplicate: existing,
                    detail: format!("task {}", task.id),
                    output: json!({"task_id": task.id}),
                    task: Some(task.id),
                })
            }
            CompiledAction::Webhook {
                url,
                body,
                headers,
                timeout,
            } => {
                let fail = |e: String| ("webhook", e);
                let url = render(url, scope).map_err(fail)?;
                let body = match body {
                    None => stimulus_json(event),
                    Some(t) => render(t, scope).map_err(fail)?,
                };
                let rendered: Vec<(String, String)> = render_map(headers, scope)
                    .map_err(fail)?
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect();
                let mut all: Vec<(&str, &str)> = vec![
                    ("idempotency-key", key),
                    ("x-agentmesh-rule", rule),
                    ("x-agentmesh-stimulus", event.id.as_str()),
                ];
                if !rendered.iter().any(|(k, _)| k == "content-type") {
                    all.push(("content-type", "application/json"));
                }
                for (k, v) in trace {
                    all.push((k.as_str(), v.as_str()));
                }
                all.extend(rendered.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let (code, answer) =
                    agentmesh_runtime::scrape::post(&url, &all, Bytes::from(body), *timeout)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                if !(200..300).contains(&code) {
                    let answer: String = answer.chars().take(200).collect();
                    return Err(fail(format!("{url} answered {code}: {answer}")));
                }
                Ok(Done {
                    action: "webhook",
                    duplicate: false,
                    detail: format!("HTTP {code}"),
                    output: output_json(answer.as_bytes()),
                    task: None,
                })
            }
        }
    }
}

/// What a response did.
struct Done {
    action: &'static str,
    /// Done before (the bus or the task store knew its idempotency key).
    duplicate: bool,
    detail: String,
    /// What a cascade's next step sees as `output`.
    output: Json,
    /// The task it submitted.
    task: Option<String>,
}

/// One firing as its responses see it.
struct Ctx<'a> {
    rule: &'a CompiledRule,
    event: &'a bus::Event,
    vars: &'a Variables,
    /// `<rule>/<event id>`.
    firing_id: String,
    /// The trace context its responses carry.
    trace: BTreeMap<String, String>,
    publisher: &'a Pipeline,
    /// The stimulus's last delivery, or the record's last run: a failing response's fallback
    /// runs.
    last_try: bool,
    /// Extra variables of every template (`correlation`), a JSON object.
    extra: Json,
    /// What a delay counts from, milliseconds since the Unix epoch.
    base_ms: u64,
    span: tracing::Span,
    label: &'a str,
}

impl Ctx<'_> {
    /// The extra variables plus `output`.
    fn extra_with(&self, output: Option<&Json>) -> Json {
        let mut extra = self.extra.clone();
        if let (Some(output), Some(map)) = (output, extra.as_object_mut()) {
            map.insert("output".to_owned(), output.clone());
        }
        extra
    }
}

/// What the responses of one firing did.
#[derive(Debug, Default)]
struct Outcome {
    notes: Vec<String>,
    /// Responses run.
    ran: u64,
    /// Why it failed.
    failed: Option<String>,
}

/// The id the done-set keeps for one entry of a rule and one event.
fn entry_id(rule: &CompiledRule, event_id: &str) -> String {
    let name = &rule.def.name;
    match &rule.role {
        Role::Primary => format!("{name}/{event_id}"),
        Role::Together => format!("{name}#with/{event_id}"),
        Role::Follow => format!("{name}#followed/{event_id}"),
        Role::Cancel(response) => format!("{name}#cancel.{response}/{event_id}"),
    }
}

/// A record of `event`'s firing of `rule` (no extra variables, no cancelling key).
fn delayed(
    event: &bus::Event,
    key: String,
    rule: &str,
    response: &str,
    kind: Kind,
    due_ms: u64,
) -> Delayed {
    Delayed {
        key,
        rule: rule.to_owned(),
        response: response.to_owned(),
        kind,
        vars: String::new(),
        cancel: String::new(),
        due_ms,
        attempts: 0,
        event_id: event.id.clone(),
        at_ms: accepted_ms(event),
        event_hex: to_hex(&prost::Message::encode_to_vec(event)),
    }
}

/// The cancelling key of a `not_followed_by` timeout.
fn follow_key(rule: &str, key: &str) -> String {
    format!("{rule}/#follow/{key}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The extra variables as a record keeps them (empty when there are none).
fn vars_text(extra: &Json) -> String {
    match extra.as_object() {
        Some(map) if !map.is_empty() => extra.to_string(),
        _ => String::new(),
    }
}

/// A task's output or a webhook's answer as `output`: JSON when it is, else text, else null.
fn output_json(bytes: &[u8]) -> Json {
    if bytes.is_empty() {
        return Json::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        std::str::from_utf8(bytes).map_or(Json::Null, |t| Json::String(t.to_owned()))
    })
}

/// Renders a map of templates.
fn render_map(
    templates: &[(String, super::model::Template)],
    scope: &cel::Context<'_, '_>,
) -> Result<Vec<(String, String)>, String> {
    templates
        .iter()
        .map(|(k, t)| Ok((k.clone(), render(t, scope)?)))
        .collect()
}

/// The trace context a span under `event`'s trace gives its responses (the event's own when
/// tracing is off).
fn span_trace(span: &tracing::Span, event: &bus::Event) -> BTreeMap<String, String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let trace = trace_of(event);
    let _ = span.set_parent(agentmesh_runtime::propagation::extract_from_map(&trace));
    let mut map = BTreeMap::new();
    agentmesh_runtime::propagation::inject_into_map(&span.context(), &mut map);
    if map.is_empty() { trace } else { map }
}
