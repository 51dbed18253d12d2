//! The cache's domain core over a real Redis as L2 (the gRPC service is not built yet): two
//! instances share L2 with compare-and-set done inside Redis, big values stay compressed there,
//! and with Redis stopped L1 keeps serving while L2 calls fail clearly.

use std::sync::Arc;
use std::time::Duration;

use agentmesh_cache::cache::SystemClock;
use agentmesh_cache::config::CacheConfig;
use agentmesh_cache::l2::{PREFIX, RedisL2};
use agentmesh_cache::{Cache, CacheError, Consistency, Tier};
use agentmesh_tests::RedisServer;

async fn cache(redis: &RedisServer) -> anyhow::Result<Cache> {
    let client = redis::Client::open(redis.url())?;
    let conn = redis::aio::ConnectionManager::new(client).await?;
    Ok(Cache::new(
        CacheConfig::default(),
        Arc::new(RedisL2::new(conn)),
        Arc::new(SystemClock),
    ))
}

#[tokio::test]
async fn test_two_instances_share_l2_and_compare_and_set_is_decided_in_redis() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (a, b) = (cache(&redis).await?, cache(&redis).await?);
    assert_eq!(a.set("ns", "k", b"one", None, Some(0)).await?, 1);
    let seen = b
        .get("ns", "k", Consistency::Default)
        .await?
        .expect("in L2");
    assert_eq!((seen.value.as_ref(), seen.tier), (&b"one"[..], Tier::L2));
    // Both instances try to move version 1 on: exactly one wins.
    let (ra, rb) = tokio::join!(
        a.set("ns", "k", b"from a", None, Some(1)),
        b.set("ns", "k", b"from b", None, Some(1))
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
    let fresh = a
        .get("ns", "k", Consistency::Fresh)
        .await?
        .expect("present");
    assert_eq!(fresh.version, 2);
    Ok(())
}

#[tokio::test]
async fn test_big_values_are_stored_compressed_and_read_back_whole() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let c = cache(&redis).await?;
    let big = "an LLM answer that repeats itself ".repeat(300);
    c.set("ns", "big", big.as_bytes(), None, None).await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}*"))
        .query_async(&mut conn)
        .await?;
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await?;
    assert!(
        stored.len() < big.len() / 4,
        "stored {} bytes",
        stored.len()
    );
    let back = c
        .get("ns", "big", Consistency::Fresh)
        .await?
        .expect("present");
    assert_eq!(back.value.as_ref(), big.as_bytes());
    Ok(())
}

#[tokio::test]
async fn test_with_redis_stopped_l1_keeps_serving_and_l2_calls_fail_clearly() -> anyhow::Result<()>
{
    let mut redis = RedisServer::start().await?;
    let c = cache(&redis).await?;
    c.set("ns", "k", b"kept", None, None).await?;
    redis.stop();
    let hit = c
        .get("ns", "k", Consistency::Default)
        .await?
        .expect("from L1");
    assert_eq!((hit.value.as_ref(), hit.tier), (&b"kept"[..], Tier::L1));
    let write =
        tokio::time::timeout(Duration::from_secs(10), c.set("ns", "k2", b"x", None, None)).await?;
    assert!(
        matches!(write, Err(CacheError::Unavailable(_))),
        "{write:?}"
    );
    Ok(())
}
