//! Cluster-wide ephemeral delivery between buses joined over the in-memory backplane.

use std::sync::Arc;
use std::time::Duration;

use agentmesh_eventbus::cluster::{Backplane, Forward, Handed, InMemoryHub, Inbound, Interest};
use agentmesh_eventbus::log::{InMemoryLog, StartPosition};
use agentmesh_eventbus::subject::SubjectFilter;
use agentmesh_eventbus::{
    AckPolicy, Bus, BusConfig, ConsumerOptions, Event, EventBusError, Outbound, Priority,
    Subscription,
};

fn bus(hub: &InMemoryHub, id: &str) -> Bus {
    let (plane, inbound) = hub.join(id);
    Bus::with_cluster(
        BusConfig::new(id),
        Arc::new(InMemoryLog::new(1000)),
        plane,
        inbound,
    )
}

fn options(filter: &str, group: Option<&str>) -> ConsumerOptions {
    ConsumerOptions {
        filter: SubjectFilter::parse("f", filter).unwrap(),
        queue_group: group.map(str::to_owned),
        types: Vec::new(),
        headers: Vec::new(),
        min_priority: Priority::Low,
        max_in_flight: 10_000,
        ack_wait: Duration::from_secs(30),
        max_deliveries: 5,
        backoff: Vec::new(),
        dead_letter_subject: "sys.deadletter".into(),
        ack_policy: AckPolicy::Explicit,
        durable_name: None,
    }
}

async fn subscribe(bus: &Bus, filter: &str, group: Option<&str>) -> Subscription {
    bus.subscribe(options(filter, group), StartPosition::New)
        .await
        .unwrap()
}

fn event(subject: &str, id: &str) -> Event {
    Event {
        id: id.to_owned(),
        subject: subject.to_owned(),
        data: bytes::Bytes::from_static(b"x"),
        ..Event::default()
    }
}

/// Gives the buses time to exchange their interests.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Drains what arrives within `wait`.
async fn drain(sub: &mut Subscription, wait: Duration) -> Vec<Arc<Event>> {
    let mut out = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(wait, sub.rx.recv()).await {
        if let Outbound::Delivery(d) = message {
            out.push(d.event);
        }
    }
    out
}

#[tokio::test]
async fn test_a_subscriber_on_another_instance_gets_events_published_here() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    let mut on_a = subscribe(&a, "orders.*", None).await;
    let mut on_b = subscribe(&b, "orders.>", None).await;
    settle().await;
    for i in 0..10 {
        a.publish(event("orders.new", &format!("e{i}")))
            .await
            .unwrap();
    }
    let got_a = drain(&mut on_a, Duration::from_millis(100)).await;
    let got_b = drain(&mut on_b, Duration::from_millis(100)).await;
    assert_eq!(got_a.len(), 10);
    assert_eq!(got_b.len(), 10);
    assert_eq!(got_b[3].id, "e3", "order is kept per publisher");
    assert_eq!(a.counters().forwarded_out.get(), 10);
    assert_eq!(b.counters().forwarded_in.get(), 10);
}

#[tokio::test]
async fn test_a_queue_group_spread_over_instances_gets_each_event_once() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    let c = bus(&hub, "c");
    let mut w_a = subscribe(&a, "jobs.>", Some("workers")).await;
    let mut w_b1 = subscribe(&b, "jobs.>", Some("workers")).await;
    let mut w_b2 = subscribe(&b, "jobs.>", Some("workers")).await;
    // Another group and a plain subscriber on the same subjects get everything.
    let mut audit = subscribe(&c, "jobs.>", Some("audit")).await;
    let mut tap = subscribe(&c, "jobs.*", None).await;
    settle().await;
    for i in 0..300 {
        c.publish(event("jobs.run", &format!("j{i}")))
            .await
            .unwrap();
    }
    let wait = Duration::from_millis(100);
    let (na, nb1, nb2) = (
        drain(&mut w_a, wait).await.len(),
        drain(&mut w_b1, wait).await.len(),
        drain(&mut w_b2, wait).await.len(),
    );
    assert_eq!(na + nb1 + nb2, 300, "a={na} b1={nb1} b2={nb2}");
    // Weighted by members: b has two of the three.
    assert!((50..150).contains(&na), "a={na}");
    assert!(nb1 > 0 && nb2 > 0);
    assert_eq!(drain(&mut audit, wait).await.len(), 300);
    assert_eq!(drain(&mut tap, wait).await.len(), 300);
}

#[tokio::test]
async fn test_broadcast_reaches_every_member_on_every_instance() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    let mut g_a = subscribe(&a, "sys.broadcast.>", Some("g")).await;
    let mut g_b1 = subscribe(&b, "sys.broadcast.>", Some("g")).await;
    let mut g_b2 = subscribe(&b, "sys.broadcast.>", Some("g")).await;
    settle().await;
    a.publish(event("sys.broadcast.reload", "r1"))
        .await
        .unwrap();
    let wait = Duration::from_millis(100);
    assert_eq!(drain(&mut g_a, wait).await.len(), 1);
    assert_eq!(drain(&mut g_b1, wait).await.len(), 1);
    assert_eq!(drain(&mut g_b2, wait).await.len(), 1);
}

#[tokio::test]
async fn test_a_request_is_answered_by_a_responder_on_another_instance() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    assert!(matches!(
        a.request(event("svc.echo", ""), Duration::from_secs(1))
            .await,
        Err(EventBusError::NoResponders(_))
    ));
    let mut responder = subscribe(&b, "svc.echo", Some("echo")).await;
    settle().await;
    let serve = tokio::spawn(async move {
        while let Some(message) = responder.rx.recv().await {
            if let Outbound::Delivery(d) = message {
                let reply = Event {
                    data: d.event.data.clone(),
                    ..Event::default()
                };
                responder
                    .handle
                    .reply(d.delivery_id, reply, "b-responder")
                    .await
                    .unwrap();
            }
        }
    });
    let mut request = event("svc.echo", "");
    request.data = bytes::Bytes::from_static(b"ping");
    let (reply, responder) = a.request(request, Duration::from_secs(2)).await.unwrap();
    assert_eq!(&reply.data[..], b"ping");
    assert_eq!(responder, "b-responder");
    serve.abort();
}

#[tokio::test]
async fn test_a_departed_instance_gets_nothing_more_and_its_groups_move() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    let mut w_a = subscribe(&a, "jobs.>", Some("workers")).await;
    let _w_b = subscribe(&b, "jobs.>", Some("workers")).await;
    settle().await;
    hub.leave("b");
    settle().await;
    for i in 0..20 {
        a.publish(event("jobs.run", &format!("j{i}")))
            .await
            .unwrap();
    }
    assert_eq!(drain(&mut w_a, Duration::from_millis(100)).await.len(), 20);
    assert_eq!(a.counters().forwarded_out.get(), 0);
}

#[tokio::test]
async fn test_closing_the_last_remote_subscription_stops_forwarding() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    let on_b = subscribe(&b, "news.>", None).await;
    settle().await;
    a.publish(event("news.x", "n1")).await.unwrap();
    drop(on_b);
    settle().await;
    a.publish(event("news.x", "n2")).await.unwrap();
    assert_eq!(a.counters().forwarded_out.get(), 1);
    assert_eq!(a.counters().no_interest.get(), 1);
}

/// A backplane whose link to every other instance is full: it takes a forward by shedding an
/// older LOW one, and drops a LOW forward itself.
struct FullLink;

impl Backplane for FullLink {
    fn advertise(&self, _: Vec<Interest>) {}

    fn send(&self, _: &str, forward: Forward) -> Handed {
        if forward.event.priority == Priority::Low {
            Handed::Dropped
        } else {
            Handed::QueuedShedding(Priority::Low)
        }
    }
}

#[tokio::test]
async fn test_a_full_backplane_link_sheds_low_first_counts_it_and_advises() {
    let (tx, inbound) = tokio::sync::mpsc::channel(16);
    let a = Bus::with_cluster(
        BusConfig::new("a"),
        Arc::new(InMemoryLog::new(1000)),
        Arc::new(FullLink),
        inbound,
    );
    tx.send(Inbound::Interests {
        instance: "b".into(),
        interests: vec![Interest {
            filter: "jobs.>".into(),
            group: None,
            members: 1,
        }],
    })
    .await
    .unwrap();
    let mut advisories = subscribe(&a, "sys.advisory.eventbus.shed", None).await;
    settle().await;
    let mut low = event("jobs.x", "l1");
    low.priority = Priority::Low;
    a.publish(low).await.unwrap();
    let mut high = event("jobs.x", "h1");
    high.priority = Priority::High;
    a.publish(high).await.unwrap();
    let c = a.counters();
    let shed: Vec<u64> = c.forward_shed.iter().map(|n| n.get()).collect();
    assert_eq!(shed, [2, 0, 0, 0], "only LOW forwards were dropped");
    assert_eq!(c.forwarded_out.get(), 1);
    let got = drain(&mut advisories, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1, "one advisory a second at most");
    let data = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(data.contains("\"backplane\":\"sending\""), "{data}");
    assert!(data.contains("\"low\":2"), "{data}");
}

#[tokio::test]
async fn test_an_id_published_on_two_instances_is_delivered_once_and_order_is_kept() {
    let hub = InMemoryHub::new();
    let a = bus(&hub, "a");
    let b = bus(&hub, "b");
    let mut on_a = subscribe(&a, "pay.>", None).await;
    settle().await;
    let first = a.publish(event("pay.done", "order-7")).await.unwrap();
    let again = b.publish(event("pay.done", "order-7")).await.unwrap();
    assert!(!first.duplicate);
    assert!(
        again.duplicate,
        "the same id on another instance is a duplicate"
    );
    // Client ids and generated ids in one batch keep their publish order.
    let batch: Vec<Event> = (0..20)
        .map(|i| {
            event(
                "pay.more",
                &if i % 3 == 0 {
                    format!("c{i}")
                } else {
                    String::new()
                },
            )
        })
        .collect();
    let answers = a.publish_batch(batch).await;
    assert!(
        answers
            .iter()
            .all(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
    );
    let got = drain(&mut on_a, Duration::from_millis(200)).await;
    assert_eq!(got.iter().filter(|e| e.id == "order-7").count(), 1);
    let more: Vec<&str> = got
        .iter()
        .filter(|e| e.subject == "pay.more")
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(more.len(), 20);
    for i in (0..20).step_by(3) {
        assert_eq!(more[i], format!("c{i}"), "publish order kept: {more:?}");
    }
}
