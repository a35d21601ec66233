//! Pure text rendering for a terminal: live-channel events to lines, the follow status line with
//! its iteration progress bar, the job table, job details, messages and health. ANSI colour only
//! when [`Palette::color`] is on (stdout is a TTY and `NO_COLOR` is unset); server text is stripped
//! of control characters so an agent's output cannot drive the terminal.

use kiln_schemas::events::{EventBody, LogStream, ServerEvent};
use kiln_schemas::jobs::{Health, Iteration, IterationList, JobMessage, JobView};
use kiln_schemas::status::{CompletionReason, JobStatus, JobType};
use serde_json::Value;

/// Whether to colour: stdout is a terminal and `NO_COLOR` is absent or empty (no-color.org).
pub fn color_enabled(stdout_is_tty: bool, no_color: Option<&str>) -> bool {
    stdout_is_tty && no_color.is_none_or(str::is_empty)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Palette {
    pub color: bool,
}

impl Palette {
    fn paint(self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    pub fn bold(self, s: &str) -> String {
        self.paint("1", s)
    }
    pub fn dim(self, s: &str) -> String {
        self.paint("2", s)
    }
    pub fn red(self, s: &str) -> String {
        self.paint("31", s)
    }
    pub fn green(self, s: &str) -> String {
        self.paint("32", s)
    }
    pub fn yellow(self, s: &str) -> String {
        self.paint("33", s)
    }
    pub fn cyan(self, s: &str) -> String {
        self.paint("36", s)
    }

    /// A status word in its colour.
    pub fn status(self, status: &str) -> String {
        match status {
            "completed" => self.green(status),
            "failed" => self.red(status),
            "cancelled" => self.yellow(status),
            "running" => self.cyan(status),
            _ => status.to_string(),
        }
    }
}

/// Server text made safe for a terminal: control characters (escape sequences, carriage returns,
/// bells) are dropped, tabs kept.
pub fn sanitize(s: &str) -> String {
    s.chars().filter(|c| *c == '\t' || !c.is_control()).collect()
}

/// `HH:MM:SS` of an RFC 3339 timestamp (as the edge writes them), else the text as it is.
pub fn clock(ts: &str) -> &str {
    if ts.len() >= 19 && ts.as_bytes()[10] == b'T' && ts.is_char_boundary(11) && ts.is_char_boundary(19) {
        &ts[11..19]
    } else {
        ts
    }
}

/// `[████░░░░░░]` for `done` of `total`, `width` cells wide.
pub fn progress_bar(done: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 { 0 } else { (done.min(total) as usize * width) / total as usize };
    format!("[{}{}]", "█".repeat(filled), "░".repeat(width - filled))
}

/// What `kiln follow` knows about the job so far; events update it.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowView {
    pub job_id: String,
    pub job_type: Option<JobType>,
    pub status: String,
    pub max_iterations: Option<u32>,
    /// Ralph iterations finished so far.
    pub iterations_done: u32,
    pub pr_url: Option<String>,
    pub error_message: Option<String>,
    pub completion_reason: Option<String>,
    /// The agent's reported cost so far, in US dollars.
    pub cost_usd: Option<f64>,
    pub last_seq: u64,
    /// Whether the socket is down and being reconnected.
    pub reconnecting: bool,
}

impl FollowView {
    pub fn new(job: &JobView) -> FollowView {
        FollowView {
            job_id: job.id.clone(),
            job_type: Some(job.job_type),
            status: job.status.as_str().to_string(),
            max_iterations: job.max_iterations,
            iterations_done: 0,
            pr_url: job.pr_url.clone(),
            error_message: job.error_message.clone(),
            completion_reason: None,
            cost_usd: None,
            last_seq: 0,
            reconnecting: false,
        }
    }

    /// The terminal status reached, if any.
    pub fn terminal(&self) -> Option<JobStatus> {
        JobStatus::from_face(&self.status).filter(|s| s.is_terminal())
    }
}

/// Lines for one event (possibly none), updating `view`.
pub fn event_lines(view: &mut FollowView, ev: &ServerEvent, p: Palette) -> Vec<String> {
    view.last_seq = view.last_seq.max(ev.seq);
    let time = p.dim(clock(ev.body.timestamp()));
    let prefix = |text: &str| -> Vec<String> {
        sanitize_lines(text).into_iter().map(|l| format!("{time} {l}")).collect()
    };
    match &ev.body {
        EventBody::JobStatus { status, message, pr_url, completion_reason, total_iterations, error_message, .. } => {
            view.status = status.clone();
            if let Some(u) = pr_url {
                view.pr_url = Some(u.clone());
            }
            if let Some(e) = error_message {
                view.error_message = Some(e.clone());
            }
            let reason = completion_reason.as_ref().and_then(reason_str);
            if reason.is_some() {
                view.completion_reason = reason.clone();
            }
            if let Some(n) = total_iterations {
                view.iterations_done = view.iterations_done.max(*n);
            }
            let mut out = vec![format!("{time} {} {}", p.bold(&format!("● {}", p.status(status))), sanitize(message))];
            if let Some(u) = pr_url {
                out.push(format!("{time}   pull request: {}", sanitize(u)));
            }
            if let Some(r) = &reason {
                out.push(format!("{time}   completion reason: {r}"));
            }
            if let Some(e) = error_message.as_ref().filter(|e| !message.contains(e.as_str())) {
                out.push(format!("{time}   {}", p.red(&format!("error: {}", sanitize(e)))));
            }
            out
        }
        EventBody::Log { stream, content, .. } => match stream {
            LogStream::Stdout => prefix(content),
            LogStream::Stderr => sanitize_lines(content).into_iter().map(|l| format!("{time} {}", p.red(&l))).collect(),
            LogStream::System => sanitize_lines(content).into_iter().map(|l| format!("{time} {}", p.dim(&format!("· {l}")))).collect(),
        },
        EventBody::StageUpdate { role, sender, content, .. } => {
            let who = p.cyan(&format!("[{} {}]", sanitize(role), sanitize(sender)));
            sanitize_lines(content).into_iter().map(|l| format!("{time} {who} {l}")).collect()
        }
        EventBody::Iteration { iteration, .. } => {
            view.iterations_done = view.iterations_done.max(iteration.iteration_number);
            vec![format!("{time} {}", p.bold(&iteration_summary(iteration, view.max_iterations)))]
        }
        EventBody::AgentEvent { event, .. } => agent_lines(view, event, p).into_iter().map(|l| format!("{time} {l}")).collect(),
        // The job's totals so far; the runner's own line says the same of the run in words.
        EventBody::Usage { totals, .. } => {
            view.cost_usd = Some(totals.cost_usd);
            vec![]
        }
        EventBody::AgentDialogue { agent, message, .. } => {
            let who = p.cyan(&format!("[{}]", sanitize(agent)));
            sanitize_lines(message).into_iter().map(|l| format!("{time} {who} {l}")).collect()
        }
        EventBody::PrdReady { prd_markdown, .. } => {
            vec![format!("{time} {}", p.bold(&format!("PRD ready ({} lines)", prd_markdown.lines().count())))]
        }
        EventBody::TicketUpdate { title, status, message, .. } => {
            vec![format!("{time} {} {}", p.bold(&format!("ticket {} {}", sanitize(title), sanitize(status))), sanitize(message))]
        }
        EventBody::TicketReset { .. } => vec![format!("{time} {}", p.dim("· the backlog is being rewritten"))],
        EventBody::Progress { percent, stage, .. } => {
            let stage = stage.as_deref().map(|s| format!(" ({})", sanitize(s))).unwrap_or_default();
            vec![format!("{time} {}", p.dim(&format!("· {percent:.0}%{stage}")))]
        }
        EventBody::Node { node, event_type, message, .. } => {
            let who = p.cyan(&format!("[{} {}]", sanitize(node), sanitize(event_type)));
            sanitize_lines(message).into_iter().map(|l| format!("{time} {who} {l}")).collect()
        }
    }
}

/// A completion reason's wire name (`promise_detected`).
fn reason_str(r: &CompletionReason) -> Option<String> {
    serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string))
}

fn sanitize_lines(text: &str) -> Vec<String> {
    text.split('\n').map(sanitize).collect()
}

/// `iteration 2/10 finished: exit 0, completion promise detected; make test ✓`.
pub fn iteration_summary(it: &Iteration, max: Option<u32>) -> String {
    let n = match max {
        Some(m) => format!("{}/{m}", it.iteration_number),
        None => it.iteration_number.to_string(),
    };
    let exit = it.exit_code.map_or("no exit code".to_string(), |c| format!("exit {c}"));
    let mut s = format!("iteration {n} finished: {exit}");
    if let Some(e) = &it.error {
        s.push_str(&format!(", error: {}", sanitize(e)));
    }
    if it.promise_detected {
        s.push_str(", completion promise detected");
    }
    if !it.feedback_results.is_empty() {
        let fb: Vec<String> = it
            .feedback_results
            .iter()
            .map(|f| format!("{} {}", sanitize(&f.command), if f.passed { "✓" } else { "✗" }))
            .collect();
        s.push_str(&format!("; {}", fb.join(", ")));
    }
    s
}

/// Lines for one structured agent event (Claude Code's `stream-json`): the assistant's text, its
/// tool calls, the session start and the final result with its cost. Other events are not shown.
pub fn agent_lines(view: &mut FollowView, event: &Value, p: Palette) -> Vec<String> {
    let str_at = |ptr: &str| event.pointer(ptr).and_then(Value::as_str);
    match str_at("/type") {
        Some("system") if str_at("/subtype") == Some("init") => {
            let mut parts = vec![];
            if let Some(m) = str_at("/model") {
                parts.push(format!("model {}", sanitize(m)));
            }
            if let Some(s) = str_at("/session_id") {
                parts.push(format!("session {}", sanitize(s)));
            }
            vec![p.dim(&format!("· agent started{}{}", if parts.is_empty() { "" } else { ": " }, parts.join(", ")))]
        }
        Some("assistant") => {
            let Some(blocks) = event.pointer("/message/content").and_then(Value::as_array) else { return vec![] };
            let mut out = vec![];
            for b in blocks {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(t) = b.get("text").and_then(Value::as_str) {
                            out.extend(sanitize_lines(t.trim_end()));
                        }
                    }
                    Some("tool_use") => {
                        let name = b.get("name").and_then(Value::as_str).unwrap_or("tool");
                        out.push(p.cyan(&format!("→ {}{}", sanitize(name), tool_input_summary(b.get("input")))));
                    }
                    _ => {}
                }
            }
            out
        }
        Some("result") => {
            if let Some(c) = event.get("total_cost_usd").and_then(Value::as_f64) {
                view.cost_usd = Some(c);
            }
            let mut facts = vec![];
            if let Some(c) = event.get("total_cost_usd").and_then(Value::as_f64) {
                facts.push(format!("${c:.4}"));
            }
            if let Some(n) = event.get("num_turns").and_then(Value::as_u64) {
                facts.push(format!("{n} turns"));
            }
            if let Some(ms) = event.get("duration_ms").and_then(Value::as_u64) {
                facts.push(format!("{:.1} s", ms as f64 / 1000.0));
            }
            let failed = event.get("is_error").and_then(Value::as_bool) == Some(true);
            let head = format!("· agent {}{}", if failed { "failed" } else { "finished" }, if facts.is_empty() { String::new() } else { format!(" ({})", facts.join(", ")) });
            vec![if failed { p.red(&head) } else { p.dim(&head) }]
        }
        _ => vec![],
    }
}

/// ` command` / ` path` of a tool call's input, or its JSON cut short.
fn tool_input_summary(input: Option<&Value>) -> String {
    let Some(input) = input else { return String::new() };
    for key in ["command", "file_path", "path", "pattern", "url"] {
        if let Some(v) = input.get(key).and_then(Value::as_str) {
            return format!(" {}", truncate(&sanitize(v), 100));
        }
    }
    if input.as_object().is_some_and(|o| o.is_empty()) {
        return String::new();
    }
    format!(" {}", truncate(&sanitize(&input.to_string()), 100))
}

/// At most `n` characters, with `…` when cut.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The one-line summary under the output: `● running · ralph · iteration 3/10 [██░░] · $0.0123`.
pub fn status_line(view: &FollowView, p: Palette) -> String {
    let mut parts = vec![p.bold(&format!("● {}", p.status(&view.status)))];
    if let Some(t) = view.job_type {
        parts.push(t.as_str().to_string());
    }
    if view.job_type == Some(JobType::Ralph) {
        let max = view.max_iterations.unwrap_or(kiln_schemas::jobs::DEFAULT_MAX_ITERATIONS);
        let current = if view.terminal().is_some() { view.iterations_done } else { (view.iterations_done + 1).min(max) };
        parts.push(format!("iteration {current}/{max} {}", progress_bar(view.iterations_done, max, 10)));
    }
    if let Some(c) = view.cost_usd {
        parts.push(format!("${c:.4}"));
    }
    if view.reconnecting {
        parts.push(p.yellow("reconnecting…"));
    }
    parts.push(p.dim(&format!("job {}", view.job_id.get(..8).unwrap_or(&view.job_id))));
    parts.join(" · ")
}

/// The status line cut to fit in `width` columns (a wrapped line could not be redrawn in place);
/// a line that has to be cut loses its colour.
pub fn fitted_status_line(view: &FollowView, p: Palette, width: usize) -> String {
    let plain = status_line(view, Palette { color: false });
    if plain.chars().count() < width {
        status_line(view, p)
    } else {
        truncate(&plain, width.saturating_sub(1).max(1))
    }
}

/// The closing line of `kiln follow`.
pub fn final_line(view: &FollowView, p: Palette) -> String {
    let mut s = format!("job {} {}", view.job_id, p.bold(&p.status(&view.status)));
    if let Some(r) = &view.completion_reason {
        s.push_str(&format!(" ({r})"));
    }
    if let Some(u) = &view.pr_url {
        s.push_str(&format!(": {}", sanitize(u)));
    } else if view.status == "failed" {
        if let Some(e) = &view.error_message {
            s.push_str(&format!(": {}", sanitize(e)));
        }
    }
    s
}

/// `kiln ls`'s table: id, status, type, repository, branch, created, title (or prompt).
pub fn jobs_table(jobs: &[JobView], total: u64, p: Palette) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_string();
    }
    let headers = ["ID", "STATUS", "TYPE", "REPOSITORY", "BRANCH", "CREATED", "TITLE"];
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|j| {
            let repo = match (&j.repository, &j.client) {
                (Some(r), _) => format!("{}/{}", r.owner_name, r.repo_name),
                (None, Some(c)) => c.name.clone(),
                _ => "-".into(),
            };
            let title = j.title.clone().unwrap_or_else(|| j.prompt.lines().next().unwrap_or("").to_string());
            let created = j.created_at.get(..16).unwrap_or(&j.created_at).replace('T', " ");
            [
                j.id.clone(),
                j.status.as_str().to_string(),
                j.job_type.as_str().to_string(),
                sanitize(&repo),
                sanitize(&j.branch_name),
                created,
                truncate(&sanitize(&title), 48),
            ]
        })
        .collect();
    let mut widths = headers.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = String::new();
    let head: Vec<String> = headers.iter().zip(widths).map(|(h, w)| pad(h, w)).collect();
    out.push_str(p.bold(head.join("  ").trim_end()).as_str());
    out.push('\n');
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| if i == 1 { format!("{}{}", p.status(c), " ".repeat(w - c.chars().count())) } else { pad(c, w) })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if total > jobs.len() as u64 {
        out.push_str(&p.dim(&format!("{} of {total} jobs (--limit, --offset for more)", jobs.len())));
        out.push('\n');
    }
    out
}

/// `kiln show`: the job's fields, one per line.
pub fn job_details(job: &JobView, p: Palette) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("id", job.id.clone()),
        ("status", p.status(job.status.as_str())),
        ("type", job.job_type.as_str().to_string()),
    ];
    if let Some(t) = &job.title {
        rows.push(("title", sanitize(t)));
    }
    if let Some(r) = &job.repository {
        rows.push(("repository", sanitize(&format!("{}/{}", r.owner_name, r.repo_name))));
    }
    if let Some(c) = &job.client {
        rows.push(("client", sanitize(&format!("{} ({})", c.name, c.id))));
    }
    rows.push(("branch", sanitize(&job.branch_name)));
    rows.push(("priority", job.priority.to_string()));
    rows.push(("attempts", job.attempts.to_string()));
    if let Some(m) = job.max_iterations {
        rows.push(("iterations", format!("{} of at most {m}", job.total_iterations.unwrap_or(0))));
    }
    if let Some(r) = &job.completion_reason {
        rows.push(("completion", reason_str(r).unwrap_or_default()));
    }
    if let Some(u) = &job.pr_url {
        rows.push(("pull request", sanitize(u)));
    }
    if let Some(e) = &job.error_message {
        rows.push(("error", p.red(&sanitize(e))));
    }
    if let Some(o) = &job.original_job_id {
        rows.push(("retry of", o.clone()));
    }
    rows.push(("created", job.created_at.clone()));
    if let Some(s) = &job.started_at {
        rows.push(("started", s.clone()));
    }
    if let Some(c) = &job.completed_at {
        rows.push(("ended", c.clone()));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{} {v}\n", p.dim(&format!("{k:>12}:"))));
    }
    out.push_str(&format!("{}\n", p.dim("      prompt:")));
    for l in sanitize_lines(job.prompt.trim_end()) {
        out.push_str(&format!("  {l}\n"));
    }
    out
}

/// `kiln logs`: one line per message line, `HH:MM:SS type content`.
pub fn message_lines(messages: &[JobMessage], p: Palette) -> Vec<String> {
    let mut out = vec![];
    for m in messages {
        let kind = format!("{:<10}", sanitize(&m.kind));
        let kind = match m.kind.as_str() {
            "stderr" => p.red(&kind),
            "system" => p.dim(&kind),
            "user_input" => p.cyan(&kind),
            _ => kind,
        };
        for l in sanitize_lines(&m.content) {
            out.push(format!("{} {kind} {l}", p.dim(clock(&m.created_at))));
        }
    }
    out
}

/// `kiln iterations`: a summary line, then one line per iteration with its output summary's last line.
pub fn iterations_text(list: &IterationList, p: Palette) -> String {
    let mut out = format!("iteration {} of at most {}", list.current_iteration, list.max_iterations);
    if let Some(r) = list.completion_reason.as_ref().and_then(reason_str) {
        out.push_str(&format!(", ended by {r}"));
    }
    out.push('\n');
    for it in &list.iterations {
        out.push_str(&iteration_summary(it, Some(list.max_iterations)));
        out.push('\n');
        if let Some(last) = it.output_summary.lines().rev().find(|l| !l.trim().is_empty()) {
            out.push_str(&format!("  {}\n", p.dim(&truncate(&sanitize(last.trim()), 100))));
        }
    }
    out
}

/// `kiln status`.
pub fn health_text(h: &Health, url: &str, p: Palette) -> String {
    let status = if h.status == "ok" { p.green(&h.status) } else { p.yellow(&h.status) };
    let mut text = format!(
        "{url}: {status}\n  queue: {} running, {} queued (at most {} at once)\n  runners: {} connected, {} free slot{}\n",
        h.queue.running,
        h.queue.queued,
        h.queue.max_concurrent,
        h.runners.connected,
        h.runners.free_slots,
        if h.runners.free_slots == 1 { "" } else { "s" }
    );
    for r in &h.runners.tools {
        let t = &r.tools;
        let model = if t.demo_model {
            "demo model"
        } else if t.agent_authenticated {
            "authenticated"
        } else {
            "no credentials"
        };
        text.push_str(&format!(
            "  {}: {} {} ({model}); git {}{}\n",
            r.name,
            t.profile,
            t.agent_version.as_deref().unwrap_or("(no version)"),
            t.git_version.as_deref().unwrap_or("missing"),
            if t.forge_token { ", GitHub token" } else { ", no GitHub token" }
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_schemas::jobs::FeedbackResult;
    use serde_json::json;

    const PLAIN: Palette = Palette { color: false };
    const COLOR: Palette = Palette { color: true };

    fn job(kind: &str, extra: Value) -> JobView {
        let mut v = json!({
            "id": "6f1c2d3e-0000-4000-8000-000000000001", "status": "queued", "job_type": kind,
            "prompt": "Add a logout button\nwith care", "title": null, "branch_name": "feature/logout",
            "client": null, "feature": null, "repository": {"id": null, "owner_name": "acme", "repo_name": "shop"},
            "priority": 0, "attempts": 0, "pr_url": null, "error_message": null, "original_job_id": null,
            "created_by_team_member_id": null, "created_at": "2026-01-07T10:00:00.000Z",
            "updated_at": "2026-01-07T10:00:00.000Z", "started_at": null, "completed_at": null
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn ev(seq: u64, body: Value) -> ServerEvent {
        let mut v = body;
        v["seq"] = json!(seq);
        v["timestamp"] = json!("2026-01-07T10:00:05.123Z");
        serde_json::from_value(v).unwrap()
    }

    fn status_ev(seq: u64, status: &str, extra: Value) -> ServerEvent {
        let mut v = json!({"kind": "jobStatus", "jobId": "j", "status": status, "message": format!("job {status}")});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        ev(seq, v)
    }

    #[test]
    fn color_follows_the_tty_and_no_color() {
        assert!(color_enabled(true, None));
        assert!(color_enabled(true, Some("")), "an empty NO_COLOR does not count");
        assert!(!color_enabled(true, Some("1")));
        assert!(!color_enabled(false, None));
    }

    #[test]
    fn without_color_there_is_no_escape_sequence() {
        let mut view = FollowView::new(&job("code", json!({})));
        let events = [
            status_ev(1, "running", json!({})),
            ev(2, json!({"kind": "log", "stream": "stderr", "content": "warn"})),
            ev(3, json!({"kind": "log", "stream": "system", "content": "cloning"})),
            status_ev(4, "failed", json!({"errorMessage": "agent exited 1"})),
        ];
        for e in &events {
            for l in event_lines(&mut view, e, PLAIN) {
                assert!(!l.contains('\x1b'), "{l:?}");
            }
        }
        assert!(!status_line(&view, PLAIN).contains('\x1b'));
        assert!(!final_line(&view, PLAIN).contains('\x1b'));
        let colored = event_lines(&mut view, &events[1], COLOR);
        assert!(colored[0].contains("\x1b[31m"), "stderr is red: {colored:?}");
    }

    #[test]
    fn agent_output_lines_are_shown_with_their_time_and_stripped_of_control_characters() {
        let mut view = FollowView::new(&job("code", json!({})));
        let lines = event_lines(&mut view, &ev(7, json!({"kind": "log", "stream": "stdout", "content": "one\ntwo \x1b[2Jthree\r"})), PLAIN);
        assert_eq!(lines, vec!["10:00:05 one", "10:00:05 two [2Jthree"]);
        assert_eq!(view.last_seq, 7);
        let sys = event_lines(&mut view, &ev(8, json!({"kind": "log", "stream": "system", "content": "pushed"})), PLAIN);
        assert_eq!(sys, vec!["10:00:05 · pushed"]);
        let chat = event_lines(
            &mut view,
            &ev(9, json!({"kind": "stageUpdate", "role": "user", "sender": "ann@example.com", "content": "hi", "metadata": {}})),
            PLAIN,
        );
        assert_eq!(chat, vec!["10:00:05 [user ann@example.com] hi"]);
    }

    #[test]
    fn status_events_update_the_view_and_show_the_pull_request() {
        let mut view = FollowView::new(&job("code", json!({})));
        let lines = event_lines(&mut view, &status_ev(1, "running", json!({})), PLAIN);
        assert_eq!(lines, vec!["10:00:05 ● running job running"]);
        assert_eq!(view.terminal(), None);
        let lines = event_lines(&mut view, &status_ev(2, "completed", json!({"prUrl": "https://github.com/acme/shop/pull/1"})), PLAIN);
        assert_eq!(lines[1], "10:00:05   pull request: https://github.com/acme/shop/pull/1");
        assert_eq!(view.terminal(), Some(JobStatus::Completed));
        assert_eq!(final_line(&view, PLAIN), "job 6f1c2d3e-0000-4000-8000-000000000001 completed: https://github.com/acme/shop/pull/1");
    }

    #[test]
    fn a_failed_job_shows_its_error_once() {
        let mut view = FollowView::new(&job("code", json!({})));
        let lines = event_lines(&mut view, &status_ev(3, "failed", json!({"errorMessage": "agent exited with 1"})), PLAIN);
        assert_eq!(lines, vec!["10:00:05 ● failed job failed", "10:00:05   error: agent exited with 1"]);
        assert!(final_line(&view, PLAIN).ends_with("failed: agent exited with 1"));
    }

    #[test]
    fn ralph_iterations_drive_the_progress_bar() {
        let mut view = FollowView::new(&job("ralph", json!({"max_iterations": 4})));
        event_lines(&mut view, &status_ev(1, "running", json!({})), PLAIN);
        assert_eq!(
            status_line(&view, PLAIN),
            "● running · ralph · iteration 1/4 [░░░░░░░░░░] · job 6f1c2d3e"
        );
        let it = Iteration {
            id: "i".into(),
            iteration_number: 2,
            started_at: "t".into(),
            completed_at: None,
            exit_code: Some(0),
            error: None,
            promise_detected: true,
            output_summary: String::new(),
            feedback_results: vec![
                FeedbackResult { command: "make test".into(), exit_code: 0, passed: true },
                FeedbackResult { command: "make lint".into(), exit_code: 1, passed: false },
            ],
        };
        let body = json!({"kind": "iteration", "iteration": it});
        let lines = event_lines(&mut view, &ev(5, body), PLAIN);
        assert_eq!(lines, vec!["10:00:05 iteration 2/4 finished: exit 0, completion promise detected; make test ✓, make lint ✗"]);
        assert!(status_line(&view, PLAIN).contains("iteration 3/4 [█████░░░░░]"), "{}", status_line(&view, PLAIN));
        view.reconnecting = true;
        assert!(status_line(&view, PLAIN).contains("reconnecting"));
        let line = status_line(&view, COLOR);
        assert_eq!(fitted_status_line(&view, COLOR, 200), line, "fits: kept with its colour");
        let cut = fitted_status_line(&view, COLOR, 30);
        assert_eq!(cut, "● running · ralph · iteratio…");
        assert_eq!(cut.chars().count(), 29);
        event_lines(&mut view, &status_ev(6, "completed", json!({"completionReason": "promise_detected", "totalIterations": 2})), PLAIN);
        assert!(status_line(&view, PLAIN).contains("iteration 2/4"), "{}", status_line(&view, PLAIN));
        assert!(final_line(&view, PLAIN).contains("completed (promise_detected)"));
    }

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(0, 10, 10), "[░░░░░░░░░░]");
        assert_eq!(progress_bar(5, 10, 10), "[█████░░░░░]");
        assert_eq!(progress_bar(12, 10, 4), "[████]");
        assert_eq!(progress_bar(1, 0, 3), "[░░░]");
    }

    #[test]
    fn claude_stream_json_events_render_as_text_tools_and_cost() {
        let mut view = FollowView::new(&job("task", json!({})));
        let init = json!({"kind": "agentEvent", "event": {"type": "system", "subtype": "init", "model": "claude-x", "session_id": "s1"}});
        assert_eq!(event_lines(&mut view, &ev(1, init), PLAIN), vec!["10:00:05 · agent started: model claude-x, session s1"]);
        let assistant = json!({"kind": "agentEvent", "event": {"type": "assistant", "message": {"content": [
            {"type": "text", "text": "Looking.\nDone"},
            {"type": "tool_use", "name": "Bash", "input": {"command": "ls -la"}},
            {"type": "tool_use", "name": "TodoWrite", "input": {}}
        ]}}});
        assert_eq!(
            event_lines(&mut view, &ev(2, assistant), PLAIN),
            vec!["10:00:05 Looking.", "10:00:05 Done", "10:00:05 → Bash ls -la", "10:00:05 → TodoWrite"]
        );
        let tool_result = json!({"kind": "agentEvent", "event": {"type": "user", "message": {"content": []}}});
        assert!(event_lines(&mut view, &ev(3, tool_result), PLAIN).is_empty());
        let result = json!({"kind": "agentEvent", "event": {"type": "result", "total_cost_usd": 0.01234, "num_turns": 3, "duration_ms": 2500, "result": "ok"}});
        assert_eq!(event_lines(&mut view, &ev(4, result), PLAIN), vec!["10:00:05 · agent finished ($0.0123, 3 turns, 2.5 s)"]);
        assert_eq!(view.cost_usd, Some(0.01234));
        assert!(status_line(&view, PLAIN).contains("$0.0123"));
    }

    #[test]
    fn the_job_table_aligns_columns_and_says_when_there_are_more() {
        let a = job("code", json!({"status": "running", "title": "Logout"}));
        let b = job("ralph", json!({"id": "b", "branch_name": "kiln/ralph-b", "repository": null}));
        let t = jobs_table(&[a, b], 5, PLAIN);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("ID                                    STATUS   TYPE   REPOSITORY"), "{t}");
        assert!(lines[1].contains("running  code   acme/shop   feature/logout  2026-01-07 10:00  Logout"), "{t}");
        assert!(lines[2].contains("queued   ralph  -           kiln/ralph-b    2026-01-07 10:00  Add a logout button"), "{t}");
        assert_eq!(lines[3], "2 of 5 jobs (--limit, --offset for more)");
        assert_eq!(jobs_table(&[], 0, PLAIN), "no jobs\n");
    }

    #[test]
    fn messages_render_one_line_each() {
        let msgs: Vec<JobMessage> = serde_json::from_value(json!([
            {"type": "system", "content": "job queued", "created_at": "2026-01-07T10:00:00.000Z"},
            {"type": "stdout", "content": "a\nb", "created_at": "2026-01-07T10:00:01.000Z"}
        ]))
        .unwrap();
        assert_eq!(
            message_lines(&msgs, PLAIN),
            vec!["10:00:00 system     job queued", "10:00:01 stdout     a", "10:00:01 stdout     b"]
        );
    }

    #[test]
    fn details_and_health() {
        let d = job_details(&job("code", json!({"pr_url": "https://x/pull/1"})), PLAIN);
        assert!(d.contains("      status: queued\n"), "{d}");
        assert!(d.contains("pull request: https://x/pull/1"), "{d}");
        assert!(d.ends_with("  Add a logout button\n  with care\n"), "{d}");
        let h: Health = serde_json::from_value(json!({"status": "ok", "queue": {"running": 1, "queued": 2, "maxConcurrent": 2}, "runners": {"connected": 1, "free_slots": 1}})).unwrap();
        assert_eq!(
            health_text(&h, "http://k", PLAIN),
            "http://k: ok\n  queue: 1 running, 2 queued (at most 2 at once)\n  runners: 1 connected, 1 free slot\n"
        );
        let h: Health = serde_json::from_value(json!({"status": "ok", "queue": {"running": 0, "queued": 0, "maxConcurrent": 2},
            "claude": {"authenticated": true, "version": "2.1.328 (Claude Code)", "demoModel": true}, "git": {"authenticated": false},
            "runners": {"connected": 1, "free_slots": 2, "tools": [{"name": "vm", "profile": "claude", "agent_version": "2.1.328 (Claude Code)",
            "agent_authenticated": true, "demo_model": true, "git_version": "2.39.5", "forge_token": false}]}})).unwrap();
        assert!(
            health_text(&h, "http://k", PLAIN).ends_with("  vm: claude 2.1.328 (Claude Code) (demo model); git 2.39.5, no GitHub token\n"),
            "{}",
            health_text(&h, "http://k", PLAIN)
        );
    }

    #[test]
    fn iteration_lists() {
        let list: IterationList = serde_json::from_value(json!({
            "jobId": "j", "currentIteration": 2, "maxIterations": 5, "completionReason": "manual_stop",
            "iterations": [
                {"id": "a", "iterationNumber": 1, "startedAt": "t", "completedAt": "t", "exitCode": 0, "error": null,
                 "promiseDetected": false, "outputSummary": "line 1\nline 8\n", "feedbackResults": []},
                {"id": "b", "iterationNumber": 2, "startedAt": "t", "completedAt": null, "exitCode": null, "error": "killed",
                 "promiseDetected": false, "outputSummary": "", "feedbackResults": []}
            ]
        }))
        .unwrap();
        assert_eq!(
            iterations_text(&list, PLAIN),
            "iteration 2 of at most 5, ended by manual_stop\niteration 1/5 finished: exit 0\n  line 8\niteration 2/5 finished: no exit code, error: killed\n"
        );
    }

    #[test]
    fn clocks_and_truncation() {
        assert_eq!(clock("2026-01-07T10:11:12.000Z"), "10:11:12");
        assert_eq!(clock("soon"), "soon");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
