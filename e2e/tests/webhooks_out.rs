//! Outbound webhooks (issue 12 §2) against a real `wrangler dev` with its local Cloudflare Queue:
//! receivers are small HTTP servers in this process. A receiver that fails three times then
//! succeeds gets each event delivered once (four attempts in the log, every one validly signed,
//! one `Kiln-Delivery` id, and a redelivery with the same id); a receiver that never answers does
//! not delay another subscription; subscriptions filter by event and job type and see only their
//! owner's jobs; a job that ends with a pull request brings `job.pr_opened`; private targets are
//! refused when the setting is off; bad input 400s; other owners' subscriptions 404.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use axum::Router;
use futures::{SinkExt, StreamExt};
use kiln_e2e::{Method, StatusCode, TestEdge};
use kiln_schemas::runner::{EdgeMessage, EventBatch, IndexedEvent, Outcome, RegisterRunnerResponse, RunnerEvent, RunnerMessage};
use kiln_schemas::webhooks::verify_signature_header;
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

static SHARED: OnceCell<TestEdge> = OnceCell::const_new();

/// The edge shared by tests that isolate themselves by user (development settings: private
/// targets allowed, retries from 1 s).
async fn shared() -> &'static TestEdge {
    SHARED
        .get_or_init(|| async {
            let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
            edge.api().grant("*", "acme/*").await;
            edge
        })
        .await
}

/// What a receiver does with a POST.
#[derive(Clone, Copy)]
enum Behaviour {
    /// 200 at once.
    Ok,
    /// 500 to the first `n` attempts of each delivery id, then 200.
    FailFirst(usize),
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    delivery: String,
    event: String,
    attempt: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a delivery's body is JSON")
    }
}

/// A local receiver on 127.0.0.1, on a thread of its own.
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    fn start(behaviour: Behaviour) -> Receiver {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a receiver");
        listener.set_nonblocking(true).expect("non-blocking");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let shared = hits.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let hits = shared.clone();
                async move {
                    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let delivery = header("kiln-delivery");
                    let answered = {
                        let mut hits = hits.lock().unwrap();
                        let before = hits.iter().filter(|h| h.delivery == delivery).count();
                        let answered = match behaviour {
                            Behaviour::Ok => 200,
                            Behaviour::FailFirst(n) if before < n => 500,
                            Behaviour::FailFirst(_) => 200,
                            Behaviour::Hang => 0,
                        };
                        hits.push(Hit {
                            at: Instant::now(),
                            delivery,
                            event: header("kiln-event"),
                            attempt: header("kiln-attempt"),
                            signature: header("kiln-signature"),
                            body: body.to_vec(),
                            answered,
                        });
                        answered
                    };
                    if answered == 0 {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    AxumStatus::from_u16(answered.max(200)).unwrap()
                }
            }),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Receiver { url, hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits until `done(hits)` holds (panics with the hits after `timeout`).
    async fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = Instant::now() + timeout;
        loop {
            let hits = self.hits();
            if done(&hits) {
                return hits;
            }
            assert!(Instant::now() < deadline, "{what}: not within {timeout:?}; hits: {:#?}", hits.iter().map(|h| (&h.event, &h.delivery, h.answered)).collect::<Vec<_>>());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn code_job(branch: &str) -> Value {
    json!({"prompt": "Add a logout button", "githubOrg": "acme", "githubRepo": "shop", "branchName": branch})
}

async fn subscribe(edge: &TestEdge, token: &str, body: Value) -> Value {
    let (status, sub) = edge.api().post("/webhook-subscriptions", token, body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "POST /webhook-subscriptions {body}: {sub}");
    sub
}

async fn deliveries(edge: &TestEdge, token: &str, sub_id: &str) -> Vec<Value> {
    let (status, list) = edge.api().get(&format!("/webhook-subscriptions/{sub_id}/deliveries"), token).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["deliveries"].as_array().unwrap().clone()
}

async fn cancel(edge: &TestEdge, token: &str, job_id: &str) {
    let (status, body) = edge.api().post(&format!("/jobs/{job_id}/cancel"), token, json!({})).await;
    assert!(status.is_success(), "cancel {job_id}: {status} {body}");
}

fn verify(hit: &Hit, secret: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    verify_signature_header(secret.as_bytes(), &hit.signature, &hit.body, now)
        .unwrap_or_else(|e| panic!("attempt {} of {}: Kiln-Signature {:?} does not verify: {e:?}", hit.attempt, hit.delivery, hit.signature));
    assert!(verify_signature_header(b"another-secret-entirely", &hit.signature, &hit.body, now).is_err());
}

#[tokio::test]
async fn a_failing_receiver_gets_each_event_once_after_retries_with_valid_signatures() {
    let edge = shared().await;
    let token = edge.api().new_user("hooks-retry").await;
    let receiver = Receiver::start(Behaviour::FailFirst(3));
    let secret = "a-receivers-secret-of-some-length";
    let sub = subscribe(
        edge,
        &token,
        json!({"url": receiver.url, "events": ["job.created", "job.finished"], "secret": secret}),
    )
    .await;
    assert_eq!(sub["secret"], secret, "the secret is shown at creation");
    let sub_id = sub["id"].as_str().unwrap();
    let job = edge.api().create_job(&token, code_job("hooks/retry")).await;
    let job_id = job["id"].as_str().unwrap().to_string();
    cancel(edge, &token, &job_id).await;

    // 3 failures then a success for each of the two events: 1 + 2 + 4 s of backoff.
    let hits = receiver
        .wait_for(Duration::from_secs(40), "both events delivered", |h| h.iter().filter(|h| h.answered == 200).count() >= 2)
        .await;
    let mut ids: Vec<String> = hits.iter().map(|h| h.delivery.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2, "two deliveries: {hits:#?}");
    for id in &ids {
        let mine: Vec<&Hit> = hits.iter().filter(|h| &h.delivery == id).collect();
        assert_eq!(mine.len(), 4, "4 attempts of {id}");
        assert_eq!(mine.iter().map(|h| h.answered).collect::<Vec<_>>(), [500, 500, 500, 200]);
        assert_eq!(mine.iter().map(|h| h.attempt.as_str()).collect::<Vec<_>>(), ["1", "2", "3", "4"]);
        let first = mine[0].json();
        for h in &mine {
            verify(h, secret);
            assert_eq!(h.json(), first, "every attempt sends the same body");
        }
        assert_eq!(first["id"], id.as_str(), "the payload's id is Kiln-Delivery");
        assert_eq!(first["job"]["id"], job_id.as_str());
        // Backoff: each retry waits longer than the one before.
        let gaps: Vec<Duration> = mine.windows(2).map(|w| w[1].at - w[0].at).collect();
        assert!(gaps[0] >= Duration::from_millis(900) && gaps[1] >= Duration::from_millis(1900) && gaps[2] >= Duration::from_millis(3900), "backoff gaps {gaps:?}");
    }
    let mut events: Vec<String> = ids.iter().map(|id| hits.iter().find(|h| &h.delivery == id).unwrap().event.clone()).collect();
    events.sort();
    assert_eq!(events, ["job.created", "job.finished"]);
    let finished = hits.iter().find(|h| h.event == "job.finished").unwrap().json();
    assert_eq!(finished["type"], "job.finished");
    assert_eq!(finished["job"]["status"], "cancelled");
    assert_eq!(finished["job"]["previous_status"], "queued");
    assert_eq!(finished["job"]["job_type"], "code");

    // No fifth attempt comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.hits().len(), 8);

    // The log: each delivered, 4 attempts with their codes and latencies.
    let log = deliveries(edge, &token, sub_id).await;
    assert_eq!(log.len(), 2, "{log:#?}");
    for d in &log {
        assert_eq!(d["status"], "delivered", "{d:#}");
        assert_eq!(d["job_id"], job_id.as_str());
        let attempts = d["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 4, "{d:#}");
        for (i, a) in attempts.iter().enumerate() {
            assert_eq!(a["n"], i as u64 + 1);
            assert_eq!(a["response_code"], if i < 3 { 500 } else { 200 });
            assert!(a["latency_ms"].is_u64());
            assert_eq!(a["error"].is_null(), i == 3, "{a}");
        }
        assert!(d["delivered_at"].is_string() && d["next_attempt_at"].is_null());
    }

    // Redelivery after a success: same id, same body, a fifth attempt, delivered again.
    let d = &log[0];
    let id = d["id"].as_str().unwrap();
    let (status, again) = edge.api().post(&format!("/webhook-subscriptions/{sub_id}/deliveries/{id}/redeliver"), &token, json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["status"], "pending");
    let hits = receiver.wait_for(Duration::from_secs(10), "the redelivery", |h| h.len() >= 9).await;
    let last = hits.last().unwrap();
    assert_eq!(last.delivery, id);
    assert_eq!(last.attempt, "5");
    assert_eq!(last.json(), hits.iter().find(|h| h.delivery == id).unwrap().json());
    verify(last, secret);
    let log = deliveries(edge, &token, sub_id).await;
    let d = log.iter().find(|d| d["id"] == id).unwrap();
    assert_eq!(d["status"], "delivered");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn a_receiver_that_never_answers_does_not_delay_another_subscription() {
    let edge = shared().await;
    let token = edge.api().new_user("hooks-dead").await;
    let dead = Receiver::start(Behaviour::Hang);
    let live = Receiver::start(Behaviour::Ok);
    let all = json!(["job.created", "job.status", "job.finished"]);
    let dead_sub = subscribe(edge, &token, json!({"url": dead.url, "events": all})).await;
    subscribe(edge, &token, json!({"url": live.url, "events": all})).await;

    // Jobs created and cancelled while the dead receiver holds every attempt for 10 s.
    let mut lags = vec![];
    for i in 0..6 {
        let sent = Instant::now();
        let job = edge.api().create_job(&token, code_job(&format!("hooks/dead-{i}"))).await;
        let job_id = job["id"].as_str().unwrap().to_string();
        let hits = live
            .wait_for(Duration::from_secs(5), "the live receiver's job.created", |h| {
                h.iter().any(|h| h.event == "job.created" && h.json()["job"]["id"] == job_id.as_str())
            })
            .await;
        let at = hits.iter().find(|h| h.event == "job.created" && h.json()["job"]["id"] == job_id.as_str()).unwrap().at;
        lags.push(at - sent);
        cancel(edge, &token, &job_id).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("created -> live receiver: {lags:?}");
    assert!(lags.iter().all(|l| *l < Duration::from_secs(3)), "the live receiver waited: {lags:?}");
    assert!(dead.hits().len() >= 6, "the dead receiver was called too: {}", dead.hits().len());
    live.wait_for(Duration::from_secs(5), "every event at the live receiver", |h| h.len() >= 18).await;

    // The dead receiver's attempts end in the 10 s timeout, recorded, and are retried.
    let dead_id = dead_sub["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = deliveries(edge, &token, dead_id).await;
        let timed_out = log.iter().find(|d| {
            d["attempts"].as_array().is_some_and(|a| {
                a.first().is_some_and(|a| a["response_code"].is_null() && a["error"].as_str().is_some_and(|e| e.contains("no answer within 10 s")))
            })
        });
        if let Some(d) = timed_out {
            assert_eq!(d["status"], "pending", "retried: {d:#}");
            let latency = d["attempts"][0]["latency_ms"].as_u64().unwrap();
            assert!((9_500..15_000).contains(&latency), "the timeout's latency {latency}");
            break;
        }
        assert!(Instant::now() < deadline, "no timed-out attempt recorded: {log:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn subscriptions_filter_by_event_and_job_type_and_see_only_their_owners_jobs() {
    let edge = shared().await;
    let token = edge.api().new_user("hooks-filter").await;
    let other = edge.api().new_user("hooks-filter-other").await;
    let finished_tasks = Receiver::start(Behaviour::Ok);
    let created_any = Receiver::start(Behaviour::Ok);
    let others = Receiver::start(Behaviour::Ok);
    subscribe(edge, &token, json!({"url": finished_tasks.url, "events": ["job.finished"], "job_types": ["task"]})).await;
    subscribe(edge, &token, json!({"url": created_any.url, "events": ["job.created"]})).await;
    subscribe(edge, &other, json!({"url": others.url, "events": ["job.created", "job.status", "job.finished"]})).await;

    let code = edge.api().create_job(&token, code_job("hooks/filter-code")).await;
    let task = edge
        .api()
        .create_job(&token, json!({"prompt": "Spec a feature", "githubOrg": "acme", "githubRepo": "shop", "jobType": "task", "branchName": "hooks/filter-task"}))
        .await;
    let (code_id, task_id) = (code["id"].as_str().unwrap(), task["id"].as_str().unwrap());
    cancel(edge, &token, code_id).await;
    cancel(edge, &token, task_id).await;

    let hits = finished_tasks.wait_for(Duration::from_secs(10), "the task's job.finished", |h| !h.is_empty()).await;
    let created = created_any.wait_for(Duration::from_secs(10), "both job.created", |h| h.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hits_after = finished_tasks.hits();
    assert_eq!(hits_after.len(), 1, "only the task's job.finished: {hits_after:#?}");
    let body = hits[0].json();
    assert_eq!(body["type"], "job.finished");
    assert_eq!(body["job"]["id"], task_id);
    assert_eq!(body["job"]["job_type"], "task");
    assert_eq!(body["job"]["status"], "cancelled");
    assert_eq!(created_any.hits().len(), 2, "only job.created, of both kinds");
    let mut created_ids: Vec<String> = created.iter().map(|h| h.json()["job"]["id"].as_str().unwrap().to_string()).collect();
    created_ids.sort();
    let mut want = vec![code_id.to_string(), task_id.to_string()];
    want.sort();
    assert_eq!(created_ids, want);
    for h in &created {
        let b = h.json();
        assert_eq!(b["type"], "job.created");
        assert_eq!(b["job"]["status"], "queued");
        assert!(b["job"]["previous_status"].is_null());
        chrono::DateTime::parse_from_rfc3339(b["created_at"].as_str().unwrap()).expect("created_at is RFC 3339");
    }
    assert!(others.hits().is_empty(), "another owner's subscription saw this owner's jobs");

    // Disabled: nothing more; enabled again: delivered again.
    let (status, list) = edge.api().get("/webhook-subscriptions", &token).await;
    assert_eq!(status, StatusCode::OK);
    let created_sub = list["subscriptions"].as_array().unwrap().iter().find(|s| s["url"] == created_any.url.as_str()).unwrap().clone();
    let path = format!("/webhook-subscriptions/{}", created_sub["id"].as_str().unwrap());
    let (status, patched) = edge.api().send(Method::PATCH, &path, Some(&token), Some(json!({"enabled": false}))).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["enabled"], false);
    let job = edge.api().create_job(&token, code_job("hooks/filter-disabled")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(created_any.hits().len(), 2, "a disabled subscription gets nothing");
    cancel(edge, &token, job["id"].as_str().unwrap()).await;
    let (status, patched) =
        edge.api().send(Method::PATCH, &path, Some(&token), Some(json!({"enabled": true, "job_types": ["task"]}))).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["job_types"], json!(["task"]));
    edge.api().create_job(&token, code_job("hooks/filter-code-2")).await;
    let task2 = edge
        .api()
        .create_job(&token, json!({"prompt": "x", "githubOrg": "acme", "githubRepo": "shop", "jobType": "task", "branchName": "hooks/filter-task-2"}))
        .await;
    let hits = created_any.wait_for(Duration::from_secs(10), "the second task's job.created", |h| h.len() >= 3).await;
    assert_eq!(hits[2].json()["job"]["id"], task2["id"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(created_any.hits().len(), 3, "the code job is filtered out");

    // Deleted: 404 afterwards, and its log with it.
    let (status, _) = edge.api().send(Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = edge.api().get(&path, &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = edge.api().get(&format!("{path}/deliveries"), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A runner-protocol client that finishes every job it is assigned with a pull request.
async fn pr_runner(base: String) {
    let http = reqwest::Client::new();
    let reg: RegisterRunnerResponse = http
        .post(format!("{base}/runner/v1/register"))
        .bearer_auth(kiln_e2e::runner_registration_token())
        .json(&json!({"name": "hooks-pr"}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut request = format!("{}/runner/v1/connect", base.replacen("http", "ws", 1)).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", reg.token).parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let hello = RunnerMessage::Hello { name: "hooks-pr".into(), capacity: 1, running: vec![], version: "test".into(), tools: None };
    sink.send(Message::Text(serde_json::to_string(&hello).unwrap().into())).await.unwrap();
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(EdgeMessage::Assign { assignment }) = serde_json::from_str::<EdgeMessage>(&text) else { continue };
        let batch = EventBatch {
            lease_id: assignment.lease_id.clone(),
            events: vec![
                IndexedEvent { index: 0, event: RunnerEvent::Started { message: "started".into() } },
                IndexedEvent {
                    index: 1,
                    event: RunnerEvent::Finished {
                        outcome: Outcome::Completed,
                        message: "done".into(),
                        pr_url: Some("https://github.com/acme/shop/pull/7".into()),
                        completion_reason: None,
                        total_iterations: None,
                        error_message: None,
                        result: None,
                    },
                },
            ],
        };
        http.post(format!("{base}/runner/v1/jobs/{}/events", assignment.job_id)).bearer_auth(&reg.token).json(&batch).send().await.unwrap();
    }
}

#[tokio::test]
async fn a_job_that_ends_with_a_pull_request_brings_pr_opened() {
    // Its own edge: the runner takes any queued job of the queue.
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    edge.api().grant("*", "acme/*").await;
    let token = edge.api().new_user("hooks-pr").await;
    let receiver = Receiver::start(Behaviour::Ok);
    let secret = "pull-request-receiver-secret";
    subscribe(&edge, &token, json!({"url": receiver.url, "events": ["job.status", "job.pr_opened", "job.finished"], "secret": secret}))
        .await;
    tokio::spawn(pr_runner(edge.url()));
    let job = edge.api().create_job(&token, code_job("hooks/pr")).await;
    let job_id = job["id"].as_str().unwrap();
    edge.api().wait_status(&token, job_id, "completed", Duration::from_secs(20)).await;
    let hits = receiver.wait_for(Duration::from_secs(10), "status, pr_opened and finished", |h| h.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let hits_after = receiver.hits();
    assert_eq!(hits_after.len(), 4, "{hits_after:#?}");
    let mut seen: Vec<(String, String)> =
        hits.iter().map(|h| (h.event.clone(), h.json()["job"]["status"].as_str().unwrap().to_string())).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("job.finished".to_string(), "completed".to_string()),
            ("job.pr_opened".into(), "completed".into()),
            ("job.status".into(), "completed".into()),
            ("job.status".into(), "running".into()),
        ]
    );
    let pr = hits.iter().find(|h| h.event == "job.pr_opened").unwrap();
    verify(pr, secret);
    assert_eq!(pr.json()["job"]["pr_url"], "https://github.com/acme/shop/pull/7");
    // status_seq orders a job's deliveries.
    let running = hits.iter().find(|h| h.json()["job"]["status"] == "running").unwrap().json();
    assert!(running["job"]["status_seq"].as_u64().unwrap() < pr.json()["job"]["status_seq"].as_u64().unwrap());
}

#[tokio::test]
async fn private_and_plain_http_targets_are_refused_when_the_settings_are_off() {
    let edge = TestEdge::start(&[("ALLOW_PRIVATE_WEBHOOK_TARGETS", "false"), ("ALLOW_HTTP_WEBHOOK_TARGETS", "false")])
        .await
        .expect("starting wrangler dev");
    let token = edge.api().new_user("hooks-private").await;
    for url in [
        "https://127.0.0.1:9/hook",
        "https://localhost/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.7/hook",
        "https://192.168.1.20/hook",
        "https://[::1]/hook",
        "https://0x7f000001/hook",
        "https://hooks.internal/hook",
        "http://hooks.example.com/hook",
    ] {
        let (status, body) = edge.api().post("/webhook-subscriptions", &token, json!({"url": url, "events": ["job.created"]})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with("url:"), "{url}: {body}");
    }
    let sub = subscribe(&edge, &token, json!({"url": "https://hooks.example.com/kiln", "events": ["job.created"]})).await;
    let path = format!("/webhook-subscriptions/{}", sub["id"].as_str().unwrap());
    let (status, body) = edge.api().send(Method::PATCH, &path, Some(&token), Some(json!({"url": "https://127.0.0.1/x"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (_, got) = edge.api().get(&path, &token).await;
    assert_eq!(got["url"], "https://hooks.example.com/kiln", "a refused update changes nothing");
}

#[tokio::test]
async fn bad_input_is_400_and_secrets_are_shown_once() {
    let edge = shared().await;
    let token = edge.api().new_user("hooks-bad").await;
    let url = "http://127.0.0.1:9/hook";
    for (body, what) in [
        (json!({"events": ["job.created"]}), "no url"),
        (json!({"url": url}), "no events"),
        (json!({"url": url, "events": []}), "empty events"),
        (json!({"url": url, "events": ["job.deleted"]}), "unknown event"),
        (json!({"url": url, "events": "job.created"}), "events not a list"),
        (json!({"url": url, "events": ["job.created"], "job_types": ["cooking"]}), "unknown job type"),
        (json!({"url": url, "events": ["job.created"], "secret": "short"}), "short secret"),
        (json!({"url": url, "events": ["job.created"], "colour": "red"}), "unknown field"),
        (json!({"url": "ftp://127.0.0.1/x", "events": ["job.created"]}), "ftp"),
        (json!({"url": "not a url", "events": ["job.created"]}), "not a URL"),
        (json!({"url": "https://u:p@hooks.example.com/", "events": ["job.created"]}), "credentials"),
        (json!([1, 2]), "not an object"),
    ] {
        let (status, answer) = edge.api().post("/webhook-subscriptions", &token, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {answer}");
    }
    let (status, answer) = edge
        .api()
        .send_raw(Method::POST, "/webhook-subscriptions", Some(&format!("Bearer {token}")), Some("application/json"), b"{not json".to_vec())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    let sub = subscribe(edge, &token, json!({"url": url, "events": ["job.created"]})).await;
    let secret = sub["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_") && secret.len() > 40, "a generated secret: {secret}");
    let id = sub["id"].as_str().unwrap();
    let path = format!("/webhook-subscriptions/{id}");
    let (_, got) = edge.api().get(&path, &token).await;
    assert!(got.get("secret").is_none(), "the secret is shown only once: {got}");
    let (_, list) = edge.api().get("/webhook-subscriptions", &token).await;
    assert!(!list.to_string().contains(secret), "the list shows no secret");
    for (body, what) in [
        (json!({"events": []}), "empty events"),
        (json!({"events": ["nope"]}), "unknown event"),
        (json!({"enabled": "yes"}), "enabled not a bool"),
        (json!({"secret": "0123456789abcdef0123"}), "the secret is not updatable"),
        (json!({"url": "gopher://x"}), "bad url"),
    ] {
        let (status, answer) = edge.api().send(Method::PATCH, &path, Some(&token), Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
    }
    for q in ["status=lost", "limit=0", "limit=1000", "limit=x"] {
        let (status, answer) = edge.api().get(&format!("{path}/deliveries?{q}"), &token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {answer}");
    }
    let (status, _) = edge.api().get(&format!("{path}/deliveries?status=pending&limit=5"), &token).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = edge.api().get("/webhook-subscriptions", "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn other_owners_subscriptions_answer_404() {
    let edge = shared().await;
    let alice = edge.api().new_user("hooks-alice").await;
    let bob = edge.api().new_user("hooks-bob").await;
    let receiver = Receiver::start(Behaviour::Ok);
    let sub = subscribe(edge, &alice, json!({"url": receiver.url, "events": ["job.created"]})).await;
    let id = sub["id"].as_str().unwrap();
    let job = edge.api().create_job(&alice, code_job("hooks/alice")).await;
    receiver.wait_for(Duration::from_secs(10), "alice's delivery", |h| !h.is_empty()).await;
    let log = deliveries(edge, &alice, id).await;
    let delivery = log[0]["id"].as_str().unwrap();
    assert_eq!(log[0]["job_id"], job["id"]);

    let path = format!("/webhook-subscriptions/{id}");
    for (method, p, body) in [
        (Method::GET, path.clone(), None),
        (Method::PATCH, path.clone(), Some(json!({"enabled": false}))),
        (Method::DELETE, path.clone(), None),
        (Method::GET, format!("{path}/deliveries"), None),
        (Method::POST, format!("{path}/deliveries/{delivery}/redeliver"), Some(json!({}))),
    ] {
        let (status, answer) = edge.api().send(method.clone(), &p, Some(&bob), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "bob {method} {p}: {answer}");
    }
    let (_, list) = edge.api().get("/webhook-subscriptions", &bob).await;
    assert_eq!(list["subscriptions"], json!([]));
    // Unknown ids and a delivery of another subscription: 404 too.
    for p in [
        "/webhook-subscriptions/not-a-uuid".to_string(),
        format!("/webhook-subscriptions/{}", uuid::Uuid::new_v4()),
    ] {
        let (status, _) = edge.api().get(&p, &alice).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{p}");
    }
    let other = subscribe(edge, &alice, json!({"url": receiver.url, "events": ["job.finished"]})).await;
    let (status, _) = edge
        .api()
        .post(&format!("/webhook-subscriptions/{}/deliveries/{delivery}/redeliver", other["id"].as_str().unwrap()), &alice, json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a delivery is found only under its own subscription");
    // Alice's subscription is untouched.
    let (status, got) = edge.api().get(&path, &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["enabled"], true);
}

#[tokio::test]
async fn a_delivery_that_never_succeeds_is_failed_when_its_retry_window_ends() {
    // A 4 s window: attempts at about 0, 1 and 3 s, then no attempt fits and it is failed.
    let edge = TestEdge::start(&[("WEBHOOK_RETRY_WINDOW_SECS", "4")]).await.expect("starting wrangler dev");
    edge.api().grant("*", "acme/*").await;
    let token = edge.api().new_user("hooks-window").await;
    let receiver = Receiver::start(Behaviour::FailFirst(usize::MAX));
    let sub = subscribe(&edge, &token, json!({"url": receiver.url, "events": ["job.created"]})).await;
    let sub_id = sub["id"].as_str().unwrap();
    edge.api().create_job(&token, code_job("hooks/window")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let d = loop {
        let log = deliveries(&edge, &token, sub_id).await;
        if log.first().is_some_and(|d| d["status"] == "failed") {
            break log[0].clone();
        }
        assert!(Instant::now() < deadline, "not failed in time: {log:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let attempts = d["attempts"].as_array().unwrap();
    assert!((2..=4).contains(&attempts.len()), "{d:#}");
    assert!(attempts.iter().all(|a| a["response_code"] == 500 && a["error"] == "answered 500"), "{d:#}");
    assert!(d["next_attempt_at"].is_null() && d["delivered_at"].is_null());
    let hits = receiver.hits().len();
    assert_eq!(hits, attempts.len());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.hits().len(), hits, "no attempt after failed");
    let (status, list) = edge.api().get(&format!("/webhook-subscriptions/{sub_id}/deliveries?status=failed"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["deliveries"].as_array().unwrap().len(), 1);

    // A redeliver opens a new window: attempts continue, with the same id.
    let id = d["id"].as_str().unwrap();
    let (status, again) = edge.api().post(&format!("/webhook-subscriptions/{sub_id}/deliveries/{id}/redeliver"), &token, json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    let more = receiver.wait_for(Duration::from_secs(10), "the redelivery", |h| h.len() > hits).await;
    assert_eq!(more[hits].delivery, id);
    assert_eq!(more[hits].attempt, (hits + 1).to_string());
}

#[tokio::test]
async fn a_pending_delivery_whose_message_was_lost_is_swept_and_sent() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    edge.api().grant("*", "acme/*").await;
    let token = edge.api().new_user("hooks-sweep").await;
    let receiver = Receiver::start(Behaviour::Ok);
    let secret = "the-sweep-receivers-secret";
    let sub = subscribe(&edge, &token, json!({"url": receiver.url, "events": ["job.created"], "secret": secret})).await;
    let sub_id = sub["id"].as_str().unwrap();
    // A delivery stored without its queue message (as when the send failed), due long ago.
    let lost = uuid::Uuid::new_v4().to_string();
    let job_id = uuid::Uuid::new_v4().to_string();
    let payload = json!({"id": lost, "type": "job.created", "created_at": "2026-01-01T00:00:00.000Z", "job": {"id": job_id}}).to_string();
    edge.d1(&format!(
        "INSERT INTO webhook_deliveries (id, subscription_id, owner, event, job_id, payload, status, attempts, created_at, created_ms, window_start_ms, next_attempt_at) \
         SELECT '{lost}', id, owner, 'job.created', '{job_id}', '{payload}', 'pending', 0, '2026-01-01T00:00:00.000Z', 1767225600000, {now}, '2026-01-01T00:00:00.000Z' \
         FROM webhook_subscriptions WHERE id = '{sub_id}'",
        now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
    ))
    .expect("inserting a lost delivery");
    // Any delivery runs the consumer, which sweeps.
    edge.api().create_job(&token, code_job("hooks/sweep")).await;
    let hits = receiver.wait_for(Duration::from_secs(15), "the swept delivery", |h| h.iter().any(|h| h.delivery == lost)).await;
    let hit = hits.iter().find(|h| h.delivery == lost).unwrap();
    verify(hit, secret);
    assert_eq!(hit.body, payload.as_bytes(), "the stored payload, as stored");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = deliveries(&edge, &token, sub_id).await;
    let d = log.iter().find(|d| d["id"] == lost.as_str()).unwrap();
    assert_eq!(d["status"], "delivered", "{d:#}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
}
