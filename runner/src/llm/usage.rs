//! What one LLM call used and how long it took: the data of the step's event.

use serde::{Deserialize, Serialize};

/// Moments of a call in microseconds since it started (`LlmClient::complete` was entered), for
/// latency and for measuring the pipeline's own overhead. Marks of the last attempt; earlier
/// attempts (retries) show as a later `attempt_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timing {
    /// The last attempt started (after any retry waits).
    pub attempt_us: u64,
    /// The request was handed to the HTTP client.
    pub request_us: u64,
    /// The response's status and headers arrived.
    pub headers_us: u64,
    /// The first byte of the body arrived.
    pub first_byte_us: Option<u64>,
    /// The first text delta was delivered to the caller.
    pub first_token_us: Option<u64>,
    /// The last text delta was delivered to the caller.
    pub last_token_us: Option<u64>,
    /// The stream ended (the vendor's final event).
    pub done_us: u64,
}

/// One LLM call: provider, model, tokens, latency and cost. Becomes event data as it is
/// (snake_case JSON).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepUsage {
    pub provider: String,
    /// The model that answered (as the vendor named it), else the requested one.
    pub model: String,
    pub requested_model: String,
    /// Input tokens, cache reads and writes included; over every attempt that reported usage.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The vendor reported no usage, so the tokens are estimated (characters / 4).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_estimated: bool,
    /// From the call's start to the end of the stream, retries included.
    pub latency_ms: u64,
    /// From the call's start to the first text delta.
    pub first_token_ms: Option<u64>,
    /// From the price table; `None` when the model has no price.
    pub cost_usd: Option<f64>,
    /// HTTP requests made (1 without retries).
    pub attempts: u32,
    /// The vendor's stop reason (`end_turn`, `max_tokens`, `stop`, `length`, …).
    pub stop_reason: Option<String>,
    /// When the call started (RFC 3339, UTC).
    pub started_at: String,
    pub timing: Timing,
}
