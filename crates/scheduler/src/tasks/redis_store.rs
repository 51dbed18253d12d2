//! Tasks in Redis, so a scheduler that restarts (or a follower that takes over) loses none.
//!
//! Keys (under `agentmesh:scheduler:`):
//! - `task:{id}`: the task as an `agentmesh.scheduler.v1.Task` protobuf (readable by any
//!   language with our protos); an ended task expires after the store retention (24 h).
//! - `tasks:open`: a set of the ids of tasks that have not ended.
//! - `idem:{key}`: the id of the task holding an idempotency key (`SET NX`, expires after the
//!   idempotency TTL).

use std::time::Duration;

use agentmesh_proto::scheduler::v1 as pb;
use futures::future::BoxFuture;
use prost::Message;
use redis::aio::ConnectionManager;

use super::model::Task;
use super::store::{StoreError, TaskStore};
use crate::wire::{decode_stored_task, encode_task};

/// Key prefix of every scheduler key.
pub const PREFIX: &str = "agentmesh:scheduler:";
/// Compare-and-set of an idempotency key: KEYS[1] = the key; ARGV = old id, new id, TTL ms.
const REPLACE_KEY: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";
/// Tasks written per pipeline.
const CHUNK: usize = 512;

/// Tasks in Redis.
#[derive(Clone)]
pub struct RedisTaskStore {
    conn: ConnectionManager,
}

impl std::fmt::Debug for RedisTaskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTaskStore").finish_non_exhaustive()
    }
}

impl RedisTaskStore {
    /// A store over `conn`.
    #[must_use]
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }
}

fn task_key(id: &str) -> String {
    format!("{PREFIX}task:{id}")
}

fn open_key() -> String {
    format!("{PREFIX}tasks:open")
}

fn failed(e: &redis::RedisError) -> StoreError {
    StoreError(format!("Redis: {e}"))
}

fn decode(id: &str, bytes: &[u8]) -> Option<Task> {
    match pb::Task::decode(bytes).ok().and_then(decode_stored_task) {
        Some(task) => Some(task),
        None => {
            tracing::warn!(task = %id, "a stored task cannot be decoded: skipped");
            None
        }
    }
}

impl TaskStore for RedisTaskStore {
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let redis_key = format!("{PREFIX}idem:{key}");
            let (set, holder): (Option<String>, Option<String>) = redis::pipe()
                .cmd("SET")
                .arg(&redis_key)
                .arg(id)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                .cmd("GET")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(match (set, holder) {
                (Some(_), _) => None,
                (None, Some(holder)) if holder != id => Some(holder),
                (None, _) => None,
            })
        })
    }

    fn replace_key<'a>(
        &'a self,
        key: &'a str,
        old: &'a str,
        new: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let moved: i64 = redis::Script::new(REPLACE_KEY)
                .key(format!("{PREFIX}idem:{key}"))
                .arg(old)
                .arg(new)
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(moved == 1)
        })
    }

    fn put<'a>(
        &'a self,
        tasks: &'a [Task],
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let retention_ms = u64::try_from(retention.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            for chunk in tasks.chunks(CHUNK) {
                let mut pipe = redis::pipe();
                for task in chunk {
                    let bytes = encode_task(task).encode_to_vec();
                    if task.state.is_terminal() {
                        pipe.cmd("SET")
                            .arg(task_key(&task.id))
                            .arg(bytes)
                            .arg("PX")
                            .arg(retention_ms)
                            .ignore();
                        pipe.cmd("SREM").arg(open_key()).arg(&task.id).ignore();
                    } else {
                        pipe.cmd("SET").arg(task_key(&task.id)).arg(bytes).ignore();
                        pipe.cmd("SADD").arg(open_key()).arg(&task.id).ignore();
                    }
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| failed(&e))?;
            }
            Ok(())
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Task>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg(task_key(id))
                .query_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            Ok(bytes.and_then(|b| decode(id, &b)))
        })
    }

    fn open(&self) -> BoxFuture<'_, Result<Vec<Task>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(open_key())
                .query_async(&mut conn)
                .await
                .map_err(|e| failed(&e))?;
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(CHUNK) {
                let keys: Vec<String> = chunk.iter().map(|id| task_key(id)).collect();
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| failed(&e))?;
                for (id, value) in chunk.iter().zip(values) {
                    if let Some(task) = value.and_then(|b| decode(id, &b)) {
                        out.push(task);
                    }
                }
            }
            Ok(out)
        })
    }
}
