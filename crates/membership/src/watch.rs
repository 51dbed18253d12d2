//! The consumer side of a membership watch: an event stream plus the current snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::member::{apply, diff};
use crate::{Member, MemberSnapshot, MembershipEvent};

/// Events buffered per watch before a slow consumer lags (and resyncs from the snapshot).
pub const EVENT_BUFFER: usize = 1024;

/// An event tagged with the epoch of the snapshot that first includes it.
#[derive(Clone, Debug)]
pub(crate) struct StampedEvent {
    pub(crate) epoch: u64,
    pub(crate) event: MembershipEvent,
}

/// Aborts a background task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A live view of one service's members: [`MemberWatch::next_event`] yields changes and
/// [`MemberWatch::current`] the snapshot that already includes every event yielded so far.
///
/// Events travel through a bounded broadcast buffer ([`EVENT_BUFFER`] events). A consumer that
/// falls further behind lags: `next_event` then logs a warning, resyncs from `current()` and
/// yields the difference between what it had yielded and the current snapshot as ordinary
/// `Joined`/`Left`/`Updated` events, so the event stream stays consistent with `current()`
/// (intermediate changes are collapsed). Consumers that only need the state can use
/// [`MemberWatch::snapshots`] and ignore events entirely.
///
/// Dropping the watch stops its background task; receivers from `snapshots()` then see the
/// sender closed.
pub struct MemberWatch {
    service: String,
    events_rx: broadcast::Receiver<StampedEvent>,
    snapshots_rx: watch::Receiver<Arc<MemberSnapshot>>,
    /// What the consumer has been told so far, by instance id.
    view: BTreeMap<String, Member>,
    /// Events with an epoch up to this one are already part of `view`.
    seen_through: u64,
    pending: VecDeque<MembershipEvent>,
    _task: Option<AbortOnDrop>,
}

impl MemberWatch {
    /// Both receivers must be subscribed before any event newer than the snapshot is sent.
    pub(crate) fn new(
        service: String,
        events_rx: broadcast::Receiver<StampedEvent>,
        snapshots_rx: watch::Receiver<Arc<MemberSnapshot>>,
        task: Option<AbortOnDrop>,
    ) -> Self {
        let snapshot = snapshots_rx.borrow().clone();
        Self {
            service,
            events_rx,
            snapshots_rx,
            view: snapshot.members.clone(),
            seen_through: snapshot.epoch,
            pending: VecDeque::new(),
            _task: task,
        }
    }

    /// The latest snapshot of the service's members.
    pub fn current(&self) -> Arc<MemberSnapshot> {
        self.snapshots_rx.borrow().clone()
    }

    /// The next change, or `None` when the watch has ended for good: the in-memory backend was
    /// dropped. The etcd watch never ends on its own; it re-lists and re-watches after failures
    /// (the differences found arrive as ordinary events). Cancel-safe.
    pub async fn next_event(&mut self) -> Option<MembershipEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            match self.events_rx.recv().await {
                Ok(stamped) => {
                    if stamped.epoch <= self.seen_through {
                        continue;
                    }
                    apply(&mut self.view, &stamped.event);
                    return Some(stamped.event);
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    warn!(
                        service = %self.service,
                        skipped,
                        "membership watch consumer lagged; resyncing from the current snapshot"
                    );
                    let snapshot = self.current();
                    self.pending.extend(diff(&self.view, &snapshot.members));
                    self.view = snapshot.members.clone();
                    self.seen_through = snapshot.epoch;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// A receiver of every new snapshot (valid while this watch lives).
    pub fn snapshots(&self) -> watch::Receiver<Arc<MemberSnapshot>> {
        self.snapshots_rx.clone()
    }
}

impl fmt::Debug for MemberWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberWatch")
            .field("service", &self.service)
            .field("epoch", &self.snapshots_rx.borrow().epoch)
            .finish_non_exhaustive()
    }
}
