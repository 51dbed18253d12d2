//! Tasks end to end: a real scheduler process, SDK agents in this process and example-agent
//! processes. Submit → assign → run → complete (watched), a `kill -9`'d agent's task retried
//! and completed elsewhere, a SIGSTOPped agent's late result refused, idempotent submits,
//! tasks surviving a scheduler restart over Redis, and bad input on every task RPC.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentmesh_agent::{Agent, AgentConfig, TaskFailure};
use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_tests::RedisServer;
use agentmesh_tests::agentmesh::{AgentmeshProcess, binary};
use agentmesh_tests::wait_until;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;

type Client = pb::scheduler_client::SchedulerClient<tonic::transport::Channel>;

async fn client(scheduler: &AgentmeshProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{}", scheduler.grpc_addr)).await?)
}

fn submit(task_type: &str, payload: &[u8]) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        r#type: task_type.into(),
        payload: payload.to_vec(),
        retry: Some(pb::RetryPolicy {
            max_attempts: 3,
            initial_backoff: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..pb::RetryPolicy::default()
        }),
        ..pb::SubmitTaskRequest::default()
    }
}

async fn task(c: &mut Client, id: &str) -> anyhow::Result<pb::Task> {
    Ok(c.get_task(pb::GetTaskRequest { task_id: id.into() })
        .await?
        .into_inner())
}

/// Starts an SDK agent in this process that runs `echo` and `upper`; stops with the token.
fn sdk_agent(scheduler: &AgentmeshProcess, id: &str) -> CancellationToken {
    let agent = Agent::new(AgentConfig {
        scheduler: format!("http://{}", scheduler.grpc_addr),
        agent_id: id.into(),
        agent_type: "sdk".into(),
        capacity: 4,
        ..AgentConfig::default()
    })
    .handle("echo", |t| async move { Ok(t.payload) })
    .handle("upper", |t| async move {
        t.progress(Some(0.5), "uppercasing");
        String::from_utf8(t.payload)
            .map(|s| s.to_uppercase().into_bytes())
            .map_err(|_| TaskFailure::fatal("payload is not UTF-8"))
    });
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });
    stop
}

fn example_agent(scheduler: &AgentmeshProcess, id: &str) -> anyhow::Result<Child> {
    Ok(Command::new(binary("example-agent")?)
        .args([
            "--scheduler",
            &format!("http://{}", scheduler.grpc_addr),
            "--id",
            id,
            "--capacity",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Waits up to `secs` for task `id` to reach `state`.
async fn wait_state(
    c: &Client,
    id: &str,
    state: pb::TaskState,
    secs: u64,
    what: &str,
) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(secs), what, || {
        let mut c = c.clone();
        let id = id.to_owned();
        async move {
            task(&mut c, &id)
                .await
                .is_ok_and(|t| t.state == state as i32)
        }
    })
    .await
}

async fn wait_ready(c: &Client, ids: &[&str]) -> anyhow::Result<()> {
    for id in ids {
        wait_until(Duration::from_secs(10), "agent ready", || {
            let mut c = c.clone();
            let id = (*id).to_owned();
            async move {
                c.get_agent(pb::GetAgentRequest { agent_id: id })
                    .await
                    .is_ok_and(|a| a.into_inner().state == pb::AgentState::Ready as i32)
            }
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn test_a_submitted_task_is_run_by_an_sdk_agent_and_watched_to_the_end() -> anyhow::Result<()>
{
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&scheduler).await?;
    let stop = sdk_agent(&scheduler, "sdk-a");
    wait_ready(&c, &["sdk-a"]).await?;
    let submitted = c.submit_task(submit("upper", b"hello")).await?.into_inner();
    let mut watch = c
        .watch_task(pb::WatchTaskRequest {
            task_id: submitted.task_id.clone(),
        })
        .await?
        .into_inner();
    let mut states = Vec::new();
    while let Some(t) = tokio::time::timeout(Duration::from_secs(10), watch.next()).await? {
        let t = t?;
        if states.last() != Some(&t.state) {
            states.push(t.state);
        }
    }
    assert_eq!(
        states.last(),
        Some(&(pb::TaskState::Succeeded as i32)),
        "{states:?}"
    );
    let done = task(&mut c, &submitted.task_id).await?;
    assert_eq!(done.output, b"HELLO");
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].agent_id, "sdk-a");
    // A bad payload fails at once: not retryable.
    let bad = c
        .submit_task(submit("upper", &[0xff, 0xfe]))
        .await?
        .into_inner();
    wait_state(
        &c,
        &bad.task_id,
        pb::TaskState::Failed,
        10,
        "the bad task failed",
    )
    .await?;
    let failed = task(&mut c, &bad.task_id).await?;
    assert_eq!(failed.attempts.len(), 1, "not retried");
    assert!(failed.error.contains("not UTF-8"), "{}", failed.error);
    // Listing, newest first.
    let listed = c
        .list_tasks(pb::ListTasksRequest {
            limit: 1,
            ..pb::ListTasksRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.tasks[0].task_id, bad.task_id);
    assert_eq!(listed.next_page_token, bad.task_id);
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn test_a_killed_agents_task_is_retried_and_completed_elsewhere() -> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&scheduler).await?;
    let mut first = example_agent(&scheduler, "proc-a")?;
    wait_ready(&c, &["proc-a"]).await?;
    let submitted = c.submit_task(submit("sleep", b"1500")).await?.into_inner();
    wait_state(
        &c,
        &submitted.task_id,
        pb::TaskState::Running,
        5,
        "running on proc-a",
    )
    .await?;
    let mut second = example_agent(&scheduler, "proc-b")?;
    wait_ready(&c, &["proc-b"]).await?;
    first.kill()?;
    let killed = Instant::now();
    first.wait()?;
    wait_until(Duration::from_secs(5), "attempt 2 assigned", || {
        let mut c = c.clone();
        let id = submitted.task_id.clone();
        async move { task(&mut c, &id).await.is_ok_and(|t| t.attempt == 2) }
    })
    .await?;
    let reassigned = killed.elapsed();
    eprintln!("kill -9 of the agent running a task: attempt 2 assigned after {reassigned:?}");
    wait_state(
        &c,
        &submitted.task_id,
        pb::TaskState::Succeeded,
        10,
        "succeeded on proc-b",
    )
    .await?;
    let done = task(&mut c, &submitted.task_id).await?;
    assert_eq!(done.attempts[0].outcome, "agent dead");
    assert_eq!(done.attempts[1].agent_id, "proc-b");
    assert!(reassigned < Duration::from_secs(1), "{reassigned:?}");
    second.kill()?;
    second.wait()?;
    Ok(())
}

#[tokio::test]
async fn test_a_hung_agents_late_result_is_refused() -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&scheduler).await?;
    let mut hung = example_agent(&scheduler, "hung-a")?;
    wait_ready(&c, &["hung-a"]).await?;
    let submitted = c.submit_task(submit("sleep", b"3000")).await?.into_inner();
    wait_state(&c, &submitted.task_id, pb::TaskState::Running, 5, "running").await?;
    let pid = Pid::from_raw(i32::try_from(hung.id())?);
    kill(pid, Signal::SIGSTOP)?;
    let mut healthy = example_agent(&scheduler, "healthy-b")?;
    wait_until(
        Duration::from_secs(15),
        "retried and done elsewhere",
        || {
            let mut c = c.clone();
            let id = submitted.task_id.clone();
            async move {
                task(&mut c, &id)
                    .await
                    .is_ok_and(|t| t.state == pb::TaskState::Succeeded as i32)
            }
        },
    )
    .await?;
    // Resumed, the hung agent finishes its old attempt: the scheduler takes nothing from it.
    kill(pid, Signal::SIGCONT)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = task(&mut c, &submitted.task_id).await?;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    assert_eq!(
        done.attempts.last().map(|a| a.agent_id.as_str()),
        Some("healthy-b")
    );
    assert_eq!(done.attempts[0].agent_id, "hung-a");
    assert_ne!(done.attempts[0].outcome, "succeeded");
    for child in [&mut hung, &mut healthy] {
        child.kill()?;
        child.wait()?;
    }
    Ok(())
}

#[tokio::test]
async fn test_idempotent_submits_and_cancel() -> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&scheduler).await?;
    let mut keyed = submit("nobody-runs-this", b"x");
    keyed.idempotency_key = "order-7".into();
    let first = c.submit_task(keyed.clone()).await?.into_inner();
    let again = c.submit_task(keyed).await?.into_inner();
    assert!(!first.existing);
    assert!(again.existing);
    assert_eq!(again.task_id, first.task_id);
    let cancelled = c
        .cancel_task(pb::CancelTaskRequest {
            task_id: first.task_id.clone(),
            reason: "not needed".into(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.state, pb::TaskState::Cancelled as i32);
    assert_eq!(cancelled.error, "not needed");
    Ok(())
}

#[tokio::test]
async fn test_tasks_survive_a_scheduler_restart_over_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut first = AgentmeshProcess::serve("scheduler", Some(&redis.url()), None, &[]).await?;
    let mut c = client(&first).await?;
    let waiting = c.submit_task(submit("echo", b"kept")).await?.into_inner();
    first.kill9();
    let _ = first.wait_exit(Duration::from_secs(5)).await;
    let second = AgentmeshProcess::serve("scheduler", Some(&redis.url()), None, &[]).await?;
    let mut c = client(&second).await?;
    let reloaded = task(&mut c, &waiting.task_id).await?;
    assert_eq!(reloaded.state, pb::TaskState::Pending as i32);
    let stop = sdk_agent(&second, "sdk-r");
    wait_until(Duration::from_secs(10), "the kept task done", || {
        let mut c = c.clone();
        let id = waiting.task_id.clone();
        async move {
            task(&mut c, &id)
                .await
                .is_ok_and(|t| t.state == pb::TaskState::Succeeded as i32 && t.output == b"kept")
        }
    })
    .await?;
    stop.cancel();
    Ok(())
}

fn field_of(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn test_bad_input_on_every_task_rpc_names_the_field() -> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&scheduler).await?;
    let mut bad = submit("", &vec![0u8; (1 << 20) + 1]);
    bad.priority = 10;
    bad.start_to_close = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    bad.heartbeat_timeout = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    let e = c.submit_task(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let fields = field_of(&e);
    for f in ["type", "payload", "priority", "heartbeat_timeout"] {
        assert!(fields.contains(&f.to_owned()), "{f} in {fields:?}");
    }
    let e = c
        .get_task(pb::GetTaskRequest {
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e)),
        (Code::InvalidArgument, vec!["task_id".to_owned()])
    );
    let e = c
        .cancel_task(pb::CancelTaskRequest {
            task_id: "x".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), vec!["task_id".to_owned()]);
    let e = c
        .watch_task(pb::WatchTaskRequest {
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), vec!["task_id".to_owned()]);
    let e = c
        .list_tasks(pb::ListTasksRequest {
            limit: 5000,
            ..pb::ListTasksRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), vec!["limit".to_owned()]);
    let e = c
        .get_task(pb::GetTaskRequest {
            task_id: "0".repeat(32),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn test_agent_and_task_changes_are_published_on_the_event_bus_with_the_submit_trace()
-> anyhow::Result<()> {
    use agentmesh_proto::eventbus::v1 as bus;
    let dev = AgentmeshProcess::dev().await?;
    let (bus_addr, _) = dev.eventbus.expect("dev runs the event bus");
    let (sched_addr, _) = dev.addrs["scheduler"];
    let mut events =
        bus::event_bus_client::EventBusClient::connect(format!("http://{bus_addr}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: "sys.scheduler.>".into(),
            max_in_flight: 1000,
            ack_policy: bus::AckPolicy::None as i32,
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = events
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The scheduler finds the event bus through membership; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scheduler_url = format!("http://{sched_addr}");
    let agent = Agent::new(AgentConfig {
        scheduler: scheduler_url.clone(),
        agent_id: "evented".into(),
        agent_type: "sdk".into(),
        ..AgentConfig::default()
    })
    .handle("echo", |t| async move { Ok(t.payload) });
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });
    let mut c = Client::connect(scheduler_url).await?;
    wait_ready(&c, &["evented"]).await?;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut request = tonic::Request::new(submit("echo", b"e"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse()?);
    let submitted = c.submit_task(request).await?.into_inner();
    let mut seen: Vec<(String, std::collections::HashMap<String, String>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen
        .iter()
        .any(|(s, _)| s == "sys.scheduler.task.succeeded")
        && Instant::now() < deadline
    {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await
        else {
            break;
        };
        if let Some(bus::subscribe_response::Kind::Deliveries(d)) = message?.kind {
            for delivery in d.deliveries {
                let e = delivery.event.unwrap_or_default();
                seen.push((e.subject, e.headers));
            }
        }
    }
    let subjects: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    for expected in [
        "sys.scheduler.agent.joined",
        "sys.scheduler.task.pending",
        "sys.scheduler.task.assigned",
        "sys.scheduler.task.succeeded",
    ] {
        assert!(subjects.contains(&expected), "{expected} in {subjects:?}");
    }
    let (_, headers) = seen
        .iter()
        .find(|(s, _)| s == "sys.scheduler.task.succeeded")
        .expect("checked above");
    assert!(
        headers
            .get("traceparent")
            .is_some_and(|t| t.starts_with("00-0af7651916cd43dd8448eb211c80319c-")),
        "the submit's trace: {headers:?}"
    );
    let _ = submitted;
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn test_an_sdk_agent_shut_down_finishes_its_running_task_before_it_leaves()
-> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let mut c = client(&scheduler).await?;
    let agent = Agent::new(AgentConfig {
        scheduler: format!("http://{}", scheduler.grpc_addr),
        agent_id: "graceful".into(),
        agent_type: "sdk".into(),
        ..AgentConfig::default()
    })
    .handle("slow", |t| async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        Ok(t.payload)
    });
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });
    wait_ready(&c, &["graceful"]).await?;
    let submitted = c.submit_task(submit("slow", b"done")).await?.into_inner();
    wait_state(&c, &submitted.task_id, pb::TaskState::Running, 5, "running").await?;
    stop.cancel(); // SIGTERM in a real agent
    tokio::time::timeout(Duration::from_secs(10), running).await???;
    let done = task(&mut c, &submitted.task_id).await?;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    assert_eq!((done.attempt, done.output.as_slice()), (1, &b"done"[..]));
    let gone = c
        .get_agent(pb::GetAgentRequest {
            agent_id: "graceful".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "deregistered after the task");
    Ok(())
}
