//! agentmesh rate limiter.
//!
//! The domain core (`spec`, `window`, `algorithm`, `policies`, `store`, `limiter`, `budget`,
//! `clock`; plain types at the bottom, nothing importing upward) is plain Rust with no
//! gRPC: [`Limiter::check`] decides a batch of items against GCRA, fixed-window or
//! sliding-window limits over a bounded sharded store. [`grpc`] is the thin adapter that serves
//! `agentmesh.ratelimit.v1.RateLimiter`, and [`service`] assembles it for the host.

pub mod algorithm;
pub mod budget;
pub mod calls;
pub mod clock;
pub mod concurrency;
pub mod config;
pub mod decide;
pub mod envoy;
pub mod error;
pub mod grpc;
mod hash;
pub mod ids;
pub mod limiter;
pub mod metrics;
pub mod policies;
pub mod policy_store;
pub mod router;
pub mod service;
pub mod spec;
pub mod store;
pub mod strict;
mod suspects;
pub mod window;
mod wire;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::LimiterConfig;
pub use decide::Decide;
pub use error::{FieldViolation, RateLimitError};
pub use limiter::{CheckItem, CheckOutcome, DegradedReason, LimitRef, Limiter, validate_items};
pub use policies::PolicySet;
pub use spec::{
    Algorithm, Consistency, DEFAULT_POLICY_NAME, FailurePolicy, LimitSpec, Mode, Policy,
};
pub use store::StoreStats;
