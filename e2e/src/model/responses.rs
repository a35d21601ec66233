//! OpenAI Responses as the vendor speaks it (what Codex CLI uses): `response.created`, per output
//! item `response.output_item.added`, text or function-call argument deltas and their `done`
//! events, `response.output_item.done`, then `response.completed` with the usage. Errors use
//! OpenAI's shape (see [`super::openai`]).

use serde_json::{json, Value};

use super::script::Answer;
use super::server::Step;

fn usage(a: &Answer) -> Value {
    json!({
        "input_tokens": a.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": a.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": a.input_tokens + a.output_tokens,
    })
}

fn response(
    a: &Answer,
    id: &str,
    created: u64,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created, "status": status, "model": a.model,
        "output": output, "usage": usage, "error": null, "incomplete_details": null,
    })
}

fn text_item(text: &str, id: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    } else {
        json!([])
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

fn call_item(name: &str, arguments: &str, call_id: &str, status: &str) -> Value {
    json!({"id": format!("fc_{call_id}"), "type": "function_call", "status": status, "call_id": call_id,
           "name": name, "arguments": arguments})
}

/// The output items of an answer, completed.
fn output(a: &Answer, id: &str, call_ids: &[String]) -> Vec<Value> {
    let mut items = vec![];
    if let Some(t) = &a.text {
        items.push(text_item(t, &format!("msg_{id}"), "completed"));
    }
    for ((name, input), call_id) in a.tool_calls.iter().zip(call_ids) {
        items.push(call_item(name, &input.to_string(), call_id, "completed"));
    }
    items
}

/// The non-streaming answer: a `response` object.
pub fn response_object(a: &Answer, id: &str, call_ids: &[String], created: u64) -> Value {
    response(
        a,
        id,
        created,
        "completed",
        output(a, id, call_ids),
        usage(a),
    )
}

/// The `response.failed` event that ends a stream with an error.
pub fn failed_event(id: &str, model: &str, code: &str, message: &str) -> String {
    let data = json!({"type": "response.failed", "response": {
        "id": id, "object": "response", "status": "failed", "model": model, "output": [],
        "error": {"code": code, "message": message}, "usage": null,
    }});
    format!("event: response.failed\ndata: {data}\n\n")
}

/// The streamed answer.
pub fn stream(a: &Answer, id: &str, call_ids: &[String], created: u64) -> Vec<Step> {
    let mut seq = 0u64;
    let mut event = |name: &str, mut data: Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq);
        seq += 1;
        Step::Bytes(format!("event: {name}\ndata: {data}\n\n").into())
    };
    let in_progress = response(a, id, created, "in_progress", vec![], Value::Null);
    let mut steps = vec![
        event("response.created", json!({"response": in_progress})),
        event("response.in_progress", json!({"response": in_progress})),
    ];
    let mut index = 0;
    if let Some(text) = &a.text {
        let item_id = format!("msg_{id}");
        let at = |extra: Value| {
            let mut v = json!({"item_id": item_id, "output_index": index, "content_index": 0});
            for (k, x) in extra.as_object().expect("an object") {
                v[k] = x.clone();
            }
            v
        };
        steps.push(event(
            "response.output_item.added",
            json!({"output_index": index, "item": text_item("", &item_id, "in_progress")}),
        ));
        steps.push(event(
            "response.content_part.added",
            at(json!({"part": {"type": "output_text", "text": "", "annotations": []}})),
        ));
        steps.extend(
            a.text_steps(|piece| event("response.output_text.delta", at(json!({"delta": piece})))),
        );
        steps.push(event(
            "response.output_text.done",
            at(json!({"text": text})),
        ));
        steps.push(event(
            "response.content_part.done",
            at(json!({"part": {"type": "output_text", "text": text, "annotations": []}})),
        ));
        steps.push(event(
            "response.output_item.done",
            json!({"output_index": index, "item": text_item(text, &item_id, "completed")}),
        ));
        index += 1;
    }
    if a.pieces.is_empty() {
        steps.push(Step::Mid);
    }
    for ((name, input), call_id) in a.tool_calls.iter().zip(call_ids) {
        let arguments = input.to_string();
        let item_id = format!("fc_{call_id}");
        steps.push(Step::Sleep(a.chunk_delay));
        steps.push(event(
            "response.output_item.added",
            json!({"output_index": index, "item": call_item(name, "", call_id, "in_progress")}),
        ));
        for piece in super::script::split(&arguments, 3) {
            steps.push(event(
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": index, "delta": piece}),
            ));
        }
        steps.push(event(
            "response.function_call_arguments.done",
            json!({"item_id": item_id, "output_index": index, "arguments": arguments}),
        ));
        steps.push(event(
            "response.output_item.done",
            json!({"output_index": index, "item": call_item(name, &arguments, call_id, "completed")}),
        ));
        index += 1;
    }
    steps.push(event(
        "response.completed",
        json!({"response": response_object(a, id, call_ids, created)}),
    ));
    steps
}
