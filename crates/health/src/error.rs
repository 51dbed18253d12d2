//! The crate's one error enum; it reaches callers through the runtime's error mapping.

pub use agentmesh_runtime::error::FieldViolation;
use agentmesh_runtime::error::{ErrorCode, ServiceError, join_violations};

/// Everything that can go wrong in the aggregator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// The caller sent something invalid; every violation is listed.
    #[error("invalid argument: {}", join_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The named component, rule or silence does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A dependency (Redis) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

impl HealthError {
    /// One bad field.
    #[must_use]
    pub fn invalid(field: &str, description: &str) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl ServiceError for HealthError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Self::InvalidArgument(v) => v,
            _ => &[],
        }
    }
}
