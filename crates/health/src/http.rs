//! The aggregator's HTTP endpoints on its admin port: `/health` (200 when the cluster is UP,
//! DEGRADED or in MAINTENANCE, 503 otherwise), `/health/components`, `/health/history`,
//! `/optimizations` and the status page at `/` (one HTML file compiled into the binary; it
//! loads nothing from outside).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::aggregator::{Aggregator, ComponentView, Transition};
use crate::checks::now_ms;
use crate::checks::optimizations::Optimizations;
use crate::config::MAX_HISTORY_LIMIT;
use crate::model::State;

/// The status page.
const STATUS_PAGE: &str = include_str!("status_page.html");

#[derive(Clone)]
struct HttpState {
    aggregator: Arc<Aggregator>,
    optimizations: Arc<Optimizations>,
}

/// The routes, to merge into the admin router.
pub fn routes(aggregator: Arc<Aggregator>, optimizations: Arc<Optimizations>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/health/components", get(components))
        .route("/health/history", get(history))
        .route("/optimizations", get(optimizations_handler))
        .with_state(HttpState {
            aggregator,
            optimizations,
        })
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        STATUS_PAGE,
    )
}

/// One component as JSON (the same fields as the proto's `Component`, times in ms).
#[must_use]
pub fn component_json(c: &ComponentView) -> Value {
    let member = c.member.as_ref();
    json!({
        "id": c.id,
        "kind": c.kind.as_str(),
        "name": c.name,
        "state": c.state.as_str(),
        "computed_state": c.computed.as_str(),
        "since_ms": c.since_ms,
        "cause": c.cause,
        "detail": c.detail,
        "service": c.service,
        "grpc_addr": member.map(|m| m.grpc_addr.as_str()),
        "admin_addr": member.map(|m| m.admin_addr.as_str()),
        "version": member.map(|m| m.version.as_str()),
        "zone": member.map(|m| m.zone.as_str()),
        "instances_total": c.instances_total,
        "instances_up": c.instances_up,
        "uptime_1h": c.uptime[0],
        "uptime_24h": c.uptime[1],
        "uptime_7d": c.uptime[2],
        "uptime_hours": c.uptime_hours,
        "latency_p50_ms": c.latency.map(|(p50, _)| p50.as_secs_f64() * 1000.0),
        "latency_p99_ms": c.latency.map(|(_, p99)| p99.as_secs_f64() * 1000.0),
        "maintenance_until_ms": c.maintenance.as_ref().map(|(until, _)| until),
        "maintenance_reason": c.maintenance.as_ref().map(|(_, reason)| reason),
    })
}

fn transition_json(t: &Transition) -> Value {
    json!({
        "component": t.component,
        "from": t.from.as_str(),
        "to": t.to.as_str(),
        "cause": t.cause,
        "at_ms": t.at_ms,
        "revision": t.revision,
    })
}

async fn health(AxumState(state): AxumState<HttpState>) -> Response {
    let view = state.aggregator.snapshot(true, now_ms());
    let code = if matches!(view.state, State::Up | State::Degraded | State::Maintenance) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": view.state.as_str(),
        "summary": view.summary,
        "revision": view.revision,
        "components": view.components.iter().skip(1).map(|c| (c.id.clone(), json!({
            "status": c.state.as_str(),
            "cause": c.cause,
        }))).collect::<serde_json::Map<_, _>>(),
    });
    json_response(code, &body)
}

async fn components(AxumState(state): AxumState<HttpState>) -> Response {
    let now = now_ms();
    let view = state.aggregator.snapshot(false, now);
    let body = json!({
        "status": view.state.as_str(),
        "summary": view.summary,
        "revision": view.revision,
        "at_ms": now,
        "components": view.components.iter().map(component_json).collect::<Vec<_>>(),
    });
    json_response(StatusCode::OK, &body)
}

async fn history(
    AxumState(state): AxumState<HttpState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let filter = query.get("component").cloned().unwrap_or_default();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .min(MAX_HISTORY_LIMIT);
    let transitions = state.aggregator.history(&filter, limit);
    let body = json!({
        "transitions": transitions.iter().map(transition_json).collect::<Vec<_>>(),
    });
    json_response(StatusCode::OK, &body)
}

async fn optimizations_handler(AxumState(state): AxumState<HttpState>) -> Response {
    json_response(StatusCode::OK, &state.optimizations.json())
}
