//! agentmesh cache coordinator: `agentmesh.cache.v1.CacheCoordinator`.
//!
//! [`cache::Cache`] is a two-tier key/value cache per namespace: L1 in this process (moka:
//! TinyLFU admission, weighted by bytes, bounded by entries and a byte budget) in front of an
//! L2 shared by every instance ([`l2::L2Store`]: Redis, or in memory). Every change L2 makes is
//! numbered and reaches every instance's L1 ([`sync`]); a gap or a lost feed flushes L1.
//! Values carry a version (compare-and-set), a TTL (jittered) with an optional stale window,
//! tags (invalidated in O(1) by generation counters), and are compressed with zstd above
//! 1 KiB. Leases ([`cache::lease`]) make a missing value computed once across the fleet.
//! [`semantic`] is the semantic cache for LLM prompts on top of it.
//!
//! [`wire`] converts, [`grpc`] is the thin adapter, [`service`] assembles it for the host.

pub mod cache;
pub mod config;
pub mod entry;
pub mod error;
pub mod grpc;
pub mod l2;
pub mod metrics;
pub mod semantic;
pub mod service;
pub mod sync;
pub mod wire;

pub use cache::{Cache, Consistency, Found, Hit, LeaseAnswer, ReadOptions, SetOptions, Tier};
pub use error::CacheError;
