//! Where alert rules, alert states and silences are kept, so they survive an aggregator restart,
//! and the claim that lets exactly one of several aggregator replicas send a notification.
//! Redis (`agentmesh:health:{rules,alerts,silences}` hashes of JSON, claims as `SET NX PX`
//! keys), or in memory for a single standalone aggregator.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::rule::Severity;
use crate::error::HealthError;

const RULES: &str = "agentmesh:health:rules";
const ALERTS: &str = "agentmesh:health:alerts";
const SILENCES: &str = "agentmesh:health:silences";
const CLAIM_PREFIX: &str = "agentmesh:health:notified:";
const LEADER: &str = "agentmesh:health:notifier";
/// Takes the role when free, keeps it when held by the caller (one step in Redis).
const LEAD_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";
/// Longest a Redis call may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// A rule as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRule {
    /// Name.
    pub name: String,
    /// Severity.
    pub severity: Severity,
    /// Condition.
    pub expr: String,
    /// `for`, milliseconds.
    pub for_ms: u64,
    /// Summary.
    pub summary: String,
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The condition holds, not yet for long enough.
    Pending,
    /// The condition has held for the rule's `for`.
    Firing,
    /// It fired, and the condition no longer holds.
    Resolved,
}

impl AlertStatus {
    /// Lower-case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// One rule's alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// The rule.
    pub rule: String,
    /// Where it is.
    pub status: AlertStatus,
    /// When it entered `status` (ms).
    pub since_ms: u64,
    /// When it last started firing (ms); the notifications' identity.
    pub fired_at_ms: u64,
    /// The last measured value (a count of matching components for `state()`).
    pub value: f64,
    /// Whether its firing was notified (a resolve is notified only then).
    pub notified: bool,
}

/// A silence: no notification for a rule (or `*`) until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    /// Assigned id.
    pub id: String,
    /// Rule name, or `*`.
    pub rule: String,
    /// Expiry (ms).
    pub until_ms: u64,
    /// Why.
    pub reason: String,
}

/// What a store holds.
#[derive(Debug, Clone, Default)]
pub struct Persisted {
    /// Rules by name.
    pub rules: BTreeMap<String, StoredRule>,
    /// Alerts by rule.
    pub alerts: BTreeMap<String, AlertRecord>,
    /// Silences by id.
    pub silences: BTreeMap<String, Silence>,
}

/// The alert state's store.
pub trait AlertStore: Send + Sync {
    /// Everything stored.
    fn load(&self) -> BoxFuture<'_, Result<Persisted, HealthError>>;
    /// Writes or replaces a rule.
    fn put_rule(&self, rule: StoredRule) -> BoxFuture<'_, Result<(), HealthError>>;
    /// Removes a rule and its alert.
    fn delete_rule(&self, name: String) -> BoxFuture<'_, Result<(), HealthError>>;
    /// Writes an alert's state.
    fn put_alert(&self, alert: AlertRecord) -> BoxFuture<'_, Result<(), HealthError>>;
    /// Writes or replaces a silence.
    fn put_silence(&self, silence: Silence) -> BoxFuture<'_, Result<(), HealthError>>;
    /// Removes a silence.
    fn delete_silence(&self, id: String) -> BoxFuture<'_, Result<(), HealthError>>;
    /// True for the one caller (of every replica) that claims `key` first within `ttl`.
    fn claim(&self, key: String, ttl: Duration) -> BoxFuture<'_, Result<bool, HealthError>>;
    /// Takes or keeps the notifying role for `ttl`: true while `holder` has it.
    fn lead(&self, holder: String, ttl: Duration) -> BoxFuture<'_, Result<bool, HealthError>>;
}

/// In memory: one aggregator, nothing survives a restart.
#[derive(Default)]
pub struct InMemoryAlertStore {
    state: Mutex<Persisted>,
    claims: Mutex<BTreeMap<String, std::time::Instant>>,
}

impl AlertStore for InMemoryAlertStore {
    fn load(&self) -> BoxFuture<'_, Result<Persisted, HealthError>> {
        Box::pin(async move { Ok(self.state.lock().clone()) })
    }

    fn put_rule(&self, rule: StoredRule) -> BoxFuture<'_, Result<(), HealthError>> {
        self.state.lock().rules.insert(rule.name.clone(), rule);
        Box::pin(async { Ok(()) })
    }

    fn delete_rule(&self, name: String) -> BoxFuture<'_, Result<(), HealthError>> {
        let mut state = self.state.lock();
        state.rules.remove(&name);
        state.alerts.remove(&name);
        Box::pin(async { Ok(()) })
    }

    fn put_alert(&self, alert: AlertRecord) -> BoxFuture<'_, Result<(), HealthError>> {
        self.state.lock().alerts.insert(alert.rule.clone(), alert);
        Box::pin(async { Ok(()) })
    }

    fn put_silence(&self, silence: Silence) -> BoxFuture<'_, Result<(), HealthError>> {
        self.state
            .lock()
            .silences
            .insert(silence.id.clone(), silence);
        Box::pin(async { Ok(()) })
    }

    fn delete_silence(&self, id: String) -> BoxFuture<'_, Result<(), HealthError>> {
        self.state.lock().silences.remove(&id);
        Box::pin(async { Ok(()) })
    }

    fn claim(&self, key: String, ttl: Duration) -> BoxFuture<'_, Result<bool, HealthError>> {
        let now = std::time::Instant::now();
        let mut claims = self.claims.lock();
        claims.retain(|_, until| *until > now);
        let won = !claims.contains_key(&key);
        if won {
            claims.insert(key, now + ttl);
        }
        Box::pin(async move { Ok(won) })
    }

    fn lead(&self, _holder: String, _ttl: Duration) -> BoxFuture<'_, Result<bool, HealthError>> {
        Box::pin(async { Ok(true) })
    }
}

/// In Redis, shared by every aggregator replica. The connection is opened on first use and
/// again after a failure, so the aggregator starts (and reports Redis DOWN) without Redis.
pub struct RedisAlertStore {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl RedisAlertStore {
    /// A store over `client`.
    #[must_use]
    pub fn new(client: redis::Client) -> Self {
        Self {
            client,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, HealthError> {
        let call = async {
            let mut held = self.connection.lock().await;
            if held.is_none() {
                *held = Some(self.client.get_multiplexed_async_connection().await?);
            }
            let Some(conn) = held.as_mut() else {
                unreachable!("set above")
            };
            let result = cmd.query_async::<T>(conn).await;
            if result.is_err() {
                *held = None;
            }
            result
        };
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(HealthError::Unavailable(format!("Redis: {e}"))),
            Err(_) => Err(HealthError::Unavailable(
                "Redis: no answer within 2 s".to_owned(),
            )),
        }
    }

    async fn hset(
        &self,
        hash: &str,
        field: &str,
        value: &impl Serialize,
    ) -> Result<(), HealthError> {
        let json = serde_json::to_string(value).unwrap_or_default();
        self.run::<()>(redis::cmd("HSET").arg(hash).arg(field).arg(json))
            .await
    }

    async fn hgetall<T: for<'de> Deserialize<'de>>(
        &self,
        hash: &str,
    ) -> Result<BTreeMap<String, T>, HealthError> {
        let raw: BTreeMap<String, String> = self.run(redis::cmd("HGETALL").arg(hash)).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect())
    }
}

impl AlertStore for RedisAlertStore {
    fn load(&self) -> BoxFuture<'_, Result<Persisted, HealthError>> {
        Box::pin(async move {
            Ok(Persisted {
                rules: self.hgetall(RULES).await?,
                alerts: self.hgetall(ALERTS).await?,
                silences: self.hgetall(SILENCES).await?,
            })
        })
    }

    fn put_rule(&self, rule: StoredRule) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move { self.hset(RULES, &rule.name, &rule).await })
    }

    fn delete_rule(&self, name: String) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move {
            self.run::<()>(redis::cmd("HDEL").arg(RULES).arg(&name))
                .await?;
            self.run::<()>(redis::cmd("HDEL").arg(ALERTS).arg(&name))
                .await
        })
    }

    fn put_alert(&self, alert: AlertRecord) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move { self.hset(ALERTS, &alert.rule, &alert).await })
    }

    fn put_silence(&self, silence: Silence) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move { self.hset(SILENCES, &silence.id, &silence).await })
    }

    fn delete_silence(&self, id: String) -> BoxFuture<'_, Result<(), HealthError>> {
        Box::pin(async move {
            self.run::<()>(redis::cmd("HDEL").arg(SILENCES).arg(&id))
                .await
        })
    }

    fn claim(&self, key: String, ttl: Duration) -> BoxFuture<'_, Result<bool, HealthError>> {
        Box::pin(async move {
            let set: Option<String> = self
                .run(
                    redis::cmd("SET")
                        .arg(format!("{CLAIM_PREFIX}{key}"))
                        .arg(1)
                        .arg("NX")
                        .arg("PX")
                        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                )
                .await?;
            Ok(set.is_some())
        })
    }

    fn lead(&self, holder: String, ttl: Duration) -> BoxFuture<'_, Result<bool, HealthError>> {
        Box::pin(async move {
            let held: i64 = self
                .run(
                    redis::cmd("EVAL")
                        .arg(LEAD_SCRIPT)
                        .arg(1)
                        .arg(LEADER)
                        .arg(holder)
                        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                )
                .await?;
            Ok(held == 1)
        })
    }
}
