//! In-process pick throughput: ADAPTIVE and the other strategies over 1,000 eligible agents.

use std::hint::black_box;
use std::time::Duration;

use agentmesh_scheduler::select::{Candidate, Picker, Strategy};
use criterion::{Criterion, criterion_group, criterion_main};

fn picks(c: &mut Criterion) {
    let ids: Vec<String> = (0..1000).map(|i| format!("agent-{i:04}")).collect();
    let candidates: Vec<Candidate<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Candidate {
            id,
            weight: 1 + u32::try_from(i % 4).unwrap_or(0),
            in_flight: u32::try_from(i % 7).unwrap_or(0),
            capacity: 8,
            latency_ms: 5.0 + f64::from(u32::try_from(i % 13).unwrap_or(0)),
            age_ms: 3_600_000,
        })
        .collect();
    let mut group = c.benchmark_group("pick_1000_agents");
    for (name, strategy) in [
        ("adaptive", Strategy::Adaptive),
        ("power_of_two", Strategy::PowerOfTwo),
        ("round_robin", Strategy::RoundRobin),
        ("least_loaded", Strategy::LeastLoaded),
        ("weighted_round_robin", Strategy::WeightedRoundRobin),
        ("consistent_hash", Strategy::ConsistentHash),
    ] {
        let mut picker = Picker::new(Duration::from_secs(30));
        group.bench_function(name, |b| {
            b.iter(|| picker.pick(strategy, black_box(&candidates), b"user-42"));
        });
    }
    group.finish();
}

/// The whole AcquireAgent + ReleaseAgent in the pool (filtering 1,000 registered agents,
/// picking, reserving, releasing), without gRPC.
fn acquire_release(c: &mut Criterion) {
    use std::sync::Arc;

    use agentmesh_scheduler::config::PoolConfig;
    use agentmesh_scheduler::pool::{AcquireRequest, AgentSpec, ManualClock, Outcome, Pool};

    let pool = Pool::new(PoolConfig::default(), Arc::new(ManualClock::default()));
    let mut streams = Vec::new();
    for i in 0..1000 {
        let id = format!("agent-{i:04}");
        let epoch = pool
            .register(
                AgentSpec {
                    agent_id: id.clone(),
                    agent_type: "worker".into(),
                    capacity: 8,
                    weight: 1,
                    ..AgentSpec::default()
                },
                0,
            )
            .unwrap()
            .epoch;
        streams.push(pool.attach(&id, epoch).unwrap());
    }
    let request = AcquireRequest {
        ttl: Duration::from_secs(60),
        ..AcquireRequest::default()
    };
    c.bench_function("pool_acquire_release_1000_agents", |b| {
        b.iter(|| {
            let r = pool.acquire(black_box(&request)).unwrap();
            pool.release(r.id, Outcome::Success, Some(Duration::from_millis(5)))
                .unwrap();
        });
    });
}

criterion_group!(benches, picks, acquire_release);
criterion_main!(benches);
