//! The one entry point every front door calls (Check, StreamCheck, Envoy RLS): decide a batch
//! of items within a deadline. The local [`Limiter`] implements it; the cluster router (owner
//! routing, Redis-strict, failure policies) implements it over the limiter.

use std::time::Instant;

use crate::error::RateLimitError;
use crate::limiter::{CheckItem, CheckOutcome, Limiter};
use crate::spec::Policy;

/// Decides rate-limit checks.
#[async_trait::async_trait]
pub trait Decide: Send + Sync + 'static {
    /// Decides `items` with the semantics of [`Limiter::check`], answering before `deadline`
    /// (the caller's) when one is given.
    ///
    /// # Errors
    /// `InvalidArgument` naming every bad field, `PolicyNotFound` for an unknown policy.
    async fn decide(
        &self,
        items: Vec<CheckItem>,
        all_or_nothing: bool,
        deadline: Option<Instant>,
    ) -> Result<Vec<CheckOutcome>, RateLimitError>;

    /// The policy called `name` as seen from `namespace`, if any (Envoy descriptors are
    /// matched against policy names, and their limits are reported back to Envoy).
    fn policy(&self, namespace: &str, name: &str) -> Option<Policy>;
}

#[async_trait::async_trait]
impl Decide for Limiter {
    async fn decide(
        &self,
        items: Vec<CheckItem>,
        all_or_nothing: bool,
        _deadline: Option<Instant>,
    ) -> Result<Vec<CheckOutcome>, RateLimitError> {
        // Local decisions take microseconds; no deadline can pass meanwhile.
        self.check(&items, all_or_nothing)
    }

    fn policy(&self, namespace: &str, name: &str) -> Option<Policy> {
        self.policies().get_in(namespace, name).cloned()
    }
}
