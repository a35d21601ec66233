//! The runner's counters and `GET /metrics` in Prometheus' text format (version 0.0.4), written by
//! hand: jobs (held, running, assigned, started, and how they ended), event batches (posted,
//! retried), the edge session (connected, reconnects) and disk use (worktrees and mirrors, with
//! their apparent size in bytes).

use std::fmt::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters, updated where things happen. Shared (`Arc`) by the job table, the jobs, their
/// reporters and the edge session.
#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs_assigned: AtomicU64,
    pub jobs_started: AtomicU64,
    pub jobs_completed: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    /// Events in batches the edge acknowledged.
    pub events_posted: AtomicU64,
    pub batches_posted: AtomicU64,
    /// Failed posts of a batch that was then sent again.
    pub batches_retried: AtomicU64,
    /// Output lines (and agent events) dropped because a job's event buffer was full.
    pub events_dropped: AtomicU64,
    /// Sessions the edge welcomed (the first one and every reconnect).
    pub edge_sessions: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Entries of a directory and the bytes under it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUse {
    pub count: u64,
    pub bytes: u64,
}

/// The apparent size (file lengths) of everything under `path`, without following symbolic
/// links. Entries that vanish meanwhile (a job cleaning up) are skipped.
pub fn bytes_under(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| bytes_under(&e.path()))
        .sum()
}

/// Job worktrees: the directories directly under `WORKTREES_DIR` but dot ones (files and dot
/// directories beside them, such as ralph's progress notes, the liveness file and the process
/// executor's scratch homes, count in bytes only).
pub fn worktrees_use(dir: &Path) -> DiskUse {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return DiskUse::default();
    };
    let mut usage = DiskUse::default();
    for e in entries.filter_map(Result::ok) {
        // Dot names are the runner's own (the process executor's scratch homes).
        if e.file_type().is_ok_and(|t| t.is_dir())
            && !e.file_name().to_string_lossy().starts_with('.')
        {
            usage.count += 1;
        }
        usage.bytes += bytes_under(&e.path());
    }
    usage
}

/// Bare mirrors: `REPOS_DIR/<org>/<repo>.git`.
pub fn mirrors_use(dir: &Path) -> DiskUse {
    let Ok(orgs) = std::fs::read_dir(dir) else {
        return DiskUse::default();
    };
    let mut usage = DiskUse::default();
    for org in orgs.filter_map(Result::ok) {
        if !org.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(repos) = std::fs::read_dir(org.path()) else {
            continue;
        };
        for repo in repos.filter_map(Result::ok) {
            if repo.file_type().is_ok_and(|t| t.is_dir())
                && repo.file_name().to_string_lossy().ends_with(".git")
            {
                usage.count += 1;
                usage.bytes += bytes_under(&repo.path());
            }
        }
    }
    usage
}

/// Everything `/metrics` shows, read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub version: String,
    pub executor: String,
    pub capacity: u32,
    pub jobs_running: u32,
    pub jobs_waiting: u32,
    pub jobs_assigned: u64,
    pub jobs_started: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub jobs_cancelled: u64,
    pub events_posted: u64,
    pub batches_posted: u64,
    pub batches_retried: u64,
    pub events_dropped: u64,
    pub edge_connected: bool,
    pub edge_reconnects: u64,
    pub worktrees: DiskUse,
    pub mirrors: DiskUse,
}

impl Snapshot {
    /// The counters' part of a snapshot; the caller fills in the gauges.
    pub fn counters(m: &Metrics) -> Snapshot {
        Snapshot {
            jobs_assigned: Metrics::get(&m.jobs_assigned),
            jobs_started: Metrics::get(&m.jobs_started),
            jobs_completed: Metrics::get(&m.jobs_completed),
            jobs_failed: Metrics::get(&m.jobs_failed),
            jobs_cancelled: Metrics::get(&m.jobs_cancelled),
            events_posted: Metrics::get(&m.events_posted),
            batches_posted: Metrics::get(&m.batches_posted),
            batches_retried: Metrics::get(&m.batches_retried),
            events_dropped: Metrics::get(&m.events_dropped),
            edge_reconnects: Metrics::get(&m.edge_sessions).saturating_sub(1),
            ..Snapshot::default()
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape_label(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: u64) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

/// The snapshot in Prometheus' text format.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out(String::new());
    o.family(
        "kiln_runner_info",
        "gauge",
        "The runner: name, version and executor.",
    );
    o.sample(
        "kiln_runner_info",
        &format!(
            "{{name=\"{}\",version=\"{}\",executor=\"{}\"}}",
            escape_label(&s.name),
            escape_label(&s.version),
            escape_label(&s.executor)
        ),
        1,
    );
    o.one(
        "kiln_runner_capacity",
        "gauge",
        "Jobs the runner runs at once (MAX_CONCURRENT_JOBS).",
        s.capacity.into(),
    );
    o.one(
        "kiln_runner_jobs_running",
        "gauge",
        "Jobs holding a slot (started and not yet released).",
        s.jobs_running.into(),
    );
    o.one(
        "kiln_runner_jobs_waiting",
        "gauge",
        "Jobs assigned beyond capacity, waiting for a slot.",
        s.jobs_waiting.into(),
    );
    o.one(
        "kiln_runner_jobs_assigned_total",
        "counter",
        "Assignments accepted from the edge.",
        s.jobs_assigned,
    );
    o.one(
        "kiln_runner_jobs_started_total",
        "counter",
        "Jobs that got a slot and started.",
        s.jobs_started,
    );
    o.family(
        "kiln_runner_jobs_ended_total",
        "counter",
        "Jobs released, by outcome: completed or failed (their finished event), cancelled (a cancel, a lost lease or the runner stopping, before they finished).",
    );
    for (outcome, n) in [
        ("completed", s.jobs_completed),
        ("failed", s.jobs_failed),
        ("cancelled", s.jobs_cancelled),
    ] {
        o.sample(
            "kiln_runner_jobs_ended_total",
            &format!("{{outcome=\"{outcome}\"}}"),
            n,
        );
    }
    o.one(
        "kiln_runner_events_posted_total",
        "counter",
        "Job events in batches the edge acknowledged.",
        s.events_posted,
    );
    o.one(
        "kiln_runner_event_batches_posted_total",
        "counter",
        "Event batches the edge acknowledged.",
        s.batches_posted,
    );
    o.one(
        "kiln_runner_event_batches_retried_total",
        "counter",
        "Failed posts of an event batch, each followed by sending the same batch again.",
        s.batches_retried,
    );
    o.one(
        "kiln_runner_events_dropped_total",
        "counter",
        "Output lines and agent events dropped because a job's event buffer (RUNNER_EVENT_BUFFER_MB) was full; a system line in the job's log says where.",
        s.events_dropped,
    );
    o.one(
        "kiln_runner_edge_connected",
        "gauge",
        "1 while the session with the edge is up, else 0.",
        s.edge_connected.into(),
    );
    o.one(
        "kiln_runner_edge_reconnects_total",
        "counter",
        "Sessions with the edge established again after the first.",
        s.edge_reconnects,
    );
    o.one(
        "kiln_runner_worktrees",
        "gauge",
        "Job worktrees on disk (directories in WORKTREES_DIR).",
        s.worktrees.count,
    );
    o.one(
        "kiln_runner_worktrees_bytes",
        "gauge",
        "Apparent size of everything in WORKTREES_DIR, in bytes.",
        s.worktrees.bytes,
    );
    o.one(
        "kiln_runner_mirrors",
        "gauge",
        "Bare repository mirrors on disk (REPOS_DIR/<org>/<repo>.git).",
        s.mirrors.count,
    );
    o.one(
        "kiln_runner_mirrors_bytes",
        "gauge",
        "Apparent size of the mirrors, in bytes.",
        s.mirrors.bytes,
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_help_type_and_one_sample_per_line() {
        let m = Metrics::default();
        Metrics::inc(&m.jobs_started);
        Metrics::add(&m.events_posted, 7);
        Metrics::inc(&m.edge_sessions);
        Metrics::inc(&m.edge_sessions);
        Metrics::inc(&m.edge_sessions);
        let s = Snapshot {
            name: "box \"1\"".into(),
            version: "0.1.0".into(),
            executor: "docker".into(),
            capacity: 4,
            jobs_running: 1,
            edge_connected: true,
            worktrees: DiskUse {
                count: 1,
                bytes: 4096,
            },
            ..Snapshot::counters(&m)
        };
        let text = render(&s);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            vec![
                "kiln_runner_info{name=\"box \\\"1\\\"\",version=\"0.1.0\",executor=\"docker\"} 1",
                "kiln_runner_capacity 4",
                "kiln_runner_jobs_running 1",
                "kiln_runner_jobs_waiting 0",
                "kiln_runner_jobs_assigned_total 0",
                "kiln_runner_jobs_started_total 1",
                "kiln_runner_jobs_ended_total{outcome=\"completed\"} 0",
                "kiln_runner_jobs_ended_total{outcome=\"failed\"} 0",
                "kiln_runner_jobs_ended_total{outcome=\"cancelled\"} 0",
                "kiln_runner_events_posted_total 7",
                "kiln_runner_event_batches_posted_total 0",
                "kiln_runner_event_batches_retried_total 0",
                "kiln_runner_events_dropped_total 0",
                "kiln_runner_edge_connected 1",
                "kiln_runner_edge_reconnects_total 2",
                "kiln_runner_worktrees 1",
                "kiln_runner_worktrees_bytes 4096",
                "kiln_runner_mirrors 0",
                "kiln_runner_mirrors_bytes 0",
            ]
        );
        // Every family has its HELP and TYPE right before its first sample.
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter"].contains(&kind), "{l}");
                assert!(name.ends_with("_total") == (kind == "counter"), "{l}");
                assert!(lines[i - 1].starts_with(&format!("# HELP {name} ")), "{l}");
                assert!(lines[i + 1].starts_with(name), "{l}");
            }
        }
        assert!(text.ends_with('\n'));
        assert_eq!(Snapshot::counters(&Metrics::default()).edge_reconnects, 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn disk_use_counts_worktrees_and_mirrors_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let wt = tmp.path().join("worktrees");
        std::fs::create_dir_all(wt.join("job-1/src")).unwrap();
        std::fs::create_dir_all(wt.join("job-2")).unwrap();
        std::fs::write(wt.join("job-1/src/a.txt"), vec![b'a'; 1000]).unwrap();
        std::fs::write(wt.join("job-1/.git"), vec![b'g'; 24]).unwrap();
        std::fs::write(wt.join("job-2/b.txt"), vec![b'b'; 500]).unwrap();
        std::fs::write(wt.join("job-1.progress.md"), vec![b'p'; 10]).unwrap();
        std::fs::write(wt.join(".kiln-runner-alive"), b"").unwrap();
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![0u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(&big, wt.join("job-2/link")).unwrap();
        let link_len = std::fs::symlink_metadata(wt.join("job-2/link"))
            .unwrap()
            .len();
        assert_eq!(
            worktrees_use(&wt),
            DiskUse {
                count: 2,
                bytes: 1000 + 24 + 500 + 10 + link_len
            }
        );
        assert_eq!(worktrees_use(&tmp.path().join("none")), DiskUse::default());

        let repos = tmp.path().join("repos");
        std::fs::create_dir_all(repos.join("acme/site.git/objects")).unwrap();
        std::fs::create_dir_all(repos.join("acme/not-a-mirror")).unwrap();
        std::fs::write(repos.join("acme/site.git/objects/pack"), vec![0u8; 300]).unwrap();
        std::fs::write(repos.join("acme/site.git/HEAD"), b"ref: refs/heads/main\n").unwrap();
        assert_eq!(
            mirrors_use(&repos),
            DiskUse {
                count: 1,
                bytes: 300 + 21
            }
        );
    }
}
