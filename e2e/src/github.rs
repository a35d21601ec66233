//! [`FakeGitHub`]: a local stand-in for GitHub's pulls and issue comments endpoints
//! (`GITHUB_API_URL`), strict about the token and the body like the real one, recording every call
//! for the tests to inspect.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// One `POST /repos/{owner}/{repo}/pulls`, accepted or not.
#[derive(Debug, Clone)]
pub struct PullRequestCall {
    pub owner: String,
    pub repo: String,
    /// The token of the `Authorization` header (`Bearer` or `token` scheme).
    pub token: Option<String>,
    pub body: Value,
    /// What the fake answered.
    pub status: u16,
    /// The pull request's number when it was created.
    pub number: Option<u64>,
}

/// One `POST /repos/{owner}/{repo}/issues/{number}/comments`, accepted or not.
#[derive(Debug, Clone)]
pub struct CommentCall {
    pub owner: String,
    pub repo: String,
    pub number: u64,
    pub token: Option<String>,
    pub body: Value,
    /// What the fake answered.
    pub status: u16,
}

#[derive(Default)]
struct Shared {
    token: String,
    calls: Vec<PullRequestCall>,
    created: Vec<Value>,
    comments: Vec<CommentCall>,
}

pub struct FakeGitHub {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeGitHub {
    /// Serves on 127.0.0.1 (a free port) from a thread of its own, so it outlives any one test's
    /// runtime; accepts only `token`.
    pub fn start(token: &str) -> FakeGitHub {
        let shared = Arc::new(Mutex::new(Shared { token: token.to_string(), ..Default::default() }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the fake GitHub");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let addr = listener.local_addr().expect("its address");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/repos/{owner}/{repo}/pulls", post(create_pull).get(list_pulls))
            .route("/repos/{owner}/{repo}/issues/{number}/comments", post(create_comment))
            .with_state(shared.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .expect("serving the fake GitHub");
            });
        });
        FakeGitHub { addr, shared, shutdown: Some(tx), thread: Some(thread) }
    }

    /// The value for `GITHUB_API_URL`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<PullRequestCall> {
        self.shared.lock().expect("lock").calls.clone()
    }

    /// Every issue comment call so far, in order.
    pub fn comments(&self) -> Vec<CommentCall> {
        self.shared.lock().expect("lock").comments.clone()
    }

    /// The calls that created a pull request.
    pub fn created(&self) -> Vec<PullRequestCall> {
        self.calls().into_iter().filter(|c| c.status == 201).collect()
    }
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("token ")).map(|t| t.trim().to_string())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"message": message, "documentation_url": "https://docs.github.com/rest"}))).into_response()
}

/// `POST /repos/{owner}/{repo}/pulls` with `{title, head, base, body?, draft?}`.
async fn create_pull(
    State(shared): State<Arc<Mutex<Shared>>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let token = bearer(&headers);
    let body = body.map(|Json(v)| v).unwrap_or(Value::Null);
    let mut s = shared.lock().expect("lock");
    let mut record = PullRequestCall { owner: owner.clone(), repo: repo.clone(), token: token.clone(), body: body.clone(), status: 0, number: None };

    let resp = if token.as_deref() != Some(s.token.as_str()) {
        record.status = 401;
        error(StatusCode::UNAUTHORIZED, "Bad credentials")
    } else {
        let field = |k: &str| body.get(k).and_then(Value::as_str).filter(|v| !v.trim().is_empty());
        match (field("title"), field("head"), field("base")) {
            (Some(title), Some(head), Some(base)) => {
                // `head` may be `owner:branch`.
                let head_branch = head.rsplit(':').next().unwrap_or(head);
                if head_branch == base {
                    record.status = 422;
                    error(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed: head and base are the same branch")
                } else {
                    let number = s.created.len() as u64 + 1;
                    let pr = json!({
                        "id": 1000 + number,
                        "number": number,
                        "state": "open",
                        "title": title,
                        "body": body.get("body").cloned().unwrap_or(Value::Null),
                        "draft": body.get("draft").cloned().unwrap_or(json!(false)),
                        "html_url": format!("https://github.com/{owner}/{repo}/pull/{number}"),
                        "url": format!("https://api.github.com/repos/{owner}/{repo}/pulls/{number}"),
                        "head": {"ref": head_branch, "label": head},
                        "base": {"ref": base},
                    });
                    s.created.push(pr.clone());
                    record.status = 201;
                    record.number = Some(number);
                    (StatusCode::CREATED, Json(pr)).into_response()
                }
            }
            _ => {
                record.status = 422;
                error(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed: title, head and base are required")
            }
        }
    };
    s.calls.push(record);
    resp
}

/// `GET /repos/{owner}/{repo}/pulls?head=owner:branch`: the pull requests created so far.
async fn list_pulls(
    State(shared): State<Arc<Mutex<Shared>>>,
    Path((owner, repo)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let s = shared.lock().expect("lock");
    if bearer(&headers).as_deref() != Some(s.token.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "Bad credentials");
    }
    let prefix = format!("https://github.com/{owner}/{repo}/pull/");
    let head = q.get("head").map(|h| h.rsplit(':').next().unwrap_or(h).to_string());
    let list: Vec<Value> = s
        .created
        .iter()
        .filter(|pr| pr["html_url"].as_str().is_some_and(|u| u.starts_with(&prefix)))
        .filter(|pr| head.as_ref().is_none_or(|h| pr["head"]["ref"] == h.as_str()))
        .cloned()
        .collect();
    Json(list).into_response()
}

/// `POST /repos/{owner}/{repo}/issues/{number}/comments` with `{body}` (a non-empty string).
async fn create_comment(
    State(shared): State<Arc<Mutex<Shared>>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let token = bearer(&headers);
    let body = body.map(|Json(v)| v).unwrap_or(Value::Null);
    let mut s = shared.lock().expect("lock");
    let mut record = CommentCall { owner: owner.clone(), repo: repo.clone(), number, token: token.clone(), body: body.clone(), status: 0 };
    let resp = if token.as_deref() != Some(s.token.as_str()) {
        record.status = 401;
        error(StatusCode::UNAUTHORIZED, "Bad credentials")
    } else if body.get("body").and_then(Value::as_str).is_none_or(|b| b.trim().is_empty()) {
        record.status = 422;
        error(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed: body is required")
    } else {
        let id = 5000 + s.comments.len() as u64 + 1;
        record.status = 201;
        let comment = json!({
            "id": id,
            "body": body["body"],
            "html_url": format!("https://github.com/{owner}/{repo}/issues/{number}#issuecomment-{id}"),
            "issue_url": format!("https://api.github.com/repos/{owner}/{repo}/issues/{number}"),
        });
        (StatusCode::CREATED, Json(comment)).into_response()
    };
    s.comments.push(record);
    resp
}
