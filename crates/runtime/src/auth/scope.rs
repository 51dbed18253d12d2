//! What a verified caller may name: tenant scoping and agent identity, checked by each
//! service's handlers on the names a request carries (the auth layer cannot see inside a
//! message).
//!
//! - **Tenants.** A caller whose token has a `tenant` claim (say `acme`) owns the name `acme`
//!   and every name under `acme.`: rate-limit namespaces, cache namespaces, event subjects and
//!   subject filters (wildcards are whole tokens, so `>` or `*.x` is never a tenant's own). A
//!   queue group or durable name lives under its subject filter, so owning the filter is owning
//!   the group. A caller without a tenant claim is cluster-wide.
//! - **`sys.`** subjects are the cluster's own (dead letters, alerts, audit, scheduler events):
//!   publishing to one, or subscribing with a filter that could match one (`sys.…`, `>`,
//!   `*.…`), needs the operator role.
//! - **Agents.** A token with an `agent_id` claim acts only as that agent; an agent-only token
//!   without one acts as no agent.

use std::sync::{Arc, LazyLock};

use super::{Identity, Role};
use crate::error::{ErrorCode, ServiceError};

/// A name the caller may not use: PERMISSION_DENIED with the reason. Services carry it in
/// their error enums (`#[from]`), so it goes through their one mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl ServiceError for Denied {
    fn code(&self) -> ErrorCode {
        ErrorCode::PermissionDenied
    }
}

impl From<Denied> for tonic::Status {
    fn from(denied: Denied) -> Self {
        crate::error::to_status(&denied)
    }
}

static ANONYMOUS: LazyLock<Arc<Identity>> = LazyLock::new(|| Arc::new(Identity::anonymous_admin()));

/// The anonymous admin every call is with `--auth off` (one shared value).
#[must_use]
pub fn anonymous() -> Arc<Identity> {
    ANONYMOUS.clone()
}

/// The caller of `request`, as the server's auth layer verified it. A request that did not
/// pass through the layer (the layer is in every server stack; this is for in-process tests)
/// is the anonymous admin, as with `--auth off`.
#[must_use]
pub fn caller<T>(request: &tonic::Request<T>) -> Arc<Identity> {
    request
        .extensions()
        .get::<Arc<Identity>>()
        .cloned()
        .unwrap_or_else(|| ANONYMOUS.clone())
}

/// The prefix of the cluster's own subjects.
pub const SYSTEM_PREFIX: &str = "sys";

/// Whether `name` is `prefix` or under `prefix.`.
fn under(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

impl Identity {
    /// Whether the caller holds the operator role (or admin).
    #[must_use]
    pub fn is_operator(&self) -> bool {
        self.roles.contains(&Role::Operator) || self.roles.contains(&Role::Admin)
    }

    /// Whether the caller may use `name` (a namespace, subject or filter): a cluster-wide
    /// caller any; a tenant's caller its tenant and names under `<tenant>.`.
    #[must_use]
    pub fn owns(&self, name: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| under(name, t))
    }

    /// [`Self::owns`] as a `PERMISSION_DENIED` naming `field`, what it is (`kind`) and the
    /// tenant's space.
    ///
    /// # Errors
    /// PERMISSION_DENIED when another tenant's name (or a cluster-wide one) is used.
    pub fn check_owns(&self, field: &str, kind: &str, name: &str) -> Result<(), Denied> {
        if self.owns(name) {
            return Ok(());
        }
        let tenant = self.tenant.as_deref().unwrap_or_default();
        Err(Denied(format!(
            "{field}: {kind} {name:?} is outside tenant {tenant:?}: this token may use only \
             {tenant:?} and names under \"{tenant}.\""
        )))
    }

    /// Whether the caller may publish to (or redrive into) `subject`: owned, and `sys.`
    /// subjects only with the operator role.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the field.
    pub fn check_subject(&self, field: &str, subject: &str) -> Result<(), Denied> {
        self.check_owns(field, "subject", subject)?;
        if under(subject, SYSTEM_PREFIX) && !self.is_operator() {
            return Err(Denied(format!(
                "{field}: subject {subject:?} is a cluster subject (sys.): needs role operator \
                 (or admin)"
            )));
        }
        Ok(())
    }

    /// Whether the caller may subscribe with `filter`: owned, and a filter that could match a
    /// `sys.` subject (first token `sys`, `*` or `>`) only with the operator role.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the field.
    pub fn check_filter(&self, field: &str, filter: &str) -> Result<(), Denied> {
        self.check_owns(field, "subject filter", filter)?;
        let first = filter.split('.').next().unwrap_or_default();
        if matches!(first, SYSTEM_PREFIX | "*" | ">") && !self.is_operator() {
            return Err(Denied(format!(
                "{field}: filter {filter:?} can match cluster subjects (sys.): needs role \
                 operator (or admin); subscribe to your own subjects instead"
            )));
        }
        Ok(())
    }

    /// Whether the caller may act cluster-wide (`what`: the operation), which a tenant's
    /// caller may not.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the operation.
    pub fn check_cluster_wide(&self, what: &str) -> Result<(), Denied> {
        match &self.tenant {
            None => Ok(()),
            Some(t) => Err(Denied(format!(
                "{what} acts on the whole cluster: a token of tenant {t:?} may not"
            ))),
        }
    }

    /// Whether the caller may act as agent `agent_id` (register, heartbeat, report results,
    /// deregister): a token with an `agent_id` claim only as that agent; without one, only an
    /// operator (or admin) may act for an agent.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the field and the agent the token names.
    pub fn check_agent(&self, field: &str, agent_id: &str) -> Result<(), Denied> {
        match &self.agent_id {
            Some(own) if own == agent_id => Ok(()),
            Some(own) => Err(Denied(format!(
                "{field}: this token acts as agent {own:?}, not {agent_id:?}"
            ))),
            None if self.is_operator() => Ok(()),
            None => Err(Denied(format!(
                "{field}: acting as agent {agent_id:?} needs a token whose agent_id claim names \
                 it"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(tenant: Option<&str>, roles: &[Role], agent: Option<&str>) -> Identity {
        Identity {
            subject: "s".into(),
            tenant: tenant.map(str::to_owned),
            roles: roles.iter().copied().collect(),
            agent_id: agent.map(str::to_owned),
            expires_at: 0,
        }
    }

    #[test]
    fn test_a_tenant_owns_its_name_and_the_names_under_it_only() {
        let acme = who(Some("acme"), &[Role::Service], None);
        for name in ["acme", "acme.orders", "acme.>", "acme.*.x"] {
            assert!(acme.owns(name), "{name}");
        }
        for name in ["acmeco", "acme-x", "beta.acme", ">", "*.orders", "*", ""] {
            assert!(!acme.owns(name), "{name}");
        }
        let e = acme
            .check_owns("namespace", "namespace", "beta")
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(e.clone()).code(),
            tonic::Code::PermissionDenied
        );
        assert!(e.0.contains("outside tenant \"acme\""), "{e:?}");
        assert!(who(None, &[Role::Service], None).owns("anything"));
    }

    #[test]
    fn test_system_subjects_need_the_operator_role() {
        let svc = who(None, &[Role::Service], None);
        let op = who(None, &[Role::Operator], None);
        assert!(svc.check_subject("subject", "orders.new").is_ok());
        assert!(svc.check_subject("subject", "sys.audit.x").is_err());
        assert!(op.check_subject("subject", "sys.audit.x").is_ok());
        for filter in [">", "*.x", "sys.>", "sys"] {
            assert!(svc.check_filter("subject", filter).is_err(), "{filter}");
            assert!(op.check_filter("subject", filter).is_ok(), "{filter}");
        }
        assert!(svc.check_filter("subject", "orders.>").is_ok());
        let tenant_op = who(Some("acme"), &[Role::Operator], None);
        assert!(tenant_op.check_filter("subject", ">").is_err());
        assert!(tenant_op.check_filter("subject", "acme.>").is_ok());
        assert!(tenant_op.check_cluster_wide("SetMaintenance").is_err());
        assert!(op.check_cluster_wide("SetMaintenance").is_ok());
    }

    #[test]
    fn test_an_agent_acts_only_as_the_agent_its_token_names() {
        let a = who(None, &[Role::Agent], Some("agent-a"));
        assert!(a.check_agent("agent_id", "agent-a").is_ok());
        let e = a.check_agent("agent_id", "agent-b").unwrap_err();
        assert!(e.0.contains("acts as agent \"agent-a\""), "{e:?}");
        assert!(
            who(None, &[Role::Agent], None)
                .check_agent("agent_id", "agent-a")
                .is_err()
        );
        assert!(
            who(None, &[Role::Operator], None)
                .check_agent("agent_id", "agent-a")
                .is_ok()
        );
    }
}
