//! `example-agent`: an agent that joins the pool and keeps heartbeating until Ctrl-C or
//! SIGTERM, then deregisters. The way to write an agent: see the agentmesh-agent crate docs.

use std::process::ExitCode;

use agentmesh_agent::{Agent, AgentConfig, AgentStatus};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Join an agentmesh scheduler as an agent.
#[derive(Parser)]
#[command(name = "example-agent", version)]
struct Args {
    /// Scheduler address.
    #[arg(
        long,
        env = "AGENTMESH_SCHEDULER_ADDR",
        default_value = "http://127.0.0.1:7102"
    )]
    scheduler: String,
    /// Agent id (stable across restarts).
    #[arg(long)]
    id: String,
    /// Agent type.
    #[arg(long = "type", default_value = "example")]
    agent_type: String,
    /// Slots.
    #[arg(long, default_value_t = 4)]
    capacity: u32,
    /// Weight.
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// A tag; repeat for more.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Where callers reach it.
    #[arg(long, default_value = "")]
    endpoint: String,
}

fn main() -> ExitCode {
    let args: Args = agentmesh_runtime::config::parse_args_or_exit();
    tracing_init();
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("error: cannot start the tokio runtime");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let agent = Agent::new(AgentConfig {
            scheduler: args.scheduler,
            agent_id: args.id,
            agent_type: args.agent_type,
            capacity: args.capacity,
            weight: args.weight,
            tags: args.tags,
            endpoint: args.endpoint,
            ..AgentConfig::default()
        });
        let shutdown: CancellationToken = agentmesh_runtime::shutdown::on_signal();
        let mut status = agent.status();
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let now = status.borrow().clone();
                if let AgentStatus::Ready { epoch } = now {
                    println!("ready (epoch {epoch})");
                }
            }
        });
        match agent.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn tracing_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
