//! `kiln follow`: the job's live channel (`/ws/jobs/<id>/`, `Authorization` header) until the job
//! ends. A dropped connection is resumed with `?after=<last seq>` after a backoff, and events are
//! taken only in `seq` order, so nothing is shown twice or skipped across reconnects.

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::{SinkExt, StreamExt};
use kiln_schemas::events::{EventBody, ServerEvent};
use kiln_schemas::jobs::JobView;
use kiln_schemas::status::JobStatus;
use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::client::{error_message, job_path, Client};
use crate::render::{event_lines, final_line, fitted_status_line, FollowView, Palette};

/// Without any message for this long, the socket is pinged; without an answer for as long again,
/// it is considered dead and reconnected.
const IDLE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The close code the edge ends a socket with when its access token expires.
pub const TOKEN_EXPIRED_CLOSE: u16 = 4001;

/// The exit status for a job's end state: 0 completed, 1 failed, 2 cancelled.
pub fn exit_code(status: JobStatus) -> i32 {
    match status {
        JobStatus::Completed => 0,
        JobStatus::Failed => 1,
        JobStatus::Cancelled => 2,
        // Not terminal: never asked for.
        JobStatus::Collecting | JobStatus::Queued | JobStatus::Running => 3,
    }
}

/// The wait before reconnect attempt `attempt` (0-based): 250 ms doubling up to 5 s.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << attempt.min(10));
    Duration::from_millis(ms.min(5000))
}

/// `ws(s)://host/ws/jobs/<id>/?after=<seq>` for a server URL.
pub fn socket_url(base: &str, job_id: &str, after: u64) -> anyhow::Result<String> {
    let mut u = url::Url::parse(base).with_context(|| format!("{base:?} is not a URL"))?;
    let scheme = match u.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => bail!("cannot open a WebSocket to a {other}:// server"),
    };
    u.set_scheme(scheme).map_err(|_| anyhow!("cannot switch {base} to {scheme}://"))?;
    u.path_segments_mut()
        .map_err(|_| anyhow!("{base} cannot have a path"))?
        .pop_if_empty()
        .extend(["ws", "jobs", job_id, ""]);
    u.set_query(None);
    if after > 0 {
        u.query_pairs_mut().append_pair("after", &after.to_string());
    }
    Ok(u.to_string())
}

/// What one message of the socket means to the follower.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The next event, to show.
    Event(ServerEvent),
    /// An event already shown (a replay overlap): dropped.
    Seen(u64),
    /// The server refused something we sent (`{"kind":"error"}`).
    Error(String),
    /// A message this client does not know: passed through in JSON mode, else ignored.
    Unknown(Value),
}

/// Classifies a text message given the last `seq` shown.
pub fn classify(text: &str, last_seq: u64) -> Incoming {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Incoming::Unknown(Value::String(text.to_string()));
    };
    if value.get("kind").and_then(Value::as_str) == Some("error") {
        return Incoming::Error(value.get("message").and_then(Value::as_str).unwrap_or("error").to_string());
    }
    // Any message with a `seq` is a logged event, known kind or not.
    if let Some(seq) = value.get("seq").and_then(Value::as_u64).filter(|s| *s <= last_seq) {
        return Incoming::Seen(seq);
    }
    match serde_json::from_value::<ServerEvent>(value.clone()) {
        Ok(ev) => Incoming::Event(ev),
        Err(_) => Incoming::Unknown(value),
    }
}

/// How `follow` writes to `W` (stdout): text lines, with a status line kept at the bottom of a
/// terminal, or one JSON document per event. Notes for the person watching go to stderr.
pub struct Output<W: Write = std::io::Stdout> {
    pub json: bool,
    pub palette: Palette,
    /// Keep a live status line at the bottom (stdout is a terminal and not JSON).
    pub sticky: bool,
    /// Whether the status line is on screen now (and must be cleared before the next line).
    shown: bool,
    /// The terminal's width in columns.
    width: usize,
    writer: W,
}

impl Output {
    pub fn new(json: bool, palette: Palette, stdout_is_tty: bool) -> Output {
        let mut out = Output::to(std::io::stdout(), json, palette, stdout_is_tty);
        if out.sticky {
            out.width = terminal_width();
        }
        out
    }
}

/// The terminal's width: `$COLUMNS`, else what `stty size` says of the controlling terminal, else 80.
fn terminal_width() -> usize {
    let from_env = std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse::<usize>().ok());
    let from_stty = || {
        let tty = std::fs::File::open("/dev/tty").ok()?;
        let out = std::process::Command::new("stty").arg("size").stdin(tty).stderr(std::process::Stdio::null()).output().ok()?;
        parse_stty_size(&String::from_utf8_lossy(&out.stdout))
    };
    from_env.filter(|w| *w > 0).or_else(from_stty).unwrap_or(80)
}

/// The columns of `stty size`'s `<rows> <columns>`.
fn parse_stty_size(text: &str) -> Option<usize> {
    text.split_whitespace().nth(1)?.parse().ok().filter(|w| *w > 0)
}

impl<W: Write> Output<W> {
    pub fn to(writer: W, json: bool, palette: Palette, stdout_is_tty: bool) -> Output<W> {
        Output { json, palette, sticky: stdout_is_tty && !json, shown: false, width: 80, writer }
    }

    fn clear(&mut self) {
        if self.shown {
            let _ = write!(self.writer, "\r\x1b[2K");
            self.shown = false;
        }
    }

    fn lines(&mut self, view: &FollowView, lines: &[String]) {
        self.clear();
        for l in lines {
            let _ = writeln!(self.writer, "{l}");
        }
        if self.sticky {
            let _ = write!(self.writer, "{}", fitted_status_line(view, self.palette, self.width));
            self.shown = true;
        }
        let _ = self.writer.flush();
    }

    fn json_line(&mut self, value: &Value) {
        let _ = writeln!(self.writer, "{value}");
        let _ = self.writer.flush();
    }

    /// A note for the person watching: on a terminal the status line says it, else stderr does.
    fn note(&mut self, view: &FollowView, text: &str) {
        if self.sticky {
            self.lines(view, &[]);
        } else {
            eprintln!("kiln: {text}");
        }
    }

    /// Leaves the terminal clean when following is interrupted.
    pub fn interrupted(&mut self) {
        self.clear();
        let _ = self.writer.flush();
    }

    fn finish(&mut self, view: &FollowView) {
        if self.json {
            return;
        }
        self.clear();
        let _ = writeln!(self.writer, "{}", final_line(view, self.palette));
        let _ = self.writer.flush();
    }
}

/// Follows job `id` until it is terminal; answers its end state.
pub async fn follow<W: Write>(client: &mut Client, id: &str, out: &mut Output<W>, give_up_after: Duration) -> anyhow::Result<JobStatus> {
    let job: JobView = serde_json::from_value(client.call(Method::GET, &job_path(id, ""), None).await?)
        .context("reading the job")?;
    let mut view = FollowView::new(&job);
    let mut attempt = 0u32;
    // When the connection was last known good; giving up counts from here.
    let mut last_good = Instant::now();
    let mut refreshed = false;
    loop {
        let url = socket_url(client.base(), &job.id, view.last_seq)?;
        let token = client.token().await?;
        let mut req = url.as_str().into_client_request().context("building the WebSocket request")?;
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).context("the token is not a valid header value")?,
        );
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(req)).await;
        let mut stream = match connected {
            Ok(Ok((stream, _))) => stream,
            Ok(Err(WsError::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                let status = reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
                if status == reqwest::StatusCode::UNAUTHORIZED && client.can_refresh() && !refreshed {
                    refreshed = true;
                    client.refresh().await?;
                    continue;
                }
                // A restarting server answers 5xx for a moment; any other refusal is final.
                if !status.is_server_error() {
                    bail!("the live channel was refused: {} (HTTP {})", error_message(status, &body), status.as_u16());
                }
                retry_or_give_up(out, &mut view, &mut attempt, last_good, give_up_after, &format!("HTTP {}", status.as_u16())).await?;
                continue;
            }
            Ok(Err(e)) => {
                retry_or_give_up(out, &mut view, &mut attempt, last_good, give_up_after, &e.to_string()).await?;
                continue;
            }
            Err(_) => {
                retry_or_give_up(out, &mut view, &mut attempt, last_good, give_up_after, "connecting timed out").await?;
                continue;
            }
        };
        if view.reconnecting {
            view.reconnecting = false;
            out.note(&view, &format!("reconnected; resuming after event {}", view.last_seq));
        }
        attempt = 0;
        refreshed = false;
        last_good = Instant::now();
        if out.sticky {
            out.lines(&view, &[]);
        }

        let mut pinged = false;
        // A refusal the server explains before closing; shown unless the close is the expiry one.
        let mut said: Option<String> = None;
        let ended = loop {
            let msg = match tokio::time::timeout(IDLE, stream.next()).await {
                Err(_) if pinged => break Ended::Dropped("no answer to a ping".into()),
                Err(_) => {
                    pinged = true;
                    if stream.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break Ended::Dropped("the ping could not be sent".into());
                    }
                    continue;
                }
                Ok(None) => break Ended::Dropped("the server closed the connection".into()),
                Ok(Some(Err(e))) => break Ended::Dropped(e.to_string()),
                Ok(Some(Ok(m))) => m,
            };
            pinged = false;
            last_good = Instant::now();
            if let Message::Close(Some(frame)) = &msg {
                if u16::from(frame.code) == TOKEN_EXPIRED_CLOSE {
                    break Ended::TokenExpired;
                }
            }
            if let Some(m) = said.take() {
                eprintln!("kiln: the server said: {m}");
            }
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Close(_) => break Ended::Dropped("the server closed the connection".into()),
                _ => continue,
            };
            match classify(&text, view.last_seq) {
                Incoming::Seen(_) => {}
                Incoming::Error(m) => said = Some(m),
                Incoming::Unknown(v) => {
                    if let Some(seq) = v.get("seq").and_then(Value::as_u64) {
                        view.last_seq = view.last_seq.max(seq);
                    }
                    if out.json {
                        out.json_line(&v);
                    }
                }
                Incoming::Event(ev) => {
                    let terminal = match &ev.body {
                        EventBody::JobStatus { status, .. } => JobStatus::from_face(status).filter(|s| s.is_terminal()),
                        _ => None,
                    };
                    if out.json {
                        view.last_seq = ev.seq;
                        if let EventBody::JobStatus { status, .. } = &ev.body {
                            view.status = status.clone();
                        }
                        out.json_line(&serde_json::from_str(&text).unwrap_or(Value::Null));
                    } else {
                        let lines = event_lines(&mut view, &ev, out.palette);
                        out.lines(&view, &lines);
                    }
                    if let Some(end) = terminal {
                        let _ = stream.close(None).await;
                        out.finish(&view);
                        return Ok(end);
                    }
                }
            }
        };
        match ended {
            // The socket outlived its access token: continue at once with a fresh one.
            Ended::TokenExpired if client.can_refresh() => client.refresh().await?,
            Ended::TokenExpired => bail!("the access token expired and the live channel was closed (KILN_TOKEN cannot be refreshed)"),
            Ended::Dropped(why) => retry_or_give_up(out, &mut view, &mut attempt, last_good, give_up_after, &why).await?,
        }
    }
}

/// Why a connected socket stopped.
enum Ended {
    /// Lost: reconnect after a backoff.
    Dropped(String),
    /// Closed by the server because the access token it was opened with expired.
    TokenExpired,
}

async fn retry_or_give_up<W: Write>(
    out: &mut Output<W>,
    view: &mut FollowView,
    attempt: &mut u32,
    last_good: Instant,
    give_up_after: Duration,
    why: &str,
) -> anyhow::Result<()> {
    if last_good.elapsed() >= give_up_after {
        bail!("gave up following job {}: the live channel has been down for {} s ({why})", view.job_id, give_up_after.as_secs());
    }
    if !view.reconnecting {
        view.reconnecting = true;
        out.note(view, &format!("connection lost ({why}); reconnecting after event {}", view.last_seq));
    }
    tokio::time::sleep(backoff(*attempt)).await;
    *attempt += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job_view() -> JobView {
        serde_json::from_value(json!({
            "id": "j1", "status": "queued", "job_type": "ralph", "prompt": "p", "title": null, "branch_name": "b",
            "client": null, "feature": null, "repository": null, "priority": 0, "attempts": 0, "pr_url": null,
            "error_message": null, "original_job_id": null, "created_by_team_member_id": null, "max_iterations": 2,
            "created_at": "t", "updated_at": "t", "started_at": null, "completed_at": null
        }))
        .unwrap()
    }

    fn event(seq: u64, body: Value) -> ServerEvent {
        let mut v = body;
        v["seq"] = json!(seq);
        v["timestamp"] = json!("2026-01-07T10:00:05.000Z");
        serde_json::from_value(v).unwrap()
    }

    fn show<W: Write>(out: &mut Output<W>, view: &mut FollowView, ev: &ServerEvent) {
        let lines = event_lines(view, ev, out.palette);
        out.lines(view, &lines);
    }

    #[test]
    fn on_a_terminal_the_status_line_stays_below_the_output() {
        let plain = Palette { color: false };
        let mut out = Output::to(Vec::new(), false, plain, true);
        let mut view = FollowView::new(&job_view());
        show(&mut out, &mut view, &event(1, json!({"kind": "jobStatus", "jobId": "j1", "status": "running", "message": "go"})));
        show(&mut out, &mut view, &event(2, json!({"kind": "log", "stream": "stdout", "content": "hello"})));
        view.status = "completed".into();
        out.finish(&view);
        let text = String::from_utf8(out.writer).unwrap();
        assert_eq!(
            text,
            "10:00:05 ● running go\n● running · ralph · iteration 1/2 [░░░░░░░░░░] · job j1\
             \r\x1b[2K10:00:05 hello\n● running · ralph · iteration 1/2 [░░░░░░░░░░] · job j1\
             \r\x1b[2Kjob j1 completed\n"
        );
    }

    #[test]
    fn stty_sizes() {
        assert_eq!(parse_stty_size("24 132\n"), Some(132));
        assert_eq!(parse_stty_size(""), None);
        assert_eq!(parse_stty_size("24 0"), None);
    }

    #[test]
    fn off_a_terminal_there_are_only_lines() {
        let mut out = Output::to(Vec::new(), false, Palette { color: false }, false);
        let mut view = FollowView::new(&job_view());
        show(&mut out, &mut view, &event(1, json!({"kind": "log", "stream": "stdout", "content": "hello"})));
        out.note(&view, "connection lost");
        out.finish(&view);
        assert_eq!(String::from_utf8(out.writer).unwrap(), "10:00:05 hello\njob j1 queued\n");

        let mut out = Output::to(Vec::new(), true, Palette { color: false }, true);
        assert!(!out.sticky, "JSON is never decorated");
        out.json_line(&json!({"seq": 1}));
        out.finish(&view);
        assert_eq!(String::from_utf8(out.writer).unwrap(), "{\"seq\":1}\n");
    }

    #[test]
    fn end_states_map_to_exit_codes() {
        assert_eq!(exit_code(JobStatus::Completed), 0);
        assert_eq!(exit_code(JobStatus::Failed), 1);
        assert_eq!(exit_code(JobStatus::Cancelled), 2);
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let waits: Vec<u64> = (0..8).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, vec![250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn socket_urls_carry_the_cursor() {
        assert_eq!(socket_url("http://127.0.0.1:8787", "abc", 0).unwrap(), "ws://127.0.0.1:8787/ws/jobs/abc/");
        assert_eq!(socket_url("https://kiln.example.com", "abc", 42).unwrap(), "wss://kiln.example.com/ws/jobs/abc/?after=42");
        assert_eq!(socket_url("https://h/base", "a/b", 1).unwrap(), "wss://h/base/ws/jobs/a%2Fb/?after=1");
    }

    #[test]
    fn replayed_events_are_dropped_and_new_ones_kept() {
        let ev = |seq: u64| {
            json!({"kind": "log", "seq": seq, "stream": "stdout", "content": "x", "timestamp": "t"}).to_string()
        };
        assert!(matches!(classify(&ev(5), 4), Incoming::Event(e) if e.seq == 5));
        assert_eq!(classify(&ev(4), 4), Incoming::Seen(4));
        assert_eq!(classify(&ev(1), 4), Incoming::Seen(1));
        assert_eq!(classify(r#"{"kind":"error","message":"bad"}"#, 0), Incoming::Error("bad".into()));
        assert!(matches!(classify(r#"{"kind":"future","seq":9}"#, 0), Incoming::Unknown(_)));
        assert_eq!(classify(r#"{"kind":"future","seq":3}"#, 4), Incoming::Seen(3), "unknown kinds are not repeated either");
        assert!(matches!(classify("not json", 0), Incoming::Unknown(Value::String(_))));
    }
}
