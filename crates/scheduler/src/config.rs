//! The pool's name, tunables and bounds.

use std::time::Duration;

/// Short service name in membership.
pub const NAME: &str = "scheduler";

/// Longest identifier (agent id, type, capability, tag and label keys), bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest value (capability and label values, endpoint), bytes.
pub const MAX_VALUE_LEN: usize = 256;
/// Most entries of one list or map in a request.
pub const MAX_ENTRIES: usize = 64;
/// Largest capacity of one agent, slots.
pub const MAX_CAPACITY: u32 = 10_000;
/// Largest weight of one agent.
pub const MAX_WEIGHT: u32 = 1_000;
/// Longest affinity key, bytes.
pub const MAX_AFFINITY_KEY_LEN: usize = 512;
/// Shortest and longest reservation.
pub const MIN_RESERVATION_TTL: Duration = Duration::from_millis(100);
/// Longest reservation.
pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(3600);
/// Reservation lifetime when the caller gives none.
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(60);
/// Longest drain deadline.
pub const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);
/// Drain deadline when the caller gives none.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Largest page of ListAgents.
pub const MAX_PAGE: usize = 1000;
/// Page of ListAgents when the caller gives no size.
pub const DEFAULT_PAGE: usize = 100;

/// How the pool behaves.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// How often agents report (told to them at registration).
    pub heartbeat_interval: Duration,
    /// Suspicion level φ at which an agent gets no new work.
    pub suspect_phi: f64,
    /// Suspicion level φ at which an agent is dead.
    pub dead_phi: f64,
    /// Smallest standard deviation the detector assumes for heartbeat intervals, so that a
    /// steady agent is not suspected for ordinary network jitter (300 ms).
    pub min_std_dev: Duration,
    /// An agent silent this long is dead whatever φ says (told to it as its lease).
    pub lease: Duration,
    /// How long a dead agent stays listed before it is removed.
    pub dead_retention: Duration,
    /// Time over which a new agent's share of ADAPTIVE picks ramps up to its full weight.
    pub slow_start: Duration,
    /// Most registered agents.
    pub max_agents: usize,
    /// Most open reservations.
    pub max_reservations: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            suspect_phi: 3.0,
            dead_phi: 8.0,
            min_std_dev: Duration::from_millis(250),
            lease: Duration::from_secs(5),
            dead_retention: Duration::from_secs(60),
            slow_start: Duration::from_secs(30),
            max_agents: 100_000,
            max_reservations: 1_000_000,
        }
    }
}

/// Largest task payload and result, bytes.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Longest progress or error message from an agent, bytes.
pub const MAX_MESSAGE: usize = 1024;
/// Longest idempotency key, bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Highest task priority.
pub const MAX_PRIORITY: u32 = 9;
/// Attempt duration when the submitter gives none.
pub const DEFAULT_START_TO_CLOSE: Duration = Duration::from_secs(300);
/// Bounds of a task's deadlines.
pub const MAX_TASK_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most attempts of one task.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest retry back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
