//! [`GitRemotes`]: local bare repositories standing in for GitHub remotes
//! (`RUNNER_GIT_BASE_URL=file://...`), and readers for what a job pushed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

pub struct GitRemotes {
    dir: TempDir,
}

impl Default for GitRemotes {
    fn default() -> Self {
        Self::new()
    }
}

impl GitRemotes {
    pub fn new() -> GitRemotes {
        GitRemotes { dir: tempfile::Builder::new().prefix("kiln-remotes-").tempdir().expect("a temp dir") }
    }

    /// `file://<dir>`: `<base_url>/<org>/<repo>.git` is each repository.
    pub fn base_url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    pub fn bare_path(&self, org: &str, repo: &str) -> PathBuf {
        self.dir.path().join(org).join(format!("{repo}.git"))
    }

    /// Creates `<org>/<repo>.git` with one commit on `main` holding a README.
    pub fn create(&self, org: &str, repo: &str) -> PathBuf {
        self.create_with_files(org, repo, &[("README.md", &format!("# {repo}\n"))])
    }

    /// Creates `<org>/<repo>.git` with one commit on `main` holding `files`.
    pub fn create_with_files(&self, org: &str, repo: &str, files: &[(&str, &str)]) -> PathBuf {
        let bare = self.bare_path(org, repo);
        std::fs::create_dir_all(&bare).expect("creating the bare repository dir");
        git(&bare, &["init", "--quiet", "--bare", "--initial-branch=main"]);
        let scratch = tempfile::tempdir().expect("a temp dir");
        let work = scratch.path();
        git(work, &["init", "--quiet", "--initial-branch=main"]);
        for (path, content) in files {
            let p = work.join(path);
            std::fs::create_dir_all(p.parent().expect("a parent")).expect("creating dirs");
            std::fs::write(p, content).expect("writing a file");
        }
        git(work, &["add", "-A"]);
        git(work, &["commit", "--quiet", "-m", "Initial commit"]);
        git(work, &["push", "--quiet", bare.to_str().expect("a UTF-8 path"), "main"]);
        bare
    }

    /// Branches of the repository.
    pub fn branches(&self, org: &str, repo: &str) -> Vec<String> {
        git(&self.bare_path(org, repo), &["for-each-ref", "--format=%(refname:short)", "refs/heads"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every file on `branch` with its content (lossy UTF-8).
    pub fn files(&self, org: &str, repo: &str, branch: &str) -> BTreeMap<String, String> {
        let bare = self.bare_path(org, repo);
        git(&bare, &["ls-tree", "-r", "--name-only", branch])
            .lines()
            .map(|path| (path.to_string(), git(&bare, &["show", &format!("{branch}:{path}")])))
            .collect()
    }

    /// One file on `branch`, `None` when absent.
    pub fn file(&self, org: &str, repo: &str, branch: &str, path: &str) -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(self.bare_path(org, repo))
            .args(["show", &format!("{branch}:{path}")])
            .output()
            .expect("running git");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Commit subjects on `branch`, newest first.
    pub fn commits(&self, org: &str, repo: &str, branch: &str) -> Vec<String> {
        git(&self.bare_path(org, repo), &["log", "--format=%s", branch]).lines().map(str::to_string).collect()
    }
}

/// Runs git in `dir` with a fixed identity, panicking with its output on failure.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Kiln Tests", "-c", "user.email=tests@kiln.invalid", "-c", "commit.gpgsign=false"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
