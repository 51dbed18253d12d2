//! `grpc.health.v1.Health` as every agentmesh server serves it: `Check`, `Watch` and `List`
//! (gRFC A90). tonic-health has no `List` and ends `Watch` for an unknown name with NOT_FOUND
//! where the protocol says to stream SERVICE_UNKNOWN; this one follows the protocol.
//!
//! At shutdown the host [`HealthRegistry::close`]s the registry after turning every name
//! NOT_SERVING: open `Watch` streams then receive that status and end, so a health watcher
//! (the aggregator, a load balancer) neither holds the graceful drain open nor mistakes the
//! shutdown for a crash.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use agentmesh_proto::grpc::health::v1::health_check_response::ServingStatus;
use agentmesh_proto::grpc::health::v1::health_server::{Health, HealthServer};
use agentmesh_proto::grpc::health::v1::{
    HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
};
use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Most names `List` answers with (A90 lets a server refuse more with RESOURCE_EXHAUSTED).
pub const MAX_LISTED: usize = 100;

#[derive(Default)]
struct Statuses {
    by_name: BTreeMap<String, ServingStatus>,
    closed: bool,
}

/// The serving status of each health name of one server; cheap to clone.
#[derive(Clone)]
pub struct HealthRegistry {
    statuses: Arc<Mutex<Statuses>>,
    /// Bumped on every change; `Watch` streams wait on it.
    changed_tx: Arc<watch::Sender<u64>>,
}

impl Default for HealthRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthRegistry {
    /// An empty registry (every name unknown).
    #[must_use]
    pub fn new() -> Self {
        Self {
            statuses: Arc::default(),
            changed_tx: Arc::new(watch::channel(0).0),
        }
    }

    /// Sets a name's status; watchers of that name hear of it.
    pub fn set(&self, name: &str, status: ServingStatus) {
        let mut statuses = self.statuses.lock();
        if statuses.by_name.get(name) == Some(&status) {
            return;
        }
        statuses.by_name.insert(name.to_owned(), status);
        drop(statuses);
        self.changed_tx.send_modify(|n| *n += 1);
    }

    /// A name's status, if known.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<ServingStatus> {
        self.statuses.lock().by_name.get(name).copied()
    }

    /// Ends every `Watch` stream after it has sent the current status (shutdown).
    pub fn close(&self) {
        self.statuses.lock().closed = true;
        self.changed_tx.send_modify(|n| *n += 1);
    }

    /// The gRPC service over this registry.
    #[must_use]
    pub fn service(&self) -> HealthServer<HealthGrpc> {
        HealthServer::new(HealthGrpc {
            registry: self.clone(),
        })
    }

    fn watch_status(&self, name: &str) -> (ServingStatus, bool) {
        let statuses = self.statuses.lock();
        let status = statuses
            .by_name
            .get(name)
            .copied()
            .unwrap_or(ServingStatus::ServiceUnknown);
        (status, statuses.closed)
    }
}

/// The `grpc.health.v1.Health` adapter over a [`HealthRegistry`].
pub struct HealthGrpc {
    registry: HealthRegistry,
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status.into(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthGrpc {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let name = request.into_inner().service;
        match self.registry.get(&name) {
            Some(status) => Ok(Response::new(response(status))),
            None => Err(Status::not_found(format!(
                "unknown health name {name:?}: try \"\", \"liveness\", \"readiness\" or a full service name (List shows them)"
            ))),
        }
    }

    async fn list(
        &self,
        _request: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        let statuses = self.registry.statuses.lock();
        if statuses.by_name.len() > MAX_LISTED {
            return Err(Status::resource_exhausted(format!(
                "{} health names exceed List's limit of {MAX_LISTED}",
                statuses.by_name.len()
            )));
        }
        let statuses = statuses
            .by_name
            .iter()
            .map(|(name, status)| (name.clone(), response(*status)))
            .collect();
        Ok(Response::new(HealthListResponse { statuses }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let name = request.into_inner().service;
        let registry = self.registry.clone();
        let changed_rx = registry.changed_tx.subscribe();
        // State: (registry, change feed, last status sent, ended).
        let stream = futures::stream::unfold(
            (registry, changed_rx, None, false),
            move |(registry, mut changed_rx, mut last, ended)| {
                let name = name.clone();
                async move {
                    if ended {
                        return None;
                    }
                    loop {
                        changed_rx.borrow_and_update();
                        let (status, closed) = registry.watch_status(&name);
                        if last != Some(status) {
                            last = Some(status);
                            return Some((
                                Ok(response(status)),
                                (registry, changed_rx, last, closed),
                            ));
                        }
                        if closed || changed_rx.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn request(name: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: name.to_owned(),
        })
    }

    #[tokio::test]
    async fn test_check_answers_known_names_and_not_found_otherwise() {
        let registry = HealthRegistry::new();
        registry.set("", ServingStatus::Serving);
        let grpc = HealthGrpc {
            registry: registry.clone(),
        };
        let ok = grpc.check(request("")).await.unwrap().into_inner();
        assert_eq!(ok.status(), ServingStatus::Serving);
        let err = grpc.check(request("nope")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn test_list_returns_every_name() {
        let registry = HealthRegistry::new();
        registry.set("", ServingStatus::Serving);
        registry.set("readiness", ServingStatus::NotServing);
        let grpc = HealthGrpc { registry };
        let list = grpc
            .list(Request::new(HealthListRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.statuses.len(), 2);
        assert_eq!(
            list.statuses["readiness"].status(),
            ServingStatus::NotServing
        );
    }

    #[tokio::test]
    async fn test_watch_streams_service_unknown_then_changes_and_ends_when_closed() {
        let registry = HealthRegistry::new();
        let grpc = HealthGrpc {
            registry: registry.clone(),
        };
        let mut stream = grpc.watch(request("x")).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::ServiceUnknown);
        registry.set("x", ServingStatus::Serving);
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.status(), ServingStatus::Serving);
        registry.set("other", ServingStatus::Serving);
        registry.set("x", ServingStatus::NotServing);
        let third = stream.next().await.unwrap().unwrap();
        assert_eq!(third.status(), ServingStatus::NotServing);
        registry.close();
        assert!(stream.next().await.is_none());
    }
}
