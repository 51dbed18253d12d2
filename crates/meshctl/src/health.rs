//! `meshctl status` (the cluster at a glance, `--watch` to follow it) and `meshctl health
//! history|maintenance|graph`: the health aggregator by hand.

use std::process::ExitCode;
use std::time::Duration;

use crate::Chan;
use agentmesh_proto::health::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use agentmesh_runtime::wire::{duration_to_proto, timestamp_to_ms};
use clap::Subcommand;
use pb::health_aggregator_client::HealthAggregatorClient;
use serde_json::json;

use crate::Output;
use crate::agents::millis;
use crate::events::{print_table, status_error};

const DEFAULT_ADDR: &str = "http://127.0.0.1:7105";
/// Exit code of `meshctl status` when the cluster is not UP, DEGRADED or in maintenance.
const EXIT_NOT_SERVING: u8 = 2;

#[derive(clap::Args)]
pub(crate) struct Common {
    /// Health aggregator address.
    #[arg(long, env = "AGENTMESH_HEALTH_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

impl Common {
    async fn client(&self) -> anyhow::Result<HealthAggregatorClient<Chan>> {
        let channel =
            crate::connect(&self.addr, Duration::from_secs(10), "the health aggregator").await?;
        Ok(HealthAggregatorClient::new(channel).max_decoding_message_size(64 << 20))
    }
}

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    common: Common,
    /// Redraw on every change until interrupted.
    #[arg(long)]
    watch: bool,
    /// Services and dependencies only.
    #[arg(long)]
    no_instances: bool,
}

#[derive(Subcommand)]
pub(crate) enum HealthCommand {
    /// State transitions, newest first, with their causes.
    History(HistoryArgs),
    /// Put a component in maintenance for a while (`--for 0s` ends it).
    Maintenance(MaintenanceArgs),
    /// Which component needs which.
    Graph(GraphArgs),
    /// Alert rules: list them.
    Rules(GraphArgs),
    /// Store an alert rule (replacing one of the same name).
    RulePut(RulePutArgs),
    /// Remove an alert rule.
    RuleDelete(NameArgs),
    /// Alerts: pending, firing, resolved; silenced or not.
    Alerts(GraphArgs),
    /// Hold a rule's notifications (or every rule's: `*`) for a while.
    Silence(SilenceArgs),
    /// Silences in force.
    Silences(GraphArgs),
    /// End a silence.
    Unsilence(NameArgs),
}

#[derive(clap::Args)]
pub(crate) struct RulePutArgs {
    #[command(flatten)]
    common: Common,
    /// Rule name (letters, digits, '-', '_').
    name: String,
    /// Condition, e.g. 'state("service/ratelimit") == DOWN' or 'error_rate("eventbus") > 5%'.
    #[arg(long)]
    expr: String,
    /// info, warning or critical.
    #[arg(long, default_value = "warning")]
    severity: String,
    /// How long the condition must hold before the alert fires.
    #[arg(long = "for", default_value = "0s", value_parser = parse_duration)]
    for_: Duration,
    /// Sent with notifications.
    #[arg(long, default_value = "")]
    summary: String,
}

#[derive(clap::Args)]
pub(crate) struct NameArgs {
    #[command(flatten)]
    common: Common,
    /// The rule's name or the silence's id.
    name: String,
}

#[derive(clap::Args)]
pub(crate) struct SilenceArgs {
    #[command(flatten)]
    common: Common,
    /// Rule name, or '*' for every rule.
    rule: String,
    /// How long.
    #[arg(long = "for", value_parser = parse_duration)]
    duration: Duration,
    /// Why.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(clap::Args)]
pub(crate) struct HistoryArgs {
    #[command(flatten)]
    common: Common,
    /// A component id, or a prefix ending in "/" ("instance/ratelimit/").
    #[arg(default_value = "")]
    component: String,
    /// Most transitions.
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(clap::Args)]
pub(crate) struct MaintenanceArgs {
    #[command(flatten)]
    common: Common,
    /// "service/<name>", "instance/<service>/<id>" or "dependency/<name>".
    component: String,
    /// How long (at most 7 days); 0s ends maintenance.
    #[arg(long = "for", value_parser = parse_duration)]
    duration: Duration,
    /// Why (shown on the status page).
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(clap::Args)]
pub(crate) struct GraphArgs {
    #[command(flatten)]
    common: Common,
}

fn state_name(state: i32) -> &'static str {
    pb::State::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("STATE_"))
        .unwrap_or("?")
}

fn since(t: Option<&prost_types::Timestamp>) -> String {
    let Some(at) = t.and_then(timestamp_to_ms) else {
        return "-".to_owned();
    };
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0);
    let s = now.saturating_sub(at) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn percent(p: f64) -> String {
    if p < 0.0 {
        "-".to_owned()
    } else {
        format!("{p:.2}%")
    }
}

fn component_json(c: &pb::Component) -> serde_json::Value {
    json!({
        "id": c.id, "name": c.name, "state": state_name(c.state),
        "computed_state": state_name(c.computed_state),
        "since_ms": c.since.as_ref().and_then(timestamp_to_ms),
        "cause": c.cause, "detail": c.detail, "service": c.service,
        "grpc_addr": c.grpc_addr, "admin_addr": c.admin_addr, "version": c.version, "zone": c.zone,
        "instances_total": c.instances_total, "instances_up": c.instances_up,
        "uptime_1h": c.uptime_1h, "uptime_24h": c.uptime_24h, "uptime_7d": c.uptime_7d,
        "latency_p50_ms": c.latency_p50.as_ref().map(|d| millis(Some(d))),
        "latency_p99_ms": c.latency_p99.as_ref().map(|d| millis(Some(d))),
        "maintenance_until_ms": c.maintenance_until.as_ref().and_then(timestamp_to_ms),
        "maintenance_reason": c.maintenance_reason,
    })
}

fn print_status(health: &pb::ClusterHealth, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        let body = json!({
            "state": state_name(health.state),
            "summary": health.summary,
            "revision": health.revision,
            "components": health.components.iter().map(component_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!("cluster {} (revision {})", health.summary, health.revision);
    let rows: Vec<Vec<String>> = health
        .components
        .iter()
        .filter(|c| c.id != "cluster")
        .map(|c| {
            let name = if c.kind == pb::ComponentKind::Instance as i32 {
                format!("  {}", c.name)
            } else {
                c.id.clone()
            };
            let instances = if c.kind == pb::ComponentKind::Service as i32 {
                format!("{}/{}", c.instances_up, c.instances_total)
            } else {
                String::new()
            };
            let latency = match (&c.latency_p50, &c.latency_p99) {
                (Some(p50), Some(p99)) => {
                    format!("{:.1}/{:.1} ms", millis(Some(p50)), millis(Some(p99)))
                }
                _ => String::new(),
            };
            let cause = if c.cause.is_empty() {
                &c.detail
            } else {
                &c.cause
            };
            vec![
                name,
                state_name(c.state).to_owned(),
                since(c.since.as_ref()),
                instances,
                latency,
                format!("{} / {}", percent(c.uptime_1h), percent(c.uptime_24h)),
                cause.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "COMPONENT",
            "STATE",
            "SINCE",
            "SERVING",
            "CHECK P50/P99",
            "UPTIME 1H / 24H",
            "CAUSE",
        ],
        &rows,
    );
    Ok(())
}

fn exit_for(state: i32) -> ExitCode {
    match pb::State::try_from(state) {
        Ok(pb::State::Up | pb::State::Degraded | pb::State::Maintenance) => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_NOT_SERVING),
    }
}

/// `meshctl status`.
pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.common.client().await?;
    let request = pb::GetClusterHealthRequest {
        omit_instances: args.no_instances,
    };
    if !args.watch {
        let health = client
            .get_cluster_health(request)
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        print_status(&health, args.common.output)?;
        return Ok(exit_for(health.state));
    }
    let mut updates = client
        .watch_cluster_health(pb::WatchClusterHealthRequest {
            after_revision: 0,
            omit_instances: args.no_instances,
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    while updates
        .message()
        .await
        .map_err(|s| status_error(&s))?
        .is_some()
    {
        let health = client
            .get_cluster_health(request)
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        if args.common.output == Output::Table {
            print!("\x1b[2J\x1b[H");
        }
        print_status(&health, args.common.output)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `meshctl health …`.
pub(crate) async fn run(command: HealthCommand) -> anyhow::Result<ExitCode> {
    match command {
        HealthCommand::History(args) => {
            let mut client = args.common.client().await?;
            let history = client
                .get_history(pb::GetHistoryRequest {
                    component: args.component,
                    limit: args.limit,
                })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            if args.common.output == Output::Json {
                let rows: Vec<_> = history
                    .transitions
                    .iter()
                    .map(|t| json!({
                        "component": t.component, "from": state_name(t.from), "to": state_name(t.to),
                        "cause": t.cause, "at_ms": t.at.as_ref().and_then(timestamp_to_ms), "revision": t.revision,
                    }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let rows: Vec<Vec<String>> = history
                    .transitions
                    .iter()
                    .map(|t| {
                        vec![
                            since(t.at.as_ref()),
                            t.component.clone(),
                            format!("{} → {}", state_name(t.from), state_name(t.to)),
                            t.cause.clone(),
                        ]
                    })
                    .collect();
                print_table(&["AGO", "COMPONENT", "CHANGE", "CAUSE"], &rows);
            }
        }
        HealthCommand::Maintenance(args) => {
            let mut client = args.common.client().await?;
            let component = client
                .set_maintenance(pb::SetMaintenanceRequest {
                    component: args.component,
                    duration: Some(duration_to_proto(args.duration)),
                    reason: args.reason,
                })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            println!("{} is {}", component.id, state_name(component.state));
        }
        HealthCommand::Graph(args) => {
            let mut client = args.common.client().await?;
            let graph = client
                .get_dependency_graph(pb::GetDependencyGraphRequest {})
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            let state_of = |id: &str| {
                graph
                    .nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map_or("?", |n| state_name(n.state))
            };
            let rows: Vec<Vec<String>> = graph
                .edges
                .iter()
                .map(|e| {
                    vec![
                        format!("{} ({})", e.from, state_of(&e.from)),
                        "needs".to_owned(),
                        format!("{} ({})", e.to, state_of(&e.to)),
                    ]
                })
                .collect();
            print_table(&["COMPONENT", "", "NEEDS"], &rows);
        }
        other => return alerting(other).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn severity_name(s: i32) -> &'static str {
    pb::Severity::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("SEVERITY_"))
        .unwrap_or("?")
}

async fn alerting(command: HealthCommand) -> anyhow::Result<ExitCode> {
    match command {
        HealthCommand::Rules(args) => {
            let rules = args
                .common
                .client()
                .await?
                .list_alert_rules(pb::ListAlertRulesRequest {})
                .await
                .map_err(|s| status_error(&s))?
                .into_inner()
                .rules;
            let rows: Vec<Vec<String>> = rules
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        severity_name(r.severity).to_owned(),
                        r.expr.clone(),
                        format!("{:.0}s", millis(r.r#for.as_ref()) / 1000.0),
                        r.summary.clone(),
                    ]
                })
                .collect();
            print_table(&["NAME", "SEVERITY", "CONDITION", "FOR", "SUMMARY"], &rows);
        }
        HealthCommand::RulePut(args) => {
            let severity = match args.severity.to_ascii_lowercase().as_str() {
                "info" => pb::Severity::Info,
                "warning" => pb::Severity::Warning,
                "critical" => pb::Severity::Critical,
                other => anyhow::bail!("--severity {other:?}: info, warning or critical"),
            };
            let rule = args
                .common
                .client()
                .await?
                .put_alert_rule(pb::PutAlertRuleRequest {
                    rule: Some(pb::AlertRule {
                        name: args.name,
                        severity: severity as i32,
                        expr: args.expr,
                        r#for: Some(duration_to_proto(args.for_)),
                        summary: args.summary,
                    }),
                })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            println!("stored rule {}", rule.name);
        }
        HealthCommand::RuleDelete(args) => {
            args.common
                .client()
                .await?
                .delete_alert_rule(pb::DeleteAlertRuleRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(|s| status_error(&s))?;
            println!("deleted rule {}", args.name);
        }
        HealthCommand::Alerts(args) => {
            let alerts = args
                .common
                .client()
                .await?
                .list_alerts(pb::ListAlertsRequest {})
                .await
                .map_err(|s| status_error(&s))?
                .into_inner()
                .alerts;
            let rows: Vec<Vec<String>> = alerts
                .iter()
                .map(|a| {
                    vec![
                        a.rule.clone(),
                        severity_name(a.severity).to_owned(),
                        format!(
                            "{}{}",
                            a.status,
                            if a.silenced { " (silenced)" } else { "" }
                        ),
                        since(a.since.as_ref()),
                        format!("{:.4}", a.value),
                        a.summary.clone(),
                    ]
                })
                .collect();
            print_table(
                &["RULE", "SEVERITY", "STATUS", "SINCE", "VALUE", "SUMMARY"],
                &rows,
            );
        }
        HealthCommand::Silence(args) => {
            let silence = args
                .common
                .client()
                .await?
                .put_silence(pb::PutSilenceRequest {
                    rule: args.rule,
                    duration: Some(duration_to_proto(args.duration)),
                    reason: args.reason,
                })
                .await
                .map_err(|s| status_error(&s))?
                .into_inner();
            println!("silence {} holds {}", silence.id, silence.rule);
        }
        HealthCommand::Silences(args) => {
            let silences = args
                .common
                .client()
                .await?
                .list_silences(pb::ListSilencesRequest {})
                .await
                .map_err(|s| status_error(&s))?
                .into_inner()
                .silences;
            let rows: Vec<Vec<String>> = silences
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.rule.clone(),
                        render_until(s.until.as_ref()),
                        s.reason.clone(),
                    ]
                })
                .collect();
            print_table(&["ID", "RULE", "UNTIL", "REASON"], &rows);
        }
        HealthCommand::Unsilence(args) => {
            args.common
                .client()
                .await?
                .delete_silence(pb::DeleteSilenceRequest {
                    id: args.name.clone(),
                })
                .await
                .map_err(|s| status_error(&s))?;
            println!("silence {} ended", args.name);
        }
        HealthCommand::History(_) | HealthCommand::Maintenance(_) | HealthCommand::Graph(_) => {
            unreachable!("handled in run")
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render_until(t: Option<&prost_types::Timestamp>) -> String {
    crate::events::render_time(t)
}
