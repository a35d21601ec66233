//! Timestamps: RFC 3339 UTC with milliseconds, from epoch milliseconds passed in by the caller.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn rfc3339(ms: i64) -> String {
    from_ms(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_with_millis() {
        assert_eq!(super::rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
    }
}
