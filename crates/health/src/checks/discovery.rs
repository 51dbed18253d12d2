//! Discovery: follows the membership of every service (the known ones, and any new service
//! name found in membership) and keeps one probe per instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agentmesh_membership::{Member, Membership};
use tokio_util::sync::CancellationToken;

use super::instance::{ProbeContext, probe};
use super::now_ms;

/// Services followed from the start; others are found by listing membership.
pub const KNOWN_SERVICES: &[&str] = &["eventbus", "scheduler", "cache", "ratelimit", "health"];
/// How often membership is listed for service names not followed yet.
const RELIST: Duration = Duration::from_secs(10);
/// Wait before retrying a failed membership watch.
const RETRY: Duration = Duration::from_secs(1);

/// Follows membership until `stop`.
pub async fn discover(ctx: ProbeContext, membership: Arc<dyn Membership>, stop: CancellationToken) {
    let mut followed: BTreeSet<String> = BTreeSet::new();
    let mut relist = tokio::time::interval(RELIST);
    loop {
        let mut names: BTreeSet<String> = KNOWN_SERVICES.iter().map(|s| (*s).to_owned()).collect();
        if let Ok(all) = membership.list_all().await {
            names.extend(all.into_iter().map(|m| m.service));
        }
        for name in names {
            if followed.insert(name.clone()) {
                tokio::spawn(follow(
                    ctx.clone(),
                    membership.clone(),
                    name,
                    stop.child_token(),
                ));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = relist.tick() => {}
        }
    }
}

/// Keeps one probe per member of `service`.
async fn follow(
    ctx: ProbeContext,
    membership: Arc<dyn Membership>,
    service: String,
    stop: CancellationToken,
) {
    let mut probes: BTreeMap<String, (Member, CancellationToken)> = BTreeMap::new();
    loop {
        let watch = tokio::select! {
            () = stop.cancelled() => break,
            watch = membership.watch(&service) => watch,
        };
        // The watch lives as long as its snapshots are read (dropping it ends them).
        let (_watch, mut snapshots_rx) = match watch {
            Ok(watch) => {
                let snapshots_rx = watch.snapshots();
                (watch, snapshots_rx)
            }
            Err(e) => {
                tracing::warn!(%service, error = %e, "cannot watch membership; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        loop {
            let snapshot = snapshots_rx.borrow_and_update().clone();
            let now = now_ms();
            probes.retain(|id, (_, probe_stop)| {
                let keep = snapshot.members.contains_key(id);
                if !keep {
                    probe_stop.cancel();
                    ctx.aggregator.remove_instance(&service, id, now);
                }
                keep
            });
            for (id, member) in &snapshot.members {
                if probes.get(id).is_some_and(|(known, _)| known == member) {
                    continue;
                }
                ctx.aggregator.upsert_instance(member, now);
                if let Some((_, old)) = probes.remove(id) {
                    old.cancel();
                }
                let probe_stop = stop.child_token();
                tokio::spawn(probe(ctx.clone(), member.clone(), probe_stop.clone()));
                probes.insert(id.clone(), (member.clone(), probe_stop));
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = snapshots_rx.changed() => if changed.is_err() { break },
            }
        }
    }
    for (_, (_, probe_stop)) in probes {
        probe_stop.cancel();
    }
}
