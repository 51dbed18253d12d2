//! agentmesh cache coordinator — the domain core, not served yet.
//!
//! [`cache::Cache`] is a two-tier key/value cache per namespace: L1 in this process (moka:
//! TinyLFU admission, weighted by bytes, bounded by entries and a byte budget) in front of an
//! L2 shared by every instance ([`l2::L2Store`]: Redis, or in memory). Values carry a version
//! (compare-and-set with `if_version`), a TTL (jittered so a burst of writes does not expire
//! at once), and are compressed with zstd above 1 KiB. Reads say which tier answered, the
//! version and the age; a FRESH read skips L1.
//!
//! Not built yet (issue 17): the gRPC service and its registration, cross-node invalidation
//! of L1, leases against stampedes, tags and generations, the semantic cache.

pub mod cache;
pub mod config;
pub mod entry;
pub mod error;
pub mod l2;

pub use cache::{Cache, Consistency, Hit, Tier};
pub use error::CacheError;
