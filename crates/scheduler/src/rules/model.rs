//! A rule as stored (plain data, JSON in etcd) and as evaluated (compiled once: the condition,
//! every guard and every template are CEL programs made when the rule is stored).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_runtime::error::{ErrorCode, FieldViolation, ServiceError, join_violations};
use serde::{Deserialize, Serialize};

/// Most responses per rule.
pub const MAX_RESPONSES: usize = 16;
/// Most bytes of a condition, a guard or a template.
pub const MAX_EXPRESSION: usize = 4096;
/// Most entries of a header, type or label list.
pub const MAX_ENTRIES: usize = 16;

/// Everything that can go wrong with rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The rule is invalid; every violation is listed.
    #[error("invalid rule: {}", join_violations(.0))]
    Invalid(Vec<FieldViolation>),
    /// The rule uses something not built yet.
    #[error("{0} is not built yet")]
    Unimplemented(String),
    /// No such rule.
    #[error("rule {0:?} does not exist")]
    NotFound(String),
    /// `expected_version` did not match.
    #[error("rule {name:?} is at version {current}, not {expected}: read it again")]
    Conflict {
        /// The rule.
        name: String,
        /// The version the caller expected.
        expected: u64,
        /// The version stored (0: none).
        current: u64,
    },
    /// The store (etcd) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

impl ServiceError for RuleError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::Unimplemented(_) => ErrorCode::Unimplemented,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict { .. } => ErrorCode::FailedPrecondition,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Self::Invalid(v) => v,
            _ => &[],
        }
    }
}

/// A rule as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RuleDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub disabled: bool,
    pub stimulus: Stimulus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    pub responses: Vec<ResponseDef>,
    /// Correlation of several events before firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<CorrelationDef>,
    /// When it was stored, milliseconds since the Unix epoch.
    #[serde(default)]
    pub updated_at_ms: u64,
}

/// What triggers a rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub struct Stimulus {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Correlation of several events by a key: exactly one of `count` (≥ 2), `together_with`,
/// `not_followed_by`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CorrelationDef {
    /// CEL giving an event's key.
    pub key: String,
    /// Milliseconds.
    pub window_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub together_with: Option<Stimulus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_followed_by: Option<Stimulus>,
}

/// Events that cancel a delayed response: those of `stimulus` whose `key` equals the
/// scheduling stimulus's.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CancelDef {
    pub stimulus: Stimulus,
    /// CEL evaluated on both events.
    pub key: String,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResponseDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub when: String,
    pub action: Action,
    /// Run this long after the stimulus was accepted, milliseconds; 0 = at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
    /// Runs when this response still fails on the stimulus's last delivery, or its task ends
    /// unsuccessfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Box<ResponseDef>>,
    /// Cascade: run after this one completed (its task succeeded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<ResponseDef>,
    /// With a delay: events that cancel it while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelDef>,
}

/// What a response does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Publish {
        subject: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        event_type: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        data: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        content_type: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
    SubmitTask {
        task_type: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        payload: String,
        #[serde(default)]
        priority: u32,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
        /// Per attempt, milliseconds; 0 = the scheduler's default.
        #[serde(default)]
        timeout_ms: u64,
        #[serde(default)]
        max_attempts: u32,
    },
    Webhook {
        url: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        body: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        /// Milliseconds; 0 = 10 s.
        #[serde(default)]
        timeout_ms: u64,
    },
}

impl Default for Action {
    fn default() -> Self {
        Self::publish_to("")
    }
}

impl Action {
    /// A publish to `subject` of the stimulus's data, unchanged.
    #[must_use]
    pub fn publish_to(subject: &str) -> Self {
        Self::Publish {
            subject: subject.to_owned(),
            event_type: String::new(),
            data: String::new(),
            content_type: String::new(),
            headers: BTreeMap::new(),
        }
    }
}

/// A rule ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub def: RuleDef,
    /// The stored version (etcd's mod revision).
    pub version: u64,
    pub condition: Option<Arc<cel::Program>>,
    pub responses: Vec<CompiledResponse>,
    pub correlation: Option<CompiledCorrelation>,
    /// Which of the rule's stimuli this entry listens to (see [`CompiledRule::entries`]).
    pub role: Role,
}

/// Which stimulus of a rule an entry of the index listens to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Role {
    /// The rule's own stimulus.
    #[default]
    Primary,
    /// The second stimulus of a `together_with` correlation.
    Together,
    /// The second stimulus of a `not_followed_by` correlation (it cancels timeouts).
    Follow,
    /// The cancelling stimulus of the named delayed response.
    Cancel(String),
}

/// A correlation ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledCorrelation {
    pub key: Arc<cel::Program>,
    pub window: Duration,
    pub mode: CorrelationMode,
}

/// What a correlation waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorrelationMode {
    /// This many stimuli with one key within the window.
    Count(u32),
    /// One stimulus and one event of the second stimulus, either order.
    Together,
    /// No event of the second stimulus within the window after the stimulus.
    NotFollowedBy,
}

impl CompiledRule {
    /// The index entries of this rule: itself (its stimulus), then one per other stimulus it
    /// listens to (a correlation's second stimulus, each delayed response's cancelling one),
    /// each a copy with that stimulus, no condition, and its [`Role`].
    #[must_use]
    pub fn entries(self) -> Vec<Self> {
        let mut extra = Vec::new();
        let copy = |stimulus: &Stimulus, role: Role| {
            let mut entry = self.clone();
            entry.def.stimulus = stimulus.clone();
            entry.condition = None;
            entry.role = role;
            entry
        };
        if let Some(c) = &self.def.correlation {
            if let Some(s) = &c.together_with {
                extra.push(copy(s, Role::Together));
            }
            if let Some(s) = &c.not_followed_by {
                extra.push(copy(s, Role::Follow));
            }
        }
        let mut stack: Vec<&CompiledResponse> = self.responses.iter().collect();
        while let Some(r) = stack.pop() {
            if let Some(c) = &r.cancel {
                extra.push(copy(&c.stimulus, Role::Cancel(r.name.clone())));
            }
            stack.extend(r.then.iter());
        }
        let mut all = vec![self];
        all.extend(extra);
        all
    }

    /// The response named `name` anywhere in the rule (cascade steps and fallbacks included).
    #[must_use]
    pub fn find(&self, name: &str) -> Option<&CompiledResponse> {
        let mut stack: Vec<&CompiledResponse> = self.responses.iter().collect();
        while let Some(r) = stack.pop() {
            if r.name == name {
                return Some(r);
            }
            stack.extend(r.then.iter());
            stack.extend(r.fallback.as_deref());
        }
        None
    }
}

/// A response ready to run.
#[derive(Debug, Clone)]
pub struct CompiledResponse {
    pub name: String,
    pub when: Option<Arc<cel::Program>>,
    /// Run this long after the stimulus was accepted (durable: see `rules::delayed`).
    pub delay: Option<Duration>,
    pub action: CompiledAction,
    pub fallback: Option<Box<CompiledResponse>>,
    /// Cascade steps.
    pub then: Vec<CompiledResponse>,
    pub cancel: Option<CompiledCancel>,
}

/// A delayed response's cancelling stimulus.
#[derive(Debug, Clone)]
pub struct CompiledCancel {
    pub stimulus: Stimulus,
    pub key: Arc<cel::Program>,
}

/// An action with its templates compiled.
#[derive(Debug, Clone)]
pub enum CompiledAction {
    Publish {
        subject: Template,
        event_type: Template,
        /// `None`: the stimulus's data.
        data: Option<Template>,
        content_type: String,
        headers: Vec<(String, Template)>,
    },
    SubmitTask {
        task_type: String,
        /// `None`: the stimulus's data.
        payload: Option<Template>,
        priority: u32,
        labels: Vec<(String, Template)>,
        timeout: Option<Duration>,
        max_attempts: u32,
    },
    Webhook {
        url: Template,
        /// `None`: the stimulus as JSON.
        body: Option<Template>,
        headers: Vec<(String, Template)>,
        timeout: Duration,
    },
}

/// Longest delay of a response.
pub const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// Most responses in one rule, cascade steps and fallbacks included.
pub const MAX_TREE: usize = 64;
/// Most cascade steps after one response.
pub const MAX_THEN: usize = 8;
/// Deepest cascade.
pub const MAX_DEPTH: usize = 4;
/// Most events one `count` correlation waits for.
pub const MAX_COUNT: u32 = 10_000;

/// Default and bound of a webhook call.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a webhook call may be given.
pub const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// A string with `${expr}` parts.
#[derive(Debug, Clone)]
pub struct Template(pub Vec<Part>);

/// A piece of a template.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Expr(Arc<cel::Program>),
}

fn name_ok(name: &str, max: usize, dots: bool) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (dots && b == b'.'))
}

/// A subject filter: dot-separated tokens of visible ASCII, `*` a whole token, `>` the last.
fn filter_ok(subject: &str) -> bool {
    if subject.is_empty() || subject.len() > 256 {
        return false;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && t.bytes().all(|b| b.is_ascii_graphic())
            && (!t.contains('*') || *t == "*")
            && (!t.contains('>') || (*t == ">" && i == tokens.len() - 1))
    })
}

/// Compiles a CEL expression, naming `field` and the position on error.
fn program(
    field: &str,
    source: &str,
    errors: &mut Vec<FieldViolation>,
) -> Option<Arc<cel::Program>> {
    if source.len() > MAX_EXPRESSION {
        errors.push(FieldViolation::new(
            field,
            format!("at most {MAX_EXPRESSION} bytes"),
        ));
        return None;
    }
    match cel::Program::compile(source) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            let first = e.errors.first();
            let message = first.map_or_else(
                || e.to_string(),
                |p| format!("line {} column {}: {}", p.pos.0, p.pos.1 + 1, p.msg),
            );
            errors.push(FieldViolation::new(
                field,
                format!("invalid CEL: {message}"),
            ));
            None
        }
    }
}

/// Parses a template: text with `${expr}` parts (`$${` writes `${`).
pub fn template(field: &str, source: &str, errors: &mut Vec<FieldViolation>) -> Template {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = source;
    if source.len() > MAX_EXPRESSION {
        errors.push(FieldViolation::new(
            field,
            format!("at most {MAX_EXPRESSION} bytes"),
        ));
        return Template(parts);
    }
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            text.push_str(&rest[..at - 1]);
            text.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        text.push_str(&rest[..at]);
        let body = &rest[at + 2..];
        // The closing brace at depth zero, outside string literals.
        let (mut depth, mut quote, mut end) = (0usize, None::<char>, None);
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '"' | '\'' => quote = Some(c),
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    '}' => depth -= 1,
                    _ => {}
                },
            }
        }
        let Some(end) = end else {
            errors.push(FieldViolation::new(field, "`${` without its closing `}`"));
            return Template(parts);
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        if let Some(p) = program(field, &body[..end], errors) {
            parts.push(Part::Expr(p));
        }
        rest = &body[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Template(parts)
}

/// A map's values as templates (`field[key]` names each in errors).
fn templates(
    field: &str,
    map: &BTreeMap<String, String>,
    errors: &mut Vec<FieldViolation>,
) -> Vec<(String, Template)> {
    map.iter()
        .map(|(k, v)| (k.clone(), template(&format!("{field}[{k}]"), v, errors)))
        .collect()
}

fn map_ok(field: &str, map: &BTreeMap<String, String>, errors: &mut Vec<FieldViolation>) {
    if map.len() > MAX_ENTRIES {
        errors.push(FieldViolation::new(
            field,
            format!("at most {MAX_ENTRIES} entries"),
        ));
    }
    for key in map.keys() {
        if key.is_empty() || key.len() > 128 {
            errors.push(FieldViolation::new(field, "keys are 1–128 bytes"));
        }
    }
}

/// Checks a stimulus (`at` names it in errors).
fn stimulus_ok(at: &str, stimulus: &Stimulus, errors: &mut Vec<FieldViolation>) {
    if !filter_ok(&stimulus.subject) {
        errors.push(FieldViolation::new(
            format!("{at}.subject"),
            "a subject filter: dot-separated tokens, `*` a whole token, `>` only last; at most 256 bytes",
        ));
    }
    if stimulus.types.len() > MAX_ENTRIES {
        errors.push(FieldViolation::new(
            format!("{at}.types"),
            format!("at most {MAX_ENTRIES}"),
        ));
    }
    map_ok(&format!("{at}.headers"), &stimulus.headers, errors);
}

/// A required CEL key expression.
fn key_program(
    field: &str,
    source: &str,
    errors: &mut Vec<FieldViolation>,
) -> Option<Arc<cel::Program>> {
    if source.trim().is_empty() {
        errors.push(FieldViolation::new(field, "required: a CEL expression"));
        return None;
    }
    program(field, source, errors)
}

/// Where a response sits while its tree is compiled: every name seen, the depth.
struct Walk {
    names: std::collections::BTreeSet<String>,
    count: usize,
}

impl Walk {
    fn name(&mut self, field: &str, name: &str, errors: &mut Vec<FieldViolation>) {
        self.count += 1;
        if !name_ok(name, 64, false) {
            errors.push(FieldViolation::new(field, "1–64 bytes of [A-Za-z0-9_-]"));
        } else if !self.names.insert(name.to_owned()) {
            errors.push(FieldViolation::new(
                field,
                "repeats another response's name (names are unique in the whole rule)",
            ));
        }
    }
}

/// Compiles one response (`at` names it in errors) with its cascade steps and fallback (which
/// may have neither a fallback nor a cascade of its own).
fn compile_response(
    at: &str,
    r: &ResponseDef,
    depth: usize,
    walk: &mut Walk,
    errors: &mut Vec<FieldViolation>,
) -> CompiledResponse {
    walk.name(&format!("{at}.name"), &r.name, errors);
    let when = if r.when.trim().is_empty() {
        None
    } else {
        program(&format!("{at}.when"), &r.when, errors)
    };
    let action = match &r.action {
        Action::Publish {
            subject,
            event_type,
            data,
            content_type,
            headers,
        } => {
            let field = format!("{at}.publish");
            if subject.is_empty() {
                errors.push(FieldViolation::new(format!("{field}.subject"), "required"));
            }
            map_ok(&format!("{field}.headers"), headers, errors);
            if content_type.len() > 128 {
                errors.push(FieldViolation::new(
                    format!("{field}.content_type"),
                    "at most 128 bytes",
                ));
            }
            CompiledAction::Publish {
                subject: template(&format!("{field}.subject"), subject, errors),
                event_type: template(&format!("{field}.type"), event_type, errors),
                data: (!data.is_empty()).then(|| template(&format!("{field}.data"), data, errors)),
                content_type: content_type.clone(),
                headers: templates(&format!("{field}.headers"), headers, errors),
            }
        }
        Action::SubmitTask {
            task_type,
            payload,
            priority,
            labels,
            timeout_ms,
            max_attempts,
        } => {
            let field = format!("{at}.submit_task");
            if !name_ok(task_type, 128, true) {
                errors.push(FieldViolation::new(
                    format!("{field}.type"),
                    "required: 1–128 bytes of [A-Za-z0-9._-]",
                ));
            }
            if *priority > 9 {
                errors.push(FieldViolation::new(format!("{field}.priority"), "0–9"));
            }
            map_ok(&format!("{field}.labels"), labels, errors);
            CompiledAction::SubmitTask {
                task_type: task_type.clone(),
                payload: (!payload.is_empty())
                    .then(|| template(&format!("{field}.payload"), payload, errors)),
                priority: *priority,
                labels: templates(&format!("{field}.labels"), labels, errors),
                timeout: (*timeout_ms > 0).then(|| Duration::from_millis(*timeout_ms)),
                max_attempts: *max_attempts,
            }
        }
        Action::Webhook {
            url,
            body,
            headers,
            timeout_ms,
        } => {
            let field = format!("{at}.webhook");
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
                errors.push(FieldViolation::new(
                    format!("{field}.url"),
                    "required: http[s]://host[:port]/path (the scheme and host literal)",
                ));
            }
            map_ok(&format!("{field}.headers"), headers, errors);
            let timeout = if *timeout_ms == 0 {
                WEBHOOK_TIMEOUT
            } else {
                Duration::from_millis(*timeout_ms)
            };
            if timeout > MAX_WEBHOOK_TIMEOUT {
                errors.push(FieldViolation::new(
                    format!("{field}.timeout"),
                    "at most 60 s",
                ));
            }
            CompiledAction::Webhook {
                url: template(&format!("{field}.url"), url, errors),
                body: (!body.is_empty()).then(|| template(&format!("{field}.body"), body, errors)),
                headers: templates(&format!("{field}.headers"), headers, errors),
                timeout,
            }
        }
    };
    let fallback = r.fallback.as_ref().map(|f| {
        let field = format!("{at}.fallback");
        if f.fallback.is_some() {
            errors.push(FieldViolation::new(
                format!("{field}.fallback"),
                "a fallback has no fallback of its own",
            ));
        }
        if !f.then.is_empty() {
            errors.push(FieldViolation::new(
                format!("{field}.then"),
                "a fallback has no cascade of its own",
            ));
        }
        if f.cancel.is_some() {
            errors.push(FieldViolation::new(
                format!("{field}.cancel"),
                "a fallback runs at once: nothing to cancel",
            ));
        }
        if !f.when.trim().is_empty() {
            errors.push(FieldViolation::new(
                format!("{field}.when"),
                "a fallback has no guard: it runs whenever its response failed",
            ));
        }
        Box::new(compile_response(&field, f, depth, walk, errors))
    });
    if r.then.len() > MAX_THEN {
        errors.push(FieldViolation::new(
            format!("{at}.then"),
            format!("at most {MAX_THEN} steps"),
        ));
    }
    if !r.then.is_empty() && depth >= MAX_DEPTH {
        errors.push(FieldViolation::new(
            format!("{at}.then"),
            format!("cascades nest at most {MAX_DEPTH} deep"),
        ));
    }
    let then = r
        .then
        .iter()
        .enumerate()
        .map(|(i, step)| {
            compile_response(&format!("{at}.then[{i}]"), step, depth + 1, walk, errors)
        })
        .collect();
    let cancel = r.cancel.as_ref().and_then(|c| {
        let field = format!("{at}.cancel");
        if r.delay_ms == 0 {
            errors.push(FieldViolation::new(
                &field,
                "only a delayed response can be cancelled: set delay",
            ));
        }
        stimulus_ok(&format!("{field}.stimulus"), &c.stimulus, errors);
        Some(CompiledCancel {
            stimulus: c.stimulus.clone(),
            key: key_program(&format!("{field}.key"), &c.key, errors)?,
        })
    });
    if r.delay_ms > MAX_DELAY.as_millis() as u64 {
        errors.push(FieldViolation::new(
            format!("{at}.delay"),
            "at most 30 days",
        ));
    }
    if let Some(f) = &r.fallback
        && f.delay_ms > 0
    {
        errors.push(FieldViolation::new(
            format!("{at}.fallback.delay"),
            "a fallback runs at once",
        ));
    }
    CompiledResponse {
        name: r.name.clone(),
        when,
        delay: (r.delay_ms > 0).then(|| Duration::from_millis(r.delay_ms)),
        action,
        fallback,
        then,
        cancel,
    }
}

/// Validates `def` and compiles it.
///
/// # Errors
/// `Invalid` listing every problem.
pub fn compile(def: RuleDef, version: u64) -> Result<CompiledRule, RuleError> {
    let mut errors = Vec::new();
    if !name_ok(&def.name, 128, true) {
        errors.push(FieldViolation::new(
            "rule.name",
            "1–128 bytes of [A-Za-z0-9._-]",
        ));
    }
    if def.description.len() > 1024 {
        errors.push(FieldViolation::new(
            "rule.description",
            "at most 1024 bytes",
        ));
    }
    stimulus_ok("rule.stimulus", &def.stimulus, &mut errors);
    let condition = if def.condition.trim().is_empty() {
        None
    } else {
        program("rule.condition", &def.condition, &mut errors)
    };
    if def.responses.is_empty() || def.responses.len() > MAX_RESPONSES {
        errors.push(FieldViolation::new(
            "rule.responses",
            format!("1–{MAX_RESPONSES} responses"),
        ));
    }
    let mut walk = Walk {
        names: std::collections::BTreeSet::new(),
        count: 0,
    };
    let responses: Vec<CompiledResponse> = def
        .responses
        .iter()
        .enumerate()
        .map(|(i, r)| {
            compile_response(
                &format!("rule.responses[{i}]"),
                r,
                0,
                &mut walk,
                &mut errors,
            )
        })
        .collect();
    if walk.count > MAX_TREE {
        errors.push(FieldViolation::new(
            "rule.responses",
            format!("at most {MAX_TREE} responses in all (cascade steps and fallbacks included)"),
        ));
    }
    let correlation = def
        .correlation
        .as_ref()
        .and_then(|c| compile_correlation(c, &mut errors));
    if !errors.is_empty() {
        return Err(RuleError::Invalid(errors));
    }
    Ok(CompiledRule {
        def,
        version,
        condition,
        responses,
        correlation,
        role: Role::Primary,
    })
}

fn compile_correlation(
    c: &CorrelationDef,
    errors: &mut Vec<FieldViolation>,
) -> Option<CompiledCorrelation> {
    let at = "rule.correlation";
    let key = key_program(&format!("{at}.key"), &c.key, errors);
    if c.window_ms == 0 || c.window_ms > MAX_DELAY.as_millis() as u64 {
        errors.push(FieldViolation::new(
            format!("{at}.window"),
            "required: 1 ms–30 days",
        ));
    }
    let set = usize::from(c.count > 0)
        + usize::from(c.together_with.is_some())
        + usize::from(c.not_followed_by.is_some());
    if set != 1 {
        errors.push(FieldViolation::new(
            at,
            "exactly one of count, together_with and not_followed_by",
        ));
    }
    if c.count == 1 || c.count > MAX_COUNT {
        errors.push(FieldViolation::new(
            format!("{at}.count"),
            format!("2–{MAX_COUNT} (one event needs no correlation)"),
        ));
    }
    if let Some(s) = &c.together_with {
        stimulus_ok(&format!("{at}.together_with"), s, errors);
    }
    if let Some(s) = &c.not_followed_by {
        stimulus_ok(&format!("{at}.not_followed_by"), s, errors);
    }
    let mode = if c.together_with.is_some() {
        CorrelationMode::Together
    } else if c.not_followed_by.is_some() {
        CorrelationMode::NotFollowedBy
    } else {
        CorrelationMode::Count(c.count)
    };
    Some(CompiledCorrelation {
        key: key?,
        window: Duration::from_millis(c.window_ms),
        mode,
    })
}

/// Whether subject `subject` matches filter `filter` (`*` one token, `>` the rest).
#[must_use]
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> RuleDef {
        RuleDef {
            name: "r-1".into(),
            stimulus: Stimulus {
                subject: "orders.*.created".into(),
                ..Stimulus::default()
            },
            condition: "data.amount > 10".into(),
            responses: vec![ResponseDef {
                name: "alert".into(),
                when: String::new(),
                action: Action::Publish {
                    subject: "alerts.${data.region}".into(),
                    event_type: String::new(),
                    data: String::new(),
                    content_type: String::new(),
                    headers: BTreeMap::new(),
                },
                delay_ms: 0,
                fallback: None,
                ..ResponseDef::default()
            }],
            ..RuleDef::default()
        }
    }

    fn fields(e: RuleError) -> Vec<String> {
        match e {
            RuleError::Invalid(v) => v
                .into_iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect(),
            other => vec![other.to_string()],
        }
    }

    #[test]
    fn test_a_valid_rule_compiles_and_stores_as_json() {
        let compiled = compile(rule(), 7).expect("compiles");
        assert_eq!(compiled.version, 7);
        assert!(compiled.condition.is_some());
        let json = serde_json::to_string(&rule()).expect("json");
        assert_eq!(
            serde_json::from_str::<RuleDef>(&json).expect("back"),
            rule()
        );
    }

    #[test]
    fn test_every_problem_is_named_with_its_position() {
        let mut bad = rule();
        bad.name = String::new();
        bad.stimulus.subject = "a.>.b".into();
        bad.condition = "data.amount >".into();
        bad.responses.push(bad.responses[0].clone());
        bad.responses[1].when = "(1".into();
        let problems = fields(compile(bad, 0).expect_err("invalid"));
        let all = problems.join("\n");
        for needle in [
            "rule.name",
            "rule.stimulus.subject",
            "rule.condition: invalid CEL: line 1 column",
            "rule.responses[1].name: repeats",
            "rule.responses[1].when: invalid CEL",
        ] {
            assert!(all.contains(needle), "{needle} in\n{all}");
        }
        let mut none = rule();
        none.responses.clear();
        assert!(
            fields(compile(none, 0).expect_err("no responses"))
                .join("")
                .contains("rule.responses")
        );
    }

    fn step(name: &str) -> ResponseDef {
        ResponseDef {
            name: name.into(),
            action: Action::publish_to("out"),
            ..ResponseDef::default()
        }
    }

    #[test]
    fn test_cascades_cancels_and_correlations_are_checked() {
        let mut r = rule();
        r.responses[0].then = vec![step("next"), step("alert")];
        r.responses[0].fallback = Some(Box::new(ResponseDef {
            then: vec![step("x")],
            when: "true".into(),
            ..step("fb")
        }));
        r.responses[0].cancel = Some(CancelDef {
            stimulus: Stimulus {
                subject: "orders.cancelled".into(),
                ..Stimulus::default()
            },
            key: String::new(),
        });
        r.correlation = Some(CorrelationDef {
            key: "data.id".into(),
            window_ms: 0,
            count: 1,
            together_with: None,
            not_followed_by: None,
        });
        let all = fields(compile(r, 0).expect_err("invalid")).join("\n");
        for needle in [
            "rule.responses[0].then[1].name: repeats",
            "rule.responses[0].fallback.then: a fallback has no cascade",
            "rule.responses[0].fallback.when: a fallback has no guard",
            "rule.responses[0].cancel: only a delayed response",
            "rule.responses[0].cancel.key: required",
            "rule.correlation.window: required",
            "rule.correlation.count: 2–10000",
        ] {
            assert!(all.contains(needle), "{needle} in\n{all}");
        }
        // Steps after steps five deep are one level too many.
        let mut deep = step("d5");
        for level in (0..5).rev() {
            deep = ResponseDef {
                then: vec![deep],
                ..step(&format!("d{level}"))
            };
        }
        let mut r = rule();
        r.responses = vec![deep];
        let all = fields(compile(r, 0).expect_err("too deep")).join("\n");
        assert!(all.contains("cascades nest at most 4 deep"), "{all}");
        let mut both = rule();
        both.correlation = Some(CorrelationDef {
            key: "data.id".into(),
            window_ms: 1000,
            count: 3,
            together_with: Some(Stimulus {
                subject: "b".into(),
                ..Stimulus::default()
            }),
            not_followed_by: None,
        });
        let all = fields(compile(both, 0).expect_err("two modes")).join("\n");
        assert!(all.contains("exactly one of"), "{all}");
    }

    #[test]
    fn test_a_rule_lists_an_entry_per_stimulus_and_finds_any_response() {
        let mut r = rule();
        r.responses[0].delay_ms = 1000;
        r.responses[0].cancel = Some(CancelDef {
            stimulus: Stimulus {
                subject: "orders.*.cancelled".into(),
                ..Stimulus::default()
            },
            key: "data.id".into(),
        });
        r.responses[0].then = vec![step("next")];
        r.responses[0].fallback = Some(Box::new(step("fb")));
        r.correlation = Some(CorrelationDef {
            key: "data.id".into(),
            window_ms: 1000,
            together_with: Some(Stimulus {
                subject: "payments.>".into(),
                ..Stimulus::default()
            }),
            ..CorrelationDef::default()
        });
        let compiled = compile(r, 1).expect("compiles");
        assert!(compiled.find("next").is_some() && compiled.find("fb").is_some());
        assert!(compiled.find("nothing").is_none());
        let entries = compiled.entries();
        let roles: Vec<(&str, &Role, bool)> = entries
            .iter()
            .map(|e| {
                (
                    e.def.stimulus.subject.as_str(),
                    &e.role,
                    e.condition.is_some(),
                )
            })
            .collect();
        assert_eq!(
            roles,
            [
                ("orders.*.created", &Role::Primary, true),
                ("payments.>", &Role::Together, false),
                ("orders.*.cancelled", &Role::Cancel("alert".into()), false),
            ]
        );
    }

    #[test]
    fn test_subject_filters_match_as_the_event_bus_does() {
        assert!(subject_matches("orders.>", "orders.eu.created"));
        assert!(subject_matches("orders.*.created", "orders.eu.created"));
        assert!(!subject_matches("orders.*", "orders.eu.created"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("a", "a"));
    }
}
