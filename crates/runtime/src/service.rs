//! A service as the host sees it: a name, its settings (clap flags, read by the binary), and
//! how it builds itself from what the host shares. The `agentmesh` binary keeps one list of
//! them; `serve`, `dev`, exit codes, listeners and the test harness all follow from that list,
//! so a new service is its crate plus one line there.

use std::net::SocketAddr;
use std::sync::Arc;

use agentmesh_membership::Membership;
use futures::future::BoxFuture;

use crate::error::{ErrorCode, ServiceError};
use crate::metrics::Metrics;
use crate::server::ServiceSpec;

/// The etcd client the host's services share, and the cluster's key prefix.
#[derive(Clone)]
pub struct EtcdHandle {
    /// A connected client (cheap to clone).
    pub client: etcd_client::Client,
    /// Key prefix, e.g. `/agentmesh`.
    pub prefix: String,
}

/// What the host shares with every service it runs.
#[derive(Clone)]
pub struct HostDeps {
    /// The process's metrics.
    pub metrics: Metrics,
    /// Cluster membership (etcd or in-memory).
    pub membership: Arc<dyn Membership>,
    /// etcd, when the cluster has it (policies, elections); `None` standalone.
    pub etcd: Option<EtcdHandle>,
    /// Redis URL, when configured; `None` keeps state in memory.
    pub redis_url: Option<String>,
    /// The token this process presents to other services (`--auth-token-file`).
    pub client_token: Option<Arc<str>>,
}

/// Why a service could not be built; it decides the process's exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A setting is invalid (exit 64); the message names the flag and the fix.
    #[error("{0}")]
    Config(String),
    /// A dependency cannot be reached (exit 69).
    #[error("{0}")]
    Unavailable(String),
}

impl BuildError {
    /// `Unavailable` for an error whose code is `UNAVAILABLE`, else `Config`.
    pub fn from_service_error(error: &(impl ServiceError + ?Sized)) -> Self {
        match error.code() {
            ErrorCode::Unavailable => Self::Unavailable(error.to_string()),
            _ => Self::Config(error.to_string()),
        }
    }
}

/// One agentmesh service, as the binary registers it. Implemented by the service's settings
/// (a `clap::Args` struct whose listeners are `--<name>-listen` and `--<name>-admin-listen`).
pub trait Service: Send + Sync {
    /// Short name: `agentmesh serve <name>`, the membership key, logs.
    fn name(&self) -> &'static str;

    /// Default gRPC and admin HTTP ports (DESIGN.md's table).
    fn default_ports(&self) -> (u16, u16);

    /// The gRPC and admin listen addresses its settings give.
    fn listen(&self) -> (SocketAddr, SocketAddr);

    /// Builds the service: its state, background tasks and gRPC routes.
    fn build<'a>(&'a self, deps: &'a HostDeps) -> BoxFuture<'a, Result<ServiceSpec, BuildError>>;
}
