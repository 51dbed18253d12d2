//! The crate's one error enum; it reaches callers through the runtime's error mapping.

pub use agentmesh_runtime::error::FieldViolation;
use agentmesh_runtime::error::{ErrorCode, ServiceError, join_violations};

/// Everything that can go wrong in the cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The caller sent something invalid; every violation is listed.
    #[error("invalid argument: {}", join_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// `if_version` did not match the stored version (0: the key is absent).
    #[error("version mismatch: expected {expected}, the key is at {current}")]
    VersionMismatch {
        /// The version the caller expected.
        expected: u64,
        /// The version stored (0 when absent).
        current: u64,
    },
    /// A lease's fill named a lease that is no longer held (it expired and another caller may
    /// hold it now).
    #[error("lease {token} is no longer held: it expired or was taken over")]
    LeaseLost {
        /// The token named.
        token: u64,
    },
    /// L2 (Redis) cannot be reached or answered wrongly.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's token may not use a namespace it named (another tenant's).
    #[error(transparent)]
    Denied(#[from] agentmesh_runtime::auth::scope::Denied),
}

impl ServiceError for CacheError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::VersionMismatch { .. } | Self::LeaseLost { .. } => ErrorCode::FailedPrecondition,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Denied(_) => ErrorCode::PermissionDenied,
        }
    }

    fn violations(&self) -> &[FieldViolation] {
        match self {
            Self::InvalidArgument(v) => v,
            _ => &[],
        }
    }
}
