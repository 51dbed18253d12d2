//! Delayed responses waiting for their time: in Redis (so a new leader runs what the old one
//! scheduled), or in memory without Redis.
//!
//! Redis keys (under `agentmesh:scheduler:rules:`):
//! - `delayed`: a sorted set of response keys by due time (milliseconds since the Unix epoch);
//! - `delayed:rec`: a hash from response key to the record (JSON, the stimulus protobuf-encoded
//!   in hex).
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

/// One delayed response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delayed {
    /// The response's idempotency key, `<rule>/<event id>/<response>`.
    pub key: String,
    pub rule: String,
    pub response: String,
    /// When it is due, milliseconds since the Unix epoch.
    pub due_ms: u64,
    /// Runs tried and failed so far.
    pub attempts: u32,
    /// The stimulus, an `agentmesh.eventbus.v1.Event` protobuf, in hex.
    pub event_hex: String,
}

/// Where delayed responses wait.
pub trait DelayStore: Send + Sync {
    /// Adds `d` unless its key is there; whether it was added.
    fn add(&self, d: Delayed) -> BoxFuture<'_, Result<bool, String>>;
    /// Up to `limit` records due at `now_ms`, earliest first.
    fn due(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Delayed>, String>>;
    /// Replaces a record (a new due time after a failed run).
    fn update(&self, d: Delayed) -> BoxFuture<'_, Result<(), String>>;
    /// Removes a record (it ran, or its rule is gone).
    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Records waiting for `rule`.
    fn pending<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<u64, String>>;
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
}

impl DelayStore for MemoryDelayStore {
    fn add(&self, d: Delayed) -> BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            let mut inner = self.inner.lock();
            if inner.1.contains_key(&d.key) {
                return Ok(false);
            }
            inner.0.insert((d.due_ms, d.key.clone()));
            inner.1.insert(d.key.clone(), d);
            Ok(true)
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
            if let Some(old) = inner.1.get(&d.key).map(|o| (o.due_ms, o.key.clone())) {
                inner.0.remove(&old);
            }
            inner.0.insert((d.due_ms, d.key.clone()));
            inner.1.insert(d.key.clone(), d);
            Ok(())
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut inner = self.inner.lock();
            if let Some(old) = inner.1.remove(key) {
                inner.0.remove(&(old.due_ms, old.key));
            }
            Ok(())
        })
    }

    fn pending<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            Ok(self
                .inner
                .lock()
                .1
                .values()
                .filter(|d| d.rule == rule)
                .count() as u64)
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
            let (added, _): (bool, i64) = redis::pipe()
                .atomic()
                .hset_nx(records(), &d.key, json)
                .cmd("ZADD")
                .arg(zset())
                .arg("NX")
                .arg(d.due_ms)
                .arg(&d.key)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(added)
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
            let () = redis::pipe()
                .atomic()
                .hset(records(), &d.key, json)
                .ignore()
                .zadd(zset(), &d.key, d.due_ms)
                .ignore()
                .query_async(&mut self.conn.clone())
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

    fn pending<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            // Keys start with the rule's name and a slash; HSCAN walks only the hash.
            let mut conn = self.conn.clone();
            let pattern = format!("{}/*", rule.replace(['*', '?', '[', ']', '\\'], "\\$0"));
            let mut cursor: u64 = 0;
            let mut count = 0u64;
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
                count += (fields.len() / 2) as u64;
                cursor = next;
                if cursor == 0 {
                    return Ok(count);
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
        assert_eq!(store.pending("a").await.expect("pending"), 2);
        assert_eq!(store.pending("b").await.expect("pending"), 0);
        assert_eq!(from_hex(&to_hex(b"\x00\xffz")), Some(b"\x00\xffz".to_vec()));
        assert_eq!(from_hex("zz"), None);
    }
}
