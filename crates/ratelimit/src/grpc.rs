//! The gRPC adapter of `agentmesh.ratelimit.v1.RateLimiter`: decode and validate the wire
//! types, call the [`Limiter`], encode the outcome. No rate-limiting logic lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use agentmesh_proto::ratelimit::v1 as pb;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::concurrency::{MAX_CONCURRENCY, MIN_LEASE_TTL};
use crate::decide::Decide;
use crate::error::{FieldViolation, RateLimitError};
use crate::ids::{ID_HEX_LEN, OpaqueId, decode_id as decode_opaque, encode_id};
use crate::limiter::CheckItem;
use crate::metrics::{ItemNamespaces, RateLimitMetrics};

use crate::policy_store::PolicyStore;
use crate::router::{BudgetCall, ClusterRouter};
use crate::spec::validate_stored_namespace;
use crate::wire::{
    DEFAULT_RESERVATION_TTL, FORWARDED_HEADER, MAX_RESERVATION_TTL, UsageQuery,
    decode_budget_target, decode_items, decode_lease, decode_policy, decode_usage_request,
    duration_from_proto, duration_to_proto, encode_namespace_usage, encode_outcome, encode_policy,
    encode_response, encode_usage, stream_error, validate_policy_ref,
};
use agentmesh_runtime::audit;
use agentmesh_runtime::auth::{AccessRule, Identity, Role, caller};

/// Who may call each RPC (admin may call everything); see the README's roles table.
pub const ACCESS: &[AccessRule] = &[
    ("Check", &[Role::Service, Role::Agent]),
    ("StreamCheck", &[Role::Service, Role::Agent]),
    ("PutPolicy", &[Role::Operator]),
    ("GetPolicy", &[Role::Service, Role::Operator]),
    ("ListPolicies", &[Role::Service, Role::Operator]),
    ("DeletePolicy", &[Role::Operator]),
    ("Acquire", &[Role::Service, Role::Agent]),
    ("RenewLease", &[Role::Service, Role::Agent]),
    ("Release", &[Role::Service, Role::Agent]),
    ("Reserve", &[Role::Service, Role::Agent]),
    ("Commit", &[Role::Service, Role::Agent]),
    ("Cancel", &[Role::Service, Role::Agent]),
    ("GetUsage", &[Role::Service, Role::Operator, Role::Agent]),
    ("Inspect", &[Role::Service, Role::Operator]),
    ("Reset", &[Role::Operator]),
];

/// The state-changing RPCs recorded in the audit trail (README "Audit trail").
pub const AUDITED: &[&str] = &["PutPolicy", "DeletePolicy", "Reset", "Release"];

/// Responses buffered per StreamCheck stream before the server stops reading requests.
const STREAM_BUFFER: usize = 256;
/// Requests of one StreamCheck stream decided at the same time.
const STREAM_IN_FLIGHT: usize = 64;

/// The one mapping from [`RateLimitError`] to `Status`.
impl From<RateLimitError> for Status {
    fn from(err: RateLimitError) -> Self {
        agentmesh_runtime::error::to_status(&err)
    }
}

/// Serves `agentmesh.ratelimit.v1.RateLimiter` over a [`Decide`] (the local limiter or the
/// cluster router).
#[derive(Clone)]
pub struct RateLimiterGrpc {
    decider: Arc<dyn Decide>,
    router: Arc<ClusterRouter>,
    policies: Arc<dyn PolicyStore>,
    metrics: RateLimitMetrics,
    instance_id: Arc<str>,
    streams: Arc<StreamSlots>,
}

/// Default bound on the StreamCheck streams clients hold open on one instance.
pub const DEFAULT_MAX_STREAMS: usize = 10_000;

/// Open StreamCheck streams of clients (streams forwarded by peers are not counted: they are
/// bounded by the cluster's size, and refusing them would break forwarding).
struct StreamSlots {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// One client stream's place under the bound, given back when the stream ends.
struct StreamSlot(Arc<StreamSlots>);

impl StreamSlots {
    fn take(self: &Arc<Self>) -> Result<StreamSlot, RateLimitError> {
        use std::sync::atomic::Ordering;
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(RateLimitError::ResourceExhausted(format!(
                "this instance has its maximum of {} open StreamCheck streams \
                 (--ratelimit-max-streams): close one, or use another instance",
                self.max
            )));
        }
        Ok(StreamSlot(self.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl RateLimiterGrpc {
    /// An adapter that reports `instance_id` as the deciding instance.
    #[must_use]
    pub fn new(
        router: Arc<ClusterRouter>,
        policies: Arc<dyn PolicyStore>,
        metrics: RateLimitMetrics,
        instance_id: &str,
    ) -> Self {
        Self {
            decider: router.clone(),
            router,
            policies,
            metrics,
            instance_id: instance_id.into(),
            streams: Arc::new(StreamSlots {
                open: std::sync::atomic::AtomicUsize::new(0),
                max: DEFAULT_MAX_STREAMS,
            }),
        }
    }

    /// Bounds the StreamCheck streams clients may hold open on this instance (at least 1).
    #[must_use]
    pub fn with_max_streams(mut self, max: usize) -> Self {
        self.streams = Arc::new(StreamSlots {
            open: std::sync::atomic::AtomicUsize::new(0),
            max: max.max(1),
        });
        self
    }

    /// The tonic server for this adapter.
    #[must_use]
    pub fn into_server(self) -> pb::rate_limiter_server::RateLimiterServer<Self> {
        pb::rate_limiter_server::RateLimiterServer::new(self)
    }

    /// Validates, decides and encodes one request; counts its decisions unless `count` is false
    /// (a peer's forward: the instance the client called counts them).
    async fn check(
        &self,
        request: pb::CheckRequest,
        caller: &Identity,
        deadline: Option<Instant>,
        count: bool,
    ) -> Result<pb::CheckResponse, RateLimitError> {
        let started = Instant::now();
        let items = decode_items(request.items)?;
        if caller.tenant.is_some() {
            for (i, item) in items.iter().enumerate() {
                caller.check_owns(
                    &format!("items[{i}].namespace"),
                    "namespace",
                    &item.namespace,
                )?;
            }
        }
        let namespaces =
            count.then(|| ItemNamespaces::of(items.iter().map(|i| i.namespace.as_str())));
        let outcomes = self
            .decider
            .decide(items, request.all_or_nothing, deadline)
            .await?;
        if let Some(namespaces) = namespaces {
            self.metrics.record(&namespaces, &outcomes);
            self.metrics.observe_check(started, &outcomes);
        }
        Ok(encode_response(&outcomes, &self.instance_id))
    }
}

#[tonic::async_trait]
impl pb::rate_limiter_server::RateLimiter for RateLimiterGrpc {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let deadline = deadline_of(&request);
        let count = !request.metadata().contains_key(FORWARDED_HEADER);
        let caller = caller(&request);
        let response =
            RateLimiterGrpc::check(self, request.into_inner(), &caller, deadline, count).await?;
        Ok(Response::new(response))
    }

    type StreamCheckStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamCheckResponse, Status>> + Send + 'static>>;

    async fn stream_check(
        &self,
        request: Request<Streaming<pb::StreamCheckRequest>>,
    ) -> Result<Response<Self::StreamCheckStream>, Status> {
        let deadline = deadline_of(&request);
        let count = !request.metadata().contains_key(FORWARDED_HEADER);
        let slot = if count {
            Some(self.streams.take()?)
        } else {
            None
        };
        let caller = caller(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            this.serve_stream(inbound, tx, caller, deadline, count)
                .await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn put_policy(
        &self,
        request: Request<pb::PutPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let request = request.into_inner();
        let policy = decode_policy(request.policy)?;
        audit.set(|| format!("{}/{}", policy.namespace, policy.name));
        caller.check_owns("policy.namespace", "namespace", &policy.namespace)?;
        let stored = self.policies.put(policy, request.expected_version).await?;
        Ok(Response::new(encode_policy(&stored)))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = caller(&request);
        let request = request.into_inner();
        validate_policy_ref(&request.namespace, &request.name)?;
        caller.check_owns("namespace", "namespace", &request.namespace)?;
        let stored = self.policies.get(&request.namespace, &request.name).await?;
        Ok(Response::new(encode_policy(&stored)))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let caller = caller(&request);
        let namespace = request.into_inner().namespace;
        if !namespace.is_empty() {
            let mut violations = Vec::new();
            validate_stored_namespace(&namespace, "namespace", &mut violations);
            if !violations.is_empty() {
                return Err(RateLimitError::InvalidArgument(violations).into());
            }
            caller.check_owns("namespace", "namespace", &namespace)?;
        }
        let mut listed = self
            .policies
            .list(Some(namespace.as_str()).filter(|ns| !ns.is_empty()))
            .await?;
        // A tenant listing every namespace sees its own.
        listed.retain(|p| caller.owns(&p.namespace));
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: listed.iter().map(encode_policy).collect(),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let request = request.into_inner();
        audit.set(|| format!("{}/{}", request.namespace, request.name));
        validate_policy_ref(&request.namespace, &request.name)?;
        caller.check_owns("namespace", "namespace", &request.namespace)?;
        self.policies
            .delete(&request.namespace, &request.name, request.expected_version)
            .await?;
        Ok(Response::new(pb::DeletePolicyResponse {}))
    }

    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        if r.limit == 0 || r.limit > MAX_CONCURRENCY {
            violations.push(FieldViolation::new(
                "limit",
                format!("must be between 1 and {MAX_CONCURRENCY}, got {}", r.limit),
            ));
        }
        let (target, ttl) = decode_lease(
            &r.namespace,
            &r.key,
            r.consistency,
            r.ttl.as_ref(),
            violations,
        )?;
        caller.check_owns("namespace", "namespace", &target.namespace)?;
        let (outcome, decided_by) = self.router.acquire(&target, r.limit, ttl, deadline).await?;
        Ok(Response::new(pb::AcquireResponse {
            acquired: outcome.lease_id.is_some(),
            lease_id: outcome.lease_id.map(encode_id).unwrap_or_default(),
            in_use: outcome.in_use,
            limit: r.limit,
            retry_after: outcome.retry_after.map(duration_to_proto),
            decided_by,
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        let lease_id = decode_id("lease_id", &r.lease_id, &mut violations);
        let (target, ttl) = decode_lease(
            &r.namespace,
            &r.key,
            r.consistency,
            r.ttl.as_ref(),
            violations,
        )?;
        caller.check_owns("namespace", "namespace", &target.namespace)?;
        self.router.renew(&target, lease_id, ttl, deadline).await?;
        Ok(Response::new(pb::RenewLeaseResponse {}))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let audit = audit::target(&request);
        let r = request.into_inner();
        audit.set(|| format!("{}/{} lease {}", r.namespace, r.key, r.lease_id));
        let mut violations = Vec::new();
        let lease_id = decode_id("lease_id", &r.lease_id, &mut violations);
        let (target, _) = decode_lease(&r.namespace, &r.key, r.consistency, None, violations)?;
        caller.check_owns("namespace", "namespace", &target.namespace)?;
        let in_use = self.router.release(&target, lease_id, deadline).await?;
        Ok(Response::new(pb::ReleaseResponse { in_use }))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let mut item = decode_single_item(request.into_inner().item)?;
        caller.check_owns("item.namespace", "namespace", &item.namespace)?;
        item.cost = 0;
        let outcome = self
            .decider
            .decide(vec![item], false, deadline)
            .await
            .map_err(single_item_error)?
            .remove(0);
        Ok(Response::new(pb::InspectResponse {
            result: Some(encode_outcome(&outcome, &self.instance_id)),
        }))
    }

    async fn reset(
        &self,
        request: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let audit = audit::target(&request);
        let item = decode_single_item(request.into_inner().item)?;
        audit.set(|| format!("{}/{}", item.namespace, item.key));
        caller.check_owns("item.namespace", "namespace", &item.namespace)?;
        let (existed, decided_by) = self
            .router
            .reset(item, deadline)
            .await
            .map_err(single_item_error)?;
        Ok(Response::new(pb::ResetResponse {
            existed,
            decided_by,
        }))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        let ttl = match r.ttl.as_ref() {
            None => DEFAULT_RESERVATION_TTL,
            Some(d) => match duration_from_proto(d) {
                Some(ttl) if (MIN_LEASE_TTL..=MAX_RESERVATION_TTL).contains(&ttl) => ttl,
                _ => {
                    violations.push(FieldViolation::new("ttl", "must be between 1s and 24h"));
                    DEFAULT_RESERVATION_TTL
                }
            },
        };
        let target = decode_budget_target(r.target, violations)?;
        caller.check_owns("target.namespace", "namespace", &target.namespace)?;
        let call = BudgetCall::Reserve {
            estimate: r.estimate,
            ttl,
        };
        let (answer, decided_by) = self.router.budget(&target, call, deadline).await?;
        Ok(Response::new(pb::ReserveResponse {
            granted: answer.granted,
            reservation_id: answer.reservation_id.map(encode_id).unwrap_or_default(),
            usage: Some(encode_usage(&answer.usage)),
            decided_by,
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::BudgetUsageResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        let id = decode_id("reservation_id", &r.reservation_id, &mut violations);
        let target = decode_budget_target(r.target, violations)?;
        caller.check_owns("target.namespace", "namespace", &target.namespace)?;
        let (answer, _) = self
            .router
            .budget(
                &target,
                BudgetCall::Commit {
                    id,
                    actual: r.actual,
                },
                deadline,
            )
            .await?;
        Ok(Response::new(pb::BudgetUsageResponse {
            usage: Some(encode_usage(&answer.usage)),
        }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::BudgetUsageResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        let id = decode_id("reservation_id", &r.reservation_id, &mut violations);
        let target = decode_budget_target(r.target, violations)?;
        caller.check_owns("target.namespace", "namespace", &target.namespace)?;
        let (answer, _) = self
            .router
            .budget(&target, BudgetCall::Cancel { id }, deadline)
            .await?;
        Ok(Response::new(pb::BudgetUsageResponse {
            usage: Some(encode_usage(&answer.usage)),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller(&request);
        let response = match decode_usage_request(request.into_inner())? {
            UsageQuery::One(target) => {
                caller.check_owns("target.namespace", "namespace", &target.namespace)?;
                let call = BudgetCall::Usage;
                let (answer, _) = self.router.budget(&target, call, deadline).await?;
                pb::GetUsageResponse {
                    usage: Some(encode_usage(&answer.usage)),
                    ..pb::GetUsageResponse::default()
                }
            }
            UsageQuery::Namespace(query) => {
                caller.check_owns("namespace", "namespace", &query.namespace)?;
                encode_namespace_usage(self.router.list_budgets(&query, deadline).await)
            }
        };
        Ok(Response::new(response))
    }
}

/// A lease or reservation id as the server sent it: 32 hex digits.
fn decode_id(field: &str, text: &str, violations: &mut Vec<FieldViolation>) -> OpaqueId {
    decode_opaque(text).unwrap_or_else(|| {
        violations.push(FieldViolation::new(
            field,
            format!("must be the {ID_HEX_LEN} hex digits the server returned"),
        ));
        0
    })
}

/// The caller's deadline, from its `grpc-timeout`.
fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    agentmesh_runtime::deadline::from_metadata(request.metadata(), Instant::now())
}

/// The one item of an Inspect or Reset, with field paths under `item`.
fn decode_single_item(item: Option<pb::CheckItem>) -> Result<CheckItem, RateLimitError> {
    let item = item.ok_or_else(|| RateLimitError::invalid("item", "required"))?;
    let mut items = decode_items(vec![item]).map_err(single_item_error)?;
    Ok(items.remove(0))
}

/// An error about `items[0]` of an internal batch, renamed to the request's `item`.
fn single_item_error(e: RateLimitError) -> RateLimitError {
    let rename = |field: String| field.replacen("items[0]", "item", 1);
    match e {
        RateLimitError::InvalidArgument(v) => RateLimitError::InvalidArgument(
            v.into_iter()
                .map(|v| FieldViolation::new(rename(v.field), v.description))
                .collect(),
        ),
        RateLimitError::PolicyNotFound { field, name } => RateLimitError::PolicyNotFound {
            field: rename(field),
            name,
        },
        other => other,
    }
}

impl RateLimiterGrpc {
    /// Answers a StreamCheck stream: up to [`STREAM_IN_FLIGHT`] requests are decided at once
    /// and answered as they finish; a stream error from the caller ends it. `count` is false on
    /// a peer's forward stream (the instance the client called counts those decisions).
    async fn serve_stream(
        self,
        mut inbound: Streaming<pb::StreamCheckRequest>,
        tx: mpsc::Sender<Result<pb::StreamCheckResponse, Status>>,
        caller: Arc<Identity>,
        deadline: Option<Instant>,
        count: bool,
    ) {
        let mut in_flight = FuturesUnordered::new();
        let mut open = true;
        // A frame that cannot be read (not valid protobuf: INVALID_ARGUMENT from the codec)
        // stops reading; the stream ends with it once the checks before it are answered.
        let mut failure = None;
        while open || !in_flight.is_empty() {
            tokio::select! {
                message = inbound.next(), if open && in_flight.len() < STREAM_IN_FLIGHT => match message {
                    Some(Ok(message)) => in_flight.push(self.answer(message, &caller, deadline, count)),
                    Some(Err(status)) => {
                        failure = Some(status);
                        open = false;
                    }
                    None => open = false,
                },
                Some(answer) = in_flight.next() => {
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if let Some(status) = failure {
            let _ = tx.send(Err(status)).await;
        }
    }

    /// One StreamCheck answer: a failure is reported in the message, not by ending the stream.
    async fn answer(
        &self,
        message: pb::StreamCheckRequest,
        caller: &Identity,
        deadline: Option<Instant>,
        count: bool,
    ) -> pb::StreamCheckResponse {
        let id = message.id;
        let result = match message.request {
            Some(request) => self.check(request, caller, deadline, count).await,
            None => Err(RateLimitError::invalid("request", "required")),
        };
        match result {
            Ok(response) => pb::StreamCheckResponse {
                id,
                response: Some(response),
                error: None,
            },
            Err(err) => pb::StreamCheckResponse {
                id,
                response: None,
                error: Some(stream_error(err)),
            },
        }
    }
}

#[cfg(test)]
mod access_tests {
    #[test]
    fn test_every_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered(
            "agentmesh.ratelimit.v1.RateLimiter",
            super::ACCESS,
        );
    }
}
