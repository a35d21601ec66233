//! The built `kiln` binary against a real `wrangler dev` (kiln-e2e's [`TestEdge`]): register and
//! log in, submit with flags and job files, list, show, cancel, logs, token refresh, the `--json`
//! shapes, bad input, and `follow` across a restart of the edge with a real runner running the job.
//!
//! Needs the Worker built (`scripts/build-edge`) and, for the runner test, `cargo build -p
//! kiln-runner` (scripts/test does both).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_e2e::{agent_api_secret, unique_email, FakeGitHub, GitRemotes, TestEdge, TestRunner, WsAuth, WsClient, PASSWORD};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The `kiln` binary cargo built for these tests.
const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// One user's `kiln`: its own config file and home, pointed at one edge by `KILN_URL`.
struct Kiln {
    home: tempfile::TempDir,
    url: String,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", self.stdout))
    }

    fn ok(self, what: &str) -> Out {
        assert_eq!(self.code, 0, "{what}: exit {}\nstdout: {}\nstderr: {}", self.code, self.stdout, self.stderr);
        self
    }

    /// A failure with `kiln: error: <needle...>` on stderr and nothing on stdout.
    fn error(self, code: i32, needle: &str) -> Out {
        assert_eq!(self.code, code, "exit status; stdout: {} stderr: {}", self.stdout, self.stderr);
        assert!(self.stderr.starts_with("kiln: error: "), "stderr: {}", self.stderr);
        assert!(self.stderr.contains(needle), "stderr lacks {needle:?}: {}", self.stderr);
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        self
    }
}

impl Kiln {
    fn new(edge: &TestEdge) -> Kiln {
        Kiln { home: tempfile::Builder::new().prefix("kiln-cli-home-").tempdir().unwrap(), url: edge.url() }
    }

    fn config_path(&self) -> PathBuf {
        self.home.path().join("config/kiln/config.toml")
    }

    fn config(&self) -> Value {
        let text = std::fs::read_to_string(self.config_path()).expect("the config file exists");
        let table: toml::Table = toml::from_str(&text).expect("the config file is TOML");
        serde_json::to_value(table).unwrap()
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(KILN);
        cmd.args(args)
            .env_remove("KILN_TOKEN")
            .env_remove("KILN_CONFIG")
            .env_remove("NO_COLOR")
            .env("KILN_URL", &self.url)
            // The config file is found the way it is on a real machine: $XDG_CONFIG_HOME/kiln/config.toml.
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("HOME", self.home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn run_with(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Out {
        let mut child = self.command(args, env).spawn().expect("starting kiln");
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.as_bytes()).await.unwrap();
        drop(pipe);
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kiln {args:?} did not finish within 120 s"))
            .unwrap();
        Out {
            code: out.status.code().expect("kiln exited, not killed"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, "", &[]).await
    }

    /// Registers a new user and logs in as it; answers the email.
    async fn register(&self) -> String {
        let email = unique_email("cli");
        let out = self.run_with(&["register", "--email", &email, "--password-stdin"], &format!("{PASSWORD}\n"), &[]).await.ok("register");
        assert_eq!(out.stdout.trim(), format!("Registered and logged in to {} as {email}", self.url));
        email
    }
}

async fn start_edge() -> TestEdge {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    // Every user may name the repositories of the `acme` org.
    edge.api().grant("*", "acme/*").await;
    edge
}

fn ids(list: &Value) -> Vec<String> {
    list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn login_submit_list_show_cancel_and_logs_with_text_and_json() {
    let edge = start_edge().await;
    let kiln = Kiln::new(&edge);

    // Not logged in yet.
    kiln.run(&["ls"]).await.error(3, &format!("not logged in to {}: run `kiln login`", kiln.url));

    // Register (password on stdin), then log in again with the password as a flag.
    let email = kiln.register().await;
    let cfg = kiln.config();
    let host = &cfg["hosts"][&kiln.url];
    assert_eq!(host["email"], email.as_str());
    assert!(host["access"].as_str().unwrap().split('.').count() == 3, "a JWT: {cfg}");
    assert!(host["refresh"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(cfg["url"], kiln.url.as_str());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(kiln.config_path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the config file holds tokens");
    }
    kiln.run(&["login", "--email", &email, "--password", "Wrong-Horse-1"]).await.error(3, "invalid email or password (HTTP 401)");
    let out = kiln.run(&["--json", "login", "--email", &email, "--password", PASSWORD]).await.ok("login");
    assert_eq!(out.json(), json!({"url": kiln.url, "email": email, "registered": false, "config": kiln.config_path()}));
    assert!(!out.stdout.contains(kiln.config()["hosts"][&kiln.url]["access"].as_str().unwrap()), "tokens are never printed");

    // Submit with flags: text mode prints just the id on stdout.
    let out = kiln
        .run(&["submit", "--org", "acme", "--repo", "shop", "--prompt", "Add a logout button", "--branch", "feature/logout", "--title", "Logout"])
        .await
        .ok("submit");
    let code_id = out.stdout.trim().to_string();
    assert_eq!(code_id.len(), 36, "{}", out.stdout);
    assert!(out.stderr.contains("queued at position 1 on branch feature/logout"), "{}", out.stderr);

    // A ralph job with every loop flag, the prompt from a file, as JSON.
    let dir = tempfile::tempdir().unwrap();
    let prompt_file = dir.path().join("prompt.txt");
    std::fs::write(&prompt_file, "Make the tests pass\n").unwrap();
    let out = kiln
        .run(&[
            "--json", "submit", "--type", "ralph", "--org", "acme", "--repo", "shop", "--prompt-file", prompt_file.to_str().unwrap(),
            "--max-iterations", "3", "--completion-promise", "DONE", "--feedback-command", "make test", "--feedback-command",
            "make lint", "--priority", "5",
        ])
        .await
        .ok("submit ralph");
    let created = out.json();
    let ralph_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "queued");
    assert!(created["branchName"].as_str().unwrap().starts_with("kiln/ralph-"), "{created}");
    let job = kiln.run(&["--json", "show", &ralph_id]).await.ok("show").json();
    assert_eq!(job["job_type"], "ralph");
    assert_eq!(job["prompt"], "Make the tests pass\n");
    assert_eq!(job["max_iterations"], 3);
    assert_eq!(job["completion_promise"], "DONE");
    assert_eq!(job["feedback_commands"], json!(["make test", "make lint"]));
    assert_eq!(job["priority"], 5);

    // A job file, a flag overriding one of its fields, the prompt from stdin.
    let job_file = dir.path().join("job.json");
    std::fs::write(&job_file, json!({"githubOrg": "acme", "githubRepo": "shop", "branchName": "from-file", "jobType": "task", "title": "From a file"}).to_string()).unwrap();
    let out = kiln
        .run_with(&["--json", "submit", "--file", job_file.to_str().unwrap(), "--prompt", "-", "--branch", "from-flag"], "Research the logs\n", &[])
        .await
        .ok("submit --file");
    let task_id = out.json()["id"].as_str().unwrap().to_string();
    let job = kiln.run(&["--json", "show", &task_id]).await.ok("show").json();
    assert_eq!((job["job_type"].as_str(), job["branch_name"].as_str(), job["title"].as_str()), (Some("task"), Some("from-flag"), Some("From a file")));
    assert_eq!(job["prompt"], "Research the logs\n");
    let text = kiln.run(&["show", &task_id]).await.ok("show text").stdout;
    assert!(text.contains("      status: queued\n") && text.contains("      branch: from-flag\n"), "{text}");

    // ls: the table and the JSON list, filtered and limited.
    let table = kiln.run(&["ls"]).await.ok("ls").stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID ") && lines[0].contains("STATUS") && lines[0].contains("TITLE"), "{table}");
    assert_eq!(lines.len(), 4, "a header and three jobs: {table}");
    for id in [&code_id, &ralph_id, &task_id] {
        assert!(table.contains(id.as_str()), "{id} in {table}");
    }
    assert!(!table.contains('\x1b'), "no colour when stdout is not a terminal");
    let list = kiln.run(&["--json", "ls", "--status", "queued", "--limit", "2"]).await.ok("ls --json").json();
    assert_eq!(list["total"], 3);
    assert_eq!(ids(&list).len(), 2);

    // Cancel, then follow the cancelled job: the replay ends at once with exit status 2.
    let cancelled = kiln.run(&["--json", "cancel", &code_id]).await.ok("cancel").json();
    assert_eq!(cancelled, json!({"id": code_id, "status": "cancelled", "wasRunning": false}));
    let follow = kiln.run(&["--json", "follow", &code_id]).await;
    assert_eq!(follow.code, 2, "cancelled: {}{}", follow.stdout, follow.stderr);
    let events: Vec<Value> = follow.stdout.lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{events:#?}");
    assert_eq!(events.last().unwrap()["status"], "cancelled");
    let follow = kiln.run(&["follow", &code_id]).await;
    assert_eq!(follow.code, 2);
    assert!(follow.stdout.contains("● cancelled"), "{}", follow.stdout);
    assert_eq!(follow.stdout.lines().last().unwrap(), format!("job {code_id} cancelled"));
    let list = kiln.run(&["--json", "ls", "--status", "cancelled"]).await.ok("ls cancelled").json();
    assert_eq!(ids(&list), vec![code_id.clone()]);
    kiln.run(&["cancel", &code_id]).await.error(3, "only queued or running jobs can be cancelled (HTTP 400)");

    // Logs: seed 003's messages, as text and as a JSON array.
    let logs = kiln.run(&["logs", &code_id]).await.ok("logs").stdout;
    assert!(logs.lines().any(|l| l.contains(" system ") && l.ends_with("job cancelled by user")), "{logs}");
    let messages = kiln.run(&["--json", "logs", &code_id]).await.ok("logs --json").json();
    // A page at a time, the whole log all the same.
    let paged = kiln.run(&["--json", "logs", "--page-size", "1", &code_id]).await.ok("logs --page-size 1").json();
    assert_eq!(paged, messages);
    let messages = messages.as_array().unwrap();
    assert!(messages.len() >= 2, "more than one page: {messages:?}");
    for m in messages {
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["content", "created_at", "type"], "{m}");
    }

    // Stop and message are refused for a job that cannot take them, with the server's reason.
    kiln.run(&["stop", &task_id]).await.error(3, "(HTTP 400)");
    kiln.run(&["message", &ralph_id, "hello"]).await.error(3, "(HTTP 400)");

    // Health needs no login.
    let health = kiln.run(&["--json", "status"]).await.ok("status").json();
    assert_eq!(health["status"], "ok");
    assert!(kiln.run(&["health"]).await.ok("health").stdout.starts_with(&format!("{}: ok", kiln.url)));
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_a_non_zero_status() {
    let edge = start_edge().await;
    let kiln = Kiln::new(&edge);
    kiln.register().await;
    let missing = uuid::Uuid::new_v4().to_string();

    for cmd in ["show", "follow", "logs", "cancel", "stop"] {
        kiln.run(&[cmd, &missing]).await.error(3, "job not found (HTTP 404)");
    }
    kiln.run(&["message", &missing, "hi"]).await.error(3, "job not found (HTTP 404)");
    kiln.run(&["message", &missing, " "]).await.error(3, "the message is empty");

    // Refused before anything is sent, in terms of the flags.
    kiln.run(&["submit", "--org", "acme", "--repo", "shop", "--prompt", "x"]).await.error(3, "branchName is required for code jobs (--branch)");
    kiln.run(&["submit", "--org", "acme", "--prompt", "x", "--branch", "b"]).await.error(3, "githubRepo is required with githubOrg (--repo, --org)");
    kiln.run(&["submit", "--org", "acme", "--repo", "shop", "--branch", "b"]).await.error(3, "prompt is required (--prompt)");
    kiln.run(&["submit", "--type", "ralph", "--org", "acme", "--repo", "shop", "-p", "x", "--max-iterations", "101"]).await.error(3, "(--max-iterations)");
    kiln.run(&["submit", "--file", "/nonexistent/job.json"]).await.error(3, "reading /nonexistent/job.json");
    kiln.run(&["ls", "--status", "finished"]).await.error(3, "unknown status \"finished\"");
    kiln.run(&["ls", "--limit", "0"]).await.error(3, "--limit must be from 1 to 500");
    let list = kiln.run(&["--json", "ls"]).await.ok("ls").json();
    assert_eq!(list["total"], 0, "nothing was submitted: {list}");

    // Bad usage: clap's message, prefixed, and status 64.
    for (args, needle) in [
        (vec!["submit", "--type", "deploy"], "invalid value 'deploy'"),
        (vec!["follow"], "required"),
        (vec!["frobnicate"], "unrecognized subcommand"),
        (vec!["ls", "--limit", "many"], "invalid value 'many'"),
    ] {
        let out = kiln.run(&args).await;
        assert_eq!(out.code, 64, "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("kiln: error: ") && out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }

    // A server that is not there, and a URL that is not one.
    let out = kiln.run_with(&["ls"], "", &[("KILN_URL", "http://127.0.0.1:9")]).await;
    assert_eq!(out.code, 3);
    assert!(out.stderr.starts_with("kiln: error: ") && out.stderr.contains("not logged in to http://127.0.0.1:9"), "{}", out.stderr);
    let out = kiln.run_with(&["status"], "", &[("KILN_URL", "http://127.0.0.1:9")]).await;
    assert!(out.code == 3 && out.stderr.contains("cannot reach http://127.0.0.1:9"), "{}", out.stderr);
    kiln.run(&["--url", "localhost:8787", "status"]).await.error(3, "must start with http:// or https://");
}

#[tokio::test]
async fn tokens_come_from_kiln_token_first_and_saved_ones_are_refreshed() {
    let edge = start_edge().await;
    let kiln = Kiln::new(&edge);
    kiln.register().await;
    let id = kiln
        .run(&["submit", "--org", "acme", "--repo", "shop", "-p", "x", "-b", "b/x"])
        .await
        .ok("submit")
        .stdout
        .trim()
        .to_string();

    // KILN_TOKEN wins over the saved login: as the service principal this user's job is not visible,
    // and a bad KILN_TOKEN is an error (it is never refreshed).
    let secret = agent_api_secret();
    let out = kiln.run_with(&["--json", "ls"], "", &[("KILN_TOKEN", &secret)]).await.ok("ls as the service");
    assert!(!ids(&out.json()).contains(&id), "{}", out.stdout);
    let out = kiln.run_with(&["ls"], "", &[("KILN_TOKEN", "not-a-token")]).await;
    assert_eq!(out.code, 3);
    assert!(out.stderr.starts_with("kiln: error: ") && out.stderr.contains("(HTTP 401)"), "{}", out.stderr);

    // An expired access token is refreshed before use; the rotated pair is saved.
    let before = kiln.config()["hosts"][&kiln.url].clone();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let expired = format!("{}.{}.c2ln", b64(r#"{"alg":"HS256","typ":"JWT"}"#), b64(r#"{"sub":"x","exp":1}"#));
    let text = std::fs::read_to_string(kiln.config_path()).unwrap().replace(before["access"].as_str().unwrap(), &expired);
    std::fs::write(kiln.config_path(), text).unwrap();
    let out = kiln.run(&["--json", "ls"]).await.ok("ls with an expired token");
    assert_eq!(ids(&out.json()), vec![id.clone()]);
    let after = kiln.config()["hosts"][&kiln.url].clone();
    assert_ne!(after["refresh"], before["refresh"], "the refresh token was spent and replaced");
    assert_ne!(after["access"].as_str(), Some(expired.as_str()));

    // A token the server refuses (401) is refreshed once and the request retried.
    let text = std::fs::read_to_string(kiln.config_path()).unwrap().replace(after["access"].as_str().unwrap(), "refused-token");
    std::fs::write(kiln.config_path(), text).unwrap();
    let out = kiln.run(&["--json", "show", &id]).await.ok("show after a 401");
    assert_eq!(out.json()["id"], id.as_str());

    // A spent refresh token means logging in again, and says so.
    let spent = after["refresh"].as_str().unwrap();
    let now = kiln.config()["hosts"][&kiln.url].clone();
    let text = std::fs::read_to_string(kiln.config_path())
        .unwrap()
        .replace(now["access"].as_str().unwrap(), &expired)
        .replace(now["refresh"].as_str().unwrap(), spent);
    std::fs::write(kiln.config_path(), text).unwrap();
    kiln.run(&["ls"]).await.error(3, "run `kiln login` again");

    // Logout forgets the server's tokens.
    assert_eq!(kiln.run(&["logout"]).await.ok("logout").stdout.trim(), format!("Logged out of {}", kiln.url));
    kiln.run(&["ls"]).await.error(3, "not logged in");
}

/// The agent: fails when the prompt says `please-fail`, answers each follow-up line with `echo: <line>`
/// when it says `please-chat`, else prints a line a second for 8 seconds.
const AGENT: &str = r#"read -r prompt || true; echo "prompt received"; case "$prompt" in *please-fail*) echo "failing as asked" >&2; exit 1;; *please-chat*) while read -r l; do echo "echo: $l"; done; exit 0;; esac; for i in 1 2 3 4 5 6 7 8; do echo "line $i"; sleep 1; done"#;

/// An edge with a runner (process executor, [`AGENT`]) and the `acme/shop` remote.
struct WithRunner {
    edge: TestEdge,
    _remotes: GitRemotes,
    _github: FakeGitHub,
    _states: tempfile::TempDir,
    _runner: TestRunner,
}

impl WithRunner {
    async fn start(vars: &[(&str, &str)]) -> WithRunner {
        let edge = TestEdge::start(vars).await.expect("starting wrangler dev");
        edge.api().grant("*", "acme/*").await;
        let remotes = GitRemotes::new();
        remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
        let github = FakeGitHub::start("ghp_cli_test");
        let states = tempfile::tempdir().unwrap();
        let state = states.path().display().to_string();
        let git_base = remotes.base_url();
        let github_api = github.api_url();
        let runner = TestRunner::start(
            &edge,
            &[
                ("RUNNER_STATE_DIR", state.as_str()),
                ("RUNNER_EXECUTOR", "process"),
                ("RUNNER_AGENT", "text"),
                ("RUNNER_AGENT_CMD", AGENT),
                ("RUNNER_GIT_BASE_URL", git_base.as_str()),
                ("GITHUB_API_URL", github_api.as_str()),
                ("GITHUB_TOKEN", "ghp_cli_test"),
            ],
        )
        .await
        .expect("starting a runner");
        WithRunner { edge, _remotes: remotes, _github: github, _states: states, _runner: runner }
    }
}

/// Each of the agent's eight lines exactly once in `follow`'s text output.
fn each_line_once(stdout: &str) {
    for i in 1..=8 {
        assert_eq!(stdout.lines().filter(|l| l.ends_with(&format!(" line {i}"))).count(), 1, "line {i}: {stdout}");
    }
}

#[tokio::test]
async fn follow_survives_an_edge_restart_without_gaps_or_repeats_and_exits_with_the_end_state() {
    let WithRunner { mut edge, _remotes, _github, _states, _runner } = WithRunner::start(&[]).await;
    let kiln = Kiln::new(&edge);
    let email = kiln.register().await;

    // `submit --follow --json`: the created job, then the events as JSON lines.
    let mut child = kiln
        .command(&["--json", "submit", "--org", "acme", "--repo", "shop", "-p", "count to eight", "-b", "b/restart", "--follow"], &[])
        .spawn()
        .expect("starting kiln");
    drop(child.stdin.take());
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                lines.lock().unwrap().push(l);
            }
        })
    };
    let stderr = {
        let mut err = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut s).await;
            s
        })
    };
    kiln_e2e::eventually(Duration::from_secs(90), "the agent's second line on kiln's stdout", || {
        let seen = lines.lock().unwrap().iter().any(|l| l.contains("\"line 2\""));
        async move { seen.then_some(()) }
    })
    .await;
    edge.restart().await.expect("restarting wrangler dev");
    let status = tokio::time::timeout(Duration::from_secs(180), child.wait()).await.expect("kiln follow ended").unwrap();
    reader.await.unwrap();
    let stderr = stderr.await.unwrap();
    let lines = lines.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "completed; stdout:\n{}\nstderr:\n{stderr}", lines.join("\n"));
    assert!(stderr.contains("reconnecting after event"), "the drop was noticed: {stderr}");

    let created: Value = serde_json::from_str(&lines[0]).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let followed: Vec<Value> = lines[1..].iter().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let seqs: Vec<u64> = followed.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "every event once, in order: {followed:#?}");
    for i in 1..=8 {
        let n = followed.iter().filter(|e| e["kind"] == "log" && e["content"] == format!("line {i}")).count();
        assert_eq!(n, 1, "line {i} shown once: {followed:#?}");
    }
    assert_eq!(followed.last().unwrap()["status"], "completed");

    // Exactly the log a fresh socket replays after the fact.
    let (_, login) = edge.api().login(&email, PASSWORD).await;
    let token = login["access"].as_str().expect("an access token").to_string();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let replay = ws.until(Duration::from_secs(20), "the terminal status", |v| v["kind"] == "jobStatus" && v["status"] == "completed").await;
    assert_eq!(replay, followed);

    // Text mode after the fact: each line once, the closing line, exit 0.
    let out = kiln.run(&["follow", &id]).await.ok("follow a completed job");
    each_line_once(&out.stdout);
    assert!(out.stdout.lines().last().unwrap().starts_with(&format!("job {id} completed")), "{}", out.stdout);

    // A failing job: exit status 1, its stderr in the output.
    let out = kiln.run(&["submit", "--org", "acme", "--repo", "shop", "-p", "please-fail", "-b", "b/fail", "--follow"]).await;
    assert_eq!(out.code, 1, "failed: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("failing as asked"), "{}", out.stdout);
    assert!(out.stdout.contains("● failed"), "{}", out.stdout);
}

/// The edge closes a socket when its access token expires (here after 5 s): `follow` refreshes the
/// saved login and carries on where it was, quietly, until the job ends.
#[tokio::test]
async fn follow_carries_on_with_a_refreshed_token_when_the_socket_outlives_its_access_token() {
    let w = WithRunner::start(&[("ACCESS_TOKEN_TTL_SECS", "5")]).await;
    let kiln = Kiln::new(&w.edge);
    kiln.register().await;
    let refresh_before = kiln.config()["hosts"][&kiln.url]["refresh"].clone();
    let out = kiln.run(&["submit", "--org", "acme", "--repo", "shop", "-p", "count to eight", "-b", "b/ttl", "--follow"]).await;
    assert_eq!(out.code, 0, "completed: {}{}", out.stdout, out.stderr);
    each_line_once(&out.stdout);
    assert!(out.stdout.lines().last().unwrap().contains(" completed"), "{}", out.stdout);
    assert!(!out.stderr.contains("the server said") && !out.stderr.contains("connection lost"), "expiry is not an error: {}", out.stderr);
    assert_ne!(kiln.config()["hosts"][&kiln.url]["refresh"], refresh_before, "the login was refreshed");

    // KILN_TOKEN cannot be refreshed: the closed socket ends `follow` with an error that says why.
    let id = kiln.run(&["submit", "--org", "acme", "--repo", "shop", "-p", "count again", "-b", "b/ttl2"]).await.ok("submit").stdout.trim().to_string();
    let email = kiln.config()["hosts"][&kiln.url]["email"].as_str().unwrap().to_string();
    let (_, login) = w.edge.api().login(&email, PASSWORD).await;
    let token = login["access"].as_str().unwrap().to_string();
    let out = kiln.run_with(&["follow", &id], "", &[("KILN_TOKEN", &token)]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("kiln: error: the access token expired"), "{}", out.stderr);
}

/// Polls `kiln --json show` until the job's status is `want`.
async fn wait_status(kiln: &Kiln, id: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let job = kiln.run(&["--json", "show", id]).await.ok("show").json();
        if job["status"] == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} did not become {want}: {job:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls `kiln --json logs` until a message's content is `content`.
async fn wait_message(kiln: &Kiln, id: &str, content: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let logs = kiln.run(&["--json", "logs", id]).await.ok("logs").json();
        if logs.as_array().unwrap().iter().any(|m| m["content"] == content) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no message {content:?} in job {id}: {logs:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_task_job_is_messaged_and_completed_and_a_ralph_job_stopped_through_kiln() {
    let w = WithRunner::start(&[]).await;
    let kiln = Kiln::new(&w.edge);
    let email = kiln.register().await;

    // Task: two follow-ups (one from stdin), answered while running, then completed.
    let task = kiln.run(&["--json", "submit", "--type", "task", "--org", "acme", "--repo", "shop", "-p", "please-chat"]).await.ok("submit task").json();
    let task = task["id"].as_str().unwrap().to_string();
    wait_status(&kiln, &task, "running").await;

    // Ctrl-C stops following (exit status 130) and leaves the job running.
    let mut child = kiln.command(&["follow", &task], &[]).spawn().expect("starting kiln follow");
    drop(child.stdin.take());
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = stdout.next_line().await.unwrap() {
            if l.ends_with(" prompt received") {
                return;
            }
        }
        panic!("kiln follow ended before the agent's first line");
    })
    .await
    .expect("the agent's first line within 30 s");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.expect("kiln follow stopped").unwrap();
    assert_eq!(out.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("kiln: stopped following job {task}; the job goes on")), "{stderr}");
    assert_eq!(kiln.run(&["--json", "show", &task]).await.ok("show").json()["status"], "running");

    let out = kiln.run(&["message", &task, "hello there"]).await.ok("message");
    assert_eq!(out.stdout.trim(), format!("message sent to job {task}"));
    let sent = kiln.run_with(&["--json", "message", &task, "-"], "second one\n", &[]).await.ok("message from stdin").json();
    assert_eq!(sent, json!({"id": task, "messageSent": true}));
    wait_message(&kiln, &task, "echo: hello there").await;
    wait_message(&kiln, &task, "echo: second one").await;
    let done = kiln.run(&["--json", "complete", &task]).await.ok("complete").json();
    assert_eq!(done, json!({"id": task, "status": "completing"}));
    let out = kiln.run(&["follow", &task]).await;
    assert_eq!(out.code, 0, "completed: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.lines().any(|l| l.ends_with(&format!("[user {email}] hello there"))), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l.ends_with(" echo: second one")), "{}", out.stdout);

    // Ralph: stopped during its first iteration, it completes after it with `manual_stop`.
    let ralph = kiln
        .run(&["--json", "submit", "--type", "ralph", "--org", "acme", "--repo", "shop", "-p", "count", "--max-iterations", "5"])
        .await
        .ok("submit ralph")
        .json();
    let ralph = ralph["id"].as_str().unwrap().to_string();
    wait_message(&kiln, &ralph, "line 1").await;
    let out = kiln.run(&["stop", &ralph]).await.ok("stop");
    assert!(out.stdout.starts_with("Stop requested"), "{}", out.stdout);
    let out = kiln.run(&["follow", &ralph]).await;
    assert_eq!(out.code, 0, "completed: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.lines().any(|l| l.ends_with("iteration 1/5 finished: exit 0")), "{}", out.stdout);
    assert_eq!(out.stdout.lines().last().unwrap(), format!("job {ralph} completed (manual_stop)"));
    let its = kiln.run(&["--json", "iterations", &ralph]).await.ok("iterations").json();
    assert_eq!((its["completionReason"].as_str(), its["iterations"].as_array().map(Vec::len)), (Some("manual_stop"), Some(1)), "{its:#}");
    let text = kiln.run(&["iterations", &ralph]).await.ok("iterations text").stdout;
    assert!(text.starts_with("iteration 1 of at most 5, ended by manual_stop\niteration 1/5 finished: exit 0\n"), "{text}");
    kiln.run(&["stop", &ralph]).await.error(3, "(HTTP 400)");
}
