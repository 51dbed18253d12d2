//! Decision throughput of the rate limiter domain: a hot key, many distinct keys, evicting
//! churn and 100-item batches. Run with `cargo bench -p agentmesh-ratelimit`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::slice;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_ratelimit::{
    Algorithm, CheckItem, LimitRef, LimitSpec, Limiter, LimiterConfig, Mode, Policy, PolicySet,
    SystemClock,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Generous enough that the hot key is always allowed: every iteration debits state.
fn roomy() -> LimitSpec {
    LimitSpec {
        limit: 1_000_000_000,
        period: Duration::from_secs(1),
        burst: 0,
        algorithm: Algorithm::Gcra,
    }
}

/// A typical per-user limit: keys stay active for up to a minute after use.
fn per_user() -> LimitSpec {
    LimitSpec {
        limit: 100,
        period: Duration::from_secs(60),
        burst: 0,
        algorithm: Algorithm::Gcra,
    }
}

fn limiter(max_keys: usize) -> Limiter {
    let policies = PolicySet::new(
        Policy::default(),
        vec![Policy {
            name: "llm-requests".into(),
            spec: roomy(),
            mode: Mode::Enforce,
        }],
    )
    .expect("valid policies");
    Limiter::new(
        &LimiterConfig {
            max_keys,
            shards: 64,
        },
        policies,
        Arc::new(SystemClock),
    )
}

fn item(key: String, limit: LimitRef) -> CheckItem {
    CheckItem {
        namespace: "bench".into(),
        key,
        cost: 1,
        limit,
        mode: None,
        consistency: None,
        on_failure: None,
    }
}

fn hot_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_key");
    group.throughput(Throughput::Elements(1));
    let limiter = limiter(1_000_000);
    for (name, limit) in [
        ("gcra_inline", LimitRef::Inline(roomy())),
        ("gcra_policy", LimitRef::Policy("llm-requests".into())),
    ] {
        let item = item("user-42".into(), limit);
        group.bench_function(name, |b| {
            b.iter(|| limiter.check(black_box(slice::from_ref(&item)), false));
        });
    }
    group.finish();
}

/// Cycles through `distinct` keys, rewriting one item's key in place (no allocation).
fn cycle_keys(c: &mut Criterion, name: &str, distinct: u32, max_keys: usize) {
    let mut group = c.benchmark_group("distinct_keys");
    group.throughput(Throughput::Elements(1));
    let limiter = limiter(max_keys);
    let mut item = item(String::with_capacity(32), LimitRef::Inline(per_user()));
    let mut next = 0u64;
    let mut step = |item: &mut CheckItem| {
        // A prime step (coprime to `distinct`) visits every key once per cycle, out of order.
        next = (next + 999_983) % u64::from(distinct);
        item.key.clear();
        let _ = write!(item.key, "user-{next}");
    };
    for _ in 0..distinct {
        step(&mut item);
        let _ = limiter.check(slice::from_ref(&item), false);
    }
    group.bench_function(name, |b| {
        b.iter(|| {
            step(&mut item);
            limiter.check(black_box(slice::from_ref(&item)), false)
        });
    });
    group.finish();
    let stats = limiter.stats();
    println!(
        "{name}: entries {} / {}, evicted idle {}, active {}",
        stats.entries, stats.capacity, stats.evicted_idle, stats.evicted_active
    );
}

fn distinct_keys(c: &mut Criterion) {
    // 1M keys that all fit: existing-key decisions with a cold cache.
    cycle_keys(c, "gcra_1m_keys", 1_000_000, 2_000_000);
    // 4M keys through a 1M-key store: every decision inserts and sweeps amortise.
    cycle_keys(c, "gcra_4m_keys_evicting", 4_000_000, 1_000_000);
}

fn batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_100");
    group.throughput(Throughput::Elements(100));
    let limiter = limiter(1_000_000);
    let items: Vec<CheckItem> = (0..100)
        .map(|i| item(format!("user-{i}"), LimitRef::Inline(roomy())))
        .collect();
    for (name, all_or_nothing) in [("independent", false), ("all_or_nothing", true)] {
        group.bench_function(name, |b| {
            b.iter(|| limiter.check(black_box(&items), all_or_nothing));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = hot_key, distinct_keys, batch
}
criterion_main!(benches);
