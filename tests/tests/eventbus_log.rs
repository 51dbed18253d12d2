//! The durable event log: one conformance suite run against the in-memory log and the Redis
//! Streams log on a real Redis, then what only Redis has: events surviving a new log instance,
//! blocking reads that do not stall other commands, Redis going away, the sequence encoding and
//! the stored layout; and the Redis backplane between instances shedding by priority when a bus
//! falls behind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentmesh_eventbus::cluster::{Backplane, Forward, Handed, INBOUND_QUEUE, Inbound};
use agentmesh_eventbus::log::{
    AppendOutcome, EventLog, InMemoryLog, StartPosition, StoredEvent, TrimPolicy, stored_at_ms,
};
use agentmesh_eventbus::redis_backplane::RedisBackplane;
use agentmesh_eventbus::redis_log::{RedisLog, sequence_of_stream_id, stream_id_of};
use agentmesh_eventbus::{Event, EventBusError, Priority};
use agentmesh_tests::{RedisServer, wait_until};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

const NONE: Duration = Duration::ZERO;
const WINDOW: Duration = Duration::from_secs(60);
const PREFIX: &str = "test:eventbus";

fn event(id: &str) -> Event {
    Event {
        id: id.to_owned(),
        subject: "orders.created".to_owned(),
        ..Event::default()
    }
}

fn full_event(id: &str) -> Event {
    Event {
        id: id.to_owned(),
        subject: "orders.eu.created".to_owned(),
        r#type: "com.example.order.created".to_owned(),
        source: "/agents/a-17".to_owned(),
        time_ms: 1_700_000_000_123,
        priority: Priority::Critical,
        expires_at_ms: Some(1_900_000_000_000),
        correlation_id: "corr-1".to_owned(),
        reply_to: "_inbox.abc".to_owned(),
        ordering_key: "customer-9".to_owned(),
        headers: BTreeMap::from([
            ("traceparent".to_owned(), "00-0af7-b7ad-01".to_owned()),
            ("odd".to_owned(), "a=\"b\"\n{c}".to_owned()),
        ]),
        content_type: "application/octet-stream".to_owned(),
        data: vec![0_u8, 1, 255, b'\n', 0].into(),
    }
}

fn ids(events: &[StoredEvent]) -> Vec<String> {
    events.iter().map(|s| s.event.id.clone()).collect()
}

async fn append(log: &dyn EventLog, stream: &str, ids: &[&str]) -> Vec<u64> {
    let events: Vec<Event> = ids.iter().map(|id| event(id)).collect();
    log.append_batch(stream, events, NONE)
        .await
        .1
        .unwrap()
        .into_iter()
        .map(|outcome| match outcome {
            AppendOutcome::Stored(sequence) => sequence,
            other => panic!("expected stored, got {other:?}"),
        })
        .collect()
}

async fn read(log: &dyn EventLog, stream: &str, group: &str, consumer: &str) -> Vec<String> {
    ids(&log
        .read_group(stream, group, consumer, 100, NONE)
        .await
        .unwrap())
}

async fn pending(log: &dyn EventLog, stream: &str, group: &str) -> u64 {
    let info = log.info(stream).await.unwrap();
    info.groups
        .iter()
        .find(|g| g.name == group)
        .unwrap_or_else(|| panic!("group {group} in {info:?}"))
        .pending
}

/// Every behaviour both implementations share.
async fn conformance(log: &dyn EventLog) {
    appends_dedup_within_the_window(log).await;
    events_round_trip_with_every_attribute(log).await;
    groups_share_events_one_consumer_each(log).await;
    events_stay_pending_until_acked(log).await;
    stalled_events_are_claimed_with_delivery_counts(log).await;
    groups_start_where_asked(log).await;
    a_start_beyond_the_end_is_invalid(log).await;
    range_reads_start_where_asked(log).await;
    delete_and_trim_by_length_and_age(log).await;
    blocking_reads_wake_on_append_or_time_out(log).await;
    unknown_names_are_reported(log).await;
    let streams = log.streams().await.unwrap();
    for stream in ["dedup", "groups", "claim", "orders.>"] {
        assert!(
            streams.iter().any(|s| s == stream),
            "{stream} in {streams:?}"
        );
    }
    assert!(
        streams.windows(2).all(|w| w[0] < w[1]),
        "sorted: {streams:?}"
    );
}

async fn appends_dedup_within_the_window(log: &dyn EventLog) {
    let stored = log.append("dedup", &event("a"), WINDOW).await.unwrap();
    let AppendOutcome::Stored(original) = stored else {
        panic!("{stored:?}");
    };
    assert_eq!(
        log.append("dedup", &event("a"), WINDOW).await.unwrap(),
        AppendOutcome::Duplicate(Some(original))
    );
    // A zero window does not deduplicate, nor does another stream.
    assert!(matches!(
        log.append("dedup", &event("a"), NONE).await.unwrap(),
        AppendOutcome::Stored(s) if s > original
    ));
    assert!(matches!(
        log.append("dedup-other", &event("a"), WINDOW)
            .await
            .unwrap(),
        AppendOutcome::Stored(_)
    ));
    // In a batch, outcomes come in order and a repeated id is a duplicate of its first.
    let outcomes = log
        .append_batch("dedup", vec![event("b"), event("a"), event("b")], WINDOW)
        .await
        .1
        .unwrap();
    assert!(matches!(outcomes[0], AppendOutcome::Stored(_)));
    assert_eq!(outcomes[1], AppendOutcome::Duplicate(Some(original)));
    assert_eq!(
        outcomes[2],
        AppendOutcome::Duplicate(outcomes[0].sequence())
    );
    assert_eq!(log.info("dedup").await.unwrap().length, 3);
    // A short window ends.
    let short = Duration::from_millis(200);
    assert!(matches!(
        log.append("dedup", &event("c"), short).await.unwrap(),
        AppendOutcome::Stored(_)
    ));
    assert!(matches!(
        log.append("dedup", &event("c"), short).await.unwrap(),
        AppendOutcome::Duplicate(_)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        log.append("dedup", &event("c"), short).await.unwrap(),
        AppendOutcome::Stored(_)
    ));
}

async fn events_round_trip_with_every_attribute(log: &dyn EventLog) {
    let before = now_ms();
    let full = full_event("full");
    let sequence = log
        .append("orders.>", &full, WINDOW)
        .await
        .unwrap()
        .sequence()
        .unwrap();
    let read = log
        .read_range("orders.>", &StartPosition::Sequence(sequence), 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].event, full);
    assert_eq!(read[0].sequence, sequence);
    assert_eq!(read[0].stored_at_ms, stored_at_ms(sequence));
    assert!(
        (before.saturating_sub(1000)..=now_ms() + 1000).contains(&read[0].stored_at_ms),
        "stored at {} (now {before})",
        read[0].stored_at_ms
    );
    let empty = Event::default();
    log.append("orders.>", &empty, WINDOW).await.unwrap();
    let last = log
        .read_range("orders.>", &StartPosition::Last, 10)
        .await
        .unwrap();
    assert_eq!(last[0].event, empty, "an empty event (no id: no dedup)");
}

async fn groups_share_events_one_consumer_each(log: &dyn EventLog) {
    log.ensure_group("groups", "g1", &StartPosition::All)
        .await
        .unwrap();
    log.ensure_group("groups", "g2", &StartPosition::All)
        .await
        .unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sequences = append(log, "groups", &refs).await;
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing"
    );

    let first = log.read_group("groups", "g1", "c1", 4, NONE).await.unwrap();
    assert_eq!(ids(&first), names[..4]);
    assert_eq!(read(log, "groups", "g1", "c2").await, names[4..]);
    assert!(read(log, "groups", "g1", "c1").await.is_empty());
    assert_eq!(
        read(log, "groups", "g2", "c1").await,
        names,
        "groups are independent"
    );

    let info = log.info("groups").await.unwrap();
    assert_eq!(info.length, 10);
    assert_eq!(info.first_sequence, Some(sequences[0]));
    assert_eq!(info.last_sequence, Some(sequences[9]));
    let names_of: Vec<&str> = info.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names_of, ["g1", "g2"]);
    let g1 = &info.groups[0];
    assert_eq!((g1.consumers, g1.pending), (2, 10));
    assert_eq!(g1.last_delivered, Some(sequences[9]));
    assert_eq!(g1.lag, Some(0));
    // Ensuring again keeps the position.
    log.ensure_group("groups", "g1", &StartPosition::All)
        .await
        .unwrap();
    assert!(read(log, "groups", "g1", "c3").await.is_empty());
}

async fn events_stay_pending_until_acked(log: &dyn EventLog) {
    log.ensure_group("acks", "g", &StartPosition::New)
        .await
        .unwrap();
    let sequences = append(log, "acks", &["a", "b", "c"]).await;
    assert_eq!(read(log, "acks", "g", "c").await, ["a", "b", "c"]);
    assert_eq!(pending(log, "acks", "g").await, 3);
    assert_eq!(log.ack("acks", "g", &sequences[..2]).await.unwrap(), 2);
    assert_eq!(log.ack("acks", "g", &sequences).await.unwrap(), 1);
    assert_eq!(pending(log, "acks", "g").await, 0);
    assert_eq!(log.ack("acks", "other", &sequences).await.unwrap(), 0);
    assert_eq!(log.ack("acks", "g", &[]).await.unwrap(), 0);
}

async fn stalled_events_are_claimed_with_delivery_counts(log: &dyn EventLog) {
    log.ensure_group("claim", "g", &StartPosition::All)
        .await
        .unwrap();
    let sequences = append(log, "claim", &["a", "b", "c"]).await;
    assert_eq!(read(log, "claim", "g", "dead").await, ["a", "b", "c"]);
    let idle = Duration::from_millis(200);
    assert!(
        log.claim_stalled("claim", "g", "live", idle, 10)
            .await
            .unwrap()
            .is_empty(),
        "not idle long enough"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = log
        .claim_stalled("claim", "g", "live", idle, 2)
        .await
        .unwrap();
    let got: Vec<(String, u32)> = claimed
        .iter()
        .map(|c| (c.stored.event.id.clone(), c.delivery_count))
        .collect();
    assert_eq!(
        got,
        [("a".to_owned(), 2), ("b".to_owned(), 2)],
        "bounded by max"
    );
    assert_eq!(claimed[0].stored.sequence, sequences[0]);
    // The deleted event's pending entry is dropped, not delivered.
    assert_eq!(log.delete("claim", &sequences[2..]).await.unwrap(), 1);
    let claimed = log
        .claim_stalled("claim", "g", "live", idle, 10)
        .await
        .unwrap();
    assert!(claimed.is_empty(), "{claimed:?}");
    assert_eq!(pending(log, "claim", "g").await, 2);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = log
        .claim_stalled("claim", "g", "third", idle, 10)
        .await
        .unwrap();
    let counts: Vec<u32> = claimed.iter().map(|c| c.delivery_count).collect();
    assert_eq!(counts, [3, 3]);
    assert_eq!(log.ack("claim", "g", &sequences).await.unwrap(), 2);
    assert_eq!(pending(log, "claim", "g").await, 0);
}

async fn groups_start_where_asked(log: &dyn EventLog) {
    let first = append(log, "starts", &["a"]).await[0];
    tokio::time::sleep(Duration::from_millis(5)).await;
    let later = append(log, "starts", &["b", "c"]).await;
    let cases = [
        ("new", StartPosition::New, vec!["d"]),
        ("all", StartPosition::All, vec!["a", "b", "c", "d"]),
        (
            "seq",
            StartPosition::Sequence(later[0]),
            vec!["b", "c", "d"],
        ),
        ("seq0", StartPosition::Sequence(0), vec!["a", "b", "c", "d"]),
        ("next", StartPosition::Sequence(later[1] + 1), vec!["d"]),
        (
            "time",
            StartPosition::Time(stored_at_ms(first) + 1),
            vec!["b", "c", "d"],
        ),
        ("last", StartPosition::Last, vec!["c", "d"]),
    ];
    for (group, start, _) in &cases {
        log.ensure_group("starts", group, start).await.unwrap();
    }
    append(log, "starts", &["d"]).await;
    for (group, _, expected) in &cases {
        assert_eq!(read(log, "starts", group, "c").await, *expected, "{group}");
    }
    // A start before the first retained event starts at the first retained one.
    log.trim(
        "starts",
        &TrimPolicy {
            max_len: Some(2),
            max_age: None,
        },
    )
    .await
    .unwrap();
    log.ensure_group("starts", "trimmed", &StartPosition::Sequence(first))
        .await
        .unwrap();
    assert_eq!(read(log, "starts", "trimmed", "c").await, ["c", "d"]);
    // Last on an empty stream is New.
    log.ensure_group("starts-empty", "last", &StartPosition::Last)
        .await
        .unwrap();
    append(log, "starts-empty", &["x"]).await;
    assert_eq!(read(log, "starts-empty", "last", "c").await, ["x"]);
}

async fn a_start_beyond_the_end_is_invalid(log: &dyn EventLog) {
    let last = append(log, "beyond", &["a"]).await[0];
    let err = log
        .ensure_group("beyond", "g", &StartPosition::Sequence(last + 2))
        .await
        .unwrap_err();
    let EventBusError::InvalidArgument(violations) = err else {
        panic!("{err:?}");
    };
    assert_eq!(violations[0].field, "start.sequence");
    assert!(log.info("beyond").await.unwrap().groups.is_empty());
    assert!(
        log.ensure_group("beyond-fresh", "g", &StartPosition::Sequence(2))
            .await
            .is_err()
    );
    log.ensure_group("beyond-fresh", "g", &StartPosition::Sequence(1))
        .await
        .unwrap();
}

async fn range_reads_start_where_asked(log: &dyn EventLog) {
    let first = append(log, "range", &["a"]).await[0];
    tokio::time::sleep(Duration::from_millis(5)).await;
    let later = append(log, "range", &["b", "c"]).await;
    let range = |from: StartPosition, max: usize| async move {
        ids(&log.read_range("range", &from, max).await.unwrap())
    };
    assert_eq!(range(StartPosition::All, 10).await, ["a", "b", "c"]);
    assert_eq!(range(StartPosition::All, 2).await, ["a", "b"]);
    assert_eq!(
        range(StartPosition::Sequence(later[0]), 10).await,
        ["b", "c"]
    );
    assert_eq!(range(StartPosition::Sequence(later[0] + 1), 1).await, ["c"]);
    assert_eq!(
        range(StartPosition::Time(stored_at_ms(first) + 1), 10).await,
        ["b", "c"]
    );
    assert_eq!(range(StartPosition::Last, 10).await, ["c"]);
    assert!(range(StartPosition::New, 10).await.is_empty());
    assert!(
        range(StartPosition::Sequence(later[1] + 1), 10)
            .await
            .is_empty()
    );
    assert!(
        log.read_range("range-none", &StartPosition::All, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn delete_and_trim_by_length_and_age(log: &dyn EventLog) {
    let old = append(log, "trim", &["a", "b", "c"]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    append(log, "trim", &["d", "e", "f"]).await;
    assert_eq!(log.delete("trim", &[old[1], old[0] - 1]).await.unwrap(), 1);
    assert_eq!(log.delete("trim", &[old[1]]).await.unwrap(), 0);
    let by_age = TrimPolicy {
        max_len: None,
        max_age: Some(Duration::from_millis(200)),
    };
    assert_eq!(log.trim("trim", &by_age).await.unwrap(), 2);
    let by_length = TrimPolicy {
        max_len: Some(1),
        max_age: None,
    };
    assert_eq!(log.trim("trim", &by_length).await.unwrap(), 2);
    let rest = log
        .read_range("trim", &StartPosition::All, 10)
        .await
        .unwrap();
    assert_eq!(ids(&rest), ["f"]);
    let info = log.info("trim").await.unwrap();
    assert_eq!(info.length, 1);
    assert_eq!(info.first_sequence, Some(rest[0].sequence));
    assert_eq!(info.last_sequence, Some(rest[0].sequence));
    assert_eq!(log.trim("trim", &TrimPolicy::default()).await.unwrap(), 0);
    assert_eq!(log.trim("trim-none", &by_length).await.unwrap(), 0);
    assert_eq!(log.delete("trim-none", &[1]).await.unwrap(), 0);
}

async fn blocking_reads_wake_on_append_or_time_out(log: &dyn EventLog) {
    log.ensure_group("block", "g", &StartPosition::New)
        .await
        .unwrap();
    let started = Instant::now();
    let (read, ()) = tokio::join!(
        log.read_group("block", "g", "c", 10, Duration::from_secs(10)),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            append(log, "block", &["a"]).await;
        }
    );
    assert_eq!(ids(&read.unwrap()), ["a"]);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "woke after {elapsed:?}");

    let started = Instant::now();
    let read = log
        .read_group("block", "g", "c", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(read.is_empty());
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_millis(90)..Duration::from_secs(2)).contains(&elapsed),
        "waited {elapsed:?}"
    );
}

async fn unknown_names_are_reported(log: &dyn EventLog) {
    for (stream, group) in [("nowhere", "g"), ("groups", "nobody")] {
        let err = log
            .read_group(stream, group, "c", 1, NONE)
            .await
            .unwrap_err();
        assert!(matches!(err, EventBusError::NotFound(_)), "{err:?}");
        let err = log
            .read_group(stream, group, "c", 1, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(
            matches!(err, EventBusError::NotFound(_)),
            "blocking: {err:?}"
        );
        let err = log
            .claim_stalled(stream, group, "c", NONE, 1)
            .await
            .unwrap_err();
        assert!(matches!(err, EventBusError::NotFound(_)), "{err:?}");
    }
    for stream in ["", "a{b}c"] {
        let err = log.append(stream, &event("x"), NONE).await.unwrap_err();
        assert!(matches!(err, EventBusError::InvalidArgument(_)), "{err:?}");
    }
    let err = log
        .read_range("groups", &StartPosition::All, 1001)
        .await
        .unwrap_err();
    assert!(matches!(err, EventBusError::InvalidArgument(_)), "{err:?}");
    assert_eq!(
        log.info("nowhere").await.unwrap(),
        agentmesh_eventbus::log::StreamInfo::default()
    );
}

/// A stream entry as `XRANGE` returns it: the ID and the field/value pairs.
type RawEntry = (String, Vec<(String, Vec<u8>)>);

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn manager(redis: &RedisServer) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_with_config(redis::Client::open(redis.url()).unwrap(), config)
        .await
        .unwrap()
}

async fn redis_log(redis: &RedisServer) -> RedisLog {
    RedisLog::new(
        manager(redis).await,
        redis::Client::open(redis.url()).unwrap(),
        PREFIX,
    )
    .with_timeout(Duration::from_millis(500))
}

async fn raw(redis: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn test_in_memory_log_passes_the_conformance_suite() {
    conformance(&InMemoryLog::new(10_000)).await;
}

#[tokio::test]
async fn test_redis_log_passes_the_conformance_suite() {
    let redis = RedisServer::start().await.unwrap();
    conformance(&redis_log(&redis).await).await;
}

#[tokio::test]
async fn test_redis_events_and_groups_survive_a_new_log_instance() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await;
    log.ensure_group("orders", "g", &StartPosition::All)
        .await
        .unwrap();
    let sequences = append(&log, "orders", &["a", "b", "c"]).await;
    assert_eq!(read(&log, "orders", "g", "c1").await, ["a", "b", "c"]);
    log.ack("orders", "g", &sequences[..1]).await.unwrap();
    drop(log);

    let log = redis_log(&redis).await;
    let stored = log
        .read_range("orders", &StartPosition::All, 10)
        .await
        .unwrap();
    assert_eq!(ids(&stored), ["a", "b", "c"]);
    assert_eq!(pending(&log, "orders", "g").await, 2);
    assert_eq!(log.streams().await.unwrap(), ["orders"]);
    // The group kept its position and its pending entries.
    log.ensure_group("orders", "g", &StartPosition::All)
        .await
        .unwrap();
    assert!(read(&log, "orders", "g", "c2").await.is_empty());
    let claimed = log
        .claim_stalled("orders", "g", "c2", NONE, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    // Dedup keys are in Redis too.
    let first = log.append("orders", &event("d"), WINDOW).await.unwrap();
    drop(log);
    let log = redis_log(&redis).await;
    assert_eq!(
        log.append("orders", &event("d"), WINDOW).await.unwrap(),
        AppendOutcome::Duplicate(first.sequence())
    );
}

#[tokio::test]
async fn test_redis_blocking_reads_do_not_stall_concurrent_appends() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await.with_blocking_connections(2);
    log.ensure_group("quiet", "g", &StartPosition::New)
        .await
        .unwrap();
    let block = Duration::from_millis(1500);
    let started = Instant::now();
    // Three blocking reads, one more than the dedicated connections: the third falls back to
    // a non-blocking read instead of waiting behind the others.
    let ((r1, r2, r3), appended) = tokio::join!(
        async {
            tokio::join!(
                log.read_group("quiet", "g", "c1", 10, block),
                log.read_group("quiet", "g", "c2", 10, block),
                log.read_group("quiet", "g", "c3", 10, block),
            )
        },
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut slowest = Duration::ZERO;
            for i in 0..20 {
                let one = Instant::now();
                append(&log, "busy", &[format!("e{i}").as_str()]).await;
                log.info("busy").await.unwrap();
                slowest = slowest.max(one.elapsed());
            }
            (slowest, started.elapsed())
        }
    );
    let (slowest, appends_done) = appended;
    assert!(
        slowest < Duration::from_millis(800),
        "slowest append {slowest:?}"
    );
    assert!(
        appends_done < Duration::from_millis(1300),
        "appends finished after {appends_done:?}, while reads block for {block:?}"
    );
    for read in [r1, r2, r3] {
        assert!(read.unwrap().is_empty());
    }
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(log.info("busy").await.unwrap().length, 20);

    // A dedicated connection is reused, and a blocked read still wakes on append.
    let (read, ()) = tokio::join!(
        log.read_group("quiet", "g", "c1", 10, Duration::from_secs(5)),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            append(&log, "quiet", &["wake"]).await;
        }
    );
    assert_eq!(ids(&read.unwrap()), ["wake"]);
}

#[tokio::test]
async fn test_redis_batches_started_back_to_back_are_stored_in_start_order() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await;
    // Started one after another without waiting between them; plain XADDs and script runs.
    let started: Vec<_> = (0..50)
        .map(|batch| {
            let events: Vec<Event> = (0..20).map(|i| event(&format!("b{batch}-{i}"))).collect();
            let window = if batch % 3 == 0 { WINDOW } else { NONE };
            log.append_batch("s", events, window)
        })
        .collect();
    let mut last = 0;
    let mut stored = 0;
    for appending in started {
        let (_, outcomes) = appending.await;
        for outcome in outcomes.unwrap() {
            let sequence = outcome.sequence().unwrap();
            assert!(sequence > last, "{sequence} after {last}");
            last = sequence;
            stored += 1;
        }
    }
    assert_eq!(stored, 1000);
}

#[tokio::test]
async fn test_redis_stopped_is_unavailable_within_bounded_time_and_recovers() {
    let mut redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await;
    log.ensure_group("s", "g", &StartPosition::New)
        .await
        .unwrap();
    // Warm a dedicated connection, so a dead pooled one is exercised too.
    log.read_group("s", "g", "c", 1, Duration::from_millis(10))
        .await
        .unwrap();

    redis.stop();
    let checks: [(&str, Duration); 2] = [
        ("non-blocking", NONE),
        ("blocking", Duration::from_millis(200)),
    ];
    for (what, block) in checks {
        let started = Instant::now();
        let err = log.read_group("s", "g", "c", 1, block).await.unwrap_err();
        assert!(
            matches!(err, EventBusError::Unavailable(_)),
            "{what}: {err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: {:?}",
            started.elapsed()
        );
    }
    let started = Instant::now();
    let results = [
        log.append("s", &event("a"), WINDOW).await.map(drop),
        log.append_batch("s", vec![event("b")], NONE)
            .await
            .1
            .map(drop),
        log.ensure_group("s", "h", &StartPosition::All).await,
        log.ack("s", "g", &[1]).await.map(drop),
        log.claim_stalled("s", "g", "c", NONE, 1).await.map(drop),
        log.read_range("s", &StartPosition::All, 1).await.map(drop),
        log.delete("s", &[1]).await.map(drop),
        log.trim(
            "s",
            &TrimPolicy {
                max_len: Some(1),
                max_age: None,
            },
        )
        .await
        .map(drop),
        log.info("s").await.map(drop),
        log.streams().await.map(drop),
    ];
    for (i, result) in results.into_iter().enumerate() {
        assert!(
            matches!(result, Err(EventBusError::Unavailable(_))),
            "call {i}: {result:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    redis.restart().await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "appends to succeed again",
        || async { log.append("s", &event("again"), NONE).await.is_ok() },
    )
    .await
    .unwrap();
    log.ensure_group("s", "g", &StartPosition::All)
        .await
        .unwrap();
    let read = log
        .read_group("s", "g", "c", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(ids(&read).contains(&"again".to_owned()), "{read:?}");
}

#[tokio::test]
async fn test_redis_sequences_are_stream_ids_and_never_overflow_the_counter() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await;
    let mut con = raw(&redis).await;
    let key = format!("{PREFIX}:{{orders}}:log");
    let sequence = append(&log, "orders", &["a"]).await[0];
    let raw_ids: Vec<String> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async::<Vec<(String, Vec<String>)>>(&mut con)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(raw_ids, [stream_id_of(sequence)]);
    assert_eq!(sequence_of_stream_id(&raw_ids[0]), Some(sequence));
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut con).await.unwrap();
    let redis_now = secs * 1000 + micros / 1000;
    assert!(redis_now - stored_at_ms(sequence) < 5000);

    // An entry whose counter is at the top of its 20 bits (a far-future ms): the next XADD
    // would take counter 2^20, and is moved to the next millisecond instead.
    let future_ms = 9_999_999_999_999_u64;
    redis::cmd("XADD")
        .arg(&key)
        .arg(format!("{future_ms}-1048575"))
        .arg("id")
        .arg("top")
        .query_async::<String>(&mut con)
        .await
        .unwrap();
    let next = append(&log, "orders", &["next"]).await[0];
    assert_eq!(stream_id_of(next), format!("{}-0", future_ms + 1));
    assert_eq!(stored_at_ms(next), future_ms + 1);
    let all = log
        .read_range("orders", &StartPosition::All, 10)
        .await
        .unwrap();
    assert_eq!(ids(&all), ["a", "top", "next"]);
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
}

#[tokio::test]
async fn test_redis_layout_is_hash_tagged_and_readable_with_xrange() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await;
    let mut con = raw(&redis).await;
    let full = full_event("e-1");
    log.append("orders.>", &full, Duration::from_secs(30))
        .await
        .unwrap();
    let key = format!("{PREFIX}:{{orders.>}}:log");
    let entries: Vec<RawEntry> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    let fields: BTreeMap<String, Vec<u8>> = entries[0].1.iter().cloned().collect();
    let text = |name: &str| String::from_utf8(fields[name].clone()).unwrap();
    assert_eq!(text("id"), "e-1");
    assert_eq!(text("subject"), "orders.eu.created");
    assert_eq!(text("priority"), "critical");
    assert_eq!(text("time"), "1700000000123");
    assert_eq!(text("expires_at"), "1900000000000");
    let headers: BTreeMap<String, String> = serde_json::from_str(&text("headers")).unwrap();
    assert_eq!(headers, full.headers);
    assert_eq!(fields["data"], full.data.to_vec());
    assert_eq!(fields.len(), 13);

    let dedup_key = format!("{PREFIX}:{{orders.>}}:dedup:e-1");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&dedup_key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!((1..=30_000).contains(&pttl), "pttl {pttl}");
    let original: String = redis::cmd("GET")
        .arg(&dedup_key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(original, entries[0].0);
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{PREFIX}:streams"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(members, ["orders.>"]);

    // Entries written by hand, with fields missing or unreadable, still decode.
    redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("subject")
        .arg("by.hand")
        .arg("priority")
        .arg("urgent")
        .arg("headers")
        .arg("not json")
        .query_async::<String>(&mut con)
        .await
        .unwrap();
    let last = log
        .read_range("orders.>", &StartPosition::Last, 1)
        .await
        .unwrap();
    assert_eq!(
        last[0].event,
        Event {
            subject: "by.hand".to_owned(),
            ..Event::default()
        }
    );
}

#[tokio::test]
async fn test_redis_scripts_are_reloaded_after_script_flush() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await;
    let mut con = raw(&redis).await;
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").clone();
    log.ensure_group("s", "g", &StartPosition::All)
        .await
        .unwrap();
    append(&log, "s", &["a"]).await;
    flush().query_async::<()>(&mut con).await.unwrap();
    let outcomes = log
        .append_batch("s", vec![event("b"), event("c"), event("b")], WINDOW)
        .await
        .1
        .unwrap();
    assert!(matches!(outcomes[2], AppendOutcome::Duplicate(Some(_))));
    assert_eq!(read(&log, "s", "g", "c").await, ["a", "b", "c"]);
    flush().query_async::<()>(&mut con).await.unwrap();
    assert_eq!(
        log.claim_stalled("s", "g", "c2", NONE, 10)
            .await
            .unwrap()
            .len(),
        3
    );
    flush().query_async::<()>(&mut con).await.unwrap();
    let policy = TrimPolicy {
        max_len: Some(1),
        max_age: None,
    };
    assert_eq!(log.trim("s", &policy).await.unwrap(), 2);
}

#[tokio::test]
async fn test_redis_max_len_keeps_streams_near_their_bound() {
    let redis = RedisServer::start().await.unwrap();
    let log = redis_log(&redis).await.with_max_len(10);
    for chunk in 0..10 {
        let events: Vec<Event> = (0..100).map(|i| event(&format!("e{chunk}-{i}"))).collect();
        log.append_batch("s", events, NONE).await.1.unwrap();
    }
    let length = log.info("s").await.unwrap().length;
    assert!((10..=200).contains(&length), "length {length}");
}

fn forward(id: &str, priority: Priority) -> Forward {
    Forward {
        from: "a".to_owned(),
        event: Event {
            priority,
            ..event(id)
        },
        plain: true,
        groups: Vec::new(),
    }
}

#[tokio::test]
async fn test_redis_backplane_sheds_low_first_when_a_bus_falls_behind_and_loses_nothing_else() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let (a, _a_inbound) = RedisBackplane::start(client.clone(), manager(&redis).await, PREFIX, "a");
    let (b, mut b_inbound) = RedisBackplane::start(client, manager(&redis).await, PREFIX, "b");
    // B is listening once a probe gets through.
    let mut probes = 0;
    loop {
        probes += 1;
        assert_eq!(a.send("b", forward("probe", Priority::Low)), Handed::Queued);
        match tokio::time::timeout(Duration::from_millis(100), b_inbound.recv()).await {
            Ok(Some(Inbound::Forward(_))) => break,
            _ => assert!(probes < 50, "B never heard A"),
        }
    }
    while b_inbound.try_recv().is_ok() {}
    // B's bus reads nothing while more LOW forwards arrive than B holds, then CRITICAL ones.
    // A sends in chunks its writer keeps up with, so nothing is shed on A's side.
    let low = INBOUND_QUEUE + 5_000;
    let mut sent = 0;
    while sent < low {
        let chunk = (low - sent).min(10_000);
        for i in 0..chunk {
            let handed = a.send("b", forward(&format!("l{}", sent + i), Priority::Low));
            assert_eq!(handed, Handed::Queued);
        }
        sent += chunk;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for i in 0..100 {
        a.send("b", forward(&format!("c{i}"), Priority::Critical));
    }
    wait_until(Duration::from_secs(10), "B took every forward in", || {
        let b = b.clone();
        async move { b.shed_on_arrival()[0] > 0 }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut got_low, mut got_critical) = (0usize, 0usize);
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), b_inbound.recv()).await
    {
        if let Inbound::Forward(f) = message {
            match f.event.priority {
                Priority::Critical => got_critical += 1,
                _ => got_low += 1,
            }
        }
    }
    let shed = b.shed_on_arrival();
    assert_eq!(got_critical, 100, "every CRITICAL forward arrived");
    assert_eq!(shed[3], 0);
    assert_eq!(
        got_low + usize::try_from(shed[0]).unwrap(),
        low,
        "each LOW forward was either handed to the bus or counted as shed ({shed:?})"
    );
    // B holds INBOUND_QUEUE in its inbox plus what waits in the channel to the bus.
    assert!(shed[0] >= 3_000, "{shed:?}");
}
