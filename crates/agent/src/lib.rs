//! The agentmesh agent SDK: what an agent written in Rust needs to join the pool.
//!
//! An [`Agent`] registers with the scheduler, keeps one heartbeat stream open with real
//! process metrics (CPU, memory) and the load you count through [`Load`], reconnects with
//! back-off and jitter when the scheduler or the network goes away (registering again with the
//! same epoch, so nothing is fenced), follows drain orders, and deregisters when you shut it
//! down. Callers then find it with `AcquireAgent`.
//!
//! ```no_run
//! use agentmesh_agent::{Agent, AgentConfig};
//!
//! # async fn example() -> Result<(), agentmesh_agent::AgentError> {
//! let agent = Agent::new(AgentConfig {
//!     scheduler: "http://127.0.0.1:7102".into(),
//!     agent_id: "summarizer-1".into(),
//!     agent_type: "summarizer".into(),
//!     capacity: 4,
//!     endpoint: "10.0.0.7:8080".into(),
//!     ..AgentConfig::default()
//! });
//! let load = agent.load();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn({
//!     let shutdown = shutdown.clone();
//!     async move {
//!         let _ = tokio::signal::ctrl_c().await;
//!         shutdown.cancel();
//!     }
//! });
//! // In your request handler: `let _work = load.start();` while the work runs.
//! # let _ = load;
//! agent.run(shutdown).await
//! # }
//! ```
//!
//! Tasks the scheduler assigns run through handlers you register per task type; the agent
//! registers those types, starts each assignment in its own tokio task (counted in its load),
//! sends STARTED, then SUCCEEDED with your output or FAILED with your [`TaskFailure`], and
//! stops a handler the scheduler cancels:
//!
//! ```no_run
//! use agentmesh_agent::{Agent, AgentConfig, TaskFailure};
//!
//! # async fn example() -> Result<(), agentmesh_agent::AgentError> {
//! let agent = Agent::new(AgentConfig {
//!     agent_id: "summarizer-1".into(),
//!     agent_type: "summarizer".into(),
//!     capacity: 4,
//!     ..AgentConfig::default()
//! })
//! .handle("summarize", |task| async move {
//!     task.progress(Some(0.5), "reading");
//!     let text = String::from_utf8(task.payload.clone())
//!         .map_err(|_| TaskFailure::fatal("payload is not UTF-8"))?;
//!     Ok(text.split_whitespace().take(10).collect::<Vec<_>>().join(" ").into_bytes())
//! });
//! agent.run(tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```

pub mod process;
mod tasks;

pub use tasks::{Task, TaskFailure, TaskResult};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_runtime::wire::{duration_from_proto, duration_to_proto, timestamp_to_ms};
use pb::scheduler_client::SchedulerClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::process::ProcessSampler;

/// Who the agent is and where the scheduler is.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the scheduler is: `http://host:port` (any scheduler instance: followers forward
    /// to the leader), or `etcd://host:port[,host:port…][/prefix]` to find the scheduler
    /// instances in the cluster's membership (prefix `/agentmesh` by default; an instance is
    /// picked at random on every connect, so a dead one is skipped on reconnect).
    pub scheduler: String,
    /// Stable id (keep it across restarts).
    pub agent_id: String,
    /// Kind of agent.
    pub agent_type: String,
    /// What it can do.
    pub capabilities: HashMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Slots (work it takes at once).
    pub capacity: u32,
    /// Relative weight.
    pub weight: u32,
    /// Failure domain.
    pub zone: String,
    /// Where callers reach it.
    pub endpoint: String,
    /// Its version.
    pub version: String,
    /// Other labels.
    pub labels: HashMap<String, String>,
    /// Shortest wait before reconnecting.
    pub reconnect_min: Duration,
    /// Longest wait before reconnecting.
    pub reconnect_max: Duration,
    /// On shutdown, how long running tasks get to finish: the agent drains itself (no new
    /// work), sends their results, then deregisters. Tasks still running after it are
    /// requeued by the scheduler.
    pub shutdown_grace: Duration,
    /// The bearer token this agent presents, for clusters run with `--auth required` (a token
    /// with the `agent` role whose `agent_id` claim is this agent's id). A file is read again
    /// at every connect, so a token rotated by its issuer (or a sidecar) is picked up at the
    /// next reconnect. Over TLS, set the process's client TLS once
    /// (`agentmesh_runtime::tls::TlsArgs::install_client`); a client certificate can stand in
    /// for the token.
    pub token: Option<TokenSource>,
}

/// Where an agent's bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// This token, as is.
    Static(String),
    /// The token in this file, read at every connect.
    File(std::path::PathBuf),
}

impl TokenSource {
    /// The `authorization` value for the current token.
    fn header(&self) -> Result<tonic::metadata::AsciiMetadataValue, String> {
        let token = match self {
            Self::Static(token) => token.trim().to_owned(),
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("token file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        };
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_owned())
    }
}

/// Adds the agent's token (if any) to every call.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = SchedulerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            scheduler: "http://127.0.0.1:7102".into(),
            agent_id: String::new(),
            agent_type: String::new(),
            capabilities: HashMap::new(),
            tags: Vec::new(),
            capacity: 1,
            weight: 1,
            zone: String::new(),
            endpoint: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            labels: HashMap::new(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            token: None,
        }
    }
}

/// Why an agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The scheduler refused the registration (bad settings): retrying will not help.
    #[error("the scheduler refused the registration: {0}")]
    Refused(String),
    /// Another process registered the same agent id with a newer epoch.
    #[error("another registration of agent {0:?} replaced this one")]
    Fenced(String),
}

/// Where the agent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// Not connected (yet, or again).
    Connecting,
    /// Registered and heartbeating.
    Ready {
        /// The registration's epoch.
        epoch: u64,
    },
    /// Drained: take no new work; the scheduler removes it at the deadline.
    Draining {
        /// Wall ms of the deadline.
        deadline_ms: u64,
    },
    /// `run` returned.
    Stopped,
}

/// The work in progress you count, reported on each heartbeat.
#[derive(Debug, Default)]
pub struct Load {
    active: AtomicU32,
    errors: AtomicU32,
    latency_us: AtomicU64,
}

/// One piece of work in progress; counted until dropped.
#[derive(Debug)]
pub struct Working<'a> {
    load: &'a Load,
    started: Instant,
}

impl Load {
    /// Counts one piece of work until the guard is dropped (its duration feeds the latency).
    pub fn start(&self) -> Working<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Working {
            load: self,
            started: Instant::now(),
        }
    }

    /// Counts a failed piece of work.
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Work in progress now.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.load.active.fetch_sub(1, Ordering::Relaxed);
        let us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // An exponential average over about eight pieces of work.
        let old = self.load.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.load.latency_us.store(new, Ordering::Relaxed);
    }
}

/// An agent of the pool; see the crate docs.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    load: Arc<Load>,
    status_tx: watch::Sender<AgentStatus>,
    runner: Arc<tasks::Runner>,
}

/// How one connected session ended.
enum SessionEnd {
    Shutdown,
    /// The drain deadline passed.
    Drained,
}

impl Agent {
    /// An agent with `config` (nothing happens until [`Agent::run`]).
    #[must_use]
    pub fn new(config: AgentConfig) -> Self {
        Self {
            config,
            load: Arc::new(Load::default()),
            status_tx: watch::channel(AgentStatus::Connecting).0,
            runner: Arc::new(tasks::Runner::default()),
        }
    }

    /// Runs tasks of `task_type` with `handler` (register every type before [`Agent::run`];
    /// the agent tells the scheduler the types it has handlers for).
    ///
    /// # Panics
    /// When called after [`Agent::run`] started.
    #[must_use]
    pub fn handle<F, Fut>(mut self, task_type: &str, handler: F) -> Self
    where
        F: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = TaskResult> + Send + 'static,
    {
        let runner = Arc::get_mut(&mut self.runner).expect("handlers are added before run");
        runner.handlers.insert(
            task_type.to_owned(),
            Arc::new(move |task| Box::pin(handler(task))),
        );
        self
    }

    /// Task attempts running now.
    #[must_use]
    pub fn running_tasks(&self) -> usize {
        self.runner.running()
    }

    /// The load counter heartbeats report.
    #[must_use]
    pub fn load(&self) -> Arc<Load> {
        self.load.clone()
    }

    /// Where the agent stands, as it changes.
    #[must_use]
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status_tx.subscribe()
    }

    /// Runs until `shutdown` is cancelled (then deregisters) or a drain's deadline passes.
    /// Connection failures are retried with back-off and jitter.
    ///
    /// # Errors
    /// `Refused` for settings the scheduler rejects; `Fenced` when another process took over
    /// this agent id.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let mut epoch = 0u64;
        let mut delay = self.config.reconnect_min;
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let started = Instant::now();
            match self.session(&mut epoch, &shutdown).await {
                Ok(SessionEnd::Shutdown | SessionEnd::Drained) => break Ok(()),
                Err(Failure::Fatal(e)) => break Err(e),
                Err(Failure::Retry(why)) => {
                    self.status_tx.send_replace(AgentStatus::Connecting);
                    if started.elapsed() > self.config.reconnect_max {
                        delay = self.config.reconnect_min; // it had been up a while
                    }
                    let jittered = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    tracing::warn!(agent = %self.config.agent_id, error = %why, retry_in_ms = jittered.as_millis(), "scheduler unreachable; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => break Ok(()),
                        () = tokio::time::sleep(jittered) => {}
                    }
                    delay = (delay * 2).min(self.config.reconnect_max);
                }
            }
        };
        if epoch != 0 {
            self.deregister(epoch).await;
        }
        self.status_tx.send_replace(AgentStatus::Stopped);
        result
    }

    async fn client(&self) -> Result<Client, Failure> {
        let bearer = match &self.config.token {
            None => Bearer(None),
            Some(source) => {
                Bearer(Some(source.header().map_err(|e| {
                    Failure::Retry(format!("reading the token: {e}"))
                })?))
            }
        };
        let config = agentmesh_runtime::ClientConfig {
            timeout: Duration::from_secs(5),
            ..agentmesh_runtime::ClientConfig::default()
        };
        let address = self.scheduler_address().await?;
        let channel = agentmesh_runtime::client::endpoint(&address, &config)
            .map_err(|e| Failure::Fatal(AgentError::Refused(e.to_string())))?
            .connect()
            .await
            .map_err(|e| Failure::Retry(format!("connecting: {e}")))?;
        Ok(SchedulerClient::with_interceptor(channel, bearer))
    }

    /// The scheduler's address: as configured, or a live instance found through etcd.
    async fn scheduler_address(&self) -> Result<String, Failure> {
        let Some(rest) = self.config.scheduler.strip_prefix("etcd://") else {
            return Ok(self.config.scheduler.clone());
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, format!("/{prefix}")),
            None => (rest, "/agentmesh".to_owned()),
        };
        let membership = agentmesh_membership::EtcdMembership::connect(
            agentmesh_membership::EtcdMembershipConfig {
                endpoints: hosts.split(',').map(|h| format!("http://{h}")).collect(),
                prefix,
                ..agentmesh_membership::EtcdMembershipConfig::default()
            },
        )
        .await
        .map_err(|e| Failure::Retry(format!("reaching etcd: {e}")))?;
        let members = agentmesh_membership::Membership::list(&membership, "scheduler")
            .await
            .map_err(|e| Failure::Retry(format!("listing schedulers in etcd: {e}")))?
            .members;
        if members.is_empty() {
            return Err(Failure::Retry(
                "no scheduler is registered in etcd".to_owned(),
            ));
        }
        let pick = rand::random_range(0..members.len());
        let member = members
            .values()
            .nth(pick)
            .expect("index within the members");
        Ok(format!("http://{}", member.grpc_addr))
    }

    fn registration(&self, epoch: u64) -> pb::RegisterAgentRequest {
        let c = &self.config;
        pb::RegisterAgentRequest {
            agent_id: c.agent_id.clone(),
            r#type: c.agent_type.clone(),
            capabilities: c.capabilities.clone(),
            tags: c.tags.clone(),
            capacity: c.capacity,
            weight: c.weight,
            zone: c.zone.clone(),
            endpoint: c.endpoint.clone(),
            version: c.version.clone(),
            labels: c.labels.clone(),
            epoch,
            task_types: self.runner.handlers.keys().cloned().collect(),
        }
    }

    async fn session(
        &self,
        epoch: &mut u64,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, Failure> {
        let mut client = self.client().await?;
        // Register again with the same epoch (a scheduler that restarted takes it as is);
        // if another epoch is current, we were replaced.
        let registered = match client.register_agent(self.registration(*epoch)).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::FailedPrecondition => {
                return Err(Failure::Fatal(AgentError::Fenced(
                    self.config.agent_id.clone(),
                )));
            }
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::PermissionDenied) => {
                return Err(Failure::Fatal(AgentError::Refused(s.message().to_owned())));
            }
            Err(s) => return Err(Failure::Retry(format!("registering: {}", s.message()))),
        };
        *epoch = registered.epoch;
        let interval = registered
            .heartbeat_interval
            .as_ref()
            .and_then(duration_from_proto)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(1));
        let (tx, rx) = mpsc::channel(8);
        let hello = pb::HeartbeatRequest {
            kind: Some(pb::heartbeat_request::Kind::Hello(pb::Hello {
                agent_id: self.config.agent_id.clone(),
                epoch: *epoch,
            })),
        };
        let _ = tx.send(hello).await;
        let mut inbound = client
            .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| Failure::Retry(format!("opening the heartbeat stream: {}", s.message())))?
            .into_inner();
        self.status_tx
            .send_replace(AgentStatus::Ready { epoch: *epoch });
        tracing::info!(agent = %self.config.agent_id, epoch = *epoch, "registered with the scheduler");
        let mut ticks = tokio::time::interval(interval);
        let mut sampler = ProcessSampler::new();
        let mut sequence = 0u64;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // Task updates go out on this session's stream; one session holds them at a time.
        let mut updates = self.runner.updates_rx.lock().await;
        // Set once shutdown is asked while tasks run: finish them (drained) until then.
        let mut stopping: Option<tokio::time::Instant> = None;
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            if let Some(until) = stopping
                && ((self.runner.running() == 0 && updates.is_empty())
                    || tokio::time::Instant::now() >= until)
            {
                // Close our side and let the scheduler read everything sent (the last
                // results) before it ends the stream; dropping the response would cancel it.
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = inbound.next().await {}
                })
                .await;
                return Ok(SessionEnd::Shutdown);
            }
            tokio::select! {
                () = shutdown.cancelled(), if stopping.is_none() => {
                    if self.runner.running() == 0 {
                        return Ok(SessionEnd::Shutdown);
                    }
                    let grace = self.config.shutdown_grace;
                    tracing::info!(agent = %self.config.agent_id, running = self.runner.running(), grace_ms = grace.as_millis(), "shutting down: draining, finishing running tasks");
                    stopping = Some(tokio::time::Instant::now() + grace);
                    let _ = client
                        .drain_agent(pb::DrainAgentRequest {
                            agent_id: self.config.agent_id.clone(),
                            deadline: Some(duration_to_proto(grace + Duration::from_secs(1))),
                            reason: "agent shutting down".to_owned(),
                            on_expiry: pb::DrainExpiry::Requeue as i32,
                        })
                        .await;
                }
                _ = check.tick(), if stopping.is_some() => {}
                Some(update) = updates.recv() => {
                    let message = pb::HeartbeatRequest {
                        kind: Some(pb::heartbeat_request::Kind::Task(update)),
                    };
                    if tx.send(message).await.is_err() {
                        return Err(Failure::Retry("the heartbeat stream closed".to_owned()));
                    }
                }
                () = sleep_until(drain_deadline) => return Ok(SessionEnd::Drained),
                _ = ticks.tick() => {
                    sequence += 1;
                    let (cpu_percent, memory_bytes) = sampler.sample();
                    let active = self.load.active();
                    let latency_us = self.load.latency_us.load(Ordering::Relaxed);
                    let report = pb::LoadReport {
                        sequence,
                        cpu_percent,
                        memory_bytes,
                        active,
                        free_slots: self.config.capacity.saturating_sub(active),
                        latency: (latency_us > 0).then(|| duration_to_proto(Duration::from_micros(latency_us))),
                        errors: self.load.errors.swap(0, Ordering::Relaxed),
                    };
                    let message = pb::HeartbeatRequest {
                        kind: Some(pb::heartbeat_request::Kind::Report(report)),
                    };
                    if tx.send(message).await.is_err() {
                        return Err(Failure::Retry("the heartbeat stream closed".to_owned()));
                    }
                }
                message = inbound.next() => match message {
                    Some(Ok(pb::HeartbeatResponse { kind: Some(pb::heartbeat_response::Kind::Drain(d)) })) => {
                        let deadline_ms = d.deadline.as_ref().and_then(timestamp_to_ms).unwrap_or(0);
                        tracing::info!(agent = %self.config.agent_id, reason = %d.reason, "drained: taking no new work");
                        self.status_tx.send_replace(AgentStatus::Draining { deadline_ms });
                        let left = deadline_ms.saturating_sub(wall_ms());
                        drain_deadline = Some(tokio::time::Instant::now() + Duration::from_millis(left));
                    }
                    Some(Ok(pb::HeartbeatResponse { kind: Some(pb::heartbeat_response::Kind::Assign(a)) })) => {
                        tracing::debug!(agent = %self.config.agent_id, task = %a.task_id, attempt = a.attempt, "task assigned");
                        self.runner.start(a, self.load.clone());
                    }
                    Some(Ok(pb::HeartbeatResponse { kind: Some(pb::heartbeat_response::Kind::Cancel(c)) })) => {
                        tracing::info!(agent = %self.config.agent_id, task = %c.task_id, attempt = c.attempt, reason = %c.reason, "task cancelled");
                        self.runner.cancel(&c.task_id, c.attempt);
                    }
                    Some(Ok(_)) => {}
                    // Once drained, the scheduler ends the stream at the deadline; its clock
                    // can fire before ours. That is the drain completing, not a reason to
                    // register again.
                    None | Some(Err(_)) if drain_deadline.is_some() => return Ok(SessionEnd::Drained),
                    Some(Err(s)) if s.code() == Code::FailedPrecondition => {
                        return Err(Failure::Fatal(AgentError::Fenced(self.config.agent_id.clone())));
                    }
                    Some(Err(s)) => return Err(Failure::Retry(format!("heartbeat stream: {}", s.message()))),
                    None => return Err(Failure::Retry("the scheduler ended the heartbeat stream".to_owned())),
                },
            }
        }
    }

    async fn deregister(&self, epoch: u64) {
        let attempt = async {
            let mut client = self.client().await.ok()?;
            client
                .deregister_agent(pb::DeregisterAgentRequest {
                    agent_id: self.config.agent_id.clone(),
                    epoch,
                })
                .await
                .ok()
        };
        if tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            tracing::info!(agent = %self.config.agent_id, "deregistered");
        }
    }
}

enum Failure {
    Retry(String),
    Fatal(AgentError),
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
