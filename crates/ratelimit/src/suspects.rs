//! Peers whose forward link just failed. An owner that was killed stays in the ring until its
//! lease expires (up to the lease TTL); meanwhile every survivor answered its keys by the
//! failure policy, each with a share of the limit, so the dead owner's keys admitted up to 2.7×
//! their limit. A suspect's keys go to the ring's next owner instead (the owner they will have
//! once it leaves), so over-admission is bounded by the one state lost with the dead owner.
//! A suspect is cleared when a probe of it opens a forward stream again, or when it leaves.

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::IntGauge;

/// The suspected peers, read as one snapshot per routing decision.
pub(crate) struct Suspects {
    set: Mutex<Arc<BTreeSet<String>>>,
    gauge: IntGauge,
}

impl Suspects {
    pub(crate) fn new(gauge: IntGauge) -> Self {
        gauge.set(0);
        Self {
            set: Mutex::default(),
            gauge,
        }
    }

    /// The suspects now (cheap to clone; empty in a healthy cluster).
    pub(crate) fn snapshot(&self) -> Arc<BTreeSet<String>> {
        self.set.lock().clone()
    }

    /// Whether `peer` is suspected.
    pub(crate) fn contains(&self, peer: &str) -> bool {
        self.set.lock().contains(peer)
    }

    /// Suspects `peer`; true when it was not suspected before.
    pub(crate) fn mark(&self, peer: &str, reason: &str) -> bool {
        let added = self.update(|set| set.insert(peer.to_owned()));
        if added {
            tracing::warn!(
                peer,
                reason,
                "peer suspected: its keys go to the next owner until it answers"
            );
        }
        added
    }

    /// Clears `peer`; true when it was suspected.
    pub(crate) fn clear(&self, peer: &str) -> bool {
        let removed = self.update(|set| set.remove(peer));
        if removed {
            tracing::info!(peer, "suspected peer answers again: its keys return to it");
        }
        removed
    }

    /// Keeps only the suspects `is_member` still knows (a peer that left needs no suspicion).
    pub(crate) fn retain(&self, is_member: impl Fn(&str) -> bool) {
        self.update(|set| {
            let before = set.len();
            set.retain(|peer| is_member(peer));
            set.len() != before
        });
    }

    fn update(&self, change: impl FnOnce(&mut BTreeSet<String>) -> bool) -> bool {
        let mut guard = self.set.lock();
        let mut next = (**guard).clone();
        let changed = change(&mut next);
        if changed {
            self.gauge
                .set(i64::try_from(next.len()).unwrap_or(i64::MAX));
            *guard = Arc::new(next);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mark_clear_and_retain_keep_the_set_and_the_gauge() {
        let gauge = IntGauge::new("suspects", "test").unwrap();
        let s = Suspects::new(gauge.clone());
        assert!(s.mark("a", "test"));
        assert!(!s.mark("a", "test"), "already suspected");
        assert!(s.mark("b", "test"));
        assert_eq!(gauge.get(), 2);
        let before = s.snapshot();
        assert!(s.clear("a"));
        assert!(!s.clear("a"));
        assert!(before.contains("a"), "a snapshot does not change");
        s.retain(|peer| peer != "b");
        assert!(s.snapshot().is_empty());
        assert_eq!(gauge.get(), 0);
    }
}
