//! `meshctl ratelimit …`: call the rate limiter.

use std::process::ExitCode;
use std::time::Duration;

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::config::parse_duration;
use anyhow::Context;

use crate::Output;

mod import;
mod policies;

#[derive(clap::Subcommand)]
pub(crate) enum RatelimitCommand {
    /// Check (and spend) one item; exit 0 when allowed, 1 when denied.
    Check(CheckArgs),
    /// Import an envoyproxy/ratelimit config file (YAML) as policies.
    Import(import::ImportArgs),
    /// List, show or delete stored policies.
    Policies(policies::PoliciesArgs),
    /// Show the state of one limit for one key without spending (a routed peek).
    Inspect(CheckArgs),
    /// Forget the state of one limit for one key, where it lives.
    Reset(CheckArgs),
    /// Show a cost budget's usage in its current window.
    Usage(UsageArgs),
}

/// Where the rate limiter is and which key a command is about.
#[derive(clap::Args)]
pub(crate) struct KeyArgs {
    /// Rate limiter address.
    #[arg(
        long,
        env = "AGENTMESH_RATELIMIT_ADDR",
        default_value = "127.0.0.1:7104"
    )]
    addr: String,
    /// Tenant namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The key.
    #[arg(long, short = 'k')]
    key: String,
}

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    target: KeyArgs,
    /// Units to spend (0 = peek).
    #[arg(long, default_value_t = 1)]
    cost: u64,
    /// Named policy (default: the `default` policy unless --limit is given).
    #[arg(long, conflicts_with = "limit")]
    policy: Option<String>,
    /// Inline limit: units per period.
    #[arg(long)]
    limit: Option<u64>,
    /// Inline limit: period.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    period: Duration,
    /// Inline limit: burst (0 = limit).
    #[arg(long, default_value_t = 0)]
    burst: u64,
    /// Inline limit: algorithm.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::Gcra)]
    algorithm: AlgorithmArg,
    /// Report but do not enforce a denial.
    #[arg(long)]
    shadow: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum AlgorithmArg {
    Gcra,
    FixedWindow,
    SlidingWindow,
}

impl From<AlgorithmArg> for pb::Algorithm {
    fn from(a: AlgorithmArg) -> Self {
        match a {
            AlgorithmArg::Gcra => pb::Algorithm::Gcra,
            AlgorithmArg::FixedWindow => pb::Algorithm::FixedWindow,
            AlgorithmArg::SlidingWindow => pb::Algorithm::SlidingWindow,
        }
    }
}

pub(crate) use agentmesh_runtime::wire::duration_to_proto as proto_duration;

pub(crate) fn format_duration(d: Option<&prost_types::Duration>) -> String {
    match d {
        None => "never".to_owned(),
        Some(d) => {
            let d = Duration::new(
                u64::try_from(d.seconds).unwrap_or(0),
                u32::try_from(d.nanos).unwrap_or(0),
            );
            humantime::format_duration(Duration::from_millis(
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            ))
            .to_string()
            .replace(' ', "")
        }
    }
}

pub(crate) async fn run(cmd: RatelimitCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RatelimitCommand::Check(args) => check(args).await,
        RatelimitCommand::Import(args) => import::run(args).await,
        RatelimitCommand::Policies(args) => policies::run(args).await,
        RatelimitCommand::Inspect(args) => inspect(args).await,
        RatelimitCommand::Reset(args) => reset(args).await,
        RatelimitCommand::Usage(args) => usage(args).await,
    }
}

/// The item the check flags describe.
fn item_of(args: &CheckArgs) -> pb::CheckItem {
    let limit_ref = match (&args.policy, args.limit) {
        (Some(policy), _) => Some(pb::check_item::LimitRef::Policy(policy.clone())),
        (None, Some(limit)) => Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
            limit,
            period: Some(proto_duration(args.period)),
            burst: args.burst,
            algorithm: pb::Algorithm::from(args.algorithm) as i32,
        })),
        (None, None) => None,
    };
    pb::CheckItem {
        namespace: args.target.namespace.clone(),
        key: args.target.key.clone(),
        cost: args.cost,
        limit_ref,
        mode: if args.shadow {
            pb::Mode::Shadow as i32
        } else {
            pb::Mode::Unspecified as i32
        },
        ..Default::default()
    }
}

pub(crate) async fn client_for(
    addr: &str,
) -> anyhow::Result<pb::rate_limiter_client::RateLimiterClient<crate::Chan>> {
    let channel = crate::connect(addr, Duration::from_secs(5), "the rate limiter").await?;
    Ok(pb::rate_limiter_client::RateLimiterClient::new(channel))
}

fn status_error(s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn print_result(result: &pb::CheckResult, output: Output) {
    let allowed = result.decision == pb::Decision::Allow as i32;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "allowed": allowed,
                "over_limit": result.over_limit,
                "limit": result.limit,
                "remaining": result.remaining,
                "retry_after_ms": result.retry_after.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos / 1_000_000)),
                "reset_after_ms": result.reset_after.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos / 1_000_000)),
                "policy": result.policy,
                "policy_version": result.policy_version,
                "decided_by": result.decided_by,
                "degraded": result.degraded_reason,
            })
        ),
        Output::Table => println!(
            "{}  limit={} remaining={} retry_after={} reset_after={} policy={} decided_by={}{}{}",
            if allowed { "ALLOW" } else { "DENY" },
            result.limit,
            result.remaining,
            format_duration(result.retry_after.as_ref()),
            format_duration(result.reset_after.as_ref()),
            if result.policy.is_empty() {
                "(inline)"
            } else {
                &result.policy
            },
            result.decided_by,
            if result.over_limit && allowed {
                "  (shadow: over limit)"
            } else {
                ""
            },
            if result.degraded {
                format!("  (degraded: {})", result.degraded_reason)
            } else {
                String::new()
            },
        ),
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let request = pb::CheckRequest {
        items: vec![item_of(&args)],
        all_or_nothing: false,
    };
    let response = client_for(&args.target.addr)
        .await?
        .check(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let result = response.results.first().context("empty response")?;
    print_result(result, args.output);
    Ok(if response.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn inspect(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let request = pb::InspectRequest {
        item: Some(item_of(&args)),
    };
    let response = client_for(&args.target.addr)
        .await?
        .inspect(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    print_result(&response.result.context("empty response")?, args.output);
    Ok(ExitCode::SUCCESS)
}

async fn reset(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let request = pb::ResetRequest {
        item: Some(item_of(&args)),
    };
    let response = client_for(&args.target.addr)
        .await?
        .reset(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"existed": response.existed, "decided_by": response.decided_by})
        ),
        Output::Table => println!(
            "{} on {}",
            if response.existed {
                "reset"
            } else {
                "nothing to reset"
            },
            response.decided_by
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `usage`: one budget (`-k` with `--budget` or `--policy`), or every budget of a namespace.
#[derive(clap::Args)]
pub(crate) struct UsageArgs {
    /// Rate limiter address.
    #[arg(
        long,
        env = "AGENTMESH_RATELIMIT_ADDR",
        default_value = "127.0.0.1:7104"
    )]
    addr: String,
    /// Tenant namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The key; without it, every budget of the namespace is listed (across the cluster).
    #[arg(long, short = 'k')]
    key: Option<String>,
    /// Inline budget: units per window.
    #[arg(long, requires = "key", conflicts_with = "policy")]
    budget: Option<u64>,
    /// Calendar window (UTC) of an inline budget.
    #[arg(long, value_enum, default_value_t = WindowArg::Day, requires = "budget")]
    window: WindowArg,
    /// A budget policy (stored in the namespace, or from the policy file) instead of --budget.
    #[arg(long, requires = "key")]
    policy: Option<String>,
    /// Listing: most keys (0 or unset = 100; at most 1000).
    #[arg(long, conflicts_with = "key", default_value_t = 0)]
    limit: u32,
    /// Listing: keys after this one (the `next_start_after` of the previous page).
    #[arg(long, conflicts_with = "key")]
    start_after: Option<String>,
    /// Listing: only the instance called, not every live member.
    #[arg(long, conflicts_with = "key")]
    local: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum WindowArg {
    Hour,
    Day,
    Month,
}

impl From<WindowArg> for pb::BudgetWindow {
    fn from(w: WindowArg) -> Self {
        match w {
            WindowArg::Hour => pb::BudgetWindow::Hour,
            WindowArg::Day => pb::BudgetWindow::Day,
            WindowArg::Month => pb::BudgetWindow::Month,
        }
    }
}

/// The request the usage flags describe.
fn usage_request(args: &UsageArgs) -> anyhow::Result<pb::GetUsageRequest> {
    let Some(key) = &args.key else {
        return Ok(pb::GetUsageRequest {
            target: None,
            namespace: args.namespace.clone(),
            limit: args.limit,
            start_after: args.start_after.clone().unwrap_or_default(),
            consistency: if args.local {
                pb::Consistency::Local
            } else {
                pb::Consistency::Unspecified
            } as i32,
        });
    };
    let (budget, policy) = match (args.budget, &args.policy) {
        (Some(limit), None) => (
            Some(pb::BudgetSpec {
                limit,
                window: pb::BudgetWindow::from(args.window) as i32,
            }),
            String::new(),
        ),
        (None, Some(policy)) => (None, policy.clone()),
        _ => anyhow::bail!("with -k, give the budget: --budget N [--window W] or --policy NAME"),
    };
    Ok(pb::GetUsageRequest {
        target: Some(pb::BudgetTarget {
            namespace: args.namespace.clone(),
            key: key.clone(),
            budget,
            consistency: 0,
            policy,
        }),
        ..pb::GetUsageRequest::default()
    })
}

/// Time from now until `end_ms` (UNIX ms), in whole seconds.
fn until(end_ms: u64) -> String {
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0);
    humantime::format_duration(Duration::from_secs(end_ms.saturating_sub(now_ms) / 1000))
        .to_string()
        .replace(' ', "")
}

fn usage_json(u: &pb::BudgetUsage) -> serde_json::Value {
    serde_json::json!({"limit": u.limit, "spent": u.spent, "reserved": u.reserved,
        "remaining": u.remaining, "window_start_ms": u.window_start_ms,
        "window_end_ms": u.window_end_ms})
}

fn window_name(window: i32) -> String {
    pb::BudgetWindow::try_from(window).map_or("?".into(), |w| {
        w.as_str_name()
            .trim_start_matches("BUDGET_WINDOW_")
            .to_lowercase()
    })
}

async fn usage(args: UsageArgs) -> anyhow::Result<ExitCode> {
    let request = usage_request(&args)?;
    let response = client_for(&args.addr)
        .await?
        .get_usage(request)
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if args.key.is_none() {
        print_listing(&response, args.output);
        return Ok(ExitCode::SUCCESS);
    }
    let u = response.usage.context("empty response")?;
    match args.output {
        Output::Json => println!("{}", usage_json(&u)),
        Output::Table => println!(
            "limit={} spent={} reserved={} remaining={} window_ends_in={}",
            u.limit,
            u.spent,
            u.reserved,
            u.remaining,
            until(u.window_end_ms)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// A namespace listing: a table (or JSON), then on stderr whether it is partial or has more.
fn print_listing(response: &pb::GetUsageResponse, output: Output) {
    if output == Output::Json {
        let keys: Vec<serde_json::Value> = response
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({"key": k.key, "window": window_name(k.window),
                    "usage": usage_json(&k.usage.unwrap_or_default()), "held_by": k.held_by})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"keys": keys, "truncated": response.truncated,
                "next_start_after": response.next_start_after,
                "unreachable": response.unreachable})
        );
        return;
    }
    let header = [
        "KEY",
        "WINDOW",
        "LIMIT",
        "SPENT",
        "RESERVED",
        "REMAINING",
        "RESETS_IN",
        "HELD_BY",
    ]
    .map(String::from);
    let rows: Vec<[String; 8]> = std::iter::once(header)
        .chain(response.keys.iter().map(|k| {
            let u = k.usage.unwrap_or_default();
            [
                k.key.clone(),
                window_name(k.window),
                u.limit.to_string(),
                u.spent.to_string(),
                u.reserved.to_string(),
                u.remaining.to_string(),
                until(u.window_end_ms),
                k.held_by.clone(),
            ]
        }))
        .collect();
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    if response.keys.is_empty() {
        println!("(no budget with spending or reservations in its current window)");
    }
    if response.truncated {
        eprintln!(
            "more keys follow: --start-after {:?}",
            response.next_start_after
        );
    }
    if !response.unreachable.is_empty() {
        eprintln!(
            "partial: no answer from {}",
            response.unreachable.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: RatelimitCommand,
    }

    fn usage_args(args: &[&str]) -> Result<UsageArgs, clap::Error> {
        let argv = ["meshctl", "usage"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            RatelimitCommand::Usage(args) => Ok(args),
            _ => unreachable!("usage parses as usage"),
        }
    }

    #[test]
    fn test_usage_without_a_key_lists_the_namespace() {
        let args = usage_args(&["-n", "team-a", "--limit", "5", "--local"]).unwrap();
        let request = usage_request(&args).unwrap();
        assert!(request.target.is_none());
        assert_eq!(
            (
                request.namespace.as_str(),
                request.limit,
                request.consistency
            ),
            ("team-a", 5, pb::Consistency::Local as i32)
        );
    }

    #[test]
    fn test_usage_with_a_key_names_an_inline_budget_or_a_policy() {
        let args =
            usage_args(&["-n", "a", "-k", "k", "--budget", "10", "--window", "hour"]).unwrap();
        let target = usage_request(&args).unwrap().target.unwrap();
        assert_eq!(
            target.budget,
            Some(pb::BudgetSpec {
                limit: 10,
                window: pb::BudgetWindow::Hour as i32
            })
        );
        let args = usage_args(&["-n", "a", "-k", "k", "--policy", "usd"]).unwrap();
        let target = usage_request(&args).unwrap().target.unwrap();
        assert_eq!((target.budget, target.policy.as_str()), (None, "usd"));
        let args = usage_args(&["-n", "a", "-k", "k"]).unwrap();
        assert!(usage_request(&args).is_err(), "a key needs a budget");
        assert!(usage_args(&["-n", "a", "-k", "k", "--budget", "1", "--policy", "p"]).is_err());
        assert!(
            usage_args(&["-n", "a", "--policy", "p"]).is_err(),
            "a policy needs a key"
        );
        assert!(usage_args(&["-n", "a", "-k", "k", "--local"]).is_err());
    }
}
