//! What a task is: its spec as submitted, its state, its attempts. Plain types, no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::pool::Selector;

/// How a failed attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (≥ 1).
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Each further wait is this many times the last (≥ 1).
    pub multiplier: f64,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait after attempt `failed` (1-based) failed: initial × multiplier^(failed − 1),
    /// at most `max_backoff`.
    #[must_use]
    pub fn backoff(&self, failed: u32) -> Duration {
        let exponent = i32::try_from(failed.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        if secs.is_finite() && secs < self.max_backoff.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max_backoff
        }
    }
}

/// A task as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// The task type (agents run the types they registered).
    pub task_type: String,
    /// Opaque input.
    pub payload: Bytes,
    /// Further conditions on the agent.
    pub selector: Selector,
    /// Same key = same task (empty: none).
    pub idempotency_key: String,
    /// 0–9, higher first.
    pub priority: u32,
    /// Longest wait for an agent, if bounded.
    pub schedule_to_start: Option<Duration>,
    /// Longest run of one attempt.
    pub start_to_close: Duration,
    /// Longest silence of a running attempt, if required.
    pub heartbeat_timeout: Option<Duration>,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// Shown in listings.
    pub labels: BTreeMap<String, String>,
    /// W3C trace context of the submit.
    pub trace_context: BTreeMap<String, String>,
}

impl Default for TaskSpec {
    fn default() -> Self {
        Self {
            task_type: String::new(),
            payload: Bytes::new(),
            selector: Selector::default(),
            idempotency_key: String::new(),
            priority: 0,
            schedule_to_start: None,
            start_to_close: Duration::from_secs(300),
            heartbeat_timeout: None,
            retry: RetryPolicy::default(),
            labels: BTreeMap::new(),
            trace_context: BTreeMap::new(),
        }
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskState {
    /// Waiting for an agent with a free slot (or for its retry back-off).
    Pending,
    /// Sent to an agent, not started yet.
    Assigned,
    /// The agent runs it.
    Running,
    /// Done.
    Succeeded,
    /// The last attempt failed, or a failure that retrying cannot help.
    Failed,
    /// Waited too long for an agent, or the last attempt ran out of time.
    TimedOut,
    /// Cancelled by a caller.
    Cancelled,
}

impl TaskState {
    /// Every state, in order.
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Assigned,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
    ];

    /// Lower-case name, for metrics and logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the task has ended (nothing changes it any more).
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first.
    pub number: u32,
    /// The agent it was given to.
    pub agent_id: String,
    /// Wall ms of the assignment.
    pub assigned_wall_ms: u64,
    /// Wall ms the agent said it started.
    pub started_wall_ms: Option<u64>,
    /// Wall ms it ended.
    pub ended_wall_ms: Option<u64>,
    /// How it ended ("succeeded", "failed: …", "timed out", "agent dead", "cancelled"); empty
    /// while it runs.
    pub outcome: String,
}

/// A task: its spec and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Its id: 32 hex digits, time-ordered (the first 12 are the submit's wall ms).
    pub id: String,
    /// As submitted.
    pub spec: TaskSpec,
    /// Where it is.
    pub state: TaskState,
    /// Attempts so far, oldest first.
    pub attempts: Vec<Attempt>,
    /// Wall ms of the submit.
    pub created_wall_ms: u64,
    /// Wall ms of the last change.
    pub updated_wall_ms: u64,
    /// Last reported progress, 0–1.
    pub progress: f64,
    /// Last reported status line.
    pub message: String,
    /// The result, once succeeded.
    pub output: Bytes,
    /// Why it failed, timed out or was cancelled.
    pub error: String,
    /// Pending after a failed attempt: not before this wall ms.
    pub not_before_wall_ms: Option<u64>,
}

impl Task {
    /// The current (or last) attempt's number; 0 before the first.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempts.last().map_or(0, |a| a.number)
    }

    /// The agent of the current attempt while it is assigned or running.
    #[must_use]
    pub fn agent_id(&self) -> Option<&str> {
        match self.state {
            TaskState::Assigned | TaskState::Running => {
                self.attempts.last().map(|a| a.agent_id.as_str())
            }
            _ => None,
        }
    }
}

/// What an agent says about one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentUpdate {
    /// The task.
    pub task_id: String,
    /// The attempt, as assigned.
    pub attempt: u32,
    /// What happened.
    pub kind: UpdateKind,
}

/// What happened to an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateKind {
    /// The agent began running it.
    Started,
    /// Still running (also a task heartbeat).
    Progress {
        /// Fraction done, 0–1, if known.
        progress: Option<f64>,
        /// A short status line.
        message: String,
    },
    /// Done, with a result.
    Succeeded {
        /// The result.
        output: Bytes,
    },
    /// Failed.
    Failed {
        /// The error.
        message: String,
        /// False when retrying cannot help.
        retryable: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_backoff_grows_by_the_multiplier_up_to_the_bound() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            multiplier: 3.0,
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(300));
        assert_eq!(policy.backoff(3), Duration::from_millis(900));
        assert_eq!(policy.backoff(4), Duration::from_secs(1));
        assert_eq!(policy.backoff(1000), Duration::from_secs(1));
    }
}
