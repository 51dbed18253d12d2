//! Assembles the rate limiter for the host: its settings (flags with environment fallbacks),
//! the limiter, its metrics and its gRPC routes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::ratelimit::v1::rate_limiter_server::SERVICE_NAME;
use agentmesh_runtime::Metrics;
use agentmesh_runtime::config::parse_socket_addr;
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use tonic::service::Routes;

use crate::clock::SystemClock;
use crate::config::LimiterConfig;
use crate::error::RateLimitError;
use crate::grpc::RateLimiterGrpc;
use crate::limiter::Limiter;
use crate::metrics::RateLimitMetrics;
use crate::spec::{Policy, PolicySet};

/// Short service name in membership.
pub const NAME: &str = "ratelimit";

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
    /// TOML file of named policies (`[[policy]] name, limit, period, burst, algorithm, mode`).
    #[arg(long = "ratelimit-policies", env = "AGENTMESH_RATELIMIT_POLICIES")]
    pub policy_file: Option<PathBuf>,
    /// Most limit states kept in memory; at-rest states are evicted first.
    #[arg(
        long = "ratelimit-max-keys",
        env = "AGENTMESH_RATELIMIT_MAX_KEYS",
        default_value_t = 1_000_000
    )]
    pub max_keys: usize,
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

    /// Builds the limiter and its gRPC routes for the host.
    ///
    /// # Errors
    /// Fails on invalid policies or metrics registered twice.
    pub fn build(&self, metrics: &Metrics) -> Result<ServiceSpec, RateLimitError> {
        if self.max_keys == 0 {
            return Err(RateLimitError::invalid(
                "--ratelimit-max-keys",
                "must be at least 1",
            ));
        }
        let policies = self.policies()?;
        let config = LimiterConfig {
            max_keys: self.max_keys,
            ..LimiterConfig::default()
        };
        let limiter = Arc::new(Limiter::new(&config, policies, Arc::new(SystemClock)));
        let domain_metrics = RateLimitMetrics::register(metrics.registry())
            .map_err(|e| RateLimitError::invalid("metrics", e.to_string()))?;
        domain_metrics.spawn_store_sampler(&limiter, Duration::from_secs(1));
        let instance_id = new_instance_id(NAME);
        let server = RateLimiterGrpc::new(limiter, domain_metrics, &instance_id).into_server();
        Ok(ServiceSpec {
            name: NAME,
            instance_id,
            grpc_services: vec![SERVICE_NAME.to_owned()],
            routes: Routes::new(server),
            grpc_listen: self.listen,
            admin_listen: self.admin_listen,
        })
    }
}
