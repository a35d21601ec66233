//! Seed 000's frontend flow in a real browser: Debian's Chromium, driven by playwright-core
//! (`e2e/browser/drive.mjs`), on a small page (`e2e/browser/page/`) served from an origin of its
//! own (a second local port), calling a real `wrangler dev` with `fetch` and `WebSocket`. The
//! page does what the seed's React frontend does: register, log in, refresh an expired access
//! token on a 401 and retry, create a job, follow its socket, chat with the requirements gatherer
//! (a real runner's LLM step against the scripted model server) until the job is queued, and load
//! the transcript over REST. A page from an origin `CORS_ORIGINS` does not list is refused by the
//! browser itself.
//!
//! Needs what `scripts/setup` installs (`chromium`, `e2e/browser/node_modules`), `edge/build`
//! (`scripts/build-edge`) and `target/debug/runner`. Chromium that cannot start fails the test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode as HttpStatus, Uri};
use axum::response::{IntoResponse, Response};
use kiln_e2e::{repo_root, unique_email, StatusCode, TestEdge, PASSWORD};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The longest one browser run may take, launch included.
const DRIVE_TIMEOUT: Duration = Duration::from_secs(180);

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

/// Register, log in, and the seed's 401 → `POST /api/auth/token/refresh/` → retry cycle on an
/// access token that really expired (2 s lifetime); then a page from an origin `CORS_ORIGINS`
/// does not list fails to register because the browser refuses the edge's answer to its preflight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_a_listed_origin_signs_in_and_refreshes_and_an_unlisted_one_is_refused() {
    let site = Site::start().await;
    let other = Site::start().await;
    let origin = site.origin();
    let edge = TestEdge::start(&[("CORS_ORIGINS", origin.as_str()), ("ACCESS_TOKEN_TTL_SECS", "2")]).await.expect("starting wrangler dev");
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
        // The access token's own `exp` (the seed's frontend decodes it too) passes.
        wait("Date.now() / 1000 > JSON.parse(atob(kiln.access.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).exp + 1", "the access token to expire"),
        click("#me"),
        wait("kiln.me !== undefined", "GET /api/auth/me/ to succeed after the refresh"),
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
    let after_login = calls(refreshed).split_off(2);
    assert_eq!(
        after_login,
        vec![
            ("GET".into(), "/api/auth/me/".into(), 401),
            ("POST".into(), "/api/auth/token/refresh/".into(), 200),
            ("GET".into(), "/api/auth/me/".into(), 200),
        ],
        "an expired access token: 401, refresh, retry"
    );
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
        "browser auth run: Chromium {} launched in {} ms; steps {:?} ms; whole run {} ms",
        result["browser"], result["launch_ms"], result["steps_ms"], elapsed.as_millis()
    );
}
