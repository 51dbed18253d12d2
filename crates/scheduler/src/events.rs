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
//! Emitting never waits: events go to the runtime's bounded publisher
//! ([`agentmesh_runtime::bus_out`]) on a live event bus instance (found in membership); when
//! its queue is full or no event bus is reachable, events are dropped and counted
//! (`scheduler_events_dropped_total`). Delivery is at most once: these are notifications, the
//! source of truth stays `GetTask` / `ListAgents`.

use std::collections::BTreeMap;

use agentmesh_runtime::bus_out::{BusPublisher, OutEvent, Unreachable};
use agentmesh_runtime::peers::PeerSet;
use prometheus::IntCounter;

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

/// Publishes on the event bus found in membership (the runtime's [`BusPublisher`]; events
/// are dropped while no event bus is reachable).
#[derive(Debug)]
pub struct BusEvents(BusPublisher);

impl BusEvents {
    /// Starts the publisher over `buses` (the event bus members); `source` names this
    /// instance in the events; `dropped` counts what could not be published.
    #[must_use]
    pub fn start(buses: PeerSet, source: String, dropped: IntCounter) -> Self {
        Self(BusPublisher::start(
            buses,
            source,
            dropped,
            Unreachable::Drop,
        ))
    }
}

impl EventSink for BusEvents {
    fn emit(&self, event: SchedulerEvent) {
        self.0.emit(OutEvent {
            subject: event.subject,
            id: event.id,
            event_type: "agentmesh.scheduler".into(),
            data: event.data,
            ordering_key: event.ordering_key,
            headers: event.trace_context,
        });
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
