//! What the scheduler tells the rest of the cluster: agent and task changes published on the
//! event bus.
//!
//! Subjects (JSON data, `ordering_key` = the agent or task id so each one's events stay in
//! order):
//! - `sys.scheduler.agent.joined|suspect|dead|left` — `{"agent_id", "type", "epoch", "reason"}`
//! - `sys.scheduler.task.pending|assigned|running|succeeded|failed|timed_out|cancelled` —
//!   `{"task_id", "type", "state", "attempt", "agent_id", "error"}`; the event's headers carry
//!   the submit's W3C trace context (`traceparent`), so a tracing UI shows the task's events in
//!   the submit's trace.
//!
//! Emitting never waits: events go to a bounded queue ([`QUEUE`]) that one task publishes on a
//! `PublishStream` to a live event bus instance (found in membership); when the queue is full
//! or no event bus is reachable, events are dropped and counted
//! (`scheduler_events_dropped_total`). Delivery is at most once: these are notifications, the
//! source of truth stays `GetTask` / `ListAgents`.

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_proto::eventbus::v1 as bus;
use agentmesh_runtime::peers::PeerSet;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// Events waiting to be published.
pub const QUEUE: usize = 10_000;

/// One change to tell the cluster about.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerEvent {
    /// Its subject, under `sys.scheduler.`.
    pub subject: String,
    /// A unique id (the bus deduplicates on it).
    pub id: String,
    /// JSON data.
    pub data: String,
    /// The agent or task id: events of one keep their order.
    pub ordering_key: String,
    /// W3C trace context to carry in the headers.
    pub trace_context: BTreeMap<String, String>,
}

/// Where the scheduler's events go; emitting never blocks.
pub trait EventSink: Send + Sync {
    /// Queues `event` (or drops it, counted, when the sink cannot keep up).
    fn emit(&self, event: SchedulerEvent);
}

/// Events dropped (no event bus, or tests).
#[derive(Debug, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _event: SchedulerEvent) {}
}

/// JSON string literal of `s`.
fn json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An agent event: `kind` is joined, suspect, dead or left.
#[must_use]
pub fn agent_event(
    kind: &str,
    agent_id: &str,
    agent_type: &str,
    epoch: u64,
    reason: &str,
) -> SchedulerEvent {
    SchedulerEvent {
        subject: format!("sys.scheduler.agent.{kind}"),
        id: format!("agent-{agent_id}-{epoch}-{kind}-{}", rand::random::<u32>()),
        data: format!(
            "{{\"agent_id\":{},\"type\":{},\"epoch\":{epoch},\"reason\":{}}}",
            json(agent_id),
            json(agent_type),
            json(reason)
        ),
        ordering_key: agent_id.to_owned(),
        trace_context: BTreeMap::new(),
    }
}

/// A task event (its new state).
#[must_use]
pub fn task_event(task: &crate::tasks::Task) -> SchedulerEvent {
    let state = task.state.as_str();
    let agent = task
        .attempts
        .last()
        .map(|a| a.agent_id.as_str())
        .unwrap_or_default();
    SchedulerEvent {
        subject: format!("sys.scheduler.task.{state}"),
        id: format!("task-{}-{}-{state}", task.id, task.attempt()),
        data: format!(
            "{{\"task_id\":{},\"type\":{},\"state\":{},\"attempt\":{},\"agent_id\":{},\"error\":{}}}",
            json(&task.id),
            json(&task.spec.task_type),
            json(state),
            task.attempt(),
            json(agent),
            json(&task.error)
        ),
        ordering_key: task.id.clone(),
        trace_context: task.spec.trace_context.clone(),
    }
}

/// Publishes on the event bus found in membership.
pub struct BusEvents {
    tx: mpsc::Sender<SchedulerEvent>,
    dropped: IntCounter,
}

impl std::fmt::Debug for BusEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusEvents").finish_non_exhaustive()
    }
}

impl BusEvents {
    /// Starts the publisher over `buses` (the event bus members); `source` names this
    /// instance in the events; `dropped` counts what could not be published.
    #[must_use]
    pub fn start(buses: PeerSet, source: String, dropped: IntCounter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(publish(buses, source, rx, dropped.clone()));
        Self { tx, dropped }
    }
}

impl EventSink for BusEvents {
    fn emit(&self, event: SchedulerEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

fn encode(e: SchedulerEvent, source: &str) -> bus::PublishRequest {
    bus::PublishRequest {
        event: Some(bus::Event {
            id: e.id,
            subject: e.subject,
            r#type: "agentmesh.scheduler".into(),
            source: source.to_owned(),
            ordering_key: e.ordering_key,
            headers: e.trace_context.into_iter().collect(),
            content_type: "application/json".into(),
            data: e.data.into_bytes(),
            ..bus::Event::default()
        }),
    }
}

async fn publish(
    buses: PeerSet,
    source: String,
    mut rx: mpsc::Receiver<SchedulerEvent>,
    dropped: IntCounter,
) {
    loop {
        // An event bus to publish to: the first live member.
        let member = buses.snapshot().members.keys().next().cloned();
        let Some(channel) = member.and_then(|m| buses.channel(&m).ok().map(|(_, c)| c)) else {
            // None: drop what waits (notifications are not kept) and look again.
            while rx.try_recv().is_ok() {
                dropped.inc();
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
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    if out_tx.send(encode(event, &source)).await.is_err() {
                        dropped.inc();
                        break;
                    }
                }
                answer = answers.next() => match answer {
                    Some(Ok(_)) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_event_data_is_json_with_escapes() {
        let e = agent_event("joined", "a\"1", "worker", 7, "line\nbreak");
        assert_eq!(e.subject, "sys.scheduler.agent.joined");
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["agent_id"], "a\"1");
        assert_eq!(v["reason"], "line\nbreak");
        assert_eq!(v["epoch"], 7);
    }
}
