//! The rate limiter served in-process through the runtime's server and client stacks: the
//! API's behaviour over gRPC, health and reflection, and one trace across client and server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::InMemoryMembership;
use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_ratelimit::service::RateLimitArgs;
use agentmesh_runtime::server::{self, HostContext, RunningService};
use agentmesh_runtime::service::HostDeps;
use agentmesh_runtime::{ClientConfig, Metrics, connect_lazy};
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_types::StatusExt;
use tracing_subscriber::layer::SubscriberExt;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start(metrics: &Metrics, policy_file: Option<std::path::PathBuf>) -> RunningService {
    start_with(metrics, policy_file, 10_000).await
}

async fn start_with(
    metrics: &Metrics,
    policy_file: Option<std::path::PathBuf>,
    max_streams: usize,
) -> RunningService {
    let args = RateLimitArgs {
        listen: loopback(),
        admin_listen: loopback(),
        default_capacity: 60,
        default_refill_per_sec: 1.0,
        policy_file,
        max_keys: 10_000,
        budget: Duration::from_millis(5),
        max_streams,
    };
    let membership: Arc<dyn agentmesh_membership::Membership> =
        Arc::new(InMemoryMembership::default());
    let deps = HostDeps {
        metrics: metrics.clone(),
        membership: membership.clone(),
        etcd: None,
        redis_url: None,
        client_token: None,
    };
    let spec = args.build(&deps).await.expect("valid settings");
    let ctx = HostContext {
        metrics: metrics.clone(),
        membership,
        advertise_host: None,
        zone: String::new(),
        shutdown_grace: Duration::from_secs(2),
        audit: None,
        role_overrides: Default::default(),
        admin_access: Default::default(),
        tls: None,
        certificates: None,
        admin_tls: None,
        auth: None,
    };
    server::start(spec, &ctx, &CancellationToken::new())
        .await
        .expect("service starts")
}

fn client(
    running: &RunningService,
    metrics: &Metrics,
) -> pb::rate_limiter_client::RateLimiterClient<agentmesh_runtime::ClientChannel> {
    let channel = connect_lazy(
        &running.grpc_addr.to_string(),
        &ClientConfig::default(),
        metrics,
    )
    .unwrap();
    pb::rate_limiter_client::RateLimiterClient::new(channel)
}

fn inline(namespace: &str, key: &str, cost: u64, limit: u64, period_secs: i64) -> pb::CheckItem {
    pb::CheckItem {
        namespace: namespace.into(),
        key: key.into(),
        cost,
        limit_ref: Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
            limit,
            period: Some(prost_types::Duration {
                seconds: period_secs,
                nanos: 0,
            }),
            burst: 0,
            algorithm: 0,
        })),
        mode: 0,
        consistency: 0,
        on_failure: 0,
    }
}

#[tokio::test]
async fn test_check_allows_up_to_the_limit_then_denies_with_retry_after() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    for expected_remaining in [2u64, 1, 0] {
        let r = client
            .check(pb::CheckRequest {
                items: vec![inline("t", "k", 1, 3, 60)],
                all_or_nothing: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.allowed);
        assert_eq!(r.results[0].remaining, expected_remaining);
        assert_eq!(r.results[0].decided_by, running.instance_id);
    }
    let r = client
        .check(pb::CheckRequest {
            items: vec![inline("t", "k", 1, 3, 60)],
            all_or_nothing: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert_eq!(r.results[0].decision, pb::Decision::Deny as i32);
    let retry = r.results[0].retry_after.unwrap();
    assert!(
        retry.seconds > 0 && retry.seconds <= 20,
        "about one emission interval (20 s): {retry:?}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_bad_input_is_invalid_argument_naming_every_field() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let bad = vec![
        inline("", "k", 1, 3, 60),
        inline("t", &"x".repeat(513), 1, 0, 60),
    ];
    let status = client
        .check(pb::CheckRequest {
            items: bad,
            all_or_nothing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let fields: Vec<String> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert!(
        fields.contains(&"items[0].namespace".to_owned()),
        "{fields:?}"
    );
    assert!(fields.contains(&"items[1].key".to_owned()), "{fields:?}");
    assert!(
        fields.contains(&"items[1].limit.limit".to_owned()),
        "{fields:?}"
    );

    let empty = client
        .check(pb::CheckRequest {
            items: vec![],
            all_or_nothing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let too_many = vec![inline("t", "k", 1, 3, 60); 1001];
    let status = client
        .check(pb::CheckRequest {
            items: too_many,
            all_or_nothing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("items"), "{}", status.message());

    let mut unknown = inline("t", "k", 1, 3, 60);
    unknown.limit_ref = Some(pb::check_item::LimitRef::Policy("nope".into()));
    let status = client
        .check(pb::CheckRequest {
            items: vec![unknown],
            all_or_nothing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("items[0].policy"),
        "{}",
        status.message()
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_named_policies_from_file_and_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.toml");
    std::fs::write(
        &path,
        "[[policy]]\nname = \"llm-tokens\"\nlimit = 1000\nperiod = \"1m\"\n",
    )
    .unwrap();
    let metrics = Metrics::new();
    let running = start(&metrics, Some(path)).await;
    let mut client = client(&running, &metrics);
    let mut tokens = inline("team-a", "agent-7", 900, 0, 0);
    tokens.limit_ref = Some(pb::check_item::LimitRef::Policy("llm-tokens".into()));
    let r = client
        .check(pb::CheckRequest {
            items: vec![tokens.clone()],
            all_or_nothing: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed);
    assert_eq!(
        (r.results[0].policy.as_str(), r.results[0].remaining),
        ("llm-tokens", 100)
    );
    // 900 more tokens do not fit, so the request-count item is not debited either.
    let requests = inline("team-a", "agent-7", 1, 10, 60);
    let r = client
        .check(pb::CheckRequest {
            items: vec![requests.clone(), tokens],
            all_or_nothing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert!(r.results[0].batch_rejected);
    let r = client
        .check(pb::CheckRequest {
            items: vec![requests],
            all_or_nothing: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].remaining, 9,
        "the rejected batch debited nothing"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_stream_check_streams_are_bounded_per_instance() {
    let metrics = Metrics::new();
    let running = start_with(&metrics, None, 2).await;
    let client = client(&running, &metrics);
    let open = |mut client: pb::rate_limiter_client::RateLimiterClient<_>| async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::StreamCheckRequest>(1);
        let call = client
            .stream_check(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        (tx, call)
    };
    let (first_tx, first) = open(client.clone()).await;
    let (_second_tx, second) = open(client.clone()).await;
    assert!(first.is_ok() && second.is_ok());
    let (_third_tx, third) = open(client.clone()).await;
    let status = third.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--ratelimit-max-streams"));
    // A stream that ends gives its place back.
    drop(first_tx);
    let mut first = first.unwrap().into_inner();
    while first.next().await.is_some() {}
    let mut reopened = None;
    for _ in 0..50 {
        let (tx, call) = open(client.clone()).await;
        if call.is_ok() {
            reopened = Some(tx);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened.is_some(), "the freed place was not given back");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_stream_check_answers_each_request_and_survives_a_bad_one() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let requests = vec![
        pb::StreamCheckRequest {
            id: 1,
            request: Some(pb::CheckRequest {
                items: vec![inline("t", "s", 1, 5, 60)],
                all_or_nothing: false,
            }),
        },
        pb::StreamCheckRequest {
            id: 2,
            request: Some(pb::CheckRequest {
                items: vec![],
                all_or_nothing: false,
            }),
        },
        pb::StreamCheckRequest {
            id: 3,
            request: Some(pb::CheckRequest {
                items: vec![inline("t", "s", 1, 5, 60)],
                all_or_nothing: false,
            }),
        },
    ];
    let mut responses = client
        .stream_check(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = responses.next().await {
        got.push(r.unwrap());
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].response.as_ref().unwrap().results[0].remaining, 4);
    let error = got[1].error.as_ref().unwrap();
    assert_eq!((got[1].id, error.code), (2, Code::InvalidArgument as i32));
    assert_eq!(got[2].response.as_ref().unwrap().results[0].remaining, 3);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_health_and_reflection_answer_on_the_grpc_port() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "liveness",
        "readiness",
        "agentmesh.ratelimit.v1.RateLimiter",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"agentmesh.ratelimit.v1.RateLimiter".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    // Only what this port serves: not the benchmark Echo service, not the event bus.
    for absent in ["agentmesh.bench.v1.Echo", "agentmesh.eventbus.v1.EventBus"] {
        assert!(!names.contains(&absent.to_owned()), "{names:?}");
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_shutdown_turns_health_not_serving_before_the_port_closes() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    running.stop();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn test_one_trace_spans_client_and_server() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    client
        .check(pb::CheckRequest {
            items: vec![inline("t", "k", 1, 3, 60)],
            all_or_nothing: false,
        })
        .await
        .unwrap();
    running.shutdown().await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let find = |kind: SpanKind| {
        spans
            .iter()
            .find(|s| s.span_kind == kind && s.name == "agentmesh.ratelimit.v1.RateLimiter/Check")
            .unwrap_or_else(|| {
                panic!(
                    "no {kind:?} span in {:?}",
                    spans
                        .iter()
                        .map(|s| (&s.name, &s.span_kind))
                        .collect::<Vec<_>>()
                )
            })
    };
    let (client_span, server_span) = (find(SpanKind::Client), find(SpanKind::Server));
    assert_eq!(
        client_span.span_context.trace_id(),
        server_span.span_context.trace_id()
    );
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
    assert!(server_span.parent_span_is_remote);
    assert!(
        server_span
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "rpc.grpc.status_code" && kv.value.as_str() == "0")
    );
}

fn acquire_request(key: &str, limit: u64, ttl_secs: i64) -> pb::AcquireRequest {
    pb::AcquireRequest {
        namespace: "agents".into(),
        key: key.into(),
        limit,
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        consistency: 0,
    }
}

#[tokio::test]
async fn test_leases_cap_concurrency_and_free_slots_on_release_and_expiry() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let first = client
        .acquire(acquire_request("gpu", 2, 60))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .acquire(acquire_request("gpu", 2, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(first.acquired && second.acquired);
    assert_eq!((second.in_use, second.lease_id.len()), (2, 32));
    let third = client
        .acquire(acquire_request("gpu", 2, 60))
        .await
        .unwrap()
        .into_inner();
    assert!(!third.acquired, "the limit is 2");
    let retry = third.retry_after.unwrap();
    assert!(
        retry.seconds <= 1,
        "the soonest lease expires within a second: {retry:?}"
    );

    // Release frees a slot; a second release of the same lease is NOT_FOUND.
    let release = |lease_id: &str| pb::ReleaseRequest {
        namespace: "agents".into(),
        key: "gpu".into(),
        lease_id: lease_id.into(),
        consistency: 0,
    };
    assert_eq!(
        client
            .release(release(&first.lease_id))
            .await
            .unwrap()
            .into_inner()
            .in_use,
        1
    );
    assert_eq!(
        client
            .release(release(&first.lease_id))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // The 1 s lease expires by itself: its holder "crashed" without releasing.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let renew = pb::RenewLeaseRequest {
        namespace: "agents".into(),
        key: "gpu".into(),
        lease_id: second.lease_id.clone(),
        ttl: None,
        consistency: 0,
    };
    assert_eq!(
        client.renew_lease(renew).await.unwrap_err().code(),
        Code::NotFound,
        "expired"
    );
    let a = client
        .acquire(acquire_request("gpu", 2, 60))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .acquire(acquire_request("gpu", 2, 60))
        .await
        .unwrap()
        .into_inner();
    assert!(a.acquired && b.acquired, "both slots are free again");
    let renew = pb::RenewLeaseRequest {
        namespace: "agents".into(),
        key: "gpu".into(),
        lease_id: a.lease_id,
        ttl: Some(prost_types::Duration {
            seconds: 120,
            nanos: 0,
        }),
        consistency: 0,
    };
    client.renew_lease(renew).await.unwrap();
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_lease_calls_reject_bad_input_naming_every_field() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let mut bad = acquire_request("", 0, 0);
    bad.consistency = pb::Consistency::Strict as i32;
    let status = client.acquire(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let mut fields: Vec<String> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(fields, ["consistency", "key", "limit", "ttl"]);
    let release = pb::ReleaseRequest {
        namespace: "a".into(),
        key: "k".into(),
        lease_id: "xyz".into(),
        consistency: 0,
    };
    let status = client.release(release).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("lease_id"),
        "{}",
        status.message()
    );
    running.shutdown().await.unwrap();
}

fn budget_target(key: &str, limit: u64) -> Option<pb::BudgetTarget> {
    Some(pb::BudgetTarget {
        namespace: "team-a".into(),
        key: key.into(),
        budget: Some(pb::BudgetSpec {
            limit,
            window: pb::BudgetWindow::Day as i32,
        }),
        consistency: 0,
        policy: String::new(),
    })
}

#[tokio::test]
async fn test_budgets_reserve_then_commit_refunds_and_cancel_releases() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let reserve = |estimate| pb::ReserveRequest {
        target: budget_target("agent-7", 10_000),
        estimate,
        ttl: None,
    };
    let r = client.reserve(reserve(4_000)).await.unwrap().into_inner();
    assert!(r.granted);
    let usage = r.usage.unwrap();
    assert_eq!((usage.reserved, usage.remaining), (4_000, 6_000));
    assert_eq!(
        usage.window_end_ms - usage.window_start_ms,
        86_400_000,
        "a UTC day"
    );
    // The LLM call used 2,500 tokens: 1,500 come back.
    let commit = pb::CommitRequest {
        target: budget_target("agent-7", 10_000),
        reservation_id: r.reservation_id.clone(),
        actual: 2_500,
    };
    let usage = client
        .commit(commit.clone())
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        (usage.spent, usage.reserved, usage.remaining),
        (2_500, 0, 7_500)
    );
    assert_eq!(
        client.commit(commit).await.unwrap_err().code(),
        Code::NotFound,
        "settled once"
    );

    let big = client.reserve(reserve(8_000)).await.unwrap().into_inner();
    assert!(!big.granted, "8,000 does not fit in the 7,500 left");
    assert!(big.reservation_id.is_empty());
    let held = client.reserve(reserve(7_000)).await.unwrap().into_inner();
    assert!(held.granted);
    let cancel = pb::CancelRequest {
        target: budget_target("agent-7", 10_000),
        reservation_id: held.reservation_id,
    };
    let usage = client
        .cancel(cancel)
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        (usage.spent, usage.reserved, usage.remaining),
        (2_500, 0, 7_500)
    );
    let usage = client
        .get_usage(pb::GetUsageRequest {
            target: budget_target("agent-7", 10_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(usage.spent, 2_500);
    // The burn the health aggregator's budget_burn() reads, and the refusal.
    let text = metrics.encode();
    let scrape = agentmesh_runtime::scrape::parse(&text).unwrap();
    let ns = budget_target("agent-7", 10_000).unwrap().namespace;
    let spent = agentmesh_runtime::scrape::sum(
        &scrape,
        "ratelimit_budget_spent_total",
        &[("namespace", &ns)],
    );
    assert!((spent - 2_500.0).abs() < 0.5, "{spent}");
    let denied = agentmesh_runtime::scrape::sum(
        &scrape,
        "ratelimit_budget_denied_total",
        &[("namespace", &ns)],
    );
    assert!((denied - 1.0).abs() < 0.5, "{denied}");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_budget_calls_reject_bad_input_naming_every_field() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let target = Some(pb::BudgetTarget {
        namespace: String::new(),
        key: "k".into(),
        budget: Some(pb::BudgetSpec {
            limit: 0,
            window: 0,
        }),
        consistency: 0,
        policy: String::new(),
    });
    let status = client
        .reserve(pb::ReserveRequest {
            target,
            estimate: 1,
            ttl: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let mut fields: Vec<String> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "target.budget.limit",
            "target.budget.window",
            "target.namespace",
            "ttl"
        ]
    );
    let status = client
        .get_usage(pb::GetUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    running.shutdown().await.unwrap();
}

fn policy_target(key: &str, policy: &str) -> Option<pb::BudgetTarget> {
    Some(pb::BudgetTarget {
        namespace: "team-a".into(),
        key: key.into(),
        budget: None,
        consistency: 0,
        policy: policy.into(),
    })
}

fn bad_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

fn daily_tokens(limit: u64) -> pb::Policy {
    pb::Policy {
        namespace: "team-a".into(),
        name: "daily-tokens".into(),
        budget: Some(pb::BudgetSpec {
            limit,
            window: pb::BudgetWindow::Day as i32,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn test_budget_policies_from_the_store_and_the_file_and_a_namespaces_usage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.toml");
    std::fs::write(
        &path,
        "[[policy]]\nname = \"rpm\"\nlimit = 5\nperiod = \"1m\"\n\n\
         [[policy]]\nname = \"file-usd\"\nbudget = 1000\nwindow = \"month\"\n",
    )
    .unwrap();
    let metrics = Metrics::new();
    let running = start(&metrics, Some(path)).await;
    let mut client = client(&running, &metrics);

    let stored = client
        .put_policy(pb::PutPolicyRequest {
            policy: Some(daily_tokens(10_000)),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.version > 0 && stored.limit.is_none());
    assert_eq!(stored.budget.unwrap().limit, 10_000);
    let listed = client
        .list_policies(pb::ListPoliciesRequest {
            namespace: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.policies, std::slice::from_ref(&stored));

    let reserve = |key: &str, policy: &str, estimate| pb::ReserveRequest {
        target: policy_target(key, policy),
        estimate,
        ttl: None,
    };
    // The policy set is applied by a background task: wait for it.
    let mut r = None;
    for _ in 0..100 {
        match client
            .reserve(reserve("agent-1", "daily-tokens", 4_000))
            .await
        {
            Ok(answer) => {
                r = Some(answer.into_inner());
                break;
            }
            Err(status) if status.code() == Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    let r = r.expect("the stored budget policy applies");
    assert!(r.granted);
    assert_eq!(r.usage.unwrap().limit, 10_000);
    let usage = client
        .commit(pb::CommitRequest {
            target: policy_target("agent-1", "daily-tokens"),
            reservation_id: r.reservation_id,
            actual: 2_500,
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!((usage.spent, usage.remaining), (2_500, 7_500));
    // A file budget policy.
    let r = client
        .reserve(reserve("agent-2", "file-usd", 300))
        .await
        .unwrap()
        .into_inner();
    let usage = r.usage.unwrap();
    assert_eq!(usage.limit, 1_000);
    assert!(
        usage.window_end_ms - usage.window_start_ms >= 28 * 86_400_000,
        "a calendar month"
    );
    // An inline budget in the same namespace, left reserved.
    client
        .reserve(pb::ReserveRequest {
            target: budget_target("agent-3", 50),
            estimate: 10,
            ttl: None,
        })
        .await
        .unwrap();

    // Raising the policy's limit applies to the budget it names.
    client
        .put_policy(pb::PutPolicyRequest {
            policy: Some(daily_tokens(20_000)),
            expected_version: stored.version,
        })
        .await
        .unwrap();
    let mut limit = 0;
    for _ in 0..100 {
        let usage = client
            .get_usage(pb::GetUsageRequest {
                target: policy_target("agent-1", "daily-tokens"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .usage
            .unwrap();
        limit = usage.limit;
        if limit == 20_000 {
            assert_eq!(usage.spent, 2_500);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        limit, 20_000,
        "the limit in force is the policy's current one"
    );

    let list = |limit, start_after: &str| pb::GetUsageRequest {
        namespace: "team-a".into(),
        limit,
        start_after: start_after.into(),
        ..Default::default()
    };
    let all = client.get_usage(list(0, "")).await.unwrap().into_inner();
    let rows: Vec<(&str, i32, u64, u64, u64)> = all
        .keys
        .iter()
        .map(|k| {
            let u = k.usage.as_ref().unwrap();
            (k.key.as_str(), k.window, u.limit, u.spent, u.reserved)
        })
        .collect();
    let (day, month) = (pb::BudgetWindow::Day as i32, pb::BudgetWindow::Month as i32);
    assert_eq!(
        rows,
        [
            ("agent-1", day, 20_000, 2_500, 0),
            ("agent-2", month, 1_000, 0, 300),
            ("agent-3", day, 50, 0, 10),
        ]
    );
    assert!(all.keys.iter().all(|k| k.held_by == running.instance_id));
    assert!(all.usage.is_none() && !all.truncated && all.unreachable.is_empty());
    let page = client.get_usage(list(2, "")).await.unwrap().into_inner();
    assert_eq!(page.keys.len(), 2);
    assert!(page.truncated);
    assert_eq!(page.next_start_after, "agent-2");
    let rest = client
        .get_usage(list(2, &page.next_start_after))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.keys.len(), 1);
    assert_eq!(rest.keys[0].key, "agent-3");
    assert!(!rest.truncated && rest.next_start_after.is_empty());

    // A Check cannot spend a budget, and a budget call cannot use a rate limit.
    for name in ["daily-tokens", "file-usd"] {
        let mut item = inline("team-a", "agent-1", 1, 0, 0);
        item.limit_ref = Some(pb::check_item::LimitRef::Policy(name.into()));
        let status = client
            .check(pb::CheckRequest {
                items: vec![item],
                all_or_nothing: false,
            })
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), ["items[0].policy"]);
        assert!(status.message().contains("cost budget"), "{status:?}");
    }
    let status = client
        .reserve(reserve("agent-1", "rpm", 1))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["target.policy"]);
    let status = client
        .reserve(reserve("agent-1", "nope", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("target.policy"), "{status:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_budget_policy_and_usage_calls_reject_bad_input_naming_the_field() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    let put = |policy| pb::PutPolicyRequest {
        policy: Some(policy),
        expected_version: 0,
    };
    let per_minute = pb::LimitSpec {
        limit: 5,
        period: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        burst: 0,
        algorithm: 0,
    };
    let cases = [
        (
            pb::Policy {
                limit: Some(per_minute),
                ..daily_tokens(10)
            },
            vec!["policy.budget"],
        ),
        (
            pb::Policy {
                budget: None,
                ..daily_tokens(10)
            },
            vec!["policy.limit"],
        ),
        (
            pb::Policy {
                consistency: pb::Consistency::Strict as i32,
                on_failure: pb::FailurePolicy::FailOpen as i32,
                ..daily_tokens(0)
            },
            vec![
                "policy.budget.limit",
                "policy.consistency",
                "policy.on_failure",
            ],
        ),
        (
            pb::Policy {
                mode: pb::Mode::Shadow as i32,
                ..daily_tokens(10)
            },
            vec!["policy.mode"],
        ),
    ];
    for (policy, fields) in cases {
        let status = client.put_policy(put(policy)).await.unwrap_err();
        assert_eq!(bad_fields(&status), fields);
    }
    let both = Some(pb::BudgetTarget {
        policy: "daily-tokens".into(),
        ..budget_target("k", 10).unwrap()
    });
    let status = client
        .reserve(pb::ReserveRequest {
            target: both,
            estimate: 1,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["target.policy"]);
    let status = client
        .cancel(pb::CancelRequest {
            target: policy_target("k", ""),
            reservation_id: "00000000000000000000000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["target.budget"]);
    let status = client
        .get_usage(pb::GetUsageRequest {
            target: budget_target("k", 10),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["namespace"]);
    let status = client
        .get_usage(pb::GetUsageRequest {
            namespace: "team\u{1}a".into(),
            limit: 1001,
            consistency: pb::Consistency::Strict as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["namespace", "limit", "consistency"]);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_inspect_peeks_without_spending_and_reset_starts_the_key_full() {
    let metrics = Metrics::new();
    let running = start(&metrics, None).await;
    let mut client = client(&running, &metrics);
    for _ in 0..3 {
        client
            .check(pb::CheckRequest {
                items: vec![inline("t", "ops", 1, 3, 60)],
                all_or_nothing: false,
            })
            .await
            .unwrap();
    }
    let inspect = || pb::InspectRequest {
        item: Some(inline("t", "ops", 5, 3, 60)),
    };
    for _ in 0..2 {
        let r = client
            .inspect(inspect())
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        assert_eq!(
            (r.remaining, r.decision),
            (0, pb::Decision::Deny as i32),
            "a peek at an empty bucket, twice"
        );
    }
    let reset = client
        .reset(pb::ResetRequest {
            item: Some(inline("t", "ops", 1, 3, 60)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reset.existed, reset.decided_by.as_str()),
        (true, running.instance_id.as_str())
    );
    assert_eq!(
        client
            .inspect(inspect())
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap()
            .remaining,
        3
    );
    assert!(
        !client
            .reset(pb::ResetRequest {
                item: Some(inline("t", "ops", 1, 3, 60))
            })
            .await
            .unwrap()
            .into_inner()
            .existed
    );

    let status = client
        .inspect(pb::InspectRequest {
            item: Some(inline("t", "", 1, 3, 60)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().unwrap().field_violations[0].field,
        "item.key"
    );
    assert_eq!(
        client
            .reset(pb::ResetRequest { item: None })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    running.shutdown().await.unwrap();
}
