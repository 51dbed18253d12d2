//! `--auth required` on a real `agentmesh dev` process: every RPC of every service (walked from
//! the descriptor set, so none is missed) refuses a call without a token with UNAUTHENTICATED;
//! a role the method does not allow gets PERMISSION_DENIED naming the role it needs; health
//! stays open; a service token works, and the process's own calls between services (the
//! scheduler publishing its events on the bus) carry its `--auth-token-file`.

use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_proto::scheduler::v1 as sched;
use agentmesh_runtime::auth::{Role, TokenClaims, issue_hs256};
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::raw;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;

const SECRET: &str = "an auth test secret that is long enough to use";

/// Every method of the services `agentmesh dev` serves, as `/package.Service/Method`.
fn every_method() -> Vec<&'static str> {
    let set = prost_types::FileDescriptorSet::decode(agentmesh_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let served = [
        "agentmesh.cache.v1.CacheCoordinator",
        "agentmesh.eventbus.v1.EventBus",
        "agentmesh.health.v1.HealthAggregator",
        "agentmesh.ratelimit.v1.RateLimiter",
        "agentmesh.scheduler.v1.Scheduler",
        "envoy.service.ratelimit.v3.RateLimitService",
    ];
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if served.contains(&full.as_str()) {
                for method in &service.method {
                    out.push(&*Box::leak(
                        format!("/{full}/{}", method.name()).into_boxed_str(),
                    ));
                }
            }
        }
    }
    out
}

fn token(roles: &[Role], agent_id: Option<&str>) -> String {
    let mut claims = TokenClaims::new("auth-test", roles, Duration::from_secs(600));
    claims.agent_id = agent_id.map(str::to_owned);
    issue_hs256(SECRET.as_bytes(), &claims).expect("signed")
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

#[tokio::test]
async fn test_auth_required_refuses_every_rpc_without_a_token_and_checks_roles()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET)?;
    let own_token = dir.path().join("token");
    std::fs::write(&own_token, token(&[Role::Service], None))?;
    let (secret, own) = (
        secret_file.to_string_lossy().into_owned(),
        own_token.to_string_lossy().into_owned(),
    );
    let dev = AgentmeshProcess::dev_with_env(&[
        ("AGENTMESH_AUTH", "required"),
        ("AGENTMESH_AUTH_HS256_SECRET_FILE", &secret),
        ("AGENTMESH_AUTH_TOKEN_FILE", &own),
    ])
    .await?;
    let addr_of = |path: &str| {
        let service = if path.contains("cache.v1") {
            "cache"
        } else if path.contains("eventbus.v1") {
            "eventbus"
        } else if path.contains("health.v1") {
            "health"
        } else if path.contains("scheduler.v1") {
            "scheduler"
        } else {
            "ratelimit"
        };
        dev.addrs[service].0
    };

    // No token: UNAUTHENTICATED on every RPC of every service.
    let methods = every_method();
    assert!(methods.len() > 60, "{methods:?}");
    for path in &methods {
        let (_, status) = raw::streaming(addr_of(path), path, vec![Vec::new()]).await?;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}: {status:?}");
    }

    // Health stays open for probes.
    let mut health = agentmesh_proto::grpc::health::v1::health_client::HealthClient::connect(
        format!("http://{}", dev.grpc_addr),
    )
    .await?;
    health
        .check(agentmesh_proto::grpc::health::v1::HealthCheckRequest {
            service: String::new(),
        })
        .await?;

    // A role the method does not allow: PERMISSION_DENIED naming the role it needs.
    let mut scheduler = sched::scheduler_client::SchedulerClient::connect(format!(
        "http://{}",
        dev.addrs["scheduler"].0
    ))
    .await?;
    let e = scheduler
        .drain_agent(with_token(
            sched::DrainAgentRequest::default(),
            &token(&[Role::Service], None),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("operator"), "{}", e.message());
    // A tampered or foreign token is UNAUTHENTICATED.
    let foreign = issue_hs256(
        b"another secret that is long enough as well",
        &TokenClaims::new("x", &[Role::Admin], Duration::from_secs(60)),
    )
    .expect("signed");
    let e = scheduler
        .get_pool_stats(with_token(sched::GetPoolStatsRequest::default(), &foreign))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A service token works, and the scheduler's own publish to the bus carries the process's
    // token: a submitted task's event arrives.
    let service = token(&[Role::Service], None);
    let mut events = bus::event_bus_client::EventBusClient::connect(format!(
        "http://{}",
        dev.addrs["eventbus"].0
    ))
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: "sys.scheduler.task.>".into(),
            ack_policy: bus::AckPolicy::None as i32,
            max_in_flight: 100,
            ..bus::SubscribeOpen::default()
        })),
    })
    .await?;
    let mut stream = events
        .subscribe(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &service,
        ))
        .await?
        .into_inner();
    let _subscribed = stream.next().await;
    scheduler
        .submit_task(with_token(
            sched::SubmitTaskRequest {
                r#type: "auth-test".into(),
                ..sched::SubmitTaskRequest::default()
            },
            &service,
        ))
        .await?;
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = stream.next().await {
            if let Some(bus::subscribe_response::Kind::Deliveries(d)) = m.kind
                && let Some(e) = d.deliveries.into_iter().find_map(|d| d.event)
            {
                return Some(e);
            }
        }
        None
    })
    .await?
    .expect("the scheduler's event");
    assert!(
        event.subject.starts_with("sys.scheduler.task."),
        "{}",
        event.subject
    );
    drop(tx);
    Ok(())
}
