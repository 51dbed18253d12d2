//! Rendezvous (highest-random-weight) hashing over a service's members.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::{Member, MemberSnapshot};

/// Key ownership over one snapshot of a service: each key belongs to the member with the highest
/// `xxh3(key, seed = xxh3(instance_id))`. A join or leave of one of N members moves about 1/N of
/// the keys, and only to or from that member. Carries the snapshot's epoch, so owners computed by
/// different nodes can be compared.
#[derive(Clone, Debug, Default)]
pub struct HashRing {
    epoch: u64,
    /// Members with their hash seed, ordered by instance id.
    members: Vec<(u64, Member)>,
}

impl HashRing {
    /// Builds the ring for the members of `snapshot`.
    pub fn new(snapshot: &MemberSnapshot) -> Self {
        let members = snapshot
            .members
            .values()
            .map(|m| (xxh3_64(m.instance_id.as_bytes()), m.clone()))
            .collect();
        Self {
            epoch: snapshot.epoch,
            members,
        }
    }

    /// The epoch of the snapshot the ring was built from.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The member that owns `key`, or `None` when the ring is empty.
    pub fn owner(&self, key: &[u8]) -> Option<&Member> {
        self.members
            .iter()
            .max_by_key(|(seed, m)| (xxh3_64_with_seed(key, *seed), &m.instance_id))
            .map(|(_, m)| m)
    }

    /// The member that owns `key` among those `skip` does not exclude: the owner the ring will
    /// have once the excluded members leave (rendezvous hashing moves only their keys), so a
    /// stand-in for a failed owner becomes the real owner without a second move.
    pub fn owner_excluding(&self, key: &[u8], skip: impl Fn(&str) -> bool) -> Option<&Member> {
        self.members
            .iter()
            .filter(|(_, m)| !skip(&m.instance_id))
            .max_by_key(|(seed, m)| (xxh3_64_with_seed(key, *seed), &m.instance_id))
            .map(|(_, m)| m)
    }

    /// Up to `n` distinct members for `key`, best first (the first is [`HashRing::owner`]).
    pub fn owners(&self, key: &[u8], n: usize) -> Vec<&Member> {
        let mut scored: Vec<(u64, &Member)> = self
            .members
            .iter()
            .map(|(seed, m)| (xxh3_64_with_seed(key, *seed), m))
            .collect();
        scored.sort_unstable_by(|(sa, ma), (sb, mb)| {
            (sb, &mb.instance_id).cmp(&(sa, &ma.instance_id))
        });
        scored.into_iter().take(n).map(|(_, m)| m).collect()
    }

    /// The members of the ring, ordered by instance id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().map(|(_, m)| m)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when the ring has no member (every `owner` is `None`).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;

    const KEYS: usize = 100_000;

    fn snapshot(ids: &[String], epoch: u64) -> MemberSnapshot {
        let members: BTreeMap<String, Member> = ids
            .iter()
            .map(|id| {
                let m = Member {
                    service: "ratelimit".into(),
                    instance_id: id.clone(),
                    grpc_addr: format!("127.0.0.1:{}", 7000 + id.len()),
                    admin_addr: String::new(),
                    version: "1".into(),
                    zone: String::new(),
                    started_at_ms: 0,
                };
                (id.clone(), m)
            })
            .collect();
        MemberSnapshot {
            service: "ratelimit".into(),
            members,
            epoch,
        }
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ratelimit-{i}")).collect()
    }

    fn key(i: usize) -> Vec<u8> {
        format!("tenant-{i}:requests").into_bytes()
    }

    fn owners_of_all_keys(ring: &HashRing) -> Vec<String> {
        (0..KEYS)
            .map(|i| ring.owner(&key(i)).unwrap().instance_id.clone())
            .collect()
    }

    #[test]
    fn test_empty_ring_has_no_owner() {
        let ring = HashRing::new(&MemberSnapshot::default());
        assert!(ring.is_empty());
        assert_eq!(ring.len(), 0);
        assert!(ring.owner(b"k").is_none());
        assert!(ring.owners(b"k", 3).is_empty());
    }

    #[test]
    fn test_owner_is_stable_across_rings_of_the_same_members() {
        let a = HashRing::new(&snapshot(&ids(5), 7));
        let mut reversed = ids(5);
        reversed.reverse();
        let b = HashRing::new(&snapshot(&reversed, 8));
        assert_eq!(a.epoch(), 7);
        assert_eq!(b.epoch(), 8);
        for i in 0..1000 {
            let k = key(i);
            assert_eq!(a.owner(&k), b.owner(&k));
            assert_eq!(a.owner(&k), a.owner(&k));
        }
    }

    #[test]
    fn test_keys_spread_evenly_over_members() {
        let ring = HashRing::new(&snapshot(&ids(5), 1));
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for owner in owners_of_all_keys(&ring) {
            *counts.entry(owner).or_default() += 1;
        }
        let fair = KEYS / 5;
        for (id, count) in counts {
            assert!(
                count > fair * 8 / 10 && count < fair * 12 / 10,
                "{id} owns {count} keys"
            );
        }
    }

    #[test]
    fn test_join_moves_about_one_nth_of_keys_only_to_the_new_member() {
        let before = owners_of_all_keys(&HashRing::new(&snapshot(&ids(5), 1)));
        let after = owners_of_all_keys(&HashRing::new(&snapshot(&ids(6), 2)));
        let newcomer = "ratelimit-5";
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                moved += 1;
                assert_eq!(new, newcomer, "a key moved from {old} to {new}");
            }
        }
        assert_moved_about_one_nth(moved, 6);
    }

    #[test]
    fn test_leave_moves_about_one_nth_of_keys_only_from_the_leaver() {
        let before = owners_of_all_keys(&HashRing::new(&snapshot(&ids(6), 1)));
        let after = owners_of_all_keys(&HashRing::new(&snapshot(&ids(5), 2)));
        let leaver = "ratelimit-5";
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                moved += 1;
                assert_eq!(old, leaver, "a key moved from {old} to {new}");
            }
        }
        assert_eq!(moved, before.iter().filter(|o| *o == leaver).count());
        assert_moved_about_one_nth(moved, 6);
    }

    fn assert_moved_about_one_nth(moved: usize, n: usize) {
        let (low, high) = (KEYS / (2 * n), KEYS * 3 / (2 * n));
        assert!(
            moved > low && moved < high,
            "{moved} of {KEYS} keys moved, expected about 1/{n}"
        );
    }

    #[test]
    fn test_owners_are_distinct_and_start_with_the_owner() {
        let ring = HashRing::new(&snapshot(&ids(6), 1));
        for i in 0..1000 {
            let k = key(i);
            let owners = ring.owners(&k, 3);
            assert_eq!(owners.len(), 3);
            assert_eq!(Some(owners[0]), ring.owner(&k));
            let distinct: HashSet<_> = owners.iter().map(|m| &m.instance_id).collect();
            assert_eq!(distinct.len(), 3);
        }
        assert_eq!(ring.owners(b"k", 10).len(), 6);
        assert_eq!(ring.members().count(), 6);
    }

    #[test]
    fn test_second_owner_takes_over_when_the_owner_leaves() {
        let all = ids(6);
        let ring = HashRing::new(&snapshot(&all, 1));
        for i in 0..200 {
            let k = key(i);
            let owners = ring.owners(&k, 2);
            let without: Vec<String> = all
                .iter()
                .filter(|id| **id != owners[0].instance_id)
                .cloned()
                .collect();
            let smaller = HashRing::new(&snapshot(&without, 2));
            assert_eq!(smaller.owner(&k), Some(owners[1]));
        }
    }

    #[test]
    fn test_owner_excluding_a_member_is_the_owner_once_it_has_left() {
        let ids = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let all = snapshot(&ids(&["a", "b", "c", "d"]), 1);
        let without_b = snapshot(&ids(&["a", "c", "d"]), 2);
        let (ring, after) = (HashRing::new(&all), HashRing::new(&without_b));
        for k in 0..1000u32 {
            let key = k.to_be_bytes();
            let standin = ring.owner_excluding(&key, |id| id == "b").unwrap();
            assert_eq!(standin.instance_id, after.owner(&key).unwrap().instance_id);
            if ring.owner(&key).unwrap().instance_id != "b" {
                assert_eq!(standin.instance_id, ring.owner(&key).unwrap().instance_id);
            }
        }
        assert!(ring.owner_excluding(b"k", |_| true).is_none());
    }
}
