//! Membership against a real etcd: leases, watches, and recovery when etcd stops or loses its data.

use std::time::Duration;

use agentmesh_membership::{
    EtcdMembership, EtcdMembershipConfig, Member, MemberWatch, Membership, MembershipError,
    MembershipEvent, member_key,
};
use agentmesh_tests::{EtcdServer, init_test_tracing, wait_until};
use etcd_client::Client;

/// Lease TTL in these tests (etcd 3.4's minimum is about 2 s).
const TTL: Duration = Duration::from_secs(2);
/// Time for anything that should happen "soon" (events, re-listing, re-registration).
const SOON: Duration = Duration::from_secs(15);

async fn connect(etcd: &EtcdServer) -> EtcdMembership {
    EtcdMembership::connect(EtcdMembershipConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: "/agentmesh".to_owned(),
        lease_ttl: TTL,
        connect_timeout: Duration::from_secs(1),
        tls: None,
    })
    .await
    .expect("connect to etcd")
}

fn member(service: &str, instance_id: &str) -> Member {
    Member {
        service: service.to_owned(),
        instance_id: instance_id.to_owned(),
        grpc_addr: "127.0.0.1:7101".to_owned(),
        admin_addr: "127.0.0.1:9101".to_owned(),
        version: "0.1.0".to_owned(),
        zone: "test-a".to_owned(),
        started_at_ms: 1_700_000_000_000,
    }
}

/// The value and lease of a key, read with a plain etcd client.
async fn raw_get(client: &mut Client, key: &str) -> Option<(String, i64)> {
    let response = client.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    Some((kv.value_str().ok()?.to_owned(), kv.lease()))
}

/// The lease of `key`, if the key exists and etcd answers.
async fn lease_of(etcd: &EtcdServer, key: &str) -> Option<i64> {
    let mut client = etcd.client().await.ok()?;
    raw_get(&mut client, key).await.map(|(_, lease)| lease)
}

async fn next_event(watch: &mut MemberWatch) -> MembershipEvent {
    tokio::time::timeout(SOON, watch.next_event())
        .await
        .expect("a membership event in time")
        .expect("the watch is still open")
}

/// Skips events until one matches (re-lists may emit others first).
async fn event_matching(
    watch: &mut MemberWatch,
    what: &str,
    matches: impl Fn(&MembershipEvent) -> bool,
) -> MembershipEvent {
    let wait = async {
        loop {
            match watch.next_event().await {
                Some(event) if matches(&event) => return event,
                Some(_) => {}
                None => panic!("watch ended while waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(SOON, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_register_puts_member_json_under_a_lease_and_deregister_removes_it_at_once() {
    init_test_tracing();
    let etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    let mut raw = etcd.client().await.unwrap();
    let key = "/agentmesh/members/cache/cache-1";
    assert_eq!(member_key("/agentmesh", "cache", "cache-1"), key);

    let registration = membership
        .register(member("cache", "cache-1"))
        .await
        .unwrap();
    assert!(registration.is_registered());
    assert_eq!(registration.member(), &member("cache", "cache-1"));

    let (value, lease) = raw_get(&mut raw, key).await.expect("member key in etcd");
    let stored: Member = serde_json::from_str(&value).unwrap();
    assert_eq!(stored, member("cache", "cache-1"));
    let json: serde_json::Value = serde_json::from_str(&value).unwrap();
    for field in [
        "service",
        "instance_id",
        "grpc_addr",
        "admin_addr",
        "version",
        "zone",
        "started_at_ms",
    ] {
        assert!(json.get(field).is_some(), "{field} missing in {value}");
    }
    assert_ne!(lease, 0, "the key is attached to a lease");
    let ttl = raw.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 2);
    assert!(ttl.ttl() > 0);

    let snapshot = membership.list("cache").await.unwrap();
    assert_eq!(
        snapshot.members.get("cache-1"),
        Some(&member("cache", "cache-1"))
    );
    assert!(snapshot.epoch > 0);
    assert_eq!(
        membership.list_all().await.unwrap(),
        vec![member("cache", "cache-1")]
    );

    registration.deregister().await.unwrap();
    assert_eq!(
        raw_get(&mut raw, key).await,
        None,
        "deregister removes the key at once"
    );
    let ttl = raw.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "the lease is revoked");
    assert!(membership.list("cache").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_list_all_spans_services_sorted_and_invalid_members_are_rejected() {
    init_test_tracing();
    let etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    let _registrations = [
        membership.register(member("scheduler", "b")).await.unwrap(),
        membership.register(member("cache", "z")).await.unwrap(),
        membership.register(member("scheduler", "a")).await.unwrap(),
    ];
    let all: Vec<(String, String)> = membership
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.service, m.instance_id))
        .collect();
    let expected = [("cache", "z"), ("scheduler", "a"), ("scheduler", "b")]
        .map(|(s, i)| (s.to_owned(), i.to_owned()));
    assert_eq!(all, expected);

    let err = membership
        .register(member("cache", "a/b"))
        .await
        .unwrap_err();
    assert!(matches!(err, MembershipError::InvalidMember(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_dropped_registration_expires_after_the_lease_ttl() {
    init_test_tracing();
    let etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    let key = member_key("/agentmesh", "eventbus", "eb-1");

    let registration = membership
        .register(member("eventbus", "eb-1"))
        .await
        .unwrap();
    drop(registration);
    assert!(
        lease_of(&etcd, &key).await.is_some(),
        "the key outlives the handle until the TTL"
    );
    wait_until(
        TTL + Duration::from_secs(4),
        "the dropped registration's key to expire",
        || {
            let (etcd, key) = (&etcd, &key);
            async move { etcd.client().await.is_ok() && lease_of(etcd, key).await.is_none() }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_registration_restores_its_key_after_it_is_deleted_by_hand() {
    init_test_tracing();
    let etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    let key = member_key("/agentmesh", "cache", "cache-9");
    let registration = membership
        .register(member("cache", "cache-9"))
        .await
        .unwrap();
    let old_lease = lease_of(&etcd, &key).await.expect("registered");

    etcd.client()
        .await
        .unwrap()
        .delete(key.as_str(), None)
        .await
        .unwrap();
    wait_until(TTL * 3, "the deleted key to be registered again", || {
        let (etcd, key) = (&etcd, &key);
        async move {
            lease_of(etcd, key)
                .await
                .is_some_and(|l| l != 0 && l != old_lease)
        }
    })
    .await
    .unwrap();
    assert!(registration.is_registered());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_watcher_sees_joined_and_left_from_another_registration() {
    init_test_tracing();
    let etcd = EtcdServer::start().await.unwrap();
    let watcher = connect(&etcd).await;
    let other = connect(&etcd).await;

    let first = other.register(member("scheduler", "s-1")).await.unwrap();
    let _unrelated = other.register(member("scheduler2", "x")).await.unwrap();
    let mut watch = watcher.watch("scheduler").await.unwrap();
    let initial = watch.current();
    assert_eq!(initial.service, "scheduler");
    assert_eq!(initial.members.keys().collect::<Vec<_>>(), ["s-1"]);

    let second = other.register(member("scheduler", "s-2")).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        MembershipEvent::Joined(member("scheduler", "s-2"))
    );
    let after_join = watch.current();
    assert_eq!(
        after_join.members.keys().collect::<Vec<_>>(),
        ["s-1", "s-2"]
    );
    assert!(after_join.epoch > initial.epoch);

    let mut changed = member("scheduler", "s-2");
    changed.version = "0.2.0".to_owned();
    let second_v2 = other.register(changed.clone()).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        MembershipEvent::Updated(changed.clone())
    );
    drop(second);

    second_v2.deregister().await.unwrap();
    assert_eq!(next_event(&mut watch).await, MembershipEvent::Left(changed));
    assert!(watch.current().epoch > after_join.epoch);

    // A dropped registration leaves by lease expiry.
    drop(first);
    assert_eq!(
        next_event(&mut watch).await,
        MembershipEvent::Left(member("scheduler", "s-1"))
    );
    assert!(watch.current().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_registration_and_watch_recover_after_etcd_restarts_with_wiped_data() {
    init_test_tracing();
    let mut etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    let watcher = connect(&etcd).await;
    let key = member_key("/agentmesh", "ratelimit", "rl-1");

    let registration = membership
        .register(member("ratelimit", "rl-1"))
        .await
        .unwrap();
    let mut watch = watcher.watch("ratelimit").await.unwrap();
    let old_lease = lease_of(&etcd, &key).await.expect("registered");
    let epoch_before = watch.current().epoch;

    etcd.restart_wiped().await.unwrap();

    wait_until(
        SOON,
        "the member to be re-registered under a new lease",
        || {
            let (etcd, key, registration) = (&etcd, &key, &registration);
            async move {
                let lease = lease_of(etcd, key).await;
                registration.is_registered() && lease.is_some_and(|l| l != 0 && l != old_lease)
            }
        },
    )
    .await
    .unwrap();
    let mut raw = etcd.client().await.unwrap();
    let (value, lease) = raw_get(&mut raw, &key).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Member>(&value).unwrap(),
        member("ratelimit", "rl-1")
    );
    assert!(raw.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);

    wait_until(
        SOON,
        "the watcher to re-list and see the member again",
        || {
            let snapshot = watch.current();
            async move { snapshot.epoch > epoch_before && snapshot.members.contains_key("rl-1") }
        },
    )
    .await
    .unwrap();

    // The watch is live again on the new etcd.
    let _second = membership
        .register(member("ratelimit", "rl-2"))
        .await
        .unwrap();
    event_matching(&mut watch, "Joined(rl-2)", |e| {
        *e == MembershipEvent::Joined(member("ratelimit", "rl-2"))
    })
    .await;
    assert_eq!(
        watch.current().members.keys().collect::<Vec<_>>(),
        ["rl-1", "rl-2"]
    );
    assert!(registration.is_registered());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_registration_comes_back_after_etcd_was_stopped_longer_than_the_ttl() {
    init_test_tracing();
    let mut etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    let key = member_key("/agentmesh", "health", "h-1");
    let registration = membership.register(member("health", "h-1")).await.unwrap();
    let old_lease = lease_of(&etcd, &key).await.expect("registered");

    etcd.stop();
    wait_until(
        TTL * 3,
        "the registration to notice the lease is lost",
        || {
            let registered = registration.is_registered();
            async move { !registered }
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !registration.is_registered(),
        "no re-registration while etcd is down"
    );

    etcd.restart().await.unwrap();
    wait_until(
        SOON,
        "the member to be re-registered under a new lease",
        || {
            let (etcd, key, registration) = (&etcd, &key, &registration);
            async move {
                let lease = lease_of(etcd, key).await;
                registration.is_registered() && lease.is_some_and(|l| l != 0 && l != old_lease)
            }
        },
    )
    .await
    .unwrap();
    let snapshot = membership.list("health").await.unwrap();
    assert_eq!(snapshot.members.get("h-1"), Some(&member("health", "h-1")));

    // The key now lives on the new lease alone: revoking it removes the member.
    registration.deregister().await.unwrap();
    assert_eq!(lease_of(&etcd, &key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_calls_fail_with_unavailable_instead_of_hanging_when_etcd_is_down() {
    init_test_tracing();
    let mut etcd = EtcdServer::start().await.unwrap();
    let membership = connect(&etcd).await;
    etcd.kill();

    let bounded = Duration::from_secs(5);
    let list = tokio::time::timeout(bounded, membership.list("cache"))
        .await
        .expect("list returns");
    assert!(
        matches!(list, Err(MembershipError::Unavailable(_))),
        "{list:?}"
    );
    let register = tokio::time::timeout(bounded, membership.register(member("cache", "c")))
        .await
        .expect("register returns");
    assert!(
        matches!(register, Err(MembershipError::Unavailable(_))),
        "{register:?}"
    );
    let watch = tokio::time::timeout(bounded, membership.watch("cache"))
        .await
        .expect("watch returns");
    assert!(matches!(watch, Err(MembershipError::Unavailable(_))));
    let config = EtcdMembershipConfig {
        endpoints: vec![etcd.endpoint()],
        lease_ttl: TTL,
        connect_timeout: Duration::from_secs(1),
        ..EtcdMembershipConfig::default()
    };
    let connect = tokio::time::timeout(bounded, EtcdMembership::connect(config))
        .await
        .expect("connect returns");
    assert!(matches!(connect, Err(MembershipError::Unavailable(_))));
}
