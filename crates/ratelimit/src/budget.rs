//! Cost budgets: spending limits in cost units (LLM tokens, micro-dollars) per UTC calendar
//! window, with reserve → commit/cancel settlement.
//!
//! A caller reserves an estimate before an LLM call and then commits the actual cost (the hold
//! is released and the actual charged: the difference is refunded, an overspend is recorded) or
//! cancels (full refund). A reservation nobody settles expires after its TTL and is refunded.
//!
//! # Windows
//!
//! A budget counts spending in the calendar hour, day or month (UTC) that contains `now`; a new
//! window starts at zero. The window always follows `now`, also when the clock steps backwards:
//! the budget then counts in the earlier window from zero (only one window's counters are kept).
//! A reservation counts against the window it was made in; once that window is no longer the
//! current one it stops counting but stays open (it can still be committed or cancelled) until
//! its TTL.
//!
//! # Committing across windows
//!
//! The actual cost of a commit is always charged to the current window. If the reservation's
//! window is still current, that is the window it was reserved in; if it has ended, the cost is
//! charged to the window in which it was settled rather than dropped, so spending that straddles
//! a boundary is never lost.
//!
//! # Reservation ids
//!
//! 128 random bits from a CSPRNG ([`crate::ids`]): one caller cannot settle another's
//! reservation by guessing or counting. (A mixed counter was invertible: one id gave away the
//! next.)
//!
//! # Bounds
//!
//! The ledger holds at most `max_budgets` budgets and `max_open_reservations` open reservations,
//! split evenly over its shards (up to 16, with at least 64 of each bound per shard, so a small
//! ledger has one shard and exact bounds; a key is refused when its own shard is full). Expired
//! reservations are released lazily on any access to their key. When a shard reaches either
//! bound, it is swept once: expired reservations are released and every budget equivalent to a
//! fresh one (no open reservation, and nothing spent in its current window or a window that has
//! ended) is dropped. If that frees nothing, the request fails with [`BudgetError::Full`]. After
//! a sweep the shard remembers the time interval in which another sweep could free nothing, so a
//! full shard under load is not rescanned on every request.
//!
//! # Listing
//!
//! Each budget keeps its namespace and key (at most 128 + 512 bytes, so the memory per budget
//! stays bounded) and the latest limit given, so [`BudgetLedger::list`] can report every budget
//! of a namespace. A listing scans every shard (each under its own lock, one at a time): it is
//! an operator's call, not a hot path.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::time::Duration;

use parking_lot::Mutex;

use crate::hash::PrehashedKey;
use crate::ids::{OpaqueId, new_id};
pub use crate::window::{BudgetSpec, BudgetWindow};

/// Most shards a ledger is split into.
const MAX_SHARDS: usize = 16;
/// Fewest budgets and reservations per shard: small ledgers keep one shard, so their bounds
/// are exact rather than split into slivers that fill unevenly.
const MIN_PER_SHARD: usize = 64;

/// Which budget a ledger call is about: the hash it is keyed by, and the names it keeps so it
/// can be listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetKey<'a> {
    /// Hash of (namespace, key, window): the budget's identity. The caller keeps it consistent
    /// with the names.
    pub hash: u64,
    /// Namespace of the key.
    pub namespace: &'a str,
    /// The key.
    pub key: &'a str,
}

/// One budget found by [`BudgetLedger::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedBudget {
    /// The key.
    pub key: String,
    /// Its calendar window.
    pub window: BudgetWindow,
    /// Its usage now; `limit` is the latest limit given for it.
    pub usage: Usage,
}

/// The answer of [`BudgetLedger::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetListing {
    /// Sorted by (key, window).
    pub budgets: Vec<ListedBudget>,
    /// Keys after the last one listed were left out.
    pub truncated: bool,
}

/// An open hold on part of a budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Id to commit or cancel with, unique per ledger.
    pub id: OpaqueId,
    /// Units held.
    pub amount: u64,
    /// UNIX time (ns) from which the hold is released by itself.
    pub expires_at_nanos: u64,
    /// Start (ns) of the window the hold counts against.
    pub window_start_nanos: u64,
}

/// The result of [`BudgetLedger::reserve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveOutcome {
    /// Whether the estimate fits the budget.
    pub granted: bool,
    /// The hold, if granted with a non-zero estimate.
    pub reservation: Option<Reservation>,
    /// The budget after the call.
    pub usage: Usage,
}

/// A budget's state in its current window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Units per window.
    pub limit: u64,
    /// Units committed or charged in the window (may exceed the limit).
    pub spent: u64,
    /// Units held by open reservations made in the window.
    pub reserved: u64,
    /// `limit - spent - reserved`, saturating at zero.
    pub remaining: u64,
    /// Window start, UNIX ns.
    pub window_start_nanos: u64,
    /// Window end (exclusive), UNIX ns.
    pub window_end_nanos: u64,
}

impl Usage {
    fn new(limit: u64, spent: u64, reserved: u64, (start, end): (u64, u64)) -> Self {
        Self {
            limit,
            spent,
            reserved,
            remaining: limit.saturating_sub(spent).saturating_sub(reserved),
            window_start_nanos: start,
            window_end_nanos: end,
        }
    }
}

/// Why a budget operation failed.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    /// The reservation was never made under this key, or was already settled, cancelled or
    /// expired.
    #[error("reservation {0:032x} does not exist (settled, cancelled or expired)")]
    UnknownReservation(OpaqueId),
    /// The budget or open-reservation bound is reached (the value is that bound).
    #[error("this instance holds its maximum of {0} budgets or open reservations")]
    Full(usize),
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    amount: u64,
    expires_at: u64,
    window: BudgetWindow,
    window_start: u64,
}

type HoldMap = HashMap<OpaqueId, Hold, BuildHasherDefault<PrehashedKey>>;

#[derive(Debug)]
struct Budget {
    namespace: Box<str>,
    key: Box<str>,
    /// The latest limit given (listings report it).
    limit: u64,
    window: BudgetWindow,
    window_start: u64,
    window_end: u64,
    spent: u64,
    /// Sum of the holds made in the current window.
    reserved: u64,
    holds: HoldMap,
    /// No hold expires before this (may be early after holds are settled).
    next_expiry: u64,
}

impl Budget {
    fn fresh(key: BudgetKey<'_>, spec: &BudgetSpec, (start, end): (u64, u64)) -> Self {
        Self {
            namespace: key.namespace.into(),
            key: key.key.into(),
            limit: spec.limit,
            window: spec.window,
            window_start: start,
            window_end: end,
            spent: 0,
            reserved: 0,
            holds: HoldMap::default(),
            next_expiry: u64::MAX,
        }
    }

    /// Releases expired holds and moves to the window of `now`; returns how many holds were
    /// released.
    fn refresh(&mut self, window: BudgetWindow, bounds: (u64, u64), now: u64) -> usize {
        let released = self.release_expired(now);
        let rolled = self.window != window || self.window_start != bounds.0;
        if rolled {
            self.window = window;
            self.window_start = bounds.0;
            self.window_end = bounds.1;
            self.spent = 0;
        }
        if released > 0 || rolled {
            let (window, start) = (self.window, self.window_start);
            self.reserved = self
                .holds
                .values()
                .filter(|hold| hold.window == window && hold.window_start == start)
                .fold(0, |sum, hold| sum.saturating_add(hold.amount));
        }
        released
    }

    /// Drops the holds expired at `now` (without fixing `reserved`); returns how many.
    fn release_expired(&mut self, now: u64) -> usize {
        if now < self.next_expiry {
            return 0;
        }
        let before = self.holds.len();
        self.holds.retain(|_, hold| now < hold.expires_at);
        self.next_expiry = self
            .holds
            .values()
            .map(|hold| hold.expires_at)
            .min()
            .unwrap_or(u64::MAX);
        before - self.holds.len()
    }

    fn counts(&self, hold: &Hold) -> bool {
        hold.window == self.window && hold.window_start == self.window_start
    }

    /// Equivalent to a fresh budget at `now` (holds already released).
    fn at_rest(&self, now: u64) -> bool {
        self.holds.is_empty()
            && (self.spent == 0 || now < self.window_start || now >= self.window_end)
    }

    fn usage(&self) -> Usage {
        Usage::new(
            self.limit,
            self.spent,
            self.reserved,
            (self.window_start, self.window_end),
        )
    }
}

type BudgetMap = HashMap<u64, Budget, BuildHasherDefault<PrehashedKey>>;

#[derive(Debug)]
struct Shard {
    budgets: BudgetMap,
    /// Open holds over all budgets of the shard.
    open: usize,
    max_budgets: usize,
    max_open: usize,
    /// A sweep can free nothing while `quiet_from <= now < quiet_until` (empty when unknown).
    quiet_from: u64,
    quiet_until: u64,
}

impl Shard {
    /// Refreshes `key`'s budget if present; returns its usage (fresh usage if absent).
    fn refresh(&mut self, key: u64, spec: &BudgetSpec, bounds: (u64, u64), now: u64) -> Usage {
        match self.budgets.get_mut(&key) {
            Some(budget) => {
                let rolled = budget.window != spec.window || budget.window_start != bounds.0;
                let released = budget.refresh(spec.window, bounds, now);
                budget.limit = spec.limit;
                let usage = budget.usage();
                self.open = self.open.saturating_sub(released);
                // Expiries are already within the quiet interval; a roll-over is not when the
                // spec's window kind changed.
                if rolled {
                    self.forget_quiet();
                }
                usage
            }
            None => Usage::new(spec.limit, 0, 0, bounds),
        }
    }

    fn forget_quiet(&mut self) {
        self.quiet_from = u64::MAX;
        self.quiet_until = 0;
    }

    /// Narrows the quiet interval for something that comes to rest at `until` and counts from
    /// `from`.
    fn narrow_quiet(&mut self, from: u64, until: u64) {
        self.quiet_from = self.quiet_from.max(from);
        self.quiet_until = self.quiet_until.min(until);
    }

    /// Releases every expired hold and drops every budget at rest, unless that would free
    /// nothing.
    fn sweep(&mut self, now: u64) {
        if self.quiet_from <= now && now < self.quiet_until {
            return;
        }
        let mut released = 0;
        let (mut from, mut until) = (0, u64::MAX);
        self.budgets.retain(|_, budget| {
            released += budget.release_expired(now);
            if budget.at_rest(now) {
                return false;
            }
            budget.reserved = budget
                .holds
                .values()
                .filter(|hold| budget.counts(hold))
                .fold(0, |sum, hold| sum.saturating_add(hold.amount));
            from = from.max(budget.window_start);
            until = until.min(budget.window_end).min(budget.next_expiry);
            true
        });
        self.open = self.open.saturating_sub(released);
        self.quiet_from = from;
        self.quiet_until = until;
    }

    /// `key`'s budget in the window `bounds`, inserted if absent and there is room.
    fn budget_mut(
        &mut self,
        key: BudgetKey<'_>,
        spec: &BudgetSpec,
        bounds: (u64, u64),
        now: u64,
        full: usize,
    ) -> Result<&mut Budget, BudgetError> {
        if !self.budgets.contains_key(&key.hash) {
            if self.budgets.len() >= self.max_budgets {
                self.sweep(now);
            }
            if self.budgets.len() >= self.max_budgets {
                return Err(BudgetError::Full(full));
            }
            self.narrow_quiet(bounds.0, bounds.1);
        }
        Ok(self
            .budgets
            .entry(key.hash)
            .or_insert_with(|| Budget::fresh(key, spec, bounds)))
    }

    /// Releases hold `id` of `key` (refreshed first) and charges `actual` to the current
    /// window.
    fn settle(
        &mut self,
        key: u64,
        spec: &BudgetSpec,
        id: OpaqueId,
        actual: u64,
        now: u64,
    ) -> Result<Usage, BudgetError> {
        let bounds = spec.window.bounds(now);
        self.refresh(key, spec, bounds, now);
        let budget = self
            .budgets
            .get_mut(&key)
            .ok_or(BudgetError::UnknownReservation(id))?;
        let hold = budget
            .holds
            .remove(&id)
            .ok_or(BudgetError::UnknownReservation(id))?;
        if budget.counts(&hold) {
            budget.reserved = budget.reserved.saturating_sub(hold.amount);
        }
        budget.spent = budget.spent.saturating_add(actual);
        let usage = budget.usage();
        self.open = self.open.saturating_sub(1);
        // The budget may now be at rest before the remembered interval ends.
        self.forget_quiet();
        Ok(usage)
    }
}

/// Keeps each shard's lock on its own cache line.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

/// Cost budgets per key, bounded, sharded by key hash; `Send + Sync`.
#[derive(Debug)]
pub struct BudgetLedger {
    shards: Box<[Padded<Mutex<Shard>>]>,
    shard_mask: u64,
    max_budgets: usize,
    max_open_reservations: usize,
}

impl BudgetLedger {
    /// An empty ledger holding at most `max_budgets` budgets and `max_open_reservations` open
    /// reservations (each bound split evenly over the shards).
    pub fn new(max_budgets: usize, max_open_reservations: usize) -> Self {
        let wanted = (max_budgets.min(max_open_reservations) / MIN_PER_SHARD).clamp(1, MAX_SHARDS);
        let shards = if wanted.is_power_of_two() {
            wanted
        } else {
            wanted.next_power_of_two() / 2
        };
        let share =
            |total: usize, index: usize| total / shards + usize::from(index < total % shards);
        Self {
            shards: (0..shards)
                .map(|index| {
                    Padded(Mutex::new(Shard {
                        budgets: BudgetMap::default(),
                        open: 0,
                        max_budgets: share(max_budgets, index),
                        max_open: share(max_open_reservations, index),
                        quiet_from: u64::MAX,
                        quiet_until: 0,
                    }))
                })
                .collect(),
            shard_mask: (shards - 1) as u64,
            max_budgets,
            max_open_reservations,
        }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        // Bits above 32, so the map inside a shard still sees uniformly random low and top bits.
        // The mask is below MAX_SHARDS, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let index = ((key >> 32) & self.shard_mask) as usize;
        &self.shards[index].0
    }

    /// Reserves `estimate` in the current window: granted iff `spent + reserved + estimate <=
    /// limit`. An estimate of 0 is always granted and holds nothing (no reservation); a denied
    /// reserve holds nothing. The hold is released by itself at `now + ttl`.
    pub fn reserve(
        &self,
        key: BudgetKey<'_>,
        spec: &BudgetSpec,
        estimate: u64,
        ttl: Duration,
        now_nanos: u64,
    ) -> Result<ReserveOutcome, BudgetError> {
        let now = now_nanos;
        let bounds = spec.window.bounds(now);
        let mut guard = self.shard(key.hash).lock();
        let shard = &mut *guard;
        let usage = shard.refresh(key.hash, spec, bounds, now);
        let fits = usage
            .spent
            .checked_add(usage.reserved)
            .and_then(|total| total.checked_add(estimate))
            .is_some_and(|total| total <= spec.limit);
        if estimate == 0 || !fits {
            return Ok(ReserveOutcome {
                granted: estimate == 0,
                reservation: None,
                usage,
            });
        }
        if shard.open >= shard.max_open {
            shard.sweep(now);
            if shard.open >= shard.max_open {
                return Err(BudgetError::Full(self.max_open_reservations));
            }
        }
        let expires_at = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
        let budget = shard.budget_mut(key, spec, bounds, now, self.max_budgets)?;
        let id = new_id();
        budget.holds.insert(
            id,
            Hold {
                amount: estimate,
                expires_at,
                window: spec.window,
                window_start: bounds.0,
            },
        );
        budget.reserved = budget.reserved.saturating_add(estimate);
        budget.next_expiry = budget.next_expiry.min(expires_at);
        let usage = budget.usage();
        shard.open += 1;
        shard.narrow_quiet(bounds.0, expires_at);
        Ok(ReserveOutcome {
            granted: true,
            reservation: Some(Reservation {
                id,
                amount: estimate,
                expires_at_nanos: expires_at,
                window_start_nanos: bounds.0,
            }),
            usage,
        })
    }

    /// Settles a reservation with the actual cost: releases the hold and adds `actual` to the
    /// current window's spent (overspend is recorded, never refused). A reservation whose
    /// window has ended is charged to the current window (see the module docs).
    pub fn commit(
        &self,
        key: BudgetKey<'_>,
        spec: &BudgetSpec,
        reservation_id: OpaqueId,
        actual: u64,
        now_nanos: u64,
    ) -> Result<Usage, BudgetError> {
        self.shard(key.hash)
            .lock()
            .settle(key.hash, spec, reservation_id, actual, now_nanos)
    }

    /// Releases a reservation without charging.
    pub fn cancel(
        &self,
        key: BudgetKey<'_>,
        spec: &BudgetSpec,
        reservation_id: OpaqueId,
        now_nanos: u64,
    ) -> Result<Usage, BudgetError> {
        self.shard(key.hash)
            .lock()
            .settle(key.hash, spec, reservation_id, 0, now_nanos)
    }

    /// Charges `amount` to the current window without a reservation (for callers that only
    /// know the cost afterwards); never refused for exceeding the limit.
    pub fn charge(
        &self,
        key: BudgetKey<'_>,
        spec: &BudgetSpec,
        amount: u64,
        now_nanos: u64,
    ) -> Result<Usage, BudgetError> {
        let now = now_nanos;
        let bounds = spec.window.bounds(now);
        let mut shard = self.shard(key.hash).lock();
        let usage = shard.refresh(key.hash, spec, bounds, now);
        if amount == 0 {
            return Ok(usage);
        }
        let budget = shard.budget_mut(key, spec, bounds, now, self.max_budgets)?;
        budget.spent = budget.spent.saturating_add(amount);
        Ok(budget.usage())
    }

    /// Current usage: expired reservations are released first; a new window starts at zero.
    pub fn usage(&self, key: BudgetKey<'_>, spec: &BudgetSpec, now_nanos: u64) -> Usage {
        let bounds = spec.window.bounds(now_nanos);
        self.shard(key.hash)
            .lock()
            .refresh(key.hash, spec, bounds, now_nanos)
    }

    /// The budgets of `namespace` whose key sorts after `start_after`, at most `max_keys` keys
    /// (each with all its windows), sorted by (key, window). Budgets at rest (nothing spent in
    /// the current window and no open reservation) are left out: they are indistinguishable
    /// from fresh ones. Expired reservations are released and windows rolled on the way.
    pub fn list(
        &self,
        namespace: &str,
        start_after: &str,
        max_keys: usize,
        now_nanos: u64,
    ) -> BudgetListing {
        let now = now_nanos;
        // At most `max_keys` keys are kept at any time: memory is bounded by the page size.
        let mut found: BTreeMap<Box<str>, Vec<ListedBudget>> = BTreeMap::new();
        let mut truncated = false;
        for shard in &self.shards {
            let mut guard = shard.0.lock();
            let shard = &mut *guard;
            let (mut released, mut rolled) = (0, false);
            for budget in shard.budgets.values_mut() {
                if *budget.namespace != *namespace || *budget.key <= *start_after {
                    continue;
                }
                let bounds = budget.window.bounds(now);
                rolled |= budget.window_start != bounds.0;
                released += budget.refresh(budget.window, bounds, now);
                if budget.at_rest(now) {
                    continue;
                }
                if !found.contains_key(&budget.key) && found.len() >= max_keys {
                    truncated = true;
                    match found.last_key_value() {
                        Some((last, _)) if budget.key < *last => {
                            found.pop_last();
                        }
                        _ => continue,
                    }
                }
                found
                    .entry(budget.key.clone())
                    .or_default()
                    .push(ListedBudget {
                        key: budget.key.to_string(),
                        window: budget.window,
                        usage: budget.usage(),
                    });
            }
            shard.open = shard.open.saturating_sub(released);
            if rolled {
                shard.forget_quiet();
            }
        }
        let budgets = found
            .into_values()
            .flat_map(|mut windows| {
                windows.sort_by_key(|b| b.window);
                windows
            })
            .collect();
        BudgetListing { budgets, truncated }
    }

    /// (budgets held, open reservations held), for metrics.
    pub fn stats(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(budgets, open), shard| {
            let shard = shard.0.lock();
            (budgets + shard.budgets.len(), open + shard.open)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{NANOS_PER_DAY, NANOS_PER_HOUR};

    const SEC: u64 = 1_000_000_000;
    /// 2028-02-29T13:45:10Z.
    const LEAP_DAY_AFTERNOON: u64 = 1_835_444_710 * SEC;
    const TTL: Duration = Duration::from_secs(60);

    fn hourly(limit: u64) -> BudgetSpec {
        BudgetSpec {
            limit,
            window: BudgetWindow::Hour,
        }
    }

    /// A budget of namespace `ns` whose hash is `hash` (the names only matter to listings).
    fn id(hash: u64) -> BudgetKey<'static> {
        BudgetKey {
            hash,
            namespace: "ns",
            key: "k",
        }
    }

    fn granted(outcome: &ReserveOutcome) -> Reservation {
        assert!(outcome.granted, "{outcome:?}");
        outcome.reservation.clone().expect("a reservation")
    }

    #[test]
    fn test_ledger_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<BudgetLedger>();
    }

    #[test]
    fn test_hour_and_day_bounds_on_leap_day() {
        // 2028-02-29T13:00:00Z and 2028-02-29T00:00:00Z.
        assert_eq!(
            BudgetWindow::Hour.bounds(LEAP_DAY_AFTERNOON),
            (1_835_442_000 * SEC, 1_835_445_600 * SEC)
        );
        assert_eq!(
            BudgetWindow::Day.bounds(LEAP_DAY_AFTERNOON),
            (1_835_395_200 * SEC, 1_835_481_600 * SEC)
        );
    }

    #[test]
    fn test_month_bounds_cover_february_29_in_a_leap_year() {
        // [2028-02-01, 2028-03-01): 29 days.
        let (start, end) = BudgetWindow::Month.bounds(LEAP_DAY_AFTERNOON);
        assert_eq!((start, end), (1_832_976_000 * SEC, 1_835_481_600 * SEC));
        assert_eq!((end - start) / NANOS_PER_DAY, 29);
        // 2027-02-10: 28 days.
        let (start, end) = BudgetWindow::Month.bounds(1_802_217_600 * SEC);
        assert_eq!((end - start) / NANOS_PER_DAY, 28);
    }

    #[test]
    fn test_month_bounds_cross_the_year_from_december_to_january() {
        // 2027-12-31T23:59:59.999999999Z is in [2027-12-01, 2028-01-01).
        let last_nano_of_2027 = 1_830_297_600 * SEC - 1;
        assert_eq!(
            BudgetWindow::Month.bounds(last_nano_of_2027),
            (1_827_619_200 * SEC, 1_830_297_600 * SEC)
        );
        // 2028-01-01T00:00:00Z starts January: [2028-01-01, 2028-02-01).
        assert_eq!(
            BudgetWindow::Month.bounds(1_830_297_600 * SEC),
            (1_830_297_600 * SEC, 1_832_976_000 * SEC)
        );
    }

    #[test]
    fn test_time_exactly_on_a_boundary_starts_the_new_window() {
        // 2028-03-01T00:00:00Z is the first instant of March, of its day and of its hour.
        let march = 1_835_481_600 * SEC;
        assert_eq!(BudgetWindow::Month.bounds(march).0, march);
        assert_eq!(
            BudgetWindow::Day.bounds(march),
            (march, march + NANOS_PER_DAY)
        );
        assert_eq!(
            BudgetWindow::Hour.bounds(march),
            (march, march + NANOS_PER_HOUR)
        );
        assert_eq!(BudgetWindow::Month.bounds(march - 1).1, march);
        assert_eq!(
            BudgetWindow::Month.bounds(0),
            (0, 31 * NANOS_PER_DAY),
            "January 1970"
        );
    }

    #[test]
    fn test_month_bounds_agree_with_day_counts_over_four_centuries() {
        // Walk month by month from 1970 through 2369 (covers the 2100/2200/2300 non-leap rule).
        let mut start = 0;
        for year in 1970..2370_u64 {
            for month in 1..=12 {
                let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
                let days = match month {
                    2 if leap => 29,
                    2 => 28,
                    4 | 6 | 9 | 11 => 30,
                    _ => 31,
                };
                let end = start + days * NANOS_PER_DAY;
                assert_eq!(BudgetWindow::Month.bounds(start), (start, end));
                assert_eq!(BudgetWindow::Month.bounds(end - 1), (start, end));
                start = end;
            }
        }
    }

    #[test]
    fn test_commit_below_estimate_refunds_the_difference() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(10_000);
        let now = LEAP_DAY_AFTERNOON;
        let reservation = granted(&ledger.reserve(id(1), &spec, 1_000, TTL, now).unwrap());
        assert_eq!(reservation.amount, 1_000);
        assert_eq!(reservation.expires_at_nanos, now + 60 * SEC);
        assert_eq!(reservation.window_start_nanos, 1_835_442_000 * SEC);
        let held = ledger.usage(id(1), &spec, now + SEC);
        assert_eq!(
            (held.spent, held.reserved, held.remaining),
            (0, 1_000, 9_000)
        );

        let usage = ledger
            .commit(id(1), &spec, reservation.id, 600, now + 2 * SEC)
            .unwrap();
        assert_eq!(
            (usage.spent, usage.reserved, usage.remaining),
            (600, 0, 9_400)
        );
        assert_eq!(ledger.stats(), (1, 0));
    }

    #[test]
    fn test_commit_above_estimate_records_the_overspend() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        let reservation = granted(&ledger.reserve(id(1), &spec, 900, TTL, now).unwrap());
        let usage = ledger
            .commit(id(1), &spec, reservation.id, 1_500, now)
            .unwrap();
        assert_eq!(
            (usage.spent, usage.reserved, usage.remaining),
            (1_500, 0, 0)
        );
        let denied = ledger.reserve(id(1), &spec, 1, TTL, now).unwrap();
        assert!(!denied.granted);
        assert_eq!(denied.usage.spent, 1_500);
    }

    #[test]
    fn test_cancel_refunds_fully() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        ledger.charge(id(1), &spec, 100, now).unwrap();
        let reservation = granted(&ledger.reserve(id(1), &spec, 700, TTL, now).unwrap());
        let usage = ledger.cancel(id(1), &spec, reservation.id, now).unwrap();
        assert_eq!(
            (usage.spent, usage.reserved, usage.remaining),
            (100, 0, 900)
        );
        assert_eq!(ledger.stats(), (1, 0));
    }

    #[test]
    fn test_reservation_expires_after_ttl_and_is_refunded_on_next_access() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        let reservation = granted(&ledger.reserve(id(1), &spec, 800, TTL, now).unwrap());
        let just_before = ledger.usage(id(1), &spec, now + 60 * SEC - 1);
        assert_eq!((just_before.reserved, just_before.remaining), (800, 200));
        assert_eq!(ledger.stats(), (1, 1));

        let after = ledger.usage(id(1), &spec, now + 60 * SEC);
        assert_eq!(
            (after.spent, after.reserved, after.remaining),
            (0, 0, 1_000)
        );
        assert_eq!(ledger.stats(), (1, 0));
        assert_eq!(
            ledger.commit(id(1), &spec, reservation.id, 500, now + 61 * SEC),
            Err(BudgetError::UnknownReservation(reservation.id))
        );
    }

    #[test]
    fn test_denied_reserve_holds_nothing() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        granted(&ledger.reserve(id(1), &spec, 600, TTL, now).unwrap());
        let denied = ledger.reserve(id(1), &spec, 401, TTL, now).unwrap();
        assert!(!denied.granted);
        assert_eq!(denied.reservation, None);
        assert_eq!((denied.usage.reserved, denied.usage.remaining), (600, 400));
        assert_eq!(ledger.stats(), (1, 1));
        // Exactly the remainder still fits.
        granted(&ledger.reserve(id(1), &spec, 400, TTL, now).unwrap());
        // A denied reserve on an unknown key creates no budget.
        assert!(
            !ledger
                .reserve(id(2), &spec, 1_001, TTL, now)
                .unwrap()
                .granted
        );
        assert_eq!(ledger.stats(), (1, 2));
    }

    #[test]
    fn test_zero_estimate_is_granted_without_a_reservation() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        ledger.charge(id(1), &spec, 5_000, now).unwrap();
        let outcome = ledger.reserve(id(1), &spec, 0, TTL, now).unwrap();
        assert!(outcome.granted);
        assert_eq!(outcome.reservation, None);
        assert_eq!((outcome.usage.spent, outcome.usage.remaining), (5_000, 0));
        assert_eq!(ledger.stats(), (1, 0));
    }

    #[test]
    fn test_window_rollover_resets_spent_and_stops_counting_old_holds() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        // 13:59:00 on 2028-02-29.
        let late = 1_835_445_540 * SEC;
        ledger.charge(id(1), &spec, 700, late).unwrap();
        let reservation = granted(&ledger.reserve(id(1), &spec, 300, TTL * 5, late).unwrap());

        // 14:00:30: new window; the old hold is still open but no longer counts.
        let next = 1_835_445_630 * SEC;
        let usage = ledger.usage(id(1), &spec, next);
        assert_eq!(
            (usage.spent, usage.reserved, usage.remaining),
            (0, 0, 1_000)
        );
        assert_eq!(usage.window_start_nanos, 1_835_445_600 * SEC);
        assert_eq!(ledger.stats(), (1, 1));

        // Committing it after the window ended charges the current window.
        let usage = ledger
            .commit(id(1), &spec, reservation.id, 250, next)
            .unwrap();
        assert_eq!(
            (usage.spent, usage.reserved, usage.remaining),
            (250, 0, 750)
        );
    }

    #[test]
    fn test_clock_going_backwards_counts_in_the_window_of_now() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        granted(&ledger.reserve(id(1), &spec, 400, TTL, now).unwrap());
        let earlier = now - NANOS_PER_HOUR;
        let usage = ledger.usage(id(1), &spec, earlier);
        assert_eq!((usage.spent, usage.reserved), (0, 0));
        assert_eq!(usage.window_start_nanos, 1_835_438_400 * SEC);
    }

    #[test]
    fn test_unknown_or_double_commit_is_unknown_reservation() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        let reservation = granted(&ledger.reserve(id(1), &spec, 100, TTL, now).unwrap());
        assert_eq!(
            ledger.commit(id(2), &spec, reservation.id, 100, now),
            Err(BudgetError::UnknownReservation(reservation.id)),
            "another key's reservation"
        );
        assert_eq!(
            ledger.commit(id(1), &spec, reservation.id ^ 1, 100, now),
            Err(BudgetError::UnknownReservation(reservation.id ^ 1))
        );
        ledger
            .commit(id(1), &spec, reservation.id, 100, now)
            .unwrap();
        assert_eq!(
            ledger.commit(id(1), &spec, reservation.id, 100, now),
            Err(BudgetError::UnknownReservation(reservation.id))
        );
        assert_eq!(
            ledger.cancel(id(1), &spec, reservation.id, now),
            Err(BudgetError::UnknownReservation(reservation.id))
        );
        assert_eq!(ledger.usage(id(1), &spec, now).spent, 100, "charged once");
    }

    #[test]
    fn test_reservation_ids_are_unique() {
        let ledger = BudgetLedger::new(10, 10_000);
        let spec = hourly(u64::MAX);
        let mut ids = std::collections::HashSet::new();
        for _ in 0..5_000 {
            let reservation = granted(
                &ledger
                    .reserve(id(1), &spec, 1, TTL, LEAP_DAY_AFTERNOON)
                    .unwrap(),
            );
            assert!(ids.insert(reservation.id));
        }
    }

    #[test]
    fn test_budget_bound_is_full_until_a_budget_comes_to_rest() {
        let ledger = BudgetLedger::new(1, 1);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        ledger.charge(id(1), &spec, 10, now).unwrap();
        assert_eq!(
            ledger.charge(id(2), &spec, 10, now),
            Err(BudgetError::Full(1))
        );
        assert_eq!(
            ledger.reserve(id(2), &spec, 10, TTL, now),
            Err(BudgetError::Full(1))
        );
        // Reads of an unknown key need no room.
        assert_eq!(ledger.usage(id(2), &spec, now).remaining, 1_000);
        // Next hour key 1 is equivalent to fresh and gives way.
        let next_hour = now + NANOS_PER_HOUR;
        assert_eq!(
            ledger.charge(id(2), &spec, 10, next_hour).unwrap().spent,
            10
        );
        assert_eq!(ledger.stats(), (1, 0));
    }

    #[test]
    fn test_reservation_bound_is_full_until_one_expires() {
        let ledger = BudgetLedger::new(4, 2);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        let first = granted(&ledger.reserve(id(1), &spec, 10, TTL, now).unwrap());
        granted(&ledger.reserve(id(1), &spec, 10, TTL * 2, now).unwrap());
        assert_eq!(
            ledger.reserve(id(1), &spec, 10, TTL, now + SEC),
            Err(BudgetError::Full(2))
        );
        // Settling frees a slot.
        ledger.cancel(id(1), &spec, first.id, now + SEC).unwrap();
        granted(&ledger.reserve(id(1), &spec, 10, TTL, now + SEC).unwrap());
        assert_eq!(
            ledger.reserve(id(1), &spec, 10, TTL, now + 2 * SEC),
            Err(BudgetError::Full(2))
        );
        // The sweep on a full shard releases the expired hold even for another key.
        let expired = now + SEC + 60 * SEC;
        granted(&ledger.reserve(id(2), &spec, 10, TTL, expired).unwrap());
        assert_eq!(ledger.stats(), (2, 2));
    }

    #[test]
    fn test_zero_bounds_refuse_without_panicking() {
        let ledger = BudgetLedger::new(0, 0);
        let spec = hourly(1_000);
        let now = LEAP_DAY_AFTERNOON;
        assert_eq!(
            ledger.charge(id(1), &spec, 1, now),
            Err(BudgetError::Full(0))
        );
        assert_eq!(
            ledger.reserve(id(1), &spec, 1, TTL, now),
            Err(BudgetError::Full(0))
        );
        assert!(ledger.reserve(id(1), &spec, 0, TTL, now).unwrap().granted);
        assert_eq!(ledger.stats(), (0, 0));
    }

    #[test]
    fn test_keys_spread_over_shards_and_stats_sum_them() {
        let ledger = BudgetLedger::new(64 * 16, 64 * 16);
        assert_eq!(ledger.shards.len(), 16);
        let spec = hourly(1_000);
        for shard in 0..16_u64 {
            let key = (shard << 32) | 7;
            ledger
                .charge(id(key), &spec, 1, LEAP_DAY_AFTERNOON)
                .unwrap();
            granted(
                &ledger
                    .reserve(id(key), &spec, 1, TTL, LEAP_DAY_AFTERNOON)
                    .unwrap(),
            );
        }
        assert_eq!(ledger.stats(), (16, 16));
        for shard in ledger.shards.iter() {
            let shard = shard.0.lock();
            assert_eq!((shard.budgets.len(), shard.open), (1, 1));
            assert_eq!((shard.max_budgets, shard.max_open), (64, 64));
        }
    }

    #[test]
    fn test_huge_values_saturate() {
        let ledger = BudgetLedger::new(100, 100);
        let spec = hourly(u64::MAX);
        let now = u64::MAX;
        for window in [BudgetWindow::Hour, BudgetWindow::Day, BudgetWindow::Month] {
            let (start, end) = window.bounds(now);
            assert!(start <= now && end == u64::MAX, "{window:?}");
        }
        let reservation = granted(
            &ledger
                .reserve(id(1), &spec, u64::MAX - 1, Duration::MAX, 0)
                .unwrap(),
        );
        assert_eq!(reservation.expires_at_nanos, u64::MAX);
        // 1 more still fits exactly; 2 more would overflow and is denied, not wrapped.
        assert!(!ledger.reserve(id(1), &spec, 2, TTL, 0).unwrap().granted);
        assert!(
            !ledger
                .reserve(id(1), &spec, u64::MAX, TTL, 0)
                .unwrap()
                .granted
        );
        let usage = ledger
            .commit(id(1), &spec, reservation.id, u64::MAX, 0)
            .unwrap();
        assert_eq!((usage.spent, usage.remaining), (u64::MAX, 0));
        let usage = ledger.charge(id(1), &spec, u64::MAX, 0).unwrap();
        assert_eq!(
            (usage.spent, usage.reserved, usage.remaining),
            (u64::MAX, 0, 0)
        );
        // A far-future time and a huge TTL neither panic nor overflow.
        let late = ledger
            .reserve(id(2), &hourly(5), 5, Duration::MAX, now)
            .unwrap();
        assert_eq!(granted(&late).expires_at_nanos, u64::MAX);
    }

    #[test]
    fn test_list_gives_a_namespaces_budgets_by_key_and_window_with_the_latest_limit() {
        let ledger = BudgetLedger::new(64 * 8, 64 * 8);
        assert_eq!(ledger.shards.len(), 8);
        let now = LEAP_DAY_AFTERNOON;
        // Distinct hashes spread over the shards (the shard is taken from bits 32 and up).
        let at = |n: u64, namespace: &'static str, key: &'static str| BudgetKey {
            hash: (n << 32) | n,
            namespace,
            key,
        };
        let daily = BudgetSpec {
            limit: 5_000,
            window: BudgetWindow::Day,
        };
        ledger
            .charge(at(1, "team-a", "b-agent"), &hourly(1_000), 10, now)
            .unwrap();
        ledger
            .charge(at(2, "team-a", "a-agent"), &hourly(1_000), 3, now)
            .unwrap();
        granted(
            &ledger
                .reserve(at(3, "team-a", "a-agent"), &daily, 5, TTL, now)
                .unwrap(),
        );
        ledger
            .charge(at(4, "team-b", "a-agent"), &hourly(1_000), 7, now)
            .unwrap();
        // Spent in the previous hour only: at rest now, so not listed.
        ledger
            .charge(
                at(5, "team-a", "old"),
                &hourly(1_000),
                7,
                now - NANOS_PER_HOUR,
            )
            .unwrap();
        // Only read: never created.
        ledger.usage(at(6, "team-a", "read-only"), &hourly(1_000), now);
        // The latest limit given is the one listed.
        let raised = ledger.usage(at(1, "team-a", "b-agent"), &hourly(2_000), now);
        assert_eq!(raised.remaining, 1_990);

        let listing = ledger.list("team-a", "", 10, now + SEC);
        let rows: Vec<_> = listing
            .budgets
            .iter()
            .map(|b| {
                (
                    b.key.as_str(),
                    b.window,
                    b.usage.limit,
                    b.usage.spent,
                    b.usage.reserved,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("a-agent", BudgetWindow::Hour, 1_000, 3, 0),
                ("a-agent", BudgetWindow::Day, 5_000, 0, 5),
                ("b-agent", BudgetWindow::Hour, 2_000, 10, 0),
            ]
        );
        assert!(!listing.truncated);
        assert_eq!(
            listing.budgets[0].usage.window_start_nanos,
            1_835_442_000 * SEC
        );

        // Pages: at most `max_keys` keys, each with all its windows.
        let first = ledger.list("team-a", "", 1, now);
        assert!(first.truncated);
        assert_eq!(first.budgets.len(), 2);
        assert!(first.budgets.iter().all(|b| b.key == "a-agent"));
        let second = ledger.list("team-a", "a-agent", 1, now);
        assert!(!second.truncated);
        assert_eq!(second.budgets.len(), 1);
        assert_eq!(second.budgets[0].key, "b-agent");
        let none = ledger.list("team-a", "", 0, now);
        assert!(none.truncated && none.budgets.is_empty());
        assert!(ledger.list("team-c", "", 10, now).budgets.is_empty());
        assert_eq!(ledger.list("team-b", "", 10, now).budgets.len(), 1);
    }

    #[test]
    fn test_list_keeps_the_smallest_keys_whatever_the_scan_order() {
        let ledger = BudgetLedger::new(64 * 16, 64 * 16);
        let names: Vec<String> = (0..200).map(|i| format!("key-{i:03}")).collect();
        // Insert in reverse order over every shard.
        for (n, name) in names.iter().enumerate().rev() {
            let n = n as u64;
            let key = BudgetKey {
                hash: (n << 32) | n,
                namespace: "ns",
                key: name,
            };
            ledger
                .charge(key, &hourly(100), 1, LEAP_DAY_AFTERNOON)
                .unwrap();
        }
        let page = ledger.list("ns", "key-049", 25, LEAP_DAY_AFTERNOON);
        assert!(page.truncated);
        let keys: Vec<&str> = page.budgets.iter().map(|b| b.key.as_str()).collect();
        let expected: Vec<&str> = names[50..75].iter().map(String::as_str).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn test_list_releases_expired_reservations_and_skips_what_comes_to_rest() {
        let ledger = BudgetLedger::new(100, 100);
        let now = LEAP_DAY_AFTERNOON;
        let key = BudgetKey {
            hash: 9,
            namespace: "ns",
            key: "held",
        };
        granted(&ledger.reserve(key, &hourly(1_000), 50, TTL, now).unwrap());
        assert_eq!(ledger.list("ns", "", 10, now).budgets[0].usage.reserved, 50);
        assert_eq!(ledger.stats(), (1, 1));
        assert!(ledger.list("ns", "", 10, now + 60 * SEC).budgets.is_empty());
        assert_eq!(ledger.stats(), (1, 0), "the expired hold was released");
    }

    #[test]
    fn test_concurrent_reserves_never_over_grant() {
        const LIMIT: u64 = 100_000;
        let ledger = BudgetLedger::new(10_000, 1_000_000);
        assert_eq!(ledger.shards.len(), MAX_SHARDS);
        let spec = BudgetSpec {
            limit: LIMIT,
            window: BudgetWindow::Day,
        };
        let now = LEAP_DAY_AFTERNOON;
        let granted_total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8_u64)
                .map(|thread| {
                    let (ledger, spec) = (&ledger, &spec);
                    scope.spawn(move || {
                        let estimate = 7 + thread * 13;
                        let mut sum = 0;
                        for _ in 0..2_000 {
                            let outcome = ledger.reserve(id(42), spec, estimate, TTL, now).unwrap();
                            if outcome.granted {
                                sum += estimate;
                            }
                        }
                        sum
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .sum()
        });
        assert!(granted_total <= LIMIT, "{granted_total} > {LIMIT}");
        assert_eq!(ledger.usage(id(42), &spec, now).reserved, granted_total);
        // The thread asking 98 at a time asks for more than the limit, so it was denied at
        // least once: the budget was filled to within 98 (nothing is released in this test).
        assert!(LIMIT - granted_total < 98, "{granted_total}");
    }
}
