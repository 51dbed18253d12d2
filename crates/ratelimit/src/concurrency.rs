//! Concurrency limits: at most `limit` leases held at once per key, each expiring after its TTL
//! unless renewed, so a holder that crashes cannot leak its slot. Expired leases are dropped
//! whenever their key is touched, and all of them when the table reaches its bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::ids::{OpaqueId, new_id};

/// Most leases one key may allow at once.
pub const MAX_CONCURRENCY: u64 = 1_000_000;
/// Shortest lease.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// Longest lease.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// Lease lifetime when the caller gives none.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

const SHARDS: usize = 16;

/// Why a lease operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The lease expired, was released, or never existed.
    #[error("lease {0:032x} does not exist (released or expired)")]
    Unknown(OpaqueId),
    /// The table holds its maximum of leases.
    #[error("this instance holds its maximum of {0} leases")]
    Full(usize),
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireOutcome {
    /// The lease id when a slot was taken.
    pub lease_id: Option<OpaqueId>,
    /// Leases held for the key after the call.
    pub in_use: u64,
    /// When none was taken: until the soonest lease expires.
    pub retry_after: Option<Duration>,
}

/// Leases by key hash; see the module docs.
pub struct LeaseTable {
    shards: Vec<Mutex<HashMap<u64, HashMap<OpaqueId, u64>>>>,
    max_leases: usize,
    held: AtomicUsize,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl LeaseTable {
    /// A table holding at most `max_leases` leases in all.
    #[must_use]
    pub fn new(max_leases: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_leases: max_leases.max(1),
            held: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: u64) -> &Mutex<HashMap<u64, HashMap<OpaqueId, u64>>> {
        &self.shards[usize::try_from(key % SHARDS as u64).unwrap_or(0)]
    }

    /// Drops the expired leases of one key, returning how many it still holds.
    fn purge(&self, leases: &mut HashMap<OpaqueId, u64>, now: u64) -> usize {
        let before = leases.len();
        leases.retain(|_, expires| *expires > now);
        self.held
            .fetch_sub(before - leases.len(), Ordering::Relaxed);
        leases.len()
    }

    fn sweep(&self, now: u64) {
        for shard in &self.shards {
            let mut map = shard.lock();
            map.retain(|_, leases| self.purge(leases, now) > 0);
        }
    }

    /// Takes a slot of `key` if fewer than `limit` are held.
    ///
    /// # Errors
    /// `Full` when the table holds its maximum even after dropping expired leases.
    pub fn acquire(
        &self,
        key: u64,
        limit: u64,
        ttl: Duration,
        now: u64,
    ) -> Result<AcquireOutcome, LeaseError> {
        if self.held.load(Ordering::Relaxed) >= self.max_leases {
            self.sweep(now);
            if self.held.load(Ordering::Relaxed) >= self.max_leases {
                return Err(LeaseError::Full(self.max_leases));
            }
        }
        let mut map = self.shard(key).lock();
        let leases = map.entry(key).or_default();
        let in_use = self.purge(leases, now) as u64;
        if in_use >= limit {
            let soonest = leases.values().min().copied().unwrap_or(now);
            return Ok(AcquireOutcome {
                lease_id: None,
                in_use,
                retry_after: Some(Duration::from_nanos(soonest.saturating_sub(now))),
            });
        }
        let id = new_id();
        leases.insert(id, now.saturating_add(nanos(ttl)));
        self.held.fetch_add(1, Ordering::Relaxed);
        Ok(AcquireOutcome {
            lease_id: Some(id),
            in_use: in_use + 1,
            retry_after: None,
        })
    }

    /// Extends a live lease to `now + ttl`.
    ///
    /// # Errors
    /// `Unknown` when the lease expired or was released.
    pub fn renew(
        &self,
        key: u64,
        lease_id: OpaqueId,
        ttl: Duration,
        now: u64,
    ) -> Result<(), LeaseError> {
        let mut map = self.shard(key).lock();
        let leases = map.get_mut(&key).ok_or(LeaseError::Unknown(lease_id))?;
        self.purge(leases, now);
        let expires = leases
            .get_mut(&lease_id)
            .ok_or(LeaseError::Unknown(lease_id))?;
        *expires = now.saturating_add(nanos(ttl));
        Ok(())
    }

    /// Returns a slot, giving the number still held.
    ///
    /// # Errors
    /// `Unknown` when the lease expired or was released.
    pub fn release(&self, key: u64, lease_id: OpaqueId, now: u64) -> Result<u64, LeaseError> {
        let mut map = self.shard(key).lock();
        let leases = map.get_mut(&key).ok_or(LeaseError::Unknown(lease_id))?;
        self.purge(leases, now);
        if leases.remove(&lease_id).is_none() {
            return Err(LeaseError::Unknown(lease_id));
        }
        self.held.fetch_sub(1, Ordering::Relaxed);
        let left = leases.len() as u64;
        if left == 0 {
            map.remove(&key);
        }
        Ok(left)
    }

    /// Leases held in all (expired ones not yet dropped included).
    #[must_use]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn test_acquire_takes_up_to_the_limit_then_reports_the_soonest_expiry() {
        let t = LeaseTable::new(100);
        let a = t.acquire(7, 2, Duration::from_secs(10), 0).unwrap();
        let b = t.acquire(7, 2, Duration::from_secs(20), S).unwrap();
        assert_eq!((a.in_use, b.in_use), (1, 2));
        let c = t.acquire(7, 2, Duration::from_secs(10), 2 * S).unwrap();
        assert_eq!(
            c,
            AcquireOutcome {
                lease_id: None,
                in_use: 2,
                retry_after: Some(Duration::from_secs(8))
            }
        );
        assert_eq!(
            t.acquire(8, 2, Duration::from_secs(10), 2 * S)
                .unwrap()
                .in_use,
            1,
            "other keys are independent"
        );
    }

    #[test]
    fn test_expired_leases_free_their_slots() {
        let t = LeaseTable::new(100);
        t.acquire(1, 1, Duration::from_secs(5), 0).unwrap();
        assert!(
            t.acquire(1, 1, Duration::from_secs(5), 4 * S)
                .unwrap()
                .lease_id
                .is_none()
        );
        assert!(
            t.acquire(1, 1, Duration::from_secs(5), 5 * S)
                .unwrap()
                .lease_id
                .is_some(),
            "expired at 5 s"
        );
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn test_renew_extends_and_release_frees_once() {
        let t = LeaseTable::new(100);
        let id = t
            .acquire(1, 1, Duration::from_secs(5), 0)
            .unwrap()
            .lease_id
            .unwrap();
        t.renew(1, id, Duration::from_secs(5), 4 * S).unwrap();
        assert!(
            t.acquire(1, 1, Duration::from_secs(5), 8 * S)
                .unwrap()
                .lease_id
                .is_none(),
            "renewed until 9 s"
        );
        assert_eq!(t.release(1, id, 8 * S).unwrap(), 0);
        assert_eq!(
            t.release(1, id, 8 * S).unwrap_err(),
            LeaseError::Unknown(id)
        );
        assert_eq!(
            t.renew(1, id, Duration::from_secs(5), 8 * S).unwrap_err(),
            LeaseError::Unknown(id)
        );
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn test_renewing_an_expired_lease_fails() {
        let t = LeaseTable::new(100);
        let id = t
            .acquire(1, 1, Duration::from_secs(1), 0)
            .unwrap()
            .lease_id
            .unwrap();
        assert_eq!(
            t.renew(1, id, Duration::from_secs(1), 2 * S).unwrap_err(),
            LeaseError::Unknown(id)
        );
    }

    #[test]
    fn test_the_table_is_bounded_and_sweeps_expired_leases_when_full() {
        let t = LeaseTable::new(3);
        for key in 0..3 {
            t.acquire(key, 1, Duration::from_secs(1), 0).unwrap();
        }
        assert_eq!(
            t.acquire(9, 1, Duration::from_secs(1), 0).unwrap_err(),
            LeaseError::Full(3)
        );
        assert!(
            t.acquire(9, 1, Duration::from_secs(1), 2 * S)
                .unwrap()
                .lease_id
                .is_some(),
            "expired ones swept"
        );
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn test_concurrent_acquires_never_exceed_the_limit() {
        let t = std::sync::Arc::new(LeaseTable::new(10_000));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| {
                            t.acquire(5, 50, Duration::from_secs(60), 0)
                                .unwrap()
                                .lease_id
                                .is_some()
                        })
                        .count()
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 50);
    }
}
