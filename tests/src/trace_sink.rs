//! A trace sink: an OTLP/gRPC trace receiver that keeps the most recent spans in memory and
//! answers Jaeger's query API for them (`GET /api/traces/<trace id>` and `GET /api/services`,
//! in Jaeger's JSON shape). It stands in for Jaeger where Jaeger cannot run: in the end-to-end
//! tests (`meshctl doctor --jaeger-url`) and in the compose test on machines that reach no
//! container registry (the `trace-sink` binary; Debian packages no Jaeger).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One received span and the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

/// The spans received, newest last, at most `capacity` of them (the oldest are dropped).
#[derive(Clone)]
pub struct TraceSink {
    spans: Arc<Mutex<VecDeque<Received>>>,
    capacity: usize,
}

impl TraceSink {
    pub fn new(capacity: usize) -> Self {
        Self {
            spans: Arc::new(Mutex::new(VecDeque::new())),
            capacity: capacity.max(1),
        }
    }

    /// Every span held, oldest first.
    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().iter().cloned().collect()
    }

    /// The OTLP/gRPC trace service that fills this sink.
    pub fn otlp_service(&self) -> TraceServiceServer<Self> {
        TraceServiceServer::new(self.clone())
    }

    /// Serves OTLP/gRPC on `listener` until the task is dropped.
    pub async fn serve_otlp(self, listener: TcpListener) -> anyhow::Result<()> {
        tonic::transport::Server::builder()
            .add_service(self.otlp_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await?;
        Ok(())
    }

    /// Serves Jaeger's query API on `listener` (HTTP/1.1, one request per connection).
    pub async fn serve_query(self, listener: TcpListener) {
        while let Ok((mut socket, _)) = listener.accept().await {
            let sink = self.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split_whitespace().nth(1).unwrap_or("");
                // Origin or absolute form (`http://host/api/…`), as HTTP/1.1 allows.
                let target = target.find("/api/").map_or(target, |at| &target[at..]);
                let (status, body) = sink.answer(target);
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    }

    /// The answer to `GET target`: a status line and a JSON body.
    fn answer(&self, target: &str) -> (&'static str, String) {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path == "/api/traces" {
            // Search, as Jaeger's: the newest traces holding a span of `service` (`limit`, 20).
            let param = |name: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or("")
            };
            let service = param("service");
            let limit: usize = param("limit").parse().unwrap_or(20);
            let mut ids: Vec<String> = Vec::new();
            for r in self.spans.lock().iter().rev() {
                let id = hex(&r.span.trace_id);
                if r.service == service && !ids.contains(&id) && ids.len() < limit {
                    ids.push(id);
                }
            }
            let traces: Vec<Json> = ids.iter().map(|id| self.trace(id)).collect();
            return ("200 OK", json!({ "data": traces }).to_string());
        }
        if path == "/api/services" {
            let services: BTreeSet<String> = self
                .spans
                .lock()
                .iter()
                .map(|r| r.service.clone())
                .collect();
            return ("200 OK", json!({ "data": services }).to_string());
        }
        if let Some(id) = path.strip_prefix("/api/traces/") {
            let trace = self.trace(id);
            if trace["spans"].as_array().is_some_and(|s| !s.is_empty()) {
                return ("200 OK", json!({ "data": [trace] }).to_string());
            }
            return (
                "404 Not Found",
                json!({"data": null, "errors": [{"code": 404, "msg": "trace not found"}]})
                    .to_string(),
            );
        }
        if path == "/" || path == "/healthz" {
            return ("200 OK", "{}".to_owned());
        }
        (
            "404 Not Found",
            json!({"errors": [{"code": 404}]}).to_string(),
        )
    }

    /// One trace in Jaeger's shape: `traceID`, `spans[]` (`spanID`, `operationName`,
    /// `references`, `processID`, `tags[]`) and `processes` (`serviceName` per process id).
    pub fn trace(&self, id: &str) -> Json {
        let id = id.to_ascii_lowercase();
        let mut processes: BTreeMap<String, String> = BTreeMap::new();
        let spans: Vec<Json> = self
            .spans
            .lock()
            .iter()
            .filter(|r| hex(&r.span.trace_id) == id)
            .map(|r| {
                let next = format!("p{}", processes.len() + 1);
                let process = processes
                    .iter()
                    .find(|(_, service)| **service == r.service)
                    .map(|(pid, _)| pid.clone())
                    .unwrap_or_else(|| {
                        processes.insert(next.clone(), r.service.clone());
                        next
                    });
                let tags: Vec<Json> = r
                    .span
                    .attributes
                    .iter()
                    .filter_map(|kv| Some(json!({"key": kv.key, "value": plain(kv.value.as_ref()?)?})))
                    .collect();
                let references: Vec<Json> = if r.span.parent_span_id.is_empty() {
                    Vec::new()
                } else {
                    vec![json!({
                        "refType": "CHILD_OF",
                        "traceID": id,
                        "spanID": hex(&r.span.parent_span_id),
                    })]
                };
                json!({
                    "traceID": id,
                    "spanID": hex(&r.span.span_id),
                    "operationName": r.span.name,
                    "references": references,
                    "startTime": r.span.start_time_unix_nano / 1000,
                    "duration": r.span.end_time_unix_nano.saturating_sub(r.span.start_time_unix_nano) / 1000,
                    "processID": process,
                    "tags": tags,
                })
            })
            .collect();
        let processes: serde_json::Map<String, Json> = processes
            .into_iter()
            .map(|(pid, service)| (pid, json!({"serviceName": service, "tags": []})))
            .collect();
        json!({"traceID": id, "spans": spans, "processes": processes})
    }
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| plain(kv.value.as_ref()?))
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned());
            for scope in resource.scope_spans {
                for span in scope.spans {
                    if spans.len() == self.capacity {
                        spans.pop_front();
                    }
                    spans.push_back(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A string, integer, float or boolean attribute value as JSON; other kinds are left out.
fn plain(value: &AnyValue) -> Option<Json> {
    match value.value.as_ref()? {
        Value::StringValue(v) => Some(json!(v)),
        Value::IntValue(v) => Some(json!(v)),
        Value::DoubleValue(v) => Some(json!(v)),
        Value::BoolValue(v) => Some(json!(v)),
        _ => None,
    }
}

/// Lower-case hex of an id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    fn string(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(value.into())),
            }),
            ..KeyValue::default()
        }
    }

    fn batch(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![string("service.name", service)],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    fn span(trace: u8, id: u8, parent: Option<u8>, name: &str) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.into(),
            attributes: vec![string("rpc.service", name)],
            ..Span::default()
        }
    }

    #[tokio::test]
    async fn test_a_trace_comes_back_in_jaegers_shape_with_its_processes() {
        let sink = TraceSink::new(3);
        for (service, spans) in [
            (
                "agentmesh-a",
                vec![span(1, 1, None, "A"), span(2, 9, None, "X")],
            ),
            ("agentmesh-b", vec![span(1, 2, Some(1), "B")]),
        ] {
            sink.export(tonic::Request::new(batch(service, spans)))
                .await
                .expect("export");
        }
        let trace = sink.trace(&hex(&[1; 16]));
        let spans = trace["spans"].as_array().expect("spans");
        assert_eq!(spans.len(), 2, "{trace}");
        assert_eq!(spans[1]["references"][0]["spanID"], hex(&[1; 8]));
        assert_eq!(spans[1]["tags"][0]["value"], "B");
        let pid = spans[1]["processID"].as_str().expect("pid");
        assert_eq!(trace["processes"][pid]["serviceName"], "agentmesh-b");
        let (status, body) = sink.answer(&format!("/api/traces/{}", hex(&[7; 16])));
        assert!(status.starts_with("404"), "{body}");
        let (_, body) = sink.answer("/api/services");
        assert_eq!(body, r#"{"data":["agentmesh-a","agentmesh-b"]}"#);
        let (_, body) = sink.answer("/api/traces?service=agentmesh-b&limit=5");
        let found: Json = serde_json::from_str(&body).expect("json");
        assert_eq!(found["data"].as_array().map(Vec::len), Some(1), "{body}");
        assert_eq!(found["data"][0]["traceID"], hex(&[1; 16]));
        // At most three spans: a fourth drops the oldest.
        sink.export(tonic::Request::new(batch(
            "agentmesh-c",
            vec![span(3, 3, None, "C")],
        )))
        .await
        .expect("export");
        assert_eq!(sink.spans().len(), 3);
        assert_eq!(sink.spans()[0].span.name, "X");
    }
}
