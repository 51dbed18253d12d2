//! Scheduler high availability with real processes, etcd and Redis: two schedulers elect a
//! leader, the follower forwards every call (heartbeat streams included) to it, and when the
//! leader is killed with `kill -9` under a stream of submissions the follower takes over
//! within the lease TTL + 1 s, reloads the tasks from Redis, the agent reconnects by itself,
//! and every task reaches a terminal state exactly once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentmesh_agent::{Agent, AgentConfig};
use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};
use tokio_util::sync::CancellationToken;
use tonic::Code;

type Client = pb::scheduler_client::SchedulerClient<tonic::transport::Channel>;

async fn answering(c: &mut Client) -> Option<String> {
    c.get_pool_stats(pb::GetPoolStatsRequest {})
        .await
        .ok()
        .map(|r| r.into_inner().instance)
}

#[tokio::test]
async fn test_the_follower_forwards_and_takes_over_a_killed_leader_losing_no_task()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let redis = RedisServer::start().await?;
    let endpoint = etcd.endpoint();
    let mut leader =
        AgentmeshProcess::serve("scheduler", Some(&redis.url()), Some(&endpoint), &[]).await?;
    let mut a = Client::connect(format!("http://{}", leader.grpc_addr)).await?;
    wait_until(Duration::from_secs(10), "the first scheduler leads", || {
        let mut a = a.clone();
        async move { answering(&mut a).await.is_some() }
    })
    .await?;
    let leader_id = answering(&mut a).await.unwrap_or_default();
    let follower =
        AgentmeshProcess::serve("scheduler", Some(&redis.url()), Some(&endpoint), &[]).await?;
    let b = Client::connect(format!("http://{}", follower.grpc_addr)).await?;
    wait_until(
        Duration::from_secs(10),
        "the follower forwards to the leader",
        || {
            let mut b = b.clone();
            let leader_id = leader_id.clone();
            async move { answering(&mut b).await == Some(leader_id) }
        },
    )
    .await?;

    // An agent that only knows the follower's address: its stream is forwarded.
    let stop = CancellationToken::new();
    let agent = Agent::new(AgentConfig {
        scheduler: format!("http://{}", follower.grpc_addr),
        agent_id: "ha-agent".into(),
        agent_type: "ha".into(),
        capacity: 8,
        reconnect_max: Duration::from_millis(500),
        ..AgentConfig::default()
    })
    .handle("work", |t| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(t.payload)
    });
    tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });

    // Submissions through the follower, 40 per second, each with its own idempotency key so a
    // submit retried across the failover cannot make a second task.
    let submitter = tokio::spawn({
        let b = b.clone();
        async move {
            let mut ids = BTreeMap::new();
            for n in 0..160u32 {
                let key = format!("ha-{n}");
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let request = pb::SubmitTaskRequest {
                        r#type: "work".into(),
                        payload: n.to_be_bytes().to_vec(),
                        idempotency_key: key.clone(),
                        ..pb::SubmitTaskRequest::default()
                    };
                    match b.clone().submit_task(request).await {
                        Ok(r) => {
                            ids.insert(n, r.into_inner().task_id);
                            break;
                        }
                        Err(s)
                            if Instant::now() < deadline && s.code() != Code::InvalidArgument =>
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => return Err(anyhow::anyhow!("submit {n}: {s}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Ok::<_, anyhow::Error>(ids)
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    leader.kill9();
    let killed = Instant::now();
    let _ = leader.wait_exit(Duration::from_secs(5)).await;
    let follower_id = {
        let mut b = b.clone();
        wait_until(Duration::from_secs(15), "the follower takes over", || {
            let mut b = b.clone();
            let leader_id = leader_id.clone();
            async move { answering(&mut b).await.is_some_and(|id| id != leader_id) }
        })
        .await?;
        answering(&mut b).await.unwrap_or_default()
    };
    let takeover = killed.elapsed();
    eprintln!("leader killed: {follower_id} took over after {takeover:?}");
    let ids = submitter.await??;
    assert_eq!(ids.len(), 160);
    let unique: std::collections::BTreeSet<_> = ids.values().collect();
    assert_eq!(unique.len(), 160, "no submit made two tasks");
    let mut c = b.clone();
    wait_until(Duration::from_secs(30), "every task ended", || {
        let c = c.clone();
        let ids: Vec<String> = ids.values().cloned().collect();
        async move {
            for id in ids {
                let Ok(t) = c.clone().get_task(pb::GetTaskRequest { task_id: id }).await else {
                    return false;
                };
                if t.into_inner().state < pb::TaskState::Succeeded as i32 {
                    return false;
                }
            }
            true
        }
    })
    .await?;
    let mut states = BTreeMap::new();
    for id in ids.values() {
        let t = c
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        *states.entry(t.state).or_insert(0) += 1;
    }
    eprintln!("terminal states after the failover: {states:?}");
    assert_eq!(
        states.get(&(pb::TaskState::Succeeded as i32)),
        Some(&160),
        "{states:?}"
    );
    assert!(
        takeover <= leader_ttl_plus_one(),
        "took over after {takeover:?}"
    );
    stop.cancel();
    Ok(())
}

/// The target: the leader lease (5 s) plus 1 s.
fn leader_ttl_plus_one() -> Duration {
    agentmesh_scheduler::leader::LEADER_TTL + Duration::from_secs(1)
}

#[tokio::test]
async fn test_an_sdk_agent_finds_the_scheduler_through_etcd() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let endpoint = etcd.endpoint();
    let scheduler = AgentmeshProcess::serve("scheduler", None, Some(&endpoint), &[]).await?;
    let mut c = Client::connect(format!("http://{}", scheduler.grpc_addr)).await?;
    let hosts = endpoint.trim_start_matches("http://").to_owned();
    let agent = Agent::new(AgentConfig {
        scheduler: format!("etcd://{hosts}"),
        agent_id: "discovered".into(),
        agent_type: "ha".into(),
        ..AgentConfig::default()
    });
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });
    wait_until(Duration::from_secs(15), "registered through etcd", || {
        let mut c = c.clone();
        async move {
            c.get_agent(pb::GetAgentRequest {
                agent_id: "discovered".into(),
            })
            .await
            .is_ok_and(|a| a.into_inner().state == pb::AgentState::Ready as i32)
        }
    })
    .await?;
    let _ = answering(&mut c).await;
    stop.cancel();
    Ok(())
}
