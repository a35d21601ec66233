//! Seed 000's frontend flow in a real browser: Debian's Chromium, driven by playwright-core
//! (`e2e/browser/drive.mjs`), on a small page (`e2e/browser/page/`) served from an origin of its
//! own (a second local port), calling a real `wrangler dev` with `fetch` and `WebSocket`. The
//! page does what the seed's React frontend does: register, log in, refresh an expired access
//! token on a 401 and retry, create a job, follow its socket, chat with the requirements gatherer
//! (a real runner's LLM step against the scripted model server) until the job is queued, follow it
//! to `build_done` (job, App and tickets refetched as the seed's frontend does), and load the
//! transcript over REST. A page from an origin `CORS_ORIGINS` does not list is refused by the
//! browser itself.
//!
//! Needs what `scripts/setup` installs (`chromium`, `e2e/browser/node_modules`), `edge/build`
//! (`scripts/build-edge`) and `target/debug/runner`. Chromium that cannot start fails the test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode as HttpStatus, Uri};
use axum::response::{IntoResponse, Response};
use kiln_e2e::model::{ModelServer, Script};
use kiln_e2e::{repo_root, unique_email, StatusCode, TestEdge, TestRunner, PASSWORD};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The longest one browser run may take, launch included: longer than its steps' own waits, so
/// a stuck step is reported by the driver with the page's state.
const DRIVE_TIMEOUT: Duration = Duration::from_secs(420);

// --- The page's own origin -------------------------------------------------------------------

/// `e2e/browser/page/` over HTTP on a port of its own: a static host, as the seed's frontend has.
struct Site {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Site {
    async fn start() -> Site {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the page's port");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(page_file);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serving the page");
        });
        Site { addr, task }
    }

    /// `http://127.0.0.1:<port>`: the page's origin.
    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The page, told where the edge is.
    fn page(&self, edge: &TestEdge) -> String {
        format!("{}/?api={}", self.origin(), edge.url())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn page_file(uri: Uri) -> Response {
    let (name, kind) = match uri.path() {
        "/" | "/index.html" => ("index.html", "text/html; charset=utf-8"),
        "/app.js" => ("app.js", "text/javascript; charset=utf-8"),
        "/favicon.ico" => return HttpStatus::NO_CONTENT.into_response(),
        _ => return (HttpStatus::NOT_FOUND, "not found").into_response(),
    };
    match tokio::fs::read(repo_root().join("e2e/browser/page").join(name)).await {
        Ok(body) => ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-store")], body).into_response(),
        Err(e) => (HttpStatus::INTERNAL_SERVER_ERROR, format!("reading {name}: {e}")).into_response(),
    }
}

// --- The browser -----------------------------------------------------------------------------

/// Runs `steps` in Chromium (`e2e/browser/drive.mjs`) and answers its result; panics with the
/// driver's error and the page's last state when a step fails, and says so plainly when Chromium
/// or the driver cannot start.
async fn drive(steps: Vec<Value>) -> Value {
    let root = repo_root();
    let script = root.join("e2e/browser/drive.mjs");
    assert!(
        root.join("e2e/browser/node_modules/playwright-core/package.json").exists(),
        "e2e/browser/node_modules has no playwright-core: run scripts/setup"
    );
    assert!(std::path::Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: run scripts/setup (it installs Debian's chromium)");
    let plan = json!({"chromium": CHROMIUM, "timeout_ms": 30_000, "steps": steps});
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&script).arg(plan.to_string()).current_dir(root.join("e2e/browser")).kill_on_drop(true);
    let out = tokio::time::timeout(DRIVE_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the browser driver ran longer than {DRIVE_TIMEOUT:?}"))
        .expect("starting node e2e/browser/drive.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the browser driver printed no result ({}):\n{stdout}\n{stderr}", out.status));
    match out.status.code() {
        Some(0) => {}
        Some(2) => panic!("{}\n{stderr}", result["error"].as_str().unwrap_or("Chromium did not start")),
        _ => panic!(
            "the browser run failed: {}\npage state: {:#}\nconsole: {:#}\nfailed requests: {:#}\npage errors: {:#}",
            result["error"], result["state"], result["console"], result["failed_requests"], result["page_errors"]
        ),
    }
    assert_eq!(result["ok"], true, "{result:#}");
    result
}

fn fill(selector: &str, value: &str) -> Value {
    json!({"fill": selector, "value": value})
}

fn click(selector: &str) -> Value {
    json!({"click": selector})
}

fn wait(js: &str, what: &str) -> Value {
    json!({"wait": js, "what": what})
}

/// The trace's `(method, path, status)` triples.
fn calls(kiln: &Value) -> Vec<(String, String, u64)> {
    kiln["trace"]
        .as_array()
        .expect("the page's trace")
        .iter()
        .map(|c| (c["method"].as_str().unwrap().to_string(), c["path"].as_str().unwrap().to_string(), c["status"].as_u64().unwrap()))
        .collect()
}

fn console_says(result: &Value, needle: &str) -> bool {
    result["console"].as_array().is_some_and(|c| c.iter().any(|m| m["text"].as_str().is_some_and(|t| t.contains(needle))))
}

// --- Tests -----------------------------------------------------------------------------------

/// Register, log in, open a job's socket and see the room close it with 4001 when the access
/// token (5 s lifetime) expires; then the seed's 401 → `POST /api/auth/token/refresh/` → retry
/// cycle on that really expired token, and the refreshed token opening the socket again. Last, a
/// page from an origin `CORS_ORIGINS` does not list fails to register: the browser refuses the
/// edge's answer to its preflight and never sends the POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_a_listed_origin_signs_in_and_refreshes_and_an_unlisted_one_is_refused() {
    let site = Site::start().await;
    let other = Site::start().await;
    let origin = site.origin();
    let edge = TestEdge::start(&[("CORS_ORIGINS", origin.as_str()), ("ACCESS_TOKEN_TTL_SECS", "5")]).await.expect("starting wrangler dev");
    let email = unique_email("browser");
    let refused_email = unique_email("browser-refused");

    let started = Instant::now();
    let result = drive(vec![
        json!({"goto": site.page(&edge)}),
        fill("#email", &email),
        fill("#password", PASSWORD),
        fill("#name", "Browser Tester"),
        click("#register"),
        wait("kiln.user !== null", "registered"),
        click("#login"),
        wait("'logged_in' in kiln.marks", "logged in"),
        json!({"snapshot": "logged_in"}),
        // A job's socket lives no longer than the token it was opened with: the room closes it
        // with 4001 (the seed's frontend reads that as "log in again").
        fill("#prompt", "A page that counts down to the weekend (kiln-browser-refresh)"),
        click("#create"),
        wait("kiln.socketOpens === 1", "the job's socket"),
        json!({"wait": "kiln.socketCloses.length > 0", "what": "the socket closed at the token's expiry", "timeout_ms": 30_000}),
        // The access token's own `exp` (the seed's frontend decodes it too) has passed.
        wait("Date.now() / 1000 > JSON.parse(atob(kiln.access.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).exp", "the access token to expire"),
        click("#me"),
        wait("kiln.me !== undefined", "GET /api/auth/me/ to succeed after the refresh"),
        // The refreshed token opens the socket again.
        click("#reconnect"),
        wait("kiln.socketOpens === 2", "the socket reopened"),
        json!({"snapshot": "refreshed"}),
        // Another origin, not listed.
        json!({"goto": other.page(&edge)}),
        fill("#email", &refused_email),
        fill("#password", PASSWORD),
        click("#register"),
        json!({"wait": "kiln.errors.length > 0", "what": "the register call to fail", "allow_errors": true}),
        json!({"snapshot": "refused"}),
    ])
    .await;
    let elapsed = started.elapsed();

    let logged_in = &result["snapshots"]["logged_in"]["kiln"];
    assert_eq!(logged_in["user"]["email"], email.as_str(), "{logged_in:#}");
    assert_eq!(logged_in["user"]["name"], "Browser Tester");
    assert_eq!(
        calls(logged_in),
        vec![("POST".into(), "/api/auth/register/".into(), 201), ("POST".into(), "/api/auth/login/".into(), 200)],
        "register answers 201 and login 200, both readable from the page's origin"
    );

    let refreshed = &result["snapshots"]["refreshed"]["kiln"];
    let job_id = refreshed["jobId"].as_str().expect("a job id");
    // Left out: the loads a socket's open and its jobStatus events start (all GETs answered 200).
    let loads = [format!("/api/job-messages/?job_id={job_id}"), format!("/api/jobs/{job_id}/")];
    let (loaded, after_login): (Vec<_>, Vec<_>) = calls(refreshed).split_off(2).into_iter().partition(|(_, p, _)| loads.contains(p));
    assert!(loaded.iter().all(|(m, _, s)| m == "GET" && *s == 200), "{loaded:?}");
    assert_eq!(
        after_login,
        vec![
            ("POST".into(), "/api/jobs/".into(), 201),
            ("GET".into(), "/api/auth/me/".into(), 401),
            ("POST".into(), "/api/auth/token/refresh/".into(), 200),
            ("GET".into(), "/api/auth/me/".into(), 200),
        ],
        "an expired access token: 401, refresh, retry"
    );
    let closes = refreshed["socketCloses"].as_array().unwrap();
    assert_eq!(closes[0]["code"], 4001, "the socket closed at the token's expiry with 4001: {closes:?}");
    let exp = |token: &Value| -> i64 {
        use base64::Engine;
        let payload = token.as_str().unwrap().split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["exp"].as_i64().unwrap()
    };
    assert!(exp(&refreshed["access"]) > exp(&logged_in["access"]), "the new access token expires later");
    assert_eq!(refreshed["socketOpens"], 2, "the refreshed token opened the socket again");
    assert_eq!(refreshed["refreshes"], 1);
    assert_eq!(refreshed["me"]["email"], email.as_str());
    assert_ne!(refreshed["access"], logged_in["access"], "the refresh answered a new access token");
    assert_ne!(refreshed["refresh"], logged_in["refresh"], "and a new (rotated) refresh token");
    // The rotated-out refresh token is spent.
    let (status, body) = edge
        .api()
        .send(kiln_e2e::Method::POST, "/api/auth/token/refresh/", None, Some(json!({"refresh": logged_in["refresh"]})))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // The unlisted origin: the preflight of its JSON POST got no CORS headers, so the browser
    // never sent the POST: fetch failed, the console names CORS, and the email is not registered.
    let refused = &result["snapshots"]["refused"]["kiln"];
    let trace = calls(refused);
    assert_eq!(trace, vec![("POST".into(), "/api/auth/register/".into(), 0)], "{refused:#}");
    assert!(refused["trace"][0]["error"].as_str().unwrap().contains("Failed to fetch"), "{refused:#}");
    assert!(console_says(&result, "blocked by CORS policy"), "Chromium says why: {:#}", result["console"]);
    let other_origin = other.origin();
    assert!(console_says(&result, &other_origin), "naming the refused origin: {:#}", result["console"]);
    let (status, body) = edge.api().login(&refused_email, PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the refused page's registration never reached the edge: {body}");

    eprintln!(
        "browser auth run: Chromium {} launched in {} ms; steps {} ms; whole run {} ms",
        result["browser"], result["launch_ms"], result["steps_ms"], elapsed.as_millis()
    );
}

/// The seed's frontend flow: register, log in, `POST /api/jobs/`, the job's socket (`?token=`)
/// rendering `stageUpdate`s, the gatherer's question (a real runner's LLM step on the scripted
/// model's demo script), a `chat` answer, the summary and `jobStatus queued`; then the job on to
/// `build_done` as the page follows it (the executives' dialogue, the PRD and its App, the ticket
/// board fetched at `tickets_ready`, the job refetched at every `jobStatus`); and
/// `GET /api/job-messages/?job_id=` agreeing with what the socket showed, message for message
/// (ids `<job_id>:<seq>`, `created_at` equal to the `stageUpdate`'s `timestamp`, so the page's
/// de-duplication renders each message once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_another_origin_chats_with_the_gatherer_and_follows_the_job_to_build_done() {
    let site = Site::start().await;
    let origin = site.origin();
    let model = ModelServer::start(Script::demo());
    let edge = TestEdge::start(&[("CORS_ORIGINS", origin.as_str())]).await.expect("starting wrangler dev");
    let model_url = model.url();
    // Every LLM step on the scripted model; tickets built by the text agent in the process
    // executor (the page watches the lifecycle, not what an agent writes).
    let runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("ANTHROPIC_BASE_URL", model_url.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-kiln-test"),
            ("RUNNER_LLM_MODEL", "anthropic/kiln-demo"),
        ],
    )
    .await
    .expect("starting a runner");
    let email = unique_email("browser-flow");
    let idea = "A tea timer with presets for green and black tea (kiln-browser)";
    let answer = "Tea drinkers; the first screen shows the presets and a start button";
    let saw_status = |s: &str| format!("kiln.statuses.includes('{s}') || kiln.statuses.includes('failed')");

    let started = Instant::now();
    let result = drive(vec![
        json!({"goto": site.page(&edge)}),
        fill("#email", &email),
        fill("#password", PASSWORD),
        fill("#name", "Browser Flow"),
        click("#register"),
        wait("kiln.user !== null", "registered"),
        click("#login"),
        wait("'logged_in' in kiln.marks", "logged in"),
        fill("#prompt", idea),
        click("#create"),
        wait("kiln.jobId !== null && kiln.socketOpens > 0", "the job and its socket"),
        json!({"wait": "kiln.socketFrames.some(f => f.kind === 'stageUpdate' && f.role === 'agent')",
               "what": "the gatherer's question on the socket", "timeout_ms": 90_000}),
        json!({"snapshot": "asked"}),
        fill("#chat-input", answer),
        click("#send"),
        json!({"wait": saw_status("queued"), "what": "jobStatus queued", "timeout_ms": 90_000}),
        json!({"wait": saw_status("build_done"), "what": "jobStatus build_done", "timeout_ms": 180_000}),
        // The last refetches the final jobStatus started have answered.
        wait("kiln.job && kiln.job.status === kiln.status && kiln.tickets && kiln.tickets.length > 0 && kiln.app", "the job, tickets and App refetched"),
        click("#reload"),
        wait("kiln.reloaded === true", "the transcript over REST"),
        // Everything REST answered has arrived on the socket too (the frames may trail the answer).
        wait("kiln.restMessages.every(m => kiln.socketFrames.some(f => m.id === `${kiln.jobId}:${f.seq}`))", "the socket to hold every REST message"),
        json!({"snapshot": "done"}),
    ])
    .await;
    let elapsed = started.elapsed();

    let asked = &result["snapshots"]["asked"];
    let snap = &result["snapshots"]["done"];
    let kiln = &snap["kiln"];
    let job_id = kiln["jobId"].as_str().expect("a job id").to_string();
    let created = &kiln["createdJob"];
    assert_eq!(created["status"], "collecting", "{created:#}");
    assert_eq!(created["initial_prompt"], idea, "{created:#}");
    let statuses: Vec<&str> = kiln["statuses"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(!statuses.contains(&"failed"), "the job failed: {:#}\nrunner log:\n{}", kiln["job"], runner.log());
    let order = ["collecting", "queued", "planning", "prd_ready", "ticketing", "tickets_ready", "building", "build_done"];
    let positions: Vec<usize> =
        order.iter().map(|p| statuses.iter().position(|x| x == p).unwrap_or_else(|| panic!("no {p} in {statuses:?}"))).collect();
    assert!(positions.windows(2).all(|p| p[0] < p[1]), "seed 000's statuses in order: {statuses:?}");

    // The page's calls: all answered and readable from its origin, no 401 on the way.
    let trace = calls(kiln);
    let first: Vec<_> = trace.iter().take(3).cloned().collect();
    assert_eq!(
        first,
        vec![
            ("POST".to_string(), "/api/auth/register/".to_string(), 201),
            ("POST".to_string(), "/api/auth/login/".to_string(), 200),
            ("POST".to_string(), "/api/jobs/".to_string(), 201),
        ],
        "{trace:?}"
    );
    assert!(trace[3..].iter().all(|(m, _, s)| m == "GET" && *s == 200), "every later call a GET answered 200: {trace:?}");
    let count = |path: &str| trace.iter().filter(|(_, p, _)| p == path).count();
    let messages_path = format!("/api/job-messages/?job_id={job_id}");
    assert_eq!(count(&messages_path), 2, "the transcript was loaded at the socket's open and on reload: {trace:?}");
    assert_eq!(count(&format!("/api/jobs/{job_id}/")), statuses.len(), "one job refetch per jobStatus: {trace:?}");
    assert_eq!(kiln["refreshes"], 0);
    assert_eq!(kiln["socketOpens"], 1);
    assert_eq!(kiln["socketCloses"], json!([]), "the socket stayed open");
    assert_eq!(kiln["socketErrors"], json!([]), "no error event on the socket");

    // The socket: the log replayed from its start, dense, then followed.
    let frames = kiln["socketFrames"].as_array().unwrap();
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().expect("every frame has a seq")).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "dense seqs from 1: {frames:#?}");
    assert_eq!(frames[0]["kind"], "jobStatus");
    assert_eq!(frames[0]["status"], "collecting");
    let stage: Vec<&Value> = frames.iter().filter(|f| f["kind"] == "stageUpdate").collect();
    let by_role = |role: &str| stage.iter().filter(|f| f["role"] == role).copied().collect::<Vec<_>>();
    let users = by_role("user");
    // The answer is the user's last message (whether the idea opens the transcript as a message
    // of its own is the room's choice; the job carries it as `initial_prompt` either way).
    let user_texts: Vec<&str> = users.iter().map(|u| u["content"].as_str().unwrap()).collect();
    assert_eq!(user_texts.last(), Some(&answer), "{stage:#?}");
    assert!(user_texts[..user_texts.len() - 1].iter().all(|t| *t == idea), "{user_texts:?}");
    let agents = by_role("agent");
    assert!(agents.len() >= 2, "a question and the summary: {stage:#?}");
    assert!(agents[0]["content"].as_str().unwrap().contains("who will use it"), "{:#}", agents[0]);
    assert!(agents.iter().all(|a| a["sender"].as_str().is_some_and(|s| !s.is_empty())), "{agents:#?}");
    assert!(agents[0]["seq"].as_u64().unwrap() < users.last().unwrap()["seq"].as_u64().unwrap(), "the answer followed the question");
    let queued_at = frames.iter().find(|f| f["kind"] == "jobStatus" && f["status"] == "queued").expect("jobStatus queued")["seq"].as_u64().unwrap();
    let summary = stage
        .iter()
        .find(|f| f["content"].as_str().is_some_and(|c| c.contains(&format!("\"{idea}\"")) && c.contains("Tea drinkers")))
        .unwrap_or_else(|| panic!("the summary, quoting the idea and the answer, is a message: {stage:#?}"));
    assert!(summary["seq"].as_u64().unwrap() < queued_at, "the summary came before jobStatus queued: {frames:#?}");
    let asked_statuses: Vec<&Value> = asked["kiln"]["socketFrames"].as_array().unwrap().iter().filter(|f| f["kind"] == "jobStatus").collect();
    assert!(asked_statuses.iter().all(|f| f["status"] == "collecting"), "the job stayed collecting while the gatherer asked: {asked_statuses:#?}");

    // REST's transcript is the socket's, message for message.
    let rest = kiln["restMessages"].as_array().expect("the transcript over REST");
    let rest_seqs: Vec<u64> = rest
        .iter()
        .map(|m| {
            let id = m["id"].as_str().unwrap_or_else(|| panic!("a message id: {m}"));
            let (job, seq) = id.rsplit_once(':').unwrap_or_else(|| panic!("ids are <job_id>:<seq>: {id}"));
            assert_eq!(job, job_id, "{m}");
            seq.parse().unwrap()
        })
        .collect();
    assert_eq!(
        rest_seqs,
        stage.iter().map(|f| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        "the same messages, oldest first, over REST and the socket (the job had ended: nothing trails)"
    );
    for (m, f) in rest.iter().zip(&stage) {
        assert_eq!(m["role"], f["role"], "{m} vs {f}");
        assert_eq!(m["sender"], f["sender"], "{m} vs {f}");
        assert_eq!(m["content"], f["content"], "{m} vs {f}");
        assert_eq!(m["metadata"], f["metadata"], "{m} vs {f}");
        assert_eq!(m["created_at"], f["timestamp"], "created_at is the stageUpdate's timestamp: {m} vs {f}");
    }
    // The page rendered each message once: live and stored copies de-duplicated by timestamp.
    let transcript = snap["transcript"].as_array().unwrap();
    assert_eq!(transcript.len(), stage.len(), "{transcript:#?}\n{stage:#?}");
    assert!(transcript.iter().any(|li| li["text"].as_str().unwrap().ends_with(answer)), "{transcript:#?}");

    // What the page fetched on the way agrees with what the socket said.
    let job = &kiln["job"];
    assert_eq!(job["status"], "build_done", "{job:#}");
    assert!(job["requirements_summary"].as_str().is_some_and(|s| s.contains("Tea drinkers")), "{job:#}");
    let dialogue = frames.iter().filter(|f| f["kind"] == "agentDialogue").count();
    assert!(dialogue >= 3, "the executives spoke: {frames:#?}");
    assert_eq!(job["steps"].as_array().map(Vec::len), Some(dialogue), "the job's steps are its dialogue: {job:#}");
    let prd = frames.iter().find(|f| f["kind"] == "prdReady").expect("a prdReady event");
    assert_eq!(kiln["app"]["job_id"], job_id.as_str());
    assert_eq!(kiln["app"]["prd_markdown"], prd["prdMarkdown"], "the App holds the PRD the socket announced");
    assert_eq!(kiln["app"]["spec"], prd["spec"]);
    let tickets = kiln["tickets"].as_array().unwrap();
    assert!(tickets.iter().any(|t| t["type"] == "epic") && tickets.iter().any(|t| t["type"] == "story"), "{tickets:#?}");
    assert!(tickets.iter().all(|t| t["job_id"] == job_id.as_str()), "{tickets:#?}");
    // Stories are what agents build (an epic is only their parent).
    assert!(
        tickets.iter().filter(|t| t["type"] != "epic").all(|t| t["status"] == "done"),
        "the board after build_done: {tickets:#?}"
    );

    // The answers came from the scripted model, asked as the gatherer.
    let gatherer_rules: Vec<String> =
        model.requests().iter().filter(|r| r.system.contains("Kiln role: gatherer")).filter_map(|r| r.rule.clone()).collect();
    assert!(gatherer_rules.iter().any(|r| r == "demo-gatherer-question"), "{gatherer_rules:?}");
    assert!(gatherer_rules.iter().any(|r| r == "demo-gatherer-summary"), "{gatherer_rules:?}");
    assert!(!console_says(&result, "CORS"), "no CORS complaint from the listed origin: {:#}", result["console"]);

    let marks = &kiln["marks"];
    let ms = |a: &str, b: &str| marks[b].as_i64().unwrap_or(-1) - marks[a].as_i64().unwrap_or(0);
    eprintln!(
        "browser flow: Chromium {} launched in {} ms; job created to socket open {} ms, to the gatherer's question {} ms; \
         answer sent to queued {} ms, to build_done {} ms; {} REST calls; whole run {} ms",
        result["browser"],
        result["launch_ms"],
        ms("job_created", "socket_open"),
        ms("job_created", "first_agent_reply"),
        ms("chat_sent", "status_queued"),
        ms("chat_sent", "status_build_done"),
        trace.len(),
        elapsed.as_millis()
    );
}
