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

criterion_group!(benches, picks);
criterion_main!(benches);
