//! Sentence embeddings in process: all-MiniLM-L6-v2 through candle ([`MiniLm`], 384
//! dimensions, loaded from a local directory — nothing is downloaded at run time), or, without
//! a model, a documented lexical fallback ([`Lexical`]: hashed words and character trigrams;
//! it finds rewordings that share words, not paraphrases that share meaning).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use parking_lot::Mutex;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// Turns texts into unit vectors.
pub trait Embedder: Send + Sync {
    /// A name for the vector space (vectors of different embedders are never compared).
    fn id(&self) -> &str;
    /// Dimensions of its vectors.
    fn dim(&self) -> usize;
    /// One unit vector per text.
    ///
    /// # Errors
    /// When the model fails (it should not).
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String>;

    /// Whether its similarity only measures shared wording: then SEMANTIC hits also need
    /// every content word in both prompts ([`super::text::strict_guard`]).
    fn lexical(&self) -> bool {
        false
    }
}

/// Longest input in tokens (what the model was trained with; longer prompts are cut).
const MAX_TOKENS: usize = 256;

/// all-MiniLM-L6-v2: BERT, mean pooling over the attention mask, L2-normalised.
pub struct MiniLm {
    model: BertModel,
    // `Tokenizer::encode_batch` takes `&self`, but padding settings are per call: one lock.
    tokenizer: Mutex<Tokenizer>,
    device: Device,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm").finish_non_exhaustive()
    }
}

impl MiniLm {
    /// Loads `model.safetensors`, `tokenizer.json` and `config.json` from `dir`.
    ///
    /// # Errors
    /// Naming the file that is missing or unreadable.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let device = Device::Cpu;
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| format!("reading {}: {e}", dir.join(name).display()))
        };
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| format!("config.json: {e}"))?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        // The file pads every input to 128 tokens; pad to the longest of each batch instead.
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        let weights = read("model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DTYPE, &device)
            .map_err(|e| format!("model.safetensors: {e}"))?;
        let model = BertModel::load(vb, &config).map_err(|e| format!("model.safetensors: {e}"))?;
        Ok(Self {
            model,
            tokenizer: Mutex::new(tokenizer),
            device,
        })
    }

    fn forward(&self, texts: &[&str]) -> candle_core::Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .lock()
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let rows = encodings.len();
        let cols = encodings.first().map_or(0, |e| e.get_ids().len());
        let ids: Vec<u32> = encodings
            .iter()
            .flat_map(|e| e.get_ids().to_vec())
            .collect();
        let mask: Vec<u32> = encodings
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let input_ids = Tensor::from_vec(ids, (rows, cols), &self.device)?;
        let attention = Tensor::from_vec(mask, (rows, cols), &self.device)?;
        let type_ids = input_ids.zeros_like()?;
        let hidden = self
            .model
            .forward(&input_ids, &type_ids, Some(&attention))?;
        let m = attention.to_dtype(DType::F32)?.unsqueeze(2)?;
        let mean = hidden
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}

impl Embedder for MiniLm {
    fn id(&self) -> &str {
        "all-MiniLM-L6-v2"
    }

    fn dim(&self) -> usize {
        384
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(texts).map_err(|e| format!("embedding: {e}"))
    }
}

/// The fallback without a model: words and character trigrams of the NORMALIZED text hashed
/// into 384 dimensions (signed), L2-normalised. Cosine then measures shared wording.
#[derive(Debug, Default)]
pub struct Lexical;

impl Embedder for Lexical {
    fn id(&self) -> &str {
        "lexical-v1"
    }

    fn dim(&self) -> usize {
        384
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        Ok(texts.iter().map(|t| lexical(t, self.dim())).collect())
    }

    fn lexical(&self) -> bool {
        true
    }
}

fn lexical(text: &str, dim: usize) -> Vec<f32> {
    let text = super::text::normalize(text);
    let mut v = vec![0f32; dim];
    let mut add = |feature: &str, weight: f32| {
        let h = fnv(feature.as_bytes());
        let i = usize::try_from(h % dim as u64).unwrap_or(0);
        let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
        v[i] += sign * weight;
    };
    for word in text.split(' ') {
        add(word, 1.0);
    }
    let padded: Vec<char> = format!(" {text} ").chars().collect();
    for w in padded.windows(3) {
        add(&w.iter().collect::<String>(), 0.5);
    }
    unit(&mut v);
    v
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Scales `v` to length 1 (leaves a zero vector alone).
pub fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        for x in v {
            *x /= n;
        }
    }
}

/// Cosine of two unit vectors. Eight running sums, so the compiler vectorises it (one sum
/// in order cannot be reordered for SIMD).
#[must_use]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The embedder configured: the model in `dir`, or the lexical fallback (with the reason).
#[must_use]
pub fn load(dir: Option<&Path>) -> (Arc<dyn Embedder>, Option<String>) {
    match dir {
        None => (
            Arc::new(Lexical),
            Some("no --cache-embedder-model given: lexical fallback".to_owned()),
        ),
        Some(dir) => match MiniLm::load(dir) {
            Ok(m) => (Arc::new(m), None),
            Err(e) => (
                Arc::new(Lexical),
                Some(format!("cannot load the model ({e}): lexical fallback")),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_lexical_fallback_is_a_unit_vector_close_for_shared_words() {
        let l = Lexical;
        let v = l
            .embed(&[
                "How do I reverse a list in Python?",
                "python: reverse a list",
                "bake bread",
            ])
            .unwrap();
        assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-5);
        assert!(dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.3);
    }

    /// With the model installed (`scripts/install-deps.sh` fetches it): the reference values
    /// of sentence-transformers for all-MiniLM-L6-v2.
    #[test]
    fn test_minilm_matches_the_reference_embeddings() {
        let Some(dir) = crate::semantic::model_dir_for_tests() else {
            eprintln!(
                "SKIPPED: no model (set AGENTMESH_TEST_MODEL_DIR or run scripts/install-deps.sh)"
            );
            return;
        };
        let m = MiniLm::load(&dir).unwrap();
        let v = m
            .embed(&["This is an example sentence", "Each sentence is converted"])
            .unwrap();
        let want = [
            0.067_657, 0.063_496, 0.048_713, 0.079_305, 0.037_448, 0.002_653,
        ];
        for (got, want) in v[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        assert!((dot(&v[0], &v[1]) - 0.404_559).abs() < 1e-3);
    }
}
