//! Envoy's rate limit service (RLS v3, `envoy.service.ratelimit.v3.RateLimitService`) over the
//! same [`Decide`] as `agentmesh.ratelimit.v1.RateLimiter`, so Envoy's `ratelimit` filter can
//! use agentmesh as its rate limit service.
//!
//! # Semantics (those of envoyproxy/ratelimit)
//!
//! - `domain` is the namespace. Each descriptor is one check item; descriptors are decided
//!   independently (not all or nothing) and the request is OVER_LIMIT if any one is.
//! - **Hits**: the descriptor's `hits_addend` when set (0 checks without spending), else the
//!   request's `hits_addend`, else 1 (proto3 cannot tell an unset request value from 0).
//! - **Limit**: the descriptor's `limit` override when present: a fixed window of
//!   `requests_per_unit` per `unit` (0 denies every hit). Otherwise the most specific policy
//!   named [`descriptor_policy_name`] of a path through the descriptor's entries: entries are
//!   matched in order, each as `key=value` before `key` alone, like envoyproxy/ratelimit walks
//!   its config tree, and a policy only matches a descriptor with as many entries. One
//!   difference: where a `key=value` branch leads nowhere, envoyproxy/ratelimit matches
//!   nothing while this falls back to the `key` branch. No match: the descriptor is OK with no
//!   `current_limit`, and nothing is counted.
//! - **Counter**: one per full descriptor ([`descriptor_key`]), so under a key-only policy each
//!   value has its own count.
//! - **Units** are fixed windows aligned on the UNIX epoch, as in envoyproxy/ratelimit: SECOND,
//!   MINUTE, HOUR, DAY, MONTH = 30 days, YEAR = 365 days. A policy whose period is not one of
//!   them is reported (in `current_limit` only) per [`limit_per_unit`].
//! - **Shadow** policies answer OK; `limit_remaining` still reports the real count.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use agentmesh_proto::envoy::service::ratelimit::v3 as rls;
use agentmesh_proto::envoy::r#type::v3::RateLimitUnit;
use rls::rate_limit_response::rate_limit::Unit;
use rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use rls::rate_limit_service_server::RateLimitServiceServer;
use tonic::{Request, Response, Status};

pub use rls::rate_limit_service_server::SERVICE_NAME;

use crate::decide::Decide;
use crate::error::{FieldViolation, RateLimitError};
use crate::limiter::{CheckItem, CheckOutcome, LimitRef};
use agentmesh_runtime::wire::duration_to_proto;

use crate::metrics::{ItemNamespaces, RateLimitMetrics};
use crate::spec::{
    Algorithm, LimitSpec, MAX_ITEMS, MAX_KEY_LEN, MAX_NAMESPACE_LEN, MAX_POLICY_NAME_LEN,
    is_valid_identifier, validate_identifier,
};
use agentmesh_runtime::auth::{AccessRule, Role};

/// Who may call Envoy's RLS (admin may call everything): the proxies, as services.
pub const ACCESS: &[AccessRule] = &[("ShouldRateLimit", &[Role::Service])];

/// Most entries in one descriptor. Matching probes up to 2^entries policy names.
pub const MAX_DESCRIPTOR_ENTRIES: usize = 8;
/// Longest descriptor entry key, in bytes.
pub const MAX_ENTRY_KEY_LEN: usize = 128;
/// Longest descriptor entry value, in bytes.
pub const MAX_ENTRY_VALUE_LEN: usize = 256;
/// Prefix of every policy name made by [`descriptor_policy_name`], so descriptor policies never
/// collide with hand-named ones (a descriptor key `default` is not the `default` policy).
pub const POLICY_NAME_PREFIX: &str = "envoy:";

/// Envoy's time units and their length in seconds, longest first.
const UNITS: [(Unit, u64); 6] = [
    (Unit::Year, 365 * 86_400),
    (Unit::Month, 30 * 86_400),
    (Unit::Day, 86_400),
    (Unit::Hour, 3_600),
    (Unit::Minute, 60),
    (Unit::Second, 1),
];

/// The policy name for a path of descriptor entries: `envoy:` then the entries joined by `.`,
/// each `key=value`, or `key` for an entry that matches any value. Every byte of a key or value
/// other than `[A-Za-z0-9_:-]` (so `.`, `=` and `%` too) is written `%XX` (uppercase hex), which
/// keeps names unambiguous and within the policy name charset `[A-Za-z0-9._:=%-]`.
///
/// `[("remote_address", Some("10.0.0.1")), ("path", None)]` →
/// `envoy:remote_address=10%2E0%2E0%2E1.path`. The result may be longer than the 256 bytes a
/// policy name allows; such a path can have no policy.
#[must_use]
pub fn descriptor_policy_name(path: &[(&str, Option<&str>)]) -> String {
    fn push_escaped(out: &mut String, s: &str) {
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    let mut name = String::from(POLICY_NAME_PREFIX);
    for (i, (key, value)) in path.iter().enumerate() {
        if i > 0 {
            name.push('.');
        }
        push_escaped(&mut name, key);
        if let Some(value) = value {
            name.push('=');
            push_escaped(&mut name, value);
        }
    }
    name
}

/// The limited key of a descriptor: every entry as `key=value`, joined by `.`, with `%`, `.`,
/// `=` and ASCII control characters inside keys and values written `%XX`. Distinct descriptors
/// get distinct keys.
#[must_use]
pub fn descriptor_key(descriptor: &RateLimitDescriptor) -> String {
    fn push_escaped(out: &mut String, s: &str) {
        for c in s.chars() {
            if matches!(c, '%' | '.' | '=') || c.is_ascii_control() {
                let _ = write!(out, "%{:02X}", u32::from(c));
            } else {
                out.push(c);
            }
        }
    }
    let mut key = String::new();
    for (i, entry) in descriptor.entries.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        push_escaped(&mut key, &entry.key);
        key.push('=');
        push_escaped(&mut key, &entry.value);
    }
    key
}

/// The period of an envoyproxy/ratelimit config unit name (`second` … `year`, any case; `week`
/// too, which newer envoyproxy/ratelimit versions accept).
#[must_use]
pub fn unit_period(name: &str) -> Option<Duration> {
    let seconds = match name.to_ascii_lowercase().as_str() {
        "second" => 1,
        "minute" => 60,
        "hour" => 3_600,
        "day" => 86_400,
        "week" => 7 * 86_400,
        "month" => 30 * 86_400,
        "year" => 365 * 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

/// A limit as Envoy reports it: the longest unit not longer than `period` (SECOND below one
/// second) and `limit` scaled to that unit, rounded down but at least 1, at most `u32::MAX`.
/// Exact when `period` is a unit: 100 per 7 days is 14 per DAY, 30 per 90 s is 20 per MINUTE.
#[must_use]
pub fn limit_per_unit(limit: u64, period: Duration) -> (u32, Unit) {
    let (unit, unit_secs) = UNITS
        .into_iter()
        .find(|(_, secs)| Duration::from_secs(*secs) <= period)
        .unwrap_or((Unit::Second, 1));
    let period_nanos = period.as_nanos().max(1);
    let scaled = u128::from(limit) * u128::from(unit_secs) * 1_000_000_000 / period_nanos;
    let requests = u32::try_from(scaled.max(u128::from(limit.min(1)))).unwrap_or(u32::MAX);
    (requests, unit)
}

/// Serves `envoy.service.ratelimit.v3.RateLimitService` over a [`Decide`].
#[derive(Clone)]
pub struct EnvoyRlsGrpc {
    decider: Arc<dyn Decide>,
    instance_id: Arc<str>,
    metrics: Option<RateLimitMetrics>,
}

/// What answers one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// No limit applies: OK, nothing counted.
    Unconfigured,
    /// A limit override of 0 requests per unit: over limit unless it spends nothing.
    DenyAll { unit: Unit, cost: u64 },
    /// Decided by the check item at `item`, reported as `limit`.
    Check { item: usize, limit: ReportedLimit },
}

/// The `current_limit` of a decided descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReportedLimit {
    /// A limit override, reported as sent.
    Override { requests_per_unit: u32, unit: Unit },
    /// A configured policy, reported through `limit_per_unit` when its limit is known.
    Policy(String),
}

impl EnvoyRlsGrpc {
    /// An adapter deciding through `decider`; `instance_id` names this instance in logs.
    #[must_use]
    pub fn new(decider: Arc<dyn Decide>, instance_id: &str) -> Self {
        Self {
            decider,
            instance_id: instance_id.into(),
            metrics: None,
        }
    }

    /// Counts decisions in `ratelimit_decisions_total`, as the agentmesh API does.
    #[must_use]
    pub fn with_metrics(mut self, metrics: RateLimitMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The tonic server for this adapter.
    #[must_use]
    pub fn into_server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }

    /// Validates, decides and encodes one request.
    async fn should_rate_limit(
        &self,
        request: rls::RateLimitRequest,
        deadline: Option<Instant>,
    ) -> Result<rls::RateLimitResponse, RateLimitError> {
        let started = Instant::now();
        validate_request(&request)?;
        let (items, plans) = self.plan(&request);
        let outcomes = if items.is_empty() {
            Vec::new()
        } else {
            let item_descriptors = item_descriptors(&plans);
            self.decider
                .decide(items, false, deadline)
                .await
                .map_err(|e| for_descriptors(e, &item_descriptors))?
        };
        if let Some(metrics) = &self.metrics {
            metrics.record(
                &ItemNamespaces::single(&request.domain, outcomes.len()),
                &outcomes,
            );
            metrics.observe_check(started, &outcomes);
        }
        let response = self.encode(&request.domain, &plans, &outcomes);
        tracing::debug!(
            instance = %self.instance_id,
            domain = %request.domain,
            descriptors = plans.len(),
            over_limit = response.overall_code == Code::OverLimit as i32,
            "envoy rate limit decided"
        );
        Ok(response)
    }

    /// The check items of a valid request and how each descriptor is answered.
    fn plan(&self, request: &rls::RateLimitRequest) -> (Vec<CheckItem>, Vec<Plan>) {
        let mut items = Vec::new();
        let plans = request
            .descriptors
            .iter()
            .map(|descriptor| {
                let cost = descriptor
                    .hits_addend
                    .unwrap_or_else(|| u64::from(request.hits_addend.max(1)));
                let (limit, reported) = match &descriptor.limit {
                    Some(o) => {
                        let unit = Unit::try_from(o.unit).unwrap_or(Unit::Unknown);
                        if o.requests_per_unit == 0 {
                            return Plan::DenyAll { unit, cost };
                        }
                        let spec = LimitSpec {
                            limit: u64::from(o.requests_per_unit),
                            period: unit_length(unit),
                            burst: 0,
                            algorithm: Algorithm::FixedWindow,
                        };
                        let reported = ReportedLimit::Override {
                            requests_per_unit: o.requests_per_unit,
                            unit,
                        };
                        (LimitRef::Inline(spec), reported)
                    }
                    None => match self.matching_policy(&request.domain, descriptor) {
                        Some(name) => (LimitRef::Policy(name.clone()), ReportedLimit::Policy(name)),
                        None => return Plan::Unconfigured,
                    },
                };
                items.push(CheckItem {
                    namespace: request.domain.clone(),
                    key: descriptor_key(descriptor),
                    cost,
                    limit,
                    mode: None,
                    consistency: None,
                    on_failure: None,
                });
                Plan::Check {
                    item: items.len() - 1,
                    limit: reported,
                }
            })
            .collect();
        (items, plans)
    }

    /// The most specific configured policy for `descriptor`: candidate paths in order, each
    /// entry as `key=value` before `key` alone, earlier entries deciding first.
    fn matching_policy(&self, namespace: &str, descriptor: &RateLimitDescriptor) -> Option<String> {
        let entries = &descriptor.entries;
        let n = entries.len();
        // Bit `n - 1 - i` of a candidate set: entry `i` matches with its value. Counting down
        // visits the candidates in the order above.
        (0..1u32 << n).rev().find_map(|candidate| {
            let path: Option<Vec<(&str, Option<&str>)>> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    if (candidate >> (n - 1 - i)) & 1 == 0 {
                        Some((e.key.as_str(), None))
                    } else if e.value.is_empty() {
                        None
                    } else {
                        Some((e.key.as_str(), Some(e.value.as_str())))
                    }
                })
                .collect();
            let name = descriptor_policy_name(&path?);
            (name.len() <= MAX_POLICY_NAME_LEN && self.decider.policy(namespace, &name).is_some())
                .then_some(name)
        })
    }

    fn encode(
        &self,
        namespace: &str,
        plans: &[Plan],
        outcomes: &[CheckOutcome],
    ) -> rls::RateLimitResponse {
        let statuses: Vec<DescriptorStatus> = plans
            .iter()
            .map(|plan| match plan {
                Plan::Unconfigured => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                },
                Plan::DenyAll { unit, cost } => DescriptorStatus {
                    code: if *cost == 0 {
                        Code::Ok
                    } else {
                        Code::OverLimit
                    } as i32,
                    current_limit: Some(RateLimit {
                        name: String::new(),
                        requests_per_unit: 0,
                        unit: *unit as i32,
                    }),
                    ..DescriptorStatus::default()
                },
                Plan::Check { item, limit } => {
                    let outcome = &outcomes[*item];
                    DescriptorStatus {
                        code: if outcome.allowed {
                            Code::Ok
                        } else {
                            Code::OverLimit
                        } as i32,
                        current_limit: Some(self.current_limit(namespace, limit, outcome)),
                        limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
                        duration_until_reset: Some(duration_to_proto(outcome.reset_after)),
                    }
                }
            })
            .collect();
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        rls::RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: Vec::new(),
            request_headers_to_add: Vec::new(),
        }
    }

    fn current_limit(
        &self,
        namespace: &str,
        limit: &ReportedLimit,
        outcome: &CheckOutcome,
    ) -> RateLimit {
        match limit {
            ReportedLimit::Override {
                requests_per_unit,
                unit,
            } => RateLimit {
                name: String::new(),
                requests_per_unit: *requests_per_unit,
                unit: *unit as i32,
            },
            ReportedLimit::Policy(name) => {
                let spec = self.decider.policy(namespace, name).map(|p| p.spec);
                let (requests_per_unit, unit) = match spec {
                    Some(spec) => limit_per_unit(spec.limit, spec.period),
                    None => (
                        u32::try_from(outcome.limit).unwrap_or(u32::MAX),
                        Unit::Unknown,
                    ),
                };
                RateLimit {
                    name: name.clone(),
                    requests_per_unit,
                    unit: unit as i32,
                }
            }
        }
    }
}

#[tonic::async_trait]
impl rls::rate_limit_service_server::RateLimitService for EnvoyRlsGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<rls::RateLimitRequest>,
    ) -> Result<Response<rls::RateLimitResponse>, Status> {
        let deadline =
            agentmesh_runtime::deadline::from_metadata(request.metadata(), Instant::now());
        let caller = agentmesh_runtime::auth::caller(&request);
        let request = request.into_inner();
        caller
            .check_owns("domain", "namespace", &request.domain)
            .map_err(RateLimitError::from)?;
        let response = EnvoyRlsGrpc::should_rate_limit(self, request, deadline).await?;
        Ok(Response::new(response))
    }
}

/// The length of a unit the request validation accepted.
fn unit_length(unit: Unit) -> Duration {
    let seconds = UNITS
        .into_iter()
        .find(|(u, _)| *u == unit)
        .map_or(0, |(_, seconds)| seconds);
    Duration::from_secs(seconds)
}

/// Checks every bound of a request, reporting every violation with its field path.
fn validate_request(request: &rls::RateLimitRequest) -> Result<(), RateLimitError> {
    let mut violations = Vec::new();
    validate_identifier(
        &request.domain,
        "domain",
        MAX_NAMESPACE_LEN,
        &mut violations,
    );
    let count = request.descriptors.len();
    if count == 0 || count > MAX_ITEMS {
        violations.push(FieldViolation::new(
            "descriptors",
            format!("must contain 1 to {MAX_ITEMS} descriptors, got {count}"),
        ));
        return Err(RateLimitError::InvalidArgument(violations));
    }
    for (i, descriptor) in request.descriptors.iter().enumerate() {
        validate_descriptor(i, descriptor, &mut violations);
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RateLimitError::InvalidArgument(violations))
    }
}

fn validate_descriptor(i: usize, d: &RateLimitDescriptor, out: &mut Vec<FieldViolation>) {
    let entries = d.entries.len();
    if entries == 0 || entries > MAX_DESCRIPTOR_ENTRIES {
        out.push(FieldViolation::new(
            format!("descriptors[{i}].entries"),
            format!("must contain 1 to {MAX_DESCRIPTOR_ENTRIES} entries, got {entries}"),
        ));
    }
    let mut valid_entries = true;
    for (j, entry) in d.entries.iter().enumerate() {
        if !is_valid_identifier(&entry.key, MAX_ENTRY_KEY_LEN) {
            let field = format!("descriptors[{i}].entries[{j}].key");
            validate_identifier(&entry.key, &field, MAX_ENTRY_KEY_LEN, out);
            valid_entries = false;
        }
        if entry.value.len() > MAX_ENTRY_VALUE_LEN {
            out.push(FieldViolation::new(
                format!("descriptors[{i}].entries[{j}].value"),
                format!(
                    "must be at most {MAX_ENTRY_VALUE_LEN} bytes, got {}",
                    entry.value.len()
                ),
            ));
            valid_entries = false;
        }
    }
    if valid_entries && entries > 0 {
        let key_len = descriptor_key(d).len();
        if key_len > MAX_KEY_LEN {
            out.push(FieldViolation::new(
                format!("descriptors[{i}].entries"),
                format!(
                    "must encode to at most {MAX_KEY_LEN} bytes as the limited key, got {key_len}"
                ),
            ));
        }
    }
    if let Some(o) = &d.limit {
        let known = RateLimitUnit::try_from(o.unit).is_ok_and(|u| u != RateLimitUnit::Unknown);
        if !known {
            out.push(FieldViolation::new(
                format!("descriptors[{i}].limit.unit"),
                format!(
                    "must be SECOND, MINUTE, HOUR, DAY, MONTH or YEAR, got {}",
                    o.unit
                ),
            ));
        }
    }
}

/// For each check item, the index of its descriptor.
fn item_descriptors(plans: &[Plan]) -> Vec<usize> {
    plans
        .iter()
        .enumerate()
        .filter_map(|(d, plan)| matches!(plan, Plan::Check { .. }).then_some(d))
        .collect()
}

/// Renames the `items[N]` fields of a core error to the descriptors they came from.
fn for_descriptors(err: RateLimitError, item_descriptors: &[usize]) -> RateLimitError {
    let rename = |field: String| -> String {
        let Some(rest) = field.strip_prefix("items[") else {
            return field;
        };
        let Some((index, tail)) = rest.split_once(']') else {
            return field;
        };
        match index
            .parse::<usize>()
            .ok()
            .and_then(|i| item_descriptors.get(i))
        {
            Some(d) => format!("descriptors[{d}]{tail}"),
            None => field,
        }
    };
    match err {
        RateLimitError::InvalidArgument(violations) => RateLimitError::InvalidArgument(
            violations
                .into_iter()
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

#[cfg(test)]
mod access_tests {
    #[test]
    fn test_every_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered(
            "envoy.service.ratelimit.v3.RateLimitService",
            super::ACCESS,
        );
    }
}
