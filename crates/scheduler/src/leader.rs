//! One scheduler leads; the others forward to it.
//!
//! Several `agentmesh serve scheduler` instances elect a leader through etcd's election API
//! (`{prefix}/scheduler/leader`, a campaign on a lease of [`LEADER_TTL`] kept alive every
//! second; the value is the instance id). Only the leader holds the pool and the tasks. A
//! follower forwards every scheduler call — unary and streaming, heartbeat streams included —
//! to the leader over the runtime's client stack ([`LeaderRouted`]), so agents and callers may
//! dial any instance and need no configuration; while no leader is known a call answers
//! `UNAVAILABLE` (clients retry). The instance that wins an election first loads the open tasks
//! from Redis ([`crate::tasks::Tasks::recover`]); agents whose forwarded streams broke with the
//! old leader reconnect by themselves and register again with their epoch.
//!
//! A leader that loses its lease (etcd unreachable for longer than the TTL, or the lease
//! revoked) exits at once (exit code 69) rather than risk a second leader acting on the same
//! tasks; its supervisor restarts it as a follower. Without etcd the only instance leads.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agentmesh_runtime::peers::PeerSet;
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::ServiceExt;

/// Lease of the leader key: a dead leader is replaced within this (plus the campaign).
pub const LEADER_TTL: Duration = Duration::from_secs(5);

/// Who leads, as this instance sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This instance.
    Leader,
    /// Another instance (its id), or none known yet.
    Follower(Option<String>),
}

/// This instance's view of the election, and the way to the leader.
pub struct Leadership {
    role: watch::Receiver<Role>,
    peers: Option<PeerSet>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("role", &*self.role.borrow())
            .finish_non_exhaustive()
    }
}

impl Leadership {
    /// The only instance, leading (no etcd).
    #[must_use]
    pub fn alone() -> Self {
        Self {
            role: watch::channel(Role::Leader).1,
            peers: None,
        }
    }

    /// Leadership decided by `role` (from [`campaign`]); `peers` reach the leader.
    #[must_use]
    pub fn elected(role: watch::Receiver<Role>, peers: PeerSet) -> Self {
        Self {
            role,
            peers: Some(peers),
        }
    }

    /// The role now.
    #[must_use]
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }
}

/// Campaigns for leadership under `key` as `instance_id` on `client`; returns the role as it
/// changes. `on_elected` runs once this instance wins, before it is reported leader (it loads
/// the tasks). A lost lease ends the process (see the module docs).
///
/// # Errors
/// When the lease cannot be granted (etcd unreachable at start).
pub async fn campaign<F>(
    client: etcd_client::Client,
    key: String,
    instance_id: String,
    on_elected: F,
) -> Result<watch::Receiver<Role>, etcd_client::Error>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let ttl = i64::try_from(LEADER_TTL.as_secs()).unwrap_or(5);
    let lease = client.clone().lease_grant(ttl, None).await?.id();
    let (role_tx, role_rx) = watch::channel(Role::Follower(None));
    let role_tx = Arc::new(role_tx);
    // Keep the lease alive; losing it while leading ends the process.
    tokio::spawn({
        let (client, role_tx) = (client.clone(), role_tx.clone());
        async move {
            keep_alive(client, lease).await;
            if *role_tx.borrow() == Role::Leader {
                tracing::error!(
                    "scheduler leadership lost (lease expired): exiting so that no two leaders act on the same tasks"
                );
                std::process::exit(69);
            }
            tracing::warn!("scheduler election lease lost: this follower no longer campaigns");
        }
    });
    // Follow who leads.
    tokio::spawn({
        let (client, role_tx, key, me) = (
            client.clone(),
            role_tx.clone(),
            key.clone(),
            instance_id.clone(),
        );
        async move { observe(client, key, me, role_tx).await }
    });
    // Campaign: returns once this instance is elected.
    tokio::spawn({
        async move {
            let mut election = client.election_client();
            loop {
                match election
                    .campaign(key.as_bytes(), instance_id.as_bytes(), lease)
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "scheduler campaign failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            on_elected.await;
            tracing::info!(instance = %instance_id, "elected scheduler leader");
            role_tx.send_replace(Role::Leader);
        }
    });
    Ok(role_rx)
}

async fn keep_alive(client: etcd_client::Client, lease: i64) {
    let Ok((mut keeper, mut responses)) = client.clone().lease_keep_alive(lease).await else {
        return;
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut last_ok = tokio::time::Instant::now();
    loop {
        ticks.tick().await;
        if keeper.keep_alive().await.is_ok()
            && let Ok(Some(response)) =
                tokio::time::timeout(Duration::from_secs(1), responses.message())
                    .await
                    .unwrap_or(Ok(None))
        {
            if response.ttl() <= 0 {
                return;
            }
            last_ok = tokio::time::Instant::now();
        }
        if last_ok.elapsed() >= LEADER_TTL {
            return;
        }
    }
}

async fn observe(
    client: etcd_client::Client,
    key: String,
    me: String,
    role_tx: Arc<watch::Sender<Role>>,
) {
    loop {
        let mut election = client.election_client();
        match election.observe(key.as_bytes()).await {
            Ok(mut stream) => {
                while let Some(Ok(response)) = stream.next().await {
                    // Elected but still loading the tasks: no one to forward to yet.
                    let leader = response
                        .kv()
                        .and_then(|kv| kv.value_str().ok())
                        .filter(|id| *id != me)
                        .map(str::to_owned);
                    role_tx.send_if_modified(|role| match role {
                        Role::Leader => false,
                        Role::Follower(known) if *known == leader => false,
                        Role::Follower(known) => {
                            known.clone_from(&leader);
                            true
                        }
                    });
                }
            }
            Err(e) => tracing::debug!(error = %e, "observing the scheduler election failed"),
        }
        if *role_tx.borrow() == Role::Leader {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The scheduler's gRPC service, served here when this instance leads and forwarded to the
/// leader otherwise.
#[derive(Clone)]
pub struct LeaderRouted<S> {
    inner: S,
    leadership: Arc<Leadership>,
}

impl<S> LeaderRouted<S> {
    /// Routes `inner`'s calls by `leadership`.
    pub fn new(inner: S, leadership: Arc<Leadership>) -> Self {
        Self { inner, leadership }
    }
}

impl<S: NamedService> NamedService for LeaderRouted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<Request<Body>> for LeaderRouted<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let leader = match self.leadership.role() {
            Role::Leader => {
                let inner = self.inner.clone();
                return Box::pin(inner.oneshot(request));
            }
            Role::Follower(leader) => leader,
        };
        let unavailable = |why: String| Ok(tonic::Status::unavailable(why).into_http());
        let Some(leader) = leader else {
            return Box::pin(async move {
                unavailable("no scheduler leader is elected yet; retry".to_owned())
            });
        };
        let channel = self
            .leadership
            .peers
            .as_ref()
            .map(|p| p.channel(&leader).map(|(_, c)| c));
        Box::pin(async move {
            match channel {
                Some(Ok(channel)) => match channel.oneshot(request).await {
                    Ok(response) => Ok(response.map(Body::new)),
                    Err(e) => {
                        unavailable(format!("the scheduler leader {leader} is unreachable: {e}"))
                    }
                },
                Some(Err(e)) => unavailable(format!(
                    "the scheduler leader {leader} cannot be reached: {e}"
                )),
                None => unavailable("no way to the scheduler leader".to_owned()),
            }
        })
    }
}
