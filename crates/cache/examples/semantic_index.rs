//! The semantic index in process: HNSW's recall@1 against exact search, and search latency,
//! at 10k and 100k entries of 384-dimension unit vectors (clustered, as embeddings are: 1,000
//! centres). Queries are stored vectors with noise (a reworded prompt).
//! `cargo run --release -p agentmesh-cache --example semantic_index`

use std::time::Instant;

use agentmesh_cache::semantic::embed::unit;
use agentmesh_cache::semantic::index::{Slot, VectorIndex};
use rand::Rng;

const DIM: usize = 384;

fn vector(centres: &[Vec<f32>], i: usize, noise: f32, rng: &mut impl Rng) -> Vec<f32> {
    let c = &centres[i % centres.len()];
    let mut v: Vec<f32> = c
        .iter()
        .map(|x| x + noise * (rng.random::<f32>() - 0.5))
        .collect();
    unit(&mut v);
    v
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a small vector"
    )]
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

fn main() {
    let mut rng = rand::rng();
    let centres: Vec<Vec<f32>> = (0..1000)
        .map(|_| {
            let mut v: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
            unit(&mut v);
            v
        })
        .collect();
    for n in [10_000, 100_000] {
        let started = Instant::now();
        let mut hnsw = VectorIndex::new(DIM);
        let mut exact = VectorIndex::exact(DIM);
        let stored: Vec<Vec<f32>> = (0..n).map(|i| vector(&centres, i, 0.1, &mut rng)).collect();
        for (i, v) in stored.iter().enumerate() {
            let slot = Slot {
                key: format!("k{i}"),
                prompt: String::new(),
                version: 1,
            };
            hnsw.insert(slot.clone(), v);
            exact.insert(slot, v);
        }
        let built = started.elapsed();
        let queries: Vec<Vec<f32>> = (0..1000)
            .map(|_| {
                let i = rng.random_range(0..n);
                let mut q: Vec<f32> = stored[i]
                    .iter()
                    .map(|x| x + 0.02 * (rng.random::<f32>() - 0.5))
                    .collect();
                unit(&mut q);
                q
            })
            .collect();
        let (mut agree, mut t_hnsw, mut t_exact) = (0, Vec::new(), Vec::new());
        for q in &queries {
            let t = Instant::now();
            let a = hnsw.search(q, 8);
            t_hnsw.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            let b = exact.search(q, 1);
            t_exact.push(t.elapsed().as_secs_f64() * 1e6);
            if a.first().map(|s| &s.0.key) == b.first().map(|s| &s.0.key) {
                agree += 1;
            }
        }
        t_hnsw.sort_by(f64::total_cmp);
        t_exact.sort_by(f64::total_cmp);
        println!(
            "{n} entries (built in {:.1} s): HNSW recall@1 {:.3}; search p50 {:.0} µs p99 {:.0} µs (HNSW, k=8) vs p50 {:.0} µs p99 {:.0} µs (exact)",
            built.as_secs_f64(),
            f64::from(agree) / queries.len() as f64,
            quantile(&t_hnsw, 0.5),
            quantile(&t_hnsw, 0.99),
            quantile(&t_exact, 0.5),
            quantile(&t_exact, 0.99),
        );
    }
}
