//! Spans leave a real `agentmesh` process over OTLP/gRPC: an OTLP trace receiver inside the test
//! collects what the process exports, and the server span continues the caller's trace.

use std::time::Duration;

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::trace_sink::{TraceSink, hex};
use agentmesh_tests::wait_until;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

struct Receiver {
    spans_tx: mpsc::UnboundedSender<Span>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.spans_tx.send(span);
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn test_server_spans_are_exported_over_otlp_and_continue_the_callers_trace()
-> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (spans_tx, mut spans_rx) = mpsc::unbounded_channel();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { spans_tx }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let mut process = AgentmeshProcess::dev_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "agentmesh-otlp-test"),
    ])
    .await?;
    let mut client = pb::rate_limiter_client::RateLimiterClient::connect(format!(
        "http://{}",
        process.grpc_addr
    ))
    .await?;
    let mut request = Request::new(pb::CheckRequest {
        items: vec![pb::CheckItem {
            namespace: "otlp".into(),
            key: "k".into(),
            cost: 1,
            ..Default::default()
        }],
        all_or_nothing: false,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse()?,
    );
    client.check(request).await?;

    // Shutdown flushes the batch exporter.
    process.sigterm();
    process.wait_exit(Duration::from_secs(15)).await?;

    let mut spans = Vec::new();
    wait_until(
        Duration::from_secs(10),
        "the Check span at the OTLP receiver",
        || {
            while let Ok(span) = spans_rx.try_recv() {
                spans.push(span);
            }
            let found = spans
                .iter()
                .any(|s| s.name == "agentmesh.ratelimit.v1.RateLimiter/Check");
            async move { found }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", process.logs()))?;
    let span = spans
        .iter()
        .find(|s| s.name == "agentmesh.ratelimit.v1.RateLimiter/Check")
        .expect("found above");
    assert_eq!(
        hex(&span.trace_id),
        TRACE_ID,
        "continues the caller's trace"
    );
    assert_eq!(
        hex(&span.parent_span_id),
        PARENT_SPAN_ID,
        "child of the caller's span"
    );
    assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
    assert!(
        span.attributes
            .iter()
            .any(|kv| kv.key == "rpc.grpc.status_code")
    );
    assert!(
        spans
            .iter()
            .all(|s| !s.name.starts_with("h2") && !s.name.contains("hyper")),
        "transport internals are not exported: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    receiver.abort();
    Ok(())
}

#[tokio::test]
async fn test_an_events_trace_continues_from_publish_to_delivery_across_processes()
-> anyhow::Result<()> {
    use agentmesh_proto::eventbus::v1 as eb;
    use tokio_stream::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (spans_tx, mut spans_rx) = mpsc::unbounded_channel();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { spans_tx }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut process = AgentmeshProcess::dev_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "agentmesh-otlp-test"),
    ])
    .await?;
    let (bus, _) = process.eventbus.expect("dev runs the event bus");
    let mut client = eb::event_bus_client::EventBusClient::connect(format!("http://{bus}")).await?;

    // A subscriber in this process …
    let (tx, rx) = mpsc::channel(4);
    tx.send(eb::SubscribeRequest {
        kind: Some(eb::subscribe_request::Kind::Open(eb::SubscribeOpen {
            subject: "traced.>".into(),
            max_in_flight: 10,
            ..Default::default()
        })),
    })
    .await?;
    let mut deliveries = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _subscribed = deliveries.next().await;
    // … and a publisher whose span is the parent.
    let mut request = Request::new(eb::PublishRequest {
        event: Some(eb::Event {
            subject: "traced.hello".into(),
            data: b"hi".to_vec(),
            ..Default::default()
        }),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse()?,
    );
    client.publish(request).await?;
    let delivered = loop {
        let message = tokio::time::timeout(Duration::from_secs(5), deliveries.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        if let Some(eb::subscribe_response::Kind::Deliveries(d)) = message.kind {
            break d.deliveries.into_iter().next().expect("one delivery");
        }
    };
    let traceparent = delivered.event.as_ref().unwrap().headers["traceparent"].clone();
    assert!(
        traceparent.starts_with(&format!("00-{TRACE_ID}-")),
        "the event carries the caller's trace: {traceparent}"
    );
    drop(tx);
    drop(deliveries);

    process.sigterm();
    process.wait_exit(Duration::from_secs(15)).await?;
    let mut spans = Vec::new();
    wait_until(Duration::from_secs(10), "publish and deliver spans", || {
        while let Ok(span) = spans_rx.try_recv() {
            spans.push(span);
        }
        let found =
            spans.iter().any(|s| s.name == "deliver") && spans.iter().any(|s| s.name == "publish");
        async move { found }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", process.logs()))?;
    let publish = spans.iter().find(|s| s.name == "publish").expect("found");
    let deliver = spans.iter().find(|s| s.name == "deliver").expect("found");
    assert_eq!(hex(&publish.trace_id), TRACE_ID);
    assert_eq!(publish.kind, 4, "SPAN_KIND_PRODUCER");
    assert_eq!(
        hex(&deliver.trace_id),
        TRACE_ID,
        "delivery continues the trace"
    );
    assert_eq!(deliver.kind, 5, "SPAN_KIND_CONSUMER");
    assert_eq!(
        deliver.parent_span_id, publish.span_id,
        "the delivery's parent is the publish span"
    );
    receiver.abort();
    Ok(())
}

#[tokio::test]
async fn test_a_tasks_scheduler_steps_are_spans_of_the_submits_trace() -> anyhow::Result<()> {
    use agentmesh_proto::scheduler::v1 as sc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (spans_tx, mut spans_rx) = mpsc::unbounded_channel();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { spans_tx }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut process = AgentmeshProcess::dev_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "agentmesh-otlp-test"),
    ])
    .await?;
    let (scheduler, _) = process.addrs["scheduler"];
    let agent = agentmesh_agent::Agent::new(agentmesh_agent::AgentConfig {
        scheduler: format!("http://{scheduler}"),
        agent_id: "traced-agent".into(),
        agent_type: "t".into(),
        ..Default::default()
    })
    .handle("traced", |t| async move { Ok(t.payload) });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });
    let mut c =
        sc::scheduler_client::SchedulerClient::connect(format!("http://{scheduler}")).await?;
    wait_until(Duration::from_secs(10), "agent ready", || {
        let mut c = c.clone();
        async move {
            c.get_agent(sc::GetAgentRequest {
                agent_id: "traced-agent".into(),
            })
            .await
            .is_ok_and(|a| a.into_inner().state == sc::AgentState::Ready as i32)
        }
    })
    .await?;
    let mut request = Request::new(sc::SubmitTaskRequest {
        r#type: "traced".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse()?,
    );
    let id = c.submit_task(request).await?.into_inner().task_id;
    wait_until(Duration::from_secs(10), "the task ended", || {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.get_task(sc::GetTaskRequest { task_id: id })
                .await
                .is_ok_and(|t| t.into_inner().state == sc::TaskState::Succeeded as i32)
        }
    })
    .await?;
    stop.cancel();
    process.sigterm();
    process.wait_exit(Duration::from_secs(15)).await?;
    let mut spans = Vec::new();
    wait_until(Duration::from_secs(10), "the task's spans", || {
        while let Ok(span) = spans_rx.try_recv() {
            spans.push(span);
        }
        let found = ["task assigned", "task ended"]
            .iter()
            .all(|name| spans.iter().any(|s| s.name == *name));
        async move { found }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", process.logs()))?;
    for name in ["task assigned", "task ended"] {
        let span = spans.iter().find(|s| s.name == name).expect("found");
        assert_eq!(
            hex(&span.trace_id),
            TRACE_ID,
            "{name} is in the submit's trace"
        );
    }
    receiver.abort();
    Ok(())
}

// Multi-threaded: the trace sink (OTLP receiver and Jaeger query API) must answer while meshctl runs (a blocking
// wait on this thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_meshctl_doctor_finds_one_trace_across_three_services() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let sink = TraceSink::new(100_000);
    tokio::spawn(sink.clone().serve_otlp(listener));
    let query = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let jaeger = format!("http://{}", query.local_addr()?);
    tokio::spawn(sink.clone().serve_query(query));
    let dev = AgentmeshProcess::dev_with_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]).await?;
    let (grpc, admin) = dev.addrs["health"];
    // Wait until the aggregator sees every service UP and has scraped the features.
    wait_until(
        Duration::from_secs(20),
        "the aggregator ready",
        || async move {
            agentmesh_tests::agentmesh::http_get(admin, "/optimizations")
                .await
                .is_ok_and(|(_, body)| {
                    body.contains("\"instances_enabled\":5,\"name\":\"otlp_export\"")
                })
        },
    )
    .await?;
    let (code, json, err) = agentmesh_tests::agentmesh::run_binary(
        "meshctl",
        &[
            "doctor",
            "--addr",
            &grpc.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--jaeger-url",
            &jaeger,
            "-o",
            "json",
        ],
    )?;
    let doctor: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("{e}: {json}{err}"))?;
    let trace = doctor["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == "one trace across three services")
        .cloned()
        .expect("the trace check");
    let seen: Vec<String> = sink
        .spans()
        .iter()
        .map(|r| &r.span)
        .map(|s| {
            format!(
                "{} {} {:?}",
                hex(&s.trace_id),
                s.name,
                s.attributes
                    .iter()
                    .map(|a| a.key.clone())
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    assert_eq!(trace["result"], "pass", "{json}\nspans: {seen:#?}");
    for service in ["RateLimiter", "CacheCoordinator", "EventBus"] {
        assert!(
            trace["detail"].as_str().unwrap_or("").contains(service),
            "{trace}"
        );
    }
    assert_eq!(code, 0, "{json}");
    Ok(())
}
