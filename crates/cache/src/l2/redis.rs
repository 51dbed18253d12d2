//! L2 in Redis: one string per key (the entry's stored form, expiring with its TTL plus grace
//! window), a hash of generations per namespace, one string per lease, two counters (the write
//! sequence and the lease fence), and the pub/sub channel every change is published on — each
//! change decided, numbered and published inside one Lua script.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{L2Error, L2Store, LeaseState, Read, Scope, Write, Written, ms};
use crate::entry::Entry;
use crate::sync::{Change, SyncEvent, tail};

/// Key prefix of everything the cache keeps in Redis.
pub const PREFIX: &str = "agentmesh:cache:";
/// The pub/sub channel of the change feed.
pub const CHANNEL: &str = "agentmesh:cache:sync";
const SEQ: &str = "agentmesh:cache:seq";
const FENCE: &str = "agentmesh:cache:fence";
/// How often the feed's connection is pinged (a silent Redis is a lost feed).
const FEED_PING: Duration = Duration::from_secs(1);

/// A write (or a lease's fill). KEYS: entry, generations, sequence, lease. ARGV: if_version
/// ("" = any), keep ms, now ms, message tail, body, lease token ("" = none), tag count, tags,
/// channel.
/// Returns {0, version} on a version conflict, {2, version} when the lease is not held, or
/// {1, version, seq, compute ms, namespace generation, tag generations…}.
const SET: &str = r"
local cur = redis.call('GET', KEYS[1])
local version = 0
if cur then version = struct.unpack('<I8', cur) end
local body = ARGV[5]
local compute = 0
if ARGV[6] ~= '' then
  local lease = redis.call('GET', KEYS[4])
  if not lease then return {2, version} end
  local sep = string.find(lease, ':', 1, true)
  if string.sub(lease, 1, sep - 1) ~= ARGV[6] then return {2, version} end
  compute = tonumber(ARGV[3]) - tonumber(string.sub(lease, sep + 1))
  if compute < 0 then compute = 0 end
  if compute > 4294967295 then compute = 4294967295 end
  body = string.sub(body, 1, 20) .. struct.pack('<I4', compute) .. string.sub(body, 25)
  redis.call('DEL', KEYS[4])
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= version then return {0, version} end
version = version + 1
local seq = redis.call('INCR', KEYS[3])
local n = tonumber(ARGV[7])
local fields = {'!ns'}
for i = 1, n do fields[i + 1] = 't:' .. ARGV[7 + i] end
local gens = redis.call('HMGET', KEYS[2], unpack(fields))
local out = {1, version, seq, compute}
local head = struct.pack('<I8I8I8I2', version, seq, tonumber(gens[1]) or 0, n)
out[5] = tonumber(gens[1]) or 0
for i = 1, n do
  local tag = ARGV[7 + i]
  local g = tonumber(gens[i + 1]) or 0
  head = head .. struct.pack('<I8I2', g, #tag) .. tag
  out[5 + i] = g
end
redis.call('SET', KEYS[1], head .. body, 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[8 + n],
  seq .. ' k ' .. ARGV[3] .. ' ' .. version .. ' ' .. ARGV[4])
return out
";

/// A read. KEYS: entry, generations. Returns nil, or {entry, namespace generation, tag
/// generations…}.
const GET: &str = r"
local raw = redis.call('GET', KEYS[1])
if not raw then return nil end
local n = struct.unpack('<I2', raw, 25)
local pos = 27
local fields = {'!ns'}
for i = 1, n do
  local len = struct.unpack('<I2', raw, pos + 8)
  fields[i + 1] = 't:' .. string.sub(raw, pos + 10, pos + 9 + len)
  pos = pos + 10 + len
end
local gens = redis.call('HMGET', KEYS[2], unpack(fields))
local out = {raw}
for i = 1, n + 1 do out[i + 1] = tonumber(gens[i]) or 0 end
return out
";

/// A delete. KEYS: entry, sequence. ARGV: now ms, message tail, channel. Returns {existed, seq}.
const DELETE: &str = r"
local n = redis.call('DEL', KEYS[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], seq .. ' d ' .. ARGV[1] .. ' 0 ' .. ARGV[2])
return {n, seq}
";

/// Tags or namespace invalidated. KEYS: generations, sequence. ARGV: now ms, message tail,
/// channel, kind ('t' or 'n'), tags…. Returns the message published.
const INVALIDATE: &str = r"
local seq = redis.call('INCR', KEYS[2])
local number = 0
local rest = {}
if ARGV[4] == 'n' then
  number = redis.call('HINCRBY', KEYS[1], '!ns', 1)
else
  for i = 5, #ARGV do
    rest[#rest + 1] = redis.call('HINCRBY', KEYS[1], 't:' .. ARGV[i], 1) .. ' ' .. ARGV[i]
  end
end
local message = seq .. ' ' .. ARGV[4] .. ' ' .. ARGV[1] .. ' ' .. number .. ' ' .. ARGV[2]
  .. table.concat(rest, '\n')
redis.call('PUBLISH', ARGV[3], message)
return message
";

/// A lease. KEYS: entry, lease, fence. ARGV: seen seq, lease ms, now ms. Returns {0, token}
/// granted, {1, ms left} held, {2, 0} written since the caller looked.
const LEASE: &str = r"
local raw = redis.call('GET', KEYS[1])
if raw and struct.unpack('<I8', raw, 9) > tonumber(ARGV[1]) then return {2, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, redis.call('PTTL', KEYS[2])} end
local token = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[2], token .. ':' .. ARGV[3], 'PX', ARGV[2])
return {0, token}
";

/// A lease given up. KEYS: lease, sequence. ARGV: token, now ms, message tail, channel.
/// Returns 1 when it was held with the token.
const ABANDON: &str = r"
local lease = redis.call('GET', KEYS[1])
if not lease then return 0 end
local sep = string.find(lease, ':', 1, true)
if string.sub(lease, 1, sep - 1) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[4], seq .. ' a ' .. ARGV[2] .. ' 0 ' .. ARGV[3])
return 1
";

/// L2 in Redis.
#[derive(Clone)]
pub struct RedisL2 {
    client: redis::Client,
    conn: ConnectionManager,
    set: redis::Script,
    get: redis::Script,
    delete: redis::Script,
    invalidate: redis::Script,
    lease: redis::Script,
    abandon: redis::Script,
}

impl std::fmt::Debug for RedisL2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisL2").finish_non_exhaustive()
    }
}

impl RedisL2 {
    /// L2 over `conn`; `client` opens the feed's own connection.
    #[must_use]
    pub fn new(client: redis::Client, conn: ConnectionManager) -> Self {
        Self {
            client,
            conn,
            set: redis::Script::new(SET),
            get: redis::Script::new(GET),
            delete: redis::Script::new(DELETE),
            invalidate: redis::Script::new(INVALIDATE),
            lease: redis::Script::new(LEASE),
            abandon: redis::Script::new(ABANDON),
        }
    }
}

/// The Redis key of an entry.
#[must_use]
pub fn entry_key(namespace: &str, key: &str) -> String {
    format!("{PREFIX}{}|{key}", tail(namespace, ""))
}

/// (namespace, key) of an entry's Redis key; `None` for the cache's other keys.
fn parse_entry_key(raw: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(raw).ok()?.strip_prefix(PREFIX)?;
    let (len, rest) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let namespace = rest.get(..len)?;
    let key = rest.get(len..)?.strip_prefix('|')?;
    Some((namespace.to_owned(), key.to_owned()))
}

fn glob_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = matches!(c, '*' | '?' | '[' | ']' | '\\');
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

fn gens_key(namespace: &str) -> String {
    format!("{PREFIX}gen:{namespace}")
}

fn lease_key(namespace: &str, key: &str) -> String {
    format!("{PREFIX}lease:{}|{key}", tail(namespace, ""))
}

fn failed(e: &redis::RedisError) -> L2Error {
    L2Error(format!("Redis: {e}"))
}

fn int(v: &Value) -> Result<u64, L2Error> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| L2Error(format!("negative {i}"))),
        other => Err(L2Error(format!("unexpected reply {other:?}"))),
    }
}

fn ints(v: &[Value]) -> Result<Vec<u64>, L2Error> {
    v.iter().map(int).collect()
}

impl L2Store for RedisL2 {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        _now_ms: u64,
    ) -> BoxFuture<'a, Result<Option<Read>, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let reply: Value = self
                .get
                .key(entry_key(namespace, key))
                .key(gens_key(namespace))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            let items = match reply {
                Value::Nil => return Ok(None),
                Value::Array(items) => items,
                other => return Err(L2Error(format!("unexpected reply {other:?}"))),
            };
            let Some((Value::BulkString(raw), gens)) = items.split_first() else {
                return Err(L2Error("unexpected reply to a read".to_owned()));
            };
            let entry = Entry::decode(Bytes::copy_from_slice(raw))
                .ok_or_else(|| L2Error("an entry in Redis is not in the cache's form".into()))?;
            let gens = ints(gens)?;
            let (ns_gen, tag_gens) = gens
                .split_first()
                .map(|(n, t)| (*n, t.to_vec()))
                .unwrap_or_default();
            Ok(Some(Read {
                entry,
                ns_gen,
                tag_gens,
            }))
        })
    }

    fn set<'a>(
        &'a self,
        write: Write<'a>,
        lease: Option<u64>,
    ) -> BoxFuture<'a, Result<Written, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut call = self.set.prepare_invoke();
            call.key(entry_key(write.namespace, write.key))
                .key(gens_key(write.namespace))
                .key(SEQ)
                .key(lease_key(write.namespace, write.key))
                .arg(write.if_version.map(|v| v.to_string()).unwrap_or_default())
                .arg(ms(write.keep).max(1))
                .arg(write.now_ms)
                .arg(tail(write.namespace, write.key))
                .arg(write.body.encode().as_ref())
                .arg(lease.map(|t| t.to_string()).unwrap_or_default())
                .arg(write.tags.len());
            for tag in write.tags {
                call.arg(tag.as_str());
            }
            call.arg(CHANNEL);
            let reply: Vec<Value> = call.invoke_async(&mut conn).await.map_err(|e| failed(&e))?;
            let reply = ints(&reply)?;
            match reply.as_slice() {
                [0, version] => Ok(Written::Conflict(*version)),
                [2, _] => Ok(Written::LeaseLost),
                [1, version, seq, compute, ns_gen, tag_gens @ ..] => {
                    let mut body = write.body;
                    if lease.is_some() {
                        body.compute_ms = u32::try_from(*compute).unwrap_or(u32::MAX);
                    }
                    let tags = write.tags.iter().cloned().zip(tag_gens.iter().copied());
                    Ok(Written::Stored(body.stamped(
                        *version,
                        *seq,
                        *ns_gen,
                        tags.collect(),
                    )))
                }
                other => Err(L2Error(format!("unexpected reply to a write {other:?}"))),
            }
        })
    }

    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<bool, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (n, _seq): (u64, u64) = self
                .delete
                .key(entry_key(namespace, key))
                .key(SEQ)
                .arg(now_ms)
                .arg(tail(namespace, key))
                .arg(CHANNEL)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(n > 0)
        })
    }

    fn invalidate<'a>(
        &'a self,
        namespace: &'a str,
        scope: Scope<'a>,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Change, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut call = self.invalidate.prepare_invoke();
            call.key(gens_key(namespace))
                .key(SEQ)
                .arg(now_ms)
                .arg(tail(namespace, ""))
                .arg(CHANNEL);
            match scope {
                Scope::Namespace => {
                    call.arg("n");
                }
                Scope::Tags(tags) => {
                    call.arg("t");
                    for tag in tags {
                        call.arg(tag.as_str());
                    }
                }
            }
            let message: Vec<u8> = call.invoke_async(&mut conn).await.map_err(|e| failed(&e))?;
            Change::decode(&message)
                .ok_or_else(|| L2Error("unexpected reply to an invalidation".to_owned()))
        })
    }

    fn lease<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        ttl: Duration,
        seen_seq: u64,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseState, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (state, n): (u8, i64) = self
                .lease
                .key(entry_key(namespace, key))
                .key(lease_key(namespace, key))
                .key(FENCE)
                .arg(seen_seq)
                .arg(ms(ttl).max(1))
                .arg(now_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            let n = u64::try_from(n).unwrap_or(0);
            Ok(match state {
                0 => LeaseState::Granted(n),
                1 => LeaseState::Held(n),
                _ => LeaseState::Filled,
            })
        })
    }

    fn abandon<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        token: u64,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<bool, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let held: u8 = self
                .abandon
                .key(lease_key(namespace, key))
                .key(SEQ)
                .arg(token)
                .arg(now_ms)
                .arg(tail(namespace, key))
                .arg(CHANNEL)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(held == 1)
        })
    }

    fn scan<'a>(
        &'a self,
        key_prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let pattern = format!("{PREFIX}*|{}*", glob_escape(key_prefix));
            let mut cursor = 0u64;
            let mut out = Vec::new();
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| failed(&e))?;
                out.extend(keys.iter().filter_map(|k| parse_entry_key(k)));
                if next == 0 || out.len() >= limit {
                    out.truncate(limit);
                    return Ok(out);
                }
                cursor = next;
            }
        })
    }

    fn watch(&self) -> BoxStream<'static, SyncEvent> {
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(feed(self.client.clone(), self.conn.clone(), tx));
        ReceiverStream::new(rx).boxed()
    }

    fn shared(&self) -> bool {
        true
    }
}

/// Keeps the feed: subscribes, reports `Synced` with the sequence then, forwards changes,
/// pings, and on any failure reports `Lost` and starts again (back-off up to 2 s). Ends when
/// the receiver is dropped.
async fn feed(client: redis::Client, mut conn: ConnectionManager, tx: mpsc::Sender<SyncEvent>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let reason = match subscribed(&client, &mut conn, &tx).await {
            Ok(()) => return,
            Err(reason) => reason,
        };
        if tx.send(SyncEvent::Lost { reason }).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One subscription's life: `Ok` when the receiver is gone, `Err` why the feed was lost.
async fn subscribed(
    client: &redis::Client,
    conn: &mut ConnectionManager,
    tx: &mpsc::Sender<SyncEvent>,
) -> Result<(), String> {
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| "connecting the feed timed out".to_owned())?
        .map_err(|e| format!("connecting the feed: {e}"))?;
    pubsub
        .subscribe(CHANNEL)
        .await
        .map_err(|e| format!("subscribing: {e}"))?;
    let seq: Option<u64> = tokio::time::timeout(
        Duration::from_secs(2),
        redis::cmd("GET").arg(SEQ).query_async(conn),
    )
    .await
    .map_err(|_| "reading the sequence timed out".to_owned())?
    .map_err(|e| format!("reading the sequence: {e}"))?;
    if tx
        .send(SyncEvent::Synced {
            seq: seq.unwrap_or(0),
        })
        .await
        .is_err()
    {
        return Ok(());
    }
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(FEED_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Err("the feed's connection closed".to_owned());
                };
                let Some(change) = Change::decode(message.get_payload_bytes()) else {
                    tracing::warn!("ignoring a message on {CHANNEL} that is not a change");
                    continue;
                };
                if tx.send(SyncEvent::Change(change)).await.is_err() {
                    return Ok(());
                }
            }
            _ = ping.tick() => {
                let pong: Result<Result<Value, _>, _> =
                    tokio::time::timeout(2 * FEED_PING, sink.ping()).await;
                match pong {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("ping on the feed: {e}")),
                    Err(_) => return Err("ping on the feed timed out".to_owned()),
                }
            }
        }
    }
}
