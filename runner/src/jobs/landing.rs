//! The landing-page kinds (`landing_init`, `landing_chat`; seed 001, issue 9): a graph of nodes on
//! the pipeline engine over the session's workspace, a git repository kept at the edge as a
//! bundle between jobs.
//!
//! `router` (LLM) → `design_planner` (LLM, `design/guidelines.json`) → `designer` (LLM,
//! `design/spec.md`) → `coder` (agent run; `coder_tools` tool events from git status) →
//! `build_check` (a sh script in the sandbox) → `deployer` (the page's files to the edge's
//! preview), or on a failed check `deployment_fixer` (agent run) and `build_check` again, at most
//! [`MAX_FIX_ATTEMPTS`] times. An init job always designs; a chat job follows the router: `code`
//! skips the design nodes (the stored design is used), `deploy` goes to the check, `clarify` ends
//! the job with the router's question. Every node says `node` when it starts and `node_completed`
//! (or `error`) when it ends; LLM nodes put their usage in `node_completed`'s data. After the job
//! (completed, or failed with changes) the workspace is committed and its bundle kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use kiln_schemas::landing::{
    preview_path, PreviewBundle, PreviewFile, MAX_FIX_ATTEMPTS, MAX_PREVIEW_BYTES,
};
use kiln_schemas::runner::{LandingParams, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::app_build::fenced_json;
use super::run::{failed, JobRun};
use super::JobControl;
use crate::edge::EdgeError;
use crate::pipeline::{LlmStep, Pipeline, StepError};
use crate::workspace::Changes;

/// Where the design planner's guidelines and the designer's spec live in the workspace.
pub const GUIDELINES_FILE: &str = "design/guidelines.json";
pub const SPEC_FILE: &str = "design/spec.md";
/// Answers asked for when the router's or the planner's cannot be used (the first and one more).
const ANSWER_ATTEMPTS: u32 = 2;
/// Errors of a check kept in an event's data.
const MAX_ERRORS: usize = 50;

/// `build_check`: a POSIX sh script run in the sandbox (`sh -c`) in the workspace. One
/// `ERROR: …` line per problem, exit 1 on any.
pub const BUILD_CHECK: &str = r#"f=index.html
n=0
if [ ! -s "$f" ]; then echo "ERROR: index.html is missing or empty"; exit 1; fi
grep -qi '<html' "$f" || { echo "ERROR: index.html has no <html> tag"; n=1; }
grep -qi '</html>' "$f" || { echo "ERROR: index.html has no </html> closing tag"; n=1; }
grep -qi '<title' "$f" || { echo "ERROR: index.html has no <title>"; n=1; }
missing=$(grep -oiE '(href|src)="[^"]*"' "$f" | sed -E 's/^[^"]*"//; s/"$//' | while IFS= read -r ref; do
  case "$ref" in ''|'#'*|*:*|//*|/*) continue ;; esac
  p=${ref%%#*}; p=${p%%\?*}
  [ -z "$p" ] && continue
  case "/$p/" in */../*) echo "ERROR: index.html references $p, outside the page"; continue ;; esac
  [ -e "$p" ] || echo "ERROR: index.html references $p, which does not exist"
done)
if [ -n "$missing" ]; then printf '%s\n' "$missing"; n=1; fi
[ "$n" -eq 0 ] && echo "OK: index.html builds"
exit "$n"
"#;

const ROUTER_SYSTEM: &str = "You route a landing-page session's request to the next step of its graph. Answer with one fenced ```json block: {\"route\": \"design\" | \"code\" | \"clarify\" | \"deploy\", \"reason\": \"...\"}. design: plan and design the page (a new page, or a new look); code: change the page within its current design; clarify: the request cannot be acted on without an answer from the user (put the question to ask in reason); deploy: publish the page as it is.";

const PLANNER_SYSTEM: &str = "You plan a landing page's design from its brief. Answer with one fenced ```json block holding one object: {\"theme\": \"light\" or \"dark\" or another name, \"colors\": [{\"name\": ..., \"hex\": ..., \"usage\": ...}], \"typography\": [{\"role\": ..., \"font\": ..., \"size\": ...}], \"sections\": [{\"id\": ..., \"title\": ..., \"purpose\": ...}], \"animations\": [{\"name\": ..., \"target\": ...}]}. Follow the brief's branding and the sections it asks for.";

const DESIGNER_SYSTEM: &str = "You are a landing-page designer. From the brief and the design guidelines, write the page's design spec in markdown: the layout, each section's content and copy, the colors and type as used, interactions and animations. Answer with the markdown only.";

/// Where the router sends a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Design,
    Code,
    Clarify,
    Deploy,
}

impl Route {
    pub fn parse(s: &str) -> Option<Route> {
        match s.trim().to_ascii_lowercase().as_str() {
            "design" => Some(Route::Design),
            "code" => Some(Route::Code),
            "clarify" => Some(Route::Clarify),
            "deploy" => Some(Route::Deploy),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Design => "design",
            Route::Code => "code",
            Route::Clarify => "clarify",
            Route::Deploy => "deploy",
        }
    }
}

/// What the session's workspace holds, as the router is told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionState {
    pub has_page: bool,
    pub has_guidelines: bool,
    pub has_spec: bool,
}

impl SessionState {
    fn read(dir: &Path) -> SessionState {
        let nonempty =
            |p: &str| std::fs::metadata(dir.join(p)).is_ok_and(|m| m.is_file() && m.len() > 0);
        SessionState {
            has_page: nonempty("index.html"),
            has_guidelines: nonempty(GUIDELINES_FILE),
            has_spec: nonempty(SPEC_FILE),
        }
    }

    fn describe(&self) -> String {
        let has = |b: bool| if b { "present" } else { "absent" };
        format!(
            "index.html: {}; {GUIDELINES_FILE}: {}; {SPEC_FILE}: {}",
            has(self.has_page),
            has(self.has_guidelines),
            has(self.has_spec)
        )
    }
}

/// The router's answer: its route and reason (a clarification's question).
pub fn parse_route(text: &str) -> Result<(Route, String), String> {
    let body = fenced_json(text).map(|(_, b)| b).unwrap_or(text);
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the answer is not a fenced ```json object: {e}"))?;
    let route = v
        .get("route")
        .and_then(Value::as_str)
        .ok_or("the answer has no \"route\"")?;
    let route = Route::parse(route)
        .ok_or_else(|| format!("route {route:?} is not one of design, code, clarify, deploy"))?;
    let reason = v
        .get("reason")
        .or_else(|| v.get("question"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string();
    if route == Route::Clarify && reason.is_empty() {
        return Err("a clarify route needs the question in \"reason\"".into());
    }
    Ok((route, reason))
}

/// The route a job takes: an init job designs; a chat job takes the router's, except that
/// code without a stored design designs first and deploy without a page codes it first.
pub fn effective_route(init: bool, asked: Route, state: SessionState) -> Route {
    if init {
        return Route::Design;
    }
    let designed = state.has_guidelines && state.has_spec;
    match asked {
        Route::Code if !designed => Route::Design,
        Route::Deploy if !state.has_page => {
            if designed {
                Route::Code
            } else {
                Route::Design
            }
        }
        r => r,
    }
}

/// The design planner's guidelines, checked: an object whose `colors`, `typography`,
/// `sections` and `animations` are arrays (sections not empty) and `theme` a string.
pub fn parse_guidelines(text: &str) -> Result<Value, String> {
    let body = fenced_json(text).map(|(_, b)| b).unwrap_or(text);
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the guidelines are not a fenced ```json object: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("the guidelines must be a JSON object")?;
    match obj.get("theme") {
        Some(Value::String(_)) => {}
        _ => return Err("\"theme\" must be a string".into()),
    }
    for k in ["colors", "typography", "sections", "animations"] {
        if !obj.get(k).is_some_and(Value::is_array) {
            return Err(format!("\"{k}\" must be an array"));
        }
    }
    if obj["sections"].as_array().is_some_and(Vec::is_empty) {
        return Err("\"sections\" may not be empty".into());
    }
    Ok(v)
}

/// `node_completed` data of the planner: the theme and the counts.
pub fn guideline_counts(g: &Value) -> Value {
    let count = |k: &str| g.get(k).and_then(Value::as_array).map_or(0, Vec::len);
    json!({
        "theme": g.get("theme").cloned().unwrap_or(Value::Null),
        "color_count": count("colors"),
        "typography_count": count("typography"),
        "section_count": count("sections"),
        "animation_count": count("animations"),
    })
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(render).collect::<Vec<_>>().join(", "),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}: {}", render(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The init payload as lines `section.field: value` (unknown fields too), for the prompts.
pub fn payload_summary(payload: &Value) -> String {
    let Some(m) = payload.as_object() else {
        return "(no brief)".into();
    };
    let mut lines = Vec::new();
    for (section, v) in m {
        match v {
            Value::Object(fields) => {
                for (field, v) in fields {
                    let r = render(v);
                    if !r.is_empty() {
                        lines.push(format!("{section}.{field}: {r}"));
                    }
                }
            }
            other => {
                let r = render(other);
                if !r.is_empty() {
                    lines.push(format!("{section}: {r}"));
                }
            }
        }
    }
    if lines.is_empty() {
        "(an empty brief)".into()
    } else {
        lines.join("\n")
    }
}

/// The request a job carries: the brief (init) or the user's message and the brief (chat).
fn request_text(p: &LandingParams) -> String {
    let brief = payload_summary(&p.payload);
    match &p.message {
        Some(m) => format!(
            "The user's request: {}\n\nThe page's brief:\n{brief}",
            m.trim()
        ),
        None => format!("Build a new landing page from this brief:\n{brief}"),
    }
}

/// A commit's subject: `<job kind>: <short request>`.
pub fn commit_subject(kind: JobType, p: &LandingParams) -> String {
    let short = match &p.message {
        Some(m) => m
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string(),
        None => ["productName", "objective"]
            .iter()
            .find_map(|k| p.payload.get("campaign")?.get(*k)?.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "a new landing page".into()),
    };
    let mut s: String = short.chars().take(60).collect();
    if short.chars().count() > 60 {
        s.push('…');
    }
    format!("{}: {s}", kind.as_str())
}

/// The coder's prompt (`Landing node: coder` first).
pub fn coder_prompt(request: &str, spec: &str, guidelines: &str) -> String {
    format!(
        "Landing node: coder\n{request}\n\nThe design spec ({SPEC_FILE}):\n{spec}\n\nThe design guidelines ({GUIDELINES_FILE}):\n{guidelines}\n\nWrite or update the landing page in the current directory (/app): index.html with its assets beside it (styles.css, script.js), referenced by relative paths, a static page that works from any URL path. Leave design/ as it is.\n"
    )
}

/// The fixer's prompt (`Landing node: deployment_fixer`, `Fix attempt: n` first).
pub fn fixer_prompt(attempt: u32, request: &str, errors: &[String]) -> String {
    format!(
        "Landing node: deployment_fixer\nFix attempt: {attempt}\nThe page in the current directory (/app) does not pass its build check. The check's errors:\n{}\n\nFix them (index.html must exist with <html>, </html> and a <title>, and every relative href or src must name a file of the page). What the page was built for:\n{request}\n",
        errors.iter().map(|e| format!("- {e}")).collect::<Vec<_>>().join("\n")
    )
}

/// The page's files to publish: every regular file of the workspace but `.git`, `design/` and
/// hidden ones (no symbolic link followed), text as is and the rest in base64, sorted by path;
/// refused over `MAX_PREVIEW_BYTES`.
pub fn collect_preview(dir: &Path) -> Result<(PreviewBundle, u64), String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let ty = e.file_type()?;
            if ty.is_dir() {
                if dir == root && name == "design" {
                    continue;
                }
                walk(root, &path, out)?;
            } else if ty.is_file() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths).map_err(|e| format!("reading the workspace failed: {e}"))?;
    let mut files = Vec::new();
    let mut total: u64 = 0;
    for p in paths {
        let rel = p
            .strip_prefix(dir)
            .expect("walked under dir")
            .to_string_lossy()
            .replace(std::path::MAIN_SEPARATOR, "/");
        if preview_path(&rel).ok().as_deref() != Some(rel.as_str()) {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| format!("reading {rel} failed: {e}"))?;
        total += bytes.len() as u64;
        if total > MAX_PREVIEW_BYTES as u64 {
            return Err(format!(
                "the page's files are over {MAX_PREVIEW_BYTES} bytes, the most a preview holds"
            ));
        }
        let file = match String::from_utf8(bytes) {
            Ok(text) => PreviewFile {
                path: rel,
                content: text,
                base64: false,
            },
            Err(e) => PreviewFile {
                path: rel,
                content: base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
                base64: true,
            },
        };
        files.push(file);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if !files.iter().any(|f| f.path == "index.html") {
        return Err("the page has no index.html".into());
    }
    Ok((PreviewBundle { files }, total))
}

/// What an edge error says to a user: the status and the edge's words, never a URL (it holds
/// the lease).
fn edge_reason(e: &EdgeError) -> String {
    match e {
        EdgeError::Status { status, body, .. } => format!("the edge answered {status}: {body}"),
        EdgeError::Http { .. } => "the edge could not be reached".into(),
    }
}

fn node(p: &Pipeline, node: &str, event_type: &str, message: impl Into<String>, data: Value) {
    p.emit(RunnerEvent::Node {
        node: node.into(),
        event_type: event_type.into(),
        message: message.into(),
        data,
    });
}

/// Runs a landing job; answers its `finished` event.
pub(super) async fn run(
    job: &mut JobRun,
    controls: mpsc::UnboundedReceiver<JobControl>,
) -> RunnerEvent {
    let Some(params) = job.assignment.landing.clone() else {
        return failed("The assignment of this landing job carries no landing parameters");
    };
    let s = job.services.clone();
    let job_id = job.job_id().to_string();
    let lease_id = job.assignment.lease_id.clone();

    let t = Instant::now();
    let bundle = match s.edge.get_bundle(&job_id, &lease_id).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(job_id, error = %e, "fetching the session's bundle failed");
            return failed(format!(
                "Fetching the session's workspace failed: {}",
                edge_reason(&e)
            ));
        }
    };
    let (wt, commits) = match s
        .workspaces
        .create_session_workspace(&job_id, bundle.as_deref())
        .await
    {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(job_id, error = %e, "preparing the session's workspace failed");
            return failed(
                "Preparing the session's workspace failed: its bundle could not be restored",
            );
        }
    };
    let path = wt.path.clone();
    job.worktree = Some(wt);
    job.sink
        .system(match &bundle {
            Some(b) => format!(
                "Session workspace restored from its bundle ({} bytes, {commits} commit(s)) in {} ms",
                b.len(),
                t.elapsed().as_millis()
            ),
            None => format!(
                "Session workspace ready (a new git repository: the session has no bundle yet) in {} ms",
                t.elapsed().as_millis()
            ),
        })
        .await;
    if let Err(f) = job.prepare_sandbox(&path).await {
        return f;
    }

    let job = &*job;
    let mut pipeline = job.pipeline(controls, false);
    let graph = Landing {
        job,
        request: request_text(&params),
        init: params.message.is_none(),
        params: &params,
        dir: path,
    }
    .run(&mut pipeline);
    job.within_workspace_limit(graph).await
}

struct Landing<'a> {
    job: &'a JobRun,
    params: &'a LandingParams,
    request: String,
    init: bool,
    dir: PathBuf,
}

/// How the graph ended before its workspace is kept.
enum End {
    Published { preview_url: String },
    Clarify { question: String },
    Failed(String),
}

impl Landing<'_> {
    async fn run(self, p: &mut Pipeline) -> RunnerEvent {
        let end = self.graph(p).await;
        self.finish(p, end).await
    }

    async fn graph(&self, p: &mut Pipeline) -> End {
        // router
        let state = SessionState::read(&self.dir);
        node(p, "router", "node", "Planning next steps...", json!({}));
        let prompt = format!(
            "Job: {}\n{}\n\nThe session's workspace: {}.",
            if self.init {
                "init (a new page)"
            } else {
                "chat (a follow-up on the session's page)"
            },
            self.request,
            state.describe()
        );
        let init = self.init;
        let asked = p
            .llm(
                LlmStep::new("router", "router", ROUTER_SYSTEM, prompt).attempts(ANSWER_ATTEMPTS),
                |text| match parse_route(text) {
                    Ok(r) => Ok((r, vec![])),
                    // An init job designs whatever the router says.
                    Err(e) if init => Ok((
                        (
                            Route::Design,
                            format!("(its answer could not be read: {e})"),
                        ),
                        vec![],
                    )),
                    Err(e) => Err(e),
                },
            )
            .await;
        let (asked, reason) = match asked {
            Ok(r) => r,
            Err(e) => return self.step_failed(p, "router", e),
        };
        let route = effective_route(self.init, asked, state);
        let message = if self.init {
            format!(
                "Init job: starting with the design (the router said {}: {reason})",
                asked.as_str()
            )
        } else if route != asked {
            format!(
                "Routed to {} (the router said {}, but the session has {}): {reason}",
                route.as_str(),
                asked.as_str(),
                if route == Route::Design {
                    "no stored design"
                } else {
                    "no page yet"
                }
            )
        } else {
            format!("Routed to {}: {reason}", route.as_str())
        };
        node(
            p,
            "router",
            "node_completed",
            message,
            json!({"route": route.as_str(), "router_route": asked.as_str(), "reason": reason, "usage": p.last_step_cost().to_json()}),
        );
        if route == Route::Clarify {
            node(
                p,
                "router",
                "clarify",
                reason.clone(),
                json!({"reply": reason}),
            );
            return End::Clarify { question: reason };
        }

        if route == Route::Design {
            if let Err(end) = self.design(p).await {
                return end;
            }
        }
        let mut iteration = 1;
        if route != Route::Deploy {
            if let Err(end) = self.code(p).await {
                return end;
            }
        }

        let mut errors = self.check(p, iteration).await;
        let mut attempt = 0;
        while !errors.is_empty() {
            if attempt == MAX_FIX_ATTEMPTS {
                let first: Vec<&str> = errors.iter().take(3).map(String::as_str).collect();
                return End::Failed(format!(
                    "the page does not build after {MAX_FIX_ATTEMPTS} fix attempts: {}",
                    first.join("; ")
                ));
            }
            attempt += 1;
            iteration += 1;
            self.fix(p, attempt, iteration, &errors).await;
            errors = self.check(p, iteration).await;
        }

        p.checkpoint("deployer").await;
        self.deploy(p).await
    }

    fn step_failed(&self, p: &Pipeline, name: &str, e: StepError) -> End {
        node(
            p,
            name,
            "error",
            e.message(),
            json!({"usage": p.last_step_cost().to_json()}),
        );
        End::Failed(match e {
            StepError::Budget(m) => m,
            StepError::Failed(m) => format!("the {name} node failed: {m}"),
        })
    }

    async fn write(&self, rel: &str, content: &str) -> Result<(), String> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("creating {rel}'s directory failed: {e}"))?;
        }
        tokio::fs::write(&path, content)
            .await
            .map_err(|e| format!("writing {rel} failed: {e}"))
    }

    async fn read(&self, rel: &str) -> String {
        tokio::fs::read_to_string(self.dir.join(rel))
            .await
            .unwrap_or_default()
    }

    /// `design_planner` then `designer`.
    async fn design(&self, p: &mut Pipeline) -> Result<(), End> {
        // A paused job stops before it announces the next node.
        p.checkpoint("design_planner").await;
        node(
            p,
            "design_planner",
            "node",
            "Planning the design guidelines...",
            json!({}),
        );
        let mut prompt = format!("{}\n\nPlan the page's design guidelines.", self.request);
        let stored = self.read(GUIDELINES_FILE).await;
        if !stored.is_empty() {
            prompt.push_str(&format!("\n\nThe session's current guidelines (change what the request asks for):\n{stored}"));
        }
        let guidelines = p
            .llm(
                LlmStep::new("design_planner", "design_planner", PLANNER_SYSTEM, prompt)
                    .attempts(ANSWER_ATTEMPTS),
                |text| Ok((parse_guidelines(text)?, vec![])),
            )
            .await
            .map_err(|e| self.step_failed(p, "design_planner", e))?;
        let pretty = serde_json::to_string_pretty(&guidelines).expect("a value serializes");
        if let Err(e) = self.write(GUIDELINES_FILE, &format!("{pretty}\n")).await {
            node(p, "design_planner", "error", e.clone(), json!({}));
            return Err(End::Failed(format!("the design_planner node failed: {e}")));
        }
        let mut data = guideline_counts(&guidelines);
        data["file"] = json!(GUIDELINES_FILE);
        data["usage"] = p.last_step_cost().to_json();
        node(
            p,
            "design_planner",
            "node_completed",
            format!(
                "Design planner generated design guidelines: theme {}, {} sections, {} colors.",
                render(&data["theme"]),
                data["section_count"],
                data["color_count"]
            ),
            data,
        );

        // A paused job stops before it announces the next node.
        p.checkpoint("designer").await;
        node(
            p,
            "designer",
            "node",
            "Writing the design spec...",
            json!({}),
        );
        let mut prompt = format!(
            "{}\n\nThe design guidelines ({GUIDELINES_FILE}):\n{pretty}\n\nWrite the design spec.",
            self.request
        );
        let stored = self.read(SPEC_FILE).await;
        if !stored.is_empty() {
            prompt.push_str(&format!(
                "\n\nThe session's current spec (keep what the request does not change):\n{stored}"
            ));
        }
        let spec = p
            .llm(
                LlmStep::new("designer", "designer", DESIGNER_SYSTEM, prompt),
                |text| {
                    let t = text.trim();
                    if t.is_empty() {
                        return Err("the design spec is empty".into());
                    }
                    Ok((t.to_string(), vec![]))
                },
            )
            .await
            .map_err(|e| self.step_failed(p, "designer", e))?;
        if let Err(e) = self.write(SPEC_FILE, &format!("{spec}\n")).await {
            node(p, "designer", "error", e.clone(), json!({}));
            return Err(End::Failed(format!("the designer node failed: {e}")));
        }
        node(
            p,
            "designer",
            "node_completed",
            format!("Designer wrote the design spec ({} bytes).", spec.len() + 1),
            json!({"file": SPEC_FILE, "bytes": spec.len() + 1, "usage": p.last_step_cost().to_json()}),
        );
        Ok(())
    }

    /// Stages the workspace: the next [`Landing::changes`] compares with it.
    async fn baseline(&self, p: &Pipeline) {
        let job = self.job;
        if let Err(e) = job.services.workspaces.stage_all(job.worktree()).await {
            p.system(format!("Staging the workspace failed: {e}"));
        }
    }

    async fn changes(&self, p: &Pipeline) -> Changes {
        let job = self.job;
        match job.services.workspaces.changes(job.worktree()).await {
            Ok(c) => c,
            Err(e) => {
                p.system(format!("Reading the workspace's changes failed: {e}"));
                Changes::default()
            }
        }
    }

    /// `tool` events of a node's changes (names, never contents).
    fn tool_events(p: &Pipeline, name: &str, c: &Changes) {
        for (verb, tool, files) in [
            ("Created", "write_file", &c.created),
            ("Updated", "edit_file", &c.updated),
            ("Deleted", "delete_file", &c.deleted),
        ] {
            if files.is_empty() {
                continue;
            }
            node(
                p,
                name,
                "tool",
                format!("{verb} {} file(s)", files.len()),
                json!({"tool": tool, "count": files.len(), "files": files}),
            );
        }
    }

    /// `coder`: one agent run, then its `coder_tools` events.
    async fn code(&self, p: &mut Pipeline) -> Result<(), End> {
        let spec = self.read(SPEC_FILE).await;
        let guidelines = self.read(GUIDELINES_FILE).await;
        // A paused job stops before it announces the next node.
        p.checkpoint("coder").await;
        node(
            p,
            "coder",
            "node",
            "Coder is writing the page...",
            json!({}),
        );
        self.baseline(p).await;
        let r = p
            .agent(
                self.job,
                "coder",
                &coder_prompt(&self.request, spec.trim(), guidelines.trim()),
                1,
            )
            .await;
        let c = self.changes(p).await;
        Self::tool_events(p, "coder_tools", &c);
        if !r.succeeded() {
            let why = r.failure("the coder's agent");
            node(
                p,
                "coder",
                "error",
                why.clone(),
                json!({"summary": r.summary}),
            );
            return Err(End::Failed(format!("the coder node failed: {why}")));
        }
        node(
            p,
            "coder",
            "node_completed",
            "Coder completed implementation pass.",
            json!({"files_created": c.created.len(), "files_updated": c.updated.len(), "files_deleted": c.deleted.len()}),
        );
        Ok(())
    }

    /// `build_check`: the script in the sandbox; the errors it found (none: it passed).
    async fn check(&self, p: &mut Pipeline, iteration: u32) -> Vec<String> {
        // A paused job stops before it announces the next node.
        p.checkpoint("build_check").await;
        node(
            p,
            "build_check",
            "node",
            "Checking that the page builds...",
            json!({}),
        );
        let mut errors = Vec::new();
        let r = p
            .command_observed(self.job, "build_check", BUILD_CHECK, iteration, |line| {
                if let Some(e) = line.strip_prefix("ERROR: ") {
                    errors.push(e.trim().to_string());
                }
            })
            .await;
        if r.succeeded() && errors.is_empty() {
            node(
                p,
                "build_check",
                "node_completed",
                "Build check passed.",
                json!({"passed": true, "errors": []}),
            );
            return errors;
        }
        if errors.is_empty() {
            errors.push(r.failure("the build check"));
        }
        let count = errors.len();
        errors.truncate(MAX_ERRORS);
        node(
            p,
            "build_check",
            "error",
            format!("Build check found {count} problem(s): {}", errors[0]),
            json!({"passed": false, "errors": errors, "error_count": count}),
        );
        errors
    }

    /// `deployment_fixer`: one attempt (an agent run with the errors).
    async fn fix(&self, p: &mut Pipeline, attempt: u32, iteration: u32, errors: &[String]) {
        // A paused job stops before it announces the next node.
        p.checkpoint("deployment_fixer").await;
        node(
            p,
            "deployment_fixer",
            "node",
            format!(
                "Fix attempt {attempt} of {MAX_FIX_ATTEMPTS}: fixing {} problem(s)",
                errors.len()
            ),
            json!({"attempt": attempt, "max_attempts": MAX_FIX_ATTEMPTS, "errors": errors}),
        );
        self.baseline(p).await;
        let r = p
            .agent(
                self.job,
                &format!("deployment_fixer, attempt {attempt}"),
                &fixer_prompt(attempt, &self.request, errors),
                iteration,
            )
            .await;
        let c = self.changes(p).await;
        Self::tool_events(p, "deployment_fixer_tools", &c);
        let files = json!({"created": c.created, "updated": c.updated, "deleted": c.deleted});
        if r.succeeded() {
            node(
                p,
                "deployment_fixer",
                "node_completed",
                format!(
                    "Fix attempt {attempt} changed {} file(s); checking again.",
                    c.created.len() + c.updated.len() + c.deleted.len()
                ),
                json!({"attempt": attempt, "files": files}),
            );
        } else {
            let why = r.failure("the fixer's agent");
            node(
                p,
                "deployment_fixer",
                "error",
                format!("Fix attempt {attempt}: {why}"),
                json!({"attempt": attempt, "files": files}),
            );
        }
    }

    /// `deployer`: the page's files to the edge's preview.
    async fn deploy(&self, p: &mut Pipeline) -> End {
        node(p, "deployer", "node", "Publishing the page...", json!({}));
        let dir = self.dir.clone();
        let collected = tokio::task::spawn_blocking(move || collect_preview(&dir))
            .await
            .unwrap_or_else(|e| Err(format!("reading the page failed: {e}")));
        let (bundle, bytes) = match collected {
            Ok(c) => c,
            Err(e) => {
                node(p, "deployer", "error", e.clone(), json!({}));
                return End::Failed(format!("the deployer node failed: {e}"));
            }
        };
        let job = self.job;
        let t = Instant::now();
        match job
            .services
            .edge
            .put_preview(job.job_id(), &job.assignment.lease_id, &bundle)
            .await
        {
            Ok(published) => {
                node(
                    p,
                    "deployer",
                    "node_completed",
                    format!(
                        "Deployer published {} file(s) at {}",
                        published.files, published.preview_url
                    ),
                    json!({"preview_url": published.preview_url, "files": published.files, "bytes": published.bytes, "publish_ms": t.elapsed().as_millis() as u64}),
                );
                End::Published {
                    preview_url: published.preview_url,
                }
            }
            Err(e) => {
                tracing::warn!(job_id = job.job_id(), error = %e, files = bundle.files.len(), bytes, "publishing the preview failed");
                let why = format!("publishing the preview failed: {}", edge_reason(&e));
                node(p, "deployer", "error", why.clone(), json!({}));
                End::Failed(format!("the deployer node failed: {why}"))
            }
        }
    }

    /// Commits the workspace and keeps its bundle (a failed job's too, when it changed
    /// something), then answers the `finished` event.
    async fn finish(&self, p: &mut Pipeline, end: End) -> RunnerEvent {
        let job = self.job;
        let ws = &job.services.workspaces;
        let subject = commit_subject(job.assignment.job_type, self.params);
        let mut end = end;
        match ws
            .commit_all(
                job.worktree(),
                &format!("{subject}\n\nKiln job {}", job.job_id()),
            )
            .await
        {
            Ok(None) => {
                p.system("Nothing changed in the session's workspace: its bundle stays as it was")
            }
            Ok(Some(sha)) => {
                p.system(format!(
                    "Committed {} ({subject})",
                    &sha[..sha.len().min(12)]
                ));
                let t = Instant::now();
                let kept = match ws.bundle(job.worktree()).await {
                    Ok(Some(bytes)) => {
                        let n = bytes.len();
                        job.services
                            .edge
                            .put_bundle(job.job_id(), &job.assignment.lease_id, bytes)
                            .await
                            .map(|()| n)
                            .map_err(|e| edge_reason(&e))
                    }
                    Ok(None) => Err("the workspace has no commit".to_string()),
                    Err(e) => {
                        tracing::warn!(job_id = job.job_id(), error = %e, "bundling the session's workspace failed");
                        Err("its bundle could not be made".to_string())
                    }
                };
                match kept {
                    Ok(n) => p.system(format!(
                        "Session workspace kept at the edge ({n} bytes) in {} ms",
                        t.elapsed().as_millis()
                    )),
                    Err(why) => {
                        p.system(format!("Keeping the session's workspace failed: {why}"));
                        if !matches!(end, End::Failed(_)) {
                            end = End::Failed(format!(
                                "keeping the session's workspace failed: {why}"
                            ));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(job_id = job.job_id(), error = %e, "committing the session's workspace failed");
                p.system("Committing the session's workspace failed");
                if !matches!(end, End::Failed(_)) {
                    end = End::Failed("committing the session's workspace failed".into());
                }
            }
        }
        let sections = serde_json::from_str::<Value>(&self.read(GUIDELINES_FILE).await)
            .ok()
            .and_then(|g| g.get("sections").cloned())
            .unwrap_or_else(|| json!([]));
        let mut result = Map::new();
        result.insert("landing_page_id".into(), json!(self.params.landing_page_id));
        result.insert("sections".into(), sections);
        let (outcome, message, error) = match end {
            End::Published { preview_url } => {
                let m = format!("Landing page published at {preview_url}");
                result.insert("preview_url".into(), json!(preview_url));
                (Outcome::Completed, m, None)
            }
            End::Clarify { question } => {
                result.insert("preview_url".into(), Value::Null);
                result.insert("reply".into(), json!(question));
                (
                    Outcome::Completed,
                    format!("The request needs an answer first: {question}"),
                    None,
                )
            }
            End::Failed(why) => {
                result.insert("preview_url".into(), Value::Null);
                (Outcome::Failed, why.clone(), Some(why))
            }
        };
        RunnerEvent::Finished {
            outcome,
            message,
            pr_url: None,
            completion_reason: None,
            total_iterations: None,
            error_message: error,
            result: Some(Value::Object(result)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_init_always_designs() {
        let (r, why) = parse_route(
            "Sure.\n```json\n{\"route\": \"Code\", \"reason\": \"a copy change\"}\n```",
        )
        .unwrap();
        assert_eq!((r, why.as_str()), (Route::Code, "a copy change"));
        assert!(parse_route("{\"route\": \"paint\"}")
            .unwrap_err()
            .contains("paint"));
        assert!(parse_route("{\"route\": \"clarify\"}")
            .unwrap_err()
            .contains("question"));
        assert!(parse_route("no json").is_err());
        let all = SessionState {
            has_page: true,
            has_guidelines: true,
            has_spec: true,
        };
        let none = SessionState::default();
        assert_eq!(effective_route(true, Route::Code, all), Route::Design);
        assert_eq!(effective_route(false, Route::Code, all), Route::Code);
        assert_eq!(effective_route(false, Route::Code, none), Route::Design);
        assert_eq!(effective_route(false, Route::Deploy, all), Route::Deploy);
        assert_eq!(
            effective_route(
                false,
                Route::Deploy,
                SessionState {
                    has_page: false,
                    ..all
                }
            ),
            Route::Code
        );
        assert_eq!(effective_route(false, Route::Clarify, none), Route::Clarify);
    }

    #[test]
    fn guidelines_are_checked_and_counted() {
        let g = parse_guidelines("```json\n{\"theme\": \"dark\", \"colors\": [1, 2], \"typography\": [1], \"sections\": [\"hero\", \"cta\"], \"animations\": []}\n```").unwrap();
        assert_eq!(
            guideline_counts(&g),
            json!({"theme": "dark", "color_count": 2, "typography_count": 1, "section_count": 2, "animation_count": 0})
        );
        assert!(parse_guidelines("{\"theme\": \"x\", \"colors\": [], \"typography\": [], \"sections\": [], \"animations\": []}").unwrap_err().contains("sections"));
        assert!(parse_guidelines("{\"theme\": \"x\", \"colors\": {}, \"typography\": [], \"sections\": [1], \"animations\": []}").unwrap_err().contains("colors"));
    }

    #[test]
    fn prompts_lead_with_their_node() {
        let c = coder_prompt("Build it", "# Spec", "{}");
        assert_eq!(c.lines().next(), Some("Landing node: coder"));
        let f = fixer_prompt(2, "Build it", &["index.html has no <title>".into()]);
        let mut lines = f.lines();
        assert_eq!(lines.next(), Some("Landing node: deployment_fixer"));
        assert_eq!(lines.next(), Some("Fix attempt: 2"));
        assert!(f.contains("- index.html has no <title>"));
    }

    #[test]
    fn briefs_and_subjects() {
        let payload = json!({"campaign": {"productName": "Aurora", "objective": "signups"}, "branding": {"sections": ["hero", "faq"], "colorPalette": {"primary": "#7C3AED"}}, "extra": 3});
        let s = payload_summary(&payload);
        assert!(s.contains("campaign.productName: Aurora"), "{s}");
        assert!(s.contains("branding.sections: hero, faq"), "{s}");
        assert!(s.contains("branding.colorPalette: primary: #7C3AED"), "{s}");
        assert!(s.contains("extra: 3"), "{s}");
        let init = LandingParams {
            session_id: "s".into(),
            landing_page_id: "p".into(),
            payload,
            message: None,
        };
        assert_eq!(
            commit_subject(JobType::LandingInit, &init),
            "landing_init: Aurora"
        );
        let chat = LandingParams {
            message: Some(format!("\n{}\nmore", "x".repeat(70))),
            ..init
        };
        assert_eq!(
            commit_subject(JobType::LandingChat, &chat),
            format!("landing_chat: {}…", "x".repeat(60))
        );
    }

    /// Runs [`BUILD_CHECK`] with `sh -c` in `dir`: (exit code, stdout lines).
    fn check(dir: &Path) -> (i32, Vec<String>) {
        let out = std::process::Command::new("sh")
            .args(["-c", BUILD_CHECK])
            .current_dir(dir)
            .output()
            .unwrap();
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        (out.status.code().unwrap(), lines)
    }

    #[test]
    fn the_build_check_names_each_problem() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        assert_eq!(
            check(p),
            (1, vec!["ERROR: index.html is missing or empty".to_string()])
        );
        std::fs::write(
            p.join("index.html"),
            "<!doctype html><html><head><title>A</title><link rel=\"stylesheet\" href=\"styles.css\"><link href=\"https://x.example/a.css\"></head>\n<body><a href=\"#top\">t</a><img src=\"img/logo.png?v=2\"><script src=\"../secret.js\"></script></body></html>",
        )
        .unwrap();
        let (code, lines) = check(p);
        assert_eq!(code, 1);
        assert_eq!(
            lines,
            [
                "ERROR: index.html references styles.css, which does not exist",
                "ERROR: index.html references img/logo.png, which does not exist",
                "ERROR: index.html references ../secret.js, outside the page",
            ]
        );
        std::fs::write(p.join("styles.css"), "body{}").unwrap();
        std::fs::create_dir(p.join("img")).unwrap();
        std::fs::write(p.join("img/logo.png"), "png").unwrap();
        std::fs::write(
            p.join("index.html"),
            "<html><head><link href=\"styles.css\"></head><body><img src=\"img/logo.png\"></body>",
        )
        .unwrap();
        let (code, lines) = check(p);
        assert_eq!(code, 1);
        assert_eq!(
            lines,
            [
                "ERROR: index.html has no </html> closing tag",
                "ERROR: index.html has no <title>"
            ]
        );
        std::fs::write(
            p.join("index.html"),
            "<html><head><title>A</title><link href=\"styles.css\"></head><body><img src=\"img/logo.png\"></body></html>",
        )
        .unwrap();
        assert_eq!(check(p), (0, vec!["OK: index.html builds".to_string()]));
    }

    #[test]
    fn previews_take_the_page_not_the_design_or_hidden_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("design")).unwrap();
        std::fs::create_dir_all(p.join("img")).unwrap();
        std::fs::write(p.join("index.html"), "<html></html>").unwrap();
        std::fs::write(p.join("design/spec.md"), "# spec").unwrap();
        std::fs::write(p.join(".env"), "SECRET=1").unwrap();
        std::fs::write(p.join("img/logo.png"), [0x89u8, 0x50, 0xff, 0x00]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("passwd")).unwrap();
        let (b, bytes) = collect_preview(p).unwrap();
        let paths: Vec<&str> = b.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["img/logo.png", "index.html"]);
        assert_eq!(bytes, 17);
        assert!(b.files[0].base64 && b.files[0].content == "iVD/AA==");
        assert!(!b.files[1].base64);
        std::fs::remove_file(p.join("index.html")).unwrap();
        assert!(collect_preview(p).unwrap_err().contains("index.html"));
    }
}
