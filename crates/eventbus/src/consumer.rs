//! One subscription group's dispatch state: a bounded priority queue of pending events shared
//! by the group's members, the deliveries in flight with their ack deadlines, delayed
//! redeliveries, and per-member flow-control credit.
//!
//! A subscription without a queue group is a group of one. Every operation is synchronous
//! under one short lock; what must happen outside it (dead letters to store, durable acks to
//! send to the log, shed advisories to publish) is returned as [`Effects`].
//!
//! Delivery ids are unique within the group. A delivery belongs to the member it was sent to:
//! only that member can ack, nak, extend or terminate it. When a member leaves, its
//! unacknowledged deliveries go back to the head of the queue for the others.
//!
//! Ordering keys: at most one event per key is queued or in flight (it *holds* the key); later
//! events of the key wait behind it, in publish order, and the next is queued at the head of
//! its class when the holder is done with (acked, replied to, dead-lettered, expired, shed, or
//! sent under ack policy NONE). A redelivery keeps holding the key.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};

use crate::event::{Event, Priority};
use crate::priority::{FairnessConfig, PriorityQueue, PushOutcome};
use crate::subject::SubjectFilter;

/// How deliveries are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// Each delivery must be acked within the ack wait or it is redelivered.
    #[default]
    Explicit,
    /// A delivery counts as acked once written to the subscriber (at most once).
    None,
}

/// What a subscription asked for (already validated).
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Subject filter.
    pub filter: SubjectFilter,
    /// Queue group: members share the events.
    pub queue_group: Option<String>,
    /// Only these types (empty = any).
    pub types: Vec<String>,
    /// Only events carrying all of these headers with these values.
    pub headers: Vec<(String, String)>,
    /// Only events of at least this priority.
    pub min_priority: Priority,
    /// Most deliveries unacknowledged at once per member.
    pub max_in_flight: u32,
    /// Time to ack before redelivery.
    pub ack_wait: Duration,
    /// Deliveries before dead-lettering.
    pub max_deliveries: u32,
    /// Delay before the n-th redelivery (the last repeats).
    pub backoff: Vec<Duration>,
    /// Where dead letters go.
    pub dead_letter_subject: String,
    /// Explicit acks or none.
    pub ack_policy: AckPolicy,
    /// Durable subjects without a queue group: the name to resume under.
    pub durable_name: Option<String>,
}

impl ConsumerOptions {
    /// Whether an event passes the type, header and priority filters (the subject already
    /// matched).
    pub fn accepts(&self, event: &Event) -> bool {
        event.priority >= self.min_priority
            && (self.types.is_empty() || self.types.contains(&event.r#type))
            && self
                .headers
                .iter()
                .all(|(k, v)| event.headers.get(k).is_some_and(|have| have == v))
    }
}

/// An event waiting in a group.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The event (shared by every group it was offered to).
    pub event: Arc<Event>,
    /// Times it was delivered to this group before.
    pub deliveries: u32,
    /// Durable stream sequence; 0 for ephemeral events.
    pub sequence: u64,
    /// When it was queued (again), for the queue-wait histogram.
    pub queued_at: Instant,
    /// It holds its ordering key in its group (set when offered).
    keyed: bool,
}

impl Pending {
    /// An event about to be offered, queued now.
    pub fn new(event: Arc<Event>, deliveries: u32, sequence: u64) -> Self {
        Self {
            event,
            deliveries,
            sequence,
            queued_at: Instant::now(),
            keyed: false,
        }
    }
}

/// Time events waited in a group's pending queue before delivery, one histogram per priority
/// (indexed by [`Priority::index`]); `None` records nothing.
pub type QueueWait = Option<Arc<[prometheus::Histogram; 4]>>;

/// What the bus sends to one member.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// An event to handle.
    Delivery(DeliveryOut),
    /// Something the member should know.
    Advisory(AdvisoryOut),
}

/// One delivery.
#[derive(Debug, Clone)]
pub struct DeliveryOut {
    /// Names the delivery in ack, nak, in-progress, terminate and reply.
    pub delivery_id: u64,
    /// The event.
    pub event: Arc<Event>,
    /// 1 for the first delivery.
    pub delivery_count: u32,
    /// Durable stream sequence; 0 for ephemeral events.
    pub sequence: u64,
}

/// Kinds of advisory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvisoryKind {
    /// Pending events dropped to stay within the bound.
    Shed,
    /// Events expired before delivery.
    Expired,
    /// Events dead-lettered.
    DeadLettered,
}

/// An advisory for a member.
#[derive(Debug, Clone)]
pub struct AdvisoryOut {
    /// What happened.
    pub kind: AdvisoryKind,
    /// How many events.
    pub count: u64,
    /// The priority concerned (shedding).
    pub priority: Option<Priority>,
    /// Human-readable detail.
    pub message: String,
}

/// Why an event was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadReason {
    /// Delivered `max_deliveries` times without an ack.
    MaxDeliveries,
    /// Expired before it could be delivered.
    Expired,
    /// The subscriber terminated it, with its reason.
    Terminated(String),
}

impl DeadReason {
    /// The reason as stored with the dead letter.
    pub fn as_string(&self) -> String {
        match self {
            Self::MaxDeliveries => "MAX_DELIVERIES".to_owned(),
            Self::Expired => "EXPIRED".to_owned(),
            Self::Terminated(why) if why.is_empty() => "TERMINATED".to_owned(),
            Self::Terminated(why) => format!("TERMINATED: {why}"),
        }
    }
}

/// Work the caller does outside the group's lock.
#[derive(Debug, Default)]
pub struct Effects {
    /// Events to dead-letter (expired ones only when the bus dead-letters expired events).
    pub dead: Vec<(Pending, DeadReason)>,
    /// Durable sequences the group is done with (acked, dead-lettered, filtered out).
    pub log_acks: Vec<u64>,
    /// Durable sequences it gives back unhandled (it closed): claimable at once by others.
    pub log_release: Vec<u64>,
    /// Events shed, by priority index.
    pub shed: [u64; 4],
    /// Events that expired while waiting.
    pub expired: u64,
}

impl Effects {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.dead.is_empty()
            && self.log_acks.is_empty()
            && self.log_release.is_empty()
            && self.shed == [0; 4]
            && self.expired == 0
    }
}

/// Counters of one group.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupCounters {
    /// Deliveries sent (including redeliveries).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries that were redeliveries.
    pub redelivered: u64,
    /// Events that expired before delivery.
    pub expired: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
    /// Events shed.
    pub shed: u64,
}

/// A member's view, for listings.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// The subscription id.
    pub subscription_id: String,
    /// Its credit.
    pub max_in_flight: u32,
    /// Unacknowledged deliveries it holds.
    pub in_flight: u32,
    /// Deliveries sent to it.
    pub delivered: u64,
    /// Deliveries it acked.
    pub acked: u64,
    /// When it subscribed (ms since the epoch).
    pub opened_at_ms: u64,
}

struct Member {
    id: u64,
    subscription_id: String,
    max_in_flight: u32,
    in_flight: u32,
    tx: mpsc::Sender<Outbound>,
    delivered: u64,
    acked: u64,
    opened_at_ms: u64,
}

struct InFlight {
    pending: Pending,
    member: u64,
    deadline_ms: u64,
}

struct State {
    pending: PriorityQueue<Pending>,
    in_flight: HashMap<u64, InFlight>,
    /// Redeliveries waiting for their delay: (ready at, event).
    delayed: Vec<(u64, Pending)>,
    members: Vec<Member>,
    next_member: usize,
    next_delivery_id: u64,
    /// No ack deadline passes before this.
    next_deadline_ms: u64,
    last_expiry_scan_ms: u64,
    counters: GroupCounters,
    closed: bool,
    /// Ordering keys with an event queued, in flight or waiting for redelivery (the key's
    /// holder), and the key's later events, in publish order.
    keyed: HashMap<String, VecDeque<Pending>>,
    /// Events waiting in `keyed` (they count against the pending bound).
    held: usize,
}

impl State {
    /// Takes `pending`'s ordering key if it has one: true when it may be queued now, false
    /// when an earlier event holds the key (then it waits behind it).
    fn claim_key(&mut self, pending: &mut Pending) -> bool {
        if pending.event.ordering_key.is_empty() {
            return true;
        }
        if self.keyed.contains_key(&pending.event.ordering_key) {
            return false;
        }
        self.keyed
            .insert(pending.event.ordering_key.clone(), VecDeque::new());
        pending.keyed = true;
        true
    }

    /// `pending` is done with (acked, dead-lettered, expired, shed, or sent without acks):
    /// the next event with its ordering key, if any, is queued at the head of its class.
    fn release_key(&mut self, pending: &Pending, now_ms: u64) {
        if !pending.keyed {
            return;
        }
        let key = &pending.event.ordering_key;
        let next = self.keyed.get_mut(key).and_then(VecDeque::pop_front);
        match next {
            Some(mut next) => {
                self.held -= 1;
                next.keyed = true;
                self.requeue_front(next, now_ms);
            }
            None => {
                self.keyed.remove(key);
            }
        }
    }

    /// Puts an event back at the head of its priority class (a redelivery or a return).
    fn requeue_front(&mut self, mut pending: Pending, now_ms: u64) {
        pending.queued_at = Instant::now();
        let priority = pending.event.priority;
        let expires = pending.event.expires_at_ms;
        self.pending.push_front(pending, priority, expires, now_ms);
    }
}

/// One group: its options, durable stream and dispatch state.
pub struct Consumer {
    /// Unique within the bus.
    pub id: u64,
    /// Options of the member that created the group.
    pub options: ConsumerOptions,
    /// The durable streams this group reads, with its log group name.
    pub durable: Vec<String>,
    /// Log group name for durable streams.
    pub log_group: String,
    /// Log consumer name of this incarnation (unique per bus instance and group).
    pub log_consumer: String,
    state: Mutex<State>,
    /// Signalled when pending room appears (durable readers wait on it) or on close.
    pub room: Notify,
    dead_letter_expired: bool,
    queue_wait: QueueWait,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("id", &self.id)
            .field("filter", &self.options.filter.as_str())
            .field("queue_group", &self.options.queue_group)
            .finish_non_exhaustive()
    }
}

/// Settings of a group that come from the bus rather than the subscription.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Unique id.
    pub id: u64,
    /// Pending bound.
    pub capacity: usize,
    /// Priority weights and aging.
    pub fairness: FairnessConfig,
    /// Durable streams it reads.
    pub durable: Vec<String>,
    /// Log group name.
    pub log_group: String,
    /// Log consumer name.
    pub log_consumer: String,
    /// Dead-letter expired events (else only count them).
    pub dead_letter_expired: bool,
    /// Where queue waits are recorded.
    pub queue_wait: QueueWait,
}

impl Consumer {
    /// An empty group.
    pub fn new(options: ConsumerOptions, settings: GroupSettings) -> Self {
        Self {
            id: settings.id,
            options,
            durable: settings.durable,
            log_group: settings.log_group,
            log_consumer: settings.log_consumer,
            state: Mutex::new(State {
                pending: PriorityQueue::new(settings.fairness, settings.capacity),
                in_flight: HashMap::new(),
                delayed: Vec::new(),
                members: Vec::new(),
                next_member: 0,
                next_delivery_id: 1,
                next_deadline_ms: u64::MAX,
                last_expiry_scan_ms: 0,
                counters: GroupCounters::default(),
                closed: false,
                keyed: HashMap::new(),
                held: 0,
            }),
            room: Notify::new(),
            dead_letter_expired: settings.dead_letter_expired,
            queue_wait: settings.queue_wait,
        }
    }

    /// Adds a member with its own credit; deliveries go to `tx`.
    pub fn add_member(
        &self,
        id: u64,
        subscription_id: String,
        max_in_flight: u32,
        tx: mpsc::Sender<Outbound>,
        now_ms: u64,
    ) -> Effects {
        let mut state = self.state.lock();
        state.members.push(Member {
            id,
            subscription_id,
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
            tx,
            delivered: 0,
            acked: 0,
            opened_at_ms: now_ms,
        });
        let mut effects = Effects::default();
        self.pump(&mut state, now_ms, &mut effects);
        effects
    }

    /// Removes a member; its unacknowledged deliveries return to the head of the queue.
    /// Returns whether the group has no member left (it is then closed).
    pub fn remove_member(&self, member: u64, now_ms: u64) -> (bool, Effects) {
        let mut state = self.state.lock();
        state.members.retain(|m| m.id != member);
        let mut returned: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.member == member)
            .map(|(&id, _)| id)
            .collect();
        returned.sort_unstable_by(|a, b| b.cmp(a));
        for id in returned {
            if let Some(f) = state.in_flight.remove(&id) {
                state.requeue_front(f.pending, now_ms);
            }
        }
        let mut effects = Effects::default();
        if state.members.is_empty() {
            state.closed = true;
            // Durable events it held go back to the stream for the next reader.
            let in_flight: Vec<u64> = state
                .in_flight
                .drain()
                .map(|(_, f)| f.pending.sequence)
                .collect();
            let delayed: Vec<u64> = state.delayed.drain(..).map(|(_, p)| p.sequence).collect();
            let held: Vec<u64> = state
                .keyed
                .drain()
                .flat_map(|(_, waiting)| waiting.into_iter().map(|p| p.sequence))
                .collect();
            state.held = 0;
            let pending: Vec<u64> = state
                .pending
                .drain()
                .into_iter()
                .map(|(p, _)| p.sequence)
                .collect();
            effects.log_release = in_flight
                .into_iter()
                .chain(delayed)
                .chain(held)
                .chain(pending)
                .filter(|&s| s != 0)
                .collect();
            drop(state);
            self.room.notify_waiters();
            return (true, effects);
        }
        self.pump(&mut state, now_ms, &mut effects);
        (false, effects)
    }

    /// Members subscribed now.
    pub fn member_count(&self) -> usize {
        self.state.lock().members.len()
    }

    /// Whether the group was closed (its last member left).
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Offers an event (already matched by subject); filtered-out durable events are returned
    /// as log acks.
    pub fn offer(&self, mut pending: Pending, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        if !self.options.accepts(&pending.event) {
            if pending.sequence != 0 {
                effects.log_acks.push(pending.sequence);
            }
            return effects;
        }
        let mut state = self.state.lock();
        if state.closed {
            return effects;
        }
        let priority = pending.event.priority;
        let expires = pending.event.expires_at_ms;
        let outcome = if state.claim_key(&mut pending) {
            state.pending.push(pending, priority, expires, now_ms)
        } else if state.pending.len() + state.delayed.len() + state.held >= state.pending.capacity()
        {
            // Its key is busy and the group is full: it goes (it cannot overtake its key).
            PushOutcome::Shed(vec![(pending, priority)])
        } else {
            let key = pending.event.ordering_key.clone();
            state.keyed.entry(key).or_default().push_back(pending);
            state.held += 1;
            PushOutcome::Queued
        };
        if let PushOutcome::Shed(shed) = outcome {
            for (p, priority) in shed {
                effects.shed[priority.index()] += 1;
                state.counters.shed += 1;
                state.release_key(&p, now_ms);
                if p.sequence != 0 {
                    // Durable readers only read what fits, so this is rare; the event stays
                    // pending in the log and is reclaimed later.
                    tracing::debug!(sequence = p.sequence, "durable event over the group bound");
                }
            }
            let total: u64 = effects.shed.iter().sum();
            let lowest = effects
                .shed
                .iter()
                .position(|&n| n > 0)
                .and_then(Priority::from_index);
            Self::advise(
                &state,
                &AdvisoryOut {
                    kind: AdvisoryKind::Shed,
                    count: total,
                    priority: lowest,
                    message: format!(
                        "{total} pending event(s) shed: the subscription is not keeping up"
                    ),
                },
            );
        }
        self.pump(&mut state, now_ms, &mut effects);
        effects
    }

    /// Sends one event to every member (broadcast subjects), bypassing the shared queue:
    /// a member without room for it misses it and is told.
    pub fn offer_to_all(&self, event: &Arc<Event>, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        if !self.options.accepts(event) {
            return effects;
        }
        let mut state = self.state.lock();
        let ack_wait = duration_ms(self.options.ack_wait);
        let explicit = self.options.ack_policy == AckPolicy::Explicit;
        for i in 0..state.members.len() {
            let id = state.next_delivery_id;
            state.next_delivery_id += 1;
            let member = &mut state.members[i];
            let out = Outbound::Delivery(DeliveryOut {
                delivery_id: id,
                event: event.clone(),
                delivery_count: 1,
                sequence: 0,
            });
            if member.in_flight < member.max_in_flight && member.tx.try_send(out).is_ok() {
                member.in_flight += 1;
                member.delivered += 1;
                let member_id = member.id;
                state.counters.delivered += 1;
                if explicit {
                    state.in_flight.insert(
                        id,
                        InFlight {
                            pending: Pending::new(event.clone(), 1, 0),
                            member: member_id,
                            deadline_ms: now_ms + ack_wait,
                        },
                    );
                    state.next_deadline_ms = state.next_deadline_ms.min(now_ms + ack_wait);
                }
            } else {
                state.counters.shed += 1;
                effects.shed[event.priority.index()] += 1;
            }
        }
        effects
    }

    /// The member wrote `count` deliveries (ack policy NONE: that frees its credit).
    pub fn sent(&self, member: u64, count: u32, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        if self.options.ack_policy != AckPolicy::None {
            return effects;
        }
        let mut state = self.state.lock();
        if let Some(m) = state.members.iter_mut().find(|m| m.id == member) {
            m.in_flight = m.in_flight.saturating_sub(count);
            m.acked += u64::from(count);
        }
        state.counters.acked += u64::from(count);
        self.pump(&mut state, now_ms, &mut effects);
        effects
    }

    /// Acknowledges deliveries of `member`; returns how many were known.
    pub fn ack(&self, member: u64, ids: &[u64], now_ms: u64) -> (u64, Effects) {
        let mut effects = Effects::default();
        let mut state = self.state.lock();
        let mut known = 0;
        for id in ids {
            if let Some(f) = take_owned(&mut state, *id, member) {
                known += 1;
                state.release_key(&f.pending, now_ms);
                state.counters.acked += 1;
                if let Some(m) = state.members.iter_mut().find(|m| m.id == member) {
                    m.acked += 1;
                }
                if f.pending.sequence != 0 {
                    effects.log_acks.push(f.pending.sequence);
                }
            }
        }
        self.pump(&mut state, now_ms, &mut effects);
        (known, effects)
    }

    /// Takes a delivery as answered (a reply acks it) and returns its event.
    pub fn take_for_reply(
        &self,
        member: u64,
        id: u64,
        now_ms: u64,
    ) -> (Option<Arc<Event>>, Effects) {
        let mut effects = Effects::default();
        let mut state = self.state.lock();
        let event = take_owned(&mut state, id, member).map(|f| {
            state.release_key(&f.pending, now_ms);
            state.counters.acked += 1;
            if f.pending.sequence != 0 {
                effects.log_acks.push(f.pending.sequence);
            }
            f.pending.event
        });
        self.pump(&mut state, now_ms, &mut effects);
        (event, effects)
    }

    /// Redeliver a delivery after `delay` (or the backoff when `None`).
    pub fn nak(
        &self,
        member: u64,
        id: u64,
        delay: Option<Duration>,
        now_ms: u64,
    ) -> (bool, Effects) {
        let mut effects = Effects::default();
        let mut state = self.state.lock();
        let Some(f) = take_owned(&mut state, id, member) else {
            return (false, effects);
        };
        self.retry(&mut state, f.pending, delay, now_ms, &mut effects);
        self.pump(&mut state, now_ms, &mut effects);
        (true, effects)
    }

    /// Restarts a delivery's ack deadline.
    pub fn in_progress(&self, member: u64, id: u64, now_ms: u64) -> bool {
        let mut state = self.state.lock();
        let deadline = now_ms + duration_ms(self.options.ack_wait);
        match state.in_flight.get_mut(&id) {
            Some(f) if f.member == member => {
                f.deadline_ms = deadline;
                true
            }
            _ => false,
        }
    }

    /// Dead-letters a delivery now.
    pub fn terminate(&self, member: u64, id: u64, reason: &str, now_ms: u64) -> (bool, Effects) {
        let mut effects = Effects::default();
        let mut state = self.state.lock();
        let Some(f) = take_owned(&mut state, id, member) else {
            return (false, effects);
        };
        self.dead(
            &mut state,
            f.pending,
            DeadReason::Terminated(reason.to_owned()),
            now_ms,
            &mut effects,
        );
        self.pump(&mut state, now_ms, &mut effects);
        (true, effects)
    }

    /// Redelivers what passed its ack deadline, releases delayed redeliveries that are due,
    /// drops expired pending events (every 100 ms), and dispatches.
    pub fn tick(&self, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        let mut state = self.state.lock();
        if state.closed {
            return effects;
        }
        if now_ms >= state.next_deadline_ms {
            let mut next = u64::MAX;
            let mut due = Vec::new();
            for (&id, f) in &state.in_flight {
                if f.deadline_ms <= now_ms {
                    due.push(id);
                } else {
                    next = next.min(f.deadline_ms);
                }
            }
            state.next_deadline_ms = next;
            due.sort_unstable();
            for id in due {
                if let Some(f) = state.in_flight.remove(&id) {
                    if let Some(m) = state.members.iter_mut().find(|m| m.id == f.member) {
                        m.in_flight = m.in_flight.saturating_sub(1);
                    }
                    self.retry(&mut state, f.pending, None, now_ms, &mut effects);
                }
            }
        }
        if !state.delayed.is_empty() {
            let delayed = std::mem::take(&mut state.delayed);
            for (ready, p) in delayed {
                if ready <= now_ms {
                    state.requeue_front(p, now_ms);
                } else {
                    state.delayed.push((ready, p));
                }
            }
        }
        if now_ms.saturating_sub(state.last_expiry_scan_ms) >= 100 {
            state.last_expiry_scan_ms = now_ms;
            let expired = state.pending.drain_expired(now_ms);
            self.expired(&mut state, expired, now_ms, &mut effects);
        }
        self.pump(&mut state, now_ms, &mut effects);
        effects
    }

    /// Room left in the pending queue (durable readers read at most this much).
    pub fn room(&self) -> usize {
        let state = self.state.lock();
        state
            .pending
            .capacity()
            .saturating_sub(state.pending.len() + state.delayed.len() + state.held)
    }

    /// Pending, in flight, members and counters.
    pub fn snapshot(&self) -> GroupSnapshot {
        let state = self.state.lock();
        GroupSnapshot {
            pending: state.pending.len() + state.delayed.len() + state.held,
            in_flight: state.in_flight.len()
                + state
                    .members
                    .iter()
                    .filter(|_| self.options.ack_policy == AckPolicy::None)
                    .map(|m| m.in_flight as usize)
                    .sum::<usize>(),
            members: state
                .members
                .iter()
                .map(|m| MemberInfo {
                    subscription_id: m.subscription_id.clone(),
                    max_in_flight: m.max_in_flight,
                    in_flight: m.in_flight,
                    delivered: m.delivered,
                    acked: m.acked,
                    opened_at_ms: m.opened_at_ms,
                })
                .collect(),
            counters: state.counters,
        }
    }

    /// Requeues a delivery that was not acked, or dead-letters it after `max_deliveries`.
    fn retry(
        &self,
        state: &mut State,
        pending: Pending,
        delay: Option<Duration>,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        if pending.deliveries >= self.options.max_deliveries {
            self.dead(state, pending, DeadReason::MaxDeliveries, now_ms, effects);
            return;
        }
        let backoff = &self.options.backoff;
        let delay = delay.or_else(|| {
            let n = usize::try_from(pending.deliveries.saturating_sub(1)).unwrap_or(usize::MAX);
            backoff.get(n.min(backoff.len().saturating_sub(1))).copied()
        });
        match delay.map(duration_ms) {
            Some(ms) if ms > 0 => state.delayed.push((now_ms + ms, pending)),
            _ => state.requeue_front(pending, now_ms),
        }
    }

    fn dead(
        &self,
        state: &mut State,
        pending: Pending,
        reason: DeadReason,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        state.release_key(&pending, now_ms);
        state.counters.dead_lettered += 1;
        if pending.sequence != 0 {
            effects.log_acks.push(pending.sequence);
        }
        effects.dead.push((pending, reason));
    }

    fn expired(
        &self,
        state: &mut State,
        expired: Vec<(Pending, Priority)>,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        for (p, _) in expired {
            state.counters.expired += 1;
            effects.expired += 1;
            if self.dead_letter_expired {
                self.dead(state, p, DeadReason::Expired, now_ms, effects);
            } else {
                state.release_key(&p, now_ms);
                if p.sequence != 0 {
                    effects.log_acks.push(p.sequence);
                }
            }
        }
    }

    /// Sends pending events to members with credit, round robin.
    fn pump(&self, state: &mut State, now_ms: u64, effects: &mut Effects) {
        let explicit = self.options.ack_policy == AckPolicy::Explicit;
        let ack_wait = duration_ms(self.options.ack_wait);
        let before = state.pending.len();
        loop {
            if state.pending.is_empty() || state.members.is_empty() {
                break;
            }
            // The next member with credit, round robin.
            let n = state.members.len();
            let Some(slot) = (0..n)
                .map(|k| (state.next_member + k) % n)
                .find(|&i| state.members[i].in_flight < state.members[i].max_in_flight)
            else {
                break;
            };
            let popped = state.pending.pop(now_ms);
            if !popped.expired.is_empty() {
                self.expired(state, popped.expired, now_ms, effects);
            }
            let Some((mut pending, priority, _)) = popped.item else {
                break;
            };
            if let Some(wait) = &self.queue_wait {
                wait[priority.index()].observe(pending.queued_at.elapsed().as_secs_f64());
            }
            pending.deliveries += 1;
            let id = state.next_delivery_id;
            state.next_delivery_id += 1;
            let out = Outbound::Delivery(DeliveryOut {
                delivery_id: id,
                event: pending.event.clone(),
                delivery_count: pending.deliveries,
                sequence: pending.sequence,
            });
            let member = &mut state.members[slot];
            match member.tx.try_send(out) {
                Ok(()) => {
                    member.in_flight += 1;
                    member.delivered += 1;
                    let member_id = member.id;
                    state.next_member = (slot + 1) % n;
                    state.counters.delivered += 1;
                    if pending.deliveries > 1 {
                        state.counters.redelivered += 1;
                    }
                    if explicit {
                        state.next_deadline_ms = state.next_deadline_ms.min(now_ms + ack_wait);
                        state.in_flight.insert(
                            id,
                            InFlight {
                                pending,
                                member: member_id,
                                deadline_ms: now_ms + ack_wait,
                            },
                        );
                    } else {
                        // Without acks an event is done once sent.
                        state.release_key(&pending, now_ms);
                        if pending.sequence != 0 {
                            effects.log_acks.push(pending.sequence);
                        }
                    }
                }
                Err(_) => {
                    // Its channel is closed (it is leaving) or full of advisories: put the
                    // event back where it was and try again on the next ack or tick.
                    pending.deliveries -= 1;
                    state.requeue_front(pending, now_ms);
                    break;
                }
            }
        }
        if state.pending.len() < before || state.pending.is_empty() {
            self.room.notify_waiters();
        }
    }

    fn advise(state: &State, advisory: &AdvisoryOut) {
        for m in &state.members {
            let _ = m.tx.try_send(Outbound::Advisory(advisory.clone()));
        }
    }

    /// Tells every member about events that expired or were dead-lettered.
    pub fn advise_all(&self, advisory: &AdvisoryOut) {
        Self::advise(&self.state.lock(), advisory);
    }
}

/// A group's state, for stats and listings.
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    /// Waiting to be delivered (including delayed redeliveries).
    pub pending: usize,
    /// Delivered and not yet acknowledged.
    pub in_flight: usize,
    /// Its members.
    pub members: Vec<MemberInfo>,
    /// Its counters.
    pub counters: GroupCounters,
}

/// Removes delivery `id` if it belongs to `member`, returning its credit.
fn take_owned(state: &mut State, id: u64, member: u64) -> Option<InFlight> {
    match state.in_flight.get(&id) {
        Some(f) if f.member == member => {}
        _ => return None,
    }
    let f = state.in_flight.remove(&id)?;
    if let Some(m) = state.members.iter_mut().find(|m| m.id == member) {
        m.in_flight = m.in_flight.saturating_sub(1);
    }
    Some(f)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(max_deliveries: u32) -> ConsumerOptions {
        ConsumerOptions {
            filter: SubjectFilter::parse("f", "a.>").unwrap(),
            queue_group: None,
            types: Vec::new(),
            headers: Vec::new(),
            min_priority: Priority::Low,
            max_in_flight: 2,
            ack_wait: Duration::from_millis(100),
            max_deliveries,
            backoff: Vec::new(),
            dead_letter_subject: "dlq".into(),
            ack_policy: AckPolicy::Explicit,
            durable_name: None,
        }
    }

    fn group(capacity: usize, options: ConsumerOptions) -> Consumer {
        Consumer::new(
            options,
            GroupSettings {
                id: 1,
                capacity,
                fairness: FairnessConfig::default(),
                durable: Vec::new(),
                log_group: "g".into(),
                log_consumer: "c".into(),
                dead_letter_expired: false,
                queue_wait: None,
            },
        )
    }

    fn pending(data: &str, priority: Priority) -> Pending {
        Pending::new(
            Arc::new(Event {
                subject: "a.b".into(),
                priority,
                data: data.to_owned().into(),
                ..Event::default()
            }),
            0,
            0,
        )
    }

    fn deliveries(rx: &mut mpsc::Receiver<Outbound>) -> Vec<DeliveryOut> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Outbound::Delivery(d) = o {
                out.push(d);
            }
        }
        out
    }

    fn text(d: &DeliveryOut) -> String {
        String::from_utf8_lossy(&d.event.data).into_owned()
    }

    #[test]
    fn test_credit_bounds_deliveries_and_acks_release_the_next_by_priority() {
        let g = group(100, options(5));
        let (tx, mut rx) = mpsc::channel(100);
        g.add_member(7, "s".into(), 2, tx, 0);
        g.offer(pending("n1", Priority::Normal), 0);
        g.offer(pending("n2", Priority::Normal), 0);
        g.offer(pending("low", Priority::Low), 0);
        g.offer(pending("crit", Priority::Critical), 0);
        let first = deliveries(&mut rx);
        assert_eq!(first.iter().map(text).collect::<Vec<_>>(), ["n1", "n2"]);
        let (known, _) = g.ack(7, &[first[0].delivery_id], 1);
        assert_eq!(known, 1);
        assert_eq!(
            deliveries(&mut rx).iter().map(text).collect::<Vec<_>>(),
            ["crit"]
        );
        // Another member cannot ack this member's delivery.
        let (known, _) = g.ack(8, &[first[1].delivery_id], 1);
        assert_eq!(known, 0);
    }

    #[test]
    fn test_a_new_subscription_sends_every_critical_before_waiting_low() {
        let g = group(100, options(5));
        let (tx, mut rx) = mpsc::channel(100);
        g.add_member(7, "s".into(), 1, tx, 0);
        g.offer(pending("blocker", Priority::Normal), 0);
        let mut delivered = deliveries(&mut rx);
        for i in 0..10 {
            g.offer(pending(&format!("L{i}"), Priority::Low), 0);
        }
        for i in 0..5 {
            g.offer(pending(&format!("C{i}"), Priority::Critical), 0);
        }
        let mut order = Vec::new();
        for _ in 0..15 {
            let (known, _) = g.ack(7, &[delivered[0].delivery_id], 1);
            assert_eq!(known, 1);
            delivered = deliveries(&mut rx);
            order.push(text(&delivered[0]));
        }
        let want: Vec<String> = (0..5)
            .map(|i| format!("C{i}"))
            .chain((0..10).map(|i| format!("L{i}")))
            .collect();
        assert_eq!(order, want);
    }

    fn keyed(data: &str, key: &str, priority: Priority) -> Pending {
        Pending::new(
            Arc::new(Event {
                subject: "a.b".into(),
                priority,
                ordering_key: key.into(),
                data: data.to_owned().into(),
                ..Event::default()
            }),
            0,
            0,
        )
    }

    fn texts(rx: &mut mpsc::Receiver<Outbound>) -> Vec<String> {
        deliveries(rx).iter().map(text).collect()
    }

    #[test]
    fn test_an_ordering_key_goes_one_event_at_a_time_in_publish_order_across_members() {
        let g = group(100, options(5));
        let (tx1, mut rx1) = mpsc::channel(100);
        let (tx2, mut rx2) = mpsc::channel(100);
        g.add_member(1, "s1".into(), 10, tx1, 0);
        g.add_member(2, "s2".into(), 10, tx2, 0);
        // A later event of the key is CRITICAL: it still waits for the earlier LOW one.
        g.offer(keyed("a1", "a", Priority::Low), 0);
        g.offer(keyed("a2", "a", Priority::Critical), 0);
        g.offer(keyed("b1", "b", Priority::Normal), 0);
        g.offer(keyed("a3", "a", Priority::Normal), 0);
        let (d1, d2) = (deliveries(&mut rx1), deliveries(&mut rx2));
        assert_eq!(d1.iter().map(text).collect::<Vec<_>>(), ["a1"]);
        assert_eq!(d2.iter().map(text).collect::<Vec<_>>(), ["b1"]);
        assert_eq!(g.snapshot().pending, 2, "a2 and a3 wait behind a1");
        // a1 is nak'ed: it is redelivered before a2 (the key stays with it).
        assert!(g.nak(1, d1[0].delivery_id, None, 1).0);
        let again: Vec<DeliveryOut> = deliveries(&mut rx1)
            .into_iter()
            .chain(deliveries(&mut rx2))
            .collect();
        assert_eq!(again.iter().map(text).collect::<Vec<_>>(), ["a1"]);
        assert_eq!(again[0].delivery_count, 2);
        // Acking it (whichever member has it) releases a2, and a2's ack releases a3.
        let ack_anywhere = |id: u64| {
            let known: u64 = [1, 2].iter().map(|&m| g.ack(m, &[id], 2).0).sum();
            assert_eq!(known, 1);
        };
        ack_anywhere(again[0].delivery_id);
        let next: Vec<DeliveryOut> = deliveries(&mut rx1)
            .into_iter()
            .chain(deliveries(&mut rx2))
            .collect();
        assert_eq!(next.iter().map(text).collect::<Vec<_>>(), ["a2"]);
        assert_eq!(g.snapshot().pending, 1);
        ack_anywhere(next[0].delivery_id);
        let last: Vec<String> = texts(&mut rx1).into_iter().chain(texts(&mut rx2)).collect();
        assert_eq!(last, ["a3"]);
        assert_eq!(g.snapshot().pending, 0);
    }

    #[test]
    fn test_an_ordering_key_is_released_by_dead_letter_expiry_and_sends_without_acks() {
        // Terminated: the next event of the key goes out.
        let g = group(100, options(5));
        let (tx, mut rx) = mpsc::channel(100);
        g.add_member(1, "s".into(), 10, tx, 0);
        g.offer(keyed("k1", "k", Priority::Normal), 0);
        g.offer(keyed("k2", "k", Priority::Normal), 0);
        let first = deliveries(&mut rx);
        assert_eq!(first.iter().map(text).collect::<Vec<_>>(), ["k1"]);
        assert!(g.terminate(1, first[0].delivery_id, "bad", 1).0);
        assert_eq!(texts(&mut rx), ["k2"]);

        // Ack policy NONE: each event is done once sent, so the key's events all go, in order.
        let mut none = options(5);
        none.ack_policy = AckPolicy::None;
        let g = group(100, none);
        let (tx, mut rx) = mpsc::channel(100);
        g.offer(keyed("n1", "k", Priority::Low), 0);
        g.offer(keyed("n2", "k", Priority::Critical), 0);
        g.offer(keyed("n3", "k", Priority::Normal), 0);
        g.add_member(1, "s".into(), 10, tx, 0);
        assert_eq!(texts(&mut rx), ["n1", "n2", "n3"]);
        assert_eq!(g.snapshot().pending, 0);

        // A key's waiting events count against the bound; beyond it they are shed.
        let g = group(2, options(5));
        let e1 = g.offer(keyed("x1", "x", Priority::Normal), 0);
        let e2 = g.offer(keyed("x2", "x", Priority::Normal), 0);
        let e3 = g.offer(keyed("x3", "x", Priority::High), 0);
        assert!(e1.is_empty() && e2.is_empty());
        assert_eq!(e3.shed, [0, 0, 1, 0]);
        assert_eq!(g.room(), 0);
    }

    #[test]
    fn test_an_unacked_delivery_is_redelivered_then_dead_lettered_after_max_deliveries() {
        let g = group(100, options(2));
        let (tx, mut rx) = mpsc::channel(100);
        g.add_member(1, "s".into(), 10, tx, 0);
        g.offer(pending("x", Priority::Normal), 0);
        assert_eq!(deliveries(&mut rx)[0].delivery_count, 1);
        assert!(g.tick(50).dead.is_empty());
        assert!(deliveries(&mut rx).is_empty(), "not before the ack wait");
        g.tick(100);
        assert_eq!(deliveries(&mut rx)[0].delivery_count, 2);
        let effects = g.tick(200);
        assert_eq!(effects.dead.len(), 1);
        assert_eq!(effects.dead[0].1, DeadReason::MaxDeliveries);
        assert_eq!(g.snapshot().counters.dead_lettered, 1);
    }

    #[test]
    fn test_a_nak_with_delay_waits_and_a_leaving_member_returns_its_deliveries() {
        let g = group(100, options(5));
        let (tx1, mut rx1) = mpsc::channel(100);
        let (tx2, mut rx2) = mpsc::channel(100);
        g.add_member(1, "a".into(), 1, tx1, 0);
        g.offer(pending("x", Priority::Normal), 0);
        let d = deliveries(&mut rx1);
        let (known, _) = g.nak(1, d[0].delivery_id, Some(Duration::from_millis(30)), 0);
        assert!(known);
        g.tick(10);
        assert!(deliveries(&mut rx1).is_empty(), "delayed");
        g.tick(40);
        let again = deliveries(&mut rx1);
        assert_eq!((text(&again[0]), again[0].delivery_count), ("x".into(), 2));
        g.add_member(2, "b".into(), 1, tx2, 40);
        let (empty, _) = g.remove_member(1, 41);
        assert!(!empty);
        let moved = deliveries(&mut rx2);
        assert_eq!(text(&moved[0]), "x", "the other member gets it");
        let (empty, _) = g.remove_member(2, 42);
        assert!(empty && g.is_closed());
    }

    #[test]
    fn test_a_full_group_sheds_the_lowest_priority_and_expired_events_are_never_delivered() {
        let g = group(2, options(5));
        g.offer(pending("low", Priority::Low), 0);
        g.offer(pending("high", Priority::High), 0);
        let effects = g.offer(pending("crit", Priority::Critical), 0);
        assert_eq!(effects.shed, [1, 0, 0, 0]);
        let mut short = pending("short", Priority::Critical);
        Arc::get_mut(&mut short.event).unwrap().expires_at_ms = Some(5);
        let g2 = group(10, options(5));
        g2.offer(short, 0);
        g2.offer(pending("lasting", Priority::Low), 0);
        let (tx, mut rx) = mpsc::channel(10);
        let effects = g2.add_member(1, "s".into(), 10, tx, 10);
        assert_eq!(effects.expired, 1);
        assert_eq!(
            deliveries(&mut rx).iter().map(text).collect::<Vec<_>>(),
            ["lasting"]
        );
    }

    #[test]
    fn test_ack_policy_none_frees_credit_when_written() {
        let g = group(
            100,
            ConsumerOptions {
                ack_policy: AckPolicy::None,
                ..options(5)
            },
        );
        let (tx, mut rx) = mpsc::channel(100);
        g.add_member(1, "s".into(), 1, tx, 0);
        g.offer(pending("a", Priority::Normal), 0);
        g.offer(pending("b", Priority::Normal), 0);
        assert_eq!(deliveries(&mut rx).len(), 1);
        g.sent(1, 1, 0);
        assert_eq!(deliveries(&mut rx).len(), 1);
        assert!(g.tick(1000).dead.is_empty(), "nothing to redeliver");
    }
}
