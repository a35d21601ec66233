//! The Dashboard Durable Object, one per owner (the service principal's serves anonymous
//! sockets): seed 002's five channels for that owner. Sockets are hibernatable, tagged with their
//! channel, their filters in their attachment. Every published message gets its channel's next
//! `seq` and is kept (the last [`RESUME_BUFFER`] per channel, SQLite) so `?after=<seq>` resumes.
//! The alarm sends `keepalive` to idle sockets, `metrics_update` while metrics sockets are open,
//! and closes sockets whose token expired.
//!
//! Internal API (called by the Worker, never exposed): `GET /ws?channel=&after=&read_only=&
//! expires_at_ms=&<filters>` (a socket), `POST /publish?channel=` (a message; answers `{seq}`).

use std::cell::RefCell;
use std::collections::HashMap;

use kiln_schemas::dashboard::CHANNELS;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use worker::{
    durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, SqlStorage, SqlStorageValue, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

use crate::channels::{self, ErrorType, Filters, Incoming, RESUME_BUFFER};
use crate::env::{now_ms, Config};
use crate::http::{body_json, json, ApiError, ApiResult};
use crate::time::rfc3339;

/// Attached to each socket, so it survives hibernation (at most 2 KiB: filters are bounded).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SocketInfo {
    /// Random: keys the in-memory time of its last message.
    id: String,
    channel: String,
    /// An anonymous socket (the service principal's resources, read-only).
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    filters: Filters,
    #[serde(default)]
    expires_at_ms: Option<i64>,
    /// When it was last sent a message that the attachment knows of (opened, keepalive).
    last_sent_ms: i64,
}

/// The close code of a socket whose access token expired (as the job channel's).
const TOKEN_EXPIRED_CLOSE: u16 = 4001;
/// Buffered messages a resume reads at a time.
const REPLAY_PAGE: i64 = 500;
/// An alarm due within this is treated as due now.
const ALARM_SLACK_MS: i64 = 50;

#[durable_object]
pub struct Dashboard {
    state: State,
    env: Env,
    /// Each channel's last seq (read from SQLite once).
    last_seq: RefCell<HashMap<String, u64>>,
    /// When each socket (by its id) was last sent something; lost on hibernation, when the
    /// attachment's `last_sent_ms` stands in (earlier, so a keepalive may come early, never late).
    last_sent: RefCell<HashMap<String, i64>>,
    /// When the next `metrics_update` is due (0: when a metrics socket opens, one interval on).
    metrics_due_ms: RefCell<i64>,
    /// Messages published since the last `metrics_update` (its `messages_per_second`).
    published: RefCell<(u64, i64)>,
    keepalive_ms: i64,
    metrics_ms: i64,
}

impl Dashboard {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn ensure_schema(&self) -> worker::Result<()> {
        let sql = self.sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS messages (channel TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (channel, seq))",
            None,
        )?;
        sql.exec("CREATE TABLE IF NOT EXISTS last_seq (channel TEXT PRIMARY KEY, seq INTEGER NOT NULL)", None)?;
        Ok(())
    }

    fn channel_last_seq(&self, channel: &str) -> ApiResult<u64> {
        if let Some(seq) = self.last_seq.borrow().get(channel) {
            return Ok(*seq);
        }
        #[derive(Deserialize)]
        struct Row {
            seq: i64,
        }
        let rows: Vec<Row> = self
            .sql()
            .exec("SELECT seq FROM last_seq WHERE channel = ?", vec![SqlStorageValue::from(channel.to_string())])?
            .to_array()?;
        let seq = rows.first().map_or(0, |r| r.seq as u64);
        self.last_seq.borrow_mut().insert(channel.to_string(), seq);
        Ok(seq)
    }

    fn oldest_kept(&self, channel: &str) -> ApiResult<Option<u64>> {
        #[derive(Deserialize)]
        struct Row {
            seq: Option<i64>,
        }
        let rows: Vec<Row> = self
            .sql()
            .exec("SELECT MIN(seq) AS seq FROM messages WHERE channel = ?", vec![SqlStorageValue::from(channel.to_string())])?
            .to_array()?;
        Ok(rows.first().and_then(|r| r.seq).map(|s| s as u64))
    }

    /// Stores a message with its channel's next seq and sends it to the channel's sockets whose
    /// filters pass it. Synchronous from the write to the last send: nothing interleaves, so a
    /// socket's resume (replay, then registration, also synchronous) has no gap and no duplicate.
    fn publish(&self, channel: &'static str, message: &Value) -> ApiResult<u64> {
        let seq = self.channel_last_seq(channel)? + 1;
        let now = now_ms();
        let text = channels::frame(message, seq, &rfc3339(now)).map_err(ApiError::BadRequest)?;
        let sql = self.sql();
        // Without an await between them, these writes commit together.
        sql.exec(
            "INSERT INTO last_seq (channel, seq) VALUES (?, ?) ON CONFLICT (channel) DO UPDATE SET seq = excluded.seq",
            vec![SqlStorageValue::from(channel.to_string()), SqlStorageValue::from(seq as i64)],
        )?;
        sql.exec(
            "INSERT OR REPLACE INTO messages (channel, seq, body) VALUES (?, ?, ?)",
            vec![SqlStorageValue::from(channel.to_string()), SqlStorageValue::from(seq as i64), SqlStorageValue::from(text.clone())],
        )?;
        if seq > RESUME_BUFFER {
            sql.exec(
                "DELETE FROM messages WHERE channel = ? AND seq <= ?",
                vec![SqlStorageValue::from(channel.to_string()), SqlStorageValue::from((seq - RESUME_BUFFER) as i64)],
            )?;
        }
        self.last_seq.borrow_mut().insert(channel.to_string(), seq);
        {
            let mut p = self.published.borrow_mut();
            p.0 += 1;
        }
        let mut last_sent = self.last_sent.borrow_mut();
        for ws in self.state.get_websockets_with_tag(channel) {
            let Some(info) = attachment(&ws) else { continue };
            if (info.filters.is_empty() || info.filters.matches(message)) && ws.send_with_str(&text).is_ok() {
                last_sent.insert(info.id, now);
            }
        }
        Ok(seq)
    }

    async fn route(&self, mut req: Request) -> ApiResult {
        let url = req.url()?;
        let query: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let channel = param("channel")
            .and_then(|c| channels::channel(&c))
            .ok_or_else(|| ApiError::BadRequest("no such channel".into()))?;
        match (req.method(), url.path()) {
            (Method::Post, "/publish") => {
                let message = body_json(&mut req).await?;
                let seq = self.publish(channel, &message)?;
                json(&json!({ "seq": seq }))
            }
            (Method::Get, "/ws") => {
                let after = match param("after") {
                    Some(a) => Some(a.trim().parse::<u64>().map_err(|_| ApiError::BadRequest("after must be a seq (an integer ≥ 0)".into()))?),
                    None => None,
                };
                let filters =
                    Filters::from_query(query.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
                let expires_at_ms = param("expires_at_ms").and_then(|v| v.parse::<i64>().ok());
                let read_only = param("read_only").is_some_and(|v| v == "true");
                self.accept(channel, after, filters, read_only, expires_at_ms).await
            }
            _ => Err(ApiError::NotFound("no such endpoint".into())),
        }
    }

    async fn accept(
        &self,
        channel: &'static str,
        after: Option<u64>,
        filters: Filters,
        read_only: bool,
        expires_at_ms: Option<i64>,
    ) -> ApiResult {
        let now = now_ms();
        let pair = WebSocketPair::new()?;
        self.state.accept_websocket_with_tags(&pair.server, &[channel]);
        let info = SocketInfo {
            id: crate::env::new_id(),
            channel: channel.to_string(),
            read_only,
            filters,
            expires_at_ms,
            last_sent_ms: now,
        };
        pair.server.serialize_attachment(&info)?;
        if let Some(after) = after {
            // Replay then follow: no await from the first read to the return, and the socket is
            // already registered, so the next publish reaches it right after its replay.
            let plan = channels::resume(after, self.oldest_kept(channel)?, self.channel_last_seq(channel)?);
            let ts = rfc3339(now);
            if plan.missed > 0 {
                let text = format!(
                    "{} {channel} events after seq {after} were missed: the channel keeps its last {RESUME_BUFFER}; reload the current state",
                    plan.missed
                );
                pair.server.send_with_str(channels::error_message(ErrorType::Info, &text, &ts).to_string())?;
            }
            if plan.ahead {
                let text = format!(
                    "seq {after} is past the {channel} channel's last seq {}; following from there (reload the current state)",
                    plan.from_after
                );
                pair.server.send_with_str(channels::error_message(ErrorType::Info, &text, &ts).to_string())?;
            }
            self.replay(&pair.server, channel, plan.from_after, &info.filters)?;
        }
        self.schedule(now).await?;
        Ok(Response::from_websocket(pair.client)?)
    }

    fn replay(&self, ws: &WebSocket, channel: &str, after: u64, filters: &Filters) -> ApiResult<()> {
        #[derive(Deserialize)]
        struct Row {
            seq: i64,
            body: String,
        }
        let mut cursor = after as i64;
        loop {
            let rows: Vec<Row> = self
                .sql()
                .exec(
                    "SELECT seq, body FROM messages WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
                    vec![
                        SqlStorageValue::from(channel.to_string()),
                        SqlStorageValue::from(cursor),
                        SqlStorageValue::from(REPLAY_PAGE),
                    ],
                )?
                .to_array()?;
            for row in &rows {
                if !filters.is_empty() {
                    let message: Value = serde_json::from_str(&row.body)?;
                    if !filters.matches(&message) {
                        continue;
                    }
                }
                ws.send_with_str(&row.body)?;
            }
            match rows.last() {
                Some(r) if rows.len() as i64 == REPLAY_PAGE => cursor = r.seq,
                _ => return Ok(()),
            }
        }
    }

    /// Makes sure the alarm fires by the next thing due: a keepalive, a `metrics_update`, a
    /// token's expiry. Nothing open: no alarm.
    async fn schedule(&self, now: i64) -> ApiResult<()> {
        let mut next: Option<i64> = None;
        let mut due = |at: i64| next = Some(next.map_or(at, |n: i64| n.min(at)));
        let last_sent = self.last_sent.borrow().clone();
        for ws in self.state.get_websockets() {
            let Some(info) = attachment(&ws) else { continue };
            let last = last_sent.get(&info.id).copied().unwrap_or(0).max(info.last_sent_ms);
            due(last + self.keepalive_ms);
            if let Some(at) = info.expires_at_ms {
                due(at);
            }
        }
        if !self.state.get_websockets_with_tag("metrics").is_empty() {
            let mut m = self.metrics_due_ms.borrow_mut();
            if *m == 0 {
                *m = now + self.metrics_ms;
            }
            due(*m);
        }
        let Some(at) = next else { return Ok(()) };
        let storage = self.state.storage();
        if storage.get_alarm().await?.is_some_and(|current| current <= at && current > now) {
            return Ok(());
        }
        storage.set_alarm((at - now).max(1)).await?;
        Ok(())
    }

    async fn on_alarm(&self) -> ApiResult<()> {
        let now = now_ms();
        let ts = rfc3339(now);
        // Tokens expired: an `error`, then 4001.
        for ws in self.state.get_websockets() {
            if attachment(&ws).and_then(|i| i.expires_at_ms).is_some_and(|at| at <= now + ALARM_SLACK_MS) {
                end_expired(&ws, &ts);
            }
        }
        let metrics_open = !self.state.get_websockets_with_tag("metrics").is_empty();
        if metrics_open {
            let due = *self.metrics_due_ms.borrow();
            if due == 0 || due <= now + ALARM_SLACK_MS {
                let message = self.metrics(now).await;
                self.publish("metrics", &message)?;
                *self.metrics_due_ms.borrow_mut() = now + self.metrics_ms;
            }
        } else {
            *self.metrics_due_ms.borrow_mut() = 0;
        }
        // Keepalives to sockets idle for the interval.
        let keepalive = channels::keepalive(&ts).to_string();
        for ws in self.state.get_websockets() {
            let Some(mut info) = attachment(&ws) else { continue };
            let last = self.last_sent.borrow().get(&info.id).copied().unwrap_or(0).max(info.last_sent_ms);
            if now - last + ALARM_SLACK_MS >= self.keepalive_ms && ws.send_with_str(&keepalive).is_ok() {
                info.last_sent_ms = now;
                self.last_sent.borrow_mut().insert(info.id.clone(), now);
                let _ = ws.serialize_attachment(&info);
            }
        }
        self.schedule(now).await
    }

    /// The `metrics_update` of now: the monitoring numbers (`monitoring::snapshot`: runners' CPU
    /// and memory, requests per second, latency, jobs) and this dashboard's connections.
    async fn metrics(&self, now: i64) -> Value {
        let mut snapshot = match crate::monitoring::snapshot(&self.env).await {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        snapshot.remove("timestamp");
        let now = now.max(now_ms());
        let connections: Vec<(&str, usize)> =
            CHANNELS.iter().map(|c| (*c, self.state.get_websockets_with_tag(c).len())).collect();
        let (count, since) = std::mem::replace(&mut *self.published.borrow_mut(), (0, now));
        let secs = ((now - since) as f64 / 1000.0).max(0.001);
        if since > 0 {
            snapshot.insert("messages_per_second".into(), json!((count as f64 / secs * 100.0).round() / 100.0));
        }
        channels::metrics_update(&snapshot, &connections, &rfc3339(now))
    }

    fn on_message(&self, ws: &WebSocket, message: WebSocketIncomingMessage) -> ApiResult<()> {
        let ts = rfc3339(now_ms());
        let incoming = match &message {
            WebSocketIncomingMessage::String(s) => channels::incoming(Some(s), s.len()),
            WebSocketIncomingMessage::Binary(b) => channels::incoming(None, b.len()),
        };
        let answer = match incoming {
            Incoming::Ping => channels::pong(&ts),
            Incoming::Subscribe(filters) => {
                let Some(mut info) = attachment(ws) else {
                    return Err(ApiError::Internal("a dashboard socket without its attachment".into()));
                };
                info.filters = filters;
                ws.serialize_attachment(&info)?;
                json!({
                    "type": "subscribed",
                    "channel": info.channel,
                    "filters": info.filters.0,
                    "read_only": info.read_only,
                    "timestamp": ts,
                })
            }
            Incoming::Refused(kind, text) => channels::error_message(kind, &text, &ts),
        };
        ws.send_with_str(answer.to_string())?;
        Ok(())
    }
}

fn attachment(ws: &WebSocket) -> Option<SocketInfo> {
    ws.deserialize_attachment::<SocketInfo>().ok().flatten()
}

fn end_expired(ws: &WebSocket, ts: &str) {
    let message = channels::error_message(ErrorType::Error, "access token expired; reconnect with a fresh token", ts);
    let _ = ws.send_with_str(message.to_string());
    let _ = ws.close(Some(TOKEN_EXPIRED_CLOSE), Some("access token expired"));
}

impl DurableObject for Dashboard {
    fn new(state: State, env: Env) -> Self {
        let config = Config::from_env(&env);
        let object = Self {
            state,
            env,
            last_seq: RefCell::new(HashMap::new()),
            last_sent: RefCell::new(HashMap::new()),
            metrics_due_ms: RefCell::new(0),
            published: RefCell::new((0, 0)),
            keepalive_ms: (config.dashboard_keepalive_secs.max(1) * 1000) as i64,
            metrics_ms: (config.dashboard_metrics_secs.max(1) * 1000) as i64,
        };
        if let Err(e) = object.ensure_schema() {
            worker::console_error!("dashboard schema: {e}");
        }
        object
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(self.route(req).await.unwrap_or_else(ApiError::into_response))
    }

    async fn alarm(&self) -> worker::Result<Response> {
        if let Err(e) = self.on_alarm().await {
            worker::console_error!("dashboard alarm: {e:?}");
            let _ = self.state.storage().set_alarm(1000).await;
        }
        Response::ok("ok")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        if attachment(&ws).and_then(|i| i.expires_at_ms).is_some_and(|at| at <= now_ms()) {
            end_expired(&ws, &rfc3339(now_ms()));
            return Ok(());
        }
        if let Err(e) = self.on_message(&ws, message) {
            worker::console_error!("dashboard socket: {e:?}");
            let _ = ws.send_with_str(channels::error_message(ErrorType::Error, "internal error", &rfc3339(now_ms())).to_string());
        }
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, code: usize, _reason: String, _was_clean: bool) -> worker::Result<()> {
        if let Some(info) = attachment(&ws) {
            self.last_sent.borrow_mut().remove(&info.id);
        }
        let code = if code == 1005 || code == 1006 || !(1000..5000).contains(&code) { 1000 } else { code as u16 };
        let _ = ws.close(Some(code), Some("closing"));
        Ok(())
    }

    async fn websocket_error(&self, _ws: WebSocket, _error: worker::Error) -> worker::Result<()> {
        Ok(())
    }
}
