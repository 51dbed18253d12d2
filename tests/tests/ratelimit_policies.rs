//! Policies stored in etcd: written through one instance, applied by every instance within a
//! second, versioned, validated, and deleted — with two real `agentmesh` processes.

use std::time::{Duration, Instant};

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_tests::agentmesh::AgentmeshProcess;
use agentmesh_tests::{EtcdServer, wait_until};
use tonic::Code;
use tonic_types::StatusExt;

type Client = pb::rate_limiter_client::RateLimiterClient<tonic::transport::Channel>;

async fn client(process: &AgentmeshProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(format!("http://{}", process.grpc_addr)).await?)
}

fn policy(limit: u64) -> pb::Policy {
    pb::Policy {
        namespace: "team-a".into(),
        name: "llm-requests".into(),
        limit: Some(pb::LimitSpec {
            limit,
            period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            burst: 0,
            algorithm: pb::Algorithm::Gcra as i32,
        }),
        consistency: pb::Consistency::Local as i32,
        ..Default::default()
    }
}

async fn check(client: &mut Client, namespace: &str) -> Result<pb::CheckResult, tonic::Status> {
    let item = pb::CheckItem {
        namespace: namespace.into(),
        key: "agent-1".into(),
        cost: 0,
        limit_ref: Some(pb::check_item::LimitRef::Policy("llm-requests".into())),
        ..Default::default()
    };
    let response = client
        .check(pb::CheckRequest {
            items: vec![item],
            all_or_nothing: false,
        })
        .await?;
    Ok(response.into_inner().results.remove(0))
}

#[tokio::test]
async fn test_a_policy_put_on_one_instance_is_applied_by_every_instance_within_a_second()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let a = AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &[]).await?;
    let b = AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &[]).await?;
    let (mut ca, mut cb) = (client(&a).await?, client(&b).await?);
    assert_eq!(
        check(&mut cb, "team-a").await.unwrap_err().code(),
        Code::NotFound
    );

    let stored = ca
        .put_policy(pb::PutPolicyRequest {
            policy: Some(policy(10)),
            expected_version: 0,
        })
        .await?
        .into_inner();
    assert!(stored.version > 0);
    let written = Instant::now();
    wait_until(
        Duration::from_secs(1),
        "policy applied on instance b",
        || {
            let mut cb = cb.clone();
            async move { check(&mut cb, "team-a").await.is_ok_and(|r| r.limit == 10) }
        },
    )
    .await?;
    let applied_in = written.elapsed();
    let result = check(&mut cb, "team-a").await?;
    assert_eq!(
        (result.policy.as_str(), result.policy_version),
        ("llm-requests", stored.version)
    );
    assert_eq!(
        check(&mut cb, "team-b").await.unwrap_err().code(),
        Code::NotFound,
        "scoped to its namespace"
    );

    // A conditional update with a stale version is refused; with the right one it applies.
    let stale = ca
        .put_policy(pb::PutPolicyRequest {
            policy: Some(policy(20)),
            expected_version: stored.version + 1,
        })
        .await;
    assert_eq!(stale.unwrap_err().code(), Code::Aborted);
    let updated = cb
        .put_policy(pb::PutPolicyRequest {
            policy: Some(policy(20)),
            expected_version: stored.version,
        })
        .await?
        .into_inner();
    wait_until(
        Duration::from_secs(1),
        "update applied on instance a",
        || {
            let mut ca = ca.clone();
            async move {
                check(&mut ca, "team-a")
                    .await
                    .is_ok_and(|r| r.limit == 20 && r.policy_version == updated.version)
            }
        },
    )
    .await?;

    let got = ca
        .get_policy(pb::GetPolicyRequest {
            namespace: "team-a".into(),
            name: "llm-requests".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        (got.version, got.consistency),
        (updated.version, pb::Consistency::Local as i32)
    );
    let listed = cb
        .list_policies(pb::ListPoliciesRequest {
            namespace: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(listed.policies.len(), 1);

    ca.delete_policy(pb::DeletePolicyRequest {
        namespace: "team-a".into(),
        name: "llm-requests".into(),
        expected_version: 0,
    })
    .await?;
    wait_until(Duration::from_secs(1), "delete applied on instance b", || {
        let mut cb = cb.clone();
        async move { matches!(check(&mut cb, "team-a").await, Err(s) if s.code() == Code::NotFound) }
    })
    .await?;
    let again = ca
        .delete_policy(pb::DeletePolicyRequest {
            namespace: "team-a".into(),
            name: "llm-requests".into(),
            expected_version: 0,
        })
        .await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);
    eprintln!("policy applied on the other instance after {applied_in:?}");
    Ok(())
}

#[tokio::test]
async fn test_invalid_policies_are_rejected_naming_every_field() -> anyhow::Result<()> {
    let process = AgentmeshProcess::dev().await?;
    let mut c = client(&process).await?;
    let mut bad = policy(0);
    bad.namespace = "a/b".into();
    bad.name = "has space".into();
    bad.mode = 9;
    let status = c
        .put_policy(pb::PutPolicyRequest {
            policy: Some(bad),
            expected_version: 0,
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
            "policy.limit.limit",
            "policy.mode",
            "policy.name",
            "policy.namespace"
        ],
        "every problem is reported at once: {fields:?}"
    );
    let mut bad = policy(0);
    bad.namespace = "a/b".into();
    bad.name = "has space".into();
    let status = c
        .put_policy(pb::PutPolicyRequest {
            policy: Some(bad),
            expected_version: 0,
        })
        .await
        .unwrap_err();
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
        ["policy.limit.limit", "policy.name", "policy.namespace"]
    );
    let missing = c
        .put_policy(pb::PutPolicyRequest {
            policy: None,
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let empty = c
        .get_policy(pb::GetPolicyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    Ok(())
}

#[tokio::test]
async fn test_standalone_mode_stores_policies_in_memory() -> anyhow::Result<()> {
    let process = AgentmeshProcess::dev().await?;
    let mut c = client(&process).await?;
    c.put_policy(pb::PutPolicyRequest {
        policy: Some(policy(5)),
        expected_version: 0,
    })
    .await?;
    wait_until(Duration::from_secs(1), "policy applied", || {
        let mut c = c.clone();
        async move { check(&mut c, "team-a").await.is_ok_and(|r| r.limit == 5) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn test_policy_calls_bound_every_field_and_never_echo_oversized_input() -> anyhow::Result<()>
{
    let process = AgentmeshProcess::dev().await?;
    let mut c = client(&process).await?;
    let huge = "x".repeat(1_000_000);
    let field_of = |status: &tonic::Status| -> Vec<String> {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().len() < 1024,
            "the message echoes the input"
        );
        status
            .get_error_details()
            .bad_request()
            .expect("field details")
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect()
    };
    let get = |namespace: &str, name: &str| pb::GetPolicyRequest {
        namespace: namespace.into(),
        name: name.into(),
    };
    for (request, fields) in [
        (get("fz", &huge), vec!["name"]),
        (get(&huge, "x"), vec!["namespace"]),
        (get("fz", "a\0b"), vec!["name"]),
        (get("a/b", "x"), vec!["namespace"]),
    ] {
        let status = c.get_policy(request).await.unwrap_err();
        assert_eq!(field_of(&status), fields);
    }
    let status = c
        .delete_policy(pb::DeletePolicyRequest {
            namespace: huge.clone(),
            name: "x".into(),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&status), ["namespace"]);
    let status = c
        .list_policies(pb::ListPoliciesRequest {
            namespace: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&status), ["namespace"]);
    Ok(())
}
