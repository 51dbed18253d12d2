//! The audit trail: every state-changing call (each service's `AUDITED` methods, declared next
//! to its `ACCESS` rules) is recorded by the server's auth layer with who (subject, tenant,
//! roles, agent id), what (service, method, the target the handler noted with [`target`]), when,
//! the outcome (the gRPC code and message) and the trace id — refused calls included. Each
//! record is written as a structured log line (target `agentmesh::audit`) and published as a
//! durable event on `sys.audit.<service>.<method>` (JSON: [`AuditRecord`]); `meshctl audit
//! tail` reads them.
//!
//! The event is best effort behind the log line: it waits in a bounded queue while no event bus
//! is reachable, and what cannot be queued is counted in `agentmesh_audit_events_dropped_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::auth::Identity;
use crate::bus_out::{BusPublisher, OutEvent};

/// Most bytes of a recorded target or error message.
const MAX_TEXT: usize = 512;

/// One audited call, as logged and published (JSON field names are the serde names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// When the call ended, RFC 3339 (UTC, milliseconds).
    pub at: String,
    /// The same, milliseconds since the epoch.
    pub at_ms: u64,
    /// The process that served it (`agentmesh/<host>/<pid>`).
    pub source: String,
    /// The fully qualified gRPC service, e.g. `agentmesh.ratelimit.v1.RateLimiter`.
    pub service: String,
    /// The method, e.g. `PutPolicy`.
    pub method: String,
    /// The token's `sub` (empty when the call had no valid token).
    pub subject: String,
    /// The token's tenant, if any.
    pub tenant: Option<String>,
    /// The token's roles.
    pub roles: Vec<String>,
    /// The token's agent id, if any.
    pub agent_id: Option<String>,
    /// What the call named (e.g. `acme.orders/per-user`), as the handler noted it; empty when
    /// it was refused before the handler ran.
    pub target: String,
    /// The gRPC code name: `OK`, `PERMISSION_DENIED`, …
    pub outcome: String,
    /// The error message when not OK (at most 512 bytes).
    pub message: String,
    /// The W3C trace id of the call (32 hex digits), empty when untraced.
    pub trace_id: String,
}

/// Records audited calls: the log line always, the event when a publisher is set.
pub struct Auditor {
    source: String,
    publisher: Option<BusPublisher>,
    seq: AtomicU64,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The short service name in an audit subject: `ratelimit` for
/// `agentmesh.ratelimit.v1.RateLimiter`, the first part otherwise (`envoy`, `grpc`).
#[must_use]
pub fn subject_service(service: &str) -> &str {
    let mut parts = service.split('.');
    match (parts.next(), parts.next()) {
        (Some("agentmesh"), Some(name)) => name,
        (Some(first), _) => first,
        _ => service,
    }
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Auditor {
    /// An auditor naming `source` in its records, publishing with `publisher` (None: log lines
    /// only).
    #[must_use]
    pub fn new(source: String, publisher: Option<BusPublisher>) -> Self {
        Self {
            source,
            publisher,
            seq: AtomicU64::new(0),
        }
    }

    /// Records one call.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        service: &str,
        method: &str,
        identity: Option<&Identity>,
        target: String,
        outcome: tonic::Code,
        message: String,
        trace_id: String,
    ) {
        let now = SystemTime::now();
        let at_ms = u64::try_from(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let record = AuditRecord {
            at: humantime::format_rfc3339_millis(now).to_string(),
            at_ms,
            source: self.source.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            subject: identity.map(|i| i.subject.clone()).unwrap_or_default(),
            tenant: identity.and_then(|i| i.tenant.clone()),
            roles: identity
                .map(|i| i.roles.iter().map(|r| r.as_str().to_owned()).collect())
                .unwrap_or_default(),
            agent_id: identity.and_then(|i| i.agent_id.clone()),
            target: bounded(target),
            outcome: code_name(outcome).to_owned(),
            message: bounded(message),
            trace_id,
        };
        tracing::info!(
            target: "agentmesh::audit",
            service = %record.service,
            method = %record.method,
            subject = %record.subject,
            tenant = record.tenant.as_deref().unwrap_or(""),
            roles = %record.roles.join(","),
            agent_id = record.agent_id.as_deref().unwrap_or(""),
            target_name = %record.target,
            outcome = %record.outcome,
            message = %record.message,
            audit_trace_id = %record.trace_id,
            "audit"
        );
        if let Some(publisher) = &self.publisher {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let data = serde_json::to_string(&record).unwrap_or_default();
            publisher.emit(OutEvent {
                subject: format!("sys.audit.{}.{method}", subject_service(service)),
                id: format!("audit-{}-{at_ms}-{seq}", self.source),
                event_type: "agentmesh.audit".into(),
                data,
                ordering_key: String::new(),
                headers: std::collections::BTreeMap::new(),
            });
        }
    }
}

/// The gRPC code's canonical name.
#[must_use]
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Where a handler notes what an audited call acts on; the auth layer puts one in the
/// request's extensions of audited calls only.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<String>>);

impl AuditNote {
    /// What was noted.
    #[must_use]
    pub fn take(&self) -> String {
        std::mem::take(&mut *self.0.lock())
    }
}

/// Where a handler says what its call acts on (taken before the request is consumed).
#[derive(Debug, Clone, Default)]
pub struct Target(Option<AuditNote>);

impl Target {
    /// Notes `target` (a namespace and name, a subject, an agent or task id); `target` is only
    /// built when the call is audited.
    pub fn set(&self, target: impl FnOnce() -> String) {
        if let Some(note) = &self.0 {
            *note.0.lock() = target();
        }
    }
}

/// The audit target slot of `request` (a no-op slot when the call is not audited).
#[must_use]
pub fn target<T>(request: &tonic::Request<T>) -> Target {
    Target(request.extensions().get::<AuditNote>().cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_audit_subjects_use_the_short_service_name() {
        assert_eq!(
            subject_service("agentmesh.ratelimit.v1.RateLimiter"),
            "ratelimit"
        );
        assert_eq!(
            subject_service("envoy.service.ratelimit.v3.RateLimitService"),
            "envoy"
        );
    }

    #[test]
    fn test_long_texts_are_bounded_on_a_char_boundary() {
        let text = "é".repeat(600);
        let cut = bounded(text);
        assert!(cut.len() <= MAX_TEXT);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
