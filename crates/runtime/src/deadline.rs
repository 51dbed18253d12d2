//! The caller's deadline, read from the `grpc-timeout` request header, so handlers can give
//! internal calls a budget that never outlives it.

use std::time::{Duration, Instant};

/// The deadline carried by `grpc-timeout` in `metadata`, counted from `now`.
#[must_use]
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap, now: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value).map(|timeout| now + timeout)
}

/// Parses a gRPC timeout (`TimeoutValue TimeoutUnit`: up to 8 digits and one of H M S m u n).
#[must_use]
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The time left before `deadline`, capped at `budget`: what an internal call may take.
#[must_use]
pub fn budget(deadline: Option<Instant>, budget: Duration, now: Instant) -> Duration {
    deadline.map_or(budget, |d| d.saturating_duration_since(now).min(budget))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_grpc_timeouts_parse_every_unit_and_reject_garbage() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100n"), Some(Duration::from_nanos(100)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn test_budget_never_exceeds_the_deadline() {
        let now = Instant::now();
        let five = Duration::from_millis(5);
        assert_eq!(budget(None, five, now), five);
        assert_eq!(
            budget(Some(now + Duration::from_millis(2)), five, now),
            Duration::from_millis(2)
        );
        assert_eq!(budget(Some(now), five, now), Duration::ZERO);
    }
}
