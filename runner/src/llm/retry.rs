//! When a failed LLM request is tried again, and after how long: the policy, `Retry-After`
//! (seconds, milliseconds or an HTTP date) and exponential backoff with jitter
//! ([`crate::backoff`]). Pure.

use std::time::{Duration, SystemTime};

use crate::backoff::Backoff;

/// Attempts, waits and timeouts of one LLM call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// HTTP requests per call, the first included (`[llm] max_attempts`).
    pub max_attempts: u32,
    /// The first backoff, doubled after each retry up to `max_backoff`; each wait is drawn
    /// from the upper half of the current step.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured (`[llm] max_retry_wait_secs`); a provider asking for more
    /// fails the call at once rather than hold the job.
    pub max_retry_wait: Duration,
    /// One attempt, from the request to the stream's end (`[llm] request_timeout_secs`). Not retried:
    /// an answer that long would most likely time out again.
    pub request_timeout: Duration,
    /// No byte for this long, before the headers or mid-stream (`[llm] stall_timeout_secs`): the
    /// attempt is abandoned and retried.
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(16),
            max_retry_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff)
    }
}

/// Whether an HTTP status is worth another attempt: 408, 409 (a lock conflict), 425, 429 and
/// every 5xx (Anthropic's 529 overloaded included).
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 425 | 429) || (500..=599).contains(&status)
}

/// The wait a response asks for: `retry-after-ms` (OpenAI), else `retry-after` in seconds
/// (fractions allowed) or as an HTTP date (measured from `now`; a past date is zero).
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    parse_retry_after(header("retry-after")?, now)
}

/// `Retry-After`'s value: seconds, or an HTTP date (RFC 9110: IMF-fixdate, as RFC 2822 reads it).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at =
        SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(at.timestamp_millis()).ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What to do before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Retry(Duration),
    /// The provider asks for a longer wait than the policy allows.
    TooLong {
        asked: Duration,
        cap: Duration,
    },
}

/// The wait before the next attempt: the provider's `Retry-After` when it gave one (and it is
/// not zero), else the next backoff step.
pub fn next_wait(policy: &RetryPolicy, asked: Option<Duration>, backoff: &mut Backoff) -> Wait {
    match asked {
        Some(a) if a > policy.max_retry_wait => Wait::TooLong {
            asked: a,
            cap: policy.max_retry_wait,
        },
        Some(a) if !a.is_zero() => {
            // Keep the backoff moving, so a later retry without Retry-After still waits longer.
            backoff.next_with(0.0);
            Wait::Retry(a)
        }
        _ => Wait::Retry(backoff.next_delay()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_reads_seconds_milliseconds_and_dates() {
        let now = at(1_445_412_470); // Wed, 21 Oct 2015 07:27:50 GMT
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 2.5 ", now),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: no wait"
        );
        for bad in ["", "-1", "soon", "NaN", "inf"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn which_statuses_are_retried() {
        for s in [408, 409, 425, 429, 500, 502, 503, 504, 529] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(!retryable_status(s), "{s}");
        }
    }

    #[test]
    fn waits_follow_retry_after_within_the_cap_else_back_off() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(400),
            max_backoff: Duration::from_millis(1000),
            max_retry_wait: Duration::from_secs(30),
            ..Default::default()
        };
        let mut b = policy.backoff();
        assert_eq!(
            next_wait(&policy, Some(Duration::from_secs(3)), &mut b),
            Wait::Retry(Duration::from_secs(3))
        );
        // The backoff moved on: 800 ms now, drawn from [400, 800).
        let Wait::Retry(d) = next_wait(&policy, None, &mut b) else {
            panic!("a retry")
        };
        assert!(
            d >= Duration::from_millis(400) && d < Duration::from_millis(800),
            "{d:?}"
        );
        let Wait::Retry(d) = next_wait(&policy, Some(Duration::ZERO), &mut b) else {
            panic!("a retry")
        };
        assert!(
            d >= Duration::from_millis(500) && d < Duration::from_millis(1000),
            "capped: {d:?}"
        );
        assert_eq!(
            next_wait(&policy, Some(Duration::from_secs(31)), &mut b),
            Wait::TooLong {
                asked: Duration::from_secs(31),
                cap: Duration::from_secs(30)
            }
        );
    }
}
