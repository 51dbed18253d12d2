//! `Hasher`s for the domain's maps: keys that already are good hashes, and short strings.

use std::hash::Hasher;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// `Hasher` for keys that already are good 64-bit hashes.
#[derive(Debug, Default)]
pub(crate) struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }

    /// Random 128-bit ids (leases, reservations): either half is already a good hash.
    #[allow(clippy::cast_possible_truncation)]
    fn write_u128(&mut self, value: u128) {
        self.0 = (value as u64) ^ ((value >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// `Hasher` built on xxh3 for short strings such as policy names (faster than `SipHash`).
#[derive(Debug, Default)]
pub(crate) struct SeededXxh3(u64);

impl Hasher for SeededXxh3 {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
