//! `meshctl bench tasks`: submit → assigned → completed, end to end. This process runs
//! `--agents` SDK agents (the `agentmesh-agent` crate, an `echo` handler) against the
//! scheduler, then each in-flight slot submits a task and watches it until it ends. With
//! `--metrics-url`, the scheduler's own submit → assign histogram
//! (`scheduler_task_assign_seconds`) over the measured window is printed beside it.

use std::process::ExitCode;
use std::time::Duration;

use agentmesh_agent::{Agent, AgentConfig};
use agentmesh_proto::scheduler::v1 as pb;
use anyhow::Context;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{LoadArgs, Output, connect, run_load, scrape};

#[derive(clap::Args)]
pub(crate) struct TasksBench {
    #[command(flatten)]
    load: LoadArgs,
    /// SDK agents this process runs (each with `--capacity` slots), all with an `echo` handler.
    #[arg(long, default_value_t = 16)]
    agents: u32,
    /// Slots per agent.
    #[arg(long, default_value_t = 64)]
    capacity: u32,
    /// Bytes of each task's payload (echoed back as its output).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// The scheduler's metrics URL (its admin listener, e.g. `http://127.0.0.1:9102/metrics`):
    /// scraped when the measured window opens and after the run.
    #[arg(long)]
    metrics_url: Option<String>,
}

const ASSIGN: &str = "scheduler_task_assign_seconds";

async fn assign_histogram(url: &str) -> anyhow::Result<scrape::Buckets> {
    Ok(scrape::parse(&scrape::fetch(url).await?, ASSIGN, ""))
}

pub(crate) async fn run(args: TasksBench) -> anyhow::Result<ExitCode> {
    let addr = args
        .load
        .addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1:7102".to_owned());
    let scheduler = if addr.contains("://") {
        addr.clone()
    } else {
        format!("http://{addr}")
    };
    let stop = CancellationToken::new();
    for i in 0..args.agents {
        let agent = Agent::new(AgentConfig {
            scheduler: scheduler.clone(),
            agent_id: format!("bench-task-agent-{i:03}"),
            agent_type: "bench".into(),
            capacity: args.capacity,
            ..AgentConfig::default()
        })
        .handle("bench-echo", |task| async move { Ok(task.payload) });
        let stop = stop.clone();
        tokio::spawn(async move { agent.run(stop).await });
    }
    let channels = connect(&addr, args.load.connections).await?;
    let mut client = pb::scheduler_client::SchedulerClient::new(channels[0].clone());
    // Wait for the agents to be READY.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let listed = client
            .list_agents(pb::ListAgentsRequest {
                selector: Some(pb::Selector {
                    r#type: "bench".into(),
                    ..Default::default()
                }),
                state: pb::AgentState::Ready as i32,
                limit: 1000,
                ..Default::default()
            })
            .await
            .context("ListAgents")?
            .into_inner();
        if listed.agents.len() >= args.agents as usize {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} bench agents became ready",
            listed.agents.len(),
            args.agents
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = args.metrics_url.clone().map(|url| {
        let warmup = args.load.warmup;
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            assign_histogram(&url).await
        })
    });
    let payload = vec![b'x'; args.payload];
    let summary = run_load(&args.load, 1, move |worker, _seq| {
        let mut client =
            pb::scheduler_client::SchedulerClient::new(channels[worker % channels.len()].clone());
        let payload = payload.clone();
        async move {
            let submitted = client
                .submit_task(pb::SubmitTaskRequest {
                    r#type: "bench-echo".into(),
                    payload,
                    ..Default::default()
                })
                .await
                .map_err(|s| s.code())?
                .into_inner();
            let mut watch = client
                .watch_task(pb::WatchTaskRequest {
                    task_id: submitted.task_id,
                })
                .await
                .map_err(|s| s.code())?
                .into_inner();
            // Read the watch to its end (it ends after the terminal state): a client that
            // drops a stream early makes the server reset it, and h2 answers too many resets
            // on one connection with GOAWAY (ENHANCE_YOUR_CALM).
            let mut last = None;
            while let Some(task) = watch.next().await {
                last = Some(task.map_err(|s| s.code())?.state);
            }
            match last {
                Some(s) if s == pb::TaskState::Succeeded as i32 => Ok(false),
                Some(_) => Err(tonic::Code::Aborted),
                None => Err(tonic::Code::Unavailable),
            }
        }
    })
    .await;
    summary.print(
        "scheduler tasks, submit -> completed (watched)",
        &args.load,
        1,
    );
    if let (Some(before), Some(url)) = (before, &args.metrics_url) {
        let before = before.await.context("metrics scrape task failed")??;
        let after = assign_histogram(url).await?;
        after.since(&before).print_quantiles(
            &["all"],
            args.load.output == Output::Json,
            &scrape::Report {
                name: "at_the_scheduler",
                key: "histogram",
                heading: "submit -> assigned inside the scheduler",
                unit: " tasks",
            },
        );
    }
    stop.cancel();
    // Let the agents deregister.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(ExitCode::SUCCESS)
}
