//! Once-a-second housekeeping: ack deadlines, delayed redeliveries, expiry, rates,
//! retention, advisories.

use super::*;

/// Ack deadlines, delayed redeliveries and expiry every 10 ms; rates every 5 s; retention
/// every 30 s.
pub(super) async fn housekeeping(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let bus = Bus { inner };
        let now = now_ms();
        let groups: Vec<Arc<Consumer>> = bus.inner.groups.read().values().cloned().collect();
        for g in &groups {
            let effects = g.tick(now);
            bus.apply(g, effects);
        }
        if n.is_multiple_of(100) {
            bus.backplane_shed_advisories(now);
        }
        if n.is_multiple_of(500) {
            update_rates(&bus.inner, &groups, 5.0);
        }
        if n.is_multiple_of(3000) {
            let log = bus.inner.log.clone();
            let retention = bus.inner.config.retention;
            let streams: Vec<String> = bus
                .inner
                .config
                .durable
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect();
            tokio::spawn(async move {
                for s in streams {
                    if let Err(e) = log.trim(&s, &retention).await {
                        tracing::debug!(error = %e, stream = %s, "trimming failed");
                    }
                }
            });
        }
    }
}

pub(super) fn update_rates(inner: &Inner, groups: &[Arc<Consumer>], seconds: f64) {
    for c in inner.subjects.lock().values_mut() {
        let delta = c.published.saturating_sub(c.previous);
        c.previous = c.published;
        // Smoothed over about a minute (12 samples of 5 s).
        c.rate = c.rate + (delta as f64 / seconds - c.rate) / 12.0;
    }
    let mut rates = inner.group_rates.lock();
    for g in groups {
        let delivered = g.snapshot().counters.delivered;
        let entry = rates.entry(g.id).or_insert((delivered, 0.0));
        let delta = delivered.saturating_sub(entry.0);
        entry.0 = delivered;
        entry.1 += (delta as f64 / seconds - entry.1) / 12.0;
    }
}
