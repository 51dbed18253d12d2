//! What callers ask the cluster router for, as plain domain types: lease and budget targets,
//! budget operations and their answers, namespace usage listings and their bounds.

use std::time::Duration;

use crate::budget::{BudgetSpec, ListedBudget, Usage};
use crate::ids::OpaqueId;
use crate::spec::Consistency;

/// Keys a namespace usage listing gives when the caller sets no bound.
pub const DEFAULT_LISTED_KEYS: usize = 100;
/// Most keys one namespace usage listing gives.
pub const MAX_LISTED_KEYS: usize = 1000;

/// Which (namespace, key) a lease call is about, and where it is decided.
#[derive(Clone, Debug)]
pub struct LeaseTarget {
    /// Namespace of the key.
    pub namespace: String,
    /// The key whose concurrency is limited.
    pub key: String,
    /// LOCAL or OWNER; `None` = the cluster default.
    pub consistency: Option<Consistency>,
}

/// Which budget a call is about.
#[derive(Clone, Debug)]
pub struct BudgetTarget {
    /// Namespace of the key.
    pub namespace: String,
    /// The key the budget belongs to.
    pub key: String,
    /// Its limit and calendar window, inline or through a budget policy.
    pub budget: BudgetRef,
    /// LOCAL or OWNER; `None` = the policy's, else the cluster default.
    pub consistency: Option<Consistency>,
}

/// Where a budget call's limit and window come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetRef {
    /// Given with the call.
    Inline(BudgetSpec),
    /// The budget policy of this name (stored in the target's namespace, or from the file).
    Policy(String),
}

/// A namespace usage listing: which budgets to list, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetQuery {
    /// The namespace whose budgets are listed.
    pub namespace: String,
    /// Only keys after this one (byte order); empty = from the start.
    pub start_after: String,
    /// Most keys listed, `1..=MAX_LISTED_KEYS`.
    pub max_keys: usize,
    /// Only this instance's budgets (what instances ask each other), not every live member's.
    pub local_only: bool,
}

/// One budget of a namespace listing and the instance that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBudget {
    /// The budget.
    pub budget: ListedBudget,
    /// The instance that holds it.
    pub held_by: String,
}

/// The budgets of a namespace across the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceUsage {
    /// Sorted by (key, window, holder); at most `max_keys` keys.
    pub budgets: Vec<HeldBudget>,
    /// Keys after the last one listed were left out.
    pub truncated: bool,
    /// Members that did not answer: their budgets are missing.
    pub unreachable: Vec<String>,
}

/// A budget operation.
#[derive(Clone, Copy, Debug)]
pub enum BudgetCall {
    /// Hold `estimate` for at most `ttl`.
    Reserve {
        /// Units to hold.
        estimate: u64,
        /// Hold time.
        ttl: Duration,
    },
    /// Settle a reservation with the actual cost.
    Commit {
        /// Reservation id.
        id: OpaqueId,
        /// Actual cost.
        actual: u64,
    },
    /// Release a reservation.
    Cancel {
        /// Reservation id.
        id: OpaqueId,
    },
    /// Read the usage.
    Usage,
}

/// The answer to a budget call.
#[derive(Clone, Debug)]
pub struct BudgetAnswer {
    /// Reserve: whether the estimate was granted (true for the other calls).
    pub granted: bool,
    /// Reserve: the reservation held, if any.
    pub reservation_id: Option<OpaqueId>,
    /// Usage after the call.
    pub usage: Usage,
}

impl BudgetAnswer {
    pub(crate) fn usage(usage: Usage) -> Self {
        Self {
            granted: true,
            reservation_id: None,
            usage,
        }
    }
}
