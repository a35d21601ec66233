//! OpenAI-compatible chat completions (OpenAI, OpenRouter, Ollama, vLLM, Groq, Mistral,
//! DeepSeek, Gemini's compatible endpoint): the request (`POST {base}/chat/completions`,
//! `Authorization: Bearer`, `stream: true`, `stream_options.include_usage`) and its `data:` chunks
//! ending in `data: [DONE]`.

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::sse::SseEvent;
use super::{ChatRequest, Read, Reading};

pub fn body(model: &str, req: &ChatRequest) -> Value {
    let mut messages = vec![];
    if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.extend(
        req.messages
            .iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content})),
    );
    let mut b = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(n) = req.max_tokens {
        b["max_tokens"] = json!(n);
    }
    if let Some(t) = req.temperature {
        b["temperature"] = json!(t);
    }
    b
}

pub fn headers(key: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(mut v) = key.and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok()) {
        v.set_sensitive(true);
        h.insert("authorization", v);
    }
    h
}

/// Reads one chunk: `[DONE]`; an `{"error": …}` chunk (an object or, from some servers, a
/// string); else the model, `choices[0].delta.content`, `choices[0].finish_reason` and the usage
/// chunk's `usage`.
pub fn read(ev: &SseEvent, r: &mut Reading) -> Result<Read, String> {
    let data = ev.data.trim();
    if data == "[DONE]" {
        return Ok(Read::Done);
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("a chunk is not JSON ({e}): {data:.200}"))?;
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        let (kind, message) = match e {
            Value::String(s) => ("error".to_string(), s.clone()),
            e => (
                e.get("code")
                    .and_then(Value::as_str)
                    .or_else(|| e.get("type").and_then(Value::as_str))
                    .unwrap_or("error")
                    .to_string(),
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string(),
            ),
        };
        return Ok(Read::Error { kind, message });
    }
    if let Some(model) = v.get("model").and_then(Value::as_str) {
        r.model = Some(model.to_string());
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        if let Some(n) = u.get("prompt_tokens").and_then(Value::as_u64) {
            r.input_tokens = Some(n);
        }
        if let Some(n) = u.get("completion_tokens").and_then(Value::as_u64) {
            r.output_tokens = Some(n);
        }
    }
    let choice = &v["choices"][0];
    if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
        r.stop_reason = Some(f.to_string());
    }
    match choice["delta"].get("content").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => Ok(Read::Text(t.to_string())),
        _ => Ok(Read::Nothing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Message;

    const STREAM: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}

data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}

data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}],"usage":null}

data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}

data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}

data: [DONE]

"#;

    fn run(stream: &str) -> (Vec<Read>, Reading) {
        crate::llm::read_stream(stream, read)
    }

    #[test]
    fn a_documented_stream_reads() {
        let (reads, r) = run(STREAM);
        assert_eq!(
            reads,
            vec![
                Read::Text("Hel".into()),
                Read::Text("lo".into()),
                Read::Done
            ]
        );
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!((r.input_tokens, r.output_tokens), (Some(12), Some(2)));
        assert_eq!(r.stop_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn error_chunks_read_in_both_shapes() {
        let (reads, _) = run("data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n");
        assert_eq!(
            reads,
            vec![Read::Error {
                kind: "server_error".into(),
                message: "The server had an error".into()
            }]
        );
        let (reads, _) = run("data: {\"error\":\"model 'x' not found\"}\n\n");
        assert_eq!(
            reads,
            vec![Read::Error {
                kind: "error".into(),
                message: "model 'x' not found".into()
            }]
        );
    }

    #[test]
    fn the_body_asks_for_a_stream_with_usage() {
        let req = ChatRequest {
            system: Some("sys".into()),
            messages: vec![
                Message::user("hi"),
                Message::assistant("hello"),
                Message::user("again"),
            ],
            max_tokens: Some(100),
            ..ChatRequest::for_role("ceo")
        };
        let b = body("gpt-4o", &req);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(
            b["messages"][0],
            json!({"role": "system", "content": "sys"})
        );
        assert_eq!(
            b["messages"][2],
            json!({"role": "assistant", "content": "hello"})
        );
        assert_eq!(b["max_tokens"], 100);
        assert!(b.get("temperature").is_none());
        let h = headers(Some("sk-1"));
        assert_eq!(h["authorization"], "Bearer sk-1");
        assert!(h["authorization"].is_sensitive());
    }
}
