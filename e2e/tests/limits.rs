//! Issue 6 items 10 and 11 end to end against a real `wrangler dev` and real runner processes:
//! request bodies over 1 MiB answer 413; the event log is read a page at a time (a socket's
//! replay, and `includeMessages` with `messagesLimit` / `messagesAfter`); an account holds at most
//! `MAX_REPOSITORIES_PER_OWNER` repositories; a job whose agent prints 60 MiB completes, frees its
//! slot and leaves truncation and drop markers in its log while the runner's memory stays bounded.

use std::time::{Duration, Instant};

use kiln_e2e::{GitRemotes, Method, StatusCode, TestEdge, TestRunner, WsAuth, WsClient};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

/// Lines the long job's agent prints: with the runner's own lines, more than two replay pages
/// (500 events) and more than the default page of messages (1000).
const LINES: u64 = 1300;

static EDGE: OnceCell<TestEdge> = OnceCell::const_new();
/// Held by a test while its runner is connected: any connected runner takes any job, so tests
/// with runners of their own take turns.
static RUNNERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn edge() -> &'static TestEdge {
    EDGE.get_or_init(|| async {
        let edge = TestEdge::start(&[("MAX_REPOSITORIES_PER_OWNER", "3")]).await.expect("starting wrangler dev");
        edge.api().grant("*", "acme/*").await;
        edge
    })
    .await
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, needle: &str) {
    assert_eq!(status, want, "{body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("errors are {{\"error\"}}: {body}"));
    assert!(error.contains(needle), "{error:?} should say {needle:?}");
}

/// A runner process (process executor) against the shared edge with `agent` as its command.
async fn runner(edge: &TestEdge, remotes: &GitRemotes, state: &tempfile::TempDir, agent: &str, extra: &[(&str, &str)]) -> TestRunner {
    let base = remotes.base_url();
    let mut env = vec![
        ("RUNNER_STATE_DIR", state.path().to_str().unwrap()),
        ("RUNNER_EXECUTOR", "process"),
        ("RUNNER_AGENT", "text"),
        ("RUNNER_AGENT_CMD", agent),
        ("RUNNER_GIT_BASE_URL", base.as_str()),
    ];
    env.extend_from_slice(extra);
    TestRunner::start(edge, &env).await.expect("starting a runner")
}

/// Every message of the job, a page of 4999 at a time.
async fn all_messages(api: &kiln_e2e::Api, token: &str, id: &str) -> Vec<Value> {
    let mut all = vec![];
    let mut after = 0;
    loop {
        let (status, job) = api.get(&format!("/jobs/{id}?includeMessages=true&messagesLimit=4999&messagesAfter={after}"), token).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        all.extend(job["messages"].as_array().unwrap().iter().cloned());
        match job["messages_next_after"].as_u64() {
            Some(next) => after = next,
            None => return all,
        }
    }
}

/// A line of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
}

#[tokio::test]
async fn a_job_printing_60_mib_completes_and_the_runners_memory_stays_bounded() {
    let _turn = RUNNERS.lock().await;
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-flood").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "flood", &[("README.md", "# flood\n")]);
    let state = tempfile::tempdir().unwrap();
    // A 30 MiB line, then 30 MiB of 94-byte lines.
    let agent = "head -n 1 >/dev/null; head -c 31457280 /dev/zero | tr '\\0' x; echo; yes \"agent: flood $(printf '%080d' 0)\" | head -c 31457280; echo; echo 'agent: flood done'";
    let r = runner(edge, &remotes, &state, agent, &[("RUNNER_EVENT_BUFFER_MB", "1"), ("RUNNER_NAME", "flood")]).await;
    let pid = r.pid().expect("the runner runs");
    let before = proc_kib(pid, "VmRSS");
    let t = Instant::now();
    let created = api
        .create_job(&token, json!({"prompt": "print 60 MiB", "githubOrg": "acme", "githubRepo": "flood", "branchName": "kiln/flood"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    api.wait_status(&token, &id, "completed", Duration::from_secs(240)).await;
    let took = t.elapsed();
    let peak = proc_kib(pid, "VmHWM");
    let messages = all_messages(&api, &token, &id).await;
    println!(
        "60 MiB job through a real edge: completed in {} ms; runner RSS {} MiB before, peak {} MiB; {} messages stored",
        took.as_millis(),
        before / 1024,
        peak / 1024,
        messages.len()
    );
    assert!(peak < 150 * 1024, "the runner's peak RSS was {} MiB", peak / 1024);
    // The whole log replayed to a new socket, page by page.
    let last = messages.len() as u64;
    let t = Instant::now();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let replay = ws.until(Duration::from_secs(60), "the last event", |e| e["seq"].as_u64() == Some(last)).await;
    println!("replay of {last} events ({} pages of 500): {} ms", last.div_ceil(500), t.elapsed().as_millis());
    assert_eq!(seqs(&replay), (1..=last).collect::<Vec<_>>());
    ws.close().await;

    // The slot is free: the runner holds nothing and takes the next job.
    let health: Value = reqwest::get(r.health_url()).await.unwrap().json().await.unwrap();
    assert_eq!(health["queue"]["running"], 0, "{health}");

    let content = |m: &Value| m["content"].as_str().unwrap_or_default().to_string();
    let cut = 31457280 - 128 * 1024;
    assert!(
        messages.iter().any(|m| m["type"] == "stdout" && content(m).starts_with("xxxx") && content(m).ends_with(&format!("… [truncated {cut} bytes]"))),
        "the 30 MiB line is in the log, truncated with its marker"
    );
    let dropped: u64 = messages
        .iter()
        .filter(|m| m["type"] == "system")
        .filter_map(|m| content(m).strip_prefix("… [dropped ")?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(dropped > 0, "the log says output was dropped");
    let kept = messages.iter().filter(|m| m["type"] == "stdout" && content(m).starts_with("agent: flood 0")).count() as u64;
    println!("of ≈ 334652 short lines: {kept} stored, {dropped} dropped (markers)");
    assert!(kept + dropped >= 334_000, "{kept} kept + {dropped} dropped");

    let next = api
        .create_job(&token, json!({"prompt": "again", "githubOrg": "acme", "githubRepo": "flood", "branchName": "kiln/flood-2"}))
        .await;
    api.wait_status(&token, next["id"].as_str().unwrap(), "completed", Duration::from_secs(240)).await;
}

#[tokio::test]
async fn a_request_body_over_one_mib_is_refused_with_413() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-413").await;
    let big = "x".repeat(1024 * 1024 + 1);
    let body = json!({"prompt": big, "githubOrg": "acme", "githubRepo": "shop", "branchName": "kiln/too-big"});
    let (status, answer) = api.post("/jobs", &token, body).await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over 1048576 bytes");
    assert_eq!(answer["error"], "request body over 1048576 bytes");
    // Nothing was stored.
    let (_, list) = api.get("/jobs", &token).await;
    assert_eq!(list["total"], 0, "{list}");

    // Any endpoint that reads a body: a client's name, a runner's event batch.
    let (status, answer) = api.post("/clients", &token, json!({"name": "x".repeat(2 * 1024 * 1024)})).await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over");
    let (status, answer) = api
        .send(Method::POST, "/runner/v1/register", Some(&kiln_e2e::runner_registration_token()), Some(json!({"name": big})))
        .await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over");

    // Under the limit, the body is read and validated as before.
    let body = json!({"prompt": "x".repeat(1000 * 1024), "githubOrg": "acme", "githubRepo": "shop", "branchName": "kiln/big"});
    let (status, answer) = api.post("/jobs", &token, body).await;
    assert_ne!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
}

#[tokio::test]
async fn an_account_holds_at_most_max_repositories_per_owner() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-repos").await;
    let (status, client) = api.post("/clients", &token, json!({"name": "Acme"})).await;
    assert_eq!(status, StatusCode::CREATED, "{client}");
    let id = client["id"].as_str().unwrap();
    let (status, other) = api.post("/clients", &token, json!({"name": "Acme too"})).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    let other = other["id"].as_str().unwrap();
    let add = |client: &str, repo: &str| {
        let (api, token, path) = (api.clone(), token.clone(), format!("/clients/{client}/repository"));
        let body = json!({"githubOrg": "acme", "githubRepo": repo});
        async move { api.post(&path, &token, body).await }
    };
    for repo in ["one", "two"] {
        let (status, body) = add(id, repo).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = add(other, "three").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The fourth, on either client, is refused and not stored.
    let (status, body) = add(id, "four").await;
    assert_error(status, &body, StatusCode::CONFLICT, "MAX_REPOSITORIES_PER_OWNER = 3");
    let (status, body) = add(other, "five").await;
    assert_error(status, &body, StatusCode::CONFLICT, "already has 3 repositories");
    let (_, clients) = api.get("/clients", &token).await;
    let held: usize = clients
        .as_array()
        .or_else(|| clients["clients"].as_array())
        .unwrap_or_else(|| panic!("{clients}"))
        .iter()
        .map(|c| c["repositories"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(held, 3, "{clients}");
    // Adding one a client already has only updates it.
    let (status, body) = api
        .post(&format!("/clients/{id}/repository"), &token, json!({"githubOrg": "acme", "githubRepo": "one", "defaultBranch": "trunk"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["repository"]["default_branch"], "trunk");
    // The cap is per account: another user starts from nothing.
    let bob = api.new_user("limits-repos-bob").await;
    let (_, c) = api.post("/clients", &bob, json!({"name": "Bob's"})).await;
    let (status, body) = api
        .post(&format!("/clients/{}/repository", c["id"].as_str().unwrap()), &bob, json!({"githubOrg": "acme", "githubRepo": "four"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Every `seq` of `events`, in order.
fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

#[tokio::test]
async fn a_long_log_is_replayed_and_read_a_page_at_a_time() {
    let _turn = RUNNERS.lock().await;
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-pages").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let state = tempfile::tempdir().unwrap();
    let agent = format!("head -n 1 >/dev/null; seq -f 'line %g' 1 {LINES}");
    let _runner = runner(edge, &remotes, &state, &agent, &[]).await;
    let created = api
        .create_job(&token, json!({"prompt": "print a long log", "githubOrg": "acme", "githubRepo": "shop", "branchName": "kiln/long-log"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    api.wait_status(&token, &id, "completed", Duration::from_secs(120)).await;

    // The whole log, replayed to a new socket: dense from 1, every line once.
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let replay = ws.drain(Duration::from_millis(1500)).await;
    let last = *seqs(&replay).last().expect("a replay");
    assert!(last > 2 * 500 + 200, "{last} events: more than two pages");
    assert_eq!(seqs(&replay), (1..=last).collect::<Vec<_>>(), "dense, in order, no duplicate");
    let lines: Vec<&str> = replay
        .iter()
        .filter(|e| e["kind"] == "log" && e["stream"] == "stdout")
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(lines.len() as u64, LINES);
    assert_eq!(lines[0], "line 1");
    assert_eq!(lines[LINES as usize - 1], format!("line {LINES}"));
    ws.close().await;

    // Timed: connect to the last event of the replay, whole and from a cursor across a page
    // boundary.
    let is_last = |e: &Value| e["seq"].as_u64() == Some(last);
    let t = Instant::now();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let again = ws.until(Duration::from_secs(10), "the last event", is_last).await;
    let replay_ms = t.elapsed().as_millis();
    assert_eq!(seqs(&again), (1..=last).collect::<Vec<_>>());
    ws.close().await;
    let t = Instant::now();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), Some(499)).await.expect("socket");
    let tail = ws.until(Duration::from_secs(10), "the last event", is_last).await;
    let tail_ms = t.elapsed().as_millis();
    assert_eq!(seqs(&tail), (500..=last).collect::<Vec<_>>());
    assert!(ws.drain(Duration::from_millis(300)).await.is_empty(), "nothing after the last");
    ws.close().await;
    println!("replay of {last} events (pages of 500), connect to last event: {replay_ms} ms; after seq 499: {tail_ms} ms");

    // includeMessages: the first 1000 by default, and where the next page starts.
    let t = Instant::now();
    let (status, job) = api.get(&format!("/jobs/{id}?includeMessages=true"), &token).await;
    let first_ms = t.elapsed().as_millis();
    assert_eq!(status, StatusCode::OK, "{job}");
    let messages = job["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1000);
    assert_eq!(messages[0]["type"], "system", "seed 003's shape: {}", messages[0]);
    assert!(messages[0]["content"].is_string() && messages[0]["created_at"].is_string(), "{}", messages[0]);
    assert_eq!(job["messages_next_after"], 1000);
    let (status, rest) = api.get(&format!("/jobs/{id}?includeMessages=true&messagesAfter=1000"), &token).await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(rest["messages"].as_array().unwrap().len() as u64, last - 1000);
    assert!(rest.get("messages_next_after").is_none(), "the last page says no more: {rest}");
    let all: Vec<&Value> = messages.iter().chain(rest["messages"].as_array().unwrap()).collect();
    let stdout: Vec<&str> = all.iter().filter(|m| m["type"] == "stdout").filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(stdout.len() as u64, LINES, "the two pages hold every line once");

    // Smaller pages, and bad cursors.
    let (_, page) = api.get(&format!("/jobs/{id}?includeMessages=true&messagesLimit=10&messagesAfter=5"), &token).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 10);
    assert_eq!(page["messages_next_after"], 15);
    for bad in ["messagesLimit=0", "messagesLimit=5000", "messagesLimit=x", "messagesAfter=-1"] {
        let (status, body) = api.get(&format!("/jobs/{id}?includeMessages=true&{bad}"), &token).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, if bad.starts_with("messagesLimit") { "messagesLimit" } else { "messagesAfter" });
    }
    // Without includeMessages, no messages and no cursor.
    let (_, plain) = api.get(&format!("/jobs/{id}"), &token).await;
    assert!(plain.get("messages").is_none() && plain.get("messages_next_after").is_none(), "{plain}");
    println!("GET /jobs/:id?includeMessages=true (1000 of {last} messages): {first_ms} ms");
}

/// Issue 6 item 15, what the runner relies on: the edge (workerd) answers the WebSocket pings a
/// runner sends on its session, without any message of the runner's protocol in between, so a
/// runner hears from a live edge however quiet its queue is.
#[tokio::test]
async fn the_edge_answers_a_runners_websocket_pings() {
    use futures::{SinkExt, StreamExt};
    use kiln_schemas::runner::RunnerMessage;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::Message;

    let edge = edge().await;
    let (status, reg) = edge
        .api()
        .send(Method::POST, "/runner/v1/register", Some(&kiln_e2e::runner_registration_token()), Some(json!({"name": "pinger"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    let mut req = format!("{}/runner/v1/connect", edge.ws_url()).into_client_request().unwrap();
    let auth = format!("Bearer {}", reg["token"].as_str().unwrap());
    req.headers_mut().insert("authorization", HeaderValue::from_str(&auth).unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("the runner socket");
    // Capacity 0: this session takes no job of the other tests.
    let hello = RunnerMessage::Hello { name: "pinger".into(), capacity: 0, running: vec![], version: "0".into(), tools: None };
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into())).await.unwrap();
    macro_rules! next {
        () => {
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await.ok().flatten().map(|m| m.expect("a frame"))
        };
    }
    match next!() {
        Some(Message::Text(t)) => assert!(t.contains("welcome"), "{t}"),
        other => panic!("no welcome: {other:?}"),
    }
    for i in 0..3u8 {
        let payload = vec![b'k', i];
        let t = Instant::now();
        ws.send(Message::Ping(payload.clone().into())).await.unwrap();
        loop {
            match next!() {
                Some(Message::Pong(p)) => {
                    assert_eq!(p.as_ref(), payload.as_slice());
                    println!("ping {i} answered in {} ms", t.elapsed().as_millis());
                    break;
                }
                Some(_) => continue,
                None => panic!("ping {i} got no pong within 5 s"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = ws.close(None).await;
}

fn git_out(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git").args(args).current_dir(dir).output().expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 6 item 11: a runner SIGKILLed in the middle of a job leaves its worktree and branch; the
/// next runner on the same directories sweeps them before it connects, and the job, requeued
/// when its lease expires, is finished there.
#[tokio::test]
async fn a_runner_started_after_a_crash_sweeps_what_the_crash_left() {
    let _turn = RUNNERS.lock().await;
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-crash").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "crash", &[("README.md", "# crash\n")]);
    let (state1, state2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = runner(edge, &remotes, &state1, "head -n 1 >/dev/null; echo working; sleep 600", &[("RUNNER_NAME", "crash-1")]).await;
    let created = api
        .create_job(&token, json!({"prompt": "work", "githubOrg": "acme", "githubRepo": "crash", "branchName": "kiln/crash"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let (repos, worktrees) = (first.repos_dir(), first.worktrees_dir());
    let mirror = repos.join("acme/crash.git");
    let wt = worktrees.join(&id);
    kiln_e2e::eventually(Duration::from_secs(60), "the job's worktree", || {
        let wt = wt.clone();
        async move { wt.join("README.md").is_file().then_some(()) }
    })
    .await;
    assert!(git_out(&mirror, &["for-each-ref", "--format=%(refname:short)", "refs/heads/"]).contains("kiln/crash"));

    first.kill();
    assert!(wt.exists(), "a SIGKILLed runner cleans nothing up");
    let t = Instant::now();
    let second = runner(
        edge,
        &remotes,
        &state2,
        "head -n 1 >/dev/null; echo finished elsewhere",
        &[("RUNNER_NAME", "crash-2"), ("REPOS_DIR", repos.to_str().unwrap()), ("WORKTREES_DIR", worktrees.to_str().unwrap())],
    )
    .await;
    // The runner answers /health only once it is built: the sweep is done.
    println!("second runner up (sweep included) in {} ms", t.elapsed().as_millis());
    assert!(!wt.exists(), "the crashed job's worktree is swept");
    assert_eq!(git_out(&mirror, &["for-each-ref", "refs/heads/"]), "", "and its branch");
    assert_eq!(git_out(&mirror, &["worktree", "list", "--porcelain"]).matches("worktree ").count(), 1, "git lists no worktree");
    let health: Value = reqwest::get(second.health_url()).await.unwrap().json().await.unwrap();
    assert_eq!(health["disk"]["worktrees"]["count"], 0, "{health}");
    assert_eq!(health["disk"]["mirrors"]["count"], 1, "{health}");

    // The job's lease runs out (30 s) and the second runner finishes it.
    let job = api.wait_status(&token, &id, "completed", Duration::from_secs(120)).await;
    assert_eq!(job["attempts"], 2, "{job}");
    drop(first);
}
