//! Seed 002's five live channels (`/api/ws/{agents,round_table,tasks,3d_pipeline,metrics}`): the
//! pure parts (channel names, per-socket filters, the frames sent, what a client's message asks,
//! how a resume replays) natively tested, and [`publish`], the one function a job room calls to
//! send a channel message to its owner's Dashboard object (`dashboard_object.rs`).

use kiln_schemas::dashboard::{ChannelClientMessage, CHANNELS, MAX_CHANNEL_MESSAGE_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Messages of one channel a Dashboard object keeps for `?after=` resumes.
pub const RESUME_BUFFER: u64 = 1000;

/// Filter keys a `subscribe` may use. Each is looked up on the message, then in its `data`.
pub const FILTER_KEYS: [&str; 8] =
    ["agent_type", "agent_id", "task_id", "status", "stage", "competition_id", "pipeline_id", "error_type"];

/// The most bytes a socket's filters take (they live in its attachment, which holds 2 KiB).
pub const MAX_FILTER_BYTES: usize = 1024;

/// A channel name as the URL spells it, if it is one of the five.
pub fn channel(name: &str) -> Option<&'static str> {
    CHANNELS.iter().copied().find(|c| *c == name)
}

/// A socket's filters: each key must match (a message lacking the key does not), any of its
/// values may (a string, number or bool; or an array of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters(pub Map<String, Value>);

impl Filters {
    /// Checks a `subscribe`'s filters: known keys, scalar or array-of-scalar values, small.
    pub fn parse(filters: Map<String, Value>) -> Result<Filters, String> {
        for (k, v) in &filters {
            if !FILTER_KEYS.contains(&k.as_str()) {
                return Err(format!("unknown filter {k:?}; filters are {}", FILTER_KEYS.join(", ")));
            }
            let scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
            let ok = match v {
                Value::Array(items) => !items.is_empty() && items.iter().all(scalar),
                other => scalar(other),
            };
            if !ok {
                return Err(format!("filter {k:?} takes a string, number or boolean, or a non-empty array of them"));
            }
        }
        let size = serde_json::to_vec(&filters).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > MAX_FILTER_BYTES {
            return Err(format!("filters are {size} bytes; at most {MAX_FILTER_BYTES} are allowed"));
        }
        Ok(Filters(filters))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Filters from a socket URL's query (`?agent_type=commerce&status=running`; repeated keys
    /// are alternatives). Other keys (`token`, `after`) are not filters.
    pub fn from_query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Filters, String> {
        let mut map = Map::new();
        for (k, v) in pairs {
            if !FILTER_KEYS.contains(&k) {
                continue;
            }
            match map.get_mut(k) {
                Some(Value::Array(items)) => items.push(Value::String(v.to_string())),
                Some(prev) => *prev = Value::Array(vec![prev.take(), Value::String(v.to_string())]),
                None => {
                    map.insert(k.to_string(), Value::String(v.to_string()));
                }
            }
        }
        Filters::parse(map)
    }

    /// Whether a published message passes.
    pub fn matches(&self, message: &Value) -> bool {
        self.0.iter().all(|(key, want)| {
            let Some(have) = message.get(key).or_else(|| message.get("data").and_then(|d| d.get(key))) else {
                return false;
            };
            match want {
                Value::Array(items) => items.iter().any(|w| same(w, have)),
                w => same(w, have),
            }
        })
    }
}

/// Equal as JSON, or as text (`"45"` matches `45`): query filters are strings.
fn same(want: &Value, have: &Value) -> bool {
    want == have || scalar_text(want).is_some_and(|w| scalar_text(have).as_deref() == Some(w.as_str()))
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `error` messages' `error_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Error,
    Warning,
    Info,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Error => "error",
            ErrorType::Warning => "warning",
            ErrorType::Info => "info",
        }
    }
}

pub fn error_message(error_type: ErrorType, message: &str, timestamp: &str) -> Value {
    json!({"type": "error", "error_type": error_type.as_str(), "message": message, "timestamp": timestamp})
}

pub fn pong(timestamp: &str) -> Value {
    json!({"type": "pong", "timestamp": timestamp})
}

pub fn keepalive(timestamp: &str) -> Value {
    json!({"type": "keepalive", "timestamp": timestamp})
}

/// What a client's frame asks of its socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Ping,
    Subscribe(Filters),
    /// Answered with an `error` of this type and text; the socket stays open.
    Refused(ErrorType, String),
}

/// Reads a client's frame (`len`: its size in bytes, text or binary).
pub fn incoming(text: Option<&str>, len: usize) -> Incoming {
    if len > MAX_CHANNEL_MESSAGE_BYTES {
        return Incoming::Refused(
            ErrorType::Error,
            format!("message of {len} bytes refused; messages are at most {MAX_CHANNEL_MESSAGE_BYTES} bytes"),
        );
    }
    let Some(text) = text else {
        return Incoming::Refused(ErrorType::Warning, "binary frames are not supported; send JSON text".into());
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Incoming::Refused(ErrorType::Warning, "message is not valid JSON".into());
    };
    match serde_json::from_value::<ChannelClientMessage>(value.clone()) {
        Ok(ChannelClientMessage::Ping) => Incoming::Ping,
        Ok(ChannelClientMessage::Subscribe { filters }) => match Filters::parse(filters) {
            Ok(f) => Incoming::Subscribe(f),
            Err(e) => Incoming::Refused(ErrorType::Warning, e),
        },
        Err(_) => match value.get("type").and_then(Value::as_str) {
            Some("subscribe") => {
                Incoming::Refused(ErrorType::Warning, "subscribe takes \"filters\": an object of filter to value".into())
            }
            Some(t) => Incoming::Refused(ErrorType::Warning, format!("unknown message type {t:?}; send ping or subscribe")),
            None => Incoming::Refused(ErrorType::Warning, "message needs a string field \"type\" (ping or subscribe)".into()),
        },
    }
}

/// A published message as its channel sends it: `seq` added, `timestamp` added when missing.
/// Over [`MAX_CHANNEL_MESSAGE_BYTES`] is refused (the publisher is told; nothing is sent).
pub fn frame(message: &Value, seq: u64, timestamp: &str) -> Result<String, String> {
    let Value::Object(map) = message else {
        return Err("a channel message is a JSON object".into());
    };
    if !map.get("type").is_some_and(Value::is_string) {
        return Err("a channel message needs a string \"type\"".into());
    }
    let mut map = map.clone();
    map.insert("seq".into(), Value::from(seq));
    if !map.contains_key("timestamp") {
        map.insert("timestamp".into(), Value::String(timestamp.to_string()));
    }
    let text = serde_json::to_string(&map).map_err(|e| e.to_string())?;
    if text.len() > MAX_CHANNEL_MESSAGE_BYTES {
        return Err(format!("channel message of {} bytes; at most {MAX_CHANNEL_MESSAGE_BYTES} are sent", text.len()));
    }
    Ok(text)
}

/// What a socket opened with `?after=<seq>` is sent before it follows the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Replay the buffered messages with seq above this.
    pub from_after: u64,
    /// Messages after `after` that the buffer no longer holds (told with an `info` error).
    pub missed: u64,
    /// `after` is past the channel's last seq (its buffer was lost, or the client's seq is of
    /// another channel): told with an `info` error; the socket follows from here.
    pub ahead: bool,
}

/// `oldest`: the smallest seq buffered (none: empty); `last`: the channel's last seq (0: none yet).
pub fn resume(after: u64, oldest: Option<u64>, last: u64) -> Resume {
    if after > last {
        return Resume { from_after: last, missed: 0, ahead: true };
    }
    let first_kept = oldest.unwrap_or(last + 1);
    let missed = first_kept.saturating_sub(after + 1);
    Resume { from_after: after, missed, ahead: false }
}

/// `metrics_update`'s `metrics`: seed 002's documented fields. `snapshot` holds what the
/// monitoring module measures (`cpu_percent`, `memory_percent`, `requests_per_second`,
/// `avg_latency_ms`, …; missing ones are `null`); the channel adds its own connection counts.
pub fn metrics_update(snapshot: &Map<String, Value>, connections: &[(&str, usize)], timestamp: &str) -> Value {
    let mut metrics = Map::new();
    metrics.insert("timestamp".into(), Value::String(timestamp.to_string()));
    for key in ["cpu_percent", "memory_percent", "requests_per_second", "avg_latency_ms"] {
        metrics.insert(key.into(), snapshot.get(key).cloned().unwrap_or(Value::Null));
    }
    for (k, v) in snapshot {
        metrics.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let total: usize = connections.iter().map(|(_, n)| n).sum();
    metrics.insert("active_connections".into(), Value::from(total));
    let by_channel: Map<String, Value> = connections.iter().map(|(c, n)| (c.to_string(), Value::from(*n))).collect();
    metrics.insert("connections_by_channel".into(), Value::Object(by_channel));
    json!({"type": "metrics_update", "metrics": metrics, "timestamp": timestamp})
}

/// Sends `message` on `channel` to every socket of `owner`'s dashboard (the service principal's
/// for `service`) whose filters pass it, with the channel's next `seq`, and keeps it for resumes.
/// Answers that seq. The job room calls this for dashboard kinds; `channel` is one of the five.
#[cfg(target_arch = "wasm32")]
pub async fn publish(env: &worker::Env, owner: &str, channel: &str, message: &Value) -> crate::http::ApiResult<u64> {
    #[derive(Deserialize)]
    struct Published {
        seq: u64,
    }
    let Some(channel) = self::channel(channel) else {
        return Err(crate::http::ApiError::BadRequest(format!("no channel {channel:?}")));
    };
    let stub = crate::env::dashboard(env, owner)?;
    let path = format!("/publish?channel={channel}");
    let out: Published = crate::http::call(&stub, worker::Method::Post, &path, Some(message)).await?;
    Ok(out.seq)
}

/// `GET /api/ws/<channel>`: an unknown channel is accepted and closed with 4004; a known one is
/// handed to the owner's Dashboard object (`who`: the socket's credential, checked as the job
/// channel's; `None`: anonymous, the service principal's dashboard, read-only).
#[cfg(target_arch = "wasm32")]
pub async fn connect(
    req: worker::Request,
    ctx: &crate::api::Ctx,
    who: Option<(&crate::auth::Principal, Option<i64>)>,
    name: &str,
) -> crate::http::ApiResult {
    use crate::http::ApiError;
    use kiln_schemas::dashboard::UNKNOWN_CHANNEL_CLOSE;
    use worker::{Headers, Request, RequestInit, Response, WebSocketPair};

    let Some(channel) = self::channel(name) else {
        let pair = WebSocketPair::new()?;
        pair.server.accept()?;
        pair.server.close(Some(UNKNOWN_CHANNEL_CLOSE), Some(format!("unknown channel; channels are {}", CHANNELS.join(", "))))?;
        return Ok(Response::from_websocket(pair.client)?);
    };
    let url = req.url()?;
    let mut target = worker::Url::parse("https://dashboard/ws").expect("static url");
    {
        let mut q = target.query_pairs_mut();
        q.append_pair("channel", channel);
        for (k, v) in url.query_pairs() {
            if k == "after" || FILTER_KEYS.contains(&k.as_ref()) {
                q.append_pair(&k, &v);
            }
        }
        if let Some(exp) = who.and_then(|(_, exp)| exp) {
            q.append_pair("expires_at_ms", &exp.to_string());
        }
        if who.is_none() {
            q.append_pair("read_only", "true");
        }
    }
    let owner = who.map_or(crate::auth::Principal::Service.owner(), |(p, _)| p.owner());
    if let Some(after) = url.query_pairs().find(|(k, _)| k == "after") {
        if after.1.trim().parse::<u64>().is_err() {
            return Err(ApiError::BadRequest("after must be a seq (an integer ≥ 0)".into()));
        }
    }
    let headers = Headers::new();
    headers.set("upgrade", "websocket")?;
    let mut init = RequestInit::new();
    init.with_headers(headers);
    let forwarded = Request::new_with_init(target.as_str(), &init)?;
    Ok(crate::env::dashboard(&ctx.env, owner)?.fetch_with_request(forwarded).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(v: Value) -> Result<Filters, String> {
        Filters::parse(v.as_object().unwrap().clone())
    }

    #[test]
    fn channels_are_the_five() {
        assert_eq!(channel("tasks"), Some("tasks"));
        assert_eq!(channel("3d_pipeline"), Some("3d_pipeline"));
        assert_eq!(channel("Tasks"), None);
        assert_eq!(channel("jobs"), None);
    }

    #[test]
    fn filters_really_filter() {
        let f = filters(json!({"agent_type": "commerce"})).unwrap();
        let commerce = json!({"type": "task_update", "task_id": "t1", "data": {"agent_type": "commerce"}});
        let seo = json!({"type": "task_update", "task_id": "t2", "data": {"agent_type": "seo"}});
        assert!(f.matches(&commerce));
        assert!(!f.matches(&seo));
        assert!(!f.matches(&json!({"type": "metrics_update"})), "a message without the key does not pass");
        let f = filters(json!({"status": ["running", "completed"], "task_id": "t1"})).unwrap();
        assert!(f.matches(&json!({"task_id": "t1", "status": "running"})));
        assert!(!f.matches(&json!({"task_id": "t1", "status": "failed"})));
        assert!(!f.matches(&json!({"task_id": "t2", "status": "running"})));
        assert!(Filters::default().matches(&seo), "no filters: everything");
        // Top level wins over data; numbers match their text.
        let f = Filters::from_query([("stage", "scoring"), ("token", "x"), ("stage", "completed")]).unwrap();
        assert_eq!(f.0["stage"], json!(["scoring", "completed"]));
        assert!(f.matches(&json!({"stage": "completed", "data": {"stage": "other"}})));
        let f = filters(json!({"task_id": 7})).unwrap();
        assert!(f.matches(&json!({"task_id": "7"})));
    }

    #[test]
    fn bad_filters_are_refused() {
        assert!(filters(json!({"colour": "red"})).unwrap_err().contains("unknown filter"));
        assert!(filters(json!({"status": {"a": 1}})).is_err());
        assert!(filters(json!({"status": []})).is_err());
        assert!(filters(json!({"status": [null]})).is_err());
        let long: Vec<Value> = (0..200).map(|i| Value::String(format!("status-{i}"))).collect();
        assert!(filters(json!({"status": long})).unwrap_err().contains("bytes"));
    }

    #[test]
    fn client_frames() {
        assert_eq!(incoming(Some(r#"{"type":"ping"}"#), 15), Incoming::Ping);
        assert!(matches!(
            incoming(Some(r#"{"type":"subscribe","filters":{"agent_type":"commerce"}}"#), 50),
            Incoming::Subscribe(f) if f.0["agent_type"] == "commerce"
        ));
        assert!(matches!(incoming(Some("{not json"), 9), Incoming::Refused(ErrorType::Warning, m) if m.contains("JSON")));
        assert!(matches!(incoming(Some(r#"{"type":"dance"}"#), 16), Incoming::Refused(ErrorType::Warning, m) if m.contains("dance")));
        assert!(matches!(incoming(Some(r#"{"type":"subscribe","filters":3}"#), 30), Incoming::Refused(ErrorType::Warning, _)));
        assert!(matches!(incoming(Some(r#"{"type":"subscribe","filters":{"x":1}}"#), 30), Incoming::Refused(ErrorType::Warning, _)));
        assert!(matches!(incoming(None, 10), Incoming::Refused(ErrorType::Warning, _)));
        let big = MAX_CHANNEL_MESSAGE_BYTES + 1;
        assert!(matches!(incoming(Some("{}"), big), Incoming::Refused(ErrorType::Error, m) if m.contains("65536")));
    }

    #[test]
    fn frames_carry_seq_and_timestamp() {
        let text = frame(&json!({"type": "task_update", "task_id": "t"}), 7, "2026-01-01T00:00:00.000Z").unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["seq"].as_u64(), v["timestamp"].as_str()), (Some(7), Some("2026-01-01T00:00:00.000Z")));
        let text = frame(&json!({"type": "x", "timestamp": "then"}), 1, "now").unwrap();
        assert!(text.contains("\"then\""));
        assert!(frame(&json!([1]), 1, "now").is_err());
        assert!(frame(&json!({"no": "type"}), 1, "now").is_err());
        let big = json!({"type": "x", "data": "y".repeat(MAX_CHANNEL_MESSAGE_BYTES)});
        assert!(frame(&big, 1, "now").is_err());
    }

    #[test]
    fn resumes() {
        // Buffer holds 1001..=2000: after 1500 replays the rest, nothing missed.
        assert_eq!(resume(1500, Some(1001), 2000), Resume { from_after: 1500, missed: 0, ahead: false });
        // After 1000: exactly the first kept is next, nothing missed.
        assert_eq!(resume(1000, Some(1001), 2000).missed, 0);
        // After 10: 11..=1000 are gone.
        assert_eq!(resume(10, Some(1001), 2000).missed, 990);
        // Caught up.
        assert_eq!(resume(2000, Some(1001), 2000), Resume { from_after: 2000, missed: 0, ahead: false });
        // Past the end (the buffer was lost).
        assert!(resume(5, None, 0).ahead);
        // Nothing published yet, after 0.
        assert_eq!(resume(0, None, 0), Resume { from_after: 0, missed: 0, ahead: false });
    }

    #[test]
    fn metrics_have_the_documented_fields() {
        let mut snap = Map::new();
        snap.insert("cpu_percent".into(), json!(12.5));
        snap.insert("jobs_running".into(), json!(2));
        let m = metrics_update(&snap, &[("tasks", 3), ("metrics", 1)], "now");
        assert_eq!(m["type"], "metrics_update");
        let metrics = &m["metrics"];
        for key in ["timestamp", "cpu_percent", "memory_percent", "active_connections", "requests_per_second", "avg_latency_ms"] {
            assert!(metrics.get(key).is_some(), "{key}");
        }
        assert_eq!(metrics["active_connections"], 4);
        assert_eq!(metrics["connections_by_channel"]["tasks"], 3);
        assert_eq!(metrics["jobs_running"], 2);
        assert_eq!(metrics["cpu_percent"], 12.5);
    }
}
