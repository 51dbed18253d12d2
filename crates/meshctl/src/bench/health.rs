//! Health aggregator benchmarks:
//!
//! - `bench health-targets`: serves `grpc.health.v1` on `--count` ports in this process and
//!   registers each in etcd as an instance of `bench-target`, so an aggregator watching that
//!   etcd checks them all; with `--aggregator-metrics` it waits until the aggregator sees them
//!   UP and reports the aggregator's CPU (`process_cpu_seconds_total`) over `--duration`.
//! - `bench health-watch`: opens `--clients` WatchClusterHealth streams and measures how long
//!   each change (a maintenance toggle this command makes) takes to reach every one of them.
//! - `bench health-detect`: starts an `agentmesh serve ratelimit` process, waits until the
//!   aggregator has it UP, kills it with SIGKILL and measures the time until the aggregator's
//!   watch says DOWN; `--runs` times.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Chan as Channel;
use agentmesh_membership::{EtcdMembership, EtcdMembershipConfig, Member, Membership};
use agentmesh_proto::grpc::health::v1::health_check_response::ServingStatus;
use agentmesh_proto::health::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use agentmesh_runtime::health::HealthRegistry;
use agentmesh_runtime::scrape;
use anyhow::Context;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

type Client = pb::health_aggregator_client::HealthAggregatorClient<Channel>;

/// The service name the targets register under.
const TARGET_SERVICE: &str = "bench-target";

#[derive(clap::Args)]
pub(crate) struct TargetsBench {
    /// etcd endpoint the aggregator watches.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// Targets served and registered.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Lease TTL of each registration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// The aggregator's admin `/metrics` (`127.0.0.1:9105`): report its CPU once it sees every
    /// target UP, then stop. Without it, serve until interrupted.
    #[arg(long)]
    aggregator_metrics: Option<String>,
    /// The aggregator's gRPC address, to see the targets UP.
    #[arg(long, default_value = "http://127.0.0.1:7105")]
    aggregator: String,
    /// Measured time.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
}

#[derive(clap::Args)]
pub(crate) struct WatchBench {
    /// The aggregator's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7105")]
    addr: String,
    /// Watch streams.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Changes made (maintenance toggles).
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// The component toggled.
    #[arg(long, default_value = "service/bench-target")]
    component: String,
}

#[derive(clap::Args)]
pub(crate) struct DetectBench {
    /// The aggregator's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7105")]
    addr: String,
    /// etcd endpoint for the victims.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// The `agentmesh` binary.
    #[arg(long, default_value = "target/release/agentmesh")]
    agentmesh: String,
    /// Kills measured.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

async fn client(addr: &str) -> anyhow::Result<Client> {
    let channel = crate::connect(addr, Duration::from_secs(5), "the health aggregator").await?;
    Ok(Client::new(channel).max_decoding_message_size(256 << 20))
}

fn ms(d: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "microseconds")]
    let v = d as f64 / 1000.0;
    format!("{v:.1} ms")
}

fn summary(h: &Histogram<u64>) -> String {
    format!(
        "n {}  p50 {}  p90 {}  p99 {}  max {}",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

fn cpu_seconds(text: &str) -> Option<f64> {
    let parsed = scrape::parse(text).ok()?;
    Some(scrape::sum(&parsed, "process_cpu_seconds_total", &[]))
}

/// `bench health-targets`.
pub(crate) async fn targets(args: TargetsBench) -> anyhow::Result<ExitCode> {
    let membership = EtcdMembership::connect(EtcdMembershipConfig {
        endpoints: vec![args.etcd.clone()],
        prefix: "/agentmesh".to_owned(),
        lease_ttl: args.lease_ttl,
        connect_timeout: Duration::from_secs(3),
        tls: None,
    })
    .await
    .with_context(|| format!("cannot reach etcd at {}", args.etcd))?;
    let mut registrations = Vec::with_capacity(args.count);
    let started = Instant::now();
    for i in 0..args.count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let registry = HealthRegistry::new();
        registry.set("", ServingStatus::Serving);
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(registry.service())
                .serve_with_incoming(incoming),
        );
        let member = Member {
            service: TARGET_SERVICE.to_owned(),
            instance_id: format!("target-{i:05}"),
            grpc_addr: addr.to_string(),
            admin_addr: "127.0.0.1:9".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            zone: String::new(),
            started_at_ms: 0,
        };
        registrations.push(membership.register(member).await?);
    }
    eprintln!(
        "{} targets serving and registered in {:.1?}",
        args.count,
        started.elapsed()
    );
    let Some(metrics) = args.aggregator_metrics else {
        tokio::signal::ctrl_c().await?;
        return Ok(ExitCode::SUCCESS);
    };
    let mut aggregator = client(&args.aggregator).await?;
    let wait = Instant::now();
    loop {
        let health = aggregator
            .get_cluster_health(pb::GetClusterHealthRequest {
                omit_instances: true,
            })
            .await?
            .into_inner();
        let up = health
            .components
            .iter()
            .find(|c| c.id == format!("service/{TARGET_SERVICE}"))
            .map_or(0, |c| c.instances_up);
        if up as usize >= args.count {
            break;
        }
        anyhow::ensure!(
            wait.elapsed() < Duration::from_secs(120),
            "only {up} targets UP after 2 min"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "the aggregator sees all {} UP after {:.1?}; measuring {:?}",
        args.count,
        wait.elapsed(),
        args.duration
    );
    let url = format!("http://{metrics}/metrics");
    let (_, before) = crate::admin_get(&url, Duration::from_secs(5)).await?;
    let t0 = Instant::now();
    tokio::time::sleep(args.duration).await;
    let (_, after) = crate::admin_get(&url, Duration::from_secs(5)).await?;
    let used = cpu_seconds(&after).unwrap_or(0.0) - cpu_seconds(&before).unwrap_or(0.0);
    let cores = used / t0.elapsed().as_secs_f64();
    println!(
        "health aggregator watching {} instances (Watch stream + Check every interval each): {cores:.3} cores ({used:.2} CPU-s over {:.1?})",
        args.count,
        t0.elapsed()
    );
    drop(registrations);
    Ok(ExitCode::SUCCESS)
}

/// `bench health-watch`.
pub(crate) async fn watch(args: WatchBench) -> anyhow::Result<ExitCode> {
    let mut control = client(&args.addr).await?;
    // Streams share a few connections, as many clients behind a proxy would.
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(client(&args.addr).await?);
    }
    let sent_at = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let epoch = Instant::now();
    let ready = Arc::new(AtomicU64::new(0));
    for i in 0..args.clients {
        let mut c = channels[i % channels.len()].clone();
        let (sent_at, received, latencies, ready) = (
            sent_at.clone(),
            received.clone(),
            latencies.clone(),
            ready.clone(),
        );
        tokio::spawn(async move {
            let Ok(response) = c
                .watch_cluster_health(pb::WatchClusterHealthRequest {
                    after_revision: 0,
                    omit_instances: true,
                })
                .await
            else {
                return;
            };
            let mut stream = response.into_inner();
            let _snapshot = stream.message().await;
            ready.fetch_add(1, Ordering::Relaxed);
            while let Ok(Some(_update)) = stream.message().await {
                let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                let sent = sent_at.load(Ordering::Relaxed);
                let _ = latencies.lock().record(now.saturating_sub(sent).max(1));
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let wait = Instant::now();
    while (ready.load(Ordering::Relaxed) as usize) < args.clients {
        anyhow::ensure!(
            wait.elapsed() < Duration::from_secs(60),
            "streams did not open within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} watch streams open in {:.1?}",
        args.clients,
        wait.elapsed()
    );
    let clients = args.clients as u64;
    for i in 0..args.changes {
        let expected = clients * (i as u64 + 1);
        sent_at.store(
            u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let duration = if i % 2 == 0 { 3600 } else { 0 };
        control
            .set_maintenance(pb::SetMaintenanceRequest {
                component: args.component.clone(),
                duration: Some(prost_types::Duration {
                    seconds: duration,
                    nanos: 0,
                }),
                reason: "bench".to_owned(),
            })
            .await?;
        let t = Instant::now();
        while received.load(Ordering::Relaxed) < expected {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "change {i} reached {} of {clients} streams",
                received.load(Ordering::Relaxed) - clients * i as u64
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    println!(
        "WatchClusterHealth, {} streams, {} changes: change → every stream: {}",
        args.clients,
        args.changes,
        summary(&latencies.lock())
    );
    Ok(ExitCode::SUCCESS)
}

/// `bench health-detect`.
pub(crate) async fn detect(args: DetectBench) -> anyhow::Result<ExitCode> {
    let mut aggregator = client(&args.addr).await?;
    let mut latencies = Histogram::<u64>::new(3)?;
    for run in 0..args.runs {
        let known: std::collections::BTreeSet<String> = aggregator
            .get_cluster_health(pb::GetClusterHealthRequest::default())
            .await?
            .into_inner()
            .components
            .into_iter()
            .map(|c| c.id)
            .collect();
        let mut updates = aggregator
            .watch_cluster_health(pb::WatchClusterHealthRequest::default())
            .await?
            .into_inner();
        let mut child = std::process::Command::new(&args.agentmesh)
            .args([
                "serve",
                "ratelimit",
                "--etcd",
                &args.etcd,
                "--ratelimit-listen",
                "127.0.0.1:0",
                "--ratelimit-admin-listen",
                "127.0.0.1:0",
            ])
            .env("AGENTMESH_LEASE_TTL", "2s")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", args.agentmesh))?;
        // Wait for the new instance UP.
        let victim = loop {
            let update = tokio::time::timeout(Duration::from_secs(15), updates.message())
                .await
                .context("the new instance was not seen UP within 15 s")??
                .context("watch ended")?;
            if let Some(c) = update.changed.iter().find(|c| {
                c.id.starts_with("instance/ratelimit/")
                    && !known.contains(&c.id)
                    && c.state == pb::State::Up as i32
            }) {
                break c.id.clone();
            }
        };
        let killed = Instant::now();
        child.kill()?;
        loop {
            let update = tokio::time::timeout(Duration::from_secs(15), updates.message())
                .await
                .context("the kill was not seen within 15 s")??
                .context("watch ended")?;
            if update
                .changed
                .iter()
                .any(|c| c.id == victim && c.state == pb::State::Down as i32)
            {
                let took = u64::try_from(killed.elapsed().as_micros()).unwrap_or(u64::MAX);
                latencies.record(took.max(1))?;
                eprintln!("run {}: {}", run + 1, ms(took));
                break;
            }
        }
        let _ = child.wait();
    }
    println!(
        "kill -9 → aggregated state DOWN ({} runs): {}",
        args.runs,
        summary(&latencies)
    );
    Ok(ExitCode::SUCCESS)
}
