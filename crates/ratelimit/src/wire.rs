//! Proto ↔ domain conversion for the rate limiter: it knows the wire types and the domain
//! types and nothing else, so both the inbound adapter (`grpc`, `envoy`) and the outbound peer
//! calls (`router`) use it without depending on each other. Decoding checks every bound and
//! reports every bad field at once.

use std::time::Duration;

use agentmesh_proto::ratelimit::v1 as pb;
use tonic::Status;

use crate::budget::{BudgetSpec, BudgetWindow, ListedBudget, Usage};
use crate::calls::{
    BudgetQuery, BudgetRef, BudgetTarget, DEFAULT_LISTED_KEYS, HeldBudget, LeaseTarget,
    MAX_LISTED_KEYS, NamespaceUsage,
};
use crate::concurrency::{DEFAULT_LEASE_TTL, MAX_LEASE_TTL, MIN_LEASE_TTL};
use crate::error::{FieldViolation, RateLimitError};
use crate::limiter::{CheckItem, CheckOutcome, LimitRef};
use crate::spec::{
    Algorithm, Consistency, FailurePolicy, LimitSpec, MAX_KEY_LEN, MAX_NAMESPACE_LEN, Mode,
    PolicyBody, ScopedPolicy, validate_budget_limit, validate_identifier, validate_policy_name,
    validate_stored_namespace,
};

/// Metadata a peer sets on a forwarded Check, so the owner does not count the decisions again.
pub(crate) const FORWARDED_HEADER: &str = "agentmesh-forwarded";

/// Reservation lifetime when the caller gives none.
pub(crate) const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(600);
/// Longest reservation.
pub(crate) const MAX_RESERVATION_TTL: Duration = Duration::from_secs(24 * 3600);

/// The budget a call names, or every violation found (added to `violations`).
pub(crate) fn decode_budget_target(
    target: Option<pb::BudgetTarget>,
    mut violations: Vec<FieldViolation>,
) -> Result<BudgetTarget, RateLimitError> {
    let Some(t) = target else {
        violations.push(FieldViolation::new("target", "required"));
        return Err(RateLimitError::InvalidArgument(violations));
    };
    let budget = match (t.budget, t.policy.is_empty()) {
        (Some(_), false) => {
            violations.push(FieldViolation::new(
                "target.policy",
                "set either target.budget (an inline budget) or target.policy (a budget \
                 policy), not both",
            ));
            None
        }
        (None, true) => {
            violations.push(FieldViolation::new(
                "target.budget",
                "required: an inline budget, or name a budget policy in target.policy",
            ));
            None
        }
        (None, false) => {
            validate_policy_name(&t.policy, "target.policy", &mut violations);
            Some(BudgetRef::Policy(t.policy))
        }
        (Some(spec), true) => Some(BudgetRef::Inline(decode_budget_spec(
            spec,
            "target.budget",
            &mut violations,
        ))),
    };
    let relabel =
        |v: FieldViolation| FieldViolation::new(format!("target.{}", v.field), v.description);
    let lease = decode_lease(&t.namespace, &t.key, t.consistency, None, Vec::new());
    if let Err(RateLimitError::InvalidArgument(v)) = &lease {
        violations.extend(v.iter().cloned().map(relabel));
    }
    if !violations.is_empty() {
        return Err(RateLimitError::InvalidArgument(violations));
    }
    let (lease, _) = lease?;
    Ok(BudgetTarget {
        namespace: lease.namespace,
        key: lease.key,
        budget: budget.ok_or_else(|| RateLimitError::invalid("target.budget", "required"))?,
        consistency: lease.consistency,
    })
}

/// A budget spec from the wire; bad fields become violations under `prefix`.
pub(crate) fn decode_budget_spec(
    spec: pb::BudgetSpec,
    prefix: &str,
    violations: &mut Vec<FieldViolation>,
) -> BudgetSpec {
    validate_budget_limit(spec.limit, &format!("{prefix}.limit"), violations);
    let window = decode_window(spec.window).unwrap_or_else(|| {
        violations.push(FieldViolation::new(
            format!("{prefix}.window"),
            "must be HOUR, DAY or MONTH",
        ));
        BudgetWindow::Day
    });
    BudgetSpec {
        limit: spec.limit,
        window,
    }
}

pub(crate) fn decode_window(window: i32) -> Option<BudgetWindow> {
    match pb::BudgetWindow::try_from(window) {
        Ok(pb::BudgetWindow::Hour) => Some(BudgetWindow::Hour),
        Ok(pb::BudgetWindow::Day) => Some(BudgetWindow::Day),
        Ok(pb::BudgetWindow::Month) => Some(BudgetWindow::Month),
        Ok(pb::BudgetWindow::Unspecified) | Err(_) => None,
    }
}

pub(crate) fn encode_window(window: BudgetWindow) -> pb::BudgetWindow {
    match window {
        BudgetWindow::Hour => pb::BudgetWindow::Hour,
        BudgetWindow::Day => pb::BudgetWindow::Day,
        BudgetWindow::Month => pb::BudgetWindow::Month,
    }
}

pub(crate) fn encode_budget_spec(spec: &BudgetSpec) -> pb::BudgetSpec {
    pb::BudgetSpec {
        limit: spec.limit,
        window: encode_window(spec.window) as i32,
    }
}

/// The wire form of an inline budget target (for forwarding to an owner).
pub(crate) fn encode_budget_target(
    namespace: &str,
    key: &str,
    spec: &BudgetSpec,
    consistency: pb::Consistency,
) -> pb::BudgetTarget {
    pb::BudgetTarget {
        namespace: namespace.to_owned(),
        key: key.to_owned(),
        budget: Some(encode_budget_spec(spec)),
        consistency: consistency as i32,
        policy: String::new(),
    }
}

/// What a GetUsage asks for.
#[derive(Debug)]
pub(crate) enum UsageQuery {
    /// One budget.
    One(BudgetTarget),
    /// Every budget of a namespace.
    Namespace(BudgetQuery),
}

/// A GetUsage request: `target` for one budget, else `namespace` (with its page bound,
/// cursor and consistency) for all of a namespace's; every violation at once.
pub(crate) fn decode_usage_request(r: pb::GetUsageRequest) -> Result<UsageQuery, RateLimitError> {
    let mut violations = Vec::new();
    if let Some(target) = r.target {
        let mut only_without_target = |field: &str, set: bool| {
            if set {
                violations.push(FieldViolation::new(
                    field,
                    "only for a namespace listing: leave it unset when target is set",
                ));
            }
        };
        only_without_target("namespace", !r.namespace.is_empty());
        only_without_target("limit", r.limit != 0);
        only_without_target("start_after", !r.start_after.is_empty());
        only_without_target("consistency", r.consistency != 0);
        return decode_budget_target(Some(target), violations).map(UsageQuery::One);
    }
    if r.namespace.is_empty() {
        violations.push(FieldViolation::new(
            "namespace",
            "required: the namespace whose budgets to list (or set target for one budget)",
        ));
    } else {
        validate_identifier(
            &r.namespace,
            "namespace",
            MAX_NAMESPACE_LEN,
            &mut violations,
        );
    }
    let max_keys = match usize::try_from(r.limit) {
        Ok(0) => DEFAULT_LISTED_KEYS,
        Ok(n) if n <= MAX_LISTED_KEYS => n,
        _ => {
            violations.push(FieldViolation::new(
                "limit",
                format!(
                    "must be at most {MAX_LISTED_KEYS} (0 = {DEFAULT_LISTED_KEYS}), got {}",
                    r.limit
                ),
            ));
            DEFAULT_LISTED_KEYS
        }
    };
    if r.start_after.len() > MAX_KEY_LEN {
        violations.push(FieldViolation::new(
            "start_after",
            format!(
                "must be at most {MAX_KEY_LEN} bytes, got {}",
                r.start_after.len()
            ),
        ));
    }
    let local_only = match pb::Consistency::try_from(r.consistency) {
        Ok(pb::Consistency::Local) => true,
        Ok(pb::Consistency::Unspecified | pb::Consistency::Owner) => false,
        Ok(pb::Consistency::Strict) | Err(_) => {
            violations.push(FieldViolation::new(
                "consistency",
                "LOCAL (this instance's budgets) or OWNER/unset (every live member's)",
            ));
            false
        }
    };
    if !violations.is_empty() {
        return Err(RateLimitError::InvalidArgument(violations));
    }
    Ok(UsageQuery::Namespace(BudgetQuery {
        namespace: r.namespace,
        start_after: r.start_after,
        max_keys,
        local_only,
    }))
}

pub(crate) fn encode_namespace_usage(listing: NamespaceUsage) -> pb::GetUsageResponse {
    let next_start_after = if listing.truncated {
        listing
            .budgets
            .last()
            .map(|b| b.budget.key.clone())
            .unwrap_or_default()
    } else {
        String::new()
    };
    pb::GetUsageResponse {
        usage: None,
        keys: listing
            .budgets
            .into_iter()
            .map(|b| pb::KeyUsage {
                window: encode_window(b.budget.window) as i32,
                usage: Some(encode_usage(&b.budget.usage)),
                key: b.budget.key,
                held_by: b.held_by,
            })
            .collect(),
        truncated: listing.truncated,
        next_start_after,
        unreachable: listing.unreachable,
    }
}

/// The domain form of one budget a peer listed; `None` when it is malformed.
pub(crate) fn decode_key_usage(k: pb::KeyUsage) -> Option<HeldBudget> {
    Some(HeldBudget {
        budget: ListedBudget {
            window: decode_window(k.window)?,
            usage: decode_usage(k.usage?),
            key: k.key,
        },
        held_by: k.held_by,
    })
}

pub(crate) const NANOS_PER_MS: u64 = 1_000_000;

pub(crate) fn encode_usage(u: &Usage) -> pb::BudgetUsage {
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
/// A stored policy's namespace and name, bounded as `PutPolicy` bounds them (so nothing
/// oversized reaches etcd, and a NOT_FOUND message echoes at most a valid name).
pub(crate) fn validate_policy_ref(namespace: &str, name: &str) -> Result<(), RateLimitError> {
    let mut violations = Vec::new();
    validate_stored_namespace(namespace, "namespace", &mut violations);
    validate_policy_name(name, "name", &mut violations);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RateLimitError::InvalidArgument(violations))
    }
}

pub(crate) fn decode_policy(policy: Option<pb::Policy>) -> Result<ScopedPolicy, RateLimitError> {
    let Some(policy) = policy else {
        return Err(RateLimitError::invalid("policy", "required"));
    };
    let mut own = Vec::new();
    let budget = match (&policy.limit, policy.budget) {
        (Some(_), Some(_)) => {
            own.push(FieldViolation::new(
                "policy.budget",
                "set either limit (a rate limit) or budget (a cost budget), not both",
            ));
            None
        }
        (None, None) => {
            own.push(FieldViolation::new(
                "policy.limit",
                "required: set limit (a rate limit) or budget (a cost budget)",
            ));
            None
        }
        (None, Some(spec)) => Some(decode_budget_spec(spec, "policy.budget", &mut own)),
        (Some(_), None) => None,
    };
    if budget.is_some() && policy.mode == pb::Mode::Shadow as i32 {
        own.push(FieldViolation::new(
            "policy.mode",
            "a budget is always enforced: leave mode unset or ENFORCE",
        ));
    }
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
    let mut violations: Vec<FieldViolation> = violations.into_iter().map(relabel).collect();
    violations.extend(own);
    let body = match (budget, item.limit) {
        (Some(spec), _) => PolicyBody::Budget(spec),
        (None, LimitRef::Inline(spec)) => PolicyBody::RateLimit {
            spec,
            mode: item.mode.unwrap_or_default(),
        },
        // Neither limit nor budget (already a violation), or both.
        (None, _) => return Err(RateLimitError::InvalidArgument(violations)),
    };
    let scoped = ScopedPolicy {
        namespace: policy.namespace,
        name: policy.name,
        body,
        consistency: item.consistency,
        on_failure: item.on_failure,
        version: 0,
    };
    // Every problem at once: the wire's and the domain's, each field once.
    if let Err(RateLimitError::InvalidArgument(more)) = scoped.validate("policy") {
        for v in more {
            if !violations.iter().any(|seen| seen.field == v.field) {
                violations.push(v);
            }
        }
    }
    if violations.is_empty() {
        Ok(scoped)
    } else {
        Err(RateLimitError::InvalidArgument(violations))
    }
}

pub(crate) fn encode_policy(p: &ScopedPolicy) -> pb::Policy {
    let (limit, budget, mode) = match &p.body {
        PolicyBody::RateLimit { spec, mode } => (
            Some(pb::LimitSpec {
                limit: spec.limit,
                period: Some(duration_to_proto(spec.period)),
                burst: spec.burst,
                algorithm: encode_algorithm(spec.algorithm),
            }),
            None,
            encode_mode(*mode),
        ),
        PolicyBody::Budget(spec) => (None, Some(encode_budget_spec(spec)), pb::Mode::Unspecified),
    };
    pb::Policy {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        limit,
        mode: mode as i32,
        consistency: p
            .consistency
            .map_or(pb::Consistency::Unspecified, encode_consistency) as i32,
        on_failure: p
            .on_failure
            .map_or(pb::FailurePolicy::Unspecified, encode_failure) as i32,
        version: p.version,
        budget,
    }
}

pub(crate) fn stream_error(err: RateLimitError) -> pb::StreamCheckError {
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

pub(crate) fn decode_items(items: Vec<pb::CheckItem>) -> Result<Vec<CheckItem>, RateLimitError> {
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
pub(crate) fn decode_item(
    i: usize,
    item: pb::CheckItem,
    violations: &mut Vec<FieldViolation>,
) -> CheckItem {
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

pub(crate) use agentmesh_runtime::wire::{duration_from_proto, duration_to_proto};

pub(crate) fn encode_response(outcomes: &[CheckOutcome], instance_id: &str) -> pb::CheckResponse {
    let results: Vec<pb::CheckResult> = outcomes
        .iter()
        .map(|o| encode_outcome(o, instance_id))
        .collect();
    pb::CheckResponse {
        allowed: outcomes.iter().all(|o| o.allowed),
        results,
    }
}

pub(crate) fn encode_outcome(o: &CheckOutcome, instance_id: &str) -> pb::CheckResult {
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

pub(crate) fn encode_algorithm(a: Algorithm) -> i32 {
    let algorithm = match a {
        Algorithm::Gcra => pb::Algorithm::Gcra,
        Algorithm::FixedWindow => pb::Algorithm::FixedWindow,
        Algorithm::SlidingWindow => pb::Algorithm::SlidingWindow,
    };
    algorithm as i32
}

pub(crate) fn encode_mode(m: Mode) -> pb::Mode {
    match m {
        Mode::Enforce => pb::Mode::Enforce,
        Mode::Shadow => pb::Mode::Shadow,
    }
}

pub(crate) fn encode_consistency(c: Consistency) -> pb::Consistency {
    match c {
        Consistency::Local => pb::Consistency::Local,
        Consistency::Owner => pb::Consistency::Owner,
        Consistency::Strict => pb::Consistency::Strict,
    }
}

pub(crate) fn encode_failure(f: FailurePolicy) -> pb::FailurePolicy {
    match f {
        FailurePolicy::FailOpen => pb::FailurePolicy::FailOpen,
        FailurePolicy::FailClosed => pb::FailurePolicy::FailClosed,
        FailurePolicy::LocalFallback => pb::FailurePolicy::LocalFallback,
    }
}

/// The target and TTL of a lease call, or every violation found (added to `violations`).
pub(crate) fn decode_lease(
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

    fn violated_fields(err: RateLimitError) -> Vec<String> {
        let RateLimitError::InvalidArgument(v) = err else {
            panic!("expected invalid argument, got {err:?}")
        };
        v.into_iter().map(|v| v.field).collect()
    }

    fn target(budget: Option<pb::BudgetSpec>, policy: &str) -> pb::BudgetTarget {
        pb::BudgetTarget {
            namespace: "ns".into(),
            key: "k".into(),
            budget,
            consistency: 0,
            policy: policy.into(),
        }
    }

    const DAILY: pb::BudgetSpec = pb::BudgetSpec {
        limit: 10,
        window: pb::BudgetWindow::Day as i32,
    };

    #[test]
    fn test_a_budget_target_names_exactly_one_of_budget_and_policy() {
        let both = decode_budget_target(Some(target(Some(DAILY), "usd")), Vec::new());
        assert_eq!(violated_fields(both.unwrap_err()), ["target.policy"]);
        let neither = decode_budget_target(Some(target(None, "")), Vec::new());
        assert_eq!(violated_fields(neither.unwrap_err()), ["target.budget"]);
        let bad_name = decode_budget_target(Some(target(None, "a b")), Vec::new());
        assert_eq!(violated_fields(bad_name.unwrap_err()), ["target.policy"]);
        let named = decode_budget_target(Some(target(None, "usd")), Vec::new()).unwrap();
        assert_eq!(named.budget, BudgetRef::Policy("usd".into()));
        let inline = decode_budget_target(Some(target(Some(DAILY), "")), Vec::new()).unwrap();
        assert_eq!(
            inline.budget,
            BudgetRef::Inline(BudgetSpec {
                limit: 10,
                window: BudgetWindow::Day
            })
        );
    }

    #[test]
    fn test_get_usage_is_one_target_or_one_namespace_within_bounds() {
        let request =
            |target, namespace: &str, limit, consistency: pb::Consistency| pb::GetUsageRequest {
                target,
                namespace: namespace.into(),
                limit,
                start_after: String::new(),
                consistency: consistency as i32,
            };
        let unset = pb::Consistency::Unspecified;
        let err = decode_usage_request(request(None, "", 0, unset)).unwrap_err();
        assert_eq!(violated_fields(err), ["namespace"]);
        let err = decode_usage_request(request(
            Some(target(Some(DAILY), "")),
            "ns",
            5,
            pb::Consistency::Local,
        ))
        .unwrap_err();
        assert_eq!(violated_fields(err), ["namespace", "limit", "consistency"]);
        let err = decode_usage_request(pb::GetUsageRequest {
            start_after: "k".repeat(MAX_KEY_LEN + 1),
            ..request(None, "ns", 1001, pb::Consistency::Strict)
        })
        .unwrap_err();
        assert_eq!(
            violated_fields(err),
            ["limit", "start_after", "consistency"]
        );

        let Ok(UsageQuery::Namespace(query)) = decode_usage_request(request(None, "ns", 0, unset))
        else {
            panic!("a namespace listing")
        };
        assert_eq!(
            query,
            BudgetQuery {
                namespace: "ns".into(),
                start_after: String::new(),
                max_keys: DEFAULT_LISTED_KEYS,
                local_only: false,
            }
        );
        let Ok(UsageQuery::Namespace(query)) =
            decode_usage_request(request(None, "ns", 1000, pb::Consistency::Local))
        else {
            panic!("a namespace listing")
        };
        assert_eq!((query.max_keys, query.local_only), (MAX_LISTED_KEYS, true));
        assert!(matches!(
            decode_usage_request(request(Some(target(None, "usd")), "", 0, unset)),
            Ok(UsageQuery::One(_))
        ));
    }

    fn wire_policy(limit: Option<pb::LimitSpec>, budget: Option<pb::BudgetSpec>) -> pb::Policy {
        pb::Policy {
            namespace: "ns".into(),
            name: "p".into(),
            limit,
            budget,
            ..pb::Policy::default()
        }
    }

    #[test]
    fn test_a_policy_is_a_rate_limit_or_a_budget_and_round_trips() {
        let per_minute = pb::LimitSpec {
            limit: 5,
            period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            burst: 0,
            algorithm: 0,
        };
        let both = decode_policy(Some(wire_policy(Some(per_minute), Some(DAILY))));
        assert_eq!(violated_fields(both.unwrap_err()), ["policy.budget"]);
        let neither = decode_policy(Some(wire_policy(None, None)));
        assert_eq!(violated_fields(neither.unwrap_err()), ["policy.limit"]);
        let shadow_budget = pb::Policy {
            mode: pb::Mode::Shadow as i32,
            consistency: pb::Consistency::Strict as i32,
            on_failure: pb::FailurePolicy::FailOpen as i32,
            ..wire_policy(
                None,
                Some(pb::BudgetSpec {
                    limit: 0,
                    window: 9,
                }),
            )
        };
        assert_eq!(
            violated_fields(decode_policy(Some(shadow_budget)).unwrap_err()),
            [
                "policy.budget.limit",
                "policy.budget.window",
                "policy.mode",
                "policy.consistency",
                "policy.on_failure"
            ]
        );
        let strict_budget = pb::Policy {
            consistency: pb::Consistency::Strict as i32,
            ..wire_policy(None, Some(DAILY))
        };
        assert_eq!(
            violated_fields(decode_policy(Some(strict_budget)).unwrap_err()),
            ["policy.consistency"]
        );

        let budget = decode_policy(Some(wire_policy(None, Some(DAILY)))).unwrap();
        assert_eq!(
            budget.body,
            PolicyBody::Budget(BudgetSpec {
                limit: 10,
                window: BudgetWindow::Day
            })
        );
        let encoded = encode_policy(&budget);
        assert_eq!((encoded.limit, encoded.budget), (None, Some(DAILY)));
        let rate = decode_policy(Some(wire_policy(Some(per_minute), None))).unwrap();
        let encoded = encode_policy(&rate);
        assert_eq!(encoded.budget, None);
        assert_eq!(encoded.limit.unwrap().limit, 5);
    }
}
