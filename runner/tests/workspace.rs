//! Mirrors and worktrees against real git, with bare repositories in temporary directories as
//! the remotes.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{git, Remotes, ORG, REPO};
use kiln_runner::edge::connection::answer_request;
use kiln_runner::workspace::{GitError, RepoRef, Workspaces};
use kiln_schemas::runner::{RepoSpec, RunnerRequest};
use tempfile::TempDir;

struct Fixture {
    remotes: Remotes,
    dirs: TempDir,
    ws: Arc<Workspaces>,
    repo: RepoRef,
}

fn fixture() -> Fixture {
    let remotes = Remotes::new();
    remotes.create(ORG, REPO);
    let dirs = tempfile::tempdir().unwrap();
    let ws = Arc::new(Workspaces::new(
        dirs.path().join("repos"),
        dirs.path().join("worktrees"),
        &remotes.base_url(),
        Some("unused-for-file-urls"),
    ));
    Fixture {
        remotes,
        dirs,
        ws,
        repo: RepoRef::new(ORG, REPO).unwrap(),
    }
}

#[tokio::test]
async fn a_worktree_starts_from_the_default_branch_and_its_commit_is_pushed() {
    let f = fixture();
    let wt =
        f.ws.create_worktree(&f.repo, "job-1", "kiln/feature-x", None)
            .await
            .unwrap();
    assert_eq!(wt.base_branch, "main");
    assert_eq!(wt.path, f.dirs.path().join("worktrees/job-1"));
    assert!(wt.path.join("README.md").is_file());
    assert!(!wt.path.join("DEVELOP.md").exists());
    assert_eq!(
        f.ws.mirror_path(&f.repo),
        f.dirs.path().join("repos/acme/site.git")
    );

    std::fs::write(wt.path.join("feature.txt"), "new feature\n").unwrap();
    std::fs::create_dir_all(wt.path.join("src")).unwrap();
    std::fs::write(wt.path.join("src/lib.rs"), "// code\n").unwrap();
    let sha =
        f.ws.commit_all(&wt, "Add the feature\n\nKiln job job-1")
            .await
            .unwrap()
            .expect("a commit");
    f.ws.push(&wt).await.unwrap();

    assert!(f
        .remotes
        .branches(ORG, REPO)
        .contains(&"kiln/feature-x".to_string()));
    assert_eq!(
        f.remotes
            .show(ORG, REPO, "kiln/feature-x:feature.txt")
            .as_deref(),
        Some("new feature\n")
    );
    let remote = f.remotes.path(ORG, REPO);
    assert_eq!(git(&remote, &["rev-parse", "kiln/feature-x"]).trim(), sha);
    assert_eq!(
        git(
            &remote,
            &[
                "log",
                "-1",
                "--format=%an <%ae>|%cn <%ce>|%s",
                "kiln/feature-x"
            ]
        )
        .trim(),
        "Kiln <kiln@localhost>|Kiln <kiln@localhost>|Add the feature"
    );
    assert_eq!(
        git(&remote, &["rev-parse", "kiln/feature-x~1"]),
        git(&remote, &["rev-parse", "main"]),
        "one commit on top of main"
    );

    f.ws.remove_worktree(&wt).await;
    assert!(!wt.path.exists(), "the directory goes at once");
    let mirror = f.ws.mirror_path(&f.repo);
    assert!(
        git(&mirror, &["branch", "--list", "kiln/feature-x"]).contains("kiln/feature-x"),
        "the entry and branch wait for a batch or the runner's tidy-up"
    );
    f.ws.tidy().await;
    assert_eq!(
        git(&mirror, &["branch", "--list", "kiln/feature-x"]).trim(),
        "",
        "the local branch is gone"
    );
    assert_eq!(
        git(&mirror, &["worktree", "list", "--porcelain"])
            .matches("worktree ")
            .count(),
        1,
        "only the mirror itself"
    );
}

#[tokio::test]
async fn a_named_base_branch_is_used_and_a_missing_one_is_refused() {
    let f = fixture();
    let wt =
        f.ws.create_worktree(&f.repo, "job-2", "kiln/on-develop", Some("develop"))
            .await
            .unwrap();
    assert_eq!(wt.base_branch, "develop");
    assert!(wt.path.join("DEVELOP.md").is_file());

    let err =
        f.ws.create_worktree(&f.repo, "job-3", "kiln/x", Some("nope"))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("\"nope\" does not exist"), "{err}");
}

#[tokio::test]
async fn a_nested_repository_without_commits_does_not_cost_the_rest_of_the_work() {
    let f = fixture();
    let wt =
        f.ws.create_worktree(&f.repo, "job-8", "kiln/nested", None)
            .await
            .unwrap();
    git(&wt.path, &["init", "--quiet", "scaffold"]);
    std::fs::write(wt.path.join("kept.txt"), "kept\n").unwrap();
    f.ws.commit_all(&wt, "work")
        .await
        .unwrap()
        .expect("a commit");
    f.ws.push(&wt).await.unwrap();
    assert_eq!(
        f.remotes.files(ORG, REPO, "kiln/nested"),
        vec!["README.md", "kept.txt"]
    );
}

#[tokio::test]
async fn nothing_to_commit_gives_no_commit() {
    let f = fixture();
    let wt =
        f.ws.create_worktree(&f.repo, "job-4", "kiln/empty", None)
            .await
            .unwrap();
    assert_eq!(f.ws.commit_all(&wt, "nothing").await.unwrap(), None);
}

#[tokio::test]
async fn user_strings_never_reach_git_as_options() {
    let f = fixture();
    for (job, branch, base) in [
        ("job-5", "--upload-pack=touch /tmp/pwned", None),
        ("job-5", "-b", None),
        ("../escape", "kiln/ok", None),
        ("job-5", "kiln/ok", Some("--orphan")),
    ] {
        let err =
            f.ws.create_worktree(&f.repo, job, branch, base)
                .await
                .unwrap_err();
        assert!(
            matches!(err, GitError::Invalid(_)),
            "{job} {branch} {base:?}: {err}"
        );
    }
    assert!(RepoRef::new("--config", "x").is_err());
    assert!(!f.dirs.path().join("escape").exists());
}

#[tokio::test]
async fn concurrent_jobs_on_one_repository_all_succeed() {
    let f = fixture();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let ws = f.ws.clone();
        let repo = f.repo.clone();
        tasks.push(tokio::spawn(async move {
            let wt = ws
                .create_worktree(&repo, &format!("job-c{i}"), &format!("kiln/c{i}"), None)
                .await?;
            std::fs::write(wt.path.join(format!("c{i}.txt")), "x").unwrap();
            ws.commit_all(&wt, &format!("c{i}")).await?;
            ws.push(&wt).await?;
            ws.remove_worktree(&wt).await;
            Ok::<_, GitError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let branches = f.remotes.branches(ORG, REPO);
    for i in 0..6 {
        assert!(branches.contains(&format!("kiln/c{i}")), "{branches:?}");
    }
}

/// Someone else commits `file` to the remote's main.
fn push_to_main(f: &Fixture, file: &str) {
    let other = tempfile::tempdir().unwrap();
    let remote = f.remotes.path(ORG, REPO);
    git(
        other.path(),
        &["clone", "--quiet", remote.to_str().unwrap(), "c"],
    );
    let c = other.path().join("c");
    std::fs::write(c.join(file), "pushed\n").unwrap();
    git(&c, &["add", file]);
    git(&c, &["commit", "--quiet", "-m", file]);
    git(&c, &["push", "--quiet", "origin", "main"]);
}

#[tokio::test]
async fn new_remote_commits_are_fetched_for_the_next_job() {
    let f = fixture();
    f.ws.sync(&f.repo).await.unwrap();
    // Someone pushes to main after the mirror was made.
    push_to_main(&f, "LATER.md");

    let wt =
        f.ws.create_worktree(&f.repo, "job-6", "kiln/later", None)
            .await
            .unwrap();
    assert!(wt.path.join("LATER.md").is_file());
}

/// A job that waited in the queue is served by a fetch that started after its submission; one
/// submitted after the last fetch started fetches, and sees what was pushed before it.
#[tokio::test]
async fn a_fetch_since_a_jobs_submission_serves_it() {
    let f = fixture();
    let waited = std::time::Instant::now();
    let first =
        f.ws.create_worktree(&f.repo, "job-q0", "kiln/q0", None)
            .await
            .unwrap();
    let fetched = f.ws.fetches_run();
    let queued =
        f.ws.create_worktree_since(&f.repo, "job-q1", "kiln/q1", None, waited)
            .await
            .unwrap();
    assert_eq!(
        f.ws.fetches_run(),
        fetched,
        "the fetch that started after its submission serves it"
    );

    push_to_main(&f, "PUSHED.md");
    let submitted = std::time::Instant::now();
    let fresh =
        f.ws.create_worktree_since(&f.repo, "job-q2", "kiln/q2", None, submitted)
            .await
            .unwrap();
    assert_eq!(
        f.ws.fetches_run(),
        fetched + 1,
        "submitted after the last fetch started"
    );
    assert!(fresh.path.join("PUSHED.md").is_file());
    for wt in [first, queued, fresh] {
        f.ws.remove_worktree(&wt).await;
    }
}

/// An agent can rewrite the worktree's `.git` file, or leave a nested repository behind; the
/// runner's git must keep using the real git directory and never run configuration (here an
/// fsmonitor command) of the agent's making.
#[tokio::test]
async fn a_rewritten_dot_git_file_cannot_redirect_the_runners_git() {
    let f = fixture();
    let wt =
        f.ws.create_worktree(&f.repo, "job-7", "kiln/safe", None)
            .await
            .unwrap();
    let evil = wt.path.join("evil");
    git(&wt.path, &["init", "--quiet", evil.to_str().unwrap()]);
    git(&evil, &["commit", "--quiet", "--allow-empty", "-m", "bait"]);
    let marker = f.dirs.path().join("pwned");
    git(
        &evil,
        &[
            "config",
            "core.fsmonitor",
            &format!("touch {}; false", marker.display()),
        ],
    );
    git(
        &evil,
        &["config", "core.worktree", wt.path.to_str().unwrap()],
    );
    std::fs::write(
        wt.path.join(".git"),
        format!("gitdir: {}\n", evil.join(".git").display()),
    )
    .unwrap();
    // The trap is armed: plain git in the worktree would run the command.
    let plain = std::process::Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(&wt.path)
        .output()
        .unwrap();
    assert!(plain.status.success());
    assert!(marker.exists(), "the test's trap does not work");
    std::fs::remove_file(&marker).unwrap();
    std::fs::write(wt.path.join("work.txt"), "work\n").unwrap();

    f.ws.commit_all(&wt, "work")
        .await
        .unwrap()
        .expect("a commit");
    f.ws.push(&wt).await.unwrap();
    assert!(!marker.exists(), "git ran the agent's fsmonitor command");
    assert_eq!(
        f.remotes.show(ORG, REPO, "kiln/safe:work.txt").as_deref(),
        Some("work\n")
    );
}

#[tokio::test]
async fn sync_and_clone_requests_answer_per_repository() {
    let f = fixture();
    let spec = |o: &str, r: &str| RepoSpec {
        github_org: o.into(),
        github_repo: r.into(),
    };
    let request = RunnerRequest::Clone {
        repos: vec![spec(ORG, REPO), spec(ORG, "missing"), spec("-x", "y")],
    };
    let results = answer_request(&f.ws, &request).await;
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].repo, "acme/site");
    assert!(results[0].success, "{:?}", results[0]);
    let path = results[0]
        .path
        .clone()
        .expect("clone answers with the mirror path");
    assert!(Path::new(&path).join("HEAD").is_file());
    assert_eq!(
        git(Path::new(&path), &["rev-parse", "refs/remotes/origin/main"]),
        git(&f.remotes.path(ORG, REPO), &["rev-parse", "main"])
    );
    assert!(!results[1].success);
    assert!(
        results[1].error.as_deref().unwrap().contains("git"),
        "{:?}",
        results[1]
    );
    assert!(!results[2].success);
    assert!(
        results[2].error.as_deref().unwrap().contains("owner"),
        "{:?}",
        results[2]
    );

    let sync = answer_request(
        &f.ws,
        &RunnerRequest::Sync {
            repos: vec![spec(ORG, REPO)],
        },
    )
    .await;
    assert!(sync[0].success && sync[0].path.is_none(), "{:?}", sync[0]);
}

fn mirror_branches(ws: &Workspaces, repo: &RepoRef) -> Vec<String> {
    let mut b: Vec<String> = git(
        &ws.mirror_path(repo),
        &["for-each-ref", "--format=%(refname:short)", "refs/heads/"],
    )
    .lines()
    .map(str::to_string)
    .collect();
    b.sort();
    b
}

/// Makes the mirror look unused for `days` days.
fn age_mirror(ws: &Workspaces, repo: &RepoRef, days: u32) {
    let marker = ws
        .mirror_path(repo)
        .join(kiln_runner::workspace::LAST_USED_FILE);
    assert!(marker.is_file(), "a used mirror has its marker");
    let status = std::process::Command::new("touch")
        .arg("-d")
        .arg(format!("{days} days ago"))
        .arg(&marker)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_sweep_removes_the_worktrees_and_branches_no_job_holds() {
    let f = fixture();
    let a =
        f.ws.create_worktree(&f.repo, "job-a", "kiln/a", None)
            .await
            .unwrap();
    let b =
        f.ws.create_worktree(&f.repo, "job-b", "kiln/b", None)
            .await
            .unwrap();
    // A crash in the middle of a removal: the directory is gone, git still lists the worktree.
    let c =
        f.ws.create_worktree(&f.repo, "job-c", "kiln/c", None)
            .await
            .unwrap();
    std::fs::remove_dir_all(&c.path).unwrap();
    let worktrees = f.dirs.path().join("worktrees");
    std::fs::write(worktrees.join("job-a.progress.md"), "notes\n").unwrap();
    std::fs::create_dir_all(worktrees.join(".kiln-homes/job-a")).unwrap();
    std::fs::write(worktrees.join(".kiln-runner-alive"), "").unwrap();
    assert_eq!(
        mirror_branches(&f.ws, &f.repo),
        ["kiln/a", "kiln/b", "kiln/c"]
    );

    let mut swept = f.ws.sweep(&["job-b".to_string()]).await;
    swept.worktrees.sort();
    swept.branches.sort();
    assert_eq!(swept.worktrees, ["job-a", "job-a", "job-a.progress.md"]);
    assert_eq!(swept.branches, ["acme/site:kiln/a", "acme/site:kiln/c"]);
    assert!(!a.path.exists());
    assert!(!worktrees.join(".kiln-homes/job-a").exists());
    assert!(
        worktrees.join(".kiln-runner-alive").exists(),
        "the runner's own files stay"
    );
    assert!(
        b.path.join("README.md").is_file(),
        "a held job's worktree stays"
    );
    assert_eq!(mirror_branches(&f.ws, &f.repo), ["kiln/b"]);
    let listed = git(
        &f.ws.mirror_path(&f.repo),
        &["worktree", "list", "--porcelain"],
    );
    assert!(
        !listed.contains("job-a") && !listed.contains("job-c"),
        "{listed}"
    );

    // The held job carries on.
    std::fs::write(b.path.join("b.txt"), "b\n").unwrap();
    assert!(f.ws.commit_all(&b, "b").await.unwrap().is_some());
    f.ws.push(&b).await.unwrap();
    assert!(f
        .remotes
        .branches(ORG, REPO)
        .contains(&"kiln/b".to_string()));
}

#[tokio::test]
async fn mirrors_unused_for_the_max_age_are_collected_unless_a_worktree_uses_them() {
    let f = fixture();
    f.remotes.create(ORG, "old");
    f.remotes.create(ORG, "busy");
    let old = RepoRef::new(ORG, "old").unwrap();
    let busy = RepoRef::new(ORG, "busy").unwrap();
    f.ws.sync(&f.repo).await.unwrap();
    f.ws.sync(&old).await.unwrap();
    f.ws.create_worktree(&busy, "job-busy", "kiln/busy", None)
        .await
        .unwrap();
    age_mirror(&f.ws, &old, 20);
    age_mirror(&f.ws, &busy, 20);
    age_mirror(&f.ws, &f.repo, 10);

    let fortnight = std::time::Duration::from_secs(14 * 86_400);
    assert_eq!(f.ws.collect_garbage(fortnight).await, vec![old.clone()]);
    assert!(!f.ws.mirror_path(&old).exists());
    assert!(f.ws.mirror_path(&busy).join("HEAD").is_file(), "in use");
    assert!(
        f.ws.mirror_path(&f.repo).join("HEAD").is_file(),
        "used 10 days ago"
    );
    // Used again, a collected mirror is fetched anew.
    f.ws.sync(&old).await.unwrap();
    assert!(f.ws.mirror_path(&old).join("HEAD").is_file());
    assert!(f.ws.collect_garbage(fortnight).await.is_empty());
}

#[tokio::test]
async fn a_runner_sweeps_at_start_what_a_crashed_run_left_and_reports_disk_in_health() {
    // What a runner killed in the middle of a job leaves: its worktree and branch, and a
    // mirror nobody has used for a month.
    let dirs = tempfile::Builder::new()
        .prefix("kiln-runner-test-")
        .tempdir()
        .unwrap();
    let remotes = Remotes::new();
    remotes.create(ORG, REPO);
    remotes.create(ORG, "stale");
    let ws = Workspaces::new(
        dirs.path().join("repos"),
        dirs.path().join("worktrees"),
        &remotes.base_url(),
        None,
    );
    let repo = RepoRef::new(ORG, REPO).unwrap();
    let stale = RepoRef::new(ORG, "stale").unwrap();
    let crashed = "0b6f7c1e-0000-4000-8000-00000000c4a5";
    let wt = ws
        .create_worktree(&repo, crashed, "kiln/crashed", None)
        .await
        .unwrap();
    ws.sync(&stale).await.unwrap();
    age_mirror(&ws, &stale, 30);

    let runner = common::TestRunner::start(common::RunnerOptions {
        dirs: Some(dirs),
        ..common::RunnerOptions::default()
    })
    .await;
    assert!(!wt.path.exists(), "the crashed job's worktree is gone");
    assert!(mirror_branches(&ws, &repo).is_empty(), "and its branch");
    assert!(
        !ws.mirror_path(&stale).exists(),
        "the stale mirror is collected"
    );

    let health = runner.health().await;
    let disk = &health["disk"];
    assert_eq!(disk["worktrees"]["count"], 0, "{health}");
    assert_eq!(disk["mirrors"]["count"], 1, "{health}");
    assert!(disk["mirrors"]["bytes"].as_u64().unwrap() > 0, "{health}");
    assert!(disk["worktrees"]["path"]
        .as_str()
        .unwrap()
        .ends_with("worktrees"));

    // A job runs on the swept mirror as usual; while it runs /health counts its worktree.
    let (id, _, _) = common::start_hanging_job(&runner).await;
    let health = runner.health().await;
    assert_eq!(health["disk"]["worktrees"]["count"], 1, "{health}");
    runner
        .edge
        .send(kiln_schemas::runner::EdgeMessage::Cancel { job_id: id.clone() })
        .await;
    runner.wait_released(&id).await;
}

/// Finished worktrees leave their entries and branches for a batch: the sixteenth clean-up drops
/// all sixteen with one `worktree prune` and one `branch -D`, and the runner's tidy-up drops
/// what a quiet moment leaves.
#[tokio::test]
async fn finished_worktrees_are_dropped_in_batches_and_by_the_tidy_up() {
    let f = fixture();
    let mirror = f.ws.mirror_path(&f.repo);
    let count = || {
        git(&mirror, &["branch", "--list", "kiln/b*"])
            .lines()
            .count()
    };
    for i in 0..15 {
        let wt =
            f.ws.create_worktree(&f.repo, &format!("job-b{i}"), &format!("kiln/b{i}"), None)
                .await
                .unwrap();
        f.ws.remove_worktree(&wt).await;
        assert!(!wt.path.exists(), "the directory goes at once");
    }
    assert_eq!(count(), 15, "fifteen wait for a batch");
    let wt =
        f.ws.create_worktree(&f.repo, "job-b15", "kiln/b15", None)
            .await
            .unwrap();
    f.ws.remove_worktree(&wt).await;
    assert_eq!(count(), 0, "the sixteenth drops the batch");
    assert_eq!(
        git(&mirror, &["worktree", "list", "--porcelain"])
            .matches("worktree ")
            .count(),
        1,
        "only the mirror itself"
    );

    let wt =
        f.ws.create_worktree(&f.repo, "job-b16", "kiln/b16", None)
            .await
            .unwrap();
    f.ws.remove_worktree(&wt).await;
    assert_eq!(count(), 1);
    f.ws.tidy().await;
    assert_eq!(count(), 0, "the tidy-up drops the rest");
    assert_eq!(
        f.ws.sweep(&[]).await,
        Default::default(),
        "nothing left behind"
    );
}
