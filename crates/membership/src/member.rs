//! What a member is, how it is named in etcd, and how two views of a service differ.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MembershipError;

/// Longest accepted service name or instance id, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest accepted address, version or zone, in bytes.
pub const MAX_FIELD_LEN: usize = 256;

/// One running instance of a service, as stored (JSON) under its membership key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Service name, e.g. `ratelimit`.
    pub service: String,
    /// Unique id of the instance within its service.
    pub instance_id: String,
    /// `host:port` of the instance's gRPC server.
    pub grpc_addr: String,
    /// `host:port` of the instance's admin HTTP server.
    pub admin_addr: String,
    /// Version of the running build.
    pub version: String,
    /// Failure domain (may be empty).
    pub zone: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
}

impl Member {
    /// Checks names and field bounds; every backend calls it before storing a member.
    pub fn validate(&self) -> Result<(), MembershipError> {
        validate_name("service", &self.service)?;
        validate_name("instance_id", &self.instance_id)?;
        for (field, value) in [
            ("grpc_addr", &self.grpc_addr),
            ("admin_addr", &self.admin_addr),
            ("version", &self.version),
            ("zone", &self.zone),
        ] {
            if value.len() > MAX_FIELD_LEN {
                return Err(MembershipError::InvalidMember(format!(
                    "{field} is {} bytes, at most {MAX_FIELD_LEN} allowed",
                    value.len()
                )));
            }
            if value.chars().any(char::is_control) {
                return Err(MembershipError::InvalidMember(format!(
                    "{field} must not contain control characters"
                )));
            }
        }
        Ok(())
    }
}

/// Checks a service name or instance id: 1..=128 bytes, no `/`, whitespace or control characters
/// (they become one segment of an etcd key).
pub fn validate_name(what: &str, value: &str) -> Result<(), MembershipError> {
    if value.is_empty() {
        return Err(MembershipError::InvalidMember(format!(
            "{what} must not be empty"
        )));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(MembershipError::InvalidMember(format!(
            "{what} is {} bytes, at most {MAX_NAME_LEN} allowed",
            value.len()
        )));
    }
    if value
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(MembershipError::InvalidMember(format!(
            "{what} {value:?} must not contain '/', whitespace or control characters"
        )));
    }
    Ok(())
}

/// A change in a service's membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A new instance appeared.
    Joined(Member),
    /// A known instance re-registered with different details.
    Updated(Member),
    /// An instance went away (deregistered, or its lease expired); carries its last known state.
    Left(Member),
}

impl MembershipEvent {
    /// The member the event is about.
    pub fn member(&self) -> &Member {
        match self {
            Self::Joined(m) | Self::Updated(m) | Self::Left(m) => m,
        }
    }
}

/// The members of one service at one point in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberSnapshot {
    /// The service the snapshot is about.
    pub service: String,
    /// Members by instance id.
    pub members: BTreeMap<String, Member>,
    /// Increases on every change. With etcd it is the revision of the last change seen; it never
    /// goes backwards, even when etcd's history restarts (a wiped etcd counts on from here).
    pub epoch: u64,
}

impl MemberSnapshot {
    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when the service has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member with this instance id, if present.
    pub fn get(&self, instance_id: &str) -> Option<&Member> {
        self.members.get(instance_id)
    }
}

/// The etcd key of a member: `<prefix>/members/<service>/<instance_id>`.
pub fn member_key(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{}{instance_id}", service_prefix(prefix, service))
}

/// The key prefix holding every member of a service, with its trailing `/`.
pub(crate) fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{}{service}/", members_prefix(prefix))
}

/// The key prefix holding every member of every service, with its trailing `/`.
pub(crate) fn members_prefix(prefix: &str) -> String {
    format!("{}/members/", prefix.trim_end_matches('/'))
}

/// The events that turn `old` into `new`: `Left`, then `Updated`, then `Joined`, each by instance id.
pub(crate) fn diff(
    old: &BTreeMap<String, Member>,
    new: &BTreeMap<String, Member>,
) -> Vec<MembershipEvent> {
    let left = old
        .iter()
        .filter(|(id, _)| !new.contains_key(*id))
        .map(|(_, m)| MembershipEvent::Left(m.clone()));
    let updated = new
        .iter()
        .filter(|(id, m)| old.get(*id).is_some_and(|o| o != *m))
        .map(|(_, m)| MembershipEvent::Updated(m.clone()));
    let joined = new
        .iter()
        .filter(|(id, _)| !old.contains_key(*id))
        .map(|(_, m)| MembershipEvent::Joined(m.clone()));
    left.chain(updated).chain(joined).collect()
}

/// Applies one event to a view of a service (by instance id).
pub(crate) fn apply(view: &mut BTreeMap<String, Member>, event: &MembershipEvent) {
    match event {
        MembershipEvent::Joined(m) | MembershipEvent::Updated(m) => {
            view.insert(m.instance_id.clone(), m.clone());
        }
        MembershipEvent::Left(m) => {
            view.remove(&m.instance_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            service: "svc".into(),
            instance_id: id.into(),
            grpc_addr: "127.0.0.1:1".into(),
            admin_addr: "127.0.0.1:2".into(),
            version: "1".into(),
            zone: String::new(),
            started_at_ms: 1,
        }
    }

    #[test]
    fn test_member_key_has_prefix_service_and_instance() {
        assert_eq!(
            member_key("/agentmesh", "cache", "a1"),
            "/agentmesh/members/cache/a1"
        );
        assert_eq!(
            member_key("/agentmesh/", "cache", "a1"),
            "/agentmesh/members/cache/a1"
        );
    }

    #[test]
    fn test_validate_rejects_slash_empty_and_oversized_names() {
        assert!(member("ok-1.a_b:c").validate().is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(
                matches!(
                    member(bad).validate(),
                    Err(MembershipError::InvalidMember(_))
                ),
                "{bad:?}"
            );
        }
        let mut m = member("a");
        m.zone = "z".repeat(MAX_FIELD_LEN + 1);
        assert!(matches!(
            m.validate(),
            Err(MembershipError::InvalidMember(_))
        ));
    }

    #[test]
    fn test_diff_lists_left_updated_joined_and_applies_back() {
        let old: BTreeMap<_, _> = [("a", member("a")), ("b", member("b"))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let mut b2 = member("b");
        b2.version = "2".into();
        let new: BTreeMap<_, _> = [("b", b2.clone()), ("c", member("c"))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let events = diff(&old, &new);
        assert_eq!(
            events,
            vec![
                MembershipEvent::Left(member("a")),
                MembershipEvent::Updated(b2),
                MembershipEvent::Joined(member("c")),
            ]
        );
        let mut view = old;
        events.iter().for_each(|e| apply(&mut view, e));
        assert_eq!(view, new);
    }
}
