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
//! - Each instance re-reads every advert when it (re)subscribes and every [`REFRESH`], so a
//!   missed announcement (a dropped pub/sub connection) heals by itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::eventbus::v1 as pb;
use futures::StreamExt;
use parking_lot::Mutex;
use prost::Message;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc, watch};

use crate::cluster::{Backplane, Forward, Handed, INBOUND_QUEUE, Inbound, Interest, ShedQueue};
use crate::grpc::{decode_publish, encode_event};

/// How often an instance rewrites its advert and re-reads the others'.
pub const REFRESH: Duration = Duration::from_secs(1);
/// An advert not rewritten for this long is gone.
pub const ADVERT_TTL: Duration = Duration::from_secs(3);
/// Forwards queued for the writer before lower priorities are shed.
pub const OUTBOX: usize = 65_536;
/// Most publishes in one pipeline.
const PIPELINE: usize = 512;

/// The Redis backplane of one instance.
pub struct RedisBackplane {
    instance: String,
    prefix: String,
    adverts: watch::Sender<Vec<Interest>>,
    outbox: Arc<Outbox>,
}

/// Forwards waiting for the writer: (channel, encoded forward).
struct Outbox {
    queue: Mutex<ShedQueue<(String, Vec<u8>)>>,
    ready: Notify,
    closed: AtomicBool,
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        self.outbox.closed.store(true, Ordering::Release);
        self.outbox.ready.notify_one();
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
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(ShedQueue::new(OUTBOX)),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let keys = Keys::new(prefix, instance);
        tokio::spawn(write_forwards(conn.clone(), outbox.clone()));
        tokio::spawn(advertise(conn.clone(), keys.clone(), adverts_rx));
        tokio::spawn(listen(client, conn, keys, inbound_tx));
        let plane = Arc::new(Self {
            instance: instance.to_owned(),
            prefix: prefix.to_owned(),
            adverts,
            outbox,
        });
        (plane, inbound_rx)
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
        let handed = self
            .outbox
            .queue
            .lock()
            .push(priority, (channel, message.encode_to_vec()));
        if handed != Handed::Dropped {
            self.outbox.ready.notify_one();
        }
        handed
    }
}

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
async fn write_forwards(mut conn: ConnectionManager, outbox: Arc<Outbox>) {
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        {
            let mut queue = outbox.queue.lock();
            while batch.len() < PIPELINE {
                let Some(entry) = queue.pop() else { break };
                batch.push(entry);
            }
        }
        if batch.is_empty() {
            if outbox.closed.load(Ordering::Acquire) {
                return;
            }
            outbox.ready.notified().await;
            continue;
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
        if !refresh_all(&mut conn, &keys, &mut known, &inbound).await {
            return;
        }
        let mut tick = tokio::time::interval(REFRESH);
        tick.reset();
        loop {
            tokio::select! {
                () = inbound.closed() => return,
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let channel = message.get_channel_name();
                    let ok = if channel == keys.inbox {
                        match pb::ClusterForward::decode(message.get_payload_bytes()) {
                            Ok(forward) => hand_over(forward, &inbound).await,
                            Err(e) => {
                                tracing::debug!(error = %e, "event bus backplane: undecodable forward");
                                true
                            }
                        }
                    } else {
                        let instance = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                        refresh_one(&mut conn, &keys, &instance, &mut known, &inbound).await
                    };
                    if !ok {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if !refresh_all(&mut conn, &keys, &mut known, &inbound).await {
                        return;
                    }
                }
            }
        }
        tracing::debug!("event bus backplane: pub/sub connection lost; re-subscribing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Hands a forward to the bus; false when the bus is gone.
async fn hand_over(forward: pb::ClusterForward, inbound: &mpsc::Sender<Inbound>) -> bool {
    let Ok(event) = decode_publish(forward.event, "event") else {
        return true; // expired on the way, or not a valid event: nothing to deliver
    };
    let forward = Forward {
        from: forward.from,
        event,
        plain: forward.plain,
        groups: forward.groups,
    };
    inbound
        .send(Inbound::Forward(Box::new(forward)))
        .await
        .is_ok()
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
    inbound: &mpsc::Sender<Inbound>,
) -> bool {
    if instance == keys.instance {
        return true;
    }
    let bytes: Option<Vec<u8>> = match conn.hget(&keys.interest, instance).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(error = %e, "event bus backplane: reading an advert failed");
            return true;
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
    inbound
        .send(Inbound::Interests {
            instance: instance.to_owned(),
            interests,
        })
        .await
        .is_ok()
}

/// Re-reads every advert: hands over the live ones, forgets instances whose advert is gone
/// and removes expired adverts.
async fn refresh_all(
    conn: &mut ConnectionManager,
    keys: &Keys,
    known: &mut Known,
    inbound: &mpsc::Sender<Inbound>,
) -> bool {
    let all: Vec<(String, Vec<u8>)> = match conn.hgetall(&keys.interest).await {
        Ok(all) => all,
        Err(e) => {
            tracing::debug!(error = %e, "event bus backplane: reading adverts failed");
            return true;
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
                live.insert(instance.clone());
                let sent = inbound
                    .send(Inbound::Interests {
                        instance,
                        interests,
                    })
                    .await;
                if sent.is_err() {
                    return false;
                }
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
        let sent = inbound
            .send(Inbound::Interests {
                instance,
                interests: Vec::new(),
            })
            .await;
        if sent.is_err() {
            return false;
        }
    }
    true
}
