//! The gRPC adapter of `agentmesh.scheduler.v1.Scheduler`: decode ([`crate::wire`]), call the
//! [`Pool`] or the [`Tasks`] manager, encode. No scheduling logic lives here.

use std::pin::Pin;
use std::sync::Arc;

use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_runtime::error::to_status;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tonic::{Request, Response, Status, Streaming};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::SchedulerError;
use crate::metrics::SchedulerMetrics;
use crate::pool::{Pool, TENANT_LABEL, TenantScope};
use crate::tasks::{Task, Tasks};
use crate::wire::{
    decode_acquire, decode_agent_id, decode_drain, decode_list, decode_list_tasks, decode_register,
    decode_release, decode_report, decode_submit, decode_task_id, decode_task_update, encode_agent,
    encode_reservation, encode_stats, encode_stream_message, encode_task,
};
use agentmesh_runtime::audit;
use agentmesh_runtime::auth::{AccessRule, Identity, Role, caller};

/// Who may call each RPC (admin may call everything); see the README's roles table.
pub const ACCESS: &[AccessRule] = &[
    ("RegisterAgent", &[Role::Agent]),
    ("DeregisterAgent", &[Role::Agent, Role::Operator]),
    ("Heartbeat", &[Role::Agent]),
    ("DrainAgent", &[Role::Operator]),
    ("ListAgents", &[Role::Service, Role::Operator]),
    ("GetAgent", &[Role::Service, Role::Operator]),
    ("GetPoolStats", &[Role::Service, Role::Operator]),
    ("AcquireAgent", &[Role::Service]),
    ("ReleaseAgent", &[Role::Service]),
    ("SubmitTask", &[Role::Service, Role::Operator]),
    ("GetTask", &[Role::Service, Role::Operator]),
    ("ListTasks", &[Role::Service, Role::Operator]),
    ("CancelTask", &[Role::Service, Role::Operator]),
    ("WatchTask", &[Role::Service, Role::Operator]),
];

/// The state-changing RPCs recorded in the audit trail (README "Audit trail").
pub const AUDITED: &[&str] = &[
    "DeregisterAgent",
    "DrainAgent",
    "ReleaseAgent",
    "CancelTask",
];

fn status(e: &SchedulerError) -> Status {
    to_status(e)
}

/// Whether `caller` sees an agent or task of tenant `owner` (a cluster-wide caller sees all; a
/// tenant's caller its own, and others' as if they did not exist).
fn sees(caller: &Identity, owner: Option<&String>) -> bool {
    caller.tenant.is_none() || caller.tenant.as_ref() == owner
}

/// The agents `caller` may pick or list.
fn scope(caller: &Identity) -> TenantScope {
    match &caller.tenant {
        None => TenantScope::Any,
        Some(t) => TenantScope::Only(Some(t.clone())),
    }
}

impl SchedulerGrpc {
    /// Agent `agent_id` if `caller` sees it (else `UnknownAgent`).
    fn visible_agent(&self, caller: &Identity, agent_id: &str) -> Result<(), Status> {
        let agent = self.pool.get(agent_id).map_err(|e| status(&e))?;
        if sees(caller, agent.spec.labels.get(TENANT_LABEL)) {
            Ok(())
        } else {
            Err(status(&SchedulerError::UnknownAgent(agent_id.to_owned())))
        }
    }

    /// Task `task_id` if `caller` sees it (else `UnknownTask`).
    async fn visible_task(&self, caller: &Identity, task_id: &str) -> Result<Task, Status> {
        let task = self.tasks.get(task_id).await.map_err(|e| status(&e))?;
        if sees(caller, task.spec.labels.get(TENANT_LABEL)) {
            Ok(task)
        } else {
            Err(status(&SchedulerError::UnknownTask(task_id.to_owned())))
        }
    }
}

/// Serves `agentmesh.scheduler.v1.Scheduler` over a [`Pool`].
#[derive(Clone)]
pub struct SchedulerGrpc {
    pool: Arc<Pool>,
    tasks: Arc<Tasks>,
    metrics: Option<SchedulerMetrics>,
    instance_id: Arc<str>,
}

impl SchedulerGrpc {
    /// An adapter over `pool` and the task manager `tasks` that names `instance_id` in its
    /// answers.
    #[must_use]
    pub fn new(pool: Arc<Pool>, tasks: Arc<Tasks>, instance_id: &str) -> Self {
        Self {
            pool,
            tasks,
            metrics: None,
            instance_id: instance_id.into(),
        }
    }

    /// Counts acquisitions in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: SchedulerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The tonic server for this adapter.
    #[must_use]
    pub fn into_server(self) -> pb::scheduler_server::SchedulerServer<Self> {
        pb::scheduler_server::SchedulerServer::new(self)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for SchedulerGrpc {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let caller = caller(&request);
        let (mut spec, epoch) = decode_register(request.into_inner()).map_err(|e| status(&e))?;
        caller.check_agent("agent_id", &spec.agent_id)?;
        if let Some(tenant) = &caller.tenant {
            spec.labels.insert(TENANT_LABEL.to_owned(), tenant.clone());
        }
        let registered = self.pool.register(spec, epoch).map_err(|e| status(&e))?;
        Ok(Response::new(pb::RegisterAgentResponse {
            epoch: registered.epoch,
            heartbeat_interval: Some(agentmesh_runtime::wire::duration_to_proto(
                registered.heartbeat_interval,
            )),
            lease: Some(agentmesh_runtime::wire::duration_to_proto(registered.lease)),
        }))
    }

    async fn deregister_agent(
        &self,
        request: Request<pb::DeregisterAgentRequest>,
    ) -> Result<Response<pb::DeregisterAgentResponse>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let r = request.into_inner();
        audit.set(|| r.agent_id.clone());
        decode_agent_id(&r.agent_id, "agent_id").map_err(|e| status(&e))?;
        caller.check_agent("agent_id", &r.agent_id)?;
        self.visible_agent(&caller, &r.agent_id)?;
        self.pool
            .deregister(&r.agent_id, r.epoch)
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeregisterAgentResponse {}))
    }

    type HeartbeatStream = BoxStream<pb::HeartbeatResponse>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        use pb::heartbeat_request::Kind;
        let caller = caller(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(pb::HeartbeatRequest {
                kind: Some(Kind::Hello(hello)),
            })) => hello,
            Some(Ok(_)) => {
                return Err(status(&SchedulerError::invalid(
                    "hello",
                    "the first message of a heartbeat stream must be hello",
                )));
            }
            Some(Err(s)) => return Err(s),
            None => return Err(Status::cancelled("the stream ended before hello")),
        };
        decode_agent_id(&hello.agent_id, "hello.agent_id").map_err(|e| status(&e))?;
        // Tasks are taken and results reported on this stream, as this agent only.
        caller.check_agent("hello.agent_id", &hello.agent_id)?;
        let (generation, rx) = self
            .pool
            .attach(&hello.agent_id, hello.epoch)
            .map_err(|e| status(&e))?;
        let failure: Arc<Mutex<Option<Status>>> = Arc::default();
        let pool = self.pool.clone();
        let tasks = self.tasks.clone();
        let reader_failure = failure.clone();
        tokio::spawn(async move {
            let (agent_id, epoch) = (hello.agent_id, hello.epoch);
            let outcome = loop {
                match inbound.next().await {
                    Some(Ok(pb::HeartbeatRequest {
                        kind: Some(Kind::Report(report)),
                    })) => {
                        if let Err(e) =
                            pool.report(&agent_id, epoch, generation, decode_report(&report))
                        {
                            break Some(status(&e));
                        }
                    }
                    Some(Ok(pb::HeartbeatRequest {
                        kind: Some(Kind::Task(update)),
                    })) => match decode_task_update(update) {
                        Ok(update) => tasks.agent_update(&agent_id, epoch, update),
                        Err(e) => break Some(status(&e)),
                    },
                    Some(Ok(pb::HeartbeatRequest {
                        kind: Some(Kind::Hello(_)),
                    })) => {
                        break Some(status(&SchedulerError::invalid(
                            "hello",
                            "hello is sent once, first",
                        )));
                    }
                    Some(Ok(pb::HeartbeatRequest { kind: None })) => {
                        break Some(status(&SchedulerError::invalid(
                            "kind",
                            "empty message: set hello, report or task",
                        )));
                    }
                    Some(Err(s)) => break Some(s),
                    None => break None,
                }
            };
            *reader_failure.lock() = outcome;
            // Ends the outbound side too (the pool drops its sender).
            pool.stream_ended(&agent_id, epoch, generation);
        });
        let outbound = futures::stream::unfold(
            (
                tokio_stream::wrappers::ReceiverStream::new(rx),
                failure,
                false,
            ),
            |(mut rx, failure, done)| async move {
                if done {
                    return None;
                }
                match rx.next().await {
                    Some(message) => match encode_stream_message(message) {
                        Ok(m) => Some((Ok(m), (rx, failure, false))),
                        Err(e) => Some((Err(status(&e)), (rx, failure, true))),
                    },
                    None => {
                        let end = failure.lock().take();
                        end.map(|s| (Err(s), (rx, failure, true)))
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn drain_agent(
        &self,
        request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let (agent_id, deadline, reason, on_expiry) =
            decode_drain(request.into_inner()).map_err(|e| status(&e))?;
        audit.set(|| agent_id.clone());
        self.visible_agent(&caller, &agent_id)?;
        let agent = self
            .pool
            .drain(&agent_id, deadline, &reason, on_expiry)
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DrainAgentResponse {
            agent: Some(encode_agent(&agent)),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = caller(&request);
        let (mut selector, state, limit, after) =
            decode_list(request.into_inner()).map_err(|e| status(&e))?;
        selector.tenant = scope(&caller);
        let (agents, more) = self.pool.list(&selector, state, &after, limit);
        let next_page_token = if more {
            agents
                .last()
                .map(|a| a.spec.agent_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(encode_agent).collect(),
            next_page_token,
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        decode_agent_id(&r.agent_id, "agent_id").map_err(|e| status(&e))?;
        self.visible_agent(&caller, &r.agent_id)?;
        let agent = self.pool.get(&r.agent_id).map_err(|e| status(&e))?;
        Ok(Response::new(encode_agent(&agent)))
    }

    async fn get_pool_stats(
        &self,
        _request: Request<pb::GetPoolStatsRequest>,
    ) -> Result<Response<pb::PoolStats>, Status> {
        Ok(Response::new(encode_stats(
            &self.pool.stats(),
            &self.tasks.signals(),
            &self.instance_id,
        )))
    }

    async fn acquire_agent(
        &self,
        request: Request<pb::AcquireAgentRequest>,
    ) -> Result<Response<pb::AcquireAgentResponse>, Status> {
        let caller = caller(&request);
        let mut acquire = decode_acquire(request.into_inner()).map_err(|e| status(&e))?;
        acquire.selector.tenant = scope(&caller);
        let result = self.pool.acquire(&acquire);
        if let Some(m) = &self.metrics {
            m.acquired(&result);
        }
        let reservation = result.map_err(|e| status(&e))?;
        Ok(Response::new(encode_reservation(&reservation)))
    }

    async fn release_agent(
        &self,
        request: Request<pb::ReleaseAgentRequest>,
    ) -> Result<Response<pb::ReleaseAgentResponse>, Status> {
        let audit = audit::target(&request);
        let r = request.into_inner();
        audit.set(|| r.reservation_id.clone());
        let (id, outcome, latency) = decode_release(&r).map_err(|e| status(&e))?;
        self.pool
            .release(id, outcome, latency)
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ReleaseAgentResponse {}))
    }

    async fn submit_task(
        &self,
        request: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        let mut trace_context = std::collections::BTreeMap::new();
        agentmesh_runtime::propagation::inject_into_map(
            &tracing::Span::current().context(),
            &mut trace_context,
        );
        let caller = caller(&request);
        let mut spec =
            decode_submit(request.into_inner(), trace_context).map_err(|e| status(&e))?;
        if let Some(tenant) = &caller.tenant {
            // The task runs on the tenant's agents and is seen by the tenant only; its
            // idempotency keys cannot collide with another tenant's.
            spec.labels.insert(TENANT_LABEL.to_owned(), tenant.clone());
            if !spec.idempotency_key.is_empty() {
                spec.idempotency_key = format!("{tenant}/{}", spec.idempotency_key);
            }
        }
        let (task, existing) = self.tasks.submit(spec).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::SubmitTaskResponse {
            task_id: task.id.clone(),
            existing,
            task: Some(encode_task(&task)),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        decode_task_id(&r.task_id, "task_id").map_err(|e| status(&e))?;
        let task = self.visible_task(&caller, &r.task_id).await?;
        Ok(Response::new(encode_task(&task)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let caller = caller(&request);
        let (state, task_type, limit, before) =
            decode_list_tasks(request.into_inner()).map_err(|e| status(&e))?;
        let (mut tasks, more) = self.tasks.list(state, task_type.as_deref(), &before, limit);
        // A tenant lists its own tasks (a page may then hold fewer than `limit`).
        tasks.retain(|t| sees(&caller, t.spec.labels.get(TENANT_LABEL)));
        let next_page_token = if more {
            tasks.last().map(|t| t.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(encode_task).collect(),
            next_page_token,
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let r = request.into_inner();
        audit.set(|| r.task_id.clone());
        let mut violations = Vec::new();
        if let Err(SchedulerError::InvalidArgument(v)) = decode_task_id(&r.task_id, "task_id") {
            violations.extend(v);
        }
        if r.reason.len() > 256 {
            violations.push(crate::error::FieldViolation::new(
                "reason",
                "must be at most 256 bytes",
            ));
        }
        if !violations.is_empty() {
            return Err(status(&SchedulerError::InvalidArgument(violations)));
        }
        self.visible_task(&caller, &r.task_id).await?;
        let task = self
            .tasks
            .cancel(&r.task_id, &r.reason)
            .map_err(|e| status(&e))?;
        Ok(Response::new(encode_task(&task)))
    }

    type WatchTaskStream = BoxStream<pb::Task>;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        decode_task_id(&r.task_id, "task_id").map_err(|e| status(&e))?;
        self.visible_task(&caller, &r.task_id).await?;
        let rx = self.tasks.watch(&r.task_id).map_err(|e| status(&e))?;
        // The current state first, then each change; the stream ends after a terminal state
        // (or when the task is forgotten).
        let stream =
            futures::stream::unfold((rx, true, false), |(mut rx, first, done)| async move {
                if done {
                    return None;
                }
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let task = rx.borrow_and_update().clone();
                let terminal = task.state.is_terminal();
                Some((Ok(encode_task(&task)), (rx, false, terminal)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod access_tests {
    #[test]
    fn test_every_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered("agentmesh.scheduler.v1.Scheduler", super::ACCESS);
    }
}
