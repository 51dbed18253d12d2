//! The Redis-strict decision store against a real Redis (one per test): exact GCRA answers, no
//! over-admission across instances, all-or-nothing batches, script reloads, Redis going away
//! and coming back, and idle keys expiring.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_ratelimit::strict::{
    RedisStrict, StrictConfig, StrictDecision, StrictError, StrictItem,
};
use agentmesh_runtime::Metrics;
use agentmesh_runtime::breaker::BreakerConfig;
use agentmesh_tests::{RedisServer, free_port, wait_until};
use redis::aio::MultiplexedConnection;

const BUDGET: Duration = Duration::from_secs(2);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn item(key_hash: u64, limit: u64, period: Duration, burst: u64, cost: u64) -> StrictItem {
    StrictItem {
        shadow: false,
        key_hash,
        limit,
        period,
        burst,
        cost,
    }
}

fn config(redis: &RedisServer) -> StrictConfig {
    StrictConfig {
        key_prefix: "test:rl".to_owned(),
        ..StrictConfig::new(redis.url())
    }
}

async fn connect(redis: &RedisServer) -> RedisStrict {
    RedisStrict::connect(config(redis), None)
        .await
        .expect("connecting to the test redis")
}

async fn raw(redis: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn one(strict: &RedisStrict, item: StrictItem) -> StrictDecision {
    let mut decisions = strict.check(&[item], false, BUDGET).await.unwrap();
    assert_eq!(decisions.len(), 1);
    decisions.pop().unwrap()
}

async fn exists(con: &mut MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(con)
        .await
        .unwrap()
        == 1
}

fn between(d: Duration, low: Duration, high: Duration) -> bool {
    low <= d && d <= high
}

#[tokio::test]
async fn test_strict_gcra_admits_the_burst_then_denies_with_retry_after() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    let mut con = raw(&redis).await;
    // 3 per minute, burst 3: one unit every 20 s.
    let unit = item(0xA, 3, MINUTE, 3, 1);
    for (i, remaining) in [2, 1, 0].into_iter().enumerate() {
        let d = one(&strict, unit).await;
        assert!(d.allowed, "request {i}");
        assert_eq!(d.remaining, remaining);
        assert_eq!(d.retry_after, Some(Duration::ZERO));
        let full = Duration::from_secs(20) * (u32::try_from(i).unwrap() + 1);
        assert!(
            between(d.reset_after, full - Duration::from_secs(1), full),
            "{d:?}"
        );
    }
    let d = one(&strict, unit).await;
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    let retry = d.retry_after.expect("a unit fits again later");
    assert!(
        between(retry, Duration::from_secs(19), Duration::from_secs(20)),
        "{d:?}"
    );
    assert!(
        between(d.reset_after, Duration::from_secs(59), MINUTE),
        "{d:?}"
    );
    // The key is the prefix and the hash as a cluster hash tag.
    assert!(exists(&mut con, "test:rl:{000000000000000a}").await);

    // A peek on the empty bucket waits for one unit, like a cost of 1.
    let d = one(&strict, item(0xA, 3, MINUTE, 3, 0)).await;
    assert!(!d.allowed);
    assert!(d.retry_after.unwrap() > Duration::from_secs(19), "{d:?}");
    // A cost above the burst can never pass.
    for cost in [4, u64::MAX] {
        let d = one(&strict, item(0xA, 3, MINUTE, 3, cost)).await;
        assert_eq!((d.allowed, d.retry_after, d.remaining), (false, None, 0));
    }
}

#[tokio::test]
async fn test_strict_peek_spends_nothing_and_writes_nothing() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    let mut con = raw(&redis).await;
    let peek = item(0xB, 3, MINUTE, 0, 0);
    let d = one(&strict, peek).await;
    assert_eq!(
        d,
        StrictDecision {
            allowed: true,
            remaining: 3,
            retry_after: Some(Duration::ZERO),
            reset_after: Duration::ZERO,
        }
    );
    assert!(!exists(&mut con, "test:rl:{000000000000000b}").await);
    assert_eq!(one(&strict, item(0xB, 3, MINUTE, 0, 1)).await.remaining, 2);
    for _ in 0..3 {
        let d = one(&strict, peek).await;
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
    }
    assert_eq!(one(&strict, item(0xB, 3, MINUTE, 0, 1)).await.remaining, 1);
    // A cost above the burst on a fresh key: denied for good, nothing spent.
    let d = one(&strict, item(0xC, 3, MINUTE, 0, 4)).await;
    assert_eq!((d.allowed, d.retry_after, d.remaining), (false, None, 3));
    assert!(!exists(&mut con, "test:rl:{000000000000000c}").await);
    // No items, no call; no budget, no call.
    assert!(strict.check(&[], false, BUDGET).await.unwrap().is_empty());
    assert!(matches!(
        strict.check(&[peek], false, Duration::ZERO).await,
        Err(StrictError::Timeout(_))
    ));
}

#[tokio::test]
async fn test_strict_non_integer_emission_intervals_and_extreme_specs_lose_no_capacity() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    // 3 per second: 333_333⅓ µs per unit, still exactly 3 at once.
    let unit = item(1, 3, Duration::from_secs(1), 0, 1);
    for remaining in [2, 1, 0] {
        assert_eq!(one(&strict, unit).await.remaining, remaining);
    }
    let d = one(&strict, unit).await;
    assert!(!d.allowed);
    assert!(
        between(
            d.retry_after.unwrap(),
            Duration::from_millis(250),
            Duration::from_micros(333_334)
        ),
        "{d:?}"
    );
    // A prime limit per day: the whole burst at once, to the last unit.
    let prime = 999_999_937;
    let day = Duration::from_secs(86_400);
    let d = one(&strict, item(2, prime, day, 0, prime)).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
    assert!(between(d.reset_after, day - Duration::from_secs(1), day));
    // 1000 units need 86.4 ms of refill.
    let d = one(&strict, item(2, prime, day, 0, 1000)).await;
    assert!(!d.allowed);
    assert!(
        between(
            d.retry_after.unwrap(),
            Duration::from_millis(80),
            Duration::from_micros(86_401)
        ),
        "{d:?}"
    );
    // 1e15 per millisecond, all of it at once.
    let max = 1_000_000_000_000_000;
    let d = one(&strict, item(3, max, Duration::from_millis(1), 0, max)).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
    // 1 per 366 days: the second waits a year.
    let year = Duration::from_secs(366 * 86_400);
    assert!(one(&strict, item(4, 1, year, 0, 1)).await.allowed);
    let d = one(&strict, item(4, 1, year, 0, 1)).await;
    assert!(between(
        d.retry_after.unwrap(),
        year - Duration::from_secs(1),
        year
    ));
}

#[tokio::test]
async fn test_two_instances_with_sixteen_tasks_each_admit_exactly_the_limit() {
    let redis = RedisServer::start().await.unwrap();
    let instances = [connect(&redis).await, connect(&redis).await];
    let admitted = Arc::new(AtomicU64::new(0));
    let unit = item(0xD, 100, HOUR, 0, 1);
    let mut tasks = Vec::new();
    for strict in &instances {
        for _ in 0..16 {
            let strict = strict.clone();
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    // Two items per call: one pipelined round trip, each item atomic.
                    let decisions = strict.check(&[unit, unit], false, BUDGET).await.unwrap();
                    let allowed = decisions.iter().filter(|d| d.allowed).count();
                    admitted.fetch_add(u64::try_from(allowed).unwrap(), Ordering::Relaxed);
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 100, "of 640 attempts");
    let d = one(&instances[1], item(0xD, 100, HOUR, 0, 0)).await;
    assert_eq!((d.allowed, d.remaining), (false, 0));
}

#[tokio::test]
async fn test_all_or_nothing_debits_nothing_when_one_item_is_over_limit() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    let mut con = raw(&redis).await;
    let a = |cost| item(0xA1, 10, HOUR, 0, cost);
    let b = |cost| item(0xB1, 1, HOUR, 0, cost);
    assert!(one(&strict, b(1)).await.allowed);

    let d = strict.check(&[a(1), b(1)], true, BUDGET).await.unwrap();
    assert!(!d[0].allowed && !d[1].allowed);
    assert_eq!(
        d[0].retry_after,
        Some(Duration::ZERO),
        "a fitted: batch-rejected"
    );
    assert!(
        d[1].retry_after.unwrap() > Duration::from_secs(3500),
        "b over limit"
    );
    assert!(!exists(&mut con, "test:rl:{00000000000000a1}").await);
    assert_eq!(one(&strict, a(0)).await.remaining, 10);

    // The same key twice sees its own tentative debit: 6 + 6 > 10, so neither is spent.
    let d = strict.check(&[a(6), a(6)], true, BUDGET).await.unwrap();
    assert_eq!(d[0].retry_after, Some(Duration::ZERO));
    assert!(!d[0].allowed && !d[1].allowed && d[1].retry_after.unwrap() > Duration::ZERO);
    assert_eq!(one(&strict, a(0)).await.remaining, 10);

    // When everything fits, everything is debited.
    let c = item(0xC1, 5, HOUR, 0, 2);
    let d = strict.check(&[a(4), c], true, BUDGET).await.unwrap();
    assert!(d.iter().all(|d| d.allowed));
    assert_eq!((d[0].remaining, d[1].remaining), (6, 3));
    assert_eq!(one(&strict, a(0)).await.remaining, 6);
    assert_eq!(one(&strict, item(0xC1, 5, HOUR, 0, 0)).await.remaining, 3);

    // A SHADOW item over its limit is reported but does not fail the batch.
    let shadow_b = StrictItem {
        shadow: true,
        ..b(1)
    };
    let d = strict.check(&[a(1), shadow_b], true, BUDGET).await.unwrap();
    assert!(d[0].allowed, "a is debited");
    assert!(!d[1].allowed && d[1].retry_after.unwrap() > Duration::from_secs(3500));
    assert_eq!(one(&strict, a(0)).await.remaining, 5);
}

#[tokio::test]
async fn test_checks_reload_the_script_after_script_flush() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    let mut con = raw(&redis).await;
    let unit = item(0xE, 10, HOUR, 0, 1);
    let other = item(0xF, 10, HOUR, 0, 1);
    assert_eq!(one(&strict, unit).await.remaining, 9);
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").clone();

    flush().query_async::<()>(&mut con).await.unwrap();
    let d = strict.check(&[unit, other], false, BUDGET).await.unwrap();
    assert_eq!(
        (d[0].remaining, d[1].remaining),
        (8, 9),
        "pipelined, once each"
    );

    flush().query_async::<()>(&mut con).await.unwrap();
    let d = strict.check(&[unit, other], true, BUDGET).await.unwrap();
    assert_eq!(
        (d[0].remaining, d[1].remaining),
        (7, 8),
        "all or nothing, once"
    );
}

#[tokio::test]
async fn test_redis_down_fails_within_budget_opens_the_breaker_and_recovers() {
    agentmesh_tests::init_test_tracing();
    let mut redis = RedisServer::start().await.unwrap();
    let metrics = Metrics::new();
    let gauge = metrics.breaker_state.with_label_values(&["redis-strict"]);
    let config = StrictConfig {
        breaker: BreakerConfig {
            window: Duration::from_secs(10),
            min_calls: 4,
            failure_rate: 0.5,
            open_base: Duration::from_millis(300),
            open_max: Duration::from_secs(1),
            half_open_probes: 2,
        },
        ..config(&redis)
    };
    let strict = RedisStrict::connect(config, Some(gauge.clone()))
        .await
        .unwrap();
    let unit = item(0x10, 1000, HOUR, 0, 1);
    assert!(one(&strict, unit).await.allowed);

    redis.stop();
    let budget = Duration::from_millis(50);
    let mut opened = false;
    for _ in 0..20 {
        let started = Instant::now();
        let result = strict.check(&[unit], false, budget).await;
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(500), "took {elapsed:?}");
        match result {
            Err(StrictError::Unavailable(e)) if e.contains("circuit open") => {
                opened = true;
                break;
            }
            Err(StrictError::Unavailable(_) | StrictError::Timeout(_)) => {}
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    assert!(opened, "the breaker opened");
    assert_eq!(gauge.get(), 1, "open");
    // While open, failing takes no time at all.
    let started = Instant::now();
    assert!(matches!(
        strict.check(&[unit], false, budget).await,
        Err(StrictError::Unavailable(_))
    ));
    // Less than the budget: it never waited for Redis.
    assert!(started.elapsed() < budget);

    redis.restart().await.unwrap();
    let restarted = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "strict checks to succeed again",
        || {
            let strict = strict.clone();
            let gauge = gauge.clone();
            async move {
                let ok = strict
                    .check(&[unit], false, Duration::from_millis(200))
                    .await
                    .is_ok();
                ok && gauge.get() == 0
            }
        },
    )
    .await
    .unwrap();
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "{restarted:?}"
    );
    // A fresh Redis (no persistence): the state is gone and the script was reloaded.
    assert!(one(&strict, unit).await.remaining >= 990);
}

#[tokio::test]
async fn test_idle_keys_expire_once_the_bucket_is_full_again() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    let mut con = raw(&redis).await;
    let key = "test:rl:{0000000000000011}";
    let d = one(&strict, item(0x11, 2, Duration::from_millis(200), 0, 2)).await;
    assert!(d.allowed);
    assert!(between(
        d.reset_after,
        Duration::from_millis(150),
        Duration::from_millis(200)
    ));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!((1..=201).contains(&pttl), "pttl {pttl}");
    wait_until(Duration::from_secs(3), "the idle key to expire", || {
        let mut con = con.clone();
        async move { !exists(&mut con, key).await }
    })
    .await
    .unwrap();
    let d = one(&strict, item(0x11, 2, Duration::from_millis(200), 0, 0)).await;
    assert_eq!(
        (d.allowed, d.remaining, d.reset_after),
        (true, 2, Duration::ZERO)
    );
}

#[tokio::test]
async fn test_reset_forgets_the_state_of_one_key() {
    let redis = RedisServer::start().await.unwrap();
    let strict = connect(&redis).await;
    let spent = item(0x12, 2, HOUR, 0, 2);
    let kept = item(0x13, 2, HOUR, 0, 1);
    assert!(one(&strict, spent).await.allowed);
    assert!(one(&strict, kept).await.allowed);
    assert!(!one(&strict, spent).await.allowed);
    strict.reset(0x12, BUDGET).await.unwrap();
    assert!(one(&strict, spent).await.allowed);
    assert_eq!(one(&strict, item(0x13, 2, HOUR, 0, 0)).await.remaining, 1);
}

#[tokio::test]
async fn test_connect_to_a_closed_port_fails_within_the_connect_timeout() {
    let config = StrictConfig {
        connect_timeout: Duration::from_millis(300),
        ..StrictConfig::new(format!("redis://127.0.0.1:{}", free_port()))
    };
    let started = Instant::now();
    let err = RedisStrict::connect(config, None).await.unwrap_err();
    assert!(
        matches!(err, StrictError::Unavailable(_) | StrictError::Timeout(_)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn test_after_a_long_redis_outage_the_breaker_closes_within_one_health_check() {
    let mut redis = RedisServer::start().await.unwrap();
    let metrics = Metrics::new();
    let gauge = metrics.breaker_state.with_label_values(&["redis-strict"]);
    // The production breaker: 1 s open at first, doubling per failed probe up to 30 s.
    let config = StrictConfig {
        breaker: BreakerConfig::default(),
        ..config(&redis)
    };
    let strict = RedisStrict::connect(config, Some(gauge.clone()))
        .await
        .unwrap();
    let unit = item(0x21, 1000, HOUR, 0, 1);
    let budget = Duration::from_millis(5);
    assert!(strict.check(&[unit], false, budget).await.is_ok());

    redis.kill();
    // Long enough for the breaker to open several times (1 + 2 + 4 s of back-off) and for a
    // reconnect that gives up to have given up.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        let _ = strict.check(&[unit], false, budget).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_ne!(
        gauge.get(),
        0,
        "the breaker is not closed during the outage"
    );

    redis.restart().await.unwrap();
    let restarted = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "strict checks answered again",
        || {
            let strict = strict.clone();
            async move { strict.check(&[unit], false, budget).await.is_ok() }
        },
    )
    .await
    .unwrap();
    let recovered = restarted.elapsed();
    eprintln!("strict checks answered again {recovered:?} after Redis returned");
    assert_eq!(gauge.get(), 0, "closed");
    assert!(
        recovered < Duration::from_secs(3),
        "back {recovered:?} after Redis returned; one health check is 250 ms"
    );
}
