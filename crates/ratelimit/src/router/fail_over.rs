//! Failure policies: the answers for items whose owner or Redis did not answer (FAIL_OPEN,
//! FAIL_CLOSED, or LOCAL_FALLBACK under the limit divided by the live members).

use std::time::Duration;

use crate::limiter::{CheckItem, CheckOutcome, DegradedReason, LimitRef, Resolved};
use crate::spec::{Consistency, FailurePolicy, LimitSpec};

use super::ClusterRouter;
use super::plan::Planned;

impl ClusterRouter {
    /// Answers `planned` by each item's failure policy.
    pub(super) fn fail_over(
        &self,
        planned: &[Planned],
        reason: DegradedReason,
        all_or_nothing: bool,
    ) -> Vec<CheckOutcome> {
        let members = self.owners.ring().len().max(1) as u64;
        let fallback: Vec<(CheckItem, Resolved)> = planned
            .iter()
            .filter(|p| p.on_failure == FailurePolicy::LocalFallback)
            .map(|p| fallback_item(p, members))
            .collect();
        let mut local = if fallback.is_empty() {
            Vec::new().into_iter()
        } else {
            // The items were validated; a fallback limit is always valid.
            let items: Vec<(&CheckItem, Resolved)> =
                fallback.iter().map(|(item, r)| (item, *r)).collect();
            self.limiter
                .check_resolved(&items, all_or_nothing)
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

fn policy_label(item: &CheckItem) -> String {
    match &item.limit {
        LimitRef::Default => crate::spec::DEFAULT_POLICY_NAME.to_owned(),
        LimitRef::Policy(name) => name.clone(),
        LimitRef::Inline(_) => String::new(),
    }
}

pub(super) fn base_outcome(p: &Planned) -> CheckOutcome {
    CheckOutcome {
        allowed: false,
        over_limit: false,
        batch_rejected: false,
        mode: p.resolved.mode,
        policy: policy_label(&p.item),
        limit: p.resolved.spec.limit,
        remaining: 0,
        retry_after: Some(Duration::ZERO),
        reset_after: Duration::ZERO,
        policy_version: 0,
        degraded: None,
        decided_by: None,
        consistency: p.consistency,
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

/// The item decided locally under its limit divided by `members` (at least 1 unit), with
/// that limit resolved.
fn fallback_item(p: &Planned, members: u64) -> (CheckItem, Resolved) {
    let spec = LimitSpec {
        limit: (p.resolved.spec.limit / members).max(1),
        burst: (p.resolved.spec.effective_burst() / members).max(1),
        ..p.resolved.spec
    };
    let item = CheckItem {
        limit: LimitRef::Inline(spec),
        mode: Some(p.resolved.mode),
        consistency: Some(Consistency::Local),
        ..p.item.clone()
    };
    (item, Resolved::inline(spec, Some(p.resolved.mode)))
}

fn failure_name(f: FailurePolicy) -> &'static str {
    match f {
        FailurePolicy::FailOpen => "fail_open",
        FailurePolicy::FailClosed => "fail_closed",
        FailurePolicy::LocalFallback => "local_fallback",
    }
}
