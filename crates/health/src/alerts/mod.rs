//! Alerting: rules over component states and the services' own metrics, evaluated every
//! second; an alert goes pending → firing (after the rule's `for`) → resolved, and each firing
//! and resolve is notified once ([`notify`]) — not while a silence holds the rule, not for a
//! component in maintenance, and once across aggregator replicas (a claim in the store).
//! Rules, alert states and silences live in the [`store`] (Redis in a cluster), so an
//! aggregator restart neither forgets a firing alert nor notifies it again.

pub mod eval;
pub mod notify;
pub mod rule;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::aggregator::Aggregator;
use crate::error::HealthError;
use eval::InstanceScrapes;
use notify::{Notification, Notifier};
use rule::{Query, Rule, Severity};
use store::{AlertRecord, AlertStatus, AlertStore, Silence, StoredRule};

/// Most silences.
pub const MAX_SILENCES: usize = 1000;
/// Longest silence.
pub const MAX_SILENCE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a notification's claim is kept (replicas and restarts within it do not resend).
const CLAIM_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the notifying role outlives its holder's last evaluation.
const LEAD_TTL: Duration = Duration::from_secs(5);

/// An alert as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertView {
    /// Its rule.
    pub rule: Rule,
    /// Its state.
    pub record: AlertRecord,
    /// A silence holds it now.
    pub silenced: bool,
}

/// The alerting engine.
pub struct Alerting {
    rules: Mutex<BTreeMap<String, Rule>>,
    alerts: Mutex<BTreeMap<String, AlertRecord>>,
    silences: Mutex<BTreeMap<String, Silence>>,
    store: Arc<dyn AlertStore>,
    notifier: Arc<Notifier>,
    /// This replica's name for the notifying role.
    holder: String,
    /// Whether it held the role at the last evaluation.
    leading: std::sync::atomic::AtomicBool,
}

fn stored(rule: &Rule) -> StoredRule {
    StoredRule {
        name: rule.name.clone(),
        severity: rule.severity,
        expr: rule.expr.clone(),
        for_ms: u64::try_from(rule.for_.as_millis()).unwrap_or(u64::MAX),
        summary: rule.summary.clone(),
    }
}

fn matches_pattern(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => id == pattern,
    }
}

impl Alerting {
    /// Loads what the store holds (when it answers), then stores `file_rules` over it.
    pub async fn start(
        store: Arc<dyn AlertStore>,
        notifier: Arc<Notifier>,
        file_rules: Vec<Rule>,
        holder: String,
    ) -> Arc<Self> {
        let persisted = match store.load().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "alert state not loaded; starting without it");
                store::Persisted::default()
            }
        };
        let mut rules: BTreeMap<String, Rule> = persisted
            .rules
            .values()
            .filter_map(|r| {
                Rule::new(
                    "",
                    &r.name,
                    r.severity,
                    &r.expr,
                    Duration::from_millis(r.for_ms),
                    &r.summary,
                )
                .ok()
            })
            .map(|r| (r.name.clone(), r))
            .collect();
        for rule in file_rules {
            if let Err(e) = store.put_rule(stored(&rule)).await {
                tracing::warn!(rule = %rule.name, error = %e, "rule from the file not stored");
            }
            rules.insert(rule.name.clone(), rule);
        }
        Arc::new(Self {
            rules: Mutex::new(rules),
            alerts: Mutex::new(persisted.alerts),
            silences: Mutex::new(persisted.silences),
            store,
            notifier,
            holder,
            leading: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether this replica notifies (one replica does, the one holding the role in the
    /// store; the others evaluate for their own answers). Taking the role over adopts the
    /// alert states the previous holder stored, so nothing is notified twice or forgotten.
    async fn lead(&self) -> bool {
        use std::sync::atomic::Ordering;
        let leads = self
            .store
            .lead(self.holder.clone(), LEAD_TTL)
            .await
            .unwrap_or_else(|e| {
                // The store is down: better twice than never.
                tracing::warn!(error = %e, "notifier role unknown; notifying");
                true
            });
        let was = self.leading.swap(leads, Ordering::Relaxed);
        if leads && !was {
            if let Ok(persisted) = self.store.load().await {
                *self.alerts.lock() = persisted.alerts;
                *self.silences.lock() = persisted.silences;
            }
            tracing::info!(holder = %self.holder, "this aggregator notifies alerts");
        }
        leads
    }

    /// Stores a rule (replacing one of the same name).
    ///
    /// # Errors
    /// `InvalidArgument` past [`rule::MAX_RULES`]; `Unavailable` when the store is down.
    pub async fn put_rule(&self, rule: Rule) -> Result<(), HealthError> {
        {
            let rules = self.rules.lock();
            if !rules.contains_key(&rule.name) && rules.len() >= rule::MAX_RULES {
                return Err(HealthError::invalid("rule.name", "at most 1000 rules"));
            }
        }
        self.store.put_rule(stored(&rule)).await?;
        self.rules.lock().insert(rule.name.clone(), rule);
        Ok(())
    }

    /// Removes a rule and its alert.
    ///
    /// # Errors
    /// `NotFound` for an unknown rule; `Unavailable` when the store is down.
    pub async fn delete_rule(&self, name: &str) -> Result<(), HealthError> {
        if !self.rules.lock().contains_key(name) {
            return Err(HealthError::NotFound(format!("no alert rule {name:?}")));
        }
        self.store.delete_rule(name.to_owned()).await?;
        self.rules.lock().remove(name);
        self.alerts.lock().remove(name);
        Ok(())
    }

    /// Every rule, by name.
    #[must_use]
    pub fn rules(&self) -> Vec<Rule> {
        self.rules.lock().values().cloned().collect()
    }

    fn silenced(&self, rule: &str, now_ms: u64) -> bool {
        self.silences
            .lock()
            .values()
            .any(|s| s.until_ms > now_ms && (s.rule == "*" || s.rule == rule))
    }

    /// Every alert that is pending, firing or resolved.
    #[must_use]
    pub fn alerts(&self, now_ms: u64) -> Vec<AlertView> {
        let rules = self.rules.lock().clone();
        let alerts = self.alerts.lock().clone();
        alerts
            .into_values()
            .filter_map(|record| {
                let rule = rules.get(&record.rule)?.clone();
                let silenced = self.silenced(&record.rule, now_ms);
                Some(AlertView {
                    rule,
                    record,
                    silenced,
                })
            })
            .collect()
    }

    /// Holds notifications of `rule` (or `*`) until `until_ms`.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad rule name or past [`MAX_SILENCES`]; `Unavailable` when the
    /// store is down.
    pub async fn put_silence(
        &self,
        rule: &str,
        until_ms: u64,
        reason: &str,
        now_ms: u64,
    ) -> Result<Silence, HealthError> {
        if rule != "*" && !rule::valid_name(rule) {
            return Err(HealthError::invalid("rule", "a rule name or \"*\""));
        }
        {
            let mut silences = self.silences.lock();
            silences.retain(|_, s| s.until_ms > now_ms);
            if silences.len() >= MAX_SILENCES {
                return Err(HealthError::invalid("rule", "at most 1000 silences"));
            }
        }
        let silence = Silence {
            id: format!("s-{now_ms:x}-{:08x}", rand::random::<u32>()),
            rule: rule.to_owned(),
            until_ms,
            reason: reason.to_owned(),
        };
        self.store.put_silence(silence.clone()).await?;
        self.silences
            .lock()
            .insert(silence.id.clone(), silence.clone());
        Ok(silence)
    }

    /// Ends a silence.
    ///
    /// # Errors
    /// `NotFound` for an unknown id; `Unavailable` when the store is down.
    pub async fn delete_silence(&self, id: &str) -> Result<(), HealthError> {
        if !self.silences.lock().contains_key(id) {
            return Err(HealthError::NotFound(format!("no silence {id:?}")));
        }
        self.store.delete_silence(id.to_owned()).await?;
        self.silences.lock().remove(id);
        Ok(())
    }

    /// Silences still in force.
    #[must_use]
    pub fn silences(&self, now_ms: u64) -> Vec<Silence> {
        self.silences
            .lock()
            .values()
            .filter(|s| s.until_ms > now_ms)
            .cloned()
            .collect()
    }

    /// Evaluates every rule once and sends what it decides.
    pub async fn evaluate(
        &self,
        aggregator: &Aggregator,
        scrapes: &[InstanceScrapes],
        now_ms: u64,
    ) {
        let leads = self.lead().await;
        let rules = self.rules();
        // Component states only (no views with uptime and latency): this runs every second.
        let (states, summary) = aggregator.states();
        let mut changed = Vec::new();
        let mut to_send = Vec::new();
        for rule in rules {
            let (holds, value) = match &rule.condition.query {
                Query::State(pattern) => {
                    let count = states
                        .iter()
                        .filter(|(id, state)| {
                            matches_pattern(pattern, id) && rule.condition.holds_for_state(*state)
                        })
                        .count();
                    #[allow(clippy::cast_precision_loss, reason = "a count of components")]
                    let value = count as f64;
                    (count > 0, value)
                }
                query => {
                    let in_maintenance = query
                        .service()
                        .is_some_and(|id| aggregator.in_maintenance(&id));
                    match eval::measure(query, scrapes) {
                        Some(v) => (!in_maintenance && rule.condition.holds_for(v), v),
                        None => (false, 0.0),
                    }
                }
            };
            let silenced = self.silenced(&rule.name, now_ms);
            let mut alerts = self.alerts.lock();
            let previous = alerts.get(&rule.name).cloned();
            let next = step(previous.as_ref(), &rule, holds, value, now_ms);
            let Some(mut next) = next else {
                continue;
            };
            let notify = match (previous.as_ref().map(|p| p.status), next.status) {
                (_, AlertStatus::Firing) if !next.notified && !silenced => Some("firing"),
                (Some(AlertStatus::Firing), AlertStatus::Resolved) if next.notified => {
                    Some("resolved")
                }
                _ => None,
            };
            if notify == Some("firing") {
                next.notified = true;
            }
            if let Some(status) = notify {
                to_send.push(Notification {
                    rule: rule.name.clone(),
                    status,
                    severity: rule.severity.as_str(),
                    summary: rule.summary.clone(),
                    expr: rule.expr.clone(),
                    value,
                    fired_at_ms: next.fired_at_ms,
                    at_ms: now_ms,
                    cluster: summary.clone(),
                });
            }
            let key = |r: &AlertRecord| (r.status, r.notified, r.since_ms);
            if previous.as_ref().map(key) != Some(key(&next)) {
                changed.push(next.clone());
            }
            alerts.insert(rule.name.clone(), next);
        }
        if !leads {
            return;
        }
        for record in changed {
            if let Err(e) = self.store.put_alert(record).await {
                tracing::warn!(error = %e, "alert state not stored");
            }
        }
        for notification in to_send {
            let claimed = self
                .store
                .claim(notification.dedup_key(), CLAIM_TTL)
                .await
                .unwrap_or_else(|e| {
                    // The store is down: better twice than never.
                    tracing::warn!(error = %e, "notification claim failed; sending anyway");
                    true
                });
            if claimed {
                tracing::info!(rule = %notification.rule, status = notification.status, "alert notification");
                let notifier = self.notifier.clone();
                tokio::spawn(async move { notifier.send(&notification).await });
            }
        }
    }
}

/// The next state of a rule's alert (None: nothing to keep).
fn step(
    previous: Option<&AlertRecord>,
    rule: &Rule,
    holds: bool,
    value: f64,
    now_ms: u64,
) -> Option<AlertRecord> {
    let fresh = |status, fired_at_ms| AlertRecord {
        rule: rule.name.clone(),
        status,
        since_ms: now_ms,
        fired_at_ms,
        value,
        notified: false,
    };
    let for_ms = u64::try_from(rule.for_.as_millis()).unwrap_or(u64::MAX);
    match (previous, holds) {
        (
            None
            | Some(AlertRecord {
                status: AlertStatus::Resolved,
                ..
            }),
            true,
        ) if for_ms == 0 => Some(fresh(AlertStatus::Firing, now_ms)),
        (
            None
            | Some(AlertRecord {
                status: AlertStatus::Resolved,
                ..
            }),
            true,
        ) => Some(fresh(AlertStatus::Pending, 0)),
        (Some(p), true)
            if p.status == AlertStatus::Pending && now_ms.saturating_sub(p.since_ms) >= for_ms =>
        {
            Some(fresh(AlertStatus::Firing, now_ms))
        }
        (Some(p), true) => Some(AlertRecord { value, ..p.clone() }),
        (Some(p), false) if p.status == AlertStatus::Firing => Some(AlertRecord {
            status: AlertStatus::Resolved,
            since_ms: now_ms,
            value,
            ..p.clone()
        }),
        (Some(p), false) if p.status == AlertStatus::Resolved => Some(p.clone()),
        (Some(_) | None, false) => None,
    }
}

/// Parses a rules file (TOML):
///
/// ```toml
/// [[rule]]
/// name = "ratelimit-down"
/// severity = "critical"            # info | warning | critical
/// expr = 'state("service/ratelimit") == DOWN'
/// for = "30s"                      # default 0s
/// summary = "The rate limiter is down"
/// ```
///
/// # Errors
/// What is wrong, naming the rule (`rule[2].expr: …`).
pub fn parse_rules_file(text: &str) -> Result<Vec<Rule>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        rule: Vec<FileRule>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FileRule {
        name: String,
        #[serde(default = "warning")]
        severity: Severity,
        expr: String,
        #[serde(default, rename = "for")]
        for_: Option<String>,
        #[serde(default)]
        summary: String,
    }
    fn warning() -> Severity {
        Severity::Warning
    }
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut names = std::collections::BTreeSet::new();
    file.rule
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let for_ = match &r.for_ {
                Some(text) => agentmesh_runtime::config::parse_duration(text)
                    .map_err(|e| format!("rule[{i}].for: {e}"))?,
                None => Duration::ZERO,
            };
            if !names.insert(r.name.clone()) {
                return Err(format!("rule[{i}].name: {:?} is defined twice", r.name));
            }
            Rule::new(
                &format!("rule[{i}]."),
                &r.name,
                r.severity,
                &r.expr,
                for_,
                &r.summary,
            )
            .map_err(|e| e.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(for_: Duration) -> Rule {
        Rule::new(
            "",
            "r",
            Severity::Warning,
            r#"error_rate("x") > 0.1"#,
            for_,
            "",
        )
        .unwrap()
    }

    #[test]
    fn test_an_alert_goes_pending_firing_resolved() {
        let r = rule(Duration::from_secs(10));
        let pending = step(None, &r, true, 0.5, 1_000).unwrap();
        assert_eq!(pending.status, AlertStatus::Pending);
        let still = step(Some(&pending), &r, true, 0.5, 5_000).unwrap();
        assert_eq!(still.status, AlertStatus::Pending);
        let firing = step(Some(&still), &r, true, 0.5, 11_000).unwrap();
        assert_eq!(
            (firing.status, firing.fired_at_ms),
            (AlertStatus::Firing, 11_000)
        );
        let resolved = step(Some(&firing), &r, false, 0.0, 12_000).unwrap();
        assert_eq!(
            (resolved.status, resolved.fired_at_ms),
            (AlertStatus::Resolved, 11_000)
        );
        assert!(
            step(Some(&pending), &r, false, 0.0, 2_000).is_none(),
            "pending that stops is forgotten"
        );
        let again = step(Some(&resolved), &r, true, 0.5, 13_000).unwrap();
        assert_eq!(again.status, AlertStatus::Pending);
    }

    #[test]
    fn test_rules_files_parse_and_name_the_bad_rule() {
        let rules = parse_rules_file(
            r#"
[[rule]]
name = "down"
severity = "critical"
expr = 'state("service/ratelimit") == DOWN'
for = "30s"
summary = "the rate limiter is down"
"#,
        )
        .unwrap();
        assert_eq!(rules[0].for_, Duration::from_secs(30));
        assert_eq!(rules[0].severity, Severity::Critical);
        let e = parse_rules_file("[[rule]]\nname = \"a\"\nexpr = \"nope\"\n").unwrap_err();
        assert!(e.contains("rule[0].expr"), "{e}");
        let e = parse_rules_file("[[rule]]\nname = \"a\"\nexpr = \"cache_hit_rate() < 1\"\n[[rule]]\nname = \"a\"\nexpr = \"cache_hit_rate() < 1\"\n").unwrap_err();
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn test_patterns_match_ids_and_prefixes() {
        assert!(matches_pattern("instance/cache/*", "instance/cache/c-1"));
        assert!(!matches_pattern("service/cache", "service/cache2"));
    }
}
