//! The semantic cache for LLM prompts, on top of the key/value [`Cache`].
//!
//! A lookup tries three tiers in order: EXACT (the same prompt), NORMALIZED (the same prompt
//! up to case, punctuation and spacing — one key read), SEMANTIC (the most similar stored
//! prompts by embedding, at or above the threshold, each checked by the content guard
//! [`text::guard`] before it is served). The partition (model, parameters, system-prompt hash)
//! and the namespace are part of every key and every index: an answer is never served across
//! them. A caller may send its own embedding (searched among vectors of the same dimension
//! sent by callers), or let the service embed the prompt ([`embed`]).
//!
//! Entries are ordinary cache entries (TTL, tags, invalidations, coherence across instances);
//! the value holds the prompt, the partition, the vector and the answer. Each instance keeps
//! its own vector indexes ([`index`]), filled from L2 when it starts or resynchronises and kept
//! current by the change feed, so a put on one instance is found by a lookup on another.

use std::collections::HashMap;
use std::path::PathBuf;

pub use crate::config::model_dir_for_tests;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use crate::cache::{Cache, Consistency, Found, Notice, ReadOptions, SetOptions, check_key, done};
use crate::error::{CacheError, FieldViolation};
use crate::sync::What;

pub mod embed;
pub mod eval;
pub mod index;
pub mod text;

pub use embed::Embedder;
use index::{Slot, VectorIndex};
pub use text::{Refusal, guard, normalize, strict_guard};

/// Where semantic entries' keys start (inside their namespace).
pub const KEY_PREFIX: &str = "\u{1}sem/";
/// Longest prompt, bytes.
pub const MAX_PROMPT: usize = 32 << 10;
/// Most dimensions of a caller's vector.
pub const MAX_DIM: usize = 4096;
/// Most bytes of each partition field.
pub const MAX_PARTITION_FIELD: usize = 256;
/// Candidates looked at per lookup.
const CANDIDATES: usize = 8;
const MAGIC: &[u8; 4] = b"AMS1";

/// What an answer depends on besides the prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partition {
    /// The model (e.g. "gpt-4o-2024-08-06").
    pub model: String,
    /// Its parameters, canonical (e.g. "temperature=0;top_p=1").
    pub parameters: String,
    /// A hash of the system prompt.
    pub system_prompt_hash: String,
}

impl Partition {
    fn canonical(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}",
            self.model, self.parameters, self.system_prompt_hash
        )
    }

    fn hash(&self) -> String {
        hex(&Sha256::digest(self.canonical().as_bytes())[..8])
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The tier a semantic lookup answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemanticTier {
    /// The same prompt.
    Exact,
    /// The same prompt up to case, punctuation and spacing.
    Normalized,
    /// A similar prompt the guard let through.
    Semantic,
}

/// A semantic hit.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticHit {
    /// The answer stored.
    pub answer: Bytes,
    /// How it was found.
    pub tier: SemanticTier,
    /// Cosine similarity of the prompts (1 for EXACT and NORMALIZED).
    pub similarity: f32,
    /// The prompt the answer was stored for.
    pub matched_prompt: String,
    /// The entry's version.
    pub version: u64,
    /// Milliseconds since it was stored.
    pub age_ms: u64,
}

/// A similar prompt the guard refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The stored prompt.
    pub prompt: String,
    /// Its similarity.
    pub similarity: f32,
    /// Why.
    pub reason: Refusal,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticAnswer {
    /// The hit, if any.
    pub hit: Option<SemanticHit>,
    /// Candidates at or above the threshold that the guard refused.
    pub refused: Vec<Refused>,
    /// The best similarity seen (0 when the index is empty).
    pub best_similarity: f32,
}

/// Semantic settings.
#[derive(Debug, Clone)]
pub struct SemanticConfig {
    /// Similarity from which a SEMANTIC hit is served (requests may raise it, never lower it).
    pub threshold: f32,
    /// Most entries indexed by this instance (the oldest of an index go first).
    pub max_entries: usize,
    /// The model directory (`None`: the lexical fallback).
    pub model_dir: Option<PathBuf>,
}

impl Default for SemanticConfig {
    fn default() -> Self {
        Self {
            threshold: 0.85,
            max_entries: 200_000,
            model_dir: None,
        }
    }
}

/// A stored semantic entry.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    space: String,
    partition: String,
    prompt: String,
    vector: Vec<f32>,
    answer: Bytes,
}

impl Record {
    fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(MAGIC);
        for s in [&self.space, &self.partition] {
            out.put_u16_le(u16::try_from(s.len()).unwrap_or(u16::MAX));
            out.put_slice(s.as_bytes());
        }
        out.put_u32_le(u32::try_from(self.prompt.len()).unwrap_or(u32::MAX));
        out.put_slice(self.prompt.as_bytes());
        out.put_u16_le(u16::try_from(self.vector.len()).unwrap_or(u16::MAX));
        for x in &self.vector {
            out.put_f32_le(*x);
        }
        out.put_slice(&self.answer);
        out.freeze()
    }

    fn decode(mut raw: Bytes) -> Option<Self> {
        if raw.len() < 4 || &raw[..4] != MAGIC {
            return None;
        }
        raw.advance(4);
        let string = |len: usize, raw: &mut Bytes| -> Option<String> {
            (raw.len() >= len).then(|| String::from_utf8(raw.split_to(len).to_vec()).ok())?
        };
        let n = usize::from(raw.try_get_u16_le().ok()?);
        let space = string(n, &mut raw)?;
        let n = usize::from(raw.try_get_u16_le().ok()?);
        let partition = string(n, &mut raw)?;
        let n = usize::try_from(raw.try_get_u32_le().ok()?).ok()?;
        let prompt = string(n, &mut raw)?;
        let dim = usize::from(raw.try_get_u16_le().ok()?);
        if raw.len() < dim * 4 {
            return None;
        }
        let vector = (0..dim).map(|_| raw.get_f32_le()).collect();
        Some(Self {
            space,
            partition,
            prompt,
            vector,
            answer: raw,
        })
    }
}

type IndexKey = (String, String, String);

/// This instance's vector indexes, shared with the blocking threads that search and fill
/// them (a search over 100k vectors, or an HNSW build, must not hold an async worker).
struct Indexes {
    map: RwLock<HashMap<IndexKey, Arc<RwLock<VectorIndex>>>>,
    total: AtomicUsize,
    max_entries: usize,
}

impl Indexes {
    fn get(&self, id: &IndexKey) -> Option<Arc<RwLock<VectorIndex>>> {
        self.map.read().get(id).cloned()
    }

    /// Whether `key` is indexed at `version` or later already (any vector space).
    fn has(&self, namespace: &str, key: &str, version: u64) -> bool {
        self.map
            .read()
            .iter()
            .filter(|((ns, _, _), _)| ns == namespace)
            .any(|(_, i)| i.read().version(key).is_some_and(|v| v >= version))
    }

    /// Puts a record in its index (the oldest entries go when over the bound).
    fn insert(&self, namespace: &str, key: &str, record: &Record, version: u64) {
        let Some(phash) = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.split('/').next())
        else {
            return;
        };
        let id = (namespace.to_owned(), phash.to_owned(), record.space.clone());
        let index = self
            .map
            .write()
            .entry(id)
            .or_insert_with(|| Arc::new(RwLock::new(VectorIndex::new(record.vector.len()))))
            .clone();
        let mut index = index.write();
        if index.dim() != record.vector.len() || index.version(key).is_some_and(|v| v >= version) {
            return;
        }
        let before = index.len();
        index.insert(
            Slot {
                key: key.to_owned(),
                prompt: record.prompt.clone(),
                version,
            },
            &record.vector,
        );
        if index.len() > before {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        while self.total.load(Ordering::Relaxed) > self.max_entries && index.pop_oldest().is_some()
        {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn remove_from(&self, index: &RwLock<VectorIndex>, key: &str) {
        if index.write().remove(key) {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn remove(&self, namespace: &str, key: &str) {
        let indexes: Vec<_> = self
            .map
            .read()
            .iter()
            .filter(|((ns, _, _), _)| ns == namespace)
            .map(|(_, i)| i.clone())
            .collect();
        for index in indexes {
            self.remove_from(&index, key);
        }
    }

    fn drop_namespace(&self, namespace: &str) {
        self.map.write().retain(|(ns, _, _), index| {
            if ns == namespace {
                self.total.fetch_sub(index.read().len(), Ordering::Relaxed);
                false
            } else {
                true
            }
        });
    }

    fn clear(&self) {
        self.map.write().clear();
        self.total.store(0, Ordering::Relaxed);
    }
}

/// Runs index work on a blocking thread.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("index work does not panic")
}

/// The semantic cache; made with [`SemanticCache::start`].
pub struct SemanticCache {
    cache: Arc<Cache>,
    embedder: Arc<dyn Embedder>,
    fallback: Option<String>,
    config: SemanticConfig,
    indexes: Arc<Indexes>,
}

impl std::fmt::Debug for SemanticCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemanticCache")
            .field("embedder", &self.embedder.id())
            .finish_non_exhaustive()
    }
}

fn invalid(field: &str, why: impl Into<String>) -> FieldViolation {
    FieldViolation::new(field, why)
}

fn check_partition(p: &Partition, v: &mut Vec<FieldViolation>) {
    for (name, value) in [
        ("partition.model", &p.model),
        ("partition.parameters", &p.parameters),
        ("partition.system_prompt_hash", &p.system_prompt_hash),
    ] {
        if value.len() > MAX_PARTITION_FIELD {
            v.push(invalid(
                name,
                format!("at most {MAX_PARTITION_FIELD} bytes"),
            ));
        }
    }
}

/// Checks a caller's vector and makes it a unit vector.
fn caller_vector(embedding: &[f32], v: &mut Vec<FieldViolation>) -> Vec<f32> {
    if embedding.len() > MAX_DIM {
        v.push(invalid(
            "embedding",
            format!("at most {MAX_DIM} dimensions"),
        ));
        return Vec::new();
    }
    if embedding.iter().any(|x| !x.is_finite()) {
        v.push(invalid("embedding", "every component must be finite"));
        return Vec::new();
    }
    let mut out = embedding.to_vec();
    if out.iter().all(|x| *x == 0.0) {
        v.push(invalid("embedding", "must not be all zeros"));
    }
    embed::unit(&mut out);
    out
}

impl SemanticCache {
    /// A semantic cache over `cache`, indexing what L2 holds now and following its changes.
    #[must_use]
    pub fn start(cache: Arc<Cache>, config: SemanticConfig) -> Arc<Self> {
        let (embedder, fallback) = embed::load(config.model_dir.as_deref());
        if let Some(reason) = &fallback {
            tracing::warn!(%reason, "semantic cache: no embedding model; SEMANTIC hits come from shared wording only");
        }
        Self::with_embedder(cache, config, embedder, fallback)
    }

    /// With a given embedder (tests, benches).
    #[must_use]
    pub fn with_embedder(
        cache: Arc<Cache>,
        config: SemanticConfig,
        embedder: Arc<dyn Embedder>,
        fallback: Option<String>,
    ) -> Arc<Self> {
        let changes = cache.watch(None);
        let indexes = Arc::new(Indexes {
            map: RwLock::default(),
            total: AtomicUsize::new(0),
            max_entries: config.max_entries,
        });
        let s = Arc::new(Self {
            cache,
            embedder,
            fallback,
            config,
            indexes,
        });
        tokio::spawn(follow(Arc::downgrade(&s), changes));
        s
    }

    /// The embedder's name.
    #[must_use]
    pub fn embedder(&self) -> &str {
        self.embedder.id()
    }

    /// Why the fallback embedder is used (`None`: the model is loaded).
    #[must_use]
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Entries indexed by this instance.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.indexes.total.load(Ordering::Relaxed)
    }

    /// The configured threshold.
    #[must_use]
    pub fn threshold(&self) -> f32 {
        self.config.threshold
    }

    /// Embeds texts with the service's embedder (off the async threads).
    ///
    /// # Errors
    /// `Unavailable` when the model fails.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, CacheError> {
        let embedder = self.embedder.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            embedder.embed(&refs)
        })
        .await
        .map_err(|e| CacheError::Unavailable(format!("embedding: {e}")))?
        .map_err(CacheError::Unavailable)
    }

    async fn vector(
        &self,
        prompt: &str,
        embedding: Vec<f32>,
    ) -> Result<(String, Vec<f32>), CacheError> {
        if embedding.is_empty() {
            let v = self.embed(vec![prompt.to_owned()]).await?;
            let v = v.into_iter().next().unwrap_or_default();
            Ok((self.embedder.id().to_owned(), v))
        } else {
            Ok((format!("caller-{}", embedding.len()), embedding))
        }
    }

    fn check(
        namespace: &str,
        prompt: &str,
        partition: &Partition,
        embedding: &[f32],
    ) -> Result<Vec<f32>, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, "-", "", &mut v);
        if prompt.trim().is_empty() || prompt.len() > MAX_PROMPT {
            v.push(invalid(
                "prompt",
                format!("must be 1 to {MAX_PROMPT} bytes, not only spaces"),
            ));
        }
        check_partition(partition, &mut v);
        let vector = if embedding.is_empty() {
            Vec::new()
        } else {
            caller_vector(embedding, &mut v)
        };
        done(v)?;
        Ok(vector)
    }

    /// Stores `answer` for `prompt` in the partition; the version written.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable`.
    pub async fn put(
        &self,
        namespace: &str,
        prompt: &str,
        embedding: &[f32],
        partition: &Partition,
        answer: &[u8],
        options: &SetOptions,
    ) -> Result<u64, CacheError> {
        let given = Self::check(namespace, prompt, partition, embedding)?;
        let key = format!(
            "{KEY_PREFIX}{}/{}",
            partition.hash(),
            hex(&Sha256::digest(normalize(prompt).as_bytes())[..16])
        );
        let (space, vector) = self.vector(prompt, given).await?;
        let record = Record {
            space,
            partition: partition.canonical(),
            prompt: prompt.to_owned(),
            vector,
            answer: Bytes::copy_from_slice(answer),
        };
        let version = self
            .cache
            .set(namespace, &key, &record.encode(), options)
            .await?;
        self.index(namespace, key, record, version).await;
        Ok(version)
    }

    /// The answer stored for `prompt`, or a similar prompt's, in the partition.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable`.
    pub async fn get(
        &self,
        namespace: &str,
        prompt: &str,
        embedding: &[f32],
        threshold: Option<f32>,
        partition: &Partition,
    ) -> Result<SemanticAnswer, CacheError> {
        let given = Self::check(namespace, prompt, partition, embedding)?;
        if let Some(t) = threshold
            && !(0.0..=1.0).contains(&t)
        {
            return Err(CacheError::InvalidArgument(vec![invalid(
                "threshold",
                "must be between 0 and 1",
            )]));
        }
        // A request may raise the threshold, never lower it.
        let threshold = threshold.map_or(self.config.threshold, |t| t.max(self.config.threshold));
        let canonical = partition.canonical();
        let phash = partition.hash();
        let key = format!(
            "{KEY_PREFIX}{phash}/{}",
            hex(&Sha256::digest(normalize(prompt).as_bytes())[..16])
        );
        if let Some((record, version, age_ms)) = self.read(namespace, &key).await?
            && record.partition == canonical
        {
            let tier = if record.prompt == prompt {
                SemanticTier::Exact
            } else {
                SemanticTier::Normalized
            };
            self.count(namespace, tier);
            return Ok(SemanticAnswer {
                hit: Some(SemanticHit {
                    answer: record.answer,
                    tier,
                    similarity: 1.0,
                    matched_prompt: record.prompt,
                    version,
                    age_ms,
                }),
                refused: Vec::new(),
                best_similarity: 1.0,
            });
        }
        let strict = given.is_empty() && self.embedder.lexical();
        let (space, vector) = self.vector(prompt, given).await?;
        let index = self.indexes.get(&(namespace.to_owned(), phash, space));
        let mut answer = SemanticAnswer {
            hit: None,
            refused: Vec::new(),
            best_similarity: 0.0,
        };
        let Some(index) = index else {
            self.cache.metrics().semantic(namespace, "miss");
            return Ok(answer);
        };
        let searched = index.clone();
        let candidates: Vec<(Slot, f32)> = blocking(move || {
            searched
                .read()
                .search(&vector, CANDIDATES)
                .into_iter()
                .map(|(s, sim)| (s.clone(), sim))
                .collect()
        })
        .await;
        answer.best_similarity = candidates.first().map_or(0.0, |c| c.1);
        for (slot, similarity) in candidates {
            if similarity < threshold {
                break;
            }
            let refusal = if strict {
                strict_guard(prompt, &slot.prompt)
            } else {
                guard(prompt, &slot.prompt)
            };
            if let Some(reason) = refusal {
                self.cache.metrics().semantic(namespace, "guard_refused");
                answer.refused.push(Refused {
                    prompt: slot.prompt,
                    similarity,
                    reason,
                });
                continue;
            }
            match self.read(namespace, &slot.key).await? {
                Some((record, version, age_ms)) if record.partition == canonical => {
                    self.count(namespace, SemanticTier::Semantic);
                    answer.hit = Some(SemanticHit {
                        answer: record.answer,
                        tier: SemanticTier::Semantic,
                        similarity,
                        matched_prompt: record.prompt,
                        version,
                        age_ms,
                    });
                    return Ok(answer);
                }
                _ => {
                    // Expired, deleted or invalidated: out of the index.
                    let (indexes, index) = (self.indexes.clone(), index.clone());
                    blocking(move || indexes.remove_from(&index, &slot.key)).await;
                }
            }
        }
        self.cache.metrics().semantic(namespace, "miss");
        Ok(answer)
    }

    fn count(&self, namespace: &str, tier: SemanticTier) {
        self.cache.metrics().semantic(
            namespace,
            match tier {
                SemanticTier::Exact => "exact",
                SemanticTier::Normalized => "normalized",
                SemanticTier::Semantic => "semantic",
            },
        );
    }

    async fn read(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<(Record, u64, u64)>, CacheError> {
        Ok(
            match self
                .cache
                .get(namespace, key, ReadOptions::default())
                .await?
            {
                Found::Hit(h) => Record::decode(h.value).map(|r| (r, h.version, h.age_ms)),
                _ => None,
            },
        )
    }

    /// Puts a record in its index (on a blocking thread).
    async fn index(&self, namespace: &str, key: String, record: Record, version: u64) {
        let (indexes, namespace) = (self.indexes.clone(), namespace.to_owned());
        blocking(move || indexes.insert(&namespace, &key, &record, version)).await;
    }

    /// Forgets every index and loads them again from L2.
    ///
    /// # Errors
    /// `Unavailable` when L2 cannot be scanned.
    pub async fn rebuild(&self) -> Result<usize, CacheError> {
        let keys = self
            .cache
            .scan_keys(KEY_PREFIX, self.config.max_entries)
            .await?;
        self.indexes.clear();
        for chunk in keys.chunks(256) {
            let reads = futures::future::join_all(chunk.iter().map(|(ns, key)| async move {
                (ns.clone(), key.clone(), self.read(ns, key).await)
            }))
            .await;
            let records: Vec<_> = reads
                .into_iter()
                .filter_map(|(ns, key, read)| {
                    let (record, version, _) = read.ok()??;
                    Some((ns, key, record, version))
                })
                .collect();
            let indexes = self.indexes.clone();
            blocking(move || {
                for (ns, key, record, version) in &records {
                    indexes.insert(ns, key, record, *version);
                }
            })
            .await;
        }
        Ok(self.entries())
    }

    async fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::Flush { .. } => {
                if let Err(e) = self.rebuild().await {
                    tracing::warn!(error = %e, "semantic cache: rebuilding the indexes failed");
                }
            }
            Notice::Change(change) => match &change.what {
                What::Written { key, version } if key.starts_with(KEY_PREFIX) => {
                    // This instance's own puts are indexed already: skip them unread.
                    if self.indexes.has(&change.namespace, key, *version) {
                        return;
                    }
                    let fresh = ReadOptions {
                        consistency: Consistency::Fresh,
                        allow_stale: false,
                    };
                    if let Ok(Found::Hit(h)) = self.cache.get(&change.namespace, key, fresh).await
                        && let Some(record) = Record::decode(h.value)
                    {
                        self.index(&change.namespace, key.clone(), record, h.version)
                            .await;
                    }
                }
                What::Deleted { key } if key.starts_with(KEY_PREFIX) => {
                    let (indexes, key) = (self.indexes.clone(), key.clone());
                    let ns = change.namespace.clone();
                    blocking(move || indexes.remove(&ns, &key)).await;
                }
                What::Namespace { .. } => {
                    let (indexes, ns) = (self.indexes.clone(), change.namespace.clone());
                    blocking(move || indexes.drop_namespace(&ns)).await;
                }
                _ => {}
            },
        }
    }
}

/// Keeps the indexes current: a first load, then every change.
async fn follow(
    semantic: std::sync::Weak<SemanticCache>,
    mut changes: futures::stream::BoxStream<'static, Notice>,
) {
    // The feed may still be connecting: retry the first load for a while.
    for _ in 0..50 {
        let Some(s) = semantic.upgrade() else {
            return;
        };
        if s.rebuild().await.is_ok() {
            break;
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while let Some(notice) = changes.next().await {
        let Some(s) = semantic.upgrade() else {
            return;
        };
        s.on_notice(notice).await;
    }
}

#[cfg(test)]
mod tests;
