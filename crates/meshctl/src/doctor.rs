//! `meshctl doctor`: checks the live cluster end to end and prints a pass/fail table with a
//! one-line fix for each failure. It starts from the health aggregator (which knows every
//! instance from etcd) and then checks each instance itself, so it also catches what the
//! aggregator cannot see from where it runs.
//!
//! Checks: the aggregator reachable; etcd and Redis UP (as the aggregator checks them);
//! every service UP; every instance's gRPC health SERVING and `/readyz` 200 from here; clocks
//! within 2 s of this machine's (the `Date` of each admin port); one version across instances;
//! optional features (`/optimizations`); and, with `--jaeger-url`, a request through three
//! services (rate limiter, cache, event bus, under one trace context) found as one trace in
//! Jaeger's query API.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use agentmesh_proto::grpc::health::v1::health_check_response::ServingStatus;
use agentmesh_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
use agentmesh_proto::health::v1 as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Output;
use crate::events::print_table;

/// Largest clock difference accepted.
const MAX_SKEW: Duration = Duration::from_secs(2);
/// Longest any one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub(crate) struct DoctorArgs {
    /// Health aggregator address.
    #[arg(
        long,
        env = "AGENTMESH_HEALTH_ADDR",
        default_value = "http://127.0.0.1:7105"
    )]
    addr: String,
    /// Health aggregator admin address (for `/optimizations`); default: its gRPC host, port 9105.
    #[arg(long)]
    admin_addr: Option<String>,
    /// Jaeger query URL (`http://host:16686`): check that a request through three services is
    /// one trace there. Without it the trace check is skipped.
    #[arg(long, env = "AGENTMESH_JAEGER_URL")]
    jaeger_url: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// One check's result.
struct Check {
    name: String,
    /// None: skipped.
    pass: Option<bool>,
    detail: String,
    fix: String,
}

impl Check {
    fn new(
        name: impl Into<String>,
        pass: Option<bool>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            pass,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

fn state_name(state: i32) -> &'static str {
    pb::State::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("STATE_"))
        .unwrap_or("?")
}

/// `meshctl doctor`.
pub(crate) async fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut checks = Vec::new();
    let health = connect_and_read(&args.addr).await;
    let cluster = match health {
        Ok(cluster) => {
            checks.push(Check::new(
                "health aggregator reachable",
                Some(true),
                format!("{} at revision {}", args.addr, cluster.revision),
                "",
            ));
            cluster
        }
        Err(e) => {
            checks.push(Check::new(
                "health aggregator reachable",
                Some(false),
                e,
                "start it (`agentmesh serve health --etcd …`) or pass --addr / AGENTMESH_HEALTH_ADDR",
            ));
            return finish(&checks, args.output);
        }
    };
    for dependency in ["etcd", "redis"] {
        let id = format!("dependency/{dependency}");
        match cluster.components.iter().find(|c| c.id == id) {
            Some(c) => checks.push(Check::new(
                format!("{dependency} UP"),
                Some(c.state == pb::State::Up as i32),
                format!(
                    "{}: {}",
                    state_name(c.state),
                    if c.cause.is_empty() {
                        &c.detail
                    } else {
                        &c.cause
                    }
                ),
                if dependency == "etcd" {
                    "check etcd (etcdctl endpoint status) and the --etcd endpoints"
                } else {
                    "check Redis (redis-cli ping) and the --redis URL"
                },
            )),
            None => checks.push(Check::new(
                format!("{dependency} UP"),
                None,
                "the aggregator runs without it (standalone)",
                "",
            )),
        }
    }
    for service in cluster
        .components
        .iter()
        .filter(|c| c.kind == pb::ComponentKind::Service as i32)
    {
        checks.push(Check::new(
            format!("service {} UP", service.name),
            Some(service.state == pb::State::Up as i32 || service.state == pb::State::Maintenance as i32),
            format!("{} {}/{} serving{}", state_name(service.state), service.instances_up, service.instances_total, if service.cause.is_empty() { String::new() } else { format!(": {}", service.cause) }),
            "see `meshctl status` and `meshctl health history service/<name>`; restart or replace the DOWN instances",
        ));
    }
    let instances: Vec<&pb::Component> = cluster
        .components
        .iter()
        .filter(|c| c.kind == pb::ComponentKind::Instance as i32)
        .collect();
    let mut versions = std::collections::BTreeMap::<&str, usize>::new();
    for instance in &instances {
        *versions.entry(instance.version.as_str()).or_default() += 1;
        let serving = grpc_serving(&instance.grpc_addr).await;
        checks.push(Check::new(
            format!("{}/{} SERVING from here", instance.service, instance.name),
            Some(serving.is_ok()),
            serving.clone().unwrap_or_else(|e| e),
            format!("is {} reachable from this machine? (AGENTMESH_ADVERTISE_HOST must be an address clients can dial)", instance.grpc_addr),
        ));
        match admin_date(&instance.admin_addr).await {
            Ok((ready, skew)) => {
                checks.push(Check::new(
                    format!("{}/{} /readyz", instance.service, instance.name),
                    Some(ready),
                    if ready {
                        "200".to_owned()
                    } else {
                        "not ready".to_owned()
                    },
                    "it is shutting down or cannot serve: see its log",
                ));
                checks.push(Check::new(
                    format!("{}/{} clock", instance.service, instance.name),
                    Some(skew <= MAX_SKEW),
                    format!("{:.1} s from this machine's", skew.as_secs_f64()),
                    "run NTP (chrony, systemd-timesyncd) on every host: leases, TTLs and traces need clocks within a second or two",
                ));
            }
            Err(e) => checks.push(Check::new(
                format!("{}/{} admin port", instance.service, instance.name),
                Some(false),
                e,
                format!("is {} reachable from this machine?", instance.admin_addr),
            )),
        }
    }
    checks.push(Check::new(
        "one version across instances",
        Some(versions.len() <= 1),
        versions
            .iter()
            .map(|(v, n)| format!("{v} ×{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        "finish the rollout: every instance on the same version",
    ));
    let admin = args.admin_addr.clone().unwrap_or_else(|| {
        let host = args
            .addr
            .trim_start_matches("http://")
            .rsplit_once(':')
            .map_or("127.0.0.1", |(h, _)| h)
            .to_owned();
        format!("{host}:9105")
    });
    let optimizations =
        crate::admin_get(&format!("http://{admin}/optimizations"), CHECK_TIMEOUT).await;
    let otlp = match &optimizations {
        Ok((200, body)) => {
            let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let features = value["features"].as_array().cloned().unwrap_or_default();
            let active: Vec<String> = features
                .iter()
                .filter(|f| f["active"] == true)
                .filter_map(|f| f["name"].as_str().map(str::to_owned))
                .collect();
            checks.push(Check::new(
                "optional features",
                None,
                if active.is_empty() {
                    "none active".to_owned()
                } else {
                    active.join(", ")
                },
                "",
            ));
            active.iter().any(|f| f == "otlp_export")
        }
        _ => false,
    };
    checks.push(trace_check(&cluster, args.jaeger_url.as_deref(), otlp).await);
    finish(&checks, args.output)
}

async fn connect_and_read(addr: &str) -> Result<pb::ClusterHealth, String> {
    let channel = crate::connect(addr, CHECK_TIMEOUT, "the health aggregator")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut client = pb::health_aggregator_client::HealthAggregatorClient::new(channel)
        .max_decoding_message_size(64 << 20);
    client
        .get_cluster_health(pb::GetClusterHealthRequest::default())
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{addr}: {}", s.message()))
}

async fn grpc_serving(addr: &str) -> Result<String, String> {
    let channel = crate::connect(addr, CHECK_TIMEOUT, "the instance")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("{addr}: {}", s.message()))?
        .into_inner()
        .status();
    if status == ServingStatus::Serving {
        Ok(format!("{addr} SERVING"))
    } else {
        Err(format!("{addr} answers {}", status.as_str_name()))
    }
}

/// `/readyz` on the admin port: ready or not, and the difference between its `Date` and now.
async fn admin_date(addr: &str) -> Result<(bool, Duration), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        stream
            .write_all(format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(CHECK_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{addr}: no answer within {CHECK_TIMEOUT:?}"))??;
    let now = SystemTime::now();
    let ready = answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200");
    let date = answer
        .lines()
        .find_map(|l| {
            l.strip_prefix("date: ")
                .or_else(|| l.strip_prefix("Date: "))
        })
        .ok_or_else(|| format!("{addr}: no Date header"))?;
    let then = httpdate::parse_http_date(date.trim())
        .map_err(|e| format!("{addr}: Date {date:?}: {e}"))?;
    let skew = now
        .duration_since(then)
        .or_else(|_| then.duration_since(now))
        .unwrap_or_default();
    // `Date` has whole seconds: up to one second of the difference is its rounding.
    Ok((ready, skew.saturating_sub(Duration::from_secs(1))))
}

async fn trace_check(cluster: &pb::ClusterHealth, jaeger: Option<&str>, otlp: bool) -> Check {
    let name = "one trace across three services";
    let Some(jaeger) = jaeger else {
        return Check::new(
            name,
            None,
            "skipped: pass --jaeger-url http://host:16686 to check",
            "",
        );
    };
    if !otlp {
        return Check::new(
            name,
            Some(false),
            "no instance exports traces (OTLP)",
            "set OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 on every instance",
        );
    }
    let addr = |service: &str| {
        cluster
            .components
            .iter()
            .find(|c| {
                c.kind == pb::ComponentKind::Instance as i32
                    && c.service == service
                    && c.state == pb::State::Up as i32
            })
            .map(|c| c.grpc_addr.clone())
    };
    let (Some(ratelimit), Some(cache), Some(bus)) =
        (addr("ratelimit"), addr("cache"), addr("eventbus"))
    else {
        return Check::new(
            name,
            None,
            "skipped: needs a rate limiter, a cache and an event bus UP",
            "",
        );
    };
    let trace_id: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let span_id: String = (0..8)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let traceparent = format!("00-{trace_id}-{span_id}-01");
    let result = async {
        let channel = |addr: &str| {
            agentmesh_runtime::client::endpoint(addr, &agentmesh_runtime::ClientConfig::default())
                .map(|e| crate::with_token(e.connect_lazy()))
                .map_err(|e| e.to_string())
        };
        use agentmesh_proto::{cache::v1 as cache, eventbus::v1 as bus, ratelimit::v1 as rl};
        rl::rate_limiter_client::RateLimiterClient::new(channel(&ratelimit)?)
            .check(traced(
                &traceparent,
                rl::CheckRequest {
                    items: vec![rl::CheckItem {
                        namespace: "meshctl-doctor".into(),
                        key: "doctor".into(),
                        cost: 1,
                        ..rl::CheckItem::default()
                    }],
                    ..rl::CheckRequest::default()
                },
            )?)
            .await
            .map_err(|s| s.message().to_owned())?;
        cache::cache_coordinator_client::CacheCoordinatorClient::new(channel(&cache)?)
            .get(traced(
                &traceparent,
                cache::GetRequest {
                    namespace: "meshctl-doctor".into(),
                    key: "doctor".into(),
                    ..cache::GetRequest::default()
                },
            )?)
            .await
            .map_err(|s| s.message().to_owned())?;
        bus::event_bus_client::EventBusClient::new(channel(&bus)?)
            .publish(traced(
                &traceparent,
                bus::PublishRequest {
                    event: Some(bus::Event {
                        subject: "meshctl.doctor".into(),
                        ..bus::Event::default()
                    }),
                },
            )?)
            .await
            .map_err(|s| s.message().to_owned())?;
        Ok::<_, String>(())
    }
    .await;
    if let Err(e) = result {
        return Check::new(
            name,
            Some(false),
            format!("the request failed: {e}"),
            "see the services above",
        );
    }
    let url = format!("{}/api/traces/{trace_id}", jaeger.trim_end_matches('/'));
    let mut services = std::collections::BTreeSet::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok((200, body)) = crate::admin_get(&url, CHECK_TIMEOUT).await {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            // The services the trace's spans served (`rpc.service`), however the processes
            // are named (one `agentmesh dev` process serves them all).
            services = value["data"][0]["spans"]
                .as_array()
                .map(|spans| {
                    spans
                        .iter()
                        .flat_map(|span| span["tags"].as_array().cloned().unwrap_or_default())
                        .filter(|tag| tag["key"] == "rpc.service")
                        .filter_map(|tag| tag["value"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if services.len() >= 3 {
                break;
            }
        }
    }
    Check::new(
        name,
        Some(services.len() >= 3),
        format!(
            "trace {trace_id}: {}",
            if services.is_empty() {
                "not found".to_owned()
            } else {
                services.into_iter().collect::<Vec<_>>().join(", ")
            }
        ),
        "check that every instance's OTEL_EXPORTER_OTLP_ENDPOINT reaches the collector feeding Jaeger",
    )
}

/// A request carrying `traceparent`.
fn traced<T>(traceparent: &str, message: T) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    let value = traceparent
        .parse()
        .map_err(|_| "invalid traceparent".to_owned())?;
    request.metadata_mut().insert("traceparent", value);
    Ok(request)
}

fn finish(checks: &[Check], output: Output) -> anyhow::Result<ExitCode> {
    let ran: Vec<&Check> = checks.iter().filter(|c| c.pass.is_some()).collect();
    let passed = ran.iter().filter(|c| c.pass == Some(true)).count();
    if output == Output::Json {
        let body = json!({
            "passed": passed,
            "checked": ran.len(),
            "checks": checks.iter().map(|c| json!({
                "check": c.name,
                "result": match c.pass { Some(true) => "pass", Some(false) => "fail", None => "skip" },
                "detail": c.detail,
                "fix": if c.pass == Some(false) { c.fix.as_str() } else { "" },
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                vec![
                    match c.pass {
                        Some(true) => "pass",
                        Some(false) => "FAIL",
                        None => "skip",
                    }
                    .to_owned(),
                    c.name.clone(),
                    c.detail.clone(),
                    if c.pass == Some(false) {
                        c.fix.clone()
                    } else {
                        String::new()
                    },
                ]
            })
            .collect();
        print_table(&["RESULT", "CHECK", "DETAIL", "FIX"], &rows);
        println!("{passed}/{} checks pass", ran.len());
    }
    Ok(if passed == ran.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
