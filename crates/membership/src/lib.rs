//! Cluster membership for agentmesh: who is in the cluster, and who owns which key.
//!
//! Every instance registers under `<prefix>/members/<service>/<instance_id>` (JSON [`Member`])
//! with a lease it keeps alive; peers [`Membership::watch`] a service and get a
//! [`MemberSnapshot`] plus [`MembershipEvent`]s. [`HashRing`] turns a snapshot into key ownership.
//! [`EtcdMembership`] is the production backend, [`InMemoryMembership`] the standalone one.

mod backoff;
mod error;
mod etcd;
mod member;
mod memory;
mod registration;
mod ring;
mod watch;

pub use error::MembershipError;
pub use etcd::{EtcdMembership, EtcdMembershipConfig};
pub use member::{
    MAX_FIELD_LEN, MAX_NAME_LEN, Member, MemberSnapshot, MembershipEvent, member_key, validate_name,
};
pub use memory::InMemoryMembership;
pub use registration::Registration;
pub use ring::HashRing;
pub use watch::{EVENT_BUFFER, MemberWatch};

/// Registers instances and observes the members of services.
#[async_trait::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Registers `member` and keeps it registered until the [`Registration`] is deregistered or
    /// dropped. Fails with `InvalidMember` for a bad member and `Unavailable` when etcd is down.
    async fn register(&self, member: Member) -> Result<Registration, MembershipError>;

    /// The current members of `service`.
    async fn list(&self, service: &str) -> Result<MemberSnapshot, MembershipError>;

    /// Every member of every service, sorted by `(service, instance_id)`.
    async fn list_all(&self) -> Result<Vec<Member>, MembershipError>;

    /// A live view of `service`: its current snapshot and a stream of changes.
    async fn watch(&self, service: &str) -> Result<MemberWatch, MembershipError>;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn test_handles_can_move_between_tasks() {
        assert_send_sync::<Registration>();
        assert_send_sync::<MemberWatch>();
        assert_send_sync::<EtcdMembership>();
        assert_send_sync::<InMemoryMembership>();
        assert_send_sync::<HashRing>();
        assert_send_sync::<Arc<dyn Membership>>();
    }

    #[tokio::test]
    async fn test_membership_works_as_a_trait_object() {
        let membership: Arc<dyn Membership> = Arc::new(InMemoryMembership::default());
        let member = Member {
            service: "cache".into(),
            instance_id: "c1".into(),
            grpc_addr: "127.0.0.1:7103".into(),
            admin_addr: "127.0.0.1:9103".into(),
            version: "0.1.0".into(),
            zone: String::new(),
            started_at_ms: 0,
        };
        let registration = membership.register(member.clone()).await.unwrap();
        let ring = HashRing::new(&membership.list("cache").await.unwrap());
        assert_eq!(ring.owner(b"any key"), Some(&member));
        registration.deregister().await.unwrap();
    }
}
