use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::config::PoolConfig;
use crate::pool::{AgentSpec, ManualClock};

struct World {
    clock: Arc<ManualClock>,
    pool: Arc<Pool>,
    store: Arc<InMemoryTaskStore>,
    tasks: Tasks,
}

fn world() -> World {
    let clock = Arc::new(ManualClock::default());
    let pool = Arc::new(Pool::new(PoolConfig::default(), clock.clone()));
    let store = Arc::new(InMemoryTaskStore::default());
    let tasks = Tasks::new(
        pool.clone(),
        clock.clone(),
        TaskConfig::default(),
        store.clone(),
    );
    World {
        clock,
        pool,
        store,
        tasks,
    }
}

/// Registers and attaches an agent that runs task type `t`; its epoch and stream.
fn agent(w: &World, id: &str, capacity: u32) -> (u64, mpsc::Receiver<StreamMessage>) {
    let spec = AgentSpec {
        agent_id: id.into(),
        agent_type: "worker".into(),
        capacity,
        weight: 1,
        task_types: ["t".to_owned()].into(),
        ..AgentSpec::default()
    };
    let epoch = w.pool.register(spec, 0).unwrap().epoch;
    let (_, rx) = w.pool.attach(id, epoch).unwrap();
    (epoch, rx)
}

fn spec() -> TaskSpec {
    TaskSpec {
        task_type: "t".into(),
        payload: Bytes::from_static(b"in"),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(10),
        },
        ..TaskSpec::default()
    }
}

/// The next assignment on a stream (skipping acks).
fn assignment(rx: &mut mpsc::Receiver<StreamMessage>) -> Option<Assignment> {
    while let Ok(m) = rx.try_recv() {
        if let StreamMessage::Assign(a) = m {
            return Some(a);
        }
    }
    None
}

fn cancel(rx: &mut mpsc::Receiver<StreamMessage>) -> Option<(String, u32)> {
    while let Ok(m) = rx.try_recv() {
        if let StreamMessage::Cancel {
            task_id, attempt, ..
        } = m
        {
            return Some((task_id, attempt));
        }
    }
    None
}

fn update(a: &Assignment, kind: UpdateKind) -> AgentUpdate {
    AgentUpdate {
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        kind,
    }
}

async fn state(w: &World, id: &str) -> TaskState {
    w.tasks.get(id).await.unwrap().state
}

#[tokio::test]
async fn test_a_task_is_assigned_at_once_runs_and_succeeds_and_its_slot_is_freed() {
    let w = world();
    let (epoch, mut rx) = agent(&w, "a", 1);
    let (task, existing) = w.tasks.submit(spec()).await.unwrap();
    assert!(!existing);
    assert_eq!(task.state, TaskState::Assigned);
    let a = assignment(&mut rx).expect("assigned on the stream");
    assert_eq!((a.attempt, a.payload.as_slice()), (1, b"in".as_slice()));
    assert_eq!(w.pool.stats().in_flight, 1);
    w.tasks
        .agent_update("a", epoch, update(&a, UpdateKind::Started));
    assert_eq!(state(&w, &task.id).await, TaskState::Running);
    w.tasks.agent_update(
        "a",
        epoch,
        update(
            &a,
            UpdateKind::Succeeded {
                output: Bytes::from_static(b"out"),
            },
        ),
    );
    let done = w.tasks.get(&task.id).await.unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(&done.output[..], b"out");
    assert_eq!(done.attempts[0].outcome, "succeeded");
    assert_eq!(w.pool.stats().in_flight, 0);
}

#[tokio::test]
async fn test_late_binding_a_task_waits_for_a_free_slot_never_on_a_busy_agent() {
    let w = world();
    let (epoch, mut rx) = agent(&w, "a", 1);
    let (first, _) = w.tasks.submit(spec()).await.unwrap();
    let (second, _) = w.tasks.submit(spec()).await.unwrap();
    assert_eq!(second.state, TaskState::Pending, "the only slot is taken");
    let a = assignment(&mut rx).unwrap();
    assert_eq!(a.task_id, first.id);
    assert!(assignment(&mut rx).is_none(), "nothing queued on the agent");
    w.tasks.agent_update(
        "a",
        epoch,
        update(
            &a,
            UpdateKind::Succeeded {
                output: Bytes::new(),
            },
        ),
    );
    let b = assignment(&mut rx).expect("the freed slot takes the next task");
    assert_eq!(b.task_id, second.id);
}

#[tokio::test]
async fn test_a_failed_attempt_is_retried_elsewhere_after_back_off_and_the_zombie_is_refused() {
    let w = world();
    let (ea, mut ra) = agent(&w, "a", 1);
    let (task, _) = w.tasks.submit(spec()).await.unwrap();
    let first = assignment(&mut ra).unwrap();
    let (eb, mut rb) = agent(&w, "b", 1);
    w.tasks.agent_update(
        "a",
        ea,
        update(
            &first,
            UpdateKind::Failed {
                message: "boom".into(),
                retryable: true,
            },
        ),
    );
    let t = w.tasks.get(&task.id).await.unwrap();
    assert_eq!(t.state, TaskState::Pending);
    assert!(t.not_before_wall_ms.is_some(), "waits out its back-off");
    w.tasks.tick();
    assert!(assignment(&mut rb).is_none(), "not before the back-off");
    w.clock.advance(Duration::from_millis(600));
    w.tasks.tick();
    let second = assignment(&mut rb).expect("retried on the other agent");
    assert_eq!(second.attempt, 2);
    // Agent a comes back with attempt 1: refused, the task is untouched.
    w.tasks
        .agent_update("a", ea, update(&first, UpdateKind::Started));
    assert_eq!(cancel(&mut ra), Some((task.id.clone(), 1)));
    w.tasks.agent_update(
        "a",
        ea,
        update(
            &first,
            UpdateKind::Succeeded {
                output: Bytes::from_static(b"late"),
            },
        ),
    );
    let t = w.tasks.get(&task.id).await.unwrap();
    assert_eq!((t.state, t.attempt()), (TaskState::Assigned, 2));
    w.tasks.agent_update(
        "b",
        eb,
        update(
            &second,
            UpdateKind::Succeeded {
                output: Bytes::from_static(b"ok"),
            },
        ),
    );
    let t = w.tasks.get(&task.id).await.unwrap();
    assert_eq!((t.state, &t.output[..]), (TaskState::Succeeded, &b"ok"[..]));
    assert_eq!(t.attempts[0].outcome, "failed: boom");
}

#[tokio::test]
async fn test_a_dead_agents_task_is_retried_on_another_agent_at_the_next_tick() {
    let w = world();
    let (ea, mut ra) = agent(&w, "a", 1);
    let (task, _) = w.tasks.submit(spec()).await.unwrap();
    let _ = assignment(&mut ra).unwrap();
    let (_, mut rb) = agent(&w, "b", 1);
    // The stream of a ends (kill -9): the pool marks it dead at once.
    w.pool.stream_ended("a", ea, 1);
    w.pool.deregister("a", ea).unwrap();
    let report = w.tasks.tick();
    assert_eq!(report.agent_dead, 1);
    let t = w.tasks.get(&task.id).await.unwrap();
    assert_eq!(t.attempts[0].outcome, "agent dead");
    w.clock.advance(Duration::from_millis(600));
    w.tasks.tick();
    let again = assignment(&mut rb).expect("retried on b");
    assert_eq!(again.attempt, 2);
}

#[tokio::test]
async fn test_deadlines_time_an_attempt_out_and_a_task_nobody_takes() {
    let w = world();
    let (_, mut ra) = agent(&w, "a", 1);
    let mut one_try = spec();
    one_try.retry.max_attempts = 1;
    one_try.start_to_close = Duration::from_secs(2);
    let (task, _) = w.tasks.submit(one_try).await.unwrap();
    let a = assignment(&mut ra).unwrap();
    w.clock.advance(Duration::from_secs(2));
    assert_eq!(w.tasks.tick().timed_out, 1);
    assert_eq!(cancel(&mut ra), Some((a.task_id, 1)), "the agent is told");
    let t = w.tasks.get(&task.id).await.unwrap();
    assert_eq!(t.state, TaskState::TimedOut);
    assert!(t.error.contains("start-to-close"), "{}", t.error);

    let mut nobody = spec();
    nobody.task_type = "nobody-runs-this".into();
    nobody.schedule_to_start = Some(Duration::from_secs(1));
    let (waiting, _) = w.tasks.submit(nobody).await.unwrap();
    w.clock.advance(Duration::from_millis(1100));
    assert_eq!(w.tasks.tick().not_started, 1);
    assert_eq!(state(&w, &waiting.id).await, TaskState::TimedOut);
}

#[tokio::test]
async fn test_a_silent_running_attempt_times_out_on_its_heartbeat() {
    let w = world();
    let (ea, mut ra) = agent(&w, "a", 1);
    let mut s = spec();
    s.retry.max_attempts = 1;
    s.heartbeat_timeout = Some(Duration::from_secs(1));
    let (task, _) = w.tasks.submit(s).await.unwrap();
    let a = assignment(&mut ra).unwrap();
    w.tasks
        .agent_update("a", ea, update(&a, UpdateKind::Started));
    w.clock.advance(Duration::from_millis(800));
    w.tasks.agent_update(
        "a",
        ea,
        update(
            &a,
            UpdateKind::Progress {
                progress: Some(0.5),
                message: "half".into(),
            },
        ),
    );
    w.clock.advance(Duration::from_millis(800));
    assert_eq!(w.tasks.tick().timed_out, 0, "progress is a heartbeat");
    w.clock.advance(Duration::from_millis(300));
    assert_eq!(w.tasks.tick().timed_out, 1);
    assert_eq!(state(&w, &task.id).await, TaskState::TimedOut);
}

#[tokio::test]
async fn test_cancel_reaches_the_agent_and_an_ended_task_is_answered_as_it_is() {
    let w = world();
    let (_, mut ra) = agent(&w, "a", 1);
    let (task, _) = w.tasks.submit(spec()).await.unwrap();
    let a = assignment(&mut ra).unwrap();
    let t = w.tasks.cancel(&task.id, "").unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    assert_eq!(cancel(&mut ra), Some((a.task_id, 1)));
    assert_eq!(w.pool.stats().in_flight, 0);
    assert_eq!(
        w.tasks.cancel(&task.id, "again").unwrap().error,
        "cancelled by caller"
    );
    assert!(matches!(
        w.tasks.cancel("00000000000000000000000000000000", ""),
        Err(SchedulerError::UnknownTask(_))
    ));
}

#[tokio::test]
async fn test_idempotent_submit_answers_the_first_task() {
    let w = world();
    let mut s = spec();
    s.idempotency_key = "order-42".into();
    let (first, existing) = w.tasks.submit(s.clone()).await.unwrap();
    assert!(!existing);
    let (again, existing) = w.tasks.submit(s).await.unwrap();
    assert!(existing);
    assert_eq!(again.id, first.id);
    assert_eq!(w.tasks.list(None, None, "", 10).0.len(), 1);
}

#[tokio::test]
async fn test_a_failure_that_retrying_cannot_help_ends_the_task_at_once() {
    let w = world();
    let (ea, mut ra) = agent(&w, "a", 1);
    let (task, _) = w.tasks.submit(spec()).await.unwrap();
    let a = assignment(&mut ra).unwrap();
    w.tasks.agent_update(
        "a",
        ea,
        update(
            &a,
            UpdateKind::Failed {
                message: "bad payload".into(),
                retryable: false,
            },
        ),
    );
    let t = w.tasks.get(&task.id).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.error.contains("not retryable"), "{}", t.error);
}

#[tokio::test]
async fn test_a_watch_sees_every_state_up_to_the_terminal_one() {
    let w = world();
    let (ea, mut ra) = agent(&w, "a", 1);
    let mut s = spec();
    s.task_type = "later".into();
    let (task, _) = w.tasks.submit(s).await.unwrap();
    let mut rx = w.tasks.watch(&task.id).unwrap();
    assert_eq!(rx.borrow_and_update().state, TaskState::Pending);
    w.tasks.cancel(&task.id, "no").unwrap();
    rx.changed().await.unwrap();
    assert_eq!(rx.borrow_and_update().state, TaskState::Cancelled);
    let (other, _) = w.tasks.submit(spec()).await.unwrap();
    let mut rx = w.tasks.watch(&other.id).unwrap();
    let a = assignment(&mut ra).unwrap();
    w.tasks
        .agent_update("a", ea, update(&a, UpdateKind::Started));
    rx.changed().await.unwrap();
    assert_eq!(rx.borrow_and_update().state, TaskState::Running);
}

#[tokio::test]
async fn test_a_new_scheduler_queues_the_open_tasks_of_the_store_again() {
    let w = world();
    let (_, mut ra) = agent(&w, "a", 1);
    let (running, _) = w.tasks.submit(spec()).await.unwrap();
    let _ = assignment(&mut ra).unwrap();
    let mut s = spec();
    s.task_type = "later".into();
    let (pending, _) = w.tasks.submit(s).await.unwrap();
    // Let the writer catch up, then start a second manager over the same store.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pool = Arc::new(Pool::new(PoolConfig::default(), w.clock.clone()));
    let next = Tasks::new(
        pool,
        w.clock.clone(),
        TaskConfig::default(),
        w.store.clone(),
    );
    assert_eq!(next.recover().await.unwrap(), 2);
    let t = next.get(&running.id).await.unwrap();
    assert_eq!(t.state, TaskState::Pending);
    assert_eq!(t.attempts[0].outcome, "lost: the scheduler restarted");
    assert_eq!(
        next.get(&pending.id).await.unwrap().state,
        TaskState::Pending
    );
}

#[tokio::test]
async fn test_scaling_signals_count_the_queue_and_the_agents_it_would_take() {
    let w = world();
    let _a = agent(&w, "a", 2);
    let _b = agent(&w, "b", 2);
    for _ in 0..5 {
        w.tasks.submit(spec()).await.unwrap();
    }
    w.clock.advance(Duration::from_secs(3));
    let signals = w.tasks.signals();
    let t = &signals["t"];
    assert_eq!((t.queued, t.running, t.agents, t.slots), (1, 4, 2, 4));
    assert_eq!(t.desired_agents, 3, "5 tasks at 2 slots per agent");
    assert_eq!(t.oldest_wait, Duration::from_secs(3));
}

#[tokio::test]
async fn test_a_key_claimed_by_a_submit_that_never_wrote_its_task_is_taken_over() {
    let w = world();
    let now = w.clock.wall_ms();
    let young = format!("{:012x}{:020x}", now, 1);
    let old = format!("{:012x}{:020x}", now - 60_000, 2);
    let ttl = Duration::from_secs(60);
    w.store.claim_key("fresh", &young, ttl).await.unwrap();
    w.store.claim_key("ghost", &old, ttl).await.unwrap();
    let mut s = spec();
    s.idempotency_key = "fresh".into();
    assert!(matches!(
        w.tasks.submit(s.clone()).await,
        Err(SchedulerError::Unavailable(_))
    ));
    s.idempotency_key = "ghost".into();
    let (task, existing) = w.tasks.submit(s.clone()).await.unwrap();
    assert!(!existing);
    let (again, existing) = w.tasks.submit(s).await.unwrap();
    assert!(existing);
    assert_eq!(again.id, task.id);
}

#[tokio::test]
async fn test_a_drained_agents_unfinished_tasks_are_requeued_or_cancelled_as_it_leaves() {
    use crate::pool::OnExpiry;
    let w = world();
    let (_, mut ra) = agent(&w, "a", 2);
    let mut one_try = spec();
    one_try.retry.max_attempts = 1;
    let (kept, _) = w.tasks.submit(one_try).await.unwrap();
    let _ = assignment(&mut ra).unwrap();
    w.pool
        .drain(
            "a",
            Duration::from_secs(1),
            "maintenance",
            OnExpiry::Requeue,
        )
        .unwrap();
    let (_, mut rb) = agent(&w, "b", 1);
    w.clock.advance(Duration::from_secs(1));
    w.pool.tick();
    assert_eq!(w.tasks.tick().drained, 1);
    let again = assignment(&mut rb).expect("requeued onto b");
    assert_eq!(again.attempt, 2, "a second attempt despite max_attempts 1");
    let t = w.tasks.get(&kept.id).await.unwrap();
    assert_eq!(
        t.attempts[0].outcome,
        "requeued: its agent's drain deadline passed"
    );

    let (_, mut rc) = agent(&w, "c", 1);
    let (dropped, _) = w.tasks.submit(spec()).await.unwrap();
    let _ = assignment(&mut rc).unwrap();
    w.pool
        .drain("c", Duration::from_secs(1), "retire", OnExpiry::Cancel)
        .unwrap();
    w.clock.advance(Duration::from_secs(1));
    w.pool.tick();
    w.tasks.tick();
    assert_eq!(state(&w, &dropped.id).await, TaskState::Cancelled);
}

#[tokio::test]
async fn test_a_tenants_task_runs_on_its_tenants_agents_only_and_others_not_on_them() {
    let w = world();
    let (_, mut plain_rx) = agent(&w, "plain", 1);
    let tenant_agent = AgentSpec {
        agent_id: "acme-1".into(),
        agent_type: "worker".into(),
        capacity: 1,
        weight: 1,
        task_types: ["t".to_owned()].into(),
        labels: [(crate::pool::TENANT_LABEL.to_owned(), "acme".to_owned())].into(),
        ..AgentSpec::default()
    };
    let epoch = w.pool.register(tenant_agent, 0).unwrap().epoch;
    let (_, mut acme_rx) = w.pool.attach("acme-1", epoch).unwrap();
    // Fill the plain agent: a second task of no tenant must wait, not take acme's agent.
    w.tasks.submit(spec()).await.unwrap();
    assert!(assignment(&mut plain_rx).is_some());
    let (waiting, _) = w.tasks.submit(spec()).await.unwrap();
    assert_eq!(waiting.state, TaskState::Pending);
    assert!(
        assignment(&mut acme_rx).is_none(),
        "a task of no tenant on acme's agent"
    );
    // Acme's task, queued behind it, still reaches acme's agent.
    let mut acme_task = spec();
    acme_task
        .labels
        .insert(crate::pool::TENANT_LABEL.to_owned(), "acme".to_owned());
    let (placed, _) = w.tasks.submit(acme_task).await.unwrap();
    assert_eq!(placed.state, TaskState::Assigned);
    assert_eq!(assignment(&mut acme_rx).map(|a| a.task_id), Some(placed.id));
}
