//! The other event bus instances, asked for their part of a cluster-wide listing
//! (`ListSubscriptions`, `GetStats`).
//!
//! The instance called reads the live event bus members from membership (etcd; in standalone
//! mode there are none besides itself), asks each other one at once with `instance_only` set,
//! and waits at most [`PEER_BUDGET`] (less when the caller's deadline is nearer). A member that
//! does not answer in time is reported unreachable, never waited for longer; a peer whose
//! circuit breaker is open fails at once. Channels are kept per address and dropped when their
//! member leaves.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::Membership;
use agentmesh_proto::eventbus::v1::event_bus_client::EventBusClient;
use agentmesh_runtime::{ClientChannel, ClientConfig, Metrics};
use parking_lot::Mutex;
use tonic::Status;

/// Longest wait for the other instances' answers.
pub const PEER_BUDGET: Duration = Duration::from_secs(1);
/// Largest answer accepted from a peer (a listing of many subscriptions).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// A client of one peer.
pub type PeerClient = EventBusClient<ClientChannel>;

/// What the other instances answered.
#[derive(Debug)]
pub struct Gathered<T> {
    /// (instance id, answer) of each peer that answered, in instance id order.
    pub answers: Vec<(String, T)>,
    /// Peers that did not answer in time or failed, in instance id order; `membership: …`
    /// when the member list itself could not be read.
    pub unreachable: Vec<String>,
}

/// The other live instances of the event bus.
pub struct Peers {
    instance_id: String,
    service: String,
    membership: Arc<dyn Membership>,
    metrics: Metrics,
    channels: Mutex<HashMap<String, ClientChannel>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("instance_id", &self.instance_id)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// The peers of `instance_id`: the other members of `service` in `membership`.
    pub fn new(
        instance_id: &str,
        service: &str,
        membership: Arc<dyn Membership>,
        metrics: Metrics,
    ) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            service: service.to_owned(),
            membership,
            metrics,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `call` on every other live instance at once and collects what comes back within
    /// `budget`.
    pub async fn gather<T, F, Fut>(&self, budget: Duration, call: F) -> Gathered<T>
    where
        F: Fn(PeerClient) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let members =
            match tokio::time::timeout_at(deadline, self.membership.list(&self.service)).await {
                Ok(Ok(snapshot)) => snapshot.members,
                Ok(Err(e)) => return unreadable(&e.to_string()),
                Err(_) => return unreadable(&format!("no member list within {budget:?}")),
            };
        self.channels
            .lock()
            .retain(|addr, _| members.values().any(|m| &m.grpc_addr == addr));
        let calls = members
            .values()
            .filter(|m| m.instance_id != self.instance_id)
            .map(|member| {
                let answer = self.client(&member.grpc_addr).map(&call);
                let id = member.instance_id.clone();
                async move {
                    let result = match answer {
                        Err(e) => Err(e),
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
                    tracing::warn!(peer = %id, %reason, "event bus peer did not answer");
                    gathered.unreachable.push(id);
                }
            }
        }
        gathered
    }

    /// A client of the peer at `addr`, on a channel kept for it.
    fn client(&self, addr: &str) -> Result<PeerClient, String> {
        let mut channels = self.channels.lock();
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let config = ClientConfig {
                    timeout: PEER_BUDGET,
                    connect_timeout: PEER_BUDGET,
                    ..ClientConfig::default()
                };
                let channel = agentmesh_runtime::connect_lazy(addr, &config, &self.metrics)
                    .map_err(|e| e.to_string())?;
                channels.insert(addr.to_owned(), channel.clone());
                channel
            }
        };
        Ok(EventBusClient::new(channel).max_decoding_message_size(MAX_ANSWER))
    }
}

fn unreadable<T>(reason: &str) -> Gathered<T> {
    tracing::warn!(%reason, "cannot read the event bus members");
    Gathered {
        answers: Vec::new(),
        unreachable: vec![format!("membership: {reason}")],
    }
}
