//! Time as the service stores it: microseconds since the Unix epoch, UTC. One integer type keeps
//! SQLite and PostgreSQL identical and comparisons trivial.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub type UnixMicros = i64;

/// The last microsecond a protobuf Timestamp can carry: 9999-12-31T23:59:59.999999Z. JSON
/// renderings of a later time (RFC 3339) fail in every protobuf runtime.
pub const MAX_PROTO_MICROS: UnixMicros = 253_402_300_799 * 1_000_000 + 999_999;

pub fn now_micros() -> UnixMicros {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

/// `duration` in microseconds, saturating so that absurd durations cannot overflow.
pub fn duration_micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

pub fn to_proto(micros: UnixMicros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// `None` when the timestamp is out of the range the service can represent.
pub fn from_proto(timestamp: &prost_types::Timestamp) -> Option<UnixMicros> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return None;
    }
    timestamp
        .seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(timestamp.nanos / 1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip() {
        for micros in [0, 1, 1_700_000_000_123_456, -1] {
            assert_eq!(from_proto(&to_proto(micros)), Some(micros));
        }
    }

    #[test]
    fn out_of_range_is_none() {
        let huge = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(from_proto(&huge), None);
        let bad_nanos = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(from_proto(&bad_nanos), None);
    }
}
