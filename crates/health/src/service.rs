//! Assembles the health aggregator for the host: settings (flags with environment fallbacks),
//! the aggregator, its checks (discovery from membership, etcd, Redis), the scrape for
//! `/optimizations`, the gRPC routes and the HTTP routes on the admin port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::health::v1::health_aggregator_server::SERVICE_NAME;
use agentmesh_runtime::config::{parse_duration, parse_socket_addr};
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use agentmesh_runtime::service::{BuildError, HostDeps, Service};
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::aggregator::Aggregator;
use crate::alerts::notify::{Notifier, Webhook};
use crate::alerts::store::{AlertStore, InMemoryAlertStore, RedisAlertStore};
use crate::alerts::{Alerting, parse_rules_file};
use crate::checks::instance::ProbeContext;
use crate::checks::optimizations::Optimizations;
use crate::checks::{deps, discovery, now_ms, spawn_tick};
use crate::config::HealthConfig;
pub use crate::config::NAME;
use crate::grpc::HealthGrpc;
use crate::metrics::HealthMetrics;

/// Health aggregator settings.
#[derive(Clone, Debug, clap::Args)]
pub struct HealthArgs {
    /// gRPC listen address of the health aggregator.
    #[arg(id = "health_listen", long = "health-listen", env = "AGENTMESH_HEALTH_LISTEN", default_value = "0.0.0.0:7105", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
    /// Admin HTTP listen address of the health aggregator: `/metrics`, `/livez`, `/readyz`,
    /// and the status page `/`, `/health`, `/health/components`, `/health/history`,
    /// `/optimizations`.
    #[arg(id = "health_admin_listen", long = "health-admin-listen", env = "AGENTMESH_HEALTH_ADMIN_LISTEN", default_value = "0.0.0.0:9105", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,
    /// Failed checks in a row before an instance or dependency is DOWN (1–10).
    #[arg(
        long = "health-fall",
        env = "AGENTMESH_HEALTH_FALL",
        default_value_t = 2
    )]
    pub fall: u32,
    /// Passing checks in a row before a DOWN instance or dependency is UP again (1–10).
    #[arg(
        long = "health-rise",
        env = "AGENTMESH_HEALTH_RISE",
        default_value_t = 2
    )]
    pub rise: u32,
    /// Fewer serving instances than this makes a service DOWN (else DEGRADED).
    #[arg(
        long = "health-min-serving",
        env = "AGENTMESH_HEALTH_MIN_SERVING",
        default_value_t = 1
    )]
    pub min_serving: u32,
    /// Instances each service should have, e.g. `ratelimit=3,eventbus=2`: fewer serving is
    /// DEGRADED, none is DOWN, also before any has registered.
    #[arg(
        long = "health-expect",
        env = "AGENTMESH_HEALTH_EXPECT",
        value_delimiter = ','
    )]
    pub expect: Vec<String>,
    /// Time between Checks of each instance and dependency (100ms–1m).
    #[arg(long = "health-check-interval", env = "AGENTMESH_HEALTH_CHECK_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// Deadline of one Check (at most the interval).
    #[arg(long = "health-check-timeout", env = "AGENTMESH_HEALTH_CHECK_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub check_timeout: Duration,
    /// How long an instance that reports NOT_SERVING has to leave membership before it is
    /// DOWN (a clean shutdown leaves within milliseconds).
    #[arg(long = "health-leave-grace", env = "AGENTMESH_HEALTH_LEAVE_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub leave_grace: Duration,
    /// Time between scrapes of every instance's `/metrics` (alert rules over metrics,
    /// `/optimizations`).
    #[arg(long = "health-scrape-interval", env = "AGENTMESH_HEALTH_SCRAPE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub scrape_interval: Duration,
    /// Alert rules file (TOML, `[[rule]]` tables; see the README). Rules are also managed
    /// through the API.
    #[arg(long = "health-rules", env = "AGENTMESH_HEALTH_RULES")]
    pub rules: Option<std::path::PathBuf>,
    /// Webhooks notified of alerts (`http[s]://host[:port]/path`, comma-separated).
    #[arg(
        long = "health-webhook",
        env = "AGENTMESH_HEALTH_WEBHOOKS",
        value_delimiter = ','
    )]
    pub webhooks: Vec<String>,
    /// Shared secret signing webhook bodies (`X-Agentmesh-Signature: sha256=<HMAC>`).
    #[arg(
        long = "health-webhook-secret",
        env = "AGENTMESH_HEALTH_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,
}

impl HealthArgs {
    /// The aggregator's settings.
    ///
    /// # Errors
    /// `Config` naming the flag when a setting is out of range.
    pub fn health_config(&self) -> Result<HealthConfig, BuildError> {
        let bad = |m: &str| Err(BuildError::Config(m.to_owned()));
        if !(1..=10).contains(&self.fall) {
            return bad("--health-fall must be between 1 and 10");
        }
        if !(1..=10).contains(&self.rise) {
            return bad("--health-rise must be between 1 and 10");
        }
        if self.check_interval < Duration::from_millis(100)
            || self.check_interval > Duration::from_secs(60)
        {
            return bad("--health-check-interval must be between 100ms and 1m");
        }
        if self.check_timeout.is_zero() || self.check_timeout > self.check_interval {
            return bad(
                "--health-check-timeout must be above 0 and at most --health-check-interval",
            );
        }
        if self.scrape_interval < Duration::from_secs(1) {
            return bad("--health-scrape-interval must be at least 1s");
        }
        let mut expected = BTreeMap::new();
        for item in self.expect.iter().filter(|i| !i.is_empty()) {
            let parsed = item
                .split_once('=')
                .and_then(|(service, n)| Some((service.trim(), n.trim().parse::<u32>().ok()?)));
            match parsed {
                Some((service, n)) if !service.is_empty() && n <= 1000 => {
                    expected.insert(service.to_owned(), n);
                }
                _ => {
                    return Err(BuildError::Config(format!(
                        "--health-expect: {item:?} is not service=count (e.g. ratelimit=3)"
                    )));
                }
            }
        }
        for url in self.webhooks.iter().filter(|u| !u.is_empty()) {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(str::is_empty) {
                return Err(BuildError::Config(format!(
                    "--health-webhook {url:?}: write http[s]://host[:port]/path"
                )));
            }
        }
        Ok(HealthConfig {
            fall: self.fall,
            rise: self.rise,
            min_serving: self.min_serving.max(1),
            expected,
            leave_grace: self.leave_grace,
            check_interval: self.check_interval,
            check_timeout: self.check_timeout,
            scrape_interval: self.scrape_interval,
            ..HealthConfig::default()
        })
    }
}

impl Service for HealthArgs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_ports(&self) -> (u16, u16) {
        (7105, 9105)
    }

    fn listen(&self) -> (SocketAddr, SocketAddr) {
        (self.listen, self.admin_listen)
    }

    fn build<'a>(&'a self, deps: &'a HostDeps) -> BoxFuture<'a, Result<ServiceSpec, BuildError>> {
        Box::pin(async move {
            let config = self.health_config()?;
            let metrics = HealthMetrics::register(deps.metrics.registry())
                .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
            let aggregator = Aggregator::new(config.clone(), metrics.clone(), now_ms());
            let stop = CancellationToken::new();
            let ctx = ProbeContext {
                aggregator: aggregator.clone(),
                metrics: metrics.clone(),
                permits: Arc::new(Semaphore::new(config.max_concurrent_checks)),
            };
            if let Some(etcd) = &deps.etcd {
                tokio::spawn(deps::check_etcd(
                    ctx.clone(),
                    etcd.client.clone(),
                    stop.clone(),
                ));
            }
            if let Some(url) = &deps.redis_url {
                tokio::spawn(deps::check_redis(ctx.clone(), url.clone(), stop.clone()));
            }
            tokio::spawn(discovery::discover(
                ctx,
                deps.membership.clone(),
                stop.clone(),
            ));
            spawn_tick(aggregator.clone(), stop.clone());
            let optimizations = Arc::new(Optimizations::with_bearer(deps.client_token.clone()));
            tokio::spawn(optimizations.clone().run(
                aggregator.clone(),
                config.scrape_interval,
                stop.clone(),
            ));
            let file_rules = match &self.rules {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        BuildError::Config(format!("--health-rules {}: {e}", path.display()))
                    })?;
                    parse_rules_file(&text).map_err(|e| {
                        BuildError::Config(format!("--health-rules {}: {e}", path.display()))
                    })?
                }
                None => Vec::new(),
            };
            let store: Arc<dyn AlertStore> = match &deps.redis_url {
                Some(url) => Arc::new(RedisAlertStore::new(
                    redis::Client::open(url.as_str()).map_err(|e| {
                        BuildError::Config(format!("--redis: invalid Redis URL: {e}"))
                    })?,
                )),
                None => Arc::new(InMemoryAlertStore::default()),
            };
            let webhooks = self
                .webhooks
                .iter()
                .filter(|u| !u.is_empty())
                .map(|url| Webhook {
                    url: url.clone(),
                    secret: self.webhook_secret.clone().filter(|s| !s.is_empty()),
                })
                .collect();
            let notifier = Arc::new(Notifier::new(
                webhooks,
                aggregator.clone(),
                metrics.clone(),
                deps.metrics.clone(),
                deps.client_token.clone(),
            ));
            let instance_id = new_instance_id(NAME);
            let alerting = Alerting::start(store, notifier, file_rules, instance_id.clone()).await;
            tokio::spawn(evaluate_alerts(
                alerting.clone(),
                aggregator.clone(),
                optimizations.clone(),
                metrics.clone(),
                stop.clone(),
            ));
            let server = HealthGrpc::new(aggregator.clone(), alerting, metrics, stop).into_server();
            Ok(ServiceSpec {
                name: NAME,
                instance_id,
                grpc_services: vec![SERVICE_NAME.to_owned()],
                routes: Routes::new(server),
                grpc_listen: self.listen,
                admin_listen: self.admin_listen,
                admin_routes: Some(crate::http::routes(aggregator, optimizations)),
                access: vec![(SERVICE_NAME.to_owned(), crate::grpc::ACCESS)],
                audited: vec![(SERVICE_NAME.to_owned(), crate::grpc::AUDITED)],
            })
        })
    }
}

/// How often alert rules are evaluated.
const EVALUATE_EVERY: Duration = Duration::from_secs(1);

async fn evaluate_alerts(
    alerting: Arc<Alerting>,
    aggregator: Arc<Aggregator>,
    optimizations: Arc<Optimizations>,
    metrics: HealthMetrics,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(EVALUATE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = now_ms();
        alerting
            .evaluate(&aggregator, &optimizations.scrapes(), now)
            .await;
        metrics.set_alerts(&alerting.alerts(now));
    }
}
