//! The aggregator's name, bounds and defaults.

use std::collections::BTreeMap;
use std::time::Duration;

/// Short service name in membership.
pub const NAME: &str = "health";
/// Transitions kept for GetHistory.
pub const HISTORY_LEN: usize = 10_000;
/// Revisions a watcher can resume from.
pub const REPLAY_LEN: usize = 4096;
/// Longest component id or filter, bytes.
pub const MAX_COMPONENT_LEN: usize = 256;
/// Longest maintenance reason, bytes.
pub const MAX_REASON_LEN: usize = 256;
/// Longest maintenance.
pub const MAX_MAINTENANCE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default and largest GetHistory page.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// See [`DEFAULT_HISTORY_LIMIT`].
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// How the aggregator checks and decides.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Failed checks in a row before an instance or dependency is DOWN.
    pub fall: u32,
    /// Passing checks in a row before a DOWN instance or dependency is UP again.
    pub rise: u32,
    /// Fewer serving instances than this makes a service DOWN.
    pub min_serving: u32,
    /// Instances each service should have (fewer serving is DEGRADED, none DOWN).
    pub expected: BTreeMap<String, u32>,
    /// How long an instance that said NOT_SERVING has to leave membership before it is DOWN.
    pub leave_grace: Duration,
    /// Time between Checks of one instance or dependency.
    pub check_interval: Duration,
    /// Deadline of one Check.
    pub check_timeout: Duration,
    /// Most checks in flight at once.
    pub max_concurrent_checks: usize,
    /// Time between scrapes of every instance's `/metrics` (optimizations, versions).
    pub scrape_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            fall: 2,
            rise: 2,
            min_serving: 1,
            expected: BTreeMap::new(),
            leave_grace: Duration::from_secs(2),
            check_interval: Duration::from_secs(1),
            check_timeout: Duration::from_millis(500),
            max_concurrent_checks: 256,
            scrape_interval: Duration::from_secs(10),
        }
    }
}
