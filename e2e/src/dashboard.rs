//! A client of seed 002's agent dashboard: the REST face (`/api/v1/agents`, `tasks`,
//! `round-table`, `3d`) as one user, and its five channels (`/api/ws/<channel>`) read as JSON with
//! keepalives left out.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{unique_email, Api, StatusCode, TestEdge, WsClient, WsRefused, PASSWORD};

/// One user of the dashboard.
pub struct DashboardClient {
    pub api: Api,
    pub ws_base: String,
    pub user_id: String,
    pub token: String,
}

impl DashboardClient {
    /// Registers a new user (`prefix` in its email) and logs in.
    pub async fn register(edge: &TestEdge, prefix: &str) -> DashboardClient {
        let api = edge.api();
        let email = unique_email(prefix);
        let (status, user) = api.register(&email, PASSWORD).await;
        assert!(status.is_success(), "registering {email}: {status} {user}");
        let (status, pair) = api.login(&email, PASSWORD).await;
        assert!(status.is_success(), "logging in {email}: {status} {pair}");
        DashboardClient {
            api,
            ws_base: edge.ws_url(),
            user_id: user["id"].as_str().expect("the user's id").to_string(),
            token: pair["access"].as_str().expect("an access token").to_string(),
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.api.get(path, &self.token).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.api.post(path, &self.token, body).await
    }

    /// `POST /api/v1/tasks`: the task (pending); panics unless accepted.
    pub async fn submit_task(&self, agent_type: &str, prompt: &str, parameters: Value) -> Value {
        let (status, task) = self.post("/api/v1/tasks", json!({"agentType": agent_type, "prompt": prompt, "parameters": parameters})).await;
        assert!(status.is_success(), "submitting a task: {status} {task}");
        task
    }

    /// `POST /api/v1/round-table/compete`: the competition (pending).
    pub async fn compete(&self, prompt: &str) -> Value {
        let (status, c) = self.post("/api/v1/round-table/compete", json!({"prompt": prompt})).await;
        assert!(status.is_success(), "starting a round table: {status} {c}");
        c
    }

    /// `POST /api/v1/3d`: the pipeline (pending).
    pub async fn create_3d(&self, prompt: &str) -> Value {
        let (status, p) = self.post("/api/v1/3d", json!({"prompt": prompt})).await;
        assert!(status.is_success(), "starting a 3D pipeline: {status} {p}");
        p
    }

    /// Polls `GET path` until `done` holds of the answer (panics after `timeout`).
    pub async fn wait_for(&self, path: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, v) = self.get(path).await;
            assert_eq!(status, StatusCode::OK, "GET {path}: {v}");
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "GET {path} did not get there within {timeout:?}: {v:#}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Opens `/api/ws/<channel>` (with `query`, e.g. `?agent_type=x`) with this user's token.
    pub async fn channel(&self, channel: &str, query: &str) -> Channel {
        let ws = WsClient::connect_path(&self.ws_base, &format!("/api/ws/{channel}{query}"), Some(&format!("Bearer {}", self.token)))
            .await
            .unwrap_or_else(|e| panic!("/api/ws/{channel}: refused {} {}", e.status, e.body));
        Channel { ws }
    }
}

/// Opens a channel without credentials (anonymous) or with a raw `Authorization` value.
pub async fn open_channel(edge: &TestEdge, path: &str, authorization: Option<&str>) -> Result<Channel, WsRefused> {
    WsClient::connect_path(&edge.ws_url(), path, authorization).await.map(|ws| Channel { ws })
}

/// One dashboard channel socket.
pub struct Channel {
    pub ws: WsClient,
}

impl Channel {
    /// The next message that is not a keepalive, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.ws.next_json(left).await?;
            if m["type"] != "keepalive" {
                return Some(m);
            }
        }
    }

    /// Sends `{"type": "subscribe", "filters": …}` and waits for `subscribed`.
    pub async fn subscribe(&mut self, filters: Value) -> Value {
        self.ws.send_json(&json!({"type": "subscribe", "filters": filters})).await;
        self.expect_type("subscribed", Duration::from_secs(10)).await
    }

    /// Sends a ping and waits for the pong.
    pub async fn ping(&mut self) -> Value {
        self.ws.send_json(&json!({"type": "ping"})).await;
        self.expect_type("pong", Duration::from_secs(10)).await
    }

    /// Reads until a message of type `ty` (others dropped); panics after `timeout`.
    pub async fn expect_type(&mut self, ty: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(m) if m["type"] == ty => return m,
                Some(_) => continue,
                None => panic!("no {ty} message within {timeout:?}"),
            }
        }
    }

    /// Every message until `done` holds of one (included); panics after `timeout`.
    pub async fn until(&mut self, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = vec![];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(m) => {
                    let end = done(&m);
                    seen.push(m);
                    if end {
                        return seen;
                    }
                }
                None => panic!("{what}: not seen within {timeout:?}; got {seen:#?}"),
            }
        }
    }

    /// What arrives until the socket has been quiet for `quiet` (keepalives left out).
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        self.ws.drain(quiet).await.into_iter().filter(|m| m["type"] != "keepalive").collect()
    }
}
