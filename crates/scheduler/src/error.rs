//! The crate's one error enum, in the pool's words; its code, violations and message reach the
//! caller through the runtime's [`ServiceError`] mapping.

use std::time::Duration;

pub use agentmesh_runtime::error::FieldViolation;
use agentmesh_runtime::error::{ErrorCode, ServiceError, join_violations};

/// Everything that can go wrong in the pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// The caller sent something invalid; every violation is listed.
    #[error("invalid argument: {}", join_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// No such agent.
    #[error("agent {0:?} is not registered")]
    UnknownAgent(String),
    /// No such reservation (released, expired, or its agent left).
    #[error("reservation {0} does not exist (released, expired, or its agent left)")]
    UnknownReservation(String),
    /// A registration of the agent with another epoch is current.
    #[error("agent {agent_id:?} epoch {given} is stale: epoch {current} is registered")]
    StaleEpoch {
        /// The agent.
        agent_id: String,
        /// The epoch given.
        given: u64,
        /// The epoch registered.
        current: u64,
    },
    /// No such task (never submitted, or forgotten after its retention).
    #[error("task {0:?} does not exist (or was forgotten after its retention)")]
    UnknownTask(String),
    /// A dependency (the task store) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// No matching agent has a free slot now.
    #[error("{0}")]
    NoAgent(String),
    /// A bound was reached.
    #[error("{0}")]
    Full(String),
}

impl SchedulerError {
    /// A single-field `InvalidArgument`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

/// When to retry after `NoAgent`: about one heartbeat, when loads are next reported.
const NO_AGENT_RETRY: Duration = Duration::from_secs(1);

impl ServiceError for SchedulerError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::UnknownAgent(_) | Self::UnknownReservation(_) | Self::UnknownTask(_) => {
                ErrorCode::NotFound
            }
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::StaleEpoch { .. } => ErrorCode::FailedPrecondition,
            Self::NoAgent(_) | Self::Full(_) => ErrorCode::ResourceExhausted,
        }
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Self::InvalidArgument(v) => v,
            _ => &[],
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        matches!(self, Self::NoAgent(_)).then_some(NO_AGENT_RETRY)
    }
}
