//! The crate's one error enum. It carries no transport types: it says its code, violations and
//! message through the runtime's [`ServiceError`], whose one mapping makes the gRPC status.

pub use agentmesh_runtime::error::FieldViolation;
use agentmesh_runtime::error::{ErrorCode, ServiceError, join_violations as join};

/// Everything that can go wrong in the event bus domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventBusError {
    /// The caller sent something invalid; every violation found is listed.
    #[error("invalid argument: {}", join(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// A request found nobody subscribed to its subject.
    #[error("no responders for subject {0:?}")]
    NoResponders(String),
    /// A request's reply did not arrive within its timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// Something asked for does not exist (a delivery, a dead letter, a sequence).
    #[error("{0}")]
    NotFound(String),
    /// A bound was reached (queue full, too many subscriptions).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The durable store (Redis) could not be reached or failed.
    #[error("durable store unavailable: {0}")]
    Unavailable(String),
    /// The bus is shutting down.
    #[error("event bus is shutting down")]
    ShuttingDown,
    /// The caller's token may not use a subject it named (another tenant's, or `sys.`).
    #[error(transparent)]
    Denied(#[from] agentmesh_runtime::auth::scope::Denied),
}

impl EventBusError {
    /// A single-field `InvalidArgument`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl ServiceError for EventBusError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NoResponders(_) | Self::Unavailable(_) | Self::ShuttingDown => {
                ErrorCode::Unavailable
            }
            Self::Timeout(_) => ErrorCode::DeadlineExceeded,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Self::Denied(_) => ErrorCode::PermissionDenied,
        }
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Self::InvalidArgument(violations) => violations,
            _ => &[],
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Timeout(t) => format!("no reply within {}ms", t.as_millis()),
            Self::Unavailable(m) => m.clone(),
            other => other.to_string(),
        }
    }
}
