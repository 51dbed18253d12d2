//! `meshctl events …`: publish, subscribe and request on the event bus, and inspect it (stats,
//! subscriptions, dead letters).

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Chan;
use agentmesh_proto::eventbus::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use anyhow::Context;
use pb::event_bus_client::EventBusClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic_types::StatusExt;

use crate::Output;
use crate::ratelimit::proto_duration;

mod admin;

/// Where `meshctl` finds the event bus unless told otherwise.
pub(crate) const DEFAULT_ADDR: &str = "http://127.0.0.1:7101";
/// Timeout of unary calls (Request uses its own timeout plus this).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message the CLI decodes: a Deliveries message holds up to 128 events.
const MAX_DECODE: usize = 64 * 1024 * 1024;
/// Most events one `publish --count` sends.
const MAX_PUBLISH_COUNT: u64 = 1_000_000;

#[derive(clap::Subcommand)]
pub(crate) enum EventsCommand {
    /// Publish an event (or `--count` copies) and print its id, and stream and sequence when
    /// the subject is durable.
    Publish(PublishArgs),
    /// Subscribe and print each delivery, acking it unless `--no-ack`; stops after `--count`
    /// deliveries or on Ctrl-C.
    Subscribe(SubscribeArgs),
    /// Send a request and print the reply.
    Request(RequestArgs),
    /// Counters and depths per subject, subscription group and durable stream.
    Stats(admin::StatsArgs),
    /// Open subscriptions.
    Subscriptions(admin::SubscriptionsArgs),
    /// List, redrive or purge dead letters.
    #[command(subcommand)]
    Dlq(admin::DlqCommand),
}

pub(crate) async fn run(cmd: EventsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EventsCommand::Publish(args) => publish(args).await,
        EventsCommand::Subscribe(args) => subscribe(args).await,
        EventsCommand::Request(args) => request(args).await,
        EventsCommand::Stats(args) => admin::stats(args).await,
        EventsCommand::Subscriptions(args) => admin::subscriptions(args).await,
        EventsCommand::Dlq(cmd) => admin::dlq(cmd).await,
    }
}

/// Where the event bus is.
#[derive(clap::Args)]
pub(crate) struct BusAddr {
    /// Event bus address.
    #[arg(long, env = "AGENTMESH_EVENTBUS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
}

impl BusAddr {
    async fn client(&self) -> anyhow::Result<EventBusClient<Chan>> {
        client_for(&self.addr, CALL_TIMEOUT).await
    }
}

/// An event bus client whose unary calls time out after `timeout`.
pub(crate) async fn client_for(
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<EventBusClient<Chan>> {
    let channel = crate::connect(addr, timeout, "the event bus").await?;
    Ok(EventBusClient::new(channel).max_decoding_message_size(MAX_DECODE))
}

/// The status as an error: code, message, and each `BadRequest` field violation on its own line.
pub(crate) fn status_error(s: &tonic::Status) -> anyhow::Error {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(bad) = s.get_details_bad_request() {
        for v in &bad.field_violations {
            let line = format!("{}: {}", v.field, v.description);
            // agentmesh servers already list the violations in the message.
            if !s.message().contains(&line) {
                let _ = write!(text, "\n  {line}");
            }
        }
    }
    anyhow::anyhow!(text)
}

/// Event priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PriorityArg {
    Low,
    Normal,
    High,
    Critical,
}

impl From<PriorityArg> for pb::Priority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Low => pb::Priority::Low,
            PriorityArg::Normal => pb::Priority::Normal,
            PriorityArg::High => pb::Priority::High,
            PriorityArg::Critical => pb::Priority::Critical,
        }
    }
}

/// Lowercase name of a wire priority (unset = normal).
pub(crate) fn priority_name(p: i32) -> &'static str {
    match pb::Priority::try_from(p) {
        Ok(pb::Priority::Low) => "low",
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => "normal",
        Ok(pb::Priority::High) => "high",
        Ok(pb::Priority::Critical) => "critical",
        Err(_) => "?",
    }
}

/// Parses `key=value`.
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// `data` as text when it is printable UTF-8, else `None`.
pub(crate) fn as_text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok().filter(|s| {
        !s.chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    })
}

pub(crate) fn hex(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 2);
    for b in data {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `data` for a table: quoted text, or `hex:…`.
fn render_data(data: &[u8]) -> String {
    match as_text(data) {
        Some(text) => format!("{text:?}"),
        None => format!("hex:{}", hex(data)),
    }
}

fn to_system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// RFC 3339 (UTC, milliseconds), or `-`.
pub(crate) fn render_time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(to_system_time).map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_millis(t).to_string(),
    )
}

/// An event as JSON; the payload is `data` when printable UTF-8, else `data_hex`.
fn event_json(e: &pb::Event) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": e.id,
        "subject": e.subject,
        "type": e.r#type,
        "source": e.source,
        "time": e.time.as_ref().map(|t| render_time(Some(t))),
        "priority": priority_name(e.priority),
        "expires_at": e.expires_at.as_ref().map(|t| render_time(Some(t))),
        "correlation_id": e.correlation_id,
        "reply_to": e.reply_to,
        "ordering_key": e.ordering_key,
        "headers": e.headers,
        "content_type": e.content_type,
    });
    match as_text(&e.data) {
        Some(text) => v["data"] = text.into(),
        None => v["data_hex"] = hex(&e.data).into(),
    }
    v
}

#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    bus: BusAddr,
    /// Subject to publish to (no wildcards).
    subject: String,
    /// The payload, as text.
    #[arg(conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the payload from this file (`-` = standard input).
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// CloudEvents type, e.g. `com.example.task.created`.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// CloudEvents source, e.g. `/agents/a-17`.
    #[arg(long)]
    source: Option<String>,
    /// MIME type of the payload.
    #[arg(long)]
    content_type: Option<String>,
    /// Delivery priority (default normal).
    #[arg(long, value_enum)]
    priority: Option<PriorityArg>,
    /// Time to live, e.g. `30s` (at most 30 days).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Event id (default: one the bus generates). With `--count`, every copy has this id, so
    /// the repeats are answered as duplicates.
    #[arg(long)]
    id: Option<String>,
    /// A header `key=value`; repeat for more.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Publish this many copies, pipelined over one PublishStream (at most 1000000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_PUBLISH_COUNT))]
    count: u64,
    /// Output format (JSON: one object per event).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The payload the publish flags name.
pub(crate) fn read_data(data: Option<&str>, file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    match (data, file) {
        (Some(text), _) => Ok(text.as_bytes().to_vec()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the payload from standard input")?;
            Ok(buf)
        }
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        }
        (None, None) => Ok(Vec::new()),
    }
}

fn event_of(args: &PublishArgs) -> anyhow::Result<pb::Event> {
    Ok(pb::Event {
        id: args.id.clone().unwrap_or_default(),
        subject: args.subject.clone(),
        r#type: args.event_type.clone().unwrap_or_default(),
        source: args.source.clone().unwrap_or_default(),
        priority: args.priority.map_or(0, |p| pb::Priority::from(p) as i32),
        ttl: args.ttl.map(proto_duration),
        headers: args.headers.iter().cloned().collect(),
        content_type: args.content_type.clone().unwrap_or_default(),
        data: read_data(args.data.as_deref(), args.data_file.as_ref())?,
        ..pb::Event::default()
    })
}

fn print_published(r: &pb::PublishResponse, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"id": r.id, "duplicate": r.duplicate,
                "stream": r.stream, "sequence": r.sequence})
        ),
        Output::Table => {
            let mut line = format!("published {}", r.id);
            if !r.stream.is_empty() {
                let _ = write!(line, "  stream={} sequence={}", r.stream, r.sequence);
            }
            if r.duplicate {
                line.push_str("  (duplicate: not delivered again)");
            }
            println!("{line}");
        }
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let event = event_of(&args)?;
    let mut client = args.bus.client().await?;
    if args.count == 1 {
        let response = client
            .publish(pb::PublishRequest { event: Some(event) })
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        print_published(&response, args.output);
        return Ok(ExitCode::SUCCESS);
    }
    let requests = tokio_stream::iter((0..args.count).map(move |_| pb::PublishRequest {
        event: Some(event.clone()),
    }));
    let mut responses = client
        .publish_stream(requests)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let (mut answered, mut failed) = (0u64, 0u64);
    while let Some(response) = responses.next().await {
        let response = response.map_err(|s| status_error(&s))?;
        answered += 1;
        match &response.error {
            Some(e) => {
                failed += 1;
                match args.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"error": {"code": e.code, "message": e.message,
                            "field": e.field}})
                    ),
                    Output::Table => eprintln!(
                        "error: {}: {}{}",
                        e.code,
                        e.message,
                        if e.field.is_empty() {
                            String::new()
                        } else {
                            format!(" (field {})", e.field)
                        }
                    ),
                }
            }
            None => print_published(&response, args.output),
        }
    }
    if answered < args.count {
        anyhow::bail!("the event bus answered {answered} of {} events", args.count);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} of {} events were rejected", args.count);
        ExitCode::FAILURE
    })
}

/// Where a new durable subscription starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StartArg {
    New,
    All,
    Last,
    Sequence(u64),
    Time(SystemTime),
}

fn parse_start(text: &str) -> Result<StartArg, String> {
    match text {
        "new" => Ok(StartArg::New),
        "all" => Ok(StartArg::All),
        "last" => Ok(StartArg::Last),
        _ => {
            if let Ok(seq) = text.parse::<u64>() {
                return Ok(StartArg::Sequence(seq));
            }
            humantime::parse_rfc3339_weak(text)
                .map(StartArg::Time)
                .map_err(|_| {
                    format!(
                        "expected new, all, last, a stream sequence or an RFC 3339 time \
                         (2025-01-31T12:00:00Z), got {text:?}"
                    )
                })
        }
    }
}

impl From<&StartArg> for pb::StartPosition {
    fn from(s: &StartArg) -> Self {
        use pb::start_position::Position;
        let position = match s {
            StartArg::New => Position::NewOnly(true),
            StartArg::All => Position::All(true),
            StartArg::Last => Position::Last(true),
            StartArg::Sequence(seq) => Position::Sequence(*seq),
            StartArg::Time(t) => Position::Time(to_timestamp(*t)),
        };
        pb::StartPosition {
            position: Some(position),
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct SubscribeArgs {
    #[command(flatten)]
    bus: BusAddr,
    /// Subject filter: `*` matches one token, `>` the remaining ones.
    filter: String,
    /// Queue group: its members share the events (each to one member).
    #[arg(long)]
    group: Option<String>,
    /// Durable subjects without a group: resume where a subscription of this name left off.
    #[arg(long, conflicts_with = "group")]
    durable: Option<String>,
    /// Durable subjects: where a new group or durable name starts: new, all, last, a stream
    /// sequence or an RFC 3339 time (default new).
    #[arg(long, value_parser = parse_start)]
    from: Option<StartArg>,
    /// Flow-control credit: most unacknowledged deliveries at once (1–10000).
    #[arg(long, default_value_t = 100)]
    max_in_flight: u32,
    /// Time to ack a delivery before it is redelivered (server default 30s; 100ms–12h).
    #[arg(long, value_parser = parse_duration)]
    ack_wait: Option<Duration>,
    /// Deliveries before an event is dead-lettered (server default 5; at most 1000).
    #[arg(long)]
    max_deliveries: Option<u32>,
    /// Do not ack: deliveries come back after `--ack-wait` and are dead-lettered after
    /// `--max-deliveries`.
    #[arg(long)]
    no_ack: bool,
    /// Exit after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// Only events of at least this priority.
    #[arg(long, value_enum)]
    min_priority: Option<PriorityArg>,
    /// Only events of this type; repeat for more.
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only events with this header `key=value`; repeat for more (all must match).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Where dead letters go (server default `sys.deadletter`).
    #[arg(long)]
    dead_letter_subject: Option<String>,
    /// Answer each delivered request (an event with `reply_to`) with this text; the reply
    /// settles the delivery.
    #[arg(long)]
    reply: Option<String>,
    /// Output format (JSON: one object per delivery).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn open_of(args: &SubscribeArgs) -> pb::SubscribeOpen {
    pb::SubscribeOpen {
        subject: args.filter.clone(),
        queue_group: args.group.clone().unwrap_or_default(),
        types: args.types.clone(),
        headers: args.headers.iter().cloned().collect(),
        min_priority: args
            .min_priority
            .map_or(0, |p| pb::Priority::from(p) as i32),
        start: args.from.as_ref().map(pb::StartPosition::from),
        max_in_flight: args.max_in_flight,
        ack_wait: args.ack_wait.map(proto_duration),
        max_deliveries: args.max_deliveries.unwrap_or(0),
        dead_letter_subject: args.dead_letter_subject.clone().unwrap_or_default(),
        ack_policy: pb::AckPolicy::Explicit as i32,
        durable_name: args.durable.clone().unwrap_or_default(),
        ..pb::SubscribeOpen::default()
    }
}

fn print_delivery(d: &pb::Delivery, output: Output) {
    let event = d.event.clone().unwrap_or_default();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"delivery_id": d.delivery_id, "delivery_count": d.delivery_count,
                "sequence": d.sequence, "event": event_json(&event)})
        ),
        Output::Table => {
            let mut line = format!(
                "{}  id={} priority={} delivery={}",
                event.subject,
                event.id,
                priority_name(event.priority),
                d.delivery_count
            );
            if d.sequence != 0 {
                let _ = write!(line, " sequence={}", d.sequence);
            }
            if !event.r#type.is_empty() {
                let _ = write!(line, " type={}", event.r#type);
            }
            if !event.reply_to.is_empty() {
                let _ = write!(line, " reply_to={}", event.reply_to);
            }
            let _ = write!(line, "  data={}", render_data(&event.data));
            println!("{line}");
        }
    }
}

fn print_advisory(a: &pb::Advisory) {
    let kind = pb::advisory::Kind::try_from(a.kind).map_or("?".to_owned(), |k| {
        k.as_str_name().trim_start_matches("KIND_").to_lowercase()
    });
    let priority = if a.priority == 0 {
        String::new()
    } else {
        format!(" ({})", priority_name(a.priority))
    };
    eprintln!("advisory: {kind} {}{priority}: {}", a.count, a.message);
}

fn request_of(kind: pb::subscribe_request::Kind) -> pb::SubscribeRequest {
    pb::SubscribeRequest { kind: Some(kind) }
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    use pb::subscribe_request::Kind as Out;
    use pb::subscribe_response::Kind as In;
    let mut client = args.bus.client().await?;
    let (requests_tx, requests_rx) = mpsc::channel(64);
    requests_tx
        .send(request_of(Out::Open(open_of(&args))))
        .await
        .context("subscription request stream closed")?;
    let mut responses = client
        .subscribe(ReceiverStream::new(requests_rx))
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let limit = args.count.unwrap_or(u64::MAX);
    let mut seen = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while seen < limit {
        let message = tokio::select! {
            _ = &mut interrupted => break,
            message = responses.next() => message,
        };
        let kind = match message {
            None => anyhow::bail!("the event bus ended the subscription"),
            Some(Err(s)) => return Err(status_error(&s)),
            Some(Ok(pb::SubscribeResponse { kind: None })) => continue,
            Some(Ok(pb::SubscribeResponse { kind: Some(kind) })) => kind,
        };
        match kind {
            In::Subscribed(s) => eprintln!(
                "subscribed {} on {}{}",
                s.subscription_id,
                s.instance,
                if s.stream.is_empty() {
                    String::new()
                } else {
                    format!(" (durable stream {})", s.stream)
                }
            ),
            In::Advisory(a) => print_advisory(&a),
            In::Deliveries(batch) => {
                let mut acks = Vec::new();
                for d in batch
                    .deliveries
                    .iter()
                    .take(usize::try_from(limit - seen).unwrap_or(usize::MAX))
                {
                    seen += 1;
                    print_delivery(d, args.output);
                    let reply_to = d.event.as_ref().is_some_and(|e| !e.reply_to.is_empty());
                    if let (Some(text), true) = (&args.reply, reply_to) {
                        let reply = pb::Reply {
                            delivery_id: d.delivery_id,
                            event: Some(pb::Event {
                                data: text.as_bytes().to_vec(),
                                ..pb::Event::default()
                            }),
                        };
                        requests_tx.send(request_of(Out::Reply(reply))).await?;
                    } else if !args.no_ack {
                        acks.push(d.delivery_id);
                    }
                }
                if !acks.is_empty() {
                    let ack = pb::Ack { delivery_ids: acks };
                    requests_tx.send(request_of(Out::Ack(ack))).await?;
                }
            }
        }
    }
    // Ending the request stream ends the subscription once the bus has read the last acks;
    // the bus then ends the response stream.
    drop(requests_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = responses.next().await {}
    })
    .await;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub(crate) struct RequestArgs {
    #[command(flatten)]
    bus: BusAddr,
    /// Subject to send the request to.
    subject: String,
    /// The request payload, as text.
    #[arg(default_value = "")]
    data: String,
    /// How long to wait for the reply (at most 5m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// CloudEvents type of the request.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// A header `key=value`; repeat for more.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let request = pb::RequestRequest {
        event: Some(pb::Event {
            subject: args.subject.clone(),
            r#type: args.event_type.clone().unwrap_or_default(),
            headers: args.headers.iter().cloned().collect(),
            data: args.data.as_bytes().to_vec(),
            ..pb::Event::default()
        }),
        timeout: Some(proto_duration(args.timeout)),
    };
    // The bus answers DEADLINE_EXCEEDED itself after `timeout`; the call outlives it a little.
    let response = client_for(&args.bus.addr, args.timeout + CALL_TIMEOUT)
        .await?
        .request(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let reply = response.reply.unwrap_or_default();
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"responder": response.responder, "reply": event_json(&reply)})
        ),
        Output::Table => {
            match as_text(&reply.data) {
                Some(text) => println!("{text}"),
                None => println!("hex:{}", hex(&reply.data)),
            }
            eprintln!("(reply {} from {})", reply.id, response.responder);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `rows` under `header`, each column as wide as its widest cell.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: EventsCommand,
    }

    fn parse(args: &[&str]) -> Result<EventsCommand, clap::Error> {
        Cli::try_parse_from(["meshctl"].iter().chain(args)).map(|c| c.command)
    }

    #[test]
    fn test_start_position_accepts_names_sequences_and_times() {
        assert_eq!(parse_start("new"), Ok(StartArg::New));
        assert_eq!(parse_start("42"), Ok(StartArg::Sequence(42)));
        let StartArg::Time(t) = parse_start("2025-01-31T12:00:00Z").unwrap() else {
            panic!("a time");
        };
        assert_eq!(to_timestamp(t).seconds, 1_738_324_800);
        assert!(parse_start("yesterday").is_err());
    }

    #[test]
    fn test_publish_flags_build_the_event() {
        let EventsCommand::Publish(args) = parse(&[
            "publish",
            "orders.created",
            "hello",
            "--priority",
            "critical",
            "--ttl",
            "30s",
            "--header",
            "k=v=w",
            "--type",
            "t",
        ])
        .unwrap() else {
            panic!("publish");
        };
        let event = event_of(&args).unwrap();
        assert_eq!(event.priority, pb::Priority::Critical as i32);
        assert_eq!(event.ttl, Some(proto_duration(Duration::from_secs(30))));
        assert_eq!(event.headers.get("k").map(String::as_str), Some("v=w"));
        assert_eq!(
            (event.data.as_slice(), event.r#type.as_str()),
            (&b"hello"[..], "t")
        );
        assert!(parse(&["publish", "s", "x", "--data-file", "f"]).is_err());
        assert!(parse(&["publish", "s", "--header", "novalue"]).is_err());
    }

    #[test]
    fn test_subscribe_flags_build_the_open_message() {
        let EventsCommand::Subscribe(args) = parse(&[
            "subscribe",
            "orders.>",
            "--group",
            "workers",
            "--from",
            "all",
            "--min-priority",
            "high",
            "--type",
            "a",
            "--type",
            "b",
        ])
        .unwrap() else {
            panic!("subscribe");
        };
        let open = open_of(&args);
        assert_eq!(open.queue_group, "workers");
        assert_eq!(open.types, ["a", "b"]);
        assert_eq!(open.min_priority, pb::Priority::High as i32);
        assert_eq!(
            open.start.and_then(|s| s.position),
            Some(pb::start_position::Position::All(true))
        );
        assert!(parse(&["subscribe", "x", "--group", "g", "--durable", "d"]).is_err());
    }

    #[test]
    fn test_data_prints_as_text_when_printable_else_hex() {
        assert_eq!(render_data(b"hi\n"), "\"hi\\n\"");
        assert_eq!(render_data(&[0, 255]), "hex:00ff");
    }
}
