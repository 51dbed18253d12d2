//! Proto ↔ domain conversion; it knows only the wire types and the domain types.

use std::time::Duration;

use agentmesh_proto::cache::v1 as pb;
use agentmesh_runtime::wire::{duration_from_proto, duration_to_proto};

use crate::cache::{Consistency, Found, Lease, LeaseAnswer, Notice, ReadOptions, SetOptions, Tier};
use crate::error::{CacheError, FieldViolation};
use crate::semantic::{Partition, SemanticAnswer, SemanticTier};
use crate::sync::What;

/// A read's options (`prefix` before field names, e.g. `items[2].`).
///
/// # Errors
/// `InvalidArgument` for an unknown consistency (the key bounds are checked by the cache).
pub fn decode_read(r: &pb::GetRequest, prefix: &str) -> Result<ReadOptions, CacheError> {
    let consistency = match pb::Consistency::try_from(r.consistency) {
        Ok(pb::Consistency::Unspecified | pb::Consistency::Default) => Consistency::Default,
        Ok(pb::Consistency::Fresh) => Consistency::Fresh,
        Err(_) => {
            return Err(CacheError::InvalidArgument(vec![FieldViolation::new(
                format!("{prefix}consistency"),
                format!("unknown consistency {}", r.consistency),
            )]));
        }
    };
    Ok(ReadOptions {
        consistency,
        allow_stale: r.allow_stale,
    })
}

/// An optional duration: unset = `None`; negative is refused naming `field`.
///
/// # Errors
/// `InvalidArgument` naming `field`.
pub fn decode_duration(
    d: Option<&prost_types::Duration>,
    field: &str,
) -> Result<Option<Duration>, CacheError> {
    match d {
        None => Ok(None),
        Some(d) => duration_from_proto(d).map(Some).ok_or_else(|| {
            CacheError::InvalidArgument(vec![FieldViolation::new(field, "must not be negative")])
        }),
    }
}

/// A write's options (`prefix` before field names).
///
/// # Errors
/// `InvalidArgument` for a negative duration.
pub fn decode_set(r: &pb::SetRequest, prefix: &str) -> Result<SetOptions, CacheError> {
    Ok(SetOptions {
        ttl: decode_duration(r.ttl.as_ref(), &format!("{prefix}ttl"))?,
        grace: decode_duration(r.stale_for.as_ref(), &format!("{prefix}stale_for"))?
            .unwrap_or_default(),
        tags: r.tags.clone(),
        if_version: r.if_version,
    })
}

fn ms_to_proto(ms: u64) -> prost_types::Duration {
    duration_to_proto(Duration::from_millis(ms))
}

/// A read's answer.
#[must_use]
pub fn encode_get(found: Found) -> pb::GetResponse {
    match found {
        Found::Miss => pb::GetResponse::default(),
        Found::Negative(left) => pb::GetResponse {
            negative: true,
            ttl_left: Some(ms_to_proto(left)),
            ..pb::GetResponse::default()
        },
        Found::Hit(h) => pb::GetResponse {
            found: true,
            value: h.value.to_vec(),
            version: h.version,
            tier: match h.tier {
                Tier::L1 => pb::Tier::L1,
                Tier::L2 => pb::Tier::L2,
            } as i32,
            age: Some(ms_to_proto(h.age_ms)),
            ttl_left: Some(ms_to_proto(h.ttl_left_ms)),
            stale: h.stale,
            negative: false,
            tags: h.tags,
        },
    }
}

fn encode_lease(lease: Lease) -> pb::LeaseGrant {
    pb::LeaseGrant {
        token: lease.token,
        ttl: Some(ms_to_proto(lease.ttl_ms)),
    }
}

/// GetOrLease's answer.
#[must_use]
pub fn encode_lease_answer(answer: LeaseAnswer) -> pb::GetOrLeaseResponse {
    use pb::get_or_lease_response::Outcome;
    match answer {
        LeaseAnswer::Hit { hit, refresh } => pb::GetOrLeaseResponse {
            outcome: Outcome::Hit as i32,
            value: Some(encode_get(Found::Hit(hit))),
            lease: refresh.map(encode_lease),
            ttl_left: None,
        },
        LeaseAnswer::Lease(lease) => pb::GetOrLeaseResponse {
            outcome: Outcome::Lease as i32,
            lease: Some(encode_lease(lease)),
            ..pb::GetOrLeaseResponse::default()
        },
        LeaseAnswer::Pending { lease_left_ms } => pb::GetOrLeaseResponse {
            outcome: Outcome::Pending as i32,
            ttl_left: Some(ms_to_proto(lease_left_ms)),
            ..pb::GetOrLeaseResponse::default()
        },
        LeaseAnswer::Negative(left) => pb::GetOrLeaseResponse {
            outcome: Outcome::Negative as i32,
            ttl_left: Some(ms_to_proto(left)),
            ..pb::GetOrLeaseResponse::default()
        },
    }
}

/// A notice for a watcher.
#[must_use]
pub fn encode_notice(notice: &Notice) -> pb::Invalidation {
    use pb::invalidation::Kind;
    match notice {
        Notice::Flush { seq, reason } => pb::Invalidation {
            kind: Kind::Flush as i32,
            seq: *seq,
            reason: reason.clone(),
            ..pb::Invalidation::default()
        },
        Notice::Change(c) => {
            let mut out = pb::Invalidation {
                seq: c.seq,
                namespace: c.namespace.clone(),
                ..pb::Invalidation::default()
            };
            match &c.what {
                What::Written { key, version } => {
                    out.kind = Kind::Written as i32;
                    out.key.clone_from(key);
                    out.version = *version;
                }
                What::Deleted { key } => {
                    out.kind = Kind::Deleted as i32;
                    out.key.clone_from(key);
                }
                What::LeaseEnded { key } => {
                    out.kind = Kind::LeaseEnded as i32;
                    out.key.clone_from(key);
                }
                What::Tags(tags) => {
                    out.kind = Kind::Tags as i32;
                    out.tags = tags.iter().map(|(t, _)| t.clone()).collect();
                }
                What::Namespace { .. } => out.kind = Kind::Namespace as i32,
            }
            out
        }
    }
}

/// A partition (unset = every field empty).
#[must_use]
pub fn decode_partition(p: Option<&pb::Partition>) -> Partition {
    p.map(|p| Partition {
        model: p.model.clone(),
        parameters: p.parameters.clone(),
        system_prompt_hash: p.system_prompt_hash.clone(),
    })
    .unwrap_or_default()
}

/// A semantic lookup's answer.
#[must_use]
pub fn encode_semantic(answer: SemanticAnswer, embedder: &str) -> pb::SemanticGetResponse {
    let refused = answer
        .refused
        .into_iter()
        .map(|r| pb::GuardRefusal {
            prompt: r.prompt,
            similarity: r.similarity,
            reason: r.reason.to_string(),
        })
        .collect();
    let mut out = pb::SemanticGetResponse {
        refused,
        best_similarity: answer.best_similarity,
        embedder: embedder.to_owned(),
        ..pb::SemanticGetResponse::default()
    };
    if let Some(hit) = answer.hit {
        out.found = true;
        out.answer = hit.answer.to_vec();
        out.tier = match hit.tier {
            SemanticTier::Exact => pb::SemanticTier::Exact,
            SemanticTier::Normalized => pb::SemanticTier::Normalized,
            SemanticTier::Semantic => pb::SemanticTier::Semantic,
        } as i32;
        out.similarity = hit.similarity;
        out.matched_prompt = hit.matched_prompt;
        out.version = hit.version;
        out.age = Some(ms_to_proto(hit.age_ms));
    }
    out
}
