//! A stored value: its bytes (zstd-compressed at and above [`COMPRESS_FROM`]), version, write
//! sequence, the generations it was written under, its times, and the encoding both tiers keep
//! it in.
//!
//! Encoding (little-endian):
//!
//! ```text
//! version u64 | seq u64 | namespace generation u64 | tag count u16
//! | per tag: generation u64, length u16, bytes
//! | written wall ms u64 | expires wall ms u64 | grace ms u32 | compute ms u32 | flags u8
//! | value bytes
//! ```
//!
//! Everything before "written" is stamped by L2 when it stores the entry (in Redis, inside the
//! write's Lua script, so the version, the sequence and the generations are read and written
//! in one step); everything from "written" on (the *body*) is made once, by the writer, so a
//! value is compressed once. Flags: bit 0 compressed, bit 1 negative (a remembered miss).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::config::COMPRESS_FROM;

/// Bytes of the body before the value.
pub const BODY_HEADER: usize = 8 + 8 + 4 + 4 + 1;
/// Offset of `compute ms` in the body (the lease fill stamps it in L2).
pub const BODY_COMPUTE_AT: usize = 20;
const COMPRESSED: u8 = 1;
const NEGATIVE: u8 = 2;

/// A value with its metadata, as both tiers hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Increases by one on every write of the key (1 for the first after it was absent).
    pub version: u64,
    /// The cluster-wide write sequence number of the write that stored it.
    pub seq: u64,
    /// The namespace's generation when it was written.
    pub ns_gen: u64,
    /// Its tags, each with the tag's generation when it was written.
    pub tags: Vec<(String, u64)>,
    /// Wall ms of the write.
    pub written_ms: u64,
    /// Wall ms it expires (then it is stale for `grace_ms` more, and gone after).
    pub expires_ms: u64,
    /// How long after `expires_ms` it may still be served as stale.
    pub grace_ms: u32,
    /// How long the value took to compute (from the lease to its fill; 0 when unknown).
    pub compute_ms: u32,
    /// Whether `data` is zstd-compressed.
    pub compressed: bool,
    /// A remembered miss (no value; see `AbandonLease`).
    pub negative: bool,
    /// The value as stored.
    pub data: Bytes,
}

/// What a writer makes of a value: everything but the parts L2 stamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Wall ms of the write.
    pub written_ms: u64,
    /// Wall ms it expires.
    pub expires_ms: u64,
    /// Stale window after expiry, ms.
    pub grace_ms: u32,
    /// Compute time, ms.
    pub compute_ms: u32,
    /// Compressed data.
    pub compressed: bool,
    /// A remembered miss.
    pub negative: bool,
    /// The value as stored.
    pub data: Bytes,
}

impl Body {
    /// A body for `value`, compressed when that pays (at least [`COMPRESS_FROM`] bytes and
    /// smaller once compressed).
    #[must_use]
    pub fn new(value: &[u8], written_ms: u64, expires_ms: u64, grace_ms: u32) -> Self {
        let (compressed, data) = if value.len() >= COMPRESS_FROM
            && let Ok(packed) = zstd::bulk::compress(value, 3)
            && packed.len() < value.len()
        {
            (true, Bytes::from(packed))
        } else {
            (false, Bytes::copy_from_slice(value))
        };
        Self {
            written_ms,
            expires_ms,
            grace_ms,
            compute_ms: 0,
            compressed,
            negative: false,
            data,
        }
    }

    /// A remembered miss.
    #[must_use]
    pub fn negative(written_ms: u64, expires_ms: u64) -> Self {
        Self {
            written_ms,
            expires_ms,
            grace_ms: 0,
            compute_ms: 0,
            compressed: false,
            negative: true,
            data: Bytes::new(),
        }
    }

    /// The body's stored form.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(BODY_HEADER + self.data.len());
        out.put_u64_le(self.written_ms);
        out.put_u64_le(self.expires_ms);
        out.put_u32_le(self.grace_ms);
        out.put_u32_le(self.compute_ms);
        out.put_u8(
            if self.compressed { COMPRESSED } else { 0 } | if self.negative { NEGATIVE } else { 0 },
        );
        out.put_slice(&self.data);
        out.freeze()
    }

    /// The entry once L2 has stamped it.
    #[must_use]
    pub fn stamped(self, version: u64, seq: u64, ns_gen: u64, tags: Vec<(String, u64)>) -> Entry {
        Entry {
            version,
            seq,
            ns_gen,
            tags,
            written_ms: self.written_ms,
            expires_ms: self.expires_ms,
            grace_ms: self.grace_ms,
            compute_ms: self.compute_ms,
            compressed: self.compressed,
            negative: self.negative,
            data: self.data,
        }
    }
}

impl Entry {
    /// The value, decompressed.
    ///
    /// # Errors
    /// When compressed data is corrupt.
    pub fn value(&self) -> Result<Bytes, String> {
        if !self.compressed {
            return Ok(self.data.clone());
        }
        zstd::stream::decode_all(&self.data[..])
            .map(Bytes::from)
            .map_err(|e| format!("corrupt compressed value: {e}"))
    }

    /// Bytes it occupies (for the L1 byte budget).
    #[must_use]
    pub fn weight(&self) -> usize {
        26 + BODY_HEADER
            + self.data.len()
            + self.tags.iter().map(|(t, _)| 10 + t.len()).sum::<usize>()
    }

    /// Whether it may be served at `now_ms` (fresh), as stale, or not at all.
    #[must_use]
    pub fn freshness(&self, now_ms: u64) -> Freshness {
        if now_ms < self.expires_ms {
            Freshness::Fresh
        } else if now_ms < self.expires_ms.saturating_add(u64::from(self.grace_ms)) {
            Freshness::Stale
        } else {
            Freshness::Gone
        }
    }

    /// The stored form.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.weight());
        out.put_u64_le(self.version);
        out.put_u64_le(self.seq);
        out.put_u64_le(self.ns_gen);
        out.put_u16_le(u16::try_from(self.tags.len()).unwrap_or(u16::MAX));
        for (tag, generation) in &self.tags {
            out.put_u64_le(*generation);
            out.put_u16_le(u16::try_from(tag.len()).unwrap_or(u16::MAX));
            out.put_slice(tag.as_bytes());
        }
        out.put_u64_le(self.written_ms);
        out.put_u64_le(self.expires_ms);
        out.put_u32_le(self.grace_ms);
        out.put_u32_le(self.compute_ms);
        out.put_u8(
            if self.compressed { COMPRESSED } else { 0 } | if self.negative { NEGATIVE } else { 0 },
        );
        out.put_slice(&self.data);
        out.freeze()
    }

    /// An entry from its stored form; `None` when it is not one.
    #[must_use]
    pub fn decode(mut raw: Bytes) -> Option<Self> {
        if raw.len() < 26 {
            return None;
        }
        let version = raw.get_u64_le();
        let seq = raw.get_u64_le();
        let ns_gen = raw.get_u64_le();
        let n = raw.get_u16_le();
        let mut tags = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            if raw.len() < 10 {
                return None;
            }
            let generation = raw.get_u64_le();
            let len = usize::from(raw.get_u16_le());
            if raw.len() < len {
                return None;
            }
            let tag = String::from_utf8(raw.split_to(len).to_vec()).ok()?;
            tags.push((tag, generation));
        }
        if raw.len() < BODY_HEADER {
            return None;
        }
        let written_ms = raw.get_u64_le();
        let expires_ms = raw.get_u64_le();
        let grace_ms = raw.get_u32_le();
        let compute_ms = raw.get_u32_le();
        let flags = raw.get_u8();
        Some(Self {
            version,
            seq,
            ns_gen,
            tags,
            written_ms,
            expires_ms,
            grace_ms,
            compute_ms,
            compressed: flags & COMPRESSED != 0,
            negative: flags & NEGATIVE != 0,
            data: raw,
        })
    }
}

/// Whether an entry may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Before its expiry.
    Fresh,
    /// Expired, inside its grace window: served only to callers that accept stale values.
    Stale,
    /// Past its grace window.
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_large_values_are_compressed_and_round_trip_through_the_stored_form() {
        let big = "the same words again ".repeat(200);
        let body = Body::new(big.as_bytes(), 10, 20, 5);
        assert!(body.compressed);
        assert!(body.data.len() < big.len() / 4, "{}", body.data.len());
        let e = body.stamped(3, 9, 2, vec![("user:1".into(), 4), ("t".into(), 0)]);
        let back = Entry::decode(e.encode()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.value().unwrap(), big.as_bytes());
        let small = Body::new(b"tiny", 0, 0, 0).stamped(1, 1, 0, vec![]);
        assert!(!small.compressed);
        assert_eq!(
            Entry::decode(small.encode()).unwrap().value().unwrap(),
            &b"tiny"[..]
        );
        assert!(Entry::decode(Bytes::from_static(b"short")).is_none());
    }

    #[test]
    fn test_the_body_is_the_tail_of_the_stored_form() {
        let body = Body::new(b"v", 1, 2, 3);
        let e = body.clone().stamped(1, 2, 3, vec![("a".into(), 1)]);
        assert!(e.encode().ends_with(&body.encode()));
        let neg = Body::negative(1, 2).stamped(1, 1, 0, vec![]);
        assert!(Entry::decode(neg.encode()).unwrap().negative);
    }

    #[test]
    fn test_freshness_has_a_grace_window() {
        let e = Body::new(b"v", 0, 100, 50).stamped(1, 1, 0, vec![]);
        assert_eq!(e.freshness(99), Freshness::Fresh);
        assert_eq!(e.freshness(100), Freshness::Stale);
        assert_eq!(e.freshness(150), Freshness::Gone);
    }
}
