//! The scripted model server over real HTTP: both wire formats parsed as a client would (SSE
//! read incrementally), errors, retries, stalls, rule matching, the binary, and the real Claude
//! Code CLI driven by the demo script.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::model::{ModelServer, Script};
use serde_json::{json, Value};

fn script(v: Value) -> Script {
    Script::from_value(v).expect("a valid script")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client")
}

/// POSTs `body` as JSON.
async fn post(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.expect("sending")
}

/// Sends a request and reads the JSON answer, whatever its status.
async fn read_json<T: serde::de::DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
    request
        .send()
        .await
        .expect("sending")
        .json()
        .await
        .expect("a JSON answer")
}

/// POSTs `body` as JSON and reads the JSON answer.
async fn post_json<T: serde::de::DeserializeOwned>(url: &str, body: &Value) -> T {
    read_json(client().post(url).json(body)).await
}

/// GETs `url` and reads the JSON answer.
async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    read_json(client().get(url)).await
}

/// One server-sent event and when it arrived (since the request was sent).
#[derive(Debug)]
struct Sse {
    event: Option<String>,
    data: String,
    at: Duration,
}

impl Sse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

/// A streamed answer as read: the events that arrived and how the body ended.
struct SseRead {
    status: u16,
    headers: reqwest::header::HeaderMap,
    first_byte: Duration,
    events: Vec<Sse>,
    /// `Err` when the connection broke before the body ended.
    ended: Result<(), String>,
}

/// Sends `body` and reads the answer's events as they arrive.
async fn read_sse(url: &str, body: Value) -> SseRead {
    let started = Instant::now();
    let mut resp = client()
        .post(url)
        .header("x-api-key", "test-key")
        .json(&body)
        .send()
        .await
        .expect("sending");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut buf = String::new();
    let mut events = vec![];
    let mut first_byte = None;
    let ended = loop {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("{e:?}")),
        };
        first_byte.get_or_insert_with(|| started.elapsed());
        buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let mut ev = Sse {
                event: None,
                data: String::new(),
                at: started.elapsed(),
            };
            for line in frame.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    ev.event = Some(name.to_string());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    ev.data.push_str(data);
                }
            }
            events.push(ev);
        }
    };
    assert!(buf.trim().is_empty(), "a partial event was left: {buf:?}");
    SseRead {
        status,
        headers,
        first_byte: first_byte.unwrap_or_default(),
        events,
        ended,
    }
}

/// [`read_sse`] of a stream that must end cleanly: the status, the headers, the time to the first
/// byte of the body and the events.
async fn post_sse(url: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Duration, Vec<Sse>) {
    let r = read_sse(url, body).await;
    r.ended.expect("the stream ends cleanly");
    (r.status, r.headers, r.first_byte, r.events)
}

fn anthropic_body(prompt: &str, stream: bool) -> Value {
    json!({"model": "claude-test", "max_tokens": 1024, "stream": stream,
           "system": "You are the tester.", "messages": [{"role": "user", "content": prompt}]})
}

fn openai_body(prompt: &str, stream: bool) -> Value {
    json!({"model": "gpt-test", "stream": stream, "stream_options": {"include_usage": true},
           "messages": [{"role": "system", "content": "You are the tester."}, {"role": "user", "content": prompt}]})
}

const TOOL_SCRIPT: &str = r#"{"model": "scripted", "rules": [
  {"name": "tool", "when": {"prompt": "make a file", "turn": 0}, "text": "Writing it now, in pieces.", "chunks": 4,
   "tool_calls": [{"name": "Write", "input": {"file_path": "{{cwd}}/f.txt", "content": "for: {{prompt_line}}"}}]},
  {"name": "plain", "text": "Just text for {{prompt_line}} on turn {{turn}}."}
]}"#;

#[tokio::test]
async fn anthropic_streams_text_and_tool_use_as_the_vendor_does() {
    let server = ModelServer::start(Script::parse(TOOL_SCRIPT).unwrap());
    let url = format!("{}/v1/messages?beta=true", server.url());
    let (status, headers, _, events) =
        post_sse(&url, anthropic_body("please make a file", true)).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_deref().unwrap_or("-"))
        .collect();
    let mut expected = vec!["message_start", "ping", "content_block_start"];
    expected.extend(["content_block_delta"; 4]);
    expected.extend(["content_block_stop", "content_block_start"]);
    expected.extend(["content_block_delta"; 3]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for e in &events {
        assert_eq!(
            e.json()["type"],
            e.event.as_deref().unwrap(),
            "the data's type names its event"
        );
    }

    let start = events[0].json();
    assert_eq!(start["message"]["model"], "scripted");
    assert_eq!(start["message"]["role"], "assistant");
    let input_tokens = start["message"]["usage"]["input_tokens"].as_u64().unwrap();
    let body_chars = anthropic_body("please make a file", true).to_string().len() as u64;
    assert_eq!(
        input_tokens,
        body_chars.div_ceil(4),
        "input tokens are the body's characters / 4"
    );

    let mut text = String::new();
    let mut partial = String::new();
    for e in &events {
        let d = e.json();
        match d["delta"]["type"].as_str() {
            Some("text_delta") => text.push_str(d["delta"]["text"].as_str().unwrap()),
            Some("input_json_delta") => {
                partial.push_str(d["delta"]["partial_json"].as_str().unwrap())
            }
            _ => {}
        }
    }
    assert_eq!(text, "Writing it now, in pieces.");
    let tool_start = events
        .iter()
        .map(Sse::json)
        .find(|d| d["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(tool_start["index"], 1);
    assert_eq!(tool_start["content_block"]["name"], "Write");
    assert!(tool_start["content_block"]["id"]
        .as_str()
        .unwrap()
        .starts_with("toolu_"));
    let input: Value =
        serde_json::from_str(&partial).expect("the partial JSON adds up to the input");
    assert_eq!(
        input,
        json!({"file_path": "./f.txt", "content": "for: please make a file"})
    );

    let delta = events[events.len() - 2].json();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    let out_chars = (text.len() + "Write".len() + partial.len()) as u64;
    assert_eq!(
        delta["usage"]["output_tokens"].as_u64().unwrap(),
        out_chars.div_ceil(4)
    );

    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/messages?beta=true");
    assert_eq!(seen[0].rule.as_deref(), Some("tool"));
    assert_eq!(seen[0].api_key.as_deref(), Some("test-key"));
    assert_eq!(seen[0].system, "You are the tester.");
    assert_eq!(seen[0].prompt, "please make a file");
    assert!(seen[0].stream);
}

#[tokio::test]
async fn anthropic_answers_json_counts_tokens_and_lists_models() {
    let server = ModelServer::start(Script::parse(TOOL_SCRIPT).unwrap());
    let msg: Value = post_json(
        &format!("{}/v1/messages", server.url()),
        &anthropic_body("hello", false),
    )
    .await;
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["model"], "scripted");
    assert!(msg["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(
        msg["content"],
        json!([{"type": "text", "text": "Just text for hello on turn 0."}])
    );
    assert_eq!(msg["stop_reason"], "end_turn");
    assert_eq!(
        msg["usage"]["output_tokens"],
        "Just text for hello on turn 0.".len().div_ceil(4) as u64
    );

    let tool: Value = post_json(
        &format!("{}/v1/messages", server.url()),
        &anthropic_body("make a file", false),
    )
    .await;
    assert_eq!(tool["stop_reason"], "tool_use");
    assert_eq!(tool["content"][1]["type"], "tool_use");
    assert_eq!(tool["content"][1]["input"]["content"], "for: make a file");

    let request = json!({"model": "m", "messages": [{"role": "user", "content": "count me"}]});
    let count: Value = post_json(
        &format!("{}/v1/messages/count_tokens", server.url()),
        &request,
    )
    .await;
    let chars = request.to_string().len();
    assert_eq!(count, json!({"input_tokens": chars.div_ceil(4)}));

    let models: Value = read_json(
        client()
            .get(format!("{}/v1/models", server.url()))
            .header("anthropic-version", "2023-06-01"),
    )
    .await;
    assert_eq!(models["data"][0]["type"], "model");
    assert_eq!(models["data"][0]["id"], "scripted");
    assert_eq!(models["has_more"], false);
}

#[tokio::test]
async fn openai_streams_chunks_tool_calls_and_the_usage_chunk() {
    let server = ModelServer::start(Script::parse(TOOL_SCRIPT).unwrap());
    let url = format!("{}/chat/completions", server.openai_base_url());
    let (status, _, _, events) = post_sse(&url, openai_body("make a file", true)).await;
    assert_eq!(status, 200);
    assert!(
        events.iter().all(|e| e.event.is_none()),
        "OpenAI sends bare data lines"
    );
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Sse::json).collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "scripted"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");

    let mut text = String::new();
    let mut args = String::new();
    let mut name = None;
    let mut finish = None;
    for c in &chunks {
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(call) = choice["delta"]["tool_calls"].get(0) {
            assert_eq!(call["index"], 0);
            if let Some(n) = call["function"]["name"].as_str() {
                name = Some(n.to_string());
                assert!(call["id"].as_str().unwrap().starts_with("call_"));
            }
            args.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(text, "Writing it now, in pieces.");
    assert_eq!(name.as_deref(), Some("Write"));
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap()["content"],
        "for: make a file"
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    let usage_chunk = chunks.last().unwrap();
    assert_eq!(
        usage_chunk["choices"],
        json!([]),
        "the usage chunk has no choices"
    );
    let u = &usage_chunk["usage"];
    assert_eq!(
        u["prompt_tokens"],
        openai_body("make a file", true)
            .to_string()
            .len()
            .div_ceil(4) as u64
    );
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));

    // Without include_usage there is no usage chunk and no usage key.
    let mut body = openai_body("hi", true);
    body.as_object_mut().unwrap().remove("stream_options");
    let (_, _, _, events) = post_sse(&url, body).await;
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e.json().get("usage").is_none()));
    assert_eq!(
        events[events.len() - 2].json()["choices"][0]["finish_reason"],
        "stop"
    );

    let done: Value = post_json(&url, &openai_body("make a file", false)).await;
    assert_eq!(done["object"], "chat.completion");
    assert_eq!(done["choices"][0]["finish_reason"], "tool_calls");
    let call = &done["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap()
            ["file_path"],
        "./f.txt"
    );
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let models: Value = get_json(&format!("{}/models", server.openai_base_url())).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "scripted");
}

#[tokio::test]
async fn openai_responses_stream_output_items_and_usage_as_codex_reads_them() {
    let server = ModelServer::start(Script::parse(TOOL_SCRIPT).unwrap());
    let url = format!("{}/responses", server.openai_base_url());
    let body = |prompt: &str, stream: bool| {
        json!({"model": "codex-test", "instructions": "You are the tester.", "stream": stream,
               "tools": [{"type": "function", "name": "Write", "parameters": {}}],
               "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}]})
    };
    let (status, _, _, events) = post_sse(&url, body("make a file", true)).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_deref().unwrap_or("-"))
        .collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(["response.output_text.delta"; 4]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]);
    expected.extend(["response.function_call_arguments.delta"; 3]);
    expected.extend([
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    for (i, e) in events.iter().enumerate() {
        let d = e.json();
        assert_eq!(d["type"], e.event.as_deref().unwrap());
        assert_eq!(d["sequence_number"], i as u64);
    }
    let text: String = events
        .iter()
        .map(Sse::json)
        .filter(|d| d["type"] == "response.output_text.delta")
        .map(|d| d["delta"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "Writing it now, in pieces.");
    let done = events.last().unwrap().json();
    let response = &done["response"];
    assert_eq!(response["status"], "completed");
    assert_eq!(response["model"], "scripted");
    let call = &response["output"][1];
    assert_eq!(
        (call["type"].as_str(), call["name"].as_str()),
        (Some("function_call"), Some("Write"))
    );
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["content"], "for: make a file");
    let u = &response["usage"];
    assert_eq!(
        u["input_tokens"],
        body("make a file", true).to_string().len().div_ceil(4) as u64
    );
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap()
    );

    // The tool's output comes back as a function_call_output: turn 1.
    let follow = json!({"model": "codex-test", "stream": false, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "make a file"}]},
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "done"}
    ]});
    let answer: Value = post_json(&url, &follow).await;
    assert_eq!(answer["object"], "response");
    assert_eq!(
        answer["output"][0]["content"][0]["text"],
        "Just text for make a file on turn 1."
    );
    let seen = server.requests().pop().unwrap();
    assert_eq!((seen.turn, seen.path.as_str()), (1, "/v1/responses"));

    // A mid-stream error ends the stream with response.failed.
    server.set_script(script(json!({"rules": [
        {"error": {"status": 500}, "error_mid_stream": true, "chunks": 2, "text": "half and half"}
    ]})));
    let r = read_sse(&url, body("x", true)).await;
    assert_eq!(r.status, 200);
    let last = r.events.last().unwrap().json();
    assert_eq!(last["type"], "response.failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
}

#[tokio::test]
async fn errors_come_in_each_vendors_shape_with_retry_after() {
    let server = ModelServer::start(script(json!({"rules": [
        {"when": {"prompt": "limit"}, "error": {"status": 429, "retry_after": 7}},
        {"when": {"prompt": "busy"}, "error": {"status": 529}},
        {"when": {"prompt": "custom"}, "error": {"status": 500, "type": "api_error", "message": "boom"}},
        {"when": {"prompt": "known"}, "text": "fine"}
    ]})));
    let http = client();
    let a = format!("{}/v1/messages", server.url());
    let o = format!("{}/chat/completions", server.openai_base_url());

    let r = post(&a, &anthropic_body("limit", true)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert!(r.headers()["request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Rate limited"));

    let r = post(&a, &anthropic_body("busy", true)).await;
    assert_eq!(r.status(), 529);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "overloaded_error"
    );

    let r = post(&a, &anthropic_body("custom", false)).await;
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"type": "error", "error": {"type": "api_error", "message": "boom"}})
    );

    let r = post(&o, &openai_body("limit", true)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["message"].is_string() && body["error"].get("param").is_some());

    // No rule applies: a 400 that names the prompt, not a made-up answer.
    let r = post(&a, &anthropic_body("unscripted", false)).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unscripted"));

    // A body that is not a request.
    let r = http.post(&a).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post(&o, &json!({"model": "m"})).await;
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("messages"));

    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 529, 500, 429, 400, 400, 400]);
}

#[tokio::test]
async fn a_required_key_is_checked() {
    let server = ModelServer::start(script(
        json!({"api_key": "sk-right", "rules": [{"text": "ok"}]}),
    ));
    let http = client();
    let a = format!("{}/v1/messages", server.url());
    let r = http
        .post(&a)
        .header("x-api-key", "sk-wrong")
        .json(&anthropic_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );
    let r = http
        .post(&a)
        .header("x-api-key", "sk-right")
        .json(&anthropic_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o = format!("{}/chat/completions", server.openai_base_url());
    let r = http
        .post(&o)
        .bearer_auth("sk-wrong")
        .json(&openai_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let r = http
        .post(&o)
        .bearer_auth("sk-right")
        .json(&openai_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn fail_first_n_then_succeed_counts_per_rule() {
    let server = ModelServer::start(script(json!({"rules": [
        {"name": "flaky", "when": {"prompt": "flaky"}, "error": {"status": 429, "retry_after": 1}, "fail_first": 2,
         "text": "made it on answer {{answer}}"},
        {"name": "other", "when": {"prompt": "steady"}, "error": {"status": 503}, "fail_first": 1, "text": "steady ok"}
    ]})));
    let a = format!("{}/v1/messages", server.url());
    let mut got = vec![];
    for prompt in ["flaky", "steady", "flaky", "flaky", "steady", "flaky"] {
        let r = post(&a, &anthropic_body(prompt, false)).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        got.push((
            prompt,
            status,
            body["content"][0]["text"].as_str().map(String::from),
        ));
    }
    assert_eq!(
        got,
        vec![
            ("flaky", 429, None),
            ("steady", 503, None),
            ("flaky", 429, None),
            ("flaky", 200, Some("made it on answer 3".into())),
            ("steady", 200, Some("steady ok".into())),
            ("flaky", 200, Some("made it on answer 4".into())),
        ]
    );
    // Replacing the script starts the counters again.
    server.set_script(server.script());
    let r = post(&a, &anthropic_body("flaky", false)).await;
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn stalls_hold_the_first_byte_or_the_middle_of_the_stream() {
    let server = ModelServer::start(script(json!({"rules": [
        {"when": {"prompt": "slow start"}, "stall_before_ms": 600, "text": "late"},
        {"when": {"prompt": "slow middle"}, "stall_mid_ms": 600, "chunks": 4, "text": "one two three four"},
        {"when": {"prompt": "drip"}, "chunk_delay_ms": 100, "chunks": 5, "text": "a b c d e f g h i j"},
        {"text": "fast"}
    ]})));
    let a = format!("{}/v1/messages", server.url());
    let o = format!("{}/chat/completions", server.openai_base_url());

    let (_, _, first, events) = post_sse(&a, anthropic_body("slow start", true)).await;
    assert!(
        first >= Duration::from_millis(600),
        "first byte after {first:?}"
    );
    assert_eq!(
        events.last().unwrap().event.as_deref(),
        Some("message_stop")
    );

    for (url, body) in [
        (&a, anthropic_body("slow middle", true)),
        (&o, openai_body("slow middle", true)),
    ] {
        let (_, _, first, events) = post_sse(url, body).await;
        assert!(
            first < Duration::from_millis(300),
            "the stream starts at once ({first:?})"
        );
        let texts: Vec<&Sse> = events
            .iter()
            .filter(|e| {
                e.data.contains("text_delta")
                    || e.data.contains("\"content\":\"") && !e.data.contains("\"content\":\"\"")
            })
            .collect();
        assert_eq!(texts.len(), 4, "{events:?}");
        // Times since the request: robust to a client that reads late on a busy machine.
        assert!(
            texts[2].at >= Duration::from_millis(600),
            "the third piece comes after the stall ({:?})",
            texts[2].at
        );
        assert!(
            texts[1].at + Duration::from_millis(300) < texts[2].at,
            "the stall sits before the third piece"
        );
    }

    let (_, _, _, events) = post_sse(&a, anthropic_body("drip", true)).await;
    let deltas: Vec<&Sse> = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .collect();
    assert_eq!(deltas.len(), 5);
    assert!(
        deltas[4].at >= Duration::from_millis(400),
        "four pauses of 100 ms come first ({:?})",
        deltas[4].at
    );

    // A client that gives up on a stall is not waited for, and the server keeps serving.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    assert!(quick
        .post(&a)
        .json(&anthropic_body("slow start", true))
        .send()
        .await
        .is_err());
    let mut firsts = vec![];
    for _ in 0..50 {
        let (status, _, first, _) = post_sse(&a, anthropic_body("anything", true)).await;
        assert_eq!(status, 200);
        firsts.push(first);
    }
    firsts.sort();
    println!(
        "first-byte latency of a streamed answer: p50 {:?}, max {:?}",
        firsts[25], firsts[49]
    );
    assert!(firsts[25] < Duration::from_millis(50));
}

#[tokio::test]
async fn a_stream_can_carry_an_error_or_break_in_the_middle() {
    let server = ModelServer::start(script(json!({"rules": [
        {"when": {"prompt": "overload"}, "error": {"status": 529}, "error_mid_stream": true, "fail_first": 1,
         "chunks": 4, "text": "one two three four"},
        {"when": {"prompt": "cut"}, "cut_mid_stream": true, "chunks": 4, "text": "one two three four"}
    ]})));
    let a = format!("{}/v1/messages", server.url());
    let o = format!("{}/chat/completions", server.openai_base_url());

    // Anthropic: a 200 stream, half the text, then `event: error`, and nothing after it.
    let r = read_sse(&a, anthropic_body("overload", true)).await;
    assert_eq!(r.status, 200);
    r.ended.expect("the body ends after the error event");
    let names: Vec<&str> = r
        .events
        .iter()
        .map(|e| e.event.as_deref().unwrap_or("-"))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    let error = r.events.last().unwrap().json();
    assert_eq!(
        error,
        json!({"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "Overloaded (the Kiln model server's script says so)."}})
    );
    // fail_first: 1, so the next one streams to the end; a non-streamed request gets the plain error.
    let (_, _, _, events) = post_sse(&a, anthropic_body("overload", true)).await;
    assert_eq!(
        events.last().unwrap().event.as_deref(),
        Some("message_stop")
    );

    server.set_script(server.script()); // the counters start again
    let r = read_sse(&o, openai_body("overload", true)).await;
    assert_eq!(r.status, 200);
    let last = r.events.last().unwrap();
    assert_ne!(last.data, "[DONE]");
    assert_eq!(last.json()["error"]["type"], "server_error");
    assert_eq!(
        r.events
            .iter()
            .filter(|e| e.data.contains("\"content\":\""))
            .count(),
        3,
        "role chunk + two pieces"
    );

    // A broken connection: the client sees half the text and then a body error, not an end.
    for (url, body) in [
        (&a, anthropic_body("cut", true)),
        (&o, openai_body("cut", true)),
    ] {
        let r = read_sse(url, body).await;
        assert_eq!(r.status, 200);
        assert!(r.ended.is_err(), "the body must not end cleanly");
        assert!(r
            .events
            .iter()
            .all(|e| e.event.as_deref() != Some("message_stop") && e.data != "[DONE]"));
        let text: String = r
            .events
            .iter()
            .map(Sse::json)
            .filter_map(|d| {
                d["delta"]["text"]
                    .as_str()
                    .or(d["choices"][0]["delta"]["content"].as_str())
                    .map(String::from)
            })
            .collect();
        assert_eq!(text, "one two th", "the first two of four pieces");
    }
}

#[tokio::test]
async fn rules_match_on_role_turn_iteration_api_model_and_count() {
    let server = ModelServer::start(script(json!({"rules": [
        {"name": "gatherer", "when": {"system": "requirements gatherer"}, "text": "What should it do?"},
        {"name": "promise", "when": {"iteration": 3}, "text": "All done <promise>DONE</promise>"},
        {"name": "tool-loop-0", "when": {"turn": 0, "offers_tool": "Bash"}, "tool_calls": [{"name": "Bash", "input": {"command": "ls"}}]},
        {"name": "tool-loop-1", "when": {"after_tool": true}, "text": "saw {{tool_result}}"},
        {"name": "haiku", "when": {"model": "haiku"}, "text": "short title"},
        {"name": "openai", "when": {"api": "openai"}, "text": "openai says hi"},
        {"name": "third", "when": {"prompt": "count", "from_match": 3}, "text": "third time"},
        {"name": "fallback", "text": "iteration {{iteration}}"}
    ]})));
    let http = client();
    let a = format!("{}/v1/messages", server.url());
    let ask = |body: Value| {
        let a = a.clone();
        async move { post_json::<Value>(&a, &body).await }
    };
    let text = |v: &Value| {
        v["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    let gatherer = json!({"model": "m", "system": [{"type": "text", "text": "You are the requirements gatherer."}],
                          "messages": [{"role": "user", "content": "an app"}]});
    assert_eq!(text(&ask(gatherer).await), "What should it do?");

    // The runner's ralph prompt after the first iteration names the iteration.
    let ralph = |n: u32| {
        let prompt = if n == 1 {
            "Fix the tests.".to_string()
        } else {
            format!(
                "Fix the tests.\n\n---\n## Progress so far (this is iteration {n} of at most 5)\n\n### Iteration 1\n"
            )
        };
        json!({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    };
    assert_eq!(text(&ask(ralph(1)).await), "iteration 1");
    assert_eq!(text(&ask(ralph(2)).await), "iteration 2");
    assert_eq!(
        text(&ask(ralph(3)).await),
        "All done <promise>DONE</promise>"
    );

    let loop0 = json!({"model": "m", "tools": [{"name": "Bash", "input_schema": {}}],
                       "messages": [{"role": "user", "content": "list files"}]});
    let first = ask(loop0).await;
    assert_eq!(first["content"][0]["type"], "tool_use", "{first}");
    let id = first["content"][0]["id"].clone();
    let loop1 = json!({"model": "m", "tools": [{"name": "Bash", "input_schema": {}}], "messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "a.txt"}]}]});
    assert_eq!(text(&ask(loop1).await), "saw a.txt");

    assert_eq!(
        text(
            &ask(
                json!({"model": "claude-haiku-4", "messages": [{"role": "user", "content": "x"}]})
            )
            .await
        ),
        "short title"
    );
    let o: Value = post_json(
        &format!("{}/chat/completions", server.openai_base_url()),
        &openai_body("x", false),
    )
    .await;
    assert_eq!(o["choices"][0]["message"]["content"], "openai says hi");

    let count = json!({"model": "m", "messages": [{"role": "user", "content": "count"}]});
    assert_eq!(text(&ask(count.clone()).await), "iteration 1");
    assert_eq!(text(&ask(count.clone()).await), "iteration 1");
    assert_eq!(text(&ask(count.clone()).await), "third time");
    assert_eq!(text(&ask(count).await), "third time");

    let rules: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.rule.clone())
        .collect();
    assert_eq!(
        rules,
        [
            "gatherer",
            "fallback",
            "fallback",
            "promise",
            "tool-loop-0",
            "tool-loop-1",
            "haiku",
            "openai",
            "fallback",
            "fallback",
            "third",
            "third"
        ]
    );

    // The same log over HTTP, bodies only on request.
    let log: Vec<Value> = get_json(&format!("{}/_kiln/requests", server.url())).await;
    assert_eq!(log.len(), 12);
    assert_eq!(log[0]["rule"], "gatherer");
    assert_eq!(log[0]["system"], "You are the requirements gatherer.");
    assert!(log[0]["body"].is_null());
    assert_eq!(log[5]["turn"], 1);
    let full: Vec<Value> = get_json(&format!("{}/_kiln/requests?full=1", server.url())).await;
    assert_eq!(full[0]["body"]["messages"][0]["content"], "an app");
    assert_eq!(
        http.delete(format!("{}/_kiln/requests", server.url()))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert!(server.requests().is_empty());
}

/// Starts the binary with `args`; returns it and the URL from the line it prints.
fn start_binary(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-model-server"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln-model-server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    (child, url)
}

#[tokio::test]
async fn the_binary_serves_the_demo_or_a_script_file() {
    let (mut demo, url) = start_binary(&["--listen", "127.0.0.1:0"]);
    let msg: Value = post_json(&format!("{url}/v1/messages"), &anthropic_body("hi", false)).await;
    demo.kill().unwrap();
    let out = demo.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(
            "POST /v1/messages model=claude-test turn=0 rule=demo-chat -> 200 prompt=\"hi\""
        ),
        "a line per request on stderr: {log}"
    );
    assert_eq!(msg["model"], "kiln-demo");
    assert!(
        msg["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("demo model"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.json");
    std::fs::write(&file, r#"{"rules": [{"text": "from the file"}]}"#).unwrap();
    let port = kiln_e2e::free_port();
    let listen = format!("127.0.0.1:{port}");
    let (mut scripted, url) = start_binary(&[
        "--listen",
        &listen,
        "--script",
        file.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(url, format!("http://{listen}"));
    let o: Value = post_json(
        &format!("{url}/v1/chat/completions"),
        &openai_body("hi", false),
    )
    .await;
    scripted.kill().unwrap();
    assert!(
        scripted.wait_with_output().unwrap().stderr.is_empty(),
        "--quiet logs nothing"
    );
    assert_eq!(o["choices"][0]["message"]["content"], "from the file");
    assert_eq!(
        o["model"], "gpt-test",
        "without a script model the requested one is echoed"
    );

    std::fs::write(&file, r#"{"rules": [{"txt": "typo"}]}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-model-server"))
        .args(["--script", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("txt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_kiln-model-server"))
        .arg("--print-demo")
        .output()
        .unwrap();
    assert_eq!(
        Script::parse(&String::from_utf8(out.stdout).unwrap()).unwrap(),
        Script::demo()
    );
}

// --- The real Claude Code CLI ---

/// The Claude Code CLI that `scripts/agent-clis` installs.
fn claude_bin() -> PathBuf {
    let bin = kiln_e2e::repo_root().join(".kiln/agents/node_modules/.bin/claude");
    assert!(
        bin.exists(),
        "the Claude Code CLI is not installed at {}: run scripts/agent-clis (it installs @anthropic-ai/claude-code there)",
        bin.display()
    );
    bin
}

/// Runs an agent CLI in `dir` with only PATH, HOME and `env` in its environment; asserts it
/// succeeded and returns its JSON output lines and how long it took.
fn run_cli(
    bin: &Path,
    dir: &Path,
    home: &Path,
    env: &[(&str, String)],
    args: &[&str],
) -> (Vec<Value>, Duration) {
    let started = Instant::now();
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{} failed ({:?}):\nstdout: {stdout}\nstderr: {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let events = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (events, took)
}

/// Runs `claude --print --verbose --output-format stream-json --dangerously-skip-permissions`
/// in `dir` against `server`, with `home` as its HOME. Claude Code refuses
/// `--dangerously-skip-permissions` as root unless `IS_SANDBOX=1`.
fn run_claude(
    server: &ModelServer,
    dir: &Path,
    home: &Path,
    extra: &[&str],
    prompt: &str,
) -> (Vec<Value>, Duration) {
    let mut args = vec![
        "--print",
        "--verbose",
        "--output-format",
        "stream-json",
        "--dangerously-skip-permissions",
    ];
    args.extend(extra);
    args.push(prompt);
    run_cli(&claude_bin(), dir, home, &claude_env(server), &args)
}

/// Claude Code's environment for `server`, besides PATH and HOME.
fn claude_env(server: &ModelServer) -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_BASE_URL", server.url()),
        ("ANTHROPIC_API_KEY", "anything".to_string()),
        ("DISABLE_AUTOUPDATER", "1".to_string()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
        ("IS_SANDBOX", "1".to_string()),
    ]
}

fn result_of(events: &[Value]) -> &Value {
    let last = events.last().expect("some output");
    assert_eq!(
        last["type"], "result",
        "stream-json ends with a result: {last}"
    );
    last
}

#[test]
fn claude_code_writes_a_file_with_the_demo_model_and_resumes_its_session() {
    let server = ModelServer::demo();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let prompt = "Add a greeting to the project";
    let (events, took) = run_claude(&server, dir.path(), home.path(), &[], prompt);
    println!("claude --print against the demo model (one Write, two requests): {took:?}");

    let init = &events[0];
    assert_eq!(
        (init["type"].as_str(), init["subtype"].as_str()),
        (Some("system"), Some("init")),
        "{init}"
    );
    let session = init["session_id"]
        .as_str()
        .expect("a session id")
        .to_string();
    assert_eq!(
        init["cwd"],
        dir.path().canonicalize().unwrap().to_str().unwrap()
    );

    let written = std::fs::read_to_string(dir.path().join("KILN_DEMO.md"))
        .expect("the demo model had KILN_DEMO.md written");
    assert!(
        written.contains("Kiln's demo model") && written.contains(&format!("1. {prompt}")),
        "{written}"
    );

    let tool_use = events
        .iter()
        .filter(|e| e["type"] == "assistant")
        .flat_map(|e| {
            e["message"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|b| b["type"] == "tool_use")
        .expect("an assistant tool_use in the output");
    assert_eq!(tool_use["name"], "Write");
    assert!(events
        .iter()
        .any(|e| e["type"] == "assistant" && e["message"]["model"] == "kiln-demo"));

    let result = result_of(&events);
    assert_eq!(result["subtype"], "success", "{result}");
    assert_eq!(result["is_error"], false);
    assert_eq!(result["session_id"], session.as_str());
    assert_eq!(
        result["result"],
        format!("[demo model] Wrote KILN_DEMO.md for: {prompt} (request 1 of this conversation)")
    );
    assert!(
        result["total_cost_usd"].as_f64().expect("total_cost_usd") > 0.0,
        "{result}"
    );
    assert!(
        result["usage"]["input_tokens"].as_u64().unwrap() > 0
            && result["usage"]["output_tokens"].as_u64().unwrap() > 0
    );
    assert_eq!(result["num_turns"], 2);

    let chats = server.chat_requests();
    assert_eq!(
        chats.len(),
        2,
        "one request per turn: {:#?}",
        chats.iter().map(|r| (&r.path, &r.rule)).collect::<Vec<_>>()
    );
    assert!(chats
        .iter()
        .all(|r| r.path == "/v1/messages?beta=true" && r.stream));
    assert_eq!(
        chats[0]
            .headers
            .get("anthropic-version")
            .map(String::as_str),
        Some("2023-06-01")
    );
    assert!(chats[0].headers["user-agent"].starts_with("claude-cli/"));
    assert_eq!(chats[0].api_key.as_deref(), Some("anything"));
    assert_eq!((chats[0].turn, chats[1].turn), (0, 1));
    assert!(chats[0].tools.iter().any(|t| t == "Write"));

    // A second turn on the same session: the server sees the first one.
    let follow = "Now add a farewell";
    let (events, took) = run_claude(
        &server,
        dir.path(),
        home.path(),
        &["--resume", &session],
        follow,
    );
    println!("claude --resume against the demo model: {took:?}");
    let result = result_of(&events);
    assert_eq!(result["session_id"], session.as_str());
    assert_eq!(
        result["result"],
        format!("[demo model] Wrote KILN_DEMO.md for: {follow} (request 2 of this conversation)")
    );
    let last = server.chat_requests().pop().unwrap();
    assert!(
        last.messages.iter().any(|m| m.text.contains(prompt)),
        "the resumed request carries the first turn"
    );
    let written = std::fs::read_to_string(dir.path().join("KILN_DEMO.md")).unwrap();
    assert!(
        written.contains(&format!("1. {prompt}")) && written.contains(&format!("2. {follow}")),
        "{written}"
    );
}

#[test]
fn claude_code_answers_a_follow_up_on_stdin_while_it_runs() {
    use std::io::{BufRead, Write};
    let server = ModelServer::demo();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(claude_bin())
        .args([
            "--print",
            "--verbose",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
        ])
        .arg("--dangerously-skip-permissions")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .envs(claude_env(&server))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting claude");
    let mut stdin = child.stdin.take();
    let send = |stdin: &mut Option<std::process::ChildStdin>, text: &str| {
        let line = json!({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": text}]}});
        let w = stdin.as_mut().expect("stdin is open");
        writeln!(w, "{line}")
            .and_then(|()| w.flush())
            .expect("writing to claude");
    };
    send(&mut stdin, "first request");
    let mut first_line = None;
    let mut results = vec![];
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("reading claude's output");
        first_line.get_or_insert_with(|| started.elapsed());
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if event["type"] == "result" {
            results.push(event["result"].as_str().unwrap_or_default().to_string());
            if results.len() == 1 {
                send(&mut stdin, "second request");
            } else {
                // Only now does the process learn there is nothing more: the answer came first.
                stdin.take();
            }
        }
    }
    assert!(child.wait().unwrap().success());
    println!(
        "claude --input-format stream-json: first output line after {:?}, both answers after {:?}",
        first_line.unwrap(),
        started.elapsed()
    );
    assert_eq!(
        results,
        [
            "[demo model] Wrote KILN_DEMO.md for: first request (request 1 of this conversation)",
            "[demo model] Wrote KILN_DEMO.md for: second request (request 2 of this conversation)"
        ]
    );
}

#[test]
fn claude_code_retries_a_429_and_sees_a_promise_on_the_third_iteration() {
    let server = ModelServer::start(script(json!({"model": "kiln-test", "rules": [
        {"name": "limited", "when": {"prompt": "limited"}, "error": {"status": 429, "retry_after": 1}, "fail_first": 1,
         "text": "answered after a retry"},
        {"name": "promise", "when": {"iteration": 3}, "text": "Finished. <promise>DONE</promise>"},
        {"name": "working", "text": "Still working on iteration {{iteration}}."}
    ]})));
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();

    let (events, took) = run_claude(
        &server,
        dir.path(),
        home.path(),
        &[],
        "limited: say something",
    );
    assert_eq!(result_of(&events)["result"], "answered after a retry");
    let tries: Vec<_> = server
        .chat_requests()
        .iter()
        .map(|r| (r.status, r.at_ms))
        .collect();
    assert_eq!(
        tries.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert!(
        tries[1].1 - tries[0].1 >= 900,
        "the CLI honoured retry-after: 1 ({tries:?})"
    );
    println!("claude with one 429 (retry-after 1): {took:?}");

    // The prompts a ralph job gives the agent (runner/src/jobs/ralph.rs, build_prompt).
    for i in 1..=3 {
        let prompt = if i == 1 {
            "Make the tests pass.".to_string()
        } else {
            format!("Make the tests pass.\n\n---\n## Progress so far (this is iteration {i} of at most 5)\n\n### Iteration 1\n- Agent exit code: 0\n")
        };
        let (events, _) = run_claude(&server, dir.path(), home.path(), &[], &prompt);
        let text = result_of(&events)["result"].as_str().unwrap().to_string();
        if i < 3 {
            assert_eq!(text, format!("Still working on iteration {i}."));
        } else {
            assert!(text.contains("<promise>DONE</promise>"), "{text}");
        }
    }
}

// --- The real Codex CLI ---

/// Runs `codex exec --json` in `dir` against `server` (OpenAI Responses), with `home` as HOME and
/// CODEX_HOME holding the provider's config.
fn run_codex(
    server: &ModelServer,
    dir: &Path,
    home: &Path,
    extra: &[&str],
    prompt: &str,
) -> (Vec<Value>, Duration) {
    let bin = kiln_e2e::repo_root().join(".kiln/agents/node_modules/.bin/codex");
    assert!(
        bin.exists(),
        "the Codex CLI is not installed at {}: run scripts/agent-clis (it installs @openai/codex there)",
        bin.display()
    );
    // Codex reaches a custom endpoint only through a provider of its config, over the Responses API.
    let config = format!(
        "model = \"kiln-demo\"\nmodel_provider = \"kiln\"\n\n[model_providers.kiln]\nname = \"kiln\"\n\
         base_url = \"{}\"\nwire_api = \"responses\"\nenv_key = \"OPENAI_API_KEY\"\n",
        server.openai_base_url()
    );
    std::fs::write(home.join("config.toml"), config).unwrap();
    let mut args = vec![
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
    ];
    args.extend(extra);
    args.push(prompt);
    let env = [
        ("CODEX_HOME", home.display().to_string()),
        ("OPENAI_API_KEY", "anything".to_string()),
    ];
    run_cli(&bin, dir, home, &env, &args)
}

fn agent_messages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "item.completed" && e["item"]["type"] == "agent_message")
        .map(|e| e["item"]["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn codex_writes_a_file_with_the_demo_model_and_resumes_its_thread() {
    let server = ModelServer::demo();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let prompt = "Add a greeting to the project";
    let (events, took) = run_codex(&server, dir.path(), home.path(), &[], prompt);
    println!("codex exec against the demo model (one command, two requests): {took:?}");
    assert_eq!(events[0]["type"], "thread.started", "{events:?}");
    let thread = events[0]["thread_id"]
        .as_str()
        .expect("a thread id")
        .to_string();
    let written = std::fs::read_to_string(dir.path().join("KILN_DEMO.md"))
        .expect("KILN_DEMO.md written by codex");
    assert!(
        written.contains("Kiln's demo model") && written.contains(&format!("1. {prompt}")),
        "{written}"
    );
    let ran = events
        .iter()
        .find(|e| e["type"] == "item.completed" && e["item"]["type"] == "command_execution")
        .expect("a command run by codex");
    assert_eq!(ran["item"]["exit_code"], 0);
    assert_eq!(
        agent_messages(&events).last().map(String::as_str),
        Some(
            format!(
                "[demo model] Wrote KILN_DEMO.md for: {prompt} (request 1 of this conversation)"
            )
            .as_str()
        )
    );
    let last = events.last().unwrap();
    assert_eq!(last["type"], "turn.completed", "{last}");
    assert!(
        last["usage"]["input_tokens"].as_u64().unwrap() > 0
            && last["usage"]["output_tokens"].as_u64().unwrap() > 0
    );
    let chats = server.chat_requests();
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|r| r.path == "/v1/responses" && r.stream));
    assert_eq!(chats[0].api_key.as_deref(), Some("anything"));

    let follow = "Now add a farewell";
    let (events, _) = run_codex(
        &server,
        dir.path(),
        home.path(),
        &["resume", &thread],
        follow,
    );
    assert_eq!(events[0]["thread_id"], thread.as_str());
    assert_eq!(
        agent_messages(&events).last().map(String::as_str),
        Some(
            format!(
                "[demo model] Wrote KILN_DEMO.md for: {follow} (request 2 of this conversation)"
            )
            .as_str()
        )
    );
    let written = std::fs::read_to_string(dir.path().join("KILN_DEMO.md")).unwrap();
    assert!(written.contains(&format!("2. {follow}")), "{written}");
}

/// The fenced ```json block of a reply, parsed.
fn fenced_json(text: &str) -> Value {
    let start = text.find("```json").unwrap_or_else(|| panic!("no ```json block in {text}")) + "```json".len();
    let end = start + text[start..].find("```").expect("the block ends");
    serde_json::from_str(text[start..end].trim()).unwrap_or_else(|e| panic!("the block is not JSON ({e}): {text}"))
}

/// An LLM step's request as the runner sends it: `Kiln role: <role>` first in the system prompt.
fn step_body(role: &str, user_messages: &[&str]) -> Value {
    let mut messages = vec![];
    for (i, m) in user_messages.iter().enumerate() {
        if i > 0 {
            messages.push(json!({"role": "assistant", "content": "an earlier answer"}));
        }
        messages.push(json!({"role": "user", "content": m}));
    }
    json!({"model": "kiln-demo", "max_tokens": 1024, "stream": false,
           "system": format!("Kiln role: {role}\nYou are the {role} of an app-building team."),
           "messages": messages})
}

#[tokio::test]
async fn the_demo_script_answers_every_app_builder_role_and_builds_tickets_with_files() {
    let server = ModelServer::demo();
    let url = format!("{}/v1/messages", server.url());
    let ask = |body: Value| {
        let url = url.clone();
        async move {
            let v: Value = post_json(&url, &body).await;
            assert_eq!(v["model"], "kiln-demo", "{v}");
            v
        }
    };
    let text = |v: &Value| {
        v["content"].as_array().unwrap().iter().filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join("")
    };
    let idea = "A habit tracker for runners";

    // The gatherer asks while it has heard the idea alone, then summarises quoting it.
    let first = text(&ask(step_body("gatherer", &[idea])).await);
    assert!(first.starts_with("[demo model]") && first.contains('?'), "{first}");
    let (_, summary) = kiln_schemas::app::split_summary(&first);
    assert_eq!(summary, None, "a question is no summary: {first}");
    let second = text(&ask(step_body("gatherer", &[idea, "Runners who log a run a day"])).await);
    let (before, summary) = kiln_schemas::app::split_summary(&second);
    let summary = summary.unwrap_or_else(|| panic!("a summary after two user messages: {second}"));
    assert!(summary.contains(&format!("\"{idea}\"")), "the summary quotes the idea: {summary}");
    assert!(summary.contains("Runners who log a run a day"), "{summary}");
    assert!(before.starts_with("[demo model]"), "{before}");
    // Asked to summarise, it does, however short the chat.
    let forced = text(&ask(step_body("gatherer", &[idea, "Summarise now: write REQUIREMENTS_SUMMARY."])).await);
    assert!(kiln_schemas::app::split_summary(&forced).1.is_some_and(|s| s.contains(idea)), "{forced}");

    // The executives, the last of whom agrees.
    let ceo = text(&ask(step_body("ceo", &[idea])).await);
    let cto = text(&ask(step_body("cto", &[idea])).await);
    let secretary = text(&ask(step_body("secretary", &[idea])).await);
    assert!(ceo.contains("CEO:") && cto.contains("CTO:") && secretary.contains("Secretary:"), "{ceo}\n{cto}\n{secretary}");
    assert!(!ceo.contains("CONSENSUS") && !cto.contains("CONSENSUS") && secretary.contains("CONSENSUS"));

    // The PRD: markdown, then the spec.
    let prd = text(&ask(step_body("prd", &[&format!("Write the PRD.\n{idea}")])).await);
    assert!(prd.contains("# Product requirements"), "{prd}");
    let spec = fenced_json(&prd);
    assert!(spec["name"].is_string() && spec["pages"].is_array() && spec["features"].is_array(), "{spec}");

    // The backlog: an epic and two stories, the second after the first.
    let tickets = text(&ask(step_body("tickets", &["Write the backlog."])).await);
    let backlog = fenced_json(&tickets);
    let parsed: Vec<kiln_schemas::app::Ticket> = backlog["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            serde_json::from_value(json!({"id": t["id"], "parent_id": t["parent"], "type": t["type"], "title": t["title"],
                "description": t["description"], "status": "todo", "dependencies": t["dependencies"]}))
            .unwrap()
        })
        .collect();
    let order: Vec<&str> =
        kiln_schemas::app::build_order(&parsed).unwrap().into_iter().map(|i| parsed[i].id.as_str()).collect();
    assert_eq!(order, ["S1", "S2"]);
    assert_eq!(backlog["tickets"][2]["dependencies"], json!(["S1"]));

    // A ticket build: the agent CLI is told to write the ticket's file, then says it built it.
    let build = |id: &str, title: &str| {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": false,
               "system": [{"type": "text", "text": "You are Claude Code."}],
               "tools": [{"name": "Write", "input_schema": {}}, {"name": "Bash", "input_schema": {}}],
               "messages": [
                   {"role": "user", "content": format!("<system-reminder>x</system-reminder>\nTicket: {title}\nTicket id: {id}\n\nDo it.")},
                   {"role": "system", "content": "Primary working directory: /app"}]})
    };
    let mut written = vec![];
    for (id, title, file) in [("S1", "Page skeleton", "/app/index.html"), ("S2", "List behaviour", "/app/app.js"), ("S9", "Docs", "/app/S9.md")] {
        let body = build(id, title);
        let answer = ask(body.clone()).await;
        let call = answer["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").cloned().expect("a tool call");
        assert_eq!(call["name"], "Write", "{answer}");
        assert_eq!(call["input"]["file_path"], file, "{answer}");
        let content = call["input"]["content"].as_str().unwrap().to_string();
        assert!(content.contains(&format!("ticket {id}: {title}")) || content.contains(&format!("Ticket {id}: {title}")), "{content}");
        written.push(content);
        let mut messages = body["messages"].as_array().unwrap().clone();
        messages.push(json!({"role": "assistant", "content": answer["content"]}));
        messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "File created"}]}));
        let done = text(&ask(json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "tools": body["tools"], "messages": messages})).await);
        assert_eq!(done, format!("[demo model] Built ticket {id}: {title}."));
    }
    assert!(written[0].contains("<script src=\"app.js\">"), "{}", written[0]);

    // The same roles over OpenAI chat completions (system messages carry the role there).
    let o: Value = post_json(
        &format!("{}/chat/completions", server.openai_base_url()),
        &json!({"model": "kiln-demo", "messages": [
            {"role": "system", "content": "Kiln role: cto\nYou are the CTO."}, {"role": "user", "content": idea}]}),
    )
    .await;
    assert!(o["choices"][0]["message"]["content"].as_str().unwrap().contains("CTO:"), "{o}");

    let rules: Vec<String> = server.requests().iter().filter_map(|r| r.rule.clone()).collect();
    assert_eq!(
        rules,
        [
            "demo-gatherer-question", "demo-gatherer-summary", "demo-gatherer-summary", "demo-ceo", "demo-cto",
            "demo-secretary", "demo-prd", "demo-tickets", "demo-ticket-page", "demo-ticket-done", "demo-ticket-script",
            "demo-ticket-done", "demo-ticket-other", "demo-ticket-done", "demo-cto"
        ]
    );
}

#[tokio::test]
async fn roles_match_exactly_and_user_messages_are_counted() {
    let server = ModelServer::start(script(json!({"rules": [
        {"name": "ceo", "when": {"role": "ceo"}, "text": "I am {{role}}"},
        {"name": "two-or-more", "when": {"min_user_messages": 2}, "text": "{{prompt_count}} prompts, idea {{idea}}"},
        {"name": "exactly-one", "when": {"user_messages": 1}, "text": "one: {{ticket_id}}/{{ticket_title}}"},
        {"name": "fallback", "text": "none"}
    ]})));
    let url = format!("{}/v1/messages", server.url());
    let answer = |body: Value| {
        let url = url.clone();
        async move {
            let v: Value = post_json(&url, &body).await;
            v["content"][0]["text"].as_str().unwrap_or_default().to_string()
        }
    };
    assert_eq!(answer(step_body("ceo", &["x"])).await, "I am ceo");
    // `role` is the whole value of the line, not a substring of it.
    assert_eq!(answer(step_body("ceo-assistant", &["Ticket: T\nTicket id: S7"])).await, "one: S7/T");
    let mut no_role = step_body("x", &["An idea\nmore", "b", "c"]);
    no_role["system"] = json!("You are nobody.");
    assert_eq!(answer(no_role).await, "3 prompts, idea An idea");
    // Tool results alone are no user message.
    let tool_only = json!({"model": "m", "messages": [
        {"role": "user", "content": "only"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]});
    assert_eq!(answer(tool_only).await, "one: /");
}
