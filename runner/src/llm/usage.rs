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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_snake_case_event_data() {
        let u = StepUsage {
            provider: "anthropic".into(),
            model: "claude-sonnet-4-5-20250929".into(),
            requested_model: "claude-sonnet-4-5".into(),
            input_tokens: 1200,
            output_tokens: 340,
            latency_ms: 2100,
            first_token_ms: Some(450),
            cost_usd: Some(0.0087),
            attempts: 1,
            stop_reason: Some("end_turn".into()),
            started_at: "2026-12-04T23:30:00.000Z".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&u).unwrap();
        assert_eq!(v["input_tokens"], 1200);
        assert_eq!(v["first_token_ms"], 450);
        assert_eq!(v["cost_usd"], 0.0087);
        assert_eq!(v["timing"]["first_token_us"], json!(null));
        assert!(
            v.get("usage_estimated").is_none(),
            "left out unless estimated"
        );
        let back: StepUsage = serde_json::from_value(v).unwrap();
        assert_eq!(back, u);
        let estimated = StepUsage {
            usage_estimated: true,
            ..u
        };
        assert_eq!(
            serde_json::to_value(&estimated).unwrap()["usage_estimated"],
            true
        );
    }
}
