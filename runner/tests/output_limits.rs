//! Bounded bytes on the runner: a job whose agent prints 60 MiB to an edge slower than that
//! completes and frees its slot, the runner's memory stays bounded, overlong lines are truncated
//! with a marker, output the event buffer has no room for is dropped and counted (with a marker
//! in the log), and every batch stays within its byte limit. Alone in its binary, so the process's
//! memory is this test's.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kiln_runner::config::Resources;
use kiln_runner::output::MAX_LINE_BYTES;
use kiln_runner::reporter::MAX_BATCH_BYTES;
use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{Outcome, RunnerEvent};
use kiln_schemas::status::JobType;

/// The process's resident memory in KiB (`VmRSS` of `/proc/self/status`).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_mib_of_output_completes_with_bounded_memory_truncation_and_drop_markers() {
    let edge = FakeEdge::start().await;
    // An edge that takes 100 ms per batch: about 2.5 MiB/s, far slower than the agent writes.
    edge.set_post_delay(Duration::from_millis(100));
    let runner = TestRunner::start(RunnerOptions {
        edge: Some(edge),
        resources: Resources {
            event_buffer_bytes: 2 * 1024 * 1024,
            ..Resources::default()
        },
        ..RunnerOptions::default()
    })
    .await;

    let baseline = rss_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let t = Instant::now();
    let a = assignment(JobType::Code, "flood");
    let id = a.job_id.clone();
    let events = runner.run(a, 180).await;
    runner.wait_released(&id).await;
    let took = t.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak_kib = peak.load(Ordering::SeqCst);
    let growth_mib = peak_kib.saturating_sub(baseline) / 1024;
    println!(
        "60 MiB job: {} ms to released; RSS baseline {} MiB, peak {} MiB (+{growth_mib} MiB); {} events stored in {} batches",
        took.as_millis(),
        baseline / 1024,
        peak_kib / 1024,
        events.len(),
        runner.edge.batches(&id).len()
    );

    assert_started_and_finished(&events);
    assert_eq!(
        finished(&events).0,
        Outcome::Completed,
        "{:?}",
        finished(&events)
    );
    assert_eq!(runner.supervisor.counts(), (0, 0), "the slot is free");
    assert!(
        growth_mib < 100,
        "the runner's memory grew by {growth_mib} MiB printing 60 MiB"
    );

    // The 30 MiB line: its first MAX_LINE_BYTES, then the marker.
    let lines = stdout_lines(&events);
    let long = lines
        .iter()
        .find(|l| l.starts_with("xxxx"))
        .expect("the long line is in the log");
    let cut = 30 * 1024 * 1024 - MAX_LINE_BYTES;
    assert_eq!(
        long.strip_prefix(&"x".repeat(MAX_LINE_BYTES)),
        Some(format!("… [truncated {cut} bytes]").as_str())
    );

    // Dropped output is counted, in the log and in the metrics, and the counts agree.
    let dropped: u64 = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log {
                stream: LogStream::System,
                content,
            } => content
                .strip_prefix("… [dropped ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok(),
            _ => None,
        })
        .sum();
    assert!(dropped > 0, "the job's log says output was dropped");
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", runner.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(&text, "kiln_runner_events_dropped_total"),
        dropped
    );
    assert_eq!(
        metric_value(&text, "kiln_runner_jobs_ended_total{outcome=\"completed\"}"),
        1
    );
    // Of the 30 MiB of short lines, those kept and those dropped add up.
    let short = lines
        .iter()
        .filter(|l| l.starts_with("agent: flood 0"))
        .count() as u64;
    let expected = (30 * 1024 * 1024u64).div_ceil(94);
    assert!(
        (expected - 2..=expected + 3).contains(&(short + dropped)),
        "{short} kept + {dropped} dropped of about {expected} lines"
    );

    // Every batch is within its byte limit (the envelope aside).
    for b in runner.edge.batches(&id) {
        let json = serde_json::to_string(&b).unwrap();
        assert!(
            json.len() <= MAX_BATCH_BYTES + 128,
            "a batch of {} events and {} bytes",
            b.events.len(),
            json.len()
        );
    }

    // The slot serves the next job at once.
    let events = runner.run(assignment(JobType::Code, "hello"), 30).await;
    assert_eq!(finished(&events).0, Outcome::Completed);
}
