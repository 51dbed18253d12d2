//! Events a service tells the cluster about on the event bus (the scheduler's agent and task
//! changes, the audit trail): emitting never waits. Events go to a bounded queue
//! ([`QUEUE`]) that one task publishes on a `PublishStream` to a live event bus instance found
//! in membership. When the queue is full, or the bus refuses an event, it is dropped and
//! counted; while no event bus is reachable, events either wait in the queue (the audit trail)
//! or are dropped (notifications), as [`Unreachable`] says.

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::peers::PeerSet;

/// Events waiting to be published.
pub const QUEUE: usize = 10_000;

/// One event to publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutEvent {
    /// Its subject.
    pub subject: String,
    /// A unique id (the bus deduplicates on it).
    pub id: String,
    /// Its type, e.g. `agentmesh.scheduler`.
    pub event_type: String,
    /// JSON data.
    pub data: String,
    /// Events with one key keep their order.
    pub ordering_key: String,
    /// Headers (W3C trace context, …).
    pub headers: BTreeMap<String, String>,
}

/// What happens to queued events while no event bus is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Dropped and counted: notifications whose source of truth is elsewhere.
    Drop,
    /// Kept in the queue (up to [`QUEUE`]) until a bus is reachable.
    Keep,
}

/// Publishes events on the event bus; cheap to share.
pub struct BusPublisher {
    tx: mpsc::Sender<OutEvent>,
    dropped: IntCounter,
}

impl std::fmt::Debug for BusPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusPublisher").finish_non_exhaustive()
    }
}

impl BusPublisher {
    /// Starts publishing over `buses` (the event bus members); `source` names this process in
    /// the events; `dropped` counts what could not be published.
    #[must_use]
    pub fn start(
        buses: PeerSet,
        source: String,
        dropped: IntCounter,
        unreachable: Unreachable,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(publish(buses, source, rx, dropped.clone(), unreachable));
        Self { tx, dropped }
    }

    /// Queues `event`, or drops it (counted) when the queue is full.
    pub fn emit(&self, event: OutEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

fn encode(e: OutEvent, source: &str) -> bus::PublishRequest {
    bus::PublishRequest {
        event: Some(bus::Event {
            id: e.id,
            subject: e.subject,
            r#type: e.event_type,
            source: source.to_owned(),
            ordering_key: e.ordering_key,
            headers: e.headers.into_iter().collect(),
            content_type: "application/json".into(),
            data: e.data.into_bytes(),
            ..bus::Event::default()
        }),
    }
}

async fn publish(
    buses: PeerSet,
    source: String,
    mut rx: mpsc::Receiver<OutEvent>,
    dropped: IntCounter,
    unreachable: Unreachable,
) {
    // The first event of the next stream, when the last one broke while sending it.
    let mut carried: Option<OutEvent> = None;
    loop {
        // An event bus to publish to: the first live member.
        let member = buses.snapshot().members.keys().next().cloned();
        let Some(channel) = member.and_then(|m| buses.channel(&m).ok().map(|(_, c)| c)) else {
            if unreachable == Unreachable::Drop {
                while rx.try_recv().is_ok() {
                    dropped.inc();
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if rx.is_closed() && rx.is_empty() {
                return;
            }
            continue;
        };
        let (out_tx, out_rx) = mpsc::channel::<bus::PublishRequest>(256);
        let mut client = bus::event_bus_client::EventBusClient::new(channel);
        let answers = client
            .publish_stream(tokio_stream::wrappers::ReceiverStream::new(out_rx))
            .await;
        let mut answers = match answers {
            Ok(a) => a.into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot open a publish stream to the event bus");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Some(event) = carried.take()
            && out_tx.send(encode(event, &source)).await.is_err()
        {
            dropped.inc();
        }
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    let keep = (unreachable == Unreachable::Keep).then(|| event.clone());
                    if out_tx.send(encode(event, &source)).await.is_err() {
                        match keep {
                            Some(event) => carried = Some(event),
                            None => dropped.inc(),
                        }
                        break;
                    }
                }
                answer = answers.next() => match answer {
                    Some(Ok(answer)) => {
                        if let Some(error) = answer.error {
                            dropped.inc();
                            tracing::warn!(code = %error.code, error = %error.message, "the event bus refused an event");
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "the event bus ended the publish stream");
                        break;
                    }
                    None => break,
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
