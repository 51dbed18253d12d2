//! What feeds the aggregator: discovery of instances from membership ([`discovery`]), one probe
//! per instance ([`instance`]) and one per dependency ([`deps`]), and the periodic tick.

pub mod deps;
pub mod discovery;
pub mod instance;
pub mod optimizations;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::aggregator::Aggregator;

/// Milliseconds since the epoch.
#[must_use]
pub fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// How often the aggregator's tick runs (leave grace, maintenance expiry).
const TICK: Duration = Duration::from_millis(250);

/// Runs the aggregator's tick until `stop`.
pub fn spawn_tick(aggregator: Arc<Aggregator>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = interval.tick() => aggregator.tick(now_ms()),
            }
        }
    });
}

/// A delay in `[0, period)` derived from `key`, so checks of many targets spread out.
#[must_use]
pub fn spread(key: &str, period: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    let millis = u64::try_from(period.as_millis()).unwrap_or(1).max(1);
    Duration::from_millis(hasher.finish() % millis)
}
