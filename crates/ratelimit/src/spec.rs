//! What a limit is, as plain types at the bottom of the domain: algorithms, modes, limit specs,
//! named and namespace-scoped policies (rate limits and cost budgets) and their validation,
//! plus every bound the limiter enforces on its inputs. The compiled policy set and
//! the policy file are in `policies`, above.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{FieldViolation, RateLimitError};
pub use crate::window::{BudgetSpec, BudgetWindow};

/// Most items in one check request.
pub const MAX_ITEMS: usize = 1000;
/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 128;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Longest policy name, in bytes.
pub const MAX_POLICY_NAME_LEN: usize = 256;
/// Largest `limit`, `burst` (1e15: room for budgets counted in micro-dollars).
pub const MAX_LIMIT: u64 = 1_000_000_000_000_000;
/// Shortest period.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
/// Longest period: 366 days, so a yearly budget fits.
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 60 * 60);
/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most policies in one policy set (including the default).
pub const MAX_POLICIES: usize = 10_000;
/// Name under which the default policy is found.
pub const DEFAULT_POLICY_NAME: &str = "default";

/// How a limit is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Generic cell rate algorithm: a token bucket with continuous refill and a burst size.
    #[default]
    Gcra,
    /// Calendar-aligned fixed windows on the UNIX epoch (a `1d` window is a UTC day).
    FixedWindow,
    /// Weighted sliding window over the current and previous fixed window.
    SlidingWindow,
}

impl Algorithm {
    /// The name used in policy files and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gcra => "gcra",
            Self::FixedWindow => "fixed_window",
            Self::SlidingWindow => "sliding_window",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a limit is enforced or only observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Over-limit requests are denied.
    #[default]
    Enforce,
    /// Decisions are computed and reported, but every request is allowed.
    Shadow,
}

impl Mode {
    /// The name used in policy files and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Shadow => "shadow",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a limit's state lives and who decides (see `ratelimit.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// This instance only.
    Local,
    /// The key's owner on the membership hash ring.
    Owner,
    /// Atomically in Redis.
    Strict,
}

/// What to answer when the owner or Redis does not answer within the budget.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Allow, marked degraded.
    FailOpen,
    /// Deny, marked degraded.
    FailClosed,
    /// Decide locally with the limit divided by the number of live members, marked degraded.
    #[default]
    LocalFallback,
}

/// A limit: `limit` units per `period`, counted by `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    /// Units per period, 1..=`MAX_LIMIT`.
    pub limit: u64,
    /// Refill period (GCRA) or window length, `MIN_PERIOD..=MAX_PERIOD`.
    pub period: Duration,
    /// GCRA only: most units at once, 0 = same as `limit`, at most `MAX_LIMIT`.
    pub burst: u64,
    /// How the limit is counted.
    pub algorithm: Algorithm,
}

impl LimitSpec {
    /// The burst size in effect: `burst`, or `limit` when `burst` is 0.
    pub fn effective_burst(&self) -> u64 {
        if self.burst == 0 {
            self.limit
        } else {
            self.burst
        }
    }

    /// Whether every field is within bounds.
    pub fn is_valid(&self) -> bool {
        (1..=MAX_LIMIT).contains(&self.limit)
            && (MIN_PERIOD..=MAX_PERIOD).contains(&self.period)
            && self.burst <= MAX_LIMIT
    }

    /// Appends a violation for every out-of-bounds field; `prefix` is e.g. `items[3].limit`.
    pub fn validate_into(&self, prefix: &str, out: &mut Vec<FieldViolation>) {
        if self.limit == 0 || self.limit > MAX_LIMIT {
            out.push(FieldViolation::new(
                format!("{prefix}.limit"),
                format!("must be between 1 and {MAX_LIMIT}, got {}", self.limit),
            ));
        }
        if self.period < MIN_PERIOD || self.period > MAX_PERIOD {
            out.push(FieldViolation::new(
                format!("{prefix}.period"),
                format!(
                    "must be between 1ms and 366 days, got {}",
                    humantime::format_duration(self.period)
                ),
            ));
        }
        if self.burst > MAX_LIMIT {
            out.push(FieldViolation::new(
                format!("{prefix}.burst"),
                format!(
                    "must be at most {MAX_LIMIT} (0 = same as limit), got {}",
                    self.burst
                ),
            ));
        }
    }
}

impl Default for LimitSpec {
    /// The earlier platform's global bucket: 60 at once, refilling 1 per second.
    fn default() -> Self {
        Self {
            limit: 60,
            period: Duration::from_secs(60),
            burst: 60,
            algorithm: Algorithm::Gcra,
        }
    }
}

/// A named limit with its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Name matching `[A-Za-z0-9._:=%-]+`, at most `MAX_POLICY_NAME_LEN` bytes.
    pub name: String,
    /// The limit.
    pub spec: LimitSpec,
    /// Enforce or shadow, unless a check item overrides it.
    pub mode: Mode,
}

impl Policy {
    /// The earlier platform's global token bucket (`RATE_LIMIT_GLOBAL_CAPACITY`,
    /// `RATE_LIMIT_GLOBAL_REFILL_PER_SEC`) as a GCRA policy named `default`:
    /// `limit = burst = capacity`, `period = capacity / refill_per_sec` seconds.
    pub fn default_from_capacity(
        capacity: u64,
        refill_per_sec: f64,
    ) -> Result<Self, RateLimitError> {
        let field = format!("policy[{DEFAULT_POLICY_NAME}]");
        let mut violations = Vec::new();
        if !(refill_per_sec.is_finite() && refill_per_sec > 0.0) {
            violations.push(FieldViolation::new(
                format!("{field}.refill_per_sec"),
                format!("must be a positive number, got {refill_per_sec}"),
            ));
        }
        if capacity == 0 || capacity > MAX_LIMIT {
            violations.push(FieldViolation::new(
                format!("{field}.capacity"),
                format!("must be between 1 and {MAX_LIMIT}, got {capacity}"),
            ));
        }
        if !violations.is_empty() {
            return Err(RateLimitError::InvalidArgument(violations));
        }
        #[allow(clippy::cast_precision_loss)] // capacity <= 1e15 < 2^53: exact
        let seconds = capacity as f64 / refill_per_sec;
        let Ok(period) = Duration::try_from_secs_f64(seconds) else {
            return Err(RateLimitError::invalid(
                format!("{field}.period"),
                format!("capacity / refill_per_sec = {seconds}s must be between 1ms and 366 days"),
            ));
        };
        let policy = Self {
            name: DEFAULT_POLICY_NAME.to_owned(),
            spec: LimitSpec {
                limit: capacity,
                period,
                burst: capacity,
                algorithm: Algorithm::Gcra,
            },
            mode: Mode::Enforce,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the name and every bound of the spec; fields are `policy[<name>].<field>`.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        let mut violations = Vec::new();
        self.validate_into(&mut violations);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(RateLimitError::InvalidArgument(violations))
        }
    }

    pub(crate) fn validate_into(&self, out: &mut Vec<FieldViolation>) {
        let prefix = policy_field(&self.name);
        validate_policy_name(&self.name, &format!("{prefix}.name"), out);
        self.spec.validate_into(&prefix, out);
    }
}

impl Default for Policy {
    /// `default_from_capacity(60, 1.0)`.
    fn default() -> Self {
        Self {
            name: DEFAULT_POLICY_NAME.to_owned(),
            spec: LimitSpec::default(),
            mode: Mode::Enforce,
        }
    }
}

/// `policy[<name>]`, with a name that is not valid shown quoted and truncated.
pub(crate) fn policy_field(name: &str) -> String {
    if is_valid_policy_name(name) {
        format!("policy[{name}]")
    } else {
        let short: String = name.chars().take(32).collect();
        format!("policy[{short:?}]")
    }
}

/// Whether `name` matches `[A-Za-z0-9._:=%-]+` and is at most `MAX_POLICY_NAME_LEN` bytes.
pub fn is_valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_POLICY_NAME_LEN
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'=' | b'%')
        })
}

/// Appends a violation on `field` unless `namespace` can hold stored policies: 1 to
/// `MAX_NAMESPACE_LEN` bytes without control characters or '/' (it is an etcd key segment).
pub fn validate_stored_namespace(namespace: &str, field: &str, out: &mut Vec<FieldViolation>) {
    if !is_valid_identifier(namespace, MAX_NAMESPACE_LEN) || namespace.contains('/') {
        out.push(FieldViolation::new(
            field,
            format!(
                "must be 1 to {MAX_NAMESPACE_LEN} bytes without control characters or '/', got {} bytes",
                namespace.len()
            ),
        ));
    }
}

/// Appends a violation on `field` unless `name` is a valid policy name.
pub fn validate_policy_name(name: &str, field: &str, out: &mut Vec<FieldViolation>) {
    if !is_valid_policy_name(name) {
        out.push(FieldViolation::new(
            field,
            format!(
                "must be 1 to {MAX_POLICY_NAME_LEN} bytes of [A-Za-z0-9._:=%-], got {} bytes",
                name.len()
            ),
        ));
    }
}

/// Appends a violation on `field` unless `limit` is a valid budget limit (`1..=MAX_LIMIT`).
pub fn validate_budget_limit(limit: u64, field: &str, out: &mut Vec<FieldViolation>) {
    if limit == 0 || limit > MAX_LIMIT {
        out.push(FieldViolation::new(
            field,
            format!("must be between 1 and {MAX_LIMIT}, got {limit}"),
        ));
    }
}

/// Appends violations for the routing settings a budget policy may not have: STRICT (budgets
/// live on one instance) and a failure policy (a budget call fails with UNAVAILABLE instead).
pub(crate) fn validate_budget_routing(
    routing: &PolicyRouting,
    prefix: &str,
    out: &mut Vec<FieldViolation>,
) {
    if routing.consistency == Some(Consistency::Strict) {
        out.push(FieldViolation::new(
            format!("{prefix}.consistency"),
            "a budget is LOCAL or OWNER, not STRICT",
        ));
    }
    if routing.on_failure.is_some() {
        out.push(FieldViolation::new(
            format!("{prefix}.on_failure"),
            "must be unset for a budget: budget calls fail with UNAVAILABLE when the owner does \
             not answer",
        ));
    }
}

/// Whether `value` is non-empty, at most `max_len` bytes and free of ASCII control characters
/// (the rule for namespaces and keys).
pub fn is_valid_identifier(value: &str, max_len: usize) -> bool {
    !value.is_empty() && value.len() <= max_len && !value.bytes().any(|b| b.is_ascii_control())
}

/// Appends a violation on `field` unless `is_valid_identifier(value, max_len)`.
pub fn validate_identifier(
    value: &str,
    field: &str,
    max_len: usize,
    out: &mut Vec<FieldViolation>,
) {
    let description = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > max_len {
        format!("must be at most {max_len} bytes, got {}", value.len())
    } else if value.bytes().any(|b| b.is_ascii_control()) {
        "must not contain ASCII control characters".to_owned()
    } else {
        return;
    };
    out.push(FieldViolation::new(field, description));
}

/// What a stored policy limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyBody {
    /// A rate limit, used by Check.
    RateLimit {
        /// The limit.
        spec: LimitSpec,
        /// Enforce or shadow, unless a check item overrides it.
        mode: Mode,
    },
    /// A cost budget per calendar window, used by Reserve/Commit/Cancel/GetUsage.
    Budget(BudgetSpec),
}

/// A policy stored in etcd: scoped to one namespace, versioned, with its routing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedPolicy {
    /// The namespace it applies to.
    pub namespace: String,
    /// Name items and budget targets refer to.
    pub name: String,
    /// A rate limit or a cost budget.
    pub body: PolicyBody,
    /// Where its items or budgets are decided; `None` = the cluster default.
    pub consistency: Option<Consistency>,
    /// Rate limits only: what to answer when the owner or Redis fails; `None` = LOCAL_FALLBACK.
    pub on_failure: Option<FailurePolicy>,
    /// The etcd revision of its last write (0 before it is stored).
    pub version: u64,
}

impl ScopedPolicy {
    pub(crate) fn routing(&self) -> PolicyRouting {
        PolicyRouting {
            consistency: self.consistency,
            on_failure: self.on_failure,
            version: self.version,
        }
    }

    /// Checks the namespace, the name, the limit or budget and the routing settings, naming
    /// fields under `field` (such as `policy`).
    ///
    /// # Errors
    /// `InvalidArgument` with every violation.
    pub fn validate(&self, field: &str) -> Result<(), RateLimitError> {
        let mut violations = Vec::new();
        validate_stored_namespace(
            &self.namespace,
            &format!("{field}.namespace"),
            &mut violations,
        );
        validate_policy_name(&self.name, &format!("{field}.name"), &mut violations);
        if self.name == DEFAULT_POLICY_NAME {
            violations.push(FieldViolation::new(
                format!("{field}.name"),
                "\"default\" is reserved for the built-in default policy",
            ));
        }
        match &self.body {
            PolicyBody::RateLimit { spec, .. } => {
                spec.validate_into(&format!("{field}.limit"), &mut violations);
            }
            PolicyBody::Budget(spec) => {
                let limit_field = format!("{field}.budget.limit");
                validate_budget_limit(spec.limit, &limit_field, &mut violations);
                validate_budget_routing(&self.routing(), field, &mut violations);
            }
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(RateLimitError::InvalidArgument(violations))
        }
    }
}

/// Routing settings and version of the policy an item names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRouting {
    /// The policy's consistency, if it sets one.
    pub consistency: Option<Consistency>,
    /// The policy's failure policy, if it sets one.
    pub on_failure: Option<FailurePolicy>,
    /// The policy's version.
    pub version: u64,
}

/// A cost budget policy of the policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Name budget targets refer to, as for rate-limit policies.
    pub name: String,
    /// Limit and calendar window.
    pub spec: BudgetSpec,
    /// LOCAL or OWNER; `None` = the cluster default.
    pub consistency: Option<Consistency>,
}
