//! Planning a check: each item validated and resolved once, and routed (decided here, at its
//! owner, or in Redis).

use crate::error::{FieldViolation, RateLimitError};
use crate::limiter::{CheckItem, LimitRef, Resolved, policy_not_found, resolve, validate_items};
use crate::policies::PolicySet;
use crate::spec::{Algorithm, Consistency, FailurePolicy, PolicyRouting};

use super::ClusterRouter;
use super::owners::owner_of;

/// Where one item is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Local,
    Strict,
    Peer(String),
    /// OWNER with no live member known.
    NoOwner,
}

/// An item with what routing needs to know about it.
pub(super) struct Planned {
    pub(super) index: usize,
    pub(super) item: CheckItem,
    /// Its limit and mode, resolved once here; the limiter decides with them.
    pub(super) resolved: Resolved,
    pub(super) on_failure: FailurePolicy,
    /// The consistency asked for (an OWNER item this instance owns is routed `Local`).
    pub(super) consistency: Consistency,
    pub(super) route: Route,
}

impl ClusterRouter {
    /// Resolves every item's limit, mode, failure policy and route; rejects what cannot be
    /// decided (unknown policies, STRICT on a window algorithm, a split all-or-nothing batch).
    pub(super) fn plan(
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
            let resolved = resolve(&policies, &item)
                .ok_or_else(|| policy_not_found(&policies, index, &item))?;
            let routing = routing(&policies, &item);
            let consistency = item
                .consistency
                .or(routing.consistency)
                .unwrap_or(self.config.default_consistency);
            let on_failure = item.on_failure.or(routing.on_failure).unwrap_or_default();
            let route = match consistency {
                Consistency::Local => Route::Local,
                Consistency::Strict if resolved.spec.algorithm != Algorithm::Gcra => {
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
            planned.push(Planned {
                index,
                item,
                resolved,
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
}

/// The routing settings of the policy an item names (defaults for the default policy and for
/// inline limits).
fn routing(policies: &PolicySet, item: &CheckItem) -> PolicyRouting {
    match &item.limit {
        LimitRef::Policy(name) => policies.routing_in(&item.namespace, name),
        LimitRef::Default | LimitRef::Inline(_) => PolicyRouting::default(),
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
