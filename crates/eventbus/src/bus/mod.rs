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
//!
//! The parts, one concern each: [`publish`] (publishing, dedup, routing), [`subscribe`]
//! (subscriptions and their handles, listing, stats), [`request`], [`settle`] (applying a
//! group's effects: acks, expiry, shed advisories, dead letters), [`dead_letters`] (listing,
//! redrive, purge), [`durable`] (a durable group's reader), [`cluster`] (forwards and
//! interests between instances) and [`housekeeping`]. This file holds the bus's state and
//! how it is built.

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

mod cluster;
mod dead_letters;
mod durable;
mod housekeeping;
mod publish;
mod request;
mod settle;
mod subscribe;

use cluster::{cluster_advertise, cluster_group, cluster_inbound, plan_forwards};
use durable::read_durable;
use housekeeping::housekeeping;
use publish::{DEDUP_STAGE_QUEUE, DedupStage, cluster_dedup};
use subscribe::group_label;
pub use subscribe::{Subscription, SubscriptionHandle, SubscriptionInfo};

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

    /// The durable log (stream stats, dead letters).
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.inner.log
    }
}
