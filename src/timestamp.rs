//! Time as the service stores it: microseconds since the Unix epoch, UTC. One integer type keeps
//! SQLite and PostgreSQL identical and comparisons trivial.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub type UnixMicros = i64;

/// How far tests have moved the clock forward (`advance_clock_for_tests`), in microseconds;
/// zero in the service, which never calls it.
static TEST_CLOCK_OFFSET: AtomicI64 = AtomicI64::new(0);

/// Now, as the service decides with it: expiries, rotation caps, listing filters, the expiry
/// sweep, retention. (Caches and lockouts time their lifetimes with `Instant`s instead.)
pub fn now_micros() -> UnixMicros {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let wall = i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX);
    wall.saturating_add(TEST_CLOCK_OFFSET.load(Ordering::Relaxed))
}

/// Moves `now_micros` forward by `by` for the whole process, so that a test can let keys
/// expire without sleeping (`tests/model.rs`). Only for tests, each in a test binary of its
/// own: every server in the process sees the shifted clock, and nothing undoes it. The service
/// never calls it (no flag, variable or RPC reaches it); reading the offset costs the hot path
/// one relaxed atomic load.
#[doc(hidden)]
pub fn advance_clock_for_tests(by: Duration) {
    TEST_CLOCK_OFFSET.fetch_add(duration_micros(by), Ordering::Relaxed);
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

/// The earliest `google.protobuf.Timestamp` there is: 0001-01-01T00:00:00Z, in seconds.
const MIN_PROTO_SECONDS: i64 = -62_135_596_800;
/// The latest `google.protobuf.Timestamp` there is: 9999-12-31T23:59:59Z, in seconds.
const MAX_PROTO_SECONDS: i64 = 253_402_300_799;
/// The latest time a Timestamp can carry, in microseconds: 9999-12-31T23:59:59.999999Z. A time
/// after it cannot be answered in a Timestamp that other languages' libraries accept.
pub const MAX_PROTO_MICROS: UnixMicros = MAX_PROTO_SECONDS * 1_000_000 + 999_999;

/// `None` when the timestamp is outside the range protobuf defines (years 1 to 9999) or its
/// nanos are not 0 to 999,999,999.
pub fn from_proto(timestamp: &prost_types::Timestamp) -> Option<UnixMicros> {
    if !(0..1_000_000_000).contains(&timestamp.nanos)
        || !(MIN_PROTO_SECONDS..=MAX_PROTO_SECONDS).contains(&timestamp.seconds)
    {
        return None;
    }
    timestamp
        .seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(timestamp.nanos / 1_000))
}

/// A time as RFC 3339 text (`2026-11-24T01:30:00.123456Z`).
pub fn rfc3339(micros: UnixMicros) -> String {
    to_proto(micros).to_string()
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
        for (seconds, nanos) in [
            (i64::MIN, 0),
            (MIN_PROTO_SECONDS - 1, 999_999_999),
            (MAX_PROTO_SECONDS + 1, 0),
            (0, 1_000_000_000),
            (0, i32::MIN),
        ] {
            assert_eq!(from_proto(&prost_types::Timestamp { seconds, nanos }), None);
        }
    }

    #[test]
    fn protobuf_range_ends_are_accepted() {
        let last = prost_types::Timestamp {
            seconds: MAX_PROTO_SECONDS,
            nanos: 999_999_999,
        };
        assert_eq!(from_proto(&last), Some(MAX_PROTO_MICROS));
        assert_eq!(to_proto(MAX_PROTO_MICROS).seconds, MAX_PROTO_SECONDS);
        let first = prost_types::Timestamp {
            seconds: MIN_PROTO_SECONDS,
            nanos: 0,
        };
        assert_eq!(from_proto(&first), Some(MIN_PROTO_SECONDS * 1_000_000));
    }
}
