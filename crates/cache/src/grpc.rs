//! The gRPC adapter of `agentmesh.cache.v1.CacheCoordinator`: decode ([`crate::wire`]), call
//! the [`Cache`], encode.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::cache::v1 as pb;
use agentmesh_runtime::error::{ServiceError, to_status};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{Cache, GetItem, Notice, SetItem, SetOptions};
use crate::error::{CacheError, FieldViolation};
use crate::semantic::SemanticCache;
use crate::wire::{
    decode_duration, decode_partition, decode_read, decode_set, encode_get, encode_lease_answer,
    encode_notice, encode_semantic,
};
use agentmesh_runtime::audit;
use agentmesh_runtime::auth::{AccessRule, Identity, Role, caller};

/// Who may call each RPC (admin may call everything); see the README's roles table.
pub const ACCESS: &[AccessRule] = &[
    ("Get", &[Role::Service, Role::Agent]),
    ("Set", &[Role::Service, Role::Agent]),
    ("Delete", &[Role::Service, Role::Agent]),
    ("GetMany", &[Role::Service, Role::Agent]),
    ("SetMany", &[Role::Service, Role::Agent]),
    ("DeleteMany", &[Role::Service, Role::Agent]),
    ("GetOrLease", &[Role::Service, Role::Agent]),
    ("FillLease", &[Role::Service, Role::Agent]),
    ("AbandonLease", &[Role::Service, Role::Agent]),
    ("InvalidateTags", &[Role::Service, Role::Operator]),
    ("InvalidateNamespace", &[Role::Service, Role::Operator]),
    ("WatchInvalidations", &[Role::Service, Role::Agent]),
    ("Stats", &[Role::Service, Role::Operator]),
    ("Warm", &[Role::Operator]),
    ("SemanticGet", &[Role::Service, Role::Agent]),
    ("SemanticPut", &[Role::Service, Role::Agent]),
];

/// The state-changing RPCs recorded in the audit trail (README "Audit trail").
pub const AUDITED: &[&str] = &["InvalidateTags", "InvalidateNamespace", "Warm"];

/// Largest request accepted (a 4 MiB value and its envelope; a batch of small ones).
const MAX_REQUEST: usize = 5 << 20;
/// Reasons a Warm answer lists at most.
const WARM_ERRORS: usize = 10;

/// Serves `agentmesh.cache.v1.CacheCoordinator` over a [`Cache`] and its [`SemanticCache`].
#[derive(Clone)]
pub struct CacheGrpc {
    cache: Arc<Cache>,
    semantic: Arc<SemanticCache>,
}

impl CacheGrpc {
    /// An adapter over `cache` and `semantic`.
    #[must_use]
    pub fn new(cache: Arc<Cache>, semantic: Arc<SemanticCache>) -> Self {
        Self { cache, semantic }
    }

    /// Who embedded a request's prompt: the caller (it sent a vector) or this instance.
    fn embedder_used(&self, embedding: &[f32]) -> &str {
        if embedding.is_empty() {
            self.semantic.embedder()
        } else {
            "caller"
        }
    }

    /// The tonic server for this adapter.
    #[must_use]
    pub fn into_server(self) -> pb::cache_coordinator_server::CacheCoordinatorServer<Self> {
        pb::cache_coordinator_server::CacheCoordinatorServer::new(self)
            .max_decoding_message_size(MAX_REQUEST)
            .max_encoding_message_size(MAX_REQUEST)
    }
}

fn status(e: &CacheError) -> Status {
    to_status(e)
}

fn set_item(r: pb::SetRequest, prefix: &str) -> Result<SetItem, CacheError> {
    let options = decode_set(&r, prefix)?;
    Ok(SetItem {
        namespace: r.namespace,
        key: r.key,
        value: r.value,
        options,
    })
}

fn lease_options(
    ttl: Option<&prost_types::Duration>,
    stale_for: Option<&prost_types::Duration>,
    tags: Vec<String>,
) -> Result<SetOptions, CacheError> {
    Ok(SetOptions {
        ttl: decode_duration(ttl, "ttl")?,
        grace: decode_duration(stale_for, "stale_for")?.unwrap_or_default(),
        tags,
        if_version: None,
    })
}

fn matches(notice: &Notice, namespace: &str, caller: &Identity) -> bool {
    match notice {
        Notice::Flush { .. } => true,
        Notice::Change(c) if namespace.is_empty() => caller.owns(&c.namespace),
        Notice::Change(c) => c.namespace == namespace,
    }
}

type InvalidationStream = Pin<Box<dyn Stream<Item = Result<pb::Invalidation, Status>> + Send>>;

#[tonic::async_trait]
impl pb::cache_coordinator_server::CacheCoordinator for CacheGrpc {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let options = decode_read(&r, "").map_err(|e| status(&e))?;
        let found = self
            .cache
            .get(&r.namespace, &r.key, options)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(encode_get(found)))
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let options = decode_set(&r, "").map_err(|e| status(&e))?;
        let version = self
            .cache
            .set(&r.namespace, &r.key, &r.value, &options)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SetResponse { version }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let existed = self
            .cache
            .delete(&r.namespace, &r.key)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteResponse { existed }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let caller = caller(&request);
        let items = request
            .into_inner()
            .items
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                caller.check_owns(&format!("items[{i}].namespace"), "namespace", &r.namespace)?;
                Ok(GetItem {
                    options: decode_read(&r, &format!("items[{i}]."))?,
                    namespace: r.namespace,
                    key: r.key,
                })
            })
            .collect::<Result<Vec<_>, CacheError>>()
            .map_err(|e| status(&e))?;
        let found = self.cache.get_many(&items).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetManyResponse {
            items: found.into_iter().map(encode_get).collect(),
        }))
    }

    async fn set_many(
        &self,
        request: Request<pb::SetManyRequest>,
    ) -> Result<Response<pb::SetManyResponse>, Status> {
        let caller = caller(&request);
        let items = request
            .into_inner()
            .items
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                caller.check_owns(&format!("items[{i}].namespace"), "namespace", &r.namespace)?;
                set_item(r, &format!("items[{i}]."))
            })
            .collect::<Result<Vec<_>, CacheError>>()
            .map_err(|e| status(&e))?;
        let results = self.cache.set_many(&items).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::SetManyResponse {
            items: results
                .into_iter()
                .map(|r| match r {
                    Ok(version) => pb::SetResult {
                        version,
                        ..pb::SetResult::default()
                    },
                    Err(e) => pb::SetResult {
                        version: 0,
                        error: e.to_string(),
                        code: status(&e).code() as i32,
                    },
                })
                .collect(),
        }))
    }

    async fn delete_many(
        &self,
        request: Request<pb::DeleteManyRequest>,
    ) -> Result<Response<pb::DeleteManyResponse>, Status> {
        let caller = caller(&request);
        let items: Vec<_> = request
            .into_inner()
            .items
            .into_iter()
            .map(|r| (r.namespace, r.key))
            .collect();
        for (i, (namespace, _)) in items.iter().enumerate() {
            caller.check_owns(&format!("items[{i}].namespace"), "namespace", namespace)?;
        }
        let existed = self
            .cache
            .delete_many(&items)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteManyResponse { existed }))
    }

    async fn get_or_lease(
        &self,
        request: Request<pb::GetOrLeaseRequest>,
    ) -> Result<Response<pb::GetOrLeaseResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let ttl = decode_duration(r.lease_ttl.as_ref(), "lease_ttl").map_err(|e| status(&e))?;
        let Some(ttl) = ttl else {
            return Err(status(&CacheError::InvalidArgument(vec![
                FieldViolation::new("lease_ttl", "required: how long a lease granted is held"),
            ])));
        };
        let wait = decode_duration(r.wait.as_ref(), "wait")
            .map_err(|e| status(&e))?
            .unwrap_or(Duration::ZERO);
        let answer = self
            .cache
            .get_or_lease(&r.namespace, &r.key, ttl, wait)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(encode_lease_answer(answer)))
    }

    async fn fill_lease(
        &self,
        request: Request<pb::FillLeaseRequest>,
    ) -> Result<Response<pb::FillLeaseResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let options =
            lease_options(r.ttl.as_ref(), r.stale_for.as_ref(), r.tags).map_err(|e| status(&e))?;
        let version = self
            .cache
            .fill_lease(&r.namespace, &r.key, r.token, &r.value, &options)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::FillLeaseResponse { version }))
    }

    async fn abandon_lease(
        &self,
        request: Request<pb::AbandonLeaseRequest>,
    ) -> Result<Response<pb::AbandonLeaseResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let negative =
            decode_duration(r.negative_ttl.as_ref(), "negative_ttl").map_err(|e| status(&e))?;
        let held = self
            .cache
            .abandon_lease(&r.namespace, &r.key, r.token, negative)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::AbandonLeaseResponse { held }))
    }

    async fn invalidate_tags(
        &self,
        request: Request<pb::InvalidateTagsRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        let audit = audit::target(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        audit.set(|| format!("{} tags {}", r.namespace, r.tags.join(",")));
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let seq = self
            .cache
            .invalidate_tags(&r.namespace, &r.tags)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::InvalidateResponse { seq }))
    }

    async fn invalidate_namespace(
        &self,
        request: Request<pb::InvalidateNamespaceRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        let audit = audit::target(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        audit.set(|| r.namespace.clone());
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let seq = self
            .cache
            .invalidate_namespace(&r.namespace)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::InvalidateResponse { seq }))
    }

    type WatchInvalidationsStream = InvalidationStream;

    async fn watch_invalidations(
        &self,
        request: Request<pb::WatchInvalidationsRequest>,
    ) -> Result<Response<Self::WatchInvalidationsStream>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        if !r.namespace.is_empty() {
            let mut v = Vec::new();
            crate::cache::check_key(&r.namespace, "-", "", &mut v);
            crate::cache::done(v).map_err(|e| status(&e))?;
            caller.check_owns("namespace", "namespace", &r.namespace)?;
        }
        let namespace = r.namespace;
        let stream = self
            .cache
            .watch(r.after_seq)
            .filter(move |n| std::future::ready(matches(n, &namespace, &caller)))
            .map(|n| Ok(encode_notice(&n)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        if !r.namespace.is_empty() {
            caller.check_owns("namespace", "namespace", &r.namespace)?;
        }
        let mut s = self
            .cache
            .stats((!r.namespace.is_empty()).then_some(r.namespace.as_str()));
        // A tenant sees its own namespaces only.
        s.namespaces.retain(|n| caller.owns(&n.namespace));
        let config = self.cache.config();
        let get =
            |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        Ok(Response::new(pb::StatsResponse {
            namespaces: s
                .namespaces
                .iter()
                .map(|n| pb::NamespaceStats {
                    namespace: n.namespace.clone(),
                    l1_hits: get(&n.reads, "l1"),
                    l2_hits: get(&n.reads, "l2"),
                    misses: get(&n.reads, "miss"),
                    stale_hits: get(&n.reads, "stale"),
                    negative_hits: get(&n.reads, "negative"),
                    hit_rate: n.hit_rate(),
                    writes: get(&n.writes, "stored"),
                    writes_refused: get(&n.writes, "refused"),
                    leases_granted: get(&n.leases, "granted") + get(&n.leases, "hit_refresh"),
                    leases_coalesced: get(&n.leases, "coalesced"),
                    guard_refusals: get(&n.semantic, "guard_refused"),
                    semantic_exact: get(&n.semantic, "exact"),
                    semantic_normalized: get(&n.semantic, "normalized"),
                    semantic_similar: get(&n.semantic, "semantic"),
                    semantic_misses: get(&n.semantic, "miss"),
                })
                .collect(),
            l1_entries: s.l1_entries,
            l1_bytes: s.l1_bytes,
            l1_evictions: s.l1_evictions,
            l1_max_bytes: config.l1_max_bytes,
            l1_max_entries: config.l1_max_entries,
            feed_synced: s.feed_synced,
            feed_synced_count: get(&s.feed_events, "synced"),
            feed_lost_count: get(&s.feed_events, "lost"),
            feed_gap_count: get(&s.feed_events, "gap"),
            last_seq: s.last_seq,
            l2_shared: self.cache.shared(),
            embedder: self.semantic.embedder().to_owned(),
            embedder_fallback_reason: self
                .semantic
                .fallback_reason()
                .unwrap_or_default()
                .to_owned(),
            semantic_entries: self.semantic.entries() as u64,
            similarity_threshold: self.semantic.threshold(),
        }))
    }

    async fn warm(
        &self,
        request: Request<Streaming<pb::SetRequest>>,
    ) -> Result<Response<pb::WarmResponse>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let mut stream = request.into_inner();
        let mut out = pb::WarmResponse::default();
        let refuse = |out: &mut pb::WarmResponse, e: String| {
            out.refused += 1;
            if out.errors.len() < WARM_ERRORS {
                out.errors.push(e);
            }
        };
        let mut n = 0u64;
        while let Some(r) = stream.next().await {
            let r = r?;
            n += 1;
            let key = r.key.clone();
            let owned = caller
                .check_owns("namespace", "namespace", &r.namespace)
                .map_err(CacheError::from);
            let result = match owned.and_then(|()| set_item(r, "")) {
                Ok(item) => {
                    self.cache
                        .set(&item.namespace, &item.key, &item.value, &item.options)
                        .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => out.stored += 1,
                Err(e) if e.code() == agentmesh_runtime::error::ErrorCode::Unavailable => {
                    return Err(status(&e));
                }
                Err(e) => refuse(&mut out, format!("item {n} ({key}): {e}")),
            }
        }
        audit.set(|| format!("{} stored, {} refused", out.stored, out.refused));
        Ok(Response::new(out))
    }

    async fn semantic_get(
        &self,
        request: Request<pb::SemanticGetRequest>,
    ) -> Result<Response<pb::SemanticGetResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let partition = decode_partition(r.partition.as_ref());
        let started = std::time::Instant::now();
        let answer = self
            .semantic
            .get(
                &r.namespace,
                &r.prompt,
                &r.embedding,
                r.threshold,
                &partition,
            )
            .await
            .map_err(|e| status(&e))?;
        self.cache
            .metrics()
            .semantic_took(!r.embedding.is_empty(), started);
        let embedder = self.embedder_used(&r.embedding);
        Ok(Response::new(encode_semantic(answer, embedder)))
    }

    async fn semantic_put(
        &self,
        request: Request<pb::SemanticPutRequest>,
    ) -> Result<Response<pb::SemanticPutResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        caller.check_owns("namespace", "namespace", &r.namespace)?;

        let partition = decode_partition(r.partition.as_ref());
        let options = SetOptions {
            ttl: decode_duration(r.ttl.as_ref(), "ttl").map_err(|e| status(&e))?,
            tags: r.tags,
            ..SetOptions::default()
        };
        let version = self
            .semantic
            .put(
                &r.namespace,
                &r.prompt,
                &r.embedding,
                &partition,
                &r.answer,
                &options,
            )
            .await
            .map_err(|e| status(&e))?;
        let embedder = self.embedder_used(&r.embedding);
        Ok(Response::new(pb::SemanticPutResponse {
            version,
            embedder: embedder.to_owned(),
        }))
    }
}

#[cfg(test)]
mod access_tests {
    #[test]
    fn test_every_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered(
            "agentmesh.cache.v1.CacheCoordinator",
            super::ACCESS,
        );
    }
}
