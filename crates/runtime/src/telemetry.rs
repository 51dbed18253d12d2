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
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, TelemetryArgs};

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
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter());
    let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}
