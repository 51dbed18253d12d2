//! Helpers that build `tonic::Status` with rich error details. Each service crate maps its one
//! error enum to `Status` in one place using these, so every service speaks the same small
//! set of codes: a caller's mistake is never `INTERNAL`.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// `INVALID_ARGUMENT` with a `google.rpc.BadRequest` listing every `(field, description)`.
#[must_use]
pub fn invalid_argument<I, F, D>(violations: I) -> Status
where
    I: IntoIterator<Item = (F, D)>,
    F: Into<String>,
    D: Into<String>,
{
    let violations: Vec<FieldViolation> = violations
        .into_iter()
        .map(|(field, description)| FieldViolation::new(field, description))
        .collect();
    let message = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        ErrorDetails::with_bad_request(violations),
    )
}

/// `NOT_FOUND`.
#[must_use]
pub fn not_found(message: impl Into<String>) -> Status {
    Status::not_found(message)
}

/// `ALREADY_EXISTS`.
#[must_use]
pub fn already_exists(message: impl Into<String>) -> Status {
    Status::already_exists(message)
}

/// `FAILED_PRECONDITION`: the request is valid but the system is not in a state to run it.
#[must_use]
pub fn failed_precondition(message: impl Into<String>) -> Status {
    Status::failed_precondition(message)
}

/// `RESOURCE_EXHAUSTED`, with `google.rpc.RetryInfo` when the retry time is known.
#[must_use]
pub fn resource_exhausted(message: impl Into<String>, retry_after: Option<Duration>) -> Status {
    match retry_after {
        Some(delay) => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(delay)),
        ),
        None => Status::resource_exhausted(message),
    }
}

/// `UNAVAILABLE`: a dependency is down or the instance is shutting down; retrying is safe.
#[must_use]
pub fn unavailable(message: impl Into<String>) -> Status {
    Status::unavailable(message)
}

/// `DEADLINE_EXCEEDED`.
#[must_use]
pub fn deadline_exceeded(message: impl Into<String>) -> Status {
    Status::deadline_exceeded(message)
}

/// `INTERNAL`: a bug on our side, never a caller's mistake.
#[must_use]
pub fn internal(message: impl Into<String>) -> Status {
    Status::internal(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_invalid_argument_carries_every_field_violation() {
        let status = invalid_argument([
            ("items[0].key", "must not be empty"),
            ("items", "at most 1000"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("items[0].key: must not be empty"));
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[1].field, "items");
    }

    #[test]
    fn test_resource_exhausted_carries_retry_info() {
        let status = resource_exhausted("slow down", Some(Duration::from_millis(250)));
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(250))
        );
    }
}
