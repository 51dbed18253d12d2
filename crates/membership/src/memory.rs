//! In-memory membership: standalone mode (`agentmesh dev`) and unit tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use crate::member::validate_name;
use crate::registration::RegistrationHandle;
use crate::watch::{EVENT_BUFFER, StampedEvent};
use crate::{
    Member, MemberSnapshot, MemberWatch, Membership, MembershipError, MembershipEvent, Registration,
};

/// Membership held in this process, with the same semantics as etcd except leases: there is no
/// TTL, so a dropped [`Registration`] leaves at once. Clones share the same state.
#[derive(Clone, Default)]
pub struct InMemoryMembership {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Global change counter, like etcd's revision.
    epoch: u64,
    /// Identifies registrations, like a lease id: a newer registration of the same instance
    /// replaces the entry and an older one can no longer remove it.
    next_token: u64,
    services: HashMap<String, ServiceState>,
}

struct ServiceState {
    members: BTreeMap<String, (u64, Member)>,
    events_tx: broadcast::Sender<StampedEvent>,
    snapshot_tx: watch::Sender<Arc<MemberSnapshot>>,
}

impl ServiceState {
    fn new(service: &str) -> Self {
        let snapshot = MemberSnapshot {
            service: service.to_owned(),
            ..MemberSnapshot::default()
        };
        Self {
            members: BTreeMap::new(),
            events_tx: broadcast::channel(EVENT_BUFFER).0,
            snapshot_tx: watch::channel(Arc::new(snapshot)).0,
        }
    }

    /// Publishes the new snapshot first, then the event, so `current()` always includes it.
    fn publish(&self, service: &str, epoch: u64, event: MembershipEvent) {
        let members = self
            .members
            .iter()
            .map(|(id, (_, m))| (id.clone(), m.clone()))
            .collect();
        let snapshot = MemberSnapshot {
            service: service.to_owned(),
            members,
            epoch,
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
        // No receiver is fine: nobody is watching.
        let _ = self.events_tx.send(StampedEvent { epoch, event });
    }
}

impl State {
    fn service(&mut self, service: &str) -> &mut ServiceState {
        self.services
            .entry(service.to_owned())
            .or_insert_with(|| ServiceState::new(service))
    }

    fn insert(&mut self, member: Member) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        let service = member.service.clone();
        let state = self
            .services
            .entry(service.clone())
            .or_insert_with(|| ServiceState::new(&service));
        let previous = state
            .members
            .insert(member.instance_id.clone(), (token, member.clone()));
        let event = match previous {
            None => MembershipEvent::Joined(member),
            Some((_, old)) if old != member => MembershipEvent::Updated(member),
            // Same details under a new registration: nothing changed for watchers.
            Some(_) => return token,
        };
        self.epoch += 1;
        state.publish(&service, self.epoch, event);
        token
    }

    fn remove(&mut self, service: &str, instance_id: &str, token: u64) {
        let Some(state) = self.services.get_mut(service) else {
            return;
        };
        if state
            .members
            .get(instance_id)
            .is_none_or(|(t, _)| *t != token)
        {
            return;
        }
        let Some((_, member)) = state.members.remove(instance_id) else {
            return;
        };
        self.epoch += 1;
        state.publish(service, self.epoch, MembershipEvent::Left(member));
    }
}

struct InMemoryRegistration {
    state: Arc<Mutex<State>>,
    service: String,
    instance_id: String,
    token: u64,
}

impl InMemoryRegistration {
    fn remove(&self) {
        self.state
            .lock()
            .remove(&self.service, &self.instance_id, self.token);
    }
}

impl RegistrationHandle for InMemoryRegistration {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        self.remove();
        Box::pin(async { Ok(()) })
    }
}

impl Drop for InMemoryRegistration {
    fn drop(&mut self) {
        // Idempotent: after `deregister` the token no longer matches.
        self.remove();
    }
}

#[async_trait::async_trait]
impl Membership for InMemoryMembership {
    async fn register(&self, member: Member) -> Result<Registration, MembershipError> {
        member.validate()?;
        let token = self.state.lock().insert(member.clone());
        let handle = InMemoryRegistration {
            state: Arc::clone(&self.state),
            service: member.service.clone(),
            instance_id: member.instance_id.clone(),
            token,
        };
        Ok(Registration::new(
            member,
            Arc::new(AtomicBool::new(true)),
            Box::new(handle),
        ))
    }

    async fn list(&self, service: &str) -> Result<MemberSnapshot, MembershipError> {
        validate_name("service", service)?;
        let mut state = self.state.lock();
        let snapshot = state.service(service).snapshot_tx.borrow().clone();
        Ok(MemberSnapshot::clone(&snapshot))
    }

    async fn list_all(&self) -> Result<Vec<Member>, MembershipError> {
        let state = self.state.lock();
        let mut all: Vec<Member> = state
            .services
            .values()
            .flat_map(|s| s.members.values().map(|(_, m)| m.clone()))
            .collect();
        all.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
        Ok(all)
    }

    async fn watch(&self, service: &str) -> Result<MemberWatch, MembershipError> {
        validate_name("service", service)?;
        let mut state = self.state.lock();
        let service_state = state.service(service);
        // Both subscribed under the lock: no event can slip between snapshot and stream.
        let events_rx = service_state.events_tx.subscribe();
        let snapshots_rx = service_state.snapshot_tx.subscribe();
        Ok(MemberWatch::new(
            service.to_owned(),
            events_rx,
            snapshots_rx,
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn member(service: &str, id: &str) -> Member {
        Member {
            service: service.into(),
            instance_id: id.into(),
            grpc_addr: format!("127.0.0.1:7{id}"),
            admin_addr: "127.0.0.1:9000".into(),
            version: "1.0.0".into(),
            zone: "z1".into(),
            started_at_ms: 42,
        }
    }

    async fn next(watch: &mut MemberWatch) -> MembershipEvent {
        tokio::time::timeout(Duration::from_secs(1), watch.next_event())
            .await
            .expect("event in time")
            .expect("watch open")
    }

    #[tokio::test]
    async fn test_register_lists_member_and_deregister_removes_it() {
        let membership = InMemoryMembership::default();
        let reg = membership.register(member("cache", "1")).await.unwrap();
        assert!(reg.is_registered());
        assert_eq!(reg.member(), &member("cache", "1"));
        let snap = membership.list("cache").await.unwrap();
        assert_eq!(snap.service, "cache");
        assert_eq!(snap.members.len(), 1);
        assert_eq!(snap.get("1"), Some(&member("cache", "1")));
        let epoch = snap.epoch;

        reg.deregister().await.unwrap();
        let snap = membership.list("cache").await.unwrap();
        assert!(snap.is_empty());
        assert!(snap.epoch > epoch);
    }

    #[tokio::test]
    async fn test_dropped_registration_leaves_at_once() {
        let membership = InMemoryMembership::default();
        let reg = membership.register(member("cache", "1")).await.unwrap();
        drop(reg);
        assert!(membership.list("cache").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn test_register_rejects_invalid_member() {
        let membership = InMemoryMembership::default();
        let err = membership
            .register(member("cache", "a/b"))
            .await
            .unwrap_err();
        assert!(matches!(err, MembershipError::InvalidMember(_)), "{err}");
        assert!(matches!(
            membership.list("").await,
            Err(MembershipError::InvalidMember(_))
        ));
    }

    #[tokio::test]
    async fn test_list_all_is_sorted_by_service_then_instance() {
        let membership = InMemoryMembership::default();
        let _r = [
            membership.register(member("ratelimit", "2")).await.unwrap(),
            membership.register(member("cache", "2")).await.unwrap(),
            membership.register(member("ratelimit", "1")).await.unwrap(),
            membership.register(member("cache", "1")).await.unwrap(),
        ];
        let all: Vec<_> = membership
            .list_all()
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.service, m.instance_id))
            .collect();
        let expected = [
            ("cache", "1"),
            ("cache", "2"),
            ("ratelimit", "1"),
            ("ratelimit", "2"),
        ]
        .map(|(s, i)| (s.to_string(), i.to_string()));
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn test_watch_sees_snapshot_then_joined_updated_left() {
        let membership = InMemoryMembership::default();
        let first = membership.register(member("cache", "1")).await.unwrap();
        let _other_service = membership.register(member("eventbus", "1")).await.unwrap();
        let mut watch = membership.watch("cache").await.unwrap();
        let initial = watch.current();
        assert_eq!(initial.members.keys().collect::<Vec<_>>(), ["1"]);

        let second = membership.register(member("cache", "2")).await.unwrap();
        assert_eq!(
            next(&mut watch).await,
            MembershipEvent::Joined(member("cache", "2"))
        );
        assert!(watch.current().epoch > initial.epoch);
        assert_eq!(watch.current().len(), 2);

        let mut changed = member("cache", "2");
        changed.version = "1.1.0".into();
        let second_again = membership.register(changed.clone()).await.unwrap();
        assert_eq!(
            next(&mut watch).await,
            MembershipEvent::Updated(changed.clone())
        );

        // The replaced registration can no longer remove the entry it lost.
        drop(second);
        second_again.deregister().await.unwrap();
        assert_eq!(next(&mut watch).await, MembershipEvent::Left(changed));
        drop(first);
        assert_eq!(
            next(&mut watch).await,
            MembershipEvent::Left(member("cache", "1"))
        );
        assert!(watch.current().is_empty());
    }

    #[tokio::test]
    async fn test_snapshots_receiver_is_notified_of_changes() {
        let membership = InMemoryMembership::default();
        let watch = membership.watch("cache").await.unwrap();
        let mut snapshots = watch.snapshots();
        let _reg = membership.register(member("cache", "1")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), snapshots.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(snapshots.borrow().len(), 1);
    }

    #[tokio::test]
    async fn test_lagging_watch_resyncs_from_snapshot() {
        let membership = InMemoryMembership::default();
        let mut watch = membership.watch("cache").await.unwrap();
        let keep = membership.register(member("cache", "keep")).await.unwrap();
        // Overflow the buffer with churn that ends where it started.
        for round in 0..EVENT_BUFFER {
            let reg = membership
                .register(member("cache", &format!("t{round}")))
                .await
                .unwrap();
            drop(reg);
        }
        let mut events = Vec::new();
        while let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(50), watch.next_event()).await
        {
            events.push(ev);
        }
        assert!(
            events.len() < 2 * EVENT_BUFFER,
            "the consumer lagged and resynced"
        );
        // Whatever was collapsed, replaying the events gives the current snapshot.
        let mut view = BTreeMap::new();
        for ev in &events {
            crate::member::apply(&mut view, ev);
        }
        assert_eq!(view, watch.current().members);
        assert_eq!(view.keys().collect::<Vec<_>>(), ["keep"]);
        drop(keep);
        assert_eq!(
            next(&mut watch).await,
            MembershipEvent::Left(member("cache", "keep"))
        );
    }

    #[tokio::test]
    async fn test_watch_ends_when_membership_is_gone() {
        let membership = InMemoryMembership::default();
        let mut watch = membership.watch("cache").await.unwrap();
        drop(membership);
        assert_eq!(watch.next_event().await, None);
    }
}
