//! OpenAI chat completions as the vendor speaks it: `data:` chunks ending in `data: [DONE]`, the
//! usage chunk of `stream_options.include_usage`, the completion object, the error shape.

use serde_json::{json, Value};

use super::script::Answer;
use super::server::Step;

/// OpenAI's error `type` and `code` for an HTTP status.
pub fn error_kind(status: u16) -> (&'static str, Option<&'static str>) {
    match status {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    }
}

/// `{"error":{"message":…,"type":…,"param":null,"code":…}}`.
pub fn error_body(kind: &str, code: Option<&str>, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn usage(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.input_tokens,
        "completion_tokens": a.output_tokens,
        "total_tokens": a.input_tokens + a.output_tokens,
    })
}

fn tool_calls(a: &Answer, ids: &[String]) -> Vec<Value> {
    a.tool_calls
        .iter()
        .zip(ids)
        .map(|((name, input), id)| {
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}})
        })
        .collect()
}

/// The non-streaming answer: a `chat.completion` object.
pub fn completion(a: &Answer, id: &str, ids: &[String], created: u64) -> Value {
    let mut message = json!({"role": "assistant", "content": a.text, "refusal": null});
    if !a.tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls(a, ids));
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": a.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": a.finish_reason()}],
        "usage": usage(a),
    })
}

/// The streamed answer: a role chunk, content chunks, tool-call chunks (the call's id and name,
/// then its arguments in pieces), a chunk with the finish reason, the usage chunk when asked for,
/// and `[DONE]`.
pub fn stream(
    a: &Answer,
    id: &str,
    ids: &[String],
    created: u64,
    include_usage: bool,
) -> Vec<Step> {
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": a.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        Step::Bytes(format!("data: {c}\n\n").into())
    };
    let mut steps = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )];
    if a.text.is_some() {
        steps.extend(a.text_steps(|piece| chunk(json!({"content": piece}), None)));
    }
    if a.pieces.is_empty() {
        steps.push(Step::Mid);
    }
    for (index, ((name, input), call_id)) in a.tool_calls.iter().zip(ids).enumerate() {
        steps.push(Step::Sleep(a.chunk_delay));
        steps.push(chunk(
            json!({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            None,
        ));
        for piece in super::script::split(&input.to_string(), 3) {
            steps.push(chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                None,
            ));
        }
    }
    steps.push(chunk(json!({}), Some(a.finish_reason())));
    if include_usage {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": a.model,
            "system_fingerprint": null, "choices": [], "usage": usage(a),
        });
        steps.push(Step::Bytes(format!("data: {c}\n\n").into()));
    }
    steps.push(Step::Bytes("data: [DONE]\n\n".into()));
    steps
}
