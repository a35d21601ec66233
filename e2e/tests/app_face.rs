//! Seed 000's app-builder REST face against a real `wrangler dev` (issue 8 §2): `/api/jobs/`
//! (create, list order, detail, PATCH rules, pause/resume, continue, delete, purge and its
//! guard), `/api/job-messages/` (post, list, get, delete, as views of the job's event log: a
//! deleted message leaves the socket's replay too), `/api/apps/` and `/api/tickets/` (empty, and
//! as a room writes them), the files endpoints (bad paths refused, the empty tree of a job with no
//! workspace, an ended job's R2 snapshot), the envelope (`detail` beside `error`, plain arrays,
//! JSON on every 2xx but 204), and owner scoping: another user's ids answer 404 on every endpoint.
//!
//! No runner runs here: jobs stay in `collecting` (the requirements gatherer finds no runner and
//! says so in the transcript, which these tests tolerate); one test ends jobs behind the edge's
//! back (D1 rows and an R2 object as the room and a runner write them). The lifecycle itself
//! (gatherer replies, phases, files from a live workspace) is `e2e/tests/app_builder.rs`'s.

use std::time::Duration;

use kiln_e2e::{agent_api_secret, unique_email, Api, Method, StatusCode, TestEdge, WsAuth, WsClient};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

static SHARED: OnceCell<TestEdge> = OnceCell::const_new();

/// The edge shared by tests that isolate themselves by user; purge is off on it.
async fn shared() -> &'static TestEdge {
    SHARED
        .get_or_init(|| async { TestEdge::start(&[("ALLOW_JOB_PURGE", "false")]).await.expect("starting wrangler dev") })
        .await
}

const STATUSES: [&str; 9] =
    ["collecting", "queued", "planning", "prd_ready", "ticketing", "tickets_ready", "building", "build_done", "failed"];

/// A user of one edge.
struct User {
    api: Api,
    token: String,
    email: String,
}

impl User {
    async fn new(edge: &TestEdge, prefix: &str) -> User {
        let api = edge.api();
        let email = unique_email(prefix);
        let (token, _) = api.register_and_login(&email).await;
        User { api, token, email }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api.send(method, path, Some(&self.token), body).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(body)).await
    }

    /// `POST /api/jobs/`, asserting 201; answers the job.
    async fn create(&self, idea: &str) -> Value {
        let (status, job) = self.post("/api/jobs/", json!({ "prompt": idea })).await;
        assert_eq!(status, StatusCode::CREATED, "POST /api/jobs/: {job}");
        job
    }

    /// `POST /api/job-messages/`, asserting 201; answers the message.
    async fn message(&self, body: Value) -> Value {
        let (status, m) = self.post("/api/job-messages/", body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "POST /api/job-messages/ {body}: {m}");
        m
    }

    async fn transcript(&self, job_id: &str) -> Vec<Value> {
        let (status, list) = self.get(&format!("/api/job-messages/?job_id={job_id}")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array().unwrap_or_else(|| panic!("the transcript is a plain array: {list}")).clone()
    }
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key:?} in {v}")).to_string()
}

/// DRF's error envelope: `error` and `detail`, the same text.
fn assert_api_error(status: StatusCode, body: &Value, want: StatusCode, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {body}"));
    assert!(!error.is_empty(), "{what}: {body}");
    assert_eq!(body["detail"], body["error"], "{what}: detail beside error: {body}");
}

fn assert_rfc3339(v: &Value, what: &str) {
    let s = v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{what} {s:?} is not RFC 3339: {e}"));
}

/// The fields seed 000's frontend reads of a job, never null where it breaks on null.
fn assert_job_shape(job: &Value) {
    uuid::Uuid::parse_str(&text(job, "id")).expect("job ids are UUIDs");
    for key in ["initial_prompt", "prompt", "status", "created_at", "updated_at"] {
        assert!(job[key].is_string(), "{key} is a string: {job}");
    }
    for key in ["requirements_summary", "error_message"] {
        assert!(job.get(key).is_some(), "{key} is present (null or a string): {job}");
    }
    assert!(job["is_paused"].is_boolean(), "{job}");
    assert!(STATUSES.contains(&job["status"].as_str().unwrap()), "a documented status: {job}");
    assert_rfc3339(&job["created_at"], "created_at");
    assert_rfc3339(&job["updated_at"], "updated_at");
}

/// The user's messages of a transcript (the gatherer's own notes may come and go).
fn contents(list: &[Value]) -> Vec<String> {
    list.iter().map(|m| text(m, "content")).collect()
}

// --- jobs ---------------------------------------------------------------------------------------

#[tokio::test]
async fn jobs_are_created_collecting_and_listed_newest_first() {
    let edge = shared().await;
    let ann = User::new(edge, "create").await;
    let (status, empty) = ann.get("/api/jobs/").await;
    assert_eq!((status, empty), (StatusCode::OK, json!([])), "a new user has no jobs: a plain array");

    let first = ann.create("A todo app with tags").await;
    assert_job_shape(&first);
    assert_eq!(first["status"], "collecting");
    assert_eq!((first["initial_prompt"].clone(), first["prompt"].clone()), (json!("A todo app with tags"), json!("A todo app with tags")));
    assert_eq!((first["requirements_summary"].clone(), first["error_message"].clone(), first["is_paused"].clone()), (Value::Null, Value::Null, json!(false)));
    assert!(first.get("steps").is_none() && first.get("messages").is_none(), "create answers the job, not its detail: {first}");
    let second = ann.create("A recipe box").await;

    let (status, list) = ann.get("/api/jobs/").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<String> = list.as_array().expect("a plain array").iter().map(|j| text(j, "id")).collect();
    assert_eq!(ids, [text(&second, "id"), text(&first, "id")], "newest first");
    for job in list.as_array().unwrap() {
        assert_job_shape(job);
    }
    // Without the trailing slash too.
    let (status, again) = ann.get("/api/jobs").await;
    assert_eq!((status, again.as_array().map(Vec::len)), (StatusCode::OK, Some(2)));

    let id = text(&first, "id");
    let (status, detail) = ann.get(&format!("/api/jobs/{id}/")).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_job_shape(&detail);
    assert_eq!(detail["steps"], json!([]), "no executive dialogue yet: {detail}");
    let messages = detail["messages"].as_array().unwrap_or_else(|| panic!("messages: {detail}"));
    assert_eq!(messages, &ann.transcript(&id).await, "the detail's messages are the transcript");

    // The service principal sees every user's jobs.
    let (status, seen) = ann.api.get(&format!("/api/jobs/{id}/"), &agent_api_secret()).await;
    assert_eq!((status, seen["id"].clone()), (StatusCode::OK, json!(id)));
}

#[tokio::test]
async fn ideas_are_checked() {
    let edge = shared().await;
    let ann = User::new(edge, "ideas").await;
    let (status, at_limit) = ann.post("/api/jobs/", json!({ "prompt": "é".repeat(5000) })).await;
    assert_eq!(status, StatusCode::CREATED, "5000 characters are allowed: {at_limit}");
    for (body, what) in [
        (json!({ "prompt": "a".repeat(5001) }), "5001 characters"),
        (json!({}), "no prompt"),
        (json!({ "prompt": "   " }), "a blank prompt"),
        (json!({ "prompt": 7 }), "a prompt that is not a string"),
        (json!(["a todo app"]), "a body that is not an object"),
    ] {
        let (status, answer) = ann.post("/api/jobs/", body).await;
        assert_api_error(status, &answer, StatusCode::BAD_REQUEST, what);
    }
    let (status, answer) = ann.api.send_raw(Method::POST, "/api/jobs/", Some(&format!("Bearer {}", ann.token)), Some("application/json"), "{").await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "malformed JSON");
    let (status, answer) = ann.api.send(Method::POST, "/api/jobs/", None, Some(json!({"prompt": "x"}))).await;
    assert_api_error(status, &answer, StatusCode::UNAUTHORIZED, "no credential");
    let (status, list) = ann.get("/api/jobs/").await;
    assert_eq!((status, list.as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "refused ideas store nothing");

    // Seed 003's POST /jobs does not create app builds; GET /jobs still lists every kind.
    let (status, answer) = ann.api.send(Method::POST, "/jobs", Some(&ann.token), Some(json!({
        "prompt": "x", "githubOrg": "acme", "githubRepo": "shop", "branchName": "b", "jobType": "app_build"
    }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(text(&answer, "error").contains("/api/jobs/"), "{answer}");
    let (status, seed3) = ann.get("/jobs").await;
    assert_eq!(status, StatusCode::OK, "{seed3}");
    assert_eq!(seed3["jobs"][0]["job_type"], "app_build", "{seed3}");
}

#[tokio::test]
async fn patch_changes_the_idea_while_collecting() {
    let edge = shared().await;
    let ann = User::new(edge, "patch").await;
    let id = text(&ann.create("A todo app").await, "id");
    let (status, patched) = ann.send(Method::PATCH, &format!("/api/jobs/{id}/"), Some(json!({"initial_prompt": "A todo app with due dates"}))).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_job_shape(&patched);
    assert_eq!((patched["initial_prompt"].clone(), patched["prompt"].clone()), (json!("A todo app with due dates"), json!("A todo app with due dates")), "prompts kept in sync");
    let (_, detail) = ann.get(&format!("/api/jobs/{id}/")).await;
    assert_eq!(detail["initial_prompt"], "A todo app with due dates");
    for (body, what) in [
        (json!({}), "no initial_prompt"),
        (json!({"initial_prompt": ""}), "a blank one"),
        (json!({"initial_prompt": "x".repeat(5001)}), "5001 characters"),
        (json!([]), "not an object"),
    ] {
        let (status, answer) = ann.send(Method::PATCH, &format!("/api/jobs/{id}/"), Some(body)).await;
        assert_api_error(status, &answer, StatusCode::BAD_REQUEST, what);
    }
}

#[tokio::test]
async fn pause_and_resume_answer_detail_is_paused_and_status() {
    let edge = shared().await;
    let ann = User::new(edge, "pause").await;
    let id = text(&ann.create("A kanban board").await, "id");
    let (status, paused) = ann.post(&format!("/api/jobs/{id}/pause/"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert!(paused["detail"].as_str().is_some_and(|d| !d.is_empty()), "{paused}");
    assert_eq!((paused["is_paused"].clone(), paused["status"].clone()), (json!(true), json!("collecting")), "{paused}");
    let (_, job) = ann.get(&format!("/api/jobs/{id}/")).await;
    assert_eq!(job["is_paused"], true, "the job says it is paused: {job}");
    let (status, resumed) = ann.post(&format!("/api/jobs/{id}/resume/"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!((resumed["is_paused"].clone(), resumed["status"].clone()), (json!(false), json!("collecting")), "{resumed}");
    assert!(resumed["detail"].is_string(), "{resumed}");
    let (_, job) = ann.get(&format!("/api/jobs/{id}/")).await;
    assert_eq!(job["is_paused"], false, "{job}");

    // Continuing needs a finished job; bad bodies are refused first.
    let (status, answer) = ann.post(&format!("/api/jobs/{id}/continue/"), json!({})).await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "continue without requirements");
    let (status, answer) = ann.post(&format!("/api/jobs/{id}/continue/"), json!({"requirements": "dark mode"})).await;
    assert_api_error(status, &answer, StatusCode::CONFLICT, "continue while collecting");
}

#[tokio::test]
async fn delete_removes_the_job_and_its_transcript() {
    let edge = shared().await;
    let ann = User::new(edge, "delete").await;
    let keep = text(&ann.create("Keep me").await, "id");
    let id = text(&ann.create("Delete me").await, "id");
    ann.message(json!({"job_id": id, "role": "user", "content": "blue, please"})).await;
    let (status, body) = ann.send(Method::DELETE, &format!("/api/jobs/{id}/"), None).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null), "204 with no body");
    for path in [format!("/api/jobs/{id}/"), format!("/api/job-messages/?job_id={id}"), format!("/api/apps/by-job/{id}/")] {
        let (status, answer) = ann.get(&path).await;
        assert_api_error(status, &answer, StatusCode::NOT_FOUND, &path);
    }
    let (status, answer) = ann.send(Method::DELETE, &format!("/api/jobs/{id}/"), None).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "deleting twice");
    let (_, list) = ann.get("/api/jobs/").await;
    assert_eq!(list.as_array().unwrap().iter().map(|j| text(j, "id")).collect::<Vec<_>>(), [keep]);
}

#[tokio::test]
async fn purge_is_refused_unless_allowed() {
    let edge = shared().await;
    let ann = User::new(edge, "nopurge").await;
    ann.create("Still here").await;
    let (status, answer) = ann.send(Method::DELETE, "/api/jobs/purge/", None).await;
    assert_api_error(status, &answer, StatusCode::FORBIDDEN, "purge with ALLOW_JOB_PURGE=false");
    assert!(text(&answer, "error").contains("ALLOW_JOB_PURGE"), "{answer}");
    let (_, list) = ann.get("/api/jobs/").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
}

/// `wrangler r2 object <args> --local` on an edge's state (stop the edge first: workerd holds it).
fn r2(edge: &TestEdge, args: &[&str]) -> std::process::Output {
    let root = kiln_e2e::repo_root();
    std::process::Command::new(root.join("node_modules/.bin/wrangler"))
        .current_dir(&root)
        .args(["r2", "object"])
        .args(args)
        .arg("--local")
        .arg("--persist-to")
        .arg(edge.persist_dir())
        .env("CI", "true")
        .env("WRANGLER_SEND_METRICS", "false")
        .env("XDG_CONFIG_HOME", root.join(".kiln/xdg/config"))
        .env("XDG_CACHE_HOME", root.join(".kiln/xdg/cache"))
        .env("NO_COLOR", "1")
        .output()
        .expect("running wrangler r2 object")
}

/// What a runner's snapshot of a finished job's workspace holds (`schemas::app::WorkspaceSnapshot`).
fn snapshot() -> Value {
    json!({
        "files": [
            {"path": "index.html", "content": "<h1>Todo</h1>", "size": 13},
            {"path": "src/app.js", "content": "export const app = 1;", "size": 21},
            {"path": "src/lib/store.js", "content": "let s;", "size": 6},
            {"path": "README.md", "content": "# Todo", "size": 6}
        ],
        "omitted": ["assets/logo.png"]
    })
}

/// An edge of its own: purge allowed, and a job moved out of `collecting` behind the edge's back
/// (its D1 row as a room's status copy writes it, and a workspace snapshot in R2 as a runner's
/// last PUT leaves it) to check what only a collecting job may do and the files of an ended job.
#[tokio::test]
async fn ended_jobs_show_their_app_tickets_and_snapshot_and_purge_deletes_only_the_callers() {
    let mut edge = TestEdge::start(&[("ALLOW_JOB_PURGE", "true")]).await.expect("starting wrangler dev");
    let ann = User::new(&edge, "purge").await;
    let bob = User::new(&edge, "other").await;
    let bobs = text(&bob.create("Bob's app").await, "id");
    let done = text(&ann.create("Finished app").await, "id");
    let bare = text(&ann.create("Finished, nothing kept").await, "id");
    ann.create("Still collecting").await;

    edge.stop();
    edge.d1(&format!("UPDATE jobs SET status = 'completed', phase = 'building' WHERE id IN ('{done}', '{bare}')")).expect("updating D1");
    // The App and backlog a room writes (store::upsert_app, store::replace_tickets).
    let owner = edge.d1(&format!("SELECT owner FROM jobs WHERE id = '{done}'")).expect("reading D1")[0]["owner"].as_str().unwrap().to_string();
    let (app, epic, s1, s2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    edge.d1(&format!(
        "INSERT INTO apps (id, job_id, owner, spec, prd_markdown, prd_generated_at, created_at, updated_at)
           VALUES ('{app}', '{done}', '{owner}', '{{\"name\":\"Todo\"}}', '# Todo PRD', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z');
         INSERT INTO tickets (id, job_id, owner, parent_id, type, title, description, status, assigned_to, dependencies, ordinal, created_at, updated_at) VALUES
           ('{s2}', '{done}', '{owner}', '{epic}', 'story', 'List todos', 'Show them', 'done', 'claude', '[\"{s1}\"]', 2, 't', 't'),
           ('{epic}', '{done}', '{owner}', NULL, 'epic', 'Todos', '', 'todo', '', '[]', 0, 't', 't'),
           ('{s1}', '{done}', '{owner}', '{epic}', 'story', 'Store todos', 'Keep them', 'done', 'claude', '[]', 1, 't', 't');"
    ))
    .expect("writing the App and tickets");
    let file = edge.persist_dir().join("snapshot.json");
    std::fs::write(&file, snapshot().to_string()).unwrap();
    let key = format!("kiln-artifacts/snapshots/{done}.json");
    let put = r2(&edge, &["put", &key, "--file", file.to_str().unwrap()]);
    assert!(put.status.success(), "wrangler r2 object put: {}", String::from_utf8_lossy(&put.stderr));
    let check = edge.persist_dir().join("check.json");
    let got = r2(&edge, &["get", &key, "--file", check.to_str().unwrap()]);
    assert!(got.status.success() && check.exists(), "wrangler r2 object get reads it back: {}", String::from_utf8_lossy(&got.stderr));
    edge.restart().await.expect("restarting wrangler dev");

    // The whole tree: directories first, then by name; an omitted file listed without a size.
    let (status, tree) = ann.get(&format!("/api/jobs/{done}/files/structure/?path=/app")).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    assert_eq!((tree["source"].clone(), tree["truncated"].clone()), (json!("snapshot"), json!(false)), "{tree}");
    let names: Vec<&str> = tree["structure"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["assets", "src", "README.md", "index.html"], "{tree}");
    assert_eq!(tree["structure"][3], json!({"name": "index.html", "path": "/app/index.html", "type": "file", "size": 13}));
    assert_eq!(tree["structure"][0]["children"], json!([{"name": "logo.png", "path": "/app/assets/logo.png", "type": "file"}]));
    assert_eq!(tree["structure"][1]["children"][0]["children"][0]["path"], "/app/src/lib/store.js");
    let (status, sub) = ann.get(&format!("/api/jobs/{done}/files/structure/?path=/app/src/&limit=2")).await;
    assert_eq!(status, StatusCode::OK, "{sub}");
    assert_eq!((sub["truncated"].clone(), sub["structure"][0]["path"].clone()), (json!(true), json!("/app/src/lib")), "{sub}");
    let (status, answer) = ann.get(&format!("/api/jobs/{done}/files/structure/?path=/app/nope")).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "a directory not in the snapshot");
    let (status, answer) = ann.get(&format!("/api/jobs/{done}/files/structure/?path=/app/index.html")).await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "listing a file");

    let (status, file) = ann.get(&format!("/api/jobs/{done}/files/content/?path=/app/src/app.js")).await;
    assert_eq!((status, file), (StatusCode::OK, json!({"path": "/app/src/app.js", "content": "export const app = 1;", "size": 21})));
    let (status, answer) = ann.get(&format!("/api/jobs/{done}/files/content/?path=/app/assets/logo.png")).await;
    assert_api_error(status, &answer, StatusCode::UNSUPPORTED_MEDIA_TYPE, "an omitted file");
    assert!(text(&answer, "error").contains("left out"), "{answer}");
    let (status, answer) = ann.get(&format!("/api/jobs/{done}/files/content/?path=/app/src/missing.js")).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "a file not in the snapshot");
    let (status, answer) = ann.get(&format!("/api/jobs/{done}/files/content/?path=/app/src")).await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "reading a directory");
    // Another user sees none of it.
    let (status, answer) = bob.get(&format!("/api/jobs/{done}/files/content/?path=/app/src/app.js")).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "another user's snapshot");

    // The App and the backlog, owner-scoped.
    let (status, apps) = ann.get("/api/apps/").await;
    assert_eq!(status, StatusCode::OK, "{apps}");
    assert_eq!(apps.as_array().map(Vec::len), Some(1), "{apps}");
    let want = json!({"id": app, "job_id": done, "spec": {"name": "Todo"}, "prd_markdown": "# Todo PRD",
        "prd_generated_at": "2026-01-01T00:00:00.000Z", "created_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:00.000Z"});
    assert_eq!(apps[0], want);
    for path in [format!("/api/apps/{app}/"), format!("/api/apps/by-job/{done}/")] {
        let (status, one) = ann.get(&path).await;
        assert_eq!((status, &one), (StatusCode::OK, &want), "{path}");
    }
    let (status, tickets) = ann.get(&format!("/api/tickets/?job_id={done}")).await;
    assert_eq!(status, StatusCode::OK, "{tickets}");
    let order: Vec<&str> = tickets.as_array().unwrap().iter().map(|t| t["title"].as_str().unwrap()).collect();
    assert_eq!(order, ["Todos", "Store todos", "List todos"], "the backlog's order");
    assert_eq!(tickets[2]["dependencies"], json!([s1.to_string()]));
    assert_eq!((tickets[0]["dependencies"].clone(), tickets[0]["parent_id"].clone(), tickets[0]["type"].clone()), (json!([]), Value::Null, json!("epic")));
    let (status, ticket) = ann.get(&format!("/api/tickets/{s2}/")).await;
    assert_eq!((status, &ticket), (StatusCode::OK, &tickets[2]));
    for key in ["id", "job_id", "parent_id", "type", "title", "description", "status", "assigned_to", "dependencies", "created_at", "updated_at"] {
        assert!(ticket.get(key).is_some(), "{key} in {ticket}");
    }
    let (status, empty) = bob.get("/api/apps/").await;
    assert_eq!((status, empty), (StatusCode::OK, json!([])), "another user's Apps are not listed");
    for path in [format!("/api/apps/{app}/"), format!("/api/apps/by-job/{done}/"), format!("/api/tickets/?job_id={done}"), format!("/api/tickets/{s2}/")] {
        let (status, answer) = bob.get(&path).await;
        assert_api_error(status, &answer, StatusCode::NOT_FOUND, &format!("{path} as another user"));
    }

    let (status, job) = ann.get(&format!("/api/jobs/{bare}/")).await;
    assert_eq!((status, job["status"].clone()), (StatusCode::OK, json!("build_done")), "completed reads build_done: {job}");
    let (status, answer) = ann.send(Method::PATCH, &format!("/api/jobs/{bare}/"), Some(json!({"initial_prompt": "late"}))).await;
    assert_api_error(status, &answer, StatusCode::CONFLICT, "PATCH after collecting");
    let (status, body) = ann.get(&format!("/api/apps/by-job/{bare}/")).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null), "a finished job without an App: 204");
    let (status, tree) = ann.get(&format!("/api/jobs/{bare}/files/structure/")).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    assert_eq!((tree["structure"].clone(), tree["source"].clone()), (json!([]), json!("none")), "no snapshot kept: {tree}");

    let (status, purged) = ann.send(Method::DELETE, "/api/jobs/purge/", None).await;
    assert_eq!((status, purged), (StatusCode::OK, json!({"deleted": 3})));
    let (_, list) = ann.get("/api/jobs/").await;
    assert_eq!(list, json!([]));
    let (_, apps) = ann.get("/api/apps/").await;
    assert_eq!(apps, json!([]), "the App went with its job");
    let (status, answer) = ann.get(&format!("/api/tickets/{s1}/")).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "a purged job's ticket");
    let (status, again) = ann.send(Method::DELETE, "/api/jobs/purge/", None).await;
    assert_eq!((status, again), (StatusCode::OK, json!({"deleted": 0})));
    let (status, job) = bob.get(&format!("/api/jobs/{bobs}/")).await;
    assert_eq!((status, job["id"].clone()), (StatusCode::OK, json!(bobs)), "another user's jobs stay");

    // The purge removed the snapshot from R2 too.
    edge.stop();
    let out = edge.persist_dir().join("got.json");
    let got = r2(&edge, &["get", &key, "--file", out.to_str().unwrap()]);
    let said = format!("{}{}", String::from_utf8_lossy(&got.stdout), String::from_utf8_lossy(&got.stderr));
    assert!(!got.status.success() && said.contains("does not exist"), "the snapshot is gone from R2: {said}");
}

// --- messages -----------------------------------------------------------------------------------

#[tokio::test]
async fn messages_are_the_jobs_log() {
    let edge = shared().await;
    let ann = User::new(edge, "msgs").await;
    let id = text(&ann.create("A habit tracker").await, "id");
    let mine = ann.message(json!({"job_id": id, "role": "user", "content": "Streaks matter most"})).await;
    assert_eq!((mine["role"].clone(), mine["sender"].clone(), mine["job_id"].clone()), (json!("user"), json!(ann.email), json!(id)), "a user's sender is their email: {mine}");
    assert_eq!(mine["metadata"], json!({}));
    assert_rfc3339(&mine["created_at"], "created_at");
    let mid = text(&mine, "id");
    assert!(mid.starts_with(&format!("{id}:")), "message ids are <job_id>:<seq>: {mid}");
    let agent = ann.message(json!({"job_id": id, "role": "agent", "content": "Noted.", "metadata": {"type": "description"}})).await;
    assert_eq!((agent["sender"].clone(), agent["metadata"].clone()), (json!("Agent"), json!({"type": "description"})), "{agent}");
    let system = ann.message(json!({"job_id": id, "role": "system", "sender": null, "content": "Heads up"})).await;
    assert_eq!(system["sender"], "System", "never null for other roles: {system}");
    let named = ann.message(json!({"job_id": id, "role": "agent", "sender": "Client Relations", "content": "Hello"})).await;
    assert_eq!(named["sender"], "Client Relations");

    let list = ann.transcript(&id).await;
    let posted: Vec<&Value> = [&mine, &agent, &system, &named].into_iter().collect();
    let listed: Vec<&Value> = list.iter().filter(|m| posted.iter().any(|p| p["id"] == m["id"])).collect();
    assert_eq!(listed, posted, "oldest first, as posted");
    for m in &list {
        for key in ["id", "job_id", "role", "sender", "content", "created_at"] {
            assert!(m[key].is_string(), "{key} in {m}");
        }
        assert!(m["metadata"].is_object(), "{m}");
    }

    let (status, one) = ann.get(&format!("/api/job-messages/{mid}/")).await;
    assert_eq!((status, &one), (StatusCode::OK, &mine));

    let (status, body) = ann.send(Method::DELETE, &format!("/api/job-messages/{mid}/"), None).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, answer) = ann.get(&format!("/api/job-messages/{mid}/")).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "a deleted message");
    let (status, answer) = ann.send(Method::DELETE, &format!("/api/job-messages/{mid}/"), None).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "deleting twice");
    let after = contents(&ann.transcript(&id).await);
    assert!(!after.contains(&"Streaks matter most".to_string()), "gone from the list: {after:?}");
    assert!(after.contains(&"Heads up".to_string()), "{after:?}");

    // The socket's replay is the same log: the deleted message is not replayed.
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&ann.token), None).await.expect("socket");
    let replay = ws.drain(Duration::from_millis(800)).await;
    let chat: Vec<&str> = replay.iter().filter(|e| e["kind"] == "stageUpdate").filter_map(|e| e["content"].as_str()).collect();
    assert!(chat.contains(&"Heads up") && !chat.contains(&"Streaks matter most"), "{chat:?}");
    // A stageUpdate's timestamp is its message's created_at (the frontend de-duplicates by it).
    let heads_up = replay.iter().find(|e| e["content"] == "Heads up").unwrap();
    assert_eq!(heads_up["timestamp"], system["created_at"]);
    ws.close().await;
}

#[tokio::test]
async fn bad_messages_are_refused() {
    let edge = shared().await;
    let ann = User::new(edge, "badmsg").await;
    let id = text(&ann.create("A chess clock").await, "id");
    for (body, what) in [
        (json!({"role": "user", "content": "x"}), "no job_id"),
        (json!({"job_id": "nope", "role": "user", "content": "x"}), "a job_id that is no id"),
        (json!({"job_id": id, "role": "boss", "content": "x"}), "an unknown role"),
        (json!({"job_id": id, "role": "user", "content": ""}), "blank content"),
        (json!({"job_id": id, "role": "user", "content": "x", "metadata": [1]}), "metadata that is no object"),
    ] {
        let (status, answer) = ann.post("/api/job-messages/", body).await;
        assert_api_error(status, &answer, StatusCode::BAD_REQUEST, what);
    }
    let missing = uuid::Uuid::new_v4();
    let (status, answer) = ann.post("/api/job-messages/", json!({"job_id": missing, "role": "user", "content": "x"})).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "a job that does not exist");
    let (status, answer) = ann.get("/api/job-messages/").await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "a list without job_id");
    for bad in ["nope", "x:1", &format!("{id}:x"), &format!("{id}:999999")] {
        let (status, answer) = ann.get(&format!("/api/job-messages/{bad}/")).await;
        assert_api_error(status, &answer, StatusCode::NOT_FOUND, bad);
    }
}

// --- apps, tickets, files -----------------------------------------------------------------------

#[tokio::test]
async fn apps_and_tickets_are_empty_before_a_runner_wrote_any() {
    let edge = shared().await;
    let ann = User::new(edge, "empty").await;
    let id = text(&ann.create("A weather widget").await, "id");
    let (status, apps) = ann.get("/api/apps/").await;
    assert_eq!((status, apps), (StatusCode::OK, json!([])));
    let (status, body) = ann.get(&format!("/api/apps/by-job/{id}/")).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null), "no App yet: 204");
    let (status, tickets) = ann.get(&format!("/api/tickets/?job_id={id}")).await;
    assert_eq!((status, tickets), (StatusCode::OK, json!([])));
    let (status, answer) = ann.get("/api/tickets/").await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "tickets without job_id");
    let (status, answer) = ann.get("/api/tickets/?job_id=nope").await;
    assert_api_error(status, &answer, StatusCode::BAD_REQUEST, "tickets of a job_id that is no id");
    let missing = uuid::Uuid::new_v4();
    for path in [format!("/api/apps/{missing}/"), format!("/api/tickets/{missing}/"), format!("/api/apps/by-job/{missing}/"), format!("/api/tickets/?job_id={missing}")] {
        let (status, answer) = ann.get(&path).await;
        assert_api_error(status, &answer, StatusCode::NOT_FOUND, &path);
    }
}

#[tokio::test]
async fn files_refuse_bad_paths_and_answer_an_empty_tree_without_a_workspace() {
    let edge = shared().await;
    let ann = User::new(edge, "files").await;
    let id = text(&ann.create("A pomodoro timer").await, "id");
    for query in ["", "?path=/app", "?path=/app/&limit=1000", "?path=/app/src&limit=1"] {
        let path = format!("/api/jobs/{id}/files/structure/{query}");
        let (status, tree) = ann.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {tree}");
        assert_eq!((tree["structure"].clone(), tree["source"].clone()), (json!([]), json!("none")), "{path}: {tree}");
        assert!(tree["detail"].as_str().is_some_and(|d| d.starts_with("no workspace yet")), "{path}: {tree}");
    }
    for query in [
        "?path=/app/../etc",
        "?path=/etc/passwd",
        "?path=/application",
        "?path=app/src",
        "?path=/app/./src",
        "?path=/app/%2e%2e/etc",
        "?path=/app/a%00b",
        "?limit=0",
        "?limit=1001",
        "?limit=many",
    ] {
        let path = format!("/api/jobs/{id}/files/structure/{query}");
        let (status, answer) = ann.get(&path).await;
        assert_api_error(status, &answer, StatusCode::BAD_REQUEST, &path);
    }
    for query in ["", "?path=/app/../etc/passwd", "?path=/etc/passwd", "?path=/app", "?path=/app/"] {
        let path = format!("/api/jobs/{id}/files/content/{query}");
        let (status, answer) = ann.get(&path).await;
        assert_api_error(status, &answer, StatusCode::BAD_REQUEST, &path);
    }
    let path = format!("/api/jobs/{id}/files/content/?path=/app/index.html");
    let (status, answer) = ann.get(&path).await;
    assert_api_error(status, &answer, StatusCode::NOT_FOUND, "a file of a job with no workspace");
}

// --- owner scoping ------------------------------------------------------------------------------

#[tokio::test]
async fn another_users_ids_answer_404_everywhere() {
    let edge = shared().await;
    let ann = User::new(edge, "owner").await;
    let eve = User::new(edge, "intruder").await;
    let id = text(&ann.create("Ann's secret app").await, "id");
    let m = ann.message(json!({"job_id": id, "role": "user", "content": "only for Ann"})).await;
    let mid = text(&m, "id");

    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/api/jobs/{id}/"), None),
        (Method::PATCH, format!("/api/jobs/{id}/"), Some(json!({"initial_prompt": "mine now"}))),
        (Method::POST, format!("/api/jobs/{id}/pause/"), None),
        (Method::POST, format!("/api/jobs/{id}/resume/"), None),
        (Method::POST, format!("/api/jobs/{id}/continue/"), Some(json!({"requirements": "more"}))),
        (Method::GET, format!("/api/jobs/{id}/files/structure/?path=/app"), None),
        (Method::GET, format!("/api/jobs/{id}/files/content/?path=/app/index.html"), None),
        (Method::GET, format!("/api/job-messages/?job_id={id}"), None),
        (Method::GET, format!("/api/job-messages/{mid}/"), None),
        (Method::POST, "/api/job-messages/".into(), Some(json!({"job_id": id, "role": "user", "content": "hi"}))),
        (Method::DELETE, format!("/api/job-messages/{mid}/"), None),
        (Method::GET, format!("/api/apps/by-job/{id}/"), None),
        (Method::GET, format!("/api/tickets/?job_id={id}"), None),
        (Method::DELETE, format!("/api/jobs/{id}/"), None),
    ];
    for (method, path, body) in calls {
        let (status, answer) = eve.send(method.clone(), &path, body).await;
        assert_api_error(status, &answer, StatusCode::NOT_FOUND, &format!("{method} {path} as another user"));
        assert!(!answer.to_string().contains("only for Ann"), "{answer}");
    }
    let (_, list) = eve.get("/api/jobs/").await;
    assert_eq!(list, json!([]), "another user's jobs are not listed");

    // Nothing moved: Ann's job, idea and message are as they were.
    let (status, job) = ann.get(&format!("/api/jobs/{id}/")).await;
    assert_eq!((status, job["initial_prompt"].clone(), job["is_paused"].clone()), (StatusCode::OK, json!("Ann's secret app"), json!(false)));
    assert!(contents(&ann.transcript(&id).await).contains(&"only for Ann".to_string()));
    assert!(!contents(&ann.transcript(&id).await).contains(&"hi".to_string()), "the intruder's post was not stored");
}
