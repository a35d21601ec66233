//! The HTTP side: routes, the request log, the choice of a rule and the writing of its answer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::anthropic;
use super::conversation::{Api, Conversation, MessageSummary};
use super::openai;
use super::responses;
use super::script::{choose, Answer, Counters, Script};

/// One request the server received, whatever it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// 1, 2, 3… in arrival order.
    pub seq: u64,
    /// Milliseconds since the server started.
    pub at_ms: u64,
    pub method: String,
    /// The path and query (`/v1/messages?beta=true`).
    pub path: String,
    /// The wire format, for chat requests.
    pub api: Option<Api>,
    pub model: Option<String>,
    pub stream: bool,
    /// The system prompt (see [`Conversation::system`]).
    pub system: String,
    pub messages: Vec<MessageSummary>,
    /// The last user message that has text.
    pub prompt: String,
    /// How many assistant messages the request held.
    pub turn: u32,
    /// The names of the tools offered.
    pub tools: Vec<String>,
    /// The rule that answered (its name or `#index`).
    pub rule: Option<String>,
    /// The status answered.
    pub status: u16,
    /// The key sent (`x-api-key`, or the bearer token of `Authorization`).
    pub api_key: Option<String>,
    /// The other headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The request body as JSON (`null` when it was not JSON; left out of `GET /_kiln/requests`
    /// unless `?full=1`).
    pub body: Value,
}

struct Shared {
    script: Script,
    counters: Vec<Counters>,
    requests: Vec<RecordedRequest>,
    next_id: u64,
    started: Instant,
    /// Print a line per request on stderr.
    log: bool,
}

type AppState = Arc<Mutex<Shared>>;

/// A piece of a streamed answer.
pub(super) enum Step {
    Bytes(Bytes),
    Sleep(Duration),
    /// The middle of the stream: where `stall_mid_ms`, `error_mid_stream` and `cut_mid_stream` act.
    Mid,
}

/// What happens at a stream's [`Step::Mid`].
struct AtMid {
    stall: Duration,
    /// Bytes to send there before ending the stream (an error event).
    error: Option<Bytes>,
    /// Break the connection there.
    cut: bool,
}

/// A server's shared state, held by the handle.
#[derive(Clone)]
pub(super) struct ServerState(AppState);

impl ServerState {
    pub fn new(script: Script) -> ServerState {
        let counters = vec![Counters::default(); script.rules.len()];
        ServerState(Arc::new(Mutex::new(Shared {
            script,
            counters,
            requests: vec![],
            next_id: 0,
            started: Instant::now(),
            log: false,
        })))
    }

    /// Prints a line per request on stderr from now on.
    pub fn log_requests(&self) {
        self.0.lock().expect("lock").log = true;
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.0.lock().expect("lock").requests.clone()
    }

    pub fn clear_requests(&self) {
        self.0.lock().expect("lock").requests.clear();
    }

    pub fn set_script(&self, script: Script) {
        let mut s = self.0.lock().expect("lock");
        s.counters = vec![Counters::default(); script.rules.len()];
        s.script = script;
    }

    pub fn script(&self) -> Script {
        self.0.lock().expect("lock").script.clone()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/v1/messages",
                post(
                    |State(s): State<AppState>, m: Method, u: Uri, h: HeaderMap, b: Bytes| {
                        chat(Api::Anthropic, s, m, u, h, b)
                    },
                ),
            )
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route(
                "/v1/chat/completions",
                post(
                    |State(s): State<AppState>, m: Method, u: Uri, h: HeaderMap, b: Bytes| {
                        chat(Api::Openai, s, m, u, h, b)
                    },
                ),
            )
            .route(
                "/v1/responses",
                post(
                    |State(s): State<AppState>, m: Method, u: Uri, h: HeaderMap, b: Bytes| {
                        chat(Api::Responses, s, m, u, h, b)
                    },
                ),
            )
            .route("/v1/models", get(models))
            .route("/v1/models/{id}", get(model))
            .route("/api/hello", axum::routing::any(hello))
            .route(
                "/_kiln/requests",
                get(list_requests).delete(delete_requests),
            )
            .route("/_kiln/script", get(get_script).put(put_script))
            .fallback(not_found)
            .with_state(self.0.clone())
    }
}

/// Serves `state` on `listener` until `shutdown` resolves. Not a graceful stop: a stalled answer
/// must not hold it up, so the caller drops the runtime with the connections in it.
pub(super) async fn serve_state(
    listener: tokio::net::TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Answers go out as written: without TCP_NODELAY a reused connection's small writes wait on
    // Nagle and the client's delayed ACK (tens of ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::select! {
        served = axum::serve(listener, state.router()) => served,
        () = shutdown => Ok(()),
    }
}

fn api_key(headers: &HeaderMap) -> Option<String> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.to_string());
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    auth.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

/// The request line and headers of a request being recorded.
struct Incoming<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

/// Records a request; returns its id number.
fn record(
    s: &mut Shared,
    Incoming {
        method,
        uri,
        headers,
    }: &Incoming,
    body: Value,
    c: Option<&Conversation>,
    rule: Option<String>,
    status: u16,
) -> u64 {
    s.next_id += 1;
    let seq = s.requests.len() as u64 + 1;
    let headers_map = headers
        .iter()
        .filter(|(k, _)| *k != "x-api-key" && *k != "authorization")
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    s.requests.push(RecordedRequest {
        seq,
        at_ms: s.started.elapsed().as_millis() as u64,
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| uri.path().to_string()),
        api: c.map(|c| c.api),
        model: c.map(|c| c.model.clone()),
        stream: c.is_some_and(|c| c.stream),
        system: c.map(|c| c.system.clone()).unwrap_or_default(),
        messages: c.map(|c| c.messages.clone()).unwrap_or_default(),
        prompt: c.map(|c| c.prompt()).unwrap_or_default(),
        turn: c.map(|c| c.turn()).unwrap_or_default(),
        tools: c.map(|c| c.tools.clone()).unwrap_or_default(),
        rule,
        status,
        api_key: api_key(headers),
        headers: headers_map,
        body,
    });
    if s.log {
        let r = s.requests.last().expect("just recorded");
        eprintln!(
            "{} {} {} model={} turn={} rule={} -> {} prompt={:?}",
            r.at_ms,
            r.method,
            r.path,
            r.model.as_deref().unwrap_or("-"),
            r.turn,
            r.rule.as_deref().unwrap_or("-"),
            r.status,
            r.prompt.chars().take(80).collect::<String>()
        );
    }
    s.next_id
}

fn error_response(
    api: Api,
    status: u16,
    kind: Option<&str>,
    message: &str,
    retry_after: Option<u64>,
    id: u64,
) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match api {
        Api::Anthropic => {
            anthropic::error_body(kind.unwrap_or(anthropic::error_type(status)), message)
        }
        Api::Openai | Api::Responses => {
            let (default_kind, default_code) = openai::error_kind(status);
            openai::error_body(kind.unwrap_or(default_kind), default_code, message)
        }
    };
    let mut resp = (code, Json(body)).into_response();
    let h = resp.headers_mut();
    if let Some(secs) = retry_after {
        h.insert("retry-after", HeaderValue::from(secs));
    }
    h.insert("request-id", request_id(id));
    resp
}

fn request_id(id: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("req_kiln_{id:016}")).expect("an ASCII header value")
}

fn default_message(status: u16) -> &'static str {
    match status {
        429 => "Rate limited by the Kiln model server's script.",
        529 => "Overloaded (the Kiln model server's script says so).",
        401 => "Invalid API key.",
        _ => "Error injected by the Kiln model server's script.",
    }
}

fn parse_json(body: &Bytes) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))
}

async fn chat(
    api: Api,
    state: AppState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inc = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let raw = parse_json(&body);
    let json = raw.clone().unwrap_or(Value::Null);
    let convo = raw.and_then(|v| match api {
        Api::Anthropic => Conversation::anthropic(&v),
        Api::Openai => Conversation::openai(&v),
        Api::Responses => Conversation::responses(&v),
    });
    let c = match convo {
        Ok(c) => c,
        Err(e) => {
            let id = record(
                &mut state.lock().expect("lock"),
                &inc,
                json,
                None,
                None,
                400,
            );
            return error_response(api, 400, None, &e, None, id);
        }
    };

    // Choose and record under one lock, so concurrent requests count in a single order.
    let (plan, id) = {
        let mut s = state.lock().expect("lock");
        let s = &mut *s;
        if let Some(expected) = &s.script.api_key {
            if api_key(&headers).as_deref() != Some(expected.as_str()) {
                let id = record(s, &inc, json, Some(&c), None, 401);
                return error_response(api, 401, None, default_message(401), None, id);
            }
        }
        match choose(&s.script, &mut s.counters, &c) {
            None => {
                let id = record(s, &inc, json, Some(&c), None, 400);
                let msg = format!(
                    "no rule of the Kiln model server's script matches this request (prompt: {:?})",
                    c.prompt()
                );
                return error_response(api, 400, None, &msg, None, id);
            }
            Some(choice) => {
                let rule = s.script.rules[choice.index].clone();
                // A mid-stream error still answers 200 and streams the text before it.
                let error_mid = choice.fail && rule.error_mid_stream && c.stream;
                let status = if choice.fail && !error_mid {
                    rule.error.as_ref().map_or(500, |e| e.status)
                } else {
                    200
                };
                let id = record(
                    s,
                    &inc,
                    json,
                    Some(&c),
                    Some(rule.label(choice.index)),
                    status,
                );
                let answer = (!choice.fail || error_mid)
                    .then(|| Answer::new(&rule, &s.script, &c, choice.answered_before));
                ((rule, answer, error_mid), id)
            }
        }
    };
    let (rule, answer, error_mid) = plan;
    if !rule.stall_before().is_zero() {
        tokio::time::sleep(rule.stall_before()).await;
    }
    let error_of_rule = || {
        let e = rule.error.as_ref().expect("a failing rule has an error");
        let message = e
            .message
            .clone()
            .unwrap_or_else(|| default_message(e.status).to_string());
        (e, message)
    };
    let Some(answer) = answer else {
        let (e, message) = error_of_rule();
        return error_response(
            api,
            e.status,
            e.kind.as_deref(),
            &message,
            e.retry_after,
            id,
        );
    };

    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (msg_id, tool_ids): (String, Vec<String>) = match api {
        Api::Anthropic => (
            format!("msg_kiln_{id:016}"),
            (0..answer.tool_calls.len())
                .map(|i| format!("toolu_kiln_{id:08}_{i}"))
                .collect(),
        ),
        Api::Openai => (
            format!("chatcmpl-kiln-{id:016}"),
            (0..answer.tool_calls.len())
                .map(|i| format!("call_kiln_{id:08}_{i}"))
                .collect(),
        ),
        Api::Responses => (
            format!("resp_kiln_{id:016}"),
            (0..answer.tool_calls.len())
                .map(|i| format!("call_kiln_{id:08}_{i}"))
                .collect(),
        ),
    };
    let mut resp = if c.stream {
        let steps = match api {
            Api::Anthropic => anthropic::stream(&answer, &msg_id, &tool_ids),
            Api::Openai => openai::stream(&answer, &msg_id, &tool_ids, created, c.include_usage),
            Api::Responses => responses::stream(&answer, &msg_id, &tool_ids, created),
        };
        let error = error_mid.then(|| {
            let (e, message) = error_of_rule();
            let frame = match api {
                Api::Anthropic => format!(
                    "event: error\ndata: {}\n\n",
                    anthropic::error_body(
                        e.kind.as_deref().unwrap_or(anthropic::error_type(e.status)),
                        &message
                    )
                ),
                Api::Openai => {
                    let (kind, code) = openai::error_kind(e.status);
                    format!(
                        "data: {}\n\n",
                        openai::error_body(e.kind.as_deref().unwrap_or(kind), code, &message)
                    )
                }
                Api::Responses => {
                    let (kind, code) = openai::error_kind(e.status);
                    let code = e.kind.as_deref().or(code).unwrap_or(kind);
                    responses::failed_event(&msg_id, &answer.model, code, &message)
                }
            };
            Bytes::from(frame)
        });
        let at_mid = AtMid {
            stall: Duration::from_millis(rule.stall_mid_ms),
            error,
            cut: rule.cut_mid_stream,
        };
        let mut resp = Response::new(stream_body(steps, at_mid));
        let h = resp.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        resp
    } else {
        let body = match api {
            Api::Anthropic => anthropic::message(&answer, &msg_id, &tool_ids),
            Api::Openai => openai::completion(&answer, &msg_id, &tool_ids, created),
            Api::Responses => responses::response_object(&answer, &msg_id, &tool_ids, created),
        };
        Json(body).into_response()
    };
    resp.headers_mut().insert("request-id", request_id(id));
    resp
}

/// A body that writes `steps` as they come, sleeping where they say; it stops when the client goes.
fn stream_body(steps: Vec<Step>, at_mid: AtMid) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        for step in steps {
            let item = match step {
                Step::Sleep(d) => {
                    if !d.is_zero() {
                        tokio::time::sleep(d).await;
                    }
                    continue;
                }
                Step::Bytes(b) => Ok(b),
                Step::Mid => {
                    if !at_mid.stall.is_zero() {
                        tokio::time::sleep(at_mid.stall).await;
                    }
                    if at_mid.cut {
                        // Let what was sent be flushed first (the body answers Pending meanwhile);
                        // then an error item makes hyper drop the connection without ending it.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = tx
                            .send(Err(std::io::Error::other("cut by the script")))
                            .await;
                        return;
                    }
                    match &at_mid.error {
                        Some(frame) => {
                            let _ = tx.send(Ok(frame.clone())).await;
                            return;
                        }
                        None => continue,
                    }
                }
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (b, rx))
    }))
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": n}`, the same estimate as the answers'.
async fn count_tokens(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inc = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let raw = parse_json(&body);
    let json = raw.clone().unwrap_or(Value::Null);
    let mut s = state.lock().expect("lock");
    match raw.and_then(|v| Conversation::anthropic(&v)) {
        Ok(c) => {
            record(&mut s, &inc, json, Some(&c), None, 200);
            Json(json!({"input_tokens": c.input_tokens()})).into_response()
        }
        Err(e) => {
            let id = record(&mut s, &inc, json, None, None, 400);
            error_response(Api::Anthropic, 400, None, &e, None, id)
        }
    }
}

fn listed_models(s: &Shared) -> Vec<String> {
    let mut names: Vec<String> = s.script.model.iter().cloned().collect();
    for r in &s.script.rules {
        for m in r.model.iter().chain(r.when.model.iter()) {
            if !names.contains(m) {
                names.push(m.clone());
            }
        }
    }
    if names.is_empty() {
        names.push("kiln-model".into());
    }
    names
}

fn model_object(anthropic: bool, id: &str) -> Value {
    if anthropic {
        json!({"type": "model", "id": id, "display_name": id, "created_at": "2026-01-01T00:00:00Z"})
    } else {
        json!({"id": id, "object": "model", "created": 1767225600, "owned_by": "kiln"})
    }
}

/// `GET /v1/models`: Anthropic's list when the request carries `anthropic-version`, else OpenAI's.
async fn models(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let inc = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let mut s = state.lock().expect("lock");
    record(&mut s, &inc, Value::Null, None, None, 200);
    let anthropic = headers.contains_key("anthropic-version");
    let data: Vec<Value> = listed_models(&s)
        .iter()
        .map(|m| model_object(anthropic, m))
        .collect();
    if anthropic {
        let first = data.first().map(|m| m["id"].clone());
        let last = data.last().map(|m| m["id"].clone());
        Json(json!({"data": data, "has_more": false, "first_id": first, "last_id": last}))
            .into_response()
    } else {
        Json(json!({"object": "list", "data": data})).into_response()
    }
}

/// `GET /v1/models/{id}`: any model is known.
async fn model(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let inc = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let mut s = state.lock().expect("lock");
    record(&mut s, &inc, Value::Null, None, None, 200);
    let id = uri.path().trim_start_matches("/v1/models/").to_string();
    Json(model_object(headers.contains_key("anthropic-version"), &id)).into_response()
}

/// Claude Code's connectivity check (`HEAD /api/hello`, unless non-essential traffic is off).
async fn hello(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> StatusCode {
    let inc = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    record(
        &mut state.lock().expect("lock"),
        &inc,
        Value::Null,
        None,
        None,
        200,
    );
    StatusCode::OK
}

#[derive(Deserialize)]
struct ListQuery {
    full: Option<String>,
}

/// `GET /_kiln/requests[?full=1]`: the request log (bodies only with `full`).
async fn list_requests(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let full = q.full.as_deref().is_some_and(|f| f == "1" || f == "true");
    let mut list = state.lock().expect("lock").requests.clone();
    if !full {
        for r in &mut list {
            r.body = Value::Null;
        }
    }
    Json(list).into_response()
}

async fn delete_requests(State(state): State<AppState>) -> StatusCode {
    state.lock().expect("lock").requests.clear();
    StatusCode::NO_CONTENT
}

async fn get_script(State(state): State<AppState>) -> Response {
    Json(state.lock().expect("lock").script.clone()).into_response()
}

/// `PUT /_kiln/script`: replaces the script (counters start again).
async fn put_script(State(state): State<AppState>, body: Bytes) -> Response {
    let parsed = std::str::from_utf8(&body)
        .map_err(anyhow::Error::from)
        .and_then(Script::parse);
    match parsed {
        Ok(script) => {
            ServerState(state).set_script(script);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{e:#}")})),
        )
            .into_response(),
    }
}

/// Any other path: recorded (to learn what a client asks for) and answered 404 in Anthropic's shape.
async fn not_found(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inc = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let json = parse_json(&body).unwrap_or(Value::Null);
    let id = record(
        &mut state.lock().expect("lock"),
        &inc,
        json,
        None,
        None,
        404,
    );
    let api = if uri.path().contains("/chat/") || uri.path().contains("/responses") {
        Api::Openai
    } else {
        Api::Anthropic
    };
    error_response(
        api,
        404,
        None,
        &format!(
            "the Kiln model server does not serve {method} {}",
            uri.path()
        ),
        None,
        id,
    )
}
