//! Scores the semantic cache on the labelled pairs in `eval/semantic_pairs.tsv`:
//! `cargo run --release -p agentmesh-cache --example semantic_eval -- [MODEL_DIR] [THRESHOLD]`
//! (without a model directory, or with `-`: the lexical fallback; `HOLDOUT=1`: the held-out
//! set instead of the development set). Prints, for cosine alone and for our
//! tiers with the guard, the paraphrase hit rate and the false-hit rate, per kind.

#![allow(clippy::disallowed_methods, reason = "a binary reads its environment")]

use std::path::PathBuf;
use std::time::Instant;

use agentmesh_cache::semantic::embed;
use agentmesh_cache::semantic::eval::{self, Score};

fn print(name: &str, s: &Score) {
    println!(
        "{name:<18} paraphrases served {:>3}/{} ({:5.1}%)   false hits {:>3}/{} ({:4.1}%)",
        s.paraphrase_hits,
        s.paraphrases,
        s.hit_rate() * 100.0,
        s.false_hits,
        s.negatives,
        s.false_hit_rate() * 100.0
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().filter(|a| *a != "-").map(PathBuf::from);
    let threshold: f32 = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(0.85);
    let (embedder, fallback) = embed::load(dir.as_deref());
    if let Some(reason) = fallback {
        println!("note: {reason}");
    }
    let pairs = if std::env::var_os("HOLDOUT").is_some() {
        println!("held-out set");
        eval::holdout()
    } else {
        println!("development set");
        eval::shipped()
    };
    let started = Instant::now();
    let report = eval::evaluate(&pairs, embedder.as_ref(), threshold).expect("embedding");
    let took = started.elapsed();
    println!(
        "{} pairs, embedder {}, threshold {threshold}, {} embeddings in {:.1} s ({:.0}/s)",
        pairs.len(),
        embedder.id(),
        pairs.len() * 2,
        took.as_secs_f64(),
        (pairs.len() * 2) as f64 / took.as_secs_f64()
    );
    print("cosine alone", &report.cosine);
    print("tiers + guard", &report.guarded);
    println!("\nfalse hits by kind (cosine alone -> tiers + guard):");
    for (kind, (n, total)) in &report.cosine.false_hits_by_kind {
        let g = report
            .guarded
            .false_hits_by_kind
            .get(kind)
            .map_or(0, |e| e.0);
        println!("  {kind:<20} {n:>3} -> {g:>3} of {total}");
    }
    println!("\nparaphrases served by kind (cosine alone -> tiers + guard):");
    for (kind, (n, total)) in &report.cosine.hits_by_kind {
        let g = report.guarded.hits_by_kind.get(kind).map_or(0, |e| e.0);
        println!("  {kind:<20} {n:>3} -> {g:>3} of {total}");
    }
    println!(
        "\nguard refusals of pairs cosine would serve: {:?}",
        report.refusals
    );
    if std::env::var_os("SHOW_MISTAKES").is_some() {
        println!("\nmistakes of tiers + guard:");
        for m in &report.mistakes {
            println!("  {m}");
        }
    }
}
