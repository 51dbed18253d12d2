//! Running the tasks the scheduler assigns: a handler per task type, one tokio task per
//! assignment, updates (STARTED, PROGRESS, SUCCEEDED, FAILED) sent back on the heartbeat
//! stream, cancellation honoured.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use agentmesh_proto::scheduler::v1 as pb;
use agentmesh_runtime::wire::timestamp_to_ms;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Load;

/// One attempt of a task, given to your handler.
#[derive(Debug)]
pub struct Task {
    /// The task's id.
    pub id: String,
    /// The attempt (1 for the first; a retry runs with a higher number).
    pub attempt: u32,
    /// The task type.
    pub task_type: String,
    /// Its input.
    pub payload: Vec<u8>,
    /// Wall ms by which this attempt must end (the scheduler gives up on it then).
    pub deadline_ms: u64,
    /// W3C trace context of the submit (`traceparent`, `tracestate`), to continue its trace.
    pub trace_context: HashMap<String, String>,
    cancelled: CancellationToken,
    updates: mpsc::Sender<pb::TaskUpdate>,
}

impl Task {
    /// Reports progress (`fraction` 0–1 if known) and a short status line; it also tells the
    /// scheduler the task is alive (its heartbeat timeout). Dropped when the stream is busy:
    /// the next report carries the news.
    pub fn progress(&self, fraction: Option<f64>, message: &str) {
        let _ = self.updates.try_send(pb::TaskUpdate {
            task_id: self.id.clone(),
            attempt: self.attempt,
            kind: pb::TaskUpdateKind::Progress as i32,
            progress: fraction.unwrap_or(0.0),
            message: message.chars().take(1024).collect(),
            ..pb::TaskUpdate::default()
        });
    }

    /// Whether the scheduler cancelled this attempt (a caller cancelled the task, or the
    /// attempt timed out). Long handlers should check it, or select on
    /// [`Task::cancelled`].
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.is_cancelled()
    }

    /// Completes when the attempt is cancelled.
    pub async fn cancelled(&self) {
        self.cancelled.cancelled().await;
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskFailure {
    /// Shown in the task's error.
    pub message: String,
    /// False when another attempt cannot help (a bad payload): the task fails at once.
    pub retryable: bool,
}

impl TaskFailure {
    /// A failure another attempt (on another agent) may not have.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no attempt can fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// What a handler returns: the task's output, or why it failed.
pub type TaskResult = Result<Vec<u8>, TaskFailure>;

/// A handler: takes the task, returns its result.
pub(crate) type Handler =
    Arc<dyn Fn(Task) -> Pin<Box<dyn Future<Output = TaskResult> + Send>> + Send + Sync>;

/// The handlers and the attempts running now.
pub(crate) struct Runner {
    pub(crate) handlers: HashMap<String, Handler>,
    running: Mutex<HashMap<(String, u32), CancellationToken>>,
    pub(crate) updates_tx: mpsc::Sender<pb::TaskUpdate>,
    pub(crate) updates_rx: tokio::sync::Mutex<mpsc::Receiver<pb::TaskUpdate>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("task_types", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Updates waiting to be sent on the stream (a busy agent's progress reports beyond this are
/// dropped; results wait for room).
const UPDATES: usize = 1024;

impl Default for Runner {
    fn default() -> Self {
        let (updates_tx, updates_rx) = mpsc::channel(UPDATES);
        Self {
            handlers: HashMap::new(),
            running: Mutex::new(HashMap::new()),
            updates_tx,
            updates_rx: tokio::sync::Mutex::new(updates_rx),
        }
    }
}

fn update(id: &str, attempt: u32, kind: pb::TaskUpdateKind) -> pb::TaskUpdate {
    pb::TaskUpdate {
        task_id: id.to_owned(),
        attempt,
        kind: kind as i32,
        ..pb::TaskUpdate::default()
    }
}

impl Runner {
    /// Starts an assignment in its own tokio task.
    pub(crate) fn start(self: &Arc<Self>, a: pb::TaskAssignment, load: Arc<Load>) {
        let updates = self.updates_tx.clone();
        let Some(handler) = self.handlers.get(&a.r#type).cloned() else {
            // Not a type we registered: give it back at once, another agent can run it.
            let mut failed = update(&a.task_id, a.attempt, pb::TaskUpdateKind::Failed);
            failed.message = format!("this agent has no handler for task type {:?}", a.r#type);
            failed.retryable = true;
            tokio::spawn(async move {
                let _ = updates.send(failed).await;
            });
            return;
        };
        let token = CancellationToken::new();
        let key = (a.task_id.clone(), a.attempt);
        self.running.lock().insert(key.clone(), token.clone());
        let task = Task {
            id: a.task_id,
            attempt: a.attempt,
            task_type: a.r#type,
            payload: a.payload,
            deadline_ms: a.deadline.as_ref().and_then(timestamp_to_ms).unwrap_or(0),
            trace_context: a.trace_context,
            cancelled: token.clone(),
            updates: updates.clone(),
        };
        let runner = self.clone();
        let span = tracing::info_span!(
            "agent.task",
            otel.name = "task run",
            task.id = %task.id,
            task.r#type = %task.task_type,
            task.attempt = task.attempt,
        );
        {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let parent: std::collections::BTreeMap<String, String> = task
                .trace_context
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let _ = span.set_parent(agentmesh_runtime::propagation::extract_from_map(&parent));
        }
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _working = load.start();
                let (id, attempt) = key.clone();
                let _ = updates
                    .send(update(&id, attempt, pb::TaskUpdateKind::Started))
                    .await;
                let outcome = tokio::select! {
                    () = token.cancelled() => None,
                    result = handler(task) => Some(result),
                };
                let message = match outcome {
                    // Cancelled: the scheduler has moved on and takes no result.
                    None => {
                        runner.running.lock().remove(&key);
                        return;
                    }
                    Some(Ok(output)) => {
                        let mut done = update(&id, attempt, pb::TaskUpdateKind::Succeeded);
                        done.output = output;
                        done
                    }
                    Some(Err(failure)) => {
                        load.record_error();
                        let mut failed = update(&id, attempt, pb::TaskUpdateKind::Failed);
                        failed.message = failure.message.chars().take(1024).collect();
                        failed.retryable = failure.retryable;
                        failed
                    }
                };
                let _ = updates.send(message).await;
                // Counted as running until its result is queued, so a shutdown waits for it.
                runner.running.lock().remove(&key);
            },
            span,
        ));
    }

    /// Cancels a running attempt (the scheduler said so).
    pub(crate) fn cancel(&self, task_id: &str, attempt: u32) {
        if let Some(token) = self.running.lock().get(&(task_id.to_owned(), attempt)) {
            token.cancel();
        }
    }

    /// Attempts running now.
    pub(crate) fn running(&self) -> usize {
        self.running.lock().len()
    }
}
