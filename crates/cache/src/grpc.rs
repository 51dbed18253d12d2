//! The gRPC adapter of `agentmesh.cache.v1.CacheCoordinator`: decode ([`crate::wire`]), call
//! the [`Cache`], encode, count.

use std::sync::Arc;

use agentmesh_proto::cache::v1 as pb;
use agentmesh_runtime::error::to_status;
use tonic::{Request, Response, Status};

use crate::cache::{Cache, Tier};
use crate::metrics::CacheMetrics;
use crate::wire::{decode_get, decode_ttl, encode_get};

/// Largest request accepted (a 4 MiB value and its envelope).
const MAX_REQUEST: usize = 5 << 20;

/// Serves `agentmesh.cache.v1.CacheCoordinator` over a [`Cache`].
#[derive(Clone)]
pub struct CacheGrpc {
    cache: Arc<Cache>,
    metrics: CacheMetrics,
}

impl CacheGrpc {
    /// An adapter over `cache` counting into `metrics`.
    #[must_use]
    pub fn new(cache: Arc<Cache>, metrics: CacheMetrics) -> Self {
        Self { cache, metrics }
    }

    /// The tonic server for this adapter.
    #[must_use]
    pub fn into_server(self) -> pb::cache_coordinator_server::CacheCoordinatorServer<Self> {
        pb::cache_coordinator_server::CacheCoordinatorServer::new(self)
            .max_decoding_message_size(MAX_REQUEST)
            .max_encoding_message_size(MAX_REQUEST)
    }
}

#[tonic::async_trait]
impl pb::cache_coordinator_server::CacheCoordinator for CacheGrpc {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let (namespace, key, consistency) =
            decode_get(request.into_inner()).map_err(|e| to_status(&e))?;
        let hit = self
            .cache
            .get(&namespace, &key, consistency)
            .await
            .map_err(|e| to_status(&e))?;
        self.metrics.read(
            &namespace,
            match &hit {
                Some(h) if h.tier == Tier::L1 => "l1",
                Some(_) => "l2",
                None => "miss",
            },
        );
        Ok(Response::new(encode_get(hit)))
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let r = request.into_inner();
        let ttl = decode_ttl(r.ttl.as_ref()).map_err(|e| to_status(&e))?;
        let result = self
            .cache
            .set(&r.namespace, &r.key, &r.value, ttl, r.if_version)
            .await;
        self.metrics.write(
            &r.namespace,
            if result.is_ok() { "stored" } else { "refused" },
        );
        let version = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::SetResponse { version }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = request.into_inner();
        let existed = self
            .cache
            .delete(&r.namespace, &r.key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::DeleteResponse { existed }))
    }
}
