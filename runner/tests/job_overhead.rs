//! The runner's own time around a no-op agent: many `code` jobs of one repository, assigned at
//! once to a runner with 4 slots, agent `true`. From each job's `job timings` log line (info):
//! slot → worktree ready, slot → agent started, agent exit → `finished` handed to the reporter,
//! and the clean-up. Prints p50/p99 of each and the jobs per second; asserts that every job
//! completed without changes, was measured, and left no worktree or branch behind (the numbers
//! depend on the machine).
//!
//! `cargo test -p kiln-runner --test job_overhead -- --nocapture` (add `--release` for an
//! optimised build).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{assignment, finished, percentile, RunnerOptions, TestRunner, BUILD, ORG, REPO};
use kiln_schemas::runner::Outcome;
use kiln_schemas::status::JobType;

const JOBS: usize = 60;
const SLOTS: u32 = 4;

/// What the runner logs, kept for the test to read.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `key=value` fields of a log line, quotes trimmed.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim_matches('"').parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_op_jobs_time_in_the_runner() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .init();
    let runner = TestRunner::start(RunnerOptions {
        capacity: SLOTS,
        agent_command: Some("true".into()),
        ..Default::default()
    })
    .await;
    // The mirror exists (a runner's first job on a repository clones it).
    let first = assignment(JobType::Code, "warm up");
    let events = runner.run(first, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");

    let jobs: Vec<_> = (0..JOBS)
        .map(|i| assignment(JobType::Code, &format!("no-op {i}")))
        .collect();
    let ids: Vec<String> = jobs.iter().map(|a| a.job_id.clone()).collect();
    let t = Instant::now();
    for a in jobs {
        runner.edge.assign(a).await;
    }
    for id in &ids {
        let events = runner.edge.wait_finished(id, 120).await;
        let (outcome, message, ..) = finished(&events);
        assert_eq!(outcome, Outcome::Completed, "{events:#?}");
        assert!(message.contains("without changes"), "{message}");
    }
    let elapsed = t.elapsed();
    for id in &ids {
        runner.wait_released(id).await;
    }

    let log = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("job timings") && ids.iter().any(|id| l.contains(id.as_str())))
        .collect();
    assert_eq!(lines.len(), JOBS, "every job is measured:\n{log}");
    let column = |key: &str| {
        let mut v: Vec<u64> = lines
            .iter()
            .map(|l| field(l, key).unwrap_or_else(|| panic!("no {key} in {l}")))
            .collect();
        v.sort_unstable();
        v
    };
    println!(
        "{JOBS} no-op code jobs of one repository, {SLOTS} slots ({BUILD} build): {:.1} jobs/s",
        JOBS as f64 / elapsed.as_secs_f64()
    );
    println!("{:<34} {:>9} {:>9}", "ms", "p50", "p99");
    for (name, key) in [
        ("slot -> worktree ready", "to_worktree_us"),
        ("slot -> agent started", "to_agent_us"),
        ("agent exit -> finished handed", "after_agent_us"),
        ("clean-up", "cleanup_us"),
    ] {
        let v = column(key);
        println!(
            "{name:<34} {:>9.1} {:>9.1}",
            percentile(&v, 0.5) as f64 / 1000.0,
            percentile(&v, 0.99) as f64 / 1000.0
        );
    }

    // Nothing is left: no worktree directory, and (after a graceful stop drops what is still
    // pending) no job branch in the mirror.
    runner.stop().await;
    let left: Vec<_> = std::fs::read_dir(runner.worktrees_dir())
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n.to_string_lossy().starts_with('.')),
        "{left:?}"
    );
    let mirror = runner.repos_dir().join(ORG).join(format!("{REPO}.git"));
    let branches = common::git(
        &mirror,
        &["for-each-ref", "--format=%(refname)", "refs/heads/"],
    );
    assert_eq!(branches.trim(), "", "job branches left in the mirror");
    let worktrees = common::git(&mirror, &["worktree", "list", "--porcelain"]);
    assert_eq!(
        worktrees
            .lines()
            .filter(|l| l.starts_with("worktree "))
            .count(),
        1,
        "{worktrees}"
    );
}

#[test]
fn fields_are_read_from_a_log_line() {
    let line =
        "INFO kiln_runner::jobs::run: job timings job_id=\"a-b\" slot_wait_us=3 to_agent_us=1500";
    assert_eq!(field(line, "to_agent_us"), Some(1500));
    assert_eq!(field(line, "slot_wait_us"), Some(3));
    assert_eq!(field(line, "cleanup_us"), None);
    assert_eq!(percentile(&[1, 2, 3, 4, 5], 0.5), 3);
}
