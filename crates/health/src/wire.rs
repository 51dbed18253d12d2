//! Conversions between the aggregator's types and `agentmesh.health.v1` messages, and request
//! validation (bounds named in the proto).

use std::time::Duration;

use agentmesh_proto::health::v1 as pb;
use agentmesh_runtime::wire::{duration_from_proto, duration_to_proto, timestamp_from_ms};

use crate::aggregator::{ClusterView, ComponentView, Delta, Transition};
use crate::config::{
    DEFAULT_HISTORY_LIMIT, MAX_COMPONENT_LEN, MAX_HISTORY_LIMIT, MAX_MAINTENANCE, MAX_REASON_LEN,
};
use crate::error::{FieldViolation, HealthError};
use crate::model::{self, Kind, State};

/// The proto state.
#[must_use]
pub fn encode_state(state: State) -> pb::State {
    match state {
        State::Unknown => pb::State::Unknown,
        State::Up => pb::State::Up,
        State::Degraded => pb::State::Degraded,
        State::Down => pb::State::Down,
        State::Pending => pb::State::Pending,
        State::Maintenance => pb::State::Maintenance,
    }
}

/// The domain state of a proto state.
#[must_use]
pub fn decode_state(state: pb::State) -> State {
    match state {
        pb::State::Unknown => State::Unknown,
        pb::State::Up => State::Up,
        pb::State::Degraded => State::Degraded,
        pb::State::Down => State::Down,
        pb::State::Pending => State::Pending,
        pb::State::Maintenance => State::Maintenance,
    }
}

fn encode_kind(kind: Kind) -> pb::ComponentKind {
    match kind {
        Kind::Cluster => pb::ComponentKind::Cluster,
        Kind::Service => pb::ComponentKind::Service,
        Kind::Instance => pb::ComponentKind::Instance,
        Kind::Dependency => pb::ComponentKind::Dependency,
    }
}

/// One component.
#[must_use]
pub fn encode_component(c: &ComponentView) -> pb::Component {
    let member = c.member.as_ref();
    let field = |f: fn(&agentmesh_membership::Member) -> &String| {
        member.map(f).cloned().unwrap_or_default()
    };
    pb::Component {
        id: c.id.clone(),
        kind: encode_kind(c.kind).into(),
        name: c.name.clone(),
        state: encode_state(c.state).into(),
        since: Some(timestamp_from_ms(c.since_ms)),
        cause: c.cause.clone(),
        detail: c.detail.clone(),
        service: c.service.clone(),
        grpc_addr: field(|m| &m.grpc_addr),
        admin_addr: field(|m| &m.admin_addr),
        version: field(|m| &m.version),
        zone: field(|m| &m.zone),
        instances_total: c.instances_total,
        instances_up: c.instances_up,
        uptime_1h: c.uptime[0],
        uptime_24h: c.uptime[1],
        uptime_7d: c.uptime[2],
        latency_p50: c.latency.map(|(p50, _)| duration_to_proto(p50)),
        latency_p99: c.latency.map(|(_, p99)| duration_to_proto(p99)),
        maintenance_until: c
            .maintenance
            .as_ref()
            .map(|(until, _)| timestamp_from_ms(*until)),
        maintenance_reason: c
            .maintenance
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_default(),
        computed_state: encode_state(c.computed).into(),
        uptime_hours: c.uptime_hours.clone(),
    }
}

/// The cluster.
#[must_use]
pub fn encode_cluster(view: &ClusterView, now_ms: u64) -> pb::ClusterHealth {
    pb::ClusterHealth {
        state: encode_state(view.state).into(),
        summary: view.summary.clone(),
        revision: view.revision,
        components: view.components.iter().map(encode_component).collect(),
        at: Some(timestamp_from_ms(now_ms)),
    }
}

/// A snapshot as the first (or a reset) watch message.
#[must_use]
pub fn encode_snapshot(view: &ClusterView) -> pb::ClusterHealthUpdate {
    pb::ClusterHealthUpdate {
        revision: view.revision,
        snapshot: true,
        changed: view.components.iter().map(encode_component).collect(),
        removed: Vec::new(),
        cluster_state: encode_state(view.state).into(),
        summary: view.summary.clone(),
    }
}

/// A change, without instances when `omit_instances`.
#[must_use]
pub fn encode_delta(delta: &Delta, omit_instances: bool) -> pb::ClusterHealthUpdate {
    pb::ClusterHealthUpdate {
        revision: delta.revision,
        snapshot: false,
        changed: delta
            .changed
            .iter()
            .filter(|c| !(omit_instances && c.kind == Kind::Instance))
            .map(encode_component)
            .collect(),
        removed: delta
            .removed
            .iter()
            .filter(|id| !(omit_instances && id.starts_with("instance/")))
            .cloned()
            .collect(),
        cluster_state: encode_state(delta.cluster_state).into(),
        summary: delta.summary.clone(),
    }
}

/// A transition.
#[must_use]
pub fn encode_transition(t: &Transition) -> pb::Transition {
    pb::Transition {
        component: t.component.clone(),
        from: encode_state(t.from).into(),
        to: encode_state(t.to).into(),
        cause: t.cause.clone(),
        at: Some(timestamp_from_ms(t.at_ms)),
        revision: t.revision,
    }
}

fn done(violations: Vec<FieldViolation>) -> Result<(), HealthError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(HealthError::InvalidArgument(violations))
    }
}

/// A GetHistory request: (filter, limit).
///
/// # Errors
/// `InvalidArgument` naming each bad field.
pub fn decode_history(r: &pb::GetHistoryRequest) -> Result<(String, usize), HealthError> {
    let mut v = Vec::new();
    if r.component.len() > MAX_COMPONENT_LEN {
        v.push(FieldViolation::new(
            "component",
            format!("at most {MAX_COMPONENT_LEN} bytes"),
        ));
    } else if !r.component.is_empty()
        && !r.component.ends_with('/')
        && model::kind_of(&r.component).is_none()
    {
        v.push(FieldViolation::new(
            "component",
            "a component id (\"cluster\", \"service/<name>\", \"instance/<service>/<id>\", \"dependency/<name>\") or a prefix ending in \"/\"",
        ));
    }
    let limit = match usize::try_from(r.limit).unwrap_or(usize::MAX) {
        0 => DEFAULT_HISTORY_LIMIT,
        n if n > MAX_HISTORY_LIMIT => {
            v.push(FieldViolation::new(
                "limit",
                format!("at most {MAX_HISTORY_LIMIT}"),
            ));
            0
        }
        n => n,
    };
    done(v)?;
    Ok((r.component.clone(), limit))
}

/// A SetMaintenance request: (component, duration; zero ends it, reason).
///
/// # Errors
/// `InvalidArgument` naming each bad field.
pub fn decode_maintenance(
    r: &pb::SetMaintenanceRequest,
) -> Result<(String, Duration, String), HealthError> {
    let mut v = Vec::new();
    if r.component.is_empty() || r.component.len() > MAX_COMPONENT_LEN {
        v.push(FieldViolation::new(
            "component",
            format!("required, at most {MAX_COMPONENT_LEN} bytes"),
        ));
    } else if !matches!(
        model::kind_of(&r.component),
        Some(Kind::Service | Kind::Instance | Kind::Dependency)
    ) {
        v.push(FieldViolation::new(
            "component",
            "\"service/<name>\", \"instance/<service>/<id>\" or \"dependency/<name>\"",
        ));
    }
    let duration = match r.duration.as_ref().map(duration_from_proto) {
        None => Duration::ZERO,
        Some(Some(d)) if d <= MAX_MAINTENANCE => d,
        Some(_) => {
            v.push(FieldViolation::new(
                "duration",
                "between 0 (ends maintenance) and 7 days",
            ));
            Duration::ZERO
        }
    };
    if r.reason.len() > MAX_REASON_LEN {
        v.push(FieldViolation::new(
            "reason",
            format!("at most {MAX_REASON_LEN} bytes"),
        ));
    }
    done(v)?;
    Ok((r.component.clone(), duration, r.reason.clone()))
}

/// The proto severity.
#[must_use]
pub fn encode_severity(s: crate::alerts::rule::Severity) -> pb::Severity {
    use crate::alerts::rule::Severity;
    match s {
        Severity::Info => pb::Severity::Info,
        Severity::Warning => pb::Severity::Warning,
        Severity::Critical => pb::Severity::Critical,
    }
}

/// A rule from a PutAlertRule request.
///
/// # Errors
/// `InvalidArgument` naming each bad field (`rule.expr`, …).
pub fn decode_rule(r: &pb::PutAlertRuleRequest) -> Result<crate::alerts::rule::Rule, HealthError> {
    use crate::alerts::rule::{Rule, Severity};
    let Some(rule) = r.rule.as_ref() else {
        return Err(HealthError::invalid("rule", "required"));
    };
    let severity = match rule.severity() {
        pb::Severity::Info => Severity::Info,
        pb::Severity::Unspecified | pb::Severity::Warning => Severity::Warning,
        pb::Severity::Critical => Severity::Critical,
    };
    let for_ = match rule.r#for.as_ref().map(duration_from_proto) {
        None => Duration::ZERO,
        Some(Some(d)) => d,
        Some(None) => return Err(HealthError::invalid("rule.for", "a duration of at least 0")),
    };
    Rule::new(
        "rule.",
        &rule.name,
        severity,
        &rule.expr,
        for_,
        &rule.summary,
    )
}

/// A rule.
#[must_use]
pub fn encode_rule(r: &crate::alerts::rule::Rule) -> pb::AlertRule {
    pb::AlertRule {
        name: r.name.clone(),
        severity: encode_severity(r.severity).into(),
        expr: r.expr.clone(),
        r#for: Some(duration_to_proto(r.for_)),
        summary: r.summary.clone(),
    }
}

/// An alert.
#[must_use]
pub fn encode_alert(a: &crate::alerts::AlertView) -> pb::Alert {
    pb::Alert {
        rule: a.rule.name.clone(),
        severity: encode_severity(a.rule.severity).into(),
        status: a.record.status.as_str().to_owned(),
        since: Some(timestamp_from_ms(a.record.since_ms)),
        summary: a.rule.summary.clone(),
        silenced: a.silenced,
        value: a.record.value,
        fired_at: (a.record.fired_at_ms > 0).then(|| timestamp_from_ms(a.record.fired_at_ms)),
        expr: a.rule.expr.clone(),
    }
}

/// A silence.
#[must_use]
pub fn encode_silence(s: &crate::alerts::store::Silence) -> pb::Silence {
    pb::Silence {
        id: s.id.clone(),
        rule: s.rule.clone(),
        until: Some(timestamp_from_ms(s.until_ms)),
        reason: s.reason.clone(),
    }
}

/// A PutSilence request: (rule, duration, reason).
///
/// # Errors
/// `InvalidArgument` naming each bad field.
pub fn decode_silence(
    r: &pb::PutSilenceRequest,
) -> Result<(String, Duration, String), HealthError> {
    let mut v = Vec::new();
    if r.rule != "*" && !crate::alerts::rule::valid_name(&r.rule) {
        v.push(FieldViolation::new(
            "rule",
            "a rule name (1–64 bytes of letters, digits, '-', '_') or \"*\"",
        ));
    }
    let duration = match r.duration.as_ref().and_then(duration_from_proto) {
        Some(d) if !d.is_zero() && d <= crate::alerts::MAX_SILENCE => d,
        _ => {
            v.push(FieldViolation::new("duration", "above 0, at most 30 days"));
            Duration::ZERO
        }
    };
    if r.reason.len() > MAX_REASON_LEN {
        v.push(FieldViolation::new(
            "reason",
            format!("at most {MAX_REASON_LEN} bytes"),
        ));
    }
    done(v)?;
    Ok((r.rule.clone(), duration, r.reason.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bad_history_and_maintenance_requests_name_every_field() {
        let err = decode_history(&pb::GetHistoryRequest {
            component: "nope".into(),
            limit: 5000,
        })
        .unwrap_err();
        let HealthError::InvalidArgument(v) = err else {
            panic!()
        };
        assert_eq!(
            v.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
            ["component", "limit"]
        );
        let err = decode_maintenance(&pb::SetMaintenanceRequest {
            component: "cluster".into(),
            duration: Some(prost_types::Duration {
                seconds: 8 * 24 * 3600,
                nanos: 0,
            }),
            reason: "x".repeat(300),
        })
        .unwrap_err();
        let HealthError::InvalidArgument(v) = err else {
            panic!()
        };
        assert_eq!(v.len(), 3);
        assert!(
            decode_history(&pb::GetHistoryRequest {
                component: "instance/".into(),
                limit: 0
            })
            .is_ok()
        );
    }
}
