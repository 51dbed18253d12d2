//! The thin gRPC adapter serving `agentmesh.eventbus.v1.EventBus` over the [`Bus`]: decode and
//! validate, call the bus, encode; one mapping from [`EventBusError`] to `Status`.
//!
//! Tracing: Publish opens a producer span (child of a `traceparent` the client put in the event,
//! else of the caller's context) and writes its `traceparent` into the event's headers; each
//! delivery opens a consumer span whose parent is the context in the event's headers, so a
//! trace continues publish → deliver across processes. These per-event spans are built with
//! the OpenTelemetry API directly and only when an exporter is configured
//! ([`message_trace`]); without one an event still gets a `traceparent`.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::eventbus::v1 as pb;
use agentmesh_runtime::message_trace;
use agentmesh_runtime::wire::{duration_from_proto, timestamp_from_ms, timestamp_to_ms};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::bus::{Bus, DEFAULT_DEAD_LETTER_SUBJECT, PublishOutcome, SubscriptionHandle};
use crate::consumer::{
    AckPolicy, AdvisoryKind, AdvisoryOut, ConsumerOptions, DeliveryOut, Outbound,
};
use crate::error::{EventBusError, FieldViolation};
use crate::event::{Event, Priority};
use crate::log::StartPosition;
use crate::peers::{Gathered, PEER_BUDGET, PeerClient, Peers};
use crate::subject::{SubjectFilter, validate_subject};
use crate::wire::{decode_event_lenient, decode_priority, decode_publish};
pub use crate::wire::{encode_event, encode_priority};
use agentmesh_runtime::audit;
use agentmesh_runtime::auth::{AccessRule, Identity, Role, caller};

/// Who may call each RPC (admin may call everything); see the README's roles table.
pub const ACCESS: &[AccessRule] = &[
    ("Publish", &[Role::Service, Role::Agent]),
    ("PublishStream", &[Role::Service, Role::Agent]),
    ("Subscribe", &[Role::Service, Role::Agent, Role::Operator]),
    ("Request", &[Role::Service, Role::Agent]),
    ("ListSubscriptions", &[Role::Service, Role::Operator]),
    ("GetStats", &[Role::Service, Role::Operator]),
    ("ListDeadLetters", &[Role::Operator]),
    ("RedriveDeadLetters", &[Role::Operator]),
    ("PurgeDeadLetters", &[Role::Operator]),
];

/// The state-changing RPCs recorded in the audit trail (README "Audit trail").
pub const AUDITED: &[&str] = &["RedriveDeadLetters", "PurgeDeadLetters"];

/// Most credit a subscription may ask for.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// Most deliveries in one Deliveries message.
const MAX_DELIVERIES_PER_MESSAGE: usize = 128;
/// Most events a PublishStream takes into one batch.
const MAX_PUBLISH_BATCH: usize = 256;

/// Most batches of one `PublishStream` being stored at once (they are stored in order).
const PUBLISH_DEPTH: usize = 4;
/// Default and bounds of a request's timeout.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Most ids in one Ack.
const MAX_ACK_IDS: usize = 1000;
/// Bounds of the ack wait.
const MIN_ACK_WAIT: Duration = Duration::from_millis(100);
const MAX_ACK_WAIT: Duration = Duration::from_secs(12 * 3600);
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default and most deliveries before dead-lettering.
const DEFAULT_MAX_DELIVERIES: u32 = 5;
const MAX_MAX_DELIVERIES: u32 = 1000;
/// Most backoff entries, longest delay.
const MAX_BACKOFF_ENTRIES: usize = 16;
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Default and most dead letters per listing or redrive.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The gRPC adapter.
#[derive(Clone)]
pub struct EventBusGrpc {
    bus: Bus,
    peers: Option<Arc<Peers>>,
}

impl EventBusGrpc {
    /// An adapter over `bus`; listings cover this instance only.
    pub fn new(bus: Bus) -> Self {
        Self { bus, peers: None }
    }

    /// Listings (`ListSubscriptions`, `GetStats`) also ask `peers` and merge their answers.
    #[must_use]
    pub fn with_peers(mut self, peers: Arc<Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// What the other instances answer to `call` within the caller's deadline (at most
    /// [`PEER_BUDGET`]); nothing when this instance has no peers or only it was asked.
    async fn gather<T, F, Fut>(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        instance_only: bool,
        call: F,
    ) -> Gathered<T>
    where
        F: Fn(PeerClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let now = std::time::Instant::now();
        match &self.peers {
            Some(peers) if !instance_only => {
                let deadline = agentmesh_runtime::deadline::from_metadata(metadata, now);
                // Keep a little of the caller's time for merging and answering.
                let budget = agentmesh_runtime::deadline::budget(deadline, PEER_BUDGET, now)
                    .saturating_sub(Duration::from_millis(20));
                peers.gather(budget, call).await
            }
            _ => Gathered {
                answers: Vec::new(),
                unreachable: Vec::new(),
            },
        }
    }

    /// This instance's subscriptions whose filter equals `subject` (empty = all).
    fn local_subscriptions(&self, subject: &str) -> Vec<pb::SubscriptionInfo> {
        let instance = self.bus.config().instance_id.clone();
        self.bus
            .list_subscriptions(subject)
            .into_iter()
            .map(|s| pb::SubscriptionInfo {
                subscription_id: s.member.subscription_id,
                subject: s.subject,
                queue_group: s.queue_group,
                instance: instance.clone(),
                max_in_flight: s.member.max_in_flight,
                in_flight: u64::from(s.member.in_flight),
                pending: s.pending,
                delivered: s.member.delivered,
                acked: s.member.acked,
                opened_at: Some(timestamp_from_ms(s.member.opened_at_ms)),
                stream: s.stream.unwrap_or_default(),
            })
            .collect()
    }

    /// This instance's stats of subjects and groups matching `filter`, and the durable streams.
    async fn local_stats(
        &self,
        filter: Option<&SubjectFilter>,
    ) -> Result<pb::GetStatsResponse, Status> {
        let (subjects, groups) = self.bus.stats(filter);
        let mut streams = Vec::new();
        for pattern in &self.bus.config().durable {
            if filter.is_some_and(|f| !f.overlaps(pattern)) {
                continue;
            }
            let info = self
                .bus
                .log()
                .info(pattern.as_str())
                .await
                .map_err(to_status)?;
            streams.push(pb::StreamStats {
                stream: pattern.as_str().to_owned(),
                length: info.length,
                first_sequence: info.first_sequence.unwrap_or(0),
                last_sequence: info.last_sequence.unwrap_or(0),
            });
        }
        let instance = self.bus.config().instance_id.clone();
        Ok(pb::GetStatsResponse {
            subjects: subjects
                .into_iter()
                .map(|s| pb::SubjectStats {
                    subject: s.subject,
                    published: s.published,
                    duplicates: s.duplicates,
                    publish_rate: s.rate,
                })
                .collect(),
            groups: groups
                .into_iter()
                .map(|g| pb::GroupStats {
                    subject: g.subject,
                    group: g.group,
                    members: u32::try_from(g.snapshot.members.len()).unwrap_or(u32::MAX),
                    pending: g.snapshot.pending as u64,
                    in_flight: g.snapshot.in_flight as u64,
                    delivered: g.snapshot.counters.delivered,
                    acked: g.snapshot.counters.acked,
                    redelivered: g.snapshot.counters.redelivered,
                    expired: g.snapshot.counters.expired,
                    dead_lettered: g.snapshot.counters.dead_lettered,
                    shed: g.snapshot.counters.shed,
                    delivery_rate: g.rate,
                })
                .collect(),
            streams,
            instances: vec![instance.clone()],
            instance,
            unreachable: Vec::new(),
        })
    }

    /// The tonic server for this adapter. Messages up to four times the data bound are
    /// decoded, so an oversized event is answered INVALID_ARGUMENT naming `event.data` rather
    /// than a transport error; beyond that the transport refuses (OUT_OF_RANGE).
    #[must_use]
    pub fn into_server(self) -> pb::event_bus_server::EventBusServer<Self> {
        let max_message = self.bus.config().max_data.saturating_mul(4) + 256 * 1024;
        pb::event_bus_server::EventBusServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message.max(4 * 1024 * 1024))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::event_bus_server::EventBus for EventBusGrpc {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let caller = caller(&request);
        let mut event = decode_publish(request.into_inner().event, "event").map_err(to_status)?;
        check_event(&caller, &event).map_err(to_status)?;
        let _span = producer_span(&mut event, true);
        let outcome = self.bus.publish(event).await.map_err(to_status)?;
        Ok(Response::new(encode_outcome(outcome)))
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        // Processed inside the response stream (no task or channel in between): each time the
        // transport wants an answer and none is ready, batches are read and started (up to
        // PUBLISH_DEPTH in flight, stored in publish order: see `Bus::start_batch`) and the
        // oldest one's answers are handed out.
        let state = PublishState {
            caller: caller(&request),
            inbound: request.into_inner(),
            inbound_done: false,
            bus: self.bus.clone(),
            in_flight: futures::stream::FuturesOrdered::new(),
            ready: VecDeque::new(),
            failure: None,
        };
        let answers = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(answer) = state.ready.pop_front() {
                    return Some((Ok(answer), state));
                }
                if state.inbound_done || state.in_flight.len() >= PUBLISH_DEPTH {
                    match state.in_flight.next().await {
                        Some(answers) => state.ready.extend(answers),
                        // Everything read was answered: end with the reason reading stopped,
                        // if it was not the client's clean end (never OK after a bad frame).
                        None => return state.failure.take().map(|status| (Err(status), state)),
                    }
                    continue;
                }
                let first = if state.in_flight.is_empty() {
                    state.inbound.next().await
                } else {
                    tokio::select! {
                        biased;
                        answers = state.in_flight.next() => {
                            state.ready.extend(answers.unwrap_or_default());
                            continue;
                        }
                        message = state.inbound.next() => message,
                    }
                };
                match first {
                    Some(Ok(first)) => state.start(first),
                    // The client is done (or gone): answer what is in flight, then end.
                    None => state.inbound_done = true,
                    Some(Err(status)) => state.fail(status),
                }
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request);
        let mut inbound = request.into_inner();
        let open = match inbound.next().await {
            Some(Ok(pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Open(open)),
            })) => open,
            Some(Ok(_)) => {
                return Err(to_status(EventBusError::invalid(
                    "open",
                    "the first message of a subscription must be `open`",
                )));
            }
            Some(Err(status)) => return Err(status),
            None => return Err(Status::cancelled("the stream ended before `open`")),
        };
        let (mut options, start) = decode_open(&open).map_err(to_status)?;
        caller.check_filter("open.subject", options.filter.as_str())?;
        if open.dead_letter_subject.is_empty() {
            options.dead_letter_subject = default_dead_letters(&caller);
        } else {
            caller.check_subject("open.dead_letter_subject", &options.dead_letter_subject)?;
        }
        let subscription = self
            .bus
            .subscribe(options, start)
            .await
            .map_err(to_status)?;
        let subscribed = pb::SubscribeResponse {
            kind: Some(pb::subscribe_response::Kind::Subscribed(pb::Subscribed {
                subscription_id: subscription.id.clone(),
                instance: self.bus.config().instance_id.clone(),
                stream: subscription.stream.clone().unwrap_or_default(),
            })),
        };
        let handle = Arc::new(subscription.handle);
        let stop = tokio_util::sync::CancellationToken::new();
        let failure = Arc::new(parking_lot::Mutex::new(None));
        let deliveries = deliveries_stream(
            subscription.rx,
            handle.clone(),
            stop.clone(),
            failure.clone(),
        );
        let id = subscription.id;
        tokio::spawn(async move {
            // A protocol error (an undecodable frame, a second `open`, an empty message) ends
            // the subscription with INVALID_ARGUMENT naming it, never with OK.
            let outcome = loop {
                match inbound.next().await {
                    Some(Ok(message)) => {
                        if let Err(e) = handle_client_message(&handle, &id, message).await {
                            break Some(to_status(e));
                        }
                    }
                    Some(Err(status)) => break Some(status),
                    None => break None,
                }
            };
            *failure.lock() = outcome;
            stop.cancel();
        });
        let stream = futures::stream::once(std::future::ready(Ok(subscribed))).chain(deliveries);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn request(
        &self,
        request: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        let caller_deadline = agentmesh_runtime::deadline::from_metadata(
            request.metadata(),
            std::time::Instant::now(),
        );
        let caller = caller(&request);
        let r = request.into_inner();
        let mut violations = Vec::new();
        let timeout = match r.timeout.as_ref().map(duration_from_proto) {
            None => DEFAULT_REQUEST_TIMEOUT,
            Some(Some(t)) if !t.is_zero() && t <= MAX_REQUEST_TIMEOUT => t,
            Some(_) => {
                violations.push(FieldViolation::new("timeout", "must be between 1ms and 5m"));
                DEFAULT_REQUEST_TIMEOUT
            }
        };
        let event = match r.event {
            None => {
                violations.push(FieldViolation::new("event", "required"));
                None
            }
            Some(e) if e.subject.is_empty() && e.data.is_empty() => {
                violations.push(FieldViolation::new(
                    "event",
                    "empty request: give at least a subject",
                ));
                None
            }
            Some(e) => match decode_publish(Some(e), "event") {
                Ok(e) => Some(e),
                Err(EventBusError::InvalidArgument(v)) => {
                    violations.extend(v);
                    None
                }
                Err(other) => return Err(to_status(other)),
            },
        };
        if !violations.is_empty() {
            return Err(to_status(EventBusError::InvalidArgument(violations)));
        }
        let Some(event) = event else {
            return Err(Status::internal("no event after validation"));
        };
        let timeout = match caller_deadline {
            Some(deadline) => {
                timeout.min(deadline.saturating_duration_since(std::time::Instant::now()))
            }
            None => timeout,
        };
        check_event(&caller, &event).map_err(to_status)?;
        let mut event = event;
        let _span = producer_span(&mut event, true);
        let (reply, responder) = self.bus.request(event, timeout).await.map_err(to_status)?;
        Ok(Response::new(pb::RequestResponse {
            reply: Some(encode_event(&reply)),
            responder,
        }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let caller = caller(&request);
        let (metadata, _, r) = request.into_parts();
        if !r.subject.is_empty() {
            // Listings match filters exactly, so anything else would match nothing.
            SubjectFilter::parse("subject", &r.subject)
                .map_err(|v| to_status(EventBusError::InvalidArgument(vec![v])))?;
        }
        let mut subscriptions = self.local_subscriptions(&r.subject);
        let asked = pb::ListSubscriptionsRequest {
            subject: r.subject.clone(),
            instance_only: true,
        };
        let peers = self
            .gather(&metadata, r.instance_only, |mut client| {
                let asked = asked.clone();
                async move { Ok(client.list_subscriptions(asked).await?.into_inner()) }
            })
            .await;
        let mut instances = vec![self.bus.config().instance_id.clone()];
        for (instance, answer) in peers.answers {
            subscriptions.extend(answer.subscriptions);
            instances.push(instance);
        }
        // A tenant sees its own subscriptions only.
        subscriptions.retain(|s| caller.owns(&s.subject));
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions,
            unreachable: peers.unreachable,
            instances,
        }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let caller = caller(&request);
        let (metadata, _, r) = request.into_parts();
        let filter = if r.subject.is_empty() {
            None
        } else {
            Some(
                SubjectFilter::parse("subject", &r.subject)
                    .map_err(|v| to_status(EventBusError::InvalidArgument(vec![v])))?,
            )
        };
        let asked = pb::GetStatsRequest {
            subject: r.subject.clone(),
            instance_only: true,
        };
        let (local, peers) = futures::join!(
            self.local_stats(filter.as_ref()),
            self.gather(&metadata, r.instance_only, |mut client| {
                let asked = asked.clone();
                async move { Ok(client.get_stats(asked).await?.into_inner()) }
            })
        );
        let mut stats = local?;
        for (_, answer) in peers.answers {
            merge_stats(&mut stats, answer);
        }
        stats.unreachable = peers.unreachable;
        // A tenant sees its own subjects, groups and streams only.
        stats.subjects.retain(|s| caller.owns(&s.subject));
        stats.groups.retain(|g| caller.owns(&g.subject));
        stats.streams.retain(|s| caller.owns(&s.stream));
        Ok(Response::new(stats))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let subject = dead_letter_subject(&r.subject, &caller)?;
        let limit = page(r.limit, "limit")?;
        let dead = self
            .bus
            .dead_letters(&subject, r.from_sequence, limit)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: dead
                .into_iter()
                .map(|d| pb::DeadLetter {
                    sequence: d.sequence,
                    event: Some(encode_event(&d.event)),
                    reason: d.reason,
                    deliveries: d.deliveries,
                    group: d.group,
                    dead_at: Some(timestamp_from_ms(d.dead_at_ms)),
                })
                .collect(),
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let r = request.into_inner();
        let subject = dead_letter_subject(&r.subject, &caller)?;
        audit.set(|| redrive_target(&subject, &r.sequences, &r.to_subject));
        let limit = page(r.limit, "limit")?;
        if r.sequences.len() > MAX_PAGE {
            return Err(to_status(EventBusError::invalid(
                "sequences",
                format!("at most {MAX_PAGE}"),
            )));
        }
        let to = if r.to_subject.is_empty() {
            None
        } else {
            validate_subject("to_subject", &r.to_subject)
                .map_err(|v| to_status(EventBusError::InvalidArgument(vec![v])))?;
            caller.check_subject("to_subject", &r.to_subject)?;
            Some(r.to_subject.as_str())
        };
        let redriven = self
            .bus
            .redrive(&subject, &r.sequences, to, limit)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RedriveDeadLettersResponse { redriven }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let caller = caller(&request);
        let audit = audit::target(&request);
        let r = request.into_inner();
        let subject = dead_letter_subject(&r.subject, &caller)?;
        audit.set(|| redrive_target(&subject, &r.sequences, ""));
        if r.sequences.len() > MAX_PAGE {
            return Err(to_status(EventBusError::invalid(
                "sequences",
                format!("at most {MAX_PAGE}"),
            )));
        }
        let purged = self
            .bus
            .purge(&subject, &r.sequences)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PurgeDeadLettersResponse { purged }))
    }
}

/// A PublishStream's state between answers.
struct PublishState {
    /// Who publishes: every event's subject is checked against its token.
    caller: Arc<Identity>,
    inbound: Streaming<pb::PublishRequest>,
    /// The client closed its side (or it failed): no batch is started any more.
    inbound_done: bool,
    bus: Bus,
    /// Started batches, oldest first: each resolves to its answers in order.
    in_flight: futures::stream::FuturesOrdered<BoxFuture<'static, Vec<pb::PublishResponse>>>,
    /// Answers of the batch being handed out, in order.
    ready: VecDeque<pb::PublishResponse>,
    /// Why reading stopped, when it was not the client's clean end (an undecodable frame is
    /// INVALID_ARGUMENT): the stream ends with it once everything read before is answered.
    failure: Option<Status>,
}

impl PublishState {
    /// Stops reading: nothing after a frame that could not be read is published.
    fn fail(&mut self, status: Status) {
        self.inbound_done = true;
        self.failure = Some(status);
    }

    /// Starts a batch of `first` and whatever else already arrived.
    fn start(&mut self, first: pb::PublishRequest) {
        let mut batch = vec![first];
        while batch.len() < MAX_PUBLISH_BATCH {
            match self.inbound.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                Some(Some(Err(status))) => {
                    self.fail(status);
                    break;
                }
                Some(None) => {
                    self.inbound_done = true;
                    break;
                }
                None => break,
            }
        }
        let mut answers: Vec<Option<pb::PublishResponse>> = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for m in batch {
            let decoded = decode_publish(m.event, "event").and_then(|event| {
                check_event(&self.caller, &event)?;
                Ok(event)
            });
            match decoded {
                Ok(mut event) => {
                    drop(producer_span(&mut event, false));
                    events.push(event);
                    answers.push(None);
                }
                Err(e) => answers.push(Some(error_response(&e))),
            }
        }
        let published = self.bus.start_batch(events);
        self.in_flight.push_back(Box::pin(async move {
            let mut results = published.await.into_iter();
            answers
                .into_iter()
                .map(|answer| match answer {
                    Some(error) => error,
                    None => match results.next() {
                        Some(Ok(outcome)) => encode_outcome(outcome),
                        Some(Err(e)) => error_response(&e),
                        None => error_response(&EventBusError::ShuttingDown),
                    },
                })
                .collect()
        }));
    }
}

/// A subscription's outgoing side between messages.
struct DeliverState {
    rx: mpsc::Receiver<Outbound>,
    handle: Arc<SubscriptionHandle>,
    stop: tokio_util::sync::CancellationToken,
    /// Why the client's side ended, when it was a protocol error: the last thing sent.
    failure: Arc<parking_lot::Mutex<Option<Status>>>,
    /// Messages ready to go, with the deliveries each carries.
    ready: VecDeque<(pb::SubscribeResponse, u32)>,
    /// Deliveries in the message handed out last: written once the next is asked for.
    handed_out: u32,
}

/// Deliveries and advisories for the subscriber, batching what is ready, until the client goes
/// away or `stop` fires. Encoded inside the response stream itself (no task or channel in
/// between); a message's deliveries count as written (ack policy NONE frees their credit) when
/// the transport asks for the next one.
fn deliveries_stream(
    rx: mpsc::Receiver<Outbound>,
    handle: Arc<SubscriptionHandle>,
    stop: tokio_util::sync::CancellationToken,
    failure: Arc<parking_lot::Mutex<Option<Status>>>,
) -> impl Stream<Item = Result<pb::SubscribeResponse, Status>> + Send + 'static {
    let state = DeliverState {
        rx,
        handle,
        stop,
        failure,
        ready: VecDeque::new(),
        handed_out: 0,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.handed_out > 0 {
            state.handle.sent(std::mem::take(&mut state.handed_out));
        }
        if state.ready.is_empty() {
            let first = tokio::select! {
                () = state.stop.cancelled() => {
                    let failure = state.failure.lock().take();
                    return failure.map(|status| (Err(status), state));
                }
                next = state.rx.recv() => next?,
            };
            let mut deliveries = Vec::new();
            let mut next = Some(first);
            while let Some(out) = next.take() {
                match out {
                    Outbound::Delivery(d) => deliveries.push(d),
                    Outbound::Advisory(a) => state.ready.push_back((encode_advisory(a), 0)),
                }
                if deliveries.len() < MAX_DELIVERIES_PER_MESSAGE {
                    next = state.rx.try_recv().ok();
                }
            }
            if !deliveries.is_empty() {
                let count = u32::try_from(deliveries.len()).unwrap_or(u32::MAX);
                state
                    .ready
                    .push_back((encode_deliveries(&deliveries), count));
            }
        }
        let (message, count) = state.ready.pop_front()?;
        state.handed_out = count;
        Some((Ok(message), state))
    })
}

fn encode_advisory(a: AdvisoryOut) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        kind: Some(pb::subscribe_response::Kind::Advisory(pb::Advisory {
            kind: match a.kind {
                AdvisoryKind::Shed => pb::advisory::Kind::Shed,
                AdvisoryKind::Expired => pb::advisory::Kind::Expired,
                AdvisoryKind::DeadLettered => pb::advisory::Kind::DeadLettered,
            } as i32,
            count: a.count,
            priority: a.priority.map_or(0, encode_priority),
            message: a.message,
        })),
    }
}

/// One Deliveries message; each delivery opens its consumer span (when exporting).
fn encode_deliveries(deliveries: &[DeliveryOut]) -> pb::SubscribeResponse {
    let encoded = deliveries
        .iter()
        .map(|d| {
            let _span = message_trace::consumer(&d.event.headers, &d.event.subject, &d.event.id);
            pb::Delivery {
                delivery_id: d.delivery_id,
                event: Some(encode_event(&d.event)),
                delivery_count: d.delivery_count,
                sequence: d.sequence,
            }
        })
        .collect();
    pb::SubscribeResponse {
        kind: Some(pb::subscribe_response::Kind::Deliveries(pb::Deliveries {
            deliveries: encoded,
        })),
    }
}

async fn handle_client_message(
    handle: &SubscriptionHandle,
    subscription_id: &str,
    message: pb::SubscribeRequest,
) -> Result<(), EventBusError> {
    use pb::subscribe_request::Kind;
    match message.kind {
        Some(Kind::Ack(ack)) => {
            for chunk in ack.delivery_ids.chunks(MAX_ACK_IDS) {
                handle.ack(chunk);
            }
        }
        Some(Kind::Nak(nak)) => {
            let delay = nak
                .delay
                .as_ref()
                .and_then(duration_from_proto)
                .map(|d| d.min(MAX_DELAY));
            handle.nak(nak.delivery_id, delay);
        }
        Some(Kind::InProgress(p)) => {
            handle.in_progress(p.delivery_id);
        }
        Some(Kind::Terminate(t)) => {
            let reason: String = t.reason.chars().take(256).collect();
            handle.terminate(t.delivery_id, &reason);
        }
        Some(Kind::Reply(reply)) => {
            let event = reply.event.map(decode_event_lenient).unwrap_or_default();
            if let Err(e) = handle
                .reply(reply.delivery_id, event, subscription_id)
                .await
            {
                tracing::debug!(error = %e, subscription = %subscription_id, "reply refused");
            }
        }
        Some(Kind::Open(_)) => {
            return Err(EventBusError::invalid(
                "open",
                "a subscription is opened once: `open` after the first message is a protocol error",
            ));
        }
        None => {
            return Err(EventBusError::invalid(
                "kind",
                "empty message: set one of ack, nak, in_progress, terminate, reply",
            ));
        }
    }
    Ok(())
}

/// Opens the event's producer span and writes its context into the event's headers. Its
/// parent is a `traceparent` the client put in the event, else (`in_call`) the context of the
/// RPC carrying it; events of a PublishStream without one each start a trace.
fn producer_span(event: &mut Event, in_call: bool) -> message_trace::MessageSpan {
    let rpc = in_call.then(|| tracing::Span::current().context());
    message_trace::producer(&mut event.headers, &event.subject, rpc.as_ref())
}

fn encode_outcome(o: PublishOutcome) -> pb::PublishResponse {
    pb::PublishResponse {
        id: o.id,
        duplicate: o.duplicate,
        sequence: o.sequence,
        stream: o.stream.unwrap_or_default(),
        error: None,
    }
}

fn error_response(e: &EventBusError) -> pb::PublishResponse {
    let status = to_status(e.clone());
    let field = match e {
        EventBusError::InvalidArgument(v) => v.first().map(|v| v.field.clone()).unwrap_or_default(),
        _ => String::new(),
    };
    pb::PublishResponse {
        error: Some(pb::PublishError {
            code: agentmesh_runtime::observe::code_name(status.code() as i32).to_owned(),
            message: status.message().to_owned(),
            field,
        }),
        ..Default::default()
    }
}

/// A domain error as a gRPC status, through the runtime's one mapping.
#[allow(
    clippy::needless_pass_by_value,
    reason = "taken by value to be used as `.map_err(to_status)`"
)]
pub fn to_status(e: EventBusError) -> Status {
    agentmesh_runtime::error::to_status(&e)
}

/// Validates a subscription's opening message into options and a start position.
fn decode_open(
    open: &pb::SubscribeOpen,
) -> Result<(ConsumerOptions, StartPosition), EventBusError> {
    let mut v = Vec::new();
    let filter = match SubjectFilter::parse("open.subject", &open.subject) {
        Ok(f) => Some(f),
        Err(e) => {
            v.push(e);
            None
        }
    };
    let name = |field: &str, value: &str, v: &mut Vec<FieldViolation>| -> Option<String> {
        if value.is_empty() {
            return None;
        }
        if value.len() > 128
            || !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            v.push(FieldViolation::new(field, "1–128 bytes of [A-Za-z0-9._-]"));
        }
        Some(value.to_owned())
    };
    let queue_group = name("open.queue_group", &open.queue_group, &mut v);
    let durable_name = name("open.durable_name", &open.durable_name, &mut v);
    if open.types.len() > 16 {
        v.push(FieldViolation::new("open.types", "at most 16"));
    }
    if open.headers.len() > 16 {
        v.push(FieldViolation::new("open.headers", "at most 16"));
    }
    let min_priority = decode_priority(open.min_priority).unwrap_or_else(|| {
        v.push(FieldViolation::new("open.min_priority", "unknown priority"));
        Priority::Low
    });
    let min_priority = if open.min_priority == 0 {
        Priority::Low
    } else {
        min_priority
    };
    if open.max_in_flight == 0 || open.max_in_flight > MAX_IN_FLIGHT {
        v.push(FieldViolation::new(
            "open.max_in_flight",
            format!(
                "flow-control credit must be between 1 and {MAX_IN_FLIGHT}, got {}",
                open.max_in_flight
            ),
        ));
    }
    let ack_wait = match open.ack_wait.as_ref().map(duration_from_proto) {
        None => DEFAULT_ACK_WAIT,
        Some(Some(d)) if (MIN_ACK_WAIT..=MAX_ACK_WAIT).contains(&d) => d,
        Some(_) => {
            v.push(FieldViolation::new(
                "open.ack_wait",
                "must be between 100ms and 12h",
            ));
            DEFAULT_ACK_WAIT
        }
    };
    let max_deliveries = match open.max_deliveries {
        0 => DEFAULT_MAX_DELIVERIES,
        n if n <= MAX_MAX_DELIVERIES => n,
        _ => {
            v.push(FieldViolation::new(
                "open.max_deliveries",
                format!("at most {MAX_MAX_DELIVERIES}"),
            ));
            DEFAULT_MAX_DELIVERIES
        }
    };
    if open.backoff.len() > MAX_BACKOFF_ENTRIES {
        v.push(FieldViolation::new(
            "open.backoff",
            format!("at most {MAX_BACKOFF_ENTRIES} entries"),
        ));
    }
    let mut backoff = Vec::new();
    for (i, d) in open.backoff.iter().enumerate() {
        match duration_from_proto(d) {
            Some(d) if d <= MAX_DELAY => backoff.push(d),
            _ => v.push(FieldViolation::new(
                format!("open.backoff[{i}]"),
                "must be between 0 and 1h",
            )),
        }
    }
    let dead_letter_subject = if open.dead_letter_subject.is_empty() {
        DEFAULT_DEAD_LETTER_SUBJECT.to_owned()
    } else {
        if let Err(e) = validate_subject("open.dead_letter_subject", &open.dead_letter_subject) {
            v.push(e);
        }
        open.dead_letter_subject.clone()
    };
    let ack_policy = match pb::AckPolicy::try_from(open.ack_policy) {
        Ok(pb::AckPolicy::Unspecified | pb::AckPolicy::Explicit) => AckPolicy::Explicit,
        Ok(pb::AckPolicy::None) => AckPolicy::None,
        Err(_) => {
            v.push(FieldViolation::new("open.ack_policy", "unknown ack policy"));
            AckPolicy::Explicit
        }
    };
    let start = match open.start.as_ref().and_then(|s| s.position.as_ref()) {
        None => StartPosition::New,
        Some(pb::start_position::Position::NewOnly(_)) => StartPosition::New,
        Some(pb::start_position::Position::All(_)) => StartPosition::All,
        Some(pb::start_position::Position::Last(_)) => StartPosition::Last,
        Some(pb::start_position::Position::Sequence(0)) => {
            v.push(FieldViolation::new(
                "open.start.sequence",
                "sequences start at 1",
            ));
            StartPosition::New
        }
        Some(pb::start_position::Position::Sequence(n)) => StartPosition::Sequence(*n),
        Some(pb::start_position::Position::Time(t)) => match timestamp_to_ms(t) {
            Some(ms) => StartPosition::Time(ms),
            None => {
                v.push(FieldViolation::new("open.start.time", "invalid timestamp"));
                StartPosition::New
            }
        },
    };
    let Some(filter) = filter.filter(|_| v.is_empty()) else {
        return Err(EventBusError::InvalidArgument(v));
    };
    Ok((
        ConsumerOptions {
            filter,
            queue_group,
            types: open.types.clone(),
            headers: open
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            min_priority,
            max_in_flight: open.max_in_flight,
            ack_wait,
            max_deliveries,
            backoff,
            dead_letter_subject,
            ack_policy,
            durable_name,
        },
        start,
    ))
}

/// What a redrive or purge acts on, for the audit trail: the dead-letter subject, the
/// sequences (or "all") and where they go.
fn redrive_target(subject: &str, sequences: &[u64], to: &str) -> String {
    let which = if sequences.is_empty() {
        "all".to_owned()
    } else {
        format!("{} sequence(s) from {}", sequences.len(), sequences[0])
    };
    if to.is_empty() {
        format!("{subject} ({which})")
    } else {
        format!("{subject} ({which}) -> {to}")
    }
}

/// Whether the caller may publish `event`: its subject, and the reply subject it names (a
/// reply is published there).
fn check_event(caller: &Identity, event: &Event) -> Result<(), EventBusError> {
    caller.check_subject("event.subject", &event.subject)?;
    if !event.reply_to.is_empty() {
        caller.check_subject("event.reply_to", &event.reply_to)?;
    }
    Ok(())
}

/// Where a subscription's dead letters go by default: `sys.deadletter`, or for a tenant's
/// token `<tenant>.deadletter` (so the tenant can read and redrive them).
fn default_dead_letters(caller: &Identity) -> String {
    caller.tenant.as_deref().map_or_else(
        || DEFAULT_DEAD_LETTER_SUBJECT.to_owned(),
        |t| format!("{t}.deadletter"),
    )
}

/// The dead-letter subject a listing, redrive or purge names (empty: the caller's default),
/// if the caller may use it.
fn dead_letter_subject(subject: &str, caller: &Identity) -> Result<String, Status> {
    if subject.is_empty() {
        return Ok(default_dead_letters(caller));
    }
    validate_subject("subject", subject)
        .map_err(|v| to_status(EventBusError::InvalidArgument(vec![v])))?;
    caller.check_subject("subject", subject)?;
    Ok(subject.to_owned())
}

fn page(limit: u32, field: &str) -> Result<usize, Status> {
    match limit as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        _ => Err(to_status(EventBusError::invalid(
            field,
            format!("at most {MAX_PAGE}"),
        ))),
    }
}

/// Adds another instance's stats to `into`: subjects by subject, groups by filter and group
/// (every figure is a sum: each instance counts only what it handled); durable streams are
/// shared, so one copy of each is kept.
fn merge_stats(into: &mut pb::GetStatsResponse, other: pb::GetStatsResponse) {
    let mut subjects: BTreeMap<String, pb::SubjectStats> = std::mem::take(&mut into.subjects)
        .into_iter()
        .map(|s| (s.subject.clone(), s))
        .collect();
    for s in other.subjects {
        let sum = subjects
            .entry(s.subject.clone())
            .or_insert_with(|| pb::SubjectStats {
                subject: s.subject.clone(),
                ..Default::default()
            });
        sum.published += s.published;
        sum.duplicates += s.duplicates;
        sum.publish_rate += s.publish_rate;
    }
    into.subjects = subjects.into_values().collect();
    let mut groups: BTreeMap<(String, String), pb::GroupStats> = std::mem::take(&mut into.groups)
        .into_iter()
        .map(|g| ((g.subject.clone(), g.group.clone()), g))
        .collect();
    for g in other.groups {
        let sum = groups
            .entry((g.subject.clone(), g.group.clone()))
            .or_insert_with(|| pb::GroupStats {
                subject: g.subject.clone(),
                group: g.group.clone(),
                ..Default::default()
            });
        sum.members = sum.members.saturating_add(g.members);
        sum.pending += g.pending;
        sum.in_flight += g.in_flight;
        sum.delivered += g.delivered;
        sum.acked += g.acked;
        sum.redelivered += g.redelivered;
        sum.expired += g.expired;
        sum.dead_lettered += g.dead_lettered;
        sum.shed += g.shed;
        sum.delivery_rate += g.delivery_rate;
    }
    into.groups = groups.into_values().collect();
    for stream in other.streams {
        if !into.streams.iter().any(|s| s.stream == stream.stream) {
            into.streams.push(stream);
        }
    }
    into.streams.sort_by(|a, b| a.stream.cmp(&b.stream));
    into.instances.extend(other.instances);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(subject: &str, group: &str, members: u32, delivered: u64) -> pb::GroupStats {
        pb::GroupStats {
            subject: subject.into(),
            group: group.into(),
            members,
            pending: 1,
            in_flight: 2,
            delivered,
            delivery_rate: 1.5,
            ..Default::default()
        }
    }

    #[test]
    fn test_merged_stats_add_up_subjects_and_groups_and_keep_one_copy_of_a_stream() {
        let stream = |length| pb::StreamStats {
            stream: "jobs.>".into(),
            length,
            first_sequence: 1,
            last_sequence: length,
        };
        let mut a = pb::GetStatsResponse {
            subjects: vec![pb::SubjectStats {
                subject: "chat.msg".into(),
                published: 10,
                duplicates: 1,
                publish_rate: 2.0,
            }],
            groups: vec![group("chat.*", "workers", 1, 7), group("a.b", "s-1", 1, 3)],
            streams: vec![stream(40)],
            instance: "eventbus-a".into(),
            instances: vec!["eventbus-a".into()],
            unreachable: Vec::new(),
        };
        let b = pb::GetStatsResponse {
            subjects: vec![
                pb::SubjectStats {
                    subject: "chat.msg".into(),
                    published: 5,
                    duplicates: 0,
                    publish_rate: 1.0,
                },
                pb::SubjectStats {
                    subject: "audit".into(),
                    published: 1,
                    ..Default::default()
                },
            ],
            groups: vec![group("chat.*", "workers", 2, 5)],
            streams: vec![
                stream(41),
                pb::StreamStats {
                    stream: "audit".into(),
                    ..Default::default()
                },
            ],
            instance: "eventbus-b".into(),
            instances: vec!["eventbus-b".into()],
            unreachable: Vec::new(),
        };
        merge_stats(&mut a, b);
        let subjects: Vec<(&str, u64, u64)> = a
            .subjects
            .iter()
            .map(|s| (s.subject.as_str(), s.published, s.duplicates))
            .collect();
        assert_eq!(subjects, [("audit", 1, 0), ("chat.msg", 15, 1)]);
        assert!((a.subjects[1].publish_rate - 3.0).abs() < 1e-9);
        let workers = a.groups.iter().find(|g| g.group == "workers").unwrap();
        assert_eq!(
            (
                workers.members,
                workers.pending,
                workers.in_flight,
                workers.delivered
            ),
            (3, 2, 4, 12),
            "one row for a queue group spread over two instances"
        );
        assert!((workers.delivery_rate - 3.0).abs() < 1e-9);
        assert_eq!(a.groups.len(), 2);
        let streams: Vec<(&str, u64)> = a
            .streams
            .iter()
            .map(|s| (s.stream.as_str(), s.length))
            .collect();
        assert_eq!(
            streams,
            [("audit", 0), ("jobs.>", 40)],
            "shared streams once"
        );
        assert_eq!(a.instances, ["eventbus-a", "eventbus-b"]);
        assert_eq!(a.instance, "eventbus-a");
    }
}

#[cfg(test)]
mod access_tests {
    #[test]
    fn test_every_rpc_has_an_access_rule() {
        agentmesh_runtime::auth::assert_covered("agentmesh.eventbus.v1.EventBus", super::ACCESS);
    }
}
