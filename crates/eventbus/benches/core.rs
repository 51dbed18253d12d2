//! Benchmarks of the event bus domain core: subject index matching, the priority queue and the
//! dedup window.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use agentmesh_eventbus::Priority;
use agentmesh_eventbus::dedup::DedupWindow;
use agentmesh_eventbus::index::SubjectIndex;
use agentmesh_eventbus::priority::{FairnessConfig, PriorityQueue};
use agentmesh_eventbus::subject::SubjectFilter;
use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SUBSCRIPTIONS: u32 = 10_000;
const TENANTS: u32 = 100;
const REGIONS: u32 = 20;
const KINDS: u32 = 50;

/// 10k subscriptions: about 60% literal, 25% with `*`, 15% ending in `>`.
fn build_index(rng: &mut StdRng) -> SubjectIndex<u32> {
    let mut index = SubjectIndex::new();
    for id in 0..SUBSCRIPTIONS {
        let t = rng.random_range(0..TENANTS);
        let r = rng.random_range(0..REGIONS);
        let k = rng.random_range(0..KINDS);
        let filter = match rng.random_range(0..100) {
            0..60 => format!("t{t}.orders.r{r}.k{k}"),
            60..75 => format!("t{t}.orders.*.k{k}"),
            75..85 => format!("t{t}.*.r{r}.*"),
            85..95 => format!("t{t}.orders.r{r}.>"),
            _ => format!("t{t}.>"),
        };
        let filter = SubjectFilter::parse("filter", &filter).expect("valid filter");
        index.insert(&filter, id);
    }
    index
}

fn random_subjects(rng: &mut StdRng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            format!(
                "t{}.orders.r{}.k{}",
                rng.random_range(0..TENANTS),
                rng.random_range(0..REGIONS),
                rng.random_range(0..KINDS)
            )
        })
        .collect()
}

fn bench_index(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let index = build_index(&mut rng);
    let subjects = random_subjects(&mut rng, 4_096);
    let total: usize = subjects.iter().map(|s| index.matches(s).len()).sum();
    println!(
        "index: {} subscriptions, {:.2} matches per subject on average",
        index.len(),
        total as f64 / subjects.len() as f64
    );

    let mut group = c.benchmark_group("subject_index_10k");
    let mut i = 0;
    group.bench_function("for_each_match", |b| {
        b.iter(|| {
            i = (i + 1) % subjects.len();
            let mut n = 0u32;
            index.for_each_match(black_box(&subjects[i]), |v| n = n.wrapping_add(*v));
            n
        });
    });
    group.bench_function("matches_vec", |b| {
        b.iter(|| {
            i = (i + 1) % subjects.len();
            index.matches(black_box(&subjects[i]))
        });
    });
    let misses: Vec<String> = (0..1_024).map(|n| format!("t{n}.billing.x.y")).collect();
    group.bench_function("has_match_miss", |b| {
        b.iter(|| {
            i = (i + 1) % misses.len();
            index.has_match(black_box(&misses[i]))
        });
    });
    group.finish();
}

fn bench_priority(c: &mut Criterion) {
    let mut group = c.benchmark_group("priority_queue");
    let mut queue = PriorityQueue::new(FairnessConfig::default(), 10_000);
    for i in 0..1_000u64 {
        let priority = Priority::ALL[(i % 4) as usize];
        queue.push(i, priority, Some(u64::MAX), 0);
    }
    let mut now = 0u64;
    group.bench_function("push_pop_1k_backlog", |b| {
        b.iter(|| {
            now += 1;
            let priority = Priority::ALL[(now % 4) as usize];
            black_box(queue.push(now, priority, Some(u64::MAX), now));
            black_box(queue.pop(now))
        });
    });
    group.finish();
}

fn bench_dedup(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup_window");
    let dedup = DedupWindow::new(Duration::from_secs(120), 1 << 20);
    let mut id = String::with_capacity(32);
    let mut n = 0u64;
    group.bench_function("check_and_insert_new", |b| {
        b.iter(|| {
            n += 1;
            id.clear();
            let _ = write!(id, "evt-{n}");
            dedup.check_and_insert("orders", &id, n / 1_000)
        });
    });
    let seen: Vec<String> = (0..1_024).map(|i| format!("dup-{i}")).collect();
    for s in &seen {
        dedup.check_and_insert("orders", s, n / 1_000);
    }
    let mut i = 0;
    group.bench_function("check_and_insert_duplicate", |b| {
        b.iter(|| {
            i = (i + 1) % seen.len();
            dedup.check_and_insert("orders", &seen[i], n / 1_000)
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_index, bench_priority, bench_dedup
}
criterion_main!(benches);
