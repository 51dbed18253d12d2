//! A stored value: its bytes (zstd-compressed at and above [`COMPRESS_FROM`]), version and
//! times, and the encoding both tiers keep it in.
//!
//! Encoding (little-endian): version u64, written wall ms u64, expires wall ms u64, flags u8
//! (bit 0: compressed), then the value bytes. L2 stores exactly these bytes, so a value is
//! compressed once, by the writer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::config::COMPRESS_FROM;

const HEADER: usize = 25;
const COMPRESSED: u8 = 1;

/// A value with its metadata, as both tiers hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Increases by one on every write of the key (1 for the first).
    pub version: u64,
    /// Wall ms of the write.
    pub written_ms: u64,
    /// Wall ms it expires.
    pub expires_ms: u64,
    /// Whether `data` is zstd-compressed.
    pub compressed: bool,
    /// The value as stored.
    pub data: Bytes,
}

impl Entry {
    /// An entry for `value`, compressed when that pays (at least [`COMPRESS_FROM`] bytes and
    /// smaller once compressed).
    #[must_use]
    pub fn new(value: &[u8], version: u64, written_ms: u64, expires_ms: u64) -> Self {
        if value.len() >= COMPRESS_FROM
            && let Ok(packed) = zstd::bulk::compress(value, 3)
            && packed.len() < value.len()
        {
            return Self {
                version,
                written_ms,
                expires_ms,
                compressed: true,
                data: packed.into(),
            };
        }
        Self {
            version,
            written_ms,
            expires_ms,
            compressed: false,
            data: Bytes::copy_from_slice(value),
        }
    }

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
        HEADER + self.data.len()
    }

    /// The stored form.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + self.data.len());
        out.put_u64_le(self.version);
        out.put_u64_le(self.written_ms);
        out.put_u64_le(self.expires_ms);
        out.put_u8(if self.compressed { COMPRESSED } else { 0 });
        out.put_slice(&self.data);
        out.freeze()
    }

    /// An entry from its stored form; `None` when it is not one.
    #[must_use]
    pub fn decode(mut raw: Bytes) -> Option<Self> {
        if raw.len() < HEADER {
            return None;
        }
        let version = raw.get_u64_le();
        let written_ms = raw.get_u64_le();
        let expires_ms = raw.get_u64_le();
        let flags = raw.get_u8();
        Some(Self {
            version,
            written_ms,
            expires_ms,
            compressed: flags & COMPRESSED != 0,
            data: raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_large_values_are_compressed_and_round_trip_through_the_stored_form() {
        let big = "the same words again ".repeat(200);
        let e = Entry::new(big.as_bytes(), 3, 10, 20);
        assert!(e.compressed);
        assert!(e.data.len() < big.len() / 4, "{}", e.data.len());
        let back = Entry::decode(e.encode()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.value().unwrap(), big.as_bytes());
        let small = Entry::new(b"tiny", 1, 0, 0);
        assert!(!small.compressed);
        assert_eq!(
            Entry::decode(small.encode()).unwrap().value().unwrap(),
            &b"tiny"[..]
        );
        assert!(Entry::decode(Bytes::from_static(b"short")).is_none());
    }
}
