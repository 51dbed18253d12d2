//! Reactive rules beyond one stimulus, with real processes (a scheduler with Redis and etcd,
//! an event bus, an example-agent): a cascade whose next step sees the task's output, a
//! fallback after a task that ended FAILED, correlations ("3 within a window", "A together
//! with B", "A not followed by B") and a delayed response cancelled by a later event.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_proto::rules::v1 as pb;
use agentmesh_tests::agentmesh::{AgentmeshProcess, binary};
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};
use tokio_stream::StreamExt as _;

type Rules = pb::rules_client::RulesClient<tonic::transport::Channel>;
type Bus = bus::event_bus_client::EventBusClient<tonic::transport::Channel>;

/// An example-agent process, killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stimulus(subject: &str) -> Option<pb::Stimulus> {
    Some(pb::Stimulus {
        subject: subject.into(),
        ..pb::Stimulus::default()
    })
}

fn publish(subject: &str, data: &str) -> Option<pb::response::Action> {
    Some(pb::response::Action::Publish(pb::PublishAction {
        subject: subject.into(),
        data: data.into(),
        content_type: "text/plain".into(),
        ..pb::PublishAction::default()
    }))
}

fn task(task_type: &str, payload: &str) -> Option<pb::response::Action> {
    Some(pb::response::Action::SubmitTask(pb::SubmitTaskAction {
        r#type: task_type.into(),
        payload: payload.into(),
        max_attempts: 1,
        ..pb::SubmitTaskAction::default()
    }))
}

fn secs(ms: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
    })
}

fn response(name: &str, action: Option<pb::response::Action>) -> pb::Response {
    pb::Response {
        name: name.into(),
        action,
        ..pb::Response::default()
    }
}

fn rule(name: &str, subject: &str, responses: Vec<pb::Response>) -> pb::Rule {
    pb::Rule {
        name: name.into(),
        stimulus: stimulus(subject),
        responses,
        ..pb::Rule::default()
    }
}

fn correlated(key: &str, window_ms: i64) -> pb::Correlation {
    pb::Correlation {
        key: key.into(),
        window: secs(window_ms),
        ..pb::Correlation::default()
    }
}

/// The rules under test; every stimulus is under `in.`, every response under `out.`.
fn rules() -> Vec<pb::Rule> {
    // A task, then (when it succeeded) an event carrying its output; a task that fails, then
    // its fallback with the task's state.
    let mut work = response("work", task("echo", "echoed ${data.id}"));
    work.when = r#"data.kind == "echo""#.into();
    work.then = vec![response(
        "report",
        publish("out.jobs.done", "${data.id}=${output}"),
    )];
    let mut risky = response("risky", task("fail", "on purpose"));
    risky.when = r#"data.kind == "fail""#.into();
    risky.then = vec![response("never", publish("out.jobs.done", "not reached"))];
    risky.fallback = Some(Box::new(response(
        "rescue",
        publish("out.jobs.failed", "${data.id}=${output.state}"),
    )));
    let cascade = rule("jobs", "in.jobs", vec![work, risky]);

    let mut lockout = rule(
        "lockout",
        "in.logins.failed",
        vec![response(
            "lock",
            publish(
                "out.lockout",
                "${correlation.key}:${correlation.count}:${size(correlation.events)}",
            ),
        )],
    );
    lockout.correlation = Some(pb::Correlation {
        count: 3,
        ..correlated("data.user", 5000)
    });

    let mut complete = rule(
        "complete",
        "in.orders.paid",
        vec![response(
            "done",
            publish("out.complete", "${correlation.key}"),
        )],
    );
    complete.correlation = Some(pb::Correlation {
        together_with: stimulus("in.orders.shipped"),
        ..correlated("data.order", 5000)
    });

    let mut abandoned = rule(
        "abandoned",
        "in.carts.opened",
        vec![response("nudge", publish("out.abandoned", "${data.cart}"))],
    );
    abandoned.correlation = Some(pb::Correlation {
        not_followed_by: stimulus("in.carts.checkout"),
        ..correlated("data.cart", 1500)
    });

    let mut remind = response("remind", publish("out.reminder", "${data.user}"));
    remind.delay = secs(1500);
    remind.cancel = Some(pb::Cancel {
        stimulus: stimulus("in.trials.converted"),
        key: "data.user".into(),
    });
    let trials = rule("trials", "in.trials.started", vec![remind]);

    // Last: once it fires, the engine has loaded every rule above (all under its `in.>`
    // subscription).
    let mut probe = rule(
        "probe",
        "in.>",
        vec![response("p", publish("out.probe", ""))],
    );
    probe.condition = r#"event.type == "probe""#.into();
    vec![cascade, lockout, complete, abandoned, trials, probe]
}

fn event(subject: &str, data: &str) -> bus::PublishRequest {
    bus::PublishRequest {
        event: Some(bus::Event {
            subject: subject.into(),
            r#type: "test".into(),
            content_type: "application/json".into(),
            data: data.as_bytes().to_vec(),
            ..bus::Event::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cascades_fallbacks_correlations_and_cancels_fire_as_written() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let redis = RedisServer::start().await?;
    let endpoint = etcd.endpoint();
    let bus_process =
        AgentmeshProcess::serve_eventbus(Some(&redis.url()), Some(&endpoint), &[]).await?;
    let scheduler =
        AgentmeshProcess::serve("scheduler", Some(&redis.url()), Some(&endpoint), &[]).await?;
    let _agent = Agent(
        Command::new(binary("example-agent")?)
            .args([
                "--scheduler",
                &format!("http://{}", scheduler.grpc_addr),
                "--id",
                "rules-agent",
                "--capacity",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut b = Bus::connect(format!("http://{}", bus_process.grpc_addr)).await?;
    let mut r = Rules::connect(format!("http://{}", scheduler.grpc_addr)).await?;
    wait_until(Duration::from_secs(15), "the scheduler leads", || {
        let mut r = r.clone();
        async move { r.list_rules(pb::ListRulesRequest {}).await.is_ok() }
    })
    .await?;
    for rule in rules() {
        r.put_rule(pb::PutRuleRequest {
            rule: Some(rule),
            ..pb::PutRuleRequest::default()
        })
        .await?;
    }
    // Everything the rules publish.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: "out.>".into(),
            max_in_flight: 1000,
            ack_policy: bus::AckPolicy::None as i32,
            ..bus::SubscribeOpen::default()
        })),
    })
    .await?;
    let mut out = b
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _ = out.next().await;
    let mut n = 0;
    wait_until(
        Duration::from_secs(15),
        "the engine loaded the rules",
        || {
            n += 1;
            let (mut r, mut b) = (r.clone(), b.clone());
            async move {
                let mut probe = event("in.probe", "{}");
                probe.event.as_mut().expect("event").r#type = "probe".into();
                probe.event.as_mut().expect("event").id = format!("probe-{n}");
                let _ = b.publish(probe).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.get_rule_stats(pb::GetRuleStatsRequest {
                    name: "probe".into(),
                })
                .await
                .is_ok_and(|s| s.into_inner().stats.first().is_some_and(|s| s.fired > 0))
            }
        },
    )
    .await?;

    let started = Instant::now();
    for (subject, data) in [
        ("in.jobs", r#"{"id": "j-1", "kind": "echo"}"#),
        ("in.jobs", r#"{"id": "j-2", "kind": "fail"}"#),
        // u-1 fails twice (no lockout), u-2 three times (one lockout).
        ("in.logins.failed", r#"{"user": "u-1"}"#),
        ("in.logins.failed", r#"{"user": "u-2"}"#),
        ("in.logins.failed", r#"{"user": "u-1"}"#),
        ("in.logins.failed", r#"{"user": "u-2"}"#),
        ("in.logins.failed", r#"{"user": "u-2"}"#),
        // o-1 shipped then paid (complete); o-2 only paid.
        ("in.orders.shipped", r#"{"order": "o-1"}"#),
        ("in.orders.paid", r#"{"order": "o-2"}"#),
        ("in.orders.paid", r#"{"order": "o-1"}"#),
        // c-1 checked out in time; c-2 abandoned.
        ("in.carts.opened", r#"{"cart": "c-1"}"#),
        ("in.carts.opened", r#"{"cart": "c-2"}"#),
        ("in.carts.checkout", r#"{"cart": "c-1"}"#),
        // t-1 converts before its reminder; t-2 gets it.
        ("in.trials.started", r#"{"user": "t-1"}"#),
        ("in.trials.started", r#"{"user": "t-2"}"#),
        ("in.trials.converted", r#"{"user": "t-1"}"#),
    ] {
        b.publish(event(subject, data)).await?;
    }

    let expected: BTreeMap<String, Vec<String>> = [
        ("out.jobs.done", vec!["j-1=echoed j-1"]),
        ("out.jobs.failed", vec!["j-2=FAILED"]),
        ("out.lockout", vec!["u-2:3:3"]),
        ("out.complete", vec!["o-1"]),
        ("out.abandoned", vec!["c-2"]),
        ("out.reminder", vec!["t-2"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Until everything expected arrived, then 2 s more: nothing else may come.
    let mut settle: Option<Instant> = None;
    while settle.is_none_or(|at| at.elapsed() < Duration::from_secs(2)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited 30 s; saw {seen:?}; scheduler log:\n{}",
            scheduler.logs()
        );
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), out.next()).await
        else {
            continue;
        };
        let Some(bus::subscribe_response::Kind::Deliveries(batch)) = message?.kind else {
            continue;
        };
        for delivery in batch.deliveries {
            let e = delivery.event.expect("event");
            if e.subject == "out.probe" {
                continue;
            }
            seen.entry(e.subject.clone())
                .or_default()
                .push(String::from_utf8_lossy(&e.data).into_owned());
        }
        if settle.is_none()
            && expected
                .iter()
                .all(|(k, v)| seen.get(k).is_some_and(|s| s.len() >= v.len()))
        {
            settle = Some(Instant::now());
        }
    }
    assert_eq!(seen, expected, "each rule fired exactly as written");

    let stats: BTreeMap<String, pb::RuleStats> = r
        .get_rule_stats(pb::GetRuleStatsRequest::default())
        .await?
        .into_inner()
        .stats
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    assert_eq!(stats["lockout"].fired, 1);
    assert_eq!(stats["lockout"].correlating, 4, "{:?}", stats["lockout"]);
    assert_eq!(stats["complete"].fired, 1);
    assert_eq!(stats["abandoned"].cancelled, 1, "c-1's timeout");
    assert_eq!(stats["trials"].cancelled, 1, "t-1's reminder");
    assert_eq!(stats["trials"].delayed_pending, 0);
    assert_eq!(stats["jobs"].fallbacks, 1);
    assert_eq!(stats["jobs"].awaiting, 0);
    // The correlation state is in Redis: o-2's payment waits for its shipment.
    let mut redis_conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("agentmesh:scheduler:rules:corr:complete:*")
        .query_async(&mut redis_conn)
        .await?;
    assert_eq!(keys.len(), 1, "{keys:?}");
    Ok(())
}
