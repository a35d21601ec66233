//! Seed 001's REST face (`/v1/*`) against a real `wrangler dev`: CORS preflights that let a
//! frontend on another origin send `X-Session-Id` and `Last-Event-ID`, sessions from the header or the
//! body (neither: 400, nothing stored), payload checks (wrong types, oversize: 400, nothing
//! stored), `landing_page_id` null on a second init of a session, chat without a page (404), the
//! job's exact shape, `?after=` paging, list filters, cancel of a pending job (its `__end__`),
//! landing pages (list, get, by session, patch, delete; 409 while a job of it waits), another
//! user's ids answering 404 on every endpoint, and, with a hand-written runner posting node events
//! through the runner protocol, the SSE stream: live events, keepalives, `Last-Event-ID` and
//! `?after=` resume losing and repeating nothing, the end at `__end__`, a deleted page's
//! preview and bundle gone from R2, and a stream ended (with an `error` event) at its token's
//! expiry.
//!
//! No runner is connected to the shared edge: its jobs stay pending. The stream tests run on an
//! edge of their own with the hand runner.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_e2e::{Api, HandRunner, Method, StatusCode, TestEdge};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(20);

static SHARED: OnceCell<TestEdge> = OnceCell::const_new();

/// The origin of seed 001's frontend in these tests.
const FRONTEND: &str = "http://landing.frontend.test";

/// The edge shared by the tests without a runner (each isolates itself by user).
async fn shared() -> &'static TestEdge {
    SHARED.get_or_init(|| async { TestEdge::start(&[("CORS_ORIGINS", FRONTEND)]).await.expect("starting wrangler dev") }).await
}

/// A user of the face.
struct User {
    api: Api,
    token: String,
    id: String,
}

impl User {
    async fn new(edge: &TestEdge, prefix: &str) -> User {
        let api = edge.api();
        let token = api.new_user(prefix).await;
        let (status, me) = api.get("/api/auth/me/", &token).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        let id = me["id"].as_str().map(str::to_string).unwrap_or_else(|| me["id"].to_string());
        User { api, token, id }
    }

    async fn send(&self, method: Method, path: &str, session: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let auth = format!("Bearer {}", self.token);
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(s) = session {
            headers.push(("x-session-id", s));
        }
        let (status, _, body) = self.api.send_with(method, path, &headers, body).await;
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None, None).await
    }

    /// `POST /v1/agent/init`, asserting 200.
    async fn init(&self, session: &str, product: &str) -> Value {
        let (status, body) = self.send(Method::POST, "/v1/agent/init", Some(session), Some(json!({ "payload": payload(product) }))).await;
        assert_eq!(status, StatusCode::OK, "init: {body}");
        body
    }

    /// `POST /v1/agent/chat`, asserting 200; answers the job id.
    async fn chat(&self, session: &str, message: &str) -> String {
        let (status, body) = self.send(Method::POST, "/v1/agent/chat", Some(session), Some(json!({ "message": message }))).await;
        assert_eq!(status, StatusCode::OK, "chat: {body}");
        body["job_id"].as_str().unwrap().to_string()
    }

    /// `GET /v1/jobs/<id>`'s job, asserting 200.
    async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["job"].clone()
    }

    async fn jobs(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/v1/jobs{query}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["jobs"].as_array().unwrap_or_else(|| panic!("{{\"jobs\": [...]}}: {body}")).clone()
    }

    async fn pages(&self) -> Vec<Value> {
        let (status, body) = self.get("/v1/landing-pages").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["landing_pages"].as_array().unwrap().clone()
    }
}

fn session(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn payload(product: &str) -> Value {
    json!({
        "campaign": {"objective": "Generate qualified signups", "productName": product, "primaryOffer": "3 free recipes"},
        "audience": {"description": "Ops leaders", "personaKeywords": ["ops", "automation"], "uvp": "Less busywork"},
        "messaging": {"tone": "confident + helpful", "seoKeywords": ["workflow automation"], "eventTracking": ["beta-cta"]},
        "branding": {
            "theme": "dark",
            "colorPalette": {"primary": "#7C3AED", "accent": "#FDE68A"},
            "fonts": "Inter",
            "layoutPreference": "Split hero",
            "sections": ["hero", "features", "faq"]
        },
        "extra": {"kept": [1, 2]}
    })
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap_or_else(|| panic!("an object: {v}")).keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A refusal: the status, and `error` and FastAPI's `detail` with the same text holding `want`.
fn refused(status: StatusCode, body: &Value, want_status: StatusCode, want: &str) {
    assert_eq!(status, want_status, "{body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("an error envelope: {body}"));
    assert_eq!(body["detail"], body["error"], "detail beside error: {body}");
    assert!(error.contains(want), "{want:?} in {error:?}");
}

#[tokio::test]
async fn sessions_and_payloads_are_checked_before_anything_is_stored() {
    let edge = shared().await;
    let u = User::new(edge, "lf-session").await;
    let s = session("hdr");

    // Neither header nor body: 400.
    let (status, body) = u.send(Method::POST, "/v1/agent/init", None, Some(json!({ "payload": payload("A") }))).await;
    refused(status, &body, StatusCode::BAD_REQUEST, "X-Session-Id");
    let (status, body) = u.send(Method::POST, "/v1/agent/chat", None, Some(json!({ "message": "hi" }))).await;
    refused(status, &body, StatusCode::BAD_REQUEST, "X-Session-Id");
    // A session id that is not one.
    let (status, body) = u.send(Method::POST, "/v1/agent/init", Some("../etc"), Some(json!({ "payload": payload("A") }))).await;
    refused(status, &body, StatusCode::BAD_REQUEST, "session_id");
    let (status, body) =
        u.send(Method::POST, "/v1/agent/init", Some("ok"), Some(json!({ "session_id": 7, "payload": payload("A") }))).await;
    refused(status, &body, StatusCode::BAD_REQUEST, "session_id must be a string");
    // Payloads of the wrong types, missing, oversize.
    for (bad, want) in [
        (json!({}), "payload is required"),
        (json!({ "payload": "x" }), "payload must be a JSON object"),
        (json!({ "payload": { "campaign": [] } }), "payload.campaign"),
        (json!({ "payload": { "audience": { "personaKeywords": "ops" } } }), "payload.audience.personaKeywords"),
        (json!({ "payload": { "branding": { "colorPalette": { "primary": 1 } } } }), "payload.branding.colorPalette"),
        (json!({ "payload": { "x": "y".repeat(70 * 1024) } }), "bytes"),
    ] {
        let (status, body) = u.send(Method::POST, "/v1/agent/init", Some(&s), Some(bad.clone())).await;
        refused(status, &body, StatusCode::BAD_REQUEST, want);
    }
    let (status, body) = u
        .api
        .send_raw(Method::POST, "/v1/agent/init", Some(&format!("Bearer {}", u.token)), Some("application/json"), "{nope")
        .await;
    refused(status, &body, StatusCode::BAD_REQUEST, "not valid JSON");
    // Nothing was stored: no job, no page (through the face and in D1).
    assert!(u.jobs("").await.is_empty());
    assert!(u.pages().await.is_empty());
    let rows = edge
        .d1(&format!(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE owner = '{0}') AS jobs, (SELECT COUNT(*) FROM landing_pages WHERE owner = '{0}') AS pages",
            u.id
        ))
        .unwrap();
    assert_eq!((rows[0]["jobs"].as_i64(), rows[0]["pages"].as_i64()), (Some(0), Some(0)), "{rows:?}");

    // The header names the session.
    let first = u.init(&s, "Aurora").await;
    assert_eq!(keys(&first), set(&["job_id", "session_id", "landing_page_id"]));
    assert_eq!(first["session_id"], s.as_str());
    let page_id = first["landing_page_id"].as_str().expect("a new session's page").to_string();
    // The body wins over the header.
    let b = session("body");
    let (status, second) = u
        .send(Method::POST, "/v1/agent/init", Some(&s), Some(json!({ "session_id": b, "payload": payload("Borealis") })))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["session_id"], b.as_str());
    assert!(second["landing_page_id"].is_string(), "the body's session is new: {second}");
    // A second init of a session: its page exists (null), and holds the new payload.
    let again = u.init(&s, "Aurora 2").await;
    assert_eq!(again["landing_page_id"], Value::Null, "{again}");
    assert_ne!(again["job_id"], first["job_id"]);
    let (status, page) = u.get(&format!("/v1/landing-pages/{page_id}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["business_data"]["campaign"]["productName"], "Aurora 2");
    assert_eq!(page["business_data"]["extra"], json!({"kept": [1, 2]}), "unknown fields kept as sent");
    assert_eq!(page["session_id"], s.as_str());
    assert_eq!(page["status"], "pending");
    assert_eq!(u.pages().await.len(), 2);
}

#[tokio::test]
async fn a_frontend_on_another_origin_may_send_the_session_header() {
    let edge = shared().await;
    let api = edge.api();
    for (path, method) in [("/v1/agent/init", "POST"), ("/v1/jobs/x/stream", "GET")] {
        let (status, headers, _) = api
            .send_with(
                Method::OPTIONS,
                path,
                &[("origin", FRONTEND), ("access-control-request-method", method), ("access-control-request-headers", "authorization,x-session-id,last-event-id")],
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(headers.get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some(FRONTEND));
        let allowed = headers.get("access-control-allow-headers").and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
        for h in ["authorization", "x-session-id", "last-event-id"] {
            assert!(allowed.split(',').any(|a| a.trim() == h), "{h} allowed: {allowed}");
        }
    }
    // An answer (an error included) carries the origin too.
    let (status, headers, body) = api.send_with(Method::POST, "/v1/agent/init", &[("origin", FRONTEND)], Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(headers.get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some(FRONTEND));
}

#[tokio::test]
async fn chat_needs_the_sessions_page() {
    let edge = shared().await;
    let u = User::new(edge, "lf-chat").await;
    let s = session("chat");
    let (status, body) = u.send(Method::POST, "/v1/agent/chat", Some(&s), Some(json!({ "message": "more blue" }))).await;
    refused(status, &body, StatusCode::NOT_FOUND, "POST /v1/agent/init first");
    assert!(u.jobs("").await.is_empty(), "nothing stored");
    let init = u.init(&s, "Aurora").await;
    for (bad, want) in [(json!({}), "message is required"), (json!({ "message": "  " }), "blank"), (json!({ "message": 3 }), "message")] {
        let (status, body) = u.send(Method::POST, "/v1/agent/chat", Some(&s), Some(bad)).await;
        refused(status, &body, StatusCode::BAD_REQUEST, want);
    }
    let (status, answer) = u.send(Method::POST, "/v1/agent/chat", Some(&s), Some(json!({ "message": "more blue" }))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(keys(&answer), set(&["reply", "job_id"]));
    let id = answer["job_id"].as_str().unwrap();
    assert_eq!(answer["reply"], format!("Chat job accepted. Poll /v1/jobs/{id} for progress."));
    let job = u.job(id).await;
    assert_eq!((job["type"].as_str(), job["title"].as_str()), (Some("chat"), Some("Chat request")));
    assert_eq!(job["description"], "Asynchronous chat graph execution");
    // It waits for the session's init: its first event says so.
    let waiting = &job["events"][0];
    assert_eq!((waiting["node"].as_str(), waiting["event_type"].as_str()), (Some("queue"), Some("waiting")), "{job}");
    assert_eq!(waiting["message"], format!("Waiting for job {} of this session to finish", init["job_id"].as_str().unwrap()));
}

#[tokio::test]
async fn a_job_has_seed_001s_shape_and_pages_by_index() {
    let edge = shared().await;
    let u = User::new(edge, "lf-shape").await;
    let s = session("shape");
    let init = u.init(&s, "Aurora").await;
    let id = init["job_id"].as_str().unwrap();
    let job = u.job(id).await;
    assert_eq!(
        keys(&job),
        set(&["id", "type", "status", "session_id", "user_id", "title", "description", "events", "created_at", "updated_at", "error_message"])
    );
    assert_eq!(job["id"], id);
    assert_eq!(job["type"], "init");
    assert_eq!(job["status"], "pending");
    assert_eq!(job["session_id"], s.as_str());
    assert_eq!(job["user_id"], u.id.as_str());
    assert_eq!(job["title"], "Init request");
    assert_eq!(job["description"], "Asynchronous init graph execution");
    assert_eq!(job["events"], json!([]), "no node ran yet");
    assert_eq!(job["error_message"], Value::Null);
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));

    // A second job of the session: one event (the queue's note), paged by index.
    let chat = u.chat(&s, "more blue").await;
    let full = u.job(&chat).await;
    let events = full["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{full}");
    assert_eq!(keys(&events[0]), set(&["id", "node", "timestamp", "event_type", "message", "data"]));
    let (job_part, seq) = events[0]["id"].as_str().unwrap().rsplit_once(':').unwrap();
    assert_eq!(job_part, chat);
    assert!(seq.parse::<u64>().is_ok());
    assert_eq!(events[0]["data"]["waiting_for"], id);
    let (status, page) = u.get(&format!("/v1/jobs/{chat}?after=0")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["job"]["events"], full["events"]);
    assert_eq!(page["job"]["next_after"], 1);
    let (_, page) = u.get(&format!("/v1/jobs/{chat}?after=1")).await;
    assert_eq!((page["job"]["events"].clone(), page["job"]["next_after"].clone()), (json!([]), json!(1)));
    let (_, page) = u.get(&format!("/v1/jobs/{chat}?after=99")).await;
    assert_eq!((page["job"]["events"].clone(), page["job"]["next_after"].clone()), (json!([]), json!(1)));
    for bad in ["-1", "x", "1.5"] {
        let (status, body) = u.get(&format!("/v1/jobs/{chat}?after={bad}")).await;
        refused(status, &body, StatusCode::BAD_REQUEST, "after must be an event index");
    }
    let (status, body) = u.get("/v1/jobs/not-a-job").await;
    refused(status, &body, StatusCode::NOT_FOUND, "job not found");
    let (status, body) = u.get(&format!("/v1/jobs/{}", uuid::Uuid::new_v4())).await;
    refused(status, &body, StatusCode::NOT_FOUND, "job not found");
}

#[tokio::test]
async fn lists_filter_and_cancel_ends_a_pending_job() {
    let edge = shared().await;
    let u = User::new(edge, "lf-list").await;
    let (s1, s2) = (session("one"), session("two"));
    let a = u.init(&s1, "A").await["job_id"].as_str().unwrap().to_string();
    let b = u.init(&s2, "B").await["job_id"].as_str().unwrap().to_string();
    let c = u.chat(&s1, "more blue").await;

    let all = u.jobs("").await;
    let ids: Vec<&str> = all.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [c.as_str(), b.as_str(), a.as_str()], "newest first");
    assert!(all.iter().all(|j| j.get("events").is_none()), "a list carries no events: {all:?}");
    assert_eq!(all[0]["type"], "chat");
    let one: Vec<String> = u.jobs(&format!("?session_id={s1}")).await.iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(one, [c.clone(), a.clone()]);
    assert_eq!(u.jobs("?limit=1").await.len(), 1);
    assert_eq!(u.jobs("?status=pending").await.len(), 3);
    assert!(u.jobs("?status=running").await.is_empty());

    // Cancel a pending job: cancelled, its last event the room's __end__.
    let (status, body) = u.send(Method::POST, &format!("/v1/jobs/{b}/cancel"), None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["job"]["status"], "cancelled");
    let last = body["job"]["events"].as_array().unwrap().last().cloned().unwrap_or_else(|| panic!("an __end__ event: {body}"));
    assert_eq!((last["node"].as_str(), last["event_type"].as_str()), (Some("__end__"), Some("job_cancelled")), "{body}");
    assert_eq!(u.job(&b).await["status"], "cancelled");
    let (status, again) = u.send(Method::POST, &format!("/v1/jobs/{b}/cancel"), None, None).await;
    refused(status, &again, StatusCode::CONFLICT, "already ended");
    let cancelled: Vec<String> = u.jobs("?status=cancelled").await.iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(cancelled, [b.clone()]);
    assert_eq!(u.jobs(&format!("?status=pending&session_id={s2}")).await.len(), 0);

    for (q, want) in [("?status=queued", "status must be one of"), ("?limit=0", "limit"), ("?limit=101", "limit"), ("?limit=x", "limit")] {
        let (status, body) = u.get(&format!("/v1/jobs{q}")).await;
        refused(status, &body, StatusCode::BAD_REQUEST, want);
    }
}

#[tokio::test]
async fn landing_pages_are_listed_patched_and_deleted() {
    let edge = shared().await;
    let u = User::new(edge, "lf-pages").await;
    let (s1, s2) = (session("p1"), session("p2"));
    let p1 = u.init(&s1, "One").await["landing_page_id"].as_str().unwrap().to_string();
    let p2_job = u.init(&s2, "Two").await;
    let p2 = p2_job["landing_page_id"].as_str().unwrap().to_string();

    let pages = u.pages().await;
    let ids: Vec<&str> = pages.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [p2.as_str(), p1.as_str()], "newest first");
    assert_eq!(
        keys(&pages[0]),
        set(&["id", "session_id", "status", "preview_url", "business_data", "sections", "created_at", "updated_at"])
    );
    assert_eq!((pages[0]["preview_url"].clone(), pages[0]["sections"].clone()), (Value::Null, json!([])));
    let (status, by_session) = u.get(&format!("/v1/landing-pages/by-session/{s1}")).await;
    assert_eq!(status, StatusCode::OK, "{by_session}");
    assert_eq!(by_session["id"], p1.as_str());
    let (status, body) = u.get("/v1/landing-pages/by-session/no-such-session").await;
    refused(status, &body, StatusCode::NOT_FOUND, "landing page not found");

    // Patch: sections, business_data (checked as a payload), nothing else.
    let (status, patched) =
        u.send(Method::PATCH, &format!("/v1/landing-pages/{p1}"), None, Some(json!({ "sections": ["hero", "faq"] }))).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["sections"], json!(["hero", "faq"]));
    assert_eq!(patched["business_data"]["campaign"]["productName"], "One", "kept");
    let (status, patched) = u
        .send(Method::PATCH, &format!("/v1/landing-pages/{p1}"), None, Some(json!({ "business_data": { "campaign": { "productName": "Uno" } } })))
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["business_data"], json!({ "campaign": { "productName": "Uno" } }));
    assert_eq!(patched["sections"], json!(["hero", "faq"]), "kept");
    for (bad, want) in [
        (json!({}), "business_data and/or sections"),
        (json!({ "status": "generated" }), "status cannot be changed"),
        (json!({ "sections": "hero" }), "sections must be an array"),
        (json!({ "business_data": { "campaign": { "objective": 1 } } }), "business_data.campaign.objective"),
        (json!([1]), "object"),
    ] {
        let (status, body) = u.send(Method::PATCH, &format!("/v1/landing-pages/{p1}"), None, Some(bad)).await;
        refused(status, &body, StatusCode::BAD_REQUEST, want);
    }

    // Delete: refused while a job of the page is pending; then 204 and gone.
    let (status, body) = u.send(Method::DELETE, &format!("/v1/landing-pages/{p2}"), None, None).await;
    refused(status, &body, StatusCode::CONFLICT, "pending or running");
    let job = p2_job["job_id"].as_str().unwrap();
    let (status, _) = u.send(Method::POST, &format!("/v1/jobs/{job}/cancel"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = u.send(Method::DELETE, &format!("/v1/landing-pages/{p2}"), None, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = u.get(&format!("/v1/landing-pages/{p2}")).await;
    refused(status, &body, StatusCode::NOT_FOUND, "landing page not found");
    assert_eq!(u.pages().await.len(), 1);
    // The session starts over: a new page.
    assert!(u.init(&s2, "Two again").await["landing_page_id"].is_string());
    let (status, body) = u.get("/v1/landing-pages?limit=0").await;
    refused(status, &body, StatusCode::BAD_REQUEST, "limit");
}

#[tokio::test]
async fn another_users_ids_answer_404_everywhere() {
    let edge = shared().await;
    let a = User::new(edge, "lf-owner").await;
    let b = User::new(edge, "lf-other").await;
    let s = session("mine");
    let init = a.init(&s, "Mine").await;
    let job = init["job_id"].as_str().unwrap();
    let page = init["landing_page_id"].as_str().unwrap();

    for (method, path, body) in [
        (Method::GET, format!("/v1/jobs/{job}"), None),
        (Method::GET, format!("/v1/jobs/{job}?after=0"), None),
        (Method::POST, format!("/v1/jobs/{job}/cancel"), None),
        (Method::GET, format!("/v1/jobs/{job}/stream"), None),
        (Method::GET, format!("/v1/landing-pages/{page}"), None),
        (Method::GET, format!("/v1/landing-pages/by-session/{s}"), None),
        (Method::PATCH, format!("/v1/landing-pages/{page}"), Some(json!({ "sections": [] }))),
        (Method::DELETE, format!("/v1/landing-pages/{page}"), None),
    ] {
        let (status, body) = b.send(method.clone(), &path, None, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert!(body["detail"].is_string(), "{body}");
    }
    // B's session of the same name is B's own: chat finds no page, init makes B's.
    let (status, body) = b.send(Method::POST, "/v1/agent/chat", Some(&s), Some(json!({ "message": "hi" }))).await;
    refused(status, &body, StatusCode::NOT_FOUND, "no landing page");
    assert!(b.jobs("").await.is_empty());
    assert!(b.pages().await.is_empty());
    let mine = b.init(&s, "Theirs").await;
    assert!(mine["landing_page_id"].is_string(), "B's own page: {mine}");
    assert_ne!(mine["landing_page_id"], init["landing_page_id"]);
    assert!(b.job(mine["job_id"].as_str().unwrap()).await["events"].as_array().unwrap().is_empty(), "A's job does not make B's wait");
    // A's job and page are untouched.
    assert_eq!(a.job(job).await["status"], "pending");
    let (status, p) = a.get(&format!("/v1/landing-pages/{page}")).await;
    assert_eq!((status, p["business_data"]["campaign"]["productName"].clone()), (StatusCode::OK, json!("Mine")));
    // Without credentials: 401 with the envelope.
    let (status, body) = a.api.send(Method::GET, "/v1/jobs", None, None).await;
    refused(status, &body, StatusCode::UNAUTHORIZED, "authentication required");
}

// ---------------------------------------------------------------------------------------------
// The stream, with a hand-written runner.

fn node(node: &str, event_type: &str, message: &str) -> Value {
    json!({"type": "node", "node": node, "event_type": event_type, "message": message, "data": {"n": message}})
}

/// One frame of a Server-Sent Events stream.
#[derive(Debug, Default, Clone)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: bool,
}

/// A job's stream as a client reads it.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(edge: &TestEdge, token: &str, job: &str, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = reqwest::Client::new().get(format!("{}/v1/jobs/{job}/stream{query}", edge.url())).bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("opening the stream");
        assert_eq!(resp.status(), StatusCode::OK);
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Sse { resp, buf: String::new() }
    }

    /// The next frame; `None` when the stream ended. Panics after `WAIT`.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..i + 2).collect();
                let mut f = Frame::default();
                for line in raw.lines() {
                    if let Some(rest) = line.strip_prefix(':') {
                        f.comment = true;
                        let _ = rest;
                    } else if let Some((k, v)) = line.split_once(':') {
                        let v = v.strip_prefix(' ').unwrap_or(v).to_string();
                        match k {
                            "id" => f.id = Some(v),
                            "event" => f.event = Some(v),
                            "data" => f.data = Some(v),
                            _ => {}
                        }
                    }
                }
                return Some(f);
            }
            match tokio::time::timeout(WAIT, self.resp.chunk()).await.expect("a frame within the wait") {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) => return None,
                Err(e) => panic!("reading the stream: {e}"),
            }
        }
    }

    /// The next node event frame (skipping `retry:` and keepalive frames): `(index, event)`.
    async fn event(&mut self) -> Option<(u64, Value)> {
        loop {
            let f = self.frame().await?;
            if let (Some(id), Some(data)) = (&f.id, &f.data) {
                let v: Value = serde_json::from_str(data).expect("JSON data");
                assert_eq!(f.event.as_deref(), v["event_type"].as_str(), "event: names the event_type");
                return Some((id.parse().expect("a numeric id"), v));
            }
            assert!(f.event.as_deref() != Some("error"), "an error frame: {f:?}");
        }
    }
}

#[tokio::test]
async fn the_stream_follows_resumes_and_ends() {
    let mut edge = TestEdge::start(&[("SSE_KEEPALIVE_SECS", "1")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let u = User::new(&edge, "lf-sse").await;
    let other = User::new(&edge, "lf-sse-other").await;
    let mut runner = HandRunner::connect(&edge, "hand-sse", 2).await;
    let s = session("sse");
    let init = u.init(&s, "Streamed").await;
    let job = init["job_id"].as_str().unwrap().to_string();
    let page = init["landing_page_id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert_eq!(a.job_id, job);
    let landing = a.landing.clone().expect("a landing assignment");
    assert_eq!((landing.session_id.as_str(), landing.landing_page_id.as_str()), (s.as_str(), page.as_str()));

    // A stream opened before any node event: it follows them live.
    let mut live = Sse::open(&edge, &u.token, &job, "", None).await;
    runner.post(&api, &a, vec![json!({"type": "started", "message": "started"}), node("router", "node", "Planning next steps...")]).await;
    let (i, e) = live.event().await.expect("the router's event");
    assert_eq!((i, e["node"].as_str(), e["event_type"].as_str()), (0, Some("router"), Some("node")));
    let polled = u.job(&job).await;
    assert_eq!(polled["status"], "running");
    assert_eq!(polled["events"][0], e, "the stream sends the event as GET shows it");
    // Idle: keepalive comments.
    let f = live.frame().await.expect("a keepalive");
    assert!(f.comment && f.id.is_none(), "{f:?}");

    let names = ["router", "design_planner", "design_planner", "designer", "designer", "coder"];
    let kinds = ["node_completed", "node", "node_completed", "node", "node_completed", "node"];
    let more: Vec<Value> = names.iter().zip(kinds).map(|(n, k)| node(n, k, &format!("{n} {k}"))).collect();
    runner.post(&api, &a, more).await;
    let mut seen = vec![e];
    for want in 1..=3u64 {
        let (i, e) = live.event().await.expect("an event");
        assert_eq!(i, want);
        seen.push(e);
    }
    // The client goes away after index 3 and comes back with Last-Event-ID: 3, while more arrive.
    drop(live);
    runner.post(&api, &a, vec![node("coder_tools", "tool", "Created 3 file(s)"), node("coder", "node_completed", "done")]).await;
    let mut resumed = Sse::open(&edge, &u.token, &job, "?after=1", Some("3")).await;
    for want in 4..=8u64 {
        let (i, e) = resumed.event().await.expect("an event");
        assert_eq!(i, want, "resumed after Last-Event-ID, which wins over ?after=");
        seen.push(e);
    }
    // The job ends: __end__, then the stream ends.
    runner
        .post(&api, &a, vec![json!({"type": "finished", "outcome": "completed", "message": "deployed", "result": {"preview_url": "x"}})])
        .await;
    let (i, end) = resumed.event().await.expect("the __end__ event");
    assert_eq!((i, end["node"].as_str(), end["event_type"].as_str()), (9, Some("__end__"), Some("job_completed")), "{end}");
    seen.push(end);
    loop {
        match resumed.frame().await {
            None => break,
            Some(f) => assert!(f.comment || f.id.is_none(), "nothing after __end__: {f:?}"),
        }
    }
    // Nothing lost or repeated: the stream's events are the job's, in order.
    let job_view = u.job(&job).await;
    assert_eq!(job_view["status"], "completed");
    assert_eq!(Value::Array(seen.clone()), job_view["events"]);
    let ids: BTreeSet<&str> = seen.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), seen.len(), "distinct ids");

    // A stream from ?after= of an ended job replays the rest and ends; after the last, at once.
    let mut tail = Sse::open(&edge, &u.token, &job, "?after=7", None).await;
    let mut got = vec![];
    while let Some((i, _)) = tail.event().await {
        got.push(i);
    }
    assert_eq!(got, [7, 8, 9]);
    let mut done = Sse::open(&edge, &u.token, &job, "", Some("9")).await;
    assert!(done.event().await.is_none(), "the client saw __end__ already");
    for (q, h) in [("?after=x", None), ("", Some("-2"))] {
        let mut req = reqwest::Client::new().get(format!("{}/v1/jobs/{job}/stream{q}", edge.url())).bearer_auth(&u.token);
        if let Some(h) = h {
            req = req.header("last-event-id", h);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        refused(status, &body, StatusCode::BAD_REQUEST, "must be an event index");
    }
    let (status, body) = other.get(&format!("/v1/jobs/{job}/stream")).await;
    refused(status, &body, StatusCode::NOT_FOUND, "job not found");
    let (status, _) = api.send(Method::GET, &format!("/v1/jobs/{job}/stream"), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A page's delete takes its preview and workspace bundle from R2.
    let chat = u.chat(&s, "more blue").await;
    let b = runner.assignment().await;
    assert_eq!(b.job_id, chat);
    let preview = json!({"files": [{"path": "index.html", "content": "<html><title>x</title></html>"}, {"path": "styles.css", "content": "p{}"}]});
    let (status, published) =
        api.send(Method::PUT, &format!("/runner/v1/jobs/{chat}/preview?lease_id={}", b.lease_id), Some(&runner.token), Some(preview)).await;
    assert_eq!(status, StatusCode::OK, "{published}");
    let (status, body) =
        api.send_raw(Method::PUT, &format!("/runner/v1/jobs/{chat}/bundle?lease_id={}", b.lease_id), Some(&format!("Bearer {}", runner.token)), Some("application/octet-stream"), b"bundle".to_vec()).await;
    assert!(status.is_success(), "{status} {body}");
    let (status, _) = api.send(Method::GET, &format!("/preview/{page}/styles.css"), None, None).await;
    assert_eq!(status, StatusCode::OK, "the preview is served");
    let (status, body) = u.send(Method::DELETE, &format!("/v1/landing-pages/{page}"), None, None).await;
    refused(status, &body, StatusCode::CONFLICT, "pending or running");
    runner.post(&api, &b, vec![json!({"type": "finished", "outcome": "completed", "message": "ok"})]).await;
    assert_eq!(u.job(&chat).await["status"], "completed");
    let (status, body) = u.send(Method::DELETE, &format!("/v1/landing-pages/{page}"), None, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for path in ["", "index.html", "styles.css"] {
        let (status, _) = api.send(Method::GET, &format!("/preview/{page}/{path}"), None, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "/preview/{page}/{path} after the delete");
    }
    // And from R2 itself: the bundle, the preview's files and its manifest.
    edge.stop();
    for key in [format!("sessions/{page}.bundle"), format!("previews/{page}/index.html"), format!("preview-manifests/{page}.json")] {
        let out = edge.persist_dir().join("got.bin");
        let got = r2(&edge, &["get", &format!("kiln-artifacts/{key}"), "--file", out.to_str().unwrap()]);
        let said = format!("{}{}", String::from_utf8_lossy(&got.stdout), String::from_utf8_lossy(&got.stderr));
        assert!(!got.status.success() && said.contains("does not exist"), "{key} is gone from R2: {said}");
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let edge = TestEdge::start(&[("ACCESS_TOKEN_TTL_SECS", "8")]).await.expect("starting wrangler dev");
    let u = User::new(&edge, "lf-expiry").await;
    let job = u.init(&session("exp"), "Expiring").await["job_id"].as_str().unwrap().to_string();
    let opened = std::time::Instant::now();
    let mut sse = Sse::open(&edge, &u.token, &job, "", None).await;
    let error = loop {
        match sse.frame().await {
            Some(f) if f.event.as_deref() == Some("error") => break f,
            Some(f) => assert!(f.id.is_none(), "no node event: {f:?}"),
            None => panic!("the stream ended without saying why"),
        }
    };
    let data: Value = serde_json::from_str(error.data.as_deref().unwrap()).unwrap();
    assert!(data["error"].as_str().unwrap().contains("expired"), "{data}");
    assert!(opened.elapsed() < Duration::from_secs(9), "at the token's expiry: {:?}", opened.elapsed());
    // Then it ends, once told.
    while let Some(f) = sse.frame().await {
        assert!(f.event.is_none() && f.id.is_none(), "nothing after the error: {f:?}");
    }
    let (status, _) = u.get(&format!("/v1/jobs/{job}/stream")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the expired token opens no stream");
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
