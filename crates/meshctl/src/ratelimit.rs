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
}

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
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
    /// Limited key.
    #[arg(long, short = 'k')]
    key: String,
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

pub(crate) fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn format_duration(d: Option<&prost_types::Duration>) -> String {
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
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let limit_ref = match (args.policy, args.limit) {
        (Some(policy), _) => Some(pb::check_item::LimitRef::Policy(policy)),
        (None, Some(limit)) => Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
            limit,
            period: Some(proto_duration(args.period)),
            burst: args.burst,
            algorithm: pb::Algorithm::from(args.algorithm) as i32,
        })),
        (None, None) => None,
    };
    let item = pb::CheckItem {
        namespace: args.namespace,
        key: args.key,
        cost: args.cost,
        limit_ref,
        mode: if args.shadow {
            pb::Mode::Shadow as i32
        } else {
            pb::Mode::Unspecified as i32
        },
        ..Default::default()
    };
    let endpoint = agentmesh_runtime::client::endpoint(
        &args.addr,
        &agentmesh_runtime::ClientConfig::default(),
    )?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.addr))?;
    let response = pb::rate_limiter_client::RateLimiterClient::new(channel)
        .check(pb::CheckRequest {
            items: vec![item],
            all_or_nothing: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let result = response.results.first().context("empty response")?;
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "allowed": response.allowed,
                "over_limit": result.over_limit,
                "limit": result.limit,
                "remaining": result.remaining,
                "retry_after_ms": result.retry_after.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos / 1_000_000)),
                "reset_after_ms": result.reset_after.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos / 1_000_000)),
                "policy": result.policy,
                "decided_by": result.decided_by,
            })
        ),
        Output::Table => println!(
            "{}  limit={} remaining={} retry_after={} reset_after={} policy={} decided_by={}{}",
            if response.allowed { "ALLOW" } else { "DENY" },
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
            if result.over_limit && response.allowed {
                "  (shadow: over limit)"
            } else {
                ""
            },
        ),
    }
    Ok(if response.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
