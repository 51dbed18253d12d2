//! Notifications: an event on the event bus (`sys.alert.<rule>.firing|resolved`) and a POST
//! to each webhook, retried with back-off, signed (`X-Agentmesh-Signature: sha256=<HMAC-SHA256
//! of the body with the shared secret, hex>`), and carrying a de-duplication key
//! (`X-Agentmesh-Dedup-Key: <rule>:<status>:<fired_at_ms>`) that is the same on every retry and
//! every replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_runtime::{ClientConfig, Metrics, connect_lazy};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::json;
use sha2::Sha256;

use crate::aggregator::Aggregator;
use crate::metrics::HealthMetrics;
use crate::model::{Kind, State};

/// Attempts per webhook delivery.
const WEBHOOK_ATTEMPTS: u32 = 4;
/// First back-off between attempts (doubles).
const WEBHOOK_BACKOFF: Duration = Duration::from_millis(250);
/// Longest one attempt may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// One notification.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The rule.
    pub rule: String,
    /// "firing" or "resolved".
    pub status: &'static str,
    /// The rule's severity.
    pub severity: &'static str,
    /// The rule's summary.
    pub summary: String,
    /// The rule's condition.
    pub expr: String,
    /// The measured value.
    pub value: f64,
    /// When the alert started firing (ms); with rule and status, its identity.
    pub fired_at_ms: u64,
    /// When this notification's state began (ms).
    pub at_ms: u64,
    /// The cluster's summary then.
    pub cluster: String,
}

impl Notification {
    /// The same for every retry and replica.
    #[must_use]
    pub fn dedup_key(&self) -> String {
        format!("{}:{}:{}", self.rule, self.status, self.fired_at_ms)
    }

    /// The JSON body of the webhook and of the event.
    #[must_use]
    pub fn body(&self) -> String {
        json!({
            "version": "1",
            "rule": self.rule,
            "status": self.status,
            "severity": self.severity,
            "summary": self.summary,
            "expr": self.expr,
            "value": self.value,
            "fired_at_ms": self.fired_at_ms,
            "at_ms": self.at_ms,
            "cluster": self.cluster,
            "dedup_key": self.dedup_key(),
        })
        .to_string()
    }
}

/// A webhook receiver.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `http[s]://host[:port]/path` (https against the system's roots and `--tls-ca-file`).
    pub url: String,
    /// HMAC key for the signature header; none: unsigned.
    pub secret: Option<String>,
}

/// `sha256=<hex>` of the body under `secret`.
#[must_use]
pub fn signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Sends notifications.
pub struct Notifier {
    webhooks: Vec<Webhook>,
    aggregator: Arc<Aggregator>,
    metrics: HealthMetrics,
    client_metrics: Metrics,
    bearer: Option<Arc<str>>,
    channels: Mutex<BTreeMap<String, agentmesh_runtime::ClientChannel>>,
}

impl Notifier {
    /// A notifier to `webhooks` and the event bus found through `aggregator`.
    #[must_use]
    pub fn new(
        webhooks: Vec<Webhook>,
        aggregator: Arc<Aggregator>,
        metrics: HealthMetrics,
        client_metrics: Metrics,
        bearer: Option<Arc<str>>,
    ) -> Self {
        Self {
            webhooks,
            aggregator,
            metrics,
            client_metrics,
            bearer,
            channels: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sends `notification` everywhere; failures are logged and counted.
    pub async fn send(&self, notification: &Notification) {
        let body = notification.body();
        for webhook in &self.webhooks {
            let result = post_with_retries(
                webhook,
                &notification.dedup_key(),
                notification.status,
                &body,
            )
            .await;
            self.metrics.notification("webhook", result.is_ok());
            if let Err(e) = result {
                tracing::warn!(rule = %notification.rule, url = %webhook.url, error = %e, "webhook notification failed");
            }
        }
        let result = self.publish(notification, body).await;
        self.metrics.notification("eventbus", result.is_ok());
        if let Err(e) = result {
            tracing::warn!(rule = %notification.rule, error = %e, "alert event not published");
        }
    }

    async fn publish(&self, notification: &Notification, body: String) -> Result<(), String> {
        let view = self.aggregator.snapshot(false, crate::checks::now_ms());
        let bus_addr = view
            .components
            .iter()
            .filter(|c| c.kind == Kind::Instance && c.service == "eventbus" && c.state == State::Up)
            .find_map(|c| c.member.as_ref().map(|m| m.grpc_addr.clone()))
            .ok_or("no event bus instance is UP")?;
        let channel = {
            let mut channels = self.channels.lock();
            if let Some(channel) = channels.get(&bus_addr) {
                channel.clone()
            } else {
                let config = ClientConfig {
                    bearer: self.bearer.clone(),
                    ..ClientConfig::default()
                };
                let channel = connect_lazy(&bus_addr, &config, &self.client_metrics)
                    .map_err(|e| e.to_string())?;
                channels.insert(bus_addr.clone(), channel.clone());
                channel
            }
        };
        let mut client = bus::event_bus_client::EventBusClient::new(channel);
        let event = bus::Event {
            id: notification.dedup_key().replace(':', "-"),
            subject: format!("sys.alert.{}.{}", notification.rule, notification.status),
            r#type: format!("agentmesh.alert.{}", notification.status),
            source: "/agentmesh/health".to_owned(),
            content_type: "application/json".to_owned(),
            data: body.into_bytes(),
            ..bus::Event::default()
        };
        client
            .publish(bus::PublishRequest { event: Some(event) })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        Ok(())
    }
}

async fn post_with_retries(
    webhook: &Webhook,
    dedup_key: &str,
    status: &str,
    body: &str,
) -> Result<(), String> {
    let mut backoff = WEBHOOK_BACKOFF;
    let mut last = String::new();
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        match tokio::time::timeout(WEBHOOK_TIMEOUT, post(webhook, dedup_key, status, body)).await {
            Ok(Ok(code)) if (200..300).contains(&code) => return Ok(()),
            // The receiver refuses it: retrying will not help (except 408 and 429).
            Ok(Ok(code)) if (400..500).contains(&code) && code != 408 && code != 429 => {
                return Err(format!("{} answered {code}", webhook.url));
            }
            Ok(Ok(code)) => last = format!("{} answered {code}", webhook.url),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("{}: no answer within {WEBHOOK_TIMEOUT:?}", webhook.url),
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Err(format!("{last} (after {WEBHOOK_ATTEMPTS} attempts)"))
}

async fn post(webhook: &Webhook, dedup_key: &str, status: &str, body: &str) -> Result<u16, String> {
    let event = format!("alert.{status}");
    let signed = webhook
        .secret
        .as_ref()
        .map(|secret| signature(secret, body));
    let mut headers = vec![
        ("content-type", "application/json"),
        ("x-agentmesh-event", event.as_str()),
        ("x-agentmesh-dedup-key", dedup_key),
    ];
    if let Some(signed) = &signed {
        headers.push(("x-agentmesh-signature", signed.as_str()));
    }
    agentmesh_runtime::scrape::post(
        &webhook.url,
        &headers,
        bytes::Bytes::from(body.to_owned()),
        WEBHOOK_TIMEOUT,
    )
    .await
    .map(|(code, _)| code)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", "what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
