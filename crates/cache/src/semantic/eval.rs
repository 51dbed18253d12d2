//! The semantic evaluation: labelled prompt pairs (`eval/semantic_pairs.tsv`) scored at a
//! threshold two ways — cosine alone (what GPTCache does), and our tiers with the guard.

use std::collections::BTreeMap;

use super::embed::{Embedder, dot};
use super::text::{guard, normalize, strict_guard};

/// One labelled pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Row id.
    pub id: String,
    /// Whether B may be served A's answer.
    pub same: bool,
    /// The kind of paraphrase or of difference.
    pub kind: String,
    /// The prompt stored.
    pub a: String,
    /// The prompt asked.
    pub b: String,
}

/// Parses the TSV (header, then `id label kind prompt_a prompt_b`).
///
/// # Errors
/// Naming the line that is malformed.
pub fn parse(tsv: &str) -> Result<Vec<Pair>, String> {
    tsv.lines()
        .enumerate()
        .skip(1)
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            let f: Vec<&str> = line.split('\t').collect();
            let [id, label, kind, a, b] = f.as_slice() else {
                return Err(format!("line {}: {} fields, want 5", n + 1, f.len()));
            };
            Ok(Pair {
                id: (*id).to_owned(),
                same: match *label {
                    "same" => true,
                    "different" => false,
                    other => return Err(format!("line {}: label {other:?}", n + 1)),
                },
                kind: (*kind).to_owned(),
                a: (*a).to_owned(),
                b: (*b).to_owned(),
            })
        })
        .collect()
}

/// The pairs shipped with the repository.
#[must_use]
pub fn shipped() -> Vec<Pair> {
    parse(include_str!("../../eval/semantic_pairs.tsv")).expect("the shipped eval set parses")
}

/// The held-out pairs (written separately; never used to tune the guard or the threshold).
#[must_use]
pub fn holdout() -> Vec<Pair> {
    parse(include_str!("../../eval/semantic_pairs_holdout.tsv"))
        .expect("the shipped held-out set parses")
}

/// Hits per method.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// Paraphrases (label same) served.
    pub paraphrase_hits: usize,
    /// Paraphrases in the set.
    pub paraphrases: usize,
    /// Negatives (label different) served: false hits.
    pub false_hits: usize,
    /// Negatives in the set.
    pub negatives: usize,
    /// False hits per kind of negative.
    pub false_hits_by_kind: BTreeMap<String, (usize, usize)>,
    /// Paraphrase hits per kind.
    pub hits_by_kind: BTreeMap<String, (usize, usize)>,
}

impl Score {
    fn add(&mut self, pair: &Pair, hit: bool) {
        let (per_kind, count, total) = if pair.same {
            (
                &mut self.hits_by_kind,
                &mut self.paraphrase_hits,
                &mut self.paraphrases,
            )
        } else {
            (
                &mut self.false_hits_by_kind,
                &mut self.false_hits,
                &mut self.negatives,
            )
        };
        *total += 1;
        let e = per_kind.entry(pair.kind.clone()).or_default();
        e.1 += 1;
        if hit {
            *count += 1;
            e.0 += 1;
        }
    }

    /// Share of paraphrases served.
    #[must_use]
    #[allow(clippy::cast_precision_loss, reason = "small counts")]
    pub fn hit_rate(&self) -> f64 {
        self.paraphrase_hits as f64 / self.paraphrases.max(1) as f64
    }

    /// Share of negatives served.
    #[must_use]
    #[allow(clippy::cast_precision_loss, reason = "small counts")]
    pub fn false_hit_rate(&self) -> f64 {
        self.false_hits as f64 / self.negatives.max(1) as f64
    }
}

/// Both methods' scores at `threshold`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Cosine alone.
    pub cosine: Score,
    /// EXACT / NORMALIZED / SEMANTIC with the guard.
    pub guarded: Score,
    /// Pairs the guard refused that cosine alone would have served, by refusal.
    pub refusals: BTreeMap<String, usize>,
    /// The pairs tiers + guard got wrong: id, similarity, both prompts.
    pub mistakes: Vec<String>,
}

/// Scores `pairs` with `embedder` at `threshold`.
///
/// # Errors
/// When the embedder fails.
pub fn evaluate(pairs: &[Pair], embedder: &dyn Embedder, threshold: f32) -> Result<Report, String> {
    let mut report = Report::default();
    for chunk in pairs.chunks(32) {
        let texts: Vec<&str> = chunk
            .iter()
            .flat_map(|p| [p.a.as_str(), p.b.as_str()])
            .collect();
        let vectors = embedder.embed(&texts)?;
        for (pair, v) in chunk.iter().zip(vectors.chunks(2)) {
            let similarity = dot(&v[0], &v[1]);
            let cosine_hit = similarity >= threshold;
            report.cosine.add(pair, cosine_hit);
            let guarded_hit = normalize(&pair.a) == normalize(&pair.b)
                || (cosine_hit && {
                    let refusal = if embedder.lexical() {
                        strict_guard(&pair.b, &pair.a)
                    } else {
                        guard(&pair.b, &pair.a)
                    };
                    if let Some(r) = &refusal {
                        let name = format!("{r:?}");
                        let name = name.split('(').next().unwrap_or_default().to_owned();
                        *report.refusals.entry(name).or_default() += 1;
                    }
                    refusal.is_none()
                });
            report.guarded.add(pair, guarded_hit);
            if guarded_hit != pair.same {
                report.mistakes.push(format!(
                    "{} {} {similarity:.3} {} | {} [{:?}]",
                    pair.id,
                    if pair.same { "missed" } else { "FALSE HIT" },
                    pair.a,
                    pair.b,
                    guard(&pair.b, &pair.a)
                ));
            }
        }
    }
    Ok(report)
}
