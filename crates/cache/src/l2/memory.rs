//! L2 in this process (no Redis): the same decisions as the Redis scripts, under one lock, and
//! the feed as a broadcast channel.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{L2Error, L2Store, LeaseState, Read, Scope, Write, Written, ms};
use crate::entry::{BODY_COMPUTE_AT, Body, Entry};
use crate::sync::{Change, SyncEvent, What};

#[derive(Default)]
struct State {
    /// (namespace, key) → (entry, wall ms L2 drops it).
    entries: HashMap<(String, String), (Entry, u64)>,
    /// namespace → its generation and its tags' generations.
    gens: HashMap<String, (u64, HashMap<String, u64>)>,
    /// (namespace, key) → (token, granted wall ms, expires wall ms).
    leases: HashMap<(String, String), (u64, u64, u64)>,
    seq: u64,
    fence: u64,
}

impl State {
    fn live(&self, id: &(String, String), now_ms: u64) -> Option<&Entry> {
        self.entries
            .get(id)
            .filter(|(_, until)| *until > now_ms)
            .map(|(e, _)| e)
    }

    fn gens(
        &self,
        namespace: &str,
        tags: impl Iterator<Item = impl AsRef<str>>,
    ) -> (u64, Vec<u64>) {
        let (ns, by_tag) = self
            .gens
            .get(namespace)
            .map_or((0, None), |(g, t)| (*g, Some(t)));
        let tags = tags
            .map(|t| by_tag.and_then(|m| m.get(t.as_ref())).copied().unwrap_or(0))
            .collect();
        (ns, tags)
    }
}

/// L2 in this process.
pub struct InMemoryL2 {
    state: Mutex<State>,
    feed: broadcast::Sender<Change>,
}

impl std::fmt::Debug for InMemoryL2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryL2").finish_non_exhaustive()
    }
}

impl Default for InMemoryL2 {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            feed: broadcast::channel(65_536).0,
        }
    }
}

impl InMemoryL2 {
    /// Numbers a change and sends it (under the state lock, so the feed is in order).
    fn publish(&self, state: &mut State, namespace: &str, now_ms: u64, what: What) -> u64 {
        state.seq += 1;
        let _ = self.feed.send(Change {
            seq: state.seq,
            sent_ms: now_ms,
            namespace: namespace.to_owned(),
            what,
        });
        state.seq
    }
}

fn id(namespace: &str, key: &str) -> (String, String) {
    (namespace.to_owned(), key.to_owned())
}

fn ok<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, Result<T, L2Error>> {
    Box::pin(async move { Ok(value) })
}

impl L2Store for InMemoryL2 {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Option<Read>, L2Error>> {
        let state = self.state.lock();
        let read = state.live(&id(namespace, key), now_ms).map(|entry| {
            let (ns_gen, tag_gens) = state.gens(namespace, entry.tags.iter().map(|(t, _)| t));
            Read {
                entry: entry.clone(),
                ns_gen,
                tag_gens,
            }
        });
        ok(read)
    }

    fn set<'a>(
        &'a self,
        write: Write<'a>,
        lease: Option<u64>,
    ) -> BoxFuture<'a, Result<Written, L2Error>> {
        let mut state = self.state.lock();
        let now = write.now_ms;
        let id = id(write.namespace, write.key);
        let current = state.live(&id, now).map_or(0, |e| e.version);
        let mut body: Body = write.body;
        if let Some(token) = lease {
            match state.leases.get(&id) {
                Some(&(held, granted, until)) if held == token && until > now => {
                    body.compute_ms =
                        u32::try_from(now.saturating_sub(granted)).unwrap_or(u32::MAX);
                    state.leases.remove(&id);
                }
                _ => return ok(Written::LeaseLost),
            }
        }
        if write.if_version.is_some_and(|v| v != current) {
            return ok(Written::Conflict(current));
        }
        debug_assert_eq!(BODY_COMPUTE_AT, 20);
        let version = current + 1;
        let (ns_gen, tag_gens) = state.gens(write.namespace, write.tags.iter());
        let seq = self.publish(
            &mut state,
            write.namespace,
            now,
            What::Written {
                key: write.key.to_owned(),
                version,
            },
        );
        let tags = write.tags.iter().cloned().zip(tag_gens).collect();
        let entry = body.stamped(version, seq, ns_gen, tags);
        state.entries.insert(
            id,
            (entry.clone(), now.saturating_add(ms(write.keep).max(1))),
        );
        ok(Written::Stored(entry))
    }

    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<bool, L2Error>> {
        let mut state = self.state.lock();
        let existed = state
            .entries
            .remove(&id(namespace, key))
            .is_some_and(|(_, until)| until > now_ms);
        self.publish(
            &mut state,
            namespace,
            now_ms,
            What::Deleted {
                key: key.to_owned(),
            },
        );
        ok(existed)
    }

    fn invalidate<'a>(
        &'a self,
        namespace: &'a str,
        scope: Scope<'a>,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Change, L2Error>> {
        let mut state = self.state.lock();
        let gens = state.gens.entry(namespace.to_owned()).or_default();
        let what = match scope {
            Scope::Namespace => {
                gens.0 += 1;
                What::Namespace { generation: gens.0 }
            }
            Scope::Tags(tags) => What::Tags(
                tags.iter()
                    .map(|t| {
                        let g = gens.1.entry(t.clone()).or_default();
                        *g += 1;
                        (t.clone(), *g)
                    })
                    .collect(),
            ),
        };
        let seq = self.publish(&mut state, namespace, now_ms, what.clone());
        ok(Change {
            seq,
            sent_ms: now_ms,
            namespace: namespace.to_owned(),
            what,
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
        let mut state = self.state.lock();
        let id = id(namespace, key);
        if state.live(&id, now_ms).is_some_and(|e| e.seq > seen_seq) {
            return ok(LeaseState::Filled);
        }
        if let Some(&(_, _, until)) = state.leases.get(&id)
            && until > now_ms
        {
            return ok(LeaseState::Held(until - now_ms));
        }
        state.fence += 1;
        let token = state.fence;
        state
            .leases
            .insert(id, (token, now_ms, now_ms.saturating_add(ms(ttl))));
        ok(LeaseState::Granted(token))
    }

    fn abandon<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        token: u64,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<bool, L2Error>> {
        let mut state = self.state.lock();
        let id = id(namespace, key);
        if !matches!(state.leases.get(&id), Some(&(held, _, until)) if held == token && until > now_ms)
        {
            return ok(false);
        }
        state.leases.remove(&id);
        self.publish(
            &mut state,
            namespace,
            now_ms,
            What::LeaseEnded {
                key: key.to_owned(),
            },
        );
        ok(true)
    }

    fn scan<'a>(
        &'a self,
        key_prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, L2Error>> {
        let keys = self
            .state
            .lock()
            .entries
            .keys()
            .filter(|(_, k)| k.starts_with(key_prefix))
            .take(limit)
            .cloned()
            .collect();
        ok(keys)
    }

    fn watch(&self) -> BoxStream<'static, SyncEvent> {
        // Subscribe and read the sequence under the lock: nothing is numbered in between.
        let state = self.state.lock();
        let rx = self.feed.subscribe();
        let first = SyncEvent::Synced { seq: state.seq };
        drop(state);
        futures::stream::once(async move { first })
            // A receiver that lagged skips what it missed: the cache sees the gap in the next
            // sequence number and flushes.
            .chain(
                BroadcastStream::new(rx)
                    .filter_map(|change| async move { change.ok().map(SyncEvent::Change) }),
            )
            .boxed()
    }

    fn shared(&self) -> bool {
        false
    }
}
