//! Assembles the rate limiter for the host: its settings (flags with environment fallbacks),
//! the limiter, its metrics and its gRPC routes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::ratelimit::v1::rate_limiter_server::SERVICE_NAME;
use agentmesh_runtime::config::parse_socket_addr;
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use agentmesh_runtime::service::{BuildError, HostDeps, Service};
use futures::future::BoxFuture;
use tonic::service::Routes;

use crate::clock::SystemClock;
use crate::config::LimiterConfig;
use crate::envoy::EnvoyRlsGrpc;
use crate::error::RateLimitError;
use crate::grpc::RateLimiterGrpc;
use crate::limiter::Limiter;
use crate::metrics::RateLimitMetrics;
use crate::policies::PolicySet;
use crate::policy_store::{EtcdPolicyStore, InMemoryPolicyStore, PolicyStore, spawn_policy_sync};
use crate::router::{ClusterRouter, RouterConfig};
use crate::spec::Consistency;
use crate::spec::Policy;
use crate::strict::{RedisStrict, StrictConfig};

pub use crate::config::NAME;

/// Rate limiter settings.
#[derive(Clone, Debug, clap::Args)]
pub struct RateLimitArgs {
    /// gRPC listen address of the rate limiter.
    #[arg(long = "ratelimit-listen", env = "AGENTMESH_RATELIMIT_LISTEN", default_value = "0.0.0.0:7104", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
    /// Admin HTTP listen address of the rate limiter (`/metrics`, `/livez`, `/readyz`).
    #[arg(long = "ratelimit-admin-listen", env = "AGENTMESH_RATELIMIT_ADMIN_LISTEN", default_value = "0.0.0.0:9104", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,
    /// Capacity of the `default` policy (a token bucket), used by items that name no policy.
    #[arg(
        long = "ratelimit-default-capacity",
        env = "RATE_LIMIT_GLOBAL_CAPACITY",
        default_value_t = 60
    )]
    pub default_capacity: u64,
    /// Refill rate of the `default` policy, in units per second.
    #[arg(
        long = "ratelimit-default-refill-per-sec",
        env = "RATE_LIMIT_GLOBAL_REFILL_PER_SEC",
        default_value_t = 1.0
    )]
    pub default_refill_per_sec: f64,
    /// TOML file of named policies: rate limits (`[[policy]] name, limit, period, burst,
    /// algorithm, mode`) and cost budgets (`[[policy]] name, budget, window`).
    #[arg(long = "ratelimit-policies", env = "AGENTMESH_RATELIMIT_POLICIES")]
    pub policy_file: Option<PathBuf>,
    /// Time a forward to an owner or a Redis call may take before the failure policy answers
    /// (never more than the caller's deadline).
    #[arg(long = "ratelimit-budget", env = "AGENTMESH_RATELIMIT_BUDGET", default_value = "5ms", value_parser = agentmesh_runtime::config::parse_duration)]
    pub budget: Duration,
    /// Most limit states kept in memory; at-rest states are evicted first.
    #[arg(
        long = "ratelimit-max-keys",
        env = "AGENTMESH_RATELIMIT_MAX_KEYS",
        default_value_t = 1_000_000
    )]
    pub max_keys: usize,
    /// Most StreamCheck streams clients may hold open on one instance; one more is refused
    /// with RESOURCE_EXHAUSTED (streams between instances are not counted).
    #[arg(
        long = "ratelimit-max-streams",
        env = "AGENTMESH_RATELIMIT_MAX_STREAMS",
        default_value_t = crate::grpc::DEFAULT_MAX_STREAMS
    )]
    pub max_streams: usize,
}

impl RateLimitArgs {
    /// The policies these settings name: the default policy plus the policy file's.
    ///
    /// # Errors
    /// Fails on an invalid default policy or policy file, naming the setting.
    pub fn policies(&self) -> Result<PolicySet, RateLimitError> {
        let default =
            Policy::default_from_capacity(self.default_capacity, self.default_refill_per_sec)?;
        match &self.policy_file {
            Some(path) => PolicySet::load_file(path, default),
            None => PolicySet::new(default, Vec::new()),
        }
    }

    /// Builds the limiter, its policy store and its gRPC routes for the host.
    ///
    /// # Errors
    /// Fails on invalid policies, an unreachable etcd, or metrics registered twice.
    pub async fn build(&self, deps: &HostDeps) -> Result<ServiceSpec, RateLimitError> {
        if self.max_keys == 0 {
            return Err(RateLimitError::invalid(
                "--ratelimit-max-keys",
                "must be at least 1",
            ));
        }
        if self.max_streams == 0 {
            return Err(RateLimitError::invalid(
                "--ratelimit-max-streams",
                "must be at least 1",
            ));
        }
        let base = self.policies()?;
        let config = LimiterConfig {
            max_keys: self.max_keys,
            ..LimiterConfig::default()
        };
        let limiter = Arc::new(Limiter::new(&config, base.clone(), Arc::new(SystemClock)));
        let store: Arc<dyn PolicyStore> = match &deps.etcd {
            Some(etcd) => Arc::new(
                EtcdPolicyStore::start(etcd.client.clone(), &etcd.prefix, ETCD_TIMEOUT).await?,
            ),
            None => Arc::new(InMemoryPolicyStore::default()),
        };
        let synced = Arc::downgrade(&limiter);
        spawn_policy_sync(store.subscribe(), move |scoped| {
            let Some(limiter) = synced.upgrade() else {
                return;
            };
            match base.with_scoped(scoped) {
                Ok(set) => {
                    limiter.set_policies(set);
                    tracing::info!(stored = scoped.len(), "rate-limit policies applied");
                }
                Err(e) => tracing::warn!(error = %e, "rate-limit policies rejected"),
            }
        });
        let domain_metrics = RateLimitMetrics::register(deps.metrics.registry())
            .map_err(|e| RateLimitError::FailedPrecondition(format!("registering metrics: {e}")))?;
        domain_metrics.spawn_store_sampler(&limiter, Duration::from_secs(1));
        let strict = match &deps.redis_url {
            Some(url) => {
                let gauge = deps.metrics.breaker_state.with_label_values(&["redis"]);
                let strict = RedisStrict::connect(StrictConfig::new(url.clone()), Some(gauge))
                    .await
                    .map_err(|e| {
                        RateLimitError::Unavailable(format!("cannot reach Redis at {url}: {e}"))
                    })?;
                Some(strict)
            }
            None => None,
        };
        let instance_id = new_instance_id(NAME);
        let router = RouterConfig {
            instance_id: instance_id.clone(),
            default_consistency: if deps.etcd.is_some() {
                Consistency::Owner
            } else {
                Consistency::Local
            },
            budget: self.budget,
            max_leases: self.max_keys,
            bearer: deps.client_token.clone(),
        };
        let router: Arc<ClusterRouter> = Arc::new(
            ClusterRouter::new(
                limiter.clone(),
                router,
                deps.membership.as_ref(),
                strict,
                &deps.metrics,
            )
            .await?,
        );
        let envoy =
            EnvoyRlsGrpc::new(router.clone(), &instance_id).with_metrics(domain_metrics.clone());
        let server = RateLimiterGrpc::new(router, store, domain_metrics, &instance_id)
            .with_max_streams(self.max_streams)
            .into_server();
        Ok(ServiceSpec {
            name: NAME,
            instance_id,
            grpc_services: vec![
                SERVICE_NAME.to_owned(),
                crate::envoy::SERVICE_NAME.to_owned(),
            ],
            routes: Routes::new(server).add_service(envoy.into_server()),
            grpc_listen: self.listen,
            admin_listen: self.admin_listen,
            admin_routes: None,
            access: vec![
                (SERVICE_NAME.to_owned(), crate::grpc::ACCESS),
                (crate::envoy::SERVICE_NAME.to_owned(), crate::envoy::ACCESS),
            ],
            audited: vec![(SERVICE_NAME.to_owned(), crate::grpc::AUDITED)],
        })
    }
}

impl Service for RateLimitArgs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_ports(&self) -> (u16, u16) {
        (7104, 9104)
    }

    fn listen(&self) -> (SocketAddr, SocketAddr) {
        (self.listen, self.admin_listen)
    }

    fn build<'a>(&'a self, deps: &'a HostDeps) -> BoxFuture<'a, Result<ServiceSpec, BuildError>> {
        Box::pin(async move {
            RateLimitArgs::build(self, deps)
                .await
                .map_err(|e| BuildError::from_service_error(&e))
        })
    }
}

/// Time every etcd call of the rate limiter may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);
