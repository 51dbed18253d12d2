//! Envoy's rate limit service (RLS v3) served in-process through the runtime's server and
//! client stacks, over a limiter whose policies come from a policy file named with
//! `descriptor_policy_name`, on a manual clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::InMemoryMembership;
use agentmesh_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use agentmesh_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use agentmesh_proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use agentmesh_proto::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use agentmesh_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use agentmesh_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use agentmesh_proto::envoy::r#type::v3::RateLimitUnit;
use agentmesh_ratelimit::envoy::{
    EnvoyRlsGrpc, MAX_DESCRIPTOR_ENTRIES, MAX_ENTRY_VALUE_LEN, SERVICE_NAME, descriptor_key,
    descriptor_policy_name, limit_per_unit, unit_period,
};
use agentmesh_ratelimit::spec::{MAX_ITEMS, MAX_LIMIT, is_valid_policy_name};
use agentmesh_ratelimit::{Limiter, LimiterConfig, ManualClock, Policy, PolicySet};
use agentmesh_runtime::server::{self, HostContext, RunningService, ServiceSpec};
use agentmesh_runtime::{ClientChannel, ClientConfig, Metrics, connect_lazy};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code as StatusCode;
use tonic::service::Routes;
use tonic_types::StatusExt;

/// 2024-01-01T00:00:00Z: on a minute, hour and day boundary.
const T0: u64 = 1_704_067_200 * 1_000_000_000;

struct Rls {
    running: RunningService,
    client: RateLimitServiceClient<ClientChannel>,
    clock: Arc<ManualClock>,
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// One `[[policy]]` of a policy file, named for a descriptor path, counted in fixed windows.
fn policy_toml(path: &[(&str, Option<&str>)], limit: u64, period: &str, mode: &str) -> String {
    format!(
        "[[policy]]\nname = \"{}\"\nlimit = {limit}\nperiod = \"{period}\"\nalgorithm = \"fixed_window\"\nmode = \"{mode}\"\n\n",
        descriptor_policy_name(path)
    )
}

/// Serves the Envoy adapter over a limiter with the policies of `policy_file`.
async fn start(policy_file: &str) -> Rls {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.toml");
    std::fs::write(&path, policy_file).unwrap();
    let policies = PolicySet::load_file(&path, Policy::default()).expect("valid policy file");
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Arc::new(Limiter::new(
        &LimiterConfig::default(),
        policies,
        clock.clone(),
    ));
    let metrics = Metrics::new();
    let instance_id = server::new_instance_id("ratelimit");
    let envoy = EnvoyRlsGrpc::new(limiter, &instance_id);
    let spec = ServiceSpec {
        name: "ratelimit",
        instance_id,
        grpc_services: vec![SERVICE_NAME.to_owned()],
        routes: Routes::new(envoy.into_server()),
        grpc_listen: loopback(),
        admin_listen: loopback(),
        admin_routes: None,
        audited: Vec::new(),
        access: Vec::new(),
    };
    let ctx = HostContext {
        metrics: metrics.clone(),
        membership: Arc::new(InMemoryMembership::default()),
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
    let running = server::start(spec, &ctx, &CancellationToken::new())
        .await
        .expect("service starts");
    let channel = connect_lazy(
        &running.grpc_addr.to_string(),
        &ClientConfig::default(),
        &metrics,
    )
    .unwrap();
    Rls {
        running,
        client: RateLimitServiceClient::new(channel),
        clock,
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).into(),
                value: (*value).into(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
    }
}

fn with_override(
    mut d: RateLimitDescriptor,
    requests_per_unit: u32,
    unit: i32,
) -> RateLimitDescriptor {
    d.limit = Some(RateLimitOverride {
        requests_per_unit,
        unit,
    });
    d
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "edge".into(),
        descriptors,
        hits_addend: 0,
    }
}

impl Rls {
    async fn ask(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        self.client
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }

    /// The invalid fields of a request that must fail with INVALID_ARGUMENT.
    async fn invalid_fields(&mut self, request: RateLimitRequest) -> Vec<String> {
        let status = self.client.should_rate_limit(request).await.unwrap_err();
        assert_eq!(status.code(), StatusCode::InvalidArgument, "{status:?}");
        status
            .get_error_details()
            .bad_request()
            .expect("bad request details")
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect()
    }
}

fn seconds(s: &DescriptorStatus) -> i64 {
    s.duration_until_reset
        .expect("duration_until_reset")
        .seconds
}

fn limit_of(s: &DescriptorStatus) -> Option<(&str, u32, Unit)> {
    s.current_limit.as_ref().map(|l| {
        (
            l.name.as_str(),
            l.requests_per_unit,
            Unit::try_from(l.unit).unwrap(),
        )
    })
}

#[tokio::test]
async fn test_descriptor_is_ok_until_its_limit_then_over_limit_until_the_window_ends() {
    let path = [("generic_key", Some("api"))];
    let mut rls = start(&policy_toml(&path, 3, "1m", "enforce")).await;
    let name = descriptor_policy_name(&path);
    rls.clock.advance(Duration::from_secs(15));
    for remaining in [2, 1, 0] {
        let r = rls
            .ask(request(vec![descriptor(&[("generic_key", "api")])]))
            .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        let s = &r.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        assert_eq!(s.limit_remaining, remaining);
        assert_eq!(limit_of(s), Some((name.as_str(), 3, Unit::Minute)));
        assert_eq!(seconds(s), 45, "until the minute ends");
    }
    rls.clock.advance(Duration::from_secs(30));
    let r = rls
        .ask(request(vec![descriptor(&[("generic_key", "api")])]))
        .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let s = &r.statuses[0];
    assert_eq!(
        (s.code, s.limit_remaining, seconds(s)),
        (Code::OverLimit as i32, 0, 15)
    );
    rls.clock.advance(Duration::from_secs(15));
    let r = rls
        .ask(request(vec![descriptor(&[("generic_key", "api")])]))
        .await;
    assert_eq!(r.overall_code, Code::Ok as i32, "a new window");
    assert_eq!(r.statuses[0].limit_remaining, 2);
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_key_value_policy_beats_key_only_policy_and_each_value_counts_separately() {
    let file = [
        policy_toml(&[("remote_address", None)], 3, "1h", "enforce"),
        policy_toml(&[("remote_address", Some("10.0.0.1"))], 1, "1h", "enforce"),
        policy_toml(&[("k", Some("v")), ("x", None)], 5, "1h", "enforce"),
        policy_toml(&[("k", None), ("x", Some("y"))], 7, "1h", "enforce"),
        policy_toml(&[("a", Some("1")), ("b", Some("2"))], 2, "1h", "enforce"),
        policy_toml(&[("a", None), ("b", None)], 4, "1h", "enforce"),
    ]
    .concat();
    let mut rls = start(&file).await;
    let r = rls
        .ask(request(vec![
            descriptor(&[("remote_address", "10.0.0.1")]),
            descriptor(&[("remote_address", "10.0.0.2")]),
            descriptor(&[("remote_address", "10.0.0.3")]),
            // The first entry's value decides before the second's.
            descriptor(&[("k", "v"), ("x", "y")]),
            descriptor(&[("k", "w"), ("x", "y")]),
            // The `a=1` branch has nothing for b=3: fall back to the `a` branch.
            descriptor(&[("a", "1"), ("b", "3")]),
            // A policy only matches a descriptor with as many entries.
            descriptor(&[("remote_address", "10.0.0.1"), ("path", "/")]),
        ]))
        .await;
    let names: Vec<_> = r
        .statuses
        .iter()
        .map(|s| limit_of(s).map(|(name, _, _)| name.to_owned()))
        .collect();
    let expected = [
        Some(vec![("remote_address", Some("10.0.0.1"))]),
        Some(vec![("remote_address", None)]),
        Some(vec![("remote_address", None)]),
        Some(vec![("k", Some("v")), ("x", None)]),
        Some(vec![("k", None), ("x", Some("y"))]),
        Some(vec![("a", None), ("b", None)]),
        None,
    ]
    .map(|path| path.map(|p| descriptor_policy_name(&p)));
    assert_eq!(names, expected);
    let remaining: Vec<_> = r.statuses.iter().map(|s| s.limit_remaining).collect();
    // 10.0.0.2 and 10.0.0.3 each have their own count under the key-only policy.
    assert_eq!(remaining, [0, 2, 2, 4, 6, 3, 0]);
    let r = rls
        .ask(request(vec![descriptor(&[("remote_address", "10.0.0.1")])]))
        .await;
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "limit 1 for 10.0.0.1"
    );
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_unconfigured_descriptor_is_ok_without_current_limit() {
    let mut rls = start(&policy_toml(&[("user", None)], 1, "1m", "enforce")).await;
    for _ in 0..3 {
        let r = rls
            .ask(request(vec![
                descriptor(&[("path", "/")]),
                descriptor(&[("user", "alice"), ("path", "/")]),
                descriptor(&[("default", "x")]),
            ]))
            .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        for s in &r.statuses {
            assert_eq!(s.code, Code::Ok as i32);
            assert_eq!(s.current_limit, None);
            assert_eq!(s.duration_until_reset, None);
        }
    }
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_limit_override_replaces_the_policy_and_zero_denies() {
    let mut rls = start(&policy_toml(&[("user", None)], 100, "1m", "enforce")).await;
    let d = with_override(
        descriptor(&[("user", "alice")]),
        2,
        RateLimitUnit::Hour as i32,
    );
    rls.clock.advance(Duration::from_secs(600));
    for code in [Code::Ok, Code::Ok, Code::OverLimit] {
        let r = rls.ask(request(vec![d.clone()])).await;
        assert_eq!(r.overall_code, code as i32);
        let s = &r.statuses[0];
        assert_eq!(limit_of(s), Some(("", 2, Unit::Hour)));
        assert_eq!(seconds(s), 3000, "a fixed window on the clock hour");
    }
    // The policy's own count was not touched.
    let r = rls
        .ask(request(vec![descriptor(&[("user", "alice")])]))
        .await;
    assert_eq!(r.statuses[0].limit_remaining, 99);

    let deny_all = with_override(descriptor(&[("user", "bob")]), 0, RateLimitUnit::Day as i32);
    let r = rls.ask(request(vec![deny_all.clone()])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(limit_of(&r.statuses[0]), Some(("", 0, Unit::Day)));
    let mut peek = deny_all;
    peek.hits_addend = Some(0);
    let r = rls.ask(request(vec![peek])).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "0 hits spend nothing");
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_hits_come_from_the_descriptor_then_the_request_then_one() {
    let mut rls = start(&policy_toml(&[("k", None)], 10, "1m", "enforce")).await;
    let mut r = request(vec![descriptor(&[("k", "a")]), descriptor(&[("k", "b")])]);
    r.descriptors[0].hits_addend = Some(4);
    let out = rls.ask(r.clone()).await;
    assert_eq!(out.statuses[0].limit_remaining, 6);
    assert_eq!(out.statuses[1].limit_remaining, 9, "request hits unset: 1");
    r.hits_addend = 3;
    r.descriptors[0].hits_addend = Some(0);
    let out = rls.ask(r.clone()).await;
    assert_eq!(
        out.statuses[0].limit_remaining, 6,
        "0 checks without spending"
    );
    assert_eq!(out.statuses[1].limit_remaining, 6);
    r.descriptors[0].hits_addend = Some(7);
    let out = rls.ask(r).await;
    assert_eq!(out.statuses[0].code, Code::OverLimit as i32, "7 > 6 left");
    assert_eq!(
        out.statuses[0].limit_remaining, 6,
        "a denial spends nothing"
    );
    assert_eq!(out.statuses[1].limit_remaining, 3);
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_overall_code_is_over_limit_when_any_descriptor_is_and_shadow_is_ok() {
    let file = [
        policy_toml(&[("tight", None)], 1, "1m", "enforce"),
        policy_toml(&[("loose", None)], 100, "1m", "enforce"),
        policy_toml(&[("observed", None)], 1, "1m", "shadow"),
    ]
    .concat();
    let mut rls = start(&file).await;
    let all = || {
        request(vec![
            descriptor(&[("loose", "x")]),
            descriptor(&[("tight", "x")]),
            descriptor(&[("observed", "x")]),
            descriptor(&[("unconfigured", "x")]),
        ])
    };
    let r = rls.ask(all()).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    let r = rls.ask(all()).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let codes: Vec<_> = r.statuses.iter().map(|s| s.code).collect();
    assert_eq!(
        codes,
        [Code::Ok, Code::OverLimit, Code::Ok, Code::Ok].map(|c| c as i32)
    );
    // The shadow policy is over its limit too, and says so in its count only.
    assert_eq!(r.statuses[2].limit_remaining, 0);
    assert_eq!(
        r.statuses[0].limit_remaining, 98,
        "descriptors are independent"
    );
    let only_shadow = request(vec![descriptor(&[("observed", "x")])]);
    assert_eq!(rls.ask(only_shadow).await.overall_code, Code::Ok as i32);
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_bad_input_is_invalid_argument_naming_every_field() {
    let mut rls = start("").await;
    let long = "x".repeat(MAX_ENTRY_VALUE_LEN);
    let r = RateLimitRequest {
        domain: String::new(),
        descriptors: vec![
            descriptor(&[("k", "v")]),
            descriptor(&[]),
            descriptor(&[("", "v"), ("k", &"v".repeat(MAX_ENTRY_VALUE_LEN + 1))]),
            with_override(descriptor(&[("k", "v")]), 1, RateLimitUnit::Unknown as i32),
            with_override(descriptor(&[("k", "v")]), 1, 42),
            descriptor(&[("a", &long), ("b", &long)]),
            descriptor(&[("k", "v"); MAX_DESCRIPTOR_ENTRIES + 1]),
        ],
        hits_addend: 0,
    };
    assert_eq!(
        rls.invalid_fields(r).await,
        [
            "domain",
            "descriptors[1].entries",
            "descriptors[2].entries[0].key",
            "descriptors[2].entries[1].value",
            "descriptors[3].limit.unit",
            "descriptors[4].limit.unit",
            "descriptors[5].entries",
            "descriptors[6].entries",
        ]
    );
    assert_eq!(rls.invalid_fields(request(vec![])).await, ["descriptors"]);
    let many = request(vec![descriptor(&[("k", "v")]); MAX_ITEMS + 1]);
    assert_eq!(rls.invalid_fields(many).await, ["descriptors"]);
    rls.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn test_health_and_reflection_show_the_envoy_service() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    assert_eq!(SERVICE_NAME, "envoy.service.ratelimit.v3.RateLimitService");
    let rls = start("").await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", rls.running.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            SERVICE_NAME.to_owned(),
        )),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!(
            "expected file descriptors, got {:?}",
            response.message_response
        )
    };
    assert!(!files.file_descriptor_proto.is_empty());
    rls.running.shutdown().await.unwrap();
}

#[test]
fn test_policy_names_escape_separators_and_stay_in_the_policy_charset() {
    assert_eq!(
        descriptor_policy_name(&[("remote_address", Some("10.0.0.1")), ("path", None)]),
        "envoy:remote_address=10%2E0%2E0%2E1.path"
    );
    assert_eq!(
        descriptor_policy_name(&[("a.b", Some("c=d%")), ("k:x", Some("/ü "))]),
        "envoy:a%2Eb=c%3Dd%25.k:x=%2F%C3%BC%20"
    );
    // The key `a.b` is not the path `a`, `b`; the value `v` of `k` is not the key `k=v`.
    assert_ne!(
        descriptor_policy_name(&[("a.b", None)]),
        descriptor_policy_name(&[("a", None), ("b", None)])
    );
    assert_ne!(
        descriptor_policy_name(&[("k", Some("v"))]),
        descriptor_policy_name(&[("k=v", None)])
    );
    // A descriptor key `default` is not the default policy.
    assert_eq!(
        descriptor_policy_name(&[("default", None)]),
        "envoy:default"
    );
    let name = descriptor_policy_name(&[("k", Some("\u{1}x y\t/é"))]);
    assert!(is_valid_policy_name(&name), "{name}");
}

#[test]
fn test_descriptor_keys_are_unambiguous() {
    let key = |entries: &[(&str, &str)]| descriptor_key(&descriptor(entries));
    assert_eq!(
        key(&[("remote_address", "10.0.0.1"), ("path", "/a")]),
        "remote_address=10%2E0%2E0%2E1.path=/a"
    );
    assert_ne!(key(&[("a", "b.c=d")]), key(&[("a", "b"), ("c", "d")]));
    assert_eq!(key(&[("k", "ü\n%")]), "k=ü%0A%25");
}

#[test]
fn test_units_map_to_envoyproxy_ratelimit_periods_and_back() {
    let secs = Duration::from_secs;
    assert_eq!(unit_period("SECOND"), Some(secs(1)));
    assert_eq!(unit_period("minute"), Some(secs(60)));
    assert_eq!(unit_period("Hour"), Some(secs(3_600)));
    assert_eq!(unit_period("day"), Some(secs(86_400)));
    assert_eq!(unit_period("week"), Some(secs(7 * 86_400)));
    assert_eq!(unit_period("month"), Some(secs(30 * 86_400)));
    assert_eq!(unit_period("year"), Some(secs(365 * 86_400)));
    assert_eq!(unit_period("fortnight"), None);

    assert_eq!(limit_per_unit(5, secs(1)), (5, Unit::Second));
    assert_eq!(limit_per_unit(5, secs(60)), (5, Unit::Minute));
    assert_eq!(limit_per_unit(5, secs(3_600)), (5, Unit::Hour));
    assert_eq!(limit_per_unit(5, secs(86_400)), (5, Unit::Day));
    assert_eq!(limit_per_unit(5, secs(30 * 86_400)), (5, Unit::Month));
    assert_eq!(limit_per_unit(5, secs(365 * 86_400)), (5, Unit::Year));
    // Other periods: the longest unit not longer, the limit scaled to it (rounded down, ≥ 1).
    assert_eq!(limit_per_unit(30, secs(90)), (20, Unit::Minute));
    assert_eq!(limit_per_unit(700, secs(7 * 86_400)), (100, Unit::Day));
    assert_eq!(
        limit_per_unit(10, Duration::from_millis(500)),
        (20, Unit::Second)
    );
    assert_eq!(limit_per_unit(1, secs(7_200)), (1, Unit::Hour));
    assert_eq!(limit_per_unit(MAX_LIMIT, secs(1)), (u32::MAX, Unit::Second));
}
