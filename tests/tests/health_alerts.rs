//! Alerting through real processes: two aggregator replicas on one Redis notify a webhook
//! receiver in the test (signed, retried after a 503, once between them) and the event bus
//! (`sys.alert.…`), firing → resolved; a silence holds a firing alert until it is deleted;
//! maintenance suppresses a rule; rules and alert states survive an aggregator restart; bad
//! rules are INVALID_ARGUMENT naming the position.

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_proto::health::v1 as pb;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

type Client = pb::health_aggregator_client::HealthAggregatorClient<tonic::transport::Channel>;

const SECRET: &str = "test-secret";

/// One request the receiver got: headers (lower-case names), body, and the status it answered.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    raw: String,
    body: serde_json::Value,
    answered: u16,
}

/// A webhook receiver on a free port: answers 503 to the very first request, 200 after.
async fn receiver() -> anyhow::Result<(String, mpsc::UnboundedReceiver<Received>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body) = loop {
                let Ok(n) = socket.read(&mut buf).await else {
                    break (String::new(), Vec::new());
                };
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                data.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&data).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let head = text[..end].to_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if data.len() >= end + 4 + length {
                        break (head, data[end + 4..end + 4 + length].to_vec());
                    }
                }
            };
            let headers: BTreeMap<String, String> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let answered = if first { 503 } else { 200 };
            first = false;
            let reply =
                format!("HTTP/1.1 {answered} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = socket.write_all(reply.as_bytes()).await;
            let raw = String::from_utf8_lossy(&body).into_owned();
            let body = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
            let _ = tx.send(Received {
                headers,
                raw,
                body,
                answered,
            });
        }
    });
    Ok((url, rx))
}

/// Waits for the next accepted (200) notification with this status.
async fn next_accepted(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    status: &str,
    log: &mut Vec<Received>,
) -> anyhow::Result<Received> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no {status} notification within 15 s; got {log:?}"))?
            .ok_or_else(|| anyhow::anyhow!("receiver gone"))?;
        log.push(got.clone());
        if got.answered == 200 && got.body["status"] == status {
            return Ok(got);
        }
    }
}

async fn state(c: &mut Client, id: &str) -> pb::State {
    c.get_cluster_health(pb::GetClusterHealthRequest::default())
        .await
        .ok()
        .and_then(|h| h.into_inner().components.into_iter().find(|x| x.id == id))
        .map_or(pb::State::Unknown, |x| x.state())
}

async fn alert(c: &mut Client, rule: &str) -> Option<pb::Alert> {
    c.list_alerts(pb::ListAlertsRequest {})
        .await
        .ok()?
        .into_inner()
        .alerts
        .into_iter()
        .find(|a| a.rule == rule)
}

#[tokio::test]
async fn test_alerts_fire_and_resolve_once_across_replicas_with_silences_and_maintenance()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let redis = RedisServer::start().await?;
    let (endpoint, url) = (etcd.endpoint(), redis.url());
    let (hook, mut hook_rx) = receiver().await?;
    let rules = tempfile::NamedTempFile::new()?;
    std::fs::write(
        rules.path(),
        "[[rule]]\nname = \"ratelimit-down\"\nseverity = \"critical\"\nexpr = 'state(\"service/ratelimit\") == DOWN'\nsummary = \"the rate limiter is down\"\n",
    )?;
    let rules_path = rules.path().to_string_lossy().into_owned();
    let args = [
        "--health-check-interval",
        "500ms",
        "--health-check-timeout",
        "300ms",
        "--health-rules",
        &rules_path,
        "--health-webhook",
        &hook,
        "--health-webhook-secret",
        SECRET,
    ];
    let bus_process = AgentmeshProcess::serve("eventbus", Some(&url), Some(&endpoint), &[]).await?;
    let mut limiter = AgentmeshProcess::serve("ratelimit", None, Some(&endpoint), &[]).await?;
    let health_a = AgentmeshProcess::serve("health", Some(&url), Some(&endpoint), &args).await?;
    let mut health_b =
        AgentmeshProcess::serve("health", Some(&url), Some(&endpoint), &args).await?;
    let mut c = Client::connect(format!("http://{}", health_a.grpc_addr)).await?;
    wait_until(Duration::from_secs(10), "ratelimit UP", || {
        let mut c = c.clone();
        async move { state(&mut c, "service/ratelimit").await == pb::State::Up }
    })
    .await?;

    // Alert events on the bus.
    let mut bc =
        bus::event_bus_client::EventBusClient::connect(format!("http://{}", bus_process.grpc_addr))
            .await?;
    let (sub_tx, sub_rx) = mpsc::channel(8);
    sub_tx
        .send(bus::SubscribeRequest {
            kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
                subject: "sys.alert.>".into(),
                ack_policy: bus::AckPolicy::None as i32,
                max_in_flight: 100,
                ..bus::SubscribeOpen::default()
            })),
        })
        .await?;
    let mut events = bc
        .subscribe(ReceiverStream::new(sub_rx))
        .await?
        .into_inner();
    let _subscribed = events.next().await;

    // Firing: the receiver's 503 is retried; the body is signed; one notification between
    // the two replicas.
    let mut log = Vec::new();
    limiter.kill9();
    let firing = next_accepted(&mut hook_rx, "firing", &mut log).await?;
    assert_eq!(firing.body["rule"], "ratelimit-down");
    assert_eq!(firing.body["severity"], "critical");
    let key = firing.headers["x-agentmesh-dedup-key"].clone();
    assert!(
        log.iter()
            .any(|r| r.answered == 503 && r.headers["x-agentmesh-dedup-key"] == key),
        "the first attempt got 503 and was retried: {log:?}"
    );
    assert_eq!(
        firing.headers["x-agentmesh-signature"],
        agentmesh_health::alerts::notify::signature(SECRET, &firing.raw),
        "the signature is HMAC-SHA256 of the body"
    );
    assert_eq!(firing.headers["x-agentmesh-event"], "alert.firing");
    let event = agentmesh_tests::bus::first_event(&mut events, Duration::from_secs(10))
        .await?
        .expect("an alert event");
    assert_eq!(event.subject, "sys.alert.ratelimit-down.firing");

    // Resolved, when a rate limiter serves again.
    let mut limiter = AgentmeshProcess::serve("ratelimit", None, Some(&endpoint), &[]).await?;
    let resolved = next_accepted(&mut hook_rx, "resolved", &mut log).await?;
    assert_eq!(resolved.body["fired_at_ms"], firing.body["fired_at_ms"]);

    // A silence holds the next firing until it is deleted.
    let silence = c
        .put_silence(pb::PutSilenceRequest {
            rule: "ratelimit-down".into(),
            duration: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            reason: "known outage".into(),
        })
        .await?
        .into_inner();
    limiter.kill9();
    wait_until(
        Duration::from_secs(10),
        "the alert firing, silenced",
        || {
            let mut c = c.clone();
            async move {
                alert(&mut c, "ratelimit-down")
                    .await
                    .is_some_and(|a| a.status == "firing" && a.silenced)
            }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaked: Vec<Received> = std::iter::from_fn(|| hook_rx.try_recv().ok()).collect();
    assert!(
        leaked.iter().all(|r| r.body["status"] != "firing"),
        "a silenced alert notified: {leaked:?}"
    );
    c.delete_silence(pb::DeleteSilenceRequest { id: silence.id })
        .await?;
    let after_silence = next_accepted(&mut hook_rx, "firing", &mut log).await?;
    assert_ne!(after_silence.headers["x-agentmesh-dedup-key"], key);

    // Exactly one accepted notification per identity, between the two replicas.
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    log.extend(std::iter::from_fn(|| hook_rx.try_recv().ok()));
    for r in log.iter().filter(|r| r.answered == 200) {
        *accepted
            .entry(r.headers["x-agentmesh-dedup-key"].clone())
            .or_default() += 1;
    }
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");

    // Maintenance: the service back, then in maintenance and killed: nothing fires.
    let mut limiter = AgentmeshProcess::serve("ratelimit", None, Some(&endpoint), &[]).await?;
    next_accepted(&mut hook_rx, "resolved", &mut log).await?;
    c.set_maintenance(pb::SetMaintenanceRequest {
        component: "service/ratelimit".into(),
        duration: Some(prost_types::Duration {
            seconds: 300,
            nanos: 0,
        }),
        reason: "upgrade".into(),
    })
    .await?;
    // Both replicas keep their own maintenance (it is not shared): hold it on the second too.
    let mut c2 = Client::connect(format!("http://{}", health_b.grpc_addr)).await?;
    c2.set_maintenance(pb::SetMaintenanceRequest {
        component: "service/ratelimit".into(),
        duration: Some(prost_types::Duration {
            seconds: 300,
            nanos: 0,
        }),
        reason: "upgrade".into(),
    })
    .await?;
    limiter.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        alert(&mut c, "ratelimit-down").await.map(|a| a.status),
        Some("firing".to_owned())
    );
    let during: Vec<Received> = std::iter::from_fn(|| hook_rx.try_recv().ok()).collect();
    assert!(
        during.is_empty(),
        "maintenance let a notification through: {during:?}"
    );

    // Rules put through the API and alert states survive a restart (Redis).
    let e = c
        .put_alert_rule(pb::PutAlertRuleRequest {
            rule: Some(pb::AlertRule {
                name: "bad".into(),
                expr: "error_rate(\"eventbus\") > lots".into(),
                ..pb::AlertRule::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("rule.expr") && e.message().contains("position"),
        "{}",
        e.message()
    );
    c.put_alert_rule(pb::PutAlertRuleRequest {
        rule: Some(pb::AlertRule {
            name: "bus-errors".into(),
            severity: pb::Severity::Warning as i32,
            expr: "error_rate(\"eventbus\") > 5%".into(),
            r#for: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            summary: "the event bus fails calls".into(),
        }),
    })
    .await?;
    // The killed limiter leaves membership first, so the restarted replica finds nothing DOWN.
    wait_until(Duration::from_secs(15), "the killed limiter gone", || {
        let mut c = c.clone();
        async move {
            c.get_cluster_health(pb::GetClusterHealthRequest::default())
                .await
                .is_ok_and(|h| {
                    !h.into_inner()
                        .components
                        .iter()
                        .any(|x| x.id.starts_with("instance/ratelimit/"))
                })
        }
    })
    .await?;
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    health_b.kill9();
    let health_b = AgentmeshProcess::serve("health", Some(&url), Some(&endpoint), &args).await?;
    let mut c2 = Client::connect(format!("http://{}", health_b.grpc_addr)).await?;
    let rules: Vec<String> = c2
        .list_alert_rules(pb::ListAlertRulesRequest {})
        .await?
        .into_inner()
        .rules
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(rules, ["bus-errors", "ratelimit-down"]);
    let remembered = alert(&mut c2, "ratelimit-down")
        .await
        .expect("the alert's state was kept");
    let fired_at = remembered.fired_at.as_ref().map_or(i64::MAX, |t| t.seconds);
    assert!(
        u64::try_from(fired_at).unwrap_or(u64::MAX) <= restarted_at,
        "{remembered:?}"
    );
    let (code, table, err) = agentmesh_tests::agentmesh::run_binary(
        "meshctl",
        &["health", "rules", "--addr", &health_b.grpc_addr.to_string()],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("bus-errors") && table.contains("error_rate"),
        "{table}"
    );
    drop(health_a);
    Ok(())
}
