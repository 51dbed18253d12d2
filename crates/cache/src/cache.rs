//! The two tiers together: reads try L1, then L2 (filling L1); writes go to L2 (the compare-
//! and-set) and then to L1.
//!
//! L1 here is this instance's view only: until cross-node invalidation is built (issue 17), a
//! write on another instance is seen here when the local L1 entry expires or a FRESH read
//! skips it. That is why a value's L1 life is capped ([`L1_MAX_AGE`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache as Moka;

use crate::config::{
    CacheConfig, MAX_KEY_LEN, MAX_NAMESPACE_LEN, MAX_TTL, MAX_VALUE_LEN, TTL_JITTER,
};
use crate::entry::Entry;
use crate::error::{CacheError, FieldViolation};
use crate::l2::{L2Store, Written};

/// Longest an entry stays in L1 before L2 is asked again.
pub const L1_MAX_AGE: Duration = Duration::from_secs(5);

/// Wall time in milliseconds (a trait so tests drive it).
pub trait WallClock: Send + Sync {
    /// Milliseconds since the UNIX epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Which tier answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// This process.
    L1,
    /// The shared tier.
    L2,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Consistency {
    /// L1 may answer.
    #[default]
    Default,
    /// Skip L1: ask L2.
    Fresh,
}

/// A value found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The value (decompressed).
    pub value: Bytes,
    /// Its version.
    pub version: u64,
    /// Where it came from.
    pub tier: Tier,
    /// Milliseconds since it was written.
    pub age_ms: u64,
    /// Milliseconds until it expires.
    pub ttl_left_ms: u64,
}

/// The cache; share it in an `Arc`.
pub struct Cache {
    l1: Moka<String, Arc<(Entry, u64)>>,
    l2: Arc<dyn L2Store>,
    clock: Arc<dyn WallClock>,
    config: CacheConfig,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("l1_entries", &self.l1.entry_count())
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Checks a namespace and a key, naming every bad field.
fn check_key(namespace: &str, key: &str, out: &mut Vec<FieldViolation>) {
    if namespace.is_empty()
        || namespace.len() > MAX_NAMESPACE_LEN
        || !namespace.bytes().all(|b| b.is_ascii_graphic())
    {
        out.push(FieldViolation::new(
            "namespace",
            format!("must be 1 to {MAX_NAMESPACE_LEN} bytes of visible ASCII without spaces"),
        ));
    }
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        out.push(FieldViolation::new(
            "key",
            format!("must be 1 to {MAX_KEY_LEN} bytes, got {}", key.len()),
        ));
    }
}

fn done(violations: Vec<FieldViolation>) -> Result<(), CacheError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(CacheError::InvalidArgument(violations))
    }
}

/// The namespace and key as one storage key (the namespace cannot hold `|`-free spaces, the
/// length prefix keeps `a|b` + `c` apart from `a` + `b|c`).
fn storage_key(namespace: &str, key: &str) -> String {
    format!("{}:{namespace}|{key}", namespace.len())
}

impl Cache {
    /// A cache over `l2` with an L1 bounded by `config`.
    #[must_use]
    pub fn new(config: CacheConfig, l2: Arc<dyn L2Store>, clock: Arc<dyn WallClock>) -> Self {
        let l1 = Moka::builder()
            .max_capacity(config.l1_max_bytes)
            .weigher(|_k: &String, v: &Arc<(Entry, u64)>| {
                u32::try_from(v.0.weight()).unwrap_or(u32::MAX)
            })
            .time_to_live(L1_MAX_AGE)
            .build();
        Self {
            l1,
            l2,
            clock,
            config,
        }
    }

    /// The value under `key` in `namespace`, if present and not expired.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable` when L1 misses and L2 cannot be read.
    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Hit>, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, &mut v);
        done(v)?;
        let now = self.clock.now_ms();
        let id = storage_key(namespace, key);
        if consistency == Consistency::Default
            && let Some(held) = self.l1.get(&id)
            && held.0.expires_ms > now
        {
            return hit(&held.0, Tier::L1, now).map(Some);
        }
        let entry = self
            .l2
            .get(&id)
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string()))?
            .filter(|e| e.expires_ms > now);
        match entry {
            Some(entry) => {
                let found = hit(&entry, Tier::L2, now)?;
                self.l1.insert(id, Arc::new((entry, now)));
                Ok(Some(found))
            }
            None => {
                self.l1.invalidate(&id);
                Ok(None)
            }
        }
    }

    /// Stores `value` under `key`: when `if_version` is given, only if the key is at that
    /// version (0: absent). Lives `ttl` (the default when `None`), spread by ±10%. Returns the
    /// new version.
    ///
    /// # Errors
    /// `InvalidArgument`; `VersionMismatch`; `Unavailable` when L2 cannot be written.
    pub async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        if_version: Option<u64>,
    ) -> Result<u64, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, &mut v);
        if value.len() > MAX_VALUE_LEN {
            v.push(FieldViolation::new(
                "value",
                format!("must be at most {MAX_VALUE_LEN} bytes, got {}", value.len()),
            ));
        }
        if ttl.is_some_and(|t| t.is_zero() || t > MAX_TTL) {
            v.push(FieldViolation::new(
                "ttl",
                format!("must be between 1 ms and {MAX_TTL:?}"),
            ));
        }
        done(v)?;
        let ttl = jitter(ttl.unwrap_or(self.config.default_ttl));
        let now = self.clock.now_ms();
        let id = storage_key(namespace, key);
        let (written, entry) = self
            .l2
            .set(&id, value, if_version, ttl, now)
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string()))?;
        match (written, entry) {
            (Written::Stored(version), Some(entry)) => {
                self.l1.insert(id, Arc::new((entry, now)));
                Ok(version)
            }
            (Written::Stored(version), None) => {
                self.l1.invalidate(&id);
                Ok(version)
            }
            (Written::Conflict(current), _) => {
                self.l1.invalidate(&id);
                Err(CacheError::VersionMismatch {
                    expected: if_version.unwrap_or(0),
                    current,
                })
            }
        }
    }

    /// Removes `key`; whether it was there.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable` when L2 cannot be written.
    pub async fn delete(&self, namespace: &str, key: &str) -> Result<bool, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, &mut v);
        done(v)?;
        let id = storage_key(namespace, key);
        self.l1.invalidate(&id);
        self.l2
            .delete(&id)
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string()))
    }

    /// Entries in L1 now (approximate: moka counts lazily).
    #[must_use]
    pub fn l1_entries(&self) -> u64 {
        self.l1.run_pending_tasks();
        self.l1.entry_count()
    }
}

fn hit(entry: &Entry, tier: Tier, now: u64) -> Result<Hit, CacheError> {
    Ok(Hit {
        value: entry.value().map_err(CacheError::Unavailable)?,
        version: entry.version,
        tier,
        age_ms: now.saturating_sub(entry.written_ms),
        ttl_left_ms: entry.expires_ms.saturating_sub(now),
    })
}

/// `ttl` spread by up to ±[`TTL_JITTER`].
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "a TTL in ms is far below 2^52"
)]
fn jitter(ttl: Duration) -> Duration {
    let spread = 1.0 + TTL_JITTER * (rand::random::<f64>() * 2.0 - 1.0);
    Duration::from_millis(((ms(ttl) as f64 * spread) as u64).max(1))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::l2::InMemoryL2;

    #[derive(Default)]
    struct Manual(AtomicU64);

    impl WallClock for Manual {
        fn now_ms(&self) -> u64 {
            1_700_000_000_000 + self.0.load(Ordering::SeqCst)
        }
    }

    fn cache() -> (Cache, Arc<Manual>, Arc<InMemoryL2>) {
        let clock = Arc::new(Manual::default());
        let l2 = Arc::new(InMemoryL2::default());
        (
            Cache::new(CacheConfig::default(), l2.clone(), clock.clone()),
            clock,
            l2,
        )
    }

    #[tokio::test]
    async fn test_reads_come_from_l1_then_l2_and_fresh_skips_l1() {
        let (c, _, _) = cache();
        assert_eq!(c.get("ns", "k", Consistency::Default).await.unwrap(), None);
        assert_eq!(c.set("ns", "k", b"v1", None, None).await.unwrap(), 1);
        let h = c
            .get("ns", "k", Consistency::Default)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.value.as_ref(), h.version, h.tier),
            (&b"v1"[..], 1, Tier::L1)
        );
        let h = c.get("ns", "k", Consistency::Fresh).await.unwrap().unwrap();
        assert_eq!(h.tier, Tier::L2);
        // Another namespace is another key.
        assert_eq!(
            c.get("other", "k", Consistency::Default).await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn test_compare_and_set_and_delete() {
        let (c, _, _) = cache();
        assert_eq!(c.set("ns", "k", b"a", None, Some(0)).await.unwrap(), 1);
        assert_eq!(
            c.set("ns", "k", b"b", None, Some(0)).await.unwrap_err(),
            CacheError::VersionMismatch {
                expected: 0,
                current: 1
            }
        );
        assert_eq!(c.set("ns", "k", b"b", None, Some(1)).await.unwrap(), 2);
        assert!(c.delete("ns", "k").await.unwrap());
        assert!(!c.delete("ns", "k").await.unwrap());
        assert_eq!(c.get("ns", "k", Consistency::Default).await.unwrap(), None);
    }

    #[tokio::test]
    async fn test_entries_expire_after_their_jittered_ttl() {
        let (c, clock, _) = cache();
        c.set("ns", "k", b"v", Some(Duration::from_secs(10)), None)
            .await
            .unwrap();
        clock.0.store(8_900, Ordering::SeqCst);
        assert!(
            c.get("ns", "k", Consistency::Default)
                .await
                .unwrap()
                .is_some()
        );
        clock.0.store(11_100, Ordering::SeqCst);
        assert_eq!(c.get("ns", "k", Consistency::Default).await.unwrap(), None);
    }

    #[tokio::test]
    async fn test_bad_input_names_every_field() {
        let (c, _, _) = cache();
        let e = c
            .set(
                "bad ns",
                "",
                &vec![0; MAX_VALUE_LEN + 1],
                Some(Duration::ZERO),
                None,
            )
            .await
            .unwrap_err();
        let CacheError::InvalidArgument(v) = e else {
            panic!("{e:?}");
        };
        let fields: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["namespace", "key", "value", "ttl"]);
    }

    #[tokio::test]
    async fn test_a_write_on_another_instance_is_seen_by_a_fresh_read_at_once() {
        let (a, clock, l2) = cache();
        let b = Cache::new(CacheConfig::default(), l2, clock);
        a.set("ns", "k", b"one", None, None).await.unwrap();
        assert_eq!(
            b.get("ns", "k", Consistency::Default)
                .await
                .unwrap()
                .unwrap()
                .value,
            &b"one"[..]
        );
        a.set("ns", "k", b"two", None, None).await.unwrap();
        let fresh = b.get("ns", "k", Consistency::Fresh).await.unwrap().unwrap();
        assert_eq!((fresh.value.as_ref(), fresh.version), (&b"two"[..], 2));
    }
}
