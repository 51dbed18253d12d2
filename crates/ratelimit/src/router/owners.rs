//! The live rate-limiter members and the rendezvous ring over them (the runtime's
//! [`PeerSet`]; owners skip suspected peers), and a batcher per peer.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_membership::{HashRing, Member, MemberWatch};
use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::peers::PeerSet;
use agentmesh_runtime::{ClientChannel, ClientConfig, Metrics};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::error::RateLimitError;
use crate::limiter::{CheckItem, CheckOutcome};
use crate::suspects::Suspects;

use super::batcher::{Job, PeerBatcher};

/// The owner of `key`: the ring's, or, when that peer is suspected, the next one that is not
/// (see [`Suspects`]; this instance is never suspected).
pub(super) fn owner_of<'a>(
    ring: &'a HashRing,
    suspects: &BTreeSet<String>,
    key: &[u8],
) -> Option<&'a Member> {
    if suspects.is_empty() {
        ring.owner(key)
    } else {
        ring.owner_excluding(key, |id| suspects.contains(id))
    }
}

/// The live rate-limiter members and the ring over them (the runtime's [`PeerSet`]), and a
/// batcher per peer.
pub(super) struct Owners {
    self_id: String,
    peers: PeerSet,
    /// (epoch, members) of the ring last seen, to prune batchers and suspects once per change.
    seen: Mutex<(u64, usize)>,
    batchers: Mutex<HashMap<String, PeerBatcher>>,
    pub(super) suspects: Arc<Suspects>,
}

impl Owners {
    pub(super) fn new(
        watch: MemberWatch,
        self_id: String,
        metrics: Metrics,
        budget: Duration,
        suspects: Arc<Suspects>,
        bearer: Option<Arc<str>>,
    ) -> Self {
        let config = ClientConfig {
            timeout: Duration::from_secs(1),
            connect_timeout: budget.max(Duration::from_millis(100)),
            bearer,
            ..ClientConfig::default()
        };
        Self {
            peers: PeerSet::from_watch(watch, &self_id, config, metrics),
            self_id,
            seen: Mutex::new((0, 0)),
            batchers: Mutex::default(),
            suspects,
        }
    }

    /// The ring for the current membership (rebuilt when the epoch moves).
    pub(super) fn ring(&self) -> Arc<HashRing> {
        let ring = self.peers.ring();
        let mut seen = self.seen.lock();
        if *seen != (ring.epoch(), ring.len()) {
            *seen = (ring.epoch(), ring.len());
            let snapshot = self.peers.snapshot();
            self.batchers
                .lock()
                .retain(|id, _| snapshot.members.contains_key(id));
            self.suspects.retain(|id| snapshot.members.contains_key(id));
        }
        ring
    }

    /// The batcher of a live peer, started on first use (on the peer set's channel).
    fn batcher(&self, peer: &str) -> Result<PeerBatcher, RateLimitError> {
        let (member, channel) = self.channel(peer)?;
        let mut batchers = self.batchers.lock();
        match batchers.get(peer) {
            Some(b) if b.addr == member.grpc_addr => Ok(b.clone()),
            _ => {
                let b = PeerBatcher::start(&member, channel, &self.suspects);
                batchers.insert(peer.to_owned(), b.clone());
                Ok(b)
            }
        }
    }

    fn channel(&self, peer: &str) -> Result<(Member, ClientChannel), RateLimitError> {
        self.peers
            .channel(peer)
            .map_err(|e| RateLimitError::Unavailable(e.to_string()))
    }

    /// A client to a live peer, for calls that are not batched.
    pub(super) fn client(
        &self,
        peer: &str,
    ) -> Result<pb::rate_limiter_client::RateLimiterClient<ClientChannel>, RateLimitError> {
        Ok(pb::rate_limiter_client::RateLimiterClient::new(
            self.channel(peer)?.1,
        ))
    }

    pub(super) async fn forward(
        &self,
        peer: &str,
        items: Vec<CheckItem>,
        all_or_nothing: bool,
        deadline: Instant,
    ) -> Result<Vec<CheckOutcome>, RateLimitError> {
        let batcher = self.batcher(peer)?;
        debug_assert_ne!(peer, self.self_id);
        let (reply_tx, reply_rx) = oneshot::channel();
        batcher
            .queue_tx
            .try_send(Job {
                items,
                all_or_nothing,
                deadline,
                reply_tx,
            })
            .map_err(|_| RateLimitError::Unavailable(format!("forward queue to {peer} is full")))?;
        match tokio::time::timeout_at(deadline.into(), reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RateLimitError::Unavailable(format!(
                "forward to {peer} dropped"
            ))),
            Err(_) => Err(RateLimitError::Unavailable(format!(
                "forward to {peer} timed out"
            ))),
        }
    }
}
