//! A fake GitHub REST API: `POST /repos/{org}/{repo}/pulls` records the request and answers like
//! GitHub (201 with `html_url`).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct PullRequestCall {
    pub org: String,
    pub repo: String,
    pub authorization: Option<String>,
    pub accept: Option<String>,
    pub user_agent: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct State_ {
    calls: Mutex<Vec<PullRequestCall>>,
}

pub struct FakeGithub {
    pub url: String,
    state: Arc<State_>,
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn create_pull(
    State(s): State<Arc<State_>>,
    Path((org, repo)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut calls = s.calls.lock().unwrap();
    calls.push(PullRequestCall {
        org: org.clone(),
        repo: repo.clone(),
        authorization: header(&headers, "authorization"),
        accept: header(&headers, "accept"),
        user_agent: header(&headers, "user-agent"),
        body,
    });
    let n = calls.len();
    (
        StatusCode::CREATED,
        Json(
            json!({"number": n, "html_url": format!("https://github.test/{org}/{repo}/pull/{n}")}),
        ),
    )
}

impl FakeGithub {
    pub async fn start() -> FakeGithub {
        let state = Arc::new(State_::default());
        let app = Router::new()
            .route("/repos/{org}/{repo}/pulls", post(create_pull))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeGithub { url, state }
    }

    pub fn calls(&self) -> Vec<PullRequestCall> {
        self.state.calls.lock().unwrap().clone()
    }
}
