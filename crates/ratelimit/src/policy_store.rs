//! Rate-limit and budget policies stored in etcd at
//! `<prefix>/ratelimit/policies/<namespace>/<name>` (JSON), versioned by their etcd revision. Every instance keeps the full set in memory from
//! a snapshot plus a prefix watch and applies changes without a restart; a broken watch
//! (etcd restarted, compaction) re-lists. The in-memory store has the same semantics for
//! standalone mode and tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::budget::{BudgetSpec, BudgetWindow};
use crate::error::RateLimitError;
use crate::spec::{
    Algorithm, Consistency, FailurePolicy, LimitSpec, Mode, PolicyBody, ScopedPolicy,
};

/// Most policies one cluster stores; a put beyond it fails with `FailedPrecondition`.
pub const MAX_STORED_POLICIES: usize = 10_000;
/// Longest wait between two attempts to re-establish the policy watch.
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(5);

/// Every stored policy, sorted by (namespace, name).
pub type PolicySnapshot = Arc<Vec<ScopedPolicy>>;

/// Stores namespace-scoped policies and tells every subscriber about changes.
#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    /// Creates or replaces a policy; with `expected_version` ≠ 0 only if the stored version
    /// still equals it. Returns the policy with its new version.
    async fn put(
        &self,
        policy: ScopedPolicy,
        expected_version: u64,
    ) -> Result<ScopedPolicy, RateLimitError>;
    /// One policy.
    async fn get(&self, namespace: &str, name: &str) -> Result<ScopedPolicy, RateLimitError>;
    /// Policies of `namespace`, or of every namespace, sorted by (namespace, name).
    async fn list(&self, namespace: Option<&str>) -> Result<Vec<ScopedPolicy>, RateLimitError>;
    /// Deletes a policy; with `expected_version` ≠ 0 only if the stored version equals it.
    async fn delete(
        &self,
        namespace: &str,
        name: &str,
        expected_version: u64,
    ) -> Result<(), RateLimitError>;
    /// Every stored policy now, and again after each change.
    fn subscribe(&self) -> watch::Receiver<PolicySnapshot>;
}

/// The JSON stored in etcd. A rate limit has `limit` and `period_ns` (records written before
/// budgets existed have nothing else); a budget has `budget` instead, and no `limit`, so an
/// older instance ignores it as undecodable rather than mistaking it for a rate limit.
#[derive(Debug, Serialize, Deserialize)]
struct PolicyRecord {
    #[serde(default, skip_serializing_if = "is_zero")]
    limit: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    period_ns: u64,
    #[serde(default)]
    burst: u64,
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consistency: Option<Consistency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_failure: Option<FailurePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget: Option<BudgetRecord>,
}

/// The budget of a budget policy's record.
#[derive(Debug, Serialize, Deserialize)]
struct BudgetRecord {
    limit: u64,
    window: BudgetWindow,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl PolicyRecord {
    fn from_policy(p: &ScopedPolicy) -> Self {
        let (spec, mode, budget) = match p.body {
            PolicyBody::RateLimit { spec, mode } => (Some(spec), mode, None),
            PolicyBody::Budget(b) => (
                None,
                Mode::Enforce,
                Some(BudgetRecord {
                    limit: b.limit,
                    window: b.window,
                }),
            ),
        };
        Self {
            limit: spec.map_or(0, |s| s.limit),
            period_ns: spec.map_or(0, |s| {
                u64::try_from(s.period.as_nanos()).unwrap_or(u64::MAX)
            }),
            burst: spec.map_or(0, |s| s.burst),
            algorithm: spec.map(|s| s.algorithm).unwrap_or_default(),
            mode,
            consistency: p.consistency,
            on_failure: p.on_failure,
            budget,
        }
    }

    fn into_policy(self, namespace: String, name: String, version: u64) -> ScopedPolicy {
        let body = match self.budget {
            Some(b) => PolicyBody::Budget(BudgetSpec {
                limit: b.limit,
                window: b.window,
            }),
            None => PolicyBody::RateLimit {
                spec: LimitSpec {
                    limit: self.limit,
                    period: Duration::from_nanos(self.period_ns),
                    burst: self.burst,
                    algorithm: self.algorithm,
                },
                mode: self.mode,
            },
        };
        ScopedPolicy {
            namespace,
            name,
            body,
            consistency: self.consistency,
            on_failure: self.on_failure,
            version,
        }
    }
}

fn not_found(namespace: &str, name: &str) -> RateLimitError {
    RateLimitError::StoredPolicyNotFound {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn mismatch(namespace: &str, name: &str, expected: u64, actual: u64) -> RateLimitError {
    RateLimitError::VersionMismatch {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        expected,
        actual,
    }
}

fn too_many() -> RateLimitError {
    RateLimitError::FailedPrecondition(format!(
        "at most {MAX_STORED_POLICIES} policies can be stored"
    ))
}

/// Policies in memory (standalone mode, tests). Versions come from a counter.
#[derive(Clone)]
pub struct InMemoryPolicyStore {
    /// The policies and the last version handed out.
    state: Arc<Mutex<(PolicyMap, u64)>>,
    snapshot_tx: Arc<watch::Sender<PolicySnapshot>>,
}

impl Default for InMemoryPolicyStore {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            snapshot_tx: Arc::new(watch::channel(PolicySnapshot::default()).0),
        }
    }
}

impl InMemoryPolicyStore {
    fn publish(&self, map: &PolicyMap) {
        self.snapshot_tx
            .send_replace(Arc::new(map.values().cloned().collect()));
    }
}

#[async_trait::async_trait]
impl PolicyStore for InMemoryPolicyStore {
    async fn put(
        &self,
        mut policy: ScopedPolicy,
        expected_version: u64,
    ) -> Result<ScopedPolicy, RateLimitError> {
        policy.validate("policy")?;
        let mut guard = self.state.lock();
        let (map, revision) = &mut *guard;
        let key = (policy.namespace.clone(), policy.name.clone());
        let actual = map.get(&key).map_or(0, |p| p.version);
        if expected_version != 0 && expected_version != actual {
            return Err(mismatch(&key.0, &key.1, expected_version, actual));
        }
        if actual == 0 && map.len() >= MAX_STORED_POLICIES {
            return Err(too_many());
        }
        *revision += 1;
        policy.version = *revision;
        map.insert(key, policy.clone());
        self.publish(map);
        Ok(policy)
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<ScopedPolicy, RateLimitError> {
        let guard = self.state.lock();
        guard
            .0
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| not_found(namespace, name))
    }

    async fn list(&self, namespace: Option<&str>) -> Result<Vec<ScopedPolicy>, RateLimitError> {
        let guard = self.state.lock();
        Ok(guard
            .0
            .values()
            .filter(|p| namespace.is_none_or(|ns| p.namespace == ns))
            .cloned()
            .collect())
    }

    async fn delete(
        &self,
        namespace: &str,
        name: &str,
        expected_version: u64,
    ) -> Result<(), RateLimitError> {
        let mut guard = self.state.lock();
        let (map, revision) = &mut *guard;
        let key = (namespace.to_owned(), name.to_owned());
        let actual = map.get(&key).map_or(0, |p| p.version);
        if actual == 0 {
            return Err(not_found(namespace, name));
        }
        if expected_version != 0 && expected_version != actual {
            return Err(mismatch(namespace, name, expected_version, actual));
        }
        map.remove(&key);
        *revision += 1;
        self.publish(map);
        Ok(())
    }

    fn subscribe(&self) -> watch::Receiver<PolicySnapshot> {
        self.snapshot_tx.subscribe()
    }
}

/// Policies in etcd; see the module docs.
#[derive(Clone)]
pub struct EtcdPolicyStore {
    client: Client,
    /// `<prefix>/ratelimit/policies/`
    root: String,
    timeout: Duration,
    snapshot_rx: watch::Receiver<PolicySnapshot>,
}

impl EtcdPolicyStore {
    /// Lists the stored policies and starts watching them. `prefix` is the cluster's etcd
    /// prefix (`/agentmesh`); every etcd call is bounded by `timeout`.
    ///
    /// # Errors
    /// `Unavailable` when etcd does not answer the first listing.
    pub async fn start(
        client: Client,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RateLimitError> {
        let root = format!("{prefix}/ratelimit/policies/");
        let (map, revision) = list_all(&mut client.clone(), &root, timeout).await?;
        let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(map.values().cloned().collect()));
        tokio::spawn(watch_policies(
            client.clone(),
            root.clone(),
            timeout,
            map,
            revision,
            snapshot_tx,
        ));
        Ok(Self {
            client,
            root,
            timeout,
            snapshot_rx,
        })
    }

    fn key(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.root)
    }

    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RateLimitError> {
        bounded(self.timeout, what, request).await
    }
}

async fn bounded<T>(
    timeout: Duration,
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RateLimitError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(RateLimitError::Unavailable(format!(
            "etcd {what} failed: {e}"
        ))),
        Err(_) => Err(RateLimitError::Unavailable(format!(
            "etcd {what} timed out after {timeout:?}"
        ))),
    }
}

/// Decodes `<root><namespace>/<name>` and its JSON; `None` for foreign or corrupt entries.
fn decode(root: &str, kv: &etcd_client::KeyValue) -> Option<ScopedPolicy> {
    let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(root)?;
    let (namespace, name) = key.split_once('/')?;
    let record: PolicyRecord = match serde_json::from_slice(kv.value()) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring undecodable rate-limit policy");
            return None;
        }
    };
    let version = u64::try_from(kv.mod_revision()).unwrap_or(0);
    let policy = record.into_policy(namespace.to_owned(), name.to_owned(), version);
    match policy.validate("policy") {
        Ok(()) => Some(policy),
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring invalid rate-limit policy");
            None
        }
    }
}

type PolicyMap = BTreeMap<(String, String), ScopedPolicy>;

async fn list_all(
    client: &mut Client,
    root: &str,
    timeout: Duration,
) -> Result<(PolicyMap, i64), RateLimitError> {
    let response = bounded(
        timeout,
        "list policies",
        client.get(root, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = response
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    let map = response
        .kvs()
        .iter()
        .filter_map(|kv| decode(root, kv))
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
    Ok((map, revision))
}

/// Keeps `snapshot_tx` equal to what etcd stores: watch from `revision + 1`, re-list after any
/// failure (with back-off), until every subscriber is gone.
async fn watch_policies(
    mut client: Client,
    root: String,
    timeout: Duration,
    mut map: PolicyMap,
    mut revision: i64,
    snapshot_tx: watch::Sender<PolicySnapshot>,
) {
    let mut backoff = Duration::from_millis(100);
    while !snapshot_tx.is_closed() {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let failure = match client.watch(root.as_str(), Some(options)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(response)) if response.canceled() => {
                        break format!(
                            "watch canceled (compacted at {})",
                            response.compact_revision()
                        );
                    }
                    Ok(Some(response)) => {
                        backoff = Duration::from_millis(100);
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            revision = revision.max(kv.mod_revision());
                            match event.event_type() {
                                etcd_client::EventType::Put => {
                                    if let Some(p) = decode(&root, kv) {
                                        map.insert((p.namespace.clone(), p.name.clone()), p);
                                    }
                                }
                                etcd_client::EventType::Delete => {
                                    let key = std::str::from_utf8(kv.key()).unwrap_or_default();
                                    if let Some((ns, name)) = key
                                        .strip_prefix(root.as_str())
                                        .and_then(|k| k.split_once('/'))
                                    {
                                        map.remove(&(ns.to_owned(), name.to_owned()));
                                    }
                                }
                            }
                        }
                        snapshot_tx.send_replace(Arc::new(map.values().cloned().collect()));
                    }
                    Ok(None) => break "watch stream ended".to_owned(),
                    Err(e) => break e.to_string(),
                }
            },
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %failure, "rate-limit policy watch interrupted; listing again");
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_WATCH_BACKOFF);
            if snapshot_tx.is_closed() {
                return;
            }
            match list_all(&mut client, &root, timeout).await {
                Ok((fresh, fresh_revision)) => {
                    map = fresh;
                    revision = fresh_revision;
                    snapshot_tx.send_replace(Arc::new(map.values().cloned().collect()));
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "listing rate-limit policies failed"),
            }
        }
    }
}

#[async_trait::async_trait]
impl PolicyStore for EtcdPolicyStore {
    async fn put(
        &self,
        mut policy: ScopedPolicy,
        expected_version: u64,
    ) -> Result<ScopedPolicy, RateLimitError> {
        policy.validate("policy")?;
        let key = self.key(&policy.namespace, &policy.name);
        if expected_version == 0
            && self.snapshot_rx.borrow().len() >= MAX_STORED_POLICIES
            && !self
                .snapshot_rx
                .borrow()
                .iter()
                .any(|p| p.namespace == policy.namespace && p.name == policy.name)
        {
            return Err(too_many());
        }
        let value = serde_json::to_vec(&PolicyRecord::from_policy(&policy))
            .map_err(|e| RateLimitError::Unavailable(format!("encoding policy: {e}")))?;
        let compare = Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            i64::try_from(expected_version).unwrap_or(i64::MAX),
        );
        let txn = if expected_version == 0 {
            Txn::new().and_then([TxnOp::put(key.as_str(), value, None)])
        } else {
            Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.as_str(), value, None)])
                .or_else([TxnOp::get(key.as_str(), None)])
        };
        let response = self
            .call("put policy", self.client.clone().txn(txn))
            .await?;
        if !response.succeeded() {
            let actual = response
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => {
                        Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
                    }
                    _ => None,
                })
                .unwrap_or(0);
            return Err(mismatch(
                &policy.namespace,
                &policy.name,
                expected_version,
                u64::try_from(actual).unwrap_or(0),
            ));
        }
        policy.version = response
            .header()
            .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
        Ok(policy)
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<ScopedPolicy, RateLimitError> {
        let key = self.key(namespace, name);
        let response = self
            .call("get policy", self.client.clone().get(key, None))
            .await?;
        response
            .kvs()
            .first()
            .and_then(|kv| decode(&self.root, kv))
            .ok_or_else(|| not_found(namespace, name))
    }

    async fn list(&self, namespace: Option<&str>) -> Result<Vec<ScopedPolicy>, RateLimitError> {
        let prefix = match namespace {
            Some(ns) => format!("{}{ns}/", self.root),
            None => self.root.clone(),
        };
        let response = self
            .call(
                "list policies",
                self.client
                    .clone()
                    .get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut policies: Vec<ScopedPolicy> = response
            .kvs()
            .iter()
            .filter_map(|kv| decode(&self.root, kv))
            .collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(policies)
    }

    async fn delete(
        &self,
        namespace: &str,
        name: &str,
        expected_version: u64,
    ) -> Result<(), RateLimitError> {
        let key = self.key(namespace, name);
        let txn = if expected_version == 0 {
            Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Greater, 0)])
                .and_then([TxnOp::delete(key.as_str(), None)])
                .or_else([TxnOp::get(key.as_str(), None)])
        } else {
            Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    i64::try_from(expected_version).unwrap_or(i64::MAX),
                )])
                .and_then([TxnOp::delete(key.as_str(), None)])
                .or_else([TxnOp::get(key.as_str(), None)])
        };
        let response = self
            .call("delete policy", self.client.clone().txn(txn))
            .await?;
        if response.succeeded() {
            return Ok(());
        }
        let actual = response
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => {
                    Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
                }
                _ => None,
            })
            .unwrap_or(0);
        if actual == 0 {
            Err(not_found(namespace, name))
        } else {
            Err(mismatch(
                namespace,
                name,
                expected_version,
                u64::try_from(actual).unwrap_or(0),
            ))
        }
    }

    fn subscribe(&self) -> watch::Receiver<PolicySnapshot> {
        self.snapshot_rx.clone()
    }
}

/// Applies every stored-policy snapshot to `apply` (the limiter's policy set built over
/// `base`), until the store goes away. Invalid snapshots cannot occur: entries are validated
/// when decoded.
pub fn spawn_policy_sync(
    mut snapshots: watch::Receiver<PolicySnapshot>,
    apply: impl Fn(&[ScopedPolicy]) + Send + 'static,
) {
    apply(&snapshots.borrow_and_update());
    tokio::spawn(async move {
        while snapshots.changed().await.is_ok() {
            let snapshot = snapshots.borrow_and_update().clone();
            apply(&snapshot);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(namespace: &str, name: &str, limit: u64) -> ScopedPolicy {
        ScopedPolicy {
            namespace: namespace.into(),
            name: name.into(),
            body: PolicyBody::RateLimit {
                spec: LimitSpec {
                    limit,
                    period: Duration::from_secs(60),
                    burst: 0,
                    algorithm: Algorithm::Gcra,
                },
                mode: Mode::Enforce,
            },
            consistency: Some(Consistency::Strict),
            on_failure: None,
            version: 0,
        }
    }

    #[tokio::test]
    async fn test_in_memory_put_get_list_delete_with_versions() {
        let store = InMemoryPolicyStore::default();
        let mut rx = store.subscribe();
        let a = store.put(policy("team-a", "rpm", 10), 0).await.unwrap();
        assert!(a.version > 0);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 1);
        let err = store
            .put(policy("team-a", "rpm", 20), a.version + 7)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RateLimitError::VersionMismatch { actual, .. } if actual == a.version)
        );
        let b = store
            .put(policy("team-a", "rpm", 20), a.version)
            .await
            .unwrap();
        assert!(b.version > a.version);
        store.put(policy("team-b", "rpm", 5), 0).await.unwrap();
        assert_eq!(
            store.get("team-a", "rpm").await.unwrap().body,
            policy("team-a", "rpm", 20).body
        );
        assert_eq!(store.list(Some("team-b")).await.unwrap().len(), 1);
        assert_eq!(store.list(None).await.unwrap().len(), 2);
        store.delete("team-a", "rpm", 0).await.unwrap();
        assert!(matches!(
            store.get("team-a", "rpm").await.unwrap_err(),
            RateLimitError::StoredPolicyNotFound { .. }
        ));
        assert!(matches!(
            store.delete("team-a", "rpm", 0).await.unwrap_err(),
            RateLimitError::StoredPolicyNotFound { .. }
        ));
    }

    #[tokio::test]
    async fn test_invalid_policies_are_rejected_naming_the_field() {
        let store = InMemoryPolicyStore::default();
        let RateLimitError::InvalidArgument(v) =
            store.put(policy("a/b", "default", 0), 0).await.unwrap_err()
        else {
            panic!("expected invalid argument")
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["policy.namespace", "policy.name", "policy.limit.limit"]
        );
    }

    #[test]
    fn test_records_round_trip_through_json() {
        let p = policy("ns", "tokens", 1000);
        let json = serde_json::to_string(&PolicyRecord::from_policy(&p)).unwrap();
        assert!(json.contains("\"consistency\":\"strict\""), "{json}");
        let back: PolicyRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_policy("ns".into(), "tokens".into(), 0), p);
    }

    fn budget(namespace: &str, name: &str, limit: u64) -> ScopedPolicy {
        ScopedPolicy {
            namespace: namespace.into(),
            name: name.into(),
            body: PolicyBody::Budget(BudgetSpec {
                limit,
                window: BudgetWindow::Month,
            }),
            consistency: Some(Consistency::Owner),
            on_failure: None,
            version: 0,
        }
    }

    #[test]
    fn test_budget_records_round_trip_without_a_rate_limit_in_them() {
        let p = budget("ns", "monthly-usd", 5_000_000);
        let json = serde_json::to_string(&PolicyRecord::from_policy(&p)).unwrap();
        assert!(
            json.contains(r#""budget":{"limit":5000000,"window":"month"}"#),
            "{json}"
        );
        // No top-level `limit`: an instance that predates budgets cannot decode it as a rate
        // limit, so it ignores it.
        assert!(
            !json.contains("period_ns") && !json.starts_with(r#"{"limit""#),
            "{json}"
        );
        let back: PolicyRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.into_policy("ns".into(), "monthly-usd".into(), 3).body,
            p.body
        );
    }

    #[test]
    fn test_records_written_before_budgets_still_decode() {
        let old =
            r#"{"limit":100,"period_ns":60000000000,"burst":0,"algorithm":"gcra","mode":"shadow"}"#;
        let record: PolicyRecord = serde_json::from_str(old).unwrap();
        let p = record.into_policy("ns".into(), "rpm".into(), 9);
        assert_eq!(
            p.body,
            PolicyBody::RateLimit {
                spec: LimitSpec {
                    limit: 100,
                    period: Duration::from_secs(60),
                    burst: 0,
                    algorithm: Algorithm::Gcra,
                },
                mode: Mode::Shadow,
            }
        );
        assert_eq!((p.consistency, p.on_failure, p.version), (None, None, 9));
        p.validate("policy").unwrap();
    }

    #[tokio::test]
    async fn test_budget_policies_are_stored_and_validated_like_rate_limits() {
        let store = InMemoryPolicyStore::default();
        let stored = store.put(budget("team-a", "usd", 10), 0).await.unwrap();
        assert_eq!(store.get("team-a", "usd").await.unwrap(), stored);
        let strict = ScopedPolicy {
            consistency: Some(Consistency::Strict),
            on_failure: Some(FailurePolicy::FailOpen),
            ..budget("team-a", "usd", 0)
        };
        let RateLimitError::InvalidArgument(v) = store.put(strict, 0).await.unwrap_err() else {
            panic!("expected invalid argument")
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "policy.budget.limit",
                "policy.consistency",
                "policy.on_failure"
            ]
        );
    }
}
