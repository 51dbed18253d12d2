//! Conversions between std time and the protobuf well-known types, shared by every gRPC
//! adapter and client so each service reads and writes durations and timestamps alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A proto duration; saturates at the largest value proto allows.
#[must_use]
pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A std duration; `None` for negative or malformed proto durations.
#[must_use]
pub fn duration_from_proto(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs, nanos))
}

/// Milliseconds since the Unix epoch; `None` before the epoch or for malformed timestamps.
#[must_use]
pub fn timestamp_to_ms(t: &prost_types::Timestamp) -> Option<u64> {
    let seconds = u64::try_from(t.seconds).ok()?;
    let nanos = u64::try_from(t.nanos).ok()?;
    (nanos < 1_000_000_000).then(|| seconds.saturating_mul(1000) + nanos / 1_000_000)
}

/// A proto timestamp for `ms` since the Unix epoch (clamped to about 35,000 years).
#[must_use]
pub fn timestamp_from_ms(ms: u64) -> prost_types::Timestamp {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    prost_types::Timestamp::from(t.min(SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_durations_and_timestamps_round_trip_and_reject_negatives() {
        let d = Duration::new(3, 500);
        assert_eq!(duration_from_proto(&duration_to_proto(d)), Some(d));
        assert_eq!(duration_to_proto(Duration::MAX).seconds, i64::MAX);
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(duration_from_proto(&negative), None);
        assert_eq!(
            timestamp_to_ms(&timestamp_from_ms(1_234_567)),
            Some(1_234_567)
        );
    }
}
