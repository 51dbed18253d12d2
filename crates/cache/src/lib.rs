//! agentmesh cache coordinator: `agentmesh.cache.v1.CacheCoordinator` (Get, Set, Delete).
//!
//! [`cache::Cache`] is a two-tier key/value cache per namespace: L1 in this process (moka:
//! TinyLFU admission, weighted by bytes, bounded by entries and a byte budget) in front of an
//! L2 shared by every instance ([`l2::L2Store`]: Redis, or in memory). Values carry a version
//! (compare-and-set with `if_version`), a TTL (jittered so a burst of writes does not expire
//! at once), and are compressed with zstd above 1 KiB. Reads say which tier answered, the
//! version and the age; a FRESH read skips L1.
//!
//! [`wire`] converts, [`grpc`] is the thin adapter, [`service`] assembles it for the host.
//!
//! Not built yet (issue 17): batch forms, cross-node invalidation of L1, leases against
//! stampedes, tags and generations, the semantic cache.

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
