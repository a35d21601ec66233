//! The files API's runner side on a real filesystem: listing (order, limits, `.git` hidden,
//! links shown but never followed), reading (text only, bounded, no escape through `..`, a link
//! or a linked directory), snapshots and their restore; and both requests answered over the
//! runner's socket for a job it holds (and refused for one it does not).

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use common::*;
use kiln_runner::files;
use kiln_schemas::app::{FileEntry, SnapshotFile, WorkspaceSnapshot, MAX_FILE_BYTES};
use kiln_schemas::runner::{EdgeMessage, RunnerRequest, MAX_SNAPSHOT_BYTES};
use serde_json::Value;
use tempfile::TempDir;

/// A workspace beside a directory of secrets, with links from one into the other.
struct Fixture {
    _root: TempDir,
    ws: std::path::PathBuf,
    secret: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let ws = root.path().join("ws");
    let secret = root.path().join("secret");
    fs::create_dir_all(ws.join("src/components")).unwrap();
    fs::create_dir_all(ws.join(".git/objects")).unwrap();
    fs::create_dir_all(&secret).unwrap();
    fs::write(secret.join("key.txt"), "TOP SECRET").unwrap();
    fs::write(ws.join("README.md"), "# app\n").unwrap();
    fs::write(ws.join("index.html"), "<html></html>\n").unwrap();
    fs::write(ws.join("src/App.tsx"), "export default 1;\n").unwrap();
    fs::write(
        ws.join("src/components/Button.tsx"),
        "export const B = 2;\n",
    )
    .unwrap();
    fs::write(ws.join(".git/config"), "[core]\n").unwrap();
    fs::write(
        ws.join("logo.png"),
        [0x89, b'P', b'N', b'G', 0, 0, 0xff, 0xfe],
    )
    .unwrap();
    symlink("/", ws.join("root")).unwrap();
    symlink(&secret, ws.join("linked")).unwrap();
    symlink(secret.join("key.txt"), ws.join("key.txt")).unwrap();
    Fixture {
        _root: root,
        ws,
        secret,
    }
}

fn names(entries: &[FileEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| format!("{}:{}", e.kind, e.name))
        .collect()
}

fn find<'a>(entries: &'a [FileEntry], name: &str) -> &'a FileEntry {
    entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} is listed"))
}

#[test]
fn listing_puts_directories_first_hides_git_and_shows_links_as_links() {
    let f = fixture();
    let s = files::list(&f.ws, "/app", 200).unwrap();
    assert!(!s.truncated);
    assert_eq!(s.source, "runner");
    assert_eq!(
        names(&s.structure),
        [
            "directory:src",
            "file:README.md",
            "file:index.html",
            "symlink:key.txt",
            "symlink:linked",
            "file:logo.png",
            "symlink:root"
        ]
    );
    let src = find(&s.structure, "src");
    assert_eq!(src.path, "/app/src");
    let kids = src.children.as_ref().expect("src was listed");
    assert_eq!(names(kids), ["directory:components", "file:App.tsx"]);
    let button = &find(kids, "components").children.as_ref().unwrap()[0];
    assert_eq!(
        (button.path.as_str(), button.size),
        ("/app/src/components/Button.tsx", Some(20))
    );
    let linked = find(&s.structure, "linked");
    assert!(
        linked.children.is_none() && linked.size.is_none(),
        "a link is not followed"
    );
    // A sub-directory, by absolute or relative path.
    let sub = files::list(&f.ws, "/app/src/components", 200).unwrap();
    assert_eq!(names(&sub.structure), ["file:Button.tsx"]);
    assert_eq!(files::list(&f.ws, "src", 200).unwrap().structure.len(), 2);
}

#[test]
fn listing_stops_at_the_limit_shallow_levels_first() {
    let f = fixture();
    let s = files::list(&f.ws, "/app", 3).unwrap();
    assert!(s.truncated);
    assert_eq!(
        names(&s.structure),
        ["directory:src", "file:README.md", "file:index.html"]
    );
    assert!(
        find(&s.structure, "src").children.is_none(),
        "not reached within the limit"
    );
    let s = files::list(&f.ws, "/app", 8).unwrap();
    assert!(s.truncated);
    let src = find(&s.structure, "src").children.as_ref().unwrap();
    assert_eq!(
        names(src),
        ["directory:components"],
        "the eighth entry is the last listed"
    );
    let s = files::list(&f.ws, "/app", 10).unwrap();
    assert!(!s.truncated, "exactly as many entries as the limit");
}

#[test]
fn listing_refuses_escapes_links_and_git() {
    let f = fixture();
    for (path, want) in [
        ("/app/../secret", ". or .."),
        ("/etc", "/app"),
        ("/app/linked", "symbolic link"),
        ("/app/root", "symbolic link"),
        ("/app/root/etc", "symbolic link"),
        ("/app/.git", "no such"),
        ("/app/README.md", "not a directory"),
        ("/app/missing", "does not exist"),
    ] {
        let e = files::list(&f.ws, path, 200).unwrap_err().0;
        assert!(e.contains(want), "{path}: {e}");
        assert!(!e.contains(f.ws.to_str().unwrap()), "no host path in {e}");
    }
}

#[test]
fn reading_answers_text_and_refuses_binary_oversize_and_escapes() {
    let f = fixture();
    let c = files::read(&f.ws, "/app/src/App.tsx").unwrap();
    assert_eq!(
        (c.path.as_str(), c.content.as_str(), c.size),
        ("/app/src/App.tsx", "export default 1;\n", 18)
    );
    assert_eq!(
        files::read(&f.ws, "/app/logo.png").unwrap_err().0,
        "binary file"
    );
    fs::write(
        f.ws.join("big.txt"),
        "a".repeat(MAX_FILE_BYTES as usize + 1),
    )
    .unwrap();
    assert!(files::read(&f.ws, "/app/big.txt")
        .unwrap_err()
        .0
        .starts_with("file is over 524288 bytes"));
    fs::write(f.ws.join("max.txt"), "a".repeat(MAX_FILE_BYTES as usize)).unwrap();
    assert_eq!(
        files::read(&f.ws, "/app/max.txt").unwrap().size,
        MAX_FILE_BYTES
    );
    for (path, want) in [
        ("/app/../secret/key.txt", ". or .."),
        ("/app/key.txt", "symbolic link"),
        ("/app/linked/key.txt", "symbolic link"),
        ("/app/root/etc/passwd", "symbolic link"),
        ("/app/.git/config", "no such"),
        ("/app/src", "is a directory"),
        ("/app/nope.txt", "does not exist"),
        ("/app/README.md/x", "no such"),
        ("/app/a\0b", "NUL"),
    ] {
        let e = files::read(&f.ws, path).unwrap_err().0;
        assert!(e.contains(want), "{path:?}: {e}");
        assert!(!e.contains("TOP SECRET"));
    }
}

#[test]
fn a_directory_swapped_for_a_link_reads_nothing_outside() {
    // What the checks see and what is opened may differ if the agent swaps a directory for a
    // link between them; the open itself never follows a link, so this is refused either way.
    let f = fixture();
    fs::remove_dir_all(f.ws.join("src/components")).unwrap();
    symlink(&f.secret, f.ws.join("src/components")).unwrap();
    let e = files::read(&f.ws, "/app/src/components/key.txt")
        .unwrap_err()
        .0;
    assert!(e.contains("symbolic link"), "{e}");
}

#[test]
fn a_workspace_that_is_a_link_or_missing_is_refused() {
    let f = fixture();
    let link = f.ws.parent().unwrap().join("ws-link");
    symlink(&f.secret, &link).unwrap();
    assert!(files::list(&link, "/app", 10)
        .unwrap_err()
        .0
        .contains("no workspace"));
    assert!(files::read(&link, "/app/key.txt")
        .unwrap_err()
        .0
        .contains("no workspace"));
    let gone = f.ws.parent().unwrap().join("gone");
    assert!(files::list(&gone, "/app", 10)
        .unwrap_err()
        .0
        .contains("no workspace"));
}

#[test]
fn a_snapshot_holds_the_text_files_and_restores_them() {
    let f = fixture();
    fs::write(
        f.ws.join("big.txt"),
        "a".repeat(MAX_FILE_BYTES as usize + 1),
    )
    .unwrap();
    write(
        &f.ws,
        "node_modules/react/index.js",
        "module.exports = {};\n",
    );
    write(&f.ws, "src/__pycache__/x.pyc", "cached");
    let snap = files::snapshot(&f.ws).unwrap();
    let paths: Vec<&str> = snap.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "README.md",
            "index.html",
            "src/App.tsx",
            "src/components/Button.tsx"
        ]
    );
    assert_eq!(snap.omitted, ["big.txt", "logo.png"]);
    assert!(
        !serde_json::to_string(&snap).unwrap().contains("TOP SECRET"),
        "no link followed"
    );

    let into = tempfile::tempdir().unwrap();
    files::restore(into.path(), &snap).unwrap();
    assert_eq!(
        files::snapshot(into.path()).unwrap().files,
        snap.files,
        "a round trip"
    );
    assert_eq!(
        fs::read_to_string(into.path().join("src/components/Button.tsx")).unwrap(),
        "export const B = 2;\n"
    );
}

#[test]
fn a_snapshot_stays_under_its_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 40 files of 500 KB: 20 MB of text, over the 16 MiB a snapshot may hold.
    let body = "x".repeat(500_000);
    for i in 0..40 {
        fs::write(dir.path().join(format!("f{i:02}.txt")), &body).unwrap();
    }
    let t0 = std::time::Instant::now();
    let snap = files::snapshot(dir.path()).unwrap();
    let took = t0.elapsed();
    let json = serde_json::to_vec(&snap).unwrap();
    assert!(json.len() <= MAX_SNAPSHOT_BYTES, "{} bytes", json.len());
    assert!(snap.files.len() >= 30, "{} files kept", snap.files.len());
    assert_eq!(
        snap.files.len() + snap.omitted.len(),
        40,
        "the rest are listed as omitted"
    );
    assert_eq!(snap.omitted.last().unwrap(), "f39.txt");
    println!(
        "snapshot of 40 files of 500 KB: {} files, {} bytes of JSON, {} ms",
        snap.files.len(),
        json.len(),
        took.as_millis()
    );
}

fn snap_of(files: &[(&str, &str)]) -> WorkspaceSnapshot {
    WorkspaceSnapshot {
        files: files
            .iter()
            .map(|(p, c)| SnapshotFile {
                path: p.to_string(),
                content: c.to_string(),
                size: c.len() as u64,
            })
            .collect(),
        omitted: vec![],
    }
}

#[test]
fn restore_refuses_escapes_and_writes_nothing_then() {
    let f = fixture();
    let into = tempfile::tempdir().unwrap();
    for bad in [
        "../evil.txt",
        "/etc/evil",
        "a/../../evil",
        ".git/hooks/post-commit",
        "",
        "a\\b",
    ] {
        let snap = snap_of(&[("ok.txt", "fine"), (bad, "evil")]);
        let e = files::restore(into.path(), &snap).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}: {e}");
        assert!(
            !into.path().join("ok.txt").exists(),
            "{bad:?}: checked before anything is written"
        );
    }
    // Through a link already in the directory: refused, nothing written outside.
    symlink(&f.secret, into.path().join("linked")).unwrap();
    let e = files::restore(into.path(), &snap_of(&[("linked/planted.txt", "x")])).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(!f.secret.join("planted.txt").exists());
    // Onto a link: not followed.
    symlink(f.secret.join("key.txt"), into.path().join("key.txt")).unwrap();
    assert!(files::restore(into.path(), &snap_of(&[("key.txt", "overwritten")])).is_err());
    assert_eq!(
        fs::read_to_string(f.secret.join("key.txt")).unwrap(),
        "TOP SECRET"
    );
}

fn ws_dir(runner: &TestRunner, job_id: &str) -> std::path::PathBuf {
    runner.worktrees_dir().join(job_id)
}

async fn ask(runner: &TestRunner, request: RunnerRequest) -> Value {
    let request_id = uuid::Uuid::new_v4().to_string();
    runner
        .edge
        .send(EdgeMessage::Request {
            request_id: request_id.clone(),
            request,
        })
        .await;
    runner.edge.wait_reply(&request_id).await
}

fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

#[tokio::test]
async fn the_runner_answers_files_requests_for_the_jobs_it_holds_only() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let (id, _, _) = start_hanging_job(&runner).await;
    let dir = ws_dir(&runner, &id);
    write(&dir, "web/index.html", "<h1>hi</h1>\n");
    symlink("/etc", dir.join("etc")).unwrap();

    let listed = ask(
        &runner,
        RunnerRequest::ListFiles {
            job_id: id.clone(),
            path: "/app/web".into(),
            limit: 50,
        },
    )
    .await;
    assert_eq!(listed["source"], "runner", "{listed}");
    assert_eq!(listed["structure"][0]["path"], "/app/web/index.html");
    let all = ask(
        &runner,
        RunnerRequest::ListFiles {
            job_id: id.clone(),
            path: "/app".into(),
            limit: 1000,
        },
    )
    .await;
    let top: Vec<&str> = all["structure"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(top.contains(&"web") && !top.contains(&".git"), "{top:?}");

    let read = ask(
        &runner,
        RunnerRequest::ReadFile {
            job_id: id.clone(),
            path: "/app/web/index.html".into(),
        },
    )
    .await;
    assert_eq!(
        (read["content"].as_str(), read["size"].as_u64()),
        (Some("<h1>hi</h1>\n"), Some(12))
    );
    let escape = ask(
        &runner,
        RunnerRequest::ReadFile {
            job_id: id.clone(),
            path: "/app/etc/passwd".into(),
        },
    )
    .await;
    assert!(
        escape["error"].as_str().unwrap().contains("symbolic link"),
        "{escape}"
    );
    let dots = ask(
        &runner,
        RunnerRequest::ReadFile {
            job_id: id.clone(),
            path: "/app/../../etc/passwd".into(),
        },
    )
    .await;
    assert!(dots["error"].as_str().unwrap().contains(".."), "{dots}");

    let other = uuid::Uuid::new_v4().to_string();
    for request in [
        RunnerRequest::ListFiles {
            job_id: other.clone(),
            path: "/app".into(),
            limit: 10,
        },
        RunnerRequest::ReadFile {
            job_id: other.clone(),
            path: "/app/x".into(),
        },
    ] {
        let v = ask(&runner, request).await;
        assert_eq!(
            v,
            serde_json::json!({"error": "this runner does not hold the job"})
        );
    }
    runner
        .edge
        .send(EdgeMessage::Cancel { job_id: id.clone() })
        .await;
    runner.wait_released(&id).await;
    let after = ask(
        &runner,
        RunnerRequest::ReadFile {
            job_id: id,
            path: "/app/web/index.html".into(),
        },
    )
    .await;
    assert!(
        after["error"].is_string(),
        "a released job's files are not served: {after}"
    );
    runner.stop().await;
}
