//! Concurrency leases: acquired, renewed and released where the key lives.

use std::time::{Duration, Instant};

use agentmesh_proto::ratelimit::v1 as pb;

use crate::concurrency::{AcquireOutcome, LeaseError};
use crate::error::RateLimitError;
use crate::ids::OpaqueId;

use super::keys::KeyRoute;
use super::{ClusterRouter, LeaseTarget, STRICT_KEY_SEED};

fn lease_error(e: LeaseError) -> RateLimitError {
    match e {
        LeaseError::Unknown(_) => RateLimitError::LeaseNotFound(e.to_string()),
        LeaseError::Full(_) => RateLimitError::ResourceExhausted(e.to_string()),
    }
}

impl ClusterRouter {
    fn lease_key(target: &LeaseTarget) -> u64 {
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        xxh3_64_with_seed(
            target.key.as_bytes(),
            xxh3_64_with_seed(target.namespace.as_bytes(), STRICT_KEY_SEED),
        )
    }

    /// Takes a concurrency slot of the target's key; returns the outcome and the deciding
    /// instance.
    ///
    /// # Errors
    /// `Unavailable` when the owner does not answer within the budget, `ResourceExhausted`
    /// when the deciding instance holds its maximum of leases.
    pub async fn acquire(
        &self,
        target: &LeaseTarget,
        limit: u64,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<(AcquireOutcome, String), RateLimitError> {
        match self.key_route(&target.namespace, &target.key, target.consistency)? {
            KeyRoute::Here => {
                let outcome = self
                    .leases
                    .acquire(Self::lease_key(target), limit, ttl, Self::now_nanos())
                    .map_err(lease_error)?;
                Ok((outcome, self.config.instance_id.clone()))
            }
            KeyRoute::Peer(peer) => {
                let request = pb::AcquireRequest {
                    namespace: target.namespace.clone(),
                    key: target.key.clone(),
                    limit,
                    ttl: Some(crate::wire::duration_to_proto(ttl)),
                    consistency: Self::HERE,
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.acquire(req).await },
                        request,
                    )
                    .await?;
                let outcome = AcquireOutcome {
                    lease_id: if r.acquired {
                        crate::ids::decode_id(&r.lease_id)
                    } else {
                        None
                    },
                    in_use: r.in_use,
                    retry_after: r.retry_after.map(|d| {
                        Duration::new(
                            u64::try_from(d.seconds).unwrap_or(0),
                            u32::try_from(d.nanos).unwrap_or(0),
                        )
                    }),
                };
                Ok((outcome, r.decided_by))
            }
        }
    }

    /// Extends a lease.
    ///
    /// # Errors
    /// `LeaseNotFound` when it expired or was released; `Unavailable` when the owner is down.
    pub async fn renew(
        &self,
        target: &LeaseTarget,
        lease_id: OpaqueId,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimitError> {
        match self.key_route(&target.namespace, &target.key, target.consistency)? {
            KeyRoute::Here => self
                .leases
                .renew(Self::lease_key(target), lease_id, ttl, Self::now_nanos())
                .map_err(lease_error),
            KeyRoute::Peer(peer) => {
                let request = pb::RenewLeaseRequest {
                    namespace: target.namespace.clone(),
                    key: target.key.clone(),
                    lease_id: crate::ids::encode_id(lease_id),
                    ttl: Some(crate::wire::duration_to_proto(ttl)),
                    consistency: Self::HERE,
                };
                self.call_peer(
                    &peer,
                    deadline,
                    |mut c, req| async move { c.renew_lease(req).await },
                    request,
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Returns a slot; gives the number still held.
    ///
    /// # Errors
    /// `LeaseNotFound` when it expired or was released; `Unavailable` when the owner is down.
    pub async fn release(
        &self,
        target: &LeaseTarget,
        lease_id: OpaqueId,
        deadline: Option<Instant>,
    ) -> Result<u64, RateLimitError> {
        match self.key_route(&target.namespace, &target.key, target.consistency)? {
            KeyRoute::Here => self
                .leases
                .release(Self::lease_key(target), lease_id, Self::now_nanos())
                .map_err(lease_error),
            KeyRoute::Peer(peer) => {
                let request = pb::ReleaseRequest {
                    namespace: target.namespace.clone(),
                    key: target.key.clone(),
                    lease_id: crate::ids::encode_id(lease_id),
                    consistency: Self::HERE,
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.release(req).await },
                        request,
                    )
                    .await?;
                Ok(r.in_use)
            }
        }
    }
}
