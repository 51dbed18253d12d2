//! The Redis backplane between event bus instances (see [`crate::cluster`]).
//!
//! - **Adverts**: each instance writes its interests (a `ClusterAdvert`, protobuf) into the
//!   hash `<prefix>:bus:interest` under its instance id and announces the change on the
//!   channel `<prefix>:bus:changed`. It rewrites the advert every [`REFRESH`] with a bumped
//!   generation; a reader that sees a generation unchanged for [`ADVERT_TTL`] (by its own
//!   clock, so clocks need not agree) forgets that instance and removes its advert, so the
//!   interests of an instance that died vanish within that time. Dropping the backplane
//!   removes the advert at once (best effort: a process that exits first leaves it to expire).
//! - **Forwards**: an event for instance X is `PUBLISH`ed (a `ClusterForward`) on
//!   `<prefix>:bus:to:X`, which only X subscribes to. Publishes are pipelined by one writer
//!   task in the order they were handed over; its queue is bounded ([`OUTBOX`]) and sheds by
//!   priority: when full, a forward pushes out the oldest queued one of a lower priority, or is
//!   dropped when there is none (the bus counts both and publishes a shed advisory).
//! - The listener never waits for the bus: received forwards go into an inbox that sheds the
//!   same way (counted in [`Backplane::shed_on_arrival`]) and adverts into a map with the
//!   latest per instance; a hand-over task feeds both to the bus. So a bus that falls behind
//!   sheds LOW first instead of Redis buffering the channel up to its output limit and then
//!   closing the connection with every priority on it.
//! - Each instance re-reads every advert when it (re)subscribes and every [`REFRESH`], so a
//!   missed announcement (a dropped pub/sub connection) heals by itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::eventbus::v1 as pb;
use futures::StreamExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec};
use prost::Message;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc, watch};

use crate::cluster::{
    Backplane, Forward, Handed, INBOUND_QUEUE, IdClaims, Inbound, Interest, ShedQueue,
};
use crate::event::Priority;
use crate::wire::{decode_publish, encode_event};

/// How often an instance rewrites its advert and re-reads the others'.
pub const REFRESH: Duration = Duration::from_secs(1);
/// An advert not rewritten for this long is gone.
pub const ADVERT_TTL: Duration = Duration::from_secs(3);
/// Forwards queued for the writer before lower priorities are shed.
pub const OUTBOX: usize = 65_536;
/// Messages waiting for the bus in the channel behind the inbox (forwards beyond wait in the
/// inbox, which sheds by priority; [`INBOUND_QUEUE`] of them).
const HANDOVER: usize = 1024;
/// Most publishes in one pipeline.
const PIPELINE: usize = 512;

/// The Redis backplane of one instance.
pub struct RedisBackplane {
    conn: ConnectionManager,
    instance: String,
    prefix: String,
    adverts: watch::Sender<Vec<Interest>>,
    outbox: Arc<Lane<(String, Vec<u8>)>>,
    inbox: Arc<Inbox>,
    /// The receiving side's shed counters (the family of `inbox.shed`).
    shed_family: IntCounterVec,
}

/// A queue between two tasks that sheds by priority ([`ShedQueue`]): forwards waiting for
/// the writer (channel, encoded forward), and forwards received waiting for the bus.
struct Lane<T> {
    queue: Mutex<ShedQueue<T>>,
    ready: Notify,
    closed: AtomicBool,
}

impl<T> Lane<T> {
    fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(ShedQueue::new(capacity)),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `entry`, never waiting.
    fn push(&self, priority: Priority, entry: T) -> Handed {
        let handed = self.queue.lock().push(priority, entry);
        if handed != Handed::Dropped {
            self.ready.notify_one();
        }
        handed
    }

    /// Waits for entries and moves up to `most` of them into `into`; returns with nothing
    /// once the lane is closed and empty.
    async fn take(&self, most: usize, into: &mut Vec<T>) {
        loop {
            {
                let mut queue = self.queue.lock();
                while into.len() < most {
                    let Some(entry) = queue.pop() else { break };
                    into.push(entry);
                }
            }
            if !into.is_empty() || self.closed.load(Ordering::Acquire) {
                return;
            }
            self.ready.notified().await;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

/// What the listener has for the bus, taken by the hand-over task so the listener never
/// waits for the bus.
struct Inbox {
    forwards: Lane<Forward>,
    /// The latest interests of each instance, not handed to the bus yet (a newer advert
    /// replaces an older one, so this holds one entry per instance at most).
    interests: Mutex<HashMap<String, Vec<Interest>>>,
    interests_ready: Notify,
    /// Forwards dropped to stay within the bound, by priority (lowest first): the receiving
    /// side of `eventbus_cluster_forwards_shed_total`, counted in place.
    shed: [IntCounter; 4],
}

impl Inbox {
    fn interests(&self, instance: &str, interests: Vec<Interest>) {
        self.interests.lock().insert(instance.to_owned(), interests);
        self.interests_ready.notify_one();
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        self.outbox.close();
    }
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl RedisBackplane {
    /// Starts the backplane of `instance` (writer, advertiser and listener tasks); returns it
    /// and what it hands to the bus. The tasks end when the backplane and the receiver are
    /// dropped (the advert is then removed).
    pub fn start(
        client: redis::Client,
        conn: ConnectionManager,
        prefix: &str,
        instance: &str,
    ) -> (Arc<Self>, mpsc::Receiver<Inbound>) {
        let (adverts, adverts_rx) = watch::channel(Vec::new());
        let shed_family = crate::metrics::forward_shed_family("receiving");
        let outbox = Arc::new(Lane::new(OUTBOX));
        let inbox = Arc::new(Inbox {
            forwards: Lane::new(INBOUND_QUEUE),
            interests: Mutex::new(HashMap::new()),
            interests_ready: Notify::new(),
            shed: crate::metrics::forward_shed_counters(&shed_family),
        });
        let (inbound_tx, inbound_rx) = mpsc::channel(HANDOVER);
        let keys = Keys::new(prefix, instance);
        tokio::spawn(write_forwards(conn.clone(), outbox.clone()));
        tokio::spawn(advertise(conn.clone(), keys.clone(), adverts_rx));
        tokio::spawn(hand_over(inbox.clone(), inbound_tx.clone()));
        tokio::spawn(listen(
            client,
            conn.clone(),
            keys,
            inbox.clone(),
            inbound_tx,
        ));
        let plane = Arc::new(Self {
            conn,
            instance: instance.to_owned(),
            prefix: prefix.to_owned(),
            adverts,
            outbox,
            inbox,
            shed_family,
        });
        (plane, inbound_rx)
    }

    /// Registers the receiving side of `eventbus_cluster_forwards_shed_total` (the bus
    /// registers the sending side; the registry shows both as one family).
    ///
    /// # Errors
    /// When it is already registered.
    pub fn register_metrics(
        &self,
        registry: &prometheus::Registry,
    ) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.shed_family.clone()))
    }
}

impl Backplane for RedisBackplane {
    fn advertise(&self, interests: Vec<Interest>) {
        self.adverts.send_replace(interests);
    }

    fn send(&self, to: &str, forward: Forward) -> Handed {
        let priority = forward.event.priority;
        let message = pb::ClusterForward {
            from: forward.from,
            event: Some(encode_event(&forward.event)),
            plain: forward.plain,
            groups: forward.groups,
        };
        let channel = format!("{}:bus:to:{to}", self.prefix);
        self.outbox
            .push(priority, (channel, message.encode_to_vec()))
    }

    fn shed_on_arrival(&self) -> [u64; 4] {
        self.inbox.shed.each_ref().map(IntCounter::get)
    }

    fn claims_ids(&self) -> bool {
        true
    }

    /// One pipelined `SET <prefix>:bus:dedup:<xxh3-128 of id> 1 NX PX <window>` per id: the
    /// first instance to set the key owns the id for the window.
    fn claim_ids(&self, ids: Vec<String>, window: Duration) -> BoxFuture<'static, IdClaims> {
        let mut conn = self.conn.clone();
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        for id in &ids {
            let key = format!(
                "{}:bus:dedup:{:032x}",
                self.prefix,
                xxhash_rust::xxh3::xxh3_128(id.as_bytes())
            );
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(window_ms);
        }
        Box::pin(async move {
            let query = pipe.query_async::<Vec<Option<String>>>(&mut conn);
            match tokio::time::timeout(CLAIM_TIMEOUT, query).await {
                Ok(Ok(replies)) if replies.len() == ids.len() => {
                    Ok(replies.iter().map(Option::is_some).collect())
                }
                Ok(Ok(replies)) => Err(format!(
                    "redis answered {} of {} dedup claims",
                    replies.len(),
                    ids.len()
                )),
                Ok(Err(e)) => Err(format!("redis dedup claim failed: {e}")),
                Err(_) => Err(format!(
                    "redis dedup claim timed out after {CLAIM_TIMEOUT:?}"
                )),
            }
        })
    }
}

/// Longest wait for Redis to answer a batch of dedup claims.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Keys {
    instance: String,
    interest: String,
    changed: String,
    inbox: String,
}

impl Keys {
    fn new(prefix: &str, instance: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            interest: format!("{prefix}:bus:interest"),
            changed: format!("{prefix}:bus:changed"),
            inbox: format!("{prefix}:bus:to:{instance}"),
        }
    }
}

/// Publishes queued forwards, pipelined, until the backplane is dropped.
async fn write_forwards(mut conn: ConnectionManager, outbox: Arc<Lane<(String, Vec<u8>)>>) {
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        outbox.take(PIPELINE, &mut batch).await;
        if batch.is_empty() {
            return; // closed
        }
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.drain(..) {
            pipe.publish(channel, payload).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "event bus backplane: publishing forwards failed");
        }
    }
}

/// Keeps this instance's advert current; removes it when the backplane is dropped.
async fn advertise(
    mut conn: ConnectionManager,
    keys: Keys,
    mut adverts: watch::Receiver<Vec<Interest>>,
) {
    let mut generation: u64 = 0;
    loop {
        generation += 1;
        let interests = adverts.borrow_and_update().clone();
        let advert = pb::ClusterAdvert {
            instance: keys.instance.clone(),
            interests: interests
                .into_iter()
                .map(|i| pb::ClusterInterest {
                    filter: i.filter,
                    group: i.group.unwrap_or_default(),
                    members: i.members,
                })
                .collect(),
            generation,
        };
        let written: redis::RedisResult<()> = redis::pipe()
            .hset(&keys.interest, &keys.instance, advert.encode_to_vec())
            .ignore()
            .publish(&keys.changed, &keys.instance)
            .ignore()
            .query_async(&mut conn)
            .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "event bus backplane: writing the advert failed");
        }
        tokio::select! {
            changed = adverts.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(REFRESH) => {}
        }
    }
    let _: redis::RedisResult<()> = redis::pipe()
        .hdel(&keys.interest, &keys.instance)
        .ignore()
        .publish(&keys.changed, &keys.instance)
        .ignore()
        .query_async(&mut conn)
        .await;
}

/// Subscribes to announcements and this instance's forwards, re-subscribing after a lost
/// connection, until the bus drops its receiver.
async fn listen(
    client: redis::Client,
    mut conn: ConnectionManager,
    keys: Keys,
    inbox: Arc<Inbox>,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut known = Known::new();
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&keys.changed).await?;
            pubsub.subscribe(&keys.inbox).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        let mut messages = tokio::select! {
            () = inbound.closed() => return,
            s = subscribed => match s {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "event bus backplane: subscribing failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        refresh_all(&mut conn, &keys, &mut known, &inbox).await;
        let mut tick = tokio::time::interval(REFRESH);
        tick.reset();
        loop {
            tokio::select! {
                () = inbound.closed() => return,
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let channel = message.get_channel_name();
                    if channel == keys.inbox {
                        match pb::ClusterForward::decode(message.get_payload_bytes()) {
                            Ok(forward) => receive(forward, &inbox),
                            Err(e) => {
                                tracing::debug!(error = %e, "event bus backplane: undecodable forward");
                            }
                        }
                    } else {
                        let instance = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                        refresh_one(&mut conn, &keys, &instance, &mut known, &inbox).await;
                    }
                }
                _ = tick.tick() => refresh_all(&mut conn, &keys, &mut known, &inbox).await,
            }
        }
        tracing::debug!("event bus backplane: pub/sub connection lost; re-subscribing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Queues a received forward for the bus without waiting, so the pub/sub connection is read
/// at once whatever the bus's pace: when the bus falls behind, the inbox sheds LOW first
/// rather than Redis buffering (and at its limit dropping the connection with everything on
/// it).
fn receive(forward: pb::ClusterForward, inbox: &Inbox) {
    let Ok(event) = decode_publish(forward.event, "event") else {
        return; // expired on the way, or not a valid event: nothing to deliver
    };
    let priority = event.priority;
    let forward = Forward {
        from: forward.from,
        event,
        plain: forward.plain,
        groups: forward.groups,
    };
    let shed = match inbox.forwards.push(priority, forward) {
        Handed::Queued => return,
        Handed::QueuedShedding(lower) => lower,
        Handed::Dropped => priority,
    };
    inbox.shed[shed.index()].inc();
}

/// Hands interests and received forwards (in the order they came) to the bus, until the bus
/// is gone.
async fn hand_over(inbox: Arc<Inbox>, inbound: mpsc::Sender<Inbound>) {
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        tokio::select! {
            () = inbound.closed() => return,
            () = inbox.interests_ready.notified() => {}
            () = inbox.forwards.take(PIPELINE, &mut batch) => {}
        }
        let adverts: Vec<(String, Vec<Interest>)> = inbox.interests.lock().drain().collect();
        for (instance, interests) in adverts {
            let message = Inbound::Interests {
                instance,
                interests,
            };
            if inbound.send(message).await.is_err() {
                return;
            }
        }
        for forward in batch.drain(..) {
            if inbound
                .send(Inbound::Forward(Box::new(forward)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Instances with a live advert: the generation last seen and when it last moved.
type Known = HashMap<String, (u64, Instant)>;

/// An advert's generation and interests, or `None` when it does not decode.
fn decode_advert(bytes: &[u8]) -> Option<(u64, Vec<Interest>)> {
    let advert = pb::ClusterAdvert::decode(bytes).ok()?;
    let interests = advert
        .interests
        .into_iter()
        .map(|i| Interest {
            filter: i.filter,
            group: (!i.group.is_empty()).then_some(i.group),
            members: i.members,
        })
        .collect();
    Some((advert.generation, interests))
}

/// Whether an advert with `generation` is still alive, remembering when it last moved.
fn alive(known: &mut Known, instance: &str, generation: u64, now: Instant) -> bool {
    match known.get_mut(instance) {
        Some((seen, at)) if *seen == generation => now.duration_since(*at) <= ADVERT_TTL,
        Some(entry) => {
            *entry = (generation, now);
            true
        }
        None => {
            known.insert(instance.to_owned(), (generation, now));
            true
        }
    }
}

/// Re-reads one instance's advert after an announcement.
async fn refresh_one(
    conn: &mut ConnectionManager,
    keys: &Keys,
    instance: &str,
    known: &mut Known,
    inbox: &Inbox,
) {
    if instance == keys.instance {
        return;
    }
    let bytes: Option<Vec<u8>> = match conn.hget(&keys.interest, instance).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(error = %e, "event bus backplane: reading an advert failed");
            return;
        }
    };
    let interests = match bytes.as_deref().and_then(decode_advert) {
        Some((generation, interests)) => {
            // An announcement means the instance is alive.
            known.insert(instance.to_owned(), (generation, Instant::now()));
            interests
        }
        None => {
            known.remove(instance);
            Vec::new()
        }
    };
    inbox.interests(instance, interests);
}

/// Re-reads every advert: hands over the live ones, forgets instances whose advert is gone
/// and removes expired adverts.
async fn refresh_all(conn: &mut ConnectionManager, keys: &Keys, known: &mut Known, inbox: &Inbox) {
    let all: Vec<(String, Vec<u8>)> = match conn.hgetall(&keys.interest).await {
        Ok(all) => all,
        Err(e) => {
            tracing::debug!(error = %e, "event bus backplane: reading adverts failed");
            return;
        }
    };
    let now = Instant::now();
    let mut live = HashSet::new();
    for (instance, bytes) in all {
        if instance == keys.instance {
            continue;
        }
        let advert = decode_advert(&bytes)
            .filter(|(generation, _)| alive(known, &instance, *generation, now));
        match advert {
            Some((_, interests)) => {
                inbox.interests(&instance, interests);
                live.insert(instance);
            }
            None => {
                let _: redis::RedisResult<()> = conn.hdel(&keys.interest, &instance).await;
            }
        }
    }
    let gone: Vec<String> = known
        .keys()
        .filter(|id| !live.contains(*id))
        .cloned()
        .collect();
    for instance in gone {
        known.remove(&instance);
        inbox.interests(&instance, Vec::new());
    }
}
