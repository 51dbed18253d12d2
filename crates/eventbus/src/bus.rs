//! The event bus of one instance: publish, subscribe, request/reply, dead letters, stats.
//!
//! * **Ephemeral subjects** (the default) are delivered from memory: publish looks up the
//!   interested groups in the [`SubjectIndex`] and offers the event to each group's bounded
//!   priority queue ([`Consumer`]); at most once, deduplicated by id within the dedup window.
//! * **Durable subjects** (matching a configured pattern; one stream per pattern) are appended
//!   to the [`EventLog`] before publish answers. Each durable group runs a reader that reads
//!   from the log through the log's consumer group only as much as its queue has room for
//!   (the bus stops reading for a slow subscriber and loses nothing), and periodically claims
//!   deliveries another consumer left unacknowledged for longer than the ack wait (a dead
//!   instance, a closed subscription). A durable event is acked in the log when the
//!   subscriber acks it, or when it is dead-lettered.
//! * **Groups**: subscriptions with the same filter and queue group share one group (each
//!   event to one member); without a group each subscription is its own group. A group takes
//!   its options (ack wait, max deliveries …) from the subscription that created it.
//! * **Broadcast**: subjects under `sys.broadcast.` reach every member of every group.
//! * **Request/reply**: a request is published with a reply subject `_INBOX.<token>.<n>`
//!   answered in memory; "no responders" when no group is interested in the subject.
//! * **Cluster** ([`Bus::with_cluster`]): ephemeral events are also routed to the other
//!   instances' subscriptions over a [`Backplane`] (see [`crate::cluster`]); a queue group gets
//!   each event once cluster-wide, and request inboxes are advertised so replies come back.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use prometheus::{Histogram, HistogramVec, IntCounter};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::cluster::{Backplane, ClusterView, Forward, Handed, Inbound, Interest, pick_weighted};
use crate::consumer::{
    AckPolicy, AdvisoryKind, AdvisoryOut, Consumer, ConsumerOptions, DeadReason, Effects,
    GroupSettings, GroupSnapshot, MemberInfo, Outbound, Pending,
};
use crate::dedup::{DedupOutcome, DedupWindow};
use crate::error::EventBusError;
use crate::event::{Event, Priority, new_ulid, now_ms};
use crate::index::SubjectIndex;
use crate::log::{AppendOutcome, Appending, EventLog, StartPosition, TrimPolicy};
pub use crate::metrics::BusCounters;
use crate::priority::FairnessConfig;
use crate::subject::SubjectFilter;

/// Subjects under this prefix reach every member of every group.
pub const BROADCAST_PREFIX: &str = "sys.broadcast.";
/// Default dead-letter subject.
pub const DEFAULT_DEAD_LETTER_SUBJECT: &str = "sys.deadletter";
/// Subject of shed advisories.
pub const SHED_ADVISORY_SUBJECT: &str = "sys.advisory.eventbus.shed";
/// Reply subjects of requests start with this.
pub const INBOX_PREFIX: &str = "_INBOX.";
/// Headers a dead letter carries.
pub const DEAD_LETTER_REASON: &str = "deadletter-reason";
/// The subject the event was published on.
pub const DEAD_LETTER_SUBJECT: &str = "deadletter-subject";
/// How many times it was delivered.
pub const DEAD_LETTER_DELIVERIES: &str = "deadletter-deliveries";
/// The group that gave up on it.
pub const DEAD_LETTER_GROUP: &str = "deadletter-group";
/// When, ms since the epoch.
pub const DEAD_LETTER_AT: &str = "deadletter-at";
/// The event's own id (the dead letter is stored under a new one, so that a dead letter is
/// never taken for a duplicate of its event).
pub const DEAD_LETTER_ID: &str = "deadletter-id";
/// A redriven event's original id (it is published under a new one, or the dedup window
/// would take it for a duplicate).
pub const REDRIVEN_FROM: &str = "redriven-from";
/// Most subjects tracked one by one in stats; the rest are summed under `_other`.
pub const MAX_TRACKED_SUBJECTS: usize = 1024;

/// How the bus behaves.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// This instance's id (named in listings and Subscribed).
    pub instance_id: String,
    /// Subjects matching one of these are durable, one stream per pattern.
    pub durable: Vec<SubjectFilter>,
    /// Repeated ids within this window are duplicates.
    pub dedup_window: Duration,
    /// Most ids the ephemeral dedup window remembers.
    pub dedup_max_entries: usize,
    /// Most bytes of `data`.
    pub max_data: usize,
    /// Most pending events per group.
    pub max_pending: usize,
    /// Most open subscriptions.
    pub max_subscriptions: usize,
    /// Priority weights and aging.
    pub fairness: FairnessConfig,
    /// Dead-letter events that expire while waiting (else only count them).
    pub dead_letter_expired: bool,
    /// How much of each durable stream to keep.
    pub retention: TrimPolicy,
}

impl BusConfig {
    /// Defaults for `instance_id`.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            durable: Vec::new(),
            dedup_window: Duration::from_secs(120),
            dedup_max_entries: 1_000_000,
            max_data: crate::event::DEFAULT_MAX_DATA,
            max_pending: 10_000,
            max_subscriptions: 10_000,
            fairness: FairnessConfig::default(),
            dead_letter_expired: false,
            retention: TrimPolicy {
                max_len: Some(1_000_000),
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            },
        }
    }
}

/// One part of a started batch: an answer already known, or a durable run being stored.
enum BatchPart {
    Done(Result<PublishOutcome, EventBusError>),
    Staged(oneshot::Receiver<Result<PublishOutcome, EventBusError>>),
    Stored { stream: String, append: Appending },
}

/// An ephemeral publish: answered at once, or waiting in the cluster dedup stage.
enum Ephemeral {
    Done(Result<PublishOutcome, EventBusError>),
    Staged(oneshot::Receiver<Result<PublishOutcome, EventBusError>>),
}

impl Ephemeral {
    async fn outcome(self) -> Result<PublishOutcome, EventBusError> {
        match self {
            Self::Done(answer) => answer,
            Self::Staged(rx) => rx.await.unwrap_or(Err(EventBusError::ShuttingDown)),
        }
    }
}

/// Ephemeral publishes waiting for their ids' cluster-wide claims ([`Backplane::claim_ids`]),
/// in publish order: one round trip claims every id that queued meanwhile.
struct DedupStage {
    tx: mpsc::Sender<Staged>,
    /// Submitted and not yet routed. While any wait, every ephemeral publish of this instance
    /// queues behind them, so events are still routed in publish order.
    queued: Arc<AtomicUsize>,
}

/// One publish in the dedup stage.
struct Staged {
    event: Event,
    /// A client-supplied id, to claim (a generated one only keeps its place).
    claim: bool,
    reply: oneshot::Sender<Result<PublishOutcome, EventBusError>>,
}

/// Most publishes waiting in the dedup stage; beyond, a publish is refused (UNAVAILABLE).
const DEDUP_STAGE_QUEUE: usize = 65_536;
/// Most ids claimed in one round trip.
const DEDUP_STAGE_BATCH: usize = 1024;

impl DedupStage {
    fn submit(&self, event: Event, claim: bool) -> Ephemeral {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(Staged {
            event,
            claim,
            reply,
        }) {
            Ok(()) => Ephemeral::Staged(rx),
            Err(_) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Ephemeral::Done(Err(EventBusError::Unavailable(format!(
                    "more than {DEDUP_STAGE_QUEUE} publishes wait for cluster-wide dedup: retry"
                ))))
            }
        }
    }
}

/// What publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The event id (generated if it had none).
    pub id: String,
    /// Seen within the dedup window: not delivered again.
    pub duplicate: bool,
    /// Durable: the stream sequence.
    pub sequence: u64,
    /// Durable: the stream.
    pub stream: Option<String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct SubjectCounters {
    published: u64,
    duplicates: u64,
    previous: u64,
    rate: f64,
}

/// Per-subject stats.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectStat {
    /// The subject (or `_other`).
    pub subject: String,
    /// Events published.
    pub published: u64,
    /// Duplicates answered.
    pub duplicates: u64,
    /// Published per second, recent.
    pub rate: f64,
}

/// Per-group stats.
#[derive(Debug, Clone)]
pub struct GroupStat {
    /// The filter.
    pub subject: String,
    /// Queue group, durable name, or the subscription id.
    pub group: String,
    /// Durable stream read.
    pub stream: Option<String>,
    /// State.
    pub snapshot: GroupSnapshot,
    /// Delivered per second, recent.
    pub rate: f64,
}

/// A dead letter as listed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Position in the dead-letter stream.
    pub sequence: u64,
    /// The event, with its original subject.
    pub event: Event,
    /// Why.
    pub reason: String,
    /// Deliveries made.
    pub deliveries: u32,
    /// The group that gave up.
    pub group: String,
    /// When, ms since the epoch.
    pub dead_at_ms: u64,
}

struct Inner {
    config: BusConfig,
    log: Arc<dyn EventLog>,
    dedup: DedupWindow,
    index: RwLock<SubjectIndex<u64>>,
    groups: RwLock<HashMap<u64, Arc<Consumer>>>,
    /// Named groups (queue groups, durable names) by (filter, name).
    named: Mutex<HashMap<(String, String), u64>>,
    inboxes: Mutex<HashMap<String, oneshot::Sender<(Event, String)>>>,
    inbox_token: String,
    next_id: AtomicU64,
    subjects: Mutex<HashMap<String, SubjectCounters>>,
    group_rates: Mutex<HashMap<u64, (u64, f64)>>,
    counters: BusCounters,
    last_shed_advisory: Mutex<HashMap<u64, u64>>,
    /// Backplane shed totals (sending, receiving) already announced in an advisory.
    backplane_reported: Mutex<[[u64; 4]; 2]>,
    cluster: Option<ClusterState>,
    queue_wait_vec: HistogramVec,
    queue_wait: Arc<[Histogram; 4]>,
}

/// This instance's part of cluster-wide ephemeral delivery (see [`crate::cluster`]).
struct ClusterState {
    backplane: Arc<dyn Backplane>,
    remotes: Mutex<HashMap<String, Vec<Interest>>>,
    view: RwLock<Arc<ClusterView>>,
    /// Signalled when this instance's interests change.
    changed: Arc<Notify>,
    /// Present when the backplane claims ids cluster-wide.
    dedup: Option<DedupStage>,
}

/// A weak handle on a [`Bus`].
#[derive(Clone)]
pub struct WeakBus(Weak<Inner>);

impl std::fmt::Debug for WeakBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakBus")
    }
}

/// The bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("instance", &self.inner.config.instance_id)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus over `log` (durable subjects); spawns its housekeeping task (ack deadlines,
    /// delayed redeliveries, expiry, rates, retention), which ends when the bus is dropped.
    pub fn new(config: BusConfig, log: Arc<dyn EventLog>) -> Self {
        Self::build(config, log, None)
    }

    /// A bus that shares ephemeral events with other instances over `backplane`; `inbound`
    /// is what the backplane hands to this instance (see [`crate::cluster`]).
    pub fn with_cluster(
        config: BusConfig,
        log: Arc<dyn EventLog>,
        backplane: Arc<dyn Backplane>,
        inbound: mpsc::Receiver<Inbound>,
    ) -> Self {
        Self::build(config, log, Some((backplane, inbound)))
    }

    fn build(
        config: BusConfig,
        log: Arc<dyn EventLog>,
        cluster: Option<(Arc<dyn Backplane>, mpsc::Receiver<Inbound>)>,
    ) -> Self {
        let token = new_ulid(now_ms());
        let mut staged_rx = None;
        let (cluster, inbound) = match cluster {
            Some((backplane, inbound)) => {
                let dedup = backplane.claims_ids().then(|| {
                    let (tx, rx) = mpsc::channel(DEDUP_STAGE_QUEUE);
                    let queued = Arc::new(AtomicUsize::new(0));
                    staged_rx = Some((rx, queued.clone()));
                    DedupStage { tx, queued }
                });
                (
                    Some(ClusterState {
                        backplane,
                        remotes: Mutex::new(HashMap::new()),
                        view: RwLock::new(Arc::new(ClusterView::default())),
                        changed: Arc::new(Notify::new()),
                        dedup,
                    }),
                    Some(inbound),
                )
            }
            None => (None, None),
        };
        let queue_wait_vec = crate::metrics::queue_wait_histogram();
        let queue_wait =
            Arc::new(Priority::ALL.map(|p| queue_wait_vec.with_label_values(&[p.as_str()])));
        let inner = Arc::new(Inner {
            queue_wait_vec,
            queue_wait,
            dedup: DedupWindow::new(config.dedup_window, config.dedup_max_entries),
            config,
            log,
            index: RwLock::new(SubjectIndex::new()),
            groups: RwLock::new(HashMap::new()),
            named: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
            inbox_token: token,
            next_id: AtomicU64::new(1),
            subjects: Mutex::new(HashMap::new()),
            group_rates: Mutex::new(HashMap::new()),
            counters: BusCounters::default(),
            last_shed_advisory: Mutex::new(HashMap::new()),
            backplane_reported: Mutex::new([[0; 4]; 2]),
            cluster,
        });
        tokio::spawn(housekeeping(Arc::downgrade(&inner)));
        if let Some((rx, queued)) = staged_rx {
            tokio::spawn(cluster_dedup(Arc::downgrade(&inner), rx, queued));
        }
        if let (Some(cluster), Some(inbound)) = (&inner.cluster, inbound) {
            tokio::spawn(cluster_inbound(Arc::downgrade(&inner), inbound));
            tokio::spawn(cluster_advertise(
                Arc::downgrade(&inner),
                cluster.changed.clone(),
            ));
        }
        Self { inner }
    }

    /// Registers the bus's metrics (counted in place, see [`crate::metrics`]) in `registry`:
    /// its counters, `eventbus_queue_wait_seconds` and the dedup window's early evictions.
    ///
    /// # Errors
    /// When one of them is already registered.
    pub fn register_metrics(
        &self,
        registry: &prometheus::Registry,
    ) -> Result<(), prometheus::Error> {
        self.inner.counters.register(registry)?;
        registry.register(Box::new(self.inner.queue_wait_vec.clone()))?;
        registry.register(Box::new(self.inner.dedup.evicted_early_counter().clone()))
    }

    /// A handle that does not keep the bus alive.
    pub fn downgrade(&self) -> WeakBus {
        WeakBus(Arc::downgrade(&self.inner))
    }

    /// The bus, if it is still alive.
    pub fn upgrade(weak: &WeakBus) -> Option<Bus> {
        weak.0.upgrade().map(|inner| Bus { inner })
    }

    /// The configuration.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Bus-wide counters.
    pub fn counters(&self) -> &BusCounters {
        &self.inner.counters
    }

    /// Forwards from other instances dropped on arrival because this bus fell behind them, by
    /// priority (lowest first); zeros without a cluster.
    pub fn forwards_shed_on_arrival(&self) -> [u64; 4] {
        self.inner
            .cluster
            .as_ref()
            .map_or([0; 4], |c| c.backplane.shed_on_arrival())
    }

    /// Open subscriptions.
    pub fn subscription_count(&self) -> u64 {
        u64::try_from(self.inner.counters.subscriptions.get()).unwrap_or(0)
    }

    /// Ids dropped from the dedup window early because it was full.
    pub fn dedup_evicted_early(&self) -> u64 {
        self.inner.dedup.evicted_early()
    }

    /// The durable stream of `subject`, if it is durable.
    pub fn durable_stream(&self, subject: &str) -> Option<&str> {
        self.inner
            .config
            .durable
            .iter()
            .find(|p| p.matches(subject))
            .map(SubjectFilter::as_str)
    }

    /// Validates and publishes one event (see the module docs).
    ///
    /// # Errors
    /// `InvalidArgument` naming each bad field; `Unavailable` when a durable subject's store
    /// is down.
    pub async fn publish(&self, event: Event) -> Result<PublishOutcome, EventBusError> {
        let (event, generated) = self.prepare(event, "event")?;
        self.publish_prepared(event, generated).await
    }

    /// Publishes events in order (one answer each); consecutive events of one durable stream
    /// are stored in one round trip.
    pub async fn publish_batch(
        &self,
        events: Vec<Event>,
    ) -> Vec<Result<PublishOutcome, EventBusError>> {
        self.start_batch(events).await
    }

    /// Starts publishing `events` and returns the future of their answers: ephemeral events
    /// are routed and durable runs (consecutive events of one stream) are queued to the log
    /// before this returns, so a batch started later is stored after this one — a
    /// `PublishStream` keeps several batches in flight and still stores them in publish
    /// order.
    pub fn start_batch(
        &self,
        events: Vec<Event>,
    ) -> impl Future<Output = Vec<Result<PublishOutcome, EventBusError>>> + Send + 'static {
        let mut parts: Vec<BatchPart> = Vec::new();
        let mut run: Vec<Event> = Vec::new();
        let mut run_key: Option<(String, bool)> = None;
        let total = events.len();
        for event in events {
            let prepared = self.prepare(event, "event");
            let key = prepared.as_ref().ok().and_then(|(e, generated)| {
                self.durable_stream(&e.subject)
                    .map(|s| (s.to_owned(), *generated))
            });
            if run_key.is_some() && key != run_key {
                parts.extend(self.start_run(run_key.take(), std::mem::take(&mut run)));
            }
            match (prepared, key) {
                (Ok((event, _)), Some(key)) => {
                    run.push(event);
                    run_key = Some(key);
                }
                (Ok((event, generated)), None) => {
                    parts.push(match self.publish_ephemeral(event, generated) {
                        Ephemeral::Done(answer) => BatchPart::Done(answer),
                        Ephemeral::Staged(rx) => BatchPart::Staged(rx),
                    });
                }
                (Err(e), _) => parts.push(BatchPart::Done(Err(e))),
            }
        }
        parts.extend(self.start_run(run_key, run));
        let bus = self.clone();
        async move {
            let mut out = Vec::with_capacity(total);
            for part in parts {
                match part {
                    BatchPart::Done(answer) => out.push(answer),
                    BatchPart::Staged(rx) => out.push(Ephemeral::Staged(rx).outcome().await),
                    BatchPart::Stored { stream, append } => match append.await {
                        (run, Ok(outcomes)) => out.extend(
                            run.into_iter()
                                .zip(outcomes)
                                .map(|(event, outcome)| Ok(bus.stored(&stream, event, outcome))),
                        ),
                        (run, Err(e)) => out.extend(run.iter().map(|_| Err(e.clone()))),
                    },
                }
            }
            out
        }
    }

    /// Starts the append of one durable run.
    fn start_run(&self, key: Option<(String, bool)>, run: Vec<Event>) -> Option<BatchPart> {
        let (stream, generated) = key?;
        if run.is_empty() {
            return None;
        }
        let window = self.dedup_window(generated);
        let append = self.inner.log.append_batch(&stream, run, window);
        Some(BatchPart::Stored { stream, append })
    }

    /// Generated ids are unique by construction: only client-supplied ids are deduplicated.
    fn dedup_window(&self, generated: bool) -> Duration {
        if generated {
            Duration::ZERO
        } else {
            self.inner.config.dedup_window
        }
    }

    /// Counts a durable append and answers it.
    fn stored(&self, stream: &str, event: Event, outcome: AppendOutcome) -> PublishOutcome {
        let duplicate = matches!(outcome, AppendOutcome::Duplicate(_));
        self.count_subject(&event.subject, duplicate);
        let counter = if duplicate {
            &self.inner.counters.duplicates
        } else {
            &self.inner.counters.published_durable
        };
        counter.inc();
        PublishOutcome {
            id: event.id,
            duplicate,
            sequence: outcome.sequence().unwrap_or(0),
            stream: Some(stream.to_owned()),
        }
    }

    fn prepare(&self, mut event: Event, field: &str) -> Result<(Event, bool), EventBusError> {
        let violations = event.violations(field, self.inner.config.max_data);
        if !violations.is_empty() {
            return Err(EventBusError::InvalidArgument(violations));
        }
        let now = now_ms();
        let generated = event.id.is_empty();
        if generated {
            event.id = new_ulid(now);
        }
        if event.time_ms == 0 {
            event.time_ms = now;
        }
        Ok((event, generated))
    }

    async fn publish_prepared(
        &self,
        event: Event,
        generated: bool,
    ) -> Result<PublishOutcome, EventBusError> {
        if let Some(stream) = self.durable_stream(&event.subject) {
            let window = self.dedup_window(generated);
            let outcome = self.inner.log.append(stream, &event, window).await?;
            return Ok(self.stored(stream, event, outcome));
        }
        self.publish_ephemeral(event, generated).outcome().await
    }

    /// Publishes an event of an ephemeral subject: deduplicated in memory, then (in a cluster
    /// whose backplane claims ids) across instances, then routed.
    fn publish_ephemeral(&self, event: Event, generated: bool) -> Ephemeral {
        let inner = &self.inner;
        let now = now_ms();
        if !generated && inner.dedup.check_and_insert("", &event.id, now) == DedupOutcome::Duplicate
        {
            return Ephemeral::Done(Ok(self.duplicate(event)));
        }
        if let Some(stage) = inner.cluster.as_ref().and_then(|c| c.dedup.as_ref()) {
            // A client id is claimed cluster-wide first; a generated id (unique by
            // construction) waits only when earlier events are still waiting, to keep order.
            if !generated || stage.queued.load(Ordering::Acquire) > 0 {
                return stage.submit(event, !generated);
            }
        }
        Ephemeral::Done(Ok(self.deliver_ephemeral(event, now)))
    }

    /// Answers a duplicate publish (counted, not delivered).
    fn duplicate(&self, event: Event) -> PublishOutcome {
        self.inner.counters.duplicates.inc();
        self.count_subject(&event.subject, true);
        PublishOutcome {
            id: event.id,
            duplicate: true,
            sequence: 0,
            stream: None,
        }
    }

    /// Counts and routes an accepted ephemeral event.
    fn deliver_ephemeral(&self, event: Event, now: u64) -> PublishOutcome {
        self.count_subject(&event.subject, false);
        self.inner.counters.published_ephemeral.inc();
        let id = event.id.clone();
        self.route(&Arc::new(event), now);
        PublishOutcome {
            id,
            duplicate: false,
            sequence: 0,
            stream: None,
        }
    }

    /// Hands an ephemeral event to a waiting request of this instance; true if one took it.
    fn answer_inbox(&self, event: &Arc<Event>) -> bool {
        if !event.subject.starts_with(INBOX_PREFIX) {
            return false;
        }
        let waiter = self.inner.inboxes.lock().remove(&event.subject);
        match waiter {
            Some(tx) => {
                let responder = event.headers.get("responder").cloned().unwrap_or_default();
                let _ = tx.send((Event::clone(event), responder));
                true
            }
            None => false,
        }
    }

    /// The local groups interested in `subject`.
    fn local_groups(&self, subject: &str) -> Vec<Arc<Consumer>> {
        let inner = &self.inner;
        let mut ids: Vec<u64> = Vec::new();
        inner
            .index
            .read()
            .for_each_match(subject, |id| ids.push(*id));
        if ids.is_empty() {
            return Vec::new();
        }
        let map = inner.groups.read();
        ids.iter().filter_map(|id| map.get(id).cloned()).collect()
    }

    /// Offers an ephemeral event to `groups` (every member of each for broadcast subjects).
    fn offer_to(&self, groups: &[Arc<Consumer>], event: &Arc<Event>, now: u64) {
        let broadcast = event.subject.starts_with(BROADCAST_PREFIX);
        for group in groups {
            let effects = if broadcast {
                group.offer_to_all(event, now)
            } else {
                group.offer(Pending::new(event.clone(), 0, 0), now)
            };
            self.apply(group, effects);
        }
    }

    /// Delivers an ephemeral event accepted here: to this instance's subscriptions and, in a
    /// cluster, to the other instances' (each queue group gets it once cluster-wide). Returns
    /// how many groups and instances it went to.
    fn route(&self, event: &Arc<Event>, now: u64) -> usize {
        if self.answer_inbox(event) {
            return 1;
        }
        let inner = &self.inner;
        let mut local = self.local_groups(&event.subject);
        let view = inner.cluster.as_ref().map(|c| c.view.read().clone());
        let mut sent = 0;
        if let Some(view) = view.filter(|v| !v.is_empty()) {
            let (forwards, skip) = plan_forwards(&view, &local, event);
            if !skip.is_empty() {
                local.retain(|g| cluster_group(g).is_none_or(|id| !skip.contains(id)));
            }
            sent = self.send_forwards(forwards, event);
        }
        if local.is_empty() && sent == 0 {
            inner.counters.no_interest.inc();
            return 0;
        }
        self.offer_to(&local, event, now);
        local.len() + sent
    }

    fn send_forwards(&self, forwards: Forwards, event: &Event) -> usize {
        let Some(cluster) = &self.inner.cluster else {
            return 0;
        };
        let counters = &self.inner.counters;
        let mut sent = 0;
        for (to, (plain, groups)) in forwards {
            let forward = Forward {
                from: self.inner.config.instance_id.clone(),
                event: event.clone(),
                plain,
                groups,
            };
            let (queued, shed) = match cluster.backplane.send(&to, forward) {
                Handed::Queued => (true, None),
                Handed::QueuedShedding(lower) => (true, Some(lower)),
                Handed::Dropped => (false, Some(event.priority)),
            };
            if queued {
                counters.forwarded_out.inc();
                sent += 1;
            }
            if let Some(priority) = shed {
                counters.forward_dropped.inc();
                counters.forward_shed[priority.index()].inc();
            }
        }
        sent
    }

    /// Tells `sys.advisory.eventbus.shed` when the backplane shed forwards since the last
    /// call (housekeeping calls it once a second): one advisory per side that did, with how
    /// many of each priority — `sending` (the queue to the other instances was full) or
    /// `receiving` (this bus fell behind the forwards sent to it).
    fn backplane_shed_advisories(&self, now: u64) {
        let sending = self
            .inner
            .counters
            .forward_shed
            .each_ref()
            .map(IntCounter::get);
        let sides = [
            ("sending", sending),
            ("receiving", self.forwards_shed_on_arrival()),
        ];
        for (side, (name, totals)) in sides.into_iter().enumerate() {
            let shed: [u64; 4] = {
                let mut reported = self.inner.backplane_reported.lock();
                let before = std::mem::replace(&mut reported[side], totals);
                std::array::from_fn(|i| totals[i].saturating_sub(before[i]))
            };
            if shed == [0; 4] {
                continue;
            }
            let data = format!(
                "{{\"backplane\":\"{name}\",\"shed\":{{\"low\":{},\"normal\":{},\"high\":{},\"critical\":{}}}}}",
                shed[0], shed[1], shed[2], shed[3]
            );
            self.route(&Arc::new(self.advisory(now, data)), now);
        }
    }

    /// Delivers an event another instance routed here, to the subscriptions it was meant for.
    pub fn accept_forward(&self, forward: Forward) {
        let inner = &self.inner;
        inner.counters.forwarded_in.inc();
        let event = Arc::new(forward.event);
        if self.answer_inbox(&event) {
            return;
        }
        let broadcast = event.subject.starts_with(BROADCAST_PREFIX);
        let mut groups = self.local_groups(&event.subject);
        if !broadcast {
            groups.retain(|g| match cluster_group(g) {
                None => forward.plain,
                Some(id) => forward.groups.iter().any(|f| f == id),
            });
        }
        if groups.is_empty() {
            inner.counters.no_interest.inc();
            return;
        }
        self.offer_to(&groups, &event, now_ms());
    }

    /// This instance's interests, as advertised to the others.
    fn interests(&self) -> Vec<Interest> {
        let inner = &self.inner;
        let groups: Vec<Arc<Consumer>> = inner.groups.read().values().cloned().collect();
        let mut plain: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for g in groups {
            let members = g.member_count();
            if members == 0 || g.is_closed() {
                continue;
            }
            match cluster_group(&g) {
                Some(id) => out.push(Interest {
                    filter: g.options.filter.as_str().to_owned(),
                    group: Some(id.to_owned()),
                    members: u32::try_from(members).unwrap_or(u32::MAX),
                }),
                None => {
                    plain.insert(g.options.filter.as_str().to_owned());
                }
            }
        }
        plain.insert(format!("{INBOX_PREFIX}{}.>", inner.inbox_token));
        out.extend(plain.into_iter().map(|filter| Interest {
            filter,
            group: None,
            members: 1,
        }));
        out.sort_by(|a, b| (&a.filter, &a.group).cmp(&(&b.filter, &b.group)));
        out
    }

    /// Tells the advertiser this instance's interests changed.
    fn interests_changed(&self) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.changed.notify_one();
        }
    }

    /// Whether a subscription anywhere in the cluster matches `subject`.
    fn anyone_interested(&self, subject: &str) -> bool {
        self.inner.index.read().has_match(subject)
            || self
                .inner
                .cluster
                .as_ref()
                .is_some_and(|c| c.view.read().has_match(subject))
    }

    fn count_subject(&self, subject: &str, duplicate: bool) {
        let mut subjects = self.inner.subjects.lock();
        let key = if subjects.contains_key(subject) || subjects.len() < MAX_TRACKED_SUBJECTS {
            subject
        } else {
            "_other"
        };
        let entry = match subjects.get_mut(key) {
            Some(e) => e,
            None => subjects.entry(key.to_owned()).or_default(),
        };
        if duplicate {
            entry.duplicates += 1;
        } else {
            entry.published += 1;
        }
    }

    /// Carries out what a group operation left to do.
    fn apply(&self, group: &Arc<Consumer>, effects: Effects) {
        if effects.is_empty() {
            return;
        }
        let counters = &self.inner.counters;
        if effects.expired > 0 {
            counters.expired.inc_by(effects.expired);
            group.advise_all(&AdvisoryOut {
                kind: AdvisoryKind::Expired,
                count: effects.expired,
                priority: None,
                message: format!("{} event(s) expired before delivery", effects.expired),
            });
        }
        let shed: u64 = effects.shed.iter().sum();
        if shed > 0 {
            for (i, n) in effects.shed.iter().enumerate() {
                counters.shed[i].inc_by(*n);
            }
            self.shed_advisory(group, &effects.shed);
        }
        if effects.dead.is_empty() && effects.log_acks.is_empty() && effects.log_release.is_empty()
        {
            return;
        }
        let this = self.clone();
        let group = group.clone();
        tokio::spawn(async move {
            this.settle(&group, effects).await;
        });
    }

    /// Log acks and dead letters.
    async fn settle(&self, group: &Arc<Consumer>, effects: Effects) {
        let inner = &self.inner;
        for (pending, reason) in effects.dead {
            inner.counters.dead_lettered.inc();
            if let Err(e) = self.dead_letter(group, &pending, &reason).await {
                inner.counters.log_errors.inc();
                tracing::warn!(error = %e, event = %pending.event.id, "storing a dead letter failed");
            }
        }
        if let Some(stream) = group.durable.first()
            && !effects.log_acks.is_empty()
            && let Err(e) = inner
                .log
                .ack(stream, &group.log_group, &effects.log_acks)
                .await
        {
            inner.counters.log_errors.inc();
            tracing::warn!(error = %e, stream = %stream, "acknowledging in the log failed");
        }
        if let Some(stream) = group.durable.first() {
            for chunk in effects.log_release.chunks(crate::log::MAX_BATCH) {
                if let Err(e) = inner.log.release(stream, &group.log_group, chunk).await {
                    inner.counters.log_errors.inc();
                    tracing::warn!(error = %e, stream = %stream, "giving events back failed");
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        group: &Consumer,
        pending: &Pending,
        reason: &DeadReason,
    ) -> Result<(), EventBusError> {
        let mut event = (*pending.event).clone();
        let now = now_ms();
        event
            .headers
            .insert(DEAD_LETTER_REASON.into(), reason.as_string());
        event
            .headers
            .insert(DEAD_LETTER_SUBJECT.into(), event.subject.clone());
        event.headers.insert(
            DEAD_LETTER_DELIVERIES.into(),
            pending.deliveries.to_string(),
        );
        event
            .headers
            .insert(DEAD_LETTER_GROUP.into(), group_label(group));
        event.headers.insert(DEAD_LETTER_AT.into(), now.to_string());
        event.subject.clone_from(&group.options.dead_letter_subject);
        let original_id = std::mem::replace(&mut event.id, new_ulid(now));
        event.headers.insert(DEAD_LETTER_ID.into(), original_id);
        // A dead letter must not expire on its way to the dead-letter store.
        event.expires_at_ms = None;
        self.inner
            .log
            .append(&event.subject, &event, Duration::ZERO)
            .await?;
        self.route(&Arc::new(event), now);
        Ok(())
    }

    fn shed_advisory(&self, group: &Arc<Consumer>, shed: &[u64; 4]) {
        let now = now_ms();
        {
            let mut last = self.inner.last_shed_advisory.lock();
            let at = last.entry(group.id).or_insert(0);
            if now.saturating_sub(*at) < 1000 {
                return;
            }
            *at = now;
        }
        let data = format!(
            "{{\"group\":{:?},\"subject\":{:?},\"shed\":{{\"low\":{},\"normal\":{},\"high\":{},\"critical\":{}}}}}",
            group_label(group),
            group.options.filter.as_str(),
            shed[0],
            shed[1],
            shed[2],
            shed[3]
        );
        // Never offered back to the group that shed (it would only shed more).
        if !group.options.filter.matches(SHED_ADVISORY_SUBJECT) {
            self.route(&Arc::new(self.advisory(now, data)), now);
        }
    }

    /// A shed advisory carrying `data` (JSON).
    fn advisory(&self, now: u64, data: String) -> Event {
        Event {
            id: new_ulid(now),
            subject: SHED_ADVISORY_SUBJECT.to_owned(),
            r#type: "agentmesh.eventbus.advisory.shed".to_owned(),
            source: format!("/eventbus/{}", self.inner.config.instance_id),
            time_ms: now,
            content_type: "application/json".to_owned(),
            data: data.into(),
            ..Event::default()
        }
    }

    /// Opens a subscription.
    ///
    /// # Errors
    /// `InvalidArgument` when the filter overlaps more than one durable stream or a start
    /// sequence is unknown; `ResourceExhausted` at `max_subscriptions`; `Unavailable` when the
    /// durable store is down.
    pub async fn subscribe(
        &self,
        options: ConsumerOptions,
        start: StartPosition,
    ) -> Result<Subscription, EventBusError> {
        let inner = &self.inner;
        let streams: Vec<&SubjectFilter> = inner
            .config
            .durable
            .iter()
            .filter(|p| p.overlaps(&options.filter))
            .collect();
        if streams.len() > 1 {
            return Err(EventBusError::invalid(
                "open.subject",
                format!(
                    "overlaps the durable streams {} and {}: subscribe to each separately",
                    streams[0].as_str(),
                    streams[1].as_str()
                ),
            ));
        }
        let stream = streams.first().map(|p| p.as_str().to_owned());
        if inner.counters.subscriptions.get()
            >= i64::try_from(inner.config.max_subscriptions).unwrap_or(i64::MAX)
        {
            return Err(EventBusError::ResourceExhausted(format!(
                "at most {} subscriptions per instance",
                inner.config.max_subscriptions
            )));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let subscription_id = format!("{}-{id}", inner.config.instance_id);
        let name = match (&options.queue_group, &options.durable_name) {
            (Some(g), _) => Some(format!("q:{g}")),
            (None, Some(d)) => Some(format!("d:{d}")),
            (None, None) => None,
        };
        let key = name
            .clone()
            .map(|n| (options.filter.as_str().to_owned(), n));
        let existing = key.as_ref().and_then(|k| {
            let named = inner.named.lock();
            let id = named.get(k)?;
            inner.groups.read().get(id).cloned()
        });
        let group = match existing.filter(|g| !g.is_closed()) {
            Some(g) => g,
            None => {
                let log_group = match &name {
                    Some(n) => format!("{n}|{}", options.filter.as_str()),
                    None => format!("s:{subscription_id}"),
                };
                if let Some(stream) = &stream {
                    inner.log.ensure_group(stream, &log_group, &start).await?;
                }
                let group_id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let group = Arc::new(Consumer::new(
                    options.clone(),
                    GroupSettings {
                        id: group_id,
                        capacity: inner.config.max_pending,
                        fairness: inner.config.fairness,
                        durable: stream.iter().cloned().collect(),
                        log_group,
                        log_consumer: format!("{}:{group_id}", inner.config.instance_id),
                        dead_letter_expired: inner.config.dead_letter_expired,
                        queue_wait: Some(inner.queue_wait.clone()),
                    },
                ));
                inner.groups.write().insert(group_id, group.clone());
                inner.index.write().insert(&options.filter, group_id);
                if let Some(k) = key {
                    inner.named.lock().insert(k, group_id);
                }
                if let Some(stream) = &stream {
                    tokio::spawn(read_durable(
                        Arc::downgrade(&self.inner),
                        group.clone(),
                        stream.clone(),
                    ));
                }
                group
            }
        };
        let capacity = usize::try_from(options.max_in_flight).unwrap_or(10_000) + 64;
        let (tx, rx) = mpsc::channel(capacity);
        let member = inner.next_id.fetch_add(1, Ordering::Relaxed);
        inner.counters.subscriptions.inc();
        let effects = group.add_member(
            member,
            subscription_id.clone(),
            options.max_in_flight,
            tx,
            now_ms(),
        );
        self.apply(&group, effects);
        self.interests_changed();
        Ok(Subscription {
            id: subscription_id,
            stream,
            rx,
            handle: SubscriptionHandle {
                bus: self.clone(),
                group,
                member,
            },
        })
    }

    fn close_member(&self, group: &Arc<Consumer>, member: u64) {
        let inner = &self.inner;
        inner.counters.subscriptions.dec();
        let (empty, effects) = group.remove_member(member, now_ms());
        if empty {
            inner.groups.write().remove(&group.id);
            inner.index.write().remove(&group.options.filter, &group.id);
            inner.named.lock().retain(|_, id| *id != group.id);
            inner.group_rates.lock().remove(&group.id);
            inner.last_shed_advisory.lock().remove(&group.id);
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            self.apply(group, effects);
        }
        self.interests_changed();
    }

    /// Publishes `event` with a fresh reply subject and waits up to `timeout` for one reply.
    ///
    /// # Errors
    /// `NoResponders` when no group is interested; `Timeout`; as [`Bus::publish`].
    pub async fn request(
        &self,
        event: Event,
        timeout: Duration,
    ) -> Result<(Event, String), EventBusError> {
        let (mut event, generated) = self.prepare(event, "event")?;
        if !self.anyone_interested(&event.subject) {
            return Err(EventBusError::NoResponders(event.subject));
        }
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let inbox = format!("{INBOX_PREFIX}{}.{n}", self.inner.inbox_token);
        let (tx, rx) = oneshot::channel();
        self.inner.inboxes.lock().insert(inbox.clone(), tx);
        event.reply_to.clone_from(&inbox);
        if event.correlation_id.is_empty() {
            event.correlation_id.clone_from(&event.id);
        }
        let published = self.publish_prepared(event, generated).await;
        let result = match published {
            Err(e) => Err(e),
            Ok(_) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) | Err(_) => Err(EventBusError::Timeout(timeout)),
            },
        };
        self.inner.inboxes.lock().remove(&inbox);
        result
    }

    /// Subscriptions open on this instance whose filter equals `subject` (empty = all).
    pub fn list_subscriptions(&self, subject: &str) -> Vec<SubscriptionInfo> {
        let groups: Vec<Arc<Consumer>> = self.inner.groups.read().values().cloned().collect();
        let mut out = Vec::new();
        for g in groups {
            if !subject.is_empty() && g.options.filter.as_str() != subject {
                continue;
            }
            let snapshot = g.snapshot();
            for m in snapshot.members {
                out.push(SubscriptionInfo {
                    subject: g.options.filter.as_str().to_owned(),
                    queue_group: g.options.queue_group.clone().unwrap_or_default(),
                    pending: snapshot.pending as u64,
                    stream: g.durable.first().cloned(),
                    member: m,
                });
            }
        }
        out.sort_by(|a, b| a.member.subscription_id.cmp(&b.member.subscription_id));
        out
    }

    /// Stats of subjects and groups matching `filter` (everything when `None`).
    pub fn stats(&self, filter: Option<&SubjectFilter>) -> (Vec<SubjectStat>, Vec<GroupStat>) {
        let mut subjects: Vec<SubjectStat> = self
            .inner
            .subjects
            .lock()
            .iter()
            .filter(|(s, _)| filter.is_none_or(|f| f.matches(s)))
            .map(|(s, c)| SubjectStat {
                subject: s.clone(),
                published: c.published,
                duplicates: c.duplicates,
                rate: c.rate,
            })
            .collect();
        subjects.sort_by(|a, b| a.subject.cmp(&b.subject));
        let groups: Vec<Arc<Consumer>> = self.inner.groups.read().values().cloned().collect();
        let rates = self.inner.group_rates.lock().clone();
        let mut out: Vec<GroupStat> = groups
            .iter()
            .filter(|g| filter.is_none_or(|f| f.overlaps(&g.options.filter)))
            .map(|g| GroupStat {
                subject: g.options.filter.as_str().to_owned(),
                group: group_label(g),
                stream: g.durable.first().cloned(),
                snapshot: g.snapshot(),
                rate: rates.get(&g.id).map_or(0.0, |r| r.1),
            })
            .collect();
        out.sort_by(|a, b| (&a.subject, &a.group).cmp(&(&b.subject, &b.group)));
        (subjects, out)
    }

    /// The durable log (stream stats, dead letters).
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.inner.log
    }

    /// Dead letters stored under `subject`, from `from_sequence` (0 = oldest), at most `limit`.
    ///
    /// # Errors
    /// `Unavailable` when the store is down.
    pub async fn dead_letters(
        &self,
        subject: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, EventBusError> {
        let from = if from_sequence == 0 {
            StartPosition::All
        } else {
            StartPosition::Sequence(from_sequence)
        };
        let stored = self.inner.log.read_range(subject, &from, limit).await?;
        Ok(stored
            .into_iter()
            .map(|s| {
                let mut event = s.event;
                let header =
                    |event: &mut Event, name: &str| event.headers.remove(name).unwrap_or_default();
                let reason = header(&mut event, DEAD_LETTER_REASON);
                let original = header(&mut event, DEAD_LETTER_SUBJECT);
                let deliveries = header(&mut event, DEAD_LETTER_DELIVERIES)
                    .parse()
                    .unwrap_or(0);
                let group = header(&mut event, DEAD_LETTER_GROUP);
                let dead_at_ms = header(&mut event, DEAD_LETTER_AT)
                    .parse()
                    .unwrap_or(s.stored_at_ms);
                if !original.is_empty() {
                    event.subject = original;
                }
                let original_id = header(&mut event, DEAD_LETTER_ID);
                if !original_id.is_empty() {
                    event.id = original_id;
                }
                DeadLetter {
                    sequence: s.sequence,
                    event,
                    reason,
                    deliveries,
                    group,
                    dead_at_ms,
                }
            })
            .collect())
    }

    /// Publishes dead letters again (to `to_subject`, else their original subject) with fresh
    /// ids, then removes them. Empty `sequences` = the oldest `limit`.
    ///
    /// # Errors
    /// `Unavailable` when the store is down; as [`Bus::publish`] for `to_subject`.
    pub async fn redrive(
        &self,
        subject: &str,
        sequences: &[u64],
        to_subject: Option<&str>,
        limit: usize,
    ) -> Result<u64, EventBusError> {
        let chosen = self.select_dead(subject, sequences, limit).await?;
        if !sequences.is_empty() && chosen.is_empty() {
            return Err(EventBusError::NotFound(format!(
                "no dead letter with those sequences under {subject}"
            )));
        }
        let mut done = Vec::new();
        let mut redriven = 0;
        for d in chosen {
            let mut event = d.event;
            if let Some(to) = to_subject {
                to.clone_into(&mut event.subject);
            }
            let original_id = std::mem::replace(&mut event.id, new_ulid(now_ms()));
            event.headers.insert(REDRIVEN_FROM.into(), original_id);
            self.publish(event).await?;
            redriven += 1;
            done.push(d.sequence);
            if done.len() >= 100 {
                self.inner.log.delete(subject, &done).await?;
                done.clear();
            }
        }
        if !done.is_empty() {
            self.inner.log.delete(subject, &done).await?;
        }
        Ok(redriven)
    }

    /// Deletes dead letters (empty `sequences` = all).
    ///
    /// # Errors
    /// `Unavailable` when the store is down.
    pub async fn purge(&self, subject: &str, sequences: &[u64]) -> Result<u64, EventBusError> {
        if !sequences.is_empty() {
            return self.inner.log.delete(subject, sequences).await;
        }
        let mut total = 0;
        loop {
            let batch = self
                .inner
                .log
                .read_range(subject, &StartPosition::All, crate::log::MAX_BATCH)
                .await?;
            if batch.is_empty() {
                return Ok(total);
            }
            let seqs: Vec<u64> = batch.iter().map(|s| s.sequence).collect();
            total += self.inner.log.delete(subject, &seqs).await?;
        }
    }

    async fn select_dead(
        &self,
        subject: &str,
        sequences: &[u64],
        limit: usize,
    ) -> Result<Vec<DeadLetter>, EventBusError> {
        if sequences.is_empty() {
            return self.dead_letters(subject, 0, limit).await;
        }
        let first = sequences.iter().copied().min().unwrap_or(0);
        let wanted: std::collections::HashSet<u64> = sequences.iter().copied().collect();
        let mut out = Vec::new();
        let mut from = first;
        while out.len() < wanted.len() {
            let batch = self
                .dead_letters(subject, from.max(1), crate::log::MAX_BATCH)
                .await?;
            let Some(last) = batch.last().map(|d| d.sequence) else {
                break;
            };
            out.extend(batch.into_iter().filter(|d| wanted.contains(&d.sequence)));
            from = last + 1;
        }
        Ok(out)
    }
}

/// A subscription as listed.
#[derive(Debug, Clone)]
pub struct SubscriptionInfo {
    /// Filter.
    pub subject: String,
    /// Queue group, empty without one.
    pub queue_group: String,
    /// The group's pending events.
    pub pending: u64,
    /// Durable stream read.
    pub stream: Option<String>,
    /// The member's own state.
    pub member: MemberInfo,
}

/// An open subscription: deliveries and advisories arrive on `rx`; the handle acks. Dropping
/// the handle closes the subscription (its unacked deliveries go back to the group).
pub struct Subscription {
    /// Unique id.
    pub id: String,
    /// Durable stream read, if any.
    pub stream: Option<String>,
    /// Deliveries and advisories.
    pub rx: mpsc::Receiver<Outbound>,
    /// Acks and replies.
    pub handle: SubscriptionHandle,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Acks, naks and replies of one subscription.
pub struct SubscriptionHandle {
    bus: Bus,
    group: Arc<Consumer>,
    member: u64,
}

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl SubscriptionHandle {
    /// Acknowledges deliveries; returns how many were known.
    pub fn ack(&self, ids: &[u64]) -> u64 {
        let (known, effects) = self.group.ack(self.member, ids, now_ms());
        self.bus.apply(&self.group, effects);
        known
    }

    /// The member wrote `count` deliveries to the wire (frees credit under ack policy NONE).
    pub fn sent(&self, count: u32) {
        if self.group.options.ack_policy == AckPolicy::None {
            let effects = self.group.sent(self.member, count, now_ms());
            self.bus.apply(&self.group, effects);
        }
    }

    /// Redelivers after `delay` (or the backoff); false when the delivery is unknown.
    pub fn nak(&self, id: u64, delay: Option<Duration>) -> bool {
        let (known, effects) = self.group.nak(self.member, id, delay, now_ms());
        self.bus.apply(&self.group, effects);
        known
    }

    /// Restarts a delivery's ack deadline; false when unknown.
    pub fn in_progress(&self, id: u64) -> bool {
        self.group.in_progress(self.member, id, now_ms())
    }

    /// Dead-letters a delivery now; false when unknown.
    pub fn terminate(&self, id: u64, reason: &str) -> bool {
        let (known, effects) = self.group.terminate(self.member, id, reason, now_ms());
        self.bus.apply(&self.group, effects);
        known
    }

    /// Answers delivery `id` (a request) with `reply`; the delivery counts as acked.
    ///
    /// # Errors
    /// `NotFound` for an unknown delivery; `InvalidArgument` when it has no reply subject or
    /// the reply is invalid.
    pub async fn reply(
        &self,
        id: u64,
        mut reply: Event,
        responder: &str,
    ) -> Result<(), EventBusError> {
        let (original, effects) = self.group.take_for_reply(self.member, id, now_ms());
        self.bus.apply(&self.group, effects);
        let Some(original) = original else {
            return Err(EventBusError::NotFound(format!(
                "delivery {id} is not in flight on this subscription"
            )));
        };
        if original.reply_to.is_empty() {
            return Err(EventBusError::invalid(
                "reply.delivery_id",
                "the delivered event has no reply_to",
            ));
        }
        reply.subject.clone_from(&original.reply_to);
        if reply.correlation_id.is_empty() {
            reply.correlation_id.clone_from(&original.correlation_id);
        }
        reply
            .headers
            .insert("responder".to_owned(), responder.to_owned());
        // The reply continues the request's trace unless the responder says otherwise.
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = original.headers.get(name) {
                reply
                    .headers
                    .entry(name.to_owned())
                    .or_insert_with(|| value.clone());
            }
        }
        self.bus.publish(reply).await.map(|_| ())
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.bus.close_member(&self.group, self.member);
    }
}

fn group_label(group: &Consumer) -> String {
    match (&group.options.queue_group, &group.options.durable_name) {
        (Some(g), _) => g.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => group
            .log_group
            .strip_prefix("s:")
            .unwrap_or(&group.log_group)
            .to_owned(),
    }
}

/// Reads a durable stream for one group, as far as its queue has room.
/// Instance → (whether its plain subscriptions get the event, the groups chosen there).
type Forwards = HashMap<String, (bool, Vec<String>)>;

/// The cluster-wide identity of a named group (`q:<group>|<filter>`); `None` without a name.
fn cluster_group(group: &Consumer) -> Option<&str> {
    (group.options.queue_group.is_some() || group.options.durable_name.is_some())
        .then_some(group.log_group.as_str())
}

/// Which instances get `event` (instance → (plain subscriptions, chosen groups)), and the
/// local named groups that another instance was chosen for.
fn plan_forwards<'a>(
    view: &'a ClusterView,
    local: &'a [Arc<Consumer>],
    event: &Event,
) -> (Forwards, HashSet<String>) {
    let broadcast = event.subject.starts_with(BROADCAST_PREFIX);
    let mut forwards: Forwards = HashMap::new();
    // Candidates per named group: `None` is this instance.
    let mut named: HashMap<&'a str, Vec<(Option<&'a str>, u32)>> = HashMap::new();
    view.for_each_match(&event.subject, |instance, interest| {
        match (&interest.group, broadcast) {
            (None, _) | (Some(_), true) => {
                forwards.entry(instance.to_owned()).or_default().0 = true;
            }
            (Some(group), false) => named
                .entry(group.as_str())
                .or_default()
                .push((Some(instance), interest.members)),
        }
    });
    let mut skip = HashSet::new();
    if broadcast {
        return (forwards, skip);
    }
    for g in local {
        if let Some(id) = cluster_group(g) {
            named
                .entry(id)
                .or_default()
                .push((None, u32::try_from(g.member_count()).unwrap_or(u32::MAX)));
        }
    }
    let hash = xxhash_rust::xxh3::xxh3_64(event.id.as_bytes());
    for (group, candidates) in named {
        if candidates.iter().all(|(who, _)| who.is_none()) {
            continue;
        }
        let group_hash = hash ^ xxhash_rust::xxh3::xxh3_64(group.as_bytes());
        if let Some(Some(instance)) = pick_weighted(&candidates, group_hash) {
            forwards
                .entry(instance.to_owned())
                .or_default()
                .1
                .push(group.to_owned());
            skip.insert(group.to_owned());
        }
    }
    forwards.retain(|_, (plain, groups)| *plain || !groups.is_empty());
    (forwards, skip)
}

/// Applies what the backplane hands over, while the bus lives.
async fn cluster_inbound(inner: Weak<Inner>, mut inbound: mpsc::Receiver<Inbound>) {
    while let Some(message) = inbound.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let bus = Bus { inner };
        match message {
            Inbound::Forward(forward) => bus.accept_forward(*forward),
            Inbound::Interests {
                instance,
                interests,
            } => {
                let Some(cluster) = &bus.inner.cluster else {
                    return;
                };
                if instance == bus.inner.config.instance_id {
                    continue;
                }
                let view = {
                    let mut remotes = cluster.remotes.lock();
                    let unchanged = match remotes.get(&instance) {
                        Some(known) => *known == interests,
                        None => interests.is_empty(),
                    };
                    if unchanged {
                        continue;
                    }
                    if interests.is_empty() {
                        remotes.remove(&instance);
                    } else {
                        remotes.insert(instance, interests);
                    }
                    ClusterView::new(&remotes)
                };
                *cluster.view.write() = Arc::new(view);
            }
        }
    }
}

/// Advertises this instance's interests when they change (and at start), while the bus lives.
async fn cluster_advertise(inner: Weak<Inner>, changed: Arc<Notify>) {
    let mut last: Option<Vec<Interest>> = None;
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            let bus = Bus { inner };
            let interests = bus.interests();
            if last.as_ref() != Some(&interests) {
                if let Some(cluster) = &bus.inner.cluster {
                    cluster.backplane.advertise(interests.clone());
                }
                last = Some(interests);
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn read_durable(inner: Weak<Inner>, group: Arc<Consumer>, stream: String) {
    let min_idle = group.options.ack_wait + Duration::from_secs(1);
    let claim_every = (group.options.ack_wait / 2).max(Duration::from_millis(500));
    let mut last_claim: Option<tokio::time::Instant> = None;
    let mut failures: u32 = 0;
    loop {
        if group.is_closed() {
            return;
        }
        // Only the log is held while waiting in it, so a dropped bus ends this task.
        let Some(log) = inner.upgrade().map(|inner| inner.log.clone()) else {
            return;
        };
        let room = group.room().min(crate::log::MAX_BATCH).min(256);
        if room < 16 {
            tokio::select! {
                () = group.room.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        }
        let (log_group, consumer) = (&group.log_group, &group.log_consumer);
        let now = tokio::time::Instant::now();
        let claiming = last_claim.is_none_or(|at| now.duration_since(at) >= claim_every);
        let result = if claiming {
            last_claim = Some(now);
            log.claim_stalled(&stream, log_group, consumer, min_idle, room)
                .await
                .map(|claimed| {
                    claimed
                        .into_iter()
                        .map(|c| (c.stored, c.delivery_count.saturating_sub(1)))
                        .collect::<Vec<_>>()
                })
        } else {
            log.read_group(
                &stream,
                log_group,
                consumer,
                room,
                Duration::from_millis(500),
            )
            .await
            .map(|events| events.into_iter().map(|e| (e, 0)).collect::<Vec<_>>())
        };
        let Some(bus) = inner.upgrade().map(|inner| Bus { inner }) else {
            return;
        };
        match result {
            Ok(events) => {
                failures = 0;
                offer_stored(&bus, &group, events);
            }
            Err(e) => {
                bus.inner.counters.log_errors.inc();
                if claiming {
                    tracing::debug!(error = %e, stream = %stream, "claiming stalled deliveries failed");
                    continue;
                }
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %e, stream = %stream, "reading a durable stream failed");
                }
                drop(bus);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn offer_stored(bus: &Bus, group: &Arc<Consumer>, events: Vec<(crate::log::StoredEvent, u32)>) {
    let now = now_ms();
    if group.is_closed() {
        // Read after the group closed: give them straight back.
        let effects = Effects {
            log_release: events.iter().map(|(s, _)| s.sequence).collect(),
            ..Effects::default()
        };
        bus.apply(group, effects);
        return;
    }
    for (stored, deliveries) in events {
        let effects = group.offer(
            Pending::new(Arc::new(stored.event), deliveries, stored.sequence),
            now,
        );
        bus.apply(group, effects);
    }
}

/// Runs the dedup stage ([`DedupStage`]): claims the client ids of whatever queued, in one
/// round trip, then routes or answers as duplicate every publish in order. When the cluster
/// cannot be asked (Redis down or slow), the events are delivered — dedup falls back to this
/// instance's window (at least once, never lost) — and counted in `cluster_dedup_errors`.
async fn cluster_dedup(
    weak: Weak<Inner>,
    mut rx: mpsc::Receiver<Staged>,
    queued: Arc<AtomicUsize>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, DEDUP_STAGE_BATCH).await > 0 {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let Some(cluster) = inner.cluster.as_ref() else {
            return;
        };
        let ids: Vec<String> = batch
            .iter()
            .filter(|s| s.claim)
            .map(|s| s.event.id.clone())
            .collect();
        let asked = ids.len();
        let claims = if ids.is_empty() {
            Ok(Vec::new())
        } else {
            cluster
                .backplane
                .claim_ids(ids, inner.config.dedup_window)
                .await
        };
        let mut claims = claims
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, ids = asked, "cluster dedup unavailable: deduplicated on this instance only");
                inner
                    .counters
                    .cluster_dedup_errors
                    .inc_by(asked as u64);
                vec![true; asked]
            })
            .into_iter();
        let bus = Bus { inner };
        let now = now_ms();
        let routed = batch.len();
        for staged in batch.drain(..) {
            let new = !staged.claim || claims.next().unwrap_or(true);
            let outcome = if new {
                bus.deliver_ephemeral(staged.event, now)
            } else {
                bus.duplicate(staged.event)
            };
            let _ = staged.reply.send(Ok(outcome));
        }
        queued.fetch_sub(routed, Ordering::AcqRel);
    }
}

/// Ack deadlines, delayed redeliveries and expiry every 10 ms; rates every 5 s; retention
/// every 30 s.
async fn housekeeping(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let bus = Bus { inner };
        let now = now_ms();
        let groups: Vec<Arc<Consumer>> = bus.inner.groups.read().values().cloned().collect();
        for g in &groups {
            let effects = g.tick(now);
            bus.apply(g, effects);
        }
        if n.is_multiple_of(100) {
            bus.backplane_shed_advisories(now);
        }
        if n.is_multiple_of(500) {
            update_rates(&bus.inner, &groups, 5.0);
        }
        if n.is_multiple_of(3000) {
            let log = bus.inner.log.clone();
            let retention = bus.inner.config.retention;
            let streams: Vec<String> = bus
                .inner
                .config
                .durable
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect();
            tokio::spawn(async move {
                for s in streams {
                    if let Err(e) = log.trim(&s, &retention).await {
                        tracing::debug!(error = %e, stream = %s, "trimming failed");
                    }
                }
            });
        }
    }
}

fn update_rates(inner: &Inner, groups: &[Arc<Consumer>], seconds: f64) {
    for c in inner.subjects.lock().values_mut() {
        let delta = c.published.saturating_sub(c.previous);
        c.previous = c.published;
        // Smoothed over about a minute (12 samples of 5 s).
        c.rate = c.rate + (delta as f64 / seconds - c.rate) / 12.0;
    }
    let mut rates = inner.group_rates.lock();
    for g in groups {
        let delivered = g.snapshot().counters.delivered;
        let entry = rates.entry(g.id).or_insert((delivered, 0.0));
        let delta = delivered.saturating_sub(entry.0);
        entry.0 = delivered;
        entry.1 += (delta as f64 / seconds - entry.1) / 12.0;
    }
}
