//! `meshctl audit tail`: the audit trail (README "Audit trail"), read from the durable
//! `sys.audit.>` stream of the event bus. Needs the operator role when auth is on.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use agentmesh_proto::eventbus::v1 as pb;
use agentmesh_runtime::audit::AuditRecord;
use agentmesh_runtime::config::parse_duration;
use anyhow::Context;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::Output;
use crate::events::{DEFAULT_ADDR, client_for, print_table, status_error};

/// Without `--follow`, the tail ends once no record arrived for this long.
const IDLE: Duration = Duration::from_secs(1);

#[derive(clap::Subcommand)]
pub(crate) enum AuditCommand {
    /// Print audit records: who changed what, when, and how it ended.
    Tail(TailArgs),
}

#[derive(clap::Args)]
pub(crate) struct TailArgs {
    /// Event bus address.
    #[arg(long, env = "AGENTMESH_EVENTBUS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// How far back to start: a duration (`1h`, `30m`) or `all`.
    #[arg(long, default_value = "1h")]
    since: String,
    /// Keep printing records as they come (Ctrl-C stops).
    #[arg(short, long)]
    follow: bool,
    /// Only records of this service (ratelimit, eventbus, scheduler, cache, health, envoy).
    #[arg(long)]
    service: Option<String>,
    /// Only records of this method (e.g. PutPolicy).
    #[arg(long)]
    method: Option<String>,
    /// Output format (JSON: one record per line, as published).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub(crate) async fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Tail(args) => tail(args).await,
    }
}

/// The subject filter for the records asked for.
fn filter(service: Option<&str>, method: Option<&str>) -> String {
    format!(
        "sys.audit.{}.{}",
        service.unwrap_or("*"),
        method.unwrap_or("*")
    )
}

fn start(since: &str) -> anyhow::Result<pb::StartPosition> {
    use pb::start_position::Position;
    let position = if since == "all" {
        Position::All(true)
    } else {
        let back = parse_duration(since).map_err(|e| anyhow::anyhow!("--since: {e} (or `all`)"))?;
        let from = SystemTime::now()
            .checked_sub(back)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Position::Time(prost_types::Timestamp::from(from))
    };
    Ok(pb::StartPosition {
        position: Some(position),
    })
}

fn row(record: &AuditRecord) -> Vec<String> {
    let who = match &record.tenant {
        Some(tenant) => format!("{} ({tenant})", record.subject),
        None => record.subject.clone(),
    };
    let mut outcome = record.outcome.clone();
    if !record.message.is_empty() {
        outcome = format!("{outcome}: {}", record.message);
    }
    vec![
        record.at.clone(),
        format!(
            "{}/{}",
            agentmesh_runtime::audit::subject_service(&record.service),
            record.method
        ),
        record.target.clone(),
        if who.is_empty() { "-".to_owned() } else { who },
        record.roles.join(","),
        outcome,
        record.trace_id.clone(),
    ]
}

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    use pb::subscribe_request::Kind as Out;
    use pb::subscribe_response::Kind as In;
    let mut client = client_for(&args.addr, Duration::from_secs(5)).await?;
    let (requests_tx, requests_rx) = mpsc::channel(4);
    requests_tx
        .send(pb::SubscribeRequest {
            kind: Some(Out::Open(pb::SubscribeOpen {
                subject: filter(args.service.as_deref(), args.method.as_deref()),
                start: Some(start(&args.since)?),
                max_in_flight: 1000,
                ack_policy: pb::AckPolicy::None as i32,
                ..pb::SubscribeOpen::default()
            })),
        })
        .await
        .context("subscription request stream closed")?;
    let mut responses = client
        .subscribe(ReceiverStream::new(requests_rx))
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let mut rows = Vec::new();
    let header = ["AT", "CALL", "TARGET", "WHO", "ROLES", "OUTCOME", "TRACE"];
    loop {
        let next = if args.follow {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                m = responses.next() => m,
            }
        } else {
            match tokio::time::timeout(IDLE, responses.next()).await {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        let kind = match next {
            None => break,
            Some(Err(s)) => return Err(status_error(&s)),
            Some(Ok(pb::SubscribeResponse { kind: Some(kind) })) => kind,
            Some(Ok(_)) => continue,
        };
        let In::Deliveries(batch) = kind else {
            continue;
        };
        for event in batch.deliveries.into_iter().filter_map(|d| d.event) {
            let Ok(record) = serde_json::from_slice::<AuditRecord>(&event.data) else {
                eprintln!("skipped {}: not an audit record", event.subject);
                continue;
            };
            match args.output {
                Output::Json => println!("{}", serde_json::to_string(&record)?),
                Output::Table if args.follow => print_table(&header, &[row(&record)]),
                Output::Table => rows.push(row(&record)),
            }
        }
    }
    drop(requests_tx);
    if args.output == Output::Table && !args.follow {
        if rows.is_empty() {
            eprintln!("no audit records since {}", args.since);
        } else {
            print_table(&header, &rows);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_filter_narrows_to_a_service_and_method() {
        assert_eq!(filter(None, None), "sys.audit.*.*");
        assert_eq!(
            filter(Some("ratelimit"), Some("PutPolicy")),
            "sys.audit.ratelimit.PutPolicy"
        );
        assert!(start("all").is_ok());
        assert!(start("90m").is_ok());
        assert!(start("yesterday").is_err());
    }
}
