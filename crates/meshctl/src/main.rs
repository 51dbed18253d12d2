//! `meshctl`: the agentmesh operator CLI.

mod agents;
mod audit;
mod bench;
mod cache;
mod doctor;
mod events;
mod health;
mod members;
mod ratelimit;
mod rules;
mod tasks;
mod token;

use std::process::ExitCode;
use std::sync::OnceLock;
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
    /// Bearer token (a JWT) sent on every call, for clusters running `--auth required`.
    #[arg(long, env = "AGENTMESH_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (read once; surrounding whitespace ignored).
    #[arg(
        long,
        env = "AGENTMESH_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: agentmesh_runtime::tls::TlsArgs,
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
    /// Reactive rules (stimulus → response, run by the scheduler): list, get, apply, delete,
    /// enable, disable, stats.
    #[command(subcommand)]
    Rules(rules::RulesCommand),
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
    /// The audit trail: who changed what, when, and how it ended.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
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
    if let Err(e) = set_token(cli.token.as_deref(), cli.token_file.as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    agentmesh_runtime::tls::install_crypto_provider();
    if let Err(e) = cli.tls.install_client() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
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
            Command::Rules(cmd) => rules::run(cmd).await,
            Command::Health(cmd) => health::run(cmd).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Audit(cmd) => audit::run(cmd).await,
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

/// The `authorization` value every call carries, set once at start from `--token` or
/// `--token-file`.
static BEARER: OnceLock<Option<tonic::metadata::AsciiMetadataValue>> = OnceLock::new();

fn set_token(token: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let token = match (token, file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let value = token
        .filter(|t| !t.is_empty())
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .context("--token: not a valid header value (a JWT is ASCII)")
        })
        .transpose()?;
    let _ = BEARER.set(value);
    Ok(())
}

/// The bearer token given (`--token`, `--token-file`), for HTTP reads of `/metrics`.
pub(crate) fn token() -> Option<String> {
    BEARER
        .get()
        .and_then(Option::as_ref)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// A `GET` of an admin endpoint carrying the bearer token (if any).
pub(crate) async fn admin_get(
    url: &str,
    timeout: Duration,
) -> Result<(u16, String), agentmesh_runtime::scrape::GetError> {
    agentmesh_runtime::scrape::get_with(url, timeout, token().as_deref()).await
}

/// Adds the bearer token (if any) to every call.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bearer;

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(Some(value)) = BEARER.get() {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token: what every meshctl client is built on.
pub(crate) type Chan =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// `channel` with the bearer token on every call.
pub(crate) fn with_token(channel: tonic::transport::Channel) -> Chan {
    tonic::service::interceptor::InterceptedService::new(channel, Bearer)
}

/// A channel to `addr` (`host:port` or `http://host:port`) through the runtime's endpoint
/// settings, each call bounded by `timeout` and carrying the bearer token; `what` names the
/// service in the error.
pub(crate) async fn connect(addr: &str, timeout: Duration, what: &str) -> anyhow::Result<Chan> {
    let config = agentmesh_runtime::ClientConfig {
        timeout,
        ..agentmesh_runtime::ClientConfig::default()
    };
    let channel = agentmesh_runtime::client::endpoint(addr, &config)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {what} at {addr}"))?;
    Ok(with_token(channel))
}
