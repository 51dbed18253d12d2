//! The other event bus instances, asked for their part of a cluster-wide listing
//! (`ListSubscriptions`, `GetStats`), through the runtime's [`PeerSet`].
//!
//! The instance called asks each other live member (from its membership watch; in standalone
//! mode there are none besides itself) at once with `instance_only` set, and waits at most
//! [`PEER_BUDGET`] (less when the caller's deadline is nearer). A member that does not answer
//! in time is reported unreachable, never waited for longer; a peer whose circuit breaker is
//! open fails at once. Channels are kept per member and dropped when it leaves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::Membership;
use agentmesh_proto::eventbus::v1::event_bus_client::EventBusClient;
pub use agentmesh_runtime::peers::Gathered;
use agentmesh_runtime::peers::PeerSet;
use agentmesh_runtime::{ClientChannel, ClientConfig, Metrics};
use tonic::Status;

/// Longest wait for the other instances' answers.
pub const PEER_BUDGET: Duration = Duration::from_secs(1);
/// Largest answer accepted from a peer (a listing of many subscriptions).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// A client of one peer.
pub type PeerClient = EventBusClient<ClientChannel>;

/// The other live instances of the event bus.
#[derive(Debug)]
pub struct Peers {
    set: PeerSet,
}

impl Peers {
    /// The peers of `instance_id`: the other members of `service` in `membership`, followed
    /// by a watch.
    ///
    /// # Errors
    /// When membership cannot be watched.
    pub async fn watch(
        instance_id: &str,
        service: &str,
        membership: Arc<dyn Membership>,
        metrics: Metrics,
        bearer: Option<Arc<str>>,
    ) -> Result<Self, agentmesh_membership::MembershipError> {
        let config = ClientConfig {
            timeout: PEER_BUDGET,
            connect_timeout: PEER_BUDGET,
            bearer,
            ..ClientConfig::default()
        };
        let set =
            PeerSet::watch(membership.as_ref(), service, instance_id, config, metrics).await?;
        Ok(Self { set })
    }

    /// Calls `call` on every other live instance at once and collects what comes back within
    /// `budget`.
    pub async fn gather<T, F, Fut>(&self, budget: Duration, call: F) -> Gathered<T>
    where
        F: Fn(PeerClient) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.set
            .gather(budget, |channel| {
                call(EventBusClient::new(channel).max_decoding_message_size(MAX_ANSWER))
            })
            .await
    }
}
