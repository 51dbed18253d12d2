//! `meshctl events stats | subscriptions | dlq …`: what the event bus holds.

use std::process::ExitCode;

use agentmesh_proto::eventbus::v1 as pb;

use super::{
    BusAddr, event_json, print_table, priority_name, render_data, render_time, status_error,
};
use crate::Output;

/// Longest payload a dead-letter table shows before cutting it.
const DATA_COLUMN: usize = 48;

#[derive(clap::Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    bus: BusAddr,
    /// Only subjects and groups matching this filter.
    filter: Option<String>,
    /// Only the instance called (by default it adds up every live instance's figures).
    #[arg(long)]
    instance_only: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub(super) async fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let request = pb::GetStatsRequest {
        subject: args.filter.clone().unwrap_or_default(),
        instance_only: args.instance_only,
    };
    let stats = args
        .bus
        .client()
        .await?
        .get_stats(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.output == Output::Json {
        println!("{}", stats_json(&stats));
        return Ok(ExitCode::SUCCESS);
    }
    println!("instances {}\n", stats.instances.join(", "));
    let subjects: Vec<Vec<String>> = stats
        .subjects
        .iter()
        .map(|s| {
            vec![
                s.subject.clone(),
                s.published.to_string(),
                s.duplicates.to_string(),
                format!("{:.1}", s.publish_rate),
            ]
        })
        .collect();
    print_table(&["SUBJECT", "PUBLISHED", "DUPLICATES", "RATE/S"], &subjects);
    println!();
    let groups: Vec<Vec<String>> = stats
        .groups
        .iter()
        .map(|g| {
            vec![
                g.subject.clone(),
                g.group.clone(),
                g.members.to_string(),
                g.pending.to_string(),
                g.in_flight.to_string(),
                g.delivered.to_string(),
                g.acked.to_string(),
                g.redelivered.to_string(),
                g.expired.to_string(),
                g.dead_lettered.to_string(),
                g.shed.to_string(),
                format!("{:.1}", g.delivery_rate),
            ]
        })
        .collect();
    print_table(
        &[
            "FILTER",
            "GROUP",
            "MEMBERS",
            "PENDING",
            "IN_FLIGHT",
            "DELIVERED",
            "ACKED",
            "REDELIVERED",
            "EXPIRED",
            "DEAD",
            "SHED",
            "RATE/S",
        ],
        &groups,
    );
    if !stats.streams.is_empty() {
        println!();
        let streams: Vec<Vec<String>> = stats
            .streams
            .iter()
            .map(|s| {
                vec![
                    s.stream.clone(),
                    s.length.to_string(),
                    s.first_sequence.to_string(),
                    s.last_sequence.to_string(),
                ]
            })
            .collect();
        print_table(&["STREAM", "LENGTH", "FIRST_SEQ", "LAST_SEQ"], &streams);
    }
    warn_partial(&stats.unreachable);
    Ok(ExitCode::SUCCESS)
}

fn stats_json(stats: &pb::GetStatsResponse) -> serde_json::Value {
    let subjects: Vec<_> = stats
        .subjects
        .iter()
        .map(|s| {
            serde_json::json!({"subject": s.subject, "published": s.published,
                "duplicates": s.duplicates, "publish_rate": s.publish_rate})
        })
        .collect();
    let groups: Vec<_> = stats
        .groups
        .iter()
        .map(|g| {
            serde_json::json!({"subject": g.subject, "group": g.group, "members": g.members,
                "pending": g.pending, "in_flight": g.in_flight, "delivered": g.delivered,
                "acked": g.acked, "redelivered": g.redelivered, "expired": g.expired,
                "dead_lettered": g.dead_lettered, "shed": g.shed,
                "delivery_rate": g.delivery_rate})
        })
        .collect();
    let streams: Vec<_> = stats
        .streams
        .iter()
        .map(|s| {
            serde_json::json!({"stream": s.stream, "length": s.length,
                "first_sequence": s.first_sequence, "last_sequence": s.last_sequence})
        })
        .collect();
    serde_json::json!({"instance": stats.instance, "instances": stats.instances,
        "unreachable": stats.unreachable, "subjects": subjects, "groups": groups,
        "streams": streams})
}

#[derive(clap::Args)]
pub(crate) struct SubscriptionsArgs {
    #[command(flatten)]
    bus: BusAddr,
    /// Only subscriptions whose filter is exactly this.
    filter: Option<String>,
    /// Only the instance called (by default it lists every live instance's subscriptions).
    #[arg(long)]
    instance_only: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub(super) async fn subscriptions(args: SubscriptionsArgs) -> anyhow::Result<ExitCode> {
    let request = pb::ListSubscriptionsRequest {
        subject: args.filter.clone().unwrap_or_default(),
        instance_only: args.instance_only,
    };
    let response = args
        .bus
        .client()
        .await?
        .list_subscriptions(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.output == Output::Json {
        let subscriptions: Vec<_> = response
            .subscriptions
            .iter()
            .map(|s| {
                serde_json::json!({"subscription_id": s.subscription_id, "subject": s.subject,
                    "queue_group": s.queue_group, "instance": s.instance,
                    "max_in_flight": s.max_in_flight, "in_flight": s.in_flight,
                    "pending": s.pending, "delivered": s.delivered, "acked": s.acked,
                    "opened_at": render_time(s.opened_at.as_ref()), "stream": s.stream})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"subscriptions": subscriptions,
                "instances": response.instances, "unreachable": response.unreachable})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = response
        .subscriptions
        .iter()
        .map(|s| {
            vec![
                s.subscription_id.clone(),
                s.subject.clone(),
                dash(&s.queue_group),
                s.instance.clone(),
                format!("{}/{}", s.in_flight, s.max_in_flight),
                s.pending.to_string(),
                s.delivered.to_string(),
                s.acked.to_string(),
                render_time(s.opened_at.as_ref()),
                dash(&s.stream),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "FILTER",
            "GROUP",
            "INSTANCE",
            "IN_FLIGHT",
            "PENDING",
            "DELIVERED",
            "ACKED",
            "OPENED",
            "STREAM",
        ],
        &rows,
    );
    if response.subscriptions.is_empty() {
        println!("(no subscriptions)");
    }
    warn_partial(&response.unreachable);
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr which instances' figures are missing.
fn warn_partial(unreachable: &[String]) {
    if !unreachable.is_empty() {
        eprintln!("partial: no answer from {}", unreachable.join(", "));
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

#[derive(clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters, oldest first.
    List(DlqListArgs),
    /// Publish dead letters again (to their original subject unless `--to`) and remove them.
    Redrive(DlqRedriveArgs),
    /// Delete dead letters.
    Purge(DlqPurgeArgs),
}

/// Which dead-letter store.
#[derive(clap::Args)]
pub(crate) struct DlqTarget {
    #[command(flatten)]
    bus: BusAddr,
    /// The dead-letter subject.
    #[arg(long, default_value = "sys.deadletter")]
    subject: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub(crate) struct DlqListArgs {
    #[command(flatten)]
    target: DlqTarget,
    /// Start at this sequence (0 = the oldest).
    #[arg(long, default_value_t = 0)]
    from_seq: u64,
    /// Most dead letters (server default 100; at most 1000).
    #[arg(long, default_value_t = 0)]
    limit: u32,
}

#[derive(clap::Args)]
pub(crate) struct DlqRedriveArgs {
    #[command(flatten)]
    target: DlqTarget,
    /// A dead letter's sequence; repeat for more (default: the oldest `--limit`).
    #[arg(long = "seq")]
    sequences: Vec<u64>,
    /// Publish to this subject instead of each event's original subject.
    #[arg(long)]
    to: Option<String>,
    /// Without `--seq`: how many (server default 100; at most 1000).
    #[arg(long, default_value_t = 0, conflicts_with = "sequences")]
    limit: u32,
}

#[derive(clap::Args)]
pub(crate) struct DlqPurgeArgs {
    #[command(flatten)]
    target: DlqTarget,
    /// A dead letter's sequence; repeat for more.
    #[arg(long = "seq")]
    sequences: Vec<u64>,
    /// Delete every dead letter of the subject.
    #[arg(long, conflicts_with = "sequences")]
    all: bool,
}

pub(super) async fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCommand::List(args) => dlq_list(args).await,
        DlqCommand::Redrive(args) => {
            let request = pb::RedriveDeadLettersRequest {
                subject: args.target.subject.clone(),
                sequences: args.sequences.clone(),
                to_subject: args.to.clone().unwrap_or_default(),
                limit: args.limit,
            };
            let response = args
                .target
                .bus
                .client()
                .await?
                .redrive_dead_letters(request)
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            print_count("redriven", response.redriven, args.target.output);
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Purge(args) => {
            if args.sequences.is_empty() && !args.all {
                anyhow::bail!("name the dead letters with --seq N (repeatable), or give --all");
            }
            let request = pb::PurgeDeadLettersRequest {
                subject: args.target.subject.clone(),
                sequences: args.sequences.clone(),
            };
            let response = args
                .target
                .bus
                .client()
                .await?
                .purge_dead_letters(request)
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            print_count("purged", response.purged, args.target.output);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_count(what: &str, count: u64, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ what: count })),
        Output::Table => println!("{what} {count}"),
    }
}

async fn dlq_list(args: DlqListArgs) -> anyhow::Result<ExitCode> {
    let request = pb::ListDeadLettersRequest {
        subject: args.target.subject.clone(),
        from_sequence: args.from_seq,
        limit: args.limit,
    };
    let response = args
        .target
        .bus
        .client()
        .await?
        .list_dead_letters(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.target.output == Output::Json {
        let letters: Vec<_> = response
            .dead_letters
            .iter()
            .map(|d| {
                serde_json::json!({"sequence": d.sequence, "reason": d.reason,
                    "deliveries": d.deliveries, "group": d.group,
                    "dead_at": render_time(d.dead_at.as_ref()),
                    "event": event_json(&d.event.clone().unwrap_or_default())})
            })
            .collect();
        println!("{}", serde_json::json!({ "dead_letters": letters }));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = response
        .dead_letters
        .iter()
        .map(|d| {
            let event = d.event.clone().unwrap_or_default();
            vec![
                d.sequence.to_string(),
                event.subject.clone(),
                event.id.clone(),
                priority_name(event.priority).to_owned(),
                d.reason.clone(),
                d.deliveries.to_string(),
                d.group.clone(),
                render_time(d.dead_at.as_ref()),
                cut(&render_data(&event.data), DATA_COLUMN),
            ]
        })
        .collect();
    print_table(
        &[
            "SEQ",
            "SUBJECT",
            "ID",
            "PRIORITY",
            "REASON",
            "DELIVERIES",
            "GROUP",
            "DEAD_AT",
            "DATA",
        ],
        &rows,
    );
    if response.dead_letters.is_empty() {
        println!("(no dead letters under {})", args.target.subject);
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` cut to `max` characters, marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}
