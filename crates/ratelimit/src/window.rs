//! A cost budget's plain types: its limit and its calendar window (UTC), with the window's
//! bounds computed from the civil calendar.

pub(crate) const NANOS_PER_HOUR: u64 = 3_600 * 1_000_000_000;
pub(crate) const NANOS_PER_DAY: u64 = 24 * NANOS_PER_HOUR;

/// The calendar window (UTC) a budget's limit applies to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum BudgetWindow {
    /// A calendar hour.
    Hour,
    /// A calendar day, from 00:00 UTC.
    Day,
    /// A calendar month, from the 1st at 00:00 UTC.
    Month,
}

impl BudgetWindow {
    /// The name used in policy files and stored policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The window containing `now_nanos` (UNIX time, ns) as `[start, end)` in ns; the end
    /// saturates at `u64::MAX` for the last window representable.
    pub fn bounds(self, now_nanos: u64) -> (u64, u64) {
        match self {
            Self::Hour => fixed_bounds(now_nanos, NANOS_PER_HOUR),
            Self::Day => fixed_bounds(now_nanos, NANOS_PER_DAY),
            Self::Month => {
                let days = now_nanos / NANOS_PER_DAY;
                let (year, month) = civil_from_days(days);
                let start = days_from_civil(year, month);
                let end = if month == 12 {
                    days_from_civil(year + 1, 1)
                } else {
                    days_from_civil(year, month + 1)
                };
                (
                    start.saturating_mul(NANOS_PER_DAY),
                    end.saturating_mul(NANOS_PER_DAY),
                )
            }
        }
    }
}

fn fixed_bounds(now: u64, length: u64) -> (u64, u64) {
    let start = now - now % length;
    (start, start.saturating_add(length))
}

/// Days since 1970-01-01 of the 1st of `month` (1..=12) in `year` (>= 1970): Howard Hinnant's
/// `days_from_civil`, in unsigned arithmetic since UNIX time here is never negative.
fn days_from_civil(year: u64, month: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5; // day of year of the 1st, March-based
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe) - 719_468
}

/// (year, month 1..=12) of the day `days` since 1970-01-01: Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month)
}

/// A budget's limit and window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetSpec {
    /// Units per window, `1..=10^15` (validated by the caller; any value is safe here).
    pub limit: u64,
    /// The calendar window the limit applies to.
    pub window: BudgetWindow,
}
