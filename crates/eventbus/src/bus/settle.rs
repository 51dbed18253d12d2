//! Applying a group's effects: counters, expiry and shed advisories, log acks and releases,
//! dead letters.

use super::*;

impl Bus {
    /// Carries out what a group operation left to do.
    pub(super) fn apply(&self, group: &Arc<Consumer>, effects: Effects) {
        if effects.is_empty() {
            return;
        }
        let counters = &self.inner.counters;
        if effects.expired > 0 {
            counters.expired.inc_by(effects.expired);
            group.advise_all(&AdvisoryOut {
                kind: AdvisoryKind::Expired,
                count: effects.expired,
                priority: None,
                message: format!("{} event(s) expired before delivery", effects.expired),
            });
        }
        let shed: u64 = effects.shed.iter().sum();
        if shed > 0 {
            for (i, n) in effects.shed.iter().enumerate() {
                counters.shed[i].inc_by(*n);
            }
            self.shed_advisory(group, &effects.shed);
        }
        if effects.dead.is_empty() && effects.log_acks.is_empty() && effects.log_release.is_empty()
        {
            return;
        }
        let this = self.clone();
        let group = group.clone();
        tokio::spawn(async move {
            this.settle(&group, effects).await;
        });
    }

    /// Log acks and dead letters.
    pub(super) async fn settle(&self, group: &Arc<Consumer>, effects: Effects) {
        let inner = &self.inner;
        for (pending, reason) in effects.dead {
            inner.counters.dead_lettered.inc();
            if let Err(e) = self.dead_letter(group, &pending, &reason).await {
                inner.counters.log_errors.inc();
                tracing::warn!(error = %e, event = %pending.event.id, "storing a dead letter failed");
            }
        }
        if let Some(stream) = group.durable.first()
            && !effects.log_acks.is_empty()
            && let Err(e) = inner
                .log
                .ack(stream, &group.log_group, &effects.log_acks)
                .await
        {
            inner.counters.log_errors.inc();
            tracing::warn!(error = %e, stream = %stream, "acknowledging in the log failed");
        }
        if let Some(stream) = group.durable.first() {
            for chunk in effects.log_release.chunks(crate::log::MAX_BATCH) {
                if let Err(e) = inner.log.release(stream, &group.log_group, chunk).await {
                    inner.counters.log_errors.inc();
                    tracing::warn!(error = %e, stream = %stream, "giving events back failed");
                }
            }
        }
    }

    pub(super) async fn dead_letter(
        &self,
        group: &Consumer,
        pending: &Pending,
        reason: &DeadReason,
    ) -> Result<(), EventBusError> {
        let mut event = (*pending.event).clone();
        let now = now_ms();
        event
            .headers
            .insert(DEAD_LETTER_REASON.into(), reason.as_string());
        event
            .headers
            .insert(DEAD_LETTER_SUBJECT.into(), event.subject.clone());
        event.headers.insert(
            DEAD_LETTER_DELIVERIES.into(),
            pending.deliveries.to_string(),
        );
        event
            .headers
            .insert(DEAD_LETTER_GROUP.into(), group_label(group));
        event.headers.insert(DEAD_LETTER_AT.into(), now.to_string());
        event.subject.clone_from(&group.options.dead_letter_subject);
        let original_id = std::mem::replace(&mut event.id, new_ulid(now));
        event.headers.insert(DEAD_LETTER_ID.into(), original_id);
        // A dead letter must not expire on its way to the dead-letter store.
        event.expires_at_ms = None;
        self.inner
            .log
            .append(&event.subject, &event, Duration::ZERO)
            .await?;
        self.route(&Arc::new(event), now);
        Ok(())
    }

    pub(super) fn shed_advisory(&self, group: &Arc<Consumer>, shed: &[u64; 4]) {
        let now = now_ms();
        {
            let mut last = self.inner.last_shed_advisory.lock();
            let at = last.entry(group.id).or_insert(0);
            if now.saturating_sub(*at) < 1000 {
                return;
            }
            *at = now;
        }
        let data = format!(
            "{{\"group\":{:?},\"subject\":{:?},\"shed\":{{\"low\":{},\"normal\":{},\"high\":{},\"critical\":{}}}}}",
            group_label(group),
            group.options.filter.as_str(),
            shed[0],
            shed[1],
            shed[2],
            shed[3]
        );
        // Never offered back to the group that shed (it would only shed more).
        if !group.options.filter.matches(SHED_ADVISORY_SUBJECT) {
            self.route(&Arc::new(self.advisory(now, data)), now);
        }
    }

    /// A shed advisory carrying `data` (JSON).
    pub(super) fn advisory(&self, now: u64, data: String) -> Event {
        Event {
            id: new_ulid(now),
            subject: SHED_ADVISORY_SUBJECT.to_owned(),
            r#type: "agentmesh.eventbus.advisory.shed".to_owned(),
            source: format!("/eventbus/{}", self.inner.config.instance_id),
            time_ms: now,
            content_type: "application/json".to_owned(),
            data: data.into(),
            ..Event::default()
        }
    }
}
