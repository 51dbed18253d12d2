//! Deciding a planned check where each item is routed: the local limiter, the owner (through
//! its batcher) or Redis; and resetting one item's limit where it lives.

use std::time::{Duration, Instant};

use agentmesh_proto::ratelimit::v1 as pb;

use crate::decide::Decide;
use crate::error::RateLimitError;
use crate::limiter::{CheckItem, CheckOutcome, DegradedReason, LimitRef, Resolved};
use crate::spec::Mode;
use crate::strict::{StrictDecision, StrictItem};
use crate::wire::encode_item;

use super::fail_over::base_outcome;
use super::plan::{Planned, Route};
use super::{ClusterRouter, STRICT_KEY_SEED};

impl ClusterRouter {
    /// Decides `planned` in the local limiter with the limits resolved when it was planned
    /// (the items are borrowed, not copied).
    fn decide_local(&self, planned: &[Planned], all_or_nothing: bool) -> Vec<CheckOutcome> {
        let items: Vec<(&CheckItem, Resolved)> =
            planned.iter().map(|p| (&p.item, p.resolved)).collect();
        self.limiter.check_resolved(&items, all_or_nothing)
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
                shadow: p.resolved.mode == Mode::Shadow,
                key_hash: strict_key_hash(&p.item),
                limit: p.resolved.spec.limit,
                period: p.resolved.spec.period,
                burst: p.resolved.spec.effective_burst(),
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
                self.limiter.reset_resolved(&p.item, &p.resolved),
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
            let mut outcomes = self.decide_local(&planned, all_or_nothing);
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
                Route::Local => self.decide_local(group, all_or_nothing),
                Route::Strict => self.decide_strict(group, all_or_nothing, budget).await,
                Route::Peer(peer) => {
                    self.decide_peer(peer, group, all_or_nothing, forward_deadline)
                        .await
                }
                Route::NoOwner => self.fail_over(group, DegradedReason::NoMembers, all_or_nothing),
            };
            group
                .iter()
                .zip(outcomes)
                .map(|(p, mut o)| {
                    o.consistency = p.consistency;
                    (p.index, o)
                })
                .collect::<Vec<_>>()
        }))
        .await;
        let mut ordered: Vec<Option<CheckOutcome>> = Vec::new();
        for group in decided {
            for (index, outcome) in group {
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

fn strict_outcome(p: &Planned, d: &StrictDecision) -> CheckOutcome {
    // In a failed all-or-nothing batch the items that fitted come back denied with a zero wait;
    // a real denial always waits (or can never pass).
    let batch_rejected = !d.allowed && d.retry_after == Some(Duration::ZERO);
    let allowed = d.allowed || (p.resolved.mode == Mode::Shadow && !batch_rejected);
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
