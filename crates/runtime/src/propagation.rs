//! W3C trace context carried across processes — in gRPC metadata and in string maps (an
//! event's headers) — and the target of the spans that are exported. The bottom of the
//! runtime's telemetry: `observe`, `message_trace` and `telemetry` build on it.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Target for spans that are exported at DEBUG level without being formatted by the log
/// filter: RPC spans and spans around calls to dependencies (`tracing::debug_span!(target:
/// TRACE_TARGET, …)`).
pub const TRACE_TARGET: &str = "agentmesh_trace";

/// Reads trace context from gRPC metadata.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes trace context into gRPC metadata.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The remote trace context carried by `headers` (empty when there is none).
#[must_use]
pub fn extract_context(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx` into `headers` as `traceparent`/`tracestate`.
pub fn inject_context(cx: &opentelemetry::Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Writes `cx` into a string map (an event's headers) as `traceparent`/`tracestate`.
pub fn inject_into_map(
    cx: &opentelemetry::Context,
    map: &mut std::collections::BTreeMap<String, String>,
) {
    struct MapInjector<'a>(&'a mut std::collections::BTreeMap<String, String>);
    impl Injector for MapInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key.to_owned(), value);
        }
    }
    TraceContextPropagator::new().inject_context(cx, &mut MapInjector(map));
}

/// The trace context carried in a string map (an event's headers); empty when there is none.
#[must_use]
pub fn extract_from_map(
    map: &std::collections::BTreeMap<String, String>,
) -> opentelemetry::Context {
    struct MapExtractor<'a>(&'a std::collections::BTreeMap<String, String>);
    impl opentelemetry::propagation::Extractor for MapExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }
    TraceContextPropagator::new().extract(&MapExtractor(map))
}
