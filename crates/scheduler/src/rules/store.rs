//! Where rules live: etcd (`<prefix>/rules/<name>`, one JSON document each, versioned by its
//! mod revision, readable with `etcdctl get --prefix <prefix>/rules/`), or memory without etcd.
//! Every change bumps [`RuleStore::changes`], which the engine follows.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::model::{RuleDef, RuleError};

/// Longest wait for one etcd call.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// A stored rule and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub def: RuleDef,
    pub version: u64,
}

/// Rules storage.
pub trait RuleStore: Send + Sync {
    /// One rule.
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Stored>, RuleError>>;
    /// Every rule, by name.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Stored>, RuleError>>;
    /// Stores `def`; with `expected`, only if the stored version is that (0: none stored).
    /// Returns the new version and whether a rule was replaced.
    fn put(
        &self,
        def: RuleDef,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<(u64, bool), RuleError>>;
    /// Deletes a rule; whether there was one.
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, RuleError>>;
    /// Bumped on every change (and when the store may have missed some: reload then).
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Rules in memory (one process, no etcd).
#[derive(Debug)]
pub struct MemoryRuleStore {
    rules: Mutex<(BTreeMap<String, Stored>, u64)>,
    changed: watch::Sender<u64>,
}

impl Default for MemoryRuleStore {
    fn default() -> Self {
        Self {
            rules: Mutex::new((BTreeMap::new(), 0)),
            changed: watch::channel(0).0,
        }
    }
}

impl RuleStore for MemoryRuleStore {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Stored>, RuleError>> {
        Box::pin(async move { Ok(self.rules.lock().0.get(name).cloned()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Stored>, RuleError>> {
        Box::pin(async move { Ok(self.rules.lock().0.values().cloned().collect()) })
    }

    fn put(
        &self,
        def: RuleDef,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<(u64, bool), RuleError>> {
        Box::pin(async move {
            let version = {
                let mut guard = self.rules.lock();
                let (rules, revision) = &mut *guard;
                let current = rules.get(&def.name).map_or(0, |s| s.version);
                if let Some(expected) = expected
                    && expected != current
                {
                    return Err(RuleError::Conflict {
                        name: def.name,
                        expected,
                        current,
                    });
                }
                *revision += 1;
                let version = *revision;
                rules.insert(def.name.clone(), Stored { def, version });
                (version, current != 0)
            };
            self.changed.send_modify(|n| *n += 1);
            Ok(version)
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, RuleError>> {
        Box::pin(async move {
            let existed = self.rules.lock().0.remove(name).is_some();
            if existed {
                self.changed.send_modify(|n| *n += 1);
            }
            Ok(existed)
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Rules in etcd.
pub struct EtcdRuleStore {
    client: etcd_client::Client,
    prefix: String,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for EtcdRuleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRuleStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> RuleError {
    RuleError::Unavailable(format!("etcd {what}: {e}"))
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, RuleError> {
    tokio::time::timeout(ETCD_TIMEOUT, call)
        .await
        .map_err(|_| unavailable(what, "timed out"))?
        .map_err(|e| unavailable(what, e))
}

fn decode(kv: &etcd_client::KeyValue) -> Option<Stored> {
    match serde_json::from_slice::<RuleDef>(kv.value()) {
        Ok(def) => Some(Stored {
            def,
            version: u64::try_from(kv.mod_revision()).unwrap_or(0),
        }),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "a stored rule cannot be read: ignored");
            None
        }
    }
}

impl EtcdRuleStore {
    /// Rules under `<prefix>/rules/`; follows changes from now on (a watch, reopened after a
    /// second when it breaks — each reopening counts as a change, so the engine reloads).
    #[must_use]
    pub fn new(client: etcd_client::Client, prefix: &str) -> std::sync::Arc<Self> {
        let store = std::sync::Arc::new(Self {
            client,
            prefix: format!("{}/rules/", prefix.trim_end_matches('/')),
            changed: watch::channel(0).0,
        });
        let weak = std::sync::Arc::downgrade(&store);
        tokio::spawn(async move {
            loop {
                let Some(store) = weak.upgrade() else { return };
                let mut client = store.client.watch_client();
                let prefix = store.prefix.clone();
                let changed = store.changed.clone();
                drop(store);
                match client
                    .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
                    .await
                {
                    Ok(mut stream) => {
                        changed.send_modify(|n| *n += 1);
                        while let Ok(Some(_)) = stream.message().await {
                            changed.send_modify(|n| *n += 1);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching rules in etcd failed; retrying"),
                }
                if changed.is_closed() && weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        store
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl RuleStore for EtcdRuleStore {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Stored>, RuleError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = timed("get", kv.get(self.key(name), None)).await?;
            Ok(response.kvs().first().and_then(decode))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Stored>, RuleError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = timed(
                "list",
                kv.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
            let mut rules: Vec<Stored> = response.kvs().iter().filter_map(decode).collect();
            rules.sort_by(|a, b| a.def.name.cmp(&b.def.name));
            Ok(rules)
        })
    }

    fn put(
        &self,
        def: RuleDef,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<(u64, bool), RuleError>> {
        Box::pin(async move {
            let key = self.key(&def.name);
            let value = serde_json::to_vec(&def).map_err(|e| unavailable("encode", e))?;
            let mut kv = self.client.kv_client();
            match expected {
                None => {
                    let response = timed(
                        "put",
                        kv.put(key, value, Some(PutOptions::new().with_prev_key())),
                    )
                    .await?;
                    let version = response
                        .header()
                        .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
                    Ok((version, response.prev_key().is_some()))
                }
                Some(expected) => {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            i64::try_from(expected).unwrap_or(i64::MAX),
                        )])
                        .and_then([TxnOp::put(key.as_str(), value, None)])
                        .or_else([TxnOp::get(key.as_str(), None)]);
                    let response = timed("put", kv.txn(txn)).await?;
                    if response.succeeded() {
                        let version = response
                            .header()
                            .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
                        return Ok((version, expected != 0));
                    }
                    let current = response
                        .op_responses()
                        .into_iter()
                        .find_map(|op| match op {
                            etcd_client::TxnOpResponse::Get(get) => get
                                .kvs()
                                .first()
                                .map(|kv| u64::try_from(kv.mod_revision()).unwrap_or(0)),
                            _ => None,
                        })
                        .unwrap_or(0);
                    Err(RuleError::Conflict {
                        name: def.name,
                        expected,
                        current,
                    })
                }
            }
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, RuleError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = timed("delete", kv.delete(self.key(name), None)).await?;
            Ok(response.deleted() > 0)
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
