//! Anthropic Messages as the vendor speaks it: the SSE event sequence, the message object, the
//! error shape.

use serde_json::{json, Value};

use super::script::Answer;
use super::server::Step;

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type":…,"message":…}}`.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn usage(a: &Answer, output_tokens: u64) -> Value {
    json!({
        "input_tokens": a.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    })
}

/// The content blocks of an answer (text first, then tool calls).
fn blocks(a: &Answer, tool_ids: &[String]) -> Vec<Value> {
    let mut out = vec![];
    if a.text.is_some() || a.tool_calls.is_empty() {
        out.push(json!({"type": "text", "text": a.text.clone().unwrap_or_default()}));
    }
    for ((name, input), id) in a.tool_calls.iter().zip(tool_ids) {
        out.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    out
}

/// The non-streaming answer: a `message` object.
pub fn message(a: &Answer, id: &str, tool_ids: &[String]) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": blocks(a, tool_ids),
        "stop_reason": a.stop_reason,
        "stop_sequence": null,
        "usage": usage(a, a.output_tokens),
    })
}

fn event(name: &str, data: Value) -> Step {
    Step::Bytes(format!("event: {name}\ndata: {data}\n\n").into())
}

/// The streamed answer: `message_start`, `ping`, per block `content_block_start`,
/// `content_block_delta`s (`text_delta`, `input_json_delta`) and `content_block_stop`, then
/// `message_delta` (stop reason, usage) and `message_stop`.
pub fn stream(a: &Answer, id: &str, tool_ids: &[String]) -> Vec<Step> {
    let mut steps = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": a.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(a, 1),
            }}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let mut index = 0;
    if a.text.is_some() || a.tool_calls.is_empty() {
        steps.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        steps.extend(a.text_steps(|piece| {
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}),
            )
        }));
        steps.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    if a.pieces.is_empty() {
        steps.push(Step::Mid);
    }
    for ((name, input), tool_id) in a.tool_calls.iter().zip(tool_ids) {
        steps.push(Step::Sleep(a.chunk_delay));
        steps.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                   "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}}),
        ));
        for piece in super::script::split(&input.to_string(), 3) {
            steps.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        steps.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    steps.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": a.stop_reason, "stop_sequence": null},
               "usage": usage(a, a.output_tokens)}),
    ));
    steps.push(event("message_stop", json!({"type": "message_stop"})));
    steps
}
