//! Anthropic Messages: the request (`POST {base}/v1/messages`, `x-api-key`,
//! `anthropic-version: 2023-06-01`, `stream: true`) and its SSE events.

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::sse::SseEvent;
use super::{ChatRequest, Read, Reading};

pub const VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is sent when the step sets none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

pub fn body(model: &str, req: &ChatRequest) -> Value {
    let mut b = json!({
        "model": model,
        "max_tokens": req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": req.messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>(),
        "stream": true,
    });
    if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
        b["system"] = json!(s);
    }
    if let Some(t) = req.temperature {
        b["temperature"] = json!(t);
    }
    b
}

pub fn headers(key: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("anthropic-version", HeaderValue::from_static(VERSION));
    if let Some(mut v) = key.and_then(|k| HeaderValue::from_str(k).ok()) {
        v.set_sensitive(true);
        h.insert("x-api-key", v);
    }
    h
}

fn tokens(usage: &Value, field: &str) -> Option<u64> {
    usage.get(field).and_then(Value::as_u64)
}

/// Reads one event: `message_start` (model, input usage), `content_block_delta` (`text_delta`;
/// tool input and thinking deltas are not text), `message_delta` (stop reason, output usage),
/// `message_stop`, `error`; `ping` and block starts and stops carry nothing for a text step.
pub fn read(ev: &SseEvent, r: &mut Reading) -> Result<Read, String> {
    let v: Value = serde_json::from_str(&ev.data)
        .map_err(|e| format!("an event's data is not JSON ({e}): {:.200}", ev.data))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .or(ev.event.as_deref())
        .unwrap_or("");
    match kind {
        "message_start" => {
            let m = &v["message"];
            if let Some(model) = m.get("model").and_then(Value::as_str) {
                r.model = Some(model.to_string());
            }
            let u = &m["usage"];
            if let Some(input) = tokens(u, "input_tokens") {
                r.input_tokens = Some(
                    input
                        + tokens(u, "cache_creation_input_tokens").unwrap_or(0)
                        + tokens(u, "cache_read_input_tokens").unwrap_or(0),
                );
            }
            if let Some(out) = tokens(u, "output_tokens") {
                r.output_tokens = Some(out);
            }
            Ok(Read::Nothing)
        }
        "content_block_delta" => {
            let d = &v["delta"];
            match (
                d.get("type").and_then(Value::as_str),
                d.get("text").and_then(Value::as_str),
            ) {
                (Some("text_delta"), Some(t)) if !t.is_empty() => Ok(Read::Text(t.to_string())),
                _ => Ok(Read::Nothing),
            }
        }
        "message_delta" => {
            if let Some(s) = v["delta"].get("stop_reason").and_then(Value::as_str) {
                r.stop_reason = Some(s.to_string());
            }
            let u = &v["usage"];
            if let Some(out) = tokens(u, "output_tokens") {
                r.output_tokens = Some(out);
            }
            // Newer API versions repeat the input usage here, cache included.
            if let Some(input) = tokens(u, "input_tokens") {
                r.input_tokens = Some(
                    input
                        + tokens(u, "cache_creation_input_tokens").unwrap_or(0)
                        + tokens(u, "cache_read_input_tokens").unwrap_or(0),
                );
            }
            Ok(Read::Nothing)
        }
        "message_stop" => Ok(Read::Done),
        "error" => {
            let e = &v["error"];
            Ok(Read::Error {
                kind: e
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_string(),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string(),
            })
        }
        _ => Ok(Read::Nothing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Message, MessageRole};

    /// A stream as the Messages API documents it.
    const STREAM: &str = "event: message_start
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":3,\"cache_read_input_tokens\":2,\"output_tokens\":1}}}

event: content_block_start
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}

event: ping
data: {\"type\": \"ping\"}

event: content_block_delta
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}

event: content_block_delta
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}

event: content_block_stop
data: {\"type\":\"content_block_stop\",\"index\":0}

event: message_delta
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}

event: message_stop
data: {\"type\":\"message_stop\"}

";

    fn run(stream: &str) -> (Vec<Read>, Reading) {
        crate::llm::read_stream(stream, read)
    }

    #[test]
    fn a_documented_stream_reads() {
        let (reads, r) = run(STREAM);
        assert_eq!(
            reads,
            vec![
                Read::Text("Hello".into()),
                Read::Text("!".into()),
                Read::Done
            ]
        );
        assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(r.input_tokens, Some(30), "cache tokens count as input");
        assert_eq!(r.output_tokens, Some(15));
        assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
    }

    #[test]
    fn an_error_event_reads() {
        let (reads, _) = run("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        assert_eq!(
            reads,
            vec![Read::Error {
                kind: "overloaded_error".into(),
                message: "Overloaded".into()
            }]
        );
        let mut r = Reading::default();
        let bad = SseEvent {
            event: Some("message_start".into()),
            data: "{not json".into(),
        };
        assert!(read(&bad, &mut r).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn the_body_is_a_streamed_messages_request() {
        let req = ChatRequest {
            system: Some("You are the requirements gatherer.".into()),
            messages: vec![Message::user("hi")],
            temperature: Some(0.5),
            ..ChatRequest::for_role("gatherer")
        };
        let b = body("claude-x", &req);
        assert_eq!(b["model"], "claude-x");
        assert_eq!(b["stream"], true);
        assert_eq!(b["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(b["system"], "You are the requirements gatherer.");
        assert_eq!(b["messages"][0]["role"], MessageRole::User.as_str());
        assert_eq!(b["temperature"], 0.5);
        let h = headers(Some("sk-ant-1"));
        assert_eq!(h["x-api-key"], "sk-ant-1");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["anthropic-version"], VERSION);
        assert!(!headers(None).contains_key("x-api-key"));
    }
}
