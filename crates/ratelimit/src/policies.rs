//! The compiled policy set: the default policy, the policy file's and the namespace-scoped
//! stored ones, each with what the limiter derives from it once, at load time; and the policy
//! file's parsing.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::algorithm::Params;
use crate::error::{FieldViolation, RateLimitError};
use crate::hash::SeededXxh3;
use crate::spec::{
    Algorithm, BudgetPolicy, BudgetSpec, BudgetWindow, Consistency, DEFAULT_POLICY_NAME,
    FailurePolicy, LimitSpec, MAX_POLICIES, MAX_POLICY_FILE_BYTES, Mode, Policy, PolicyBody,
    PolicyRouting, ScopedPolicy, policy_field, validate_budget_limit, validate_budget_routing,
    validate_policy_name,
};

/// A policy with what the limiter derives from it once, at load time.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub(crate) policy: Policy,
    pub(crate) params: Params,
    pub(crate) fingerprint: u64,
    /// The etcd revision of a namespace-scoped policy; 0 for file and default policies.
    pub(crate) version: u64,
}

impl CompiledPolicy {
    fn new(policy: Policy) -> Self {
        let params = Params::from_spec(&policy.spec);
        Self {
            fingerprint: params.fingerprint(),
            params,
            policy,
            version: 0,
        }
    }
}

type PolicyMap = HashMap<String, CompiledPolicy, BuildHasherDefault<SeededXxh3>>;
type BudgetMap = HashMap<String, (BudgetSpec, PolicyRouting)>;

#[derive(Debug)]
struct PolicySetInner {
    default: CompiledPolicy,
    /// File rate-limit policies.
    named: PolicyMap,
    names: Vec<String>,
    /// Consistency and failure policy of file policies that set them.
    named_routing: HashMap<String, PolicyRouting>,
    /// File budget policies (kept apart: a Check cannot use them, a budget call only them).
    named_budgets: BudgetMap,
    /// Namespace-scoped rate-limit policies (from etcd), which shadow file policies of the same
    /// name in their namespace.
    scoped: HashMap<String, HashMap<String, (CompiledPolicy, PolicyRouting)>>,
    /// Namespace-scoped budget policies (from etcd), which shadow file policies likewise.
    scoped_budgets: HashMap<String, BudgetMap>,
}

/// An immutable, validated set of policies: the default plus named ones, rate limits and cost
/// budgets apart. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PolicySet {
    inner: Arc<PolicySetInner>,
}

impl PolicySet {
    /// Validates every policy. Duplicate names are an error; a named policy called `default`
    /// replaces `default`. The default policy is always named `default`, whatever it was called.
    pub fn new(default: Policy, named: Vec<Policy>) -> Result<Self, RateLimitError> {
        Self::with_routing(
            default,
            named
                .into_iter()
                .map(|p| (p, PolicyRouting::default()))
                .collect(),
            Vec::new(),
        )
    }

    /// As [`PolicySet::new`], each policy with its consistency and failure policy, plus budget
    /// policies (whose names share the rate-limit policies' name space).
    fn with_routing(
        default: Policy,
        named: Vec<(Policy, PolicyRouting)>,
        budgets: Vec<BudgetPolicy>,
    ) -> Result<Self, RateLimitError> {
        let mut violations = Vec::new();
        let count = named.len() + budgets.len();
        if count >= MAX_POLICIES {
            violations.push(FieldViolation::new(
                "policy",
                format!("at most {MAX_POLICIES} policies, got {}", count + 1),
            ));
        }
        let mut default = default;
        DEFAULT_POLICY_NAME.clone_into(&mut default.name);
        let mut map = PolicyMap::default();
        let mut seen_default = false;
        let mut named_routing = HashMap::new();
        for (policy, routing) in named {
            if routing != PolicyRouting::default() {
                named_routing.insert(policy.name.clone(), routing);
            }
            policy.validate_into(&mut violations);
            if policy.name == DEFAULT_POLICY_NAME {
                if seen_default {
                    violations.push(duplicate(&policy.name));
                }
                seen_default = true;
                default = policy;
            } else if map.contains_key(&policy.name) {
                violations.push(duplicate(&policy.name));
            } else {
                map.insert(policy.name.clone(), CompiledPolicy::new(policy));
            }
        }
        let mut named_budgets = BudgetMap::new();
        for budget in budgets {
            let prefix = policy_field(&budget.name);
            validate_policy_name(&budget.name, &format!("{prefix}.name"), &mut violations);
            validate_budget_limit(
                budget.spec.limit,
                &format!("{prefix}.budget"),
                &mut violations,
            );
            let routing = PolicyRouting {
                consistency: budget.consistency,
                ..PolicyRouting::default()
            };
            validate_budget_routing(&routing, &prefix, &mut violations);
            if budget.name == DEFAULT_POLICY_NAME {
                violations.push(FieldViolation::new(
                    format!("{prefix}.name"),
                    "\"default\" is reserved for the built-in default (rate-limit) policy",
                ));
            } else if map.contains_key(&budget.name) || named_budgets.contains_key(&budget.name) {
                violations.push(duplicate(&budget.name));
            } else {
                named_budgets.insert(budget.name, (budget.spec, routing));
            }
        }
        default.validate_into(&mut violations);
        if !violations.is_empty() {
            return Err(RateLimitError::InvalidArgument(violations));
        }
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.push(DEFAULT_POLICY_NAME.to_owned());
        names.sort_unstable();
        Ok(Self {
            inner: Arc::new(PolicySetInner {
                default: CompiledPolicy::new(default),
                named: map,
                names,
                named_routing,
                named_budgets,
                scoped: HashMap::new(),
                scoped_budgets: HashMap::new(),
            }),
        })
    }

    /// Parses a policy file's contents, one `[[policy]]` table per named policy:
    ///
    /// ```toml
    /// [[policy]]
    /// name = "llm-requests"
    /// limit = 100
    /// period = "1m"        # humantime
    /// burst = 20           # optional, default = limit
    /// algorithm = "gcra"   # optional: gcra | fixed_window | sliding_window
    /// mode = "enforce"     # optional: enforce | shadow
    /// consistency = "owner"  # optional: local | owner | strict (default: the cluster's)
    /// on_failure = "fail_closed"  # optional: fail_open | fail_closed | local_fallback
    ///
    /// [[policy]]
    /// name = "daily-tokens"   # a cost budget instead of a rate limit
    /// budget = 1000000        # units per window, 1 … 10^15
    /// window = "day"          # hour | day | month (UTC calendar windows)
    /// consistency = "owner"   # optional: local | owner
    /// ```
    ///
    /// Unknown fields are rejected; errors name the policy and the field.
    pub fn from_toml_str(toml: &str, default: Policy) -> Result<Self, RateLimitError> {
        Self::parse(toml, default, "<string>")
    }

    /// Reads and parses a policy file of at most `MAX_POLICY_FILE_BYTES`.
    pub fn load_file(path: &Path, default: Policy) -> Result<Self, RateLimitError> {
        let shown = path.display().to_string();
        let file_error = |reason: String| RateLimitError::PolicyFile {
            path: shown.clone(),
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| file_error(e.to_string()))?
            .len();
        if len > MAX_POLICY_FILE_BYTES {
            return Err(file_error(format!(
                "file is {len} bytes, at most {MAX_POLICY_FILE_BYTES} allowed"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        Self::parse(&text, default, &shown)
    }

    fn parse(toml: &str, default: Policy, source: &str) -> Result<Self, RateLimitError> {
        let file_error = |reason: String| RateLimitError::PolicyFile {
            path: source.to_owned(),
            reason,
        };
        let (named, budgets) = parse_policy_file(toml).map_err(file_error)?;
        Self::with_routing(default, named, budgets).map_err(|e| match e {
            RateLimitError::InvalidArgument(violations) => file_error(
                violations
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            other => other,
        })
    }

    /// The policy called `name`; `default` finds the default policy.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.get_compiled(name).map(|c| &c.policy)
    }

    /// This set with `scoped` as its namespace-scoped policies (replacing any it had).
    ///
    /// # Errors
    /// `InvalidArgument` when a scoped policy is invalid.
    pub fn with_scoped(&self, scoped: &[ScopedPolicy]) -> Result<Self, RateLimitError> {
        let mut by_namespace: HashMap<String, HashMap<String, (CompiledPolicy, PolicyRouting)>> =
            HashMap::new();
        let mut budgets: HashMap<String, BudgetMap> = HashMap::new();
        for p in scoped {
            p.validate("policy")?;
            match p.body {
                PolicyBody::RateLimit { spec, mode } => {
                    let name = p.name.clone();
                    let mut compiled = CompiledPolicy::new(Policy { name, spec, mode });
                    compiled.version = p.version;
                    by_namespace
                        .entry(p.namespace.clone())
                        .or_default()
                        .insert(p.name.clone(), (compiled, p.routing()));
                }
                PolicyBody::Budget(spec) => {
                    budgets
                        .entry(p.namespace.clone())
                        .or_default()
                        .insert(p.name.clone(), (spec, p.routing()));
                }
            }
        }
        Ok(Self {
            inner: Arc::new(PolicySetInner {
                default: self.inner.default.clone(),
                named: self.inner.named.clone(),
                names: self.inner.names.clone(),
                named_routing: self.inner.named_routing.clone(),
                named_budgets: self.inner.named_budgets.clone(),
                scoped: by_namespace,
                scoped_budgets: budgets,
            }),
        })
    }

    /// Whether `namespace` has a stored policy called `name` of either kind (which shadows
    /// file policies of that name).
    fn scoped_has(&self, namespace: &str, name: &str) -> bool {
        let inner = &self.inner;
        inner
            .scoped
            .get(namespace)
            .is_some_and(|m| m.contains_key(name))
            || inner
                .scoped_budgets
                .get(namespace)
                .is_some_and(|m| m.contains_key(name))
    }

    /// The rate-limit policy called `name` as seen from `namespace`: the namespace's own
    /// (etcd) policy, else the global one — unless the namespace's own policy of that name is
    /// a budget.
    pub(crate) fn get_compiled_in(&self, namespace: &str, name: &str) -> Option<&CompiledPolicy> {
        match self.inner.scoped.get(namespace).and_then(|m| m.get(name)) {
            Some((c, _)) => Some(c),
            None if self.scoped_has(namespace, name) => None,
            None => self.get_compiled(name),
        }
    }

    /// The budget policy called `name` as seen from `namespace` (its limit and window, and its
    /// routing and version): the namespace's own, else the file's — unless the namespace's own
    /// policy of that name is a rate limit.
    #[must_use]
    pub fn budget_in(&self, namespace: &str, name: &str) -> Option<(BudgetSpec, PolicyRouting)> {
        match self
            .inner
            .scoped_budgets
            .get(namespace)
            .and_then(|m| m.get(name))
        {
            Some(found) => Some(*found),
            None if self.scoped_has(namespace, name) => None,
            None => self.inner.named_budgets.get(name).copied(),
        }
    }

    /// The error for `field` naming `name` in `namespace` as a rate limit when it is not one:
    /// `InvalidArgument` when it is a budget policy, `PolicyNotFound` otherwise.
    #[must_use]
    pub fn not_a_rate_limit(&self, namespace: &str, name: &str, field: String) -> RateLimitError {
        if self.budget_in(namespace, name).is_some() {
            RateLimitError::invalid(
                field,
                format!(
                    "policy {name:?} is a cost budget; use Reserve/Commit/Cancel/GetUsage with \
                     target.policy"
                ),
            )
        } else {
            RateLimitError::PolicyNotFound {
                field,
                name: name.to_owned(),
            }
        }
    }

    /// Whether `name` resolves in `namespace`.
    #[must_use]
    pub fn contains_in(&self, namespace: &str, name: &str) -> bool {
        self.get_compiled_in(namespace, name).is_some()
    }

    /// The routing settings of the policy `name` in `namespace` (defaults for global policies).
    #[must_use]
    pub fn routing_in(&self, namespace: &str, name: &str) -> PolicyRouting {
        self.inner
            .scoped
            .get(namespace)
            .and_then(|m| m.get(name))
            .map(|(_, r)| *r)
            .or_else(|| self.inner.named_routing.get(name).copied())
            .unwrap_or_default()
    }

    /// The limit and mode of the policy `name` in `namespace`.
    #[must_use]
    pub fn get_in(&self, namespace: &str, name: &str) -> Option<&Policy> {
        self.get_compiled_in(namespace, name).map(|c| &c.policy)
    }

    pub(crate) fn get_compiled(&self, name: &str) -> Option<&CompiledPolicy> {
        if name == DEFAULT_POLICY_NAME {
            Some(&self.inner.default)
        } else {
            self.inner.named.get(name)
        }
    }

    pub(crate) fn default_compiled(&self) -> &CompiledPolicy {
        &self.inner.default
    }

    /// The default policy.
    pub fn default_policy(&self) -> &Policy {
        &self.inner.default.policy
    }

    /// Every rate-limit policy name of the file, `default` included, sorted.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.inner.names.iter().map(String::as_str)
    }

    /// Number of rate-limit policies of the file, the default included.
    pub fn len(&self) -> usize {
        self.inner.names.len()
    }

    /// Always false: there is always a default policy.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Default for PolicySet {
    /// Only the default policy, `Policy::default()`.
    fn default() -> Self {
        Self::new(Policy::default(), Vec::new()).expect("the built-in default policy is valid")
    }
}

fn duplicate(name: &str) -> FieldViolation {
    FieldViolation::new(
        format!("{}.name", policy_field(name)),
        "duplicate policy name",
    )
}

/// One `[[policy]]` table of the policy file: a rate limit (`limit`, `period`, …) or a cost
/// budget (`budget`, `window`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyEntry {
    name: String,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    period: Option<String>,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    algorithm: Option<Algorithm>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    budget: Option<u64>,
    #[serde(default)]
    window: Option<BudgetWindow>,
    #[serde(default)]
    consistency: Option<Consistency>,
    #[serde(default)]
    on_failure: Option<FailurePolicy>,
}

/// A policy file entry, decoded.
enum FileEntry {
    RateLimit(Policy, PolicyRouting),
    Budget(BudgetPolicy),
}

impl PolicyEntry {
    /// The rate limit or budget this entry declares; `label` is `policy[<name>]`.
    fn into_policy(self, label: &str) -> Result<FileEntry, String> {
        match (self.limit, self.budget) {
            (Some(_), Some(_)) => Err(format!(
                "{label}.budget: set either `limit` and `period` (a rate limit) or `budget` and \
                 `window` (a cost budget), not both"
            )),
            (None, None) => Err(format!(
                "{label}: missing field `limit` (a rate limit) or `budget` (a cost budget)"
            )),
            (Some(limit), None) => {
                if self.window.is_some() {
                    return Err(format!(
                        "{label}.window: only for a budget; a rate limit has `period`"
                    ));
                }
                let Some(period) = self.period else {
                    return Err(format!("{label}: missing field `period`"));
                };
                let period = humantime::parse_duration(&period)
                    .map_err(|e| format!("{label}.period: invalid duration {period:?}: {e}"))?;
                let routing = PolicyRouting {
                    consistency: self.consistency,
                    on_failure: self.on_failure,
                    version: 0,
                };
                let spec = LimitSpec {
                    limit,
                    period,
                    burst: self.burst.unwrap_or(0),
                    algorithm: self.algorithm.unwrap_or_default(),
                };
                let mode = self.mode.unwrap_or_default();
                let name = self.name;
                Ok(FileEntry::RateLimit(Policy { name, spec, mode }, routing))
            }
            (None, Some(limit)) => {
                let rate_only = [
                    ("period", self.period.is_some()),
                    ("burst", self.burst.is_some()),
                    ("algorithm", self.algorithm.is_some()),
                    ("mode", self.mode == Some(Mode::Shadow)),
                    ("on_failure", self.on_failure.is_some()),
                ];
                if let Some((field, _)) = rate_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "{label}.{field}: only for a rate limit; a budget has `budget` and \
                         `window`, is always enforced, and its calls fail with UNAVAILABLE when \
                         the owner does not answer"
                    ));
                }
                let Some(window) = self.window else {
                    return Err(format!(
                        "{label}: missing field `window` (hour, day or month)"
                    ));
                };
                Ok(FileEntry::Budget(BudgetPolicy {
                    name: self.name,
                    spec: BudgetSpec { limit, window },
                    consistency: self.consistency,
                }))
            }
        }
    }
}

type ParsedFile = (Vec<(Policy, PolicyRouting)>, Vec<BudgetPolicy>);

/// Parses the policy file format (see `PolicySet::from_toml_str`). Entries are decoded one by
/// one so an error can name the policy as well as the field.
fn parse_policy_file(toml: &str) -> Result<ParsedFile, String> {
    let doc: toml::Table = toml
        .parse()
        .map_err(|e: toml::de::Error| one_line(&e.to_string()))?;
    let (mut policies, mut budgets) = (Vec::new(), Vec::new());
    for (key, value) in doc {
        if key != "policy" {
            return Err(format!(
                "unknown top-level key `{key}`, expected `[[policy]]` tables"
            ));
        }
        let toml::Value::Array(entries) = value else {
            return Err("`policy` must be an array of tables: write `[[policy]]`".to_owned());
        };
        if entries.len() >= MAX_POLICIES {
            return Err(format!(
                "at most {MAX_POLICIES} policies, got {}",
                entries.len()
            ));
        }
        for (index, entry) in entries.into_iter().enumerate() {
            let label = match entry.get("name").and_then(toml::Value::as_str) {
                Some(name) => policy_field(name),
                None => format!("policy[#{index}]"),
            };
            let entry: PolicyEntry = entry
                .try_into()
                .map_err(|e: toml::de::Error| format!("{label}: {}", one_line(&e.to_string())))?;
            match entry.into_policy(&label)? {
                FileEntry::RateLimit(policy, routing) => policies.push((policy, routing)),
                FileEntry::Budget(budget) => budgets.push(budget),
            }
        }
    }
    Ok((policies, budgets))
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::spec::{
        MAX_LIMIT, MAX_PERIOD, MAX_POLICY_NAME_LEN, MIN_PERIOD, validate_identifier,
    };

    fn spec(limit: u64, period: Duration) -> LimitSpec {
        LimitSpec {
            limit,
            period,
            burst: 0,
            algorithm: Algorithm::Gcra,
        }
    }

    fn file_reason(result: Result<PolicySet, RateLimitError>) -> String {
        match result {
            Err(RateLimitError::PolicyFile { reason, .. }) => reason,
            other => panic!("expected a policy file error, got {other:?}"),
        }
    }

    #[test]
    fn test_effective_burst_defaults_to_limit() {
        let mut s = spec(10, Duration::from_secs(1));
        assert_eq!(s.effective_burst(), 10);
        s.burst = 3;
        assert_eq!(s.effective_burst(), 3);
    }

    #[test]
    fn test_default_from_capacity_matches_the_old_global_bucket() {
        let policy = Policy::default_from_capacity(60, 1.0).unwrap();
        assert_eq!(policy.name, "default");
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(
            policy.spec,
            LimitSpec {
                limit: 60,
                period: Duration::from_secs(60),
                burst: 60,
                algorithm: Algorithm::Gcra,
            }
        );
        assert_eq!(policy, Policy::default());
        let half = Policy::default_from_capacity(10, 4.0).unwrap();
        assert_eq!(half.spec.period, Duration::from_millis(2500));
    }

    #[test]
    fn test_default_from_capacity_rejects_bad_numbers() {
        let err = Policy::default_from_capacity(0, f64::NAN).unwrap_err();
        let RateLimitError::InvalidArgument(v) = err else {
            panic!("{err:?}")
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["policy[default].refill_per_sec", "policy[default].capacity"]
        );
        // 1 unit per 1e-9 s would make a period below 1ms.
        assert!(Policy::default_from_capacity(1, 1e9).is_err());
        // 1e15 units at 1/s is ~31.7 million years.
        assert!(Policy::default_from_capacity(MAX_LIMIT, 1.0).is_err());
        assert!(Policy::default_from_capacity(1, f64::MIN_POSITIVE).is_err());
    }

    #[test]
    fn test_algorithm_and_mode_use_snake_case_names() {
        #[derive(Deserialize)]
        struct Doc {
            a: Vec<Algorithm>,
            m: Vec<Mode>,
        }
        let doc: Doc = toml::from_str(
            r#"a = ["gcra", "fixed_window", "sliding_window"]
               m = ["enforce", "shadow"]"#,
        )
        .unwrap();
        assert_eq!(
            doc.a,
            [
                Algorithm::Gcra,
                Algorithm::FixedWindow,
                Algorithm::SlidingWindow
            ]
        );
        assert_eq!(doc.m, [Mode::Enforce, Mode::Shadow]);
        assert_eq!(Algorithm::SlidingWindow.to_string(), "sliding_window");
        assert_eq!(Mode::Shadow.to_string(), "shadow");
    }

    #[test]
    fn test_policy_validation_names_policy_and_every_bad_field() {
        let policy = Policy {
            name: "llm".into(),
            spec: LimitSpec {
                limit: 0,
                period: Duration::from_micros(999),
                burst: MAX_LIMIT + 1,
                algorithm: Algorithm::Gcra,
            },
            mode: Mode::Enforce,
        };
        let RateLimitError::InvalidArgument(v) = policy.validate().unwrap_err() else {
            panic!()
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "policy[llm].limit",
                "policy[llm].period",
                "policy[llm].burst"
            ]
        );
    }

    #[test]
    fn test_spec_bounds_are_inclusive() {
        let mut out = Vec::new();
        spec(MAX_LIMIT, MIN_PERIOD).validate_into("x", &mut out);
        spec(1, MAX_PERIOD).validate_into("x", &mut out);
        assert!(out.is_empty(), "{out:?}");
        spec(MAX_LIMIT + 1, MAX_PERIOD + Duration::from_nanos(1)).validate_into("x", &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn test_policy_name_charset_and_length() {
        let mut out = Vec::new();
        for ok in [
            "a",
            "llm-requests",
            "tenant:acme.v1_x",
            &"n".repeat(MAX_POLICY_NAME_LEN),
        ] {
            validate_policy_name(ok, "f", &mut out);
        }
        assert!(out.is_empty(), "{out:?}");
        for bad in [
            "",
            "has space",
            "slash/x",
            "é",
            &"n".repeat(MAX_POLICY_NAME_LEN + 1),
        ] {
            validate_policy_name(bad, "f", &mut out);
        }
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn test_identifier_validation_rejects_empty_long_and_control_chars() {
        let mut out = Vec::new();
        validate_identifier("user-1", "k", 8, &mut out);
        validate_identifier("ünï", "k", 8, &mut out);
        assert!(out.is_empty());
        validate_identifier("", "a", 8, &mut out);
        validate_identifier("123456789", "b", 8, &mut out);
        validate_identifier("tab\there", "c", 16, &mut out);
        validate_identifier("del\u{7f}", "d", 16, &mut out);
        let fields: Vec<_> = out.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["a", "b", "c", "d"]);
    }

    #[test]
    fn test_policy_set_rejects_duplicates_and_replaces_default() {
        let p = |name: &str, limit| Policy {
            name: name.into(),
            spec: spec(limit, Duration::from_secs(1)),
            mode: Mode::Enforce,
        };
        let err = PolicySet::new(Policy::default(), vec![p("a", 1), p("a", 2)]).unwrap_err();
        assert_eq!(
            err,
            RateLimitError::invalid("policy[a].name", "duplicate policy name")
        );

        let set = PolicySet::new(
            Policy {
                name: "whatever".into(),
                ..Policy::default()
            },
            vec![p("b", 5), p("default", 7), p("a", 3)],
        )
        .unwrap();
        assert_eq!(set.default_policy().spec.limit, 7);
        assert_eq!(set.get("default").unwrap().spec.limit, 7);
        assert_eq!(set.get("a").unwrap().spec.limit, 3);
        assert!(set.get("c").is_none());
        assert_eq!(set.names().collect::<Vec<_>>(), ["a", "b", "default"]);
        assert_eq!(set.len(), 3);

        let renamed = PolicySet::new(
            Policy {
                name: "whatever".into(),
                ..Policy::default()
            },
            vec![],
        )
        .unwrap();
        assert_eq!(renamed.default_policy().name, "default");
    }

    #[test]
    fn test_policy_file_parses_all_fields_and_defaults() {
        let set = PolicySet::from_toml_str(
            r#"
            [[policy]]
            name = "llm-requests"
            limit = 100
            period = "1m"
            burst = 20
            algorithm = "gcra"
            mode = "enforce"

            [[policy]]
            name = "daily-budget"
            limit = 5000000
            period = "1day"
            algorithm = "fixed_window"
            mode = "shadow"

            [[policy]]
            name = "tools"
            limit = 10
            period = "1s"
            "#,
            Policy::default(),
        )
        .unwrap();
        let llm = set.get("llm-requests").unwrap();
        assert_eq!(llm.spec.limit, 100);
        assert_eq!(llm.spec.period, Duration::from_secs(60));
        assert_eq!(llm.spec.burst, 20);
        assert_eq!(llm.mode, Mode::Enforce);
        let budget = set.get("daily-budget").unwrap();
        assert_eq!(budget.spec.period, Duration::from_secs(86_400));
        assert_eq!(budget.spec.algorithm, Algorithm::FixedWindow);
        assert_eq!(budget.mode, Mode::Shadow);
        let tools = set.get("tools").unwrap();
        assert_eq!(tools.spec.burst, 0);
        assert_eq!(tools.spec.effective_burst(), 10);
        assert_eq!(tools.spec.algorithm, Algorithm::Gcra);
        assert_eq!(tools.mode, Mode::Enforce);
        assert_eq!(set.default_policy(), &Policy::default());
    }

    #[test]
    fn test_empty_policy_file_keeps_only_the_default() {
        let set = PolicySet::from_toml_str("", Policy::default()).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["default"]);
    }

    #[test]
    fn test_policy_file_errors_name_policy_and_field() {
        let base = "[[policy]]\nname = \"llm\"\nlimit = 1\nperiod = \"1m\"\n";
        let cases = [
            (
                format!("{base}brust = 3\n"),
                "policy[llm]: unknown field `brust`",
            ),
            (
                "[[policy]]\nname = \"llm\"\nlimit = \"x\"\nperiod = \"1m\"\n".to_owned(),
                "policy[llm]: invalid type: string \"x\", expected u64 in `limit`",
            ),
            (
                "[[policy]]\nname = \"llm\"\nlimit = -1\nperiod = \"1m\"\n".to_owned(),
                "policy[llm]: invalid value: integer `-1`, expected u64 in `limit`",
            ),
            (
                format!("{base}mode = \"loud\"\n"),
                "policy[llm]: unknown variant `loud`",
            ),
            (
                format!("{base}algorithm = \"leaky\"\n"),
                "policy[llm]: unknown variant `leaky`",
            ),
            (
                "[[policy]]\nname = \"llm\"\nlimit = 1\nperiod = \"soon\"\n".to_owned(),
                "policy[llm].period: invalid duration \"soon\"",
            ),
            (
                "[[policy]]\nname = \"llm\"\nlimit = 0\nperiod = \"1us\"\n".to_owned(),
                "policy[llm].limit: must be between 1 and 1000000000000000, got 0; \
                 policy[llm].period: must be between 1ms and 366 days, got 1us",
            ),
            (
                "[[policy]]\nlimit = 1\nperiod = \"1m\"\n".to_owned(),
                "policy[#0]: missing field `name`",
            ),
            (
                format!("{base}{base}"),
                "policy[llm].name: duplicate policy name",
            ),
            (
                "[limits]\nx = 1\n".to_owned(),
                "unknown top-level key `limits`",
            ),
            (
                "policy = 3\n".to_owned(),
                "`policy` must be an array of tables",
            ),
            ("[[policy]\n".to_owned(), "TOML parse error at line 1"),
        ];
        for (toml, expected) in cases {
            let reason = file_reason(PolicySet::from_toml_str(&toml, Policy::default()));
            assert!(
                reason.starts_with(expected),
                "{toml:?}\n got: {reason}\nwant: {expected}"
            );
        }
    }

    #[test]
    fn test_load_file_reads_policies() {
        let path = std::env::temp_dir().join(format!(
            "agentmesh-ratelimit-policies-{}.toml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "[[policy]]\nname = \"tools\"\nlimit = 10\nperiod = \"1s\"\n",
        )
        .unwrap();
        let set = PolicySet::load_file(&path, Policy::default());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(set.unwrap().get("tools").unwrap().spec.limit, 10);
    }

    #[test]
    fn test_load_file_reports_path_of_missing_file() {
        let err = PolicySet::load_file(Path::new("/nonexistent/policies.toml"), Policy::default())
            .unwrap_err();
        let RateLimitError::PolicyFile { path, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(path, "/nonexistent/policies.toml");
    }

    #[test]
    fn test_file_policies_may_set_consistency_and_failure_policy() {
        let set = PolicySet::from_toml_str(
            r#"
            [[policy]]
            name = "strict-one"
            limit = 5
            period = "1s"
            consistency = "strict"
            on_failure = "fail_closed"

            [[policy]]
            name = "plain"
            limit = 5
            period = "1s"
            "#,
            Policy::default(),
        )
        .unwrap();
        let r = set.routing_in("any-namespace", "strict-one");
        assert_eq!(
            (r.consistency, r.on_failure),
            (Some(Consistency::Strict), Some(FailurePolicy::FailClosed))
        );
        assert_eq!(set.routing_in("ns", "plain"), PolicyRouting::default());
        let reason = file_reason(PolicySet::from_toml_str(
            "[[policy]]\nname = \"x\"\nlimit = 1\nperiod = \"1s\"\nconsistency = \"eventual\"",
            Policy::default(),
        ));
        assert!(reason.contains("policy[x]"), "{reason}");
        assert!(reason.contains("eventual"), "{reason}");
    }

    fn scoped(namespace: &str, name: &str, body: PolicyBody) -> ScopedPolicy {
        ScopedPolicy {
            namespace: namespace.into(),
            name: name.into(),
            body,
            consistency: None,
            on_failure: None,
            version: 4,
        }
    }

    fn daily(limit: u64) -> PolicyBody {
        PolicyBody::Budget(BudgetSpec {
            limit,
            window: BudgetWindow::Day,
        })
    }

    fn per_second(limit: u64) -> PolicyBody {
        PolicyBody::RateLimit {
            spec: spec(limit, Duration::from_secs(1)),
            mode: Mode::Enforce,
        }
    }

    #[test]
    fn test_budget_policies_are_kept_apart_from_rate_limits() {
        let base = PolicySet::from_toml_str(
            "[[policy]]\nname = \"rpm\"\nlimit = 5\nperiod = \"1m\"\n\n\
             [[policy]]\nname = \"tokens\"\nbudget = 1000\nwindow = \"month\"\n\
             consistency = \"local\"\n",
            Policy::default(),
        )
        .unwrap();
        let owner = ScopedPolicy {
            consistency: Some(Consistency::Owner),
            ..scoped("team-a", "usd", daily(500))
        };
        let set = base
            .with_scoped(&[
                owner,
                // A stored budget shadows the file's rate limit in its namespace...
                scoped("team-b", "rpm", daily(7)),
                // ...and a stored rate limit the file's budget.
                scoped("team-c", "tokens", per_second(3)),
            ])
            .unwrap();

        let (usd, routing) = set.budget_in("team-a", "usd").unwrap();
        assert_eq!(usd.limit, 500);
        assert_eq!(
            (routing.consistency, routing.version),
            (Some(Consistency::Owner), 4)
        );
        assert!(set.get_in("team-a", "usd").is_none(), "not a rate limit");
        assert!(set.budget_in("team-b", "usd").is_none(), "scoped to team-a");
        // File budgets apply in every namespace, with their routing.
        let (tokens, routing) = set.budget_in("team-a", "tokens").unwrap();
        assert_eq!(tokens.window, BudgetWindow::Month);
        assert_eq!(routing.consistency, Some(Consistency::Local));
        assert!(set.get_in("team-a", "tokens").is_none());
        assert!(!set.names().any(|n| n == "tokens"), "names are rate limits");
        // Shadowing, both ways.
        assert!(set.get_in("team-b", "rpm").is_none());
        assert_eq!(set.budget_in("team-b", "rpm").unwrap().0.limit, 7);
        assert_eq!(set.get_in("team-a", "rpm").unwrap().spec.limit, 5);
        assert!(set.budget_in("team-c", "tokens").is_none());
        assert_eq!(set.get_in("team-c", "tokens").unwrap().spec.limit, 3);
    }

    #[test]
    fn test_naming_a_budget_where_a_rate_limit_is_expected_is_invalid_not_missing() {
        let set = PolicySet::default()
            .with_scoped(&[scoped("ns", "usd", daily(5))])
            .unwrap();
        let err = set.not_a_rate_limit("ns", "usd", "items[2].policy".into());
        let RateLimitError::InvalidArgument(v) = err else {
            panic!("{err:?}")
        };
        assert_eq!(v[0].field, "items[2].policy");
        assert!(v[0].description.contains("is a cost budget"), "{v:?}");
        assert_eq!(
            set.not_a_rate_limit("other", "usd", "items[0].policy".into()),
            RateLimitError::PolicyNotFound {
                field: "items[0].policy".into(),
                name: "usd".into()
            }
        );
    }

    #[test]
    fn test_scoped_budget_validation_names_every_bad_field() {
        let bad = ScopedPolicy {
            consistency: Some(Consistency::Strict),
            on_failure: Some(FailurePolicy::FailClosed),
            ..scoped("ns", "default", daily(MAX_LIMIT + 1))
        };
        let RateLimitError::InvalidArgument(v) = bad.validate("policy").unwrap_err() else {
            panic!()
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "policy.name",
                "policy.budget.limit",
                "policy.consistency",
                "policy.on_failure"
            ]
        );
        scoped("ns", "usd", daily(MAX_LIMIT))
            .validate("policy")
            .unwrap();
    }

    #[test]
    fn test_policy_file_budget_errors_name_policy_and_field() {
        let budget = "[[policy]]\nname = \"usd\"\nbudget = 10\nwindow = \"day\"\n";
        let cases = [
            (
                "[[policy]]\nname = \"x\"\n".to_owned(),
                "policy[x]: missing field `limit` (a rate limit) or `budget` (a cost budget)",
            ),
            (
                format!("{budget}limit = 3\n"),
                "policy[usd].budget: set either `limit` and `period` (a rate limit) or `budget`",
            ),
            (
                "[[policy]]\nname = \"usd\"\nbudget = 10\n".to_owned(),
                "policy[usd]: missing field `window`",
            ),
            (
                format!("{budget}period = \"1m\"\n"),
                "policy[usd].period: only for a rate limit",
            ),
            (
                format!("{budget}mode = \"shadow\"\n"),
                "policy[usd].mode: only for a rate limit",
            ),
            (
                format!("{budget}on_failure = \"fail_open\"\n"),
                "policy[usd].on_failure: only for a rate limit",
            ),
            (
                "[[policy]]\nname = \"usd\"\nbudget = 10\nwindow = \"week\"\n".to_owned(),
                "policy[usd]: unknown variant `week`",
            ),
            (
                "[[policy]]\nname = \"usd\"\nbudget = 0\nwindow = \"day\"\n".to_owned(),
                "policy[usd].budget: must be between 1 and 1000000000000000, got 0",
            ),
            (
                format!("{budget}consistency = \"strict\"\n"),
                "policy[usd].consistency: a budget is LOCAL or OWNER",
            ),
            (
                "[[policy]]\nname = \"r\"\nlimit = 1\nperiod = \"1s\"\nwindow = \"day\"\n"
                    .to_owned(),
                "policy[r].window: only for a budget",
            ),
            (
                format!("{budget}[[policy]]\nname = \"usd\"\nlimit = 1\nperiod = \"1s\"\n"),
                "policy[usd].name: duplicate policy name",
            ),
            (
                "[[policy]]\nname = \"default\"\nbudget = 1\nwindow = \"day\"\n".to_owned(),
                "policy[default].name: \"default\" is reserved",
            ),
        ];
        for (toml, expected) in cases {
            let reason = file_reason(PolicySet::from_toml_str(&toml, Policy::default()));
            assert!(
                reason.starts_with(expected),
                "{toml:?}\n got: {reason}\nwant: {expected}"
            );
        }
    }
}
