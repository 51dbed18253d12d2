//! Cluster-wide delivery of ephemeral events.
//!
//! Durable subjects are shared through the log (Redis Streams consumer groups). Ephemeral
//! events live in memory, so instances hand them to each other over a [`Backplane`]:
//!
//! - every instance **advertises its interests** — each subscription filter, with the queue
//!   group identity and its member count — and keeps the other instances' adverts in a
//!   [`ClusterView`] (a subject index over them);
//! - the instance that accepts a publish **routes** it: subscriptions without a group get it
//!   on every instance that has one; for each queue group with members on several instances
//!   the publisher picks one instance (weighted by members, by the event id's hash), so each
//!   event reaches one member of the group cluster-wide; `sys.broadcast.>` goes to every
//!   interested instance; request inboxes are plain interests of the requesting instance, so
//!   a reply published anywhere finds its way back;
//! - the receiving instance offers the event to exactly the subscriptions it was chosen for.
//!
//! Delivery across instances is at most once, like ephemeral delivery itself: a forward that
//! cannot be handed over (the backplane link is down, or full — then lower priorities go
//! first, see [`ShedQueue`]) is dropped, counted and announced in a shed advisory. The
//! adverts are refreshed periodically and expire, so a dead instance's interests vanish.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::event::{Event, Priority};
use crate::index::SubjectIndex;
use crate::subject::SubjectFilter;

/// One subscription interest of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    /// The subject filter.
    pub filter: String,
    /// Queue group identity (`q:<group>|<filter>`); `None` without a group.
    pub group: Option<String>,
    /// Members of the group on that instance.
    pub members: u32,
}

/// An ephemeral event handed to one instance.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The instance that accepted the publish.
    pub from: String,
    /// The event.
    pub event: Event,
    /// Whether subscriptions without a group get it.
    pub plain: bool,
    /// The queue groups on the receiving instance that get it.
    pub groups: Vec<String>,
}

/// What a backplane hands to its bus.
#[derive(Debug)]
pub enum Inbound {
    /// An instance's whole interest set (replacing its earlier one); empty when it left.
    Interests {
        /// The instance.
        instance: String,
        /// Its interests.
        interests: Vec<Interest>,
    },
    /// An event another instance routed here.
    Forward(Box<Forward>),
}

/// What became of a forward handed to a backplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Queued for the other instance.
    Queued,
    /// Queued; to make room the oldest queued forward of this lower priority was dropped.
    QueuedShedding(Priority),
    /// Dropped: the link is down, or full of forwards of the same or higher priority.
    Dropped,
}

/// How instances reach each other.
pub trait Backplane: Send + Sync + 'static {
    /// Replaces this instance's advertised interests.
    fn advertise(&self, interests: Vec<Interest>);
    /// Hands `forward` to instance `to`, best effort (ephemeral delivery is at most once):
    /// when the link is full, lower priorities are dropped first.
    fn send(&self, to: &str, forward: Forward) -> Handed;
    /// Forwards received for this instance and dropped, by priority (lowest first), because
    /// the bus fell behind them.
    fn shed_on_arrival(&self) -> [u64; 4] {
        [0; 4]
    }

    /// Whether [`Backplane::claim_ids`] deduplicates across instances (else ids are
    /// deduplicated per instance only).
    fn claims_ids(&self) -> bool {
        false
    }

    /// Claims client-supplied event ids for the whole cluster for `window`: per id, `true`
    /// when no instance published it within the window (it is now claimed), `false` for a
    /// duplicate. One round trip for all of them.
    fn claim_ids(&self, ids: Vec<String>, window: Duration) -> BoxFuture<'static, IdClaims> {
        let _ = window;
        Box::pin(std::future::ready(Ok(vec![true; ids.len()])))
    }
}

/// The answer of [`Backplane::claim_ids`]; `Err` names why the cluster could not be asked.
pub type IdClaims = Result<Vec<bool>, String>;

/// A bounded FIFO that sheds by priority: when full, a newcomer pushes out the oldest queued
/// entry of the lowest priority below its own, or is refused when there is none. Entries leave
/// in the order they came, whatever their priority.
#[derive(Debug)]
pub struct ShedQueue<T> {
    /// Per priority (lowest first): (arrival number, entry).
    classes: [VecDeque<(u64, T)>; 4],
    arrivals: u64,
    len: usize,
    capacity: usize,
}

impl<T> ShedQueue<T> {
    /// An empty queue holding at most `capacity` (at least 1) entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            classes: Default::default(),
            arrivals: 0,
            len: 0,
            capacity: capacity.max(1),
        }
    }

    /// Queues `entry` of `priority`, shedding a lower priority when full.
    pub fn push(&mut self, priority: Priority, entry: T) -> Handed {
        let mut handed = Handed::Queued;
        if self.len >= self.capacity {
            let Some(lower) = (0..priority.index()).find(|&c| !self.classes[c].is_empty()) else {
                return Handed::Dropped;
            };
            self.classes[lower].pop_front();
            self.len -= 1;
            handed = Handed::QueuedShedding(Priority::ALL[lower]);
        }
        self.arrivals += 1;
        self.classes[priority.index()].push_back((self.arrivals, entry));
        self.len += 1;
        handed
    }

    /// The oldest entry.
    pub fn pop(&mut self) -> Option<T> {
        let class = (0..4)
            .filter_map(|c| self.classes[c].front().map(|(at, _)| (*at, c)))
            .min()?
            .1;
        self.len -= 1;
        self.classes[class].pop_front().map(|(_, entry)| entry)
    }

    /// Entries queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The other instances' interests, indexed by subject.
#[derive(Default)]
pub struct ClusterView {
    instances: Vec<(String, Vec<Interest>)>,
    /// `(instance index << 32) | interest index`.
    index: SubjectIndex<u64>,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("instances", &self.instances.len())
            .finish_non_exhaustive()
    }
}

impl ClusterView {
    /// A view over `remotes` (instance → interests); filters that do not parse are skipped.
    pub fn new(remotes: &HashMap<String, Vec<Interest>>) -> Self {
        let mut instances: Vec<(String, Vec<Interest>)> = remotes
            .iter()
            .filter(|(_, interests)| !interests.is_empty())
            .map(|(id, interests)| (id.clone(), interests.clone()))
            .collect();
        instances.sort_by(|a, b| a.0.cmp(&b.0));
        let mut index = SubjectIndex::new();
        for (i, (_, interests)) in instances.iter().enumerate() {
            for (j, interest) in interests.iter().enumerate() {
                if let Ok(filter) = SubjectFilter::parse("filter", &interest.filter) {
                    index.insert(&filter, ((i as u64) << 32) | j as u64);
                }
            }
        }
        Self { instances, index }
    }

    /// Whether no other instance has an interest.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Whether some other instance has a subscription matching `subject`.
    pub fn has_match(&self, subject: &str) -> bool {
        self.index.has_match(subject)
    }

    /// Calls `f(instance, interest)` for every remote interest matching `subject`.
    pub fn for_each_match<'a>(&'a self, subject: &str, mut f: impl FnMut(&'a str, &'a Interest)) {
        self.index.for_each_match(subject, |packed| {
            let (i, j) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
            if let Some((instance, interests)) = self.instances.get(i)
                && let Some(interest) = interests.get(j)
            {
                f(instance.as_str(), interest);
            }
        });
    }

    /// Instances with at least one interest.
    pub fn instances(&self) -> impl Iterator<Item = &str> {
        self.instances.iter().map(|(id, _)| id.as_str())
    }
}

/// Picks one of `candidates` (`(who, weight)`) for the event with hash `hash`, weighted.
pub fn pick_weighted<T: Copy>(candidates: &[(T, u32)], hash: u64) -> Option<T> {
    let total: u64 = candidates.iter().map(|(_, w)| u64::from((*w).max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut at = hash % total;
    for (who, weight) in candidates {
        let w = u64::from((*weight).max(1));
        if at < w {
            return Some(*who);
        }
        at -= w;
    }
    candidates.last().map(|(who, _)| *who)
}

/// A backplane inside one process: buses registered on one hub reach each other. For tests
/// and for running several buses in one process.
#[derive(Default, Clone)]
pub struct InMemoryHub {
    members: Arc<Mutex<HashMap<String, HubMember>>>,
    /// Ids claimed cluster-wide, with the time (ms since the epoch) each claim ends.
    claimed: Arc<Mutex<HashMap<String, u64>>>,
}

#[derive(Clone)]
struct HubMember {
    tx: mpsc::Sender<Inbound>,
    interests: Vec<Interest>,
}

impl std::fmt::Debug for InMemoryHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryHub")
            .field("members", &self.members.lock().len())
            .finish()
    }
}

impl InMemoryHub {
    /// A new, empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins `instance`: returns its backplane and the inbound channel for its bus.
    pub fn join(&self, instance: &str) -> (Arc<dyn Backplane>, mpsc::Receiver<Inbound>) {
        let (tx, rx) = mpsc::channel(crate::cluster::INBOUND_QUEUE);
        let mut members = self.members.lock();
        for (id, member) in members.iter() {
            let _ = tx.try_send(Inbound::Interests {
                instance: id.clone(),
                interests: member.interests.clone(),
            });
        }
        members.insert(
            instance.to_owned(),
            HubMember {
                tx,
                interests: Vec::new(),
            },
        );
        let plane = HubPlane {
            hub: self.clone(),
            instance: instance.to_owned(),
        };
        (Arc::new(plane), rx)
    }

    /// Removes `instance` as if it died: the others forget its interests.
    pub fn leave(&self, instance: &str) {
        let mut members = self.members.lock();
        members.remove(instance);
        for member in members.values() {
            let _ = member.tx.try_send(Inbound::Interests {
                instance: instance.to_owned(),
                interests: Vec::new(),
            });
        }
    }
}

struct HubPlane {
    hub: InMemoryHub,
    instance: String,
}

impl Backplane for HubPlane {
    fn advertise(&self, interests: Vec<Interest>) {
        let mut members = self.hub.members.lock();
        let Some(me) = members.get_mut(&self.instance) else {
            return; // left the hub
        };
        me.interests.clone_from(&interests);
        for (id, member) in members.iter() {
            if *id != self.instance {
                let _ = member.tx.try_send(Inbound::Interests {
                    instance: self.instance.clone(),
                    interests: interests.clone(),
                });
            }
        }
    }

    fn send(&self, to: &str, forward: Forward) -> Handed {
        let tx = self.hub.members.lock().get(to).map(|m| m.tx.clone());
        match tx.map(|tx| tx.try_send(Inbound::Forward(Box::new(forward)))) {
            Some(Ok(())) => Handed::Queued,
            _ => Handed::Dropped,
        }
    }

    fn claims_ids(&self) -> bool {
        true
    }

    fn claim_ids(&self, ids: Vec<String>, window: Duration) -> BoxFuture<'static, IdClaims> {
        let now = crate::event::now_ms();
        let until = now.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        let mut claimed = self.hub.claimed.lock();
        claimed.retain(|_, end| *end > now);
        let answers = ids
            .into_iter()
            .map(|id| match claimed.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(until);
                    true
                }
            })
            .collect();
        Box::pin(std::future::ready(Ok(answers)))
    }
}

/// Inbound messages buffered for a bus before forwards are dropped.
pub const INBOUND_QUEUE: usize = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    fn interest(filter: &str, group: Option<&str>, members: u32) -> Interest {
        Interest {
            filter: filter.to_owned(),
            group: group.map(str::to_owned),
            members,
        }
    }

    #[test]
    fn test_view_matches_remote_interests_by_subject() {
        let mut remotes = HashMap::new();
        remotes.insert(
            "b".to_owned(),
            vec![
                interest("orders.*", None, 1),
                interest("orders.>", Some("q:w|orders.>"), 2),
            ],
        );
        remotes.insert("c".to_owned(), vec![interest("audit.>", None, 1)]);
        remotes.insert("d".to_owned(), Vec::new());
        let view = ClusterView::new(&remotes);
        let mut hits = Vec::new();
        view.for_each_match("orders.new", |who, i| {
            hits.push((who.to_owned(), i.group.clone()));
        });
        hits.sort();
        assert_eq!(
            hits,
            vec![
                ("b".to_owned(), None),
                ("b".to_owned(), Some("q:w|orders.>".to_owned()))
            ]
        );
        assert!(view.has_match("audit.x.y"));
        assert!(!view.has_match("billing.x"));
        assert_eq!(view.instances().collect::<Vec<_>>(), vec!["b", "c"]);
    }

    #[test]
    fn test_a_full_shed_queue_drops_the_oldest_lowest_priority_and_keeps_arrival_order() {
        let mut q = ShedQueue::new(3);
        assert_eq!(q.push(Priority::Normal, "n1"), Handed::Queued);
        assert_eq!(q.push(Priority::Low, "l1"), Handed::Queued);
        assert_eq!(q.push(Priority::Low, "l2"), Handed::Queued);
        // Full: a HIGH pushes out the oldest LOW, then the next LOW, then the NORMAL.
        assert_eq!(
            q.push(Priority::High, "h1"),
            Handed::QueuedShedding(Priority::Low)
        );
        assert_eq!(
            q.push(Priority::High, "h2"),
            Handed::QueuedShedding(Priority::Low)
        );
        assert_eq!(
            q.push(Priority::Low, "l3"),
            Handed::Dropped,
            "nothing lower"
        );
        assert_eq!(
            q.push(Priority::High, "h3"),
            Handed::QueuedShedding(Priority::Normal)
        );
        assert_eq!(q.push(Priority::High, "h4"), Handed::Dropped, "all equal");
        assert_eq!(
            q.push(Priority::Critical, "c1"),
            Handed::QueuedShedding(Priority::High)
        );
        assert_eq!(q.len(), 3);
        let out: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(out, ["h2", "h3", "c1"], "arrival order across priorities");
        assert!(q.is_empty());
        assert_eq!(q.push(Priority::Low, "l4"), Handed::Queued);
    }

    #[test]
    fn test_weighted_pick_follows_the_member_counts() {
        let candidates = [("a", 1u32), ("b", 3u32)];
        let mut counts = HashMap::new();
        for hash in 0..4000u64 {
            let who = pick_weighted(&candidates, xxhash_rust::xxh3::xxh3_64(&hash.to_le_bytes()));
            *counts.entry(who.unwrap_or("none")).or_insert(0) += 1;
        }
        assert!((800..1200).contains(&counts["a"]), "{counts:?}");
        assert!((2800..3200).contains(&counts["b"]), "{counts:?}");
        assert_eq!(pick_weighted::<&str>(&[], 1), None);
    }
}
