//! What can go wrong in an LLM call. Messages name the provider, the HTTP status and the vendor's
//! own message; they never hold an API key (vendor messages are redacted before they get here).

use std::time::Duration;

use super::meter::BudgetExceeded;
use super::retry::retryable_status;
use super::usage::StepUsage;

fn secs(d: &Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

fn kind_of(kind: &Option<String>) -> String {
    kind.as_deref().map(|k| format!(" {k}")).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("no model is assigned to the role {role:?}: set [llm.roles] {role} (or default) in the runner's config, or RUNNER_LLM_MODEL")]
    NoRoute { role: String },
    #[error("no LLM provider named {provider:?} is defined on this runner")]
    UnknownProvider { provider: String },
    #[error("{provider} answered HTTP {status}{}: {message}", kind_of(kind))]
    Status {
        provider: String,
        status: u16,
        /// The vendor's error type (`rate_limit_error`, `invalid_request_error`, …).
        kind: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{provider} reported an error mid-stream ({kind}): {message}")]
    Stream {
        provider: String,
        kind: String,
        message: String,
    },
    #[error("could not reach {provider} at {url}: {message}")]
    Connect {
        provider: String,
        url: String,
        message: String,
    },
    #[error("the connection to {provider} broke mid-answer: {message}")]
    Cut { provider: String, message: String },
    #[error("{provider} sent nothing for {} (the stall timeout)", secs(after))]
    Stalled { provider: String, after: Duration },
    #[error(
        "{provider} did not finish its answer within {} (the request timeout)",
        secs(after)
    )]
    Timeout { provider: String, after: Duration },
    #[error("{provider} sent an answer that cannot be read: {message}")]
    Protocol { provider: String, message: String },
    #[error("{last}; the provider asks to wait {}, longer than the {} the runner waits ([llm] max_retry_wait_secs)", secs(asked), secs(cap))]
    RetryAfterTooLong {
        asked: Duration,
        cap: Duration,
        last: Box<LlmError>,
    },
    #[error("{last} (gave up after {attempts} attempts)")]
    GaveUp { attempts: u32, last: Box<LlmError> },
    #[error("the LLM call was cancelled")]
    Cancelled,
    #[error("could not set up the HTTP client: {0}")]
    Client(String),
    /// The call was refused (`usage` is `None`) or ended over the job's budget (`usage` is the
    /// call's, already counted by the meter).
    #[error("{exceeded}")]
    Budget {
        exceeded: BudgetExceeded,
        usage: Option<Box<StepUsage>>,
    },
}

/// Vendor error types worth another attempt when they arrive mid-stream.
fn retryable_kind(kind: &str) -> bool {
    matches!(
        kind,
        "overloaded_error"
            | "api_error"
            | "rate_limit_error"
            | "server_error"
            | "rate_limit_exceeded"
            | "requests"
            | "timeout"
            | "internal_error"
            | "service_unavailable"
    )
}

impl LlmError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            LlmError::Status { status, .. } => retryable_status(*status),
            LlmError::Stream { kind, .. } => retryable_kind(kind),
            LlmError::Connect { .. } | LlmError::Cut { .. } | LlmError::Stalled { .. } => true,
            _ => false,
        }
    }

    /// The wait the provider asked for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The error of the last attempt, under the wrappers that say how the call ended.
    pub fn last(&self) -> &LlmError {
        match self {
            LlmError::GaveUp { last, .. } | LlmError::RetryAfterTooLong { last, .. } => last.last(),
            e => e,
        }
    }

    /// The HTTP status of the last attempt, when it answered one that was not a success.
    pub fn status(&self) -> Option<u16> {
        match self.last() {
            LlmError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `text` with every occurrence of `key` replaced (vendors sometimes quote the key they were
/// sent, or a part of it, in their error messages).
pub fn redact(text: &str, key: Option<&str>) -> String {
    match key {
        Some(k) if k.len() >= 4 && text.contains(k) => text.replace(k, "[redacted]"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_provider_status_and_vendor_message() {
        let e = LlmError::Status {
            provider: "anthropic".into(),
            status: 429,
            kind: Some("rate_limit_error".into()),
            message: "Number of requests has exceeded your rate limit".into(),
            retry_after: Some(Duration::from_secs(90)),
        };
        assert_eq!(
            e.to_string(),
            "anthropic answered HTTP 429 rate_limit_error: Number of requests has exceeded your rate limit"
        );
        assert!(e.retryable());
        let e = LlmError::RetryAfterTooLong {
            asked: Duration::from_secs(90),
            cap: Duration::from_secs(60),
            last: Box::new(e),
        };
        assert!(e.to_string().ends_with(
            "; the provider asks to wait 90 s, longer than the 60 s the runner waits ([llm] max_retry_wait_secs)"
        ));
        assert_eq!(e.status(), Some(429));
        let e = LlmError::GaveUp {
            attempts: 4,
            last: Box::new(LlmError::Stalled {
                provider: "openai".into(),
                after: Duration::from_millis(1500),
            }),
        };
        assert_eq!(
            e.to_string(),
            "openai sent nothing for 1.5 s (the stall timeout) (gave up after 4 attempts)"
        );
    }

    #[test]
    fn mid_stream_errors_are_retried_by_kind() {
        let stream = |kind: &str| LlmError::Stream {
            provider: "p".into(),
            kind: kind.into(),
            message: "m".into(),
        };
        assert!(stream("overloaded_error").retryable());
        assert!(stream("server_error").retryable());
        assert!(!stream("invalid_request_error").retryable());
        assert!(!LlmError::Timeout {
            provider: "p".into(),
            after: Duration::from_secs(1)
        }
        .retryable());
    }

    #[test]
    fn keys_are_redacted() {
        assert_eq!(
            redact("Incorrect API key provided: sk-abcdef.", Some("sk-abcdef")),
            "Incorrect API key provided: [redacted]."
        );
        assert_eq!(redact("fine", None), "fine");
    }
}
