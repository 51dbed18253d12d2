//! The agent pool as a real `agentmesh serve scheduler` process: agents register and stream
//! heartbeats, callers acquire and release them, a stream that ends marks its agent dead at
//! once, a new epoch fences the old stream, bad input names its fields, tasks are not built.

use std::time::Duration;

use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::wait_until;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;

type Client = pb::scheduler_client::SchedulerClient<tonic::transport::Channel>;

async fn client(p: &AgentmeshProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{}", p.grpc_addr)).await?)
}

fn registration(id: &str, capacity: u32) -> pb::RegisterAgentRequest {
    pb::RegisterAgentRequest {
        agent_id: id.into(),
        r#type: "summarizer".into(),
        capacity,
        tags: vec!["eu".into()],
        ..Default::default()
    }
}

/// An agent's open heartbeat stream.
struct Beating {
    tx: mpsc::Sender<pb::HeartbeatRequest>,
    rx: tonic::Streaming<pb::HeartbeatResponse>,
    sequence: u64,
}

impl Beating {
    async fn open(c: &mut Client, id: &str, epoch: u64) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::HeartbeatRequest {
            kind: Some(pb::heartbeat_request::Kind::Hello(pb::Hello {
                agent_id: id.into(),
                epoch,
            })),
        })
        .await?;
        let rx = c.heartbeat(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self {
            tx,
            rx,
            sequence: 0,
        })
    }

    /// Sends a report and returns the ack's state.
    async fn beat(&mut self) -> anyhow::Result<i32> {
        self.sequence += 1;
        self.tx
            .send(pb::HeartbeatRequest {
                kind: Some(pb::heartbeat_request::Kind::Report(pb::LoadReport {
                    sequence: self.sequence,
                    ..Default::default()
                })),
            })
            .await?;
        loop {
            let message = self
                .rx
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            if let Some(pb::heartbeat_response::Kind::Ack(ack)) = message.kind {
                return Ok(ack.state);
            }
        }
    }
}

async fn state_of(c: &mut Client, id: &str) -> anyhow::Result<i32> {
    Ok(c.get_agent(pb::GetAgentRequest {
        agent_id: id.into(),
    })
    .await?
    .into_inner()
    .state)
}

#[tokio::test]
async fn test_agents_register_heartbeat_get_acquired_and_die_when_their_stream_ends()
-> anyhow::Result<()> {
    let process = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&process).await?;
    let mut agents = Vec::new();
    for id in ["a-1", "a-2"] {
        let epoch = c
            .register_agent(registration(id, 2))
            .await?
            .into_inner()
            .epoch;
        let mut beating = Beating::open(&mut c, id, epoch).await?;
        assert_eq!(beating.beat().await?, pb::AgentState::Ready as i32);
        agents.push(beating);
    }
    let listed = c
        .list_agents(pb::ListAgentsRequest {
            selector: Some(pb::Selector {
                tags: vec!["eu".into()],
                ..Default::default()
            }),
            limit: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.agents.len(), 1);
    assert_eq!(listed.next_page_token, "a-1");

    // Round robin over both, two slots each: four acquisitions, then none free.
    let acquire = pb::AcquireAgentRequest {
        strategy: pb::Strategy::RoundRobin as i32,
        ..Default::default()
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(c.acquire_agent(acquire.clone()).await?.into_inner());
    }
    let picked: std::collections::BTreeSet<String> = held
        .iter()
        .map(|r| r.agent.as_ref().unwrap().agent_id.clone())
        .collect();
    assert_eq!(picked.len(), 2);
    let none = c.acquire_agent(acquire.clone()).await.unwrap_err();
    assert_eq!(none.code(), Code::ResourceExhausted);
    assert!(none.get_error_details().retry_info().is_some());
    c.release_agent(pb::ReleaseAgentRequest {
        reservation_id: held[0].reservation_id.clone(),
        outcome: pb::Outcome::Success as i32,
        latency: Some(prost_types::Duration {
            seconds: 0,
            nanos: 20_000_000,
        }),
    })
    .await?;
    c.acquire_agent(acquire).await?;

    // An agent whose stream ends is dead at once.
    let gone = agents.remove(0);
    drop(gone);
    wait_until(Duration::from_secs(2), "a-1 dead", || {
        let mut c = c.clone();
        async move { state_of(&mut c, "a-1").await.ok() == Some(pb::AgentState::Dead as i32) }
    })
    .await?;
    assert_eq!(state_of(&mut c, "a-2").await?, pb::AgentState::Ready as i32);
    let stats = c
        .get_pool_stats(pb::GetPoolStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(stats.agents_by_state.get("dead"), Some(&1));
    assert_eq!(stats.agents_by_state.get("ready"), Some(&1));
    Ok(())
}

#[tokio::test]
async fn test_a_new_epoch_fences_the_old_stream_and_drain_tells_the_agent() -> anyhow::Result<()> {
    let process = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&process).await?;
    let first = c
        .register_agent(registration("r-1", 1))
        .await?
        .into_inner()
        .epoch;
    let mut old = Beating::open(&mut c, "r-1", first).await?;
    old.beat().await?;
    let second = c
        .register_agent(registration("r-1", 1))
        .await?
        .into_inner()
        .epoch;
    assert!(second > first);
    let end = old.rx.next().await.expect("the old stream is closed");
    assert_eq!(end.unwrap_err().code(), Code::FailedPrecondition);
    let mut new = Beating::open(&mut c, "r-1", second).await?;
    new.beat().await?;
    let drained = c
        .drain_agent(pb::DrainAgentRequest {
            agent_id: "r-1".into(),
            deadline: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            reason: "maintenance".into(),
            on_expiry: 0,
        })
        .await?
        .into_inner();
    assert_eq!(
        drained.agent.unwrap().state,
        pb::AgentState::Draining as i32
    );
    loop {
        let message = new.rx.next().await.expect("open")?;
        if let Some(pb::heartbeat_response::Kind::Drain(d)) = message.kind {
            assert_eq!(d.reason, "maintenance");
            break;
        }
    }
    Ok(())
}

#[tokio::test]
async fn test_bad_input_names_every_field() -> anyhow::Result<()> {
    let process = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&process).await?;
    let status = c
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "has space".into(),
            capacity: 1_000_000,
            tags: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(fields, ["agent_id", "capacity", "tags[0]", "type"]);
    let status = c
        .acquire_agent(pb::AcquireAgentRequest {
            strategy: pb::Strategy::ConsistentHash as i32,
            ttl: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c
        .release_agent(pb::ReleaseAgentRequest {
            reservation_id: "xyz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c
        .get_agent(pb::GetAgentRequest {
            agent_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Tasks are built: an empty submit names its missing type (the task RPCs' own bad-input
    // tests are in scheduler_tasks.rs).
    let status = c
        .submit_task(pb::SubmitTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    Ok(())
}
