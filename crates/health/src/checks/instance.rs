//! One probe per instance: a `grpc.health.v1` Watch stream kept open (a broken stream is
//! reported at once) and a Check every interval with a short deadline (a hung instance does not
//! break its stream, but it stops answering).
//!
//! Probes use a plain channel, not the runtime's traced client stack: a check every second per
//! instance would fill the tracing backend with spans nobody reads (as Consul's checks are not
//! traced either). Their latency is in `health_check_duration_seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_membership::Member;
use agentmesh_proto::grpc::health::v1::HealthCheckRequest;
use agentmesh_proto::grpc::health::v1::health_check_response::ServingStatus;
use agentmesh_proto::grpc::health::v1::health_client::HealthClient;
use agentmesh_runtime::client::{ClientConfig, endpoint};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{now_ms, spread};
use crate::aggregator::{Aggregator, Observation};
use crate::metrics::HealthMetrics;
use crate::model;

/// First and longest wait before re-opening a broken Watch stream.
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// What every probe shares.
#[derive(Clone)]
pub struct ProbeContext {
    /// Where observations go.
    pub aggregator: Arc<Aggregator>,
    /// Check durations.
    pub metrics: HealthMetrics,
    /// Bounds the checks in flight at once.
    pub permits: Arc<Semaphore>,
}

/// Probes `member` until `stop` is cancelled.
pub async fn probe(ctx: ProbeContext, member: Member, stop: CancellationToken) {
    let id = model::instance_id(&member.service, &member.instance_id);
    let config = ctx.aggregator.config().clone();
    let client_config = ClientConfig {
        timeout: config.check_timeout.max(Duration::from_secs(2)),
        connect_timeout: config.check_timeout,
        breaker: None,
        // Probes call grpc.health.v1 only, which stays open under `--auth required`.
        bearer: None,
    };
    let channel = match endpoint(&member.grpc_addr, &client_config) {
        Ok(endpoint) => endpoint.connect_lazy(),
        Err(e) => {
            let detail = e.to_string();
            ctx.aggregator
                .observe(&id, Observation::WatchBroken { detail }, now_ms());
            return;
        }
    };
    let client = HealthClient::new(channel);
    tokio::select! {
        () = stop.cancelled() => {}
        () = watch_loop(&ctx, &id, client.clone()) => {}
        () = check_loop(&ctx, &id, client, config.check_interval, config.check_timeout) => {}
    }
}

async fn watch_loop(ctx: &ProbeContext, id: &str, mut client: HealthClient<Channel>) {
    let mut backoff = WATCH_BACKOFF.0;
    loop {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let detail = match client.watch(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            backoff = WATCH_BACKOFF.0;
                            let observation = if message.status() == ServingStatus::Serving {
                                Observation::WatchServing
                            } else {
                                Observation::WatchNotServing
                            };
                            ctx.aggregator.observe(id, observation, now_ms());
                        }
                        Ok(None) => break "the server ended the stream".to_owned(),
                        Err(status) => break describe(&status),
                    }
                }
            }
            Err(status) => describe(&status),
        };
        ctx.aggregator
            .observe(id, Observation::WatchBroken { detail }, now_ms());
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WATCH_BACKOFF.1);
    }
}

async fn check_loop(
    ctx: &ProbeContext,
    id: &str,
    mut client: HealthClient<Channel>,
    interval: Duration,
    timeout: Duration,
) {
    tokio::time::sleep(spread(id, interval)).await;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Ok(_permit) = ctx.permits.acquire().await else {
            return;
        };
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(timeout);
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, client.check(request)).await;
        let latency = started.elapsed();
        let observation = match outcome {
            Ok(Ok(response)) if response.get_ref().status() == ServingStatus::Serving => {
                Observation::CheckPassed {
                    latency,
                    detail: format!("SERVING in {}", millis(latency)),
                }
            }
            Ok(Ok(response)) => Observation::CheckFailed {
                latency,
                detail: format!(
                    "Check answered {}",
                    response.get_ref().status().as_str_name()
                ),
            },
            Ok(Err(status)) => Observation::CheckFailed {
                latency,
                detail: format!("Check failed: {}", describe(&status)),
            },
            Err(_) => Observation::CheckFailed {
                latency,
                detail: format!("Check got no answer within {}", millis(timeout)),
            },
        };
        let passed = matches!(observation, Observation::CheckPassed { .. });
        ctx.metrics.check("instance", passed, latency);
        ctx.aggregator.observe(id, observation, now_ms());
    }
}

/// "1.2 ms".
#[must_use]
pub fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A status as one line: the code and, for transport errors, the innermost cause.
fn describe(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut cause = status.message().to_owned();
    let mut source = status.source();
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    format!("{:?}: {cause}", status.code())
}
