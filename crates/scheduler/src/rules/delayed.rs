//! The rule engine's durable state: delayed work waiting for its time (delayed responses,
//! cascade steps waiting for a task, `not_followed_by` timeouts), the index of what a
//! cancelling event cancels, and correlation windows — in Redis (so a new leader carries on
//! where the old one stopped), or in memory without Redis.
//!
//! Redis keys (under `agentmesh:scheduler:rules:`):
//! - `delayed`: a sorted set of record keys by due time (milliseconds since the Unix epoch);
//! - `delayed:rec`: a hash from record key to the record (JSON, the stimulus protobuf-encoded
//!   in hex);
//! - `cancel:<hash>`: the record keys a cancelling key cancels (a set, expiring a day after
//!   the last record's due time);
//! - `corr:<rule>:<hash of the key>`: one correlation key's events (a sorted set of event ids
//!   by time, expiring with the window); `corr-fired:<rule>/<event id>`: the events a firing
//!   correlated (an hour, so a redelivered completing event fires again, idempotently).
//!
//! A record is added once per response key (`HSETNX` + `ZADD NX` in one transaction), so a
//! redelivered stimulus does not schedule its delayed response twice; it is removed only after
//! the response ran (its idempotency key makes a second run after a failover a duplicate).

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// Key prefix of the rule engine's Redis keys.
pub const PREFIX: &str = "agentmesh:scheduler:rules:";

/// What a record waits to do.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Run `response`.
    #[default]
    Run,
    /// Wait for the task `response` submitted to end, then run its cascade or its fallback.
    Await { task_id: String },
    /// A `not_followed_by` timeout: fire the rule's responses.
    Timeout,
}

/// One delayed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delayed {
    /// The record's key: the response's idempotency key, `<rule>/<event id>/<response>`
    /// (`…#await`, `…/#timeout`).
    pub key: String,
    pub rule: String,
    /// The response's name (empty for a timeout).
    pub response: String,
    #[serde(default)]
    pub kind: Kind,
    /// Extra CEL variables of its templates (`output`, `correlation`), a JSON object.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vars: String,
    /// The cancelling key that removes it (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cancel: String,
    /// The stimulus's id and when the bus accepted it (milliseconds since the Unix epoch): a
    /// cancelling event removes only records of other, earlier stimuli.
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub at_ms: u64,
    /// When it is due, milliseconds since the Unix epoch.
    pub due_ms: u64,
    /// Runs tried and failed so far.
    pub attempts: u32,
    /// The stimulus, an `agentmesh.eventbus.v1.Event` protobuf, in hex.
    pub event_hex: String,
}

/// The event that cancels: its id and when the bus accepted it.
#[derive(Debug, Clone, Copy)]
pub struct Canceller<'a> {
    pub event_id: &'a str,
    pub at_ms: u64,
}

impl Canceller<'_> {
    /// Whether it cancels `d` (another stimulus, not a later one).
    #[must_use]
    pub fn cancels(&self, d: &Delayed) -> bool {
        d.event_id != self.event_id && d.at_ms <= self.at_ms
    }
}

/// A rule's records waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Delayed responses and `not_followed_by` timeouts.
    pub delayed: u64,
    /// Cascades waiting for their task.
    pub awaiting: u64,
}

impl Pending {
    fn count(&mut self, key: &str) {
        if key.ends_with("#await") {
            self.awaiting += 1;
        } else {
            self.delayed += 1;
        }
    }
}

/// Side of a `together_with` correlation an event is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The rule's stimulus.
    First,
    /// The second stimulus.
    Second,
}

/// What a correlation key waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// This many events.
    Count(u32),
    /// One event of each side.
    Both,
}

/// One event offered to a correlation.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub rule: &'a str,
    /// The key's value.
    pub key: &'a str,
    pub event_id: &'a str,
    pub side: Side,
    /// When the bus accepted it, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub window_ms: u64,
    pub need: Need,
}

/// How long a correlation's firing is remembered (so a redelivered completing event fires
/// again, under the same idempotency keys).
const FIRED_TTL_MS: u64 = 3_600_000;
/// How long a cancel index outlives its last record's due time.
const CANCEL_TTL_MS: u64 = 86_400_000;

/// Where the rule engine's durable state lives.
pub trait DelayStore: Send + Sync {
    /// Adds `d` unless its key is there or was cancelled (a redelivered stimulus does not bring
    /// back what a later event cancelled); indexed under `d.cancel` when set; whether it was
    /// added.
    fn add(&self, d: Delayed) -> BoxFuture<'_, Result<bool, String>>;
    /// Removes the records indexed under the cancelling key `cancel` whose stimulus is not
    /// `by` and was accepted no later than it; those removed.
    fn cancel<'a>(
        &'a self,
        cancel: &'a str,
        by: Canceller<'a>,
    ) -> BoxFuture<'a, Result<Vec<Delayed>, String>>;
    /// Adds an event to its correlation key's window; when that completes the correlation,
    /// the ids of the events correlated (oldest first; the key starts again from none), else
    /// empty. Offering the completing event again gives the same ids.
    fn correlate<'a>(&'a self, o: Observed<'a>) -> BoxFuture<'a, Result<Vec<String>, String>>;
    /// Up to `limit` records due at `now_ms`, earliest first.
    fn due(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Delayed>, String>>;
    /// Replaces a record that is still there (a new due time after a failed run); one removed
    /// meanwhile (cancelled) stays removed.
    fn update(&self, d: Delayed) -> BoxFuture<'_, Result<(), String>>;
    /// Removes a record (it ran, or its rule is gone).
    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Records waiting for `rule`.
    fn pending<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<Pending, String>>;
}

/// Delayed responses in memory (a single scheduler without Redis).
#[allow(
    clippy::type_complexity,
    reason = "two indexes of one set, used only here"
)]
#[derive(Debug, Default)]
pub struct MemoryDelayStore {
    /// By due time, and by key.
    inner: Mutex<(BTreeSet<(u64, String)>, BTreeMap<String, Delayed>)>,
    /// Cancelling key → record keys.
    cancels: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Record keys cancelled lately (the oldest forgotten past 65,536).
    cancelled: Mutex<(BTreeSet<String>, std::collections::VecDeque<String>)>,
    correlations: Mutex<Windows>,
}

/// Correlation windows in memory: per `(rule, key)` the events (time, side, id); and the
/// firings remembered (bounded: the oldest go).
#[derive(Debug, Default)]
struct Windows {
    /// Per `(rule, key)`: its window (milliseconds) and events.
    keys: BTreeMap<(String, String), (u64, Vec<Seen>)>,
    fired: BTreeMap<String, Vec<String>>,
    fired_order: std::collections::VecDeque<String>,
    /// `<rule>/<event id>` of events a firing correlated (bounded with `fired`).
    used: BTreeSet<String>,
    used_order: std::collections::VecDeque<String>,
    offered: u64,
}

/// One event in a correlation window: when, which side, its id.
type Seen = (u64, Side, String);

/// Correlation firings remembered in memory.
const FIRED_KEPT: usize = 65_536;

impl DelayStore for MemoryDelayStore {
    fn add(&self, d: Delayed) -> BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            let mut inner = self.inner.lock();
            if inner.1.contains_key(&d.key) || self.cancelled.lock().0.contains(&d.key) {
                return Ok(false);
            }
            if !d.cancel.is_empty() {
                self.cancels
                    .lock()
                    .entry(d.cancel.clone())
                    .or_default()
                    .insert(d.key.clone());
            }
            inner.0.insert((d.due_ms, d.key.clone()));
            inner.1.insert(d.key.clone(), d);
            Ok(true)
        })
    }

    fn cancel<'a>(
        &'a self,
        cancel: &'a str,
        by: Canceller<'a>,
    ) -> BoxFuture<'a, Result<Vec<Delayed>, String>> {
        Box::pin(async move {
            let mut cancels = self.cancels.lock();
            let mut inner = self.inner.lock();
            let mut removed = Vec::new();
            if let Some(keys) = cancels.get_mut(cancel) {
                let mut cancelled = self.cancelled.lock();
                keys.retain(|key| match inner.1.get(key) {
                    Some(d) if by.cancels(d) => {
                        let d = d.clone();
                        inner.1.remove(key);
                        inner.0.remove(&(d.due_ms, d.key.clone()));
                        if cancelled.0.insert(key.clone()) {
                            cancelled.1.push_back(key.clone());
                            if cancelled.1.len() > FIRED_KEPT
                                && let Some(old) = cancelled.1.pop_front()
                            {
                                cancelled.0.remove(&old);
                            }
                        }
                        removed.push(d);
                        false
                    }
                    Some(_) => true,
                    None => false,
                });
                if keys.is_empty() {
                    cancels.remove(cancel);
                }
            }
            Ok(removed)
        })
    }

    fn correlate<'a>(&'a self, o: Observed<'a>) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let mut w = self.correlations.lock();
            let marker = format!("{}/{}", o.rule, o.event_id);
            if let Some(ids) = w.fired.get(&marker) {
                return Ok(ids.clone());
            }
            if w.used.contains(&marker) {
                return Ok(Vec::new()); // correlated by a firing already
            }
            w.offered += 1;
            if w.offered.is_multiple_of(1024) {
                // Drop keys whose newest event left its own window.
                let now = o.at_ms;
                w.keys.retain(|_, (window, events)| {
                    events
                        .iter()
                        .any(|(at, _, _)| *at >= now.saturating_sub(*window))
                });
            }
            let (window, entry) = w
                .keys
                .entry((o.rule.to_owned(), o.key.to_owned()))
                .or_default();
            *window = o.window_ms;
            // The window ends at the newest event: one arriving late is not counted.
            let top = entry
                .iter()
                .map(|(at, _, _)| *at)
                .max()
                .unwrap_or(0)
                .max(o.at_ms);
            if o.at_ms.saturating_add(o.window_ms) < top {
                return Ok(Vec::new());
            }
            if !entry.iter().any(|(_, _, id)| id == o.event_id) {
                entry.push((o.at_ms, o.side, o.event_id.to_owned()));
            }
            let oldest = top.saturating_sub(o.window_ms);
            entry.retain(|(at, _, _)| *at >= oldest);
            entry.sort();
            let complete = match o.need {
                Need::Count(n) => entry.len() >= n as usize,
                // One event of each side, two distinct events (a stimulus matching both
                // sides does not pair with itself).
                Need::Both => entry.iter().any(|(_, s, a)| {
                    *s == Side::First && entry.iter().any(|(_, t, b)| *t == Side::Second && a != b)
                }),
            };
            if !complete {
                return Ok(Vec::new());
            }
            let ids: Vec<String> = entry.drain(..).map(|(_, _, id)| id).collect();
            w.keys.remove(&(o.rule.to_owned(), o.key.to_owned()));
            for id in &ids {
                let used = format!("{}/{id}", o.rule);
                if w.used.insert(used.clone()) {
                    w.used_order.push_back(used);
                    if w.used_order.len() > FIRED_KEPT
                        && let Some(old) = w.used_order.pop_front()
                    {
                        w.used.remove(&old);
                    }
                }
            }
            w.fired.insert(marker.clone(), ids.clone());
            w.fired_order.push_back(marker);
            if w.fired_order.len() > FIRED_KEPT
                && let Some(old) = w.fired_order.pop_front()
            {
                w.fired.remove(&old);
            }
            Ok(ids)
        })
    }

    fn due(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Delayed>, String>> {
        Box::pin(async move {
            let inner = self.inner.lock();
            Ok(inner
                .0
                .iter()
                .take_while(|(due, _)| *due <= now_ms)
                .take(limit)
                .filter_map(|(_, key)| inner.1.get(key).cloned())
                .collect())
        })
    }

    fn update(&self, d: Delayed) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut inner = self.inner.lock();
            let Some(old) = inner.1.get(&d.key).map(|o| (o.due_ms, o.key.clone())) else {
                return Ok(()); // removed meanwhile (cancelled): stays removed
            };
            inner.0.remove(&old);
            inner.0.insert((d.due_ms, d.key.clone()));
            inner.1.insert(d.key.clone(), d);
            Ok(())
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut inner = self.inner.lock();
            if let Some(old) = inner.1.remove(key) {
                inner.0.remove(&(old.due_ms, old.key.clone()));
                let mut cancels = self.cancels.lock();
                if let Some(keys) = cancels.get_mut(&old.cancel) {
                    keys.remove(&old.key);
                    if keys.is_empty() {
                        cancels.remove(&old.cancel);
                    }
                }
            }
            Ok(())
        })
    }

    fn pending<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<Pending, String>> {
        Box::pin(async move {
            let mut pending = Pending::default();
            for d in self.inner.lock().1.values().filter(|d| d.rule == rule) {
                pending.count(&d.key);
            }
            Ok(pending)
        })
    }
}

/// Delayed responses in Redis.
#[derive(Clone)]
pub struct RedisDelayStore {
    conn: ConnectionManager,
}

impl std::fmt::Debug for RedisDelayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisDelayStore")
    }
}

fn zset() -> String {
    format!("{PREFIX}delayed")
}

fn records() -> String {
    format!("{PREFIX}delayed:rec")
}

fn redis_error(e: &redis::RedisError) -> String {
    format!("Redis: {e}")
}

fn tombstone(key: &str) -> String {
    format!("{PREFIX}cancelled:{key}")
}

/// Replaces a record only while it is there. KEYS: the hash, the sorted set. ARGV: key, record,
/// due time.
const UPDATE: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 0
";

fn cancel_set(cancel: &str) -> String {
    format!(
        "{PREFIX}cancel:{:032x}",
        xxhash_rust::xxh3::xxh3_128(cancel.as_bytes())
    )
}

/// Adds an event to a correlation key's window and says whether that completes it, in one
/// step. KEYS: the window (a sorted set), the firing marker, the event's "correlated" marker.
/// ARGV: member (`<side>:<id>`), time, window, count needed (0: one of each side), marker TTL,
/// the prefix of "correlated" markers. Returns the correlated ids
/// (with their side prefix) or an empty list.
const CORRELATE: &str = r"
local fired = redis.call('GET', KEYS[2])
if fired then return cjson.decode(fired) end
-- An event a firing already correlated (delivered again) counts no more.
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local at = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local need = tonumber(ARGV[4])
-- The window ends at the newest event: one arriving late, older than that allows, is not
-- counted.
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local top = at
if newest[2] and tonumber(newest[2]) > at then top = tonumber(newest[2]) end
if at < top - window then return {} end
redis.call('ZADD', KEYS[1], at, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (top - window))
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local complete = false
if need > 0 then
  complete = #members >= need
else
  local firsts, seconds = {}, {}
  for _, m in ipairs(members) do
    if string.sub(m, 1, 2) == 'a:' then
      firsts[#firsts + 1] = string.sub(m, 3)
    else
      seconds[#seconds + 1] = string.sub(m, 3)
    end
  end
  -- Two distinct events: a stimulus matching both sides does not pair with itself.
  for _, a in ipairs(firsts) do
    for _, b in ipairs(seconds) do
      if a ~= b then complete = true end
    end
  end
end
if not complete then
  redis.call('PEXPIRE', KEYS[1], window + 1000)
  return {}
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], cjson.encode(members), 'PX', ARGV[5])
for _, m in ipairs(members) do
  redis.call('SET', ARGV[6] .. string.sub(m, 3), 1, 'PX', ARGV[5])
end
return members
";

impl RedisDelayStore {
    #[must_use]
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }
}

impl DelayStore for RedisDelayStore {
    fn add(&self, d: Delayed) -> BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            let json = serde_json::to_string(&d).map_err(|e| e.to_string())?;
            let cancelled: bool = redis::cmd("EXISTS")
                .arg(tombstone(&d.key))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| redis_error(&e))?;
            if cancelled {
                return Ok(false);
            }
            let mut pipe = redis::pipe();
            pipe.atomic()
                .hset_nx(records(), &d.key, json)
                .cmd("ZADD")
                .arg(zset())
                .arg("NX")
                .arg(d.due_ms)
                .arg(&d.key)
                .ignore();
            if !d.cancel.is_empty() {
                let set = cancel_set(&d.cancel);
                pipe.sadd(&set, &d.key)
                    .ignore()
                    .cmd("PEXPIREAT")
                    .arg(&set)
                    .arg(d.due_ms.saturating_add(CANCEL_TTL_MS))
                    .ignore();
            }
            let (added,): (bool,) = pipe
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(added)
        })
    }

    fn cancel<'a>(
        &'a self,
        cancel: &'a str,
        by: Canceller<'a>,
    ) -> BoxFuture<'a, Result<Vec<Delayed>, String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let set = cancel_set(cancel);
            let keys: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&set)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(records())
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            // Records gone (ran) leave the index; records of later stimuli stay.
            let mut drop = Vec::new();
            let mut removed = Vec::new();
            for (key, value) in keys.iter().zip(values) {
                match value.and_then(|json| serde_json::from_str::<Delayed>(&json).ok()) {
                    Some(d) if by.cancels(&d) => {
                        drop.push(key.clone());
                        removed.push(d);
                    }
                    Some(_) => {}
                    None => drop.push(key.clone()),
                }
            }
            if drop.is_empty() {
                return Ok(removed);
            }
            let mut pipe = redis::pipe();
            pipe.atomic()
                .zrem(zset(), &drop)
                .ignore()
                .hdel(records(), &drop)
                .ignore()
                .srem(&set, &drop)
                .ignore();
            for d in &removed {
                pipe.cmd("SET")
                    .arg(tombstone(&d.key))
                    .arg(1)
                    .arg("PX")
                    .arg(CANCEL_TTL_MS)
                    .ignore();
            }
            let () = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(removed)
        })
    }

    fn correlate<'a>(&'a self, o: Observed<'a>) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let window = format!(
                "{PREFIX}corr:{}:{:032x}",
                o.rule,
                xxhash_rust::xxh3::xxh3_128(o.key.as_bytes())
            );
            let marker = format!("{PREFIX}corr-fired:{}/{}", o.rule, o.event_id);
            let used_prefix = format!("{PREFIX}corr-used:{}/", o.rule);
            let side = match o.side {
                Side::First => "a",
                Side::Second => "b",
            };
            let need = match o.need {
                Need::Count(n) => n,
                Need::Both => 0,
            };
            let members: Vec<String> = redis::Script::new(CORRELATE)
                .key(window)
                .key(marker)
                .key(format!("{used_prefix}{}", o.event_id))
                .arg(format!("{side}:{}", o.event_id))
                .arg(o.at_ms)
                .arg(o.window_ms)
                .arg(need)
                .arg(FIRED_TTL_MS)
                .arg(&used_prefix)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(members
                .into_iter()
                .map(|m| m.get(2..).unwrap_or_default().to_owned())
                .collect())
        })
    }

    fn due(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Delayed>, String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let keys: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(zset())
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(records())
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(values
                .into_iter()
                .flatten()
                .filter_map(|json| serde_json::from_str(&json).ok())
                .collect())
        })
    }

    fn update(&self, d: Delayed) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let json = serde_json::to_string(&d).map_err(|e| e.to_string())?;
            let _: i64 = redis::Script::new(UPDATE)
                .key(records())
                .key(zset())
                .arg(&d.key)
                .arg(json)
                .arg(d.due_ms)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let () = redis::pipe()
                .atomic()
                .zrem(zset(), key)
                .ignore()
                .hdel(records(), key)
                .ignore()
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(())
        })
    }

    fn pending<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<Pending, String>> {
        Box::pin(async move {
            // Keys start with the rule's name and a slash; HSCAN walks only the hash.
            let mut conn = self.conn.clone();
            let pattern = format!("{}/*", rule.replace(['*', '?', '[', ']', '\\'], "\\$0"));
            let mut cursor: u64 = 0;
            let mut pending = Pending::default();
            loop {
                let (next, fields): (u64, Vec<String>) = redis::cmd("HSCAN")
                    .arg(records())
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| redis_error(&e))?;
                for key in fields.iter().step_by(2) {
                    pending.count(key);
                }
                cursor = next;
                if cursor == 0 {
                    return Ok(pending);
                }
            }
        })
    }
}

/// Hex of `bytes`.
#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of `hex` (`None` when it is not hex).
#[must_use]
pub fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, due_ms: u64) -> Delayed {
        Delayed {
            key: key.into(),
            rule: key.split('/').next().unwrap_or("").into(),
            response: "r".into(),
            kind: Kind::Run,
            vars: String::new(),
            cancel: String::new(),
            event_id: key.split('/').nth(1).unwrap_or("").into(),
            at_ms: 10,
            due_ms,
            attempts: 0,
            event_hex: to_hex(b"\x0a\x02e1"),
        }
    }

    #[tokio::test]
    async fn test_records_come_due_in_order_once_each() {
        let store = MemoryDelayStore::default();
        assert!(store.add(record("a/e1/r", 300)).await.expect("add"));
        assert!(store.add(record("a/e2/r", 100)).await.expect("add"));
        assert!(store.add(record("b/e3/r", 200)).await.expect("add"));
        assert!(
            !store.add(record("a/e1/r", 50)).await.expect("add again"),
            "added once"
        );
        let due: Vec<String> = store
            .due(250, 10)
            .await
            .expect("due")
            .into_iter()
            .map(|d| d.key)
            .collect();
        assert_eq!(due, ["a/e2/r", "b/e3/r"]);
        let mut later = record("a/e2/r", 400);
        later.attempts = 1;
        store.update(later).await.expect("update");
        store.remove("b/e3/r").await.expect("remove");
        let due: Vec<String> = store
            .due(1000, 10)
            .await
            .expect("due")
            .into_iter()
            .map(|d| d.key)
            .collect();
        assert_eq!(due, ["a/e1/r", "a/e2/r"]);
        assert_eq!(store.pending("a").await.expect("pending").delayed, 2);
        assert_eq!(store.pending("b").await.expect("pending").delayed, 0);
        assert_eq!(from_hex(&to_hex(b"\x00\xffz")), Some(b"\x00\xffz".to_vec()));
        assert_eq!(from_hex("zz"), None);
    }

    #[tokio::test]
    async fn test_a_cancelling_key_removes_every_record_under_it() {
        let store = MemoryDelayStore::default();
        for (key, cancel) in [
            ("a/e1/r", "a/r/o-1"),
            ("a/e2/r", "a/r/o-1"),
            ("a/e3/r", "a/r/o-2"),
        ] {
            let mut d = record(key, 100);
            d.cancel = cancel.into();
            store.add(d).await.expect("add");
        }
        let by = |event_id, at_ms| Canceller { event_id, at_ms };
        assert!(
            store
                .cancel("a/r/o-1", by("c", 5))
                .await
                .expect("earlier")
                .is_empty(),
            "an event older than the stimuli cancels nothing"
        );
        assert!(
            store
                .cancel("a/r/o-2", by("e3", 50))
                .await
                .expect("itself")
                .is_empty(),
            "a stimulus does not cancel its own record"
        );
        let removed = store.cancel("a/r/o-1", by("c", 50)).await.expect("cancel");
        assert_eq!(removed.len(), 2);
        // A redelivered stimulus does not bring a cancelled record back, nor does a retry.
        let mut again = record("a/e1/r", 100);
        again.cancel = "a/r/o-1".into();
        assert!(!store.add(again.clone()).await.expect("add again"));
        store.update(again).await.expect("update");
        assert!(
            store
                .cancel("a/r/o-1", by("c", 50))
                .await
                .expect("again")
                .is_empty()
        );
        let due = store.due(1000, 10).await.expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].key, "a/e3/r");
    }

    #[tokio::test]
    async fn test_correlations_fire_once_complete_and_again_for_a_redelivery() {
        let store = MemoryDelayStore::default();
        let offer = |id: &'static str, at_ms: u64, side: Side, need: Need| Observed {
            rule: "r",
            key: "k",
            event_id: id,
            side,
            at_ms,
            window_ms: 1000,
            need,
        };
        let count = Need::Count(3);
        assert!(
            store
                .correlate(offer("e1", 0, Side::First, count))
                .await
                .expect("1")
                .is_empty()
        );
        // e2 comes after e1 left the window.
        assert!(
            store
                .correlate(offer("e2", 1500, Side::First, count))
                .await
                .expect("2")
                .is_empty()
        );
        assert!(
            store
                .correlate(offer("e3", 1600, Side::First, count))
                .await
                .expect("3")
                .is_empty()
        );
        assert_eq!(
            store
                .correlate(offer("e4", 1700, Side::First, count))
                .await
                .expect("4"),
            ["e2", "e3", "e4"]
        );
        assert_eq!(
            store
                .correlate(offer("e4", 1700, Side::First, count))
                .await
                .expect("again"),
            ["e2", "e3", "e4"],
            "a redelivered completing event fires again (idempotently)"
        );
        assert!(
            store
                .correlate(offer("e5", 1800, Side::First, count))
                .await
                .expect("5")
                .is_empty()
        );
        let both = Need::Both;
        assert!(
            store
                .correlate(offer("a1", 5000, Side::First, both))
                .await
                .expect("a")
                .is_empty()
        );
        assert!(
            store
                .correlate(offer("a2", 5100, Side::First, both))
                .await
                .expect("a")
                .is_empty()
        );
        assert_eq!(
            store
                .correlate(offer("b1", 5200, Side::Second, both))
                .await
                .expect("b"),
            ["a1", "a2", "b1"]
        );
        // e2 (counted by the firing) delivered again counts no more; a late event, older than
        // the window of the newest, is not counted.
        assert!(
            store
                .correlate(offer("e2", 1500, Side::First, count))
                .await
                .expect("again")
                .is_empty()
        );
        assert!(
            store
                .correlate(offer("e6", 3000, Side::First, count))
                .await
                .expect("6")
                .is_empty()
        );
        assert!(
            store
                .correlate(offer("late", 1000, Side::First, count))
                .await
                .expect("late")
                .is_empty()
        );
        assert!(
            store
                .correlate(offer("e7", 3100, Side::First, count))
                .await
                .expect("7")
                .is_empty()
        );
        assert_eq!(
            store
                .correlate(offer("e8", 3200, Side::First, count))
                .await
                .expect("8"),
            ["e6", "e7", "e8"],
            "e5 left the window; neither e2 nor the late one counted"
        );
        // One event on both sides does not pair with itself.
        assert!(
            store
                .correlate(offer("x", 9000, Side::First, both))
                .await
                .expect("x")
                .is_empty()
        );
        assert!(
            store
                .correlate(offer("x", 9000, Side::Second, both))
                .await
                .expect("x")
                .is_empty()
        );
    }
}
