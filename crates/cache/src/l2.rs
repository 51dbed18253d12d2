//! L2: the tier every instance shares — Redis ([`RedisL2`]), or in memory ([`InMemoryL2`])
//! without `--redis` (then it is as local as L1, and says so).
//!
//! A write is a compare-and-set on the stored version, done in one step in L2 (a Lua script in
//! Redis), so two instances writing one key cannot both win an `if_version`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;

use crate::entry::Entry;

/// What a conditional write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored, at this version.
    Stored(u64),
    /// Not stored: the key is at this version (0: absent).
    Conflict(u64),
}

/// An L2 that cannot be reached or answered wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("L2: {0}")]
pub struct L2Error(pub String);

/// The shared tier.
pub trait L2Store: Send + Sync {
    /// The entry under `key`, if present and not expired.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, L2Error>>;

    /// Stores `value` as the key's next version, when its current version is `if_version`
    /// (`None`: whatever it is); the entry lives `ttl`.
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        if_version: Option<u64>,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<(Written, Option<Entry>), L2Error>>;

    /// Removes the key; whether it was there.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, L2Error>>;
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// L2 in this process (no Redis).
#[derive(Debug, Default)]
pub struct InMemoryL2 {
    entries: Mutex<HashMap<String, Entry>>,
}

impl L2Store for InMemoryL2 {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, L2Error>> {
        let entry = self.entries.lock().get(key).cloned();
        Box::pin(async move { Ok(entry) })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        if_version: Option<u64>,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<(Written, Option<Entry>), L2Error>> {
        let mut entries = self.entries.lock();
        let current = entries
            .get(key)
            .filter(|e| e.expires_ms > now_ms)
            .map_or(0, |e| e.version);
        let result = if if_version.is_some_and(|v| v != current) {
            (Written::Conflict(current), None)
        } else {
            let entry = Entry::new(value, current + 1, now_ms, now_ms.saturating_add(ms(ttl)));
            entries.insert(key.to_owned(), entry.clone());
            (Written::Stored(current + 1), Some(entry))
        };
        Box::pin(async move { Ok(result) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, L2Error>> {
        let removed = self.entries.lock().remove(key).is_some();
        Box::pin(async move { Ok(removed) })
    }
}

/// Key prefix of every cache key in Redis.
pub const PREFIX: &str = "agentmesh:cache:";

/// Reads the stored version (bytes 0..8, little-endian) and writes the next one when it
/// matches. KEYS[1] = the key; ARGV = if_version ("" = any), the entry without its version
/// (written ms, expires ms, flags, data), TTL ms. Returns {stored 0|1, version}.
const SET_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
local version = 0
if cur then
  version = struct.unpack('<I8', string.sub(cur, 1, 8))
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= version then
  return {0, version}
end
version = version + 1
redis.call('SET', KEYS[1], struct.pack('<I8', version) .. ARGV[2], 'PX', ARGV[3])
return {1, version}
";

/// L2 in Redis: one string per key, the entry's stored form, expiring with it.
#[derive(Clone)]
pub struct RedisL2 {
    conn: ConnectionManager,
    script: redis::Script,
}

impl std::fmt::Debug for RedisL2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisL2").finish_non_exhaustive()
    }
}

impl RedisL2 {
    /// L2 over `conn`.
    #[must_use]
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            script: redis::Script::new(SET_SCRIPT),
        }
    }
}

fn failed(e: &redis::RedisError) -> L2Error {
    L2Error(format!("Redis: {e}"))
}

impl L2Store for RedisL2 {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let raw: Option<Vec<u8>> = redis::cmd("GET")
                .arg(format!("{PREFIX}{key}"))
                .query_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(raw.and_then(|r| Entry::decode(Bytes::from(r))))
        })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        if_version: Option<u64>,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<(Written, Option<Entry>), L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // The entry without its version: the script prepends the version it assigns.
            let mut entry = Entry::new(value, 0, now_ms, now_ms.saturating_add(ms(ttl)));
            let rest = entry.encode().slice(8..);
            let (stored, version): (u8, u64) = self
                .script
                .key(format!("{PREFIX}{key}"))
                .arg(if_version.map(|v| v.to_string()).unwrap_or_default())
                .arg(rest.as_ref())
                .arg(ms(ttl).max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            if stored == 1 {
                entry.version = version;
                Ok((Written::Stored(version), Some(entry)))
            } else {
                Ok((Written::Conflict(version), None))
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, L2Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let n: u64 = redis::cmd("DEL")
                .arg(format!("{PREFIX}{key}"))
                .query_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(n > 0)
        })
    }
}
