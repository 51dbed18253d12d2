//! The cache's domain core over a real Redis as L2, three instances sharing it: compare-and-set
//! decided in Redis, every write and invalidation reaching every instance's L1 in sequence, a
//! stampede of 1,000 misses computed once, tags and namespace wipes, big values stored
//! compressed, a lost change feed flushing L1, and with Redis stopped L1 serving (marked stale)
//! while writes fail clearly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_cache::cache::SystemClock;
use agentmesh_cache::config::CacheConfig;
use agentmesh_cache::l2::{PREFIX, RedisL2};
use agentmesh_cache::metrics::CacheMetrics;
use agentmesh_cache::{
    Cache, CacheError, Consistency, Found, LeaseAnswer, ReadOptions, SetOptions, Tier,
};
use agentmesh_tests::RedisServer;

async fn cache(redis: &RedisServer) -> anyhow::Result<Arc<Cache>> {
    let client = redis::Client::open(redis.url())?;
    let conn = redis::aio::ConnectionManager::new(client.clone()).await?;
    let c = Cache::start(
        CacheConfig::default(),
        Arc::new(RedisL2::new(client, conn)),
        Arc::new(SystemClock),
        CacheMetrics::unregistered(),
    );
    until(|| c.l1().synced(), "the feed syncs").await;
    Ok(c)
}

async fn until(mut ok: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: timed out"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const DEFAULT: ReadOptions = ReadOptions {
    consistency: Consistency::Default,
    allow_stale: false,
};
const FRESH: ReadOptions = ReadOptions {
    consistency: Consistency::Fresh,
    allow_stale: false,
};

async fn read(c: &Cache, key: &str) -> Option<(Vec<u8>, u64, Tier)> {
    c.get("ns", key, DEFAULT)
        .await
        .unwrap()
        .hit()
        .map(|h| (h.value.to_vec(), h.version, h.tier))
}

fn plain() -> SetOptions {
    SetOptions::default()
}

#[tokio::test]
async fn test_three_instances_share_l2_and_compare_and_set_is_decided_in_redis()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (a, b) = (cache(&redis).await?, cache(&redis).await?);
    let cas = |v| SetOptions {
        if_version: Some(v),
        ..SetOptions::default()
    };
    assert_eq!(a.set("ns", "k", b"one", &cas(0)).await?, 1);
    assert_eq!(read(&b, "k").await, Some((b"one".to_vec(), 1, Tier::L2)));
    // Both instances try to move version 1 on: exactly one wins.
    let one = cas(1);
    let (ra, rb) = tokio::join!(
        a.set("ns", "k", b"from a", &one),
        b.set("ns", "k", b"from b", &one)
    );
    assert_eq!(
        [ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{ra:?} {rb:?}"
    );
    let loser = ra.err().or(rb.err()).expect("one lost");
    assert_eq!(
        loser,
        CacheError::VersionMismatch {
            expected: 1,
            current: 2
        }
    );
    Ok(())
}

#[tokio::test]
async fn test_a_write_on_one_instance_is_never_read_old_on_the_others_once_its_change_is_seen()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (a, b, c) = (
        cache(&redis).await?,
        cache(&redis).await?,
        cache(&redis).await?,
    );
    a.set("ns", "k", b"v0", &plain()).await?;
    // b and c hold it in L1.
    for n in [&b, &c] {
        read(n, "k").await;
        assert_eq!(read(n, "k").await.map(|r| r.2), Some(Tier::L1));
    }
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    for round in 1..=50u64 {
        let value = format!("v{round}");
        let version = a.set("ns", "k", value.as_bytes(), &plain()).await?;
        // The write's sequence number (nothing else writes).
        let seq: u64 = redis::cmd("GET")
            .arg("agentmesh:cache:seq")
            .query_async(&mut conn)
            .await?;
        for n in [&b, &c] {
            until(|| n.l1().last_seq() >= seq, "the change arrives").await;
            // Once an instance has seen the change, the old value is gone from its L1.
            let (v, ver, _) = read(n, "k").await.expect("present");
            assert_eq!(
                (v, ver),
                (value.as_bytes().to_vec(), version),
                "round {round}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn test_a_stampede_of_1000_misses_over_three_instances_is_computed_once() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let nodes = [
        cache(&redis).await?,
        cache(&redis).await?,
        cache(&redis).await?,
    ];
    let computed = Arc::new(AtomicU64::new(0));
    let mut calls = Vec::new();
    for i in 0..1000 {
        let node = nodes[i % 3].clone();
        let computed = computed.clone();
        calls.push(tokio::spawn(async move {
            let answer = node
                .get_or_lease(
                    "ns",
                    "prompt",
                    Duration::from_secs(10),
                    Duration::from_secs(10),
                )
                .await?;
            Ok::<_, CacheError>(match answer {
                LeaseAnswer::Lease(lease) => {
                    computed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    node.fill_lease("ns", "prompt", lease.token, b"computed", &plain())
                        .await?;
                    b"computed".to_vec()
                }
                LeaseAnswer::Hit { hit, .. } => hit.value.to_vec(),
                other => panic!("{other:?}"),
            })
        }));
    }
    for call in calls {
        assert_eq!(call.await??, b"computed");
    }
    assert_eq!(computed.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn test_tag_and_namespace_invalidations_reach_every_instance() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (a, b) = (cache(&redis).await?, cache(&redis).await?);
    let tagged = |t: &str| SetOptions {
        tags: vec![t.to_owned()],
        ..SetOptions::default()
    };
    a.set("ns", "x", b"1", &tagged("user:1")).await?;
    a.set("ns", "y", b"2", &tagged("user:2")).await?;
    for k in ["x", "y"] {
        read(&b, k).await;
        assert_eq!(read(&b, k).await.map(|r| r.2), Some(Tier::L1));
    }
    let seq = a.invalidate_tags("ns", &["user:1".into()]).await?;
    until(|| b.l1().last_seq() >= seq, "b applies the invalidation").await;
    assert_eq!(read(&b, "x").await, None);
    assert_eq!(read(&b, "y").await.map(|r| r.2), Some(Tier::L1));
    let seq = b.invalidate_namespace("ns").await?;
    until(|| a.l1().last_seq() >= seq, "a applies the wipe").await;
    assert_eq!(read(&a, "y").await, None);
    assert_eq!(a.get("ns", "y", FRESH).await?, Found::Miss);
    Ok(())
}

#[tokio::test]
async fn test_big_values_are_stored_compressed_and_read_back_whole() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let c = cache(&redis).await?;
    let big = "an LLM answer that repeats itself ".repeat(300);
    c.set("ns", "big", big.as_bytes(), &plain()).await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(agentmesh_cache::l2::entry_key("ns", "big"))
        .query_async(&mut conn)
        .await?;
    assert!(
        stored.len() < big.len() / 4,
        "stored {} bytes",
        stored.len()
    );
    assert!(agentmesh_cache::l2::entry_key("ns", "big").starts_with(PREFIX));
    let back = c.get("ns", "big", FRESH).await?.hit().expect("present");
    assert_eq!(back.value.as_ref(), big.as_bytes());
    Ok(())
}

#[tokio::test]
async fn test_an_instance_that_loses_its_change_feed_flushes_l1_when_it_is_back()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (a, b) = (cache(&redis).await?, cache(&redis).await?);
    a.set("ns", "k", b"old", &plain()).await?;
    read(&b, "k").await;
    assert_eq!(read(&b, "k").await.map(|r| r.2), Some(Tier::L1));
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    // Cut every feed connection, and write while they are gone.
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await?;
    a.set("ns", "k", b"new", &plain()).await?;
    // b missed the change; once its feed is back it has flushed L1 and never serves the old
    // value again.
    until(
        || {
            b.stats(None)
                .feed_events
                .get("synced")
                .copied()
                .unwrap_or(0)
                >= 2
        },
        "b resyncs",
    )
    .await;
    assert_eq!(read(&b, "k").await.map(|r| r.0), Some(b"new".to_vec()));
    Ok(())
}

#[tokio::test]
async fn test_with_redis_stopped_l1_keeps_serving_and_l2_calls_fail_clearly() -> anyhow::Result<()>
{
    let mut redis = RedisServer::start().await?;
    let c = cache(&redis).await?;
    c.set("ns", "k", b"kept", &plain()).await?;
    redis.stop();
    let hit = c.get("ns", "k", DEFAULT).await?.hit().expect("from L1");
    assert_eq!((hit.value.as_ref(), hit.tier), (&b"kept"[..], Tier::L1));
    // Once the feed is known lost, L1 still answers, marked stale.
    until(|| !c.l1().synced(), "the feed is lost").await;
    let hit = c.get("ns", "k", DEFAULT).await?.hit().expect("from L1");
    assert!(hit.stale);
    let write =
        tokio::time::timeout(Duration::from_secs(10), c.set("ns", "k2", b"x", &plain())).await?;
    assert!(
        matches!(write, Err(CacheError::Unavailable(_))),
        "{write:?}"
    );
    Ok(())
}
