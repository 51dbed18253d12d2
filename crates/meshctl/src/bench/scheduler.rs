//! `meshctl bench scheduler`: AcquireAgent + ReleaseAgent pairs against a scheduler holding
//! `--agents` registered, heartbeating agents (this process registers and keeps them alive).

use std::process::ExitCode;
use std::time::Duration;

use agentmesh_proto::scheduler::v1 as pb;
use anyhow::Context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{LoadArgs, connect, run_load};

#[derive(clap::Args)]
pub(crate) struct SchedulerBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Agents to register (each with `--capacity` slots) before the load starts.
    #[arg(long, default_value_t = 100)]
    agents: u32,
    /// Slots per agent.
    #[arg(long, default_value_t = 1000)]
    capacity: u32,
    /// Strategy of every AcquireAgent.
    #[arg(long, value_enum, default_value_t = crate::agents::StrategyArg::Adaptive)]
    strategy: crate::agents::StrategyArg,
}

/// Registers the agents and keeps their heartbeat streams alive until the process ends; the
/// agents are spread over `channels` (one connection per agent in real life; HTTP/2 servers
/// cap the streams of one connection).
async fn join_agents(channels: &[crate::Chan], agents: u32, capacity: u32) -> anyhow::Result<()> {
    for i in 0..agents {
        let mut client = pb::scheduler_client::SchedulerClient::new(
            channels[i as usize % channels.len()].clone(),
        );
        let id = format!("bench-agent-{i:05}");
        let epoch = client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.clone(),
                r#type: "bench".into(),
                capacity,
                ..Default::default()
            })
            .await
            .context("RegisterAgent")?
            .into_inner()
            .epoch;
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::HeartbeatRequest {
            kind: Some(pb::heartbeat_request::Kind::Hello(pb::Hello {
                agent_id: id,
                epoch,
            })),
        })
        .await?;
        let mut inbound = client
            .heartbeat(ReceiverStream::new(rx))
            .await
            .context("Heartbeat")?
            .into_inner();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            let mut sequence = 0;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        sequence += 1;
                        let report = pb::HeartbeatRequest {
                            kind: Some(pb::heartbeat_request::Kind::Report(pb::LoadReport {
                                sequence,
                                ..Default::default()
                            })),
                        };
                        if tx.send(report).await.is_err() {
                            return;
                        }
                    }
                    message = inbound.message() => {
                        if !matches!(message, Ok(Some(_))) {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

pub(crate) async fn run(args: SchedulerBench) -> anyhow::Result<ExitCode> {
    let addr = args
        .load
        .addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1:7102".to_owned());
    let channels = connect(&addr, args.load.connections).await?;
    // At most 100 agents' streams per connection.
    let agent_channels = connect(&addr, (args.agents as usize).div_ceil(100).max(1)).await?;
    join_agents(&agent_channels, args.agents, args.capacity).await?;
    let strategy = pb::Strategy::from(args.strategy) as i32;
    let summary = run_load(&args.load, 1, move |worker, _seq| {
        let mut client =
            pb::scheduler_client::SchedulerClient::new(channels[worker % channels.len()].clone());
        async move {
            let reservation = client
                .acquire_agent(pb::AcquireAgentRequest {
                    selector: Some(pb::Selector {
                        r#type: "bench".into(),
                        ..Default::default()
                    }),
                    strategy,
                    ..Default::default()
                })
                .await
                .map_err(|s| s.code())?
                .into_inner();
            client
                .release_agent(pb::ReleaseAgentRequest {
                    reservation_id: reservation.reservation_id,
                    outcome: pb::Outcome::Success as i32,
                    latency: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 1_000_000,
                    }),
                })
                .await
                .map(|_| false)
                .map_err(|s| s.code())
        }
    })
    .await;
    summary.print("scheduler AcquireAgent + ReleaseAgent pairs", &args.load, 1);
    Ok(ExitCode::SUCCESS)
}
