//! `meshctl rules …`: reactive rules (served by the scheduler): list, get, apply a TOML file
//! (with `--dry-run` showing what would change), delete, enable, disable, stats, watch.
//!
//! The file holds `[[rule]]` tables, each with `[rule.stimulus]` and `[[rule.response]]`
//! entries holding one of `[rule.response.publish]` or `[rule.response.submit_task]`
//! (README "Reactive rules").

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::Chan;
use agentmesh_proto::rules::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use pb::rules_client::RulesClient;
use serde::Deserialize;
use serde_json::json;

use crate::Output;
use crate::events::{print_table, render_time, status_error};
use crate::ratelimit::proto_duration;
use tokio_stream::StreamExt as _;

const DEFAULT_ADDR: &str = "http://127.0.0.1:7102";

#[derive(clap::Args)]
pub(crate) struct Common {
    /// Scheduler address (any instance).
    #[arg(long, env = "AGENTMESH_SCHEDULER_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

impl Common {
    async fn client(&self) -> anyhow::Result<RulesClient<Chan>> {
        let channel = crate::connect(&self.addr, Duration::from_secs(10), "the scheduler").await?;
        Ok(RulesClient::new(channel))
    }
}

#[derive(clap::Subcommand)]
pub(crate) enum RulesCommand {
    /// Every rule: name, stimulus, responses, enabled.
    List(ListArgs),
    /// One rule, every field (JSON).
    Get(NameArgs),
    /// Store the rules of a TOML file (creating or replacing by name); `--dry-run` validates
    /// them and shows what would change (create, update with a line diff, unchanged) without
    /// storing anything.
    Apply(ApplyArgs),
    /// Delete a rule.
    Delete(NameArgs),
    /// Evaluate a disabled rule again.
    Enable(NameArgs),
    /// Stop evaluating a rule (it stays stored).
    Disable(NameArgs),
    /// Counters and latency per rule since the scheduler leader was elected.
    Stats(StatsArgs),
    /// Firings as they happen (a line each, or JSON lines with `-o json`) until interrupted.
    Watch(StatsArgs),
}

#[derive(clap::Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
pub(crate) struct NameArgs {
    #[command(flatten)]
    common: Common,
    /// The rule's name.
    name: String,
}

#[derive(clap::Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    common: Common,
    /// One rule (default: all).
    name: Option<String>,
}

#[derive(clap::Args)]
pub(crate) struct ApplyArgs {
    #[command(flatten)]
    common: Common,
    /// The TOML file of rules.
    file: PathBuf,
    /// Validate and show the changes; store nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The file's shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RuleToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    disabled: bool,
    stimulus: StimulusToml,
    #[serde(default)]
    condition: String,
    #[serde(default)]
    response: Vec<ResponseToml>,
    /// Correlation of several events before firing.
    #[serde(default)]
    correlation: Option<CorrelationToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CorrelationToml {
    key: String,
    window: String,
    #[serde(default)]
    count: u32,
    #[serde(default)]
    together_with: Option<StimulusToml>,
    #[serde(default)]
    not_followed_by: Option<StimulusToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelToml {
    stimulus: StimulusToml,
    key: String,
}

impl StimulusToml {
    fn into_proto(self) -> pb::Stimulus {
        pb::Stimulus {
            subject: self.subject,
            types: self.types,
            headers: self.headers.into_iter().collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StimulusToml {
    subject: String,
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseToml {
    name: String,
    #[serde(default)]
    when: String,
    #[serde(default)]
    delay: Option<String>,
    #[serde(default)]
    publish: Option<PublishToml>,
    #[serde(default)]
    submit_task: Option<SubmitToml>,
    #[serde(default)]
    webhook: Option<WebhookToml>,
    /// Runs when the response still fails on the stimulus's last delivery.
    #[serde(default)]
    fallback: Option<Box<ResponseToml>>,
    /// Cascade steps, run after this response completed.
    #[serde(default)]
    then: Vec<ResponseToml>,
    /// With a delay: the events that cancel it.
    #[serde(default)]
    cancel: Option<CancelToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookToml {
    url: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishToml {
    subject: String,
    #[serde(default, rename = "type")]
    event_type: String,
    #[serde(default)]
    data: String,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitToml {
    #[serde(rename = "type")]
    task_type: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    max_attempts: u32,
}

fn duration(text: Option<&str>, what: &str) -> anyhow::Result<Option<prost_types::Duration>> {
    text.map(|t| {
        parse_duration(t)
            .map(proto_duration)
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))
    })
    .transpose()
}

impl ResponseToml {
    fn into_proto(self, rule: &str) -> anyhow::Result<pb::Response> {
        let at = format!("rule {rule}: response {}", self.name);
        let action = match (self.publish, self.submit_task, self.webhook) {
            (Some(p), None, None) => pb::response::Action::Publish(pb::PublishAction {
                subject: p.subject,
                r#type: p.event_type,
                data: p.data,
                content_type: p.content_type,
                headers: p.headers.into_iter().collect(),
            }),
            (None, Some(t), None) => pb::response::Action::SubmitTask(pb::SubmitTaskAction {
                r#type: t.task_type,
                payload: t.payload,
                priority: t.priority,
                labels: t.labels.into_iter().collect(),
                timeout: duration(t.timeout.as_deref(), &format!("{at}: timeout"))?,
                max_attempts: t.max_attempts,
            }),
            (None, None, Some(w)) => pb::response::Action::Webhook(pb::WebhookAction {
                url: w.url,
                body: w.body,
                headers: w.headers.into_iter().collect(),
                timeout: duration(w.timeout.as_deref(), &format!("{at}: timeout"))?,
            }),
            _ => anyhow::bail!("{at}: give exactly one of [publish], [submit_task] or [webhook]"),
        };
        let fallback = match self.fallback {
            None => None,
            Some(f) => Some(Box::new(f.into_proto(rule)?)),
        };
        let then = self
            .then
            .into_iter()
            .map(|step| step.into_proto(rule))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(pb::Response {
            name: self.name,
            when: self.when,
            delay: duration(self.delay.as_deref(), &format!("{at}: delay"))?,
            action: Some(action),
            fallback,
            then,
            cancel: self.cancel.map(|c| pb::Cancel {
                stimulus: Some(c.stimulus.into_proto()),
                key: c.key,
            }),
        })
    }
}

impl RuleToml {
    fn into_proto(self) -> anyhow::Result<pb::Rule> {
        let responses = self
            .response
            .into_iter()
            .map(|r| r.into_proto(&self.name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let correlation = match self.correlation {
            None => None,
            Some(c) => Some(pb::Correlation {
                key: c.key,
                window: duration(
                    Some(&c.window),
                    &format!("rule {}: correlation window", self.name),
                )?,
                count: c.count,
                together_with: c.together_with.map(StimulusToml::into_proto),
                not_followed_by: c.not_followed_by.map(StimulusToml::into_proto),
            }),
        };
        Ok(pb::Rule {
            name: self.name,
            description: self.description,
            disabled: self.disabled,
            stimulus: Some(self.stimulus.into_proto()),
            condition: self.condition,
            responses,
            correlation,
            ..pb::Rule::default()
        })
    }
}

/// Milliseconds of a proto Duration.
fn dur_ms(d: Option<&prost_types::Duration>) -> Option<i64> {
    d.map(|d| d.seconds * 1000 + i64::from(d.nanos / 1_000_000))
}

fn stimulus_json(s: Option<&pb::Stimulus>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| {
        json!({
            "subject": s.subject,
            "types": s.types,
            "headers": s.headers.iter().collect::<BTreeMap<_, _>>(),
        })
    })
}

/// One response as JSON, its cascade and fallback included.
fn response_json(r: &pb::Response) -> serde_json::Value {
    let action = match &r.action {
        Some(pb::response::Action::Publish(p)) => json!({"publish": {
                    "subject": p.subject, "type": p.r#type, "data": p.data,
                    "content_type": p.content_type,
                    "headers": p.headers.iter().collect::<BTreeMap<_, _>>()}}),
        Some(pb::response::Action::Webhook(w)) => json!({"webhook": {
                    "url": w.url, "body": w.body,
                    "headers": w.headers.iter().collect::<BTreeMap<_, _>>(),
                    "timeout_ms": dur_ms(w.timeout.as_ref())}}),
        Some(pb::response::Action::SubmitTask(t)) => json!({"submit_task": {
                    "type": t.r#type, "payload": t.payload, "priority": t.priority,
                    "labels": t.labels.iter().collect::<BTreeMap<_, _>>(),
                    "timeout_ms": dur_ms(t.timeout.as_ref()),
                    "max_attempts": t.max_attempts}}),
        _ => json!({}),
    };
    json!({"name": r.name, "when": r.when, "action": action,
        "delay_ms": dur_ms(r.delay.as_ref()),
        "fallback": r.fallback.as_deref().map(response_json),
        "then": r.then.iter().map(response_json).collect::<Vec<_>>(),
        "cancel": r.cancel.as_ref().map(|c| json!({
            "stimulus": stimulus_json(c.stimulus.as_ref()), "key": c.key}))})
}

/// The rule as JSON (what `get` prints and `apply` compares).
fn rule_json(rule: &pb::Rule, with_meta: bool) -> serde_json::Value {
    let responses: Vec<serde_json::Value> = rule.responses.iter().map(response_json).collect();
    let mut value = json!({
        "name": rule.name,
        "description": rule.description,
        "disabled": rule.disabled,
        "stimulus": stimulus_json(rule.stimulus.as_ref()),
        "condition": rule.condition,
        "correlation": rule.correlation.as_ref().map(|c| json!({
            "key": c.key, "window_ms": dur_ms(c.window.as_ref()), "count": c.count,
            "together_with": stimulus_json(c.together_with.as_ref()),
            "not_followed_by": stimulus_json(c.not_followed_by.as_ref())})),
        "responses": responses,
    });
    if with_meta {
        value["version"] = json!(rule.version);
        value["updated_at_ms"] = json!(
            rule.updated_at
                .as_ref()
                .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
        );
    }
    value
}

fn action_names(rule: &pb::Rule) -> String {
    rule.responses
        .iter()
        .map(|r| match &r.action {
            Some(pb::response::Action::Publish(p)) => format!("{}: publish {}", r.name, p.subject),
            Some(pb::response::Action::SubmitTask(t)) => format!("{}: task {}", r.name, t.r#type),
            Some(pb::response::Action::Webhook(w)) => format!("{}: webhook {}", r.name, w.url),
            _ => format!("{}: ?", r.name),
        })
        .zip(rule.responses.iter())
        .map(|(text, r)| match &r.delay {
            Some(d) if d.seconds > 0 || d.nanos > 0 => {
                let delay = Duration::new(
                    u64::try_from(d.seconds).unwrap_or(0),
                    u32::try_from(d.nanos).unwrap_or(0),
                );
                format!("{text} after {}", humantime::format_duration(delay))
            }
            _ => text,
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn ms(d: Option<&prost_types::Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| {
            format!(
                "{:.1} ms",
                d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6
            )
        },
    )
}

pub(crate) async fn run(command: RulesCommand) -> anyhow::Result<ExitCode> {
    match command {
        RulesCommand::List(args) => {
            let rules = args
                .common
                .client()
                .await?
                .list_rules(pb::ListRulesRequest {})
                .await
                .map_err(|s| status_error(&s))?
                .into_inner()
                .rules;
            if args.common.output == Output::Json {
                let all: Vec<_> = rules.iter().map(|r| rule_json(r, true)).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let rows: Vec<Vec<String>> = rules
                    .iter()
                    .map(|r| {
                        vec![
                            r.name.clone(),
                            if r.disabled { "disabled" } else { "enabled" }.to_owned(),
                            r.stimulus
                                .as_ref()
                                .map(|s| s.subject.clone())
                                .unwrap_or_default(),
                            if r.condition.is_empty() {
                                "-".to_owned()
                            } else {
                                r.condition.clone()
                            },
                            action_names(r),
                            r.version.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "RULE",
                        "STATE",
                        "STIMULUS",
                        "CONDITION",
                        "RESPONSES",
                        "VERSION",
                    ],
                    &rows,
                );
            }
        }
        RulesCommand::Get(args) => {
            let rule = args
                .common
                .client()
                .await?
                .get_rule(pb::GetRuleRequest { name: args.name })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner()
                .rule
                .unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&rule_json(&rule, true))?);
        }
        RulesCommand::Apply(args) => return apply(args).await,
        RulesCommand::Watch(args) => {
            let mut firings = args
                .common
                .client()
                .await?
                .watch_firings(pb::WatchFiringsRequest {
                    name: args.name.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            while let Some(f) = firings.next().await {
                let f = f.map_err(|s| status_error(&s))?;
                if args.common.output == Output::Json {
                    println!(
                        "{}",
                        json!({"id": f.id, "rule": f.rule, "event_id": f.event_id,
                            "subject": f.subject, "outcome": f.outcome, "responses": f.responses,
                            "at_ms": f.at.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))})
                    );
                } else {
                    println!(
                        "{} {} {} {}  {}",
                        render_time(f.at.as_ref()),
                        f.outcome,
                        f.rule,
                        f.subject,
                        f.responses.join("; ")
                    );
                }
            }
        }
        RulesCommand::Delete(args) => {
            args.common
                .client()
                .await?
                .delete_rule(pb::DeleteRuleRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(|s| status_error(&s))?;
            println!("deleted rule {}", args.name);
        }
        RulesCommand::Enable(args) => {
            args.common
                .client()
                .await?
                .enable_rule(pb::EnableRuleRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(|s| status_error(&s))?;
            println!("enabled rule {}", args.name);
        }
        RulesCommand::Disable(args) => {
            args.common
                .client()
                .await?
                .disable_rule(pb::DisableRuleRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(|s| status_error(&s))?;
            println!("disabled rule {}", args.name);
        }
        RulesCommand::Stats(args) => {
            let stats = args
                .common
                .client()
                .await?
                .get_rule_stats(pb::GetRuleStatsRequest {
                    name: args.name.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner()
                .stats;
            if args.common.output == Output::Json {
                let all: Vec<_> = stats
                    .iter()
                    .map(|s| json!({"name": s.name, "matched": s.matched, "fired": s.fired,
                        "skipped": s.skipped, "failed": s.failed, "responses": s.responses,
                        "fallbacks": s.fallbacks, "delayed_pending": s.delayed_pending,
                        "correlating": s.correlating, "cancelled": s.cancelled, "awaiting": s.awaiting,
                        "latency_p50_ms": s.latency_p50.as_ref().map(|d| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6),
                        "latency_p99_ms": s.latency_p99.as_ref().map(|d| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6)}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let rows: Vec<Vec<String>> = stats
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.matched.to_string(),
                            s.fired.to_string(),
                            s.skipped.to_string(),
                            s.failed.to_string(),
                            s.responses.to_string(),
                            s.fallbacks.to_string(),
                            s.delayed_pending.to_string(),
                            s.awaiting.to_string(),
                            s.correlating.to_string(),
                            s.cancelled.to_string(),
                            ms(s.latency_p50.as_ref()),
                            ms(s.latency_p99.as_ref()),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "RULE",
                        "MATCHED",
                        "FIRED",
                        "SKIPPED",
                        "FAILED",
                        "RESPONSES",
                        "FALLBACKS",
                        "DELAYED",
                        "AWAITING",
                        "CORRELATING",
                        "CANCELLED",
                        "P50",
                        "P99",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The lines of `new` that differ from `old`, as `-`/`+` lines (a longest common subsequence:
/// rules are small), unchanged lines left out.
fn line_diff(old: &str, new: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    // lcs[i][j]: the common subsequence length of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+{}", b[j]));
            j += 1;
        } else {
            out.push(format!("-{}", a[i]));
            i += 1;
        }
    }
    out
}

/// Validates every rule of the file on the server (a dry run each), shows the changes, then
/// stores the changed ones unless `--dry-run`.
async fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.file.display()))?;
    let file: RulesFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    if file.rule.is_empty() {
        anyhow::bail!("{}: no [[rule]] tables", args.file.display());
    }
    let mut client = args.common.client().await?;
    let mut plan = Vec::new();
    let mut diffs = Vec::new();
    for rule in file.rule {
        let rule = rule.into_proto()?;
        let name = rule.name.clone();
        client
            .put_rule(pb::PutRuleRequest {
                rule: Some(rule.clone()),
                expected_version: 0,
                dry_run: true,
            })
            .await
            .map_err(|s| anyhow::anyhow!("rule {name}: {}", status_error(&s)))?;
        let current = match client
            .get_rule(pb::GetRuleRequest { name: name.clone() })
            .await
        {
            Ok(r) => r.into_inner().rule,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(status_error(&s)),
        };
        let change = match &current {
            None => "create",
            Some(c) if rule_json(c, false) == rule_json(&rule, false) => "unchanged",
            Some(_) => "update",
        };
        let diff = match &current {
            Some(c) if change == "update" => line_diff(
                &serde_json::to_string_pretty(&rule_json(c, false))?,
                &serde_json::to_string_pretty(&rule_json(&rule, false))?,
            ),
            _ => Vec::new(),
        };
        diffs.push((name.clone(), diff));
        plan.push((name, change, rule, current.map_or(0, |c| c.version)));
    }
    let mut rows = Vec::new();
    for (name, change, rule, version) in &plan {
        let stored = if args.dry_run || *change == "unchanged" {
            String::new()
        } else {
            let stored = client
                .put_rule(pb::PutRuleRequest {
                    rule: Some(rule.clone()),
                    expected_version: *version,
                    dry_run: false,
                })
                .await
                .map_err(|s| anyhow::anyhow!("rule {name}: {}", status_error(&s)))?
                .into_inner();
            stored
                .rule
                .map(|r| r.version.to_string())
                .unwrap_or_default()
        };
        rows.push(vec![
            name.clone(),
            (*change).to_owned(),
            action_names(rule),
            stored,
        ]);
    }
    if args.common.output == Output::Json {
        let all: Vec<_> = rows
            .iter()
            .zip(&diffs)
            .map(|(r, (_, diff))| json!({"rule": r[0], "change": r[1], "version": r[3], "diff": diff}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"dry_run": args.dry_run, "rules": all}))?
        );
    } else {
        print_table(&["RULE", "CHANGE", "RESPONSES", "VERSION"], &rows);
        for (name, diff) in diffs.iter().filter(|(_, d)| !d.is_empty()) {
            println!("--- {name} (stored)\n+++ {name} (file)");
            for line in diff {
                println!("{line}");
            }
        }
        if args.dry_run {
            println!("dry run: nothing stored");
        }
    }
    Ok(ExitCode::SUCCESS)
}
