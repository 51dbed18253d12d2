//! Assembles the cache for the host: settings (flags with environment fallbacks), L2 (Redis
//! with `--redis`, else in memory), metrics and gRPC routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::cache::v1::cache_coordinator_server::SERVICE_NAME;
use agentmesh_runtime::config::{parse_duration, parse_socket_addr};
use agentmesh_runtime::server::{ServiceSpec, new_instance_id};
use agentmesh_runtime::service::{BuildError, HostDeps, Service};
use futures::future::BoxFuture;
use tonic::service::Routes;

use crate::cache::{Cache, SystemClock};
pub use crate::config::NAME;
use crate::config::{CacheConfig, MAX_TTL};
use crate::grpc::CacheGrpc;
use crate::l2::{InMemoryL2, L2Store, RedisL2};
use crate::metrics::CacheMetrics;
use crate::semantic::{SemanticCache, SemanticConfig};

/// Cache settings.
#[derive(Clone, Debug, clap::Args)]
pub struct CacheArgs {
    /// gRPC listen address of the cache.
    #[arg(id = "cache_listen", long = "cache-listen", env = "AGENTMESH_CACHE_LISTEN", default_value = "0.0.0.0:7103", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
    /// Admin HTTP listen address of the cache (`/metrics`, `/livez`, `/readyz`).
    #[arg(id = "cache_admin_listen", long = "cache-admin-listen", env = "AGENTMESH_CACHE_ADMIN_LISTEN", default_value = "0.0.0.0:9103", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,
    /// Most bytes of values in L1 (this process).
    #[arg(
        long = "cache-max-bytes",
        env = "AGENTMESH_CACHE_MAX_BYTES",
        default_value_t = 256 << 20
    )]
    pub max_bytes: u64,
    /// Most entries in L1 (this process).
    #[arg(
        long = "cache-max-entries",
        env = "AGENTMESH_CACHE_MAX_ENTRIES",
        default_value_t = 100_000
    )]
    pub max_entries: u64,
    /// Directory of the sentence-embedding model for the semantic cache (all-MiniLM-L6-v2:
    /// `model.safetensors`, `tokenizer.json`, `config.json`; see the README). Without it, a
    /// lexical fallback is used (and said so in Stats and at start).
    #[arg(long = "cache-embedder-model", env = "AGENTMESH_CACHE_EMBEDDER_MODEL")]
    pub embedder_model: Option<std::path::PathBuf>,
    /// Similarity from which the semantic cache serves a similar prompt's answer (0–1;
    /// requests may raise it, never lower it).
    #[arg(
        long = "cache-similarity-threshold",
        env = "AGENTMESH_CACHE_SIMILARITY_THRESHOLD",
        default_value_t = 0.85
    )]
    pub similarity_threshold: f32,
    /// Most semantic entries this instance indexes (the oldest of an index go first).
    #[arg(
        long = "cache-semantic-max-entries",
        env = "AGENTMESH_CACHE_SEMANTIC_MAX_ENTRIES",
        default_value_t = 200_000
    )]
    pub semantic_max_entries: usize,
    /// TTL of a value written without one.
    #[arg(long = "cache-default-ttl", env = "AGENTMESH_CACHE_DEFAULT_TTL", default_value = "1h", value_parser = parse_duration)]
    pub default_ttl: Duration,
}

impl CacheArgs {
    /// The cache's settings.
    ///
    /// # Errors
    /// `Config` naming the flag when a setting is out of range.
    pub fn cache_config(&self) -> Result<CacheConfig, BuildError> {
        if self.max_bytes < 1 << 20 {
            return Err(BuildError::Config(
                "--cache-max-bytes must be at least 1 MiB (1048576)".to_owned(),
            ));
        }
        if self.default_ttl.is_zero() || self.default_ttl > MAX_TTL {
            return Err(BuildError::Config(
                "--cache-default-ttl must be between 1ms and 30 days".to_owned(),
            ));
        }
        if self.max_entries == 0 {
            return Err(BuildError::Config(
                "--cache-max-entries must be at least 1".to_owned(),
            ));
        }
        Ok(CacheConfig {
            l1_max_bytes: self.max_bytes,
            l1_max_entries: self.max_entries,
            default_ttl: self.default_ttl,
            ..CacheConfig::default()
        })
    }
}

async fn l2(redis_url: Option<&str>) -> Result<Arc<dyn L2Store>, BuildError> {
    let Some(url) = redis_url else {
        return Ok(Arc::new(InMemoryL2::default()));
    };
    let client = redis::Client::open(url)
        .map_err(|e| BuildError::Config(format!("--redis: invalid Redis URL: {e}")))?;
    let manager = tokio::time::timeout(
        Duration::from_secs(3),
        redis::aio::ConnectionManager::new(client.clone()),
    )
    .await
    .map_err(|_| BuildError::Unavailable(format!("cannot reach Redis at {url}: timed out")))?
    .map_err(|e| BuildError::Unavailable(format!("cannot reach Redis at {url}: {e}")))?;
    Ok(Arc::new(RedisL2::new(client, manager)))
}

impl Service for CacheArgs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_ports(&self) -> (u16, u16) {
        (7103, 9103)
    }

    fn listen(&self) -> (SocketAddr, SocketAddr) {
        (self.listen, self.admin_listen)
    }

    fn build<'a>(&'a self, deps: &'a HostDeps) -> BoxFuture<'a, Result<ServiceSpec, BuildError>> {
        Box::pin(async move {
            let metrics = CacheMetrics::register(deps.metrics.registry())
                .map_err(|e| BuildError::Config(format!("registering metrics: {e}")))?;
            let cache = Cache::start(
                self.cache_config()?,
                l2(deps.redis_url.as_deref()).await?,
                Arc::new(SystemClock),
                metrics,
            );
            if !(0.0..=1.0).contains(&self.similarity_threshold) {
                return Err(BuildError::Config(
                    "--cache-similarity-threshold must be between 0 and 1".to_owned(),
                ));
            }
            let semantic = SemanticCache::start(
                cache.clone(),
                SemanticConfig {
                    threshold: self.similarity_threshold,
                    max_entries: self.semantic_max_entries.max(1),
                    model_dir: self.embedder_model.clone(),
                },
            );
            cache
                .metrics()
                .embedder(semantic.embedder(), semantic.fallback_reason().is_some());
            let sampled = Arc::downgrade(&cache);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    let Some(cache) = sampled.upgrade() else {
                        return;
                    };
                    cache.sample();
                }
            });
            let server = CacheGrpc::new(cache, semantic).into_server();
            Ok(ServiceSpec {
                name: NAME,
                instance_id: new_instance_id(NAME),
                grpc_services: vec![SERVICE_NAME.to_owned()],
                routes: Routes::new(server),
                grpc_listen: self.listen,
                admin_listen: self.admin_listen,
                admin_routes: None,
                access: vec![(SERVICE_NAME.to_owned(), crate::grpc::ACCESS)],
                audited: vec![(SERVICE_NAME.to_owned(), crate::grpc::AUDITED)],
            })
        })
    }
}
