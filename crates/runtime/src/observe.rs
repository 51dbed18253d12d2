//! Tower layers that give every gRPC call a span and a RED measurement.
//!
//! - [`ServerTelemetryLayer`] extracts W3C `traceparent`/`tracestate` from request metadata,
//!   opens one span per RPC (named by the full method, recording the gRPC status) whose parent
//!   is the caller's span, and observes `rpc_server_call_duration_seconds` when the response
//!   stream ends (so streaming calls are measured to their end).
//! - [`ClientTelemetryLayer`] opens a client span under the current span, injects its context
//!   into the request metadata, and observes `rpc_client_call_duration_seconds`.
//!
//! RPC spans are DEBUG level: the OpenTelemetry layer's own filter always takes them, while the
//! log filter (default `info`) does not pay to format their fields on every call; log lines
//! written inside them still carry the `trace_id`.
//!
//! The status is read from the response headers (trailers-only responses, which is how
//! errors are sent) or from the trailers at the end of the body. Health checks and reflection
//! are measured but not traced, so probes do not flood the trace store.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prometheus::HistogramVec;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::Metrics;

pub use crate::propagation::{extract_context, extract_from_map, inject_context, inject_into_map};

/// The canonical name of a gRPC status code number, as used in metric labels.
#[must_use]
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

const CODE_UNKNOWN: i32 = 2;
const CODE_CANCELLED: i32 = 1;
const CODE_UNIMPLEMENTED: i32 = 12;

/// The `grpc-status` in a header or trailer map, if present.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Which side of the call is observed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// Whether a status marks the span as an error (OpenTelemetry gRPC conventions: on the server
/// only codes that signal a server fault; on the client every non-OK code).
fn is_span_error(side: Side, code: i32) -> bool {
    match side {
        Side::Client => code != 0,
        Side::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
    }
}

/// `(service, method)` of a gRPC path `/pkg.Service/Method`.
fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// Services that are measured but not traced.
fn is_untraced(service: &str) -> bool {
    service == "grpc.health.v1.Health" || service.starts_with("grpc.reflection.")
}

/// One call in flight: finishes exactly once, with the status, when the response ends; a call
/// dropped before that (client went away) finishes as CANCELLED.
struct Observation {
    span: Span,
    start: Instant,
    service: String,
    method: String,
    side: Side,
    histogram: HistogramVec,
    finished: bool,
}

impl Observation {
    fn finish(&mut self, code: i32) {
        if self.finished {
            return;
        }
        self.finished = true;
        let method = if code == CODE_UNIMPLEMENTED {
            "unknown"
        } else {
            self.method.as_str()
        };
        self.histogram
            .with_label_values(&[self.service.as_str(), method, code_name(code)])
            .observe(self.start.elapsed().as_secs_f64());
        self.span.record("rpc.grpc.status_code", code);
        if is_span_error(self.side, code) {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        self.finish(CODE_CANCELLED);
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its call's observation at the trailers.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        observation: Option<Observation>,
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        if let Some(mut observation) = this.observation.take() {
            match &polled {
                Some(Ok(frame)) => match frame.trailers_ref() {
                    Some(trailers) => {
                        observation.finish(grpc_status(trailers).unwrap_or(CODE_UNKNOWN));
                    }
                    None => *this.observation = Some(observation),
                },
                Some(Err(_)) => observation.finish(CODE_CANCELLED),
                None => observation.finish(CODE_UNKNOWN),
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The response future of an observed call.
    pub struct ObservedFuture<F> {
        #[pin]
        inner: F,
        observation: Option<Observation>,
    }
}

impl<F, B, E> Future for ObservedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ObservedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.observation.as_ref().map(|o| o.span.enter());
            ready!(this.inner.poll(cx))
        };
        let mut observation = this.observation.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let (Some(code), Some(o)) =
                    (grpc_status(response.headers()), observation.as_mut())
                {
                    o.finish(code);
                    observation = None;
                }
                Ok(response.map(|inner| ObservedBody { inner, observation }))
            }
            Err(e) => {
                if let Some(mut o) = observation {
                    o.finish(CODE_UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

struct ServerShared {
    histogram: HistogramVec,
    known_services: HashSet<String>,
}

/// Server-side tracing and RED metrics for every RPC; see the module docs.
#[derive(Clone)]
pub struct ServerTelemetryLayer {
    shared: Arc<ServerShared>,
}

impl ServerTelemetryLayer {
    /// `known_services` bounds the metric labels: calls to any other service are labelled
    /// `unknown`, so a caller cannot create label values.
    #[must_use]
    pub fn new(metrics: &Metrics, known_services: impl IntoIterator<Item = String>) -> Self {
        Self {
            shared: Arc::new(ServerShared {
                histogram: metrics.rpc_server_duration.clone(),
                known_services: known_services.into_iter().collect(),
            }),
        }
    }
}

impl<S> Layer<S> for ServerTelemetryLayer {
    type Service = ServerTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTelemetry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`ServerTelemetryLayer`].
#[derive(Clone)]
pub struct ServerTelemetry<S> {
    inner: S,
    shared: Arc<ServerShared>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ServerTelemetry<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        let (service, method) = if self.shared.known_services.contains(service) {
            (service.to_owned(), method.to_owned())
        } else {
            ("unknown".to_owned(), "unknown".to_owned())
        };
        let span = if is_untraced(&service) {
            Span::none()
        } else {
            let span = tracing::debug_span!(
                target: crate::propagation::TRACE_TARGET,
                "grpc.server",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            );
            // The parent must be set before the span is first entered.
            let _ = span.set_parent(extract_context(req.headers()));
            span
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let observation = Observation {
            span,
            start: Instant::now(),
            service,
            method,
            side: Side::Server,
            histogram: self.shared.histogram.clone(),
            finished: false,
        };
        ObservedFuture {
            inner,
            observation: Some(observation),
        }
    }
}

/// Client-side tracing and RED metrics: a client span per call whose context is injected
/// into the request metadata.
#[derive(Clone)]
pub struct ClientTelemetryLayer {
    histogram: HistogramVec,
    authorization: Option<http::HeaderValue>,
}

impl ClientTelemetryLayer {
    /// Observes into `metrics`' `rpc_client_call_duration_seconds`.
    #[must_use]
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            histogram: metrics.rpc_client_duration.clone(),
            authorization: None,
        }
    }

    /// Also sends `authorization: Bearer <token>` on every call (the process's own
    /// credentials, for clusters run with `--auth required`). A token that is not a valid
    /// header value is not sent.
    #[must_use]
    pub fn with_bearer(mut self, token: Option<&str>) -> Self {
        self.authorization = token
            .and_then(|t| http::HeaderValue::try_from(format!("Bearer {t}")).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        self
    }
}

impl<S> Layer<S> for ClientTelemetryLayer {
    type Service = ClientTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTelemetry {
            inner,
            histogram: self.histogram.clone(),
            authorization: self.authorization.clone(),
        }
    }
}

/// The service made by [`ClientTelemetryLayer`].
#[derive(Clone)]
pub struct ClientTelemetry<S> {
    inner: S,
    histogram: HistogramVec,
    authorization: Option<http::HeaderValue>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ClientTelemetry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTelemetry")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ClientTelemetry<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        if let Some(authorization) = &self.authorization
            && !req.headers().contains_key(http::header::AUTHORIZATION)
        {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, authorization.clone());
        }
        let (service, method) = split_path(req.uri().path());
        let (service, method) = (service.to_owned(), method.to_owned());
        let span = if is_untraced(&service) {
            Span::none()
        } else {
            let span = tracing::debug_span!(
                target: crate::propagation::TRACE_TARGET,
                "grpc.client",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            );
            inject_context(&span.context(), req.headers_mut());
            span
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let observation = Observation {
            span,
            start: Instant::now(),
            service,
            method,
            side: Side::Client,
            histogram: self.histogram.clone(),
            finished: false,
        };
        ObservedFuture {
            inner,
            observation: Some(observation),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn test_split_path_reads_service_and_method() {
        assert_eq!(
            split_path("/agentmesh.ratelimit.v1.RateLimiter/Check"),
            ("agentmesh.ratelimit.v1.RateLimiter", "Check")
        );
        assert_eq!(split_path("/odd"), ("odd", ""));
    }

    #[test]
    fn test_server_errors_follow_otel_conventions() {
        assert!(!is_span_error(Side::Server, 3));
        assert!(is_span_error(Side::Server, 13));
        assert!(is_span_error(Side::Client, 3));
        assert_eq!(code_name(8), "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn test_trace_context_round_trips_through_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let cx = extract_context(&headers);
        let mut out = HeaderMap::new();
        inject_context(&cx, &mut out);
        assert_eq!(out.get("traceparent"), headers.get("traceparent"));
    }
}
