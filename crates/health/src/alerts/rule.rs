//! Alert rules and their condition language, parsed once when a rule is stored:
//!
//! ```text
//! state("service/ratelimit") == DOWN            a component (or `prefix/*`) in a state
//! error_rate("eventbus") > 0.05                 share of RPCs ending UNKNOWN, DEADLINE_EXCEEDED,
//!                                               INTERNAL, UNAVAILABLE or DATA_LOSS
//! latency_p99("ratelimit", "Check") > 250ms     from rpc_server_call_duration_seconds (p50, p90,
//!                                               p99; the method is optional)
//! cache_hit_rate() < 0.5                        (l1 + l2 + stale) / all cache reads
//! deny_rate("tenant-a") > 0.2                   denied / all rate-limit decisions (namespace optional)
//! queue_wait("summarize") > 30s                 the oldest PENDING task's wait (type optional)
//! budget_burn("tenant-a") > 1000                cost units committed per second against cost
//!                                               budgets (namespace optional)
//! rate("eventbus_dead_lettered_total") > 1      per-second increase of a counter, summed
//! metric("scheduler_agents", "state=dead") > 0  current value of a gauge or counter, summed
//! ```
//!
//! Rates and percentiles are over the last scrape interval, across every instance. Numbers take
//! `ms`, `s`, `m` (durations, compared in seconds) or `%` (divided by 100).

use std::fmt;
use std::time::Duration;

use crate::error::{FieldViolation, HealthError};
use crate::model::State;

/// Longest rule name, bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest expression, bytes.
pub const MAX_EXPR_LEN: usize = 512;
/// Longest summary, bytes.
pub const MAX_SUMMARY_LEN: usize = 1024;
/// Longest `for`.
pub const MAX_FOR: Duration = Duration::from_secs(24 * 3600);
/// Most rules.
pub const MAX_RULES: usize = 1000;

/// How bad an alert is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record.
    Info,
    /// Someone should look.
    Warning,
    /// Someone must act now.
    Critical,
}

impl Severity {
    /// Lower-case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Self::Gt => left > right,
            Self::Ge => left >= right,
            Self::Lt => left < right,
            Self::Le => left <= right,
            Self::Eq => (left - right).abs() < f64::EPSILON,
            Self::Ne => (left - right).abs() >= f64::EPSILON,
        }
    }
}

/// What a condition measures.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// Components matching an id or `prefix/*`.
    State(String),
    /// Share of server errors of a service's RPCs.
    ErrorRate(String),
    /// A latency quantile (0–1) of a service's RPCs, optionally one method.
    Latency {
        /// 0.5, 0.9 or 0.99.
        quantile: f64,
        /// Service name.
        service: String,
        /// Method name, e.g. `Check`.
        method: Option<String>,
    },
    /// The cache's hit rate.
    CacheHitRate,
    /// The rate limiter's deny rate, optionally one namespace.
    DenyRate(Option<String>),
    /// The scheduler's oldest pending task's wait, optionally one task type.
    QueueWait(Option<String>),
    /// Cost units committed per second against budgets, optionally one namespace.
    BudgetBurn(Option<String>),
    /// Per-second increase of a counter.
    Rate(String, Vec<(String, String)>),
    /// Current value of a gauge or counter.
    Metric(String, Vec<(String, String)>),
}

impl Query {
    /// The service whose maintenance suppresses the rule, if it is about one.
    #[must_use]
    pub fn service(&self) -> Option<String> {
        match self {
            Self::State(id) => Some(id.clone()),
            Self::ErrorRate(s) | Self::Latency { service: s, .. } => Some(format!("service/{s}")),
            Self::CacheHitRate => Some("service/cache".to_owned()),
            Self::DenyRate(_) | Self::BudgetBurn(_) => Some("service/ratelimit".to_owned()),
            Self::QueueWait(_) => Some("service/scheduler".to_owned()),
            Self::Rate(..) | Self::Metric(..) => None,
        }
    }
}

/// What a condition compares with.
#[derive(Debug, Clone, PartialEq)]
pub enum Threshold {
    /// A number (durations in seconds, percentages as fractions).
    Number(f64),
    /// A state (with `state(…)`).
    State(State),
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// What is measured.
    pub query: Query,
    /// How it is compared.
    pub op: Op,
    /// With what.
    pub threshold: Threshold,
}

impl Condition {
    /// Whether a measured number satisfies the condition.
    #[must_use]
    pub fn holds_for(&self, value: f64) -> bool {
        match self.threshold {
            Threshold::Number(t) => self.op.holds(value, t),
            Threshold::State(_) => false,
        }
    }

    /// Whether a component state satisfies the condition.
    #[must_use]
    pub fn holds_for_state(&self, state: State) -> bool {
        match (&self.threshold, self.op) {
            (Threshold::State(want), Op::Eq) => state == *want,
            (Threshold::State(want), Op::Ne) => state != *want,
            _ => false,
        }
    }
}

/// An alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// 1–64 bytes: letters, digits, `-`, `_`.
    pub name: String,
    /// How bad.
    pub severity: Severity,
    /// The condition as written.
    pub expr: String,
    /// The condition parsed.
    pub condition: Condition,
    /// How long the condition must hold before the alert fires.
    pub for_: Duration,
    /// Sent with notifications.
    pub summary: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.name,
            self.severity.as_str(),
            self.expr
        )
    }
}

/// Validates a name: 1–64 bytes of letters, digits, `-`, `_`.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Rule {
    /// A rule, validated; `field` prefixes the violations (`rule.` from the API, `rule[3].`
    /// from a file).
    ///
    /// # Errors
    /// `InvalidArgument` naming every bad field.
    pub fn new(
        field: &str,
        name: &str,
        severity: Severity,
        expr: &str,
        for_: Duration,
        summary: &str,
    ) -> Result<Self, HealthError> {
        let mut v = Vec::new();
        if !valid_name(name) {
            v.push(FieldViolation::new(
                format!("{field}name"),
                "1–64 bytes of letters, digits, '-' and '_'",
            ));
        }
        let condition = if expr.len() > MAX_EXPR_LEN {
            v.push(FieldViolation::new(
                format!("{field}expr"),
                format!("at most {MAX_EXPR_LEN} bytes"),
            ));
            None
        } else {
            match parse(expr) {
                Ok(c) => Some(c),
                Err(e) => {
                    v.push(FieldViolation::new(format!("{field}expr"), e));
                    None
                }
            }
        };
        if for_ > MAX_FOR {
            v.push(FieldViolation::new(
                format!("{field}for"),
                "at most 24 hours",
            ));
        }
        if summary.len() > MAX_SUMMARY_LEN {
            v.push(FieldViolation::new(
                format!("{field}summary"),
                format!("at most {MAX_SUMMARY_LEN} bytes"),
            ));
        }
        match condition {
            Some(condition) if v.is_empty() => Ok(Self {
                name: name.to_owned(),
                severity,
                expr: expr.to_owned(),
                condition,
                for_,
                summary: summary.to_owned(),
            }),
            _ => Err(HealthError::InvalidArgument(v)),
        }
    }
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn skip_space(&mut self) {
        while self.text[self.at..].starts_with(char::is_whitespace) {
            self.at += self.text[self.at..]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
        }
    }

    fn error(&self, what: &str) -> String {
        format!("at position {}: {what}", self.at + 1)
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.text[self.at..].starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), String> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.error(&format!("expected {token:?}")))
        }
    }

    fn word(&mut self) -> &'a str {
        self.skip_space();
        let rest = &self.text[self.at..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '%'))
            .unwrap_or(rest.len());
        self.at += len;
        &rest[..len]
    }

    fn string(&mut self) -> Result<String, String> {
        self.skip_space();
        if !self.eat("\"") {
            return Err(self.error("expected a quoted string"));
        }
        let rest = &self.text[self.at..];
        let end = rest
            .find('"')
            .ok_or_else(|| self.error("unterminated string"))?;
        self.at += end + 1;
        Ok(rest[..end].to_owned())
    }
}

fn labels(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("label filter {pair:?} is not name=value"))
        })
        .collect()
}

/// Parses a condition.
///
/// # Errors
/// What is wrong, with the position (1-based byte offset).
pub fn parse(text: &str) -> Result<Condition, String> {
    let mut s = Scanner { text, at: 0 };
    let function = s.word();
    s.expect("(")?;
    let mut args = Vec::new();
    if !s.eat(")") {
        loop {
            args.push(s.string()?);
            if s.eat(")") {
                break;
            }
            s.expect(",")?;
        }
    }
    let arity = |min: usize, max: usize| -> Result<(), String> {
        if (min..=max).contains(&args.len()) {
            Ok(())
        } else {
            Err(format!(
                "{function}() takes {min}–{max} quoted arguments, got {}",
                args.len()
            ))
        }
    };
    let query = match function {
        "state" => {
            arity(1, 1)?;
            Query::State(args[0].clone())
        }
        "error_rate" => {
            arity(1, 1)?;
            Query::ErrorRate(args[0].clone())
        }
        "latency_p50" | "latency_p90" | "latency_p99" => {
            arity(1, 2)?;
            let quantile = match function {
                "latency_p50" => 0.5,
                "latency_p90" => 0.9,
                _ => 0.99,
            };
            Query::Latency {
                quantile,
                service: args[0].clone(),
                method: args.get(1).cloned(),
            }
        }
        "cache_hit_rate" => {
            arity(0, 0)?;
            Query::CacheHitRate
        }
        "deny_rate" => {
            arity(0, 1)?;
            Query::DenyRate(args.first().cloned())
        }
        "queue_wait" => {
            arity(0, 1)?;
            Query::QueueWait(args.first().cloned())
        }
        "budget_burn" => {
            arity(0, 1)?;
            Query::BudgetBurn(args.first().cloned())
        }
        "rate" | "metric" => {
            arity(1, 2)?;
            let filter = labels(args.get(1).map_or("", String::as_str))?;
            if function == "rate" {
                Query::Rate(args[0].clone(), filter)
            } else {
                Query::Metric(args[0].clone(), filter)
            }
        }
        other => {
            return Err(format!(
                "at position 1: unknown function {other:?} (state, error_rate, latency_p50|p90|p99, cache_hit_rate, deny_rate, queue_wait, budget_burn, rate, metric)"
            ));
        }
    };
    let op = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">", Op::Gt),
        ("<", Op::Lt),
    ]
    .into_iter()
    .find(|(token, _)| s.eat(token))
    .map(|(_, op)| op)
    .ok_or_else(|| s.error("expected a comparison (>, >=, <, <=, ==, !=)"))?;
    let at = s.at;
    let word = s.word();
    let threshold = if let Query::State(_) = query {
        let state = State::parse(word).ok_or_else(|| {
            format!("at position {}: expected a state (UP, DEGRADED, DOWN, PENDING, MAINTENANCE, UNKNOWN)", at + 2)
        })?;
        if !matches!(op, Op::Eq | Op::Ne) {
            return Err(format!(
                "at position {}: states compare with == or !=",
                at + 1
            ));
        }
        Threshold::State(state)
    } else {
        Threshold::Number(number(word).ok_or_else(|| {
            format!(
                "at position {}: expected a number (e.g. 0.05, 5%, 250ms, 30s)",
                at + 2
            )
        })?)
    };
    s.skip_space();
    if s.at != text.len() {
        return Err(s.error("unexpected text after the condition"));
    }
    Ok(Condition {
        query,
        op,
        threshold,
    })
}

fn number(word: &str) -> Option<f64> {
    let (digits, scale) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("%", 0.01)]
        .into_iter()
        .find_map(|(unit, scale)| word.strip_suffix(unit).map(|d| (d, scale)))
        .unwrap_or((word, 1.0));
    digits
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .map(|n| n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_conditions_parse_with_units() {
        let c = parse(r#"latency_p99("ratelimit", "Check") > 250ms"#).unwrap();
        assert_eq!(
            c.query,
            Query::Latency {
                quantile: 0.99,
                service: "ratelimit".into(),
                method: Some("Check".into())
            }
        );
        assert_eq!(c.threshold, Threshold::Number(0.25));
        let c = parse(r#"state("instance/cache/*") == DOWN"#).unwrap();
        assert!(c.holds_for_state(State::Down));
        let c = parse("cache_hit_rate() < 50%").unwrap();
        assert!(c.holds_for(0.4) && !c.holds_for(0.6));
        let c = parse(r#"metric("scheduler_agents", "state=dead") >= 1"#).unwrap();
        assert_eq!(
            c.query,
            Query::Metric(
                "scheduler_agents".into(),
                vec![("state".into(), "dead".into())]
            )
        );
    }

    #[test]
    fn test_bad_conditions_name_the_position() {
        let e = parse(r#"state("service/x") > DOWN"#).unwrap_err();
        assert!(e.contains("== or !="), "{e}");
        let e = parse(r#"error_rate("x") > lots"#).unwrap_err();
        assert!(e.starts_with("at position 19"), "{e}");
        let e = parse("nope() > 1").unwrap_err();
        assert!(e.contains("unknown function"), "{e}");
        let e = parse(r#"error_rate("x") > 1 extra"#).unwrap_err();
        assert!(e.contains("unexpected text"), "{e}");
        let e = parse(r#"error_rate("x" > 1"#).unwrap_err();
        assert!(e.contains("expected \",\""), "{e}");
    }

    #[test]
    fn test_a_rule_lists_every_bad_field() {
        let err =
            Rule::new("rule.", "bad name", Severity::Warning, "x", MAX_FOR * 2, "").unwrap_err();
        let HealthError::InvalidArgument(v) = err else {
            panic!()
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["rule.name", "rule.expr", "rule.for"]);
    }
}
