//! Trace context for messages (events) that travel through a broker: a producer span when a
//! message is accepted, a consumer span when it is delivered, W3C `traceparent`/`tracestate`
//! carried in the message's own headers.
//!
//! These spans are made with the OpenTelemetry API directly rather than through `tracing`:
//! a broker opens two of them per message, hundreds of thousands a second, and a `tracing`
//! span costs a registry slot, field formatting and a second span builder in the
//! OpenTelemetry layer. When no exporter is configured ([`crate::telemetry::init`] without an
//! OTLP endpoint) no span is built at all: a message without a `traceparent` still gets one
//! (the caller's trace id, or a new one, with a fresh span id) so the trace continues in
//! services that do export, and a message that has one keeps it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceId, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer};

use crate::propagation::{extract_from_map, inject_into_map};

/// The tracer message spans are exported through; set once by telemetry init when an OTLP
/// endpoint is configured.
static EXPORTING: OnceLock<SdkTracer> = OnceLock::new();

/// Makes message spans real and exported through `tracer` (called by telemetry init when it
/// installs an exporter). Later calls are ignored.
pub fn export_through(tracer: SdkTracer) {
    let _ = EXPORTING.set(tracer);
}

/// A producer or consumer span in progress; ends when dropped. Empty when nothing is
/// exported.
#[must_use = "the span ends when this is dropped"]
pub struct MessageSpan(Option<opentelemetry_sdk::trace::Span>);

impl MessageSpan {
    /// The span's context (invalid when nothing is exported).
    #[must_use]
    pub fn span_context(&self) -> SpanContext {
        self.0
            .as_ref()
            .map_or_else(SpanContext::empty_context, |s| s.span_context().clone())
    }
}

impl Drop for MessageSpan {
    fn drop(&mut self) {
        if let Some(span) = self.0.as_mut() {
            span.end();
        }
    }
}

impl std::fmt::Debug for MessageSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MessageSpan")
            .field(&self.span_context())
            .finish()
    }
}

/// Opens the producer span of a message published to `destination` and writes its context
/// into `headers`.
///
/// The parent is the `traceparent` already in the headers (the publishing client's own span)
/// or else `rpc` (the context of the call that carried the message; `None` for a stream of
/// independent messages, each then a trace of its own).
pub fn producer(
    headers: &mut BTreeMap<String, String>,
    destination: &str,
    rpc: Option<&Context>,
) -> MessageSpan {
    let Some(tracer) = EXPORTING.get() else {
        if !headers.contains_key("traceparent") {
            let parent = rpc.map(|cx| cx.span().span_context().clone());
            write_child_of(parent.as_ref(), headers);
        }
        return MessageSpan(None);
    };
    let parent = if headers.contains_key("traceparent") {
        extract_from_map(headers)
    } else {
        rpc.cloned().unwrap_or_default()
    };
    let span = tracer
        .span_builder("publish")
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "agentmesh"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", destination.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    let cx = Context::new().with_remote_span_context(span.span_context().clone());
    inject_into_map(&cx, headers);
    MessageSpan(Some(span))
}

/// Opens the consumer span of a delivery of message `id` from `destination`; its parent is
/// the `traceparent` in the message's headers (the producer span). Nothing when not exporting.
pub fn consumer(headers: &BTreeMap<String, String>, destination: &str, id: &str) -> MessageSpan {
    let Some(tracer) = EXPORTING.get() else {
        return MessageSpan(None);
    };
    let parent = extract_from_map(headers);
    let span = tracer
        .span_builder("deliver")
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "agentmesh"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", destination.to_owned()),
            KeyValue::new("messaging.message.id", id.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    MessageSpan(Some(span))
}

/// Writes a `traceparent` for a new span id under `parent` (or in a new trace), keeping the
/// parent's sampled flag and trace state.
fn write_child_of(parent: Option<&SpanContext>, headers: &mut BTreeMap<String, String>) {
    thread_local! {
        static IDS: RandomIdGenerator = RandomIdGenerator::default();
    }
    let parent = parent.filter(|p| p.is_valid());
    let (trace_id, span_id) = IDS.with(|ids| {
        let trace_id = parent.map_or_else(|| ids.new_trace_id(), SpanContext::trace_id);
        (trace_id, ids.new_span_id())
    });
    let (flags, state) = match parent {
        Some(p) => (p.trace_flags(), p.trace_state().header()),
        None => (TraceFlags::SAMPLED, String::new()),
    };
    headers.insert(
        "traceparent".to_owned(),
        traceparent(trace_id, span_id, flags),
    );
    if !state.is_empty() {
        headers.insert("tracestate".to_owned(), state);
    }
}

/// `00-<trace id>-<span id>-<flags>` without going through `format!`.
fn traceparent(
    trace_id: TraceId,
    span_id: opentelemetry::trace::SpanId,
    flags: TraceFlags,
) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    for b in trace_id.to_bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out.push('-');
    for b in span_id.to_bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out.push('-');
    let f = flags.to_u8();
    out.push(char::from(HEX[usize::from(f >> 4)]));
    out.push(char::from(HEX[usize::from(f & 0xf)]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceState;

    #[test]
    fn test_a_message_without_trace_context_gets_a_valid_traceparent() {
        let mut headers = BTreeMap::new();
        let _span = producer(&mut headers, "orders.created", None);
        let cx = extract_from_map(&headers);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid(), "{headers:?}");
        assert!(sc.is_sampled());
        assert_eq!(headers["traceparent"].len(), 55);
    }

    #[test]
    fn test_a_message_continues_the_calls_trace_and_keeps_its_own() {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let parent = SpanContext::new(
            trace_id,
            opentelemetry::trace::SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let rpc = Context::new().with_remote_span_context(parent);
        let mut headers = BTreeMap::new();
        let _span = producer(&mut headers, "orders.created", Some(&rpc));
        let sc = extract_from_map(&headers).span().span_context().clone();
        assert_eq!(sc.trace_id(), trace_id, "{headers:?}");
        assert_ne!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(headers["tracestate"], "vendor=x");

        let mut own = BTreeMap::from([(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )]);
        let _span = producer(&mut own, "orders.created", Some(&rpc));
        assert_eq!(
            own["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "the client's own producer span stays the parent"
        );
        assert!(consumer(&own, "orders.created", "id-1").0.is_none());
    }
}
