//! The crate's one error enum. It carries no transport types: it says its code, violations and
//! message through the runtime's [`ServiceError`], whose one mapping makes the gRPC status.
//! `PolicyFile` only ever happens at startup or reload.

use agentmesh_runtime::auth::scope::Denied;
pub use agentmesh_runtime::error::FieldViolation;
use agentmesh_runtime::error::{ErrorCode, ServiceError, join_violations};

/// Everything that can go wrong in the rate limiter domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    /// The caller sent something invalid; every violation found is listed, not just the first.
    #[error("invalid argument: {}", join_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// A check referenced a policy name that is not configured.
    #[error("{field}: unknown rate limit policy {name:?}")]
    PolicyNotFound {
        /// Path of the field that named the policy, e.g. `items[3].policy`.
        field: String,
        /// The policy name that was asked for.
        name: String,
    },
    /// The policy file could not be read, parsed or validated.
    #[error("policy file {path}: {reason}")]
    PolicyFile {
        /// The file's path (or `<string>` when parsing from memory).
        path: String,
        /// What is wrong, naming the policy and field where possible.
        reason: String,
    },
    /// A stored policy that was asked for does not exist.
    #[error("policy {namespace}/{name} does not exist")]
    StoredPolicyNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A conditional write found another version than expected.
    #[error(
        "policy {namespace}/{name} is at version {actual}, not {expected}: read it again and retry"
    )]
    VersionMismatch {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The version the caller expected.
        expected: u64,
        /// The version stored (0 when absent).
        actual: u64,
    },
    /// The operation needs a dependency this cluster runs without (etcd for stored policies).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (etcd, Redis, a peer) did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// A lease that was asked for does not exist (released, expired, or never taken).
    #[error("{0}")]
    LeaseNotFound(String),
    /// This instance holds its maximum of something (leases).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's token may not use a namespace it named (another tenant's).
    #[error(transparent)]
    Denied(#[from] Denied),
}

impl RateLimitError {
    /// Shorthand for a single-violation `InvalidArgument`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl ServiceError for RateLimitError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::PolicyNotFound { .. }
            | Self::StoredPolicyNotFound { .. }
            | Self::LeaseNotFound(_) => ErrorCode::NotFound,
            Self::PolicyFile { .. } | Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::VersionMismatch { .. } => ErrorCode::Aborted,
            Self::Unavailable(_) => ErrorCode::Unavailable,
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
            Self::PolicyNotFound { field, name } => {
                format!("{field}: policy {name:?} does not exist")
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_invalid_argument_display_lists_every_violation() {
        let err = RateLimitError::InvalidArgument(vec![
            FieldViolation::new("items[0].key", "must not be empty"),
            FieldViolation::new("items[1].limit.period", "must be at least 1ms"),
        ]);
        assert_eq!(
            err.to_string(),
            "invalid argument: items[0].key: must not be empty; items[1].limit.period: must be at least 1ms"
        );
    }

    #[test]
    fn test_policy_not_found_display_names_field_and_policy() {
        let err = RateLimitError::PolicyNotFound {
            field: "items[2].policy".into(),
            name: "nope".into(),
        };
        assert_eq!(
            err.to_string(),
            "items[2].policy: unknown rate limit policy \"nope\""
        );
    }
}
