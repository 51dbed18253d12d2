//! The crate's one error enum. It carries no transport types: the gRPC adapter maps each variant
//! to a status code in one place.

use std::fmt;

/// One invalid field of a request, e.g. `event.subject` or `open.max_in_flight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the offending field.
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
}

impl EventBusError {
    /// A single-field `InvalidArgument`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

fn join(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
