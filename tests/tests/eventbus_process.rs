//! The event bus as a real `agentmesh` process: fan-out and queue groups, priorities, TTL,
//! acks / naks / redelivery / dead letters / redrive, request/reply, dedup, bad input, and
//! durable replay across a restart with Redis.

use std::time::Duration;

use agentmesh_proto::eventbus::v1 as pb;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

type Client = pb::event_bus_client::EventBusClient<tonic::transport::Channel>;

async fn client(addr: std::net::SocketAddr) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{addr}")).await?)
}

fn event(subject: &str, data: &str) -> pb::Event {
    pb::Event {
        subject: subject.into(),
        data: data.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn publish(c: &mut Client, e: pb::Event) -> anyhow::Result<pb::PublishResponse> {
    Ok(c.publish(pb::PublishRequest { event: Some(e) })
        .await?
        .into_inner())
}

/// One open subscription: send acks through `tx`, read deliveries from `rx`.
struct Sub {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    rx: tonic::Streaming<pb::SubscribeResponse>,
    id: String,
}

fn open(subject: &str) -> pb::SubscribeOpen {
    pb::SubscribeOpen {
        subject: subject.into(),
        max_in_flight: 100,
        ..Default::default()
    }
}

async fn subscribe(c: &mut Client, open: pb::SubscribeOpen) -> anyhow::Result<Sub> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Open(open)),
    })
    .await?;
    let mut rx = c.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    let first = rx
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no subscribed"))??;
    let Some(pb::subscribe_response::Kind::Subscribed(s)) = first.kind else {
        anyhow::bail!("expected subscribed, got {first:?}");
    };
    Ok(Sub {
        tx,
        rx,
        id: s.subscription_id,
    })
}

impl Sub {
    /// Deliveries arriving within `wait` (stops early once `want` have arrived).
    async fn take(&mut self, want: usize, wait: Duration) -> Vec<pb::Delivery> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < want {
            match tokio::time::timeout_at(deadline, self.rx.next()).await {
                Ok(Some(Ok(m))) => {
                    if let Some(pb::subscribe_response::Kind::Deliveries(d)) = m.kind {
                        out.extend(d.deliveries);
                    }
                }
                _ => break,
            }
        }
        out
    }

    async fn send(&self, kind: pb::subscribe_request::Kind) {
        self.tx
            .send(pb::SubscribeRequest { kind: Some(kind) })
            .await
            .expect("subscription open");
    }

    async fn ack(&self, deliveries: &[pb::Delivery]) {
        self.send(pb::subscribe_request::Kind::Ack(pb::Ack {
            delivery_ids: deliveries.iter().map(|d| d.delivery_id).collect(),
        }))
        .await;
    }
}

fn data(d: &pb::Delivery) -> String {
    String::from_utf8_lossy(&d.event.as_ref().unwrap().data).into_owned()
}

async fn dev() -> anyhow::Result<(AgentmeshProcess, Client)> {
    let process = AgentmeshProcess::dev().await?;
    let (addr, _) = process.eventbus.expect("dev runs the event bus");
    wait_until(Duration::from_secs(10), "event bus port", || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await?;
    let c = client(addr).await?;
    Ok((process, c))
}

#[tokio::test]
async fn test_fan_out_reaches_every_subscriber_and_a_queue_group_shares() -> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let mut a = subscribe(&mut c, open("orders.*.created")).await?;
    let mut b = subscribe(&mut c, open("orders.>")).await?;
    let group = |s: &str| pb::SubscribeOpen {
        queue_group: "workers".into(),
        ..open(s)
    };
    let mut w1 = subscribe(&mut c, group("orders.>")).await?;
    let mut w2 = subscribe(&mut c, group("orders.>")).await?;
    for i in 0..20 {
        publish(&mut c, event("orders.eu.created", &i.to_string())).await?;
    }
    publish(&mut c, event("payments.eu.created", "x")).await?;
    let (da, db) = (
        a.take(20, Duration::from_secs(5)).await,
        b.take(20, Duration::from_secs(5)).await,
    );
    assert_eq!(da.len(), 20, "every subscriber gets every event");
    assert_eq!(db.len(), 20);
    let order: Vec<String> = da.iter().map(data).collect();
    assert_eq!(order, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
    let d1 = w1.take(20, Duration::from_millis(500)).await;
    let d2 = w2.take(20, Duration::from_millis(500)).await;
    assert_eq!(d1.len() + d2.len(), 20, "each event to one group member");
    assert!(!d1.is_empty() && !d2.is_empty(), "both members get a share");
    assert!(
        a.take(1, Duration::from_millis(200)).await.is_empty(),
        "payments.* does not match"
    );
    // Broadcast reaches every member of every group.
    publish(&mut c, event("sys.broadcast.reload", "now")).await?;
    let mut everyone = subscribe(&mut c, group("sys.broadcast.>")).await?;
    let mut other = subscribe(&mut c, group("sys.broadcast.>")).await?;
    publish(&mut c, event("sys.broadcast.reload", "again")).await?;
    assert_eq!(everyone.take(1, Duration::from_secs(2)).await.len(), 1);
    assert_eq!(other.take(1, Duration::from_secs(2)).await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn test_pending_events_go_out_by_priority_and_low_is_not_starved() -> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let mut s = subscribe(
        &mut c,
        pb::SubscribeOpen {
            max_in_flight: 1,
            ..open("jobs")
        },
    )
    .await?;
    // Hold the single credit so everything else queues.
    publish(&mut c, event("jobs", "first")).await?;
    let first = s.take(1, Duration::from_secs(2)).await;
    assert_eq!(first.len(), 1);
    for (p, name) in [
        (pb::Priority::Low, "low"),
        (pb::Priority::Normal, "normal"),
        (pb::Priority::High, "high"),
        (pb::Priority::Critical, "critical"),
    ] {
        for i in 0..8 {
            let mut e = event("jobs", &format!("{name}-{i}"));
            e.priority = p as i32;
            publish(&mut c, e).await?;
        }
    }
    s.ack(&first).await;
    let mut order = Vec::new();
    for _ in 0..32 {
        let d = s.take(1, Duration::from_secs(2)).await;
        assert_eq!(d.len(), 1, "delivered after {order:?}");
        order.push(data(&d[0]));
        s.ack(&d).await;
    }
    assert!(order[0].starts_with("critical"), "{order:?}");
    let position = |prefix: &str| order.iter().position(|o| o.starts_with(prefix)).unwrap();
    assert!(
        position("low") < 24,
        "LOW is not starved behind all others: {order:?}"
    );
    let criticals_in_first_12 = order[..12]
        .iter()
        .filter(|o| o.starts_with("critical"))
        .count();
    assert!(criticals_in_first_12 >= 5, "{order:?}");
    Ok(())
}

#[tokio::test]
async fn test_an_expired_event_is_never_delivered() -> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let mut s = subscribe(
        &mut c,
        pb::SubscribeOpen {
            max_in_flight: 1,
            ..open("ttl.test")
        },
    )
    .await?;
    publish(&mut c, event("ttl.test", "holder")).await?;
    let holder = s.take(1, Duration::from_secs(2)).await;
    let mut short = event("ttl.test", "short-lived");
    short.ttl = Some(prost_types::Duration {
        seconds: 0,
        nanos: 100_000_000,
    });
    publish(&mut c, short).await?;
    publish(&mut c, event("ttl.test", "lasting")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.ack(&holder).await;
    let next = s.take(2, Duration::from_secs(1)).await;
    let got: Vec<String> = next.iter().map(data).collect();
    assert_eq!(got, ["lasting"], "the expired event is skipped");
    Ok(())
}

#[tokio::test]
async fn test_unacked_events_are_redelivered_then_dead_lettered_and_can_be_redriven()
-> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let mut s = subscribe(
        &mut c,
        pb::SubscribeOpen {
            ack_wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            max_deliveries: 3,
            dead_letter_subject: "dlq.work".into(),
            ..open("work.item")
        },
    )
    .await?;
    let poison = publish(&mut c, event("work.item", "poison")).await?;
    let mut counts = Vec::new();
    for _ in 0..3 {
        let d = s.take(1, Duration::from_secs(2)).await;
        assert_eq!(d.len(), 1);
        counts.push(d[0].delivery_count);
    }
    assert_eq!(counts, [1, 2, 3], "redelivered after the ack wait");
    // A nak redelivers at once; an ack ends it.
    publish(&mut c, event("work.item", "nak-me")).await?;
    let d = s.take(1, Duration::from_secs(2)).await;
    s.send(pb::subscribe_request::Kind::Nak(pb::Nak {
        delivery_id: d[0].delivery_id,
        delay: None,
    }))
    .await;
    let again = s.take(1, Duration::from_secs(2)).await;
    assert_eq!(
        (data(&again[0]).as_str(), again[0].delivery_count),
        ("nak-me", 2)
    );
    s.ack(&again).await;

    let dead = wait_for_dead_letters(&mut c, "dlq.work", 1).await?;
    assert_eq!(dead[0].reason, "MAX_DELIVERIES");
    assert_eq!(dead[0].deliveries, 3);
    assert_eq!(dead[0].event.as_ref().unwrap().subject, "work.item");
    assert_eq!(
        dead[0].event.as_ref().unwrap().id,
        poison.id,
        "listed as it was published"
    );

    // Redrive publishes it on its original subject again.
    let mut fresh = subscribe(&mut c, open("work.item")).await?;
    let redriven = c
        .redrive_dead_letters(pb::RedriveDeadLettersRequest {
            subject: "dlq.work".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(redriven.redriven, 1);
    let d = fresh.take(1, Duration::from_secs(2)).await;
    assert_eq!(data(&d[0]), "poison");
    let redriven_event = d[0].event.as_ref().unwrap();
    assert_ne!(
        redriven_event.id, poison.id,
        "a new id, or dedup would drop it"
    );
    assert_eq!(redriven_event.headers["redriven-from"], poison.id);
    assert!(
        wait_for_dead_letters(&mut c, "dlq.work", 0)
            .await?
            .is_empty()
    );

    // Terminate dead-letters at once with the subscriber's reason; purge removes it.
    publish(&mut c, event("work.item", "bad")).await?;
    let d = fresh.take(1, Duration::from_secs(2)).await;
    fresh
        .send(pb::subscribe_request::Kind::Terminate(pb::Terminate {
            delivery_id: d[0].delivery_id,
            reason: "schema mismatch".into(),
        }))
        .await;
    let dead = wait_for_dead_letters(&mut c, "sys.deadletter", 1).await?;
    assert_eq!(dead[0].reason, "TERMINATED: schema mismatch");
    let purged = c
        .purge_dead_letters(pb::PurgeDeadLettersRequest::default())
        .await?
        .into_inner();
    assert_eq!(purged.purged, 1);
    Ok(())
}

async fn wait_for_dead_letters(
    c: &mut Client,
    subject: &str,
    want: usize,
) -> anyhow::Result<Vec<pb::DeadLetter>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let list = c
            .list_dead_letters(pb::ListDeadLettersRequest {
                subject: subject.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .dead_letters;
        if list.len() == want || tokio::time::Instant::now() > deadline {
            return Ok(list);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn test_request_reaches_one_responder_and_no_responders_fails_at_once() -> anyhow::Result<()>
{
    let (_p, mut c) = dev().await?;
    let started = std::time::Instant::now();
    let err = c
        .request(pb::RequestRequest {
            event: Some(event("math.add", "1+1")),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("no responders"), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(500));

    let responder = |c: Client| async move {
        let mut c = c;
        let mut s = subscribe(
            &mut c,
            pb::SubscribeOpen {
                queue_group: "adders".into(),
                ..open("math.add")
            },
        )
        .await
        .unwrap();
        let id = s.id.clone();
        loop {
            let d = s.take(1, Duration::from_secs(10)).await;
            let Some(d) = d.first() else { return };
            s.send(pb::subscribe_request::Kind::Reply(pb::Reply {
                delivery_id: d.delivery_id,
                event: Some(event("", &format!("2 from {id}"))),
            }))
            .await;
        }
    };
    let r1 = tokio::spawn(responder(c.clone()));
    let r2 = tokio::spawn(responder(c.clone()));
    wait_until(Duration::from_secs(5), "two responders", || {
        let mut c = c.clone();
        async move {
            c.list_subscriptions(pb::ListSubscriptionsRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().subscriptions.len() == 2)
        }
    })
    .await?;
    for _ in 0..4 {
        let reply = c
            .request(pb::RequestRequest {
                event: Some(event("math.add", "1+1")),
                timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
            })
            .await?
            .into_inner();
        let data = String::from_utf8(reply.reply.unwrap().data)?;
        assert!(data.starts_with("2 from "), "{data}");
    }
    r1.abort();
    r2.abort();

    // A responder that never answers: DEADLINE_EXCEEDED after the timeout.
    let _silent = subscribe(&mut c, open("math.slow")).await?;
    let started = std::time::Instant::now();
    let err = c
        .request(pb::RequestRequest {
            event: Some(event("math.slow", "?")),
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    assert!(started.elapsed() >= Duration::from_millis(300));
    Ok(())
}

#[tokio::test]
async fn test_a_repeated_id_is_acknowledged_as_duplicate_and_not_delivered_again()
-> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let mut s = subscribe(&mut c, open("dedup.test")).await?;
    let mut e = event("dedup.test", "once");
    e.id = "order-42".into();
    let first = publish(&mut c, e.clone()).await?;
    let second = publish(&mut c, e).await?;
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(s.take(2, Duration::from_millis(500)).await.len(), 1);
    let generated = publish(&mut c, event("dedup.test", "x")).await?;
    assert_eq!(generated.id.len(), 26, "a ULID is generated");
    Ok(())
}

#[tokio::test]
async fn test_bad_input_is_invalid_argument_naming_the_field() -> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let field_of = |status: &tonic::Status| {
        use tonic_types::StatusExt;
        status
            .get_details_bad_request()
            .map(|b| b.field_violations[0].field.clone())
            .unwrap_or_default()
    };
    for (e, field) in [
        (event("a..b", ""), "event.subject"),
        (event("orders.*", ""), "event.subject"),
        (event("", ""), "event.subject"),
        (
            pb::Event {
                data: vec![0; 2 * 1024 * 1024],
                ..event("big", "")
            },
            "event.data",
        ),
    ] {
        let err = c
            .publish(pb::PublishRequest { event: Some(e) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(field_of(&err), field, "{err:?}");
    }
    for (o, field) in [
        (
            pb::SubscribeOpen {
                max_in_flight: 0,
                ..open("x")
            },
            "open.max_in_flight",
        ),
        (open("a.>.b"), "open.subject"),
        (
            pb::SubscribeOpen {
                queue_group: "bad group".into(),
                ..open("x")
            },
            "open.queue_group",
        ),
    ] {
        let err = subscribe(&mut c, o).await.err().expect("rejected");
        let status = err.downcast_ref::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(field_of(status), field);
    }
    let err = c.request(pb::RequestRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(field_of(&err), "event");
    let bad_filter = "a..b".to_owned();
    let err = c
        .list_subscriptions(pb::ListSubscriptionsRequest {
            subject: bad_filter.clone(),
            instance_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(field_of(&err), "subject");
    let err = c
        .get_stats(pb::GetStatsRequest {
            subject: bad_filter,
            instance_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(field_of(&err), "subject");
    Ok(())
}

#[tokio::test]
async fn test_durable_events_survive_an_eventbus_restart_and_replay() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let durable = ["--eventbus-durable", "orders.>"];
    let process = AgentmeshProcess::serve_eventbus(Some(&url), None, &durable).await?;
    let mut c = client(process.grpc_addr).await?;
    let group = pb::SubscribeOpen {
        queue_group: "billing".into(),
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::All(true)),
        }),
        ..open("orders.>")
    };
    // Create the group, then publish while nobody reads.
    drop(subscribe(&mut c, group.clone()).await?);
    let mut sequences = Vec::new();
    for i in 0..10 {
        let r = publish(&mut c, event("orders.eu.created", &i.to_string())).await?;
        assert_eq!(r.stream, "orders.>");
        sequences.push(r.sequence);
    }
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
    drop(c);
    drop(process);

    let process = AgentmeshProcess::serve_eventbus(Some(&url), None, &durable).await?;
    let mut c = client(process.grpc_addr).await?;
    let mut s = subscribe(&mut c, group).await?;
    let got = s.take(10, Duration::from_secs(5)).await;
    let order: Vec<String> = got.iter().map(data).collect();
    assert_eq!(order, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(got[0].sequence, sequences[0]);
    s.ack(&got).await;

    // Replay: a new subscriber reads the stream from a sequence.
    let mut replay = subscribe(
        &mut c,
        pb::SubscribeOpen {
            durable_name: "audit".into(),
            start: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Sequence(sequences[5])),
            }),
            ..open("orders.>")
        },
    )
    .await?;
    let got = replay.take(5, Duration::from_secs(5)).await;
    assert_eq!(
        got.iter().map(data).collect::<Vec<_>>(),
        ["5", "6", "7", "8", "9"]
    );
    Ok(())
}

#[tokio::test]
async fn test_a_publish_stream_stores_and_answers_in_publish_order() -> anyhow::Result<()> {
    // Thousands of publishes at once, taken in batches: both the answers and the stream keep
    // the publish order, also when batches mix durable and ephemeral subjects. (This test
    // caught an attempt to keep several batches in flight to Redis at once.)
    let redis = RedisServer::start().await?;
    let durable = ["--eventbus-durable", "orders.>"];
    let process = AgentmeshProcess::serve_eventbus(Some(&redis.url()), None, &durable).await?;
    let mut c = client(process.grpc_addr).await?;
    let mut reader = subscribe(
        &mut c,
        pb::SubscribeOpen {
            max_in_flight: 10_000,
            ack_policy: pb::AckPolicy::None as i32,
            ..open("orders.>")
        },
    )
    .await?;
    let total = 5000_usize;
    let requests: Vec<pb::PublishRequest> = (0..total)
        .map(|i| {
            // Every 1000th event is ephemeral, so some batches are not all one stream.
            let subject = if i % 1000 == 999 {
                "audit.tick"
            } else {
                "orders.eu.created"
            };
            pb::PublishRequest {
                event: Some(event(subject, &i.to_string())),
            }
        })
        .collect();
    let mut answers = c
        .publish_stream(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut sequences = Vec::new();
    while let Some(answer) = answers.next().await {
        let answer = answer?;
        assert!(answer.error.is_none(), "{answer:?}");
        sequences.push(answer.sequence);
    }
    assert_eq!(sequences.len(), total);
    let stored: Vec<u64> = sequences.iter().copied().filter(|&s| s != 0).collect();
    assert_eq!(stored.len(), total - 5);
    let disorder = stored.windows(2).position(|w| w[0] >= w[1]);
    assert!(
        disorder.is_none(),
        "answers in publish order carry increasing sequences; at {disorder:?}: {:?}",
        disorder.map(|i| &stored[i.saturating_sub(2)..(i + 3).min(stored.len())])
    );
    let got = reader.take(total - 5, Duration::from_secs(10)).await;
    let expected: Vec<String> = (0..total)
        .filter(|i| i % 1000 != 999)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(got.iter().map(data).collect::<Vec<_>>(), expected);
    Ok(())
}

#[tokio::test]
async fn test_durable_events_of_a_killed_instance_reach_the_surviving_subscriber()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let durable = ["--eventbus-durable", "jobs.>"];
    let mut a = AgentmeshProcess::serve_eventbus(Some(&url), None, &durable).await?;
    let b = AgentmeshProcess::serve_eventbus(Some(&url), None, &durable).await?;
    let (mut ca, mut cb) = (client(a.grpc_addr).await?, client(b.grpc_addr).await?);
    let group = pb::SubscribeOpen {
        queue_group: "runners".into(),
        ack_wait: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        max_in_flight: 1000,
        ..open("jobs.>")
    };
    let mut on_a = subscribe(&mut ca, group.clone()).await?;
    // Everything is published (through B) while only A's subscriber reads: A holds it unacked.
    for i in 0..20 {
        publish(&mut cb, event("jobs.build", &i.to_string())).await?;
    }
    let held = on_a.take(20, Duration::from_secs(5)).await;
    assert_eq!(held.len(), 20, "A's subscriber got everything");
    let mut on_b = subscribe(&mut cb, group).await?;
    a.kill9();
    let got = on_b.take(20, Duration::from_secs(10)).await;
    let mut values: Vec<u32> = got.iter().map(|d| data(d).parse().unwrap()).collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..20).collect::<Vec<_>>(),
        "nothing acknowledged is lost"
    );
    assert!(
        got.iter().all(|d| d.delivery_count >= 2),
        "they are redeliveries"
    );
    on_b.ack(&got).await;
    Ok(())
}

#[tokio::test]
async fn test_a_subscriber_that_disconnects_gives_its_unacked_events_to_its_group()
-> anyhow::Result<()> {
    let (_p, mut c) = dev().await?;
    let group = pb::SubscribeOpen {
        queue_group: "g".into(),
        max_in_flight: 5,
        ..open("tasks")
    };
    let mut first = subscribe(&mut c, group.clone()).await?;
    for i in 0..5 {
        publish(&mut c, event("tasks", &i.to_string())).await?;
    }
    assert_eq!(first.take(5, Duration::from_secs(2)).await.len(), 5);
    let mut second = subscribe(&mut c, group).await?;
    drop(first);
    let got = second.take(5, Duration::from_secs(3)).await;
    assert_eq!(
        got.len(),
        5,
        "unacked deliveries go to the remaining member"
    );
    Ok(())
}

#[tokio::test]
async fn test_two_instances_deliver_ephemeral_events_and_replies_to_subscribers_on_both()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let mut a = AgentmeshProcess::serve_eventbus(Some(&url), None, &[]).await?;
    let b = AgentmeshProcess::serve_eventbus(Some(&url), None, &[]).await?;
    let (mut ca, mut cb) = (client(a.grpc_addr).await?, client(b.grpc_addr).await?);
    let workers = pb::SubscribeOpen {
        queue_group: "workers".into(),
        max_in_flight: 1000,
        ..open("chat.msg")
    };
    let tap = pb::SubscribeOpen {
        max_in_flight: 1000,
        ..open("chat.*")
    };
    let mut tap_a = subscribe(&mut ca, tap.clone()).await?;
    let mut tap_b = subscribe(&mut cb, tap).await?;
    let mut work_a = subscribe(&mut ca, workers.clone()).await?;
    let mut work_b = subscribe(&mut cb, workers).await?;
    // Interests travel through Redis: ping both ways until each side hears the other.
    let pings = |got: &[pb::Delivery], from: &str| got.iter().any(|d| data(d) == from);
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for _ in 0..50 {
        seen_a.extend(tap_a.take(1000, Duration::from_millis(100)).await);
        seen_b.extend(tap_b.take(1000, Duration::from_millis(100)).await);
        if pings(&seen_a, "b") && pings(&seen_b, "a") {
            break;
        }
        publish(&mut ca, event("chat.ping", "a")).await?;
        publish(&mut cb, event("chat.ping", "b")).await?;
    }
    assert!(pings(&seen_a, "b") && pings(&seen_b, "a"), "pings crossed");

    for i in 0..100 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        publish(c, event("chat.msg", &format!("m{i}"))).await?;
    }
    let msgs = |got: Vec<pb::Delivery>| -> Vec<String> {
        got.iter()
            .map(data)
            .filter(|d| d.starts_with('m'))
            .collect()
    };
    let on_a = msgs(tap_a.take(200, Duration::from_secs(3)).await);
    let on_b = msgs(tap_b.take(200, Duration::from_secs(3)).await);
    assert_eq!(on_a.len(), 100, "every subscriber gets every event");
    assert_eq!(on_b.len(), 100, "every subscriber gets every event");
    let shared_a = work_a.take(100, Duration::from_secs(1)).await;
    let shared_b = work_b.take(100, Duration::from_secs(1)).await;
    let mut shared: Vec<String> = shared_a.iter().chain(&shared_b).map(data).collect();
    shared.sort();
    shared.dedup();
    assert_eq!(
        shared_a.len() + shared_b.len(),
        100,
        "the queue group gets each event once across both instances"
    );
    assert_eq!(shared.len(), 100);
    assert!(
        !shared_a.is_empty() && !shared_b.is_empty(),
        "both members got a share"
    );

    // Request through A, answered by the only responder, on B.
    let mut responder = subscribe(
        &mut cb,
        pb::SubscribeOpen {
            queue_group: "clock".into(),
            ..open("svc.time")
        },
    )
    .await?;
    let serve = tokio::spawn(async move {
        loop {
            let got = responder.take(1, Duration::from_secs(30)).await;
            let Some(d) = got.first() else { return };
            responder
                .send(pb::subscribe_request::Kind::Reply(pb::Reply {
                    delivery_id: d.delivery_id,
                    event: Some(event("", "noon")),
                }))
                .await;
        }
    });
    let reply = wait_until(Duration::from_secs(10), "a reply from B", || {
        let mut ca = ca.clone();
        async move {
            ca.request(pb::RequestRequest {
                event: Some(event("svc.time", "?")),
                timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
            })
            .await
            .is_ok_and(|r| r.into_inner().reply.is_some_and(|e| e.data == b"noon"))
        }
    })
    .await;
    serve.abort();
    reply?;

    // B killed without a goodbye: within the advert TTL A stops routing to it, so A's member
    // gets every event of the group again.
    drop(b);
    let mut a_only = Vec::new();
    tokio::time::sleep(agentmesh_eventbus::redis_backplane::ADVERT_TTL + Duration::from_secs(2))
        .await;
    let _ = work_a.take(1000, Duration::from_millis(100)).await;
    for i in 0..20 {
        publish(&mut ca, event("chat.msg", &format!("after{i}"))).await?;
    }
    a_only.extend(work_a.take(20, Duration::from_secs(3)).await);
    assert_eq!(a_only.len(), 20, "nothing is routed to the dead instance");
    a.kill9();
    Ok(())
}

#[tokio::test]
async fn test_stats_and_subscriptions_cover_every_live_instance_and_name_a_dead_one()
-> anyhow::Result<()> {
    let (redis, etcd) = (RedisServer::start().await?, EtcdServer::start().await?);
    let (url, endpoint) = (redis.url(), etcd.endpoint());
    let a = AgentmeshProcess::serve_eventbus(Some(&url), Some(&endpoint), &[]).await?;
    let mut b = AgentmeshProcess::serve_eventbus(Some(&url), Some(&endpoint), &[]).await?;
    let (mut ca, mut cb) = (client(a.grpc_addr).await?, client(b.grpc_addr).await?);
    let workers = pb::SubscribeOpen {
        queue_group: "workers".into(),
        ..open("jobs.*")
    };
    let _on_a = subscribe(&mut ca, workers.clone()).await?;
    let _on_b = subscribe(&mut cb, workers).await?;
    let _tap = subscribe(&mut cb, open("audit")).await?;
    for i in 0..3 {
        publish(&mut ca, event("jobs.build", &i.to_string())).await?;
    }
    for i in 0..2 {
        publish(&mut cb, event("jobs.build", &i.to_string())).await?;
    }
    let only = |subject: &str| pb::GetStatsRequest {
        subject: subject.into(),
        instance_only: true,
    };
    let id_a = ca.get_stats(only("")).await?.into_inner().instance;
    let id_b = cb.get_stats(only("")).await?.into_inner().instance;

    wait_until(
        Duration::from_secs(10),
        "both instances in the stats",
        || {
            let mut ca = ca.clone();
            async move {
                ca.get_stats(pb::GetStatsRequest::default())
                    .await
                    .is_ok_and(|s| s.into_inner().instances.len() == 2)
            }
        },
    )
    .await?;
    let stats = ca
        .get_stats(pb::GetStatsRequest::default())
        .await?
        .into_inner();
    assert_eq!(stats.instance, id_a);
    assert_eq!(stats.instances, [id_a.clone(), id_b.clone()]);
    assert!(stats.unreachable.is_empty(), "{:?}", stats.unreachable);
    let build = stats.subjects.iter().find(|s| s.subject == "jobs.build");
    assert_eq!(
        build.map(|s| s.published),
        Some(5),
        "publishes on both instances add up"
    );
    let group = stats.groups.iter().find(|g| g.group == "workers");
    assert_eq!(
        group.map(|g| g.members),
        Some(2),
        "one row for the group, members on both instances"
    );
    let local = ca.get_stats(only("jobs.>")).await?.into_inner();
    assert_eq!(local.instances, std::slice::from_ref(&id_a));
    assert_eq!(
        local.subjects[0].published, 3,
        "instance_only: A's own figures"
    );

    let listed = ca
        .list_subscriptions(pb::ListSubscriptionsRequest::default())
        .await?
        .into_inner();
    let mut on: Vec<(String, String)> = listed
        .subscriptions
        .iter()
        .map(|s| (s.subject.clone(), s.instance.clone()))
        .collect();
    on.sort();
    let mut want = vec![
        ("audit".to_owned(), id_b.clone()),
        ("jobs.*".to_owned(), id_a.clone()),
        ("jobs.*".to_owned(), id_b.clone()),
    ];
    want.sort();
    assert_eq!(on, want);
    assert_eq!(listed.instances, [id_a.clone(), id_b.clone()]);

    // B dies without leaving: until its lease expires it is still a member, and it is named
    // unreachable at once instead of holding the answer up.
    b.kill9();
    let started = std::time::Instant::now();
    let stats = ca
        .get_stats(pb::GetStatsRequest::default())
        .await?
        .into_inner();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "a dead peer costs at most the peer budget: {:?}",
        started.elapsed()
    );
    assert_eq!(stats.unreachable, [id_b]);
    assert_eq!(stats.instances, [id_a]);
    Ok(())
}

#[tokio::test]
async fn test_with_redis_an_id_is_deduplicated_across_instances() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let a = AgentmeshProcess::serve_eventbus(Some(&url), None, &[]).await?;
    let b = AgentmeshProcess::serve_eventbus(Some(&url), None, &[]).await?;
    let (mut ca, mut cb) = (client(a.grpc_addr).await?, client(b.grpc_addr).await?);
    for i in 0..20 {
        let id = format!("dedup-{i}");
        let first = publish(
            &mut ca,
            pb::Event {
                id: id.clone(),
                ..event("ephemeral.x", "1")
            },
        )
        .await?;
        let second = publish(
            &mut cb,
            pb::Event {
                id,
                ..event("ephemeral.x", "2")
            },
        )
        .await?;
        assert!(!first.duplicate, "{i}: first publish is new");
        assert!(
            second.duplicate,
            "{i}: the same id on the other instance is a duplicate"
        );
    }
    Ok(())
}
