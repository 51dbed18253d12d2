//! Proto ↔ domain conversion for the pool. Decoding checks every bound and reports every bad
//! field at once; it knows only the wire types and the domain types.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_runtime::wire::{
    duration_from_proto, duration_to_proto, timestamp_from_ms, timestamp_to_ms,
};

use crate::config::{
    DEFAULT_DRAIN, DEFAULT_PAGE, DEFAULT_RESERVATION_TTL, DEFAULT_START_TO_CLOSE,
    MAX_AFFINITY_KEY_LEN, MAX_ATTEMPTS, MAX_BACKOFF, MAX_CAPACITY, MAX_DRAIN, MAX_ENTRIES,
    MAX_ID_LEN, MAX_IDEMPOTENCY_KEY, MAX_MESSAGE, MAX_PAGE, MAX_PAYLOAD, MAX_PRIORITY,
    MAX_RESERVATION_TTL, MAX_TASK_DEADLINE, MAX_VALUE_LEN, MAX_WEIGHT, MIN_RESERVATION_TTL,
};
use crate::error::{FieldViolation, SchedulerError};
use crate::pool::{
    AcquireRequest, AgentSpec, AgentState, AgentView, LoadReport, OnExpiry, Outcome, PoolStats,
    Reservation, Selector, StreamMessage,
};
use crate::select::Strategy;
use crate::tasks::{
    AgentUpdate, Attempt, RetryPolicy, Task, TaskSpec, TaskState, TypeSignals, UpdateKind,
};

/// Appends a violation unless `value` is an identifier: 1–128 bytes of visible ASCII.
fn identifier(value: &str, field: &str, out: &mut Vec<FieldViolation>) {
    if value.is_empty() || value.len() > MAX_ID_LEN || !value.bytes().all(|b| b.is_ascii_graphic())
    {
        out.push(FieldViolation::new(
            field,
            format!(
                "must be 1 to {MAX_ID_LEN} bytes of visible ASCII without spaces, got {} bytes",
                value.len()
            ),
        ));
    }
}

/// Appends a violation when `value` is longer than `max` or holds control characters.
fn text(value: &str, max: usize, field: &str, out: &mut Vec<FieldViolation>) {
    if value.len() > max || value.chars().any(char::is_control) {
        out.push(FieldViolation::new(
            field,
            format!(
                "must be at most {max} bytes without control characters, got {} bytes",
                value.len()
            ),
        ));
    }
}

fn map(
    entries: &std::collections::HashMap<String, String>,
    field: &str,
    out: &mut Vec<FieldViolation>,
) -> BTreeMap<String, String> {
    if entries.len() > MAX_ENTRIES {
        out.push(FieldViolation::new(
            field,
            format!("at most {MAX_ENTRIES} entries, got {}", entries.len()),
        ));
        return BTreeMap::new();
    }
    for (k, v) in entries {
        identifier(k, &format!("{field}[{}]", shown(k)), out);
        text(v, MAX_VALUE_LEN, &format!("{field}[{}]", shown(k)), out);
    }
    entries
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn list(values: &[String], field: &str, out: &mut Vec<FieldViolation>) {
    if values.len() > MAX_ENTRIES {
        out.push(FieldViolation::new(
            field,
            format!("at most {MAX_ENTRIES} entries, got {}", values.len()),
        ));
        return;
    }
    for (i, v) in values.iter().enumerate() {
        identifier(v, &format!("{field}[{i}]"), out);
    }
}

/// A key as shown in a field path: at most 32 characters, so an oversized key is not echoed.
fn shown(key: &str) -> String {
    key.chars().take(32).collect()
}

fn bounded(value: u32, default: u32, max: u32, field: &str, out: &mut Vec<FieldViolation>) -> u32 {
    match value {
        0 => default,
        v if v <= max => v,
        v => {
            out.push(FieldViolation::new(
                field,
                format!("must be 1 to {max} (0 = {default}), got {v}"),
            ));
            default
        }
    }
}

fn duration(
    value: Option<&prost_types::Duration>,
    default: Duration,
    (min, max): (Duration, Duration),
    field: &str,
    out: &mut Vec<FieldViolation>,
) -> Duration {
    match value {
        None => default,
        Some(d) => match duration_from_proto(d) {
            Some(d) if d >= min && d <= max => d,
            _ => {
                out.push(FieldViolation::new(
                    field,
                    format!("must be between {min:?} and {max:?}"),
                ));
                default
            }
        },
    }
}

fn done<T>(value: T, violations: Vec<FieldViolation>) -> Result<T, SchedulerError> {
    if violations.is_empty() {
        Ok(value)
    } else {
        Err(SchedulerError::InvalidArgument(violations))
    }
}

/// A registration: the agent's spec and the epoch to repeat (0 = new).
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_register(r: pb::RegisterAgentRequest) -> Result<(AgentSpec, u64), SchedulerError> {
    let mut v = Vec::new();
    identifier(&r.agent_id, "agent_id", &mut v);
    identifier(&r.r#type, "type", &mut v);
    let capabilities = map(&r.capabilities, "capabilities", &mut v);
    list(&r.tags, "tags", &mut v);
    let labels = map(&r.labels, "labels", &mut v);
    list(&r.task_types, "task_types", &mut v);
    let capacity = bounded(r.capacity, 1, MAX_CAPACITY, "capacity", &mut v);
    let weight = bounded(r.weight, 1, MAX_WEIGHT, "weight", &mut v);
    text(&r.zone, 64, "zone", &mut v);
    text(&r.endpoint, MAX_VALUE_LEN, "endpoint", &mut v);
    text(&r.version, 64, "version", &mut v);
    let spec = AgentSpec {
        agent_id: r.agent_id,
        agent_type: r.r#type,
        capabilities,
        tags: r.tags.into_iter().collect::<BTreeSet<_>>(),
        capacity,
        weight,
        zone: r.zone,
        endpoint: r.endpoint,
        version: r.version,
        labels,
        task_types: r.task_types.into_iter().collect(),
    };
    done((spec, r.epoch), v)
}

/// An agent id field.
///
/// # Errors
/// `InvalidArgument`.
pub fn decode_agent_id(agent_id: &str, field: &str) -> Result<(), SchedulerError> {
    let mut v = Vec::new();
    identifier(agent_id, field, &mut v);
    done((), v)
}

/// A selector (fields under `field`).
fn decode_selector(s: Option<pb::Selector>, field: &str, v: &mut Vec<FieldViolation>) -> Selector {
    let s = s.unwrap_or_default();
    if !s.r#type.is_empty() {
        identifier(&s.r#type, &format!("{field}.type"), v);
    }
    let capabilities = map(&s.capabilities, &format!("{field}.capabilities"), v);
    list(&s.tags, &format!("{field}.tags"), v);
    text(&s.zone, 64, &format!("{field}.zone"), v);
    Selector {
        agent_type: Some(s.r#type).filter(|t| !t.is_empty()),
        capabilities,
        tags: s.tags,
        zone: Some(s.zone).filter(|z| !z.is_empty()),
        task_type: None,
        tenant: crate::pool::TenantScope::Any,
    }
}

/// A heartbeat report.
#[must_use]
pub fn decode_report(r: &pb::LoadReport) -> LoadReport {
    LoadReport {
        sequence: r.sequence,
        cpu_percent: if r.cpu_percent.is_finite() {
            r.cpu_percent.max(0.0)
        } else {
            0.0
        },
        memory_bytes: r.memory_bytes,
        active: r.active,
        free_slots: r.free_slots,
        latency: r.latency.as_ref().and_then(duration_from_proto),
        errors: r.errors,
    }
}

fn encode_report(r: &LoadReport) -> pb::LoadReport {
    pb::LoadReport {
        sequence: r.sequence,
        cpu_percent: r.cpu_percent,
        memory_bytes: r.memory_bytes,
        active: r.active,
        free_slots: r.free_slots,
        latency: r.latency.map(duration_to_proto),
        errors: r.errors,
    }
}

/// A drain: agent, deadline, reason.
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_drain(
    r: pb::DrainAgentRequest,
) -> Result<(String, Duration, String, OnExpiry), SchedulerError> {
    let mut v = Vec::new();
    identifier(&r.agent_id, "agent_id", &mut v);
    let deadline = duration(
        r.deadline.as_ref(),
        DEFAULT_DRAIN,
        (Duration::ZERO, MAX_DRAIN),
        "deadline",
        &mut v,
    );
    text(&r.reason, MAX_VALUE_LEN, "reason", &mut v);
    let reason = if r.reason.is_empty() {
        "operator".to_owned()
    } else {
        r.reason
    };
    let on_expiry = match pb::DrainExpiry::try_from(r.on_expiry) {
        Ok(pb::DrainExpiry::Unspecified | pb::DrainExpiry::Requeue) => OnExpiry::Requeue,
        Ok(pb::DrainExpiry::Cancel) => OnExpiry::Cancel,
        Err(_) => {
            v.push(FieldViolation::new(
                "on_expiry",
                format!("unknown value {}", r.on_expiry),
            ));
            OnExpiry::Requeue
        }
    };
    done((r.agent_id, deadline, reason, on_expiry), v)
}

/// A listing: selector, state, page size, the id to start after.
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_list(
    r: pb::ListAgentsRequest,
) -> Result<(Selector, Option<AgentState>, usize, String), SchedulerError> {
    let mut v = Vec::new();
    let selector = decode_selector(r.selector, "selector", &mut v);
    let state = match pb::AgentState::try_from(r.state) {
        Ok(pb::AgentState::Unspecified) => None,
        Ok(s) => decode_state(s),
        Err(_) => {
            v.push(FieldViolation::new(
                "state",
                format!("unknown state {}", r.state),
            ));
            None
        }
    };
    let limit = match usize::try_from(r.limit) {
        Ok(0) => DEFAULT_PAGE,
        Ok(n) if n <= MAX_PAGE => n,
        _ => {
            v.push(FieldViolation::new(
                "limit",
                format!("must be 1 to {MAX_PAGE} (0 = {DEFAULT_PAGE})"),
            ));
            DEFAULT_PAGE
        }
    };
    if !r.page_token.is_empty() {
        identifier(&r.page_token, "page_token", &mut v);
    }
    done((selector, state, limit, r.page_token), v)
}

/// An acquisition.
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_acquire(r: pb::AcquireAgentRequest) -> Result<AcquireRequest, SchedulerError> {
    let mut v = Vec::new();
    let selector = decode_selector(r.selector, "selector", &mut v);
    let strategy = match pb::Strategy::try_from(r.strategy) {
        Ok(s) => decode_strategy(s),
        Err(_) => {
            v.push(FieldViolation::new(
                "strategy",
                format!("unknown strategy {}", r.strategy),
            ));
            Strategy::Adaptive
        }
    };
    if r.affinity_key.len() > MAX_AFFINITY_KEY_LEN {
        v.push(FieldViolation::new(
            "affinity_key",
            format!(
                "must be at most {MAX_AFFINITY_KEY_LEN} bytes, got {}",
                r.affinity_key.len()
            ),
        ));
    }
    if strategy == Strategy::ConsistentHash && r.affinity_key.is_empty() {
        v.push(FieldViolation::new(
            "affinity_key",
            "required with CONSISTENT_HASH",
        ));
    }
    list(&r.exclude, "exclude", &mut v);
    let ttl = duration(
        r.ttl.as_ref(),
        DEFAULT_RESERVATION_TTL,
        (MIN_RESERVATION_TTL, MAX_RESERVATION_TTL),
        "ttl",
        &mut v,
    );
    done(
        AcquireRequest {
            selector,
            strategy,
            affinity_key: r.affinity_key.into_bytes(),
            exclude: r.exclude,
            ttl,
        },
        v,
    )
}

/// A release: reservation id, outcome, latency.
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_release(
    r: &pb::ReleaseAgentRequest,
) -> Result<(u128, Outcome, Option<Duration>), SchedulerError> {
    let mut v = Vec::new();
    let id = if r.reservation_id.len() == 32
        && r.reservation_id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        u128::from_str_radix(&r.reservation_id, 16).unwrap_or(0)
    } else {
        v.push(FieldViolation::new(
            "reservation_id",
            "must be the 32 hex digits AcquireAgent returned",
        ));
        0
    };
    let outcome = match pb::Outcome::try_from(r.outcome) {
        Ok(pb::Outcome::Unspecified | pb::Outcome::Success) => Outcome::Success,
        Ok(pb::Outcome::Failure) => Outcome::Failure,
        Ok(pb::Outcome::Cancelled) => Outcome::Cancelled,
        Err(_) => {
            v.push(FieldViolation::new(
                "outcome",
                format!("unknown outcome {}", r.outcome),
            ));
            Outcome::Success
        }
    };
    let latency = match r.latency.as_ref().map(duration_from_proto) {
        None => None,
        Some(Some(d)) => Some(d),
        Some(None) => {
            v.push(FieldViolation::new("latency", "must not be negative"));
            None
        }
    };
    done((id, outcome, latency), v)
}

fn decode_strategy(s: pb::Strategy) -> Strategy {
    match s {
        pb::Strategy::RoundRobin => Strategy::RoundRobin,
        pb::Strategy::WeightedRoundRobin => Strategy::WeightedRoundRobin,
        pb::Strategy::LeastLoaded => Strategy::LeastLoaded,
        pb::Strategy::PowerOfTwo => Strategy::PowerOfTwo,
        pb::Strategy::ConsistentHash => Strategy::ConsistentHash,
        pb::Strategy::Unspecified | pb::Strategy::Adaptive => Strategy::Adaptive,
    }
}

fn decode_state(s: pb::AgentState) -> Option<AgentState> {
    match s {
        pb::AgentState::Unspecified => None,
        pb::AgentState::Pending => Some(AgentState::Pending),
        pb::AgentState::Ready => Some(AgentState::Ready),
        pb::AgentState::Suspect => Some(AgentState::Suspect),
        pb::AgentState::Draining => Some(AgentState::Draining),
        pb::AgentState::Dead => Some(AgentState::Dead),
    }
}

/// The wire state.
#[must_use]
pub fn encode_state(s: AgentState) -> pb::AgentState {
    match s {
        AgentState::Pending => pb::AgentState::Pending,
        AgentState::Ready => pb::AgentState::Ready,
        AgentState::Suspect => pb::AgentState::Suspect,
        AgentState::Draining => pb::AgentState::Draining,
        AgentState::Dead => pb::AgentState::Dead,
    }
}

/// An agent on the wire.
#[must_use]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "latency ms ≥ 0"
)]
pub fn encode_agent(a: &AgentView) -> pb::Agent {
    pb::Agent {
        agent_id: a.spec.agent_id.clone(),
        epoch: a.epoch,
        r#type: a.spec.agent_type.clone(),
        capabilities: a.spec.capabilities.clone().into_iter().collect(),
        tags: a.spec.tags.iter().cloned().collect(),
        capacity: a.spec.capacity,
        weight: a.spec.weight,
        zone: a.spec.zone.clone(),
        endpoint: a.spec.endpoint.clone(),
        version: a.spec.version.clone(),
        labels: a.spec.labels.clone().into_iter().collect(),
        state: encode_state(a.state) as i32,
        in_flight: a.in_flight,
        free_slots: a.free_slots,
        latency_ewma: Some(duration_to_proto(Duration::from_micros(
            (a.latency_ms * 1000.0) as u64,
        ))),
        phi: a.phi,
        breaker: match a.breaker {
            agentmesh_runtime::breaker::BreakerPhase::Closed => "closed",
            agentmesh_runtime::breaker::BreakerPhase::Open => "open",
            agentmesh_runtime::breaker::BreakerPhase::HalfOpen => "half_open",
        }
        .to_owned(),
        last_report: a.last_report.as_ref().map(encode_report),
        registered_at: Some(timestamp_from_ms(a.registered_wall_ms)),
        last_seen: Some(timestamp_from_ms(a.last_seen_wall_ms)),
        drain_deadline: a.drain_deadline_wall_ms.map(timestamp_from_ms),
        task_types: a.spec.task_types.iter().cloned().collect(),
    }
}

/// A reservation on the wire.
#[must_use]
pub fn encode_reservation(r: &Reservation) -> pb::AcquireAgentResponse {
    pb::AcquireAgentResponse {
        reservation_id: format!("{:032x}", r.id),
        agent: Some(encode_agent(&r.agent)),
        expires_at: Some(timestamp_from_ms(r.expires_wall_ms)),
    }
}

/// Pool counts on the wire.
#[must_use]
pub fn encode_stats(
    s: &PoolStats,
    signals: &BTreeMap<String, TypeSignals>,
    instance: &str,
) -> pb::PoolStats {
    pb::PoolStats {
        task_types: signals
            .iter()
            .map(|(t, x)| pb::TaskTypeStats {
                r#type: t.clone(),
                queued: x.queued,
                running: x.running,
                oldest_wait: Some(duration_to_proto(x.oldest_wait)),
                agents: x.agents,
                slots: x.slots,
                desired_agents: x.desired_agents,
            })
            .collect(),
        agents_by_state: s
            .by_state
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        agents_by_type: s.by_type.clone().into_iter().collect(),
        capacity: s.capacity,
        in_flight: s.in_flight,
        reservations: s.reservations,
        instance: instance.to_owned(),
    }
}

/// A stream message on the wire, or the error that ends the stream.
///
/// # Errors
/// `Close` becomes the error that ends the stream.
pub fn encode_stream_message(m: StreamMessage) -> Result<pb::HeartbeatResponse, SchedulerError> {
    use pb::heartbeat_response::Kind;
    let kind = match m {
        StreamMessage::Ack { sequence, state } => Kind::Ack(pb::Ack {
            sequence,
            state: encode_state(state) as i32,
        }),
        StreamMessage::Drain {
            deadline_wall_ms,
            reason,
        } => Kind::Drain(pb::Drain {
            deadline: Some(timestamp_from_ms(deadline_wall_ms)),
            reason,
        }),
        StreamMessage::Assign(a) => Kind::Assign(pb::TaskAssignment {
            task_id: a.task_id,
            attempt: a.attempt,
            r#type: a.task_type,
            payload: a.payload,
            deadline: Some(timestamp_from_ms(a.deadline_wall_ms)),
            heartbeat_timeout: a.heartbeat_timeout.map(duration_to_proto),
            trace_context: a.trace_context.into_iter().collect(),
        }),
        StreamMessage::Cancel {
            task_id,
            attempt,
            reason,
        } => Kind::Cancel(pb::TaskCancel {
            task_id,
            attempt,
            reason,
        }),
        StreamMessage::Close(e) => return Err(e),
    };
    Ok(pb::HeartbeatResponse { kind: Some(kind) })
}

/// A task id field: the 32 hex digits SubmitTask returned.
///
/// # Errors
/// `InvalidArgument`.
pub fn decode_task_id(id: &str, field: &str) -> Result<(), SchedulerError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(SchedulerError::invalid(
            field,
            "must be the 32 hex digits SubmitTask returned",
        ))
    }
}

fn decode_retry(r: Option<&pb::RetryPolicy>, v: &mut Vec<FieldViolation>) -> RetryPolicy {
    let d = RetryPolicy::default();
    let Some(r) = r else {
        return d;
    };
    let max_attempts = bounded(
        r.max_attempts,
        d.max_attempts,
        MAX_ATTEMPTS,
        "retry.max_attempts",
        v,
    );
    let initial_backoff = duration(
        r.initial_backoff.as_ref(),
        d.initial_backoff,
        (Duration::ZERO, MAX_BACKOFF),
        "retry.initial_backoff",
        v,
    );
    let max_backoff = duration(
        r.max_backoff.as_ref(),
        d.max_backoff,
        (Duration::ZERO, MAX_BACKOFF),
        "retry.max_backoff",
        v,
    );
    let multiplier = if r.backoff_multiplier == 0.0 {
        d.multiplier
    } else if (1.0..=10.0).contains(&r.backoff_multiplier) {
        r.backoff_multiplier
    } else {
        v.push(FieldViolation::new(
            "retry.backoff_multiplier",
            "must be between 1 and 10 (0 = 2)",
        ));
        d.multiplier
    };
    RetryPolicy {
        max_attempts,
        initial_backoff,
        multiplier,
        max_backoff,
    }
}

fn optional_duration(
    value: Option<&prost_types::Duration>,
    max: Duration,
    field: &str,
    v: &mut Vec<FieldViolation>,
) -> Option<Duration> {
    let d = duration(value, Duration::ZERO, (Duration::ZERO, max), field, v);
    (!d.is_zero()).then_some(d)
}

/// A submit; `trace_context` is the caller's (W3C), kept with the task.
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_submit(
    r: pb::SubmitTaskRequest,
    trace_context: BTreeMap<String, String>,
) -> Result<TaskSpec, SchedulerError> {
    let mut v = Vec::new();
    identifier(&r.r#type, "type", &mut v);
    if r.payload.len() > MAX_PAYLOAD {
        v.push(FieldViolation::new(
            "payload",
            format!(
                "must be at most {MAX_PAYLOAD} bytes, got {}",
                r.payload.len()
            ),
        ));
    }
    let selector = decode_selector(r.selector, "selector", &mut v);
    if !r.idempotency_key.is_empty() {
        text(
            &r.idempotency_key,
            MAX_IDEMPOTENCY_KEY,
            "idempotency_key",
            &mut v,
        );
    }
    if r.priority > MAX_PRIORITY {
        v.push(FieldViolation::new(
            "priority",
            format!("must be 0 to {MAX_PRIORITY}, got {}", r.priority),
        ));
    }
    let schedule_to_start = optional_duration(
        r.schedule_to_start.as_ref(),
        MAX_TASK_DEADLINE,
        "schedule_to_start",
        &mut v,
    );
    let start_to_close = duration(
        r.start_to_close.as_ref(),
        DEFAULT_START_TO_CLOSE,
        (Duration::from_secs(1), MAX_TASK_DEADLINE),
        "start_to_close",
        &mut v,
    );
    let heartbeat_timeout = optional_duration(
        r.heartbeat_timeout.as_ref(),
        MAX_TASK_DEADLINE,
        "heartbeat_timeout",
        &mut v,
    );
    if heartbeat_timeout.is_some_and(|hb| hb > start_to_close) {
        v.push(FieldViolation::new(
            "heartbeat_timeout",
            "must not be longer than start_to_close",
        ));
    }
    let retry = decode_retry(r.retry.as_ref(), &mut v);
    let labels = map(&r.labels, "labels", &mut v);
    done(
        TaskSpec {
            task_type: r.r#type,
            payload: r.payload.into(),
            selector,
            idempotency_key: r.idempotency_key,
            priority: r.priority.min(MAX_PRIORITY),
            schedule_to_start,
            start_to_close,
            heartbeat_timeout,
            retry,
            labels,
            trace_context,
        },
        v,
    )
}

/// A ListTasks request: state, type, page size, the id to list before.
///
/// # Errors
/// `InvalidArgument` naming every bad field.
pub fn decode_list_tasks(
    r: pb::ListTasksRequest,
) -> Result<(Option<TaskState>, Option<String>, usize, String), SchedulerError> {
    let mut v = Vec::new();
    let state = match pb::TaskState::try_from(r.state) {
        Ok(s) => decode_task_state(s),
        Err(_) => {
            v.push(FieldViolation::new(
                "state",
                format!("unknown state {}", r.state),
            ));
            None
        }
    };
    if !r.r#type.is_empty() {
        identifier(&r.r#type, "type", &mut v);
    }
    let limit = match usize::try_from(r.limit) {
        Ok(0) => DEFAULT_PAGE,
        Ok(n) if n <= MAX_PAGE => n,
        _ => {
            v.push(FieldViolation::new(
                "limit",
                format!("must be 1 to {MAX_PAGE} (0 = {DEFAULT_PAGE})"),
            ));
            DEFAULT_PAGE
        }
    };
    if !r.page_token.is_empty() && decode_task_id(&r.page_token, "page_token").is_err() {
        v.push(FieldViolation::new(
            "page_token",
            "must be the next_page_token of the previous page",
        ));
    }
    done(
        (
            state,
            Some(r.r#type).filter(|t| !t.is_empty()),
            limit,
            r.page_token,
        ),
        v,
    )
}

/// An agent's task update.
///
/// # Errors
/// `InvalidArgument` naming every bad field (the stream is ended with it).
pub fn decode_task_update(u: pb::TaskUpdate) -> Result<AgentUpdate, SchedulerError> {
    let mut v = Vec::new();
    if decode_task_id(&u.task_id, "task.task_id").is_err() {
        v.push(FieldViolation::new(
            "task.task_id",
            "must be the task_id of an assignment",
        ));
    }
    if u.attempt == 0 {
        v.push(FieldViolation::new(
            "task.attempt",
            "must be the attempt of the assignment (≥ 1)",
        ));
    }
    if u.message.len() > MAX_MESSAGE {
        v.push(FieldViolation::new(
            "task.message",
            format!("must be at most {MAX_MESSAGE} bytes"),
        ));
    }
    if u.output.len() > MAX_PAYLOAD {
        v.push(FieldViolation::new(
            "task.output",
            format!("must be at most {MAX_PAYLOAD} bytes"),
        ));
    }
    let kind = match pb::TaskUpdateKind::try_from(u.kind) {
        Ok(pb::TaskUpdateKind::Started) => UpdateKind::Started,
        Ok(pb::TaskUpdateKind::Progress) => UpdateKind::Progress {
            progress: (u.progress.is_finite() && u.progress > 0.0).then_some(u.progress.min(1.0)),
            message: u.message,
        },
        Ok(pb::TaskUpdateKind::Succeeded) => UpdateKind::Succeeded {
            output: u.output.into(),
        },
        Ok(pb::TaskUpdateKind::Failed) => UpdateKind::Failed {
            message: u.message,
            retryable: u.retryable,
        },
        Ok(pb::TaskUpdateKind::Unspecified) | Err(_) => {
            v.push(FieldViolation::new(
                "task.kind",
                "must be STARTED, PROGRESS, SUCCEEDED or FAILED",
            ));
            UpdateKind::Started
        }
    };
    done(
        AgentUpdate {
            task_id: u.task_id,
            attempt: u.attempt,
            kind,
        },
        v,
    )
}

fn decode_task_state(s: pb::TaskState) -> Option<TaskState> {
    match s {
        pb::TaskState::Unspecified => None,
        pb::TaskState::Pending => Some(TaskState::Pending),
        pb::TaskState::Assigned => Some(TaskState::Assigned),
        pb::TaskState::Running => Some(TaskState::Running),
        pb::TaskState::Succeeded => Some(TaskState::Succeeded),
        pb::TaskState::Failed => Some(TaskState::Failed),
        pb::TaskState::TimedOut => Some(TaskState::TimedOut),
        pb::TaskState::Cancelled => Some(TaskState::Cancelled),
    }
}

/// The wire task state.
#[must_use]
pub fn encode_task_state(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Assigned => pb::TaskState::Assigned,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::TimedOut => pb::TaskState::TimedOut,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

fn encode_selector(s: &Selector) -> pb::Selector {
    pb::Selector {
        r#type: s.agent_type.clone().unwrap_or_default(),
        capabilities: s.capabilities.clone().into_iter().collect(),
        tags: s.tags.clone(),
        zone: s.zone.clone().unwrap_or_default(),
    }
}

/// A task on the wire (and in the Redis store).
#[must_use]
pub fn encode_task(t: &Task) -> pb::Task {
    let spec = &t.spec;
    pb::Task {
        task_id: t.id.clone(),
        r#type: spec.task_type.clone(),
        state: encode_task_state(t.state) as i32,
        attempt: t.attempt(),
        // The current attempt's agent; for an ended task, its last attempt's.
        agent_id: t
            .agent_id()
            .or_else(|| {
                t.state
                    .is_terminal()
                    .then(|| t.attempts.last().map(|a| a.agent_id.as_str()))
                    .flatten()
            })
            .unwrap_or_default()
            .to_owned(),
        priority: spec.priority,
        payload: spec.payload.to_vec(),
        selector: Some(encode_selector(&spec.selector)),
        idempotency_key: spec.idempotency_key.clone(),
        created_at: Some(timestamp_from_ms(t.created_wall_ms)),
        updated_at: Some(timestamp_from_ms(t.updated_wall_ms)),
        progress: t.progress,
        message: t.message.clone(),
        output: t.output.to_vec(),
        error: t.error.clone(),
        attempts: t
            .attempts
            .iter()
            .map(|a| pb::TaskAttempt {
                number: a.number,
                agent_id: a.agent_id.clone(),
                assigned_at: Some(timestamp_from_ms(a.assigned_wall_ms)),
                started_at: a.started_wall_ms.map(timestamp_from_ms),
                ended_at: a.ended_wall_ms.map(timestamp_from_ms),
                outcome: a.outcome.clone(),
            })
            .collect(),
        not_before: t.not_before_wall_ms.map(timestamp_from_ms),
        schedule_to_start: spec.schedule_to_start.map(duration_to_proto),
        start_to_close: Some(duration_to_proto(spec.start_to_close)),
        heartbeat_timeout: spec.heartbeat_timeout.map(duration_to_proto),
        retry: Some(pb::RetryPolicy {
            max_attempts: spec.retry.max_attempts,
            initial_backoff: Some(duration_to_proto(spec.retry.initial_backoff)),
            backoff_multiplier: spec.retry.multiplier,
            max_backoff: Some(duration_to_proto(spec.retry.max_backoff)),
        }),
        labels: spec.labels.clone().into_iter().collect(),
        trace_context: spec.trace_context.clone().into_iter().collect(),
    }
}

/// A task as the store keeps it (an encoded [`pb::Task`]); `None` when it does not make sense.
#[must_use]
pub fn decode_stored_task(t: pb::Task) -> Option<Task> {
    let state = decode_task_state(pb::TaskState::try_from(t.state).ok()?)?;
    let ms = |ts: Option<&prost_types::Timestamp>| ts.and_then(timestamp_to_ms);
    let retry = t
        .retry
        .as_ref()
        .map_or_else(RetryPolicy::default, |r| RetryPolicy {
            max_attempts: r.max_attempts.max(1),
            initial_backoff: r
                .initial_backoff
                .as_ref()
                .and_then(duration_from_proto)
                .unwrap_or_default(),
            multiplier: if r.backoff_multiplier >= 1.0 {
                r.backoff_multiplier
            } else {
                1.0
            },
            max_backoff: r
                .max_backoff
                .as_ref()
                .and_then(duration_from_proto)
                .unwrap_or_default(),
        });
    let mut v = Vec::new();
    let selector = decode_selector(t.selector, "selector", &mut v);
    Some(Task {
        spec: TaskSpec {
            task_type: t.r#type,
            payload: t.payload.into(),
            selector,
            idempotency_key: t.idempotency_key,
            priority: t.priority.min(MAX_PRIORITY),
            schedule_to_start: t.schedule_to_start.as_ref().and_then(duration_from_proto),
            start_to_close: t
                .start_to_close
                .as_ref()
                .and_then(duration_from_proto)
                .unwrap_or(DEFAULT_START_TO_CLOSE),
            heartbeat_timeout: t.heartbeat_timeout.as_ref().and_then(duration_from_proto),
            retry,
            labels: t.labels.into_iter().collect(),
            trace_context: t.trace_context.into_iter().collect(),
        },
        id: t.task_id,
        state,
        attempts: t
            .attempts
            .into_iter()
            .map(|a| Attempt {
                number: a.number,
                agent_id: a.agent_id,
                assigned_wall_ms: ms(a.assigned_at.as_ref()).unwrap_or(0),
                started_wall_ms: ms(a.started_at.as_ref()),
                ended_wall_ms: ms(a.ended_at.as_ref()),
                outcome: a.outcome,
            })
            .collect(),
        created_wall_ms: ms(t.created_at.as_ref()).unwrap_or(0),
        updated_wall_ms: ms(t.updated_at.as_ref()).unwrap_or(0),
        progress: t.progress,
        message: t.message,
        output: t.output.into(),
        error: t.error,
        not_before_wall_ms: ms(t.not_before.as_ref()),
    })
}
