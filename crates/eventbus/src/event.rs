//! The event envelope as the domain sees it (CloudEvents-compatible attributes).

use std::collections::BTreeMap;

use bytes::Bytes;

/// Delivery priority. Pending events are dispatched CRITICAL first with weighted fairness, so
/// LOW is never starved; under overload LOW is shed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Background work; shed first.
    Low = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Ahead of normal traffic.
    High = 2,
    /// Goes first; shed last.
    Critical = 3,
}

impl Priority {
    /// All priorities, lowest first.
    pub const ALL: [Priority; 4] = [Self::Low, Self::Normal, Self::High, Self::Critical];

    /// Index 0..=3, lowest first.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The priority at `index` (0..=3), lowest first.
    pub fn from_index(index: usize) -> Option<Self> {
        Self::ALL.get(index).copied()
    }

    /// Lowercase name, as used in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// One event. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// Unique id (client-supplied or a generated ULID); used for deduplication.
    pub id: String,
    /// Dot-separated subject, no wildcards.
    pub subject: String,
    /// CloudEvents `type`, e.g. `com.example.task.created`.
    pub r#type: String,
    /// CloudEvents `source`, e.g. `/agents/a-17`.
    pub source: String,
    /// When the event happened (producer's clock), ms since the epoch; 0 = unset.
    pub time_ms: u64,
    /// Delivery priority.
    pub priority: Priority,
    /// After this instant the event is never delivered; `None` = no expiry.
    pub expires_at_ms: Option<u64>,
    /// Links a reply to its request, or events of one conversation.
    pub correlation_id: String,
    /// Subject the receiver should answer on (request/reply).
    pub reply_to: String,
    /// Events with the same ordering key are delivered to a group in publish order, one at a
    /// time (the next once the previous is acked or otherwise done).
    pub ordering_key: String,
    /// Free-form headers; carries `traceparent` / `tracestate`.
    pub headers: BTreeMap<String, String>,
    /// MIME type of `data`.
    pub content_type: String,
    /// The payload.
    pub data: Bytes,
}

impl Event {
    /// True when the event has an expiry at or before `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// Approximate memory held by the event, for queue byte bounds.
    pub fn approx_size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum();
        std::mem::size_of::<Self>()
            + self.id.len()
            + self.subject.len()
            + self.r#type.len()
            + self.source.len()
            + self.correlation_id.len()
            + self.reply_to.len()
            + self.ordering_key.len()
            + self.content_type.len()
            + headers
            + self.data.len()
    }
}

/// Default bound of `data` (`--eventbus-max-data`).
pub const DEFAULT_MAX_DATA: usize = 1024 * 1024;
/// Most bytes of an id.
pub const MAX_ID_LEN: usize = 128;
/// Most bytes of `type`, `source`, `correlation_id`, `reply_to`, `ordering_key`.
pub const MAX_ATTRIBUTE_LEN: usize = 256;
/// Most bytes of `content_type`.
pub const MAX_CONTENT_TYPE_LEN: usize = 128;
/// Most headers on one event.
pub const MAX_HEADERS: usize = 64;
/// Most bytes of a header name.
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// Most bytes of a header value.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Longest TTL.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

impl Event {
    /// Every violation of the envelope's bounds, fields named under `prefix` (e.g. `event`).
    pub fn violations(&self, prefix: &str, max_data: usize) -> Vec<crate::FieldViolation> {
        use crate::FieldViolation as V;
        let mut out = Vec::new();
        let field = |name: &str| format!("{prefix}.{name}");
        if self.id.len() > MAX_ID_LEN || self.id.chars().any(char::is_control) {
            out.push(V::new(
                field("id"),
                format!("at most {MAX_ID_LEN} bytes without control characters"),
            ));
        }
        if let Err(v) = crate::subject::validate_subject(&field("subject"), &self.subject) {
            out.push(v);
        }
        for (name, value) in [
            ("type", &self.r#type),
            ("source", &self.source),
            ("correlation_id", &self.correlation_id),
            ("ordering_key", &self.ordering_key),
        ] {
            if value.len() > MAX_ATTRIBUTE_LEN {
                out.push(V::new(
                    field(name),
                    format!("is {} bytes; at most {MAX_ATTRIBUTE_LEN}", value.len()),
                ));
            }
        }
        if !self.reply_to.is_empty()
            && let Err(v) = crate::subject::validate_subject(&field("reply_to"), &self.reply_to)
        {
            out.push(v);
        }
        if self.content_type.len() > MAX_CONTENT_TYPE_LEN {
            out.push(V::new(
                field("content_type"),
                format!("at most {MAX_CONTENT_TYPE_LEN} bytes"),
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            out.push(V::new(
                field("headers"),
                format!("{} headers; at most {MAX_HEADERS}", self.headers.len()),
            ));
        }
        for (k, v) in &self.headers {
            if k.is_empty() || k.len() > MAX_HEADER_NAME_LEN || v.len() > MAX_HEADER_VALUE_LEN {
                out.push(V::new(
                    format!("{}[{k:?}]", field("headers")),
                    format!(
                        "names are 1–{MAX_HEADER_NAME_LEN} bytes, values at most {MAX_HEADER_VALUE_LEN}"
                    ),
                ));
                break;
            }
        }
        if self.data.len() > max_data {
            out.push(V::new(
                field("data"),
                format!("is {} bytes; at most {max_data}", self.data.len()),
            ));
        }
        out
    }
}

/// A new ULID (48-bit millisecond time, 80 random bits, Crockford base32): sortable by time,
/// unique without coordination.
pub fn new_ulid(now_ms: u64) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
    let value = (u128::from(now_ms & ((1 << 48) - 1)) << 80) | random;
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (25 - i);
        *slot = ALPHABET[((value >> shift) & 31) as usize];
    }
    out.iter().map(|&b| char::from(b)).collect()
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ulids_are_26_chars_sortable_by_time_and_unique() {
        let a = new_ulid(1_000);
        let b = new_ulid(2_000);
        assert_eq!(a.len(), 26);
        assert!(a < b);
        assert_ne!(new_ulid(5), new_ulid(5));
    }

    #[test]
    fn test_violations_name_each_bad_field() {
        let event = Event {
            subject: "a..b".into(),
            data: Bytes::from(vec![0; 11]),
            r#type: "t".repeat(300),
            ..Event::default()
        };
        let fields: Vec<String> = event
            .violations("event", 10)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["event.subject", "event.type", "event.data"]);
    }
}
