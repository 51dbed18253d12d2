//! `--auth required` on a real `agentmesh dev` process: every RPC of every service (walked from
//! the descriptor set, so none is missed) refuses a call without a token with UNAUTHENTICATED;
//! a role the method does not allow gets PERMISSION_DENIED naming the role it needs; health
//! stays open; a service token works, and the process's own calls between services (the
//! scheduler publishing its events on the bus) carry its `--auth-token-file`. Tenants cannot
//! read, change or subscribe to each other's names; an agent acts only as its own agent id;
//! state-changing calls land in the audit trail (`sys.audit.>`, read by `meshctl audit tail`).

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
        "agentmesh.rules.v1.Rules",
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

/// A change that makes claims unacceptable.
type ClaimsChange = Box<dyn Fn(&mut TokenClaims)>;

const ISSUER: &str = "https://id.agentmesh.test";
const AUDIENCE: &str = "agentmesh";

/// Claims of the test's issuer and audience, valid for 10 minutes.
fn claims_of(sub: &str, roles: &[Role]) -> TokenClaims {
    let mut claims = TokenClaims::new(sub, roles, Duration::from_secs(600));
    claims.iss = Some(ISSUER.to_owned());
    claims.aud = Some(AUDIENCE.to_owned());
    claims
}

fn token(roles: &[Role], agent_id: Option<&str>) -> String {
    let mut claims = claims_of("auth-test", roles);
    claims.agent_id = agent_id.map(str::to_owned);
    issue_hs256(SECRET.as_bytes(), &claims).expect("signed")
}

/// Asserts `result` is PERMISSION_DENIED.
#[track_caller]
fn denied<T>(result: Result<T, tonic::Status>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: allowed"),
        Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}"),
    }
}

fn tenant_token(sub: &str, tenant: &str, roles: &[Role]) -> String {
    let mut claims = claims_of(sub, roles);
    claims.tenant = Some(tenant.to_owned());
    issue_hs256(SECRET.as_bytes(), &claims).expect("signed")
}

/// `agentmesh dev` with auth required, its own token a service and operator's (it publishes
/// the cluster's `sys.` events and the audit trail).
async fn secured_dev(dir: &std::path::Path) -> anyhow::Result<AgentmeshProcess> {
    secured_dev_with(dir, &[]).await
}

/// [`secured_dev`] with more environment.
async fn secured_dev_with(
    dir: &std::path::Path,
    more: &[(&str, &str)],
) -> anyhow::Result<AgentmeshProcess> {
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, SECRET)?;
    let own_token = dir.join("token");
    std::fs::write(&own_token, token(&[Role::Service, Role::Operator], None))?;
    let (secret, own) = (
        secret_file.to_string_lossy().into_owned(),
        own_token.to_string_lossy().into_owned(),
    );
    let mut envs = vec![
        ("AGENTMESH_AUTH", "required"),
        ("AGENTMESH_AUTH_HS256_SECRET_FILE", secret.as_str()),
        ("AGENTMESH_AUTH_TOKEN_FILE", own.as_str()),
        ("AGENTMESH_AUTH_ISSUER", ISSUER),
        ("AGENTMESH_AUTH_AUDIENCE", AUDIENCE),
    ];
    envs.extend_from_slice(more);
    AgentmeshProcess::dev_with_env(&envs).await
}

/// Opens a subscription to `filter` (from the start of a durable stream) with `token`.
async fn subscribe(
    addr: std::net::SocketAddr,
    filter: &str,
    token: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<bus::SubscribeRequest>,
        tonic::Streaming<bus::SubscribeResponse>,
    ),
    tonic::Status,
> {
    let mut events = bus::event_bus_client::EventBusClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bus::SubscribeRequest {
        kind: Some(bus::subscribe_request::Kind::Open(bus::SubscribeOpen {
            subject: filter.into(),
            ack_policy: bus::AckPolicy::None as i32,
            max_in_flight: 1000,
            start: Some(bus::StartPosition {
                position: Some(bus::start_position::Position::All(true)),
            }),
            ..bus::SubscribeOpen::default()
        })),
    })
    .await
    .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut stream = events
        .subscribe(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await?
        .into_inner();
    match stream.next().await {
        Some(Ok(_subscribed)) => Ok((tx, stream)),
        Some(Err(status)) => Err(status),
        None => Err(tonic::Status::cancelled("no answer")),
    }
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
    let dev = secured_dev(dir.path()).await?;
    let addr_of = |path: &str| {
        let service = if path.contains("cache.v1") {
            "cache"
        } else if path.contains("eventbus.v1") {
            "eventbus"
        } else if path.contains("health.v1") {
            "health"
        } else if path.contains("scheduler.v1") || path.contains("rules.v1") {
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
    // Expired, not yet valid, another issuer's, another audience's: UNAUTHENTICATED, saying
    // why (beyond the 30 s leeway).
    let now = TokenClaims::new("x", &[], Duration::ZERO).iat;
    let variants: [(&str, ClaimsChange); 4] = [
        ("expired", Box::new(move |c| c.exp = now - 120)),
        ("not valid yet", Box::new(move |c| c.nbf = Some(now + 120))),
        (
            "issuer",
            Box::new(|c| c.iss = Some("https://evil.example".into())),
        ),
        (
            "audience",
            Box::new(|c| c.aud = Some("someone-else".into())),
        ),
    ];
    for (says, change) in variants {
        let mut claims = claims_of("svc", &[Role::Service]);
        change(&mut claims);
        let bad = issue_hs256(SECRET.as_bytes(), &claims).expect("signed");
        let e = scheduler
            .get_pool_stats(with_token(sched::GetPoolStatsRequest::default(), &bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{says}: {e:?}");
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }

    // A service token works, and the scheduler's own publish to the bus carries the process's
    // token: a submitted task's event arrives (on a `sys.` subject: an operator reads it).
    let service = token(&[Role::Service], None);
    let operator = token(&[Role::Operator], None);
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
            &operator,
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
    let event = agentmesh_tests::bus::first_event(&mut stream, Duration::from_secs(10))
        .await?
        .expect("the scheduler's event");
    assert!(
        event.subject.starts_with("sys.scheduler.task."),
        "{}",
        event.subject
    );
    drop(tx);

    // The admin port: /livez and /readyz open, /metrics needs a token (--auth-metrics token).
    let admin = dev.addrs["ratelimit"].1;
    let get = |path: &'static str, token: Option<String>| async move {
        agentmesh_runtime::scrape::get_with(
            &format!("http://{admin}{path}"),
            Duration::from_secs(5),
            token.as_deref(),
        )
        .await
    };
    assert_eq!(get("/livez", None).await?.0, 200);
    assert_eq!(get("/readyz", None).await?.0, 200);
    assert_eq!(get("/metrics", None).await?.0, 401);
    assert_eq!(get("/metrics", Some(foreign)).await?.0, 401);
    let (code, body) = get("/metrics", Some(service.clone())).await?;
    assert_eq!(code, 200);
    assert!(body.contains("rpc_server_call_duration_seconds"));
    Ok(())
}

#[tokio::test]
async fn test_open_metrics_redact_tenants_and_a_roles_file_overrides_the_rules()
-> anyhow::Result<()> {
    use agentmesh_proto::cache::v1 as cache;
    let dir = tempfile::tempdir()?;
    let roles = dir.path().join("roles.toml");
    std::fs::write(
        &roles,
        "# only operators read pool stats here\n\
         \"agentmesh.scheduler.v1.Scheduler/GetPoolStats\" = [\"operator\"]\n",
    )?;
    let roles = roles.to_string_lossy().into_owned();
    let dev = secured_dev_with(
        dir.path(),
        &[
            ("AGENTMESH_AUTH_METRICS", "open"),
            ("AGENTMESH_AUTH_ROLES_FILE", &roles),
        ],
    )
    .await?;
    let mut scheduler = sched::scheduler_client::SchedulerClient::connect(format!(
        "http://{}",
        dev.addrs["scheduler"].0
    ))
    .await?;
    denied(
        scheduler
            .get_pool_stats(with_token(
                sched::GetPoolStatsRequest::default(),
                &token(&[Role::Service], None),
            ))
            .await,
        "the roles file took GetPoolStats from service",
    );
    scheduler
        .get_pool_stats(with_token(
            sched::GetPoolStatsRequest::default(),
            &token(&[Role::Operator], None),
        ))
        .await?;

    // A tenant's namespace shows in a scrape with a token, never in one without.
    let mut cache = cache::cache_coordinator_client::CacheCoordinatorClient::connect(format!(
        "http://{}",
        dev.addrs["cache"].0
    ))
    .await?;
    cache
        .get(with_token(
            cache::GetRequest {
                namespace: "acme.private".into(),
                key: "k".into(),
                ..cache::GetRequest::default()
            },
            &tenant_token("acme-svc", "acme", &[Role::Service]),
        ))
        .await?;
    let url = format!("http://{}/metrics", dev.addrs["cache"].1);
    let (code, anonymous) =
        agentmesh_runtime::scrape::get_with(&url, Duration::from_secs(5), None).await?;
    assert_eq!(code, 200);
    assert!(!anonymous.contains("acme"), "a tenant leaked: {anonymous}");
    assert!(anonymous.contains("namespace=\"_redacted\""));
    assert!(
        agentmesh_tests::agentmesh::prometheus_text_problems(&anonymous).is_empty(),
        "{:?}",
        agentmesh_tests::agentmesh::prometheus_text_problems(&anonymous)
    );
    let operator = token(&[Role::Operator], None);
    let (_, full) =
        agentmesh_runtime::scrape::get_with(&url, Duration::from_secs(5), Some(&operator)).await?;
    assert!(full.contains("namespace=\"acme.private\""), "{full}");
    Ok(())
}

#[tokio::test]
async fn test_tenants_are_isolated_agents_act_as_themselves_and_changes_are_audited()
-> anyhow::Result<()> {
    use agentmesh_proto::cache::v1 as cache;
    use agentmesh_proto::ratelimit::v1 as rl;
    let dir = tempfile::tempdir()?;
    let dev = secured_dev(dir.path()).await?;
    let acme_op = tenant_token("acme-admin", "acme", &[Role::Operator, Role::Service]);
    let beta_op = tenant_token("beta-admin", "beta", &[Role::Operator, Role::Service]);
    let acme = tenant_token("acme-svc", "acme", &[Role::Service]);
    let beta = tenant_token("beta-svc", "beta", &[Role::Service]);
    let operator = token(&[Role::Operator], None);

    // Rate limiter: acme's policy and keys are acme's.
    let mut limiter =
        rl::rate_limiter_client::RateLimiterClient::connect(format!("http://{}", dev.grpc_addr))
            .await?;
    let policy = |namespace: &str| rl::PutPolicyRequest {
        policy: Some(rl::Policy {
            namespace: namespace.into(),
            name: "per-user".into(),
            limit: Some(rl::LimitSpec {
                limit: 10,
                period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..rl::LimitSpec::default()
            }),
            ..rl::Policy::default()
        }),
        expected_version: 0,
    };
    let put = limiter
        .put_policy(with_token(policy("acme"), &acme_op))
        .await;
    assert!(
        !matches!(&put, Err(e) if e.code() == Code::PermissionDenied),
        "{put:?}"
    );
    denied(
        limiter
            .put_policy(with_token(policy("acme"), &beta_op))
            .await,
        "beta overwrites acme's policy",
    );
    denied(
        limiter
            .get_policy(with_token(
                rl::GetPolicyRequest {
                    namespace: "acme".into(),
                    name: "per-user".into(),
                },
                &beta_op,
            ))
            .await,
        "beta reads acme's policy",
    );
    let item = |namespace: &str| rl::CheckItem {
        namespace: namespace.into(),
        key: "user-1".into(),
        cost: 1,
        limit_ref: Some(rl::check_item::LimitRef::Limit(rl::LimitSpec {
            limit: 5,
            period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..rl::LimitSpec::default()
        })),
        ..rl::CheckItem::default()
    };
    limiter
        .check(with_token(
            rl::CheckRequest {
                items: vec![item("acme.api")],
                all_or_nothing: false,
            },
            &acme,
        ))
        .await?;
    denied(
        limiter
            .check(with_token(
                rl::CheckRequest {
                    items: vec![item("beta"), item("acme.api")],
                    all_or_nothing: false,
                },
                &beta,
            ))
            .await,
        "beta spends acme's keys",
    );
    denied(
        limiter
            .reset(with_token(
                rl::ResetRequest {
                    item: Some(item("acme.api")),
                },
                &beta_op,
            ))
            .await,
        "beta resets acme's key",
    );

    // Cache: acme's namespace is acme's.
    let mut cache = cache::cache_coordinator_client::CacheCoordinatorClient::connect(format!(
        "http://{}",
        dev.addrs["cache"].0
    ))
    .await?;
    cache
        .set(with_token(
            cache::SetRequest {
                namespace: "acme.answers".into(),
                key: "q1".into(),
                value: b"secret answer".to_vec(),
                ..cache::SetRequest::default()
            },
            &acme,
        ))
        .await?;
    denied(
        cache
            .get(with_token(
                cache::GetRequest {
                    namespace: "acme.answers".into(),
                    key: "q1".into(),
                    ..cache::GetRequest::default()
                },
                &beta,
            ))
            .await,
        "beta reads acme's cache",
    );
    denied(
        cache
            .invalidate_namespace(with_token(
                cache::InvalidateNamespaceRequest {
                    namespace: "acme.answers".into(),
                },
                &beta_op,
            ))
            .await,
        "beta flushes acme's cache",
    );

    // Event bus: no subscribing across tenants, no forged events in another tenant's space or
    // the cluster's.
    let bus_addr = dev.addrs["eventbus"].0;
    for filter in [">", "acme.>", "*.orders", "sys.>"] {
        denied(
            subscribe(bus_addr, filter, &beta).await,
            &format!("beta subscribes to {filter}"),
        );
    }
    denied(
        subscribe(bus_addr, "sys.>", &token(&[Role::Service], None)).await,
        "a service without the operator role reads sys.>",
    );
    let (_keep, mut acme_stream) = subscribe(bus_addr, "acme.orders.>", &acme).await?;
    let mut publisher =
        bus::event_bus_client::EventBusClient::connect(format!("http://{bus_addr}")).await?;
    let event = |subject: &str| bus::PublishRequest {
        event: Some(bus::Event {
            subject: subject.into(),
            data: b"{}".to_vec(),
            ..bus::Event::default()
        }),
    };
    denied(
        publisher
            .publish(with_token(event("acme.orders.new"), &beta))
            .await,
        "beta publishes into acme's subjects",
    );
    denied(
        publisher
            .publish(with_token(event("sys.audit.ratelimit.PutPolicy"), &beta))
            .await,
        "beta forges an audit event",
    );
    publisher
        .publish(with_token(event("acme.orders.new"), &acme))
        .await?;
    let delivered = agentmesh_tests::bus::first_event(&mut acme_stream, Duration::from_secs(10))
        .await?
        .expect("acme's own event");
    assert_eq!(delivered.subject, "acme.orders.new");

    // Agents act only as the agent id their token names.
    let mut scheduler = sched::scheduler_client::SchedulerClient::connect(format!(
        "http://{}",
        dev.addrs["scheduler"].0
    ))
    .await?;
    let agent_a = token(&[Role::Agent], Some("agent-a"));
    let register = |agent_id: &str| sched::RegisterAgentRequest {
        agent_id: agent_id.into(),
        r#type: "worker".into(),
        capacity: 1,
        ..sched::RegisterAgentRequest::default()
    };
    denied(
        scheduler
            .register_agent(with_token(register("agent-b"), &agent_a))
            .await,
        "agent-a registers as agent-b",
    );
    let epoch = scheduler
        .register_agent(with_token(register("agent-a"), &agent_a))
        .await?
        .into_inner()
        .epoch;
    let hello = |agent_id: &str| sched::HeartbeatRequest {
        kind: Some(sched::heartbeat_request::Kind::Hello(sched::Hello {
            agent_id: agent_id.into(),
            epoch,
        })),
    };
    denied(
        scheduler
            .heartbeat(with_token(
                tokio_stream::iter(vec![hello("agent-b")]),
                &agent_a,
            ))
            .await,
        "agent-a takes agent-b's tasks",
    );
    denied(
        scheduler
            .deregister_agent(with_token(
                sched::DeregisterAgentRequest {
                    agent_id: "agent-b".into(),
                    epoch: 0,
                },
                &agent_a,
            ))
            .await,
        "agent-a deregisters agent-b",
    );

    // Scheduler: a tenant's tasks and agents are invisible to another tenant.
    let task_id = scheduler
        .submit_task(with_token(
            sched::SubmitTaskRequest {
                r#type: "acme-job".into(),
                payload: b"acme's payload".to_vec(),
                ..sched::SubmitTaskRequest::default()
            },
            &acme,
        ))
        .await?
        .into_inner()
        .task_id;
    let seen = scheduler
        .get_task(with_token(
            sched::GetTaskRequest {
                task_id: task_id.clone(),
            },
            &acme,
        ))
        .await?
        .into_inner();
    assert_eq!(
        seen.labels.get("agentmesh.tenant").map(String::as_str),
        Some("acme")
    );
    let e = scheduler
        .get_task(with_token(
            sched::GetTaskRequest {
                task_id: task_id.clone(),
            },
            &beta,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "beta reads acme's task: {e:?}");
    let e = scheduler
        .cancel_task(with_token(
            sched::CancelTaskRequest {
                task_id: task_id.clone(),
                reason: "sabotage".into(),
            },
            &beta,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "beta cancels acme's task: {e:?}");
    let listed = scheduler
        .list_tasks(with_token(sched::ListTasksRequest::default(), &beta))
        .await?
        .into_inner();
    assert!(
        listed.tasks.iter().all(|t| t.task_id != task_id),
        "beta lists acme's task"
    );
    let mut claims = claims_of("acme-agent", &[Role::Agent]);
    claims.tenant = Some("acme".into());
    claims.agent_id = Some("acme-agent".into());
    let acme_agent = issue_hs256(SECRET.as_bytes(), &claims).expect("signed");
    scheduler
        .register_agent(with_token(register("acme-agent"), &acme_agent))
        .await?;
    let agents = scheduler
        .list_agents(with_token(sched::ListAgentsRequest::default(), &beta))
        .await?
        .into_inner();
    assert!(
        agents.agents.iter().all(|a| a.agent_id != "acme-agent"),
        "beta sees acme's agent"
    );
    let agents = scheduler
        .list_agents(with_token(sched::ListAgentsRequest::default(), &operator))
        .await?
        .into_inner();
    assert!(agents.agents.iter().any(|a| a.agent_id == "acme-agent"));

    // The audit trail: the allowed and the refused policy writes, with who, what and outcome.
    let (_keep_audit, mut audit) = subscribe(bus_addr, "sys.audit.>", &operator).await?;
    let records = tokio::time::timeout(Duration::from_secs(15), async {
        let mut records: Vec<serde_json::Value> = Vec::new();
        while let Some(Ok(m)) = audit.next().await {
            if let Some(bus::subscribe_response::Kind::Deliveries(d)) = m.kind {
                for e in d.deliveries.into_iter().filter_map(|d| d.event) {
                    records.push(serde_json::from_slice(&e.data).expect("JSON record"));
                }
            }
            let puts = records
                .iter()
                .filter(|r| r["method"] == "PutPolicy")
                .count();
            if puts >= 2 && records.iter().any(|r| r["method"] == "InvalidateNamespace") {
                return records;
            }
        }
        records
    })
    .await?;
    let find = |subject: &str, method: &str| {
        records
            .iter()
            .find(|r| r["subject"] == subject && r["method"] == method)
            .unwrap_or_else(|| panic!("no {method} record of {subject}: {records:#?}"))
    };
    let allowed = find("acme-admin", "PutPolicy");
    assert_eq!(allowed["tenant"], "acme");
    assert_eq!(allowed["target"], "acme/per-user");
    assert_eq!(allowed["service"], "agentmesh.ratelimit.v1.RateLimiter");
    assert_ne!(allowed["outcome"], "PERMISSION_DENIED");
    assert_eq!(
        allowed["trace_id"].as_str().map(str::len),
        Some(32),
        "{allowed}"
    );
    let refused = find("beta-admin", "PutPolicy");
    assert_eq!(refused["outcome"], "PERMISSION_DENIED");
    assert_eq!(refused["target"], "acme/per-user");
    assert_eq!(
        find("beta-admin", "InvalidateNamespace")["outcome"],
        "PERMISSION_DENIED"
    );

    // Every state-changing RPC of every service lands in the trail (each called once by an
    // operator with an empty request: whatever the outcome, it is recorded).
    let audited: [(&str, &str, &[&str]); 6] = [
        (
            "ratelimit",
            "agentmesh.ratelimit.v1.RateLimiter",
            agentmesh_ratelimit::grpc::AUDITED,
        ),
        (
            "eventbus",
            "agentmesh.eventbus.v1.EventBus",
            agentmesh_eventbus::grpc::AUDITED,
        ),
        (
            "scheduler",
            "agentmesh.scheduler.v1.Scheduler",
            agentmesh_scheduler::grpc::AUDITED,
        ),
        (
            "scheduler",
            "agentmesh.rules.v1.Rules",
            agentmesh_scheduler::rules::grpc::AUDITED,
        ),
        (
            "cache",
            "agentmesh.cache.v1.CacheCoordinator",
            agentmesh_cache::grpc::AUDITED,
        ),
        (
            "health",
            "agentmesh.health.v1.HealthAggregator",
            agentmesh_health::grpc::AUDITED,
        ),
    ];
    let mut expected = Vec::new();
    for (name, service, methods) in audited {
        for method in methods {
            let path: &'static str = Box::leak(format!("/{service}/{method}").into_boxed_str());
            raw::streaming_with(dev.addrs[name].0, path, vec![Vec::new()], Some(&operator)).await?;
            expected.push((service, *method));
        }
    }
    let mut seen: Vec<(String, String)> = Vec::new();
    let all_seen = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if expected
                .iter()
                .all(|(s, m)| seen.iter().any(|(ss, mm)| ss == s && mm == m))
            {
                return;
            }
            let Some(Ok(m)) = audit.next().await else {
                return;
            };
            if let Some(bus::subscribe_response::Kind::Deliveries(d)) = m.kind {
                for e in d.deliveries.into_iter().filter_map(|d| d.event) {
                    let r: serde_json::Value =
                        serde_json::from_slice(&e.data).expect("JSON record");
                    assert_eq!(
                        e.subject,
                        format!(
                            "sys.audit.{}.{}",
                            agentmesh_runtime::audit::subject_service(
                                r["service"].as_str().unwrap_or_default()
                            ),
                            r["method"].as_str().unwrap_or_default()
                        )
                    );
                    seen.push((
                        r["service"].as_str().unwrap_or_default().to_owned(),
                        r["method"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
        }
    })
    .await;
    let missing: Vec<_> = expected
        .iter()
        .filter(|(s, m)| !seen.iter().any(|(ss, mm)| ss == s && mm == m))
        .collect();
    assert!(
        all_seen.is_ok() && missing.is_empty(),
        "no audit record of {missing:?}"
    );

    // `meshctl audit tail` reads the same records with an operator's token.
    let out = std::process::Command::new(agentmesh_tests::agentmesh::binary("meshctl")?)
        .args([
            "audit",
            "tail",
            "--addr",
            &bus_addr.to_string(),
            "--since",
            "10m",
            "--method",
            "PutPolicy",
        ])
        .env("AGENTMESH_TOKEN", &operator)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ratelimit/PutPolicy"), "{stdout}");
    assert!(stdout.contains("acme-admin (acme)"), "{stdout}");
    assert!(stdout.contains("PERMISSION_DENIED"), "{stdout}");
    // Without a token, meshctl is refused like any caller.
    let out = std::process::Command::new(agentmesh_tests::agentmesh::binary("meshctl")?)
        .args(["audit", "tail", "--addr", &bus_addr.to_string()])
        .env_remove("AGENTMESH_TOKEN")
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn test_an_sdk_agent_joins_with_its_token_file_and_only_as_itself() -> anyhow::Result<()> {
    use agentmesh_agent::{Agent, AgentConfig, AgentError, TokenSource};
    let dir = tempfile::tempdir()?;
    let dev = secured_dev(dir.path()).await?;
    let scheduler = format!("http://{}", dev.addrs["scheduler"].0);
    let token_file = dir.path().join("agent-1.token");
    std::fs::write(&token_file, token(&[Role::Agent], Some("agent-1")))?;
    let agent = |agent_id: &str, source: TokenSource| {
        Agent::new(AgentConfig {
            scheduler: scheduler.clone(),
            agent_id: agent_id.into(),
            agent_type: "sdk".into(),
            token: Some(source),
            ..AgentConfig::default()
        })
        .handle("echo", |t| async move { Ok(t.payload) })
    };
    // An agent whose token names another agent is refused for good, not retried forever.
    let impostor = agent("agent-2", TokenSource::File(token_file.clone()));
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        impostor.run(tokio_util::sync::CancellationToken::new()),
    )
    .await?;
    assert!(
        matches!(refused, Err(AgentError::Refused(_))),
        "{refused:?}"
    );

    // With its own token it registers, takes a task and reports the result.
    let stop = tokio_util::sync::CancellationToken::new();
    let own = agent("agent-1", TokenSource::File(token_file));
    tokio::spawn({
        let stop = stop.clone();
        async move { own.run(stop).await }
    });
    let service = token(&[Role::Service], None);
    let mut client = sched::scheduler_client::SchedulerClient::connect(scheduler.clone()).await?;
    let task_id = client
        .submit_task(with_token(
            sched::SubmitTaskRequest {
                r#type: "echo".into(),
                payload: b"ping".to_vec(),
                ..sched::SubmitTaskRequest::default()
            },
            &service,
        ))
        .await?
        .into_inner()
        .task_id;
    let done = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let task = client
                .get_task(with_token(
                    sched::GetTaskRequest {
                        task_id: task_id.clone(),
                    },
                    &service,
                ))
                .await?
                .into_inner();
            if task.state == sched::TaskState::Succeeded as i32 {
                return anyhow::Ok(task);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await??;
    assert_eq!(done.output, b"ping");
    stop.cancel();
    Ok(())
}

/// base64url without padding.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An ES256 key: its JWK (public, with `kid`) and a token signer.
fn es256_key(kid: &str) -> anyhow::Result<(serde_json::Value, jsonwebtoken::EncodingKey)> {
    let key = rcgen::KeyPair::generate()?;
    let raw = key.public_key_raw();
    anyhow::ensure!(
        raw.len() == 65 && raw[0] == 4,
        "an uncompressed P-256 point"
    );
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65]),
    });
    let signer = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
    Ok((jwk, signer))
}

fn es256_token(kid: &str, signer: &jsonwebtoken::EncodingKey) -> anyhow::Result<String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        &TokenClaims::new("jwks-test", &[Role::Service], Duration::from_secs(600)),
        signer,
    )?)
}

#[tokio::test]
async fn test_keys_come_from_a_jwks_url_and_rotate_without_a_restart() -> anyhow::Result<()> {
    let (jwk1, key1) = es256_key("k1")?;
    let (jwk2, key2) = es256_key("k2")?;
    let document = std::sync::Arc::new(parking_lot::Mutex::new(
        serde_json::json!({ "keys": [jwk1] }).to_string(),
    ));
    // The issuer's JWKS endpoint: plain HTTP on loopback, answering the current document.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr()?);
    tokio::spawn({
        let document = document.clone();
        async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut socket, _)) = listener.accept().await {
                let body = document.lock().clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = socket.read(&mut buf).await;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        }
    });
    let dev = AgentmeshProcess::dev_with_env(&[
        ("AGENTMESH_AUTH", "required"),
        ("AGENTMESH_AUTH_JWKS_URL", &url),
        ("AGENTMESH_AUTH_JWKS_REFRESH", "1s"),
    ])
    .await?;
    let mut scheduler = sched::scheduler_client::SchedulerClient::connect(format!(
        "http://{}",
        dev.addrs["scheduler"].0
    ))
    .await?;
    let (token1, token2) = (es256_token("k1", &key1)?, es256_token("k2", &key2)?);
    let call = |token: String| {
        let mut scheduler = scheduler.clone();
        async move {
            scheduler
                .get_pool_stats(with_token(sched::GetPoolStatsRequest::default(), &token))
                .await
                .map(|_| ())
        }
    };
    call(token1.clone()).await?;
    let e = call(token2.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The issuer rotates to k2: picked up at the next refresh, k1 then refused.
    *document.lock() = serde_json::json!({ "keys": [jwk2] }).to_string();
    let rotated = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if call(token2.clone()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(rotated.is_ok(), "the rotated key was not picked up");
    let e = call(token1).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let _ = scheduler
        .get_pool_stats(with_token(sched::GetPoolStatsRequest::default(), &token2))
        .await?;
    Ok(())
}
