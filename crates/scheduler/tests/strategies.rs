//! The strategies through the pool's real AcquireAgent/ReleaseAgent, on a manual clock:
//! balance under steady load, weights, and the slow-agent experiment (ADAPTIVE against
//! ROUND_ROBIN in the same run).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_scheduler::config::PoolConfig;
use agentmesh_scheduler::pool::{AcquireRequest, AgentSpec, ManualClock, Outcome, Pool};
use agentmesh_scheduler::select::Strategy;

/// The pool, its clock, and each agent's (id, epoch, stream generation) for reports.
type Beats = Vec<(String, u64, u64)>;

fn pool_of(agents: &[(&str, u32, u32)]) -> (Pool, Arc<ManualClock>) {
    let (pool, clock, _) = pool_with_streams(agents);
    (pool, clock)
}

fn pool_with_streams(agents: &[(&str, u32, u32)]) -> (Pool, Arc<ManualClock>, Beats) {
    let clock = Arc::new(ManualClock::default());
    let pool = Pool::new(
        PoolConfig {
            slow_start: Duration::ZERO,
            ..PoolConfig::default()
        },
        clock.clone(),
    );
    let mut beats = Vec::new();
    for (id, capacity, weight) in agents {
        let epoch = pool
            .register(
                AgentSpec {
                    agent_id: (*id).to_owned(),
                    agent_type: "worker".into(),
                    capacity: *capacity,
                    weight: *weight,
                    ..AgentSpec::default()
                },
                0,
            )
            .unwrap()
            .epoch;
        // The stream stays open for the whole test.
        let (generation, rx) = pool.attach(id, epoch).unwrap();
        std::mem::forget(rx);
        beats.push(((*id).to_owned(), epoch, generation));
    }
    (pool, clock, beats)
}

fn request(strategy: Strategy) -> AcquireRequest {
    AcquireRequest {
        strategy,
        ttl: Duration::from_secs(3600),
        ..AcquireRequest::default()
    }
}

/// A small deterministic generator for the tests' own choices.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from((self.0 >> 33) % n as u64).unwrap()
    }
}

#[test]
fn test_eight_equal_agents_at_80_percent_load_stay_within_1_3_of_the_mean() {
    let ids: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
    for strategy in [
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
        Strategy::PowerOfTwo,
        Strategy::Adaptive,
    ] {
        let agents: Vec<(&str, u32, u32)> = ids.iter().map(|id| (id.as_str(), 10, 1)).collect();
        let (pool, _) = pool_of(&agents);
        let mut held = Vec::new();
        let mut rng = Lcg(7);
        // 64 of 80 slots held; each step one call ends at random and a new one starts.
        for _ in 0..64 {
            held.push(pool.acquire(&request(strategy)).unwrap().id);
        }
        let mut worst = 0.0f64;
        for _ in 0..5_000 {
            let done = held.swap_remove(rng.below(held.len()));
            pool.release(done, Outcome::Success, Some(Duration::from_millis(50)))
                .unwrap();
            held.push(pool.acquire(&request(strategy)).unwrap().id);
            let stats: Vec<u32> = ids
                .iter()
                .map(|id| pool.get(id).unwrap().in_flight)
                .collect();
            let max = f64::from(*stats.iter().max().unwrap());
            worst = worst.max(max / 8.0);
        }
        assert!(
            worst <= 1.3,
            "{strategy:?}: worst max/mean in-flight {worst:.2}"
        );
    }
}

#[test]
fn test_weighted_round_robin_shares_follow_the_weights() {
    let (pool, _) = pool_of(&[("w1", 1000, 1), ("w2", 1000, 2), ("w3", 1000, 3)]);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..600 {
        let r = pool
            .acquire(&request(Strategy::WeightedRoundRobin))
            .unwrap();
        *counts.entry(r.agent.spec.agent_id.clone()).or_default() += 1;
        pool.release(r.id, Outcome::Success, None).unwrap();
    }
    assert_eq!(counts["w1"], 100);
    assert_eq!(counts["w2"], 200);
    assert_eq!(counts["w3"], 300);
}

/// Eleven agents, one answering in 2 s while callers give up after 1 s: the share of calls that
/// succeed, by strategy.
fn slow_agent_success(strategy: Strategy) -> f64 {
    let ids: Vec<String> = (0..11).map(|i| format!("s{i:02}")).collect();
    let agents: Vec<(&str, u32, u32)> = ids.iter().map(|id| (id.as_str(), 100, 1)).collect();
    let (pool, clock, beats) = pool_with_streams(&agents);
    let timeout = Duration::from_secs(1);
    let mut sequence = 0;
    let calls = 20_000u32;
    let mut ok = 0u32;
    for _ in 0..calls {
        let r = pool.acquire(&request(strategy)).unwrap();
        let latency = if r.agent.spec.agent_id == "s00" {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(40)
        };
        if latency > timeout {
            pool.release(r.id, Outcome::Failure, Some(timeout)).unwrap();
        } else {
            ok += 1;
            pool.release(r.id, Outcome::Success, Some(latency)).unwrap();
        }
        clock.advance(Duration::from_millis(5));
        if clock_ms(&clock).is_multiple_of(1000) {
            // Every agent (the slow one too) heartbeats each second.
            sequence += 1;
            for (id, epoch, generation) in &beats {
                let report = agentmesh_scheduler::pool::LoadReport {
                    sequence,
                    ..Default::default()
                };
                pool.report(id, *epoch, *generation, report).unwrap();
            }
            pool.tick();
        }
    }
    f64::from(ok) / f64::from(calls)
}

fn clock_ms(clock: &ManualClock) -> u64 {
    use agentmesh_scheduler::pool::Clock;
    clock.now_ms()
}

#[test]
fn test_adaptive_keeps_99_5_percent_success_with_a_slow_agent_where_round_robin_does_not() {
    let adaptive = slow_agent_success(Strategy::Adaptive);
    let round_robin = slow_agent_success(Strategy::RoundRobin);
    eprintln!(
        "success with one 2 s agent of 11: ADAPTIVE {adaptive:.4}, ROUND_ROBIN {round_robin:.4}"
    );
    assert!(adaptive >= 0.995, "ADAPTIVE {adaptive}");
    assert!(round_robin < adaptive, "ROUND_ROBIN {round_robin}");
}
