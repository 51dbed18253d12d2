//! Subscriptions: opening one (joining or creating its group, starting a durable reader),
//! the handle that acks, naks and replies, closing, listing and stats.

use super::*;

impl Bus {
    /// Opens a subscription.
    ///
    /// # Errors
    /// `InvalidArgument` when the filter overlaps more than one durable stream or a start
    /// sequence is unknown; `ResourceExhausted` at `max_subscriptions`; `Unavailable` when the
    /// durable store is down.
    pub async fn subscribe(
        &self,
        options: ConsumerOptions,
        start: StartPosition,
    ) -> Result<Subscription, EventBusError> {
        let inner = &self.inner;
        let streams: Vec<&SubjectFilter> = inner
            .config
            .durable
            .iter()
            .filter(|p| p.overlaps(&options.filter))
            .collect();
        if streams.len() > 1 {
            return Err(EventBusError::invalid(
                "open.subject",
                format!(
                    "overlaps the durable streams {} and {}: subscribe to each separately",
                    streams[0].as_str(),
                    streams[1].as_str()
                ),
            ));
        }
        let stream = streams.first().map(|p| p.as_str().to_owned());
        if inner.counters.subscriptions.get()
            >= i64::try_from(inner.config.max_subscriptions).unwrap_or(i64::MAX)
        {
            return Err(EventBusError::ResourceExhausted(format!(
                "at most {} subscriptions per instance",
                inner.config.max_subscriptions
            )));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let subscription_id = format!("{}-{id}", inner.config.instance_id);
        let name = match (&options.queue_group, &options.durable_name) {
            (Some(g), _) => Some(format!("q:{g}")),
            (None, Some(d)) => Some(format!("d:{d}")),
            (None, None) => None,
        };
        let key = name
            .clone()
            .map(|n| (options.filter.as_str().to_owned(), n));
        let existing = key.as_ref().and_then(|k| {
            let named = inner.named.lock();
            let id = named.get(k)?;
            inner.groups.read().get(id).cloned()
        });
        let group = match existing.filter(|g| !g.is_closed()) {
            Some(g) => g,
            None => {
                let log_group = match &name {
                    Some(n) => format!("{n}|{}", options.filter.as_str()),
                    None => format!("s:{subscription_id}"),
                };
                if let Some(stream) = &stream {
                    inner.log.ensure_group(stream, &log_group, &start).await?;
                }
                let group_id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let group = Arc::new(Consumer::new(
                    options.clone(),
                    GroupSettings {
                        id: group_id,
                        capacity: inner.config.max_pending,
                        fairness: inner.config.fairness,
                        durable: stream.iter().cloned().collect(),
                        log_group,
                        log_consumer: format!("{}:{group_id}", inner.config.instance_id),
                        dead_letter_expired: inner.config.dead_letter_expired,
                        queue_wait: Some(inner.queue_wait.clone()),
                    },
                ));
                inner.groups.write().insert(group_id, group.clone());
                inner.index.write().insert(&options.filter, group_id);
                if let Some(k) = key {
                    inner.named.lock().insert(k, group_id);
                }
                if let Some(stream) = &stream {
                    tokio::spawn(read_durable(
                        Arc::downgrade(&self.inner),
                        group.clone(),
                        stream.clone(),
                    ));
                }
                group
            }
        };
        let capacity = usize::try_from(options.max_in_flight).unwrap_or(10_000) + 64;
        let (tx, rx) = mpsc::channel(capacity);
        let member = inner.next_id.fetch_add(1, Ordering::Relaxed);
        inner.counters.subscriptions.inc();
        let effects = group.add_member(
            member,
            subscription_id.clone(),
            options.max_in_flight,
            tx,
            now_ms(),
        );
        self.apply(&group, effects);
        self.interests_changed();
        Ok(Subscription {
            id: subscription_id,
            stream,
            rx,
            handle: SubscriptionHandle {
                bus: self.clone(),
                group,
                member,
            },
        })
    }

    pub(super) fn close_member(&self, group: &Arc<Consumer>, member: u64) {
        let inner = &self.inner;
        inner.counters.subscriptions.dec();
        let (empty, effects) = group.remove_member(member, now_ms());
        if empty {
            inner.groups.write().remove(&group.id);
            inner.index.write().remove(&group.options.filter, &group.id);
            inner.named.lock().retain(|_, id| *id != group.id);
            inner.group_rates.lock().remove(&group.id);
            inner.last_shed_advisory.lock().remove(&group.id);
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            self.apply(group, effects);
        }
        self.interests_changed();
    }

    /// Subscriptions open on this instance whose filter equals `subject` (empty = all).
    pub fn list_subscriptions(&self, subject: &str) -> Vec<SubscriptionInfo> {
        let groups: Vec<Arc<Consumer>> = self.inner.groups.read().values().cloned().collect();
        let mut out = Vec::new();
        for g in groups {
            if !subject.is_empty() && g.options.filter.as_str() != subject {
                continue;
            }
            let snapshot = g.snapshot();
            for m in snapshot.members {
                out.push(SubscriptionInfo {
                    subject: g.options.filter.as_str().to_owned(),
                    queue_group: g.options.queue_group.clone().unwrap_or_default(),
                    pending: snapshot.pending as u64,
                    stream: g.durable.first().cloned(),
                    member: m,
                });
            }
        }
        out.sort_by(|a, b| a.member.subscription_id.cmp(&b.member.subscription_id));
        out
    }

    /// Stats of subjects and groups matching `filter` (everything when `None`).
    pub fn stats(&self, filter: Option<&SubjectFilter>) -> (Vec<SubjectStat>, Vec<GroupStat>) {
        let mut subjects: Vec<SubjectStat> = self
            .inner
            .subjects
            .lock()
            .iter()
            .filter(|(s, _)| filter.is_none_or(|f| f.matches(s)))
            .map(|(s, c)| SubjectStat {
                subject: s.clone(),
                published: c.published,
                duplicates: c.duplicates,
                rate: c.rate,
            })
            .collect();
        subjects.sort_by(|a, b| a.subject.cmp(&b.subject));
        let groups: Vec<Arc<Consumer>> = self.inner.groups.read().values().cloned().collect();
        let rates = self.inner.group_rates.lock().clone();
        let mut out: Vec<GroupStat> = groups
            .iter()
            .filter(|g| filter.is_none_or(|f| f.overlaps(&g.options.filter)))
            .map(|g| GroupStat {
                subject: g.options.filter.as_str().to_owned(),
                group: group_label(g),
                stream: g.durable.first().cloned(),
                snapshot: g.snapshot(),
                rate: rates.get(&g.id).map_or(0.0, |r| r.1),
            })
            .collect();
        out.sort_by(|a, b| (&a.subject, &a.group).cmp(&(&b.subject, &b.group)));
        (subjects, out)
    }
}

/// A subscription as listed.
#[derive(Debug, Clone)]
pub struct SubscriptionInfo {
    /// Filter.
    pub subject: String,
    /// Queue group, empty without one.
    pub queue_group: String,
    /// The group's pending events.
    pub pending: u64,
    /// Durable stream read.
    pub stream: Option<String>,
    /// The member's own state.
    pub member: MemberInfo,
}

/// An open subscription: deliveries and advisories arrive on `rx`; the handle acks. Dropping
/// the handle closes the subscription (its unacked deliveries go back to the group).
pub struct Subscription {
    /// Unique id.
    pub id: String,
    /// Durable stream read, if any.
    pub stream: Option<String>,
    /// Deliveries and advisories.
    pub rx: mpsc::Receiver<Outbound>,
    /// Acks and replies.
    pub handle: SubscriptionHandle,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Acks, naks and replies of one subscription.
pub struct SubscriptionHandle {
    bus: Bus,
    group: Arc<Consumer>,
    member: u64,
}

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl SubscriptionHandle {
    /// Acknowledges deliveries; returns how many were known.
    pub fn ack(&self, ids: &[u64]) -> u64 {
        let (known, effects) = self.group.ack(self.member, ids, now_ms());
        self.bus.apply(&self.group, effects);
        known
    }

    /// The member wrote `count` deliveries to the wire (frees credit under ack policy NONE).
    pub fn sent(&self, count: u32) {
        if self.group.options.ack_policy == AckPolicy::None {
            let effects = self.group.sent(self.member, count, now_ms());
            self.bus.apply(&self.group, effects);
        }
    }

    /// Redelivers after `delay` (or the backoff); false when the delivery is unknown.
    pub fn nak(&self, id: u64, delay: Option<Duration>) -> bool {
        let (known, effects) = self.group.nak(self.member, id, delay, now_ms());
        self.bus.apply(&self.group, effects);
        known
    }

    /// Restarts a delivery's ack deadline; false when unknown.
    pub fn in_progress(&self, id: u64) -> bool {
        self.group.in_progress(self.member, id, now_ms())
    }

    /// Dead-letters a delivery now; false when unknown.
    pub fn terminate(&self, id: u64, reason: &str) -> bool {
        let (known, effects) = self.group.terminate(self.member, id, reason, now_ms());
        self.bus.apply(&self.group, effects);
        known
    }

    /// Answers delivery `id` (a request) with `reply`; the delivery counts as acked.
    ///
    /// # Errors
    /// `NotFound` for an unknown delivery; `InvalidArgument` when it has no reply subject or
    /// the reply is invalid.
    pub async fn reply(
        &self,
        id: u64,
        mut reply: Event,
        responder: &str,
    ) -> Result<(), EventBusError> {
        let (original, effects) = self.group.take_for_reply(self.member, id, now_ms());
        self.bus.apply(&self.group, effects);
        let Some(original) = original else {
            return Err(EventBusError::NotFound(format!(
                "delivery {id} is not in flight on this subscription"
            )));
        };
        if original.reply_to.is_empty() {
            return Err(EventBusError::invalid(
                "reply.delivery_id",
                "the delivered event has no reply_to",
            ));
        }
        reply.subject.clone_from(&original.reply_to);
        if reply.correlation_id.is_empty() {
            reply.correlation_id.clone_from(&original.correlation_id);
        }
        reply
            .headers
            .insert("responder".to_owned(), responder.to_owned());
        // The reply continues the request's trace unless the responder says otherwise.
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = original.headers.get(name) {
                reply
                    .headers
                    .entry(name.to_owned())
                    .or_insert_with(|| value.clone());
            }
        }
        self.bus.publish(reply).await.map(|_| ())
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.bus.close_member(&self.group, self.member);
    }
}

pub(super) fn group_label(group: &Consumer) -> String {
    match (&group.options.queue_group, &group.options.durable_name) {
        (Some(g), _) => g.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => group
            .log_group
            .strip_prefix("s:")
            .unwrap_or(&group.log_group)
            .to_owned(),
    }
}
