//! Reactive rules with real processes: rules stored and validated (bad CEL named with its
//! position, a bad correlation named), conditions and guards deciding, templated publish
//! and submit-task responses, statistics, disable/enable/delete; and exactly once across a
//! scheduler leader killed with `kill -9` under a stream of stimuli on a durable subject.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_proto::rules::v1 as pb;
use agentmesh_proto::scheduler::v1 as sched;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};
use tokio_stream::StreamExt as _;
use tonic::Code;

type Rules = pb::rules_client::RulesClient<tonic::transport::Channel>;

/// The trace id o-huge is published under.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
type Bus = bus::event_bus_client::EventBusClient<tonic::transport::Channel>;

/// Webhook requests received: (request head, body).
type Hooks = std::sync::Arc<parking_lot::Mutex<Vec<(String, String)>>>;

/// A webhook receiver on a free loopback port: records each request and answers 200 (or 503
/// to the first `fail_first` requests).
async fn webhook_receiver(fail_first: usize) -> anyhow::Result<(String, Hooks)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks/orders", listener.local_addr()?);
    let hooks: Hooks = std::sync::Arc::default();
    let seen = hooks.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            // Head, then as many body bytes as content-length says.
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&data).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&data).to_string();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let n = {
                let mut seen = seen.lock();
                seen.push((head.to_owned(), body.to_owned()));
                seen.len()
            };
            let status = if n <= fail_first {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = socket
                .write_all(
                    format!(
                        "HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    Ok((url, hooks))
}

fn order_rule() -> pb::Rule {
    pb::Rule {
        name: "big-orders".into(),
        description: "orders over 1000 raise an alert; over 5000 also a review task".into(),
        stimulus: Some(pb::Stimulus {
            subject: "orders.>".into(),
            types: vec!["order.created".into()],
            ..pb::Stimulus::default()
        }),
        condition: "data.amount > 1000".into(),
        responses: vec![
            pb::Response {
                name: "alert".into(),
                action: Some(pb::response::Action::Publish(pb::PublishAction {
                    subject: "alerts.${headers.region}".into(),
                    r#type: "order.alert".into(),
                    data: r#"{"order": "${data.id}", "amount": ${data.amount}}"#.into(),
                    ..pb::PublishAction::default()
                })),
                ..pb::Response::default()
            },
            pb::Response {
                name: "review".into(),
                when: "data.amount > 5000".into(),
                action: Some(pb::response::Action::SubmitTask(pb::SubmitTaskAction {
                    r#type: "review".into(),
                    payload: "${data.id}".into(),
                    priority: 5,
                    labels: [("order".to_owned(), "${data.id}".to_owned())].into(),
                    ..pb::SubmitTaskAction::default()
                })),
                ..pb::Response::default()
            },
        ],
        ..pb::Rule::default()
    }
}

fn order(id: &str, amount: u32) -> bus::PublishRequest {
    bus::PublishRequest {
        event: Some(bus::Event {
            id: id.into(),
            subject: "orders.created".into(),
            r#type: "order.created".into(),
            headers: [("region".to_owned(), "eu".to_owned())].into(),
            content_type: "application/json".into(),
            data: format!(r#"{{"id": "{id}", "amount": {amount}}}"#).into_bytes(),
            ..bus::Event::default()
        }),
    }
}

async fn subscribe(
    b: &mut Bus,
    subject: &str,
) -> anyhow::Result<tonic::Streaming<bus::SubscribeResponse>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: subject.into(),
            max_in_flight: 1000,
            ack_policy: bus::AckPolicy::None as i32,
            ..bus::SubscribeOpen::default()
        })),
    })
    .await?;
    let mut stream = b
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The first message says the subscription is open; keep the sender alive with the stream.
    let _ = stream.next().await;
    std::mem::forget(tx);
    Ok(stream)
}

async fn stats(r: &mut Rules, name: &str) -> pb::RuleStats {
    r.get_rule_stats(pb::GetRuleStatsRequest { name: name.into() })
        .await
        .map(|s| s.into_inner().stats.into_iter().next().unwrap_or_default())
        .unwrap_or_default()
}

/// Publishes warm-up stimuli (skipped by the condition) until the engine has subscribed and
/// counted one: ephemeral subjects reach only subscribers already there.
async fn engine_listening(r: &Rules, b: &Bus) -> anyhow::Result<u64> {
    let mut n = 0u32;
    wait_until(Duration::from_secs(15), "the engine subscribed", || {
        n += 1;
        let (mut r, mut b) = (r.clone(), b.clone());
        async move {
            let _ = b.publish(order(&format!("warm-{n}"), 1)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            stats(&mut r, "big-orders").await.matched > 0
        }
    })
    .await?;
    Ok(stats(&mut r.clone(), "big-orders").await.skipped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rules_are_validated_stored_and_fire_their_responses() -> anyhow::Result<()> {
    // Quick retries: a failing response is retried after 100 ms, its fallback runs on the
    // third delivery.
    let dev = AgentmeshProcess::dev_with_env(&[
        ("AGENTMESH_RULES_RETRY_BACKOFF", "100ms"),
        ("AGENTMESH_RULES_MAX_DELIVERIES", "3"),
    ])
    .await?;
    let (sched_addr, _) = dev.addrs["scheduler"];
    let (bus_addr, _) = dev.addrs["eventbus"];
    let mut r = Rules::connect(format!("http://{sched_addr}")).await?;
    let mut b = Bus::connect(format!("http://{bus_addr}")).await?;

    // Bad rules: every problem named; a CEL error with its position.
    let mut bad = order_rule();
    bad.name = "bad name!".into();
    bad.condition = "data.amount >".into();
    bad.responses[0].when = "1 +".into();
    let err = r
        .put_rule(pb::PutRuleRequest {
            rule: Some(bad),
            ..pb::PutRuleRequest::default()
        })
        .await
        .expect_err("a bad rule is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for needle in [
        "rule.name",
        "rule.condition",
        "line 1 column",
        "rule.responses[0].when",
    ] {
        assert!(
            err.message().contains(needle),
            "{needle} in {}",
            err.message()
        );
    }
    let mut later = order_rule();
    later.correlation = Some(pb::Correlation {
        key: "data.id".into(),
        ..pb::Correlation::default()
    });
    let err = r
        .put_rule(pb::PutRuleRequest {
            rule: Some(later),
            ..pb::PutRuleRequest::default()
        })
        .await
        .expect_err("a correlation without a window or a mode");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for needle in ["rule.correlation.window", "exactly one of count"] {
        assert!(
            err.message().contains(needle),
            "{needle} in {}",
            err.message()
        );
    }
    let mut firings = r
        .watch_firings(pb::WatchFiringsRequest {
            name: "big-orders".into(),
        })
        .await?
        .into_inner();

    // A dry run stores nothing; a put stores it with a version.
    let dry = r
        .put_rule(pb::PutRuleRequest {
            rule: Some(order_rule()),
            dry_run: true,
            ..pb::PutRuleRequest::default()
        })
        .await?
        .into_inner();
    assert!(!dry.replaced);
    assert_eq!(
        r.get_rule(pb::GetRuleRequest {
            name: "big-orders".into()
        })
        .await
        .expect_err("dry run")
        .code(),
        Code::NotFound
    );
    let stored = r
        .put_rule(pb::PutRuleRequest {
            rule: Some(order_rule()),
            ..pb::PutRuleRequest::default()
        })
        .await?
        .into_inner()
        .rule
        .expect("rule");
    assert!(stored.version > 0);
    let err = r
        .put_rule(pb::PutRuleRequest {
            rule: Some(order_rule()),
            expected_version: stored.version + 7,
            ..pb::PutRuleRequest::default()
        })
        .await
        .expect_err("a stale expected version");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        r.list_rules(pb::ListRulesRequest {})
            .await?
            .into_inner()
            .rules
            .len(),
        1
    );

    // A webhook rule on the same stimulus: its receiver fails the first call (the stimulus is
    // redelivered after 1 s and the call retried), then takes it.
    let (hook_url, hooks) = webhook_receiver(1).await?;
    r.put_rule(pb::PutRuleRequest {
        rule: Some(pb::Rule {
            name: "hook-huge".into(),
            stimulus: order_rule().stimulus,
            condition: "data.amount > 5000".into(),
            responses: vec![pb::Response {
                name: "notify".into(),
                action: Some(pb::response::Action::Webhook(pb::WebhookAction {
                    url: hook_url.clone(),
                    headers: [("x-order".to_owned(), "${data.id}".to_owned())].into(),
                    ..pb::WebhookAction::default()
                })),
                ..pb::Response::default()
            }],
            ..pb::Rule::default()
        }),
        ..pb::PutRuleRequest::default()
    })
    .await?;

    // A delayed response (in memory here): a reminder 1 s after an order.
    r.put_rule(pb::PutRuleRequest {
        rule: Some(pb::Rule {
            name: "remind-huge".into(),
            stimulus: order_rule().stimulus,
            condition: "data.amount > 5000".into(),
            responses: vec![pb::Response {
                name: "remind".into(),
                delay: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                action: Some(pb::response::Action::Publish(pb::PublishAction {
                    subject: "alerts.reminder".into(),
                    ..pb::PublishAction::default()
                })),
                ..pb::Response::default()
            }],
            ..pb::Rule::default()
        }),
        ..pb::PutRuleRequest::default()
    })
    .await?;

    // A webhook that always fails, with a fallback.
    let (dead_url, dead_hooks) = webhook_receiver(usize::MAX).await?;
    r.put_rule(pb::PutRuleRequest {
        rule: Some(pb::Rule {
            name: "hook-fallback".into(),
            stimulus: order_rule().stimulus,
            condition: "data.amount > 5000".into(),
            responses: vec![pb::Response {
                name: "notify".into(),
                action: Some(pb::response::Action::Webhook(pb::WebhookAction {
                    url: dead_url,
                    ..pb::WebhookAction::default()
                })),
                fallback: Some(Box::new(pb::Response {
                    name: "page".into(),
                    action: Some(pb::response::Action::Publish(pb::PublishAction {
                        subject: "alerts.fallback".into(),
                        data: r#"{"order": "${data.id}", "why": "the webhook failed"}"#.into(),
                        ..pb::PublishAction::default()
                    })),
                    ..pb::Response::default()
                })),
                ..pb::Response::default()
            }],
            ..pb::Rule::default()
        }),
        ..pb::PutRuleRequest::default()
    })
    .await?;

    // Stimuli: one under the threshold, one over (alert), one far over (alert + review task),
    // one of another type (not matched).
    let mut alerts = subscribe(&mut b, "alerts.>").await?;
    let warm_skipped = engine_listening(&r, &b).await?;
    b.publish(order("o-small", 500)).await?;
    b.publish(order("o-big", 2000)).await?;
    // This stimulus carries a trace: the rule's firing and its responses join it.
    let mut huge = order("o-huge", 9000);
    huge.event.as_mut().expect("event").headers.insert(
        "traceparent".into(),
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01"),
    );
    b.publish(huge).await?;
    let mut other = order("o-other", 9000);
    other.event.as_mut().expect("event").r#type = "order.cancelled".into();
    b.publish(other).await?;
    let published = Instant::now();
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 && Instant::now() < deadline {
        for e in agentmesh_tests::bus::next_events(&mut alerts, Duration::from_secs(1))
            .await
            .unwrap_or_default()
        {
            seen.insert(e.id.clone(), e);
        }
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        [
            "big-orders/o-big/alert",
            "big-orders/o-huge/alert",
            "hook-fallback/o-huge/notify.page",
            "remind-huge/o-huge/remind"
        ],
        "{seen:?}\nstats: {:?}\nlogs:\n{}",
        stats(&mut r, "big-orders").await,
        dev.logs()
    );
    // The fallback: the webhook that always fails was tried on each of the three deliveries,
    // then the fallback published.
    let page = &seen["hook-fallback/o-huge/notify.page"];
    assert_eq!(page.subject, "alerts.fallback");
    assert_eq!(
        page.data,
        br#"{"order": "o-huge", "why": "the webhook failed"}"#
    );
    assert_eq!(dead_hooks.lock().len(), 3, "one call per delivery");
    let fb = stats(&mut r, "hook-fallback").await;
    assert_eq!((fb.fired, fb.failed, fb.fallbacks), (1, 2, 1), "{fb:?}");
    // The reminder came after its delay, with the stimulus's data.
    assert!(published.elapsed() >= Duration::from_millis(900));
    assert_eq!(seen["remind-huge/o-huge/remind"].subject, "alerts.reminder");
    let alert = &seen["big-orders/o-huge/alert"];
    let traceparent = alert
        .headers
        .get("traceparent")
        .cloned()
        .unwrap_or_default();
    assert!(
        traceparent.contains(TRACE_ID),
        "the response is in the stimulus's trace: {traceparent}"
    );
    assert_eq!(alert.subject, "alerts.eu");
    assert_eq!(alert.r#type, "order.alert");
    assert_eq!(alert.id, "big-orders/o-huge/alert");
    let data: serde_json::Value = serde_json::from_slice(&alert.data)?;
    assert_eq!(data, serde_json::json!({"order": "o-huge", "amount": 9000}));

    // The review task, submitted once, with its templated payload and label.
    let mut s =
        sched::scheduler_client::SchedulerClient::connect(format!("http://{sched_addr}")).await?;
    let tasks = s
        .list_tasks(sched::ListTasksRequest {
            r#type: "review".into(),
            ..sched::ListTasksRequest::default()
        })
        .await?
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].payload, b"o-huge");
    assert_eq!(
        tasks[0].labels.get("order").map(String::as_str),
        Some("o-huge")
    );
    assert_eq!(tasks[0].idempotency_key, "big-orders/o-huge/review");

    // The watcher saw the firings: skipped, fired with its responses.
    let mut watched = BTreeMap::new();
    while watched.len() < 3 {
        let f = tokio::time::timeout(Duration::from_secs(5), firings.next())
            .await?
            .expect("a firing")?;
        if !f.event_id.starts_with("warm-") {
            watched.insert(f.event_id.clone(), f);
        }
    }
    assert_eq!(watched["o-small"].outcome, "SKIPPED");
    assert_eq!(watched["o-big"].outcome, "FIRED");
    assert_eq!(watched["o-huge"].id, "big-orders/o-huge");
    let responses = watched["o-huge"].responses.join("\n");
    assert!(
        responses.contains("alert: publish ok: event big-orders/o-huge/alert"),
        "{responses}"
    );
    assert!(
        responses.contains("review: submit_task ok: task "),
        "{responses}"
    );

    // The webhook: called with the stimulus as JSON, the idempotency key and the templated
    // header; the first call failed (503), the redelivered stimulus called it again.
    wait_until(
        Duration::from_secs(10),
        "the webhook retried and taken",
        || {
            let hooks = hooks.clone();
            async move { hooks.lock().len() >= 2 }
        },
    )
    .await?;
    {
        let hooks = hooks.lock();
        for (head, body) in hooks.iter() {
            let head = head.to_ascii_lowercase();
            assert!(head.starts_with("post /hooks/orders http/1.1"), "{head}");
            assert!(
                head.contains("idempotency-key: hook-huge/o-huge/notify"),
                "{head}"
            );
            assert!(head.contains("x-order: o-huge"), "{head}");
            assert!(head.contains("content-type: application/json"), "{head}");
            let stimulus: serde_json::Value = serde_json::from_str(body)?;
            assert_eq!(stimulus["id"], "o-huge");
            assert_eq!(stimulus["data"]["amount"], 9000);
        }
    }
    assert_eq!(
        stats(&mut r, "hook-huge").await.fired,
        1,
        "fired once after the failed try"
    );

    let st = stats(&mut r, "big-orders").await;
    assert_eq!(
        (st.fired, st.skipped - warm_skipped, st.failed, st.responses),
        (2, 1, 0, 3),
        "{st:?}"
    );
    assert!(st.latency_p99.is_some());

    // Disabled: not evaluated; enabled again: evaluated; deleted: gone.
    r.disable_rule(pb::DisableRuleRequest {
        name: "big-orders".into(),
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.publish(order("o-while-disabled", 9000)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats(&mut r, "big-orders").await.fired, 2);
    assert!(
        r.get_rule(pb::GetRuleRequest {
            name: "big-orders".into()
        })
        .await?
        .into_inner()
        .rule
        .expect("rule")
        .disabled
    );
    r.enable_rule(pb::EnableRuleRequest {
        name: "big-orders".into(),
    })
    .await?;
    engine_listening(&r, &b).await?;
    r.delete_rule(pb::DeleteRuleRequest {
        name: "big-orders".into(),
    })
    .await?;
    assert_eq!(
        r.get_rule(pb::GetRuleRequest {
            name: "big-orders".into()
        })
        .await
        .expect_err("deleted")
        .code(),
        Code::NotFound
    );
    assert_eq!(
        r.delete_rule(pb::DeleteRuleRequest {
            name: "big-orders".into()
        })
        .await
        .expect_err("deleted")
        .code(),
        Code::NotFound
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_rule_fires_exactly_once_across_a_killed_scheduler_leader() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let redis = RedisServer::start().await?;
    let endpoint = etcd.endpoint();
    let bus_process = AgentmeshProcess::serve_eventbus(
        Some(&redis.url()),
        Some(&endpoint),
        &["--eventbus-durable", "orders.>"],
    )
    .await?;
    let mut b = Bus::connect(format!("http://{}", bus_process.grpc_addr)).await?;
    let mut leader =
        AgentmeshProcess::serve("scheduler", Some(&redis.url()), Some(&endpoint), &[]).await?;
    let follower =
        AgentmeshProcess::serve("scheduler", Some(&redis.url()), Some(&endpoint), &[]).await?;
    let mut r = Rules::connect(format!("http://{}", follower.grpc_addr)).await?;
    wait_until(Duration::from_secs(15), "a scheduler leads", || {
        let mut r = r.clone();
        async move { r.list_rules(pb::ListRulesRequest {}).await.is_ok() }
    })
    .await?;
    let mut rule = order_rule();
    rule.responses.truncate(1);
    rule.condition = String::new();
    // And a reminder 3 s after each stimulus: scheduled in Redis by whichever scheduler leads,
    // run by whichever leads when it comes due.
    rule.responses.push(pb::Response {
        name: "remind".into(),
        delay: Some(prost_types::Duration {
            seconds: 3,
            nanos: 0,
        }),
        action: Some(pb::response::Action::Publish(pb::PublishAction {
            subject: "alerts.reminder".into(),
            data: "${data.id}".into(),
            ..pb::PublishAction::default()
        })),
        ..pb::Response::default()
    });
    r.put_rule(pb::PutRuleRequest {
        rule: Some(rule),
        ..pb::PutRuleRequest::default()
    })
    .await?;
    // Stored in etcd, readable there.
    let mut kv = etcd_client::Client::connect([endpoint.as_str()], None).await?;
    let got = kv.get("/agentmesh/rules/big-orders", None).await?;
    assert_eq!(
        got.kvs().len(),
        1,
        "the rule is in etcd under <prefix>/rules/"
    );

    let mut alerts = subscribe(&mut b, "alerts.>").await?;
    // The engine subscribed (durable subject: from its subscription on).
    engine_listening(&r, &b).await?;
    let total = 150u32;
    let publisher = tokio::spawn({
        let b = b.clone();
        async move {
            for n in 0..total {
                let mut req = order(&format!("o-{n}"), 2000);
                req.event.as_mut().expect("event").time = None;
                b.clone().publish(req).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        leader.logs().contains("evaluating reactive rules")
            && !follower.logs().contains("evaluating reactive rules"),
        "the first scheduler evaluates the rules"
    );
    leader.kill9();
    let _ = leader.wait_exit(Duration::from_secs(5)).await;
    publisher.await??;
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    let mut reminders: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while (count.len() < total as usize || reminders.len() < total as usize)
        && Instant::now() < deadline
    {
        for e in agentmesh_tests::bus::next_events(&mut alerts, Duration::from_secs(5))
            .await
            .unwrap_or_default()
        {
            if !e.correlation_id.starts_with("o-") {
                continue;
            }
            let tally = if e.subject == "alerts.reminder" {
                &mut reminders
            } else {
                &mut count
            };
            *tally.entry(e.correlation_id).or_default() += 1;
        }
    }
    let late: Vec<u32> = (0..total)
        .filter(|n| !reminders.contains_key(&format!("o-{n}")))
        .collect();
    assert!(
        late.is_empty(),
        "delayed reminders that never ran: {late:?}"
    );
    let again: Vec<_> = reminders.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        again.is_empty(),
        "delayed reminders that ran twice: {again:?}"
    );
    assert!(
        follower.logs().contains("evaluating reactive rules"),
        "the follower took over the rules"
    );
    let missing: Vec<u32> = (0..total)
        .filter(|n| !count.contains_key(&format!("o-{n}")))
        .collect();
    let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        missing.is_empty(),
        "stimuli that never fired: {missing:?}\nfollower logs:\n{}",
        follower.logs()
    );
    assert!(twice.is_empty(), "stimuli that fired twice: {twice:?}");
    Ok(())
}
