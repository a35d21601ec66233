//! Chaos (issue 6, "Proof"): a few hundred jobs across three runners while runners are killed and
//! restarted, the edge is restarted, and the runners' connections are cut (or left half-open) at
//! random. At the end
//! every job is terminal, none ran twice to completion, and every job's event log has a dense
//! `seq` with no duplicate. Prints the counts.
//!
//! The edge is the Worker built with the test-only `faults` feature, some of whose room calls fail.
//! The runners reach the edge through a [`CutProxy`]; the agent sleeps a random 0–300 ms and writes
//! one file, which the runner commits and pushes; a `post-receive` hook on the remote records every
//! push, so a branch pushed by two runs shows up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln_e2e::{Api, CutProxy, GitRemotes, Method, TestEdge, TestRunner, WsAuth, WsClient};
use serde_json::{json, Value};

const JOBS: usize = 200;
const RUNNERS: usize = 3;
const SLOTS_PER_RUNNER: &str = "2";
/// The chaos stops after this long even if jobs remain; then they get `SETTLE` to end.
const CHAOS: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(120);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default, Debug)]
struct Counts {
    kills: u32,
    runner_restarts: u32,
    edge_restarts: u32,
    cuts: u32,
    stalls: u32,
}

async fn start_runner(edge: &TestEdge, env: Vec<(String, String)>) -> TestRunner {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestRunner::start(edge, &pairs).await.expect("starting a runner")
}

/// Submits up to `n` more jobs, a few at a time; job `i` pushes branch `chaos/<i>`.
async fn submit(api: &Api, token: &str, ids: &mut Vec<String>, n: usize) {
    let from = ids.len();
    let to = (from + n).min(JOBS);
    for chunk in (from..to).collect::<Vec<_>>().chunks(4) {
        let created = futures::future::join_all(chunk.iter().map(|i| {
            let body = json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "chaos", "branchName": format!("chaos/{i}")});
            api.create_job(token, body)
        }))
        .await;
        ids.extend(created.iter().map(|c| c["id"].as_str().unwrap().to_string()));
    }
}

async fn terminal(api: &Api, token: &str) -> u64 {
    let (_, list) = api.get("/jobs?status=completed,failed,cancelled&limit=1", token).await;
    list["total"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn jobs_survive_killed_runners_edge_restarts_and_cut_sockets() {
    let started = Instant::now();
    let seed = std::env::var("KILN_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("chaos seed {seed} (KILN_CHAOS_SEED to replay the same choices)");
    let mut rng = Rng(seed);

    // The Worker with the test-only faults: besides the chaos, the queue's first room calls fail
    // and it loses its memory twice between persisting leases and telling the rooms.
    let mut edge = TestEdge::start_with_faults(&[
        ("KILN_FAULTS", "queue_room_calls=25,queue_restart_after_lease=2"),
        ("MAX_CONCURRENT_JOBS", "6"),
        ("LEASE_SECS", "30"),
        ("HEARTBEAT_SECS", "2"),
        ("MAX_ATTEMPTS", "5"),
        ("RECONCILE_SECS", "10"),
    ])
    .await
    .expect("starting wrangler dev on the faults build");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let token = api.new_user("chaos").await;

    // The remote, with a hook that records every push.
    let remotes = GitRemotes::new();
    let bare = remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let ledger_dir = tempfile::Builder::new().prefix("kiln-chaos-").tempdir().unwrap();
    let ledger = ledger_dir.path().join("pushes");
    std::fs::write(&ledger, "").unwrap();
    let hook = bare.join("hooks/post-receive");
    std::fs::write(&hook, format!("#!/bin/sh\nwhile read old new ref; do echo \"$ref\" >> '{}'; done\n", ledger.display())).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(ledger_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&ledger, std::fs::Permissions::from_mode(0o666)).unwrap();
    }

    let proxy = CutProxy::start(edge.port()).await.expect("starting the proxy");
    let proxy_url = proxy.url();
    let base = remotes.base_url();
    let states = tempfile::Builder::new().prefix("kiln-chaos-states-").tempdir().unwrap();
    let agent = "sleep $(awk -v s=$$ 'BEGIN { srand(s); printf \"%.3f\", rand() * 0.3 }'); echo \"$JOB_ID\" > chaos.txt; echo done";
    let runner_env = |i: usize| {
        let state = states.path().join(format!("runner-{i}")).display().to_string();
        vec![
            ("RUNNER_STATE_DIR".to_string(), state),
            ("RUNNER_NAME".to_string(), format!("chaos-{i}")),
            ("RUNNER_EDGE_URL".to_string(), proxy_url.clone()),
            ("RUNNER_EXECUTOR".to_string(), "process".to_string()),
            ("RUNNER_AGENT".to_string(), "text".to_string()),
            ("RUNNER_AGENT_CMD".to_string(), agent.to_string()),
            ("RUNNER_GIT_BASE_URL".to_string(), base.clone()),
            ("MAX_CONCURRENT_JOBS".to_string(), SLOTS_PER_RUNNER.to_string()),
        ]
    };
    let mut runners: Vec<Option<TestRunner>> = vec![];
    for i in 0..RUNNERS {
        runners.push(Some(start_runner(&edge, runner_env(i)).await));
    }

    // Jobs go in by chunks while the chaos goes on; the chaos lasts until every job ended or
    // its time is up.
    let mut ids: Vec<String> = vec![];
    let mut counts = Counts::default();
    let chaos_until = Instant::now() + CHAOS;
    let mut down: Vec<(usize, Instant)> = vec![];
    while Instant::now() < chaos_until {
        if ids.len() < JOBS {
            submit(&api, &token, &mut ids, 20).await;
            if ids.len() == JOBS {
                eprintln!("{JOBS} jobs submitted in {:?}", started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
        // Killed runners come back after a moment, as a supervisor would bring them.
        let now = Instant::now();
        for (i, _) in down.iter().filter(|(_, at)| *at <= now) {
            runners[*i] = Some(start_runner(&edge, runner_env(*i)).await);
            counts.runner_restarts += 1;
        }
        down.retain(|(_, at)| *at > now);
        if ids.len() == JOBS && terminal(&api, &token).await == JOBS as u64 {
            break;
        }
        // Once for sure: half-open connections, midway.
        let pick = if counts.stalls == 0 && ids.len() >= JOBS / 2 { 4 } else { rng.below(10) };
        match pick {
            0..=3 => {
                proxy.cut();
                counts.cuts += 1;
            }
            4 if counts.stalls < 2 => {
                proxy.stall();
                counts.stalls += 1;
            }
            5..=7 => {
                let i = rng.below(RUNNERS as u64) as usize;
                if let Some(mut r) = runners[i].take() {
                    r.kill();
                    counts.kills += 1;
                    down.push((i, Instant::now() + Duration::from_millis(500 + rng.below(2500))));
                }
            }
            _ if counts.edge_restarts < 2 => {
                edge.restart().await.expect("restarting wrangler dev");
                counts.edge_restarts += 1;
            }
            _ => {
                proxy.cut();
                counts.cuts += 1;
            }
        }
    }
    for (i, _) in down.drain(..) {
        runners[i] = Some(start_runner(&edge, runner_env(i)).await);
        counts.runner_restarts += 1;
    }
    while ids.len() < JOBS {
        submit(&api, &token, &mut ids, 20).await;
    }
    let chaos_took = started.elapsed();

    // Every job ends.
    let settle_until = Instant::now() + SETTLE;
    loop {
        let ended = terminal(&api, &token).await;
        if ended == JOBS as u64 {
            break;
        }
        if Instant::now() >= settle_until {
            let mut stuck = vec![];
            for id in &ids {
                let job = api.job(&token, id).await;
                if !matches!(job["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                    stuck.push(format!("{id}: {}", job["status"]));
                }
            }
            let (_, health) = api.send(Method::GET, "/health", None, None).await;
            panic!(
                "{} of {JOBS} jobs never ended (lost): {stuck:?}\n/health: {health}\nedge log tail:\n{}",
                JOBS as u64 - ended,
                edge.log().chars().rev().take(6000).collect::<Vec<_>>().into_iter().rev().collect::<String>()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Each job's log: dense seqs, one end; each branch pushed by one run.
    let pushes = std::fs::read_to_string(&ledger).unwrap();
    let mut pushed: BTreeMap<String, u32> = BTreeMap::new();
    for line in pushes.lines() {
        *pushed.entry(line.trim().trim_start_matches("refs/heads/").to_string()).or_default() += 1;
    }
    let (mut completed, mut failed, mut requeues, mut double_run, mut double_push) = (0, 0, 0, 0, 0);
    for (i, id) in ids.iter().enumerate() {
        let mut ws = WsClient::connect(&edge.ws_url(), id, WsAuth::Header(&token), None).await.expect("job socket");
        let events: Vec<Value> = ws.drain(Duration::from_millis(300)).await;
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().expect("a seq")).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "job {id}: seqs not dense or duplicated: {events:#?}");
        let ends: Vec<&Value> = events
            .iter()
            .filter(|e| e["kind"] == "jobStatus" && matches!(e["status"].as_str(), Some("completed" | "failed" | "cancelled")))
            .collect();
        if ends.len() != 1 {
            double_run += 1;
            eprintln!("job {id} ended {} times: {ends:#?}", ends.len());
        }
        match ends.first().and_then(|e| e["status"].as_str()) {
            Some("completed") => completed += 1,
            _ => {
                failed += 1;
                eprintln!("job {id} failed: {}", ends.first().map_or(json!(null), |e| e["message"].clone()));
            }
        }
        let job_requeues =
            events.iter().filter(|e| e["kind"] == "jobStatus" && e["message"].as_str().is_some_and(|m| m.contains("requeued"))).count();
        requeues += job_requeues;
        let branch_pushes = pushed.get(&format!("chaos/{i}")).copied().unwrap_or(0);
        if branch_pushes > 1 {
            double_push += 1;
            eprintln!("job {id}: branch chaos/{i} pushed {branch_pushes} times ({job_requeues} requeues)");
            // Only a run whose runner was lost before its end reached the edge may push again.
            assert!(job_requeues > 0, "job {id} pushed twice without losing a runner");
        }
    }
    let lost = 0;
    let faults = edge.log().matches("injected fault").count();
    eprintln!(
        "chaos: jobs {JOBS} (completed {completed}, failed {failed}), runner kills {}, runner restarts {}, edge restarts {}, \
         socket cuts {}, half-open stalls {} ({} proxied connections), requeues {requeues}, lost {lost}, double-run {double_run}, \
         pushed twice after a lost runner {double_push}, injected faults since the last edge restart {faults}; chaos phase {chaos_took:?}, total {:?}",
        counts.kills,
        counts.runner_restarts,
        counts.edge_restarts,
        counts.cuts,
        counts.stalls,
        proxy.connections(),
        started.elapsed()
    );
    assert_eq!(double_run, 0, "no job ran twice to completion");
    assert!(completed >= JOBS * 9 / 10, "most jobs complete: {completed} of {JOBS}");
    assert!(counts.kills + counts.cuts + counts.stalls + counts.edge_restarts > 0, "there was chaos");
}
