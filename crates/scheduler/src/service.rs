//! Assembles the pool and the task manager for the host: settings (flags with environment
//! fallbacks), the pool, the task store (Redis with `--redis`, else in memory), the clock
//! tick, metrics and gRPC routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::rules::v1::rules_server::SERVICE_NAME as RULES_SERVICE;
use agentmesh_proto::scheduler::v1::scheduler_server::SERVICE_NAME;
use agentmesh_runtime::config::{parse_duration, parse_socket_addr};
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use agentmesh_runtime::service::{BuildError, HostDeps, Service};
use futures::future::BoxFuture;
use tonic::service::Routes;

pub use crate::config::NAME;
use crate::config::PoolConfig;
use crate::events::{BusEvents, EventSink};
use crate::grpc::SchedulerGrpc;
use crate::leader::{self, LeaderRouted, Leadership};
use crate::metrics::{SchedulerMetrics, TaskMetrics};
use crate::pool::{Clock, Pool, SystemClock};
use crate::rules::grpc::RulesGrpc;
use crate::rules::{Engine, EtcdRuleStore, MemoryRuleStore, RuleMetrics, RuleStore};
use crate::tasks::redis_store::RedisTaskStore;
use crate::tasks::{InMemoryTaskStore, TaskConfig, TaskStore, Tasks};
use agentmesh_runtime::peers::PeerSet;

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
    /// Most tasks held in memory (ended ones are forgotten first, oldest first).
    #[arg(
        long = "scheduler-max-tasks",
        env = "AGENTMESH_SCHEDULER_MAX_TASKS",
        default_value_t = 200_000
    )]
    pub max_tasks: usize,
    /// How long an ended task stays readable (GetTask, ListTasks, WatchTask) in memory; the
    /// Redis store keeps it 24 h.
    #[arg(long = "scheduler-task-retention", env = "AGENTMESH_SCHEDULER_TASK_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub task_retention: Duration,
    /// Reactive rules: delays before a stimulus whose response failed is delivered again (the
    /// last repeats; at most 16, each ≤ 1 h).
    #[arg(long = "rules-retry-backoff", env = "AGENTMESH_RULES_RETRY_BACKOFF", default_value = "1s,5s,30s", value_delimiter = ',', value_parser = parse_duration)]
    pub rules_backoff: Vec<Duration>,
    /// Reactive rules: deliveries of a stimulus before it is dead-lettered on
    /// `sys.rules.deadletter` (1–1000); on the last one a failing response's fallback runs.
    #[arg(
        long = "rules-max-deliveries",
        env = "AGENTMESH_RULES_MAX_DELIVERIES",
        default_value_t = 5
    )]
    pub rules_max_deliveries: u32,
}

impl SchedulerArgs {
    /// The rule engine's retries.
    ///
    /// # Errors
    /// `Config` naming the flag when a setting is out of range.
    pub fn rules_retry(&self) -> Result<crate::rules::RetryConfig, BuildError> {
        if self.rules_backoff.is_empty()
            || self.rules_backoff.len() > 16
            || self
                .rules_backoff
                .iter()
                .any(|d| *d > Duration::from_secs(3600))
        {
            return Err(BuildError::Config(
                "--rules-retry-backoff: 1–16 delays, each at most 1h".to_owned(),
            ));
        }
        if !(1..=1000).contains(&self.rules_max_deliveries) {
            return Err(BuildError::Config(
                "--rules-max-deliveries must be between 1 and 1000".to_owned(),
            ));
        }
        Ok(crate::rules::RetryConfig {
            backoff: self.rules_backoff.clone(),
            max_deliveries: self.rules_max_deliveries,
        })
    }

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
        if self.max_tasks == 0 {
            return Err(BuildError::Config(
                "--scheduler-max-tasks must be at least 1".to_owned(),
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
            let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
            let instance_id = new_instance_id(NAME);
            let events = bus_events(deps, &instance_id).await?;
            let pool =
                Arc::new(Pool::new(self.pool_config()?, clock.clone()).with_events(events.clone()));
            let metrics = SchedulerMetrics::register(deps.metrics.registry())
                .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
            let task_metrics = TaskMetrics::register(deps.metrics.registry())
                .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
            let store = task_store(deps.redis_url.as_deref()).await?;
            let tasks = Arc::new(
                Tasks::new(
                    pool.clone(),
                    clock,
                    TaskConfig {
                        max_tasks: self.max_tasks,
                        retention: self.task_retention,
                        ..TaskConfig::default()
                    },
                    store,
                )
                .with_metrics(task_metrics.clone())
                .with_events(events),
            );
            spawn_ticks(&pool, &tasks, metrics.clone(), task_metrics);
            let rule_store: Arc<dyn RuleStore> = match &deps.etcd {
                None => Arc::new(MemoryRuleStore::default()),
                Some(etcd) => EtcdRuleStore::new(etcd.client.clone(), &etcd.prefix),
            };
            let rule_metrics = RuleMetrics::register(deps.metrics.registry())
                .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
            let engine = Engine::new(
                rule_store.clone(),
                tasks.clone(),
                event_buses(deps, &instance_id).await?,
                Some(rule_metrics),
                self.rules_retry()?,
                delay_store(deps.redis_url.as_deref()).await?,
            );
            let leadership = match &deps.etcd {
                None => {
                    recover(&tasks).await?;
                    tokio::spawn(
                        engine
                            .clone()
                            .run(tokio::sync::watch::channel(leader::Role::Leader).1),
                    );
                    Arc::new(Leadership::alone())
                }
                Some(etcd) => {
                    let config = agentmesh_runtime::ClientConfig {
                        // Forwarded calls carry the caller's own deadline; this only bounds
                        // the wait for the leader's answer headers.
                        timeout: Duration::from_secs(30),
                        connect_timeout: Duration::from_secs(1),
                        bearer: deps.client_token.clone(),
                        ..agentmesh_runtime::ClientConfig::default()
                    };
                    let peers = PeerSet::watch(
                        deps.membership.as_ref(),
                        NAME,
                        &instance_id,
                        config,
                        deps.metrics.clone(),
                    )
                    .await
                    .map_err(|e| {
                        BuildError::Unavailable(format!("watching scheduler members: {e}"))
                    })?;
                    let loading = tasks.clone();
                    let role = leader::campaign(
                        etcd.client.clone(),
                        format!("{}/scheduler/leader", etcd.prefix),
                        instance_id.clone(),
                        async move {
                            if let Err(e) = recover(&loading).await {
                                tracing::error!(error = %e, "elected, but the open tasks cannot be loaded: exiting");
                                std::process::exit(69);
                            }
                        },
                    )
                    .await
                    .map_err(|e| {
                        BuildError::Unavailable(format!("joining the scheduler election: {e}"))
                    })?;
                    tokio::spawn(engine.clone().run(role.clone()));
                    Arc::new(Leadership::elected(role, peers))
                }
            };
            let server = LeaderRouted::new(
                SchedulerGrpc::new(pool, tasks, &instance_id)
                    .with_metrics(metrics)
                    .into_server(),
                leadership.clone(),
            );
            // Rules: every call goes to the leader too (it holds the statistics; the rules
            // themselves are in etcd).
            let rules = LeaderRouted::new(
                RulesGrpc::new(rule_store, Some(engine)).into_server(),
                leadership,
            );
            Ok(ServiceSpec {
                name: NAME,
                instance_id,
                grpc_services: vec![SERVICE_NAME.to_owned(), RULES_SERVICE.to_owned()],
                routes: Routes::new(server).add_service(rules),
                grpc_listen: self.listen,
                admin_listen: self.admin_listen,
                admin_routes: None,
                access: vec![
                    (SERVICE_NAME.to_owned(), crate::grpc::ACCESS),
                    (RULES_SERVICE.to_owned(), crate::rules::grpc::ACCESS),
                ],
                audited: vec![
                    (SERVICE_NAME.to_owned(), crate::grpc::AUDITED),
                    (RULES_SERVICE.to_owned(), crate::rules::grpc::AUDITED),
                ],
            })
        })
    }
}

/// The event bus publisher of agent and task events (`sys.scheduler.…`), over the event bus
/// members in membership (none: the events are dropped and counted).
async fn bus_events(deps: &HostDeps, instance_id: &str) -> Result<Arc<dyn EventSink>, BuildError> {
    let dropped = prometheus::IntCounter::new(
        "scheduler_events_dropped_total",
        "Agent and task events not published (no event bus reachable, or the queue of 10,000 \
         was full).",
    )
    .and_then(|c| {
        deps.metrics
            .registry()
            .register(Box::new(c.clone()))
            .map(|()| c)
    })
    .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
    let buses = PeerSet::watch(
        deps.membership.as_ref(),
        "eventbus",
        instance_id,
        agentmesh_runtime::ClientConfig {
            bearer: deps.client_token.clone(),
            ..agentmesh_runtime::ClientConfig::default()
        },
        deps.metrics.clone(),
    )
    .await
    .map_err(|e| BuildError::Unavailable(format!("watching event bus members: {e}")))?;
    Ok(Arc::new(BusEvents::start(
        buses,
        format!("agentmesh/scheduler/{instance_id}"),
        dropped,
    )))
}

/// The event bus members, for the rule engine's subscriptions and publishes.
async fn event_buses(deps: &HostDeps, instance_id: &str) -> Result<PeerSet, BuildError> {
    PeerSet::watch(
        deps.membership.as_ref(),
        "eventbus",
        instance_id,
        agentmesh_runtime::ClientConfig {
            bearer: deps.client_token.clone(),
            // Subscriptions are long-lived streams: no per-call timeout.
            timeout: Duration::from_secs(24 * 3600),
            ..agentmesh_runtime::ClientConfig::default()
        },
        deps.metrics.clone(),
    )
    .await
    .map_err(|e| BuildError::Unavailable(format!("watching event bus members: {e}")))
}

/// Where delayed rule responses wait: Redis when the host has it, else memory.
async fn delay_store(
    redis_url: Option<&str>,
) -> Result<Arc<dyn crate::rules::delayed::DelayStore>, BuildError> {
    let Some(url) = redis_url else {
        return Ok(Arc::new(crate::rules::delayed::MemoryDelayStore::default()));
    };
    Ok(Arc::new(crate::rules::delayed::RedisDelayStore::new(
        redis_manager(url).await?,
    )))
}

/// A connection manager to Redis at `url`, within 3 s.
async fn redis_manager(url: &str) -> Result<redis::aio::ConnectionManager, BuildError> {
    let client = redis::Client::open(url)
        .map_err(|e| BuildError::Config(format!("--redis: invalid Redis URL: {e}")))?;
    tokio::time::timeout(
        Duration::from_secs(3),
        redis::aio::ConnectionManager::new(client),
    )
    .await
    .map_err(|_| BuildError::Unavailable(format!("cannot reach Redis at {url}: timed out")))?
    .map_err(|e| BuildError::Unavailable(format!("cannot reach Redis at {url}: {e}")))
}

/// Loads the open tasks a previous leader left in the store.
async fn recover(tasks: &Tasks) -> Result<(), BuildError> {
    let recovered = tasks
        .recover()
        .await
        .map_err(|e| BuildError::Unavailable(format!("loading open tasks from the store: {e}")))?;
    if recovered > 0 {
        tracing::info!(tasks = recovered, "open tasks loaded from the store");
    }
    Ok(())
}

/// The task store: Redis when the host has it, else in memory.
async fn task_store(redis_url: Option<&str>) -> Result<Arc<dyn TaskStore>, BuildError> {
    let Some(url) = redis_url else {
        return Ok(Arc::new(InMemoryTaskStore::default()));
    };
    Ok(Arc::new(RedisTaskStore::new(redis_manager(url).await?)))
}

/// Moves the pool's and the task manager's clocks every [`TICK`] while the pool lives,
/// logging and counting what they found.
fn spawn_ticks(
    pool: &Arc<Pool>,
    tasks: &Arc<Tasks>,
    metrics: SchedulerMetrics,
    task_metrics: TaskMetrics,
) {
    let pool = Arc::downgrade(pool);
    let tasks = Arc::downgrade(tasks);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            ticks.tick().await;
            let (Some(pool), Some(tasks)) = (pool.upgrade(), tasks.upgrade()) else {
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
            let done = tasks.tick();
            if done.timed_out + done.not_started > 0 {
                tracing::info!(
                    timed_out = done.timed_out,
                    not_started = done.not_started,
                    "task deadlines passed"
                );
            }
            n += 1;
            if n.is_multiple_of(10) {
                task_metrics.observe(&tasks.counts());
                task_metrics.observe_signals(&tasks.signals());
            }
        }
    });
}
