//! Three real rate-limiter processes sharing etcd (and Redis): OWNER and STRICT admit at most
//! the limit across instances; a killed owner is replaced within the lease TTL while checks
//! keep being answered; with Redis stopped every failure policy answers within its budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_tests::agentmesh::{AgentmeshProcess, http_get};
use agentmesh_tests::{EtcdServer, RedisServer, wait_until};

type Client = pb::rate_limiter_client::RateLimiterClient<tonic::transport::Channel>;

async fn client(process: &AgentmeshProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{}", process.grpc_addr)).await?)
}

fn item(
    key: &str,
    limit: u64,
    consistency: pb::Consistency,
    on_failure: pb::FailurePolicy,
) -> pb::CheckItem {
    pb::CheckItem {
        namespace: "cluster".into(),
        key: key.into(),
        cost: 1,
        limit_ref: Some(pb::check_item::LimitRef::Limit(pb::LimitSpec {
            limit,
            period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            burst: 0,
            algorithm: pb::Algorithm::Gcra as i32,
        })),
        consistency: consistency as i32,
        on_failure: on_failure as i32,
        ..Default::default()
    }
}

async fn check(client: &mut Client, item: pb::CheckItem) -> Result<pb::CheckResult, tonic::Status> {
    let response = client
        .check(pb::CheckRequest {
            items: vec![item],
            all_or_nothing: false,
        })
        .await?;
    Ok(response.into_inner().results.remove(0))
}

async fn start_three(
    etcd: &EtcdServer,
    redis: Option<&RedisServer>,
) -> anyhow::Result<Vec<AgentmeshProcess>> {
    start_three_with(etcd, redis, &[]).await
}

async fn start_three_with(
    etcd: &EtcdServer,
    redis: Option<&RedisServer>,
    more: &[&str],
) -> anyhow::Result<Vec<AgentmeshProcess>> {
    let url = redis.map(RedisServer::url);
    let mut extra = vec!["--ratelimit-budget", "50ms"];
    if let Some(url) = url.as_deref() {
        extra.extend(["--redis", url]);
    }
    extra.extend_from_slice(more);
    let mut processes = Vec::new();
    for _ in 0..3 {
        processes.push(AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &extra).await?);
    }
    // Every instance must see all three before ownership is stable.
    let mut c = etcd.client().await?;
    wait_until(Duration::from_secs(10), "three members in etcd", || {
        let mut c = c.clone();
        async move {
            c.get(
                "/agentmesh/members/ratelimit/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .is_ok_and(|r| r.kvs().len() == 3)
        }
    })
    .await?;
    let _ = &mut c;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(processes)
}

/// Many concurrent clients spread over the instances; returns how many checks were allowed.
async fn hammer(
    processes: &[AgentmeshProcess],
    make: impl Fn() -> pb::CheckItem,
    total: u64,
) -> anyhow::Result<u64> {
    let allowed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..24u64 {
        let mut c = client(&processes[usize::try_from(t % 3)?]).await?;
        let item = make();
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / 24 {
                let r = check(&mut c, item.clone()).await.expect("answered");
                assert!(
                    !r.degraded,
                    "not degraded while the cluster is healthy: {r:?}"
                );
                if r.decision == pb::Decision::Allow as i32 {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(allowed.load(Ordering::Relaxed))
}

#[tokio::test]
async fn test_owner_and_strict_admit_at_most_the_limit_across_three_instances() -> anyhow::Result<()>
{
    let etcd = EtcdServer::start().await?;
    let redis = RedisServer::start().await?;
    let processes = start_three(&etcd, Some(&redis)).await?;
    let owner = hammer(
        &processes,
        || {
            item(
                "owned-key",
                100,
                pb::Consistency::Owner,
                pb::FailurePolicy::FailClosed,
            )
        },
        480,
    )
    .await?;
    assert_eq!(
        owner, 100,
        "OWNER admits exactly the limit while membership is stable"
    );
    // Each decision is counted once, by the instance the client called, not again by the owner.
    let (mut counted, mut allowed) = (0, 0);
    // Each call is timed once too, by the path it took: the owner's third decided where they
    // arrived, the other two thirds forwarded.
    let (mut timed_local, mut timed_forwarded) = (0, 0);
    for p in &processes {
        let (_, text) = agentmesh_tests::agentmesh::http_get(p.admin_addr, "/metrics").await?;
        let metrics = agentmesh_runtime::scrape::parse(&text)?;
        let sum = |name: &str, labels: &[(&str, &str)]| {
            // Counts are whole numbers well under 2^53.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let n = agentmesh_runtime::scrape::sum(&metrics, name, labels) as u64;
            n
        };
        let timed = "ratelimit_check_duration_seconds_count";
        timed_local += sum(timed, &[("path", "local")]);
        timed_forwarded += sum(timed, &[("path", "forwarded")]);
        let owner = [
            ("consistency", "owner"),
            ("namespace", "cluster"),
            ("policy", "_inline"),
        ];
        counted += sum("ratelimit_decisions_total", &owner);
        allowed += sum(
            "ratelimit_decisions_total",
            &[owner.as_slice(), &[("result", "allow")]].concat(),
        );
    }
    assert_eq!(
        (counted, allowed),
        (480, 100),
        "decisions counted once each"
    );
    assert_eq!(
        (timed_local, timed_forwarded),
        (160, 320),
        "calls timed once each, by path"
    );
    let strict = hammer(
        &processes,
        || {
            item(
                "strict-key",
                100,
                pb::Consistency::Strict,
                pb::FailurePolicy::FailClosed,
            )
        },
        480,
    )
    .await?;
    assert_eq!(strict, 100, "STRICT admits exactly the limit");

    // Every instance names the same decider for an OWNER key.
    let mut deciders = Vec::new();
    for p in &processes {
        let r = check(
            &mut client(p).await?,
            item(
                "who",
                1000,
                pb::Consistency::Owner,
                pb::FailurePolicy::FailClosed,
            ),
        )
        .await?;
        deciders.push(r.decided_by);
    }
    assert!(deciders.iter().all(|d| d == &deciders[0]), "{deciders:?}");
    Ok(())
}

#[tokio::test]
async fn test_a_killed_owner_is_replaced_within_the_lease_ttl_and_checks_keep_being_answered()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut processes = start_three(&etcd, None).await?;
    let key = item(
        "failover",
        1_000_000,
        pb::Consistency::Owner,
        pb::FailurePolicy::LocalFallback,
    );
    let first = check(&mut client(&processes[0]).await?, key.clone()).await?;
    let owner = first.decided_by.clone();
    // Find the owner's process by asking each one who it is (an instance decides its own keys).
    let mut owner_index = None;
    for (i, p) in processes.iter().enumerate() {
        let probe = pb::CheckItem {
            consistency: pb::Consistency::Local as i32,
            ..key.clone()
        };
        if check(&mut client(p).await?, probe).await?.decided_by == owner {
            owner_index = Some(i);
        }
    }
    let owner_index = owner_index.expect("the owner is one of the three");
    processes[owner_index].kill9();
    let survivor = &processes[(owner_index + 1) % 3];
    let mut c = client(survivor).await?;
    let killed = Instant::now();
    let mut degraded = 0;
    loop {
        let started = Instant::now();
        let r = check(&mut c, key.clone())
            .await
            .expect("checks keep being answered");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "answered within the budget"
        );
        assert_eq!(r.decision, pb::Decision::Allow as i32);
        if r.degraded {
            degraded += 1;
            assert_eq!(r.degraded_reason, "owner_unavailable");
        } else if r.decided_by != owner {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "a new owner within the lease TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "new owner after {:?}, {degraded} degraded answers meanwhile",
        killed.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn test_with_redis_stopped_each_failure_policy_answers_within_its_budget()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut redis = RedisServer::start().await?;
    let processes = start_three(&etcd, Some(&redis)).await?;
    let mut c = client(&processes[0]).await?;
    let strict = |key: &str, on_failure| item(key, 30, pb::Consistency::Strict, on_failure);
    assert!(
        !check(&mut c, strict("s", pb::FailurePolicy::FailClosed))
            .await?
            .degraded
    );

    redis.stop();
    for (on_failure, allowed) in [
        (pb::FailurePolicy::FailOpen, true),
        (pb::FailurePolicy::FailClosed, false),
    ] {
        for _ in 0..5 {
            let started = Instant::now();
            let r = check(&mut c, strict("s", on_failure)).await?;
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{on_failure:?} answered in {:?}",
                started.elapsed()
            );
            assert!(r.degraded);
            assert_eq!(r.degraded_reason, "redis_unavailable");
            assert_eq!(
                r.decision == pb::Decision::Allow as i32,
                allowed,
                "{on_failure:?}"
            );
        }
    }
    // LOCAL_FALLBACK enforces limit / N locally: 30 / 3 = 10 on this instance.
    let mut admitted = 0;
    for _ in 0..20 {
        let r = check(&mut c, strict("fallback", pb::FailurePolicy::LocalFallback)).await?;
        assert!(r.degraded);
        if r.decision == pb::Decision::Allow as i32 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "limit divided by the three live members");

    redis.restart().await?;
    wait_until(
        Duration::from_secs(15),
        "STRICT resumes after Redis is back",
        || {
            let mut c = c.clone();
            let item = strict("s", pb::FailurePolicy::FailClosed);
            async move { check(&mut c, item).await.is_ok_and(|r| !r.degraded) }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn test_envoy_rls_is_ok_until_the_limit_then_over_limit_across_instances()
-> anyhow::Result<()> {
    use agentmesh_proto::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor,
    };
    use agentmesh_proto::envoy::service::ratelimit::v3::RateLimitRequest;
    use agentmesh_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use agentmesh_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let etcd = EtcdServer::start().await?;
    let processes = start_three(&etcd, None).await?;
    let name = agentmesh_ratelimit::envoy::descriptor_policy_name(&[("generic_key", Some("api"))]);
    let policy = pb::Policy {
        namespace: "edge".into(),
        name,
        limit: Some(pb::LimitSpec {
            limit: 5,
            period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            burst: 0,
            algorithm: pb::Algorithm::FixedWindow as i32,
        }),
        ..Default::default()
    };
    client(&processes[0])
        .await?
        .put_policy(pb::PutPolicyRequest {
            policy: Some(policy),
            expected_version: 0,
        })
        .await?;
    let request = RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![rate_limit_descriptor::Entry {
                key: "generic_key".into(),
                value: "api".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let mut envoys = Vec::new();
    for p in &processes {
        envoys.push(RateLimitServiceClient::connect(format!("http://{}", p.grpc_addr)).await?);
    }
    // Every instance must have applied the policy before counting starts.
    // A descriptor-level hits_addend of 0 spends nothing (a request-level 0 counts as 1).
    let mut peek = request.clone();
    peek.descriptors[0].hits_addend = Some(0);
    for e in &envoys {
        wait_until(Duration::from_secs(2), "policy applied", || {
            let (mut e, peek) = (e.clone(), peek.clone());
            async move {
                e.should_rate_limit(peek)
                    .await
                    .is_ok_and(|r| r.into_inner().statuses[0].current_limit.is_some())
            }
        })
        .await?;
    }
    let mut codes = Vec::new();
    for i in 0..9 {
        let response = envoys[i % 3]
            .should_rate_limit(request.clone())
            .await?
            .into_inner();
        codes.push(response.overall_code);
    }
    let ok = codes.iter().filter(|c| **c == Code::Ok as i32).count();
    assert_eq!(ok, 5, "five allowed across the instances: {codes:?}");
    assert_eq!(codes[5..], [Code::OverLimit as i32; 4], "{codes:?}");
    Ok(())
}

#[tokio::test]
async fn test_peeks_at_a_stored_fixed_window_policy_spend_nothing_on_any_instance()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let processes = start_three(&etcd, None).await?;
    let policy = pb::Policy {
        namespace: "edge".into(),
        name: "window".into(),
        limit: Some(pb::LimitSpec {
            limit: 5,
            period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            burst: 0,
            algorithm: pb::Algorithm::FixedWindow as i32,
        }),
        ..Default::default()
    };
    client(&processes[0])
        .await?
        .put_policy(pb::PutPolicyRequest {
            policy: Some(policy),
            expected_version: 0,
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peek = pb::CheckItem {
        namespace: "edge".into(),
        key: "generic_key=api".into(),
        cost: 0,
        limit_ref: Some(pb::check_item::LimitRef::Policy("window".into())),
        ..Default::default()
    };
    for p in &processes {
        let r = check(&mut client(p).await?, peek.clone()).await?;
        assert_eq!(r.remaining, 5, "a peek spends nothing: {r:?}");
    }
    Ok(())
}

#[tokio::test]
async fn test_leases_hold_their_limit_across_instances() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let processes = start_three(&etcd, None).await?;
    let acquire = pb::AcquireRequest {
        namespace: "agents".into(),
        key: "llm-slots".into(),
        limit: 2,
        ttl: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        consistency: 0,
    };
    let mut granted = Vec::new();
    let mut deciders = Vec::new();
    for p in &processes {
        let r = client(p)
            .await?
            .acquire(acquire.clone())
            .await?
            .into_inner();
        deciders.push(r.decided_by.clone());
        if r.acquired {
            granted.push(r.lease_id);
        }
    }
    assert_eq!(granted.len(), 2, "two slots across three instances");
    assert!(
        deciders.iter().all(|d| d == &deciders[0]),
        "one owner holds the key's leases: {deciders:?}"
    );
    // A lease taken through one instance is released through another.
    let release = pb::ReleaseRequest {
        namespace: "agents".into(),
        key: "llm-slots".into(),
        lease_id: granted[0].clone(),
        consistency: 0,
    };
    assert_eq!(
        client(&processes[2])
            .await?
            .release(release)
            .await?
            .into_inner()
            .in_use,
        1
    );
    assert!(
        client(&processes[1])
            .await?
            .acquire(acquire)
            .await?
            .into_inner()
            .acquired
    );
    Ok(())
}

#[tokio::test]
async fn test_a_budget_reserved_on_one_instance_is_committed_on_another() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let processes = start_three(&etcd, None).await?;
    let target = Some(pb::BudgetTarget {
        namespace: "team-a".into(),
        key: "monthly-usd".into(),
        budget: Some(pb::BudgetSpec {
            limit: 1_000_000,
            window: pb::BudgetWindow::Month as i32,
        }),
        consistency: 0,
        policy: String::new(),
    });
    let r = client(&processes[0])
        .await?
        .reserve(pb::ReserveRequest {
            target: target.clone(),
            estimate: 300_000,
            ttl: None,
        })
        .await?
        .into_inner();
    assert!(r.granted);
    let usage = client(&processes[1])
        .await?
        .commit(pb::CommitRequest {
            target: target.clone(),
            reservation_id: r.reservation_id,
            actual: 120_000,
        })
        .await?
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        (usage.spent, usage.reserved, usage.remaining),
        (120_000, 0, 880_000)
    );
    let seen = client(&processes[2])
        .await?
        .get_usage(pb::GetUsageRequest {
            target,
            ..Default::default()
        })
        .await?
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        seen.spent, 120_000,
        "every instance sees the owner's ledger"
    );
    Ok(())
}

#[tokio::test]
async fn test_reset_through_any_instance_clears_the_owners_state() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let processes = start_three(&etcd, None).await?;
    let key = item(
        "reset-me",
        2,
        pb::Consistency::Owner,
        pb::FailurePolicy::FailClosed,
    );
    let mut c0 = client(&processes[0]).await?;
    check(&mut c0, key.clone()).await?;
    check(&mut c0, key.clone()).await?;
    assert_eq!(
        check(&mut c0, key.clone()).await?.decision,
        pb::Decision::Deny as i32
    );
    let owner = check(&mut c0, key.clone()).await?.decided_by;
    for p in &processes {
        let r = client(p)
            .await?
            .reset(pb::ResetRequest {
                item: Some(key.clone()),
            })
            .await?
            .into_inner();
        assert_eq!(
            r.decided_by, owner,
            "the owner's state is reset, whoever is called"
        );
    }
    assert_eq!(
        check(&mut c0, key.clone()).await?.decision,
        pb::Decision::Allow as i32
    );
    let peek = client(&processes[1])
        .await?
        .inspect(pb::InspectRequest { item: Some(key) })
        .await?
        .into_inner();
    assert_eq!(peek.result.unwrap().remaining, 1);
    Ok(())
}

fn policy_target(key: &str) -> Option<pb::BudgetTarget> {
    Some(pb::BudgetTarget {
        namespace: "team-b".into(),
        key: key.into(),
        budget: None,
        consistency: 0,
        policy: "daily-tokens".into(),
    })
}

fn namespace_usage(limit: u32, start_after: &str, local: bool) -> pb::GetUsageRequest {
    pb::GetUsageRequest {
        namespace: "team-b".into(),
        limit,
        start_after: start_after.into(),
        consistency: if local {
            pb::Consistency::Local as i32
        } else {
            0
        },
        ..Default::default()
    }
}

fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

#[tokio::test]
async fn test_a_stored_budget_policy_is_used_on_every_instance_and_usage_lists_every_owner()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut processes = start_three(&etcd, None).await?;
    let mut clients = Vec::new();
    for p in &processes {
        clients.push(client(p).await?);
    }
    let policy = pb::Policy {
        namespace: "team-b".into(),
        name: "daily-tokens".into(),
        budget: Some(pb::BudgetSpec {
            limit: 10_000,
            window: pb::BudgetWindow::Day as i32,
        }),
        consistency: pb::Consistency::Owner as i32,
        ..Default::default()
    };
    let stored = clients[0]
        .put_policy(pb::PutPolicyRequest {
            policy: Some(policy),
            expected_version: 0,
        })
        .await?
        .into_inner();
    assert_eq!(stored.budget.map(|b| b.limit), Some(10_000));
    for c in &clients {
        wait_until(Duration::from_secs(2), "budget policy applied", || {
            let mut c = c.clone();
            async move {
                c.get_usage(pb::GetUsageRequest {
                    target: policy_target("probe"),
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        })
        .await?;
    }

    // Reserve through instance 1 and commit through instance 2, for keys spread over owners.
    let keys: Vec<String> = (0..12).map(|i| format!("agent-{i:02}")).collect();
    let mut expected = Vec::new();
    for (i, key) in (0u64..).zip(&keys) {
        let r = clients[1]
            .reserve(pb::ReserveRequest {
                target: policy_target(key),
                estimate: 1_000,
                ttl: None,
            })
            .await?
            .into_inner();
        assert!(r.granted);
        assert_eq!(r.usage.unwrap().limit, 10_000, "the policy's limit");
        let usage = clients[2]
            .commit(pb::CommitRequest {
                target: policy_target(key),
                reservation_id: r.reservation_id,
                actual: 100 + i,
            })
            .await?
            .into_inner()
            .usage
            .unwrap();
        assert_eq!((usage.spent, usage.reserved), (100 + i, 0));
        expected.push((key.clone(), r.decided_by, 100 + i));
    }
    let owners: std::collections::HashSet<&str> = expected
        .iter()
        .map(|(_, owner, _)| owner.as_str())
        .collect();
    assert!(owners.len() >= 2, "keys live on several owners: {owners:?}");

    // The namespace's usage through any instance lists every key where it lives.
    for c in &mut clients {
        let r = c
            .get_usage(namespace_usage(0, "", false))
            .await?
            .into_inner();
        assert!(r.unreachable.is_empty() && !r.truncated, "{r:?}");
        let listed: Vec<(String, String, u64)> = r
            .keys
            .iter()
            .map(|k| {
                assert_eq!(k.window, pb::BudgetWindow::Day as i32);
                assert_eq!(k.usage.unwrap().limit, 10_000);
                (k.key.clone(), k.held_by.clone(), k.usage.unwrap().spent)
            })
            .collect();
        assert_eq!(listed, expected);
    }
    // Pages of five keys.
    let mut paged = Vec::new();
    let mut start_after = String::new();
    loop {
        let page = clients[0]
            .get_usage(namespace_usage(5, &start_after, false))
            .await?
            .into_inner();
        assert!(page.keys.len() <= 5);
        paged.extend(page.keys.into_iter().map(|k| k.key));
        if !page.truncated {
            break;
        }
        start_after = page.next_start_after;
    }
    assert_eq!(paged, keys);
    // LOCAL lists only the instance's own budgets; together they are all of them.
    let mut ids = Vec::new();
    let mut total = 0;
    for c in &mut clients {
        let own = c
            .get_usage(namespace_usage(0, "", true))
            .await?
            .into_inner()
            .keys;
        let holders: std::collections::HashSet<&str> =
            own.iter().map(|k| k.held_by.as_str()).collect();
        assert!(holders.len() <= 1, "{holders:?}");
        ids.push(holders.into_iter().next().map(str::to_owned));
        total += own.len();
    }
    assert_eq!(total, keys.len());

    // A Check naming the budget policy, and other bad input, name the field.
    let item = pb::CheckItem {
        namespace: "team-b".into(),
        key: "agent-00".into(),
        cost: 1,
        limit_ref: Some(pb::check_item::LimitRef::Policy("daily-tokens".into())),
        ..Default::default()
    };
    let status = check(&mut clients[1], item).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["items[0].policy"]);
    let both = pb::Policy {
        limit: Some(pb::LimitSpec {
            limit: 5,
            period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            burst: 0,
            algorithm: 0,
        }),
        ..stored.clone()
    };
    let status = clients[2]
        .put_policy(pb::PutPolicyRequest {
            policy: Some(both),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["policy.budget"]);
    let strict = pb::Policy {
        consistency: pb::Consistency::Strict as i32,
        ..stored.clone()
    };
    let status = clients[2]
        .put_policy(pb::PutPolicyRequest {
            policy: Some(strict),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["policy.consistency"]);
    let status = clients[0]
        .reserve(pb::ReserveRequest {
            target: Some(pb::BudgetTarget {
                policy: "no-such-budget".into(),
                ..policy_target("agent-00").unwrap()
            }),
            estimate: 1,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("target.policy"), "{status:?}");
    let status = clients[0]
        .reserve(pb::ReserveRequest {
            target: Some(pb::BudgetTarget {
                budget: Some(pb::BudgetSpec {
                    limit: 1,
                    window: pb::BudgetWindow::Day as i32,
                }),
                ..policy_target("agent-00").unwrap()
            }),
            estimate: 1,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["target.policy"]);
    let status = clients[1]
        .get_usage(namespace_usage(5_000, "", false))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["limit"]);

    // A member that does not answer makes the listing partial, naming it.
    let (victim, victim_id) = ids
        .iter()
        .enumerate()
        .find_map(|(i, id)| id.clone().map(|id| (i, id)))
        .expect("some instance holds budgets");
    let held_by_victim = expected.iter().filter(|(_, o, _)| *o == victim_id).count();
    processes[victim].kill9();
    let survivor = &mut clients[(victim + 1) % 3];
    let r = survivor
        .get_usage(namespace_usage(0, "", false))
        .await?
        .into_inner();
    assert_eq!(
        r.unreachable,
        std::slice::from_ref(&victim_id),
        "partial: {r:?}"
    );
    assert_eq!(r.keys.len(), keys.len() - held_by_victim);
    assert!(r.keys.iter().all(|k| k.held_by != victim_id));
    Ok(())
}

/// The gRPC health status of `service` on `process`.
async fn health(process: &AgentmeshProcess, service: &str) -> anyhow::Result<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", process.grpc_addr))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    Ok(client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status)
}

#[tokio::test]
async fn test_an_etcd_outage_leaves_every_instance_ready_and_answering() -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut etcd = EtcdServer::start().await?;
    let processes = start_three_with(&etcd, None, &["--lease-ttl", "2s"]).await?;
    let mut clients = Vec::new();
    for p in &processes {
        clients.push(client(p).await?);
    }
    etcd.kill();
    // Well past the 2 s lease (and its keep-alive slack): every lease is lost meanwhile.
    let until = Instant::now() + Duration::from_secs(7);
    let mut lease_lost_seen = [false; 3];
    while Instant::now() < until {
        for (i, p) in processes.iter().enumerate() {
            let (code, _) = http_get(p.admin_addr, "/readyz").await?;
            assert_eq!(code, 200, "instance {i} not ready during the etcd outage");
            assert_eq!(
                health(p, "readiness").await?,
                ServingStatus::Serving as i32,
                "instance {i}: gRPC readiness"
            );
            if health(p, "membership").await? == ServingStatus::NotServing as i32 {
                lease_lost_seen[i] = true;
            }
            let r = check(
                &mut clients[i],
                item(
                    "outage",
                    1_000_000,
                    pb::Consistency::Owner,
                    pb::FailurePolicy::LocalFallback,
                ),
            )
            .await?;
            assert_eq!(r.decision, pb::Decision::Allow as i32);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        lease_lost_seen, [true; 3],
        "every instance noticed its lease was lost (reported under `membership`)"
    );
    etcd.restart().await?;
    for (i, p) in processes.iter().enumerate() {
        wait_until(Duration::from_secs(10), "registered again", || async {
            health(p, "membership").await.ok() == Some(ServingStatus::Serving as i32)
        })
        .await
        .map_err(|e| anyhow::anyhow!("instance {i}: {e}"))?;
    }
    Ok(())
}

/// Checks every key of `keys` through `processes` for `duration` (four tasks per process);
/// returns the allowed count per key and the degraded answers.
async fn allowed_per_key(
    processes: &[&AgentmeshProcess],
    keys: &[pb::CheckItem],
    duration: Duration,
) -> anyhow::Result<(Vec<u64>, u64)> {
    let allowed: Arc<Vec<AtomicU64>> = Arc::new(keys.iter().map(|_| AtomicU64::new(0)).collect());
    let degraded = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for (p, process) in processes.iter().enumerate() {
        for t in 0..4 {
            let mut c = client(process).await?;
            let keys = keys.to_vec();
            let (allowed, degraded) = (allowed.clone(), degraded.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = p * 4 + t;
                while Instant::now() < until {
                    let k = i % keys.len();
                    i += 1;
                    let r = check(&mut c, keys[k].clone()).await.expect("answered");
                    if r.decision == pb::Decision::Allow as i32 {
                        allowed[k].fetch_add(1, Ordering::Relaxed);
                    }
                    if r.degraded {
                        degraded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    Ok((
        allowed.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
        degraded.load(Ordering::Relaxed),
    ))
}

#[tokio::test]
async fn test_a_killed_owners_keys_admit_at_most_one_lost_state_until_its_lease_expires()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut processes = start_three(&etcd, None).await?;
    let keys: Vec<pb::CheckItem> = (0..30)
        .map(|k| {
            item(
                &format!("suspect-{k}"),
                100,
                pb::Consistency::Owner,
                pb::FailurePolicy::LocalFallback,
            )
        })
        .collect();
    // Every key spends its 100 per hour at once, and we learn each key's owner.
    let mut c = client(&processes[0]).await?;
    let mut owner_of_key = Vec::new();
    for key in &keys {
        let all_of_it = pb::CheckItem {
            cost: 100,
            ..key.clone()
        };
        let r = check(&mut c, all_of_it).await?;
        assert_eq!(r.decision, pb::Decision::Allow as i32);
        owner_of_key.push(r.decided_by);
    }
    // The victim: the instance that owns the most keys.
    let mut owners: Vec<String> = owner_of_key.clone();
    owners.sort();
    owners.dedup();
    let victim_id = owners
        .iter()
        .max_by_key(|o| owner_of_key.iter().filter(|x| x == o).count())
        .unwrap()
        .clone();
    let mut victim = None;
    for (i, p) in processes.iter().enumerate() {
        let probe = pb::CheckItem {
            consistency: pb::Consistency::Local as i32,
            cost: 0,
            ..keys[0].clone()
        };
        if check(&mut client(p).await?, probe).await?.decided_by == victim_id {
            victim = Some(i);
        }
    }
    let victim = victim.expect("the victim is one of the three");
    processes[victim].kill9();
    let survivors: Vec<&AgentmeshProcess> = processes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, p)| p)
        .collect();
    // Well past the harness's 2 s lease TTL: the dead owner leaves the ring meanwhile. Before
    // suspicion, each survivor answered its keys by LOCAL_FALLBACK (100/3 each) until then,
    // and the new owner started afresh: 166 per key here, 258-272 with a 10 s TTL.
    let (after, degraded) = allowed_per_key(&survivors, &keys, Duration::from_secs(8)).await?;
    let (mut dead_keys, mut live_keys) = (Vec::new(), Vec::new());
    for (k, owner) in owner_of_key.iter().enumerate() {
        if *owner == victim_id {
            dead_keys.push(after[k]);
        } else {
            live_keys.push(after[k]);
        }
    }
    eprintln!(
        "after kill -9 of the owner of {} of 30 keys: its keys admitted {dead_keys:?}, the others {live_keys:?}; {degraded} degraded answers",
        dead_keys.len()
    );
    // One lost state: the stand-in owner starts the key afresh (100), and keeps it when the
    // dead owner leaves the ring (rendezvous hashing gives it the same owner).
    assert!(
        dead_keys.iter().all(|&n| n <= 110),
        "a dead owner's keys admit at most one lost state: {dead_keys:?}"
    );
    assert!(
        live_keys.iter().all(|&n| n <= 2),
        "the other keys stay at their limit: {live_keys:?}"
    );
    Ok(())
}
