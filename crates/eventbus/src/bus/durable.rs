//! The durable reader of a group: reads the log as far as the group has room, claims
//! deliveries other consumers left unacknowledged, and offers what it read.

use super::*;

/// Reads a durable stream for one group, as far as its queue has room.
pub(super) async fn read_durable(inner: Weak<Inner>, group: Arc<Consumer>, stream: String) {
    let min_idle = group.options.ack_wait + Duration::from_secs(1);
    let claim_every = (group.options.ack_wait / 2).max(Duration::from_millis(500));
    let mut last_claim: Option<tokio::time::Instant> = None;
    let mut failures: u32 = 0;
    loop {
        if group.is_closed() {
            return;
        }
        // Only the log is held while waiting in it, so a dropped bus ends this task.
        let Some(log) = inner.upgrade().map(|inner| inner.log.clone()) else {
            return;
        };
        let room = group.room().min(crate::log::MAX_BATCH).min(256);
        if room < 16 {
            tokio::select! {
                () = group.room.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        }
        let (log_group, consumer) = (&group.log_group, &group.log_consumer);
        let now = tokio::time::Instant::now();
        let claiming = last_claim.is_none_or(|at| now.duration_since(at) >= claim_every);
        let result = if claiming {
            last_claim = Some(now);
            log.claim_stalled(&stream, log_group, consumer, min_idle, room)
                .await
                .map(|claimed| {
                    claimed
                        .into_iter()
                        .map(|c| (c.stored, c.delivery_count.saturating_sub(1)))
                        .collect::<Vec<_>>()
                })
        } else {
            log.read_group(
                &stream,
                log_group,
                consumer,
                room,
                Duration::from_millis(500),
            )
            .await
            .map(|events| events.into_iter().map(|e| (e, 0)).collect::<Vec<_>>())
        };
        let Some(bus) = inner.upgrade().map(|inner| Bus { inner }) else {
            return;
        };
        match result {
            Ok(events) => {
                failures = 0;
                offer_stored(&bus, &group, events);
            }
            Err(e) => {
                bus.inner.counters.log_errors.inc();
                if claiming {
                    tracing::debug!(error = %e, stream = %stream, "claiming stalled deliveries failed");
                    continue;
                }
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %e, stream = %stream, "reading a durable stream failed");
                }
                drop(bus);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

pub(super) fn offer_stored(
    bus: &Bus,
    group: &Arc<Consumer>,
    events: Vec<(crate::log::StoredEvent, u32)>,
) {
    let now = now_ms();
    if group.is_closed() {
        // Read after the group closed: give them straight back.
        let effects = Effects {
            log_release: events.iter().map(|(s, _)| s.sequence).collect(),
            ..Effects::default()
        };
        bus.apply(group, effects);
        return;
    }
    for (stored, deliveries) in events {
        let effects = group.offer(
            Pending::new(Arc::new(stored.event), deliveries, stored.sequence),
            now,
        );
        bus.apply(group, effects);
    }
}
