//! What the aggregator talks about: states, component kinds and ids.

use std::fmt;

/// A component's health state (Statuspage's vocabulary, Consul's semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Not known (nothing has been observed).
    Unknown,
    /// Serving; every check passes.
    Up,
    /// Serving with reduced capacity or a dependency DOWN.
    Degraded,
    /// Not serving.
    Down,
    /// Just discovered; no verdict yet.
    Pending,
    /// Put in maintenance by an operator.
    Maintenance,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [Self; 6] = [
        Self::Unknown,
        Self::Up,
        Self::Degraded,
        Self::Down,
        Self::Pending,
        Self::Maintenance,
    ];

    /// Upper-case name, as on the status page and in causes.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Up => "UP",
            Self::Degraded => "DEGRADED",
            Self::Down => "DOWN",
            Self::Pending => "PENDING",
            Self::Maintenance => "MAINTENANCE",
        }
    }

    /// How bad it is, for "the worst of": UP and MAINTENANCE 0 … DOWN 3.
    #[must_use]
    pub fn severity(self) -> u8 {
        match self {
            Self::Up | Self::Maintenance => 0,
            Self::Pending | Self::Unknown => 1,
            Self::Degraded => 2,
            Self::Down => 3,
        }
    }

    /// UP or DEGRADED: the component serves.
    #[must_use]
    pub fn is_serving(self) -> bool {
        matches!(self, Self::Up | Self::Degraded)
    }

    /// Parses an upper- or lower-case name.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The whole cluster.
    Cluster,
    /// A service (all its instances).
    Service,
    /// One instance of a service.
    Instance,
    /// A dependency (etcd, Redis).
    Dependency,
}

impl Kind {
    /// Lower-case name, for metric labels and JSON.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "cluster",
            Self::Service => "service",
            Self::Instance => "instance",
            Self::Dependency => "dependency",
        }
    }
}

/// The cluster's component id.
pub const CLUSTER_ID: &str = "cluster";

/// `service/<name>`.
#[must_use]
pub fn service_id(service: &str) -> String {
    format!("service/{service}")
}

/// `instance/<service>/<instance_id>`.
#[must_use]
pub fn instance_id(service: &str, instance: &str) -> String {
    format!("instance/{service}/{instance}")
}

/// `dependency/<name>`.
#[must_use]
pub fn dependency_id(name: &str) -> String {
    format!("dependency/{name}")
}

/// The kind a component id names, if it is well formed.
#[must_use]
pub fn kind_of(id: &str) -> Option<Kind> {
    let mut parts = id.split('/');
    let kind = match (parts.next()?, parts.next(), parts.next(), parts.next()) {
        ("cluster", None, None, None) => Kind::Cluster,
        ("service", Some(s), None, None) if !s.is_empty() => Kind::Service,
        ("instance", Some(s), Some(i), None) if !s.is_empty() && !i.is_empty() => Kind::Instance,
        ("dependency", Some(d), None, None) if !d.is_empty() => Kind::Dependency,
        _ => return None,
    };
    Some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_component_ids_parse_to_their_kind() {
        assert_eq!(kind_of("cluster"), Some(Kind::Cluster));
        assert_eq!(kind_of(&service_id("cache")), Some(Kind::Service));
        assert_eq!(kind_of(&instance_id("cache", "c-1")), Some(Kind::Instance));
        assert_eq!(kind_of(&dependency_id("redis")), Some(Kind::Dependency));
        for bad in [
            "",
            "service/",
            "instance/cache",
            "x/y",
            "cluster/a",
            "service/a/b",
        ] {
            assert_eq!(kind_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_states_order_by_severity_and_parse() {
        assert!(State::Down.severity() > State::Degraded.severity());
        assert_eq!(State::parse("down"), Some(State::Down));
        assert_eq!(State::parse("nope"), None);
    }
}
