//! `meshctl tasks …`: submit a task (and wait for it), watch it to its end, show, list and
//! cancel tasks.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Chan;
use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use agentmesh_runtime::wire::timestamp_to_ms;
use indicatif::{ProgressBar, ProgressStyle};
use pb::scheduler_client::SchedulerClient;
use tokio_stream::StreamExt;

use crate::Output;
use crate::agents::{Common, millis};
use crate::events::{
    as_text, hex, parse_header, print_table, read_data, render_time, status_error,
};
use crate::ratelimit::{format_duration, proto_duration};

/// Largest message the CLI decodes: a ListTasks page carries every task's payload and output
/// (up to 1 MiB each), so a large page of large tasks passes the 4 MiB default.
const MAX_DECODE: usize = 64 * 1024 * 1024;
/// Most pages `list --all` follows (at the largest page size, a million tasks).
const MAX_PAGES: usize = 1000;
/// Longest error a `list` row shows, in characters.
const ROW_ERROR_CHARS: usize = 40;
/// Longest payload or output text `get` shows, in characters (the rest is counted).
const SHOWN_TEXT_CHARS: usize = 200;
/// Steps of the `watch` progress bar (per mille).
const BAR_STEPS: u64 = 1000;

#[derive(clap::Subcommand)]
pub(crate) enum TasksCommand {
    /// Submit a task and print its id (and `existing` when the idempotency key named a task
    /// already submitted); with `--wait`, then follow it like `watch`.
    Submit(SubmitArgs),
    /// Follow a task to its end: a line per change (with a progress bar on a terminal), then
    /// its output or error. Exits 0 only when it succeeded.
    Watch(TaskIdArgs),
    /// Show one task, every field, with its attempts.
    Get(TaskIdArgs),
    /// List tasks, newest first (filtered by state and type), a page at a time or `--all`.
    List(ListArgs),
    /// Cancel a task that has not ended (one that has is shown as it ended).
    Cancel(CancelArgs),
}

#[derive(clap::Args)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    common: Common,
    /// The task type: it goes to agents that registered it.
    task_type: String,
    /// The payload, as text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload from this file (`-` = standard input).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// 0–9, higher first.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=9))]
    priority: u32,
    /// Same key within 24 h = same task (the second submit answers the first).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Longest run of one attempt, e.g. `10m` (default 5 min).
    #[arg(long, value_parser = parse_duration)]
    start_to_close: Option<Duration>,
    /// Longest wait for an agent before the task times out (default unbounded).
    #[arg(long, value_parser = parse_duration)]
    schedule_to_start: Option<Duration>,
    /// Longest silence of a running attempt (default none).
    #[arg(long, value_parser = parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// Attempts in all, the first included, 1–100 (default 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: Option<u32>,
    /// Only agents of this agent type.
    #[arg(long)]
    selector_type: Option<String>,
    /// Only agents with this capability `key=value`; repeat for more (all must match).
    #[arg(long = "capability", value_parser = parse_header)]
    capabilities: Vec<(String, String)>,
    /// Only agents with this tag; repeat for more (all must match).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// A label `key=value`, shown in listings; repeat for more.
    #[arg(long = "label", value_parser = parse_header)]
    labels: Vec<(String, String)>,
    /// Then follow the task to its end like `watch` (exit 0 only when it succeeded).
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
pub(crate) struct TaskIdArgs {
    #[command(flatten)]
    common: Common,
    /// The task id.
    task_id: String,
}

#[derive(clap::Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    common: Common,
    /// Only tasks in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only tasks of this type.
    #[arg(long = "type")]
    task_type: Option<String>,
    /// Page size (at most 1000); with `--all`, the size of each page fetched.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Start after this task id (the previous page's last).
    #[arg(long)]
    after: Option<String>,
    /// Follow the pages to the last (at most 1000 pages).
    #[arg(long)]
    all: bool,
}

#[derive(clap::Args)]
pub(crate) struct CancelArgs {
    #[command(flatten)]
    common: Common,
    /// The task id.
    task_id: String,
    /// Why; becomes the task's error. At most 256 bytes.
    #[arg(long, default_value = "cancelled by operator")]
    reason: String,
}

/// A task state, as written on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StateArg {
    Pending,
    Assigned,
    Running,
    Succeeded,
    Failed,
    #[value(name = "timed_out", alias = "timed-out")]
    TimedOut,
    Cancelled,
}

impl From<StateArg> for pb::TaskState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => Self::Pending,
            StateArg::Assigned => Self::Assigned,
            StateArg::Running => Self::Running,
            StateArg::Succeeded => Self::Succeeded,
            StateArg::Failed => Self::Failed,
            StateArg::TimedOut => Self::TimedOut,
            StateArg::Cancelled => Self::Cancelled,
        }
    }
}

pub(crate) async fn run(cmd: TasksCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TasksCommand::Submit(args) => submit(&args).await,
        TasksCommand::Watch(args) => watch(&args).await,
        TasksCommand::Get(args) => get(&args).await,
        TasksCommand::List(args) => list(&args).await,
        TasksCommand::Cancel(args) => cancel(&args).await,
    }
}

/// A scheduler client that takes whole ListTasks pages.
async fn client(common: &Common) -> anyhow::Result<SchedulerClient<Chan>> {
    Ok(common.client().await?.max_decoding_message_size(MAX_DECODE))
}

/// The lower-case name of a wire state, as `--state` takes it.
fn state_name(state: i32) -> String {
    pb::TaskState::try_from(state).map_or_else(
        |_| "?".to_owned(),
        |s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_lowercase()
        },
    )
}

fn is_terminal(state: i32) -> bool {
    matches!(
        pb::TaskState::try_from(state),
        Ok(pb::TaskState::Succeeded
            | pb::TaskState::Failed
            | pb::TaskState::TimedOut
            | pb::TaskState::Cancelled)
    )
}

fn succeeded(task: &pb::Task) -> bool {
    task.state == pb::TaskState::Succeeded as i32
}

/// Progress (a fraction, 0–1) as a whole percentage.
fn percent(progress: f64) -> String {
    format!("{:.0}%", progress.clamp(0.0, 1.0) * 100.0)
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// `text` on one line, cut to `max` characters (marked with `…`).
fn truncate(text: &str, max: usize) -> String {
    let line = text.replace(['\n', '\r'], " ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// How long ago `t` was, in whole seconds (`3m12s`), or `-`.
fn age(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    let Some(ms) = t.and_then(timestamp_to_ms) else {
        return "-".to_owned();
    };
    let then = UNIX_EPOCH + Duration::from_millis(ms);
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

/// `key=value, …` in key order, or `-`.
fn render_map(map: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
        return "-".to_owned();
    }
    pairs.sort();
    pairs.join(", ")
}

fn render_selector(s: &pb::Selector) -> String {
    let mut parts = Vec::new();
    if !s.r#type.is_empty() {
        parts.push(format!("type {}", s.r#type));
    }
    if !s.capabilities.is_empty() {
        parts.push(format!("capabilities {}", render_map(&s.capabilities)));
    }
    if !s.tags.is_empty() {
        parts.push(format!("tags {}", s.tags.join(",")));
    }
    if !s.zone.is_empty() {
        parts.push(format!("zone {}", s.zone));
    }
    if parts.is_empty() {
        "any agent that runs the type".to_owned()
    } else {
        parts.join("; ")
    }
}

/// A payload or output for `get`: quoted text (cut when long), or its size when binary.
fn render_bytes(data: &[u8]) -> String {
    if data.is_empty() {
        return "-".to_owned();
    }
    match as_text(data) {
        Some(text) if text.chars().count() <= SHOWN_TEXT_CHARS => format!("{text:?}"),
        Some(text) => {
            let shown: String = text.chars().take(SHOWN_TEXT_CHARS).collect();
            format!("{shown:?}… ({} bytes)", data.len())
        }
        None => format!("{} bytes, binary", data.len()),
    }
}

/// Bytes in JSON as agents and events print them: `key` when printable UTF-8, else
/// `key_hex`.
fn put_bytes(v: &mut serde_json::Value, key: &str, data: &[u8]) {
    match as_text(data) {
        Some(text) => v[key] = text.into(),
        None => v[format!("{key}_hex")] = hex(data).into(),
    }
}

fn time_json(t: Option<&prost_types::Timestamp>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| render_time(Some(t)).into())
}

fn millis_json(d: Option<&prost_types::Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| millis(Some(d)).into())
}

/// A task as JSON: states by name, times in RFC 3339, durations in milliseconds (`null` when
/// unset), payload and output as text or hex.
fn task_json(t: &pb::Task) -> serde_json::Value {
    let selector = t.selector.clone().unwrap_or_default();
    let retry = t.retry.unwrap_or_default();
    let attempts: Vec<serde_json::Value> = t
        .attempts
        .iter()
        .map(|a| {
            serde_json::json!({
                "number": a.number, "agent_id": a.agent_id,
                "assigned_at": time_json(a.assigned_at.as_ref()),
                "started_at": time_json(a.started_at.as_ref()),
                "ended_at": time_json(a.ended_at.as_ref()), "outcome": a.outcome,
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "task_id": t.task_id, "type": t.r#type, "state": state_name(t.state),
        "attempt": t.attempt, "agent_id": t.agent_id, "priority": t.priority,
        "selector": {
            "type": selector.r#type, "capabilities": selector.capabilities,
            "tags": selector.tags, "zone": selector.zone,
        },
        "idempotency_key": t.idempotency_key,
        "created_at": time_json(t.created_at.as_ref()),
        "updated_at": time_json(t.updated_at.as_ref()),
        "progress": t.progress, "message": t.message, "error": t.error,
        "attempts": attempts,
        "not_before": time_json(t.not_before.as_ref()),
        "schedule_to_start_ms": millis_json(t.schedule_to_start.as_ref()),
        "start_to_close_ms": millis_json(t.start_to_close.as_ref()),
        "heartbeat_timeout_ms": millis_json(t.heartbeat_timeout.as_ref()),
        "retry": {
            "max_attempts": retry.max_attempts,
            "initial_backoff_ms": millis_json(retry.initial_backoff.as_ref()),
            "backoff_multiplier": retry.backoff_multiplier,
            "max_backoff_ms": millis_json(retry.max_backoff.as_ref()),
        },
        "labels": t.labels, "trace_context": t.trace_context,
    });
    put_bytes(&mut v, "payload", &t.payload);
    put_bytes(&mut v, "output", &t.output);
    v
}

/// The request the submit flags describe (reads `--payload-file`).
fn submit_request(args: &SubmitArgs) -> anyhow::Result<pb::SubmitTaskRequest> {
    let selector = pb::Selector {
        r#type: args.selector_type.clone().unwrap_or_default(),
        capabilities: args.capabilities.iter().cloned().collect(),
        tags: args.tags.clone(),
        zone: String::new(),
    };
    Ok(pb::SubmitTaskRequest {
        r#type: args.task_type.clone(),
        payload: read_data(args.payload.as_deref(), args.payload_file.as_ref())?,
        selector: (selector != pb::Selector::default()).then_some(selector),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        priority: args.priority,
        schedule_to_start: args.schedule_to_start.map(proto_duration),
        start_to_close: args.start_to_close.map(proto_duration),
        heartbeat_timeout: args.heartbeat_timeout.map(proto_duration),
        // Only the attempts are given: the back-off keeps the scheduler's defaults.
        retry: args.max_attempts.map(|max_attempts| pb::RetryPolicy {
            max_attempts,
            ..pb::RetryPolicy::default()
        }),
        labels: args.labels.iter().cloned().collect(),
    })
}

async fn submit(args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let request = submit_request(args)?;
    let mut client = client(&args.common).await?;
    let r = client
        .submit_task(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match args.common.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "task_id": r.task_id, "existing": r.existing,
                "task": r.task.as_ref().map(task_json),
            })
        ),
        Output::Table if r.existing => println!("{} existing", r.task_id),
        Output::Table => println!("{}", r.task_id),
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow(&mut client, &r.task_id, args.common.output).await
}

async fn watch(args: &TaskIdArgs) -> anyhow::Result<ExitCode> {
    let mut client = client(&args.common).await?;
    follow(&mut client, &args.task_id, args.common.output).await
}

/// One line about a task's state: `running  attempt 2  agent a-7  40%  "step 3"`.
fn change_line(t: &pb::Task) -> String {
    let mut line = format!(
        "{}  attempt {}  agent {}  {}",
        state_name(t.state),
        t.attempt,
        or_dash(&t.agent_id),
        percent(t.progress)
    );
    if !t.message.is_empty() {
        line.push_str(&format!("  {:?}", t.message));
    }
    line
}

/// Whether a change from `last` to `t` moved the task on (state, attempt or agent), rather
/// than only its progress.
fn moved_on(last: Option<&pb::Task>, t: &pb::Task) -> bool {
    last.is_none_or(|l| (l.state, l.attempt, &l.agent_id) != (t.state, t.attempt, &t.agent_id))
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(BAR_STEPS);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Follows WatchTask to the task's end. JSON: the task on each change. Table: a line per
/// change — on a terminal, a progress bar and a line only when the state, attempt or agent
/// changes — then the output (or the error, on standard error). SUCCESS only when the task
/// succeeded.
async fn follow(
    client: &mut SchedulerClient<Chan>,
    task_id: &str,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut changes = client
        .watch_task(pb::WatchTaskRequest {
            task_id: task_id.to_owned(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let bar = (output == Output::Table
        && std::io::stdout().is_terminal()
        && std::io::stderr().is_terminal())
    .then(progress_bar);
    let mut last: Option<pb::Task> = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let ended = loop {
        let change = tokio::select! {
            _ = &mut interrupted => break false,
            change = changes.next() => change,
        };
        let task = match change {
            None => break true,
            Some(Ok(task)) => task,
            Some(Err(s)) => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                return Err(status_error(&s));
            }
        };
        match (output, &bar) {
            (Output::Json, _) => println!("{}", task_json(&task)),
            (Output::Table, None) => println!("{}", change_line(&task)),
            (Output::Table, Some(bar)) => {
                if moved_on(last.as_ref(), &task) {
                    bar.suspend(|| println!("{}", change_line(&task)));
                }
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss,
                    reason = "progress is clamped to 0–1, so the step is 0–BAR_STEPS"
                )]
                bar.set_position((task.progress.clamp(0.0, 1.0) * BAR_STEPS as f64) as u64);
                bar.set_message(change_line(&task));
            }
        }
        last = Some(task);
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let Some(task) = last else {
        anyhow::bail!("the scheduler ended the watch of {task_id} before sending the task");
    };
    if !is_terminal(task.state) {
        let state = state_name(task.state);
        if ended {
            anyhow::bail!("the watch of {task_id} ended while it was {state}");
        }
        eprintln!("interrupted: {task_id} is {state}");
        return Ok(ExitCode::FAILURE);
    }
    if output == Output::Table {
        print_outcome(&task);
    }
    Ok(if succeeded(&task) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A finished task's output (as text when UTF-8, else its size), or its error on standard
/// error.
fn print_outcome(task: &pb::Task) {
    if !succeeded(task) {
        eprintln!(
            "{} {}: {}",
            task.task_id,
            state_name(task.state),
            or_dash(&task.error)
        );
        return;
    }
    match std::str::from_utf8(&task.output) {
        Ok("") => {}
        Ok(text) if text.ends_with('\n') => print!("{text}"),
        Ok(text) => println!("{text}"),
        Err(_) => println!("output: {} bytes, not UTF-8", task.output.len()),
    }
}

async fn get(args: &TaskIdArgs) -> anyhow::Result<ExitCode> {
    let task = client(&args.common)
        .await?
        .get_task(pb::GetTaskRequest {
            task_id: args.task_id.clone(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match args.common.output {
        Output::Json => println!("{}", task_json(&task)),
        Output::Table => print_task(&task),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every field of a task, one per line (named as in the proto), then its attempts as a table.
fn print_task(t: &pb::Task) {
    let selector = t.selector.clone().unwrap_or_default();
    let retry = t.retry.unwrap_or_default();
    let fields = [
        ("task_id", t.task_id.clone()),
        ("type", t.r#type.clone()),
        ("state", state_name(t.state)),
        (
            "attempt",
            format!("{} of {}", t.attempt, retry.max_attempts),
        ),
        ("agent_id", or_dash(&t.agent_id).to_owned()),
        ("priority", t.priority.to_string()),
        ("progress", percent(t.progress)),
        ("message", or_dash(&t.message).to_owned()),
        ("error", or_dash(&t.error).to_owned()),
        ("idempotency_key", or_dash(&t.idempotency_key).to_owned()),
        ("created_at", render_time(t.created_at.as_ref())),
        ("updated_at", render_time(t.updated_at.as_ref())),
        ("not_before", render_time(t.not_before.as_ref())),
        (
            "schedule_to_start",
            format_duration(t.schedule_to_start.as_ref()),
        ),
        ("start_to_close", format_duration(t.start_to_close.as_ref())),
        (
            "heartbeat_timeout",
            format_duration(t.heartbeat_timeout.as_ref()),
        ),
        (
            "retry",
            format!(
                "{} attempts, back-off {} ×{} up to {}",
                retry.max_attempts,
                format_duration(retry.initial_backoff.as_ref()),
                retry.backoff_multiplier,
                format_duration(retry.max_backoff.as_ref())
            ),
        ),
        ("selector", render_selector(&selector)),
        ("labels", render_map(&t.labels)),
        ("trace_context", render_map(&t.trace_context)),
        ("payload", render_bytes(&t.payload)),
        ("output", render_bytes(&t.output)),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in &fields {
        println!("{key:<width$}  {value}");
    }
    if !t.attempts.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = t
            .attempts
            .iter()
            .map(|a| {
                vec![
                    a.number.to_string(),
                    a.agent_id.clone(),
                    render_time(a.assigned_at.as_ref()),
                    render_time(a.started_at.as_ref()),
                    render_time(a.ended_at.as_ref()),
                    or_dash(&a.outcome).to_owned(),
                ]
            })
            .collect();
        print_table(
            &[
                "ATTEMPT", "AGENT", "ASSIGNED", "STARTED", "ENDED", "OUTCOME",
            ],
            &rows,
        );
    }
}

const HEADER: [&str; 8] = [
    "TASK", "TYPE", "STATE", "ATTEMPT", "AGENT", "PRIORITY", "AGE", "ERROR",
];

fn task_row(t: &pb::Task, now: SystemTime) -> Vec<String> {
    vec![
        t.task_id.clone(),
        t.r#type.clone(),
        state_name(t.state),
        t.attempt.to_string(),
        or_dash(&t.agent_id).to_owned(),
        t.priority.to_string(),
        age(t.created_at.as_ref(), now),
        truncate(&t.error, ROW_ERROR_CHARS),
    ]
}

fn list_request(args: &ListArgs) -> pb::ListTasksRequest {
    pb::ListTasksRequest {
        state: args.state.map_or(0, |s| pb::TaskState::from(s) as i32),
        r#type: args.task_type.clone().unwrap_or_default(),
        limit: args.limit,
        page_token: args.after.clone().unwrap_or_default(),
    }
}

async fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let mut client = client(&args.common).await?;
    let mut request = list_request(args);
    let mut tasks = Vec::new();
    let mut pages = 0;
    let next_page_token = loop {
        let page = client
            .list_tasks(request.clone())
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        tasks.extend(page.tasks);
        pages += 1;
        if !args.all || page.next_page_token.is_empty() || pages >= MAX_PAGES {
            break page.next_page_token;
        }
        request.page_token = page.next_page_token;
    };
    match args.common.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "tasks": tasks.iter().map(task_json).collect::<Vec<_>>(),
                "next_page_token": next_page_token,
            })
        ),
        Output::Table => {
            let now = SystemTime::now();
            let rows: Vec<Vec<String>> = tasks.iter().map(|t| task_row(t, now)).collect();
            print_table(&HEADER, &rows);
            if !next_page_token.is_empty() {
                eprintln!("more: --after {next_page_token}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(args: &CancelArgs) -> anyhow::Result<ExitCode> {
    let task = client(&args.common)
        .await?
        .cancel_task(pb::CancelTaskRequest {
            task_id: args.task_id.clone(),
            reason: args.reason.clone(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match args.common.output {
        Output::Json => println!("{}", task_json(&task)),
        Output::Table if task.state == pb::TaskState::Cancelled as i32 => {
            println!("cancelled {}", task.task_id);
        }
        Output::Table => println!(
            "{} had already ended: {}",
            task.task_id,
            state_name(task.state)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: TasksCommand,
    }

    fn parse(args: &[&str]) -> Result<TasksCommand, clap::Error> {
        Cli::try_parse_from(["meshctl"].iter().chain(args)).map(|c| c.command)
    }

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let mut all = vec!["submit"];
        all.extend(args);
        let Ok(TasksCommand::Submit(args)) = parse(&all) else {
            panic!("submit with {args:?}");
        };
        args
    }

    #[test]
    fn test_submit_flags_build_the_request() {
        let args = submit_args(&[
            "summarize",
            "--payload",
            "hello",
            "--priority",
            "7",
            "--idempotency-key",
            "k1",
            "--start-to-close",
            "2m",
            "--schedule-to-start",
            "1h",
            "--heartbeat-timeout",
            "500ms",
            "--max-attempts",
            "5",
            "--selector-type",
            "llm",
            "--capability",
            "model=gpt=4",
            "--capability",
            "lang=en",
            "--tag",
            "gpu",
            "--tag",
            "eu",
            "--label",
            "team=a",
            "--wait",
            "-o",
            "json",
        ]);
        assert!(args.wait);
        assert_eq!(args.common.output, Output::Json);
        let r = submit_request(&args).unwrap();
        assert_eq!(
            (r.r#type.as_str(), r.payload.as_slice(), r.priority),
            ("summarize", &b"hello"[..], 7)
        );
        assert_eq!(r.idempotency_key, "k1");
        assert_eq!(
            r.start_to_close,
            Some(proto_duration(Duration::from_secs(120)))
        );
        assert_eq!(
            r.schedule_to_start,
            Some(proto_duration(Duration::from_secs(3600)))
        );
        assert_eq!(
            r.heartbeat_timeout,
            Some(proto_duration(Duration::from_millis(500)))
        );
        let retry = r.retry.unwrap();
        assert_eq!(retry.max_attempts, 5);
        assert_eq!(
            retry.initial_backoff, None,
            "back-off left to the scheduler"
        );
        let selector = r.selector.unwrap();
        assert_eq!(selector.r#type, "llm");
        assert_eq!(
            selector.capabilities.get("model").map(String::as_str),
            Some("gpt=4")
        );
        assert_eq!(selector.capabilities.len(), 2);
        assert_eq!(selector.tags, ["gpu", "eu"]);
        assert_eq!(r.labels.get("team").map(String::as_str), Some("a"));
    }

    #[test]
    fn test_submit_without_flags_leaves_every_default_to_the_scheduler() {
        let r = submit_request(&submit_args(&["echo"])).unwrap();
        assert_eq!(
            r,
            pb::SubmitTaskRequest {
                r#type: "echo".into(),
                ..pb::SubmitTaskRequest::default()
            }
        );
    }

    #[test]
    fn test_submit_rejects_bad_flags() {
        for bad in [
            &["submit", "t", "--payload", "x", "--payload-file", "f"][..],
            &["submit", "t", "--capability", "novalue"],
            &["submit", "t", "--label", "=v"],
            &["submit", "t", "--priority", "10"],
            &["submit", "t", "--max-attempts", "0"],
            &["submit", "t", "--start-to-close", "soon"],
            &["submit"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn test_payload_file_is_read() {
        let path = std::env::temp_dir().join(format!("meshctl-tasks-{}", std::process::id()));
        std::fs::write(&path, [0u8, 1, 2]).unwrap();
        let args = submit_args(&["t", "--payload-file", path.to_str().unwrap()]);
        let payload = submit_request(&args).map(|r| r.payload);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(payload.unwrap(), [0, 1, 2]);
        let args = submit_args(&["t", "--payload-file", "/no/such/file"]);
        assert!(submit_request(&args).is_err());
    }

    #[test]
    fn test_state_flags_are_the_lowercase_wire_names() {
        use clap::ValueEnum as _;
        for arg in StateArg::value_variants() {
            let name = arg.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(name, state_name(pb::TaskState::from(*arg) as i32));
        }
        let Ok(TasksCommand::List(args)) = parse(&[
            "list",
            "--state",
            "timed_out",
            "--type",
            "t",
            "--limit",
            "5",
            "--after",
            "x",
        ]) else {
            panic!("list");
        };
        let r = list_request(&args);
        assert_eq!(r.state, pb::TaskState::TimedOut as i32);
        assert_eq!(
            (r.r#type.as_str(), r.limit, r.page_token.as_str()),
            ("t", 5, "x")
        );
        assert!(parse(&["list", "--state", "timed-out"]).is_ok());
        assert!(parse(&["list", "--state", "done"]).is_err());
        assert!(parse(&["list", "--limit", "1001"]).is_err());
        assert_eq!(state_name(99), "?");
    }

    #[test]
    fn test_cancel_reason_defaults_to_operator() {
        let Ok(TasksCommand::Cancel(args)) = parse(&["cancel", "t1"]) else {
            panic!("cancel");
        };
        assert_eq!(
            (args.task_id.as_str(), args.reason.as_str()),
            ("t1", "cancelled by operator")
        );
    }

    fn task(state: pb::TaskState) -> pb::Task {
        pb::Task {
            task_id: "t1".into(),
            r#type: "echo".into(),
            state: state as i32,
            attempt: 2,
            agent_id: "a-7".into(),
            progress: 0.404,
            message: "step 3".into(),
            payload: vec![0xff, 0],
            output: b"done".to_vec(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_738_324_800,
                nanos: 0,
            }),
            ..pb::Task::default()
        }
    }

    #[test]
    fn test_task_json_names_the_state_and_shows_bytes_as_text_or_hex() {
        let v = task_json(&task(pb::TaskState::TimedOut));
        assert_eq!(v["state"], "timed_out");
        assert_eq!(v["payload_hex"], "ff00");
        assert_eq!(v["output"], "done");
        assert_eq!(v["created_at"], "2025-01-31T12:00:00.000Z");
        assert_eq!(v["updated_at"], serde_json::Value::Null);
        assert_eq!(v["schedule_to_start_ms"], serde_json::Value::Null);
    }

    #[test]
    fn test_change_lines_show_state_attempt_agent_and_percent() {
        let running = task(pb::TaskState::Running);
        assert_eq!(
            change_line(&running),
            "running  attempt 2  agent a-7  40%  \"step 3\""
        );
        let pending = pb::Task {
            state: pb::TaskState::Pending as i32,
            ..pb::Task::default()
        };
        assert_eq!(change_line(&pending), "pending  attempt 0  agent -  0%");
        let further = pb::Task {
            progress: 0.9,
            ..running.clone()
        };
        assert!(moved_on(None, &running));
        assert!(!moved_on(Some(&running), &further), "progress only");
        assert!(moved_on(Some(&pending), &running));
    }

    #[test]
    fn test_rows_truncate_errors_and_show_age() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("line one\nline two", 10), "line one …");
        assert_eq!(truncate("ééééé", 4).chars().count(), 4);
        let created = prost_types::Timestamp {
            seconds: 1000,
            nanos: 0,
        };
        let now = UNIX_EPOCH + Duration::from_millis(1000 * 1000 + 192_500);
        assert_eq!(age(Some(&created), now), "3m12s");
        assert_eq!(age(None, now), "-");
        let row = task_row(&task(pb::TaskState::Failed), SystemTime::now());
        assert_eq!(row[2], "failed");
    }

    #[test]
    fn test_get_shows_text_quoted_and_binary_as_a_size() {
        assert_eq!(render_bytes(b""), "-");
        assert_eq!(render_bytes(b"hi"), "\"hi\"");
        assert_eq!(render_bytes(&[0, 255]), "2 bytes, binary");
        let long = "x".repeat(SHOWN_TEXT_CHARS + 1);
        assert!(render_bytes(long.as_bytes()).ends_with(&format!("… ({} bytes)", long.len())));
        let selector = pb::Selector {
            capabilities: [
                ("b".to_owned(), "2".to_owned()),
                ("a".to_owned(), "1".to_owned()),
            ]
            .into_iter()
            .collect(),
            tags: vec!["gpu".into()],
            ..pb::Selector::default()
        };
        assert_eq!(
            render_selector(&selector),
            "capabilities a=1, b=2; tags gpu"
        );
    }
}
