//! [`LandingClient`]: a client of seed 001's landing-page face as its frontend uses it: a user's
//! JWT, sessions named by `X-Session-Id`, `POST /v1/agent/init|chat`, `GET /v1/jobs/{id}` polled
//! until a terminal status, the SSE stream, cancel, `/v1/landing-pages` and previews fetched
//! without credentials. Calls answer `(status, body)` so tests assert on both; helpers that assert
//! success say so.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{Api, TestEdge};

/// Seed 001's terminal job statuses.
pub const TERMINAL: [&str; 3] = ["completed", "failed", "cancelled"];

/// Seed 001's example init payload with `product` as `campaign.productName` and `extra` appended
/// to the objective (test markers such as `BREAK_BUILD` travel there).
pub fn payload(product: &str, extra: &str) -> Value {
    json!({
        "campaign": {
            "objective": format!("Generate qualified signups for our beta waitlist {extra}").trim().to_string(),
            "productName": product,
            "primaryOffer": "Join the private beta and receive 3 free automation recipes"
        },
        "audience": {
            "description": "Operations leaders at post-Series A SaaS startups",
            "personaKeywords": ["ops", "automation", "scale"],
            "uvp": "Reduce busywork with AI-driven workflows tuned for B2B SaaS teams"
        },
        "messaging": {
            "tone": "confident + helpful",
            "seoKeywords": ["workflow automation", "AI ops tooling"],
            "eventTracking": ["beta-cta", "feature-tour", "playbook-download"]
        },
        "branding": {
            "theme": "dark",
            "colorPalette": {"primary": "#7C3AED", "accent": "#FDE68A", "neutral": "#111827", "raw": "#F9FAFB"},
            "fonts": "General Sans for headings, Inter for body",
            "layoutPreference": "Split hero, storytelling scrollytelling",
            "sections": ["hero", "features", "stats", "pricing", "cta", "faq"]
        }
    })
}

/// A new session id: `<prefix>-<uuid>`.
pub fn session(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// One user of the landing-page face.
#[derive(Clone)]
pub struct LandingClient {
    pub api: Api,
    pub token: String,
    http: reqwest::Client,
}

/// One event of a job's SSE stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

impl LandingClient {
    /// Registers and logs in a new user.
    pub async fn register(edge: &TestEdge, prefix: &str) -> LandingClient {
        let api = edge.api();
        let token = api.new_user(prefix).await;
        LandingClient { api, token, http: reqwest::Client::new() }
    }

    pub async fn send(&self, method: Method, path: &str, session: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut headers = vec![("authorization", format!("Bearer {}", self.token))];
        if let Some(s) = session {
            headers.push(("x-session-id", s.to_string()));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, body) = self.api.send_with(method, path, &headers, body).await;
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None, None).await
    }

    /// `POST /v1/agent/init` on `session` with `payload`, asserting success; answers the answer.
    pub async fn init(&self, session: &str, payload: Value) -> Value {
        let (status, body) = self.send(Method::POST, "/v1/agent/init", Some(session), Some(json!({"payload": payload}))).await;
        assert_eq!(status, StatusCode::OK, "POST /v1/agent/init: {body}");
        assert!(body["job_id"].is_string(), "{body}");
        body
    }

    /// `POST /v1/agent/chat` on `session`, asserting success; answers the job id.
    pub async fn chat(&self, session: &str, message: &str) -> String {
        let (status, body) = self.send(Method::POST, "/v1/agent/chat", Some(session), Some(json!({"message": message}))).await;
        assert_eq!(status, StatusCode::OK, "POST /v1/agent/chat: {body}");
        let id = body["job_id"].as_str().unwrap_or_else(|| panic!("no job_id: {body}")).to_string();
        assert_eq!(body["reply"], format!("Chat job accepted. Poll /v1/jobs/{id} for progress."));
        id
    }

    /// `GET /v1/jobs/{id}`'s `job`, asserting success.
    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "GET /v1/jobs/{id}: {body}");
        body["job"].clone()
    }

    /// Polls `GET /v1/jobs/{id}` (every 250 ms) until `done` holds for the job; panics after
    /// `timeout` with the last answer.
    pub async fn poll_until(&self, id: &str, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("job {id}: no {what} within {timeout:?}; last answer: {job:#}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls until the job is terminal; answers it.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        self.poll_until(id, timeout, "terminal status", |j| TERMINAL.contains(&j["status"].as_str().unwrap_or_default())).await
    }

    /// `POST /v1/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> (StatusCode, Value) {
        self.send(Method::POST, &format!("/v1/jobs/{id}/cancel"), None, None).await
    }

    /// `GET /v1/landing-pages/by-session/{session}`.
    pub async fn page_by_session(&self, session: &str) -> (StatusCode, Value) {
        self.get(&format!("/v1/landing-pages/by-session/{session}")).await
    }

    /// Reads `GET /v1/jobs/{id}/stream` (with `Last-Event-ID` when given) until `stop` holds for
    /// an event, the stream ends, or `timeout` passes; answers the events read.
    pub async fn stream(&self, id: &str, last_event_id: Option<&str>, timeout: Duration, stop: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let url = format!("{}/v1/jobs/{id}/stream", self.api.base());
        let mut req = self.http.get(url).bearer_auth(&self.token).header("accept", "text/event-stream");
        if let Some(l) = last_event_id {
            req = req.header("last-event-id", l);
        }
        let mut resp = req.send().await.unwrap_or_else(|e| panic!("GET /v1/jobs/{id}/stream: {e}"));
        assert_eq!(resp.status(), StatusCode::OK, "GET /v1/jobs/{id}/stream");
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct:?}");
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut buf, mut events) = (String::new(), vec![]);
        loop {
            let chunk = match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Err(_) => return events,
                Ok(Err(e)) => panic!("reading the stream of {id}: {e}"),
                Ok(Ok(None)) => return events,
                Ok(Ok(Some(c))) => c,
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                if let Some(e) = parse_frame(&frame) {
                    let last = stop(&e);
                    events.push(e);
                    if last {
                        return events;
                    }
                }
            }
        }
    }
}

/// One SSE frame (`id:`, `event:`, `data:` lines); comments and data-less frames are none.
pub fn parse_frame(frame: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in frame.lines() {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.strip_prefix(' ').unwrap_or(v);
        match k {
            "id" => id = Some(v.to_string()),
            "event" => event = Some(v.to_string()),
            "data" => data.push(v.to_string()),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    let text = data.join("\n");
    Some(SseEvent { id, event, data: serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

/// `(node, event_type)` of each event of a job.
pub fn steps(job: &Value) -> Vec<(String, String)> {
    events(job)
        .iter()
        .map(|e| (e["node"].as_str().unwrap_or_default().to_string(), e["event_type"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// A job's events.
pub fn events(job: &Value) -> Vec<Value> {
    job["events"].as_array().cloned().unwrap_or_default()
}

/// A preview file fetched without credentials: status, content type, cache control and body.
pub async fn fetch(url: &str) -> (StatusCode, String, String, String) {
    let resp = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let header = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (ct, cc) = (header("content-type"), header("cache-control"));
    (resp.status(), ct, cc, resp.text().await.unwrap_or_default())
}
