use std::time::Duration;

use agentmesh_membership::Member;

use super::*;
use crate::config::HealthConfig;

const T0: u64 = 1_800_000_000_000;

fn member(service: &str, id: &str) -> Member {
    Member {
        service: service.into(),
        instance_id: id.into(),
        grpc_addr: "127.0.0.1:1".into(),
        admin_addr: "127.0.0.1:2".into(),
        version: "0.1.0".into(),
        zone: String::new(),
        started_at_ms: T0,
    }
}

fn passed() -> Observation {
    Observation::CheckPassed {
        latency: Duration::from_millis(1),
        detail: "SERVING".into(),
    }
}

fn failed() -> Observation {
    Observation::CheckFailed {
        latency: Duration::from_millis(500),
        detail: "deadline exceeded".into(),
    }
}

fn aggregator() -> Arc<Aggregator> {
    Aggregator::new(HealthConfig::default(), HealthMetrics::unregistered(), T0)
}

fn state(agg: &Aggregator, id: &str) -> State {
    agg.component(id, T0).map_or(State::Unknown, |c| c.state)
}

/// Two ratelimit instances, both UP.
fn two_up() -> Arc<Aggregator> {
    let agg = aggregator();
    for id in ["r1", "r2"] {
        agg.upsert_instance(&member("ratelimit", id), T0);
        agg.observe(&model::instance_id("ratelimit", id), passed(), T0);
    }
    agg
}

#[test]
fn test_discovered_instances_are_pending_then_up_and_roll_up() {
    let agg = aggregator();
    agg.upsert_instance(&member("ratelimit", "r1"), T0);
    assert_eq!(state(&agg, "instance/ratelimit/r1"), State::Pending);
    assert_eq!(state(&agg, "service/ratelimit"), State::Pending);
    agg.observe("instance/ratelimit/r1", passed(), T0);
    assert_eq!(state(&agg, "instance/ratelimit/r1"), State::Up);
    assert_eq!(state(&agg, "service/ratelimit"), State::Up);
    assert_eq!(state(&agg, CLUSTER_ID), State::Up);
}

#[test]
fn test_a_broken_watch_stream_is_down_at_once_and_the_service_degraded() {
    let agg = two_up();
    let broken = Observation::WatchBroken {
        detail: "connection reset".into(),
    };
    agg.observe("instance/ratelimit/r1", broken, T0 + 10);
    let instance = agg.component("instance/ratelimit/r1", T0 + 10).unwrap();
    assert_eq!(instance.state, State::Down);
    assert!(
        instance.cause.contains("connection reset"),
        "{}",
        instance.cause
    );
    let service = agg.component("service/ratelimit", T0 + 10).unwrap();
    assert_eq!(service.state, State::Degraded);
    assert_eq!(service.cause, "1 of 2 instances DOWN");
    let cluster = agg.snapshot(true, T0 + 10);
    assert_eq!(cluster.state, State::Degraded);
    assert_eq!(
        cluster.summary,
        "DEGRADED: ratelimit DEGRADED: 1 of 2 instances DOWN"
    );
}

#[test]
fn test_failed_checks_need_fall_in_a_row_and_passes_need_rise() {
    let agg = two_up();
    let id = "instance/ratelimit/r1";
    agg.observe(id, failed(), T0 + 1);
    assert_eq!(state(&agg, id), State::Up, "one failure is not enough");
    agg.observe(id, passed(), T0 + 2);
    agg.observe(id, failed(), T0 + 3);
    assert_eq!(state(&agg, id), State::Up, "the streak restarted");
    agg.observe(id, failed(), T0 + 4);
    assert_eq!(state(&agg, id), State::Down);
    agg.observe(id, passed(), T0 + 5);
    assert_eq!(state(&agg, id), State::Down, "one pass is not enough");
    agg.observe(id, passed(), T0 + 6);
    assert_eq!(state(&agg, id), State::Up);
    let history = agg.history(id, 10);
    assert_eq!(
        history.iter().map(|t| t.to).collect::<Vec<_>>(),
        [State::Up, State::Down, State::Up]
    );
    assert_eq!(history[1].cause, "deadline exceeded");
}

#[test]
fn test_an_instance_that_leaves_cleanly_is_removed_not_reported_down() {
    let agg = two_up();
    let id = "instance/ratelimit/r1";
    agg.observe(id, Observation::WatchNotServing, T0 + 1);
    agg.observe(
        id,
        Observation::WatchBroken {
            detail: "stream ended".into(),
        },
        T0 + 2,
    );
    agg.observe(id, failed(), T0 + 3);
    agg.observe(id, failed(), T0 + 4);
    assert_eq!(state(&agg, id), State::Up);
    agg.remove_instance("ratelimit", "r1", T0 + 5);
    assert!(agg.component(id, T0 + 5).is_none());
    assert_eq!(state(&agg, "service/ratelimit"), State::Up);
    assert!(agg.history("", 100).iter().all(|t| t.to != State::Down));
}

#[test]
fn test_not_serving_without_leaving_is_down_after_the_grace_period() {
    let agg = two_up();
    let id = "instance/ratelimit/r1";
    agg.observe(id, Observation::WatchNotServing, T0);
    agg.tick(T0 + 1_000);
    assert_eq!(state(&agg, id), State::Up);
    agg.tick(T0 + 2_000);
    assert_eq!(state(&agg, id), State::Down);
}

#[test]
fn test_a_dependency_down_degrades_its_dependents_with_the_root_cause() {
    let agg = two_up();
    agg.add_dependency("redis", T0);
    agg.observe("dependency/redis", passed(), T0);
    assert_eq!(state(&agg, CLUSTER_ID), State::Up);
    agg.observe("dependency/redis", failed(), T0 + 1);
    agg.observe("dependency/redis", failed(), T0 + 2);
    let service = agg.component("service/ratelimit", T0 + 2).unwrap();
    assert_eq!(service.state, State::Degraded);
    assert_eq!(service.cause, "redis DOWN");
    let cluster = agg.snapshot(true, T0 + 2);
    assert!(
        cluster.summary.contains("ratelimit DEGRADED: redis DOWN"),
        "{}",
        cluster.summary
    );
    let (_, edges) = agg.graph();
    assert!(edges.contains(&(
        "service/ratelimit".to_owned(),
        "dependency/redis".to_owned()
    )));
}

#[test]
fn test_maintenance_shows_instead_and_expires() {
    let agg = two_up();
    let id = "instance/ratelimit/r1";
    let view = agg
        .set_maintenance(id, Some((T0 + 60_000, "kernel upgrade".into())), T0)
        .unwrap();
    assert_eq!(view.state, State::Maintenance);
    assert!(agg.in_maintenance(id));
    agg.observe(id, Observation::WatchBroken { detail: "x".into() }, T0 + 1);
    let view = agg.component(id, T0 + 1).unwrap();
    assert_eq!(
        (view.state, view.computed),
        (State::Maintenance, State::Down)
    );
    assert_eq!(
        state(&agg, "service/ratelimit"),
        State::Up,
        "maintenance is not counted"
    );
    agg.tick(T0 + 60_000);
    assert_eq!(state(&agg, id), State::Down);
    assert_eq!(state(&agg, "service/ratelimit"), State::Degraded);
    assert!(matches!(
        agg.set_maintenance("service/nope", None, T0),
        Err(HealthError::NotFound(_))
    ));
    assert!(matches!(
        agg.set_maintenance(CLUSTER_ID, None, T0),
        Err(HealthError::InvalidArgument(_))
    ));
}

#[test]
fn test_watch_resumes_from_a_revision_or_falls_back_to_a_snapshot() {
    let agg = two_up();
    let (start, mut updates_rx) = agg.watch(0, false, T0);
    let WatchStart::Snapshot(view) = start else {
        panic!("a fresh watch starts with a snapshot");
    };
    assert_eq!(view.components.len(), 4, "cluster, service, two instances");
    agg.observe(
        "instance/ratelimit/r2",
        Observation::WatchBroken { detail: "x".into() },
        T0 + 1,
    );
    let delta = updates_rx.try_recv().unwrap();
    assert_eq!(delta.revision, view.revision + 1);
    let ids: Vec<&str> = delta.changed.iter().map(|c| c.id.as_str()).collect();
    assert!(ids.contains(&"instance/ratelimit/r2") && ids.contains(&"service/ratelimit"));
    assert_eq!(delta.cluster_state, State::Degraded);
    let (start, _) = agg.watch(view.revision, false, T0 + 2);
    let WatchStart::Replay(replayed) = start else {
        panic!("a known revision is replayed");
    };
    assert_eq!(replayed.len(), 1);
    let (start, _) = agg.watch(view.revision + 100, false, T0 + 2);
    assert!(
        matches!(start, WatchStart::Snapshot(_)),
        "a future revision gets a snapshot"
    );
    agg.remove_instance("ratelimit", "r2", T0 + 3);
    let delta = updates_rx.try_recv().unwrap();
    assert_eq!(delta.removed, ["instance/ratelimit/r2"]);
}

#[test]
fn test_expected_instances_make_a_missing_service_down() {
    let mut config = HealthConfig::default();
    config.expected.insert("cache".into(), 2);
    let agg = Aggregator::new(config, HealthMetrics::unregistered(), T0);
    assert_eq!(state(&agg, "service/cache"), State::Down);
    agg.upsert_instance(&member("cache", "c1"), T0);
    agg.observe("instance/cache/c1", passed(), T0);
    let service = agg.component("service/cache", T0).unwrap();
    assert_eq!(
        (service.state, service.cause.as_str()),
        (State::Degraded, "1 of 2 instances DOWN")
    );
}

#[test]
fn test_a_service_whose_last_instance_was_lost_stays_down_until_one_returns() {
    let agg = aggregator();
    agg.upsert_instance(&member("cache", "c1"), T0);
    agg.observe("instance/cache/c1", passed(), T0);
    agg.observe(
        "instance/cache/c1",
        Observation::WatchBroken {
            detail: "reset".into(),
        },
        T0 + 1,
    );
    agg.remove_instance("cache", "c1", T0 + 2_000);
    let service = agg
        .component("service/cache", T0 + 2_000)
        .expect("still shown");
    assert_eq!(service.state, State::Down);
    assert_eq!(service.cause, "no instance registered (1 expected)");
    agg.upsert_instance(&member("cache", "c2"), T0 + 3_000);
    agg.observe("instance/cache/c2", passed(), T0 + 3_000);
    assert_eq!(state(&agg, "service/cache"), State::Up);
    // A clean leave takes the service away.
    agg.remove_instance("cache", "c2", T0 + 4_000);
    assert!(agg.component("service/cache", T0 + 4_000).is_none());
}
