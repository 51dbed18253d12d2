//! Limiter configuration: how many keys the in-memory store may hold and how it is sharded.

use serde::Deserialize;

/// Default bound on stored keys.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// Default number of store shards.
pub const DEFAULT_SHARDS: usize = 64;
/// Most store shards; more buys nothing but memory.
pub const MAX_SHARDS: usize = 4096;

/// Sizing of the limiter's in-memory store.
///
/// Unknown fields are not rejected here so the struct can be flattened into a larger config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LimiterConfig {
    /// Most keys kept (default 1,000,000); each shard holds at most `ceil(max_keys / shards)`.
    pub max_keys: usize,
    /// Number of independently locked shards (default 64), rounded up to a power of two,
    /// between 1 and `MAX_SHARDS`.
    pub shards: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            max_keys: DEFAULT_MAX_KEYS,
            shards: DEFAULT_SHARDS,
        }
    }
}

impl LimiterConfig {
    /// The number of shards actually used: `shards` clamped to `1..=MAX_SHARDS`, rounded up to a
    /// power of two.
    pub fn shard_count(&self) -> usize {
        self.shards.clamp(1, MAX_SHARDS).next_power_of_two()
    }

    /// Keys per shard: `ceil(max_keys / shard_count)`, at least 1. The store's total capacity is
    /// this times `shard_count()`, which rounds `max_keys` up by less than `shard_count()`.
    pub fn shard_capacity(&self) -> usize {
        self.max_keys.max(1).div_ceil(self.shard_count())
    }
}

/// Short service name in membership.
pub const NAME: &str = "ratelimit";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_defaults_are_a_million_keys_in_64_shards() {
        let config = LimiterConfig::default();
        assert_eq!((config.max_keys, config.shards), (1_000_000, 64));
        assert_eq!(config.shard_count(), 64);
        assert_eq!(config.shard_capacity(), 15_625);
    }

    #[test]
    fn test_shards_round_up_to_a_power_of_two_within_bounds() {
        let shards = |shards| {
            LimiterConfig {
                max_keys: 10,
                shards,
            }
            .shard_count()
        };
        assert_eq!(shards(0), 1);
        assert_eq!(shards(3), 4);
        assert_eq!(shards(64), 64);
        assert_eq!(shards(65), 128);
        assert_eq!(shards(usize::MAX), MAX_SHARDS);
        assert_eq!(
            LimiterConfig {
                max_keys: 10,
                shards: 4
            }
            .shard_capacity(),
            3
        );
        assert_eq!(
            LimiterConfig {
                max_keys: 0,
                shards: 4
            }
            .shard_capacity(),
            1
        );
    }

    #[test]
    fn test_deserializes_with_defaults() {
        let config: LimiterConfig = toml::from_str("shards = 8").unwrap();
        assert_eq!(
            config,
            LimiterConfig {
                max_keys: 1_000_000,
                shards: 8
            }
        );
        let config: LimiterConfig = toml::from_str("").unwrap();
        assert_eq!(config, LimiterConfig::default());
    }
}
