//! LLM steps' provider layer: one client for the two wire formats that cover the market,
//! Anthropic Messages and OpenAI-compatible chat completions, streaming, with usage, cost,
//! retries and a per-job budget. Every pipeline face (the app builder's gatherer and executives,
//! landing pages, the round table) calls models through [`LlmClient::complete`].
//!
//! ```no_run
//! # async fn step(client: &kiln_runner::llm::LlmClient, meter: &std::sync::Mutex<kiln_runner::llm::Meter>,
//! #               cancel: &kiln_runner::jobs::CancelToken) -> Result<(), kiln_runner::llm::LlmError> {
//! use kiln_runner::llm::{ChatRequest, Message, TextEvent};
//! let req = ChatRequest {
//!     system: Some("You are the requirements gatherer.".into()),
//!     messages: vec![Message::user("I want a todo app")],
//!     ..ChatRequest::for_role("gatherer")
//! };
//! let done = client
//!     .complete(&req, meter, cancel, |ev| match ev {
//!         TextEvent::Delta(t) => print!("{t}"),          // as the tokens arrive
//!         TextEvent::Restart { .. } => println!("\n[retrying]"), // drop what was shown
//!     })
//!     .await?;
//! println!("{} ({} tokens in, {} out)", done.text, done.usage.input_tokens, done.usage.output_tokens);
//! # Ok(()) }
//! ```
//!
//! - **Routing**: a request names its step's role (`gatherer`, `ceo`, …); `[llm.roles]` maps it
//!   to `provider/model`, falling back to `default` ([`config`]).
//! - **Streaming**: text deltas reach the callback as their bytes arrive ([`sse`] parses
//!   incrementally); the [`Completion`] holds the whole text and the [`StepUsage`].
//! - **Retries**: 408/409/425/429/5xx/529, connection errors, a broken stream, a stall and a
//!   vendor's retryable mid-stream error (`overloaded_error`, `server_error`, …) are tried again,
//!   up to `max_attempts`, after the provider's `Retry-After` (capped by `max_retry_wait`; a
//!   longer one fails the call at once) or exponential backoff with jitter ([`retry`]). Other
//!   4xx and the request timeout are not retried. **A retry after a partial stream restarts the
//!   step's text**: the callback gets [`TextEvent::Restart`] and must drop the deltas it had;
//!   the completion holds only the last attempt's text.
//! - **Cancellation**: the job's [`CancelToken`] aborts the request (the connection is dropped)
//!   and any wait at once; the call returns [`LlmError::Cancelled`].
//! - **Accounting**: the job's [`Meter`] refuses a call that would start over its budget and
//!   counts every call's usage (failed attempts' reported usage included); a call that ends over
//!   the budget returns [`LlmError::Budget`] with its usage, and the job then ends `failed` with
//!   that reason.
//! - **Keys** stay in the runner's environment; they are sent the vendor's way (`x-api-key` or
//!   `Authorization: Bearer`, marked sensitive), redacted from vendor messages, and never shown
//!   by `Debug` or an error.

pub mod anthropic;
mod client;
pub mod config;
pub mod error;
pub mod meter;
pub mod openai;
pub mod retry;
pub mod sse;
pub mod usage;

pub use client::LlmClient;
pub use config::{Api, ApiKey, LlmConfig, LlmConfigError, LlmFile, ModelRef, Provider};
pub use error::LlmError;
pub use meter::{Budget, BudgetExceeded, Meter, Price, Prices, Totals};
pub use retry::RetryPolicy;
pub use usage::{StepUsage, Timing};

pub use crate::jobs::CancelToken;

/// Who said a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRole {
    User,
    Assistant,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: MessageRole,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: MessageRole::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: MessageRole::Assistant,
            content: content.into(),
        }
    }
}

/// One model call of a step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// The step's role (`gatherer`, `ceo`, …): picks provider and model from `[llm.roles]`.
    pub role: String,
    /// A provider and model for this call instead of the role's.
    pub model: Option<ModelRef>,
    pub system: Option<String>,
    pub messages: Vec<Message>,
    /// Anthropic requires one (4096 when unset); OpenAI-compatible servers get it only when set.
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

impl ChatRequest {
    pub fn for_role(role: impl Into<String>) -> ChatRequest {
        ChatRequest {
            role: role.into(),
            ..Default::default()
        }
    }
}

/// What the callback of [`LlmClient::complete`] is told while a call streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEvent<'a> {
    /// The next piece of text, as it arrived.
    Delta(&'a str),
    /// The stream broke after some text and the call is being tried again from the start:
    /// drop every delta delivered so far. `attempt` is the attempt about to start (2, 3…).
    Restart { attempt: u32, reason: &'a str },
}

/// A finished call.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The whole answer (the last attempt's deltas, concatenated).
    pub text: String,
    pub usage: StepUsage,
}

/// What a stream said so far, beside its text (one attempt).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub stop_reason: Option<String>,
}

/// One SSE event, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    Nothing,
    Text(String),
    /// The vendor's final event (`message_stop`, `data: [DONE]`).
    Done,
    /// The vendor's error event in the stream.
    Error {
        kind: String,
        message: String,
    },
}

/// Feeds a whole stream to a format's reader: what each event read as (`Nothing`s left out)
/// and the reading.
#[cfg(test)]
pub(crate) fn read_stream(
    stream: &str,
    read: fn(&sse::SseEvent, &mut Reading) -> Result<Read, String>,
) -> (Vec<Read>, Reading) {
    let mut p = sse::SseParser::new();
    let mut r = Reading::default();
    let mut out = vec![];
    p.feed(stream.as_bytes(), |ev| out.push(read(&ev, &mut r).unwrap()));
    out.retain(|x| !matches!(x, Read::Nothing));
    (out, r)
}
