//! The thin gRPC adapter of `agentmesh.rules.v1.Rules`: proto ↔ [`RuleDef`], one error mapping.

use std::collections::BTreeMap;
use std::sync::Arc;

use agentmesh_proto::rules::v1 as pb;
use agentmesh_proto::rules::v1::rules_server::{Rules, RulesServer};
use agentmesh_runtime::audit;
use agentmesh_runtime::auth::{AccessRule, Role};
use agentmesh_runtime::error::to_status;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};

use super::engine::Engine;
use super::model::{
    Action, CancelDef, CorrelationDef, ResponseDef, RuleDef, RuleError, Stimulus, compile,
};
use super::store::{RuleStore, Stored};

/// Who may call what (README "Security"): operators manage rules; services read them.
pub const ACCESS: &[AccessRule] = &[
    ("PutRule", &[Role::Operator]),
    ("GetRule", &[Role::Service, Role::Operator]),
    ("ListRules", &[Role::Service, Role::Operator]),
    ("DeleteRule", &[Role::Operator]),
    ("EnableRule", &[Role::Operator]),
    ("DisableRule", &[Role::Operator]),
    ("GetRuleStats", &[Role::Service, Role::Operator]),
    ("WatchFirings", &[Role::Service, Role::Operator]),
];

/// The state-changing RPCs recorded in the audit trail.
pub const AUDITED: &[&str] = &["PutRule", "DeleteRule", "EnableRule", "DisableRule"];

/// Serves the rules API over a store (and the engine, for statistics).
#[derive(Clone)]
pub struct RulesGrpc {
    store: Arc<dyn RuleStore>,
    engine: Option<Arc<Engine>>,
}

impl std::fmt::Debug for RulesGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RulesGrpc")
    }
}

impl RulesGrpc {
    #[must_use]
    pub fn new(store: Arc<dyn RuleStore>, engine: Option<Arc<Engine>>) -> Self {
        Self { store, engine }
    }

    #[must_use]
    pub fn into_server(self) -> RulesServer<Self> {
        RulesServer::new(self)
    }
}

fn status(e: &RuleError) -> Status {
    to_status(e)
}

fn millis(d: Option<&prost_types::Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.seconds).unwrap_or(0) * 1000
            + u64::try_from(d.nanos / 1_000_000).unwrap_or(0)
    })
}

fn decode_stimulus(s: pb::Stimulus) -> Stimulus {
    Stimulus {
        subject: s.subject,
        types: s.types,
        headers: s.headers.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

fn encode_stimulus(s: &Stimulus) -> pb::Stimulus {
    pb::Stimulus {
        subject: s.subject.clone(),
        types: s.types.clone(),
        headers: s.headers.clone().into_iter().collect(),
    }
}

/// The proto rule as stored data.
fn decode(rule: pb::Rule) -> Result<RuleDef, RuleError> {
    let stimulus = rule.stimulus.unwrap_or_default();
    let responses = rule
        .responses
        .into_iter()
        .enumerate()
        .map(|(i, r)| decode_response(&format!("rule.responses[{i}]"), r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RuleDef {
        name: rule.name,
        description: rule.description,
        disabled: rule.disabled,
        stimulus: decode_stimulus(stimulus),
        condition: rule.condition,
        responses,
        correlation: rule.correlation.map(|c| CorrelationDef {
            key: c.key,
            window_ms: millis(c.window.as_ref()),
            count: c.count,
            together_with: c.together_with.map(decode_stimulus),
            not_followed_by: c.not_followed_by.map(decode_stimulus),
        }),
        updated_at_ms: 0,
    })
}

/// One response (`at` names it), its cascade and fallback included.
fn decode_response(at: &str, r: pb::Response) -> Result<ResponseDef, RuleError> {
    let action = match r.action {
        Some(pb::response::Action::Publish(p)) => Action::Publish {
            subject: p.subject,
            event_type: p.r#type,
            data: p.data,
            content_type: p.content_type,
            headers: p.headers.into_iter().collect(),
        },
        Some(pb::response::Action::SubmitTask(t)) => Action::SubmitTask {
            task_type: t.r#type,
            payload: t.payload,
            priority: t.priority,
            labels: t.labels.into_iter().collect(),
            timeout_ms: millis(t.timeout.as_ref()),
            max_attempts: t.max_attempts,
        },
        Some(pb::response::Action::Webhook(w)) => Action::Webhook {
            url: w.url,
            body: w.body,
            headers: w.headers.into_iter().collect(),
            timeout_ms: millis(w.timeout.as_ref()),
        },
        None => {
            return Err(RuleError::Invalid(vec![
                agentmesh_runtime::error::FieldViolation::new(
                    format!("{at}.action"),
                    "one of publish, submit_task, webhook is required",
                ),
            ]));
        }
    };
    let fallback = match r.fallback {
        None => None,
        Some(f) => Some(Box::new(decode_response(&format!("{at}.fallback"), *f)?)),
    };
    let then = r
        .then
        .into_iter()
        .enumerate()
        .map(|(i, step)| decode_response(&format!("{at}.then[{i}]"), step))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ResponseDef {
        name: r.name,
        when: r.when,
        action,
        delay_ms: millis(r.delay.as_ref()),
        fallback,
        then,
        cancel: r.cancel.map(|c| CancelDef {
            stimulus: decode_stimulus(c.stimulus.unwrap_or_default()),
            key: c.key,
        }),
    })
}

fn duration(ms: u64) -> Option<prost_types::Duration> {
    (ms > 0).then(|| prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
    })
}

/// One stored response as the proto's, its fallback included.
fn encode_response(r: &ResponseDef) -> pb::Response {
    let mut out = pb::Response {
        name: r.name.clone(),
        when: r.when.clone(),
        action: Some(match &r.action {
            Action::Publish {
                subject,
                event_type,
                data,
                content_type,
                headers,
            } => pb::response::Action::Publish(pb::PublishAction {
                subject: subject.clone(),
                r#type: event_type.clone(),
                data: data.clone(),
                content_type: content_type.clone(),
                headers: headers.clone().into_iter().collect(),
            }),
            Action::SubmitTask {
                task_type,
                payload,
                priority,
                labels,
                timeout_ms,
                max_attempts,
            } => pb::response::Action::SubmitTask(pb::SubmitTaskAction {
                r#type: task_type.clone(),
                payload: payload.clone(),
                priority: *priority,
                labels: labels.clone().into_iter().collect(),
                timeout: duration(*timeout_ms),
                max_attempts: *max_attempts,
            }),
            Action::Webhook {
                url,
                body,
                headers,
                timeout_ms,
            } => pb::response::Action::Webhook(pb::WebhookAction {
                url: url.clone(),
                body: body.clone(),
                headers: headers.clone().into_iter().collect(),
                timeout: duration(*timeout_ms),
            }),
        }),
        ..pb::Response::default()
    };
    out.fallback = r.fallback.as_deref().map(|f| Box::new(encode_response(f)));
    out.delay = duration(r.delay_ms);
    out.then = r.then.iter().map(encode_response).collect();
    out.cancel = r.cancel.as_ref().map(|c| pb::Cancel {
        stimulus: Some(encode_stimulus(&c.stimulus)),
        key: c.key.clone(),
    });
    out
}

/// Stored data as the proto rule.
fn encode(stored: &Stored) -> pb::Rule {
    let def = &stored.def;
    pb::Rule {
        name: def.name.clone(),
        description: def.description.clone(),
        disabled: def.disabled,
        stimulus: Some(encode_stimulus(&def.stimulus)),
        condition: def.condition.clone(),
        correlation: def.correlation.as_ref().map(|c| pb::Correlation {
            key: c.key.clone(),
            window: duration(c.window_ms),
            count: c.count,
            together_with: c.together_with.as_ref().map(encode_stimulus),
            not_followed_by: c.not_followed_by.as_ref().map(encode_stimulus),
        }),
        responses: def.responses.iter().map(encode_response).collect(),
        version: stored.version,
        updated_at: (def.updated_at_ms > 0).then(|| prost_types::Timestamp {
            seconds: i64::try_from(def.updated_at_ms / 1000).unwrap_or(0),
            nanos: i32::try_from(def.updated_at_ms % 1000).unwrap_or(0) * 1_000_000,
        }),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl RulesGrpc {
    async fn stored(&self, name: &str) -> Result<Stored, RuleError> {
        self.store
            .get(name)
            .await?
            .ok_or_else(|| RuleError::NotFound(name.to_owned()))
    }

    async fn set_disabled(&self, name: &str, disabled: bool) -> Result<pb::Rule, RuleError> {
        let mut stored = self.stored(name).await?;
        if stored.def.disabled != disabled {
            stored.def.disabled = disabled;
            stored.def.updated_at_ms = now_ms();
            let (version, _) = self
                .store
                .put(stored.def.clone(), Some(stored.version))
                .await?;
            stored.version = version;
        }
        Ok(encode(&stored))
    }
}

#[tonic::async_trait]
impl Rules for RulesGrpc {
    async fn put_rule(
        &self,
        request: Request<pb::PutRuleRequest>,
    ) -> Result<Response<pb::PutRuleResponse>, Status> {
        let audit = audit::target(&request);
        let r = request.into_inner();
        audit.set(|| {
            r.rule
                .as_ref()
                .map(|rule| rule.name.clone())
                .unwrap_or_default()
        });
        let rule = r.rule.ok_or_else(|| {
            status(&RuleError::Invalid(vec![
                agentmesh_runtime::error::FieldViolation::new("rule", "required"),
            ]))
        })?;
        let mut def = decode(rule).map_err(|e| status(&e))?;
        def.updated_at_ms = now_ms();
        let compiled = compile(def, 0).map_err(|e| status(&e))?;
        let mut def = compiled.def;
        if r.dry_run {
            let existing = self.store.get(&def.name).await.map_err(|e| status(&e))?;
            def.updated_at_ms = existing.as_ref().map_or(0, |s| s.def.updated_at_ms);
            let version = existing.as_ref().map_or(0, |s| s.version);
            return Ok(Response::new(pb::PutRuleResponse {
                rule: Some(encode(&Stored { def, version })),
                replaced: existing.is_some(),
            }));
        }
        let expected = (r.expected_version != 0).then_some(r.expected_version);
        let (version, replaced) = self
            .store
            .put(def.clone(), expected)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::PutRuleResponse {
            rule: Some(encode(&Stored { def, version })),
            replaced,
        }))
    }

    async fn get_rule(
        &self,
        request: Request<pb::GetRuleRequest>,
    ) -> Result<Response<pb::GetRuleResponse>, Status> {
        let stored = self
            .stored(&request.into_inner().name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetRuleResponse {
            rule: Some(encode(&stored)),
        }))
    }

    async fn list_rules(
        &self,
        _request: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let rules = self.store.list().await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListRulesResponse {
            rules: rules.iter().map(encode).collect(),
        }))
    }

    async fn delete_rule(
        &self,
        request: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        let audit = audit::target(&request);
        let name = request.into_inner().name;
        audit.set(|| name.clone());
        if !self.store.delete(&name).await.map_err(|e| status(&e))? {
            return Err(status(&RuleError::NotFound(name)));
        }
        Ok(Response::new(pb::DeleteRuleResponse {}))
    }

    async fn enable_rule(
        &self,
        request: Request<pb::EnableRuleRequest>,
    ) -> Result<Response<pb::EnableRuleResponse>, Status> {
        let audit = audit::target(&request);
        let name = request.into_inner().name;
        audit.set(|| name.clone());
        let rule = self
            .set_disabled(&name, false)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::EnableRuleResponse { rule: Some(rule) }))
    }

    async fn disable_rule(
        &self,
        request: Request<pb::DisableRuleRequest>,
    ) -> Result<Response<pb::DisableRuleResponse>, Status> {
        let audit = audit::target(&request);
        let name = request.into_inner().name;
        audit.set(|| name.clone());
        let rule = self
            .set_disabled(&name, true)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DisableRuleResponse { rule: Some(rule) }))
    }

    async fn get_rule_stats(
        &self,
        request: Request<pb::GetRuleStatsRequest>,
    ) -> Result<Response<pb::GetRuleStatsResponse>, Status> {
        let name = request.into_inner().name;
        let Some(engine) = &self.engine else {
            return Ok(Response::new(pb::GetRuleStatsResponse::default()));
        };
        let to_duration = |d: std::time::Duration| prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        };
        let mut stats = Vec::new();
        for (name, s) in engine.stats(&name) {
            let pending = engine.delayed_pending(&name).await.unwrap_or_default();
            stats.push(pb::RuleStats {
                name,
                matched: s.matched,
                fired: s.fired,
                skipped: s.skipped,
                failed: s.failed,
                responses: s.responses,
                fallbacks: s.fallbacks,
                delayed_pending: pending.delayed,
                awaiting: pending.awaiting,
                correlating: s.correlating,
                cancelled: s.cancelled,
                latency_p50: s.latency(0.5).map(to_duration),
                latency_p99: s.latency(0.99).map(to_duration),
            });
        }
        Ok(Response::new(pb::GetRuleStatsResponse { stats }))
    }

    type WatchFiringsStream = futures::stream::BoxStream<'static, Result<pb::Firing, Status>>;

    async fn watch_firings(
        &self,
        request: Request<pb::WatchFiringsRequest>,
    ) -> Result<Response<Self::WatchFiringsStream>, Status> {
        let name = request.into_inner().name;
        let Some(engine) = &self.engine else {
            return Err(status(&RuleError::Unimplemented(
                "WatchFirings without a rule engine".to_owned(),
            )));
        };
        let firings = tokio_stream::wrappers::BroadcastStream::new(engine.watch());
        let stream = firings.filter_map(move |item| match item {
            Ok(f) if name.is_empty() || f.rule == name => Some(Ok(pb::Firing {
                id: f.id,
                rule: f.rule,
                event_id: f.event_id,
                subject: f.subject,
                at: Some(prost_types::Timestamp {
                    seconds: i64::try_from(f.at_ms / 1000).unwrap_or(0),
                    nanos: i32::try_from(f.at_ms % 1000).unwrap_or(0) * 1_000_000,
                }),
                outcome: f.outcome.to_ascii_uppercase(),
                responses: f.responses,
            })),
            Ok(_) => None,
            // A watcher that fell more than WATCH_BUFFER firings behind is told how many it
            // missed, as a firing with outcome GAP.
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Ok(pb::Firing {
                    outcome: "GAP".to_owned(),
                    responses: vec![format!("{n} firings missed: this watcher fell behind")],
                    ..pb::Firing::default()
                }))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_rules_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered("agentmesh.rules.v1.Rules", ACCESS);
    }

    #[test]
    fn test_a_rule_survives_the_trip_through_the_proto() {
        let rule = pb::Rule {
            name: "r".into(),
            stimulus: Some(pb::Stimulus {
                subject: "a.>".into(),
                types: vec!["t".into()],
                headers: [("k".to_owned(), "v".to_owned())].into(),
            }),
            condition: "data.x > 1".into(),
            responses: vec![
                pb::Response {
                    name: "p".into(),
                    when: "true".into(),
                    action: Some(pb::response::Action::Publish(pb::PublishAction {
                        subject: "b.${data.x}".into(),
                        ..pb::PublishAction::default()
                    })),
                    ..pb::Response::default()
                },
                pb::Response {
                    name: "t".into(),
                    action: Some(pb::response::Action::SubmitTask(pb::SubmitTaskAction {
                        r#type: "echo".into(),
                        timeout: Some(prost_types::Duration {
                            seconds: 30,
                            nanos: 0,
                        }),
                        max_attempts: 2,
                        ..pb::SubmitTaskAction::default()
                    })),
                    ..pb::Response::default()
                },
            ],
            ..pb::Rule::default()
        };
        let def = decode(rule.clone()).expect("decode");
        assert!(compile(def.clone(), 0).is_ok());
        let back = encode(&Stored { def, version: 3 });
        assert_eq!(back, pb::Rule { version: 3, ..rule });
    }

    #[test]
    fn test_correlation_cascades_and_cancels_round_trip() {
        let stimulus = |subject: &str| pb::Stimulus {
            subject: subject.into(),
            ..pb::Stimulus::default()
        };
        let publish = |subject: &str| {
            Some(pb::response::Action::Publish(pb::PublishAction {
                subject: subject.into(),
                ..pb::PublishAction::default()
            }))
        };
        let rule = pb::Rule {
            name: "r".into(),
            stimulus: Some(stimulus("orders.created")),
            correlation: Some(pb::Correlation {
                key: "data.id".into(),
                window: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                not_followed_by: Some(stimulus("orders.paid")),
                ..pb::Correlation::default()
            }),
            responses: vec![pb::Response {
                name: "remind".into(),
                action: publish("reminders"),
                delay: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                cancel: Some(pb::Cancel {
                    stimulus: Some(stimulus("orders.cancelled")),
                    key: "data.id".into(),
                }),
                then: vec![pb::Response {
                    name: "after".into(),
                    action: publish("after"),
                    ..pb::Response::default()
                }],
                ..pb::Response::default()
            }],
            ..pb::Rule::default()
        };
        let def = decode(rule.clone()).expect("decode");
        let compiled = compile(def.clone(), 0).expect("compiles");
        assert_eq!(
            compiled.entries().len(),
            3,
            "itself, not_followed_by, cancel"
        );
        assert_eq!(
            encode(&Stored { def, version: 1 }),
            pb::Rule { version: 1, ..rule }
        );
    }
}
