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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_membership::{HashRing, Member, MemberSnapshot, MemberWatch, Membership};
use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_runtime::{ClientChannel, ClientConfig, Metrics};
use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use tokio::sync::{mpsc, oneshot, watch};

use crate::budget::{BudgetError, BudgetKey, BudgetLedger, BudgetSpec, BudgetWindow};
pub use crate::calls::{
    BudgetAnswer, BudgetCall, BudgetQuery, BudgetRef, BudgetTarget, DEFAULT_LISTED_KEYS,
    HeldBudget, LeaseTarget, MAX_LISTED_KEYS, NamespaceUsage,
};
use crate::concurrency::{AcquireOutcome, LeaseError, LeaseTable};
use crate::decide::Decide;
use crate::error::{FieldViolation, RateLimitError};
use crate::ids::OpaqueId;
use crate::limiter::{CheckItem, CheckOutcome, DegradedReason, LimitRef, Limiter, validate_items};
use crate::policies::PolicySet;
use crate::spec::{Algorithm, Consistency, FailurePolicy, LimitSpec, Mode};
use crate::strict::{RedisStrict, StrictDecision, StrictItem};
use crate::suspects::Suspects;
use crate::wire::{decode_result, encode_item};

/// Default time a forward or a Redis call may take.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(5);
/// Forward messages buffered on one peer stream before new forwards fail over.
const PEER_STREAM_BUFFER: usize = 1024;
/// Time a peer has to open the forward stream.
const PEER_OPEN_TIMEOUT: Duration = Duration::from_millis(250);
/// How often batches whose callers gave up are dropped.
const PEER_SWEEP: Duration = Duration::from_millis(100);
/// An unanswered forward this old means the stream is stuck: it is dropped and reopened.
const PEER_STALL: Duration = Duration::from_secs(1);
/// How often a suspected peer is probed (a forward stream opened to it).
const SUSPECT_PROBE: Duration = Duration::from_millis(500);
/// Forwards queued for one peer before new ones fail over to the failure policy.
const PEER_QUEUE: usize = 4096;
/// Items in one forwarded request.
const MAX_FORWARD_ITEMS: usize = 1000;
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
}

/// Router metrics: degraded answers by reason, forward and Redis latency.
#[derive(Clone)]
struct RouterMetrics {
    degraded: IntCounterVec,
    forwarded: IntCounterVec,
    forward_seconds: Histogram,
    redis_seconds: Histogram,
    suspect_peers: IntGauge,
}

impl RouterMetrics {
    fn register(metrics: &Metrics) -> Result<Self, prometheus::Error> {
        let degraded = IntCounterVec::new(
            Opts::new(
                "ratelimit_degraded_total",
                "Items answered by their failure policy, by reason and policy.",
            ),
            &["reason", "on_failure"],
        )?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "ratelimit_forwarded_items_total",
                "Items forwarded to their owner, by outcome (ok, failed).",
            ),
            &["outcome"],
        )?;
        let buckets = agentmesh_runtime::metrics::LATENCY_BUCKETS.to_vec();
        let forward_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ratelimit_forward_duration_seconds",
                "Time of one forwarded request to an owner.",
            )
            .buckets(buckets.clone()),
        )?;
        let redis_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ratelimit_redis_duration_seconds",
                "Time of one STRICT call to Redis.",
            )
            .buckets(buckets),
        )?;
        let suspect_peers = IntGauge::new(
            "ratelimit_suspect_peers",
            "Peers whose forward stream just failed: their keys go to the next owner until they answer.",
        )?;
        let registry = metrics.registry();
        registry.register(Box::new(suspect_peers.clone()))?;
        registry.register(Box::new(degraded.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(forward_seconds.clone()))?;
        registry.register(Box::new(redis_seconds.clone()))?;
        Ok(Self {
            degraded,
            forwarded,
            forward_seconds,
            redis_seconds,
            suspect_peers,
        })
    }
}

/// Where one item is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Local,
    Strict,
    Peer(String),
    /// OWNER with no live member known.
    NoOwner,
}

/// An item with what routing needs to know about it.
struct Planned {
    index: usize,
    item: CheckItem,
    spec: LimitSpec,
    mode: Mode,
    on_failure: FailurePolicy,
    /// The consistency asked for (an OWNER item this instance owns is routed `Local`).
    consistency: Consistency,
    route: Route,
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
            ),
            leases: LeaseTable::new(config.max_leases),
            budgets: BudgetLedger::new(config.max_leases, config.max_leases),
            limiter,
            config,
            strict,
            metrics: router_metrics,
        })
    }

    /// Resolves every item's limit, mode, failure policy and route; rejects what cannot be
    /// decided (unknown policies, STRICT on a window algorithm, a split all-or-nothing batch).
    fn plan(
        &self,
        items: Vec<CheckItem>,
        all_or_nothing: bool,
    ) -> Result<Vec<Planned>, RateLimitError> {
        validate_items(&items)?;
        let policies = self.limiter.policies();
        let ring = self.owners.ring();
        let suspects = self.owners.suspects.snapshot();
        let mut violations = Vec::new();
        let mut planned = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let (spec, mode, routing) = resolve(&policies, &item, index)?;
            let consistency = item
                .consistency
                .or(routing.consistency)
                .unwrap_or(self.config.default_consistency);
            let on_failure = item.on_failure.or(routing.on_failure).unwrap_or_default();
            let route = match consistency {
                Consistency::Local => Route::Local,
                Consistency::Strict if spec.algorithm != Algorithm::Gcra => {
                    violations.push(FieldViolation::new(
                        format!("items[{index}].consistency"),
                        "STRICT supports GCRA limits only",
                    ));
                    Route::Local
                }
                Consistency::Strict => Route::Strict,
                Consistency::Owner => match owner_of(&ring, &suspects, &owner_key(&item)) {
                    None => Route::NoOwner,
                    Some(owner) if owner.instance_id == self.config.instance_id => Route::Local,
                    Some(owner) => Route::Peer(owner.instance_id.clone()),
                },
            };
            let mode = item.mode.unwrap_or(mode);
            planned.push(Planned {
                index,
                item,
                spec,
                mode,
                on_failure,
                consistency,
                route,
            });
        }
        if all_or_nothing && planned.windows(2).any(|w| w[0].route != w[1].route) {
            violations.push(FieldViolation::new(
                "all_or_nothing",
                "all items of an all-or-nothing batch must be decided in one place: give them one consistency and, \
                 for OWNER, one (namespace, key)",
            ));
        }
        if violations.is_empty() {
            Ok(planned)
        } else {
            Err(RateLimitError::InvalidArgument(violations))
        }
    }

    fn decide_local(
        &self,
        planned: &[Planned],
        all_or_nothing: bool,
    ) -> Result<Vec<CheckOutcome>, RateLimitError> {
        let items: Vec<CheckItem> = planned.iter().map(|p| p.item.clone()).collect();
        self.limiter.check(&items, all_or_nothing)
    }

    async fn decide_strict(
        &self,
        planned: &[Planned],
        all_or_nothing: bool,
        budget: Duration,
    ) -> Vec<CheckOutcome> {
        let Some(strict) = &self.strict else {
            return self.fail_over(planned, DegradedReason::RedisUnavailable, all_or_nothing);
        };
        let items: Vec<StrictItem> = planned
            .iter()
            .map(|p| StrictItem {
                shadow: p.mode == Mode::Shadow,
                key_hash: strict_key_hash(&p.item),
                limit: p.spec.limit,
                period: p.spec.period,
                burst: p.spec.effective_burst(),
                cost: p.item.cost,
            })
            .collect();
        let started = Instant::now();
        let span = tracing::debug_span!(
            target: agentmesh_runtime::telemetry::TRACE_TARGET,
            "redis.strict",
            otel.kind = "client",
            db.system = "redis",
            items = items.len()
        );
        let result =
            tracing::Instrument::instrument(strict.check(&items, all_or_nothing, budget), span)
                .await;
        self.metrics
            .redis_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(decisions) => planned
                .iter()
                .zip(decisions)
                .map(|(p, d)| strict_outcome(p, &d))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "redis strict check failed");
                self.fail_over(planned, DegradedReason::RedisUnavailable, all_or_nothing)
            }
        }
    }

    async fn decide_peer(
        &self,
        peer: &str,
        planned: &[Planned],
        all_or_nothing: bool,
        deadline: Instant,
    ) -> Vec<CheckOutcome> {
        let items: Vec<CheckItem> = planned.iter().map(|p| p.item.clone()).collect();
        let started = Instant::now();
        let result = self
            .owners
            .forward(peer, items, all_or_nothing, deadline)
            .await;
        self.metrics
            .forward_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outcomes) if outcomes.len() == planned.len() => {
                self.metrics
                    .forwarded
                    .with_label_values(&["ok"])
                    .inc_by(planned.len() as u64);
                outcomes
            }
            Ok(_) | Err(_) => {
                self.metrics
                    .forwarded
                    .with_label_values(&["failed"])
                    .inc_by(planned.len() as u64);
                self.fail_over(planned, DegradedReason::OwnerUnavailable, all_or_nothing)
            }
        }
    }

    /// Answers `planned` by each item's failure policy.
    fn fail_over(
        &self,
        planned: &[Planned],
        reason: DegradedReason,
        all_or_nothing: bool,
    ) -> Vec<CheckOutcome> {
        let members = self.owners.ring().len().max(1) as u64;
        let fallback: Vec<CheckItem> = planned
            .iter()
            .filter(|p| p.on_failure == FailurePolicy::LocalFallback)
            .map(|p| fallback_item(p, members))
            .collect();
        let mut local = if fallback.is_empty() {
            Vec::new().into_iter()
        } else {
            // The items were validated; a fallback limit is always valid.
            self.limiter
                .check(&fallback, all_or_nothing)
                .unwrap_or_default()
                .into_iter()
        };
        planned
            .iter()
            .map(|p| {
                self.metrics
                    .degraded
                    .with_label_values(&[reason.as_str(), failure_name(p.on_failure)])
                    .inc();
                let mut outcome = match p.on_failure {
                    FailurePolicy::LocalFallback => {
                        local.next().unwrap_or_else(|| closed_outcome(p))
                    }
                    FailurePolicy::FailOpen => open_outcome(p),
                    FailurePolicy::FailClosed => closed_outcome(p),
                };
                outcome.degraded = Some(reason);
                outcome
            })
            .collect()
    }
}

/// Where a per-key call (lease, budget, reset) goes.
enum KeyRoute {
    Here,
    Peer(String),
}

fn budget_error(e: BudgetError) -> RateLimitError {
    match e {
        BudgetError::UnknownReservation(_) => RateLimitError::LeaseNotFound(e.to_string()),
        BudgetError::Full(_) => RateLimitError::ResourceExhausted(e.to_string()),
    }
}

fn lease_error(e: LeaseError) -> RateLimitError {
    match e {
        LeaseError::Unknown(_) => RateLimitError::LeaseNotFound(e.to_string()),
        LeaseError::Full(_) => RateLimitError::ResourceExhausted(e.to_string()),
    }
}

/// An owner's answer to a forwarded lease call.
fn peer_error(peer: &str, status: &tonic::Status) -> RateLimitError {
    match status.code() {
        tonic::Code::NotFound => RateLimitError::LeaseNotFound(status.message().to_owned()),
        tonic::Code::ResourceExhausted => {
            RateLimitError::ResourceExhausted(status.message().to_owned())
        }
        code => RateLimitError::Unavailable(format!(
            "owner {peer} answered {code:?}: {}",
            status.message()
        )),
    }
}

impl ClusterRouter {
    /// Where a per-key call (lease, budget) is decided: here, or at the key's owner.
    fn key_route(
        &self,
        namespace: &str,
        key: &str,
        consistency: Option<Consistency>,
    ) -> Result<KeyRoute, RateLimitError> {
        let target = (namespace, key);
        match consistency.unwrap_or(self.config.default_consistency) {
            Consistency::Local => Ok(KeyRoute::Here),
            Consistency::Strict => Err(RateLimitError::invalid(
                "consistency",
                "leases and budgets are LOCAL or OWNER",
            )),
            Consistency::Owner => {
                let mut key = target.0.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(target.1.as_bytes());
                let suspects = self.owners.suspects.snapshot();
                match owner_of(&self.owners.ring(), &suspects, &key) {
                    None => Err(RateLimitError::Unavailable(
                        "no live rate-limiter member is known".to_owned(),
                    )),
                    Some(owner) if owner.instance_id == self.config.instance_id => {
                        Ok(KeyRoute::Here)
                    }
                    Some(owner) => Ok(KeyRoute::Peer(owner.instance_id.clone())),
                }
            }
        }
    }

    fn lease_key(target: &LeaseTarget) -> u64 {
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        xxh3_64_with_seed(
            target.key.as_bytes(),
            xxh3_64_with_seed(target.namespace.as_bytes(), STRICT_KEY_SEED),
        )
    }

    fn now_nanos() -> u64 {
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
    }

    /// The wire consistency that makes the owner decide a forwarded lease call itself.
    const HERE: i32 = pb::Consistency::Local as i32;

    /// Takes a concurrency slot of the target's key; returns the outcome and the deciding
    /// instance.
    ///
    /// # Errors
    /// `Unavailable` when the owner does not answer within the budget, `ResourceExhausted`
    /// when the deciding instance holds its maximum of leases.
    pub async fn acquire(
        &self,
        target: &LeaseTarget,
        limit: u64,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<(AcquireOutcome, String), RateLimitError> {
        match self.key_route(&target.namespace, &target.key, target.consistency)? {
            KeyRoute::Here => {
                let outcome = self
                    .leases
                    .acquire(Self::lease_key(target), limit, ttl, Self::now_nanos())
                    .map_err(lease_error)?;
                Ok((outcome, self.config.instance_id.clone()))
            }
            KeyRoute::Peer(peer) => {
                let request = pb::AcquireRequest {
                    namespace: target.namespace.clone(),
                    key: target.key.clone(),
                    limit,
                    ttl: Some(crate::wire::duration_to_proto(ttl)),
                    consistency: Self::HERE,
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.acquire(req).await },
                        request,
                    )
                    .await?;
                let outcome = AcquireOutcome {
                    lease_id: if r.acquired {
                        crate::ids::decode_id(&r.lease_id)
                    } else {
                        None
                    },
                    in_use: r.in_use,
                    retry_after: r.retry_after.map(|d| {
                        Duration::new(
                            u64::try_from(d.seconds).unwrap_or(0),
                            u32::try_from(d.nanos).unwrap_or(0),
                        )
                    }),
                };
                Ok((outcome, r.decided_by))
            }
        }
    }

    /// Extends a lease.
    ///
    /// # Errors
    /// `LeaseNotFound` when it expired or was released; `Unavailable` when the owner is down.
    pub async fn renew(
        &self,
        target: &LeaseTarget,
        lease_id: OpaqueId,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimitError> {
        match self.key_route(&target.namespace, &target.key, target.consistency)? {
            KeyRoute::Here => self
                .leases
                .renew(Self::lease_key(target), lease_id, ttl, Self::now_nanos())
                .map_err(lease_error),
            KeyRoute::Peer(peer) => {
                let request = pb::RenewLeaseRequest {
                    namespace: target.namespace.clone(),
                    key: target.key.clone(),
                    lease_id: crate::ids::encode_id(lease_id),
                    ttl: Some(crate::wire::duration_to_proto(ttl)),
                    consistency: Self::HERE,
                };
                self.call_peer(
                    &peer,
                    deadline,
                    |mut c, req| async move { c.renew_lease(req).await },
                    request,
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Returns a slot; gives the number still held.
    ///
    /// # Errors
    /// `LeaseNotFound` when it expired or was released; `Unavailable` when the owner is down.
    pub async fn release(
        &self,
        target: &LeaseTarget,
        lease_id: OpaqueId,
        deadline: Option<Instant>,
    ) -> Result<u64, RateLimitError> {
        match self.key_route(&target.namespace, &target.key, target.consistency)? {
            KeyRoute::Here => self
                .leases
                .release(Self::lease_key(target), lease_id, Self::now_nanos())
                .map_err(lease_error),
            KeyRoute::Peer(peer) => {
                let request = pb::ReleaseRequest {
                    namespace: target.namespace.clone(),
                    key: target.key.clone(),
                    lease_id: crate::ids::encode_id(lease_id),
                    consistency: Self::HERE,
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.release(req).await },
                        request,
                    )
                    .await?;
                Ok(r.in_use)
            }
        }
    }

    /// The ledger key of the target's budget: one budget per (namespace, key, window).
    fn budget_key<'a>(target: &'a BudgetTarget, window: BudgetWindow) -> BudgetKey<'a> {
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        let tag = match window {
            BudgetWindow::Hour => 1,
            BudgetWindow::Day => 2,
            BudgetWindow::Month => 3,
        };
        let h = xxh3_64_with_seed(target.namespace.as_bytes(), STRICT_KEY_SEED ^ tag);
        BudgetKey {
            hash: xxh3_64_with_seed(target.key.as_bytes(), h),
            namespace: &target.namespace,
            key: &target.key,
        }
    }

    /// The limit and window of the target's budget now, and where it lives (the target's
    /// consistency, else its policy's).
    ///
    /// # Errors
    /// `PolicyNotFound` on `target.policy` for an unknown policy; `InvalidArgument` when the
    /// policy is a rate limit.
    pub fn resolve_budget(
        &self,
        target: &BudgetTarget,
    ) -> Result<(BudgetSpec, Option<Consistency>), RateLimitError> {
        let name = match &target.budget {
            BudgetRef::Inline(spec) => return Ok((*spec, target.consistency)),
            BudgetRef::Policy(name) => name,
        };
        let policies = self.limiter.policies();
        match policies.budget_in(&target.namespace, name) {
            Some((spec, routing)) => Ok((spec, target.consistency.or(routing.consistency))),
            None if policies.get_in(&target.namespace, name).is_some() => {
                Err(RateLimitError::invalid(
                    "target.policy",
                    format!("policy {name:?} is a rate limit, not a cost budget; use Check"),
                ))
            }
            None => Err(RateLimitError::PolicyNotFound {
                field: "target.policy".to_owned(),
                name: name.clone(),
            }),
        }
    }

    fn budget_here(
        &self,
        target: &BudgetTarget,
        spec: &BudgetSpec,
        call: BudgetCall,
    ) -> Result<BudgetAnswer, RateLimitError> {
        let (key, now) = (Self::budget_key(target, spec.window), Self::now_nanos());
        let answer = match call {
            BudgetCall::Reserve { estimate, ttl } => {
                let r = self
                    .budgets
                    .reserve(key, spec, estimate, ttl, now)
                    .map_err(budget_error)?;
                BudgetAnswer {
                    granted: r.granted,
                    reservation_id: r.reservation.map(|res| res.id),
                    usage: r.usage,
                }
            }
            BudgetCall::Commit { id, actual } => BudgetAnswer::usage(
                self.budgets
                    .commit(key, spec, id, actual, now)
                    .map_err(budget_error)?,
            ),
            BudgetCall::Cancel { id } => BudgetAnswer::usage(
                self.budgets
                    .cancel(key, spec, id, now)
                    .map_err(budget_error)?,
            ),
            BudgetCall::Usage => BudgetAnswer::usage(self.budgets.usage(key, spec, now)),
        };
        Ok(answer)
    }

    /// Runs a budget call where the key's budget lives; returns the answer and that instance.
    ///
    /// # Errors
    /// `LeaseNotFound` for an unknown reservation (reported as NOT_FOUND), `ResourceExhausted`
    /// when the ledger is full, `Unavailable` when the owner does not answer within the budget.
    pub async fn budget(
        &self,
        target: &BudgetTarget,
        call: BudgetCall,
        deadline: Option<Instant>,
    ) -> Result<(BudgetAnswer, String), RateLimitError> {
        let (spec, consistency) = self.resolve_budget(target)?;
        let peer = match self.key_route(&target.namespace, &target.key, consistency)? {
            KeyRoute::Here => {
                return Ok((
                    self.budget_here(target, &spec, call)?,
                    self.config.instance_id.clone(),
                ));
            }
            KeyRoute::Peer(peer) => peer,
        };
        // The owner gets the limit resolved here, so a policy change still propagating cannot
        // make the two disagree within one call.
        let wire = Some(crate::wire::encode_budget_target(
            &target.namespace,
            &target.key,
            &spec,
            pb::Consistency::Local,
        ));
        match call {
            BudgetCall::Reserve { estimate, ttl } => {
                let request = pb::ReserveRequest {
                    target: wire,
                    estimate,
                    ttl: Some(crate::wire::duration_to_proto(ttl)),
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.reserve(req).await },
                        request,
                    )
                    .await?;
                let answer = BudgetAnswer {
                    granted: r.granted,
                    reservation_id: crate::ids::decode_id(&r.reservation_id),
                    usage: crate::wire::decode_usage(r.usage.unwrap_or_default()),
                };
                Ok((answer, r.decided_by))
            }
            BudgetCall::Commit { id, actual } => {
                let request = pb::CommitRequest {
                    target: wire,
                    reservation_id: crate::ids::encode_id(id),
                    actual,
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.commit(req).await },
                        request,
                    )
                    .await?;
                Ok((
                    BudgetAnswer::usage(crate::wire::decode_usage(r.usage.unwrap_or_default())),
                    peer,
                ))
            }
            BudgetCall::Cancel { id } => {
                let request = pb::CancelRequest {
                    target: wire,
                    reservation_id: crate::ids::encode_id(id),
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.cancel(req).await },
                        request,
                    )
                    .await?;
                Ok((
                    BudgetAnswer::usage(crate::wire::decode_usage(r.usage.unwrap_or_default())),
                    peer,
                ))
            }
            BudgetCall::Usage => {
                let request = pb::GetUsageRequest {
                    target: wire,
                    ..pb::GetUsageRequest::default()
                };
                let r = self
                    .call_peer(
                        &peer,
                        deadline,
                        |mut c, req| async move { c.get_usage(req).await },
                        request,
                    )
                    .await?;
                Ok((
                    BudgetAnswer::usage(crate::wire::decode_usage(r.usage.unwrap_or_default())),
                    peer,
                ))
            }
        }
    }

    /// The budgets of a namespace: this instance's, and unless `local_only` every other live
    /// member's, asked at once (each with LOCAL consistency) within the forward budget; members
    /// that do not answer in time are listed as unreachable.
    pub async fn list_budgets(
        &self,
        query: &BudgetQuery,
        deadline: Option<Instant>,
    ) -> NamespaceUsage {
        let here = self.budgets.list(
            &query.namespace,
            &query.start_after,
            query.max_keys,
            Self::now_nanos(),
        );
        let own = here
            .budgets
            .into_iter()
            .map(|budget| HeldBudget {
                budget,
                held_by: self.config.instance_id.clone(),
            })
            .collect();
        let mut parts = vec![(own, here.truncated)];
        let mut unreachable = Vec::new();
        if !query.local_only {
            let ring = self.owners.ring();
            let peers: Vec<&str> = ring
                .members()
                .map(|m| m.instance_id.as_str())
                .filter(|id| *id != self.config.instance_id)
                .collect();
            let answers = futures::future::join_all(
                peers
                    .iter()
                    .map(|peer| self.list_budgets_at(peer, query, deadline)),
            )
            .await;
            for (peer, answer) in peers.into_iter().zip(answers) {
                match answer {
                    Ok(part) => parts.push(part),
                    Err(e) => {
                        tracing::debug!(peer, error = %e, "budget listing: member did not answer");
                        unreachable.push(peer.to_owned());
                    }
                }
            }
        }
        let (budgets, truncated) = merge_listings(parts, query.max_keys);
        NamespaceUsage {
            budgets,
            truncated,
            unreachable,
        }
    }

    /// One peer's own budgets of the query's namespace.
    async fn list_budgets_at(
        &self,
        peer: &str,
        query: &BudgetQuery,
        deadline: Option<Instant>,
    ) -> Result<(Vec<HeldBudget>, bool), RateLimitError> {
        let request = pb::GetUsageRequest {
            target: None,
            namespace: query.namespace.clone(),
            limit: u32::try_from(query.max_keys).unwrap_or(u32::MAX),
            start_after: query.start_after.clone(),
            consistency: Self::HERE,
        };
        let r = self
            .call_peer(
                peer,
                deadline,
                |mut c, req| async move { c.get_usage(req).await },
                request,
            )
            .await?;
        let budgets = r
            .keys
            .into_iter()
            .filter_map(crate::wire::decode_key_usage)
            .collect();
        Ok((budgets, r.truncated))
    }

    /// Forgets the state of one item's limit where it lives; whether there was any (always
    /// true for STRICT, where Redis does not say) and who held it.
    ///
    /// # Errors
    /// As `decide` for a bad item; `Unavailable` when the owner or Redis does not answer.
    pub async fn reset(
        &self,
        item: CheckItem,
        deadline: Option<Instant>,
    ) -> Result<(bool, String), RateLimitError> {
        let planned = self.plan(vec![item], false)?;
        let p = &planned[0];
        match &p.route {
            Route::Local => Ok((
                self.limiter.reset(&p.item)?,
                self.config.instance_id.clone(),
            )),
            Route::Strict => {
                let strict = self.strict.as_ref().ok_or_else(|| {
                    RateLimitError::Unavailable("no Redis is configured".to_owned())
                })?;
                let budget = agentmesh_runtime::deadline::budget(
                    deadline,
                    self.config.budget,
                    Instant::now(),
                );
                strict
                    .reset(strict_key_hash(&p.item), budget)
                    .await
                    .map_err(|e| RateLimitError::Unavailable(format!("redis reset failed: {e}")))?;
                Ok((true, "redis".to_owned()))
            }
            Route::Peer(peer) => {
                let item = pb::CheckItem {
                    consistency: pb::Consistency::Local as i32,
                    ..encode_item(&p.item)
                };
                let request = pb::ResetRequest { item: Some(item) };
                let r = self
                    .call_peer(
                        peer,
                        deadline,
                        |mut c, req| async move { c.reset(req).await },
                        request,
                    )
                    .await?;
                Ok((r.existed, r.decided_by))
            }
            Route::NoOwner => Err(RateLimitError::Unavailable(
                "no live rate-limiter member is known".to_owned(),
            )),
        }
    }

    /// One unbatched call to a peer within the budget (capped by the caller's deadline).
    async fn call_peer<Req, Resp, F, Fut>(
        &self,
        peer: &str,
        deadline: Option<Instant>,
        call: F,
        request: Req,
    ) -> Result<Resp, RateLimitError>
    where
        F: FnOnce(
            pb::rate_limiter_client::RateLimiterClient<ClientChannel>,
            tonic::Request<Req>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let budget =
            agentmesh_runtime::deadline::budget(deadline, self.config.budget, Instant::now());
        let mut request = tonic::Request::new(request);
        request.set_timeout(budget);
        match tokio::time::timeout(budget, call(self.owners.client(peer)?, request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(peer_error(peer, &status)),
            Err(_) => Err(RateLimitError::Unavailable(format!(
                "owner {peer} did not answer within {budget:?}"
            ))),
        }
    }
}

#[async_trait::async_trait]
impl Decide for ClusterRouter {
    async fn decide(
        &self,
        items: Vec<CheckItem>,
        all_or_nothing: bool,
        deadline: Option<Instant>,
    ) -> Result<Vec<CheckOutcome>, RateLimitError> {
        let planned = self.plan(items, all_or_nothing)?;
        if planned.iter().all(|p| p.route == Route::Local) {
            let mut outcomes = self.decide_local(&planned, all_or_nothing)?;
            for (o, p) in outcomes.iter_mut().zip(&planned) {
                o.consistency = p.consistency;
            }
            return Ok(outcomes);
        }
        let now = Instant::now();
        let budget = agentmesh_runtime::deadline::budget(deadline, self.config.budget, now);
        let forward_deadline = now + budget;
        // Group by route, keeping each item's position.
        let mut groups: Vec<(Route, Vec<Planned>)> = Vec::new();
        for p in planned {
            match groups.iter_mut().find(|(route, _)| *route == p.route) {
                Some((_, group)) => group.push(p),
                None => groups.push((p.route.clone(), vec![p])),
            }
        }
        let decided = futures::future::join_all(groups.iter().map(|(route, group)| async move {
            let outcomes = match route {
                Route::Local => self.decide_local(group, all_or_nothing)?,
                Route::Strict => self.decide_strict(group, all_or_nothing, budget).await,
                Route::Peer(peer) => {
                    self.decide_peer(peer, group, all_or_nothing, forward_deadline)
                        .await
                }
                Route::NoOwner => self.fail_over(group, DegradedReason::NoMembers, all_or_nothing),
            };
            Ok::<_, RateLimitError>(
                group
                    .iter()
                    .zip(outcomes)
                    .map(|(p, mut o)| {
                        o.consistency = p.consistency;
                        (p.index, o)
                    })
                    .collect::<Vec<_>>(),
            )
        }))
        .await;
        let mut ordered: Vec<Option<CheckOutcome>> = Vec::new();
        for group in decided {
            for (index, outcome) in group? {
                if ordered.len() <= index {
                    ordered.resize(index + 1, None);
                }
                ordered[index] = Some(outcome);
            }
        }
        Ok(ordered.into_iter().flatten().collect())
    }

    fn policy(&self, namespace: &str, name: &str) -> Option<crate::spec::Policy> {
        self.limiter.policy(namespace, name)
    }
}

/// The first `max_keys` keys of several members' listings (each sorted and complete up to its
/// own last key), each key with all its entries sorted by (window, holder); truncated when any
/// listing was or more keys were found.
fn merge_listings(parts: Vec<(Vec<HeldBudget>, bool)>, max_keys: usize) -> (Vec<HeldBudget>, bool) {
    let mut truncated = false;
    let mut by_key: BTreeMap<String, Vec<HeldBudget>> = BTreeMap::new();
    for (budgets, part_truncated) in parts {
        truncated |= part_truncated;
        for b in budgets {
            by_key.entry(b.budget.key.clone()).or_default().push(b);
        }
    }
    truncated |= by_key.len() > max_keys;
    let budgets = by_key
        .into_values()
        .take(max_keys)
        .flat_map(|mut entries| {
            entries
                .sort_by(|a, b| (a.budget.window, &a.held_by).cmp(&(b.budget.window, &b.held_by)));
            entries
        })
        .collect();
    (budgets, truncated)
}

/// The limit, mode and routing of an item, or `PolicyNotFound`.
fn resolve(
    policies: &PolicySet,
    item: &CheckItem,
    index: usize,
) -> Result<(LimitSpec, Mode, crate::spec::PolicyRouting), RateLimitError> {
    match &item.limit {
        LimitRef::Inline(spec) => Ok((*spec, Mode::Enforce, crate::spec::PolicyRouting::default())),
        LimitRef::Default => {
            let p = policies.default_policy();
            Ok((p.spec, p.mode, crate::spec::PolicyRouting::default()))
        }
        LimitRef::Policy(name) => match policies.get_in(&item.namespace, name) {
            Some(p) => Ok((p.spec, p.mode, policies.routing_in(&item.namespace, name))),
            None => Err(policies.not_a_rate_limit(
                &item.namespace,
                name,
                format!("items[{index}].policy"),
            )),
        },
    }
}

/// The ring key of an item: its `(namespace, key)`, so all of one key's limits share an owner.
fn owner_key(item: &CheckItem) -> Vec<u8> {
    let mut key = Vec::with_capacity(item.namespace.len() + item.key.len() + 1);
    key.extend_from_slice(item.namespace.as_bytes());
    key.push(0);
    key.extend_from_slice(item.key.as_bytes());
    key
}

/// The Redis key hash of an item: `(namespace, key, limit identity)` under a fixed seed, so
/// every instance addresses the same state.
fn strict_key_hash(item: &CheckItem) -> u64 {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    let identity = match &item.limit {
        LimitRef::Default => "p:default".to_owned(),
        LimitRef::Policy(name) => format!("p:{name}"),
        LimitRef::Inline(spec) => {
            format!(
                "i:{}:{}:{}",
                spec.limit,
                spec.period.as_nanos(),
                spec.effective_burst()
            )
        }
    };
    let h = xxh3_64_with_seed(identity.as_bytes(), STRICT_KEY_SEED);
    let h = xxh3_64_with_seed(item.namespace.as_bytes(), h);
    xxh3_64_with_seed(item.key.as_bytes(), h)
}

fn policy_label(item: &CheckItem) -> String {
    match &item.limit {
        LimitRef::Default => crate::spec::DEFAULT_POLICY_NAME.to_owned(),
        LimitRef::Policy(name) => name.clone(),
        LimitRef::Inline(_) => String::new(),
    }
}

fn base_outcome(p: &Planned) -> CheckOutcome {
    CheckOutcome {
        allowed: false,
        over_limit: false,
        batch_rejected: false,
        mode: p.mode,
        policy: policy_label(&p.item),
        limit: p.spec.limit,
        remaining: 0,
        retry_after: Some(Duration::ZERO),
        reset_after: Duration::ZERO,
        policy_version: 0,
        degraded: None,
        decided_by: None,
        consistency: p.consistency,
    }
}

fn strict_outcome(p: &Planned, d: &StrictDecision) -> CheckOutcome {
    // In a failed all-or-nothing batch the items that fitted come back denied with a zero wait;
    // a real denial always waits (or can never pass).
    let batch_rejected = !d.allowed && d.retry_after == Some(Duration::ZERO);
    let allowed = d.allowed || (p.mode == Mode::Shadow && !batch_rejected);
    CheckOutcome {
        allowed,
        over_limit: !d.allowed && !batch_rejected,
        batch_rejected,
        remaining: d.remaining,
        retry_after: if allowed {
            Some(Duration::ZERO)
        } else {
            d.retry_after
        },
        reset_after: d.reset_after,
        ..base_outcome(p)
    }
}

fn open_outcome(p: &Planned) -> CheckOutcome {
    CheckOutcome {
        allowed: true,
        ..base_outcome(p)
    }
}

/// A denial whose retry hint is one budget-independent second: the dependency may be back.
fn closed_outcome(p: &Planned) -> CheckOutcome {
    CheckOutcome {
        allowed: false,
        over_limit: true,
        retry_after: Some(Duration::from_secs(1)),
        ..base_outcome(p)
    }
}

/// The item decided locally under its limit divided by `members` (at least 1 unit).
fn fallback_item(p: &Planned, members: u64) -> CheckItem {
    let spec = LimitSpec {
        limit: (p.spec.limit / members).max(1),
        burst: (p.spec.effective_burst() / members).max(1),
        ..p.spec
    };
    CheckItem {
        limit: LimitRef::Inline(spec),
        mode: Some(p.mode),
        consistency: Some(Consistency::Local),
        ..p.item.clone()
    }
}

fn failure_name(f: FailurePolicy) -> &'static str {
    match f {
        FailurePolicy::FailOpen => "fail_open",
        FailurePolicy::FailClosed => "fail_closed",
        FailurePolicy::LocalFallback => "local_fallback",
    }
}

/// The owner of `key`: the ring's, or, when that peer is suspected, the next one that is not
/// (see [`Suspects`]; this instance is never suspected).
fn owner_of<'a>(ring: &'a HashRing, suspects: &BTreeSet<String>, key: &[u8]) -> Option<&'a Member> {
    if suspects.is_empty() {
        ring.owner(key)
    } else {
        ring.owner_excluding(key, |id| suspects.contains(id))
    }
}

/// The live rate-limiter members, the ring over them, and a batcher per peer.
struct Owners {
    self_id: String,
    snapshots: watch::Receiver<Arc<MemberSnapshot>>,
    _watch: MemberWatch,
    ring: Mutex<Arc<HashRing>>,
    peers: Mutex<HashMap<String, PeerBatcher>>,
    metrics: Metrics,
    budget: Duration,
    suspects: Arc<Suspects>,
}

impl Owners {
    fn new(
        watch: MemberWatch,
        self_id: String,
        metrics: Metrics,
        budget: Duration,
        suspects: Arc<Suspects>,
    ) -> Self {
        let snapshots = watch.snapshots();
        let ring = Arc::new(HashRing::new(&snapshots.borrow()));
        Self {
            self_id,
            snapshots,
            _watch: watch,
            ring: Mutex::new(ring),
            peers: Mutex::default(),
            metrics,
            budget,
            suspects,
        }
    }

    /// The ring for the current membership (rebuilt when the epoch moves).
    fn ring(&self) -> Arc<HashRing> {
        let snapshot = self.snapshots.borrow().clone();
        let mut ring = self.ring.lock();
        if ring.epoch() != snapshot.epoch || ring.len() != snapshot.members.len() {
            *ring = Arc::new(HashRing::new(&snapshot));
            let mut peers = self.peers.lock();
            peers.retain(|id, _| snapshot.members.contains_key(id));
            self.suspects.retain(|id| snapshot.members.contains_key(id));
        }
        ring.clone()
    }

    /// The batcher (and channel) of a live peer, started on first use.
    fn batcher(&self, peer: &str) -> Result<PeerBatcher, RateLimitError> {
        let snapshot = self.snapshots.borrow().clone();
        let member = snapshot
            .members
            .get(peer)
            .ok_or_else(|| RateLimitError::Unavailable(format!("member {peer} left")))?;
        let mut peers = self.peers.lock();
        match peers.get(peer) {
            Some(b) if b.addr == member.grpc_addr => Ok(b.clone()),
            _ => {
                let b = PeerBatcher::start(member, &self.metrics, self.budget, &self.suspects)?;
                peers.insert(peer.to_owned(), b.clone());
                Ok(b)
            }
        }
    }

    /// A client to a live peer, for calls that are not batched.
    fn client(
        &self,
        peer: &str,
    ) -> Result<pb::rate_limiter_client::RateLimiterClient<ClientChannel>, RateLimitError> {
        Ok(pb::rate_limiter_client::RateLimiterClient::new(
            self.batcher(peer)?.channel,
        ))
    }

    async fn forward(
        &self,
        peer: &str,
        items: Vec<CheckItem>,
        all_or_nothing: bool,
        deadline: Instant,
    ) -> Result<Vec<CheckOutcome>, RateLimitError> {
        let batcher = self.batcher(peer)?;
        debug_assert_ne!(peer, self.self_id);
        let (reply_tx, reply_rx) = oneshot::channel();
        batcher
            .queue_tx
            .try_send(Job {
                items,
                all_or_nothing,
                deadline,
                reply_tx,
            })
            .map_err(|_| RateLimitError::Unavailable(format!("forward queue to {peer} is full")))?;
        match tokio::time::timeout_at(deadline.into(), reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RateLimitError::Unavailable(format!(
                "forward to {peer} dropped"
            ))),
            Err(_) => Err(RateLimitError::Unavailable(format!(
                "forward to {peer} timed out"
            ))),
        }
    }
}

/// One forward waiting to be sent.
struct Job {
    items: Vec<CheckItem>,
    all_or_nothing: bool,
    deadline: Instant,
    reply_tx: oneshot::Sender<Result<Vec<CheckOutcome>, RateLimitError>>,
}

/// Sends forwards to one peer; see the module docs for the batching.
#[derive(Clone)]
struct PeerBatcher {
    addr: String,
    queue_tx: mpsc::Sender<Job>,
    /// For calls that are not batched (leases).
    channel: ClientChannel,
}

impl PeerBatcher {
    fn start(
        member: &Member,
        metrics: &Metrics,
        budget: Duration,
        suspects: &Arc<Suspects>,
    ) -> Result<Self, RateLimitError> {
        let config = ClientConfig {
            timeout: Duration::from_secs(1),
            connect_timeout: budget.max(Duration::from_millis(100)),
            ..ClientConfig::default()
        };
        let channel = agentmesh_runtime::connect_lazy(&member.grpc_addr, &config, metrics)
            .map_err(|e| RateLimitError::Unavailable(e.to_string()))?;
        let (queue_tx, queue_rx) = mpsc::channel(PEER_QUEUE);
        tokio::spawn(run_batcher(
            channel.clone(),
            queue_rx,
            member.instance_id.clone(),
            suspects.clone(),
        ));
        Ok(Self {
            addr: member.grpc_addr.clone(),
            queue_tx,
            channel,
        })
    }
}

/// A batch sent on the peer stream and not answered yet.
struct Sent {
    at: Instant,
    jobs: Vec<Job>,
}

/// The open `StreamCheck` stream to one peer.
struct PeerLink {
    outbound: mpsc::Sender<pb::StreamCheckRequest>,
    inbound: tonic::Streaming<pb::StreamCheckResponse>,
}

impl PeerLink {
    /// Opens the stream, marked as forwards (the owner does not count their decisions).
    async fn open(channel: ClientChannel) -> Result<Self, RateLimitError> {
        let (outbound, rx) = mpsc::channel(PEER_STREAM_BUFFER);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            crate::wire::FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let mut client = pb::rate_limiter_client::RateLimiterClient::new(channel);
        let opened = tokio::time::timeout(PEER_OPEN_TIMEOUT, client.stream_check(request)).await;
        match opened {
            Ok(Ok(response)) => Ok(Self {
                outbound,
                inbound: response.into_inner(),
            }),
            Ok(Err(status)) => Err(RateLimitError::Unavailable(format!(
                "owner refused the forward stream: {:?}: {}",
                status.code(),
                status.message()
            ))),
            Err(_) => Err(RateLimitError::Unavailable(
                "owner did not open the forward stream in time".to_owned(),
            )),
        }
    }
}

/// The next answer on the link, or never when there is no link.
async fn next_answer(
    link: &mut Option<PeerLink>,
) -> Result<Option<pb::StreamCheckResponse>, tonic::Status> {
    match link {
        Some(link) => link.inbound.message().await,
        None => std::future::pending().await,
    }
}

/// Forwards to one peer over one long-lived `StreamCheck` stream: a batch is written as soon
/// as it is taken from the queue, and jobs that queued meanwhile travel together (at most
/// [`MAX_FORWARD_ITEMS`] items; an all-or-nothing job alone). Answers come back by id, in any
/// order. The stream is reopened on the next forward after it fails or stalls.
///
/// When the stream fails, closes, stalls or cannot be opened, the peer is suspected (its keys
/// go to the next owner) and probed every [`SUSPECT_PROBE`] until a stream opens again.
async fn run_batcher(
    channel: ClientChannel,
    mut queue_rx: mpsc::Receiver<Job>,
    peer: String,
    suspects: Arc<Suspects>,
) {
    let mut link: Option<PeerLink> = None;
    let mut pending: HashMap<u64, Sent> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut carried: Option<Job> = None;
    let mut sweep = tokio::time::interval(PEER_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(SUSPECT_PROBE);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lost = |link: &mut Option<PeerLink>, pending: &mut HashMap<u64, Sent>, reason: &str| {
        fail_all(link, pending, reason);
        suspects.mark(&peer, reason);
    };
    loop {
        let first = if let Some(job) = carried.take() {
            job
        } else {
            tokio::select! {
                biased;
                answer = next_answer(&mut link) => {
                    match answer {
                        Ok(Some(answer)) => settle(&mut pending, answer),
                        Ok(None) => lost(&mut link, &mut pending, "owner closed the forward stream"),
                        Err(status) => lost(
                            &mut link,
                            &mut pending,
                            &format!("forward stream failed: {:?}: {}", status.code(), status.message()),
                        ),
                    }
                    continue;
                }
                job = queue_rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                _ = sweep.tick(), if !pending.is_empty() => {
                    pending.retain(|_, sent| sent.jobs.iter().any(|job| !job.reply_tx.is_closed()));
                    if pending.values().any(|sent| sent.at.elapsed() > PEER_STALL) {
                        lost(&mut link, &mut pending, "owner stopped answering forwards");
                    }
                    continue;
                }
                _ = probe.tick(), if link.is_none() && suspects.contains(&peer) => {
                    if let Ok(opened) = PeerLink::open(channel.clone()).await {
                        link = Some(opened);
                        suspects.clear(&peer);
                    }
                    continue;
                }
            }
        };
        let mut batch = vec![first];
        if !batch[0].all_or_nothing {
            let mut total = batch[0].items.len();
            while let Ok(job) = queue_rx.try_recv() {
                if job.all_or_nothing || total + job.items.len() > MAX_FORWARD_ITEMS {
                    carried = Some(job);
                    break;
                }
                total += job.items.len();
                batch.push(job);
            }
        }
        let now = Instant::now();
        batch.retain(|job| job.deadline > now && !job.reply_tx.is_closed());
        if batch.is_empty() {
            continue;
        }
        if link.is_none() {
            match PeerLink::open(channel.clone()).await {
                Ok(opened) => {
                    link = Some(opened);
                    suspects.clear(&peer);
                }
                Err(e) => {
                    let reason = e.to_string();
                    reply_all(batch, &reason);
                    suspects.mark(&peer, &reason);
                    continue;
                }
            }
        }
        let Some(open) = link.as_ref() else { continue };
        next_id = next_id.wrapping_add(1);
        let all_or_nothing = batch.len() == 1 && batch[0].all_or_nothing;
        let items: Vec<pb::CheckItem> = batch
            .iter()
            .flat_map(|job| job.items.iter())
            .map(|item| pb::CheckItem {
                consistency: pb::Consistency::Local as i32,
                ..encode_item(item)
            })
            .collect();
        let message = pb::StreamCheckRequest {
            id: next_id,
            request: Some(pb::CheckRequest {
                items,
                all_or_nothing,
            }),
        };
        match open.outbound.try_send(message) {
            Ok(()) => {
                pending.insert(
                    next_id,
                    Sent {
                        at: now,
                        jobs: batch,
                    },
                );
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                reply_all(batch, "forward stream to the owner is full");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                reply_all(batch, "forward stream to the owner closed");
                lost(
                    &mut link,
                    &mut pending,
                    "forward stream to the owner closed",
                );
            }
        }
    }
}

/// Hands one answer to the jobs of its batch.
fn settle(pending: &mut HashMap<u64, Sent>, answer: pb::StreamCheckResponse) {
    let Some(sent) = pending.remove(&answer.id) else {
        return; // given up on already
    };
    match answer.response {
        Some(response) => {
            let mut results = response.results.into_iter();
            for job in sent.jobs {
                let outcomes: Vec<CheckOutcome> = results
                    .by_ref()
                    .take(job.items.len())
                    .map(|r| decode_result(&r))
                    .collect();
                let _ = job.reply_tx.send(Ok(outcomes));
            }
        }
        None => {
            let message = answer.error.map_or_else(
                || "owner answered without a result".to_owned(),
                |e| format!("owner answered code {}: {}", e.code, e.message),
            );
            reply_all(sent.jobs, &message);
        }
    }
}

/// Drops the link and fails every batch waiting on it.
fn fail_all(link: &mut Option<PeerLink>, pending: &mut HashMap<u64, Sent>, reason: &str) {
    *link = None;
    for (_, sent) in pending.drain() {
        reply_all(sent.jobs, reason);
    }
}

fn reply_all(jobs: Vec<Job>, reason: &str) {
    for job in jobs {
        let _ = job
            .reply_tx
            .send(Err(RateLimitError::Unavailable(reason.to_owned())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{ListedBudget, Usage};

    fn held(key: &str, window: BudgetWindow, held_by: &str) -> HeldBudget {
        HeldBudget {
            budget: ListedBudget {
                key: key.to_owned(),
                window,
                usage: Usage {
                    limit: 10,
                    spent: 1,
                    reserved: 0,
                    remaining: 9,
                    window_start_nanos: 0,
                    window_end_nanos: 1,
                },
            },
            held_by: held_by.to_owned(),
        }
    }

    fn rows(budgets: &[HeldBudget]) -> Vec<(&str, BudgetWindow, &str)> {
        budgets
            .iter()
            .map(|b| (b.budget.key.as_str(), b.budget.window, b.held_by.as_str()))
            .collect()
    }

    #[test]
    fn test_merged_listings_keep_the_first_keys_with_all_their_holders() {
        use BudgetWindow::{Day, Hour};
        let a = vec![held("k1", Day, "a"), held("k3", Hour, "a")];
        let b = vec![
            held("k1", Hour, "b"),
            held("k1", Day, "b"),
            held("k2", Day, "b"),
        ];
        let (merged, truncated) = merge_listings(vec![(a.clone(), false), (b.clone(), false)], 10);
        assert!(!truncated);
        assert_eq!(
            rows(&merged),
            [
                ("k1", Hour, "b"),
                ("k1", Day, "a"),
                ("k1", Day, "b"),
                ("k2", Day, "b"),
                ("k3", Hour, "a"),
            ]
        );
        // Two keys: k3 is left out, so the answer is truncated.
        let (merged, truncated) = merge_listings(vec![(a.clone(), false), (b, false)], 2);
        assert!(truncated);
        assert_eq!(merged.last().unwrap().budget.key, "k2");
        // A member that truncated its own listing truncates the merged one.
        let (merged, truncated) = merge_listings(vec![(a, true)], 10);
        assert!(truncated);
        assert_eq!(merged.len(), 2);
        assert_eq!(merge_listings(Vec::new(), 10), (Vec::new(), false));
    }
}
