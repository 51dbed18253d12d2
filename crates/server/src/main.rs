//! `agentmesh`: runs agentmesh services.
//!
//! - `agentmesh serve ratelimit …` runs the named services, each on its own listeners with its
//!   own membership entry.
//! - `agentmesh dev` runs every built service in one process on loopback, with in-memory
//!   membership and state unless `--etcd`/`--redis` are given.
//! - `agentmesh probe ADDR [--service NAME]` is a gRPC health probe for containers: exit 0
//!   only when the service is SERVING.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_eventbus::EventBusError;
use agentmesh_eventbus::service::{EventBusArgs, EventBusDeps};
use agentmesh_membership::{EtcdMembership, EtcdMembershipConfig, InMemoryMembership, Membership};
use agentmesh_ratelimit::RateLimitError;
use agentmesh_ratelimit::service::{RateLimitArgs, RateLimitDeps};
use agentmesh_runtime::config::{
    ClusterArgs, TelemetryArgs, exit_config_error, parse_args_or_exit, parse_duration,
};
use agentmesh_runtime::server::{self, HostContext, RunningService, ServiceSpec};
use agentmesh_runtime::{Metrics, shutdown, telemetry};
use clap::{Parser, Subcommand, ValueEnum};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Exit code when a dependency (etcd) is unavailable at start (`EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "agentmesh",
    version,
    about = "agentmesh: infrastructure services for fleets of AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the named services in this process.
    Serve {
        /// Services to run.
        #[arg(required = true, value_enum)]
        services: Vec<ServiceName>,
        #[command(flatten)]
        ratelimit: RateLimitArgs,
        #[command(flatten)]
        eventbus: EventBusArgs,
    },
    /// Run every built service in one process on loopback (standalone unless --etcd is given).
    Dev {
        /// Address that listeners configured on 0.0.0.0 bind to instead.
        #[arg(long, default_value = "127.0.0.1")]
        bind_host: IpAddr,
        #[command(flatten)]
        ratelimit: RateLimitArgs,
        #[command(flatten)]
        eventbus: EventBusArgs,
    },
    /// Check a gRPC server's health; exit 0 only when SERVING.
    Probe {
        /// Server address, `host:port`.
        addr: String,
        /// Service name to check; empty = the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// The agentmesh services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServiceName {
    Eventbus,
    Scheduler,
    Cache,
    Ratelimit,
    Health,
}

fn main() -> ExitCode {
    let cli: Cli = parse_args_or_exit();
    if let Err(message) = cli.cluster.validate() {
        exit_config_error(&message);
    }
    let runtime = match agentmesh_runtime::executor::build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Probe {
                addr,
                service,
                timeout,
            } => probe(&addr, &service, timeout).await,
            Command::Serve {
                services,
                ratelimit,
                eventbus,
            } => {
                let args = ServiceArgs {
                    ratelimit,
                    eventbus,
                };
                serve(&cli.cluster, &cli.telemetry, &services, &args, None).await
            }
            Command::Dev {
                bind_host,
                ratelimit,
                eventbus,
            } => {
                let args = ServiceArgs {
                    ratelimit,
                    eventbus,
                };
                serve(
                    &cli.cluster,
                    &cli.telemetry,
                    &[ServiceName::Eventbus, ServiceName::Ratelimit],
                    &args,
                    Some(bind_host),
                )
                .await
            }
        }
    })
}

/// Settings of every built service.
struct ServiceArgs {
    ratelimit: RateLimitArgs,
    eventbus: EventBusArgs,
}

/// Rebinds an unspecified listen IP to `host` (for `dev`).
fn rebind(addr: SocketAddr, host: Option<IpAddr>) -> SocketAddr {
    match host {
        Some(ip) if addr.ip().is_unspecified() => SocketAddr::new(ip, addr.port()),
        _ => addr,
    }
}

/// Membership, plus the etcd client and prefix other etcd users share (None in standalone).
async fn membership(
    cluster: &ClusterArgs,
) -> Result<(Arc<dyn Membership>, Option<(etcd_client::Client, String)>), String> {
    if cluster.etcd_endpoints.is_empty() {
        tracing::info!("no etcd configured: in-memory membership (standalone)");
        return Ok((Arc::new(InMemoryMembership::default()), None));
    }
    let config = EtcdMembershipConfig {
        endpoints: cluster.etcd_endpoints.clone(),
        prefix: cluster.etcd_prefix.clone(),
        lease_ttl: cluster.lease_ttl,
        connect_timeout: Duration::from_secs(3),
    };
    let membership = EtcdMembership::connect(config).await.map_err(|e| {
        format!(
            "cannot reach etcd at {}: {e}",
            cluster.etcd_endpoints.join(",")
        )
    })?;
    let etcd = (membership.client().clone(), cluster.etcd_prefix.clone());
    Ok((Arc::new(membership), Some(etcd)))
}

async fn serve(
    cluster: &ClusterArgs,
    telemetry_args: &TelemetryArgs,
    services: &[ServiceName],
    args: &ServiceArgs,
    bind_host: Option<IpAddr>,
) -> ExitCode {
    let guard = match telemetry::init(telemetry_args) {
        Ok(guard) => guard,
        Err(e) => exit_config_error(&e.to_string()),
    };
    let metrics = Metrics::new();
    let (membership, etcd) = match membership(cluster).await {
        Ok(m) => m,
        Err(message) => {
            eprintln!("error: {message}");
            guard.shutdown().await;
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let deps = RateLimitDeps {
        metrics: metrics.clone(),
        membership: membership.clone(),
        etcd,
        redis_url: cluster.redis_url().map(str::to_owned),
    };
    let eventbus_deps = EventBusDeps {
        metrics: metrics.clone(),
        redis_url: cluster.redis_url().map(str::to_owned),
        membership: membership.clone(),
    };
    let mut specs: Vec<ServiceSpec> = Vec::new();
    for service in dedup(services) {
        match service {
            ServiceName::Eventbus => match args.eventbus.build(&eventbus_deps).await {
                Ok(mut spec) => {
                    spec.grpc_listen = rebind(spec.grpc_listen, bind_host);
                    spec.admin_listen = rebind(spec.admin_listen, bind_host);
                    specs.push(spec);
                }
                Err(EventBusError::Unavailable(message)) => {
                    eprintln!("error: eventbus: {message}");
                    guard.shutdown().await;
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
                Err(e) => exit_config_error(&format!("eventbus: {e}")),
            },
            ServiceName::Ratelimit => match args.ratelimit.build(&deps).await {
                Ok(mut spec) => {
                    spec.grpc_listen = rebind(spec.grpc_listen, bind_host);
                    spec.admin_listen = rebind(spec.admin_listen, bind_host);
                    specs.push(spec);
                }
                Err(RateLimitError::Unavailable(message)) => {
                    eprintln!("error: ratelimit: {message}");
                    guard.shutdown().await;
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
                Err(e) => exit_config_error(&format!("ratelimit: {e}")),
            },
            other => exit_config_error(&format!(
                "service {:?} is not built yet in agentmesh {}; available: eventbus, ratelimit",
                format!("{other:?}").to_lowercase(),
                env!("CARGO_PKG_VERSION")
            )),
        }
    }
    let ctx = HostContext {
        metrics,
        membership,
        advertise_host: cluster.advertise_host.clone(),
        zone: cluster.zone.clone(),
        shutdown_grace: cluster.shutdown_grace,
    };
    let stop = shutdown::on_signal();
    let mut running: Vec<RunningService> = Vec::new();
    let mut code = ExitCode::SUCCESS;
    for spec in specs {
        match server::start(spec, &ctx, &stop).await {
            Ok(service) => running.push(service),
            Err(e) => {
                eprintln!("error: {e}");
                code = ExitCode::from(EXIT_UNAVAILABLE);
                stop.cancel();
                break;
            }
        }
    }
    for service in running {
        if let Err(e) = service.wait().await {
            tracing::error!(error = %e, "service failed");
            code = ExitCode::FAILURE;
            stop.cancel();
        }
    }
    guard.shutdown().await;
    code
}

fn dedup(services: &[ServiceName]) -> Vec<ServiceName> {
    let mut out: Vec<ServiceName> = Vec::new();
    for s in services {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}

async fn probe(addr: &str, service: &str, timeout: Duration) -> ExitCode {
    let check = async {
        let endpoint =
            agentmesh_runtime::client::endpoint(addr, &agentmesh_runtime::ClientConfig::default())
                .map_err(|e| e.to_string())?
                .timeout(timeout)
                .connect_timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok::<i32, String>(response.into_inner().status)
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(status)) if status == ServingStatus::Serving as i32 => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
            println!("{name}");
            ExitCode::FAILURE
        }
        Ok(Err(message)) => {
            println!("error: {message}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("error: no answer from {addr} within {timeout:?}");
            ExitCode::FAILURE
        }
    }
}
