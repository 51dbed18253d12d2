//! Where tasks are kept so that a restarted or new leader scheduler loses none: a trait, with
//! Redis ([`super::redis_store::RedisTaskStore`]) and in-memory ([`InMemoryTaskStore`])
//! implementations.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;

use super::model::Task;

/// A store that cannot be reached or answered wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task store: {0}")]
pub struct StoreError(pub String);

/// Durable task records.
pub trait TaskStore: Send + Sync {
    /// Claims idempotency `key` for task `id` for `ttl`: `None` when it is now ours, else the
    /// id of the task that holds it.
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>>;

    /// Moves idempotency `key` from task `old` to task `new` (for `ttl`) if `old` still holds
    /// it; whether it moved. For a key whose holder was never written (its submitter died
    /// between claiming the key and writing the task).
    fn replace_key<'a>(
        &'a self,
        key: &'a str,
        old: &'a str,
        new: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Writes the tasks (their latest state). A task that has ended is kept for `retention`
    /// and no longer listed by [`TaskStore::open`].
    fn put<'a>(
        &'a self,
        tasks: &'a [Task],
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// One task, if kept.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Task>, StoreError>>;

    /// Every task that has not ended (for a scheduler taking over).
    fn open(&self) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;
}

/// Tasks in this process (without `--redis`): a restart loses them.
#[derive(Debug, Default)]
pub struct InMemoryTaskStore {
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    tasks: HashMap<String, Task>,
    /// key → (task id, held until).
    keys: HashMap<String, (String, Instant)>,
    claims: u64,
}

impl TaskStore for InMemoryTaskStore {
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.claims += 1;
        if inner.claims.is_multiple_of(1024) {
            inner.keys.retain(|_, (_, until)| *until > now);
        }
        let existing = match inner.keys.get(key) {
            Some((holder, until)) if *until > now => Some(holder.clone()),
            _ => {
                inner
                    .keys
                    .insert(key.to_owned(), (id.to_owned(), now + ttl));
                None
            }
        };
        Box::pin(async move { Ok(existing) })
    }

    fn replace_key<'a>(
        &'a self,
        key: &'a str,
        old: &'a str,
        new: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut inner = self.inner.lock();
        let moved = match inner.keys.get(key) {
            Some((holder, _)) if holder == old => {
                inner
                    .keys
                    .insert(key.to_owned(), (new.to_owned(), Instant::now() + ttl));
                true
            }
            _ => false,
        };
        Box::pin(async move { Ok(moved) })
    }

    fn put<'a>(
        &'a self,
        tasks: &'a [Task],
        _retention: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // The manager keeps ended tasks in memory for their retention itself; this store only
        // has to answer `open` and `get` for the ones it still holds.
        let mut inner = self.inner.lock();
        for task in tasks {
            if task.state.is_terminal() {
                inner.tasks.remove(&task.id);
            } else {
                inner.tasks.insert(task.id.clone(), task.clone());
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Task>, StoreError>> {
        let task = self.inner.lock().tasks.get(id).cloned();
        Box::pin(async move { Ok(task) })
    }

    fn open(&self) -> BoxFuture<'_, Result<Vec<Task>, StoreError>> {
        let tasks = self.inner.lock().tasks.values().cloned().collect();
        Box::pin(async move { Ok(tasks) })
    }
}
