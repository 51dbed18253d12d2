//! Per-key calls (leases, budgets, resets): where a key lives, and one unbatched call to its
//! owner.

use std::time::Instant;

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::ClientChannel;

use crate::error::RateLimitError;
use crate::spec::Consistency;

use super::ClusterRouter;
use super::owners::owner_of;

/// Where a per-key call (lease, budget, reset) goes.
pub(super) enum KeyRoute {
    Here,
    Peer(String),
}

/// An owner's answer to a forwarded lease call.
fn peer_error(peer: &str, status: &tonic::Status) -> RateLimitError {
    match status.code() {
        tonic::Code::NotFound => RateLimitError::LeaseNotFound(status.message().to_owned()),
        tonic::Code::ResourceExhausted => {
            RateLimitError::ResourceExhausted(status.message().to_owned())
        }
        code => RateLimitError::Unavailable(format!(
            "owner {peer} answered {code:?}: {}",
            status.message()
        )),
    }
}

impl ClusterRouter {
    /// Where a per-key call (lease, budget) is decided: here, or at the key's owner.
    pub(super) fn key_route(
        &self,
        namespace: &str,
        key: &str,
        consistency: Option<Consistency>,
    ) -> Result<KeyRoute, RateLimitError> {
        let target = (namespace, key);
        match consistency.unwrap_or(self.config.default_consistency) {
            Consistency::Local => Ok(KeyRoute::Here),
            Consistency::Strict => Err(RateLimitError::invalid(
                "consistency",
                "leases and budgets are LOCAL or OWNER",
            )),
            Consistency::Owner => {
                let mut key = target.0.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(target.1.as_bytes());
                let suspects = self.owners.suspects.snapshot();
                match owner_of(&self.owners.ring(), &suspects, &key) {
                    None => Err(RateLimitError::Unavailable(
                        "no live rate-limiter member is known".to_owned(),
                    )),
                    Some(owner) if owner.instance_id == self.config.instance_id => {
                        Ok(KeyRoute::Here)
                    }
                    Some(owner) => Ok(KeyRoute::Peer(owner.instance_id.clone())),
                }
            }
        }
    }

    pub(super) fn now_nanos() -> u64 {
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
    }

    /// The wire consistency that makes the owner decide a forwarded lease call itself.
    pub(super) const HERE: i32 = pb::Consistency::Local as i32;

    /// One unbatched call to a peer within the budget (capped by the caller's deadline).
    pub(super) async fn call_peer<Req, Resp, F, Fut>(
        &self,
        peer: &str,
        deadline: Option<Instant>,
        call: F,
        request: Req,
    ) -> Result<Resp, RateLimitError>
    where
        F: FnOnce(
            pb::rate_limiter_client::RateLimiterClient<ClientChannel>,
            tonic::Request<Req>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let budget =
            agentmesh_runtime::deadline::budget(deadline, self.config.budget, Instant::now());
        let mut request = tonic::Request::new(request);
        request.set_timeout(budget);
        match tokio::time::timeout(budget, call(self.owners.client(peer)?, request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(peer_error(peer, &status)),
            Err(_) => Err(RateLimitError::Unavailable(format!(
                "owner {peer} did not answer within {budget:?}"
            ))),
        }
    }
}
