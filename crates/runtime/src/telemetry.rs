//! Logs and traces: a tracing-subscriber pipeline (text or JSON) plus an OpenTelemetry tracer.
//!
//! Spans always get real trace and span ids, so trace context propagates through a node even
//! when it exports nothing; spans are exported over OTLP/gRPC only when an endpoint is
//! configured. The OpenTelemetry layer has its own filter so h2/hyper/tower internals never
//! reach the exporter (they would add over a hundred spans per RPC).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::{Arc, OnceLock};

use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, TelemetryArgs};

pub use crate::propagation::TRACE_TARGET;

/// How long shutdown waits for the exporter to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors while setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("AGENTMESH_LOG/--log-filter {filter:?} is invalid: {reason}")]
    Filter { filter: String, reason: String },
    /// The OTLP exporter could not be built.
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {reason} (write it as http://host:4317)")]
    Exporter { endpoint: String, reason: String },
    /// A global subscriber was already installed.
    #[error("telemetry already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Keeps the tracer provider alive; call [`TelemetryGuard::shutdown`] to flush at exit.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes and stops the exporter, waiting at most five seconds. Runs on a blocking
    /// thread: provider shutdown has been seen to hang when called on a tokio worker.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "telemetry flush failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "telemetry flush task failed"),
            Err(_) => tracing::warn!("telemetry flush timed out"),
        }
    }
}

/// Targets kept out of the trace export: transport internals and the exporter itself.
fn otel_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        // RPC spans are DEBUG so the log filter (default info) does not format them for every
        // call; they are always exported.
        .with_target(TRACE_TARGET, LevelFilter::DEBUG)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
        .with_target("etcd_client", LevelFilter::OFF)
}

/// Builds the tracer provider: OTLP batch export when an endpoint is set, otherwise none
/// (spans still carry ids for propagation). Must be called inside a tokio runtime.
///
/// # Errors
/// Fails when the exporter cannot be built from the endpoint.
pub fn tracer_provider(args: &TelemetryArgs) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(args.otel_service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Installs the global subscriber: logs to stderr (text or JSON) and spans to OpenTelemetry.
///
/// # Errors
/// Fails on an invalid filter, an unusable OTLP endpoint, or a second initialisation.
pub fn init(args: &TelemetryArgs) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::builder()
            .parse(&args.log_filter)
            .map_err(|e| TelemetryError::Filter {
                filter: args.log_filter.clone(),
                reason: e.to_string(),
            })?;
    let provider = tracer_provider(args)?;
    let tracer = provider.tracer("agentmesh");
    if args.otlp_endpoint.as_deref().is_some_and(|e| !e.is_empty()) {
        crate::message_trace::export_through(tracer.clone());
    }
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter());
    let cell = DispatchCell::default();
    let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(WithTraceId {
                inner: tracing_subscriber::fmt::format(),
                json: false,
                dispatch: cell.clone(),
            })
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(WithTraceId {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
                json: true,
                dispatch: cell.clone(),
            })
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let dispatch = Dispatch::new(
        tracing_subscriber::registry()
            .with(fmt_layer.with_filter(filter))
            .with(otel_layer),
    );
    let _ = cell.set(dispatch.downgrade());
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// Adds the current OpenTelemetry trace id to every log line written inside a span:
/// `"trace_id":"…"` as the first JSON field, or ` trace_id=…` at the end of a text line.
/// The id is looked up only when a line is written, so RPCs that log nothing pay nothing.
struct WithTraceId<F> {
    inner: F,
    json: bool,
    /// The dispatcher this formatter runs in, to look up the current span's trace context
    /// (a subscriber cannot reach its dispatcher through `tracing`'s thread-local while it is
    /// handling an event).
    dispatch: DispatchCell,
}

/// Set once the subscriber has become a dispatcher.
type DispatchCell = Arc<OnceLock<WeakDispatch>>;

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(trace_id) = self
            .dispatch
            .get()
            .and_then(WeakDispatch::upgrade)
            .and_then(|d| current_trace_id(&d))
        else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        match (self.json, body.strip_prefix('{')) {
            (true, Some(rest)) => writeln!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}"),
            _ => writeln!(writer, "{body} trace_id={trace_id}"),
        }
    }
}

/// The trace id of `dispatch`'s current span, if it is traced.
fn current_trace_id(dispatch: &Dispatch) -> Option<opentelemetry::trace::TraceId> {
    use opentelemetry::trace::TraceContextExt;
    let current = dispatch.current_span();
    let cx = tracing_opentelemetry::get_otel_context(current.id()?, dispatch)?;
    let trace_id = cx.span().span_context().trace_id();
    (trace_id != opentelemetry::trace::TraceId::INVALID).then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_inside_a_span(json: bool) -> (String, String) {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let make_writer = move || writer.clone();
        let cell = DispatchCell::default();
        let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
            tracing_subscriber::fmt::layer()
                .event_format(WithTraceId {
                    inner: tracing_subscriber::fmt::format().json(),
                    json: true,
                    dispatch: cell.clone(),
                })
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .with_writer(make_writer)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .event_format(WithTraceId {
                    inner: tracing_subscriber::fmt::format(),
                    json: false,
                    dispatch: cell.clone(),
                })
                .with_writer(make_writer)
                .with_ansi(false)
                .boxed()
        };
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(fmt).with(otel));
        let _ = cell.set(dispatch.downgrade());
        let trace_id = tracing::dispatcher::with_default(&dispatch, || {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            tracing::info!("outside any span");
            let span = tracing::info_span!("rpc");
            let _entered = span.enter();
            tracing::warn!(instance = "a", "inside the span");
            span.context().span().span_context().trace_id().to_string()
        });
        let out = String::from_utf8(buffer.0.lock().clone()).unwrap();
        (out, trace_id)
    }

    #[test]
    fn test_text_lines_inside_a_span_end_with_the_trace_id() {
        let (out, trace_id) = log_inside_a_span(false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(!lines[0].contains("trace_id"), "{out}");
        assert!(
            lines[1].ends_with(&format!(" trace_id={trace_id}")),
            "{out}"
        );
    }

    #[test]
    fn test_json_lines_inside_a_span_carry_the_trace_id_field() {
        let (out, trace_id) = log_inside_a_span(true);
        let line: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
        assert_eq!(line["trace_id"], trace_id.as_str());
        assert_eq!(line["fields"]["message"], "inside the span");
        let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert!(first.get("trace_id").is_none());
    }
}
