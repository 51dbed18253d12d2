//! Proto ↔ domain conversion; it knows only the wire types and the domain types.

use std::time::Duration;

use agentmesh_proto::cache::v1 as pb;
use agentmesh_runtime::wire::{duration_from_proto, duration_to_proto};

use crate::cache::{Consistency, Hit, Tier};
use crate::error::{CacheError, FieldViolation};

/// A Get: namespace, key, consistency.
///
/// # Errors
/// `InvalidArgument` for an unknown consistency (the key bounds are checked by the cache).
pub fn decode_get(r: pb::GetRequest) -> Result<(String, String, Consistency), CacheError> {
    let consistency = match pb::Consistency::try_from(r.consistency) {
        Ok(pb::Consistency::Unspecified | pb::Consistency::Default) => Consistency::Default,
        Ok(pb::Consistency::Fresh) => Consistency::Fresh,
        Err(_) => {
            return Err(CacheError::InvalidArgument(vec![FieldViolation::new(
                "consistency",
                format!("unknown consistency {}", r.consistency),
            )]));
        }
    };
    Ok((r.namespace, r.key, consistency))
}

/// A Set's TTL: unset = the default; negative or out of range is refused.
///
/// # Errors
/// `InvalidArgument` naming `ttl`.
pub fn decode_ttl(ttl: Option<&prost_types::Duration>) -> Result<Option<Duration>, CacheError> {
    match ttl {
        None => Ok(None),
        Some(d) => duration_from_proto(d).map(Some).ok_or_else(|| {
            CacheError::InvalidArgument(vec![FieldViolation::new("ttl", "must not be negative")])
        }),
    }
}

/// A Get's answer.
#[must_use]
pub fn encode_get(hit: Option<Hit>) -> pb::GetResponse {
    match hit {
        None => pb::GetResponse::default(),
        Some(h) => pb::GetResponse {
            found: true,
            value: h.value.to_vec(),
            version: h.version,
            tier: match h.tier {
                Tier::L1 => pb::Tier::L1,
                Tier::L2 => pb::Tier::L2,
            } as i32,
            age: Some(duration_to_proto(Duration::from_millis(h.age_ms))),
            ttl_left: Some(duration_to_proto(Duration::from_millis(h.ttl_left_ms))),
        },
    }
}
