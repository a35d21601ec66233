//! The runner's session on `/runner/v1/connect`: `hello` (with the jobs still held, after a
//! reconnect), `welcome`, heartbeats every `heartbeat_secs`, and the edge's messages handed to the
//! job table. A lost connection is retried with backoff; jobs keep running meanwhile.
//!
//! A connection can die without closing (a half-open TCP connection, an edge that stopped
//! answering): the runner sends a WebSocket ping every few seconds, and anything from the edge
//! (a pong, a message) counts as hearing from it. Silence for half the lease time
//! ([`silence_limit`]) ends the session, and the jobs held are stopped (cancelled: killed,
//! workspaces removed, nothing pushed) before the edge can expire their leases and give them to
//! another runner. This holds across reconnects: a runner that cannot reach the edge for that
//! long stops its jobs too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kiln_schemas::runner::{EdgeMessage, RepoResult, RunnerLoad, RunnerMessage, RunnerRequest, RunnerTools};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::{connect_url, EdgeClient, Registrar};
use crate::backoff::Backoff;
use crate::files;
use crate::gather::Gatherer;
use crate::jobs::{CancelToken, JobControl, Supervisor};
use crate::metrics::Metrics;
use crate::workspace::{RepoRef, Workspaces};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// The most time between two pings.
const MAX_PING_INTERVAL: Duration = Duration::from_secs(5);

/// How long the runner may go without hearing from the edge before it stops its jobs: half the
/// lease time (at least a second), so they stop well before the edge expires their leases.
pub fn silence_limit(lease_secs: u32) -> Duration {
    Duration::from_millis(u64::from(lease_secs) * 500).max(Duration::from_secs(1))
}

/// How often the runner pings the edge: every heartbeat, at most [`MAX_PING_INTERVAL`] apart and
/// at least four times within the silence limit.
pub fn ping_interval(heartbeat_secs: u32, lease_secs: u32) -> Duration {
    Duration::from_secs(u64::from(heartbeat_secs.max(1)))
        .min(MAX_PING_INTERVAL)
        .min(silence_limit(lease_secs) / 4)
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the edge refused the session: {0}")]
    Refused(String),
    #[error("invalid runner token for an HTTP header")]
    BadToken,
    #[error("the edge refused the runner token (401)")]
    Unauthorized,
    #[error("nothing heard from the edge for {0:?}")]
    Silent(Duration),
}

/// Whether the session is up (for `/health`).
#[derive(Debug, Default)]
pub struct EdgeStatus {
    connected: AtomicBool,
    /// When the edge was last heard from, and the silence limit of its lease time (`None`
    /// before the first welcome).
    heard: Mutex<Option<(tokio::time::Instant, Duration)>>,
}

impl EdgeStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn set(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
    }

    fn heard(&self, limit: Duration) {
        *self.heard.lock().unwrap() = Some((tokio::time::Instant::now(), limit));
    }

    /// When the edge was last heard from and how long ago, when that is over the limit.
    fn silence(&self) -> Option<(tokio::time::Instant, Duration)> {
        let (at, limit) = (*self.heard.lock().unwrap())?;
        let silent = at.elapsed();
        (silent >= limit).then_some((at, silent))
    }

    /// When the current silence reaches the limit.
    fn silence_deadline(&self) -> Option<tokio::time::Instant> {
        self.heard.lock().unwrap().map(|(at, limit)| at + limit)
    }
}

pub struct Session {
    pub client: EdgeClient,
    pub name: String,
    pub supervisor: Supervisor,
    pub workspaces: Arc<Workspaces>,
    pub status: Arc<EdgeStatus>,
    /// Registers again when the edge refuses the token (none for a configured `RUNNER_TOKEN`, or
    /// without a registration token).
    pub registrar: Option<Arc<Registrar>>,
    pub metrics: Arc<Metrics>,
    /// What `hello` reports of the agent CLI and git (`crate::tools`).
    pub tools: RunnerTools,
    /// Answers the app builder's gatherer turns.
    pub gatherer: Gatherer,
}

impl Session {
    /// Keeps a session up until `shutdown`.
    pub async fn run(self, shutdown: CancelToken) {
        let watchdog = tokio::spawn(watch_silence(
            self.status.clone(),
            self.supervisor.clone(),
            shutdown.clone(),
        ));
        self.keep_connected(shutdown).await;
        self.gatherer.shutdown();
        watchdog.abort();
    }

    async fn keep_connected(&self, shutdown: CancelToken) {
        let mut backoff = Backoff::default();
        // Set by a registration until a session is welcomed: a token the edge has just issued
        // and refuses anyway is not worth another registration.
        let mut registered = false;
        loop {
            let result = tokio::select! {
                r = self.serve_once(&mut backoff) => r,
                _ = shutdown.cancelled() => break,
            };
            if self.status.is_connected() {
                registered = false;
            }
            self.status.set(false);
            match result {
                Ok(()) => tracing::warn!("the edge closed the connection"),
                Err(SessionError::Unauthorized) => match &self.registrar {
                    Some(registrar) if !registered => {
                        tracing::warn!("the edge refused the runner token; registering again");
                        match registrar.register().await {
                            Ok(r) => {
                                self.client.set_token(r.token);
                                registered = true;
                                continue;
                            }
                            Err(e) => tracing::error!(error = %e, "registering again failed"),
                        }
                    }
                    Some(_) => tracing::error!(
                        "the edge refused the runner token it has just issued; retrying with it"
                    ),
                    None => tracing::error!(
                        "the edge refused the runner token; set a valid RUNNER_TOKEN, or RUNNER_REGISTRATION_TOKEN to register again"
                    ),
                },
                Err(SessionError::Silent(silent)) => {
                    // Before connecting again: a new session would make the silence look over.
                    stop_jobs(&self.supervisor, silent);
                    tracing::warn!(silent_ms = silent.as_millis() as u64, "nothing heard from the edge: dropping the connection");
                }
                Err(e) => tracing::warn!(error = %e, "edge connection failed"),
            }
            let delay = backoff.next_delay();
            tracing::info!(
                retry_in_ms = delay.as_millis() as u64,
                "reconnecting to the edge"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.status.set(false);
    }

    fn hello(&self) -> RunnerMessage {
        RunnerMessage::Hello {
            name: self.name.clone(),
            capacity: self.supervisor.capacity(),
            running: self.supervisor.held(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            tools: Some(self.tools.clone()),
        }
    }

    async fn serve_once(&self, backoff: &mut Backoff) -> Result<(), SessionError> {
        let url = connect_url(self.client.base());
        let mut request = url.as_str().into_client_request()?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.client.token()))
            .map_err(|_| SessionError::BadToken)?;
        request.headers_mut().insert("Authorization", auth);
        let (ws, _) =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .map_err(|_| SessionError::Timeout(CONNECT_TIMEOUT))?
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(res) if res.status() == 401 => {
                        SessionError::Unauthorized
                    }
                    e => SessionError::WebSocket(e),
                })?;
        let (mut tx, mut rx) = ws.split();
        tx.send(encode(&self.hello())).await?;

        let welcome = tokio::time::timeout(WELCOME_TIMEOUT, async {
            while let Some(msg) = rx.next().await {
                match msg? {
                    Message::Text(text) => match serde_json::from_str::<EdgeMessage>(&text) {
                        Ok(EdgeMessage::Welcome {
                            runner_id,
                            heartbeat_secs,
                            lease_secs,
                        }) => return Ok((runner_id, heartbeat_secs, lease_secs)),
                        Ok(EdgeMessage::Error { message }) => {
                            return Err(SessionError::Refused(message))
                        }
                        _ => tracing::warn!(message = %text, "message before welcome; ignored"),
                    },
                    Message::Close(frame) => {
                        return Err(SessionError::Refused(
                            frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        ))
                    }
                    _ => {}
                }
            }
            Err(SessionError::Refused("closed before welcome".into()))
        })
        .await
        .map_err(|_| SessionError::Timeout(WELCOME_TIMEOUT))??;
        let (runner_id, heartbeat_secs, lease_secs) = welcome;
        self.status.set(true);
        Metrics::inc(&self.metrics.edge_sessions);
        *backoff = Backoff::default();
        tracing::info!(
            runner_id,
            heartbeat_secs,
            lease_secs,
            held = self.supervisor.held().len(),
            "connected to the edge"
        );

        let limit = silence_limit(lease_secs);
        self.status.heard(limit);
        let period = Duration::from_secs(heartbeat_secs.max(1) as u64);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let ping_period = ping_interval(heartbeat_secs, lease_secs);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_period, ping_period);
        let (replies, mut reply_rx) = mpsc::unbounded_channel::<RunnerMessage>();
        let mut host_load = HostLoad::default();
        host_load.sample();
        loop {
            let deadline = self
                .status
                .silence_deadline()
                .unwrap_or_else(|| tokio::time::Instant::now() + limit);
            tokio::select! {
                msg = rx.next() => {
                    if matches!(msg, Some(Ok(_))) {
                        self.status.heard(limit);
                    }
                    match msg {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(Message::Text(text))) => self.handle(&text, &replies),
                        Some(Ok(Message::Close(_))) => return Ok(()),
                        Some(Ok(_)) => {}
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some((_, silent)) = self.status.silence() {
                        return Err(SessionError::Silent(silent));
                    }
                }
                _ = ping.tick() => send_within(&mut tx, Message::Ping(Vec::new().into()), &self.status, limit).await?,
                _ = heartbeat.tick() => {
                    send_within(&mut tx, encode(&RunnerMessage::Heartbeat { running: self.supervisor.held() }), &self.status, limit).await?;
                    if let Some(load) = host_load.sample() {
                        send_within(&mut tx, encode(&RunnerMessage::Load(load)), &self.status, limit).await?;
                    }
                }
                Some(reply) = reply_rx.recv() => send_within(&mut tx, encode(&reply), &self.status, limit).await?,
            }
        }
    }

    fn handle(&self, text: &str, replies: &mpsc::UnboundedSender<RunnerMessage>) {
        let msg = match serde_json::from_str::<EdgeMessage>(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, message = %text, "unknown message from the edge; ignored");
                return;
            }
        };
        let unknown = |job_id: &str| {
            tracing::warn!(
                job_id,
                "message for a job this runner does not hold; ignored"
            )
        };
        match msg {
            EdgeMessage::Welcome { .. } => {}
            EdgeMessage::Assign { assignment } => self.supervisor.assign(assignment),
            EdgeMessage::Cancel { job_id } => {
                if !self.supervisor.cancel(&job_id) {
                    unknown(&job_id)
                }
            }
            EdgeMessage::Deliver { job_id, message } => {
                if !self
                    .supervisor
                    .control(&job_id, JobControl::Deliver(message))
                {
                    unknown(&job_id)
                }
            }
            EdgeMessage::Complete { job_id } => {
                if !self.supervisor.control(&job_id, JobControl::Complete) {
                    unknown(&job_id)
                }
            }
            EdgeMessage::Stop { job_id } => {
                if !self.supervisor.control(&job_id, JobControl::Stop) {
                    unknown(&job_id)
                }
            }
            EdgeMessage::Pause { job_id } => {
                if !self.supervisor.control(&job_id, JobControl::Pause) {
                    unknown(&job_id)
                }
            }
            EdgeMessage::Resume { job_id } => {
                if !self.supervisor.control(&job_id, JobControl::Resume) {
                    unknown(&job_id)
                }
            }
            EdgeMessage::Request {
                request_id,
                request,
            } => {
                // Off the socket loop: a model call or a slow fetch never holds up heartbeats
                // or assignments.
                let answering = Answering {
                    workspaces: self.workspaces.clone(),
                    supervisor: self.supervisor.clone(),
                    gatherer: self.gatherer.clone(),
                };
                let replies = replies.clone();
                tokio::spawn(async move {
                    let result = answering.answer(request).await;
                    let _ = replies.send(RunnerMessage::Reply { request_id, result });
                });
            }
            EdgeMessage::Error { message } => {
                tracing::warn!(message, "the edge reported a protocol error")
            }
        }
    }
}

/// Sends a message, taking no longer than the silence allows: a send to a peer that stopped
/// reading blocks once the buffers are full.
async fn send_within<S>(
    tx: &mut S,
    msg: Message,
    status: &EdgeStatus,
    limit: Duration,
) -> Result<(), SessionError>
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let deadline = status
        .silence_deadline()
        .unwrap_or_else(|| tokio::time::Instant::now() + limit);
    match tokio::time::timeout_at(deadline, tx.send(msg)).await {
        Ok(r) => r.map_err(SessionError::from),
        Err(_) => Err(SessionError::Silent(limit)),
    }
}

/// Stops the jobs held once the edge has been silent for the limit (once per silence: jobs
/// assigned after the edge is heard from again are not touched).
async fn watch_silence(status: Arc<EdgeStatus>, supervisor: Supervisor, shutdown: CancelToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped_for: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some((since, silent)) = status.silence() else {
            stopped_for = None;
            continue;
        };
        if stopped_for == Some(since) {
            continue;
        }
        stopped_for = Some(since);
        stop_jobs(&supervisor, silent);
    }
}

fn stop_jobs(supervisor: &Supervisor, silent: Duration) {
    let n = supervisor.cancel_all();
    if n > 0 {
        tracing::error!(
            silent_ms = silent.as_millis() as u64,
            jobs = n,
            "nothing heard from the edge for half the lease time: stopping every job held here before their leases expire and another runner takes them"
        );
    }
}

fn encode(msg: &RunnerMessage) -> Message {
    Message::Text(
        serde_json::to_string(msg)
            .expect("runner messages serialize")
            .into(),
    )
}

/// What a request's answer needs.
#[derive(Clone)]
pub struct Answering {
    pub workspaces: Arc<Workspaces>,
    pub supervisor: Supervisor,
    pub gatherer: Gatherer,
}

fn error_reply(message: impl std::fmt::Display) -> Value {
    json!({ "error": message.to_string() })
}

impl Answering {
    /// The reply to any request: repository results, a gatherer turn, a listing or a file, or
    /// `{"error"}`.
    pub async fn answer(&self, request: RunnerRequest) -> Value {
        match request {
            RunnerRequest::Sync { .. } | RunnerRequest::Clone { .. } => {
                let results = answer_request(&self.workspaces, &request).await;
                serde_json::to_value(results).expect("repo results serialize")
            }
            RunnerRequest::Gather(req) => match self.gatherer.answer(&req).await {
                Ok(reply) => serde_json::to_value(reply).expect("gather replies serialize"),
                Err(e) => error_reply(e),
            },
            RunnerRequest::ListFiles {
                job_id,
                path,
                limit,
            } => {
                self.in_workspace(&job_id, move |dir| {
                    files::list(dir, &path, limit)
                        .map(|s| serde_json::to_value(s).expect("listings serialize"))
                })
                .await
            }
            RunnerRequest::ReadFile { job_id, path } => {
                self.in_workspace(&job_id, move |dir| {
                    files::read(dir, &path)
                        .map(|c| serde_json::to_value(c).expect("files serialize"))
                })
                .await
            }
        }
    }

    /// Runs `f` on the worktree of a job this runner holds, off the async threads.
    async fn in_workspace<F>(&self, job_id: &str, f: F) -> Value
    where
        F: FnOnce(&std::path::Path) -> Result<Value, files::FilesError> + Send + 'static,
    {
        if !self.supervisor.held().iter().any(|h| h.job_id == job_id) {
            return error_reply("this runner does not hold the job");
        }
        let dir = self.workspaces.worktree_path(job_id);
        match tokio::task::spawn_blocking(move || f(&dir)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => error_reply(e),
            Err(_) => error_reply("reading the workspace failed"),
        }
    }
}

/// Carries out a repository request: every listed repository's mirror is created if missing and
/// fetched. Repositories are handled concurrently; each gets its own result.
pub async fn answer_request(workspaces: &Workspaces, request: &RunnerRequest) -> Vec<RepoResult> {
    let (repos, with_path) = match request {
        RunnerRequest::Sync { repos } => (repos, false),
        RunnerRequest::Clone { repos } => (repos, true),
        // Not repository work: `Answering::answer` handles them.
        RunnerRequest::Gather(_)
        | RunnerRequest::ListFiles { .. }
        | RunnerRequest::ReadFile { .. } => return vec![],
    };
    let work = repos.iter().map(|spec| async move {
        let slug = format!("{}/{}", spec.github_org, spec.github_repo);
        let result = match RepoRef::new(&spec.github_org, &spec.github_repo) {
            Ok(repo) => workspaces.sync(&repo).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(path) => RepoResult {
                repo: slug,
                success: true,
                path: with_path.then(|| path.to_string_lossy().into_owned()),
                error: None,
            },
            Err(e) => RepoResult {
                repo: slug,
                success: false,
                path: None,
                error: Some(e.to_string()),
            },
        }
    });
    futures::future::join_all(work).await
}

/// The host's CPU and memory use from `/proc/stat` and `/proc/meminfo` (Linux; elsewhere none),
/// CPU as the busy share of all cores since the previous sample.
#[derive(Debug, Default)]
pub struct HostLoad {
    /// The previous sample's (busy, total) jiffies.
    last: Option<(u64, u64)>,
}

impl HostLoad {
    /// The load since the previous call; none on the first call (no interval yet) or without /proc.
    pub fn sample(&mut self) -> Option<RunnerLoad> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let now = cpu_jiffies(&stat)?;
        let previous = self.last.replace(now);
        let (busy0, total0) = previous?;
        let cpu_percent = percent(now.0.saturating_sub(busy0), now.1.saturating_sub(total0))?;
        let memory_percent = memory_percent(&meminfo)?;
        Some(RunnerLoad { cpu_percent, memory_percent })
    }
}

fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| ((part as f64 / whole as f64) * 1000.0).round() / 10.0)
}

/// `(busy, total)` jiffies of the `cpu` line of `/proc/stat` (idle and iowait are not busy).
pub fn cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user and nice).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Memory in use from `/proc/meminfo`: `MemTotal` minus `MemAvailable`, in percent.
pub fn memory_percent(meminfo: &str) -> Option<f64> {
    let field = |name: &str| -> Option<u64> {
        meminfo.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    percent(total.saturating_sub(available), total)
}

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn cpu_and_memory_from_proc() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(cpu_jiffies(stat), Some((150, 1000)));
        assert_eq!(cpu_jiffies("intr 1 2 3"), None);
        let meminfo = "MemTotal:       8000000 kB\nMemFree:        1000000 kB\nMemAvailable:   6000000 kB\n";
        assert_eq!(memory_percent(meminfo), Some(25.0));
        assert_eq!(memory_percent("MemTotal: 0 kB\nMemAvailable: 0 kB"), None);
        assert_eq!(percent(1, 3), Some(33.3));
    }

    #[test]
    fn this_host_reports_a_load_from_the_second_sample() {
        let mut load = HostLoad::default();
        assert_eq!(load.sample(), None, "no interval yet");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = load.sample().expect("Linux has /proc");
        assert!((0.0..=100.0).contains(&now.cpu_percent), "{now:?}");
        assert!(now.memory_percent > 0.0 && now.memory_percent <= 100.0, "{now:?}");
    }
}
