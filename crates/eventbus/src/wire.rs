//! Proto ↔ domain conversion of events for the event bus: it knows the wire types and the
//! domain types and nothing else, so the inbound adapter (`grpc`) and the Redis backplane
//! (which carries events between instances) use it without depending on each other.

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_proto::eventbus::v1 as pb;
use agentmesh_runtime::wire::{duration_from_proto, timestamp_from_ms, timestamp_to_ms};

use crate::error::{EventBusError, FieldViolation};
use crate::event::{Event, MAX_TTL_MS, Priority, now_ms};

/// Decodes a published event: envelope bounds are checked by the bus, TTL rules here.
pub(crate) fn decode_publish(
    event: Option<pb::Event>,
    field: &str,
) -> Result<Event, EventBusError> {
    let Some(e) = event else {
        return Err(EventBusError::invalid(field, "required"));
    };
    let mut violations = Vec::new();
    let now = now_ms();
    let expires_at_ms = match (&e.ttl, &e.expires_at) {
        (Some(_), Some(_)) => {
            violations.push(FieldViolation::new(
                format!("{field}.ttl"),
                "give ttl or expires_at, not both",
            ));
            None
        }
        (Some(ttl), None) => match duration_from_proto(ttl) {
            Some(d) if !d.is_zero() && millis(d) <= MAX_TTL_MS => Some(now + millis(d)),
            _ => {
                violations.push(FieldViolation::new(
                    format!("{field}.ttl"),
                    "must be between 1ms and 30 days",
                ));
                None
            }
        },
        (None, Some(at)) => match timestamp_to_ms(at) {
            Some(ms) => Some(ms),
            None => {
                violations.push(FieldViolation::new(
                    format!("{field}.expires_at"),
                    "invalid timestamp",
                ));
                None
            }
        },
        (None, None) => None,
    };
    let priority = match decode_priority(e.priority) {
        Some(p) => p,
        None => {
            violations.push(FieldViolation::new(
                format!("{field}.priority"),
                "unknown priority",
            ));
            Priority::Normal
        }
    };
    if !violations.is_empty() {
        return Err(EventBusError::InvalidArgument(violations));
    }
    Ok(Event {
        id: e.id,
        subject: e.subject,
        r#type: e.r#type,
        source: e.source,
        time_ms: e.time.as_ref().and_then(timestamp_to_ms).unwrap_or(0),
        priority,
        expires_at_ms,
        correlation_id: e.correlation_id,
        reply_to: e.reply_to,
        ordering_key: e.ordering_key,
        headers: e.headers.into_iter().collect::<BTreeMap<_, _>>(),
        content_type: e.content_type,
        data: e.data.into(),
    })
}

/// A reply's event: anything invalid is reported when the bus publishes it.
pub(crate) fn decode_event_lenient(e: pb::Event) -> Event {
    decode_publish(
        Some(pb::Event {
            subject: "_reply".to_owned(),
            ..e.clone()
        }),
        "reply.event",
    )
    .unwrap_or_else(|_| Event {
        id: e.id,
        data: e.data.into(),
        ..Event::default()
    })
}

/// The wire form of an event.
pub fn encode_event(e: &Event) -> pb::Event {
    pb::Event {
        id: e.id.clone(),
        subject: e.subject.clone(),
        r#type: e.r#type.clone(),
        source: e.source.clone(),
        time: (e.time_ms != 0).then(|| timestamp_from_ms(e.time_ms)),
        priority: encode_priority(e.priority),
        ttl: None,
        expires_at: e.expires_at_ms.map(timestamp_from_ms),
        correlation_id: e.correlation_id.clone(),
        reply_to: e.reply_to.clone(),
        ordering_key: e.ordering_key.clone(),
        headers: e
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        content_type: e.content_type.clone(),
        data: e.data.to_vec(),
    }
}

pub(crate) fn decode_priority(p: i32) -> Option<Priority> {
    match pb::Priority::try_from(p).ok()? {
        pb::Priority::Unspecified | pb::Priority::Normal => Some(Priority::Normal),
        pb::Priority::Low => Some(Priority::Low),
        pb::Priority::High => Some(Priority::High),
        pb::Priority::Critical => Some(Priority::Critical),
    }
}

/// The wire number of a priority.
pub fn encode_priority(p: Priority) -> i32 {
    (match p {
        Priority::Low => pb::Priority::Low,
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
        Priority::Critical => pb::Priority::Critical,
    }) as i32
}

/// Whole milliseconds of `d`, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
