//! The cluster router: decides each item where its consistency says.
//!
//! - **LOCAL**: the in-process [`Limiter`].
//! - **OWNER**: the instance that owns `(namespace, key)` on the rendezvous hash ring of live
//!   rate-limiter members. Items this instance owns are decided locally; the others are
//!   forwarded to their owner over one long-lived `StreamCheck` stream per peer: a forward is
//!   written as soon as the batcher takes it, and forwards that queued meanwhile are coalesced
//!   into one message (at most 1000 items) — batching grows with load and never waits on a
//!   timer; answers come back by id in any order. A stream message costs a fraction of a unary
//!   call (no HTTP/2 stream set-up, headers or per-call span); see BENCHMARKS.md. The owner
//!   decides forwarded items locally and does not count them again.
//! - **STRICT**: atomically in Redis ([`RedisStrict`], GCRA on Redis's clock).
//!
//! A forward or Redis call gets a budget (default 5 ms) that never exceeds the caller's
//! deadline. When it fails or runs out, the item's failure policy answers — FAIL_OPEN,
//! FAIL_CLOSED, or LOCAL_FALLBACK (the local limiter with the limit divided by the number of
//! live members) — and the result is marked degraded with the reason, and counted.
//!
//! An all-or-nothing batch must be decided in one place: every item with the same consistency
//! and, for OWNER, the same owner (items about one `(namespace, key)` always share an owner).
//!
//! The parts: `plan` (a check's items validated and resolved once, and routed), `check`
//! (deciding each route's items, and resets), `fail_over` (failure policies), `owners` (the
//! ring of live members) and `batcher` (the forward stream to one peer), `keys` (where a
//! per-key call goes), `leases`, `budgets`, and `metrics`.

mod batcher;
mod budgets;
mod check;
mod fail_over;
mod keys;
mod leases;
mod metrics;
mod owners;
mod plan;

use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::Membership;
use agentmesh_runtime::Metrics;

use crate::budget::BudgetLedger;
pub use crate::calls::{
    BudgetAnswer, BudgetCall, BudgetQuery, BudgetRef, BudgetTarget, DEFAULT_LISTED_KEYS,
    HeldBudget, LeaseTarget, MAX_LISTED_KEYS, NamespaceUsage,
};
use crate::concurrency::LeaseTable;
use crate::error::RateLimitError;
use crate::limiter::Limiter;
use crate::spec::Consistency;
use crate::strict::RedisStrict;
use crate::suspects::Suspects;

use self::metrics::RouterMetrics;
use self::owners::Owners;

/// Default time a forward or a Redis call may take.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(5);
/// Seed of the key hash used in Redis, the same on every instance.
const STRICT_KEY_SEED: u64 = 0x6167_656e_746d_6573;

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// This instance's membership id (results name it as the decider).
    pub instance_id: String,
    /// Consistency of items and policies that set none.
    pub default_consistency: Consistency,
    /// Time a forward or Redis call may take (capped by the caller's deadline).
    pub budget: Duration,
    /// Most concurrency leases this instance holds.
    pub max_leases: usize,
    /// The token sent with forwards to owners (`--auth-token-file`).
    pub bearer: Option<Arc<str>>,
}

/// Decides items across the cluster; see the module docs.
pub struct ClusterRouter {
    limiter: Arc<Limiter>,
    leases: LeaseTable,
    budgets: BudgetLedger,
    config: RouterConfig,
    strict: Option<RedisStrict>,
    owners: Owners,
    metrics: RouterMetrics,
}

impl ClusterRouter {
    /// A router over `limiter`, watching the rate-limiter members of `membership`, with Redis
    /// for STRICT items when `strict` is given.
    ///
    /// # Errors
    /// `Unavailable` when membership cannot be watched; `FailedPrecondition` when metrics are
    /// registered twice.
    pub async fn new(
        limiter: Arc<Limiter>,
        config: RouterConfig,
        membership: &dyn Membership,
        strict: Option<RedisStrict>,
        metrics: &Metrics,
    ) -> Result<Self, RateLimitError> {
        let watch = membership.watch(crate::config::NAME).await.map_err(|e| {
            RateLimitError::Unavailable(format!("watching rate-limiter members: {e}"))
        })?;
        let router_metrics = RouterMetrics::register(metrics)
            .map_err(|e| RateLimitError::FailedPrecondition(format!("registering metrics: {e}")))?;
        Ok(Self {
            owners: Owners::new(
                watch,
                config.instance_id.clone(),
                metrics.clone(),
                config.budget,
                Arc::new(Suspects::new(router_metrics.suspect_peers.clone())),
                config.bearer.clone(),
            ),
            leases: LeaseTable::new(config.max_leases),
            budgets: BudgetLedger::new(config.max_leases, config.max_leases),
            limiter,
            config,
            strict,
            metrics: router_metrics,
        })
    }
}
