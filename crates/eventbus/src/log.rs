//! The durable event log: named streams of events with consumer groups, as Redis Streams
//! models them, behind one trait with an in-memory implementation ([`InMemoryLog`], standalone
//! mode and unit tests) and a Redis one ([`crate::redis_log::RedisLog`]).
//!
//! # Streams and sequences
//!
//! Streams are named by the caller (a durable subject pattern such as `orders.>`, or a
//! dead-letter subject): at most [`MAX_NAME_LEN`] bytes, no `{` or `}` (Redis keys put the name
//! in a Cluster hash tag). Each stored event gets a sequence that is strictly increasing within
//! its stream. Sequences are opaque to users, but both implementations build them the same way
//! from the time the event was stored: `(ms << 20) | n`, where `n` counts events stored in the
//! same millisecond. So [`StartPosition::Time`] is `Sequence(ms << 20)`, and
//! [`StoredEvent::stored_at_ms`] is `sequence >> 20`.
//!
//! # Consumer groups
//!
//! A group has a position (the last sequence delivered to it) and a pending list: every event
//! read through the group is pending — with its consumer, delivery time and delivery count —
//! until acknowledged. Each event goes to one consumer of the group; groups are independent of
//! each other. Pending entries outlive the deletion or trimming of their event (as in Redis):
//! they still count as pending and can still be acknowledged, but are dropped without being
//! delivered again when [`EventLog::claim_stalled`] meets them.
//!
//! # Unknown names
//!
//! Reading through (or claiming for) a group that does not exist is `NotFound`; `ack`,
//! `delete`, `trim`, `read_range` and `info` on an unknown stream or group find nothing (0, an
//! empty list, an empty [`StreamInfo`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::error::EventBusError;
use crate::event::Event;

/// Low bits of a sequence that count events stored within one millisecond.
pub const SEQUENCE_COUNTER_BITS: u32 = 20;

/// Most events per `append_batch`, sequences per `ack`/`delete`, and `max` of a read or claim.
pub const MAX_BATCH: usize = 1000;

/// Longest stream, group or consumer name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// The first sequence that can be assigned at `ms` (ms since the epoch).
pub fn first_sequence_at(ms: u64) -> u64 {
    ms.checked_shl(SEQUENCE_COUNTER_BITS)
        .filter(|s| s >> SEQUENCE_COUNTER_BITS == ms)
        .unwrap_or(u64::MAX)
}

/// When the event with `sequence` was stored, ms since the epoch.
pub fn stored_at_ms(sequence: u64) -> u64 {
    sequence >> SEQUENCE_COUNTER_BITS
}

/// Where a consumer group (or a range read) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// Only events appended after the group is created (a range read returns nothing).
    New,
    /// From the first retained event.
    All,
    /// From the first event with a sequence `>= n`.
    Sequence(u64),
    /// From the first event stored at or after this instant, ms since the epoch.
    Time(u64),
    /// The last stored event and everything after it.
    Last,
}

/// One event as stored in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the stream; strictly increasing.
    pub sequence: u64,
    /// When the log stored the event, ms since the epoch (the store's clock).
    pub stored_at_ms: u64,
    /// The event.
    pub event: Event,
}

/// A stalled pending event taken over by another consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The event.
    pub stored: StoredEvent,
    /// Times it has been delivered, including this one (so at least 2).
    pub delivery_count: u32,
}

/// What `append` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored under this sequence.
    Stored(u64),
    /// Not stored: an event with the same id was appended within the dedup window; the
    /// sequence of that original when known.
    Duplicate(Option<u64>),
}

impl AppendOutcome {
    /// The sequence of the stored event (or of the original, for a duplicate) when known.
    pub fn sequence(self) -> Option<u64> {
        match self {
            Self::Stored(sequence) => Some(sequence),
            Self::Duplicate(original) => original,
        }
    }
}

/// How much of a stream to keep; `None` = no bound of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrimPolicy {
    /// Keep at most this many events (the newest).
    pub max_len: Option<u64>,
    /// Drop events stored longer ago than this (ms resolution).
    pub max_age: Option<Duration>,
}

/// The state of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamInfo {
    /// Events retained.
    pub length: u64,
    /// Sequence of the first retained event.
    pub first_sequence: Option<u64>,
    /// Sequence of the last retained event.
    pub last_sequence: Option<u64>,
    /// Consumer groups, by name.
    pub groups: Vec<GroupInfo>,
}

/// The state of one consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Consumers that have read or claimed through the group.
    pub consumers: u64,
    /// Events delivered and not yet acknowledged.
    pub pending: u64,
    /// Sequence of the last event delivered to the group; `None` before the first.
    pub last_delivered: Option<u64>,
    /// Events not yet delivered to the group, when known (Redis cannot always tell after
    /// deletions, or for groups started at an arbitrary sequence).
    pub lag: Option<u64>,
}

/// A started [`EventLog::append_batch`]: the events back, with their outcomes.
pub type Appending = BoxFuture<'static, (Vec<Event>, Result<Vec<AppendOutcome>, EventBusError>)>;

/// A durable, append-only log of named event streams with consumer groups.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `event`; an event whose id was appended to this stream within `dedup_window` is
    /// not stored again. A zero window, or an empty event id, means no dedup. (A batch of one:
    /// the append future owns its events, so the event is copied once.)
    async fn append(
        &self,
        stream: &str,
        event: &Event,
        dedup_window: Duration,
    ) -> Result<AppendOutcome, EventBusError> {
        let (_, outcomes) = self
            .append_batch(stream, vec![event.clone()], dedup_window)
            .await;
        outcomes?
            .pop()
            .ok_or_else(|| EventBusError::Unavailable("append: no reply".to_owned()))
    }

    /// As [`append`](Self::append) for up to [`MAX_BATCH`] events in one round trip, outcomes
    /// in order (an id repeated within the batch is a duplicate of its first occurrence).
    /// The append is started before this returns: a batch started later on this log is
    /// stored after it (so a publisher can keep several batches in flight, in order). The
    /// future hands the events back with the outcome.
    fn append_batch(&self, stream: &str, events: Vec<Event>, dedup_window: Duration) -> Appending;

    /// Creates the consumer group at `start` unless it exists (an existing group keeps its
    /// position), creating the stream too. `Sequence(n)` beyond the last assigned sequence + 1
    /// is `InvalidArgument` (`start.sequence`); one before the first retained event starts at
    /// the first retained event (trimming is normal retention, not an error).
    async fn ensure_group(
        &self,
        stream: &str,
        group: &str,
        start: &StartPosition,
    ) -> Result<(), EventBusError>;

    /// Reads up to `max` never-delivered events for `consumer` of `group`, waiting up to
    /// `block` (zero = don't wait) while none are available. Read events are pending
    /// (delivery count 1) until acknowledged. `NotFound` when the group does not exist.
    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<StoredEvent>, EventBusError>;

    /// Acknowledges (removes from the pending list); returns how many were pending.
    async fn ack(&self, stream: &str, group: &str, sequences: &[u64])
    -> Result<u64, EventBusError>;

    /// Takes over up to `max` pending events idle for at least `min_idle`, from any consumer of
    /// the group (e.g. a dead instance), for `consumer`, incrementing their delivery count.
    /// Pending entries whose event is gone are dropped. `NotFound` when the group does not
    /// exist.
    async fn claim_stalled(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Claimed>, EventBusError>;

    /// Gives pending events back (a closed subscription's unacknowledged deliveries): they
    /// become claimable at once by any consumer of the group, without counting a delivery.
    /// Returns how many were pending.
    async fn release(
        &self,
        stream: &str,
        group: &str,
        sequences: &[u64],
    ) -> Result<u64, EventBusError>;

    /// Reads up to `max` stored events from `from` without a group (replay, dead-letter
    /// listing); page on with `Sequence(last + 1)`.
    async fn read_range(
        &self,
        stream: &str,
        from: &StartPosition,
        max: usize,
    ) -> Result<Vec<StoredEvent>, EventBusError>;

    /// Deletes events by sequence (purging dead letters, redrive); returns how many existed.
    async fn delete(&self, stream: &str, sequences: &[u64]) -> Result<u64, EventBusError>;

    /// Trims by length (oldest first) and age; returns how many events were removed.
    async fn trim(&self, stream: &str, policy: &TrimPolicy) -> Result<u64, EventBusError>;

    /// Length, first/last sequence, and groups with pending counts.
    async fn info(&self, stream: &str) -> Result<StreamInfo, EventBusError>;

    /// Names of all streams this log holds (those appended to or given a group), sorted.
    async fn streams(&self) -> Result<Vec<String>, EventBusError>;
}

/// Checks a stream name: non-empty, at most [`MAX_NAME_LEN`] bytes, no braces.
pub(crate) fn check_stream(stream: &str) -> Result<(), EventBusError> {
    check_name("stream", stream)?;
    if stream.contains(['{', '}']) {
        return Err(EventBusError::invalid(
            "stream",
            "must not contain '{' or '}'",
        ));
    }
    Ok(())
}

/// Checks a group or consumer name: non-empty, at most [`MAX_NAME_LEN`] bytes.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), EventBusError> {
    if name.is_empty() {
        return Err(EventBusError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(EventBusError::invalid(
            field,
            format!("at most {MAX_NAME_LEN} bytes, got {}", name.len()),
        ));
    }
    Ok(())
}

/// Checks the arguments of a group read or claim.
pub(crate) fn check_reader(
    stream: &str,
    group: &str,
    consumer: &str,
    max: usize,
) -> Result<(), EventBusError> {
    check_stream(stream)?;
    check_name("group", group)?;
    check_name("consumer", consumer)?;
    check_batch("max", max)
}

/// Checks the arguments of an ack or release of a group's pending sequences.
pub(crate) fn check_pending_args(
    stream: &str,
    group: &str,
    sequences: &[u64],
) -> Result<(), EventBusError> {
    check_stream(stream)?;
    check_name("group", group)?;
    check_batch("sequences", sequences.len())
}

/// Checks a batch size against [`MAX_BATCH`].
pub(crate) fn check_batch(field: &str, len: usize) -> Result<(), EventBusError> {
    if len > MAX_BATCH {
        return Err(EventBusError::invalid(
            field,
            format!("at most {MAX_BATCH}, got {len}"),
        ));
    }
    Ok(())
}

/// The `InvalidArgument` for a start sequence past the end of the stream.
pub(crate) fn sequence_beyond_end(stream: &str, sequence: u64, last: u64) -> EventBusError {
    EventBusError::invalid(
        "start.sequence",
        format!(
            "sequence {sequence} is beyond the end of stream {stream:?} (last assigned {last})"
        ),
    )
}

/// The `NotFound` for a missing consumer group.
pub(crate) fn no_group(stream: &str, group: &str) -> EventBusError {
    EventBusError::NotFound(format!("no consumer group {group:?} on stream {stream:?}"))
}

/// Milliseconds, rounded up so that a non-zero duration never becomes zero.
pub(crate) fn millis_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The event log in memory: standalone mode and tests. Same semantics as the Redis log, with
/// every stream bounded to `max_len` events (the oldest are dropped at append).
pub struct InMemoryLog {
    max_len: u64,
    streams: Mutex<BTreeMap<String, StreamState>>,
}

impl std::fmt::Debug for InMemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryLog")
            .field("max_len", &self.max_len)
            .field("streams", &self.streams.lock().len())
            .finish()
    }
}

struct StreamState {
    entries: BTreeMap<u64, StoredEvent>,
    /// Last sequence ever assigned (0 = none).
    last_sequence: u64,
    groups: BTreeMap<String, GroupState>,
    dedup: Dedup,
    /// Woken on every append, for blocked `read_group`s.
    appended: Arc<Notify>,
}

#[derive(Default)]
struct GroupState {
    last_delivered: u64,
    pending: BTreeMap<u64, PendingEntry>,
    consumers: BTreeSet<String>,
}

struct PendingEntry {
    consumer: String,
    delivered_at_ms: u64,
    delivery_count: u32,
}

/// Ids appended recently, each remembered until its window ends; bounded (the entries that
/// would expire first are forgotten first).
#[derive(Default)]
struct Dedup {
    ids: HashMap<String, (u64, u64)>,
    by_expiry: BTreeSet<(u64, String)>,
}

impl Dedup {
    /// The original's sequence if `id` was seen and its window has not ended at `now`.
    fn lookup(&mut self, id: &str, now: u64) -> Option<u64> {
        self.expire(now);
        self.ids.get(id).map(|&(sequence, _)| sequence)
    }

    fn remember(&mut self, id: &str, sequence: u64, expires_at: u64, bound: usize) {
        if let Some((_, old_expiry)) = self.ids.insert(id.to_owned(), (sequence, expires_at)) {
            self.by_expiry.remove(&(old_expiry, id.to_owned()));
        }
        self.by_expiry.insert((expires_at, id.to_owned()));
        while self.ids.len() > bound {
            let Some((_, oldest)) = self.by_expiry.pop_first() else {
                break;
            };
            self.ids.remove(&oldest);
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some((expiry, _)) = self.by_expiry.first() {
            if *expiry > now {
                break;
            }
            if let Some((_, id)) = self.by_expiry.pop_first() {
                self.ids.remove(&id);
            }
        }
    }
}

impl StreamState {
    fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
            last_sequence: 0,
            groups: BTreeMap::new(),
            dedup: Dedup::default(),
            appended: Arc::new(Notify::new()),
        }
    }

    fn append(&mut self, event: &Event, dedup_window: Duration, max_len: u64) -> AppendOutcome {
        let now = now_ms();
        let dedup = !dedup_window.is_zero() && !event.id.is_empty();
        if dedup && let Some(original) = self.dedup.lookup(&event.id, now) {
            return AppendOutcome::Duplicate(Some(original));
        }
        let sequence = first_sequence_at(now).max(self.last_sequence.saturating_add(1));
        self.last_sequence = sequence;
        self.entries.insert(
            sequence,
            StoredEvent {
                sequence,
                stored_at_ms: stored_at_ms(sequence),
                event: event.clone(),
            },
        );
        while self.entries.len() as u64 > max_len {
            self.entries.pop_first();
        }
        if dedup {
            let bound = usize::try_from(max_len).unwrap_or(usize::MAX).max(1024);
            let expires_at = now.saturating_add(millis_ceil(dedup_window));
            self.dedup.remember(&event.id, sequence, expires_at, bound);
        }
        AppendOutcome::Stored(sequence)
    }

    /// The group's initial position (last delivered sequence) for `start`.
    fn start_of(&self, stream: &str, start: StartPosition) -> Result<u64, EventBusError> {
        Ok(match start {
            StartPosition::New => self.last_sequence,
            StartPosition::All => 0,
            StartPosition::Sequence(n) => {
                if n > self.last_sequence.saturating_add(1) {
                    return Err(sequence_beyond_end(stream, n, self.last_sequence));
                }
                n.saturating_sub(1)
            }
            StartPosition::Time(ms) => first_sequence_at(ms).saturating_sub(1),
            StartPosition::Last => self
                .entries
                .last_key_value()
                .map_or(self.last_sequence, |(&s, _)| s.saturating_sub(1)),
        })
    }

    /// Up to `max` undelivered events for `consumer`, now pending.
    fn deliver(&mut self, group: &str, consumer: &str, max: usize) -> Option<Vec<StoredEvent>> {
        let state = self.groups.get_mut(group)?;
        state.consumers.insert(consumer.to_owned());
        let now = now_ms();
        let events: Vec<StoredEvent> = self
            .entries
            .range(state.last_delivered.saturating_add(1)..)
            .take(max)
            .map(|(_, stored)| stored.clone())
            .collect();
        for stored in &events {
            state.last_delivered = stored.sequence;
            state.pending.insert(
                stored.sequence,
                PendingEntry {
                    consumer: consumer.to_owned(),
                    delivered_at_ms: now,
                    delivery_count: 1,
                },
            );
        }
        Some(events)
    }
}

impl InMemoryLog {
    /// Applies `f` to each of `sequences` in a group's pending list; counts where it held.
    /// An unknown stream or group has nothing pending.
    fn with_pending(
        &self,
        stream: &str,
        group: &str,
        sequences: &[u64],
        mut f: impl FnMut(&mut BTreeMap<u64, PendingEntry>, u64) -> bool,
    ) -> Result<u64, EventBusError> {
        check_pending_args(stream, group, sequences)?;
        let mut streams = self.streams.lock();
        let Some(state) = streams
            .get_mut(stream)
            .and_then(|s| s.groups.get_mut(group))
        else {
            return Ok(0);
        };
        Ok(sequences
            .iter()
            .filter(|&&s| f(&mut state.pending, s))
            .count() as u64)
    }

    /// Appends a batch at once (see [`EventLog::append_batch`]).
    fn append_now(
        &self,
        stream: &str,
        events: &[Event],
        dedup_window: Duration,
    ) -> Result<Vec<AppendOutcome>, EventBusError> {
        check_stream(stream)?;
        check_batch("events", events.len())?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut streams = self.streams.lock();
        let state = streams
            .entry(stream.to_owned())
            .or_insert_with(StreamState::new);
        let outcomes = events
            .iter()
            .map(|event| state.append(event, dedup_window, self.max_len))
            .collect();
        state.appended.notify_waiters();
        Ok(outcomes)
    }

    /// An empty log keeping at most `max_len` events per stream (at least 1).
    pub fn new(max_len: u64) -> Self {
        Self {
            max_len: max_len.max(1),
            streams: Mutex::new(BTreeMap::new()),
        }
    }
}

#[async_trait::async_trait]
impl EventLog for InMemoryLog {
    fn append_batch(&self, stream: &str, events: Vec<Event>, dedup_window: Duration) -> Appending {
        let outcomes = self.append_now(stream, &events, dedup_window);
        Box::pin(std::future::ready((events, outcomes)))
    }

    async fn ensure_group(
        &self,
        stream: &str,
        group: &str,
        start: &StartPosition,
    ) -> Result<(), EventBusError> {
        check_stream(stream)?;
        check_name("group", group)?;
        let mut streams = self.streams.lock();
        // Nothing is created when the start is invalid.
        let last_delivered = match streams.get(stream) {
            Some(state) if state.groups.contains_key(group) => return Ok(()),
            Some(state) => state.start_of(stream, *start)?,
            None => StreamState::new().start_of(stream, *start)?,
        };
        streams
            .entry(stream.to_owned())
            .or_insert_with(StreamState::new)
            .groups
            .insert(
                group.to_owned(),
                GroupState {
                    last_delivered,
                    ..GroupState::default()
                },
            );
        Ok(())
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<StoredEvent>, EventBusError> {
        check_reader(stream, group, consumer, max)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let appended = {
                let mut streams = self.streams.lock();
                let state = streams
                    .get_mut(stream)
                    .ok_or_else(|| no_group(stream, group))?;
                let events = state
                    .deliver(group, consumer, max)
                    .ok_or_else(|| no_group(stream, group))?;
                if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                    return Ok(events);
                }
                state.appended.clone()
            };
            // Registered first, then checked again: an append between the check above and
            // `enable` is seen by the second check, any later one wakes `notified`.
            let mut notified = pin!(appended.notified());
            notified.as_mut().enable();
            {
                let mut streams = self.streams.lock();
                let state = streams
                    .get_mut(stream)
                    .ok_or_else(|| no_group(stream, group))?;
                let events = state
                    .deliver(group, consumer, max)
                    .ok_or_else(|| no_group(stream, group))?;
                if !events.is_empty() {
                    return Ok(events);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(
        &self,
        stream: &str,
        group: &str,
        sequences: &[u64],
    ) -> Result<u64, EventBusError> {
        self.with_pending(stream, group, sequences, |pending, s| {
            pending.remove(&s).is_some()
        })
    }

    async fn release(
        &self,
        stream: &str,
        group: &str,
        sequences: &[u64],
    ) -> Result<u64, EventBusError> {
        self.with_pending(stream, group, sequences, |pending, s| {
            pending.get_mut(&s).map(|p| p.delivered_at_ms = 0).is_some()
        })
    }

    async fn claim_stalled(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Claimed>, EventBusError> {
        check_reader(stream, group, consumer, max)?;
        let mut streams = self.streams.lock();
        let state = streams
            .get_mut(stream)
            .ok_or_else(|| no_group(stream, group))?;
        let group_state = state
            .groups
            .get_mut(group)
            .ok_or_else(|| no_group(stream, group))?;
        group_state.consumers.insert(consumer.to_owned());
        let now = now_ms();
        let min_idle = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let mut claimed = Vec::new();
        let mut gone = Vec::new();
        for (&sequence, pending) in &mut group_state.pending {
            if claimed.len() >= max {
                break;
            }
            if now.saturating_sub(pending.delivered_at_ms) < min_idle {
                continue;
            }
            let Some(stored) = state.entries.get(&sequence) else {
                gone.push(sequence);
                continue;
            };
            consumer.clone_into(&mut pending.consumer);
            pending.delivered_at_ms = now;
            pending.delivery_count = pending.delivery_count.saturating_add(1);
            claimed.push(Claimed {
                stored: stored.clone(),
                delivery_count: pending.delivery_count,
            });
        }
        for sequence in gone {
            group_state.pending.remove(&sequence);
        }
        Ok(claimed)
    }

    async fn read_range(
        &self,
        stream: &str,
        from: &StartPosition,
        max: usize,
    ) -> Result<Vec<StoredEvent>, EventBusError> {
        check_stream(stream)?;
        check_batch("max", max)?;
        let streams = self.streams.lock();
        let Some(state) = streams.get(stream) else {
            return Ok(Vec::new());
        };
        let first = match *from {
            StartPosition::New => return Ok(Vec::new()),
            StartPosition::All => 0,
            StartPosition::Sequence(n) => n,
            StartPosition::Time(ms) => first_sequence_at(ms),
            StartPosition::Last => match state.entries.last_key_value() {
                Some((&last, _)) => last,
                None => return Ok(Vec::new()),
            },
        };
        Ok(state
            .entries
            .range(first..)
            .take(max)
            .map(|(_, stored)| stored.clone())
            .collect())
    }

    async fn delete(&self, stream: &str, sequences: &[u64]) -> Result<u64, EventBusError> {
        check_stream(stream)?;
        check_batch("sequences", sequences.len())?;
        let mut streams = self.streams.lock();
        let Some(state) = streams.get_mut(stream) else {
            return Ok(0);
        };
        let deleted = sequences
            .iter()
            .filter(|s| state.entries.remove(s).is_some())
            .count();
        Ok(deleted as u64)
    }

    async fn trim(&self, stream: &str, policy: &TrimPolicy) -> Result<u64, EventBusError> {
        check_stream(stream)?;
        let mut streams = self.streams.lock();
        let Some(state) = streams.get_mut(stream) else {
            return Ok(0);
        };
        let before = state.entries.len();
        if let Some(max_age) = policy.max_age {
            let oldest_kept = first_sequence_at(now_ms().saturating_sub(millis_ceil(max_age)));
            state.entries = state.entries.split_off(&oldest_kept);
        }
        if let Some(max_len) = policy.max_len {
            while state.entries.len() as u64 > max_len {
                state.entries.pop_first();
            }
        }
        Ok((before - state.entries.len()) as u64)
    }

    async fn info(&self, stream: &str) -> Result<StreamInfo, EventBusError> {
        check_stream(stream)?;
        let streams = self.streams.lock();
        let Some(state) = streams.get(stream) else {
            return Ok(StreamInfo::default());
        };
        let groups = state
            .groups
            .iter()
            .map(|(name, group)| GroupInfo {
                name: name.clone(),
                consumers: group.consumers.len() as u64,
                pending: group.pending.len() as u64,
                last_delivered: (group.last_delivered != 0).then_some(group.last_delivered),
                lag: Some(
                    state
                        .entries
                        .range(group.last_delivered.saturating_add(1)..)
                        .count() as u64,
                ),
            })
            .collect();
        Ok(StreamInfo {
            length: state.entries.len() as u64,
            first_sequence: state.entries.first_key_value().map(|(&s, _)| s),
            last_sequence: state.entries.last_key_value().map(|(&s, _)| s),
            groups,
        })
    }

    async fn streams(&self) -> Result<Vec<String>, EventBusError> {
        Ok(self.streams.lock().keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn event(id: &str) -> Event {
        Event {
            id: id.to_owned(),
            subject: "orders.created".to_owned(),
            ..Event::default()
        }
    }

    fn ids(events: &[StoredEvent]) -> Vec<&str> {
        events.iter().map(|s| s.event.id.as_str()).collect()
    }

    async fn append_all(log: &InMemoryLog, stream: &str, ids: &[&str]) -> Vec<u64> {
        let mut sequences = Vec::new();
        for id in ids {
            let outcome = log
                .append(stream, &event(id), Duration::ZERO)
                .await
                .unwrap();
            sequences.push(outcome.sequence().unwrap());
        }
        sequences
    }

    async fn group_info(log: &InMemoryLog, stream: &str, group: &str) -> GroupInfo {
        let info = log.info(stream).await.unwrap();
        info.groups.into_iter().find(|g| g.name == group).unwrap()
    }

    #[tokio::test]
    async fn test_append_within_dedup_window_returns_the_original_sequence() {
        let log = InMemoryLog::new(100);
        let first = log.append("s", &event("a"), SECOND).await.unwrap();
        let AppendOutcome::Stored(sequence) = first else {
            panic!("{first:?}");
        };
        assert_eq!(
            stored_at_ms(sequence),
            log.read_range("s", &StartPosition::All, 1).await.unwrap()[0].stored_at_ms
        );
        assert_eq!(
            log.append("s", &event("a"), SECOND).await.unwrap(),
            AppendOutcome::Duplicate(Some(sequence))
        );
        // Another stream has its own window; no window means no dedup.
        assert!(matches!(
            log.append("t", &event("a"), SECOND).await.unwrap(),
            AppendOutcome::Stored(_)
        ));
        assert!(matches!(
            log.append("s", &event("a"), Duration::ZERO).await.unwrap(),
            AppendOutcome::Stored(_)
        ));
        // Within a batch, a repeated id is a duplicate of its first occurrence.
        let outcomes = log
            .append_batch("s", vec![event("b"), event("c"), event("b")], SECOND)
            .await
            .1
            .unwrap();
        assert!(matches!(outcomes[0], AppendOutcome::Stored(_)));
        assert!(matches!(outcomes[1], AppendOutcome::Stored(_)));
        assert_eq!(
            outcomes[2],
            AppendOutcome::Duplicate(outcomes[0].sequence())
        );
        assert_eq!(log.info("s").await.unwrap().length, 4);
    }

    #[tokio::test]
    async fn test_dedup_forgets_ids_once_the_window_has_passed() {
        let log = InMemoryLog::new(100);
        let window = Duration::from_millis(100);
        assert!(matches!(
            log.append("s", &event("a"), window).await.unwrap(),
            AppendOutcome::Stored(_)
        ));
        assert!(matches!(
            log.append("s", &event("a"), window).await.unwrap(),
            AppendOutcome::Duplicate(_)
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(matches!(
            log.append("s", &event("a"), window).await.unwrap(),
            AppendOutcome::Stored(_)
        ));
    }

    #[tokio::test]
    async fn test_sequences_increase_strictly_and_encode_the_storing_time() {
        let log = InMemoryLog::new(10_000);
        let before = now_ms();
        let events: Vec<Event> = (0..500).map(|i| event(&i.to_string())).collect();
        let outcomes = log
            .append_batch("s", events.clone(), Duration::ZERO)
            .await
            .1
            .unwrap();
        let sequences: Vec<u64> = outcomes.iter().map(|o| o.sequence().unwrap()).collect();
        assert!(sequences.windows(2).all(|w| w[0] < w[1]));
        assert!(stored_at_ms(sequences[0]) >= before);
        assert!(stored_at_ms(sequences[499]) <= now_ms());
        assert_eq!(first_sequence_at(before) >> SEQUENCE_COUNTER_BITS, before);
        assert_eq!(first_sequence_at(u64::MAX), u64::MAX);
    }

    #[tokio::test]
    async fn test_each_event_goes_to_one_consumer_of_each_group() {
        let log = InMemoryLog::new(100);
        log.ensure_group("s", "g1", &StartPosition::All)
            .await
            .unwrap();
        log.ensure_group("s", "g2", &StartPosition::All)
            .await
            .unwrap();
        let ids_in: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
        let refs: Vec<&str> = ids_in.iter().map(String::as_str).collect();
        append_all(&log, "s", &refs).await;

        let a = log
            .read_group("s", "g1", "c1", 4, Duration::ZERO)
            .await
            .unwrap();
        let b = log
            .read_group("s", "g1", "c2", 100, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ids(&a), refs[..4]);
        assert_eq!(ids(&b), refs[4..]);
        assert!(
            log.read_group("s", "g1", "c1", 100, Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
        // The other group sees every event again.
        let c = log
            .read_group("s", "g2", "c1", 100, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ids(&c), refs);

        let g1 = group_info(&log, "s", "g1").await;
        assert_eq!((g1.consumers, g1.pending, g1.lag), (2, 10, Some(0)));
        assert_eq!(g1.last_delivered, Some(b[5].sequence));
    }

    #[tokio::test]
    async fn test_events_stay_pending_until_acked() {
        let log = InMemoryLog::new(100);
        log.ensure_group("s", "g", &StartPosition::All)
            .await
            .unwrap();
        let seqs = append_all(&log, "s", &["a", "b", "c"]).await;
        log.read_group("s", "g", "c", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(group_info(&log, "s", "g").await.pending, 3);
        assert_eq!(log.ack("s", "g", &seqs[..2]).await.unwrap(), 2);
        assert_eq!(
            log.ack("s", "g", &seqs).await.unwrap(),
            1,
            "only c was still pending"
        );
        assert_eq!(group_info(&log, "s", "g").await.pending, 0);
        assert_eq!(log.ack("s", "nope", &seqs).await.unwrap(), 0);
        assert_eq!(log.ack("nope", "g", &seqs).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn test_claim_stalled_takes_over_idle_events_and_counts_deliveries() {
        let log = InMemoryLog::new(100);
        log.ensure_group("s", "g", &StartPosition::All)
            .await
            .unwrap();
        let seqs = append_all(&log, "s", &["a", "b"]).await;
        log.read_group("s", "g", "dead", 10, Duration::ZERO)
            .await
            .unwrap();
        let idle = Duration::from_millis(100);
        assert!(
            log.claim_stalled("s", "g", "live", idle, 10)
                .await
                .unwrap()
                .is_empty()
        );

        tokio::time::sleep(Duration::from_millis(150)).await;
        let claimed = log.claim_stalled("s", "g", "live", idle, 1).await.unwrap();
        assert_eq!(claimed.len(), 1, "bounded by max");
        assert_eq!(
            (claimed[0].stored.sequence, claimed[0].delivery_count),
            (seqs[0], 2)
        );
        let claimed = log.claim_stalled("s", "g", "live", idle, 10).await.unwrap();
        assert_eq!(
            (claimed[0].stored.sequence, claimed[0].delivery_count),
            (seqs[1], 2)
        );
        // Just claimed: not idle any more.
        assert!(
            log.claim_stalled("s", "g", "other", idle, 10)
                .await
                .unwrap()
                .is_empty()
        );

        tokio::time::sleep(Duration::from_millis(150)).await;
        let claimed = log
            .claim_stalled("s", "g", "other", idle, 10)
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|c| c.delivery_count).collect::<Vec<_>>(),
            [3, 3]
        );
        assert_eq!(log.ack("s", "g", &seqs).await.unwrap(), 2);
        assert!(matches!(
            log.claim_stalled("s", "nope", "c", idle, 10).await,
            Err(EventBusError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn test_claim_drops_pending_entries_whose_event_is_gone() {
        let log = InMemoryLog::new(100);
        log.ensure_group("s", "g", &StartPosition::All)
            .await
            .unwrap();
        let seqs = append_all(&log, "s", &["a", "b"]).await;
        log.read_group("s", "g", "c", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(log.delete("s", &seqs[..1]).await.unwrap(), 1);
        assert_eq!(
            group_info(&log, "s", "g").await.pending,
            2,
            "pending outlives the event"
        );
        let claimed = log
            .claim_stalled("s", "g", "c2", Duration::ZERO, 10)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].stored.event.id, "b");
        assert_eq!(group_info(&log, "s", "g").await.pending, 1);
    }

    #[tokio::test]
    async fn test_groups_start_where_asked() {
        let log = InMemoryLog::new(100);
        let first = append_all(&log, "s", &["a"]).await[0];
        tokio::time::sleep(Duration::from_millis(3)).await;
        let seqs = append_all(&log, "s", &["b", "c"]).await;
        let cases = [
            ("new", StartPosition::New, vec!["d"]),
            ("all", StartPosition::All, vec!["a", "b", "c", "d"]),
            ("seq", StartPosition::Sequence(seqs[0]), vec!["b", "c", "d"]),
            ("seq0", StartPosition::Sequence(0), vec!["a", "b", "c", "d"]),
            (
                "time",
                StartPosition::Time(stored_at_ms(first) + 1),
                vec!["b", "c", "d"],
            ),
            ("last", StartPosition::Last, vec!["c", "d"]),
            ("next", StartPosition::Sequence(seqs[1] + 1), vec!["d"]),
        ];
        for (group, start, _) in &cases {
            log.ensure_group("s", group, start).await.unwrap();
        }
        append_all(&log, "s", &["d"]).await;
        for (group, _, expected) in &cases {
            let read = log
                .read_group("s", group, "c", 10, Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(ids(&read), *expected, "{group}");
        }
        // An existing group keeps its position.
        log.ensure_group("s", "new", &StartPosition::All)
            .await
            .unwrap();
        assert!(
            log.read_group("s", "new", "c", 10, Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn test_start_sequence_beyond_the_end_is_invalid_argument() {
        let log = InMemoryLog::new(100);
        let last = append_all(&log, "s", &["a"]).await[0];
        let err = log
            .ensure_group("s", "g", &StartPosition::Sequence(last + 2))
            .await
            .unwrap_err();
        let EventBusError::InvalidArgument(violations) = err else {
            panic!("{err:?}");
        };
        assert_eq!(violations[0].field, "start.sequence");
        assert!(log.info("s").await.unwrap().groups.is_empty());
        // On a fresh stream only 0 and 1 name a start.
        log.ensure_group("fresh", "g", &StartPosition::Sequence(1))
            .await
            .unwrap();
        assert!(
            log.ensure_group("fresh", "h", &StartPosition::Sequence(2))
                .await
                .is_err()
        );
        // A failed ensure creates nothing.
        assert!(
            log.ensure_group("never", "g", &StartPosition::Sequence(2))
                .await
                .is_err()
        );
        assert_eq!(log.streams().await.unwrap(), ["fresh", "s"]);
    }

    #[tokio::test]
    async fn test_start_sequence_before_the_first_retained_starts_at_the_first() {
        let log = InMemoryLog::new(100);
        let seqs = append_all(&log, "s", &["a", "b", "c"]).await;
        log.trim(
            "s",
            &TrimPolicy {
                max_len: Some(1),
                max_age: None,
            },
        )
        .await
        .unwrap();
        log.ensure_group("s", "g", &StartPosition::Sequence(seqs[0]))
            .await
            .unwrap();
        let read = log
            .read_group("s", "g", "c", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ids(&read), ["c"]);
    }

    #[tokio::test]
    async fn test_read_range_reads_from_each_position_without_a_group() {
        let log = InMemoryLog::new(100);
        let seqs = append_all(&log, "s", &["a", "b", "c"]).await;
        let range = |from| {
            let log = &log;
            async move {
                ids(&log.read_range("s", &from, 10).await.unwrap())
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(range(StartPosition::All).await, ["a", "b", "c"]);
        assert_eq!(range(StartPosition::Sequence(seqs[1])).await, ["b", "c"]);
        assert_eq!(range(StartPosition::Last).await, ["c"]);
        assert!(range(StartPosition::New).await.is_empty());
        assert_eq!(
            log.read_range("s", &StartPosition::All, 2)
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            log.read_range("nope", &StartPosition::All, 2)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn test_trim_by_length_and_age_counts_what_it_removed() {
        let log = InMemoryLog::new(100);
        append_all(&log, "s", &["a", "b"]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        append_all(&log, "s", &["c", "d", "e"]).await;
        let by_age = TrimPolicy {
            max_len: None,
            max_age: Some(Duration::from_millis(75)),
        };
        assert_eq!(log.trim("s", &by_age).await.unwrap(), 2);
        let by_len = TrimPolicy {
            max_len: Some(1),
            max_age: None,
        };
        assert_eq!(log.trim("s", &by_len).await.unwrap(), 2);
        assert_eq!(
            ids(&log.read_range("s", &StartPosition::All, 10).await.unwrap()),
            ["e"]
        );
        assert_eq!(log.trim("s", &TrimPolicy::default()).await.unwrap(), 0);
        assert_eq!(log.trim("nope", &by_len).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn test_max_len_drops_the_oldest_at_append() {
        let log = InMemoryLog::new(3);
        append_all(&log, "s", &["a", "b", "c", "d", "e"]).await;
        let info = log.info("s").await.unwrap();
        assert_eq!(info.length, 3);
        assert_eq!(
            ids(&log.read_range("s", &StartPosition::All, 10).await.unwrap()),
            ["c", "d", "e"]
        );
    }

    #[tokio::test]
    async fn test_blocking_read_wakes_on_append() {
        let log = Arc::new(InMemoryLog::new(100));
        log.ensure_group("s", "g", &StartPosition::New)
            .await
            .unwrap();
        let reader = {
            let log = log.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let read = log
                    .read_group("s", "g", "c", 10, Duration::from_secs(10))
                    .await
                    .unwrap();
                (read, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        append_all(&log, "s", &["a"]).await;
        let (read, elapsed) = reader.await.unwrap();
        assert_eq!(ids(&read), ["a"]);
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn test_blocking_read_returns_empty_when_the_wait_ends() {
        let log = InMemoryLog::new(100);
        log.ensure_group("s", "g", &StartPosition::New)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let read = log
            .read_group("s", "g", "c", 10, Duration::from_millis(50))
            .await
            .unwrap();
        assert!(read.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn test_unknown_groups_and_bad_names_are_reported() {
        let log = InMemoryLog::new(100);
        assert!(matches!(
            log.read_group("s", "g", "c", 1, Duration::ZERO).await,
            Err(EventBusError::NotFound(_))
        ));
        for stream in ["", "a{b", "a}b"] {
            assert!(matches!(
                log.append(stream, &event("a"), Duration::ZERO).await,
                Err(EventBusError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            log.read_group("s", "g", "c", MAX_BATCH + 1, Duration::ZERO)
                .await,
            Err(EventBusError::InvalidArgument(_))
        ));
        assert_eq!(log.info("s").await.unwrap(), StreamInfo::default());
        log.ensure_group("b", "g", &StartPosition::New)
            .await
            .unwrap();
        append_all(&log, "a", &["x"]).await;
        assert_eq!(log.streams().await.unwrap(), ["a", "b"]);
    }
}
