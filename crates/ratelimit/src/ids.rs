//! Concurrency lease and budget reservation ids: 128 random bits from a CSPRNG, so no caller
//! can guess (and release or settle) another caller's lease or reservation.

/// A lease or reservation id.
pub type OpaqueId = u128;

/// Characters of an id on the wire: lowercase hex.
pub const ID_HEX_LEN: usize = 32;

/// A new id (`rand`'s thread-local CSPRNG).
#[must_use]
pub fn new_id() -> OpaqueId {
    rand::random()
}

/// The wire form: 32 lowercase hex digits.
#[must_use]
pub fn encode_id(id: OpaqueId) -> String {
    format!("{id:032x}")
}

/// An id in its wire form, if `text` is one.
#[must_use]
pub fn decode_id(text: &str) -> Option<OpaqueId> {
    if text.len() == ID_HEX_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        OpaqueId::from_str_radix(text, 16).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ids_are_random_128_bit_and_round_trip() {
        let ids: Vec<OpaqueId> = (0..1000).map(|_| new_id()).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Consecutive ids share no structure: no small differences between neighbours.
        assert!(ids.windows(2).all(|w| w[0].abs_diff(w[1]) > 1 << 64));
        for id in ids {
            assert_eq!(decode_id(&encode_id(id)), Some(id));
        }
        assert_eq!(decode_id("+0000000000000000000000000000000"), None);
        assert_eq!(decode_id("00000000000000ff"), None);
    }
}
