//! A bounded pending queue for one subscription (or queue group): dispatch by priority with
//! weighted fairness, aging, TTL and shedding.
//!
//! # Scheduling
//!
//! Each priority class is a FIFO ([`VecDeque`]). Classes share the consumer by *start-time fair
//! queueing* (SFQ), a virtual-clock form of weighted round robin:
//!
//! - Every class has a start tag `S[c]`; the queue has a virtual time `V`.
//! - `pop` serves the non-empty class with the smallest start tag; ties go to the higher
//!   (effective) class. Then `V = S[c]` and `S[c] += SCALE / weight`, so a class with weight 8
//!   advances eight times slower than one with weight 1 and is served eight times as often.
//!   With weights `[1, 2, 4, 8]` and all four classes backlogged, every 15 pops serve CRITICAL
//!   8 times, HIGH 4, NORMAL 2 and LOW 1 (LOW gets 1/15 ≈ 6.7%). A class alone gets every pop.
//! - When a class turns non-empty, `S[c] = max(S[c], V)`: an idle class gets no credit for
//!   the time it was idle (so a trickle cannot take more than its share), but it is not behind
//!   either. Every other backlogged class has a start tag `>= V`, so an arriving CRITICAL item
//!   that had not used its share wins the tie and goes out on the very next pop (under full
//!   backlog, whenever CRITICAL arrives at most every third pop). Even right after a CRITICAL
//!   burst its tag is at most one increment ahead, so at most one item of each other class
//!   goes first.
//!
//! - CRITICAL alone may bank credit: turning non-empty, `S[CRITICAL] = max(S, V - 64 / 8)`
//!   (64 of its services, [`CRITICAL_BURST`]), so CRITICAL below its share builds up credit for
//!   a burst of up to 64 events that go out back to back. Without it, CRITICAL asking for
//!   nearly its share (50% of the consumer against 8/15) waited behind the others after every
//!   chance cluster of arrivals: its queue ran at 94% of what it was entitled to. The credit
//!   builds only while CRITICAL's queue is empty, so a CRITICAL flood still gets 8/15, and a
//!   burst delays the other classes by at most 64 deliveries. (Every class banking credit
//!   would let a LOW class back from idle take pops ahead of CRITICAL.) `V` never moves back
//!   when CRITICAL serves banked credit. A new queue's clock starts at [`ORIGIN`], as if
//!   CRITICAL had been idle long enough to bank the whole burst, so a new subscription orders
//!   its first deliveries as an old one does.
//!
//! Choosing a class costs four comparisons, so `pop` is O(1) apart from the expired items it
//! skips.
//!
//! # Aging
//!
//! When the head of a class below HIGH has waited `aging_ms` or longer, the class is scheduled
//! as if it were one class higher per elapsed `aging_ms` period, but never above HIGH: its
//! head's service advances the start tag by the promoted class's weight, and it wins ties as
//! the promoted class. A backlogged LOW class therefore climbs to HIGH's share and cannot
//! starve, while CRITICAL is never outranked and keeps its latency.
//!
//! # Expiry and shedding
//!
//! Times are `now_ms` passed in by the caller; nothing here reads a clock. An item whose
//! `expires_at_ms <= now_ms` is never returned by `pop`: it is reported in
//! [`Popped::expired`] when met at the head of its class, and [`PriorityQueue::drain_expired`]
//! removes expired items wherever they wait.
//!
//! When full, `push` makes room by shedding from the lowest class that holds more than its
//! share of the bound (its weight over the sum of weights: with `[1, 2, 4, 8]` and 10,000,
//! LOW keeps up to 666), oldest first; when that class is the pushed item's own, the pushed
//! item itself is shed. So the lowest priority is shed first, but never below its share:
//! under overload every class stays backlogged and the scheduler above gives it its weight's
//! share of deliveries — LOW is not starved by shedding any more than by scheduling. (Shedding
//! strictly lowest-first kept LOW's queue nearly empty under overload, so it got well under
//! its 1/15: 2.8% measured.) A class beyond its share is shed even when the pushed item is of
//! a lower class, so a flood of CRITICAL cannot take LOW's share of the bound either.

use std::cmp::Reverse;
use std::collections::VecDeque;

use crate::event::Priority;

/// Number of priority classes.
const CLASSES: usize = Priority::ALL.len();

/// Services of credit CRITICAL may bank while it is idle (see the module docs).
const CRITICAL_BURST: u64 = 64;

/// Aging never promotes past this class.
const AGING_CEILING: usize = Priority::High as usize;

/// Virtual-time units one service costs at weight 1; lcm(1..=16), so usual weights divide it.
const SCALE: u64 = 720_720;

/// Virtual time a new queue starts at: CRITICAL's whole burst credit at any weight (an
/// increment is at most `SCALE`). A queue starting at 0 gave CRITICAL no credit, as the credit
/// saturated at 0: on a fresh subscription one LOW item went out between the first and second
/// CRITICAL. Now a new queue behaves like one whose CRITICAL has long been idle.
const ORIGIN: u64 = CRITICAL_BURST * SCALE;

/// When the virtual clock passes this, all tags are shifted down (never reached in practice).
const RENORMALIZE_AT: u64 = 1 << 62;

/// Weights and aging for a [`PriorityQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairnessConfig {
    /// Relative share of pops per class, indexed by [`Priority::index`]; 0 is treated as 1.
    /// Default `[1, 2, 4, 8]`.
    pub weights: [u32; 4],
    /// A class head waiting this long is promoted one class (up to HIGH) per period, in ms.
    /// Default 500; 0 disables aging.
    pub aging_ms: u64,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self {
            weights: [1, 2, 4, 8],
            aging_ms: 500,
        }
    }
}

/// What happened to a pushed item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome<T> {
    /// Queued, nothing dropped.
    Queued,
    /// Dropped to stay within capacity: from the lowest priority holding more than its share
    /// of the bound, oldest first; the pushed item itself when that is its own class.
    Shed(Vec<(T, Priority)>),
}

/// The result of [`PriorityQueue::pop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Popped<T> {
    /// The next item with its priority and `enqueued_at_ms`; `None` when nothing is deliverable.
    pub item: Option<(T, Priority, u64)>,
    /// Expired items met on the way; never returned as `item`.
    pub expired: Vec<(T, Priority)>,
}

#[derive(Debug, Clone)]
struct Entry<T> {
    item: T,
    enqueued_at_ms: u64,
    expires_at_ms: Option<u64>,
}

impl<T> Entry<T> {
    fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

/// Bounded pending queue dispatching by priority with weighted fairness, aging, TTL and
/// shedding (see the module docs for the algorithm).
#[derive(Debug, Clone)]
pub struct PriorityQueue<T> {
    config: FairnessConfig,
    capacity: usize,
    classes: [VecDeque<Entry<T>>; CLASSES],
    /// Start tag of each class's head.
    start: [u64; CLASSES],
    /// Start tag of the last item served.
    virtual_time: u64,
    len: usize,
}

impl<T> PriorityQueue<T> {
    /// An empty queue holding at most `capacity` items (a capacity of 0 sheds every push).
    pub fn new(config: FairnessConfig, capacity: usize) -> Self {
        Self {
            config,
            capacity,
            classes: Default::default(),
            // Every class idle since before the origin.
            start: [0; CLASSES],
            virtual_time: ORIGIN,
            len: 0,
        }
    }

    /// Queues `item` at the tail of its class, shedding to stay within capacity.
    pub fn push(
        &mut self,
        item: T,
        priority: Priority,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> PushOutcome<T> {
        let class = priority.index();
        let mut shed = Vec::new();
        if self.len >= self.capacity {
            // Room for one more, plus whatever `push_front` put beyond capacity: each time
            // from the lowest class holding more than its share of the bound. When that is
            // the pushed item's own class, the pushed item itself goes (and nothing else).
            let need = self.len + 1 - self.capacity;
            let mut lens = self.len_by_priority();
            lens[class] += 1;
            let mut plan = [0_usize; CLASSES];
            for _ in 0..need {
                let c = self.over_share(&lens);
                if c == class {
                    return PushOutcome::Shed(vec![(item, priority)]);
                }
                lens[c] -= 1;
                plan[c] += 1;
            }
            for (c, n) in plan.into_iter().enumerate() {
                for _ in 0..n {
                    if let Some(entry) = self.classes[c].pop_front() {
                        shed.push((entry.item, class_priority(c)));
                    }
                }
            }
            self.len -= shed.len();
        }
        self.activate(class);
        self.classes[class].push_back(Entry {
            item,
            enqueued_at_ms: now_ms,
            expires_at_ms,
        });
        self.len += 1;
        if shed.is_empty() {
            PushOutcome::Queued
        } else {
            PushOutcome::Shed(shed)
        }
    }

    /// Puts a redelivered item at the head of its class, ignoring capacity (the caller's
    /// in-flight window bounds these).
    pub fn push_front(
        &mut self,
        item: T,
        priority: Priority,
        expires_at_ms: Option<u64>,
        enqueued_at_ms: u64,
    ) {
        let class = priority.index();
        self.activate(class);
        self.classes[class].push_front(Entry {
            item,
            enqueued_at_ms,
            expires_at_ms,
        });
        self.len += 1;
    }

    /// The next item to deliver, plus any expired items met at the class heads.
    pub fn pop(&mut self, now_ms: u64) -> Popped<T> {
        let mut expired = Vec::new();
        for (c, queue) in self.classes.iter_mut().enumerate() {
            while let Some(head) = queue.front()
                && head.is_expired(now_ms)
                && let Some(entry) = queue.pop_front()
            {
                expired.push((entry.item, class_priority(c)));
            }
        }
        self.len -= expired.len();

        let Some((class, level)) = self.pick(now_ms) else {
            return Popped {
                item: None,
                expired,
            };
        };
        let Some(entry) = self.classes[class].pop_front() else {
            // `pick` only returns non-empty classes.
            return Popped {
                item: None,
                expired,
            };
        };
        self.len -= 1;
        // CRITICAL serving banked credit runs behind the clock; the clock never goes back.
        self.virtual_time = self.virtual_time.max(self.start[class]);
        self.start[class] += self.increment(class, level);
        if self.virtual_time >= RENORMALIZE_AT {
            self.renormalize();
        }
        Popped {
            item: Some((entry.item, class_priority(class), entry.enqueued_at_ms)),
            expired,
        }
    }

    /// Removes every expired item, wherever it waits. O(n).
    pub fn drain_expired(&mut self, now_ms: u64) -> Vec<(T, Priority)> {
        let mut expired = Vec::new();
        for (c, queue) in self.classes.iter_mut().enumerate() {
            if !queue.iter().any(|e| e.is_expired(now_ms)) {
                continue;
            }
            let all = std::mem::take(queue);
            for entry in all {
                if entry.is_expired(now_ms) {
                    expired.push((entry.item, class_priority(c)));
                } else {
                    queue.push_back(entry);
                }
            }
        }
        self.len -= expired.len();
        expired
    }

    /// Removes everything: highest priority first, FIFO within a class.
    pub fn drain(&mut self) -> Vec<(T, Priority)> {
        let mut out = Vec::with_capacity(self.len);
        for (c, queue) in self.classes.iter_mut().enumerate().rev() {
            out.extend(queue.drain(..).map(|e| (e.item, class_priority(c))));
        }
        self.len = 0;
        out
    }

    /// Number of queued items (expired ones included until removed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queued items per class, indexed by [`Priority::index`].
    pub fn len_by_priority(&self) -> [usize; 4] {
        [
            self.classes[0].len(),
            self.classes[1].len(),
            self.classes[2].len(),
            self.classes[3].len(),
        ]
    }

    /// The bound `push` keeps the queue within.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Earliest `enqueued_at_ms` among the class heads (each class's oldest item).
    pub fn oldest_enqueued_ms(&self) -> Option<u64> {
        self.classes
            .iter()
            .filter_map(|q| q.front().map(|e| e.enqueued_at_ms))
            .min()
    }

    /// A class turning non-empty starts no earlier than the virtual clock, except CRITICAL,
    /// which may start up to [`CRITICAL_BURST`] of its services earlier.
    fn activate(&mut self, class: usize) {
        if self.classes[class].is_empty() {
            let credit = if class == CLASSES - 1 {
                CRITICAL_BURST * self.increment(class, class)
            } else {
                0
            };
            self.start[class] = self.start[class].max(self.virtual_time.saturating_sub(credit));
        }
    }

    /// The lowest class whose length in `lens` exceeds its share of the capacity (weight over
    /// the sum of weights, rounded down); `lens` must add up to more than the capacity, so
    /// there is one.
    fn over_share(&self, lens: &[usize; CLASSES]) -> usize {
        let weights = self.config.weights.map(|w| u64::from(w.max(1)));
        let total: u64 = weights.iter().sum();
        let capacity = self.capacity as u64;
        (0..CLASSES)
            .find(|&c| lens[c] as u64 > capacity * weights[c] / total)
            .unwrap_or(CLASSES - 1)
    }

    /// The non-empty class to serve next and the level it is scheduled at.
    fn pick(&self, now_ms: u64) -> Option<(usize, usize)> {
        self.classes
            .iter()
            .enumerate()
            .filter_map(|(c, q)| q.front().map(|head| (c, self.level(c, head, now_ms))))
            .min_by_key(|&(c, level)| (self.start[c], Reverse(level), Reverse(c)))
    }

    /// The class `class` is scheduled as, given how long its head has waited.
    fn level(&self, class: usize, head: &Entry<T>, now_ms: u64) -> usize {
        if class >= AGING_CEILING || self.config.aging_ms == 0 {
            return class;
        }
        let periods = now_ms.saturating_sub(head.enqueued_at_ms) / self.config.aging_ms;
        let periods = usize::try_from(periods).unwrap_or(usize::MAX);
        class.saturating_add(periods).min(AGING_CEILING)
    }

    /// Virtual time one service of `class` scheduled at `level` costs.
    fn increment(&self, class: usize, level: usize) -> u64 {
        let weights = &self.config.weights;
        let weight = weights[class].max(weights[level]).max(1);
        (SCALE / u64::from(weight)).max(1)
    }

    /// Shifts every tag down so the clock is back at [`ORIGIN`] (keeping CRITICAL's credit).
    fn renormalize(&mut self) {
        let base = self.virtual_time - ORIGIN;
        for tag in &mut self.start {
            *tag = tag.saturating_sub(base);
        }
        self.virtual_time = ORIGIN;
    }
}

fn class_priority(class: usize) -> Priority {
    Priority::from_index(class).unwrap_or(Priority::Critical)
}

#[cfg(test)]
mod tests {
    use super::*;

    use Priority::{Critical, High, Low, Normal};

    fn no_aging() -> FairnessConfig {
        FairnessConfig {
            aging_ms: 0,
            ..FairnessConfig::default()
        }
    }

    fn pop_item(q: &mut PriorityQueue<u32>, now_ms: u64) -> Option<(u32, Priority)> {
        q.pop(now_ms).item.map(|(item, p, _)| (item, p))
    }

    fn fill(q: &mut PriorityQueue<u32>, per_class: u32, now_ms: u64) {
        for i in 0..per_class {
            for p in Priority::ALL {
                assert_eq!(q.push(i, p, None, now_ms), PushOutcome::Queued);
            }
        }
    }

    fn count_pops(q: &mut PriorityQueue<u32>, pops: usize, now_ms: u64) -> [usize; 4] {
        let mut counts = [0; 4];
        for _ in 0..pops {
            let (_, p) = pop_item(q, now_ms).unwrap();
            counts[p.index()] += 1;
        }
        counts
    }

    #[test]
    fn test_items_of_one_class_pop_in_fifo_order() {
        let mut q = PriorityQueue::new(FairnessConfig::default(), 100);
        for i in 0..10 {
            q.push(i, Normal, None, 0);
        }
        let popped: Vec<u32> = (0..10).map(|_| pop_item(&mut q, 0).unwrap().0).collect();
        assert_eq!(popped, (0..10).collect::<Vec<_>>());
        assert!(q.is_empty());
        assert_eq!(
            q.pop(0),
            Popped {
                item: None,
                expired: vec![]
            }
        );
    }

    #[test]
    fn test_a_class_alone_gets_every_pop() {
        let mut q = PriorityQueue::new(no_aging(), 100);
        for i in 0..5 {
            q.push(i, Low, None, 0);
        }
        for i in 0..5 {
            assert_eq!(pop_item(&mut q, 0), Some((i, Low)));
        }
    }

    /// Pops until CRITICAL item `id` comes out; returns how many other items went first.
    fn pops_before(q: &mut PriorityQueue<u32>, id: u32) -> usize {
        (0..16)
            .position(|_| pop_item(q, 0) == Some((id, Critical)))
            .expect("critical served within 16 pops")
    }

    #[test]
    fn test_arriving_critical_is_served_on_the_next_pop_under_backlog() {
        // CRITICAL arriving every `gap + 1` pops, with every other class backlogged.
        for gap in 2..8 {
            let mut q = PriorityQueue::new(FairnessConfig::default(), 10_000);
            for i in 0..1_000 {
                q.push(i, Low, None, 0);
                q.push(i, Normal, None, 0);
                q.push(i, High, None, 0);
            }
            for round in 0..100 {
                for _ in 0..gap {
                    pop_item(&mut q, 0);
                }
                let id = 10_000 + round;
                q.push(id, Critical, None, 0);
                assert_eq!(pops_before(&mut q, id), 0, "gap {gap} round {round}");
            }
        }
    }

    #[test]
    fn test_critical_at_half_the_pops_waits_at_most_one_pop() {
        let mut q = PriorityQueue::new(FairnessConfig::default(), 10_000);
        for i in 0..1_000 {
            q.push(i, Low, None, 0);
            q.push(i, Normal, None, 0);
            q.push(i, High, None, 0);
        }
        for round in 0..200 {
            pop_item(&mut q, 0);
            let id = 10_000 + round;
            q.push(id, Critical, None, 0);
            assert!(pops_before(&mut q, id) <= 1, "round {round}");
        }
    }

    #[test]
    fn test_critical_after_its_own_burst_waits_at_most_a_few_pops() {
        let mut q = PriorityQueue::new(no_aging(), 10_000);
        fill(&mut q, 500, 0);
        // Drain CRITICAL's backlog so its tag is as far ahead as it gets.
        while q.len_by_priority()[Critical.index()] > 0 {
            pop_item(&mut q, 0);
        }
        q.push(9999, Critical, None, 0);
        // Each other class has at most one start tag below CRITICAL's.
        assert!(pops_before(&mut q, 9999) <= 3);
    }

    #[test]
    fn test_saturated_shares_follow_weights_8_4_2_1() {
        let mut q = PriorityQueue::new(no_aging(), 100_000);
        fill(&mut q, 10_000, 0);
        // A new queue's CRITICAL has its burst credit banked: it goes first.
        let burst = count_pops(&mut q, CRITICAL_BURST as usize, 0);
        assert_eq!(
            burst[Critical.index()],
            CRITICAL_BURST as usize,
            "{burst:?}"
        );
        let counts = count_pops(&mut q, 15_000, 0);
        let want = [1_000, 2_000, 4_000, 8_000];
        for (got, want) in counts.iter().zip(want) {
            assert!(got.abs_diff(want) <= 2, "counts {counts:?}, want {want:?}");
        }
    }

    #[test]
    fn test_low_gets_at_least_five_percent_under_saturation_with_a_moving_clock() {
        let mut q = PriorityQueue::new(FairnessConfig::default(), 400);
        fill(&mut q, 100, 0);
        let mut counts = [0usize; 4];
        let pops = 20_000;
        for now in 0..pops {
            let (item, p) = pop_item(&mut q, now).unwrap();
            counts[p.index()] += 1;
            // Refill what was served so every class stays backlogged.
            assert_eq!(q.push(item, p, None, now), PushOutcome::Queued);
        }
        let low_share = counts[Low.index()] as f64 / pops as f64;
        assert!(
            low_share >= 0.05,
            "low share {low_share}, counts {counts:?}"
        );
        assert!(
            counts[Critical.index()] > counts[High.index()],
            "counts {counts:?}"
        );
    }

    #[test]
    fn test_aging_promotes_a_waiting_class_up_to_high_only() {
        let config = FairnessConfig {
            weights: [1, 2, 4, 8],
            aging_ms: 100,
        };
        let mut q = PriorityQueue::new(config, 100_000);
        fill(&mut q, 5_000, 0);
        count_pops(&mut q, CRITICAL_BURST as usize, 50);
        // Fresh heads: plain 8:4:2:1.
        let fresh = count_pops(&mut q, 1_500, 50);
        assert!(fresh[Low.index()].abs_diff(100) <= 2, "fresh {fresh:?}");
        // Heads waited one period: LOW is scheduled as NORMAL, NORMAL as HIGH (8:4:4:2).
        let one = count_pops(&mut q, 1_800, 150);
        assert!(one[Low.index()].abs_diff(200) <= 3, "one period {one:?}");
        assert!(one[Normal.index()].abs_diff(400) <= 3, "one period {one:?}");
        // Many periods: LOW and NORMAL climb to HIGH's weight but never past it (8:4:4:4).
        let many = count_pops(&mut q, 2_000, 100_000);
        assert!(
            many[Low.index()].abs_diff(400) <= 3,
            "many periods {many:?}"
        );
        assert!(
            many[Normal.index()].abs_diff(400) <= 3,
            "many periods {many:?}"
        );
        assert!(
            many[Critical.index()].abs_diff(800) <= 3,
            "many periods {many:?}"
        );
    }

    #[test]
    fn test_full_queue_sheds_lowest_oldest_first_and_reports_it() {
        let mut q = PriorityQueue::new(no_aging(), 4);
        assert_eq!(q.push(1, Low, None, 0), PushOutcome::Queued);
        assert_eq!(q.push(2, Low, None, 0), PushOutcome::Queued);
        assert_eq!(q.push(3, Normal, None, 0), PushOutcome::Queued);
        assert_eq!(q.push(4, High, None, 0), PushOutcome::Queued);
        assert_eq!(
            q.push(5, Critical, None, 0),
            PushOutcome::Shed(vec![(1, Low)])
        );
        assert_eq!(
            q.push(6, Normal, None, 0),
            PushOutcome::Shed(vec![(2, Low)])
        );
        // Nothing queued is lower than NORMAL now: the pushed item itself is shed.
        assert_eq!(
            q.push(7, Normal, None, 0),
            PushOutcome::Shed(vec![(7, Normal)])
        );
        assert_eq!(q.push(8, Low, None, 0), PushOutcome::Shed(vec![(8, Low)]));
        assert_eq!(
            q.push(9, High, None, 0),
            PushOutcome::Shed(vec![(3, Normal)])
        );
        assert_eq!(q.len(), 4);
        assert_eq!(q.len_by_priority(), [0, 1, 2, 1]);
        assert_eq!(q.capacity(), 4);
    }

    #[test]
    fn test_push_beyond_a_redelivery_overflow_sheds_back_to_capacity() {
        let mut q = PriorityQueue::new(no_aging(), 2);
        q.push(1, Low, None, 0);
        q.push(2, Low, None, 0);
        q.push_front(3, Normal, None, 0);
        q.push_front(4, Normal, None, 0);
        assert_eq!(q.len(), 4);
        // Needs three slots freed but only two items are lower: the pushed item goes.
        assert_eq!(
            q.push(5, Normal, None, 0),
            PushOutcome::Shed(vec![(5, Normal)])
        );
        // Enough lower items to get back within capacity: they go, oldest LOW first.
        assert_eq!(
            q.push(6, High, None, 0),
            PushOutcome::Shed(vec![(1, Low), (2, Low), (4, Normal)])
        );
        assert_eq!(q.len(), 2);
        let mut q = PriorityQueue::new(no_aging(), 3);
        q.push(1, Low, None, 0);
        q.push(2, Low, None, 0);
        q.push(3, Normal, None, 0);
        q.push_front(4, High, None, 0);
        assert_eq!(
            q.push(5, Critical, None, 0),
            PushOutcome::Shed(vec![(1, Low), (2, Low)])
        );
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn test_a_flood_of_critical_cannot_take_lows_share_of_the_bound() {
        // Shares of 15 with weights 1:2:4:8 are 1, 2, 4 and 8 items.
        let mut q = PriorityQueue::new(no_aging(), 15);
        for i in 0..15 {
            assert_eq!(q.push(i, Critical, None, 0), PushOutcome::Queued);
        }
        assert_eq!(
            q.push(100, Low, None, 0),
            PushOutcome::Shed(vec![(0, Critical)])
        );
        // LOW is at its share now: another LOW is shed itself.
        assert_eq!(
            q.push(101, Low, None, 0),
            PushOutcome::Shed(vec![(101, Low)])
        );
        assert_eq!(q.len_by_priority(), [1, 0, 0, 14]);
    }

    #[test]
    fn test_under_overload_low_keeps_its_share_of_deliveries() {
        // Every class arrives at the same rate, twice what is consumed: half of everything is
        // shed, and the deliveries still follow the weights (LOW 1/15 ≈ 6.7%).
        let mut q = PriorityQueue::new(no_aging(), 1000);
        let mut counts = [0_usize; 4];
        for tick in 0..20_000_u32 {
            for p in Priority::ALL {
                let _ = q.push(tick, p, None, 0);
            }
            for _ in 0..2 {
                let (_, p) = pop_item(&mut q, 0).unwrap();
                counts[p.index()] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        let low_share = counts[Low.index()] as f64 / total as f64;
        assert!(
            low_share >= 0.06,
            "LOW share {low_share:.3}, counts {counts:?}"
        );
        assert!(
            counts[Critical.index()] >= counts[High.index()]
                && counts[High.index()] > counts[Low.index()],
            "{counts:?}"
        );
    }

    #[test]
    fn test_capacity_zero_sheds_every_push() {
        let mut q = PriorityQueue::new(no_aging(), 0);
        assert_eq!(
            q.push(1, Critical, None, 0),
            PushOutcome::Shed(vec![(1, Critical)])
        );
        assert!(q.is_empty());
    }

    #[test]
    fn test_expired_items_are_never_popped_and_are_reported() {
        let mut q = PriorityQueue::new(no_aging(), 100);
        q.push(1, Critical, Some(100), 0);
        q.push(2, Critical, Some(200), 0);
        q.push(3, Low, Some(100), 0);
        q.push(4, Low, None, 0);
        let popped = q.pop(100);
        assert_eq!(popped.item, Some((2, Critical, 0)));
        assert_eq!(popped.expired, vec![(3, Low), (1, Critical)]);
        let popped = q.pop(200);
        assert_eq!(popped.item, Some((4, Low, 0)));
        assert!(popped.expired.is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn test_pop_with_only_expired_items_returns_none_and_reports_them() {
        let mut q = PriorityQueue::new(no_aging(), 100);
        q.push(1, High, Some(10), 0);
        q.push(2, High, Some(10), 0);
        let popped = q.pop(10);
        assert_eq!(popped.item, None);
        assert_eq!(popped.expired, vec![(1, High), (2, High)]);
        assert!(q.is_empty());
    }

    #[test]
    fn test_drain_expired_removes_expired_items_wherever_they_wait() {
        let mut q = PriorityQueue::new(no_aging(), 100);
        q.push(1, Normal, None, 0);
        q.push(2, Normal, Some(50), 0);
        q.push(3, Normal, None, 0);
        q.push(4, High, Some(60), 0);
        q.push(5, High, Some(500), 0);
        assert!(q.drain_expired(49).is_empty());
        assert_eq!(q.drain_expired(60), vec![(2, Normal), (4, High)]);
        assert_eq!(q.len(), 3);
        assert_eq!(q.drain(), vec![(5, High), (1, Normal), (3, Normal)]);
        assert!(q.is_empty());
    }

    #[test]
    fn test_push_front_goes_to_head_of_its_class_and_ignores_capacity() {
        let mut q = PriorityQueue::new(no_aging(), 2);
        q.push(1, Normal, None, 10);
        q.push(2, Normal, None, 20);
        q.push_front(0, Normal, None, 5);
        assert_eq!(q.len(), 3);
        assert_eq!(q.oldest_enqueued_ms(), Some(5));
        assert_eq!(q.pop(30).item, Some((0, Normal, 5)));
        assert_eq!(q.pop(30).item, Some((1, Normal, 10)));
        assert_eq!(q.pop(30).item, Some((2, Normal, 20)));
        assert_eq!(q.oldest_enqueued_ms(), None);
    }

    #[test]
    fn test_idle_class_gets_no_credit_for_idle_time() {
        let mut q = PriorityQueue::new(no_aging(), 100_000);
        for i in 0..5_000 {
            q.push(i, High, None, 0);
        }
        count_pops(&mut q, 3_000, 0);
        // LOW arrives late with a backlog: it gets its 1:4 share, not a catch-up burst.
        for i in 0..1_000 {
            q.push(i, Low, None, 0);
        }
        let counts = count_pops(&mut q, 500, 0);
        assert!(counts[Low.index()].abs_diff(100) <= 2, "counts {counts:?}");
    }

    #[test]
    fn test_critical_goes_first_on_a_new_queue_as_on_an_old_one() {
        for history in [0, 1, 40] {
            let mut q = PriorityQueue::new(no_aging(), 1_000);
            for i in 0..history {
                q.push(i, Normal, None, 0);
                pop_item(&mut q, 0);
            }
            // One blocker out, then 10 LOW and 5 CRITICAL wait: all CRITICAL go first.
            q.push(100, Normal, None, 0);
            pop_item(&mut q, 0);
            for i in 0..10 {
                q.push(200 + i, Low, None, 0);
            }
            for i in 0..5 {
                q.push(300 + i, Critical, None, 0);
            }
            let order: Vec<Priority> = (0..15).map(|_| pop_item(&mut q, 0).unwrap().1).collect();
            let want: Vec<Priority> = [[Critical; 5].as_slice(), [Low; 10].as_slice()].concat();
            assert_eq!(order, want, "after {history} earlier deliveries");
        }
    }

    #[test]
    fn test_idle_critical_banks_a_bounded_burst() {
        let mut q = PriorityQueue::new(no_aging(), 100_000);
        for i in 0..5_000 {
            q.push(i, Low, None, 0);
            q.push(i, High, None, 0);
        }
        count_pops(&mut q, 3_000, 0);
        // CRITICAL back from idle with 200 events: 64 go back to back, then its 8:4:1 share.
        for i in 0..200 {
            q.push(10_000 + i, Critical, None, 0);
        }
        let first = count_pops(&mut q, CRITICAL_BURST as usize, 0);
        assert_eq!(first[Critical.index()], 64, "burst {first:?}");
        let after = count_pops(&mut q, 130, 0);
        assert!(after[Critical.index()].abs_diff(80) <= 2, "after {after:?}");
    }

    #[test]
    fn test_critical_flood_keeps_its_share_despite_the_burst_credit() {
        let mut q = PriorityQueue::new(no_aging(), 1_000_000);
        fill(&mut q, 100_000, 0);
        // Every class backlogged from the start: only the new queue's one burst, never more.
        let counts = count_pops(&mut q, 150_000, 0);
        assert!(
            counts[Critical.index()].abs_diff(80_000) <= 64,
            "{counts:?}"
        );
        assert!(counts[Low.index()].abs_diff(10_000) <= 8, "{counts:?}");
    }

    #[test]
    fn test_renormalizing_the_virtual_clock_keeps_the_schedule() {
        let mut q = PriorityQueue::new(no_aging(), 100_000);
        fill(&mut q, 1_000, 0);
        count_pops(&mut q, CRITICAL_BURST as usize, 0);
        let offset = RENORMALIZE_AT - 5 * SCALE;
        q.virtual_time += offset;
        for tag in &mut q.start {
            *tag += offset;
        }
        let counts = count_pops(&mut q, 1_500, 0);
        assert!(q.virtual_time < RENORMALIZE_AT);
        assert_eq!(counts, [100, 200, 400, 800]);
    }
}
