//! Assembles the pool for the host: its settings (flags with environment fallbacks), the pool,
//! its clock tick, metrics and gRPC routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::scheduler::v1::scheduler_server::SERVICE_NAME;
use agentmesh_runtime::config::{parse_duration, parse_socket_addr};
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use agentmesh_runtime::service::{BuildError, HostDeps, Service};
use futures::future::BoxFuture;
use tonic::service::Routes;

pub use crate::config::NAME;
use crate::config::PoolConfig;
use crate::grpc::SchedulerGrpc;
use crate::metrics::SchedulerMetrics;
use crate::pool::{Pool, SystemClock};

/// How often the pool's clock ticks (failure detection, drains, lapsed reservations).
const TICK: Duration = Duration::from_millis(100);

/// Scheduler settings.
#[derive(Clone, Debug, clap::Args)]
pub struct SchedulerArgs {
    /// gRPC listen address of the scheduler.
    #[arg(id = "scheduler_listen", long = "scheduler-listen", env = "AGENTMESH_SCHEDULER_LISTEN", default_value = "0.0.0.0:7102", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
    /// Admin HTTP listen address of the scheduler (`/metrics`, `/livez`, `/readyz`).
    #[arg(id = "scheduler_admin_listen", long = "scheduler-admin-listen", env = "AGENTMESH_SCHEDULER_ADMIN_LISTEN", default_value = "0.0.0.0:9102", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,
    /// How often agents send a heartbeat report.
    #[arg(long = "scheduler-heartbeat-interval", env = "AGENTMESH_SCHEDULER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// An agent silent this long is dead, whatever the failure detector says.
    #[arg(long = "scheduler-agent-lease", env = "AGENTMESH_SCHEDULER_AGENT_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Most registered agents.
    #[arg(
        long = "scheduler-max-agents",
        env = "AGENTMESH_SCHEDULER_MAX_AGENTS",
        default_value_t = 100_000
    )]
    pub max_agents: usize,
}

impl SchedulerArgs {
    /// The pool's settings.
    ///
    /// # Errors
    /// `Config` naming the flag when a setting is out of range.
    pub fn pool_config(&self) -> Result<PoolConfig, BuildError> {
        if self.heartbeat_interval < Duration::from_millis(100)
            || self.heartbeat_interval > Duration::from_secs(60)
        {
            return Err(BuildError::Config(
                "--scheduler-heartbeat-interval must be between 100ms and 60s".to_owned(),
            ));
        }
        if self.lease < self.heartbeat_interval * 2 {
            return Err(BuildError::Config(
                "--scheduler-agent-lease must be at least twice the heartbeat interval".to_owned(),
            ));
        }
        if self.max_agents == 0 {
            return Err(BuildError::Config(
                "--scheduler-max-agents must be at least 1".to_owned(),
            ));
        }
        Ok(PoolConfig {
            heartbeat_interval: self.heartbeat_interval,
            lease: self.lease,
            max_agents: self.max_agents,
            ..PoolConfig::default()
        })
    }
}

impl Service for SchedulerArgs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_ports(&self) -> (u16, u16) {
        (7102, 9102)
    }

    fn listen(&self) -> (SocketAddr, SocketAddr) {
        (self.listen, self.admin_listen)
    }

    fn build<'a>(&'a self, deps: &'a HostDeps) -> BoxFuture<'a, Result<ServiceSpec, BuildError>> {
        Box::pin(async move {
            let pool = Arc::new(Pool::new(
                self.pool_config()?,
                Arc::new(SystemClock::default()),
            ));
            let metrics = SchedulerMetrics::register(deps.metrics.registry())
                .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
            spawn_ticks(&pool, metrics.clone());
            let instance_id = new_instance_id(NAME);
            let server = SchedulerGrpc::new(pool, &instance_id)
                .with_metrics(metrics)
                .into_server();
            Ok(ServiceSpec {
                name: NAME,
                instance_id,
                grpc_services: vec![SERVICE_NAME.to_owned()],
                routes: Routes::new(server),
                grpc_listen: self.listen,
                admin_listen: self.admin_listen,
            })
        })
    }
}

/// Moves the pool's clock every [`TICK`] while the pool lives, logging and counting what the
/// failure detector found.
fn spawn_ticks(pool: &Arc<Pool>, metrics: SchedulerMetrics) {
    let pool = Arc::downgrade(pool);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let report = pool.tick();
            for agent in &report.suspected {
                tracing::warn!(%agent, "agent suspect: heartbeats overdue, no new work");
            }
            for agent in &report.died {
                tracing::warn!(%agent, "agent dead: heartbeats stopped");
            }
            for agent in &report.removed {
                tracing::info!(%agent, "agent removed");
            }
            metrics.observe(&report, &pool.stats());
        }
    });
}
