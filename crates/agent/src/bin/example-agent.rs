//! `example-agent`: an agent that joins the pool, runs three demo task types, and keeps
//! heartbeating until Ctrl-C or SIGTERM, then deregisters. The way to write an agent: see the
//! agentmesh-agent crate docs.
//!
//! Task types: `echo` (the output is the payload), `sleep` (the payload is a number of
//! milliseconds, default 1000; progress is reported every 100 ms and a cancel stops it),
//! `fail` (fails, retryable, with the payload as the message).

use std::process::ExitCode;

use std::time::Duration;

use agentmesh_agent::{Agent, AgentConfig, AgentStatus, Task, TaskFailure, TaskResult};
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
    /// Logs and traces (OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: each task attempt is a
    /// `task run` span in the submit's trace).
    #[command(flatten)]
    telemetry: agentmesh_runtime::config::TelemetryArgs,
}

fn main() -> ExitCode {
    let args: Args = agentmesh_runtime::config::parse_args_or_exit();
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("error: cannot start the tokio runtime");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let telemetry = match agentmesh_runtime::telemetry::init(&args.telemetry) {
            Ok(guard) => Some(guard),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(64);
            }
        };
        let agent = Agent::new(AgentConfig {
            scheduler: args.scheduler,
            agent_id: args.id,
            agent_type: args.agent_type,
            capacity: args.capacity,
            weight: args.weight,
            tags: args.tags,
            endpoint: args.endpoint,
            ..AgentConfig::default()
        })
        .handle("echo", |task| async move { Ok(task.payload) })
        .handle("sleep", sleep)
        .handle("fail", |task| async move {
            Err(TaskFailure::retryable(String::from_utf8_lossy(
                &task.payload,
            )))
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
        let code = match agent.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
        if let Some(guard) = telemetry {
            guard.shutdown().await;
        }
        code
    })
}

/// Sleeps the payload's milliseconds (default 1000), reporting progress every 100 ms.
async fn sleep(task: Task) -> TaskResult {
    let total: u64 = std::str::from_utf8(&task.payload)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000);
    let mut slept = 0;
    while slept < total {
        let step = (total - slept).min(100);
        tokio::time::sleep(Duration::from_millis(step)).await;
        slept += step;
        #[allow(clippy::cast_precision_loss, reason = "ms counts are small")]
        task.progress(
            Some(slept as f64 / total as f64),
            &format!("{slept} of {total} ms"),
        );
    }
    Ok(format!("slept {total} ms").into_bytes())
}
