//! Dependency checks: etcd (Status: version, leader, latency) and Redis (PING latency), every
//! check interval with the check deadline, through the same hysteresis as instances.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::instance::{ProbeContext, millis};
use super::now_ms;
use crate::aggregator::Observation;
use crate::model;

/// Checks etcd until `stop`.
pub async fn check_etcd(ctx: ProbeContext, client: etcd_client::Client, stop: CancellationToken) {
    let id = model::dependency_id("etcd");
    ctx.aggregator.add_dependency("etcd", now_ms());
    run(&ctx, &id, "etcd", stop, || {
        let mut client = client.clone();
        async move {
            let status = client.status().await.map_err(|e| e.to_string())?;
            if status.leader() == 0 {
                return Err(format!("etcd {} has no leader", status.version()));
            }
            Ok(format!(
                "etcd {}, leader {:x}",
                status.version(),
                status.leader()
            ))
        }
    })
    .await;
}

/// Checks Redis until `stop`; one connection, opened again after a failure.
pub async fn check_redis(ctx: ProbeContext, url: String, stop: CancellationToken) {
    let id = model::dependency_id("redis");
    ctx.aggregator.add_dependency("redis", now_ms());
    let client = match redis::Client::open(url.as_str()) {
        Ok(client) => client,
        Err(e) => {
            let detail = format!("invalid Redis URL: {e}");
            let latency = Duration::ZERO;
            ctx.aggregator
                .observe(&id, Observation::CheckFailed { latency, detail }, now_ms());
            return;
        }
    };
    let connection = tokio::sync::Mutex::new(None::<redis::aio::MultiplexedConnection>);
    run(&ctx, &id, "redis", stop, || async {
        let mut held = connection.lock().await;
        if held.is_none() {
            *held = Some(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(conn) = held.as_mut() else {
            return Err("no connection".to_owned());
        };
        match redis::cmd("PING").query_async::<String>(conn).await {
            Ok(pong) => Ok(format!("PING answered {pong}")),
            Err(e) => {
                *held = None;
                Err(e.to_string())
            }
        }
    })
    .await;
}

async fn run<F, Fut>(ctx: &ProbeContext, id: &str, target: &str, stop: CancellationToken, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let config = ctx.aggregator.config().clone();
    let mut ticks = tokio::time::interval(config.check_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(config.check_timeout, check()).await;
        let latency = started.elapsed();
        let observation = match outcome {
            Ok(Ok(detail)) => Observation::CheckPassed {
                latency,
                detail: format!("{detail} in {}", millis(latency)),
            },
            Ok(Err(detail)) => Observation::CheckFailed { latency, detail },
            Err(_) => Observation::CheckFailed {
                latency,
                detail: format!("no answer within {}", millis(config.check_timeout)),
            },
        };
        let passed = matches!(observation, Observation::CheckPassed { .. });
        ctx.metrics.check(target, passed, latency);
        ctx.aggregator.observe(id, observation, now_ms());
    }
}
