//! The health aggregator as a real process, watching real `agentmesh` processes through real
//! etcd and Redis: kill -9, SIGSTOP and SIGCONT, a clean shutdown, Redis stopped, maintenance,
//! `grpc.health.v1` List on every service, the HTTP endpoints, `meshctl status`, the status
//! page in headless Chromium, and bad input.

use std::time::{Duration, Instant};

use agentmesh_proto::grpc::health::v1 as grpc_health;
use agentmesh_proto::health::v1 as pb;
use agentmesh_tests::agentmesh::{AgentmeshProcess, http_get, run_binary};
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};
use nix::sys::signal::{Signal, kill};
use tonic::Code;

type Client = pb::health_aggregator_client::HealthAggregatorClient<tonic::transport::Channel>;

/// Checks every 500 ms with a 300 ms deadline, so the fault tests run quickly.
const FAST: &[&str] = &[
    "--health-check-interval",
    "500ms",
    "--health-check-timeout",
    "300ms",
];

async fn client(p: &AgentmeshProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{}", p.grpc_addr)).await?)
}

async fn components(c: &mut Client) -> anyhow::Result<Vec<pb::Component>> {
    Ok(c.get_cluster_health(pb::GetClusterHealthRequest::default())
        .await?
        .into_inner()
        .components)
}

async fn find(c: &mut Client, id: &str) -> Option<pb::Component> {
    components(c)
        .await
        .ok()?
        .into_iter()
        .find(|component| component.id == id)
}

async fn state_of(c: &mut Client, id: &str) -> pb::State {
    find(c, id).await.map_or(pb::State::Unknown, |c| c.state())
}

/// The component id of the instance serving on `p`'s gRPC port.
async fn instance_id(c: &mut Client, p: &AgentmeshProcess) -> anyhow::Result<String> {
    let addr = p.grpc_addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = components(c)
            .await?
            .into_iter()
            .find(|x| x.grpc_addr == addr);
        if let Some(found) = found {
            return Ok(found.id);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{addr} not discovered within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(
    c: &Client,
    id: &str,
    want: pb::State,
    timeout: Duration,
) -> anyhow::Result<()> {
    let what = format!("{id} {want:?}");
    wait_until(timeout, &what, || {
        let mut c = c.clone();
        async move { state_of(&mut c, id).await == want }
    })
    .await
}

/// Waits until `id` has left the aggregator's view.
async fn wait_gone(c: &Client, id: &str, what: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(10), what, || {
        let mut c = c.clone();
        async move { find(&mut c, id).await.is_none() }
    })
    .await
}

/// Two rate limiters and an aggregator (checking every 500 ms) on one etcd, the service UP;
/// the instances' component ids in the order of the processes.
struct Watched {
    _etcd: EtcdServer,
    limiters: [AgentmeshProcess; 2],
    health: AgentmeshProcess,
    client: Client,
    ids: [String; 2],
}

async fn two_limiters_watched() -> anyhow::Result<Watched> {
    let etcd = EtcdServer::start().await?;
    let endpoint = etcd.endpoint();
    let limiters = [
        AgentmeshProcess::serve("ratelimit", None, Some(&endpoint), &[]).await?,
        AgentmeshProcess::serve("ratelimit", None, Some(&endpoint), &[]).await?,
    ];
    let health = AgentmeshProcess::serve("health", None, Some(&endpoint), FAST).await?;
    let mut client = client(&health).await?;
    let ids = [
        instance_id(&mut client, &limiters[0]).await?,
        instance_id(&mut client, &limiters[1]).await?,
    ];
    wait_state(
        &client,
        "service/ratelimit",
        pb::State::Up,
        Duration::from_secs(10),
    )
    .await?;
    Ok(Watched {
        _etcd: etcd,
        limiters,
        health,
        client,
        ids,
    })
}

/// `meshctl doctor -o json` against an aggregator: its exit code and report.
fn doctor(grpc: &str, admin: &str) -> anyhow::Result<(i32, serde_json::Value)> {
    let (code, json, err) = run_binary(
        "meshctl",
        &[
            "doctor",
            "--addr",
            grpc,
            "--admin-addr",
            admin,
            "-o",
            "json",
        ],
    )?;
    let report = serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("{e}: {json}{err}"))?;
    Ok((code, report))
}

fn signal(p: &AgentmeshProcess, signal: Signal) {
    let _ = kill(p.pid(), signal);
}

#[tokio::test]
async fn test_kill9_sigstop_sigcont_and_clean_leave_are_seen_through_the_aggregator()
-> anyhow::Result<()> {
    let Watched {
        _etcd,
        limiters: [mut r1, r2],
        health,
        client: mut c,
        ids: [id1, id2],
    } = two_limiters_watched().await?;

    // Every service answers grpc.health.v1 List (gRFC A90).
    let mut hc =
        grpc_health::health_client::HealthClient::connect(format!("http://{}", r2.grpc_addr))
            .await?;
    let list = hc
        .list(grpc_health::HealthListRequest {})
        .await?
        .into_inner();
    for name in [
        "",
        "liveness",
        "readiness",
        "membership",
        "agentmesh.ratelimit.v1.RateLimiter",
    ] {
        assert!(
            list.statuses.contains_key(name),
            "List lacks {name:?}: {list:?}"
        );
    }

    // kill -9: the Watch stream breaks and the instance is DOWN at once.
    let mut watch = c
        .watch_cluster_health(pb::WatchClusterHealthRequest::default())
        .await?
        .into_inner();
    let first = watch.message().await?.expect("a snapshot first");
    assert!(first.snapshot);
    let killed = Instant::now();
    r1.kill9();
    let seen = loop {
        let update = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await??
            .expect("updates");
        if update
            .changed
            .iter()
            .any(|x| x.id == id1 && x.state() == pb::State::Down)
        {
            break killed.elapsed();
        }
    };
    assert!(seen < Duration::from_secs(2), "kill -9 seen after {seen:?}");
    let service = find(&mut c, "service/ratelimit")
        .await
        .expect("the service");
    assert_eq!(service.state(), pb::State::Degraded, "{service:?}");
    // Its lease expires (TTL 2 s): it leaves the view.
    wait_gone(&c, &id1, "the killed instance removed").await?;
    wait_state(
        &c,
        "service/ratelimit",
        pb::State::Up,
        Duration::from_secs(5),
    )
    .await?;

    // SIGSTOP: the stream stays open, the Checks time out: DOWN within fall × interval.
    let stopped = Instant::now();
    signal(&r2, Signal::SIGSTOP);
    wait_state(&c, &id2, pb::State::Down, Duration::from_secs(5)).await?;
    let hung = stopped.elapsed();
    assert!(hung < Duration::from_secs(3), "SIGSTOP seen after {hung:?}");
    assert_eq!(state_of(&mut c, "service/ratelimit").await, pb::State::Down);
    assert_eq!(state_of(&mut c, "cluster").await, pb::State::Down);
    let (code, body) = http_get(health.admin_addr, "/health").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"status\":\"DOWN\""), "{body}");
    let (code, _, _) = run_binary(
        "meshctl",
        &["status", "--addr", &health.grpc_addr.to_string()],
    )?;
    assert_eq!(code, 2, "meshctl status exits 2 while the cluster is DOWN");

    // SIGCONT: UP again after `rise` passing checks.
    signal(&r2, Signal::SIGCONT);
    wait_state(&c, &id2, pb::State::Up, Duration::from_secs(5)).await?;
    wait_state(&c, "cluster", pb::State::Up, Duration::from_secs(5)).await?;
    let (code, body) = http_get(health.admin_addr, "/health").await?;
    assert_eq!(code, 200, "{body}");
    let history = c
        .get_history(pb::GetHistoryRequest {
            component: id2.clone(),
            limit: 10,
        })
        .await?
        .into_inner()
        .transitions;
    let path: Vec<pb::State> = history.iter().rev().map(|t| t.to()).collect();
    assert_eq!(
        path,
        [pb::State::Up, pb::State::Down, pb::State::Up],
        "{history:?}"
    );
    assert!(history[1].cause.contains("Check"), "{history:?}");

    // A clean shutdown: removed, never reported DOWN.
    let before = history.len();
    r2.sigterm();
    wait_gone(&c, &id2, "the stopped instance removed").await?;
    let after = c
        .get_history(pb::GetHistoryRequest {
            component: id2.clone(),
            limit: 10,
        })
        .await?
        .into_inner()
        .transitions;
    assert_eq!(
        after.len(),
        before,
        "a clean leave is not a transition: {after:?}"
    );
    Ok(())
}

#[tokio::test]
async fn test_redis_stopped_degrades_its_dependents_with_redis_as_the_root_cause()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut redis = RedisServer::start().await?;
    let endpoint = etcd.endpoint();
    let url = redis.url();
    let _bus = AgentmeshProcess::serve("eventbus", Some(&url), Some(&endpoint), &[]).await?;
    let health = AgentmeshProcess::serve("health", Some(&url), Some(&endpoint), FAST).await?;
    let mut c = client(&health).await?;
    wait_state(&c, "cluster", pb::State::Up, Duration::from_secs(10)).await?;
    let etcd_check = find(&mut c, "dependency/etcd")
        .await
        .expect("etcd is checked");
    assert!(etcd_check.detail.contains("leader"), "{etcd_check:?}");

    redis.stop();
    wait_state(
        &c,
        "dependency/redis",
        pb::State::Down,
        Duration::from_secs(5),
    )
    .await?;
    let bus = find(&mut c, "service/eventbus").await.expect("the bus");
    assert_eq!(bus.state(), pb::State::Degraded, "{bus:?}");
    assert_eq!(bus.cause, "redis DOWN");
    let cluster = c
        .get_cluster_health(pb::GetClusterHealthRequest {
            omit_instances: true,
        })
        .await?
        .into_inner();
    assert!(
        cluster.summary.contains("eventbus DEGRADED: redis DOWN"),
        "{}",
        cluster.summary
    );
    let graph = c
        .get_dependency_graph(pb::GetDependencyGraphRequest {})
        .await?
        .into_inner();
    assert!(
        graph
            .edges
            .iter()
            .any(|e| e.from == "service/eventbus" && e.to == "dependency/redis")
    );

    redis.restart().await?;
    wait_state(&c, "cluster", pb::State::Up, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn test_maintenance_endpoints_and_bad_input() -> anyhow::Result<()> {
    let dev = AgentmeshProcess::dev().await?;
    let (grpc, admin) = dev.addrs["health"];
    let mut c = Client::connect(format!("http://{grpc}")).await?;
    wait_state(&c, "service/cache", pb::State::Up, Duration::from_secs(10)).await?;

    let held = c
        .set_maintenance(pb::SetMaintenanceRequest {
            component: "service/cache".into(),
            duration: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            reason: "upgrading".into(),
        })
        .await?
        .into_inner();
    assert_eq!(held.state(), pb::State::Maintenance);
    assert_eq!(held.maintenance_reason, "upgrading");
    let ended = c
        .set_maintenance(pb::SetMaintenanceRequest {
            component: "service/cache".into(),
            duration: None,
            reason: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(ended.state(), pb::State::Up);

    let e = c
        .set_maintenance(pb::SetMaintenanceRequest {
            component: "cluster".into(),
            duration: Some(prost_types::Duration {
                seconds: 30 * 24 * 3600,
                nanos: 0,
            }),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_details_bad_request(&e).expect("field violations");
    let fields: Vec<&str> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["component", "duration"]);
    let e = c
        .set_maintenance(pb::SetMaintenanceRequest {
            component: "service/nope".into(),
            duration: None,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_history(pb::GetHistoryRequest {
            component: "bogus".into(),
            limit: 5000,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .put_silence(pb::PutSilenceRequest {
            rule: "no spaces".into(),
            duration: None,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_details_bad_request(&e).expect("field violations");
    let fields: Vec<&str> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["rule", "duration"]);
    let e = c
        .delete_alert_rule(pb::DeleteAlertRuleRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The HTTP side: /health, /health/components, /optimizations, the page.
    let (code, body) = http_get(admin, "/health").await?;
    assert_eq!(code, 200, "{body}");
    let components: serde_json::Value =
        serde_json::from_str(&http_get(admin, "/health/components").await?.1)?;
    let ids: Vec<&str> = components["components"]
        .as_array()
        .expect("components")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    for service in ["cache", "eventbus", "health", "ratelimit", "scheduler"] {
        assert!(
            ids.contains(&format!("service/{service}").as_str()),
            "{ids:?}"
        );
    }
    wait_until(
        Duration::from_secs(15),
        "/optimizations scraped",
        || async move {
            http_get(admin, "/optimizations")
                .await
                .is_ok_and(|(_, body)| {
                    body.contains("\"otlp_export\"") && body.contains("\"0.1.0\"")
                })
        },
    )
    .await?;
    let (code, page) = http_get(admin, "/").await?;
    assert_eq!(code, 200);
    assert!(page.contains("<title>agentmesh status</title>"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from outside"
    );
    let (code, json, _) = run_binary(
        "meshctl",
        &["status", "--addr", &grpc.to_string(), "-o", "json"],
    )?;
    assert_eq!(code, 0, "{json}");
    let status: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(status["state"], "UP", "{json}");
    // `meshctl doctor` on a well cluster: every check passes (etcd, Redis and the trace check
    // are skipped standalone).
    let (code, doctor) = doctor(&grpc.to_string(), &admin.to_string())?;
    assert_eq!(code, 0, "{doctor}");
    assert_eq!(doctor["passed"], doctor["checked"], "{doctor}");
    let names: Vec<&str> = doctor["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["check"].as_str())
        .collect();
    for want in [
        "service scheduler UP",
        "one version across instances",
        "one trace across three services",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("cache/") && n.ends_with("clock")),
        "{names:?}"
    );
    Ok(())
}

/// Debian's Chromium, as `scripts/install-deps.sh` installs it.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|name| {
        std::process::Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test]
async fn test_the_status_page_shows_a_killed_instance_in_headless_chromium() -> anyhow::Result<()> {
    let Some(browser) = chromium() else {
        anyhow::bail!("chromium is not installed: run scripts/install-deps.sh");
    };
    let Watched {
        _etcd,
        limiters: [mut victim, _other],
        health,
        client: c,
        ids: [victim_id, _],
    } = two_limiters_watched().await?;
    victim.kill9();
    wait_state(&c, &victim_id, pb::State::Down, Duration::from_secs(5)).await?;

    let url = format!("http://{}/", health.admin_addr);
    let shot = std::env::temp_dir().join(format!("agentmesh-status-{}.png", std::process::id()));
    let run = |extra: &[String]| {
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--virtual-time-budget=4000".to_owned(),
            "--window-size=1200,1000".to_owned(),
        ];
        args.extend_from_slice(extra);
        args.push(url.clone());
        std::process::Command::new(browser).args(&args).output()
    };
    let dom = run(&["--dump-dom".to_owned()])?;
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let row = format!("data-component=\"{victim_id}\" data-state=\"DOWN\"");
    assert!(
        dom.contains(&row),
        "the page does not show {victim_id} DOWN:\n{dom}"
    );
    assert!(
        dom.contains("data-component=\"service/ratelimit\" data-state=\"DEGRADED\""),
        "{dom}"
    );
    assert!(dom.contains("Recent incidents"));
    // `meshctl doctor` fails on the DOWN instance and says what to do.
    let (code, doctor) = doctor(
        &health.grpc_addr.to_string(),
        &health.admin_addr.to_string(),
    )?;
    assert_eq!(code, 1, "{doctor}");
    let failed: Vec<&serde_json::Value> = doctor["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["result"] == "fail")
        .collect();
    assert!(
        failed
            .iter()
            .any(|c| c["check"] == "service ratelimit UP"
                && !c["fix"].as_str().unwrap_or("").is_empty()),
        "{doctor}"
    );
    let screenshot = run(&[format!("--screenshot={}", shot.display())])?;
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&screenshot.stderr)
    );
    eprintln!("status page screenshot: {}", shot.display());
    Ok(())
}
