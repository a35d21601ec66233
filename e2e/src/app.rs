//! [`AppClient`]: a client of seed 000's app-builder face as its React frontend uses it: a user
//! registered through `/api/auth/register/`, jobs under `/api/jobs/`, the transcript under
//! `/api/job-messages/`, the App, the tickets, the files API and the job's socket
//! (`/ws/jobs/<id>/?token=`). Calls answer `(status, body)` so tests assert on both; helpers that
//! assert success say so.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{unique_email, Api, TestEdge, WsAuth, WsClient, PASSWORD};

/// One user of the app-builder face.
#[derive(Clone)]
pub struct AppClient {
    api: Api,
    ws_base: String,
    pub email: String,
    pub access: String,
    pub refresh: String,
}

impl AppClient {
    /// Registers a new user (`<prefix>-<uuid>@example.com`) with a name, as the frontend does.
    pub async fn register(edge: &TestEdge, prefix: &str) -> AppClient {
        let api = edge.api();
        let email = unique_email(prefix);
        let (status, body) = api
            .send(
                Method::POST,
                "/api/auth/register/",
                None,
                Some(json!({"email": email, "password": PASSWORD, "name": prefix})),
            )
            .await;
        assert!(status.is_success(), "register {email}: {status} {body}");
        let field = |k: &str| body[k].as_str().unwrap_or_else(|| panic!("register answered no {k}: {body}")).to_string();
        AppClient { access: field("access"), refresh: field("refresh"), api, ws_base: edge.ws_url(), email }
    }

    pub fn api(&self) -> &Api {
        &self.api
    }

    pub async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api.send(method, path, Some(&self.access), body).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(body)).await
    }

    /// `POST /api/jobs/ {"prompt"}`, asserting success; answers the job.
    pub async fn create_job(&self, prompt: &str) -> Value {
        let (status, job) = self.post("/api/jobs/", json!({"prompt": prompt})).await;
        assert!(status.is_success(), "POST /api/jobs/: {status} {job}");
        assert!(job["id"].is_string(), "{job}");
        job
    }

    /// `GET /api/jobs/<id>/`, asserting success.
    pub async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get(&format!("/api/jobs/{id}/")).await;
        assert_eq!(status, StatusCode::OK, "GET /api/jobs/{id}/: {job}");
        job
    }

    /// `GET /api/job-messages/?job_id=`, asserting success and a plain array.
    pub async fn messages(&self, job_id: &str) -> Vec<Value> {
        let (status, list) = self.get(&format!("/api/job-messages/?job_id={job_id}")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array().unwrap_or_else(|| panic!("job-messages is a plain array: {list}")).clone()
    }

    /// `GET /api/tickets/?job_id=`, asserting success and a plain array.
    pub async fn tickets(&self, job_id: &str) -> Vec<Value> {
        let (status, list) = self.get(&format!("/api/tickets/?job_id={job_id}")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array().unwrap_or_else(|| panic!("tickets is a plain array: {list}")).clone()
    }

    /// `GET /api/apps/by-job/<job_id>/` (204 while the job has no App).
    pub async fn app_by_job(&self, job_id: &str) -> (StatusCode, Value) {
        self.get(&format!("/api/apps/by-job/{job_id}/")).await
    }

    /// `GET /api/jobs/<id>/files/structure/?path=<path>` (path percent-encoded).
    pub async fn structure(&self, job_id: &str, path: &str) -> (StatusCode, Value) {
        self.get(&format!("/api/jobs/{job_id}/files/structure/?path={}", encode(path))).await
    }

    /// `GET /api/jobs/<id>/files/content/?path=<path>` (path percent-encoded).
    pub async fn content(&self, job_id: &str, path: &str) -> (StatusCode, Value) {
        self.get(&format!("/api/jobs/{job_id}/files/content/?path={}", encode(path))).await
    }

    /// The text of a workspace file, asserting the files API answered it.
    pub async fn file(&self, job_id: &str, path: &str) -> String {
        let (status, body) = self.content(job_id, path).await;
        assert_eq!(status, StatusCode::OK, "files/content/ {path}: {body}");
        assert_eq!(body["path"], path, "{body}");
        let content = body["content"].as_str().unwrap_or_else(|| panic!("no content: {body}")).to_string();
        assert_eq!(body["size"].as_u64(), Some(content.len() as u64), "{body}");
        content
    }

    /// `POST /api/jobs/<id>/<action>/` (`pause`, `resume`), asserting success.
    pub async fn action(&self, job_id: &str, action: &str) -> Value {
        let (status, body) = self.post(&format!("/api/jobs/{job_id}/{action}/"), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{action}: {body}");
        body
    }

    /// Polls `GET /api/jobs/<id>/` until its status is `want`; panics after `timeout`, or as soon
    /// as the job is `failed` when `failed` is not what is wanted (with its error_message).
    pub async fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, job) = self.get(&format!("/api/jobs/{id}/")).await;
            if status == StatusCode::OK && job["status"] == want {
                return job;
            }
            if status == StatusCode::OK && job["status"] == "failed" && want != "failed" {
                panic!("job {id} failed while waiting for {want:?}: {:?}\n{job:#}", job["error_message"]);
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("job {id} did not become {want:?} within {timeout:?}; last answer {status}: {job:#}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Opens the job's socket the way the frontend does: `?token=` on `/ws/jobs/<id>/`.
    pub async fn socket(&self, job_id: &str) -> WsClient {
        WsClient::connect(&self.ws_base, job_id, WsAuth::Query(&self.access), None)
            .await
            .unwrap_or_else(|r| panic!("the job's socket was refused: {} {}", r.status, r.body))
    }
}

/// `{"kind": "chat", "content"}`: what the frontend sends on the socket.
pub fn chat(content: &str) -> Value {
    json!({"kind": "chat", "content": content})
}

/// Percent-encodes a query value (everything but unreserved characters and `/`).
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Every entry of a `files/structure/` tree, depth first: (path, type).
pub fn entries(structure: &Value) -> Vec<(String, String)> {
    fn walk(list: &Value, out: &mut Vec<(String, String)>) {
        for e in list.as_array().into_iter().flatten() {
            out.push((e["path"].as_str().unwrap_or_default().to_string(), e["type"].as_str().unwrap_or_default().to_string()));
            if let Some(children) = e.get("children") {
                walk(children, out);
            }
        }
    }
    let mut out = vec![];
    walk(&structure["structure"], &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded_and_trees_flattened() {
        assert_eq!(encode("/app/a b/../x?y&z"), "/app/a%20b/../x%3Fy%26z");
        let tree = json!({"structure": [
            {"name": "src", "path": "/app/src", "type": "directory", "children": [
                {"name": "a.js", "path": "/app/src/a.js", "type": "file", "size": 3}]},
            {"name": "index.html", "path": "/app/index.html", "type": "file", "size": 9}]});
        assert_eq!(
            entries(&tree),
            [
                ("/app/src".to_string(), "directory".to_string()),
                ("/app/src/a.js".to_string(), "file".to_string()),
                ("/app/index.html".to_string(), "file".to_string())
            ]
        );
    }
}
