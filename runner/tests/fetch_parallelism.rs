//! `RUNNER_FETCH_PARALLELISM`: mirrors are fetched a few at a time, however many are asked for
//! at once. The remotes' upload-pack is wrapped (through git's configuration in this process's
//! environment, hence a binary of its own) to log when each fetch starts and ends and to take
//! 400 ms.

mod common;

use std::sync::Arc;

use common::{Remotes, ORG};
use kiln_runner::edge::connection::answer_request;
use kiln_runner::workspace::Workspaces;
use kiln_schemas::runner::{RepoSpec, RunnerRequest};

/// The most fetches that overlapped, from `start <t>` / `end <t>` lines.
fn max_overlap(log: &str) -> usize {
    let mut points: Vec<(f64, i32)> = log
        .lines()
        .filter_map(|l| {
            let (kind, t) = l.split_once(' ')?;
            let t: f64 = t.trim().parse().ok()?;
            Some((t, if kind == "start" { 1 } else { -1 }))
        })
        .collect();
    // Ends before starts at the same instant.
    points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in points {
        now += d;
        max = max.max(now);
    }
    max as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_fetched_with_bounded_parallelism() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("fetches.log");
    let wrapper = scratch.path().join("slow-upload-pack");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"start $(date +%s.%N)\" >> {log}\nsleep 0.4\ngit upload-pack \"$@\"\nst=$?\necho \"end $(date +%s.%N)\" >> {log}\nexit $st\n",
            log = log.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::env::set_var("GIT_CONFIG_COUNT", "1");
    std::env::set_var("GIT_CONFIG_KEY_0", "remote.origin.uploadpack");
    std::env::set_var("GIT_CONFIG_VALUE_0", &wrapper);

    let remotes = Remotes::new();
    let names: Vec<String> = (0..6).map(|i| format!("repo{i}")).collect();
    for n in &names {
        remotes.create(ORG, n);
    }
    let dirs = tempfile::tempdir().unwrap();
    let ws = Arc::new(
        Workspaces::new(
            dirs.path().join("repos"),
            dirs.path().join("worktrees"),
            &remotes.base_url(),
            None,
        )
        .with_fetch_parallelism(2),
    );
    let request = RunnerRequest::Sync {
        repos: names
            .iter()
            .map(|n| RepoSpec {
                github_org: ORG.into(),
                github_repo: n.clone(),
            })
            .collect(),
    };
    let t = std::time::Instant::now();
    let results = answer_request(&ws, &request).await;
    assert!(results.iter().all(|r| r.success), "{results:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    // A sync asks the remote twice: the fetch, then its HEAD.
    assert_eq!(
        text.lines().filter(|l| l.starts_with("start")).count(),
        12,
        "{text}"
    );
    let overlap = max_overlap(&text);
    println!(
        "6 syncs (12 upload-packs of 400 ms) with RUNNER_FETCH_PARALLELISM=2: {} ms, at most {overlap} at once",
        t.elapsed().as_millis()
    );
    assert!(overlap <= 2, "{overlap} fetches ran at once:\n{text}");
    assert_eq!(overlap, 2, "two at a time, not one:\n{text}");
}
