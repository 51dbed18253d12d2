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
