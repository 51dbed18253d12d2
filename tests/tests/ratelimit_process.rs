//! End to end with real processes: `agentmesh serve ratelimit` against a real etcd, `agentmesh
//! dev` with nothing else running, health probes, metrics, and exit codes.

use std::time::Duration;

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_tests::agentmesh::{
    AgentmeshProcess, http_get, prometheus_text_problems, run_binary,
};
use agentmesh_tests::{EtcdServer, wait_until};
use etcd_client::GetOptions;

const MEMBERS: &str = "/agentmesh/members/ratelimit/";

async fn member_keys(etcd: &EtcdServer) -> Vec<String> {
    let Ok(mut client) = etcd.client().await else {
        return Vec::new();
    };
    match client
        .get(MEMBERS, Some(GetOptions::new().with_prefix()))
        .await
    {
        Ok(resp) => resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn check_once(addr: std::net::SocketAddr) -> anyhow::Result<pb::CheckResponse> {
    let mut client =
        pb::rate_limiter_client::RateLimiterClient::connect(format!("http://{addr}")).await?;
    let item = pb::CheckItem {
        namespace: "e2e".into(),
        key: "user-1".into(),
        cost: 1,
        ..Default::default()
    };
    Ok(client
        .check(pb::CheckRequest {
            items: vec![item],
            all_or_nothing: false,
        })
        .await?
        .into_inner())
}

#[tokio::test]
async fn test_serve_registers_in_etcd_and_sigterm_removes_the_key_at_once() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut process = AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &[]).await?;
    wait_until(Duration::from_secs(10), "member key in etcd", || async {
        member_keys(&etcd).await.len() == 1
    })
    .await?;
    let mut client = etcd.client().await?;
    let resp = client
        .get(MEMBERS, Some(GetOptions::new().with_prefix()))
        .await?;
    let kv = &resp.kvs()[0];
    assert_ne!(kv.lease(), 0, "the member key is attached to a lease");
    let member: serde_json::Value = serde_json::from_slice(kv.value())?;
    assert_eq!(member["service"], "ratelimit");
    assert_eq!(member["grpc_addr"], process.grpc_addr.to_string());
    assert!(check_once(process.grpc_addr).await?.allowed);

    process.sigterm();
    let status = process.wait_exit(Duration::from_secs(10)).await?;
    assert!(
        status.success(),
        "graceful exit, got {status:?}\n{}",
        process.logs()
    );
    assert!(
        member_keys(&etcd).await.is_empty(),
        "SIGTERM revokes the lease before exiting"
    );
    Ok(())
}

#[tokio::test]
async fn test_kill_9_removes_the_key_within_the_lease_ttl() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut process = AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &[]).await?;
    wait_until(Duration::from_secs(10), "member key in etcd", || async {
        member_keys(&etcd).await.len() == 1
    })
    .await?;
    process.kill9();
    // TTL 2 s; etcd 3.4 may take up to about one more TTL to expire a lease.
    wait_until(Duration::from_secs(8), "member key expired", || async {
        member_keys(&etcd).await.is_empty()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn test_instance_registers_again_after_etcd_restart_with_lost_data() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start().await?;
    let process = AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &[]).await?;
    wait_until(Duration::from_secs(10), "member key in etcd", || async {
        member_keys(&etcd).await.len() == 1
    })
    .await?;
    etcd.restart_wiped().await?;
    wait_until(
        Duration::from_secs(20),
        "member registered again",
        || async { member_keys(&etcd).await.len() == 1 },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", process.logs()))?;
    assert!(
        check_once(process.grpc_addr).await?.allowed,
        "still serving"
    );
    Ok(())
}

#[tokio::test]
async fn test_dev_answers_check_with_no_etcd_and_no_redis() -> anyhow::Result<()> {
    let process = AgentmeshProcess::dev().await?;
    let response = check_once(process.grpc_addr).await?;
    assert!(response.allowed);
    assert_eq!(response.results[0].policy, "default");
    assert_eq!(
        response.results[0].limit, 60,
        "RATE_LIMIT_GLOBAL_CAPACITY default"
    );
    Ok(())
}

#[tokio::test]
async fn test_admin_endpoints_and_probe_report_health() -> anyhow::Result<()> {
    let mut process = AgentmeshProcess::dev().await?;
    let (code, body) = http_get(process.admin_addr, "/livez").await?;
    assert_eq!((code, body.trim()), (200, "ok"));
    wait_until(Duration::from_secs(5), "readyz 200", || async {
        matches!(http_get(process.admin_addr, "/readyz").await, Ok((200, _)))
    })
    .await?;
    check_once(process.grpc_addr).await?;
    let (code, metrics) = http_get(process.admin_addr, "/metrics").await?;
    assert_eq!(code, 200);
    assert_eq!(prometheus_text_problems(&metrics), Vec::<String>::new());
    assert!(metrics.contains(
        "rpc_server_call_duration_seconds_count{rpc_method=\"Check\",rpc_response_status_code=\"OK\",rpc_service=\"agentmesh.ratelimit.v1.RateLimiter\"} 1"
    ), "{metrics}");
    assert!(
        metrics.contains("ratelimit_decisions_total{consistency=\"local\",namespace=\"e2e\",policy=\"default\",result=\"allow\"} 1"),
        "{metrics}"
    );

    let addr = process.grpc_addr.to_string();
    let (code, out, _) = run_binary("agentmesh", &["probe", &addr])?;
    assert_eq!((code, out.trim()), (0, "SERVING"));
    let (code, out, _) = run_binary(
        "agentmesh",
        &[
            "probe",
            &addr,
            "--service",
            "agentmesh.ratelimit.v1.RateLimiter",
        ],
    )?;
    assert_eq!((code, out.trim()), (0, "SERVING"));
    let (code, _, _) = run_binary(
        "agentmesh",
        &["probe", &addr, "--service", "no.such.Service"],
    )?;
    assert_eq!(code, 1);

    process.sigterm();
    process.wait_exit(Duration::from_secs(10)).await?;
    let (code, out, _) = run_binary("agentmesh", &["probe", &addr, "--timeout", "500ms"])?;
    assert_eq!(code, 1, "nothing listens any more: {out}");
    Ok(())
}

#[tokio::test]
async fn test_invalid_configuration_exits_64_with_one_line() -> anyhow::Result<()> {
    let (code, _, err) = run_binary("agentmesh", &["serve", "ratelimit", "--lease-ttl", "soon"])?;
    assert_eq!(code, 64);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--lease-ttl"), "{err}");
    let (code, _, err) = run_binary("agentmesh", &["serve", "gateway"])?;
    assert_eq!(code, 64);
    assert!(err.contains("not built yet"), "{err}");
    let (code, _, err) = run_binary("agentmesh", &["serve", "health", "--health-fall", "0"])?;
    assert_eq!(code, 64);
    assert!(err.contains("--health-fall"), "{err}");
    let (code, _, err) = run_binary(
        "agentmesh",
        &["serve", "ratelimit", "--ratelimit-default-capacity", "0"],
    )?;
    assert_eq!(code, 64, "{err}");
    Ok(())
}

#[tokio::test]
async fn test_unreachable_etcd_fails_start_with_exit_69() -> anyhow::Result<()> {
    let port = agentmesh_tests::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (code, _, err) = run_binary(
        "agentmesh",
        &[
            "serve",
            "ratelimit",
            "--etcd",
            &endpoint,
            "--ratelimit-listen",
            "127.0.0.1:0",
            "--ratelimit-admin-listen",
            "127.0.0.1:0",
        ],
    )?;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("etcd"), "{err}");
    Ok(())
}

#[tokio::test]
async fn test_meshctl_members_and_ratelimit_check() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let process = AgentmeshProcess::serve_ratelimit(Some(&etcd.endpoint()), &[]).await?;
    wait_until(Duration::from_secs(10), "member key in etcd", || async {
        member_keys(&etcd).await.len() == 1
    })
    .await?;
    let endpoint = etcd.endpoint();
    let (code, out, err) = run_binary("meshctl", &["members", "--etcd", &endpoint, "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    let members: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(members[0]["grpc_addr"], process.grpc_addr.to_string());
    let (code, out, _) = run_binary("meshctl", &["members", "--etcd", &endpoint])?;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("SERVICE") && out.contains("ratelimit"),
        "{out}"
    );

    let addr = process.grpc_addr.to_string();
    let args = [
        "ratelimit",
        "check",
        "--addr",
        &addr,
        "-n",
        "ops",
        "-k",
        "deploy",
        "--limit",
        "1",
        "--period",
        "1m",
    ];
    let (code, out, _) = run_binary("meshctl", &args)?;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW"), "{out}");
    let (code, out, _) = run_binary("meshctl", &args)?;
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("DENY"), "{out}");
    Ok(())
}
