//! The edge core of seed 001's landing pages, driven through the runner protocol by a hand-written
//! runner socket against a real `wrangler dev`: the `__end__` node every end writes (completed with
//! the result, failed with the error, cancelled), the page's status (its D1 row, read through the
//! face), one session's jobs dispatched one after the other while another session's job runs at
//! once, a session's bundle under the lease, and previews published then served without
//! credentials.

use std::time::{Duration, Instant};

use base64::Engine;
use kiln_e2e::landing::{payload, session, LandingClient};
use kiln_e2e::{HandRunner, Method, StatusCode, TestEdge};
use kiln_schemas::runner::EdgeMessage;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn node(node: &str, event_type: &str, message: &str) -> Value {
    json!({"type": "node", "node": node, "event_type": event_type, "message": message, "data": {}})
}

/// Polls the page (`GET /v1/landing-pages/{id}`, the face's view of its D1 row) until `pred`.
async fn wait_page(user: &LandingClient, page: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, row) = user.get(&format!("/v1/landing-pages/{page}")).await;
        assert_eq!(status, StatusCode::OK, "{row}");
        if pred(&row) {
            return row;
        }
        assert!(Instant::now() < deadline, "{what}: the page is still {row}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The job's last event, once it is its `__end__`.
async fn end_node(user: &LandingClient, job_id: &str) -> Value {
    let job = user
        .poll_until(job_id, WAIT, "__end__ node", |j| {
            j["events"].as_array().and_then(|e| e.last()).is_some_and(|e| e["node"] == "__end__")
        })
        .await;
    let events = job["events"].as_array().unwrap();
    assert_eq!(events.iter().filter(|e| e["node"] == "__end__").count(), 1, "one __end__: {job:#}");
    events.last().unwrap().clone()
}

#[tokio::test]
async fn every_end_writes_its_node_and_the_pages_status() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let user = LandingClient::register(&edge, "l1-end").await;
    let mut runner = HandRunner::connect(&edge, "hand", 1).await;
    let s = session("end");

    // Init: the assignment carries the session, the page and its business data.
    let init = user.init(&s, payload("Aurora", "")).await;
    let page = init["landing_page_id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert_eq!(a.job_id, init["job_id"]);
    let landing = a.landing.clone().expect("Assignment.landing");
    assert_eq!((landing.session_id.as_str(), landing.landing_page_id.as_str()), (s.as_str(), page.as_str()));
    assert_eq!(landing.payload["campaign"]["productName"], "Aurora", "{:?}", landing.payload);
    assert_eq!(landing.message, None, "an init job has no chat message");
    wait_page(&user, &page, "generating", |r| r["status"] == "generating").await;

    // Completed: `__end__` job_completed with the result; the page generated with its preview.
    let result = json!({"preview_url": format!("{}/preview/{page}/", edge.url()), "landing_page_id": page, "sections": ["hero", "faq"]});
    runner.post(&api, &a, vec![node("router", "node", "routing"), node("router", "node_completed", "design")]).await;
    runner.finish(&api, &a, json!({"outcome": "completed", "message": "page deployed", "result": result})).await;
    let end = end_node(&user, &a.job_id).await;
    assert_eq!((end["event_type"].as_str(), end["data"].clone()), (Some("job_completed"), result.clone()), "{end}");
    let row = wait_page(&user, &page, "generated", |r| r["status"] == "generated").await;
    assert_eq!(row["preview_url"], result["preview_url"]);
    assert_eq!(row["sections"], json!(["hero", "faq"]));

    // Failed: `__end__` job_failed with the error; the page failed (its preview kept).
    let chat = user.chat(&s, "Make it blue").await;
    let b = runner.assignment().await;
    assert_eq!(b.job_id, chat);
    assert_eq!(b.landing.as_ref().and_then(|l| l.message.as_deref()), Some("Make it blue"));
    wait_page(&user, &page, "generating again", |r| r["status"] == "generating").await;
    let why = "the page does not build after 3 fix attempts: ERROR: styles.css is missing";
    runner.finish(&api, &b, json!({"outcome": "failed", "message": "failed", "error_message": why})).await;
    let end = end_node(&user, &b.job_id).await;
    assert_eq!((end["event_type"].as_str(), end["message"].as_str()), (Some("job_failed"), Some(why)), "{end}");
    let row = wait_page(&user, &page, "failed", |r| r["status"] == "failed").await;
    assert_eq!(row["preview_url"], result["preview_url"], "a failure keeps the last preview");

    // Cancelled while running: the runner is told, `__end__` job_cancelled, the page failed.
    let chat = user.chat(&s, "Add a pricing table").await;
    let c = runner.assignment().await;
    assert_eq!(c.job_id, chat);
    wait_page(&user, &page, "generating", |r| r["status"] == "generating").await;
    let (status, body) = user.cancel(&c.job_id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(matches!(runner.next(WAIT).await, Some(EdgeMessage::Cancel { job_id }) if job_id == c.job_id));
    runner.held.clear();
    let end = end_node(&user, &c.job_id).await;
    assert_eq!(end["event_type"], "job_cancelled", "{end}");
    wait_page(&user, &page, "failed", |r| r["status"] == "failed").await;
    // Its runner's late batch is refused: nothing follows the end.
    let (status, ack) = api
        .send(
            Method::POST,
            &format!("/runner/v1/jobs/{}/events", c.job_id),
            Some(&runner.token),
            Some(json!({"lease_id": c.lease_id, "events": [json!({"index": 0, "type": "node", "node": "coder", "event_type": "node", "message": "late", "data": {}})]})),
        )
        .await;
    assert_eq!((status, ack["lease_valid"].clone()), (StatusCode::OK, json!(false)), "{ack}");

    // A later completed job sets the page generated again.
    let chat = user.chat(&s, "Shorter headline").await;
    let d = runner.assignment().await;
    assert_eq!(d.job_id, chat);
    runner.finish(&api, &d, json!({"outcome": "completed", "message": "page deployed", "result": result})).await;
    assert_eq!(end_node(&user, &d.job_id).await["event_type"], "job_completed");
    wait_page(&user, &page, "generated again", |r| r["status"] == "generated").await;

    // Cancelled while pending (no runner slot): still one `__end__`.
    let mut busy = HandRunner::connect(&edge, "other", 0).await;
    drop(runner);
    let chat = user.chat(&s, "Never runs").await;
    let (status, body) = user.cancel(&chat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(end_node(&user, &chat).await["event_type"], "job_cancelled");
    assert!(busy.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn one_sessions_jobs_run_one_at_a_time_while_another_sessions_run_at_once() {
    let edge = TestEdge::start(&[("MAX_CONCURRENT_JOBS", "4")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let user = LandingClient::register(&edge, "l1-serial").await;
    let mut runner = HandRunner::connect(&edge, "hand", 4).await;
    let (sa, sb) = (session("a"), session("b"));

    let a1 = user.init(&sa, payload("Aurora", "")).await["job_id"].as_str().unwrap().to_string();
    let first = runner.assignment().await;
    assert_eq!(first.job_id, a1);
    // Two more of session A wait for a1, though slots are free.
    let a2 = user.chat(&sa, "second").await;
    let a3 = user.chat(&sa, "third").await;
    let job = user.job(&a2).await;
    let note = &job["events"][0];
    assert_eq!((note["node"].as_str(), note["event_type"].as_str()), (Some("queue"), Some("waiting")), "{job:#}");
    assert_eq!(note["message"], format!("Waiting for job {a1} of this session to finish"));
    assert!(runner.next(Duration::from_secs(2)).await.is_none(), "a2 must wait for a1");
    assert_eq!(user.job(&a2).await["status"], "pending");

    // Session B's job runs at once meanwhile.
    let started = Instant::now();
    let b1 = user.init(&sb, payload("Borealis", "")).await["job_id"].as_str().unwrap().to_string();
    let b = runner.assignment().await;
    assert_eq!(b.job_id, b1, "another session's job is not held back by session A's");
    println!("session B's job dispatched {:?} after its init while session A's waited", started.elapsed());
    assert_eq!(user.job(&a1).await["status"], "running");

    // a1 ends: a2 (the oldest waiting) is dispatched, not a3.
    let started = Instant::now();
    runner.finish(&api, &first, json!({"outcome": "completed", "result": {}})).await;
    let second = runner.assignment().await;
    assert_eq!(second.job_id, a2);
    println!("a2 dispatched {:?} after a1's finished batch", started.elapsed());
    assert!(runner.next(Duration::from_secs(1)).await.is_none(), "a3 waits for a2");
    runner.finish(&api, &second, json!({"outcome": "failed", "error_message": "boom"})).await;
    let third = runner.assignment().await;
    assert_eq!(third.job_id, a3);
    runner.finish(&api, &third, json!({"outcome": "completed"})).await;
    runner.finish(&api, &b, json!({"outcome": "completed"})).await;
    for id in [&a1, &a3, &b1] {
        assert_eq!(user.wait_terminal(id, WAIT).await["status"], "completed");
    }
    assert_eq!(user.wait_terminal(&a2, WAIT).await["status"], "failed");
}

fn url_of(edge: &TestEdge, path: &str) -> String {
    format!("{}{path}", edge.url())
}

#[tokio::test]
async fn bundles_and_previews_under_the_lease() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let user = LandingClient::register(&edge, "l1-bundle").await;
    let mut runner = HandRunner::connect(&edge, "hand", 1).await;
    let stranger = HandRunner::connect(&edge, "stranger", 0).await;
    let s = session("bundle");
    let init = user.init(&s, payload("Aurora", "")).await;
    let page = init["landing_page_id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let bundle_url = |lease: &str| url_of(&edge, &format!("/runner/v1/jobs/{}/bundle?lease_id={lease}", a.job_id));
    let put = |url: String, token: &str, body: Vec<u8>| {
        http.put(url).bearer_auth(token).header("content-type", "application/octet-stream").body(body).send()
    };

    // Bundle: none yet, then a round trip of raw bytes; only under the job's lease, from its runner.
    let got = http.get(bundle_url(&a.lease_id)).bearer_auth(&runner.token).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::NOT_FOUND);
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let no_lease = put(url_of(&edge, &format!("/runner/v1/jobs/{}/bundle", a.job_id)), &runner.token, bytes.clone()).await.unwrap();
    assert_eq!(no_lease.status(), StatusCode::BAD_REQUEST);
    let wrong = put(bundle_url("not-the-lease"), &runner.token, bytes.clone()).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::CONFLICT);
    let other = put(bundle_url(&a.lease_id), &stranger.token, bytes.clone()).await.unwrap();
    assert_eq!(other.status(), StatusCode::CONFLICT, "another runner naming the lease");
    let anon = http.put(bundle_url(&a.lease_id)).body(bytes.clone()).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    let user_token = http.get(bundle_url(&a.lease_id)).bearer_auth(&user.token).send().await.unwrap();
    assert_eq!(user_token.status(), StatusCode::UNAUTHORIZED, "a user's token opens no runner endpoint");
    let started = Instant::now();
    let ok = put(bundle_url(&a.lease_id), &runner.token, bytes.clone()).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK, "{}", ok.text().await.unwrap());
    let got = http.get(bundle_url(&a.lease_id)).bearer_auth(&runner.token).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().to_vec(), bytes, "the bundle comes back byte for byte");
    println!("bundle of {} bytes: PUT + GET in {:?}", bytes.len(), started.elapsed());
    let wrong = http.get(bundle_url("not-the-lease")).bearer_auth(&runner.token).send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::CONFLICT);

    // Preview: published, then served without credentials.
    let preview_put = |files: Value| {
        http.put(url_of(&edge, &format!("/runner/v1/jobs/{}/preview?lease_id={}", a.job_id, a.lease_id)))
            .bearer_auth(&runner.token)
            .json(&json!({ "files": files }))
            .send()
    };
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let index = "<!doctype html><html><head><title>Aurora</title><link rel=\"stylesheet\" href=\"styles.css\"></head><body>v1</body></html>";
    let resp = preview_put(json!([
        {"path": "index.html", "content": index},
        {"path": "styles.css", "content": "body{color:#7C3AED}"},
        {"path": "script.js", "content": "console.log(1)"},
        {"path": "img/dot.png", "content": b64, "base64": true},
    ]))
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let published: Value = resp.json().await.unwrap();
    let base = format!("{}/preview/{page}/", edge.url());
    assert_eq!(published["preview_url"], base, "{published}");
    assert_eq!(published["files"], 4);
    assert_eq!(published["bytes"].as_u64().unwrap() as usize, index.len() + 19 + 14 + png.len());
    for (bad, want) in [
        (json!([{"path": "../escape.html", "content": "x"}]), StatusCode::BAD_REQUEST),
        (json!([{"path": "a.png", "content": "!!", "base64": true}]), StatusCode::BAD_REQUEST),
        (json!([]), StatusCode::BAD_REQUEST),
    ] {
        let resp = preview_put(bad.clone()).await.unwrap();
        assert_eq!(resp.status(), want, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
    }

    // Over the preview limit (decoded bytes): 413, and the published preview stays.
    let big = "x".repeat(kiln_schemas::landing::MAX_PREVIEW_BYTES + 1);
    let resp = preview_put(json!([{"path": "index.html", "content": big}])).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let get = |path: String| http.get(url_of(&edge, &path)).send();
    let resp = get(format!("/preview/{page}/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let header = |r: &reqwest::Response, k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&resp, "cache-control"), "public, max-age=60");
    let etag = header(&resp, "etag");
    assert!(!etag.is_empty());
    assert_eq!(resp.text().await.unwrap(), index);
    for (path, ct) in [("styles.css", "text/css; charset=utf-8"), ("script.js", "text/javascript; charset=utf-8"), ("index.html", "text/html; charset=utf-8")] {
        let resp = get(format!("/preview/{page}/{path}")).await.unwrap();
        assert_eq!((resp.status(), header(&resp, "content-type")), (StatusCode::OK, ct.to_string()), "{path}");
    }
    let resp = get(format!("/preview/{page}/img/dot.png")).await.unwrap();
    assert_eq!(header(&resp, "content-type"), "image/png");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), png);
    let head = http.head(url_of(&edge, &format!("/preview/{page}/styles.css"))).send().await.unwrap();
    assert_eq!((head.status(), header(&head, "content-length")), (StatusCode::OK, "19".to_string()));
    let cached = http.get(url_of(&edge, &format!("/preview/{page}/"))).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    assert!(cached.bytes().await.unwrap().is_empty());
    let moved = get(format!("/preview/{page}")).await.unwrap();
    assert_eq!((moved.status(), header(&moved, "location")), (StatusCode::MOVED_PERMANENTLY, format!("/preview/{page}/")));
    for (path, want) in [
        (format!("/preview/{page}/missing.css"), StatusCode::NOT_FOUND),
        (format!("/preview/{page}/..%2f..%2fsessions%2f{page}.bundle"), StatusCode::BAD_REQUEST),
        (format!("/preview/{page}/%2e%2e%2fx"), StatusCode::BAD_REQUEST),
        (format!("/preview/{page}/a%5cb"), StatusCode::BAD_REQUEST),
        ("/preview/not.a.page/index.html".to_string(), StatusCode::NOT_FOUND),
        ("/preview/00000000-0000-4000-8000-000000000000/".to_string(), StatusCode::NOT_FOUND),
    ] {
        let resp = get(path.clone()).await.unwrap();
        assert_eq!(resp.status(), want, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    // Republished with fewer files: the stale ones are gone, the changed one has a new ETag.
    let index2 = index.replace("v1", "v2");
    let resp = preview_put(json!([{"path": "index.html", "content": index2}])).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get(format!("/preview/{page}/")).await.unwrap();
    assert_ne!(header(&resp, "etag"), etag);
    assert_eq!(resp.text().await.unwrap(), index2);
    for path in ["styles.css", "script.js", "img/dot.png"] {
        assert_eq!(get(format!("/preview/{page}/{path}")).await.unwrap().status(), StatusCode::NOT_FOUND, "{path} removed");
    }
    let old = http.get(url_of(&edge, &format!("/preview/{page}/"))).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(old.status(), StatusCode::OK, "the old ETag no longer matches");

    // After the job ends, a new job of the session reads the bundle under its own lease only.
    runner.finish(&api, &a, json!({"outcome": "completed", "result": published})).await;
    let chat = user.chat(&s, "again").await;
    let b = runner.assignment().await;
    assert_eq!(b.job_id, chat);
    let got = http
        .get(url_of(&edge, &format!("/runner/v1/jobs/{}/bundle?lease_id={}", b.job_id, b.lease_id)))
        .bearer_auth(&runner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().to_vec(), bytes, "the session's bundle reaches its next job");
    let stale = http
        .get(url_of(&edge, &format!("/runner/v1/jobs/{}/bundle?lease_id={}", b.job_id, a.lease_id)))
        .bearer_auth(&runner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::CONFLICT, "another job's lease");
    drop(stranger);
}

/// Issue 8's gap: a gather turn no longer holds the room's alarm. While a runner sits on a gather
/// request, the room still closes a socket whose token expired on time (its alarm is free), and the
/// late reply is still taken.
#[tokio::test]
async fn a_gather_turn_in_flight_does_not_hold_the_rooms_alarm() {
    const TTL_MS: u64 = 6_000;
    let edge = TestEdge::start(&[("ACCESS_TOKEN_TTL_SECS", "6")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let email = kiln_e2e::unique_email("l1-gather");
    let (token, _) = api.register_and_login(&email).await;
    let logged_in = Instant::now();
    let mut runner = HandRunner::connect(&edge, "gatherer", 0).await;
    let (status, job) = api.post("/api/jobs/", &token, json!({"prompt": "A recipe book"})).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let job_id = job["id"].as_str().unwrap().to_string();
    let (request_id, gather) = runner.gather().await;
    assert_eq!(gather.job_id, job_id);

    // The turn stays unanswered; the socket opened with the 6 s token closes at its expiry.
    let mut ws = kiln_e2e::WsClient::connect(&edge.ws_url(), &job_id, kiln_e2e::WsAuth::Header(&token), None).await.expect("job socket");
    let deadline = Instant::now() + Duration::from_millis(TTL_MS + 10_000);
    let mut closed = None;
    while Instant::now() < deadline {
        match ws.next_json(Duration::from_millis(500)).await {
            Some(e) if e["kind"] == "error" => {
                closed = Some(logged_in.elapsed());
                break;
            }
            _ => {}
        }
    }
    let closed = closed.expect("the expired socket was told and closed while the gather turn was in flight");
    println!("socket of a {TTL_MS} ms token closed {closed:?} after login, a gather turn in flight");
    assert!(closed < Duration::from_millis(TTL_MS + 4_000), "closed late: {closed:?}");

    // The late reply is taken: the gatherer's question is the job's next message.
    let started = Instant::now();
    let reply = json!({"reply": "Which cuisines should it cover?", "sender": "Gatherer"});
    runner.reply(&request_id, reply).await;
    let (_, pair) = api.login(&email, kiln_e2e::PASSWORD).await;
    let fresh = pair["access"].as_str().unwrap().to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, msgs) = api.get(&format!("/api/job-messages/?job_id={job_id}"), &fresh).await;
        assert_eq!(status, StatusCode::OK, "{msgs}");
        if msgs.as_array().unwrap().iter().any(|m| m["content"] == "Which cuisines should it cover?") {
            break;
        }
        assert!(Instant::now() < deadline, "the late gather reply never reached the job: {msgs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("a gather reply reached the job's messages {:?} after the runner sent it", started.elapsed());
}
