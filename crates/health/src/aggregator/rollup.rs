//! Pure roll-up rules: a service's state from its instances and dependencies, the cluster's
//! from its services and dependencies, and which component needs which.

use crate::model::State;

/// What each service needs, beside etcd membership: a dependency that is DOWN makes the
/// service at least DEGRADED, named as the root cause. Only edges to components the
/// aggregator knows (checked dependencies, discovered services) are used.
pub const NEEDS: &[(&str, &[&str])] = &[
    ("ratelimit", &["dependency/redis", "dependency/etcd"]),
    ("eventbus", &["dependency/redis", "dependency/etcd"]),
    (
        "scheduler",
        &["dependency/redis", "dependency/etcd", "service/eventbus"],
    ),
    ("cache", &["dependency/redis", "dependency/etcd"]),
    ("health", &["dependency/etcd"]),
];

/// The components `service` needs (by id), from [`NEEDS`]; unknown services need etcd.
#[must_use]
pub fn needs(service: &str) -> &'static [&'static str] {
    NEEDS
        .iter()
        .find(|(name, _)| *name == service)
        .map_or(&["dependency/etcd"], |(_, needs)| needs)
}

/// A service's instances, counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Instances not in maintenance.
    pub total: u32,
    /// Of those, UP or DEGRADED.
    pub serving: u32,
    /// Of those, PENDING.
    pub pending: u32,
    /// Instances in maintenance (not counted above).
    pub maintenance: u32,
}

impl Counts {
    /// Counts instance states (`in_maintenance` marks those an operator put in maintenance).
    pub fn of(states: impl IntoIterator<Item = (State, bool)>) -> Self {
        let mut counts = Self::default();
        for (state, in_maintenance) in states {
            if in_maintenance {
                counts.maintenance += 1;
                continue;
            }
            counts.total += 1;
            if state.is_serving() {
                counts.serving += 1;
            } else if state == State::Pending {
                counts.pending += 1;
            }
        }
        counts
    }
}

/// How a service's state is decided.
#[derive(Debug, Clone, Copy)]
pub struct RollupRules {
    /// Fewer serving instances than this is DOWN (default 1).
    pub min_serving: u32,
    /// Instances the service should have (`--health-expect`); fewer serving is DEGRADED.
    pub expected: Option<u32>,
}

/// A service's state and cause from its instances and the dependencies of it that are DOWN
/// (root causes, named first).
#[must_use]
pub fn service_state(counts: Counts, rules: RollupRules, down_needs: &[String]) -> (State, String) {
    let want = counts.total.max(rules.expected.unwrap_or(0));
    let down = want - counts.serving.min(want);
    let (state, cause) = if want == 0 {
        if counts.maintenance > 0 {
            (State::Maintenance, String::new())
        } else {
            (State::Unknown, "no instance registered".to_owned())
        }
    } else if counts.serving == 0 && counts.pending > 0 && counts.pending == counts.total {
        (State::Pending, "waiting for the first checks".to_owned())
    } else if counts.serving < rules.min_serving.max(1) {
        let cause = if counts.total == 0 {
            format!("no instance registered ({want} expected)")
        } else {
            format!("{} of {want} instances serving", counts.serving)
        };
        (State::Down, cause)
    } else if down > 0 {
        (State::Degraded, format!("{down} of {want} instances DOWN"))
    } else {
        (State::Up, String::new())
    };
    if down_needs.is_empty() {
        return (state, cause);
    }
    let roots = down_needs
        .iter()
        .map(|id| format!("{} DOWN", short_name(id)))
        .collect::<Vec<_>>()
        .join(", ");
    match state {
        State::Up => (State::Degraded, roots),
        State::Degraded | State::Down => (state, format!("{roots}; {cause}")),
        _ => (state, cause),
    }
}

/// "redis" for "dependency/redis", "eventbus" for "service/eventbus".
#[must_use]
pub fn short_name(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// One component the cluster rolls up from.
pub struct Part<'a> {
    /// Short name ("ratelimit", "redis").
    pub name: &'a str,
    /// Its shown state.
    pub state: State,
    /// Its cause.
    pub cause: &'a str,
    /// A service (true) or a dependency.
    pub is_service: bool,
}

/// The cluster's state and summary: DOWN when a service is DOWN; DEGRADED when a service is
/// DEGRADED or a dependency DOWN; PENDING while everything waits; UNKNOWN with no component.
#[must_use]
pub fn cluster_state(parts: &[Part<'_>]) -> (State, String) {
    if parts.is_empty() {
        return (State::Unknown, "no service discovered yet".to_owned());
    }
    let mut state = State::Up;
    let mut reasons = Vec::new();
    for part in parts {
        let effect = match (part.state, part.is_service) {
            (State::Down, true) => State::Down,
            (State::Down | State::Degraded, _) => State::Degraded,
            (State::Pending | State::Unknown, _) => State::Pending,
            _ => State::Up,
        };
        if effect.severity() > state.severity() {
            state = effect;
        }
        if !matches!(part.state, State::Up | State::Maintenance) {
            reasons.push(if part.cause.is_empty() {
                format!("{} {}", part.name, part.state)
            } else {
                format!("{} {}: {}", part.name, part.state, part.cause)
            });
        }
    }
    if state == State::Pending && parts.iter().any(|p| p.state == State::Up) {
        // Some components are still being discovered while the rest serve.
        state = State::Up;
    }
    let summary = if reasons.is_empty() {
        state.as_str().to_owned()
    } else {
        format!("{state}: {}", reasons.join("; "))
    };
    (state, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: RollupRules = RollupRules {
        min_serving: 1,
        expected: None,
    };

    fn counts(states: &[State]) -> Counts {
        Counts::of(states.iter().map(|s| (*s, false)))
    }

    #[test]
    fn test_some_replicas_down_is_degraded_none_serving_is_down() {
        use State::{Down, Up};
        assert_eq!(service_state(counts(&[Up, Up]), RULES, &[]).0, Up);
        let (state, cause) = service_state(counts(&[Up, Down, Up]), RULES, &[]);
        assert_eq!(
            (state, cause.as_str()),
            (State::Degraded, "1 of 3 instances DOWN")
        );
        let (state, cause) = service_state(counts(&[Down, Down]), RULES, &[]);
        assert_eq!((state, cause.as_str()), (Down, "0 of 2 instances serving"));
    }

    #[test]
    fn test_min_serving_and_expected_count() {
        use State::Up;
        let rules = RollupRules {
            min_serving: 2,
            expected: Some(3),
        };
        assert_eq!(service_state(counts(&[Up]), rules, &[]).0, State::Down);
        let (state, cause) = service_state(counts(&[Up, Up]), rules, &[]);
        assert_eq!(
            (state, cause.as_str()),
            (State::Degraded, "1 of 3 instances DOWN")
        );
        let (state, cause) = service_state(counts(&[]), rules, &[]);
        assert_eq!(state, State::Down);
        assert_eq!(cause, "no instance registered (3 expected)");
    }

    #[test]
    fn test_a_dependency_down_degrades_and_is_named_first() {
        use State::{Down, Up};
        let redis = vec!["dependency/redis".to_owned()];
        let (state, cause) = service_state(counts(&[Up, Up]), RULES, &redis);
        assert_eq!((state, cause.as_str()), (State::Degraded, "redis DOWN"));
        let (state, cause) = service_state(counts(&[Down]), RULES, &redis);
        assert_eq!(state, Down);
        assert_eq!(cause, "redis DOWN; 0 of 1 instances serving");
    }

    #[test]
    fn test_all_pending_is_pending_and_maintenance_only_is_maintenance() {
        assert_eq!(
            service_state(counts(&[State::Pending]), RULES, &[]).0,
            State::Pending
        );
        let only_maintenance = Counts::of([(State::Down, true)]);
        assert_eq!(
            service_state(only_maintenance, RULES, &[]).0,
            State::Maintenance
        );
    }

    #[test]
    fn test_cluster_is_down_with_a_service_down_and_degraded_with_a_dependency_down() {
        let part = |name, state, is_service| Part {
            name,
            state,
            cause: "",
            is_service,
        };
        let (state, summary) = cluster_state(&[
            part("ratelimit", State::Up, true),
            part("redis", State::Down, false),
        ]);
        assert_eq!(
            (state, summary.as_str()),
            (State::Degraded, "DEGRADED: redis DOWN")
        );
        let (state, _) = cluster_state(&[part("cache", State::Down, true)]);
        assert_eq!(state, State::Down);
        let (state, summary) = cluster_state(&[part("cache", State::Maintenance, true)]);
        assert_eq!((state, summary.as_str()), (State::Up, "UP"));
        assert_eq!(cluster_state(&[]).0, State::Unknown);
    }
}
