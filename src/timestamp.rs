//! Conversions between the times services keep and the times they show: Unix
//! microseconds (the store's `BIGINT` columns), `google.protobuf.Timestamp`
//! (the wire) and RFC 3339 text (CloudEvents `ce_time`, receipt statements,
//! exports). One copy, so every service rounds and formats alike.

use pbjson_types::Timestamp;

/// The RFC 3339 form Anumate writes: UTC, always six fractional digits
/// (`2023-11-14T22:13:20.123456Z`), so the text sorts as the time does.
const RFC3339_MICROS: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Why a `Timestamp` has no value in Unix microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampError {
    /// `nanos` is outside `0..1_000_000_000`, which the type forbids.
    Nanos,
    /// The instant is too far from 1970 for an `i64` of microseconds.
    Range,
}

impl std::fmt::Display for TimestampError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Nanos => "nanos must be within 0..1e9",
            Self::Range => "out of range",
        })
    }
}

impl std::error::Error for TimestampError {}

/// The `google.protobuf.Timestamp` of Unix microseconds (how the store keeps
/// times, `anumate_store::now_micros`): the one conversion every service uses.
/// Times before 1970 keep non-negative nanos, as the type requires.
pub fn timestamp_from_micros(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        // rem_euclid is in 0..1_000_000, so the nanos fit an i32.
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// The `Timestamp` of whole Unix seconds (token claims keep `iat`, `nbf` and
/// `exp` in seconds, as JWTs do).
pub fn timestamp_from_secs(secs: i64) -> Timestamp {
    Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// A request's `Timestamp` as Unix microseconds, refusing what the type
/// forbids rather than guessing; sub-microsecond nanos are truncated.
pub fn micros_from_timestamp(t: &Timestamp) -> Result<i64, TimestampError> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(TimestampError::Nanos);
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos) / 1000))
        .ok_or(TimestampError::Range)
}

/// A `Timestamp` as Unix microseconds, clamped at the ends of `i64` instead
/// of failing: for filter bounds, where "before everything" is a fine reading
/// of a far-off time.
pub fn micros_from_timestamp_saturating(t: &Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

/// Unix microseconds as RFC 3339 in UTC with six fractional digits; `None`
/// beyond the years chrono represents.
pub fn rfc3339_from_micros(micros: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_micros(micros).map(|t| t.format(RFC3339_MICROS).to_string())
}

/// A `Timestamp` as RFC 3339 in UTC with six fractional digits (nanos are
/// truncated; negative nanos read as zero); `None` when it names no instant.
pub fn rfc3339_from_timestamp(t: &Timestamp) -> Option<String> {
    let nanos = u32::try_from(t.nanos).unwrap_or(0);
    chrono::DateTime::from_timestamp(t.seconds, nanos).map(|t| t.format(RFC3339_MICROS).to_string())
}

/// RFC 3339 text (any offset, any number of fractional digits) as Unix
/// microseconds; `None` when it does not parse.
pub fn micros_from_rfc3339(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn micros_to_timestamp() {
        let t = timestamp_from_micros(1_700_000_000_123_456);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_000));
        let before = timestamp_from_micros(-1);
        assert_eq!((before.seconds, before.nanos), (-1, 999_999_000));
        let zero = timestamp_from_micros(0);
        assert_eq!((zero.seconds, zero.nanos), (0, 0));
    }

    #[test]
    fn secs_to_timestamp() {
        assert_eq!(timestamp_from_secs(1_700_000_000), ts(1_700_000_000, 0));
        assert_eq!(timestamp_from_secs(-86_400), ts(-86_400, 0));
    }

    #[test]
    fn micros_round_trip_through_timestamp() {
        for micros in [
            0,
            1,
            -1,
            999_999,
            -999_999,
            -1_000_000,
            1_700_000_000_123_456,
            -1_700_000_000_123_456,
            i64::MAX,
            // The earliest whole second in range; i64::MIN itself floors to a
            // second whose microseconds overflow (see below).
            -9_223_372_036_854_000_000,
        ] {
            let t = timestamp_from_micros(micros);
            assert!((0..1_000_000_000).contains(&t.nanos), "{micros}: {t:?}");
            assert_eq!(micros_from_timestamp(&t), Ok(micros), "{micros}");
            assert_eq!(micros_from_timestamp_saturating(&t), micros, "{micros}");
        }
    }

    #[test]
    fn timestamp_to_micros_truncates_and_checks() {
        // Sub-microsecond nanos are dropped, never rounded up.
        assert_eq!(micros_from_timestamp(&ts(1, 999_999_999)), Ok(1_999_999));
        assert_eq!(micros_from_timestamp(&ts(-1, 500)), Ok(-1_000_000));
        assert_eq!(
            micros_from_timestamp(&ts(0, -5)),
            Err(TimestampError::Nanos)
        );
        assert_eq!(
            micros_from_timestamp(&ts(0, 1_000_000_000)),
            Err(TimestampError::Nanos)
        );
        assert_eq!(
            micros_from_timestamp(&ts(i64::MAX / 1_000_000 + 1, 0)),
            Err(TimestampError::Range)
        );
        assert_eq!(
            micros_from_timestamp(&timestamp_from_micros(i64::MIN)),
            Err(TimestampError::Range)
        );
        assert_eq!(
            micros_from_timestamp(&ts(i64::MIN, 0)),
            Err(TimestampError::Range)
        );
        assert_eq!(
            TimestampError::Nanos.to_string(),
            "nanos must be within 0..1e9"
        );
        assert_eq!(TimestampError::Range.to_string(), "out of range");
    }

    #[test]
    fn saturating_clamps() {
        assert_eq!(micros_from_timestamp_saturating(&ts(i64::MAX, 0)), i64::MAX);
        assert_eq!(micros_from_timestamp_saturating(&ts(i64::MIN, 0)), i64::MIN);
        assert_eq!(micros_from_timestamp_saturating(&ts(2, 1_500)), 2_000_001);
    }

    #[test]
    fn micros_to_rfc3339() {
        assert_eq!(
            rfc3339_from_micros(1_700_000_000_123_456).as_deref(),
            Some("2023-11-14T22:13:20.123456Z")
        );
        assert_eq!(
            rfc3339_from_micros(0).as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
        assert_eq!(
            rfc3339_from_micros(-1).as_deref(),
            Some("1969-12-31T23:59:59.999999Z")
        );
        assert_eq!(rfc3339_from_micros(i64::MIN), None);
    }

    #[test]
    fn timestamp_to_rfc3339() {
        assert_eq!(
            rfc3339_from_timestamp(&ts(1_700_000_000, 123_456_789)).as_deref(),
            Some("2023-11-14T22:13:20.123456Z")
        );
        assert_eq!(
            rfc3339_from_timestamp(&ts(-1, 0)).as_deref(),
            Some("1969-12-31T23:59:59.000000Z")
        );
        assert_eq!(
            rfc3339_from_timestamp(&ts(0, -5)).as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
        assert_eq!(rfc3339_from_timestamp(&ts(i64::MAX, 0)), None);
    }

    #[test]
    fn rfc3339_round_trips_and_parses_offsets() {
        for micros in [0, -1, 1_700_000_000_123_456, -1_700_000_000_000_001] {
            let text = rfc3339_from_micros(micros).unwrap_or_default();
            assert_eq!(micros_from_rfc3339(&text), Some(micros), "{text}");
        }
        assert_eq!(
            micros_from_rfc3339("2023-11-15T00:13:20.5+02:00"),
            Some(1_700_000_000_500_000)
        );
        // Nanoseconds beyond the microsecond are truncated.
        assert_eq!(
            micros_from_rfc3339("1970-01-01T00:00:00.000001999Z"),
            Some(1)
        );
    }

    #[test]
    fn rfc3339_rejects_bad_input() {
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "22:13:20Z",
            "2023-13-01T00:00:00Z",
        ] {
            assert_eq!(micros_from_rfc3339(bad), None, "{bad:?}");
        }
    }
}
