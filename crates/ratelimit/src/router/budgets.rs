//! Cost budgets: calls run where the key's budget lives (the limit resolved here travels
//! with a forward), and listings merged across members.

use std::collections::BTreeMap;
use std::time::Instant;

use agentmesh_proto::ratelimit::v1 as pb;

use crate::budget::{BudgetError, BudgetKey, BudgetSpec, BudgetWindow};
use crate::error::RateLimitError;
use crate::spec::Consistency;

use super::keys::KeyRoute;
use super::{
    BudgetAnswer, BudgetCall, BudgetQuery, BudgetRef, BudgetTarget, ClusterRouter, HeldBudget,
    NamespaceUsage, STRICT_KEY_SEED,
};

fn budget_error(e: BudgetError) -> RateLimitError {
    match e {
        BudgetError::UnknownReservation(_) => RateLimitError::LeaseNotFound(e.to_string()),
        BudgetError::Full(_) => RateLimitError::ResourceExhausted(e.to_string()),
    }
}

impl ClusterRouter {
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
                if !r.granted {
                    self.metrics.budget_denied(&target.namespace);
                }
                BudgetAnswer {
                    granted: r.granted,
                    reservation_id: r.reservation.map(|res| res.id),
                    usage: r.usage,
                }
            }
            BudgetCall::Commit { id, actual } => {
                let usage = self
                    .budgets
                    .commit(key, spec, id, actual, now)
                    .map_err(budget_error)?;
                self.metrics.budget_spent(&target.namespace, actual);
                BudgetAnswer::usage(usage)
            }
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
