//! The gRPC adapter of `agentmesh.ratelimit.v1.RateLimiter`: decode and validate the wire
//! types, call the [`Limiter`], encode the outcome. No rate-limiting logic lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::status;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::budget::{BudgetSpec, BudgetWindow, Usage};
use crate::concurrency::{DEFAULT_LEASE_TTL, MAX_CONCURRENCY, MAX_LEASE_TTL, MIN_LEASE_TTL};
use crate::decide::Decide;
use crate::error::{FieldViolation, RateLimitError};
use crate::limiter::{CheckItem, CheckOutcome, LimitRef};
use crate::metrics::{ItemNamespaces, RateLimitMetrics};

/// Metadata a peer sets on a forwarded Check, so the owner does not count the decisions again.
pub(crate) const FORWARDED_HEADER: &str = "agentmesh-forwarded";
use crate::policy_store::PolicyStore;
use crate::router::{BudgetCall, BudgetTarget, ClusterRouter, LeaseTarget};
use crate::spec::{Algorithm, Consistency, FailurePolicy, LimitSpec, Mode, Policy, ScopedPolicy};

/// Responses buffered per StreamCheck stream before the server stops reading requests.
const STREAM_BUFFER: usize = 256;
/// Requests of one StreamCheck stream decided at the same time.
const STREAM_IN_FLIGHT: usize = 64;

/// The one mapping from [`RateLimitError`] to `Status`.
impl From<RateLimitError> for Status {
    fn from(err: RateLimitError) -> Self {
        match err {
            RateLimitError::InvalidArgument(violations) => {
                status::invalid_argument(violations.into_iter().map(|v| (v.field, v.description)))
            }
            RateLimitError::PolicyNotFound { field, name } => {
                status::not_found(format!("{field}: policy {name:?} does not exist"))
            }
            RateLimitError::PolicyFile { .. } | RateLimitError::FailedPrecondition(_) => {
                status::failed_precondition(err.to_string())
            }
            RateLimitError::StoredPolicyNotFound { .. } => status::not_found(err.to_string()),
            RateLimitError::VersionMismatch { .. } => Status::aborted(err.to_string()),
            RateLimitError::Unavailable(_) => status::unavailable(err.to_string()),
            RateLimitError::LeaseNotFound(_) => status::not_found(err.to_string()),
            RateLimitError::ResourceExhausted(_) => {
                status::resource_exhausted(err.to_string(), None)
            }
        }
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
        }
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
        deadline: Option<Instant>,
        count: bool,
    ) -> Result<pb::CheckResponse, RateLimitError> {
        let items = decode_items(request.items)?;
        let namespaces =
            count.then(|| ItemNamespaces::of(items.iter().map(|i| i.namespace.as_str())));
        let outcomes = self
            .decider
            .decide(items, request.all_or_nothing, deadline)
            .await?;
        if let Some(namespaces) = namespaces {
            self.metrics.record(&namespaces, &outcomes);
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
        let response = RateLimiterGrpc::check(self, request.into_inner(), deadline, count).await?;
        Ok(Response::new(response))
    }

    type StreamCheckStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamCheckResponse, Status>> + Send + 'static>>;

    async fn stream_check(
        &self,
        request: Request<Streaming<pb::StreamCheckRequest>>,
    ) -> Result<Response<Self::StreamCheckStream>, Status> {
        let deadline = deadline_of(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(self.clone().serve_stream(inbound, tx, deadline));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn put_policy(
        &self,
        request: Request<pb::PutPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let request = request.into_inner();
        let policy = decode_policy(request.policy)?;
        let stored = self.policies.put(policy, request.expected_version).await?;
        Ok(Response::new(encode_policy(&stored)))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let request = request.into_inner();
        validate_policy_ref(&request.namespace, &request.name)?;
        let stored = self.policies.get(&request.namespace, &request.name).await?;
        Ok(Response::new(encode_policy(&stored)))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let namespace = request.into_inner().namespace;
        let listed = self
            .policies
            .list(Some(namespace.as_str()).filter(|ns| !ns.is_empty()))
            .await?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: listed.iter().map(encode_policy).collect(),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let request = request.into_inner();
        validate_policy_ref(&request.namespace, &request.name)?;
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
        self.router.renew(&target, lease_id, ttl, deadline).await?;
        Ok(Response::new(pb::RenewLeaseResponse {}))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        let lease_id = decode_id("lease_id", &r.lease_id, &mut violations);
        let (target, _) = decode_lease(&r.namespace, &r.key, r.consistency, None, violations)?;
        let in_use = self.router.release(&target, lease_id, deadline).await?;
        Ok(Response::new(pb::ReleaseResponse { in_use }))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let deadline = deadline_of(&request);
        let mut item = decode_single_item(request.into_inner().item)?;
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
        let item = decode_single_item(request.into_inner().item)?;
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
        let r = request.into_inner();
        let mut violations = Vec::new();
        let id = decode_id("reservation_id", &r.reservation_id, &mut violations);
        let target = decode_budget_target(r.target, violations)?;
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
        let r = request.into_inner();
        let mut violations = Vec::new();
        let id = decode_id("reservation_id", &r.reservation_id, &mut violations);
        let target = decode_budget_target(r.target, violations)?;
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
    ) -> Result<Response<pb::BudgetUsageResponse>, Status> {
        let deadline = deadline_of(&request);
        let target = decode_budget_target(request.into_inner().target, Vec::new())?;
        let (answer, _) = self
            .router
            .budget(&target, BudgetCall::Usage, deadline)
            .await?;
        Ok(Response::new(pb::BudgetUsageResponse {
            usage: Some(encode_usage(&answer.usage)),
        }))
    }
}

/// The target and TTL of a lease call, or every violation found (added to `violations`).
fn decode_lease(
    namespace: &str,
    key: &str,
    consistency: i32,
    ttl: Option<&prost_types::Duration>,
    mut violations: Vec<FieldViolation>,
) -> Result<(LeaseTarget, Duration), RateLimitError> {
    use crate::spec::{MAX_KEY_LEN, MAX_NAMESPACE_LEN, is_valid_identifier};
    if !is_valid_identifier(namespace, MAX_NAMESPACE_LEN) {
        violations.push(FieldViolation::new(
            "namespace",
            format!("must be 1 to {MAX_NAMESPACE_LEN} bytes without control characters"),
        ));
    }
    if !is_valid_identifier(key, MAX_KEY_LEN) {
        violations.push(FieldViolation::new(
            "key",
            format!("must be 1 to {MAX_KEY_LEN} bytes without control characters"),
        ));
    }
    let consistency = match pb::Consistency::try_from(consistency) {
        Ok(pb::Consistency::Unspecified) => None,
        Ok(pb::Consistency::Local) => Some(Consistency::Local),
        Ok(pb::Consistency::Owner) => Some(Consistency::Owner),
        Ok(pb::Consistency::Strict) | Err(_) => {
            violations.push(FieldViolation::new(
                "consistency",
                "leases are LOCAL or OWNER",
            ));
            None
        }
    };
    let ttl = match ttl {
        None => DEFAULT_LEASE_TTL,
        Some(d) => match duration_from_proto(d) {
            Some(ttl) if (MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) => ttl,
            _ => {
                violations.push(FieldViolation::new("ttl", "must be between 1s and 1h"));
                DEFAULT_LEASE_TTL
            }
        },
    };
    if !violations.is_empty() {
        return Err(RateLimitError::InvalidArgument(violations));
    }
    Ok((
        LeaseTarget {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            consistency,
        },
        ttl,
    ))
}

/// A lease or reservation id on the wire: 16 hex digits.
pub(crate) fn encode_id(id: u64) -> String {
    format!("{id:016x}")
}

/// A lease or reservation id as the server sent it: 16 hex digits.
fn decode_id(field: &str, text: &str, violations: &mut Vec<FieldViolation>) -> u64 {
    match u64::from_str_radix(text, 16) {
        Ok(id) if text.len() == 16 => id,
        _ => {
            violations.push(FieldViolation::new(
                field,
                "must be the 16 hex digits the server returned",
            ));
            0
        }
    }
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

/// Reservation lifetime when the caller gives none.
const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(600);
/// Longest reservation.
const MAX_RESERVATION_TTL: Duration = Duration::from_secs(24 * 3600);

/// The budget a call names, or every violation found (added to `violations`).
fn decode_budget_target(
    target: Option<pb::BudgetTarget>,
    mut violations: Vec<FieldViolation>,
) -> Result<BudgetTarget, RateLimitError> {
    let Some(t) = target else {
        violations.push(FieldViolation::new("target", "required"));
        return Err(RateLimitError::InvalidArgument(violations));
    };
    let spec = t.budget.unwrap_or_default();
    if spec.limit == 0 || spec.limit > crate::spec::MAX_LIMIT {
        violations.push(FieldViolation::new(
            "target.budget.limit",
            format!(
                "must be between 1 and {}, got {}",
                crate::spec::MAX_LIMIT,
                spec.limit
            ),
        ));
    }
    let window = match pb::BudgetWindow::try_from(spec.window) {
        Ok(pb::BudgetWindow::Hour) => BudgetWindow::Hour,
        Ok(pb::BudgetWindow::Day) => BudgetWindow::Day,
        Ok(pb::BudgetWindow::Month) => BudgetWindow::Month,
        Ok(pb::BudgetWindow::Unspecified) | Err(_) => {
            violations.push(FieldViolation::new(
                "target.budget.window",
                "must be HOUR, DAY or MONTH",
            ));
            BudgetWindow::Day
        }
    };
    let relabel =
        |v: FieldViolation| FieldViolation::new(format!("target.{}", v.field), v.description);
    let mut inner = Vec::new();
    let lease = decode_lease(&t.namespace, &t.key, t.consistency, None, Vec::new());
    if let Err(RateLimitError::InvalidArgument(v)) = &lease {
        inner.extend(v.iter().cloned().map(relabel));
    }
    violations.extend(inner);
    if !violations.is_empty() {
        return Err(RateLimitError::InvalidArgument(violations));
    }
    let (lease, _) = lease?;
    Ok(BudgetTarget {
        namespace: lease.namespace,
        key: lease.key,
        spec: BudgetSpec {
            limit: spec.limit,
            window,
        },
        consistency: lease.consistency,
    })
}

/// The wire form of a budget target (for forwarding to an owner).
pub(crate) fn encode_budget_target(
    t: &BudgetTarget,
    consistency: pb::Consistency,
) -> pb::BudgetTarget {
    pb::BudgetTarget {
        namespace: t.namespace.clone(),
        key: t.key.clone(),
        budget: Some(pb::BudgetSpec {
            limit: t.spec.limit,
            window: match t.spec.window {
                BudgetWindow::Hour => pb::BudgetWindow::Hour,
                BudgetWindow::Day => pb::BudgetWindow::Day,
                BudgetWindow::Month => pb::BudgetWindow::Month,
            } as i32,
        }),
        consistency: consistency as i32,
    }
}

const NANOS_PER_MS: u64 = 1_000_000;

fn encode_usage(u: &Usage) -> pb::BudgetUsage {
    pb::BudgetUsage {
        limit: u.limit,
        spent: u.spent,
        reserved: u.reserved,
        remaining: u.remaining,
        window_start_ms: u.window_start_nanos / NANOS_PER_MS,
        window_end_ms: u.window_end_nanos / NANOS_PER_MS,
    }
}

/// The domain form of usage an owner sent back.
pub(crate) fn decode_usage(u: pb::BudgetUsage) -> Usage {
    Usage {
        limit: u.limit,
        spent: u.spent,
        reserved: u.reserved,
        remaining: u.remaining,
        window_start_nanos: u.window_start_ms.saturating_mul(NANOS_PER_MS),
        window_end_nanos: u.window_end_ms.saturating_mul(NANOS_PER_MS),
    }
}

/// Checks a (namespace, name) pair used to address a stored policy.
fn validate_policy_ref(namespace: &str, name: &str) -> Result<(), RateLimitError> {
    let mut violations = Vec::new();
    if namespace.is_empty() {
        violations.push(FieldViolation::new("namespace", "required"));
    }
    if name.is_empty() {
        violations.push(FieldViolation::new("name", "required"));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RateLimitError::InvalidArgument(violations))
    }
}

fn decode_policy(policy: Option<pb::Policy>) -> Result<ScopedPolicy, RateLimitError> {
    let Some(policy) = policy else {
        return Err(RateLimitError::invalid("policy", "required"));
    };
    // Reuse the item decoder for the enums and the limit, then relabel its field paths.
    let probe = pb::CheckItem {
        namespace: policy.namespace.clone(),
        key: "-".to_owned(),
        cost: 0,
        limit_ref: policy.limit.map(pb::check_item::LimitRef::Limit),
        mode: policy.mode,
        consistency: policy.consistency,
        on_failure: policy.on_failure,
    };
    let mut violations = Vec::new();
    let item = decode_item(0, probe, &mut violations);
    let relabel = |v: FieldViolation| {
        FieldViolation::new(v.field.replacen("items[0]", "policy", 1), v.description)
    };
    if !violations.is_empty() {
        return Err(RateLimitError::InvalidArgument(
            violations.into_iter().map(relabel).collect(),
        ));
    }
    let LimitRef::Inline(spec) = item.limit else {
        return Err(RateLimitError::invalid("policy.limit", "required"));
    };
    let scoped = ScopedPolicy {
        namespace: policy.namespace,
        policy: Policy {
            name: policy.name,
            spec,
            mode: item.mode.unwrap_or_default(),
        },
        consistency: item.consistency,
        on_failure: item.on_failure,
        version: 0,
    };
    scoped.validate("policy")?;
    Ok(scoped)
}

fn encode_policy(p: &ScopedPolicy) -> pb::Policy {
    pb::Policy {
        namespace: p.namespace.clone(),
        name: p.policy.name.clone(),
        limit: Some(pb::LimitSpec {
            limit: p.policy.spec.limit,
            period: Some(duration_to_proto(p.policy.spec.period)),
            burst: p.policy.spec.burst,
            algorithm: encode_algorithm(p.policy.spec.algorithm),
        }),
        mode: encode_mode(p.policy.mode) as i32,
        consistency: p
            .consistency
            .map_or(pb::Consistency::Unspecified, encode_consistency) as i32,
        on_failure: p
            .on_failure
            .map_or(pb::FailurePolicy::Unspecified, encode_failure) as i32,
        version: p.version,
    }
}

impl RateLimiterGrpc {
    /// Answers a StreamCheck stream: up to [`STREAM_IN_FLIGHT`] requests are decided at once
    /// and answered as they finish; a stream error from the caller ends it.
    async fn serve_stream(
        self,
        mut inbound: Streaming<pb::StreamCheckRequest>,
        tx: mpsc::Sender<Result<pb::StreamCheckResponse, Status>>,
        deadline: Option<Instant>,
    ) {
        let mut in_flight = FuturesUnordered::new();
        let mut open = true;
        while open || !in_flight.is_empty() {
            tokio::select! {
                message = inbound.next(), if open && in_flight.len() < STREAM_IN_FLIGHT => match message {
                    Some(Ok(message)) => in_flight.push(self.answer(message, deadline)),
                    Some(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        return;
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
    }

    /// One StreamCheck answer: a failure is reported in the message, not by ending the stream.
    async fn answer(
        &self,
        message: pb::StreamCheckRequest,
        deadline: Option<Instant>,
    ) -> pb::StreamCheckResponse {
        let id = message.id;
        let result = match message.request {
            Some(request) => self.check(request, deadline, true).await,
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

fn stream_error(err: RateLimitError) -> pb::StreamCheckError {
    let field_violations = match &err {
        RateLimitError::InvalidArgument(violations) => violations
            .iter()
            .map(|v| pb::FieldViolation {
                field: v.field.clone(),
                description: v.description.clone(),
            })
            .collect(),
        _ => Vec::new(),
    };
    let status = Status::from(err);
    pb::StreamCheckError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        field_violations,
    }
}

fn decode_items(items: Vec<pb::CheckItem>) -> Result<Vec<CheckItem>, RateLimitError> {
    let mut violations = Vec::new();
    let decoded: Vec<CheckItem> = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| decode_item(i, item, &mut violations))
        .collect();
    if violations.is_empty() {
        Ok(decoded)
    } else {
        Err(RateLimitError::InvalidArgument(violations))
    }
}

/// Decodes one item; wire-level problems (bad enums, negative durations) become violations,
/// everything else is validated by the limiter.
fn decode_item(i: usize, item: pb::CheckItem, violations: &mut Vec<FieldViolation>) -> CheckItem {
    let limit = match item.limit_ref {
        None => LimitRef::Default,
        Some(pb::check_item::LimitRef::Policy(name)) => LimitRef::Policy(name),
        Some(pb::check_item::LimitRef::Limit(spec)) => {
            let algorithm = match pb::Algorithm::try_from(spec.algorithm) {
                Ok(pb::Algorithm::Unspecified | pb::Algorithm::Gcra) => Algorithm::Gcra,
                Ok(pb::Algorithm::FixedWindow) => Algorithm::FixedWindow,
                Ok(pb::Algorithm::SlidingWindow) => Algorithm::SlidingWindow,
                Err(_) => {
                    violations.push(FieldViolation::new(
                        format!("items[{i}].limit.algorithm"),
                        "unknown algorithm",
                    ));
                    Algorithm::Gcra
                }
            };
            let period = match spec.period {
                None => Duration::ZERO,
                Some(d) => duration_from_proto(&d).unwrap_or_else(|| {
                    violations.push(FieldViolation::new(
                        format!("items[{i}].limit.period"),
                        "must be a non-negative duration with 0 ≤ nanos < 10^9",
                    ));
                    Duration::ZERO
                }),
            };
            LimitRef::Inline(LimitSpec {
                limit: spec.limit,
                period,
                burst: spec.burst,
                algorithm,
            })
        }
    };
    let mode = match pb::Mode::try_from(item.mode) {
        Ok(pb::Mode::Unspecified) => None,
        Ok(pb::Mode::Enforce) => Some(Mode::Enforce),
        Ok(pb::Mode::Shadow) => Some(Mode::Shadow),
        Err(_) => {
            violations.push(FieldViolation::new(
                format!("items[{i}].mode"),
                "unknown mode",
            ));
            None
        }
    };
    let consistency = match pb::Consistency::try_from(item.consistency) {
        Ok(pb::Consistency::Unspecified) => None,
        Ok(pb::Consistency::Local) => Some(Consistency::Local),
        Ok(pb::Consistency::Owner) => Some(Consistency::Owner),
        Ok(pb::Consistency::Strict) => Some(Consistency::Strict),
        Err(_) => {
            violations.push(FieldViolation::new(
                format!("items[{i}].consistency"),
                "unknown consistency",
            ));
            None
        }
    };
    let on_failure = match pb::FailurePolicy::try_from(item.on_failure) {
        Ok(pb::FailurePolicy::Unspecified) => None,
        Ok(pb::FailurePolicy::FailOpen) => Some(FailurePolicy::FailOpen),
        Ok(pb::FailurePolicy::FailClosed) => Some(FailurePolicy::FailClosed),
        Ok(pb::FailurePolicy::LocalFallback) => Some(FailurePolicy::LocalFallback),
        Err(_) => {
            violations.push(FieldViolation::new(
                format!("items[{i}].on_failure"),
                "unknown failure policy",
            ));
            None
        }
    };
    CheckItem {
        namespace: item.namespace,
        key: item.key,
        cost: item.cost,
        limit,
        mode,
        consistency,
        on_failure,
    }
}

fn duration_from_proto(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs, nanos))
}

/// A proto duration; saturates at the largest value proto allows.
pub(crate) fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn encode_response(outcomes: &[CheckOutcome], instance_id: &str) -> pb::CheckResponse {
    let results: Vec<pb::CheckResult> = outcomes
        .iter()
        .map(|o| encode_outcome(o, instance_id))
        .collect();
    pb::CheckResponse {
        allowed: outcomes.iter().all(|o| o.allowed),
        results,
    }
}

fn encode_outcome(o: &CheckOutcome, instance_id: &str) -> pb::CheckResult {
    pb::CheckResult {
        decision: if o.allowed {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        } as i32,
        over_limit: o.over_limit,
        batch_rejected: o.batch_rejected,
        limit: o.limit,
        remaining: o.remaining,
        retry_after: o.retry_after.map(duration_to_proto),
        reset_after: Some(duration_to_proto(o.reset_after)),
        policy: o.policy.clone(),
        mode: encode_mode(o.mode) as i32,
        decided_by: o
            .decided_by
            .clone()
            .unwrap_or_else(|| instance_id.to_owned()),
        degraded: o.degraded.is_some(),
        degraded_reason: o
            .degraded
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        policy_version: o.policy_version,
    }
}

/// The wire form of a domain item (for forwarding to an owner).
pub(crate) fn encode_item(item: &CheckItem) -> pb::CheckItem {
    let limit_ref = match &item.limit {
        LimitRef::Default => None,
        LimitRef::Policy(name) => Some(pb::check_item::LimitRef::Policy(name.clone())),
        LimitRef::Inline(spec) => Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
            limit: spec.limit,
            period: Some(duration_to_proto(spec.period)),
            burst: spec.burst,
            algorithm: encode_algorithm(spec.algorithm),
        })),
    };
    pb::CheckItem {
        namespace: item.namespace.clone(),
        key: item.key.clone(),
        cost: item.cost,
        limit_ref,
        mode: item.mode.map_or(pb::Mode::Unspecified, encode_mode) as i32,
        consistency: item
            .consistency
            .map_or(pb::Consistency::Unspecified, encode_consistency) as i32,
        on_failure: item
            .on_failure
            .map_or(pb::FailurePolicy::Unspecified, encode_failure) as i32,
    }
}

/// The domain form of a result an owner sent back.
pub(crate) fn decode_result(r: &pb::CheckResult) -> CheckOutcome {
    CheckOutcome {
        allowed: r.decision == pb::Decision::Allow as i32,
        over_limit: r.over_limit,
        batch_rejected: r.batch_rejected,
        mode: if r.mode == pb::Mode::Shadow as i32 {
            Mode::Shadow
        } else {
            Mode::Enforce
        },
        policy: r.policy.clone(),
        limit: r.limit,
        remaining: r.remaining,
        retry_after: r.retry_after.as_ref().and_then(duration_from_proto),
        reset_after: r
            .reset_after
            .as_ref()
            .and_then(duration_from_proto)
            .unwrap_or_default(),
        policy_version: r.policy_version,
        degraded: None,
        decided_by: Some(r.decided_by.clone()).filter(|d| !d.is_empty()),
        consistency: Consistency::Owner,
    }
}

fn encode_algorithm(a: Algorithm) -> i32 {
    let algorithm = match a {
        Algorithm::Gcra => pb::Algorithm::Gcra,
        Algorithm::FixedWindow => pb::Algorithm::FixedWindow,
        Algorithm::SlidingWindow => pb::Algorithm::SlidingWindow,
    };
    algorithm as i32
}

fn encode_mode(m: Mode) -> pb::Mode {
    match m {
        Mode::Enforce => pb::Mode::Enforce,
        Mode::Shadow => pb::Mode::Shadow,
    }
}

fn encode_consistency(c: Consistency) -> pb::Consistency {
    match c {
        Consistency::Local => pb::Consistency::Local,
        Consistency::Owner => pb::Consistency::Owner,
        Consistency::Strict => pb::Consistency::Strict,
    }
}

fn encode_failure(f: FailurePolicy) -> pb::FailurePolicy {
    match f {
        FailurePolicy::FailOpen => pb::FailurePolicy::FailOpen,
        FailurePolicy::FailClosed => pb::FailurePolicy::FailClosed,
        FailurePolicy::LocalFallback => pb::FailurePolicy::LocalFallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_negative_period_is_a_field_violation() {
        let item = pb::CheckItem {
            namespace: "ns".into(),
            key: "k".into(),
            cost: 1,
            limit_ref: Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
                limit: 1,
                period: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                burst: 0,
                algorithm: 99,
            })),
            mode: 7,
            consistency: 0,
            on_failure: 0,
        };
        let err = decode_items(vec![item]).unwrap_err();
        let RateLimitError::InvalidArgument(v) = err else {
            panic!("expected invalid argument")
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "items[0].limit.algorithm",
                "items[0].limit.period",
                "items[0].mode"
            ]
        );
    }

    #[test]
    fn test_huge_durations_saturate_when_encoded() {
        assert_eq!(duration_to_proto(Duration::MAX).seconds, i64::MAX);
    }
}
