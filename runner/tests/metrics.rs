//! `GET /metrics` of the whole runner (process executor) against the fake edge: job counts and
//! outcomes, event batches posted and retried, the edge session, and disk use as jobs come and go.

mod common;

use std::time::Duration;

use common::*;
use kiln_schemas::runner::{EdgeMessage, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;

async fn scrape(runner: &TestRunner) -> String {
    let res = reqwest::get(format!("http://127.0.0.1:{}/metrics", runner.port))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    res.text().await.unwrap()
}

/// The value of one series (`name` or `name{labels}`); panics when it is missing.
fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn ended(text: &str, outcome: &str) -> u64 {
    value(
        text,
        &format!("kiln_runner_jobs_ended_total{{outcome=\"{outcome}\"}}"),
    )
}

#[tokio::test]
async fn metrics_report_jobs_events_the_edge_and_disk_use() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let m = scrape(&runner).await;
    assert!(
        m.contains("kiln_runner_info{name=\"test-runner\",version=\"")
            && m.contains("executor=\"process\"} 1"),
        "{m}"
    );
    for (series, want) in [
        ("kiln_runner_capacity", 2),
        ("kiln_runner_jobs_running", 0),
        ("kiln_runner_jobs_waiting", 0),
        ("kiln_runner_jobs_assigned_total", 0),
        ("kiln_runner_jobs_started_total", 0),
        ("kiln_runner_events_posted_total", 0),
        ("kiln_runner_event_batches_retried_total", 0),
        ("kiln_runner_edge_connected", 1),
        ("kiln_runner_edge_reconnects_total", 0),
        ("kiln_runner_worktrees", 0),
        ("kiln_runner_worktrees_bytes", 0),
        ("kiln_runner_mirrors", 0),
    ] {
        assert_eq!(value(&m, series), want, "{series}");
    }

    // One job completes and one fails, while two posts fail and are retried.
    runner.edge.fail_next_posts(2);
    let mut jobs = Vec::new();
    for (prompt, outcome) in [
        ("write metrics", Outcome::Completed),
        ("fail", Outcome::Failed),
    ] {
        let a = assignment(JobType::Code, prompt);
        let job = a.job_id.clone();
        let events = runner.run(a, 60).await;
        assert_eq!(finished(&events).0, outcome, "{events:#?}");
        runner.wait_released(&job).await;
        jobs.push(job);
    }
    let m = scrape(&runner).await;
    assert_eq!(value(&m, "kiln_runner_jobs_assigned_total"), 2);
    assert_eq!(value(&m, "kiln_runner_jobs_started_total"), 2);
    assert_eq!(ended(&m, "completed"), 1);
    assert_eq!(ended(&m, "failed"), 1);
    assert_eq!(ended(&m, "cancelled"), 0);
    assert_eq!(value(&m, "kiln_runner_jobs_running"), 0);
    assert_eq!(runner.edge.failed_posts(), 2);
    assert_eq!(value(&m, "kiln_runner_event_batches_retried_total"), 2);
    let stored: usize = jobs.iter().map(|j| runner.edge.events(j).len()).sum();
    assert_eq!(
        value(&m, "kiln_runner_events_posted_total"),
        stored as u64,
        "every stored event was posted and acknowledged once"
    );
    let batches: usize = jobs.iter().map(|j| runner.edge.batches(j).len()).sum();
    assert_eq!(
        value(&m, "kiln_runner_event_batches_posted_total"),
        batches as u64 - 2,
        "the failed posts are not counted as posted"
    );
    assert_eq!(value(&m, "kiln_runner_worktrees"), 0);
    assert_eq!(value(&m, "kiln_runner_worktrees_bytes"), 0);
    assert_eq!(value(&m, "kiln_runner_mirrors"), 1);
    assert!(value(&m, "kiln_runner_mirrors_bytes") > 0);

    // A running job's worktree is on disk and its size follows what is written there.
    let a = assignment(JobType::Code, "hang");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &job,
            "agent output",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;
    let m = scrape(&runner).await;
    assert_eq!(value(&m, "kiln_runner_jobs_running"), 1);
    assert_eq!(value(&m, "kiln_runner_worktrees"), 1);
    let before = value(&m, "kiln_runner_worktrees_bytes");
    assert!(before > 0, "README.md and .git are in the worktree");
    std::fs::write(
        runner.worktrees_dir().join(&job).join("big.bin"),
        vec![7u8; 100_000],
    )
    .unwrap();
    let m = scrape(&runner).await;
    assert_eq!(value(&m, "kiln_runner_worktrees_bytes"), before + 100_000);

    runner
        .edge
        .send(EdgeMessage::Cancel {
            job_id: job.clone(),
        })
        .await;
    runner.wait_released(&job).await;
    let m = scrape(&runner).await;
    assert_eq!(ended(&m, "cancelled"), 1);
    assert_eq!(value(&m, "kiln_runner_jobs_started_total"), 3);
    assert_eq!(value(&m, "kiln_runner_jobs_running"), 0);
    assert_eq!(value(&m, "kiln_runner_worktrees"), 0);
    assert_eq!(value(&m, "kiln_runner_worktrees_bytes"), 0);
    assert_eq!(
        value(&m, "kiln_runner_jobs_assigned_total"),
        value(&m, "kiln_runner_jobs_waiting")
            + value(&m, "kiln_runner_jobs_running")
            + ended(&m, "completed")
            + ended(&m, "failed")
            + ended(&m, "cancelled")
    );
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));

    // A reconnect.
    runner.edge.disconnect();
    runner.edge.wait_hellos(2).await;
    let port = runner.port;
    let mut m = String::new();
    for _ in 0..100 {
        m = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if value(&m, "kiln_runner_edge_connected") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(value(&m, "kiln_runner_edge_connected"), 1);
    assert_eq!(value(&m, "kiln_runner_edge_reconnects_total"), 1);
    runner.stop().await;
}
