//! [`Api`]: a small JSON-over-HTTP client for the edge's REST faces, answering status and body so
//! tests can assert on both.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A password the edge's strength check accepts.
pub const PASSWORD: &str = "Correct-Horse-9";

/// `<prefix>-<uuid>@example.com`: every test user is new.
pub fn unique_email(prefix: &str) -> String {
    format!("{prefix}-{}@example.com", uuid::Uuid::new_v4().simple())
}

#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("building an HTTP client");
        Api { base: base.trim_end_matches('/').to_string(), http }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `json` (if any) to `path` with `Authorization: Bearer <token>` (if any). The body of
    /// the answer is parsed as JSON; a body that is not JSON comes back as a string, an empty one
    /// as `null`.
    pub async fn send(&self, method: Method, path: &str, token: Option<&str>, json: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(body) = json {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        Self::read(resp).await
    }

    /// Sends raw bytes with an explicit content type and `Authorization` header value (for bad
    /// input: malformed JSON, odd auth schemes).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base)).body(body);
        if let Some(a) = authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        Self::read(resp).await
    }

    /// Sends `json` (if any) to `path` with extra request headers (`Origin`, `CF-Connecting-IP`,
    /// `Authorization`, ...), answering the status, the answer's headers and its body (read as
    /// [`Api::send`] reads it).
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        json: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = json {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let headers = resp.headers().clone();
        let (status, body) = Self::read(resp).await;
        (status, headers, body)
    }

    async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, json: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(token), Some(json)).await
    }

    /// `POST /api/auth/register/` with `{email, password}`.
    pub async fn register(&self, email: &str, password: &str) -> (StatusCode, Value) {
        self.send(Method::POST, "/api/auth/register/", None, Some(json!({"email": email, "password": password})))
            .await
    }

    /// `POST /api/auth/login/` with `{email, password}`.
    pub async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        self.send(Method::POST, "/api/auth/login/", None, Some(json!({"email": email, "password": password})))
            .await
    }

    /// Registers `email` with [`PASSWORD`], logs in, and answers `(access, refresh)`.
    pub async fn register_and_login(&self, email: &str) -> (String, String) {
        let (status, body) = self.register(email, PASSWORD).await;
        assert!(status.is_success(), "register {email}: {status} {body}");
        let (status, body) = self.login(email, PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "login {email}: {body}");
        let field = |k: &str| {
            body[k].as_str().unwrap_or_else(|| panic!("login answered no {k:?}: {body}")).to_string()
        };
        (field("access"), field("refresh"))
    }

    /// A fresh user's access token.
    pub async fn new_user(&self, prefix: &str) -> String {
        self.register_and_login(&unique_email(prefix)).await.0
    }

    /// `POST /jobs` with `body`, asserting success; answers the created job's response.
    pub async fn create_job(&self, token: &str, body: Value) -> Value {
        let (status, created) = self.post("/jobs", token, body.clone()).await;
        assert!(status.is_success(), "POST /jobs {body}: {status} {created}");
        created
    }

    /// `POST /grants` as the service principal (the development `AGENT_API_SECRET`): lets `owner` (a
    /// user id, an email, or `*` for every user) name `repository` (`org/repo` or `org/*`). Asserts
    /// success and answers the grant.
    pub async fn grant(&self, owner: &str, repository: &str) -> Value {
        let body = json!({"owner": owner, "repository": repository});
        let (status, grant) = self.post("/grants", &crate::agent_api_secret(), body.clone()).await;
        assert!(status.is_success(), "POST /grants {body}: {status} {grant}");
        grant
    }

    /// `GET /jobs/:id`, asserting success.
    pub async fn job(&self, token: &str, id: &str) -> Value {
        let (status, job) = self.get(&format!("/jobs/{id}"), token).await;
        assert_eq!(status, StatusCode::OK, "GET /jobs/{id}: {job}");
        job
    }

    /// Polls `GET /jobs/:id` until its status is `want` (panics after `timeout` with the last
    /// answer, messages included).
    pub async fn wait_status(&self, token: &str, id: &str, want: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, job) = self.get(&format!("/jobs/{id}?includeMessages=true"), token).await;
            if status == StatusCode::OK && job["status"] == want {
                return job;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("job {id} did not become {want:?} within {timeout:?}; last answer {status}: {job:#}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
