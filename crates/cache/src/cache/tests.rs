use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::l2::InMemoryL2;

#[derive(Default)]
struct Manual(AtomicU64);

impl WallClock for Manual {
    fn now_ms(&self) -> u64 {
        1_700_000_000_000 + self.0.load(Ordering::SeqCst)
    }
}

fn cache_over(l2: Arc<InMemoryL2>, clock: Arc<Manual>) -> Arc<Cache> {
    Cache::start(
        CacheConfig::default(),
        l2,
        clock,
        CacheMetrics::unregistered(),
    )
}

async fn cache() -> (Arc<Cache>, Arc<Manual>, Arc<InMemoryL2>) {
    let clock = Arc::new(Manual::default());
    let l2 = Arc::new(InMemoryL2::default());
    let c = cache_over(l2.clone(), clock.clone());
    synced(&c).await;
    (c, clock, l2)
}

/// Waits until the cache has followed the feed up to now.
async fn synced(c: &Cache) {
    for _ in 0..100 {
        if c.l1.synced() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the feed never synced");
}

const DEFAULT: ReadOptions = ReadOptions {
    consistency: Consistency::Default,
    allow_stale: false,
};
const FRESH: ReadOptions = ReadOptions {
    consistency: Consistency::Fresh,
    allow_stale: false,
};

fn set(ttl: Option<Duration>) -> SetOptions {
    SetOptions {
        ttl,
        ..SetOptions::default()
    }
}

async fn value(c: &Cache, key: &str, options: ReadOptions) -> Option<(Vec<u8>, Tier)> {
    c.get("ns", key, options)
        .await
        .unwrap()
        .hit()
        .map(|h| (h.value.to_vec(), h.tier))
}

#[tokio::test]
async fn test_reads_come_from_l1_then_l2_and_fresh_skips_l1() {
    let (c, _, _) = cache().await;
    assert_eq!(c.get("ns", "k", DEFAULT).await.unwrap(), Found::Miss);
    assert_eq!(c.set("ns", "k", b"v1", &set(None)).await.unwrap(), 1);
    let h = c.get("ns", "k", DEFAULT).await.unwrap().hit().unwrap();
    assert_eq!(
        (h.value.as_ref(), h.version, h.tier),
        (&b"v1"[..], 1, Tier::L1)
    );
    assert_eq!(value(&c, "k", FRESH).await.unwrap().1, Tier::L2);
    // Another namespace is another key.
    assert_eq!(c.get("other", "k", DEFAULT).await.unwrap(), Found::Miss);
}

#[tokio::test]
async fn test_compare_and_set_and_delete() {
    let (c, _, _) = cache().await;
    let cas = |v| SetOptions {
        if_version: Some(v),
        ..SetOptions::default()
    };
    assert_eq!(c.set("ns", "k", b"a", &cas(0)).await.unwrap(), 1);
    assert_eq!(
        c.set("ns", "k", b"b", &cas(0)).await.unwrap_err(),
        CacheError::VersionMismatch {
            expected: 0,
            current: 1
        }
    );
    assert_eq!(c.set("ns", "k", b"b", &cas(1)).await.unwrap(), 2);
    assert!(c.delete("ns", "k").await.unwrap());
    assert!(!c.delete("ns", "k").await.unwrap());
    assert_eq!(c.get("ns", "k", DEFAULT).await.unwrap(), Found::Miss);
}

#[tokio::test]
async fn test_entries_expire_after_their_jittered_ttl_and_are_stale_in_their_grace_window() {
    let (c, clock, _) = cache().await;
    c.set("ns", "k", b"v", &set(Some(Duration::from_secs(10))))
        .await
        .unwrap();
    clock.0.store(8_900, Ordering::SeqCst);
    assert!(value(&c, "k", DEFAULT).await.is_some());
    clock.0.store(11_100, Ordering::SeqCst);
    assert_eq!(c.get("ns", "k", DEFAULT).await.unwrap(), Found::Miss);
    let grace = SetOptions {
        ttl: Some(Duration::from_secs(10)),
        grace: Duration::from_secs(60),
        ..SetOptions::default()
    };
    c.set("ns", "g", b"v", &grace).await.unwrap();
    clock.0.store(11_100 + 11_100, Ordering::SeqCst);
    assert_eq!(c.get("ns", "g", DEFAULT).await.unwrap(), Found::Miss);
    let stale = ReadOptions {
        allow_stale: true,
        ..DEFAULT
    };
    let h = c.get("ns", "g", stale).await.unwrap().hit().unwrap();
    assert!(h.stale);
}

#[tokio::test]
async fn test_bad_input_names_every_field() {
    let (c, _, _) = cache().await;
    let options = SetOptions {
        ttl: Some(Duration::ZERO),
        tags: vec!["ok".into(), "bad tag".into()],
        ..SetOptions::default()
    };
    let e = c
        .set("bad ns", "", &vec![0; MAX_VALUE_LEN + 1], &options)
        .await
        .unwrap_err();
    let CacheError::InvalidArgument(v) = e else {
        panic!("{e:?}");
    };
    let fields: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["namespace", "key", "value", "ttl", "tags[1]"]);
    let e = c
        .get_many(&[
            GetItem {
                namespace: "ns".into(),
                key: "fine".into(),
                options: DEFAULT,
            },
            GetItem {
                namespace: "ns".into(),
                key: String::new(),
                options: DEFAULT,
            },
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CacheError::InvalidArgument(v) if v[0].field == "items[1].key"),
        "{e:?}"
    );
}

#[tokio::test]
async fn test_a_write_on_another_instance_reaches_this_l1_through_the_feed() {
    let (a, clock, l2) = cache().await;
    let b = cache_over(l2, clock);
    synced(&b).await;
    a.set("ns", "k", b"one", &set(None)).await.unwrap();
    assert_eq!(
        value(&b, "k", DEFAULT).await.unwrap(),
        (b"one".to_vec(), Tier::L2)
    );
    assert_eq!(value(&b, "k", DEFAULT).await.unwrap().1, Tier::L1);
    a.set("ns", "k", b"two", &set(None)).await.unwrap();
    // The change reaches b's L1 (in process: at once; wait for the task to apply it).
    for _ in 0..100 {
        if b.l1.last_seq() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        value(&b, "k", DEFAULT).await.unwrap(),
        (b"two".to_vec(), Tier::L2)
    );
}

#[tokio::test]
async fn test_tags_and_namespaces_are_invalidated_by_generation() {
    let (c, _, _) = cache().await;
    let tagged = |tags: &[&str]| SetOptions {
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..SetOptions::default()
    };
    c.set("ns", "a", b"1", &tagged(&["user:1"])).await.unwrap();
    c.set("ns", "b", b"2", &tagged(&["user:2", "doc"]))
        .await
        .unwrap();
    c.set("ns", "c", b"3", &tagged(&[])).await.unwrap();
    c.set("other", "a", b"4", &tagged(&["user:1"]))
        .await
        .unwrap();
    c.invalidate_tags("ns", &["user:1".into()]).await.unwrap();
    // Invalidated at once in this instance's L1 and in L2.
    assert_eq!(value(&c, "a", DEFAULT).await, None);
    assert_eq!(value(&c, "a", FRESH).await, None);
    assert!(value(&c, "b", DEFAULT).await.is_some());
    assert!(c.get("other", "a", DEFAULT).await.unwrap().hit().is_some());
    // Written again after the invalidation: served.
    c.set("ns", "a", b"1'", &tagged(&["user:1"])).await.unwrap();
    assert_eq!(value(&c, "a", DEFAULT).await.unwrap().0, b"1'");
    c.invalidate_namespace("ns").await.unwrap();
    for k in ["a", "b", "c"] {
        assert_eq!(value(&c, k, DEFAULT).await, None, "{k}");
        assert_eq!(value(&c, k, FRESH).await, None, "{k}");
    }
    assert!(c.get("other", "a", DEFAULT).await.unwrap().hit().is_some());
}

#[tokio::test]
async fn test_a_gap_in_the_feed_flushes_l1() {
    let (c, _, _) = cache().await;
    c.set("ns", "k", b"v", &set(None)).await.unwrap();
    assert_eq!(value(&c, "k", DEFAULT).await.unwrap().1, Tier::L1);
    let last = c.l1.last_seq();
    let applied = c.l1.apply(&Change {
        seq: last + 5,
        sent_ms: 0,
        namespace: "elsewhere".into(),
        what: crate::sync::What::Deleted { key: "x".into() },
    });
    assert_eq!(applied, Applied::Gap);
    assert_eq!(value(&c, "k", DEFAULT).await.unwrap().1, Tier::L2);
}

#[tokio::test]
async fn test_watchers_get_changes_and_resume_with_a_flush_when_too_far_behind() {
    let (c, _, _) = cache().await;
    let mut live = c.watch(None);
    c.set("ns", "k", b"v", &set(None)).await.unwrap();
    c.invalidate_tags("ns", &["t".into()]).await.unwrap();
    let Notice::Change(first) = live.next().await.unwrap() else {
        panic!("a change first")
    };
    assert_eq!(first.key(), Some("k"));
    let Notice::Change(second) = live.next().await.unwrap() else {
        panic!("a change")
    };
    assert_eq!(second.seq, first.seq + 1);
    // Resuming after the first replays the second.
    let mut resumed = c.watch(Some(first.seq));
    assert_eq!(
        resumed.next().await.unwrap(),
        Notice::Change(second.clone())
    );
    // Resuming from before what is held starts with a flush.
    for i in 0..REPLAY + 10 {
        c.set("ns", &format!("k{i}"), b"v", &set(None))
            .await
            .unwrap();
    }
    let target = second.seq + REPLAY as u64 + 10;
    for _ in 0..500 {
        if c.l1.last_seq() >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut old = c.watch(Some(first.seq));
    let n = old.next().await.unwrap();
    assert!(
        matches!(n, Notice::Flush { .. }),
        "{n:?} {}",
        c.l1.last_seq()
    );
}

#[tokio::test]
async fn test_stats_count_per_namespace() {
    let (c, _, _) = cache().await;
    c.set("ns", "k", b"v", &set(None)).await.unwrap();
    value(&c, "k", DEFAULT).await;
    value(&c, "nope", DEFAULT).await;
    let s = c.stats(Some("ns"));
    assert_eq!(s.namespaces.len(), 1);
    let ns = &s.namespaces[0];
    assert_eq!(ns.reads.get("l1"), Some(&1));
    assert_eq!(ns.reads.get("miss"), Some(&1));
    assert!((ns.hit_rate() - 0.5).abs() < 1e-9);
    assert_eq!(s.l1_entries, 1);
    assert!(s.feed_synced);
}

#[tokio::test]
async fn test_a_stampede_over_three_instances_computes_once_and_everyone_gets_the_value() {
    let (a, clock, l2) = cache().await;
    let (b, c) = (cache_over(l2.clone(), clock.clone()), cache_over(l2, clock));
    synced(&b).await;
    synced(&c).await;
    let computed = Arc::new(AtomicU64::new(0));
    let mut calls = Vec::new();
    for i in 0..300 {
        let node = [&a, &b, &c][i % 3].clone();
        let computed = computed.clone();
        calls.push(tokio::spawn(async move {
            match node
                .get_or_lease("ns", "hot", Duration::from_secs(5), Duration::from_secs(5))
                .await
                .unwrap()
            {
                LeaseAnswer::Lease(lease) => {
                    computed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    node.fill_lease("ns", "hot", lease.token, b"answer", &SetOptions::default())
                        .await
                        .unwrap();
                    b"answer".to_vec()
                }
                LeaseAnswer::Hit { hit, .. } => hit.value.to_vec(),
                other => panic!("{other:?}"),
            }
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), b"answer");
    }
    assert_eq!(computed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn test_leases_are_fenced_expire_to_a_waiter_and_can_leave_a_negative_entry() {
    let (c, clock, _) = cache().await;
    let short = Duration::from_millis(50);
    let LeaseAnswer::Lease(first) = c
        .get_or_lease("ns", "k", short, Duration::ZERO)
        .await
        .unwrap()
    else {
        panic!("the first caller gets the lease")
    };
    // Held: a caller that does not wait is told so.
    assert!(matches!(
        c.get_or_lease("ns", "k", short, Duration::ZERO)
            .await
            .unwrap(),
        LeaseAnswer::Pending { .. }
    ));
    // The holder goes quiet: a waiter is granted the next lease once it runs out.
    let later = clock.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        later.0.store(100, Ordering::SeqCst);
    });
    let LeaseAnswer::Lease(second) = c
        .get_or_lease("ns", "k", Duration::from_secs(5), Duration::from_secs(1))
        .await
        .unwrap()
    else {
        panic!("a waiter is promoted")
    };
    assert!(second.token > first.token);
    // The first holder's late fill is refused.
    assert_eq!(
        c.fill_lease("ns", "k", first.token, b"late", &SetOptions::default())
            .await
            .unwrap_err(),
        CacheError::LeaseLost { token: first.token }
    );
    // The second gives up and remembers the miss.
    assert!(
        c.abandon_lease("ns", "k", second.token, Some(Duration::from_secs(30)))
            .await
            .unwrap()
    );
    assert!(matches!(
        c.get_or_lease("ns", "k", short, Duration::ZERO).await.unwrap(),
        LeaseAnswer::Negative(left) if left > 29_000
    ));
    assert!(matches!(
        c.get("ns", "k", DEFAULT).await.unwrap(),
        Found::Negative(_)
    ));
}

#[tokio::test]
async fn test_a_stale_value_is_served_while_one_caller_refreshes_it() {
    let (c, clock, _) = cache().await;
    let options = SetOptions {
        ttl: Some(Duration::from_secs(10)),
        grace: Duration::from_secs(60),
        ..SetOptions::default()
    };
    c.set("ns", "k", b"old", &options).await.unwrap();
    clock.0.store(20_000, Ordering::SeqCst);
    let lease = Duration::from_secs(5);
    let LeaseAnswer::Hit {
        hit,
        refresh: Some(refresh),
    } = c
        .get_or_lease("ns", "k", lease, Duration::ZERO)
        .await
        .unwrap()
    else {
        panic!("stale value with a lease to refresh it")
    };
    assert!(hit.stale);
    assert_eq!(hit.value.as_ref(), b"old");
    // Everyone else gets the stale value without a lease, at once.
    assert!(matches!(
        c.get_or_lease("ns", "k", lease, Duration::ZERO).await.unwrap(),
        LeaseAnswer::Hit { refresh: None, hit } if hit.stale
    ));
    c.fill_lease("ns", "k", refresh.token, b"new", &options)
        .await
        .unwrap();
    assert!(matches!(
        c.get_or_lease("ns", "k", lease, Duration::ZERO).await.unwrap(),
        LeaseAnswer::Hit { refresh: None, hit } if !hit.stale && hit.value.as_ref() == b"new"
    ));
}
