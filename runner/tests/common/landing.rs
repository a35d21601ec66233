//! Landing jobs' shared test pieces: the scripted coder and fixer, the model's script, the
//! assignments, and readers of node events, previews and bundles.

use std::path::Path;
use std::time::Duration;

use kiln_e2e::model::{ModelServer, Script};
use kiln_runner::llm::{Api, ApiKey, LlmConfig, ModelRef, Provider, RetryPolicy};
use kiln_schemas::landing::PreviewBundle;
use kiln_schemas::runner::{Assignment, LandingParams, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::{assignment, finished, TestRunner};

/// An init job's design nodes.
pub const DESIGNED: [&str; 6] = [
    "router node",
    "router node_completed",
    "design_planner node",
    "design_planner node_completed",
    "designer node",
    "designer node_completed",
];

/// The nodes after the design of a job whose code builds and is published.
pub const CODED_AND_PUBLISHED: [&str; 7] = [
    "coder node",
    "coder_tools tool",
    "coder node_completed",
    "build_check node",
    "build_check node_completed",
    "deployer node",
    "deployer node_completed",
];

/// The nodes after the design of a job whose build the fixer repairs before it is published.
pub const REPAIRED_AND_PUBLISHED: [&str; 12] = [
    "coder node",
    "coder_tools tool",
    "coder node_completed",
    "build_check node",
    "build_check error",
    "deployment_fixer node",
    "deployment_fixer_tools tool",
    "deployment_fixer node_completed",
    "build_check node",
    "build_check node_completed",
    "deployer node",
    "deployer node_completed",
];

/// The scripted model server, answering [`script`].
pub fn model_server() -> ModelServer {
    ModelServer::start(Script::from_value(script()).unwrap())
}

/// Asserts that the job completed (its lines shown when it did not).
pub fn assert_completed(events: &[RunnerEvent]) {
    assert_eq!(finished(events).0, Outcome::Completed, "{:#?}", lines(events));
}

/// The coder and the fixer: a coding agent's work, scripted.
pub const AGENT: &str = r##"#!/bin/sh
prompt=$(cat)
node=$(printf '%s\n' "$prompt" | sed -n 's/^Landing node: //p' | head -n 1)
request=$(printf '%s\n' "$prompt" | grep -m 1 -E "^(The user's request: |Build a new landing page)")
echo "landing agent: $node"
case "$prompt" in *"# Design spec"*) echo "landing agent: the design spec is in the prompt" ;; esac
case "$node" in
coder)
  case "$prompt" in
    *BREAK_BUILD*) rm -f styles.css ;;
    *) printf 'body { font-family: sans-serif; }\n' > styles.css ;;
  esac
  printf 'document.documentElement.dataset.ready = "1";\n' > script.js
  cat > index.html <<EOF
<!doctype html>
<html><head><title>Aurora</title><link rel="stylesheet" href="styles.css"></head>
<body><h1>Aurora</h1><p>$request</p><script src="script.js"></script></body></html>
EOF
  ;;
deployment_fixer)
  attempt=$(printf '%s\n' "$prompt" | sed -n 's/^Fix attempt: //p')
  echo "landing agent: fix attempt $attempt"
  case "$prompt" in
    *ALWAYS_BROKEN*) echo "landing agent: cannot fix it" ;;
    *) printf 'body { color: black; }\n' > styles.css ;;
  esac ;;
*) echo "landing agent: no node in the prompt" >&2; exit 1 ;;
esac
"##;

pub const GUIDELINES: &str = r##"Here are the guidelines.
```json
{"theme": "dark",
 "colors": [{"name": "primary", "hex": "#7C3AED"}, {"name": "accent", "hex": "#FDE68A"}, {"name": "neutral", "hex": "#111827"}],
 "typography": [{"role": "heading", "font": "General Sans"}, {"role": "body", "font": "Inter"}],
 "sections": [{"id": "hero"}, {"id": "features"}, {"id": "pricing"}, {"id": "cta"}],
 "animations": [{"name": "fade-in"}, {"name": "scroll-reveal"}]}
```"##;

pub fn route(route: &str, reason: &str) -> String {
    format!(
        "```json\n{}\n```",
        json!({"route": route, "reason": reason})
    )
}

pub fn script() -> Value {
    json!({"rules": [
        {"when": {"role": "router", "prompt": "which one"}, "text": route("clarify", "Which section should change: the hero or the pricing?")},
        {"when": {"role": "router", "prompt": "DEPLOY_ONLY"}, "text": route("deploy", "publish as it is")},
        {"when": {"role": "router", "prompt": "Job: init"}, "text": route("design", "a new page")},
        {"when": {"role": "router"}, "text": route("code", "a change within the design")},
        {"when": {"role": "design_planner"}, "text": GUIDELINES},
        {"when": {"role": "designer"}, "text": "# Design spec\n\nA dark hero, three features, pricing and a call to action.", "chunk_delay_ms": 0},
        {"text": "no rule for this request"}
    ]})
}

pub fn llm(server: &ModelServer) -> LlmConfig {
    let mut c = LlmConfig {
        policy: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(40),
            max_retry_wait: Duration::from_secs(2),
            request_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        },
        ..Default::default()
    };
    c.providers.insert(
        "anthropic".into(),
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &server.url(),
            Some(ApiKey::new("sk-ant-test")),
        ),
    );
    c.roles.insert(
        "default".into(),
        ModelRef {
            provider: "anthropic".into(),
            model: "landing-test-model".into(),
        },
    );
    c
}

pub fn payload(objective: &str) -> Value {
    json!({
        "campaign": {"objective": objective, "productName": "Aurora", "primaryOffer": "3 free recipes"},
        "branding": {"theme": "dark", "sections": ["hero", "features", "pricing", "cta"]}
    })
}

pub fn landing_job(page: &str, payload: Value, message: Option<&str>) -> Assignment {
    let kind = if message.is_some() {
        JobType::LandingChat
    } else {
        JobType::LandingInit
    };
    let mut a = assignment(kind, message.unwrap_or("init"));
    a.github_org = String::new();
    a.github_repo = String::new();
    a.branch_name = String::new();
    a.landing = Some(LandingParams {
        session_id: format!("session-{page}"),
        landing_page_id: page.to_string(),
        payload,
        message: message.map(Into::into),
    });
    a
}

pub fn new_page() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The node events: (node, event_type, message, data).
pub fn nodes(events: &[RunnerEvent]) -> Vec<(String, String, String, Value)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Node {
                node,
                event_type,
                message,
                data,
            } => Some((
                node.clone(),
                event_type.clone(),
                message.clone(),
                data.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// `node event_type` labels, in order.
pub fn path(events: &[RunnerEvent]) -> Vec<String> {
    nodes(events)
        .into_iter()
        .map(|(n, t, _, _)| format!("{n} {t}"))
        .collect()
}

pub fn node_data(events: &[RunnerEvent], node: &str, event_type: &str) -> Value {
    nodes(events)
        .into_iter()
        .find(|(n, t, _, _)| n == node && t == event_type)
        .map(|(_, _, _, d)| d)
        .unwrap_or_else(|| panic!("no {node} {event_type} in {:#?}", path(events)))
}

pub fn result(events: &[RunnerEvent]) -> Value {
    match events.last() {
        Some(RunnerEvent::Finished { result, .. }) => {
            result.clone().expect("a landing job's result")
        }
        other => panic!("the last event is not finished: {other:?}"),
    }
}

pub fn lines(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log { content, .. } => Some(content.clone()),
            _ => None,
        })
        .collect()
}

pub fn preview_file<'a>(p: &'a PreviewBundle, path: &str) -> Option<&'a str> {
    p.files
        .iter()
        .find(|f| f.path == path)
        .map(|f| f.content.as_str())
}

/// Clones a session's bundle: (the clone, `git log` subjects newest first).
pub fn clone_bundle(bundle: &[u8]) -> (TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.bundle");
    std::fs::write(&file, bundle).unwrap();
    let work = dir.path().join("work");
    super::git(
        dir.path(),
        &[
            "clone",
            "--quiet",
            "--branch",
            "main",
            file.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
    let log = super::git(&work, &["log", "--format=%s"])
        .lines()
        .map(str::to_string)
        .collect();
    (dir, log)
}

pub fn read(dir: &TempDir, rel: &str) -> String {
    std::fs::read_to_string(dir.path().join("work").join(rel)).unwrap_or_default()
}

pub async fn released_and_gone(runner: &TestRunner, id: &str) {
    runner.wait_released(id).await;
    assert!(
        !runner.worktrees_dir().join(id).exists(),
        "the workspace is removed"
    );
    assert!(
        !runner.worktrees_dir().join(format!("{id}.git")).exists(),
        "its git directory too"
    );
    assert!(!Path::new(&runner.worktrees_dir().join(format!("{id}.bundle"))).exists());
}
