//! Publishing: single, batched and pipelined publishes, deduplication (in this instance's
//! window and, for client ids in a cluster, the cluster-wide claim stage), durable appends and
//! routing an ephemeral event to the interested groups.

use super::*;

/// One part of a started batch: an answer already known, or a durable run being stored.
pub(super) enum BatchPart {
    Done(Result<PublishOutcome, EventBusError>),
    Staged(oneshot::Receiver<Result<PublishOutcome, EventBusError>>),
    Stored { stream: String, append: Appending },
}

/// An ephemeral publish: answered at once, or waiting in the cluster dedup stage.
pub(super) enum Ephemeral {
    Done(Result<PublishOutcome, EventBusError>),
    Staged(oneshot::Receiver<Result<PublishOutcome, EventBusError>>),
}

impl Ephemeral {
    async fn outcome(self) -> Result<PublishOutcome, EventBusError> {
        match self {
            Self::Done(answer) => answer,
            Self::Staged(rx) => rx.await.unwrap_or(Err(EventBusError::ShuttingDown)),
        }
    }
}

/// Ephemeral publishes waiting for their ids' cluster-wide claims ([`Backplane::claim_ids`]),
/// in publish order: one round trip claims every id that queued meanwhile.
pub(super) struct DedupStage {
    pub(super) tx: mpsc::Sender<Staged>,
    /// Submitted and not yet routed. While any wait, every ephemeral publish of this instance
    /// queues behind them, so events are still routed in publish order.
    pub(super) queued: Arc<AtomicUsize>,
}

/// One publish in the dedup stage.
pub(super) struct Staged {
    event: Event,
    /// A client-supplied id, to claim (a generated one only keeps its place).
    claim: bool,
    reply: oneshot::Sender<Result<PublishOutcome, EventBusError>>,
}

/// Most publishes waiting in the dedup stage; beyond, a publish is refused (UNAVAILABLE).
pub(super) const DEDUP_STAGE_QUEUE: usize = 65_536;
/// Most ids claimed in one round trip.
pub(super) const DEDUP_STAGE_BATCH: usize = 1024;

impl DedupStage {
    fn submit(&self, event: Event, claim: bool) -> Ephemeral {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(Staged {
            event,
            claim,
            reply,
        }) {
            Ok(()) => Ephemeral::Staged(rx),
            Err(_) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Ephemeral::Done(Err(EventBusError::Unavailable(format!(
                    "more than {DEDUP_STAGE_QUEUE} publishes wait for cluster-wide dedup: retry"
                ))))
            }
        }
    }
}

impl Bus {
    /// Validates and publishes one event (see the module docs).
    ///
    /// # Errors
    /// `InvalidArgument` naming each bad field; `Unavailable` when a durable subject's store
    /// is down.
    pub async fn publish(&self, event: Event) -> Result<PublishOutcome, EventBusError> {
        let (event, generated) = self.prepare(event, "event")?;
        self.publish_prepared(event, generated).await
    }

    /// Publishes events in order (one answer each); consecutive events of one durable stream
    /// are stored in one round trip.
    pub async fn publish_batch(
        &self,
        events: Vec<Event>,
    ) -> Vec<Result<PublishOutcome, EventBusError>> {
        self.start_batch(events).await
    }

    /// Starts publishing `events` and returns the future of their answers: ephemeral events
    /// are routed and durable runs (consecutive events of one stream) are queued to the log
    /// before this returns, so a batch started later is stored after this one — a
    /// `PublishStream` keeps several batches in flight and still stores them in publish
    /// order.
    pub fn start_batch(
        &self,
        events: Vec<Event>,
    ) -> impl Future<Output = Vec<Result<PublishOutcome, EventBusError>>> + Send + 'static {
        let mut parts: Vec<BatchPart> = Vec::new();
        let mut run: Vec<Event> = Vec::new();
        let mut run_key: Option<(String, bool)> = None;
        let total = events.len();
        for event in events {
            let prepared = self.prepare(event, "event");
            let key = prepared.as_ref().ok().and_then(|(e, generated)| {
                self.durable_stream(&e.subject)
                    .map(|s| (s.to_owned(), *generated))
            });
            if run_key.is_some() && key != run_key {
                parts.extend(self.start_run(run_key.take(), std::mem::take(&mut run)));
            }
            match (prepared, key) {
                (Ok((event, _)), Some(key)) => {
                    run.push(event);
                    run_key = Some(key);
                }
                (Ok((event, generated)), None) => {
                    parts.push(match self.publish_ephemeral(event, generated) {
                        Ephemeral::Done(answer) => BatchPart::Done(answer),
                        Ephemeral::Staged(rx) => BatchPart::Staged(rx),
                    });
                }
                (Err(e), _) => parts.push(BatchPart::Done(Err(e))),
            }
        }
        parts.extend(self.start_run(run_key, run));
        let bus = self.clone();
        async move {
            let mut out = Vec::with_capacity(total);
            for part in parts {
                match part {
                    BatchPart::Done(answer) => out.push(answer),
                    BatchPart::Staged(rx) => out.push(Ephemeral::Staged(rx).outcome().await),
                    BatchPart::Stored { stream, append } => match append.await {
                        (run, Ok(outcomes)) => out.extend(
                            run.into_iter()
                                .zip(outcomes)
                                .map(|(event, outcome)| Ok(bus.stored(&stream, event, outcome))),
                        ),
                        (run, Err(e)) => out.extend(run.iter().map(|_| Err(e.clone()))),
                    },
                }
            }
            out
        }
    }

    /// Starts the append of one durable run.
    pub(super) fn start_run(
        &self,
        key: Option<(String, bool)>,
        run: Vec<Event>,
    ) -> Option<BatchPart> {
        let (stream, generated) = key?;
        if run.is_empty() {
            return None;
        }
        let window = self.dedup_window(generated);
        let append = self.inner.log.append_batch(&stream, run, window);
        Some(BatchPart::Stored { stream, append })
    }

    /// Generated ids are unique by construction: only client-supplied ids are deduplicated.
    pub(super) fn dedup_window(&self, generated: bool) -> Duration {
        if generated {
            Duration::ZERO
        } else {
            self.inner.config.dedup_window
        }
    }

    /// Counts a durable append and answers it.
    pub(super) fn stored(
        &self,
        stream: &str,
        event: Event,
        outcome: AppendOutcome,
    ) -> PublishOutcome {
        let duplicate = matches!(outcome, AppendOutcome::Duplicate(_));
        self.count_subject(&event.subject, duplicate);
        let counter = if duplicate {
            &self.inner.counters.duplicates
        } else {
            &self.inner.counters.published_durable
        };
        counter.inc();
        PublishOutcome {
            id: event.id,
            duplicate,
            sequence: outcome.sequence().unwrap_or(0),
            stream: Some(stream.to_owned()),
        }
    }

    pub(super) fn prepare(
        &self,
        mut event: Event,
        field: &str,
    ) -> Result<(Event, bool), EventBusError> {
        let violations = event.violations(field, self.inner.config.max_data);
        if !violations.is_empty() {
            return Err(EventBusError::InvalidArgument(violations));
        }
        let now = now_ms();
        let generated = event.id.is_empty();
        if generated {
            event.id = new_ulid(now);
        }
        if event.time_ms == 0 {
            event.time_ms = now;
        }
        Ok((event, generated))
    }

    pub(super) async fn publish_prepared(
        &self,
        event: Event,
        generated: bool,
    ) -> Result<PublishOutcome, EventBusError> {
        if let Some(stream) = self.durable_stream(&event.subject) {
            let window = self.dedup_window(generated);
            let outcome = self.inner.log.append(stream, &event, window).await?;
            return Ok(self.stored(stream, event, outcome));
        }
        self.publish_ephemeral(event, generated).outcome().await
    }

    /// Publishes an event of an ephemeral subject: deduplicated in memory, then (in a cluster
    /// whose backplane claims ids) across instances, then routed.
    pub(super) fn publish_ephemeral(&self, event: Event, generated: bool) -> Ephemeral {
        let inner = &self.inner;
        let now = now_ms();
        if !generated && inner.dedup.check_and_insert("", &event.id, now) == DedupOutcome::Duplicate
        {
            return Ephemeral::Done(Ok(self.duplicate(event)));
        }
        if let Some(stage) = inner.cluster.as_ref().and_then(|c| c.dedup.as_ref()) {
            // A client id is claimed cluster-wide first; a generated id (unique by
            // construction) waits only when earlier events are still waiting, to keep order.
            if !generated || stage.queued.load(Ordering::Acquire) > 0 {
                return stage.submit(event, !generated);
            }
        }
        Ephemeral::Done(Ok(self.deliver_ephemeral(event, now)))
    }

    /// Answers a duplicate publish (counted, not delivered).
    pub(super) fn duplicate(&self, event: Event) -> PublishOutcome {
        self.inner.counters.duplicates.inc();
        self.count_subject(&event.subject, true);
        PublishOutcome {
            id: event.id,
            duplicate: true,
            sequence: 0,
            stream: None,
        }
    }

    /// Counts and routes an accepted ephemeral event.
    pub(super) fn deliver_ephemeral(&self, event: Event, now: u64) -> PublishOutcome {
        self.count_subject(&event.subject, false);
        self.inner.counters.published_ephemeral.inc();
        let id = event.id.clone();
        self.route(&Arc::new(event), now);
        PublishOutcome {
            id,
            duplicate: false,
            sequence: 0,
            stream: None,
        }
    }

    /// Hands an ephemeral event to a waiting request of this instance; true if one took it.
    pub(super) fn answer_inbox(&self, event: &Arc<Event>) -> bool {
        if !event.subject.starts_with(INBOX_PREFIX) {
            return false;
        }
        let waiter = self.inner.inboxes.lock().remove(&event.subject);
        match waiter {
            Some(tx) => {
                let responder = event.headers.get("responder").cloned().unwrap_or_default();
                let _ = tx.send((Event::clone(event), responder));
                true
            }
            None => false,
        }
    }

    /// The local groups interested in `subject`.
    pub(super) fn local_groups(&self, subject: &str) -> Vec<Arc<Consumer>> {
        let inner = &self.inner;
        let mut ids: Vec<u64> = Vec::new();
        inner
            .index
            .read()
            .for_each_match(subject, |id| ids.push(*id));
        if ids.is_empty() {
            return Vec::new();
        }
        let map = inner.groups.read();
        ids.iter().filter_map(|id| map.get(id).cloned()).collect()
    }

    /// Offers an ephemeral event to `groups` (every member of each for broadcast subjects).
    pub(super) fn offer_to(&self, groups: &[Arc<Consumer>], event: &Arc<Event>, now: u64) {
        let broadcast = event.subject.starts_with(BROADCAST_PREFIX);
        for group in groups {
            let effects = if broadcast {
                group.offer_to_all(event, now)
            } else {
                group.offer(Pending::new(event.clone(), 0, 0), now)
            };
            self.apply(group, effects);
        }
    }

    /// Delivers an ephemeral event accepted here: to this instance's subscriptions and, in a
    /// cluster, to the other instances' (each queue group gets it once cluster-wide). Returns
    /// how many groups and instances it went to.
    pub(super) fn route(&self, event: &Arc<Event>, now: u64) -> usize {
        if self.answer_inbox(event) {
            return 1;
        }
        let inner = &self.inner;
        let mut local = self.local_groups(&event.subject);
        let view = inner.cluster.as_ref().map(|c| c.view.read().clone());
        let mut sent = 0;
        if let Some(view) = view.filter(|v| !v.is_empty()) {
            let (forwards, skip) = plan_forwards(&view, &local, event);
            if !skip.is_empty() {
                local.retain(|g| cluster_group(g).is_none_or(|id| !skip.contains(id)));
            }
            sent = self.send_forwards(forwards, event);
        }
        if local.is_empty() && sent == 0 {
            inner.counters.no_interest.inc();
            return 0;
        }
        self.offer_to(&local, event, now);
        local.len() + sent
    }

    pub(super) fn count_subject(&self, subject: &str, duplicate: bool) {
        let mut subjects = self.inner.subjects.lock();
        let key = if subjects.contains_key(subject) || subjects.len() < MAX_TRACKED_SUBJECTS {
            subject
        } else {
            "_other"
        };
        let entry = match subjects.get_mut(key) {
            Some(e) => e,
            None => subjects.entry(key.to_owned()).or_default(),
        };
        if duplicate {
            entry.duplicates += 1;
        } else {
            entry.published += 1;
        }
    }
}

/// Runs the dedup stage ([`DedupStage`]): claims the client ids of whatever queued, in one
/// round trip, then routes or answers as duplicate every publish in order. When the cluster
/// cannot be asked (Redis down or slow), the events are delivered — dedup falls back to this
/// instance's window (at least once, never lost) — and counted in `cluster_dedup_errors`.
pub(super) async fn cluster_dedup(
    weak: Weak<Inner>,
    mut rx: mpsc::Receiver<Staged>,
    queued: Arc<AtomicUsize>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, DEDUP_STAGE_BATCH).await > 0 {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let Some(cluster) = inner.cluster.as_ref() else {
            return;
        };
        let ids: Vec<String> = batch
            .iter()
            .filter(|s| s.claim)
            .map(|s| s.event.id.clone())
            .collect();
        let asked = ids.len();
        let claims = if ids.is_empty() {
            Ok(Vec::new())
        } else {
            cluster
                .backplane
                .claim_ids(ids, inner.config.dedup_window)
                .await
        };
        let mut claims = claims
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, ids = asked, "cluster dedup unavailable: deduplicated on this instance only");
                inner
                    .counters
                    .cluster_dedup_errors
                    .inc_by(asked as u64);
                vec![true; asked]
            })
            .into_iter();
        let bus = Bus { inner };
        let now = now_ms();
        let routed = batch.len();
        for staged in batch.drain(..) {
            let new = !staged.claim || claims.next().unwrap_or(true);
            let outcome = if new {
                bus.deliver_ephemeral(staged.event, now)
            } else {
                bus.duplicate(staged.event)
            };
            let _ = staged.reply.send(Ok(outcome));
        }
        queued.fetch_sub(routed, Ordering::AcqRel);
    }
}
