//! The limiter: validates check requests, resolves their limits and decides them against the
//! store, one item at a time or as an atomic all-or-nothing batch.
//!
//! # Semantics
//!
//! - **Cost 0 is a peek**: it spends nothing, is allowed iff one unit is available now, and its
//!   `retry_after` is the wait for one unit.
//! - **Shadow** items get the real decision in `over_limit`, `remaining` and `reset_after`, but
//!   `allowed` is always true (and `retry_after` zero). They are debited only when the real
//!   decision was to allow, so the state is exactly what enforcing would have produced.
//! - **Independent items** (`all_or_nothing = false`) are decided in order, each under its own
//!   shard lock; a key repeated in one request sees the earlier items' debits.
//! - **All or nothing**: the shards of every item are locked in increasing index order (so
//!   concurrent batches cannot deadlock), the items are decided in order against an overlay that
//!   holds the batch's own tentative debits, and the overlay is committed only if no *enforced*
//!   item is over its limit. Otherwise nothing is debited and every item is denied; the items
//!   that were not themselves the cause have `batch_rejected = true` (and a zero
//!   `retry_after`). The numbers of a rejected batch are those of the sequential evaluation, so
//!   the largest `retry_after` is when the batch could pass. Shadow items never fail a batch.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::algorithm::{Decision, Params, State, decide};
use crate::clock::Clock;
use crate::config::LimiterConfig;
use crate::error::{FieldViolation, RateLimitError};
use crate::hash::PrehashedKey;
use crate::policies::PolicySet;
use crate::spec::{
    Consistency, DEFAULT_POLICY_NAME, FailurePolicy, LimitSpec, MAX_ITEMS, MAX_KEY_LEN,
    MAX_NAMESPACE_LEN, Mode, is_valid_identifier, is_valid_policy_name, validate_identifier,
    validate_policy_name,
};
use crate::store::{LimitIdentity, Store, StoreStats};

/// Which limit an item is checked against.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LimitRef {
    /// The default policy.
    #[default]
    Default,
    /// A named policy; `default` names the default policy.
    Policy(String),
    /// A limit given with the request. Its state is keyed by its parameters.
    Inline(LimitSpec),
}

/// One thing to rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// Tenant or service namespace: 1 to `MAX_NAMESPACE_LEN` bytes, no control characters.
    pub namespace: String,
    /// The key within the namespace: 1 to `MAX_KEY_LEN` bytes, no control characters.
    pub key: String,
    /// Units to spend; 0 only peeks.
    pub cost: u64,
    /// The limit to check against.
    pub limit: LimitRef,
    /// Overrides the policy's mode; `None` uses the policy's (inline limits: enforce).
    pub mode: Option<Mode>,
    /// Overrides where the item is decided; `None` uses the policy's (see the router). The
    /// local limiter decides every item here, whatever this says.
    pub consistency: Option<Consistency>,
    /// Overrides what happens when the owner or Redis does not answer; `None` uses the policy's.
    pub on_failure: Option<FailurePolicy>,
}

/// The decision for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// What the caller must do: go ahead or not.
    pub allowed: bool,
    /// The limiter's own verdict regardless of mode: the cost did not fit.
    pub over_limit: bool,
    /// All or nothing only: denied, though within its own limit (or shadowed), because another
    /// enforced item was over its limit. Nothing was debited.
    pub batch_rejected: bool,
    /// The mode the item was decided in.
    pub mode: Mode,
    /// The policy's name, `default`, or empty for an inline limit.
    pub policy: String,
    /// The limit's units per period.
    pub limit: u64,
    /// Units still available after this decision.
    pub remaining: u64,
    /// `Some(ZERO)` when allowed; `Some(d)`: the earliest time the same cost could pass; `None`:
    /// it never can (cost above the burst or the window's limit).
    pub retry_after: Option<Duration>,
    /// Until the key is back to full capacity (GCRA: bucket full; windows: counts expired).
    pub reset_after: Duration,
    /// Version of the policy that applied (its etcd revision; 0 for file, default and inline).
    pub policy_version: u64,
    /// Set when the answer did not come from the item's normal path (owner or Redis), and why.
    pub degraded: Option<DegradedReason>,
    /// Instance that decided, when it was not this one (owner routing).
    pub decided_by: Option<String>,
    /// Where the item was meant to be decided (its route); a degraded answer keeps the route
    /// it could not reach.
    pub consistency: Consistency,
}

/// Why an answer is degraded; exported as the `reason` label of
/// `ratelimit_degraded_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DegradedReason {
    /// Redis did not answer within the budget (STRICT).
    RedisUnavailable,
    /// The owning instance did not answer within the budget (OWNER).
    OwnerUnavailable,
    /// No live rate-limiter member is known (OWNER).
    NoMembers,
}

impl DegradedReason {
    /// The reason's wire and label name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RedisUnavailable => "redis_unavailable",
            Self::OwnerUnavailable => "owner_unavailable",
            Self::NoMembers => "no_members",
        }
    }
}

/// The rate limiter: policies, a clock and a bounded store. `Send + Sync`; share it in an `Arc`.
pub struct Limiter {
    store: Store,
    policies: RwLock<PolicySet>,
    clock: Arc<dyn Clock>,
}

/// An item's limit resolved against a policy set (see [`resolve`]): everything deciding the
/// item needs besides the item itself. The router resolves each item once, when it plans a
/// check, and hands this down with the item.
#[derive(Clone, Copy)]
pub(crate) struct Resolved {
    /// The limit: the inline one, or the policy's.
    pub(crate) spec: LimitSpec,
    params: Params,
    fingerprint: u64,
    version: u64,
    /// The store identity is the parameters (else the item's policy name).
    inline: bool,
    /// The item's mode, else the policy's (inline limits: enforce).
    pub(crate) mode: Mode,
}

/// A batch item with its resolved limit, key hash and shard.
struct Pending<'a> {
    item: &'a CheckItem,
    resolved: Resolved,
    hash: u64,
    shard: usize,
}

/// A batch's tentative states by key hash, each with the item that wrote it last.
type Overlay<'a> = HashMap<u64, (State, &'a Pending<'a>), BuildHasherDefault<PrehashedKey>>;

impl Resolved {
    /// An inline limit, in `mode` (default: enforce); no policy is involved.
    pub(crate) fn inline(spec: LimitSpec, mode: Option<Mode>) -> Self {
        let params = Params::from_spec(&spec);
        Self {
            spec,
            params,
            fingerprint: params.fingerprint(),
            version: 0,
            inline: true,
            mode: mode.unwrap_or_default(),
        }
    }

    fn key_hash(&self, store: &Store, item: &CheckItem) -> u64 {
        let identity = if self.inline {
            LimitIdentity::Inline(&self.params)
        } else {
            LimitIdentity::Policy(policy_name(&item.limit))
        };
        store.key_hash(&item.namespace, &item.key, identity)
    }

    fn outcome(&self, item: &CheckItem, decision: &Decision) -> CheckOutcome {
        let allowed = decision.allowed || self.mode == Mode::Shadow;
        CheckOutcome {
            allowed,
            over_limit: !decision.allowed,
            batch_rejected: false,
            mode: self.mode,
            policy: policy_name(&item.limit).to_owned(),
            limit: self.params.limit(),
            remaining: decision.remaining,
            retry_after: if allowed {
                Some(Duration::ZERO)
            } else {
                decision.retry_after_nanos.map(Duration::from_nanos)
            },
            reset_after: Duration::from_nanos(decision.reset_after_nanos),
            policy_version: self.version,
            degraded: None,
            decided_by: None,
            consistency: Consistency::Local,
        }
    }
}

/// The policy name an item reports, which is also its identity in the store: `default` for
/// the default policy (so `Default` and `Policy("default")` share state), empty for inline.
fn policy_name(limit: &LimitRef) -> &str {
    match limit {
        LimitRef::Default => DEFAULT_POLICY_NAME,
        LimitRef::Policy(name) => name,
        LimitRef::Inline(_) => "",
    }
}

/// The item's limit and mode under `policies`; `None` if the item names a policy `policies`
/// does not have (see [`policy_not_found`]).
pub(crate) fn resolve(policies: &PolicySet, item: &CheckItem) -> Option<Resolved> {
    let compiled = match &item.limit {
        LimitRef::Inline(spec) => return Some(Resolved::inline(*spec, item.mode)),
        LimitRef::Default => policies.default_compiled(),
        LimitRef::Policy(name) => policies.get_compiled_in(&item.namespace, name)?,
    };
    Some(Resolved {
        spec: compiled.policy.spec,
        params: compiled.params,
        fingerprint: compiled.fingerprint,
        version: compiled.version,
        inline: false,
        mode: item.mode.unwrap_or(compiled.policy.mode),
    })
}

/// `PolicyNotFound` for an item naming an unknown policy, `InvalidArgument` when it names a
/// budget policy.
pub(crate) fn policy_not_found(
    policies: &PolicySet,
    index: usize,
    item: &CheckItem,
) -> RateLimitError {
    policies.not_a_rate_limit(
        &item.namespace,
        policy_name(&item.limit),
        format!("items[{index}].policy"),
    )
}

/// Checks every item's fields and the item count, reporting every violation found.
pub fn validate_items(items: &[CheckItem]) -> Result<(), RateLimitError> {
    if items.is_empty() {
        return Err(RateLimitError::invalid(
            "items",
            "must contain at least 1 item",
        ));
    }
    if items.len() > MAX_ITEMS {
        return Err(RateLimitError::invalid(
            "items",
            format!(
                "must contain at most {MAX_ITEMS} items, got {}",
                items.len()
            ),
        ));
    }
    let mut violations: Vec<FieldViolation> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        // Field paths are formatted only for invalid fields: the valid path allocates nothing.
        if !is_valid_identifier(&item.namespace, MAX_NAMESPACE_LEN) {
            let field = format!("items[{i}].namespace");
            validate_identifier(&item.namespace, &field, MAX_NAMESPACE_LEN, &mut violations);
        }
        if !is_valid_identifier(&item.key, MAX_KEY_LEN) {
            let field = format!("items[{i}].key");
            validate_identifier(&item.key, &field, MAX_KEY_LEN, &mut violations);
        }
        match &item.limit {
            LimitRef::Default => {}
            LimitRef::Policy(name) => {
                if !is_valid_policy_name(name) {
                    validate_policy_name(name, &format!("items[{i}].policy"), &mut violations);
                }
            }
            LimitRef::Inline(spec) => {
                if !spec.is_valid() {
                    spec.validate_into(&format!("items[{i}].limit"), &mut violations);
                }
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RateLimitError::InvalidArgument(violations))
    }
}

impl Limiter {
    /// A limiter with an empty store sized by `config`.
    pub fn new(config: &LimiterConfig, policies: PolicySet, clock: Arc<dyn Clock>) -> Self {
        Self {
            store: Store::new(config, &policies),
            policies: RwLock::new(policies),
            clock,
        }
    }

    /// Decides `items` at the clock's current time.
    ///
    /// Errors, before anything is debited: `InvalidArgument` listing every invalid field
    /// (no items, more than `MAX_ITEMS`, bad namespace, key, policy name or inline limit), then
    /// `PolicyNotFound` for the first item naming an unknown policy.
    pub fn check(
        &self,
        items: &[CheckItem],
        all_or_nothing: bool,
    ) -> Result<Vec<CheckOutcome>, RateLimitError> {
        validate_items(items)?;
        let now = self.clock.now_nanos();
        if let [item] = items {
            // A single item is trivially all-or-nothing.
            return Ok(vec![self.check_single(item, now)?]);
        }
        // One snapshot for the whole request, so every policy is known before any debit.
        let policies = self.policies.read().clone();
        for (i, item) in items.iter().enumerate() {
            if let LimitRef::Policy(name) = &item.limit
                && policies.get_compiled_in(&item.namespace, name).is_none()
            {
                return Err(policy_not_found(&policies, i, item));
            }
        }
        if all_or_nothing {
            Ok(self.check_batch(&policies, items, now))
        } else {
            Ok(items
                .iter()
                .map(|item| self.check_one(&policies, item, now))
                .collect())
        }
    }

    /// Forgets the state of one item's limit for its key (it starts full again); whether
    /// there was any. The item's cost is ignored.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad item, `PolicyNotFound` for an unknown policy.
    pub fn reset(&self, item: &CheckItem) -> Result<bool, RateLimitError> {
        validate_items(std::slice::from_ref(item))?;
        let policies = self.policies();
        let resolved =
            resolve(&policies, item).ok_or_else(|| policy_not_found(&policies, 0, item))?;
        Ok(self.reset_resolved(item, &resolved))
    }

    /// As [`Limiter::reset`], for an item validated (with [`validate_items`]) and resolved
    /// (with [`resolve`]) by the caller.
    pub(crate) fn reset_resolved(&self, item: &CheckItem, resolved: &Resolved) -> bool {
        let hash = resolved.key_hash(&self.store, item);
        self.store.lock(self.store.shard_of(hash)).remove(hash)
    }

    /// As [`Limiter::check`], for items validated (with [`validate_items`]) and resolved (with
    /// [`resolve`]) by the caller, as the router does when it plans a check: nothing is
    /// validated or looked up again.
    pub(crate) fn check_resolved(
        &self,
        items: &[(&CheckItem, Resolved)],
        all_or_nothing: bool,
    ) -> Vec<CheckOutcome> {
        let now = self.clock.now_nanos();
        if let [(item, resolved)] = items {
            // A single item is trivially all-or-nothing.
            return vec![self.decide_one(item, resolved, now)];
        }
        if all_or_nothing {
            let pending: Vec<Pending<'_>> = items
                .iter()
                .map(|(item, resolved)| self.pending(item, *resolved))
                .collect();
            self.decide_batch(&pending, now)
        } else {
            items
                .iter()
                .map(|(item, resolved)| self.decide_one(item, resolved, now))
                .collect()
        }
    }

    /// The hot path: one lock (the shard's, which also holds the policies), one lookup.
    fn check_single(&self, item: &CheckItem, now: u64) -> Result<CheckOutcome, RateLimitError> {
        let hash = match &item.limit {
            LimitRef::Inline(spec) => {
                let params = Params::from_spec(spec);
                let identity = LimitIdentity::Inline(&params);
                self.store.key_hash(&item.namespace, &item.key, identity)
            }
            limit => {
                let identity = LimitIdentity::Policy(policy_name(limit));
                self.store.key_hash(&item.namespace, &item.key, identity)
            }
        };
        let mut shard = self.store.lock(self.store.shard_of(hash));
        let policies = shard.policies();
        let resolved =
            resolve(policies, item).ok_or_else(|| policy_not_found(policies, 0, item))?;
        let decision = shard.decide(hash, resolved.fingerprint, &resolved.params, now, item.cost);
        drop(shard);
        Ok(resolved.outcome(item, &decision))
    }

    fn check_one(&self, policies: &PolicySet, item: &CheckItem, now: u64) -> CheckOutcome {
        let resolved = resolve(policies, item).expect("policies were checked to exist");
        self.decide_one(item, &resolved, now)
    }

    fn decide_one(&self, item: &CheckItem, resolved: &Resolved, now: u64) -> CheckOutcome {
        let hash = resolved.key_hash(&self.store, item);
        let decision = self.store.lock(self.store.shard_of(hash)).decide(
            hash,
            resolved.fingerprint,
            &resolved.params,
            now,
            item.cost,
        );
        resolved.outcome(item, &decision)
    }

    fn check_batch(
        &self,
        policies: &PolicySet,
        items: &[CheckItem],
        now: u64,
    ) -> Vec<CheckOutcome> {
        let pending: Vec<Pending<'_>> = items
            .iter()
            .map(|item| {
                let resolved = resolve(policies, item).expect("policies were checked to exist");
                self.pending(item, resolved)
            })
            .collect();
        self.decide_batch(&pending, now)
    }

    /// A batch item with its key hash and shard.
    fn pending<'a>(&self, item: &'a CheckItem, resolved: Resolved) -> Pending<'a> {
        let hash = resolved.key_hash(&self.store, item);
        Pending {
            item,
            shard: self.store.shard_of(hash),
            resolved,
            hash,
        }
    }

    /// Decides a batch all or nothing; see the module docs.
    fn decide_batch(&self, pending: &[Pending<'_>], now: u64) -> Vec<CheckOutcome> {
        let mut shard_ids: Vec<usize> = pending.iter().map(|p| p.shard).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        // Increasing index order on every path: deadlock-free.
        let mut guards: Vec<_> = shard_ids.iter().map(|&i| self.store.lock(i)).collect();
        let guard_of = |shard: usize| {
            shard_ids
                .binary_search(&shard)
                .expect("every item's shard is locked")
        };

        // The batch's own tentative writes by key hash. The same hash means the same limit
        // identity, hence the same params and fingerprint.
        let mut overlay: Overlay<'_> =
            Overlay::with_capacity_and_hasher(pending.len(), BuildHasherDefault::default());
        let mut decisions = Vec::with_capacity(pending.len());
        let mut failed = false;
        for p in pending {
            let guard = guard_of(p.shard);
            let state = match overlay.get(&p.hash) {
                Some((state, _)) => Some(*state),
                None => guards[guard].get(p.hash, p.resolved.fingerprint),
            };
            let decision = decide(&p.resolved.params, state.as_ref(), now, p.item.cost);
            if let Some(next) = decision.next {
                overlay.insert(p.hash, (next, p));
            }
            failed |= !decision.allowed && p.resolved.mode == Mode::Enforce;
            decisions.push(decision);
        }
        if !failed {
            for (hash, (state, p)) in overlay {
                let r = &p.resolved;
                guards[guard_of(p.shard)].put(hash, r.fingerprint, state, &r.params, now);
            }
        }
        drop(guards);

        pending
            .iter()
            .zip(&decisions)
            .map(|(p, decision)| {
                let mut outcome = p.resolved.outcome(p.item, decision);
                if failed {
                    outcome.allowed = false;
                    outcome.batch_rejected = !(outcome.over_limit && outcome.mode == Mode::Enforce);
                    if outcome.batch_rejected {
                        outcome.retry_after = Some(Duration::ZERO);
                    }
                }
                outcome
            })
            .collect()
    }

    /// Replaces the policies; checks in flight finish with the old set, and while the swap runs
    /// (shard by shard) a check may still see the old one. Entries of a policy whose limit
    /// changed read as fresh.
    pub fn set_policies(&self, policies: PolicySet) {
        let count = policies.len();
        // Held across the shard updates so concurrent swaps cannot interleave.
        let mut current = self.policies.write();
        self.store.set_policies(&policies);
        *current = policies;
        drop(current);
        tracing::info!(policies = count, "rate limit policies replaced");
    }

    /// The current policies.
    pub fn policies(&self) -> PolicySet {
        self.policies.read().clone()
    }

    /// Store counters.
    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::clock::ManualClock;
    use crate::spec::{Algorithm, MAX_LIMIT, Policy};

    const SEC: u64 = 1_000_000_000;
    const MS: Duration = Duration::from_millis(1);
    /// 2024-01-01T00:00:00Z.
    const T0: u64 = 1_704_067_200 * SEC;
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn inline(algorithm: Algorithm, limit: u64, period: Duration, burst: u64) -> LimitRef {
        LimitRef::Inline(LimitSpec {
            limit,
            period,
            burst,
            algorithm,
        })
    }

    fn item(key: &str, cost: u64, limit: LimitRef) -> CheckItem {
        CheckItem {
            namespace: "tenant-a".into(),
            key: key.into(),
            cost,
            limit,
            mode: None,
            consistency: None,
            on_failure: None,
        }
    }

    fn shadow(mut item: CheckItem) -> CheckItem {
        item.mode = Some(Mode::Shadow);
        item
    }

    fn policies() -> PolicySet {
        let policy = |name: &str, limit, mode| Policy {
            name: name.into(),
            spec: LimitSpec {
                limit,
                period: Duration::from_secs(1),
                burst: 0,
                algorithm: Algorithm::Gcra,
            },
            mode,
        };
        PolicySet::new(
            Policy::default(),
            vec![
                policy("llm", 5, Mode::Enforce),
                policy("observe", 1, Mode::Shadow),
            ],
        )
        .unwrap()
    }

    fn limiter_with(config: &LimiterConfig) -> (Limiter, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(T0));
        (Limiter::new(config, policies(), clock.clone()), clock)
    }

    fn new_limiter() -> (Limiter, Arc<ManualClock>) {
        limiter_with(&LimiterConfig::default())
    }

    fn one(limiter: &Limiter, item: CheckItem) -> CheckOutcome {
        limiter.check(&[item], false).unwrap().remove(0)
    }

    fn gcra_10_per_sec() -> LimitRef {
        inline(Algorithm::Gcra, 10, Duration::from_secs(1), 0)
    }

    #[test]
    fn test_limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Limiter>();
        assert_send_sync::<PolicySet>();
    }

    #[test]
    fn test_gcra_denies_after_burst_and_reports_retry_after() {
        let (limiter, _clock) = new_limiter();
        for i in 0..10u64 {
            let o = one(&limiter, item("k", 1, gcra_10_per_sec()));
            assert_eq!(
                o,
                CheckOutcome {
                    allowed: true,
                    over_limit: false,
                    batch_rejected: false,
                    mode: Mode::Enforce,
                    policy: String::new(),
                    limit: 10,
                    remaining: 9 - i,
                    retry_after: Some(Duration::ZERO),
                    reset_after: 100 * MS * u32::try_from(i + 1).unwrap(),
                    policy_version: 0,
                    degraded: None,
                    decided_by: None,
                    consistency: Consistency::Local,
                }
            );
        }
        let o = one(&limiter, item("k", 1, gcra_10_per_sec()));
        assert_eq!(
            o,
            CheckOutcome {
                allowed: false,
                over_limit: true,
                batch_rejected: false,
                mode: Mode::Enforce,
                policy: String::new(),
                limit: 10,
                remaining: 0,
                retry_after: Some(100 * MS),
                reset_after: Duration::from_secs(1),
                policy_version: 0,
                degraded: None,
                decided_by: None,
                consistency: Consistency::Local,
            }
        );
    }

    #[test]
    fn test_gcra_refills_as_the_clock_advances() {
        let (limiter, clock) = new_limiter();
        assert!(one(&limiter, item("k", 10, gcra_10_per_sec())).allowed);
        clock.advance(250 * MS);
        let o = one(&limiter, item("k", 3, gcra_10_per_sec()));
        assert!(!o.allowed);
        assert_eq!(o.remaining, 2);
        assert_eq!(o.retry_after, Some(50 * MS));
        clock.advance(50 * MS);
        let o = one(&limiter, item("k", 3, gcra_10_per_sec()));
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.reset_after, Duration::from_secs(1));
    }

    #[test]
    fn test_fixed_window_last_nanosecond_and_next_window() {
        let (limiter, clock) = new_limiter();
        let minute = || inline(Algorithm::FixedWindow, 2, Duration::from_secs(60), 0);
        clock.set(T0 + 60 * SEC - 1);
        assert!(one(&limiter, item("k", 2, minute())).allowed);
        let o = one(&limiter, item("k", 1, minute()));
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Some(Duration::from_nanos(1)));
        assert_eq!(o.reset_after, Duration::from_nanos(1));
        clock.advance(Duration::from_nanos(1));
        let o = one(&limiter, item("k", 1, minute()));
        assert!(o.allowed);
        assert_eq!(o.remaining, 1);
        assert_eq!(o.reset_after, Duration::from_secs(60));
    }

    #[test]
    fn test_sliding_window_halfway_weighs_previous_window_by_half() {
        let (limiter, clock) = new_limiter();
        let minute = || inline(Algorithm::SlidingWindow, 100, Duration::from_secs(60), 0);
        assert!(one(&limiter, item("k", 100, minute())).allowed);
        clock.advance(Duration::from_secs(90));
        let o = one(&limiter, item("k", 0, minute()));
        assert_eq!(o.remaining, 50);
        let o = one(&limiter, item("k", 51, minute()));
        assert!(!o.allowed);
        // 100 * W/60s + 51 <= 100 needs W <= 29.4s: 600ms from now.
        assert_eq!(o.retry_after, Some(600 * MS));
        assert!(one(&limiter, item("k", 50, minute())).allowed);
    }

    #[test]
    fn test_peek_spends_nothing_and_stores_nothing() {
        let (limiter, _clock) = new_limiter();
        let o = one(&limiter, item("k", 0, gcra_10_per_sec()));
        assert!(o.allowed);
        assert_eq!(o.remaining, 10);
        assert_eq!(o.reset_after, Duration::ZERO);
        assert_eq!(limiter.stats().entries, 0);
        assert!(one(&limiter, item("k", 10, gcra_10_per_sec())).allowed);
        let o = one(&limiter, item("k", 0, gcra_10_per_sec()));
        assert!(!o.allowed);
        assert!(o.over_limit);
        assert_eq!(o.retry_after, Some(100 * MS));
        assert_eq!(o.remaining, 0);
    }

    #[test]
    fn test_cost_over_burst_reports_no_retry_after() {
        let (limiter, _clock) = new_limiter();
        let o = one(&limiter, item("k", 11, gcra_10_per_sec()));
        assert!(!o.allowed);
        assert_eq!(o.retry_after, None);
        assert_eq!(o.remaining, 10);
        let day = inline(Algorithm::FixedWindow, 5, Duration::from_secs(86_400), 0);
        assert_eq!(one(&limiter, item("k", 6, day)).retry_after, None);
        let slide = inline(Algorithm::SlidingWindow, 5, Duration::from_secs(60), 0);
        assert_eq!(one(&limiter, item("k", u64::MAX, slide)).retry_after, None);
        assert_eq!(limiter.stats().entries, 0);
    }

    #[test]
    fn test_shadow_allows_but_reports_over_limit_and_state_mirrors_enforce() {
        for algorithm in [
            Algorithm::Gcra,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let (limiter, clock) = new_limiter();
            let spec = || inline(algorithm, 3, Duration::from_secs(1), 0);
            for step in 0..12 {
                let cost = [1, 2, 0, 3][step % 4];
                let enforced = one(&limiter, item("enforced", cost, spec()));
                let shadowed = one(&limiter, shadow(item("shadowed", cost, spec())));
                assert!(shadowed.allowed);
                assert_eq!(shadowed.mode, Mode::Shadow);
                assert_eq!(shadowed.retry_after, Some(Duration::ZERO));
                assert_eq!(
                    (
                        shadowed.over_limit,
                        shadowed.remaining,
                        shadowed.reset_after
                    ),
                    (
                        enforced.over_limit,
                        enforced.remaining,
                        enforced.reset_after
                    ),
                    "{algorithm} step {step}"
                );
                assert_eq!(enforced.allowed, !enforced.over_limit);
                clock.advance(150 * MS);
            }
        }
    }

    #[test]
    fn test_policy_mode_applies_unless_item_overrides_it() {
        let (limiter, _clock) = new_limiter();
        let observe = || item("k", 1, LimitRef::Policy("observe".into()));
        assert!(one(&limiter, observe()).allowed);
        let o = one(&limiter, observe());
        assert!(o.allowed);
        assert!(o.over_limit);
        assert_eq!(
            (o.mode, o.policy.as_str(), o.limit),
            (Mode::Shadow, "observe", 1)
        );
        let mut enforced = observe();
        enforced.mode = Some(Mode::Enforce);
        let o = one(&limiter, enforced);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn test_default_policy_is_the_old_global_bucket_and_shared_with_its_name() {
        let (limiter, _clock) = new_limiter();
        let o = one(&limiter, item("k", 59, LimitRef::Default));
        assert_eq!(
            (o.policy.as_str(), o.limit, o.remaining),
            ("default", 60, 1)
        );
        let o = one(&limiter, item("k", 1, LimitRef::Policy("default".into())));
        assert_eq!((o.policy.as_str(), o.remaining), ("default", 0));
        let o = one(&limiter, item("k", 1, LimitRef::Default));
        assert_eq!(o.retry_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn test_different_limits_on_the_same_key_keep_separate_state() {
        let (limiter, _clock) = new_limiter();
        let per_sec = inline(Algorithm::Gcra, 1, Duration::from_secs(1), 0);
        let per_min = inline(Algorithm::Gcra, 1, Duration::from_secs(60), 0);
        let out = limiter
            .check(
                &[
                    item("k", 1, per_sec.clone()),
                    item("k", 1, per_min),
                    item("k", 1, LimitRef::Policy("llm".into())),
                    item("k", 1, per_sec),
                ],
                false,
            )
            .unwrap();
        let allowed: Vec<_> = out.iter().map(|o| o.allowed).collect();
        assert_eq!(allowed, [true, true, true, false]);
        assert_eq!(limiter.stats().entries, 3);
        // Another namespace is another key.
        let mut other = item("k", 1, LimitRef::Policy("llm".into()));
        other.namespace = "tenant-b".into();
        assert_eq!(one(&limiter, other).remaining, 4);
    }

    #[test]
    fn test_changed_policy_reads_old_state_as_fresh() {
        let (limiter, _clock) = new_limiter();
        let llm = || item("k", 5, LimitRef::Policy("llm".into()));
        assert!(one(&limiter, llm()).allowed);
        assert!(!one(&limiter, llm()).allowed);
        // Same policy, same limit: state survives a reload.
        limiter.set_policies(policies());
        assert!(!one(&limiter, llm()).allowed);
        let bigger = Policy {
            name: "llm".into(),
            spec: LimitSpec {
                limit: 6,
                period: Duration::from_secs(1),
                burst: 0,
                algorithm: Algorithm::Gcra,
            },
            mode: Mode::Enforce,
        };
        limiter.set_policies(PolicySet::new(Policy::default(), vec![bigger]).unwrap());
        let o = one(&limiter, llm());
        assert!(o.allowed);
        assert_eq!(o.remaining, 1);
        assert!(limiter.policies().get("observe").is_none());
    }

    #[test]
    fn test_all_or_nothing_debits_nothing_when_an_enforced_item_fails() {
        let (limiter, _clock) = new_limiter();
        assert!(one(&limiter, item("b", 9, gcra_10_per_sec())).allowed);
        let batch = [
            item("a", 5, gcra_10_per_sec()),
            item("b", 2, gcra_10_per_sec()),
        ];
        let out = limiter.check(&batch, true).unwrap();
        assert!(!out[0].allowed);
        assert!(!out[0].over_limit);
        assert!(out[0].batch_rejected);
        assert_eq!(out[0].retry_after, Some(Duration::ZERO));
        assert!(!out[1].allowed);
        assert!(out[1].over_limit);
        assert!(!out[1].batch_rejected);
        assert_eq!(out[1].retry_after, Some(100 * MS));
        // Nothing was debited: "a" still has 10, "b" still 1.
        assert_eq!(one(&limiter, item("a", 0, gcra_10_per_sec())).remaining, 10);
        assert_eq!(one(&limiter, item("b", 0, gcra_10_per_sec())).remaining, 1);
        assert_eq!(limiter.stats().entries, 1);
    }

    #[test]
    fn test_all_or_nothing_debits_everything_when_all_fit() {
        let (limiter, _clock) = new_limiter();
        let batch = [
            item("a", 5, gcra_10_per_sec()),
            item("b", 10, gcra_10_per_sec()),
            item("c", 1, LimitRef::Policy("llm".into())),
        ];
        let out = limiter.check(&batch, true).unwrap();
        assert!(
            out.iter()
                .all(|o| o.allowed && !o.over_limit && !o.batch_rejected)
        );
        let remaining: Vec<_> = out.iter().map(|o| o.remaining).collect();
        assert_eq!(remaining, [5, 0, 4]);
        assert_eq!(one(&limiter, item("a", 0, gcra_10_per_sec())).remaining, 5);
        assert_eq!(limiter.stats().entries, 3);
    }

    #[test]
    fn test_all_or_nothing_same_key_twice_sees_its_own_debit() {
        let (limiter, _clock) = new_limiter();
        let out = limiter
            .check(
                &[
                    item("k", 6, gcra_10_per_sec()),
                    item("k", 4, gcra_10_per_sec()),
                ],
                true,
            )
            .unwrap();
        assert!(out.iter().all(|o| o.allowed));
        assert_eq!((out[0].remaining, out[1].remaining), (4, 0));
        assert_eq!(one(&limiter, item("k", 0, gcra_10_per_sec())).remaining, 0);

        let (limiter, _clock) = new_limiter();
        let out = limiter
            .check(
                &[
                    item("k", 6, gcra_10_per_sec()),
                    item("k", 5, gcra_10_per_sec()),
                ],
                true,
            )
            .unwrap();
        assert!(out[0].batch_rejected && !out[0].allowed);
        assert!(out[1].over_limit && !out[1].batch_rejected);
        // The second item waits for the first one's units too: the batch as a whole.
        assert_eq!(out[1].retry_after, Some(100 * MS));
        assert_eq!(one(&limiter, item("k", 0, gcra_10_per_sec())).remaining, 10);
    }

    #[test]
    fn test_all_or_nothing_shadow_items_never_fail_the_batch() {
        let (limiter, _clock) = new_limiter();
        let out = limiter
            .check(
                &[
                    shadow(item("s", 11, gcra_10_per_sec())),
                    item("e", 3, gcra_10_per_sec()),
                    item("o", 1, LimitRef::Policy("observe".into())),
                    item("o", 1, LimitRef::Policy("observe".into())),
                ],
                true,
            )
            .unwrap();
        assert!(out.iter().all(|o| o.allowed && !o.batch_rejected));
        let over: Vec<_> = out.iter().map(|o| o.over_limit).collect();
        assert_eq!(over, [true, false, false, true]);
        // The enforced item and the shadow item that fit were debited, like enforcing would.
        assert_eq!(one(&limiter, item("e", 0, gcra_10_per_sec())).remaining, 7);
        let o = one(&limiter, item("o", 0, LimitRef::Policy("observe".into())));
        assert!(o.over_limit);

        // A failing enforced item rejects the shadow items too: the batch did not happen.
        let out = limiter
            .check(
                &[
                    shadow(item("s", 1, gcra_10_per_sec())),
                    item("e", 8, gcra_10_per_sec()),
                ],
                true,
            )
            .unwrap();
        assert!(!out[0].allowed && out[0].batch_rejected && !out[0].over_limit);
        assert!(!out[1].allowed && !out[1].batch_rejected && out[1].over_limit);
        assert_eq!(one(&limiter, item("s", 0, gcra_10_per_sec())).remaining, 10);
    }

    #[test]
    fn test_pre_resolved_items_are_decided_exactly_as_check_decides_them() {
        let (checked, clock) = new_limiter();
        let resolved_here = Limiter::new(&LimiterConfig::default(), policies(), clock.clone());
        let batches: [(Vec<CheckItem>, bool); 5] = [
            (vec![item("k", 4, LimitRef::Policy("llm".into()))], false),
            (
                vec![
                    item("k", 1, LimitRef::Default),
                    shadow(item("s", 11, gcra_10_per_sec())),
                    item("o", 2, LimitRef::Policy("observe".into())),
                ],
                false,
            ),
            (
                vec![
                    item("k", 1, LimitRef::Policy("llm".into())),
                    item("e", 3, gcra_10_per_sec()),
                ],
                true,
            ),
            (
                vec![
                    shadow(item("s", 1, gcra_10_per_sec())),
                    item("k", 5, LimitRef::Policy("llm".into())),
                ],
                true,
            ),
            (vec![item("k", 0, LimitRef::Policy("llm".into()))], true),
        ];
        for (items, all_or_nothing) in &batches {
            let policies = resolved_here.policies();
            let pairs: Vec<(&CheckItem, Resolved)> = items
                .iter()
                .map(|item| (item, resolve(&policies, item).unwrap()))
                .collect();
            assert_eq!(
                resolved_here.check_resolved(&pairs, *all_or_nothing),
                checked.check(items, *all_or_nothing).unwrap()
            );
            clock.advance(100 * MS);
        }
        let item = item("k", 0, LimitRef::Policy("llm".into()));
        let resolved = resolve(&resolved_here.policies(), &item).unwrap();
        assert_eq!(
            resolved_here.reset_resolved(&item, &resolved),
            checked.reset(&item).unwrap()
        );
    }

    #[test]
    fn test_validation_collects_every_violation_with_field_paths() {
        let (limiter, _clock) = new_limiter();
        let items = [
            CheckItem {
                namespace: String::new(),
                key: "k\n".into(),
                cost: 1,
                limit: LimitRef::Default,
                mode: None,
                consistency: None,
                on_failure: None,
            },
            item("ok", 1, LimitRef::Policy("no such".into())),
            CheckItem {
                namespace: "n".repeat(MAX_NAMESPACE_LEN + 1),
                key: "k".repeat(MAX_KEY_LEN + 1),
                cost: 1,
                limit: inline(Algorithm::Gcra, 0, Duration::ZERO, MAX_LIMIT + 1),
                mode: None,
                consistency: None,
                on_failure: None,
            },
            item("ok", 1, LimitRef::Policy("unknown".into())),
        ];
        let Err(RateLimitError::InvalidArgument(violations)) = limiter.check(&items, false) else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "items[0].namespace",
                "items[0].key",
                "items[1].policy",
                "items[2].namespace",
                "items[2].key",
                "items[2].limit.limit",
                "items[2].limit.period",
                "items[2].limit.burst",
            ]
        );
        assert_eq!(violations[0].description, "must not be empty");
        assert_eq!(
            violations[1].description,
            "must not contain ASCII control characters"
        );
        assert_eq!(
            violations[3].description,
            "must be at most 128 bytes, got 129"
        );
        assert_eq!(
            violations[4].description,
            "must be at most 512 bytes, got 513"
        );
        assert_eq!(limiter.stats().entries, 0);
    }

    #[test]
    fn test_item_count_is_bounded() {
        let (limiter, _clock) = new_limiter();
        let err = limiter.check(&[], false).unwrap_err();
        assert_eq!(
            err,
            RateLimitError::invalid("items", "must contain at least 1 item")
        );
        let items = vec![item("k", 1, LimitRef::Default); MAX_ITEMS + 1];
        let err = limiter.check(&items, true).unwrap_err();
        assert_eq!(
            err,
            RateLimitError::invalid("items", "must contain at most 1000 items, got 1001")
        );
        let items = vec![item("k", 0, LimitRef::Default); MAX_ITEMS];
        assert_eq!(limiter.check(&items, true).unwrap().len(), MAX_ITEMS);
    }

    #[test]
    fn test_unknown_policy_fails_before_anything_is_debited() {
        let (limiter, _clock) = new_limiter();
        let items = [
            item("k", 1, gcra_10_per_sec()),
            item("k", 1, LimitRef::Policy("llm".into())),
            item("k", 1, LimitRef::Policy("missing".into())),
        ];
        let err = limiter.check(&items, false).unwrap_err();
        assert_eq!(
            err,
            RateLimitError::PolicyNotFound {
                field: "items[2].policy".into(),
                name: "missing".into(),
            }
        );
        assert_eq!(limiter.stats().entries, 0);
        // The single-item path resolves under the shard lock and fails the same way.
        for all_or_nothing in [false, true] {
            let err = limiter.check(&items[2..], all_or_nothing).unwrap_err();
            assert_eq!(
                err,
                RateLimitError::PolicyNotFound {
                    field: "items[0].policy".into(),
                    name: "missing".into(),
                }
            );
        }
    }

    #[test]
    fn test_a_check_naming_a_budget_policy_is_invalid_on_every_path() {
        use crate::budget::{BudgetSpec, BudgetWindow};
        use crate::spec::{PolicyBody, ScopedPolicy};
        let (limiter, _clock) = new_limiter();
        let usd = ScopedPolicy {
            namespace: "tenant-a".into(),
            name: "usd".into(),
            body: PolicyBody::Budget(BudgetSpec {
                limit: 100,
                window: BudgetWindow::Month,
            }),
            consistency: None,
            on_failure: None,
            version: 1,
        };
        limiter.set_policies(limiter.policies().with_scoped(&[usd]).unwrap());
        let budget = item("k", 1, LimitRef::Policy("usd".into()));
        let expect = |err: RateLimitError, field: &str| {
            let RateLimitError::InvalidArgument(v) = err else {
                panic!("{err:?}")
            };
            assert_eq!(v[0].field, field);
            assert!(v[0].description.contains("cost budget"), "{v:?}");
        };
        // The single-item path, the batch path and Reset.
        expect(
            limiter
                .check(std::slice::from_ref(&budget), false)
                .unwrap_err(),
            "items[0].policy",
        );
        let batch = [item("k", 1, gcra_10_per_sec()), budget.clone()];
        expect(limiter.check(&batch, false).unwrap_err(), "items[1].policy");
        expect(limiter.reset(&budget).unwrap_err(), "items[0].policy");
        assert_eq!(limiter.stats().entries, 0);
    }

    #[test]
    fn test_extreme_costs_periods_and_limits_do_not_panic() {
        let (limiter, _clock) = new_limiter();
        let year_long = || inline(Algorithm::Gcra, 1, Duration::from_secs(366 * 86_400), 0);
        let dense = || inline(Algorithm::Gcra, MAX_LIMIT, MS, 0);
        let o = one(&limiter, item("k", u64::MAX, year_long()));
        assert_eq!((o.allowed, o.retry_after, o.remaining), (false, None, 1));
        assert!(one(&limiter, item("k", 1, year_long())).allowed);
        let o = one(&limiter, item("k", 1, year_long()));
        assert_eq!(o.retry_after, Some(Duration::from_secs(366 * 86_400)));
        let o = one(&limiter, item("k", MAX_LIMIT, dense()));
        assert_eq!((o.allowed, o.remaining, o.reset_after), (true, 0, MS));
        let o = one(&limiter, item("k", 1_000_000, dense()));
        assert_eq!(o.retry_after, Some(Duration::from_nanos(1)));
        for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let o = one(
                &limiter,
                item("w", u64::MAX, inline(algorithm, MAX_LIMIT, MS, 0)),
            );
            assert_eq!((o.allowed, o.retry_after), (false, None));
            let o = one(
                &limiter,
                item("w", MAX_LIMIT, inline(algorithm, MAX_LIMIT, MS, 0)),
            );
            assert!(o.allowed);
        }
    }

    #[test]
    fn test_clock_jumps_give_sane_answers() {
        for algorithm in [
            Algorithm::Gcra,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let (limiter, clock) = new_limiter();
            let spec = || inline(algorithm, 10, Duration::from_secs(1), 0);
            assert!(one(&limiter, item("k", 10, spec())).allowed);
            // A year back: the spent units still count, but only for about one period.
            clock.set(T0 - u64::try_from(YEAR.as_nanos()).unwrap());
            let o = one(&limiter, item("k", 1, spec()));
            assert!(!o.allowed, "{algorithm}");
            assert!(
                o.retry_after.unwrap() <= Duration::from_secs(2),
                "{algorithm}: {o:?}"
            );
            assert!(
                o.reset_after <= Duration::from_secs(2),
                "{algorithm}: {o:?}"
            );
            clock.advance(Duration::from_secs(2));
            assert!(one(&limiter, item("k", 10, spec())).allowed, "{algorithm}");
            // A century forward: everything has refilled.
            clock.set(T0 + 100 * u64::try_from(YEAR.as_nanos()).unwrap());
            let o = one(&limiter, item("k", 10, spec()));
            assert!(o.allowed, "{algorithm}");
            assert_eq!(o.remaining, 0);
            assert!(o.reset_after <= Duration::from_secs(2));
            // And the end of u64 time.
            clock.set(u64::MAX);
            assert!(one(&limiter, item("k", 10, spec())).allowed, "{algorithm}");
            assert!(!one(&limiter, item("k", 1, spec())).allowed, "{algorithm}");
        }
    }

    #[test]
    fn test_eviction_keeps_store_bounded_and_prefers_keys_at_rest() {
        let (limiter, clock) = limiter_with(&LimiterConfig {
            max_keys: 64,
            shards: 4,
        });
        // Keys that come to rest after 100ms, inserted while time moves on.
        for i in 0..1_000 {
            assert!(one(&limiter, item(&format!("k{i}"), 1, gcra_10_per_sec())).allowed);
            assert!(limiter.stats().entries <= 64);
            clock.advance(10 * MS);
        }
        let stats = limiter.stats();
        assert_eq!(stats.capacity, 64);
        assert!(stats.evicted_idle > 0, "{stats:?}");
        assert_eq!(stats.evicted_active, 0, "{stats:?}");
        // With a frozen clock nothing comes to rest: the bound holds through active evictions.
        for i in 0..1_000 {
            assert!(one(&limiter, item(&format!("x{i}"), 1, gcra_10_per_sec())).allowed);
        }
        let stats = limiter.stats();
        assert!(stats.entries <= 64, "{stats:?}");
        assert!(stats.evicted_active > 0, "{stats:?}");
    }

    #[test]
    fn test_concurrent_checks_never_over_admit() {
        let (limiter, _clock) = new_limiter();
        let limiter = Arc::new(limiter);
        let allowed = Arc::new(AtomicU64::new(0));
        let spec = || inline(Algorithm::Gcra, 1000, Duration::from_secs(1), 0);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                let allowed = Arc::clone(&allowed);
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        if one(&limiter, item("hot", 1, spec())).allowed {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(allowed.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn test_concurrent_batches_are_atomic_and_deadlock_free() {
        let (limiter, _clock) = limiter_with(&LimiterConfig {
            max_keys: 1000,
            shards: 16,
        });
        let limiter = Arc::new(limiter);
        let admitted = Arc::new(AtomicU64::new(0));
        let spec = || inline(Algorithm::FixedWindow, 500, Duration::from_secs(60), 0);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let limiter = Arc::clone(&limiter);
                let admitted = Arc::clone(&admitted);
                std::thread::spawn(move || {
                    for i in 0..500 {
                        // Every batch takes 1 unit from each of 20 shared keys, in a different
                        // order per thread and iteration.
                        let mut keys: Vec<usize> = (0..20).collect();
                        keys.rotate_left((t * 7 + i) % 20);
                        if t % 2 == 1 {
                            keys.reverse();
                        }
                        let batch: Vec<_> = keys
                            .iter()
                            .map(|k| item(&format!("k{k}"), 1, spec()))
                            .collect();
                        let out = limiter.check(&batch, true).unwrap();
                        let all = out.iter().all(|o| o.allowed);
                        assert!(all || out.iter().all(|o| !o.allowed));
                        if all {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Each key admits exactly 500 units, and every batch debits each key once.
        assert_eq!(admitted.load(Ordering::Relaxed), 500);
        for k in 0..20 {
            let o = one(&limiter, item(&format!("k{k}"), 0, spec()));
            assert_eq!(o.remaining, 0);
        }
    }
}
