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

use agentmesh_membership::{EtcdMembership, EtcdMembershipConfig, InMemoryMembership, Membership};
use agentmesh_runtime::audit::Auditor;
use agentmesh_runtime::bus_out::{BusPublisher, Unreachable};
use agentmesh_runtime::config::{
    AuthArgs, ClusterArgs, TelemetryArgs, exit_config_error, parse_args_or_exit, parse_duration,
};
use agentmesh_runtime::server::{self, HostContext, RunningService, ServiceSpec};
use agentmesh_runtime::service::{BuildError, EtcdHandle, HostDeps, Service};
use agentmesh_runtime::tls::TlsArgs;
use agentmesh_runtime::{Metrics, shutdown, telemetry};
use clap::{Parser, Subcommand};

/// Declares the services this binary runs: their flags (flattened into `serve` and `dev`),
/// their names, and the list every command works from.
macro_rules! services {
    ($($name:ident: $args:ty),+ $(,)?) => {
        /// Settings of every service this binary runs.
        #[derive(clap::Args)]
        struct ServiceSettings {
            $(
                #[command(flatten)]
                $name: $args,
            )+
        }

        impl ServiceSettings {
            /// Every service's name, in the list's order.
            const NAMES: &'static [&'static str] = &[$(stringify!($name)),+];

            /// Every service, in the list's order.
            fn all(&self) -> Vec<&dyn Service> {
                vec![$(&self.$name as &dyn Service),+]
            }
        }
    };
}

// The services this binary runs: a new service is its crate plus one line here.
services! {
    cache: agentmesh_cache::service::CacheArgs,
    eventbus: agentmesh_eventbus::service::EventBusArgs,
    health: agentmesh_health::service::HealthArgs,
    ratelimit: agentmesh_ratelimit::service::RateLimitArgs,
    scheduler: agentmesh_scheduler::service::SchedulerArgs,
}
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
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the named services in this process.
    Serve {
        /// ServiceSettings to run.
        #[arg(required = true, value_parser = service_name)]
        services: Vec<String>,
        #[command(flatten)]
        settings: ServiceSettings,
    },
    /// Run every built service in one process on loopback (standalone unless --etcd is given).
    Dev {
        /// Address that listeners configured on 0.0.0.0 bind to instead.
        #[arg(long, default_value = "127.0.0.1")]
        bind_host: IpAddr,
        #[command(flatten)]
        settings: ServiceSettings,
    },
    /// List the services this binary runs: name, default gRPC and admin ports, listen flags.
    Services {
        #[command(flatten)]
        settings: ServiceSettings,
    },
    /// Check a gRPC server's health; exit 0 only when SERVING.
    Probe {
        /// Server address, `host:port` (container health checks set `AGENTMESH_PROBE_ADDR`).
        #[arg(env = "AGENTMESH_PROBE_ADDR")]
        addr: String,
        /// Service name to check; empty = the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
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
    agentmesh_runtime::tls::install_crypto_provider();
    if let Err(e) = cli.tls.install_client() {
        exit_config_error(&e);
    }
    runtime.block_on(async move {
        match cli.command {
            Command::Probe {
                addr,
                service,
                timeout,
            } => probe(&addr, &service, timeout).await,
            Command::Serve { services, settings } => {
                let chosen: Vec<&dyn Service> = settings
                    .all()
                    .into_iter()
                    .filter(|s| services.iter().any(|name| name == s.name()))
                    .collect();
                serve(
                    &cli.cluster,
                    &cli.telemetry,
                    &cli.auth,
                    &cli.tls,
                    &chosen,
                    None,
                )
                .await
            }
            Command::Dev {
                bind_host,
                settings,
            } => {
                serve(
                    &cli.cluster,
                    &cli.telemetry,
                    &cli.auth,
                    &cli.tls,
                    &settings.all(),
                    Some(bind_host),
                )
                .await
            }
            Command::Services { settings } => {
                list_services(&settings.all());
                ExitCode::SUCCESS
            }
        }
    })
}

/// Fetches a JWKS URL and installs its keys; the number of keys.
async fn fetch_jwks(
    verifier: &agentmesh_runtime::auth::Verifier,
    url: &str,
) -> Result<usize, String> {
    let (code, body) = agentmesh_runtime::scrape::get(url, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("HTTP {code}"));
    }
    verifier.set_jwks(&body)
}

/// The keys before serving: a few tries over about 10 s (the issuer may be starting too).
async fn first_jwks(verifier: &agentmesh_runtime::auth::Verifier, url: &str) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..10 {
        match fetch_jwks(verifier, url).await {
            Ok(keys) => {
                tracing::info!(url, keys, "JWKS fetched");
                return Ok(());
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last)
}

/// The shortest time between two fetches of a JWKS URL caused by unknown keys.
const JWKS_EARLY_MIN: Duration = Duration::from_secs(30);

/// Fetches the JWKS URL every `every`, and early when a token names an unknown key (at most
/// every 30 s): keys rotated at the issuer are picked up without a restart.
fn spawn_jwks_url_refresh(
    verifier: Arc<agentmesh_runtime::auth::Verifier>,
    url: String,
    every: Duration,
) {
    tokio::spawn(async move {
        let mut last = tokio::time::Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticks.tick().await;
            let due = last.elapsed() >= every;
            let early = last.elapsed() >= JWKS_EARLY_MIN.min(every) && verifier.take_unknown_key();
            if !due && !early {
                continue;
            }
            last = tokio::time::Instant::now();
            match fetch_jwks(&verifier, &url).await {
                Ok(keys) => tracing::debug!(url, keys, early, "JWKS fetched"),
                Err(e) => {
                    tracing::warn!(url, error = %e, "JWKS URL unusable; keeping the previous keys");
                }
            }
        }
    });
}

/// How often the JWKS file is checked for new keys.
const JWKS_REFRESH: Duration = Duration::from_secs(10);

/// Re-reads the JWKS file when it changes, so keys rotate without a restart.
fn spawn_jwks_refresh(verifier: Arc<agentmesh_runtime::auth::Verifier>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(JWKS_REFRESH);
        loop {
            ticks.tick().await;
            match verifier.refresh() {
                Ok(true) => tracing::info!("JWKS file changed: keys reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS file unusable; keeping the previous keys");
                }
            }
        }
    });
}

/// A service name of [`ServiceSettings::NAMES`].
fn service_name(name: &str) -> Result<String, String> {
    if ServiceSettings::NAMES.contains(&name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not a service agentmesh {} runs (not built yet, or misspelled); available: {}",
            env!("CARGO_PKG_VERSION"),
            ServiceSettings::NAMES.join(", ")
        ))
    }
}

/// Prints one line per service: name, default gRPC and admin ports, and the listen flags.
fn list_services(services: &[&dyn Service]) {
    for service in services {
        let (grpc, admin) = service.default_ports();
        let name = service.name();
        println!("{name} {grpc} {admin} --{name}-listen --{name}-admin-listen");
    }
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
) -> Result<(Arc<dyn Membership>, Option<EtcdHandle>), String> {
    if cluster.etcd_endpoints.is_empty() {
        tracing::info!("no etcd configured: in-memory membership (standalone)");
        return Ok((Arc::new(InMemoryMembership::default()), None));
    }
    let config = EtcdMembershipConfig {
        endpoints: cluster.etcd_endpoints.clone(),
        prefix: cluster.etcd_prefix.clone(),
        lease_ttl: cluster.lease_ttl,
        connect_timeout: Duration::from_secs(3),
        tls: cluster.etcd_tls()?,
    };
    let membership = EtcdMembership::connect(config).await.map_err(|e| {
        format!(
            "cannot reach etcd at {}: {e}",
            cluster.etcd_endpoints.join(",")
        )
    })?;
    let etcd = EtcdHandle {
        client: membership.client().clone(),
        prefix: cluster.etcd_prefix.clone(),
    };
    Ok((Arc::new(membership), Some(etcd)))
}

async fn serve(
    cluster: &ClusterArgs,
    telemetry_args: &TelemetryArgs,
    auth_args: &AuthArgs,
    tls_args: &TlsArgs,
    services: &[&dyn Service],
    bind_host: Option<IpAddr>,
) -> ExitCode {
    let guard = match telemetry::init(telemetry_args) {
        Ok(guard) => guard,
        Err(e) => exit_config_error(&e.to_string()),
    };
    let (verifier, client_token) = match (
        auth_args.verifier(tls_args.client_certificates()),
        auth_args.client_token(),
    ) {
        (Ok(v), Ok(t)) => (v, t),
        (Err(e), _) | (_, Err(e)) => exit_config_error(&e),
    };
    let (server_tls, admin_tls) = match (tls_args.server(), tls_args.admin()) {
        (Ok(grpc), Ok(admin)) => (grpc, admin),
        (Err(e), _) | (_, Err(e)) => exit_config_error(&e),
    };
    if server_tls.is_some() {
        tracing::info!(client_certificates = ?tls_args.client_auth, "TLS on every gRPC port");
    }
    match &verifier {
        None => tracing::warn!(
            "AUTH IS OFF: every caller can do everything on every port (development only; run production with --auth required)"
        ),
        Some(verifier) => {
            tracing::info!("auth required: every call but grpc.health.v1 needs a bearer token");
            spawn_jwks_refresh(verifier.clone());
            if let Some(url) = &auth_args.jwks_url {
                if let Err(e) = first_jwks(verifier, url).await {
                    eprintln!("error: --auth-jwks-url {url}: {e}");
                    guard.shutdown().await;
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
                spawn_jwks_url_refresh(verifier.clone(), url.clone(), auth_args.jwks_refresh);
            }
        }
    }
    let metrics = Metrics::new();
    let (membership, etcd) = match membership(cluster).await {
        Ok(m) => m,
        Err(message) => {
            eprintln!("error: {message}");
            guard.shutdown().await;
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    metrics.set_feature("etcd", etcd.is_some());
    metrics.set_feature("redis", cluster.redis_url().is_some());
    metrics.set_feature(
        "otlp_export",
        telemetry_args
            .otlp_endpoint
            .as_deref()
            .is_some_and(|e| !e.is_empty()),
    );
    let deps = HostDeps {
        metrics: metrics.clone(),
        membership: membership.clone(),
        etcd,
        redis_url: cluster.redis_url().map(str::to_owned),
        client_token,
    };
    let mut specs: Vec<ServiceSpec> = Vec::new();
    for service in services {
        match service.build(&deps).await {
            Ok(mut spec) => {
                spec.grpc_listen = rebind(spec.grpc_listen, bind_host);
                spec.admin_listen = rebind(spec.admin_listen, bind_host);
                specs.push(spec);
            }
            Err(BuildError::Unavailable(message)) => {
                eprintln!("error: {}: {message}", service.name());
                guard.shutdown().await;
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
            Err(BuildError::Config(message)) => {
                exit_config_error(&format!("{}: {message}", service.name()));
            }
        }
    }
    let served: Vec<_> = specs
        .iter()
        .flat_map(|s| s.access.iter().cloned())
        .collect();
    let role_overrides = match auth_args.role_overrides(&served) {
        Ok(overrides) => overrides,
        Err(e) => exit_config_error(&e),
    };
    let audit = start_audit(&deps, cluster.advertise_host.as_deref()).await;
    let ctx = HostContext {
        metrics,
        membership,
        advertise_host: cluster.advertise_host.clone(),
        zone: cluster.zone.clone(),
        shutdown_grace: cluster.shutdown_grace,
        auth: verifier,
        audit: Some(audit),
        role_overrides: Arc::new(role_overrides),
        admin_access: auth_args.admin_access(),
        tls: server_tls,
        admin_tls,
        certificates: tls_args.client_certificates().then(|| {
            Arc::new(agentmesh_runtime::tls::CertificateIdentities::new(
                &tls_args.trust_domain,
            ))
        }),
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

/// The audit trail of this process: log lines, and events on `sys.audit.>` through the event
/// bus members (kept in a bounded queue while none is reachable).
async fn start_audit(deps: &HostDeps, advertise_host: Option<&str>) -> Arc<Auditor> {
    let source = format!(
        "agentmesh/{}/{}",
        advertise_host.unwrap_or("local"),
        std::process::id()
    );
    let dropped = prometheus::IntCounter::new(
        "agentmesh_audit_events_dropped_total",
        "Audit events not published on sys.audit.> (the queue of 10,000 was full, or the \
         event bus refused them); the audit log lines are written regardless.",
    )
    .and_then(|c| {
        deps.metrics
            .registry()
            .register(Box::new(c.clone()))
            .map(|()| c)
    });
    let buses = agentmesh_runtime::peers::PeerSet::watch(
        deps.membership.as_ref(),
        "eventbus",
        &source,
        agentmesh_runtime::ClientConfig {
            bearer: deps.client_token.clone(),
            ..agentmesh_runtime::ClientConfig::default()
        },
        deps.metrics.clone(),
    )
    .await;
    let publisher = match (buses, dropped) {
        (Ok(buses), Ok(dropped)) => Some(BusPublisher::start(
            buses,
            source.clone(),
            dropped,
            Unreachable::Keep,
        )),
        (Err(e), _) => {
            tracing::warn!(error = %e, "audit events will not be published (cannot watch event bus members); audit log lines only");
            None
        }
        (_, Err(e)) => {
            tracing::warn!(error = %e, "audit events will not be published (metrics); audit log lines only");
            None
        }
    };
    Arc::new(Auditor::new(source, publisher))
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn test_the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_every_service_listens_on_its_named_flags_and_default_ports() {
        let cli = Cli::try_parse_from(["agentmesh", "services"]).unwrap();
        let Command::Services { settings } = cli.command else {
            panic!("services")
        };
        for service in settings.all() {
            let (grpc, admin) = service.default_ports();
            assert_eq!(service.listen().0.port(), grpc, "{}", service.name());
            assert_eq!(service.listen().1.port(), admin, "{}", service.name());
            let name = service.name();
            let flags = [
                format!("--{name}-listen"),
                "127.0.0.1:1".to_owned(),
                format!("--{name}-admin-listen"),
                "127.0.0.1:2".to_owned(),
            ];
            let cli = Cli::try_parse_from(
                ["agentmesh", "services"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(flags),
            )
            .unwrap();
            let Command::Services { settings } = cli.command else {
                panic!("services")
            };
            let parsed = settings
                .all()
                .into_iter()
                .find(|s| s.name() == name)
                .unwrap();
            assert_eq!(
                (parsed.listen().0.port(), parsed.listen().1.port()),
                (1, 2),
                "{name}"
            );
        }
    }
}
