//! [`TestRunner`]: the real `runner` binary (target/debug/runner) connected to a [`TestEdge`],
//! with its own repositories and worktrees directories; [`HandRunner`]: the runner protocol driven
//! by hand.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use kiln_schemas::runner::{Assignment, EdgeMessage, GatherRequest, HeldJob, RunnerMessage, RunnerRequest, RunnerTools};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

use crate::procs::{tail, GroupChild};
use crate::{free_port, repo_root, runner_registration_token, Api, TestEdge};

/// Inherited variables that would change how a runner behaves; tests set what they need.
const SCRUBBED_PREFIXES: &[&str] = &["RUNNER_", "GITHUB_"];
const SCRUBBED: &[&str] = &["MAX_CONCURRENT_JOBS", "REPOS_DIR", "WORKTREES_DIR"];

pub struct TestRunner {
    proc: Option<GroupChild>,
    dir: TempDir,
    listen_port: u16,
}

impl TestRunner {
    /// The runner binary next to this test binary (`<target>/debug/runner`), or `$KILN_RUNNER_BIN`.
    pub fn binary() -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os("KILN_RUNNER_BIN") {
            return Ok(PathBuf::from(p));
        }
        // Test binaries live in <target>/<profile>/deps/, benchmark binaries in <target>/<profile>/.
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("locating the target directory")?;
        let profile_dir = if dir.ends_with("deps") { dir.parent().context("locating the target directory")? } else { dir };
        let bin = profile_dir.join("runner");
        if !bin.exists() {
            bail!("{} is missing: build it with `cargo build -p kiln-runner` (scripts/test does)", bin.display());
        }
        Ok(bin)
    }

    /// Starts a runner against `edge` with the registration token from `.dev.vars`, its health API
    /// on a free port, `REPOS_DIR`/`WORKTREES_DIR` in a temporary directory and `DOCKER_HOST`
    /// passed through (the repository's private dockerd when unset); `env` adds or overrides
    /// variables (name `RUNNER_EXECUTOR`: the runner refuses to start without Docker unless it is
    /// `process`, and process-executor commands see only what `RUNNER_AGENT_ENV` passes of its
    /// environment). Waits until the runner's own `/health` answers.
    pub async fn start(edge: &TestEdge, env: &[(&str, &str)]) -> anyhow::Result<TestRunner> {
        let bin = Self::binary()?;
        let dir = tempfile::Builder::new().prefix("kiln-runner-").tempdir()?;
        let listen_port = free_port();
        let repos = dir.path().join("repos");
        let worktrees = dir.path().join("worktrees");
        std::fs::create_dir_all(&repos)?;
        std::fs::create_dir_all(&worktrees)?;

        let mut cmd = Command::new(&bin);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if SCRUBBED_PREFIXES.iter().any(|p| k.starts_with(p)) || SCRUBBED.contains(&k.as_ref()) {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.current_dir(dir.path())
            .env("RUNNER_EDGE_URL", edge.url())
            .env("RUNNER_REGISTRATION_TOKEN", runner_registration_token())
            .env("RUNNER_LISTEN", format!("127.0.0.1:{listen_port}"))
            .env("REPOS_DIR", &repos)
            .env("WORKTREES_DIR", &worktrees)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if std::env::var_os("DOCKER_HOST").is_none() {
            let sock = repo_root().join(".kiln/docker/docker.sock");
            if sock.exists() {
                cmd.env("DOCKER_HOST", format!("unix://{}", sock.display()));
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }

        let log = dir.path().join("runner.log");
        let mut proc = GroupChild::spawn("runner", cmd, &log, Some(dir.path()))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let health = format!("http://127.0.0.1:{listen_port}/health");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.exited() {
                bail!("the runner exited with {status}; its log:\n{}", tail(&log, 8000));
            }
            if http.get(&health).send().await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                proc.terminate(Duration::from_secs(5));
                bail!("the runner's {health} did not answer within 30 s; its log:\n{}", tail(&log, 8000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(TestRunner { proc: Some(proc), dir, listen_port })
    }

    /// The runner process's id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(GroupChild::pid)
    }

    /// The runner's own health API.
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.listen_port)
    }

    pub fn repos_dir(&self) -> PathBuf {
        self.dir.path().join("repos")
    }

    pub fn worktrees_dir(&self) -> PathBuf {
        self.dir.path().join("worktrees")
    }

    /// The runner's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runner.log")).unwrap_or_default()
    }

    /// SIGKILL to the runner and everything it spawned: a runner that vanishes mid-job.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// A graceful stop: SIGTERM, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }
}

impl Drop for TestRunner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A runner's socket to the edge.
pub type RunnerSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Registers a runner named `name` and opens its socket (nothing said on it yet): its token and
/// the socket.
pub async fn runner_socket(edge: &TestEdge, name: &str) -> (String, RunnerSocket) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let api = edge.api();
    let reg = runner_registration_token();
    let (status, body) = api.send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": name}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let mut request = format!("{}/runner/v1/connect", edge.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("runner socket");
    (token, ws)
}

/// A hand-written runner: the runner protocol's socket driven by a test (register, hello, the
/// edge's messages, event batches under a lease) with no runner binary behind it.
pub struct HandRunner {
    pub token: String,
    ws: RunnerSocket,
    /// The jobs each heartbeat reports held.
    pub held: Vec<HeldJob>,
    /// Per lease: the next event index.
    next_index: HashMap<String, u64>,
}

/// How long [`HandRunner::expect`] and [`HandRunner::assignment`] wait.
pub const HAND_WAIT: Duration = Duration::from_secs(15);

impl HandRunner {
    /// Registers a runner named `name` and says hello with `capacity` slots.
    pub async fn connect(edge: &TestEdge, name: &str, capacity: u32) -> HandRunner {
        HandRunner::connect_with(edge, name, capacity, None).await
    }

    /// [`HandRunner::connect`] with the tools its hello reports.
    pub async fn connect_with(edge: &TestEdge, name: &str, capacity: u32, tools: Option<RunnerTools>) -> HandRunner {
        let (token, ws) = runner_socket(edge, name).await;
        let mut runner = HandRunner { token, ws, held: vec![], next_index: HashMap::new() };
        runner.send(&RunnerMessage::Hello { name: name.into(), capacity, running: vec![], version: "test".into(), tools }).await;
        runner
    }

    pub async fn send(&mut self, msg: &RunnerMessage) {
        self.ws.send(Message::Text(serde_json::to_string(msg).unwrap().into())).await.expect("sending to the edge");
    }

    /// The next edge message that is not a `welcome` (the heartbeat's answer), heartbeating the
    /// held jobs every 2 s meanwhile.
    pub async fn next(&mut self, timeout: Duration) -> Option<EdgeMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let beat = tokio::time::Instant::now() + Duration::from_secs(2);
            match tokio::time::timeout_at(deadline.min(beat), self.ws.next()).await {
                Err(_) if tokio::time::Instant::now() >= deadline => return None,
                Err(_) => {
                    let running = self.held.clone();
                    self.send(&RunnerMessage::Heartbeat { running }).await;
                }
                Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(t.as_str()).expect("an edge message") {
                    EdgeMessage::Welcome { .. } => continue,
                    m => return Some(m),
                },
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("the runner socket ended: {other:?}"),
            }
        }
    }

    /// The next edge message, within [`HAND_WAIT`].
    pub async fn expect(&mut self, what: &str) -> EdgeMessage {
        self.next(HAND_WAIT).await.unwrap_or_else(|| panic!("no {what} within {HAND_WAIT:?}"))
    }

    /// The next assignment (a `cancel` of a job before it is skipped), held from now on (in place
    /// of an earlier lease of the same job).
    pub async fn assignment(&mut self) -> Assignment {
        loop {
            match self.expect("assignment").await {
                EdgeMessage::Assign { assignment } => {
                    self.held.retain(|h| h.job_id != assignment.job_id);
                    self.held.push(HeldJob { job_id: assignment.job_id.clone(), lease_id: assignment.lease_id.clone() });
                    return assignment;
                }
                EdgeMessage::Cancel { .. } => continue,
                other => panic!("expected an assignment, got {other:?}"),
            }
        }
    }

    /// The next gather request, with its request id.
    pub async fn gather(&mut self) -> (String, GatherRequest) {
        match self.expect("gather request").await {
            EdgeMessage::Request { request_id, request: RunnerRequest::Gather(g) } => (request_id, g),
            other => panic!("expected a gather request, got {other:?}"),
        }
    }

    pub async fn reply(&mut self, request_id: &str, result: Value) {
        self.send(&RunnerMessage::Reply { request_id: request_id.into(), result }).await;
    }

    /// Posts events under the assignment's lease (their indices go on per lease); asserts 200 and a
    /// valid lease (post a batch meant to be refused with [`Api::send`]) and answers the ack.
    pub async fn post(&mut self, api: &Api, a: &Assignment, events: Vec<Value>) -> Value {
        let next = self.next_index.entry(a.lease_id.clone()).or_insert(0);
        let events: Vec<Value> = events
            .into_iter()
            .map(|mut e| {
                e["index"] = json!(*next);
                *next += 1;
                e
            })
            .collect();
        let batch = json!({"lease_id": a.lease_id, "events": events});
        let (status, ack) = api.send(Method::POST, &format!("/runner/v1/jobs/{}/events", a.job_id), Some(&self.token), Some(batch)).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["lease_valid"], true, "{ack}");
        ack
    }

    /// Posts a `finished` event (`finished`'s fields over `{"message": "done"}`) and holds the job
    /// no more.
    pub async fn finish(&mut self, api: &Api, a: &Assignment, finished: Value) {
        let mut ev = json!({"type": "finished", "message": "done"});
        for (k, v) in finished.as_object().unwrap() {
            ev[k] = v.clone();
        }
        self.post(api, a, vec![ev]).await;
        self.held.retain(|h| h.job_id != a.job_id);
    }
}
