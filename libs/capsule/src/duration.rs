//! Durations written as `500ms`, `10s`, `5m`, `1h` or combined (`1m30s`).

use std::time::Duration;

/// The longest duration a capsule may ask for.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses a positive duration of at most 24 hours.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration \"{s}\": expected e.g. 500ms, 10s, 5m, 1h or 1m30s");
    if s.is_empty() {
        return Err(bad());
    }
    let b = s.as_bytes();
    let mut total_ms: u64 = 0;
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let n: u64 = s[start..i].parse().map_err(|_| bad())?;
        let unit_start = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let factor = match &s[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        total_ms = n
            .checked_mul(factor)
            .and_then(|v| v.checked_add(total_ms))
            .ok_or_else(|| format!("duration \"{s}\" is longer than 24h"))?;
    }
    let d = Duration::from_millis(total_ms);
    if d.is_zero() {
        return Err(format!("duration \"{s}\" must be positive"));
    }
    if d > MAX_DURATION {
        return Err(format!("duration \"{s}\" is longer than 24h"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("500ms", Some(500)),
            ("10s", Some(10_000)),
            ("5m", Some(300_000)),
            ("1h", Some(3_600_000)),
            ("1m30s", Some(90_000)),
            ("24h", Some(86_400_000)),
            ("25h", None),
            ("0s", None),
            ("10", None),
            ("s", None),
            ("10 s", None),
            ("1d", None),
            ("-1s", None),
            ("", None),
            ("99999999999999999999h", None),
        ];
        for (input, want) in cases {
            let got = parse_duration(input).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, *want, "{input}");
        }
    }
}
