//! The gRPC adapter of `agentmesh.health.v1.HealthAggregator`: decode ([`crate::wire`]), call
//! the [`Aggregator`], encode.

use std::pin::Pin;
use std::sync::Arc;

use agentmesh_proto::health::v1 as pb;
use agentmesh_runtime::error::to_status;
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::aggregator::{Aggregator, WatchStart};
use crate::alerts::Alerting;
use crate::checks::now_ms;
use crate::metrics::HealthMetrics;
use crate::wire::{
    decode_history, decode_maintenance, decode_rule, decode_silence, encode_alert, encode_cluster,
    encode_component, encode_delta, encode_rule, encode_silence, encode_snapshot, encode_state,
    encode_transition,
};
use agentmesh_runtime::audit;
use agentmesh_runtime::auth::{AccessRule, Role, caller};

/// The state-changing RPCs recorded in the audit trail (README "Audit trail"). They act on
/// the whole cluster, so a tenant's token may not call them.
pub const AUDITED: &[&str] = &[
    "SetMaintenance",
    "PutAlertRule",
    "DeleteAlertRule",
    "PutSilence",
    "DeleteSilence",
];

/// Who may call each RPC (admin may call everything); see the README's roles table.
pub const ACCESS: &[AccessRule] = &[
    (
        "GetClusterHealth",
        &[Role::Service, Role::Operator, Role::Agent],
    ),
    ("WatchClusterHealth", &[Role::Service, Role::Operator]),
    ("GetHistory", &[Role::Service, Role::Operator]),
    ("GetDependencyGraph", &[Role::Service, Role::Operator]),
    ("SetMaintenance", &[Role::Operator]),
    ("PutAlertRule", &[Role::Operator]),
    ("DeleteAlertRule", &[Role::Operator]),
    ("ListAlertRules", &[Role::Service, Role::Operator]),
    ("ListAlerts", &[Role::Service, Role::Operator]),
    ("PutSilence", &[Role::Operator]),
    ("DeleteSilence", &[Role::Operator]),
    ("ListSilences", &[Role::Service, Role::Operator]),
];

/// Serves `agentmesh.health.v1.HealthAggregator` over an [`Aggregator`].
#[derive(Clone)]
pub struct HealthGrpc {
    aggregator: Arc<Aggregator>,
    alerting: Arc<Alerting>,
    metrics: HealthMetrics,
    /// Stops the checks when the server drops its last copy of the adapter.
    _checks: Arc<tokio_util::sync::DropGuard>,
}

impl HealthGrpc {
    /// An adapter over `aggregator`.
    #[must_use]
    pub fn new(
        aggregator: Arc<Aggregator>,
        alerting: Arc<Alerting>,
        metrics: HealthMetrics,
        checks: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            aggregator,
            alerting,
            metrics,
            _checks: Arc::new(checks.drop_guard()),
        }
    }

    /// The tonic server for this adapter.
    #[must_use]
    pub fn into_server(self) -> pb::health_aggregator_server::HealthAggregatorServer<Self> {
        pb::health_aggregator_server::HealthAggregatorServer::new(self)
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ClusterHealthUpdate, Status>> + Send>>;

/// Counts an open watch for as long as it lives.
struct WatcherGuard(prometheus::IntGauge);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[tonic::async_trait]
impl pb::health_aggregator_server::HealthAggregator for HealthGrpc {
    async fn get_cluster_health(
        &self,
        request: Request<pb::GetClusterHealthRequest>,
    ) -> Result<Response<pb::ClusterHealth>, Status> {
        let now = now_ms();
        let view = self
            .aggregator
            .snapshot(request.get_ref().omit_instances, now);
        Ok(Response::new(encode_cluster(&view, now)))
    }

    type WatchClusterHealthStream = UpdateStream;

    async fn watch_cluster_health(
        &self,
        request: Request<pb::WatchClusterHealthRequest>,
    ) -> Result<Response<Self::WatchClusterHealthStream>, Status> {
        let r = request.into_inner();
        let omit = r.omit_instances;
        let (start, updates_rx) = self.aggregator.watch(r.after_revision, omit, now_ms());
        let first: Vec<pb::ClusterHealthUpdate> = match start {
            WatchStart::Snapshot(view) => vec![encode_snapshot(&view)],
            WatchStart::Replay(deltas) => deltas.iter().map(|d| encode_delta(d, omit)).collect(),
        };
        self.metrics.watchers.inc();
        let guard = WatcherGuard(self.metrics.watchers.clone());
        let aggregator = self.aggregator.clone();
        let first = futures::stream::iter(first.into_iter().map(Ok));
        let rest = futures::stream::unfold(
            (updates_rx, aggregator, guard),
            move |(mut updates_rx, aggregator, guard)| async move {
                let update = match updates_rx.recv().await {
                    Ok(delta) => encode_delta(&delta, omit),
                    // Fell behind: start over from a snapshot at the current revision.
                    Err(RecvError::Lagged(_)) => {
                        updates_rx = updates_rx.resubscribe();
                        encode_snapshot(&aggregator.snapshot(omit, now_ms()))
                    }
                    Err(RecvError::Closed) => return None,
                };
                Some((Ok(update), (updates_rx, aggregator, guard)))
            },
        );
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            first, rest,
        ))))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let (filter, limit) = decode_history(request.get_ref()).map_err(|e| to_status(&e))?;
        let transitions = self.aggregator.history(&filter, limit);
        Ok(Response::new(pb::GetHistoryResponse {
            transitions: transitions.iter().map(encode_transition).collect(),
        }))
    }

    async fn get_dependency_graph(
        &self,
        _request: Request<pb::GetDependencyGraphRequest>,
    ) -> Result<Response<pb::DependencyGraph>, Status> {
        let (nodes, edges) = self.aggregator.graph();
        Ok(Response::new(pb::DependencyGraph {
            nodes: nodes
                .into_iter()
                .map(|(id, state)| pb::GraphNode {
                    id,
                    state: encode_state(state).into(),
                })
                .collect(),
            edges: edges
                .into_iter()
                .map(|(from, to)| pb::GraphEdge { from, to })
                .collect(),
        }))
    }

    async fn set_maintenance(
        &self,
        request: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::Component>, Status> {
        caller(&request).check_cluster_wide("SetMaintenance")?;
        audit::target(&request).set(|| request.get_ref().component.clone());
        let (component, duration, reason) =
            decode_maintenance(request.get_ref()).map_err(|e| to_status(&e))?;
        let now = now_ms();
        let until = (!duration.is_zero()).then(|| {
            (
                now + u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                reason,
            )
        });
        let view = self
            .aggregator
            .set_maintenance(&component, until, now)
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(encode_component(&view)))
    }

    async fn put_alert_rule(
        &self,
        request: Request<pb::PutAlertRuleRequest>,
    ) -> Result<Response<pb::AlertRule>, Status> {
        caller(&request).check_cluster_wide("PutAlertRule")?;
        audit::target(&request).set(|| {
            request
                .get_ref()
                .rule
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default()
        });
        let rule = decode_rule(request.get_ref()).map_err(|e| to_status(&e))?;
        let answer = encode_rule(&rule);
        self.alerting
            .put_rule(rule)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(answer))
    }

    async fn delete_alert_rule(
        &self,
        request: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        caller(&request).check_cluster_wide("DeleteAlertRule")?;
        audit::target(&request).set(|| request.get_ref().name.clone());
        self.alerting
            .delete_rule(&request.get_ref().name)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::DeleteAlertRuleResponse {}))
    }

    async fn list_alert_rules(
        &self,
        _request: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        let rules = self.alerting.rules().iter().map(encode_rule).collect();
        Ok(Response::new(pb::ListAlertRulesResponse { rules }))
    }

    async fn list_alerts(
        &self,
        _request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let alerts = self
            .alerting
            .alerts(now_ms())
            .iter()
            .map(encode_alert)
            .collect();
        Ok(Response::new(pb::ListAlertsResponse { alerts }))
    }

    async fn put_silence(
        &self,
        request: Request<pb::PutSilenceRequest>,
    ) -> Result<Response<pb::Silence>, Status> {
        caller(&request).check_cluster_wide("PutSilence")?;
        audit::target(&request).set(|| request.get_ref().rule.clone());
        let (rule, duration, reason) =
            decode_silence(request.get_ref()).map_err(|e| to_status(&e))?;
        let now = now_ms();
        let until = now + u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let silence = self
            .alerting
            .put_silence(&rule, until, &reason, now)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(encode_silence(&silence)))
    }

    async fn delete_silence(
        &self,
        request: Request<pb::DeleteSilenceRequest>,
    ) -> Result<Response<pb::DeleteSilenceResponse>, Status> {
        caller(&request).check_cluster_wide("DeleteSilence")?;
        audit::target(&request).set(|| request.get_ref().id.clone());
        self.alerting
            .delete_silence(&request.get_ref().id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::DeleteSilenceResponse {}))
    }

    async fn list_silences(
        &self,
        _request: Request<pb::ListSilencesRequest>,
    ) -> Result<Response<pb::ListSilencesResponse>, Status> {
        let silences = self
            .alerting
            .silences(now_ms())
            .iter()
            .map(encode_silence)
            .collect();
        Ok(Response::new(pb::ListSilencesResponse { silences }))
    }
}

#[cfg(test)]
mod access_tests {
    #[test]
    fn test_every_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered(
            "agentmesh.health.v1.HealthAggregator",
            super::ACCESS,
        );
    }
}
