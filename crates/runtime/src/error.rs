//! What every service's error says about itself, and the one mapping from it to a gRPC status.
//!
//! Each service crate keeps one error enum of its own (its domain's words) and implements
//! [`ServiceError`] for it: a code from the small [`ErrorCode`] set, the field violations of a
//! bad request, a retry delay when one is known. [`to_status`] turns any of them into a
//! `tonic::Status` with `google.rpc.BadRequest` / `google.rpc.RetryInfo` details, so every
//! service answers alike and a caller's mistake is never `INTERNAL`.

use std::fmt;
use std::time::Duration;

use tonic::Status;

use crate::status;

/// One invalid field of a request or a setting, e.g. `items[3].key` or `open.max_in_flight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the offending field, e.g. `items[3].limit.period`.
    pub field: String,
    /// What is wrong with it, including the bound when there is one.
    pub description: String,
}

impl FieldViolation {
    /// Builds a violation for `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// `field: description; field: description` for error messages.
#[must_use]
pub fn join_violations(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The gRPC codes agentmesh services answer with (DESIGN.md, "Errors and bad input").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The caller sent something invalid; [`ServiceError::violations`] names the fields.
    InvalidArgument,
    /// What was asked for does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// Valid, but the system is not in a state to run it (a missing dependency, a bad file).
    FailedPrecondition,
    /// A conditional write lost to a concurrent one: read again and retry.
    Aborted,
    /// A bound was reached; [`ServiceError::retry_after`] says when to retry, if known.
    ResourceExhausted,
    /// A dependency is down or the instance is shutting down: retrying is safe.
    Unavailable,
    /// The deadline passed before an answer.
    DeadlineExceeded,
    /// No valid credentials.
    Unauthenticated,
    /// Credentials that do not allow this.
    PermissionDenied,
    /// An RPC that is declared but not built yet.
    Unimplemented,
    /// A bug on our side; never a caller's mistake.
    Internal,
}

/// A service's error, as the one mapping to `Status` needs to see it.
pub trait ServiceError: fmt::Display {
    /// Its code.
    fn code(&self) -> ErrorCode;

    /// The fields a bad request got wrong (for `InvalidArgument`), all of them.
    fn violations(&self) -> &[FieldViolation] {
        &[]
    }

    /// When a retry may succeed (`ResourceExhausted`), if known.
    fn retry_after(&self) -> Option<Duration> {
        None
    }

    /// The message a caller reads (default: the error's `Display`).
    fn message(&self) -> String {
        self.to_string()
    }
}

/// The one mapping from a service error to a gRPC status.
#[must_use]
pub fn to_status(error: &(impl ServiceError + ?Sized)) -> Status {
    let message = error.message();
    match error.code() {
        ErrorCode::InvalidArgument => status::invalid_argument(
            error
                .violations()
                .iter()
                .map(|v| (v.field.clone(), v.description.clone())),
        ),
        ErrorCode::NotFound => status::not_found(message),
        ErrorCode::AlreadyExists => status::already_exists(message),
        ErrorCode::FailedPrecondition => status::failed_precondition(message),
        ErrorCode::Aborted => Status::aborted(message),
        ErrorCode::ResourceExhausted => status::resource_exhausted(message, error.retry_after()),
        ErrorCode::Unavailable => status::unavailable(message),
        ErrorCode::DeadlineExceeded => status::deadline_exceeded(message),
        ErrorCode::Unauthenticated => Status::unauthenticated(message),
        ErrorCode::PermissionDenied => Status::permission_denied(message),
        ErrorCode::Unimplemented => Status::unimplemented(message),
        ErrorCode::Internal => status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    #[derive(Debug)]
    enum TestError {
        Bad(Vec<FieldViolation>),
        Full,
    }

    impl fmt::Display for TestError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::Bad(v) => write!(f, "invalid: {}", join_violations(v)),
                Self::Full => f.write_str("full"),
            }
        }
    }

    impl ServiceError for TestError {
        fn code(&self) -> ErrorCode {
            match self {
                Self::Bad(_) => ErrorCode::InvalidArgument,
                Self::Full => ErrorCode::ResourceExhausted,
            }
        }
        fn violations(&self) -> &[FieldViolation] {
            match self {
                Self::Bad(v) => v,
                Self::Full => &[],
            }
        }
        fn retry_after(&self) -> Option<Duration> {
            matches!(self, Self::Full).then_some(Duration::from_secs(2))
        }
    }

    #[test]
    fn test_every_violation_becomes_a_bad_request_field_and_retry_info_is_attached() {
        let bad = TestError::Bad(vec![
            FieldViolation::new("a", "required"),
            FieldViolation::new("b[1]", "too long"),
        ]);
        let status = to_status(&bad);
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        assert_eq!(fields, ["a", "b[1]"]);
        let full = to_status(&TestError::Full);
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.get_error_details().retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(2))
        );
    }
}
