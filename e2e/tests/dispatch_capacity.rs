//! Issue 11 item 2: every assignment fits a free slot of its runner, and a runner is never told to
//! cancel a job it finished. A hand-written runner of capacity N on a real queue (`wrangler dev`)
//! takes bursts of jobs from two owners and ends each after a short while as the real runner
//! does: its slot is free once `finished` is handed over, and the job stays in its heartbeats'
//! `running` until the edge has acknowledged that batch. Heartbeats go out every 15 ms, so some
//! are in flight while the edge releases the job they name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kiln_e2e::{Api, Method, TestEdge};
use kiln_schemas::runner::{EdgeMessage, HeldJob, RunnerMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CAPACITY: usize = 3;
const JOBS_PER_OWNER: usize = 24;

#[derive(Default)]
struct Runner {
    /// Jobs in a slot: assigned, `finished` not yet handed over.
    slots: BTreeMap<String, String>,
    /// Jobs whose `finished` batch is not acknowledged yet (still in heartbeats).
    delivering: BTreeMap<String, String>,
    finished: BTreeSet<String>,
    assigned: usize,
    max_held: usize,
    beyond: Vec<String>,
    /// Cancels for jobs this runner ended, or never held.
    needless_cancels: Vec<String>,
    /// Assignments for a job already held or ended here.
    duplicates: Vec<String>,
}

impl Runner {
    fn running(&self) -> Vec<HeldJob> {
        self.slots
            .iter()
            .chain(self.delivering.iter())
            .map(|(job_id, lease_id)| HeldJob { job_id: job_id.clone(), lease_id: lease_id.clone() })
            .collect()
    }
}

#[tokio::test]
async fn a_runner_is_never_assigned_beyond_its_capacity_nor_told_to_cancel_what_it_finished() {
    let edge = TestEdge::start(&[("MAX_CONCURRENT_JOBS", "8"), ("MAX_CONCURRENT_JOBS_PER_OWNER", "0")]).await.expect("wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;

    let reg = kiln_e2e::runner_registration_token();
    let (_, body) = api.send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": "by-hand"}))).await;
    let runner_token = body["token"].as_str().expect("a runner token").to_string();
    let mut request = format!("{}/runner/v1/connect", edge.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {runner_token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("runner socket");
    let (mut tx, mut rx) = ws.split();
    let hello = RunnerMessage::Hello { name: "by-hand".into(), capacity: CAPACITY as u32, running: vec![], version: "test".into(), tools: None };
    tx.send(Message::Text(serde_json::to_string(&hello).unwrap().into())).await.unwrap();
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    let state = Arc::new(Mutex::new(Runner::default()));

    // Heartbeats every 15 ms naming every job held or still being delivered.
    let beats = {
        let (tx, state) = (tx.clone(), state.clone());
        tokio::spawn(async move {
            loop {
                let running = state.lock().unwrap().running();
                let msg = serde_json::to_string(&RunnerMessage::Heartbeat { running }).unwrap();
                if tx.lock().await.send(Message::Text(msg.into())).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };

    // The runner: every assignment is checked against the slots, and its job ends 10–40 ms later.
    let work = {
        let (state, api, runner_token) = (state.clone(), api.clone(), runner_token.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(Ok(msg)) = rx.next().await {
                let Message::Text(text) = msg else { continue };
                match serde_json::from_str::<EdgeMessage>(&text).unwrap_or_else(|e| panic!("{e}: {text}")) {
                    EdgeMessage::Assign { assignment } => {
                        let (job_id, lease_id) = (assignment.job_id.clone(), assignment.lease_id.clone());
                        {
                            let mut s = state.lock().unwrap();
                            if s.slots.contains_key(&job_id) || s.delivering.contains_key(&job_id) || s.finished.contains(&job_id) {
                                // The real runner ignores an assignment for a job it holds.
                                s.duplicates.push(job_id);
                                continue;
                            }
                            s.assigned += 1;
                            if s.slots.len() >= CAPACITY {
                                let held: Vec<_> = s.slots.keys().cloned().collect();
                                s.beyond.push(format!("{job_id} while holding {held:?}"));
                            }
                            s.slots.insert(job_id.clone(), lease_id.clone());
                            s.max_held = s.max_held.max(s.slots.len());
                        }
                        n += 1;
                        let (state, api, runner_token) = (state.clone(), api.clone(), runner_token.clone());
                        tokio::spawn(async move {
                            // Held long enough that a burst fills every slot however slowly a loaded machine
                            // dispatches (the test checks that it did).
                            tokio::time::sleep(Duration::from_millis(150 + (n * 7) % 31)).await;
                            {
                                let mut s = state.lock().unwrap();
                                s.slots.remove(&job_id);
                                s.delivering.insert(job_id.clone(), lease_id.clone());
                            }
                            let batch = json!({"lease_id": lease_id, "events": [
                                {"index": 0, "type": "started", "message": "by hand"},
                                {"index": 1, "type": "finished", "outcome": "completed", "message": "done"},
                            ]});
                            let path = format!("/runner/v1/jobs/{job_id}/events");
                            // Retried on a 5xx, as the runner's reporter does.
                            let mut tries = 0;
                            let (status, ack) = loop {
                                let (status, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(batch.clone())).await;
                                tries += 1;
                                if !status.is_server_error() || tries == 5 {
                                    break (status, ack);
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            };
                            assert!(status.is_success() && ack["lease_valid"] == true, "{status} {ack}");
                            let mut s = state.lock().unwrap();
                            s.delivering.remove(&job_id);
                            s.finished.insert(job_id);
                        });
                    }
                    EdgeMessage::Cancel { job_id } => {
                        let mut s = state.lock().unwrap();
                        if !s.slots.contains_key(&job_id) {
                            s.needless_cancels.push(job_id);
                        }
                    }
                    _ => {}
                }
            }
        })
    };

    // Bursts of submits from two owners while jobs end.
    let owners = [api.new_user("cap-a").await, api.new_user("cap-b").await];
    let mut ids = vec![];
    for burst in 0..JOBS_PER_OWNER / 6 {
        let mut submits = vec![];
        for i in 0..6 {
            for token in &owners {
                let (api, token) = (api.clone(), token.clone());
                submits.push(tokio::spawn(async move { submit(&api, &token, &format!("b/{burst}-{i}")).await }));
            }
        }
        for s in submits {
            ids.push(s.await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    let total = ids.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while state.lock().unwrap().finished.len() < total {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {total} jobs finished", state.lock().unwrap().finished.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Heartbeats for a while after the last end: none of them may bring a cancel.
    tokio::time::sleep(Duration::from_millis(300)).await;
    beats.abort();
    work.abort();
    let s = state.lock().unwrap();
    println!("assigned {} jobs, {} finished, at most {} held at once", s.assigned, s.finished.len(), s.max_held);
    assert!(s.beyond.is_empty(), "{} of {} assignments beyond capacity {CAPACITY}: {:#?}", s.beyond.len(), s.assigned, s.beyond);
    assert!(s.duplicates.is_empty(), "assignments sent twice: {:?}", s.duplicates);
    assert!(s.needless_cancels.is_empty(), "cancels for jobs the runner had finished: {:?}", s.needless_cancels);
    assert_eq!(s.assigned, total, "each job assigned once");
    assert_eq!(s.max_held, CAPACITY, "the slots were all used");
}

async fn submit(api: &Api, token: &str, branch: &str) -> String {
    let body = json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "p", "branchName": branch});
    api.create_job(token, body).await["id"].as_str().expect("a job id").to_string()
}
