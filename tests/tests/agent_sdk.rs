//! The agent SDK against a real scheduler process: an agent joins and reports real process
//! metrics, follows a drain, deregisters on shutdown; a `kill -9`'d agent process is dead at
//! once.

use std::time::{Duration, Instant};

use agentmesh_agent::{Agent, AgentConfig, AgentStatus};
use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_tests::agentmesh::{AgentmeshProcess, binary};
use agentmesh_tests::wait_until;
use tokio_util::sync::CancellationToken;
use tonic::Code;

type Client = pb::scheduler_client::SchedulerClient<tonic::transport::Channel>;

fn config(scheduler: &AgentmeshProcess, id: &str) -> AgentConfig {
    AgentConfig {
        scheduler: format!("http://{}", scheduler.grpc_addr),
        agent_id: id.into(),
        agent_type: "sdk-test".into(),
        capacity: 2,
        ..AgentConfig::default()
    }
}

async fn agent_state(c: &mut Client, id: &str) -> Result<pb::Agent, tonic::Status> {
    c.get_agent(pb::GetAgentRequest {
        agent_id: id.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn test_an_sdk_agent_joins_reports_metrics_and_deregisters_on_shutdown() -> anyhow::Result<()>
{
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = Client::connect(format!("http://{}", scheduler.grpc_addr)).await?;
    let agent = std::sync::Arc::new(Agent::new(config(&scheduler, "sdk-1")));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (agent, shutdown) = (agent.clone(), shutdown.clone());
        async move { agent.run(shutdown).await }
    });
    let mut status = agent.status();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(*status.borrow(), AgentStatus::Ready { .. }) {
            status.changed().await.unwrap();
        }
    })
    .await?;
    let load = agent.load();
    let work = load.start();
    wait_until(
        Duration::from_secs(5),
        "a report with memory and work",
        || {
            let mut c = c.clone();
            async move {
                agent_state(&mut c, "sdk-1").await.is_ok_and(|a| {
                    a.state == pb::AgentState::Ready as i32
                        && a.last_report
                            .is_some_and(|r| r.memory_bytes > 0 && r.active == 1)
                })
            }
        },
    )
    .await?;
    drop(work);
    shutdown.cancel();
    running.await??;
    let gone = agent_state(&mut c, "sdk-1").await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "deregistered on shutdown");
    Ok(())
}

#[tokio::test]
async fn test_a_drained_sdk_agent_stops_at_the_deadline() -> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = Client::connect(format!("http://{}", scheduler.grpc_addr)).await?;
    let agent = std::sync::Arc::new(Agent::new(config(&scheduler, "sdk-2")));
    let running = tokio::spawn({
        let agent = agent.clone();
        async move { agent.run(CancellationToken::new()).await }
    });
    wait_until(Duration::from_secs(5), "registered", || {
        let mut c = c.clone();
        async move { agent_state(&mut c, "sdk-2").await.is_ok() }
    })
    .await?;
    c.drain_agent(pb::DrainAgentRequest {
        agent_id: "sdk-2".into(),
        deadline: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        reason: "test".into(),
        on_expiry: 0,
    })
    .await?;
    let mut status = agent.status();
    tokio::time::timeout(Duration::from_secs(3), async {
        while !matches!(*status.borrow(), AgentStatus::Draining { .. }) {
            status.changed().await.unwrap();
        }
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(5), running).await???;
    Ok(())
}

#[tokio::test]
async fn test_a_killed_agent_process_is_dead_within_a_second() -> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let c = Client::connect(format!("http://{}", scheduler.grpc_addr)).await?;
    let mut child = std::process::Command::new(binary("example-agent")?)
        .args([
            "--scheduler",
            &format!("http://{}", scheduler.grpc_addr),
            "--id",
            "proc-1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_until(Duration::from_secs(10), "the agent process ready", || {
        let mut c = c.clone();
        async move {
            agent_state(&mut c, "proc-1")
                .await
                .is_ok_and(|a| a.state == pb::AgentState::Ready as i32)
        }
    })
    .await?;
    child.kill()?; // SIGKILL
    let killed = Instant::now();
    child.wait()?;
    wait_until(Duration::from_secs(5), "the agent dead", || {
        let mut c = c.clone();
        async move {
            agent_state(&mut c, "proc-1")
                .await
                .is_ok_and(|a| a.state == pb::AgentState::Dead as i32)
        }
    })
    .await?;
    let noticed = killed.elapsed();
    eprintln!("kill -9 of an agent noticed after {noticed:?}");
    assert!(
        noticed < Duration::from_secs(1),
        "noticed after {noticed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn test_a_hung_agent_is_suspect_then_dead_and_never_dead_first() -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let c = Client::connect(format!("http://{}", scheduler.grpc_addr)).await?;
    let mut child = std::process::Command::new(binary("example-agent")?)
        .args([
            "--scheduler",
            &format!("http://{}", scheduler.grpc_addr),
            "--id",
            "hung-1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // A few heartbeats first, so the detector knows the agent's rhythm.
    wait_until(Duration::from_secs(10), "ready with history", || {
        let mut c = c.clone();
        async move {
            agent_state(&mut c, "hung-1").await.is_ok_and(|a| {
                a.state == pb::AgentState::Ready as i32
                    && a.last_report.is_some_and(|r| r.sequence >= 3)
            })
        }
    })
    .await?;
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    kill(pid, Signal::SIGSTOP)?;
    let stopped = Instant::now();
    let mut suspect_after = None;
    let mut dead_after = None;
    while stopped.elapsed() < Duration::from_secs(8) && dead_after.is_none() {
        let state = agent_state(&mut c.clone(), "hung-1").await?.state;
        if state == pb::AgentState::Suspect as i32 && suspect_after.is_none() {
            suspect_after = Some(stopped.elapsed());
        }
        if state == pb::AgentState::Dead as i32 {
            dead_after = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(pid, Signal::SIGCONT)?;
    child.kill()?;
    child.wait()?;
    eprintln!("SIGSTOP: suspect after {suspect_after:?}, dead after {dead_after:?}");
    let suspect = suspect_after.expect("suspect before dead");
    let dead = dead_after.expect("declared dead");
    // The targets are 2 s and 4 s (measured 1.83 s and 2.31 s; BENCHMARKS.md); the bounds
    // here leave room for a loaded CI machine — figures live in benchmarks, not assertions.
    assert!(
        suspect <= Duration::from_secs(3),
        "suspect after {suspect:?}"
    );
    assert!(
        dead <= Duration::from_secs(5) && dead > suspect,
        "dead after {dead:?}"
    );
    Ok(())
}
