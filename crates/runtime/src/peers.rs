//! The other live instances of a service, for services that call each other: one client
//! channel per member through the runtime's client stack (traces, metrics, circuit breaker),
//! the rendezvous ring over the members (which instance owns a key), and "ask every other
//! member at once, wait at most a budget, name the ones that did not answer".
//!
//! A [`PeerSet`] follows a membership watch: when a member leaves, its channel is dropped;
//! when it comes back on another address, a new channel is made. Channels connect lazily, so
//! a member that is listed but down costs nothing until it is called, and then fails within
//! the connect timeout (or at once while its breaker is open).
//!
//! The event bus gathers `ListSubscriptions` and `GetStats` answers with it; the rate limiter
//! takes its ring and peer channels from it (and adds its batching and suspicion on top).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::{HashRing, Member, MemberSnapshot, MemberWatch, Membership};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{ClientChannel, ClientConfig, Metrics};

/// What the other instances answered to [`PeerSet::gather`].
#[derive(Debug)]
pub struct Gathered<T> {
    /// (instance id, answer) of each peer that answered, in instance id order.
    pub answers: Vec<(String, T)>,
    /// Peers that did not answer in time or failed, in instance id order.
    pub unreachable: Vec<String>,
}

/// Why a peer could not be called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The instance is not a live member (it left, or never joined).
    #[error("member {0} left")]
    Gone(String),
    /// Its address cannot be dialled.
    #[error("member {instance} at {addr}: {reason}")]
    BadAddress {
        /// The instance.
        instance: String,
        /// Its advertised address.
        addr: String,
        /// Why the address is unusable.
        reason: String,
    },
}

/// The members of one service as seen by one of them.
pub struct PeerSet {
    self_id: String,
    snapshots: watch::Receiver<Arc<MemberSnapshot>>,
    _watch: MemberWatch,
    ring: Mutex<Arc<HashRing>>,
    /// instance id → (address, channel).
    channels: Mutex<HashMap<String, (String, ClientChannel)>>,
    config: ClientConfig,
    metrics: Metrics,
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSet")
            .field("self_id", &self.self_id)
            .field("members", &self.snapshots.borrow().members.len())
            .finish_non_exhaustive()
    }
}

impl PeerSet {
    /// The peers of `self_id` among the members of `service`, following `membership`;
    /// channels are made with `config` (its timeouts bound every call to a peer).
    ///
    /// # Errors
    /// When membership cannot be watched (etcd down at start).
    pub async fn watch(
        membership: &dyn Membership,
        service: &str,
        self_id: &str,
        config: ClientConfig,
        metrics: Metrics,
    ) -> Result<Self, agentmesh_membership::MembershipError> {
        Ok(Self::from_watch(
            membership.watch(service).await?,
            self_id,
            config,
            metrics,
        ))
    }

    /// As [`PeerSet::watch`], over a watch already open.
    #[must_use]
    pub fn from_watch(
        watch: MemberWatch,
        self_id: &str,
        config: ClientConfig,
        metrics: Metrics,
    ) -> Self {
        let snapshots = watch.snapshots();
        let ring = Arc::new(HashRing::new(&snapshots.borrow()));
        Self {
            self_id: self_id.to_owned(),
            snapshots,
            _watch: watch,
            ring: Mutex::new(ring),
            channels: Mutex::new(HashMap::new()),
            config,
            metrics,
        }
    }

    /// This instance's id.
    #[must_use]
    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    /// The current members (this instance included while it is registered).
    #[must_use]
    pub fn snapshot(&self) -> Arc<MemberSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// The ring over the current members, rebuilt when membership changed; channels of
    /// members that left are dropped at the same time.
    pub fn ring(&self) -> Arc<HashRing> {
        let snapshot = self.snapshot();
        let mut ring = self.ring.lock();
        if ring.epoch() != snapshot.epoch || ring.len() != snapshot.members.len() {
            *ring = Arc::new(HashRing::new(&snapshot));
            self.channels
                .lock()
                .retain(|id, _| snapshot.members.contains_key(id));
        }
        ring.clone()
    }

    /// The owner of `key` on the ring; `None` without members.
    #[must_use]
    pub fn owner(&self, key: &[u8]) -> Option<Member> {
        self.ring().owner(key).cloned()
    }

    /// The channel to live member `instance` (made on first use, remade when its address
    /// changed) and the member as listed.
    ///
    /// # Errors
    /// [`PeerError::Gone`] when it is not a member; [`PeerError::BadAddress`] when its
    /// address cannot be dialled.
    pub fn channel(&self, instance: &str) -> Result<(Member, ClientChannel), PeerError> {
        let snapshot = self.snapshot();
        let member = snapshot
            .members
            .get(instance)
            .ok_or_else(|| PeerError::Gone(instance.to_owned()))?;
        Ok((member.clone(), self.channel_to(member)?))
    }

    fn channel_to(&self, member: &Member) -> Result<ClientChannel, PeerError> {
        let mut channels = self.channels.lock();
        if let Some((addr, channel)) = channels.get(&member.instance_id)
            && *addr == member.grpc_addr
        {
            return Ok(channel.clone());
        }
        let channel =
            crate::connect_lazy(&member.grpc_addr, &self.config, &self.metrics).map_err(|e| {
                PeerError::BadAddress {
                    instance: member.instance_id.clone(),
                    addr: member.grpc_addr.clone(),
                    reason: e.to_string(),
                }
            })?;
        channels.insert(
            member.instance_id.clone(),
            (member.grpc_addr.clone(), channel.clone()),
        );
        Ok(channel)
    }

    /// Calls `call` on every other live member at once and collects what comes back within
    /// `budget`: a member that fails or does not answer in time is named in `unreachable`
    /// (and logged), never waited for longer.
    pub async fn gather<T, F, Fut>(&self, budget: Duration, call: F) -> Gathered<T>
    where
        F: Fn(ClientChannel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let snapshot = self.snapshot();
        self.channels
            .lock()
            .retain(|id, _| snapshot.members.contains_key(id));
        let calls = snapshot
            .members
            .values()
            .filter(|m| m.instance_id != self.self_id)
            .map(|member| {
                let answer = self.channel_to(member).map(&call);
                let id = member.instance_id.clone();
                async move {
                    let result = match answer {
                        Err(e) => Err(e.to_string()),
                        Ok(answer) => match tokio::time::timeout_at(deadline, answer).await {
                            Ok(Ok(answer)) => Ok(answer),
                            Ok(Err(status)) => Err(status.message().to_owned()),
                            Err(_) => Err(format!("no answer within {budget:?}")),
                        },
                    };
                    (id, result)
                }
            });
        let mut gathered = Gathered {
            answers: Vec::new(),
            unreachable: Vec::new(),
        };
        for (id, result) in futures::future::join_all(calls).await {
            match result {
                Ok(answer) => gathered.answers.push((id, answer)),
                Err(reason) => {
                    tracing::warn!(peer = %id, %reason, "peer did not answer");
                    gathered.unreachable.push(id);
                }
            }
        }
        gathered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmesh_membership::InMemoryMembership;

    fn member(id: &str, addr: &str) -> Member {
        Member {
            service: "svc".into(),
            instance_id: id.into(),
            grpc_addr: addr.into(),
            admin_addr: "127.0.0.1:9000".into(),
            version: "1.0.0".into(),
            zone: String::new(),
            started_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn test_gather_names_members_that_do_not_answer_and_skips_itself() {
        let membership = InMemoryMembership::default();
        let _a = membership
            .register(member("a", "127.0.0.1:1"))
            .await
            .unwrap();
        let _b = membership
            .register(member("b", "127.0.0.1:2"))
            .await
            .unwrap();
        let _c = membership
            .register(member("c", "127.0.0.1:3"))
            .await
            .unwrap();
        let peers = PeerSet::watch(
            &membership,
            "svc",
            "a",
            ClientConfig::default(),
            Metrics::new(),
        )
        .await
        .unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let gathered = peers
            .gather(Duration::from_millis(200), |_channel| {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    if n == 0 {
                        Ok(7)
                    } else {
                        std::future::pending().await
                    }
                }
            })
            .await;
        assert_eq!(calls.into_inner(), 2, "every member but itself");
        assert_eq!(gathered.answers.len(), 1);
        assert_eq!(gathered.unreachable.len(), 1);
    }

    #[tokio::test]
    async fn test_ring_and_channels_follow_membership() {
        let membership = InMemoryMembership::default();
        let a = membership
            .register(member("a", "127.0.0.1:1"))
            .await
            .unwrap();
        let _b = membership
            .register(member("b", "127.0.0.1:2"))
            .await
            .unwrap();
        let peers = PeerSet::watch(
            &membership,
            "svc",
            "b",
            ClientConfig::default(),
            Metrics::new(),
        )
        .await
        .unwrap();
        assert_eq!(peers.ring().len(), 2);
        let (listed, _) = peers.channel("a").unwrap();
        assert_eq!(listed.grpc_addr, "127.0.0.1:1");
        assert!(peers.owner(b"some key").is_some());
        a.deregister().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while peers.snapshot().members.len() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(peers.ring().len(), 1);
        assert_eq!(peers.channel("a").unwrap_err(), PeerError::Gone("a".into()));
    }
}
