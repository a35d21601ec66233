//! [`WsClient`]: a client of the per-job live channel `/ws/jobs/<id>/` (seed 000 §4) that reads
//! JSON messages with timeouts and reports a refused upgrade by its HTTP status.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How a socket authenticates.
#[derive(Debug, Clone, Copy)]
pub enum WsAuth<'a> {
    /// `Authorization: Bearer <token>`.
    Header(&'a str),
    /// `?token=<token>` (dev only: `ALLOW_WS_TOKEN_QUERY=true`).
    Query(&'a str),
    /// No credential at all.
    None,
}

/// A refused upgrade: the HTTP answer instead of `101 Switching Protocols`.
#[derive(Debug, Clone)]
pub struct WsRefused {
    pub status: StatusCode,
    pub body: String,
}

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `<ws_base>/ws/jobs/<job_id>/`, with `?after=<seq>` when given.
    pub async fn connect(ws_base: &str, job_id: &str, auth: WsAuth<'_>, after: Option<u64>) -> Result<WsClient, WsRefused> {
        let mut query = vec![];
        if let WsAuth::Query(t) = auth {
            query.push(format!("token={t}"));
        }
        if let Some(a) = after {
            query.push(format!("after={a}"));
        }
        let mut path = format!("/ws/jobs/{job_id}/");
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        let header = match auth {
            WsAuth::Header(t) => Some(format!("Bearer {t}")),
            _ => None,
        };
        Self::connect_path(ws_base, &path, header.as_deref()).await
    }

    /// Connects to any path (and query) with an optional raw `Authorization` header value.
    pub async fn connect_path(ws_base: &str, path: &str, authorization: Option<&str>) -> Result<WsClient, WsRefused> {
        let url = format!("{}{path}", ws_base.trim_end_matches('/'));
        let mut req = url.as_str().into_client_request().expect("a valid WebSocket URL");
        if let Some(a) = authorization {
            req.headers_mut().insert("authorization", HeaderValue::from_str(a).expect("a valid header value"));
        }
        match tokio::time::timeout(Duration::from_secs(20), tokio_tungstenite::connect_async(req)).await {
            Err(_) => panic!("connecting to {url} timed out"),
            Ok(Ok((stream, _))) => Ok(WsClient { stream }),
            Ok(Err(WsError::Http(resp))) => {
                let status = StatusCode::from_u16(resp.status().as_u16()).expect("an HTTP status");
                let mut body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                if body.is_empty() {
                    // tungstenite keeps only the body bytes that came with the headers; ask again
                    // over plain HTTP for the whole answer.
                    body = refusal_body(&url, authorization).await;
                }
                Err(WsRefused { status, body })
            }
            Ok(Err(e)) => panic!("connecting to {url}: {e}"),
        }
    }

    /// The next JSON text message, or `None` when nothing arrives within `timeout`. Panics when the
    /// server closes the socket or sends something that is not JSON.
    pub async fn next_json(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("the server ended the socket"),
                Ok(Some(Err(e))) => panic!("socket error: {e}"),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return Some(serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("not JSON ({e}): {t}")))
                }
                Message::Binary(b) => {
                    return Some(serde_json::from_slice(&b).unwrap_or_else(|e| panic!("binary, not JSON ({e})")))
                }
                Message::Close(frame) => panic!("the server closed the socket: {frame:?}"),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    /// The next JSON message, panicking with `what` if none arrives within `timeout`.
    pub async fn expect_json(&mut self, timeout: Duration, what: &str) -> Value {
        self.next_json(timeout).await.unwrap_or_else(|| panic!("no message within {timeout:?}: expected {what}"))
    }

    /// Messages until one matches `pred` (included), panicking after `timeout`.
    pub async fn until(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = vec![];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json(left).await {
                Some(v) => {
                    let done = pred(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                None => panic!("no message matching {what} within {timeout:?}; got {seen:#?}"),
            }
        }
    }

    /// Every message that arrives until the socket has been quiet for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut seen = vec![];
        while let Some(v) = self.next_json(quiet).await {
            seen.push(v);
        }
        seen
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("sending on the socket");
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// The body of a refused upgrade, fetched again as a plain request with the upgrade's headers.
async fn refusal_body(ws_url: &str, authorization: Option<&str>) -> String {
    let http_url = ws_url.replacen("ws", "http", 1);
    let mut req = reqwest::Client::new()
        .get(&http_url)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    match req.send().await {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}
