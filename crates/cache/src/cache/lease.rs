//! Leases against stampedes, across the fleet: of all callers that miss a key at once, one is
//! granted a lease (with a fencing token) and computes the value; the others wait and get the
//! value the moment it is filled (the fill's change reaches every instance and rings the
//! waiters' bell). A lease that expires unfilled promotes one waiter (whoever asks L2 first
//! after it ends); one abandoned can leave a remembered miss behind (negative caching).
//!
//! For hot keys: a value inside its grace window is served stale while one caller refreshes it
//! (stale-while-revalidate), and a value close to expiry is refreshed early by one caller with
//! a probability that rises as expiry nears, scaled by how long the value took to compute
//! (XFetch: Vattani, Chierichetti and Lowenstein, "Optimal Probabilistic Cache Stampede
//! Prevention", VLDB 2015).

use std::time::Duration;

use tokio::time::Instant;

use super::{
    Cache, Found, Hit, Looked, ReadOptions, SetOptions, check_duration, check_key, done, l1, ms,
    unavailable,
};
use crate::config::{MAX_LEASE_TTL, MAX_LEASE_WAIT, MAX_TTL};
use crate::entry::Body;
use crate::error::{CacheError, FieldViolation};
use crate::l2::{LeaseState, Write, Written};

/// A lease granted: compute the value, then fill it (or abandon the lease) with the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token (only a fill naming it is accepted while the lease is held).
    pub token: u64,
    /// How long the lease is held, ms.
    pub ttl_ms: u64,
}

/// What `get_or_lease` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// The value; with `refresh`, this caller should also recompute it and fill the lease
    /// (the value is stale, or due for an early refresh).
    Hit {
        /// The value.
        hit: Hit,
        /// A lease to refresh it with.
        refresh: Option<Lease>,
    },
    /// A remembered miss: this many ms left.
    Negative(u64),
    /// Nobody has the value: compute it and fill the lease.
    Lease(Lease),
    /// Another caller holds the lease and did not fill it within `wait`.
    Pending {
        /// How long the holder's lease still runs, ms.
        lease_left_ms: u64,
    },
}

impl Cache {
    /// A hit, or a lease to compute the value, or — while another caller holds the lease — the
    /// value it fills, waiting up to `wait` for it.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable` when L2 cannot be reached.
    pub async fn get_or_lease(
        &self,
        namespace: &str,
        key: &str,
        lease_ttl: Duration,
        wait: Duration,
    ) -> Result<LeaseAnswer, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, "", &mut v);
        check_duration(Some(lease_ttl), "lease_ttl", MAX_LEASE_TTL, &mut v);
        if wait > MAX_LEASE_WAIT {
            v.push(FieldViolation::new(
                "wait",
                format!("must be at most {MAX_LEASE_WAIT:?}"),
            ));
        }
        done(v)?;
        let id = l1::id(namespace, key);
        let bell = self.bell(&id);
        let answer = self
            .lease_loop(namespace, key, &bell, lease_ttl, wait)
            .await;
        self.unbell(&id, bell);
        let outcome = match &answer {
            Ok(LeaseAnswer::Hit { refresh: None, .. }) => "hit",
            Ok(LeaseAnswer::Hit {
                refresh: Some(_), ..
            }) => "hit_refresh",
            Ok(LeaseAnswer::Negative(_)) => "negative",
            Ok(LeaseAnswer::Lease(_)) => "granted",
            Ok(LeaseAnswer::Pending { .. }) => "pending",
            Err(_) => "error",
        };
        self.metrics.lease(namespace, outcome);
        answer
    }

    async fn lease_loop(
        &self,
        namespace: &str,
        key: &str,
        bell: &tokio::sync::Notify,
        lease_ttl: Duration,
        wait: Duration,
    ) -> Result<LeaseAnswer, CacheError> {
        let deadline = Instant::now() + wait;
        let stale_ok = ReadOptions {
            allow_stale: true,
            ..ReadOptions::default()
        };
        let mut waited = false;
        loop {
            let rung = bell.notified();
            tokio::pin!(rung);
            rung.as_mut().enable();
            let now = self.now();
            let seen = match self.look(namespace, key, stale_ok).await? {
                Ok(l) => {
                    return self
                        .answer_hit(namespace, key, &l, lease_ttl, now, waited)
                        .await;
                }
                Err(seen) => seen,
            };
            match self
                .l2
                .lease(namespace, key, lease_ttl, seen, now)
                .await
                .map_err(|e| unavailable(&e))?
            {
                LeaseState::Granted(token) => {
                    return Ok(LeaseAnswer::Lease(Lease {
                        token,
                        ttl_ms: ms(lease_ttl),
                    }));
                }
                LeaseState::Filled => {}
                LeaseState::Held(left) => {
                    if Instant::now() >= deadline {
                        return Ok(LeaseAnswer::Pending {
                            lease_left_ms: left,
                        });
                    }
                    waited = true;
                    // Rung when the holder fills or abandons; otherwise try again when its
                    // lease runs out (then one waiter is granted the next).
                    let until = deadline.min(Instant::now() + Duration::from_millis(left + 2));
                    let _ = tokio::time::timeout_at(until, rung).await;
                }
            }
        }
    }

    async fn answer_hit(
        &self,
        namespace: &str,
        key: &str,
        l: &Looked,
        lease_ttl: Duration,
        now: u64,
        waited: bool,
    ) -> Result<LeaseAnswer, CacheError> {
        if waited {
            self.metrics.lease(namespace, "coalesced");
        }
        let found = self.found(namespace, l, now)?;
        let hit = match found {
            Found::Hit(hit) => hit,
            Found::Negative(left) => return Ok(LeaseAnswer::Negative(left)),
            Found::Miss => unreachable!("a looked-up entry is a hit or a negative"),
        };
        let due = l.stale
            || xfetch_due(
                l.entry.compute_ms,
                l.entry.expires_ms,
                now,
                self.config.xfetch_beta,
            );
        let refresh = if due {
            match self
                .l2
                .lease(namespace, key, lease_ttl, l.entry.seq, now)
                .await
            {
                Ok(LeaseState::Granted(token)) => Some(Lease {
                    token,
                    ttl_ms: ms(lease_ttl),
                }),
                // Someone else refreshes it (or L2 is down: serve what we have).
                _ => None,
            }
        } else {
            None
        };
        Ok(LeaseAnswer::Hit { hit, refresh })
    }

    /// Fills a lease with the value computed; the version written.
    ///
    /// # Errors
    /// `InvalidArgument`; `LeaseLost` when the lease is no longer held with `token`;
    /// `Unavailable`.
    pub async fn fill_lease(
        &self,
        namespace: &str,
        key: &str,
        token: u64,
        value: &[u8],
        options: &SetOptions,
    ) -> Result<u64, CacheError> {
        let mut v = Vec::new();
        self.check_set(namespace, key, value, options, "", &mut v);
        if options.if_version.is_some() {
            v.push(FieldViolation::new(
                "if_version",
                "a fill cannot be conditional",
            ));
        }
        done(v)?;
        let write = self.write(namespace, key, value, options);
        self.filled(namespace, key, token, write).await
    }

    async fn filled(
        &self,
        namespace: &str,
        key: &str,
        token: u64,
        write: Write<'_>,
    ) -> Result<u64, CacheError> {
        match self
            .l2
            .set(write, Some(token))
            .await
            .map_err(|e| unavailable(&e))?
        {
            Written::Stored(entry) => Ok(self.keep(namespace, key, entry)),
            Written::LeaseLost => Err(CacheError::LeaseLost { token }),
            Written::Conflict(_) => Err(CacheError::Unavailable(
                "L2 answered a fill as a conditional write".to_owned(),
            )),
        }
    }

    /// Gives a lease up without a value; with `negative_ttl`, remembers the miss that long so
    /// callers do not retry at once. Whether the lease was held with `token`.
    ///
    /// # Errors
    /// `InvalidArgument`; `Unavailable`.
    pub async fn abandon_lease(
        &self,
        namespace: &str,
        key: &str,
        token: u64,
        negative_ttl: Option<Duration>,
    ) -> Result<bool, CacheError> {
        let mut v = Vec::new();
        check_key(namespace, key, "", &mut v);
        check_duration(negative_ttl, "negative_ttl", MAX_TTL, &mut v);
        done(v)?;
        let now = self.now();
        let Some(ttl) = negative_ttl else {
            return self
                .l2
                .abandon(namespace, key, token, now)
                .await
                .map_err(|e| unavailable(&e));
        };
        let write = Write {
            namespace,
            key,
            body: Body::negative(now, now.saturating_add(ms(ttl))),
            tags: &[],
            if_version: None,
            keep: ttl,
            now_ms: now,
        };
        match self.filled(namespace, key, token, write).await {
            Ok(_) => Ok(true),
            Err(CacheError::LeaseLost { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Whether a value that took `compute_ms` to make and expires at `expires_ms` is due for an
/// early refresh at `now` (XFetch: `now - compute · beta · ln(rand) >= expiry`).
#[allow(
    clippy::cast_precision_loss,
    reason = "wall ms and compute ms are far below 2^52"
)]
fn xfetch_due(compute_ms: u32, expires_ms: u64, now: u64, beta: f64) -> bool {
    if compute_ms == 0 || beta <= 0.0 {
        return false;
    }
    let r: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
    now as f64 - f64::from(compute_ms) * beta * r.ln() >= expires_ms as f64
}

#[cfg(test)]
mod tests {
    use super::xfetch_due;

    #[test]
    fn test_xfetch_refreshes_more_often_as_expiry_nears_and_never_without_a_compute_time() {
        let share = |now: u64| {
            (0..10_000)
                .filter(|_| xfetch_due(100, 10_000, now, 1.0))
                .count()
        };
        assert_eq!(share(0), 0);
        let (far, near) = (share(9_700), share(9_950));
        assert!(far < near, "{far} {near}");
        assert!(near > 5_000, "{near}");
        assert_eq!((0..1000).filter(|_| xfetch_due(0, 10, 9, 1.0)).count(), 0);
    }
}
