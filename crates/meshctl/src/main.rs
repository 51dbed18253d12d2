//! `meshctl`: the agentmesh operator CLI.

mod agents;
mod bench;
mod cache;
mod doctor;
mod events;
mod health;
mod members;
mod ratelimit;
mod tasks;
mod token;

use std::process::ExitCode;
use std::time::Duration;

use agentmesh_runtime::config::{ClusterArgs, parse_args_or_exit};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Operate an agentmesh cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Subcommand)]
enum Command {
    /// List the cluster's members from etcd.
    Members(members::MembersArgs),
    /// Call the rate limiter.
    #[command(subcommand)]
    Ratelimit(ratelimit::RatelimitCommand),
    /// Publish, subscribe and request on the event bus; inspect its stats and dead letters.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// The agent pool: list, show, drain, stats; acquire and release an agent by hand.
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// Tasks: submit (and wait), watch, get, list, cancel.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// The cache coordinator: get, set, delete, invalidate, stats, warm.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// The cluster at a glance from the health aggregator (exit 2 when it is DOWN).
    Status(health::StatusArgs),
    /// Check the live cluster end to end: a pass/fail table with a fix per failure.
    Doctor(doctor::DoctorArgs),
    /// The health aggregator: history, maintenance, dependency graph, alert rules, alerts,
    /// silences.
    #[command(subcommand)]
    Health(health::HealthCommand),
    /// Development tokens (HS256 from a local secret file).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Closed-loop load against a service, with a progress bar and a latency summary.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Human-readable table.
    #[default]
    Table,
    /// JSON.
    Json,
}

fn main() -> ExitCode {
    let cli: Cli = parse_args_or_exit();
    // Always multi-thread: the load generators run their bookkeeping in the `block_on` future
    // beside the worker, and the baselines they measure must not lose that thread.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Members(args) => members::run(&cli.cluster, &args).await,
            Command::Ratelimit(cmd) => ratelimit::run(cmd).await,
            Command::Events(cmd) => events::run(cmd).await,
            Command::Agents(cmd) => agents::run(cmd).await,
            Command::Tasks(cmd) => tasks::run(cmd).await,
            Command::Cache(cmd) => cache::run(cmd).await,
            Command::Status(args) => health::status(args).await,
            Command::Health(cmd) => health::run(cmd).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Token(cmd) => token::run(cmd),
            Command::Bench(cmd) => bench::run(cmd, cli.cluster.redis_url()).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A channel to `addr` (`host:port` or `http://host:port`) through the runtime's endpoint
/// settings, each call bounded by `timeout`; `what` names the service in the error.
pub(crate) async fn connect(
    addr: &str,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    let config = agentmesh_runtime::ClientConfig {
        timeout,
        ..agentmesh_runtime::ClientConfig::default()
    };
    agentmesh_runtime::client::endpoint(addr, &config)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {what} at {addr}"))
}
