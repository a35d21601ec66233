//! Seed 001's landing pages end to end. Two parts:
//!
//! - The demo script's landing rules, asked over HTTP as the runner's LLM steps ask them, and
//!   driving the real Claude Code CLI (`scripts/agent-clis`) as the runner's `coder` and
//!   `deployment_fixer` agent runs do: the page written, changed by a chat, broken and repaired,
//!   and not repaired.
//! - The whole flow: a real `wrangler dev`, a real runner with the Docker executor and the agent
//!   image running Claude Code, and the scripted model server answering every LLM node (by the
//!   system prompt's `Kiln role:`) and every agent run (by the prompt's `Landing node:` line).
//!   Claude Code rather than the `text` profile: the page's files must be written by the agent's
//!   own tool calls in the job's container at `/app`, the session's workspace; a text agent would
//!   write nothing and the build check would fail. The flow tests share one edge, one model
//!   server and one runner, each test its own user and sessions.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::landing::{events, fetch, payload, session, steps, LandingClient, SseEvent};
use kiln_e2e::model::{ModelServer, Script};
use kiln_e2e::{Method, StatusCode, TestEdge, TestRunner};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

/// Long enough for a whole job on a loaded 2-core machine (the coder and each fix start a
/// container and Claude Code).
const JOB_TIMEOUT: Duration = Duration::from_secs(400);

// --- The demo script's landing rules ---

fn fenced_json(text: &str) -> Value {
    let start = text.find("```json").unwrap_or_else(|| panic!("no ```json block in {text}")) + "```json".len();
    let end = start + text[start..].find("```").expect("the block ends");
    serde_json::from_str(text[start..end].trim()).unwrap_or_else(|e| panic!("the block is not JSON ({e}): {text}"))
}

/// The text of the demo model's answer to an LLM node's request.
async fn ask(server: &ModelServer, role: &str, prompt: &str) -> String {
    let body = json!({"model": "kiln-demo", "max_tokens": 1024, "stream": false,
        "system": format!("Kiln role: {role}\nYou are the {role} of a landing-page team."),
        "messages": [{"role": "user", "content": prompt}]});
    let v: Value = reqwest::Client::new()
        .post(format!("{}/v1/messages", server.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["model"], "kiln-demo", "{v}");
    v["content"].as_array().unwrap().iter().filter_map(|b| b["text"].as_str()).collect()
}

#[tokio::test]
async fn the_demo_script_routes_plans_and_designs_landing_pages() {
    let server = ModelServer::demo();
    let init = "Job: init (a new page)\nBuild a new landing page from this brief:\ncampaign.productName: AuroraAI Automations\n\nThe session's workspace: empty.".to_string();
    let route = |t: String| fenced_json(&t)["route"].as_str().unwrap().to_string();
    assert_eq!(route(ask(&server, "router", &init).await), "design");
    assert_eq!(route(ask(&server, "router", "Chat message: more enterprise words").await), "code");
    assert_eq!(route(ask(&server, "router", "Chat message: CLARIFY_ME please").await), "clarify");
    assert_eq!(route(ask(&server, "router", "Chat message: DEPLOY_ONLY").await), "deploy");
    let reason = fenced_json(&ask(&server, "router", "Chat message: CLARIFY_ME").await)["reason"].clone();
    assert!(reason.as_str().is_some_and(|r| r.contains('?')), "clarify asks a question: {reason}");

    let plan = fenced_json(&ask(&server, "design_planner", &init).await);
    assert_eq!(plan["theme"], "dark");
    for (k, n) in [("colors", 4), ("typography", 2), ("sections", 3), ("animations", 2)] {
        assert_eq!(plan[k].as_array().map(Vec::len), Some(n), "{k}: {plan}");
    }
    let spec = ask(&server, "designer", &init).await;
    assert!(spec.contains("# Design spec: AuroraAI Automations") && spec.contains("styles.css"), "{spec}");

    // The product name as prompts show it: JSON, a summary line, or a chat's `Headline:`.
    for (prompt, want) in [
        ("Payload: {\"campaign\": {\"productName\": \"Nimbus\"}}", "Nimbus"),
        ("Product name: Orbit CRM\nTone: calm", "Orbit CRM"),
        ("productName: Flux", "Flux"),
        ("Payload: {\"productName\": \"Old\"}\nChat message: Headline: New Name, please", "New Name, please"),
        ("Chat message: something", "Your product"),
    ] {
        let spec = ask(&server, "designer", prompt).await;
        assert!(spec.contains(&format!("# Design spec: {want}\n")), "{prompt:?} → {spec}");
    }
    let rules: Vec<String> = server.requests().iter().filter_map(|r| r.rule.clone()).collect();
    assert_eq!(
        &rules[..7],
        ["landing-router-init", "landing-router-chat", "landing-router-clarify", "landing-router-deploy", "landing-router-clarify", "landing-design-planner", "landing-designer"]
    );
}

/// The Claude Code CLI that `scripts/agent-clis` installs.
fn claude_bin() -> PathBuf {
    let bin = kiln_e2e::repo_root().join(".kiln/agents/node_modules/.bin/claude");
    assert!(bin.exists(), "the Claude Code CLI is not installed at {}: run scripts/agent-clis", bin.display());
    bin
}

/// Runs Claude Code in `dir` on `prompt` against `server` as the runner does (print, stream-json,
/// permissions skipped); answers its result text.
fn claude(server: &ModelServer, dir: &Path, prompt: &str) -> String {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(claude_bin())
        .args(["--print", "--verbose", "--output-format", "stream-json", "--dangerously-skip-permissions", prompt])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("ANTHROPIC_BASE_URL", server.url())
        .env("ANTHROPIC_API_KEY", "anything")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("IS_SANDBOX", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "claude failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last: Value = serde_json::from_str(stdout.lines().rfind(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!((last["type"].as_str(), last["is_error"].as_bool()), (Some("result"), Some(false)), "{last}");
    last["result"].as_str().unwrap_or_default().to_string()
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

#[test]
fn claude_code_writes_changes_breaks_and_repairs_a_landing_page_on_the_demo_script() {
    let server = ModelServer::demo();
    let coder = |extra: &str| format!("Landing node: coder\nWrite the landing page in /app.\n{extra}");
    let fixer = |n: u32, errors: &str| format!("Landing node: deployment_fixer\nFix attempt: {n}\nThe build check failed:\n{errors}");

    // Init: three files, the product's name as the title, relative links to the other two.
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let said = claude(&server, dir.path(), &coder(&format!("Payload:\n{:#}", payload("AuroraAI Automations", ""))));
    println!("coder (3 requests: read, write, report) through Claude Code: {:?}", started.elapsed());
    assert!(said.contains("the page for AuroraAI Automations is written"), "{said}");
    let html = read(dir.path(), "index.html").expect("index.html");
    assert!(html.contains("<title>AuroraAI Automations</title>") && html.contains("</html>"), "{html}");
    assert!(html.contains("href=\"styles.css\"") && html.contains("src=\"script.js\""), "{html}");
    assert!(read(dir.path(), "styles.css").is_some_and(|c| c.contains("--primary")));
    assert!(read(dir.path(), "script.js").is_some());

    // A chat renames it: the files exist now, so Claude Code reads them before writing over them.
    let said = claude(&server, dir.path(), &coder("Chat message: Headline: Nimbus Flow"));
    assert!(said.contains("Nimbus Flow"), "{said}");
    let changed = read(dir.path(), "index.html").unwrap();
    assert!(changed.contains("<title>Nimbus Flow</title>") && !changed.contains("AuroraAI"), "{changed}");

    // BREAK_BUILD: styles.css left out, then written by the fixer.
    let broken = tempfile::tempdir().unwrap();
    claude(&server, broken.path(), &coder(&format!("Payload:\n{:#}", payload("Breaker", "BREAK_BUILD"))));
    assert!(read(broken.path(), "index.html").unwrap().contains("href=\"styles.css\""));
    assert_eq!(read(broken.path(), "styles.css"), None);
    let said = claude(&server, broken.path(), &fixer(1, "ERROR: index.html links styles.css, which does not exist"));
    assert_eq!(said, "[demo model] Fix attempt 1: wrote styles.css.");
    assert!(read(broken.path(), "styles.css").is_some());

    // ALWAYS_BROKEN: the page links ALWAYS_BROKEN.css, which no fix attempt writes.
    let hopeless = tempfile::tempdir().unwrap();
    claude(&server, hopeless.path(), &coder("Chat message: ALWAYS_BROKEN"));
    assert!(read(hopeless.path(), "index.html").unwrap().contains("href=\"ALWAYS_BROKEN.css\""));
    let before: Vec<_> = std::fs::read_dir(hopeless.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    for n in 1..=2 {
        let said = claude(&server, hopeless.path(), &fixer(n, "ERROR: index.html links ALWAYS_BROKEN.css, which does not exist"));
        assert_eq!(said, format!("[demo model] Fix attempt {n}: I could not repair the page (ALWAYS_BROKEN)."));
    }
    let after: Vec<_> = std::fs::read_dir(hopeless.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before.len(), after.len(), "the hopeless fixer writes nothing");

    let rules: Vec<String> = server.requests().iter().filter_map(|r| r.rule.clone()).filter(|r| r.starts_with("landing-")).collect();
    assert!(rules.starts_with(&["landing-coder-read".into(), "landing-coder-write".into(), "landing-coder-done".into()]), "{rules:?}");
    assert!(rules.contains(&"landing-coder-break-build".into()) && rules.contains(&"landing-fixer-write".into()));
    assert!(rules.contains(&"landing-coder-always-broken".into()) && rules.contains(&"landing-fixer-gives-up".into()));
}

// --- The whole flow ---

struct World {
    edge: TestEdge,
    model: ModelServer,
    _runner: TestRunner,
}

static SHARED: OnceCell<World> = OnceCell::const_new();

async fn shared() -> &'static World {
    SHARED.get_or_init(World::start).await
}

/// Rules of single tests, tried before the demo script's: `kiln-l4-slow` holds the designer long
/// enough to cancel the job while it runs.
fn test_rules() -> Vec<Value> {
    vec![json!({"name": "slow-designer", "when": {"role": "designer", "conversation": "kiln-l4-slow"}, "stall_before_ms": 8000,
                "text": "# Design spec\n\nSlow on purpose."})]
}

impl World {
    async fn start() -> World {
        let mut rules = test_rules();
        rules.extend(Script::demo().rules.iter().map(|r| serde_json::to_value(r).unwrap()));
        let model = ModelServer::start(Script::from_value(json!({"model": "kiln-demo", "rules": rules})).expect("a valid script"));
        let edge = TestEdge::start(&[("MAX_CONCURRENT_JOBS", "4")]).await.expect("starting wrangler dev");
        let url = model.url();
        let env: Vec<(&str, &str)> = vec![
            ("RUNNER_EXECUTOR", "docker"),
            ("RUNNER_IMAGE", "kiln-agent:latest"),
            // The private engine has no bridge: the container reaches the model on loopback.
            ("RUNNER_NETWORK", "host"),
            ("RUNNER_AGENT", "claude"),
            ("RUNNER_AGENT_ENV", "ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY,DISABLE_AUTOUPDATER,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"),
            ("ANTHROPIC_BASE_URL", url.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-kiln-test"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            // Every LLM node on the scripted model.
            ("RUNNER_LLM_MODEL", "anthropic/kiln-demo"),
            ("MAX_CONCURRENT_JOBS", "3"),
        ];
        let runner = TestRunner::start(&edge, &env).await.expect("starting a runner");
        World { edge, model, _runner: runner }
    }

    async fn user(&self, prefix: &str) -> LandingClient {
        LandingClient::register(&self.edge, prefix).await
    }
}

/// Whether `want` appears in `have` in order (other steps may come between).
fn in_order(have: &[(String, String)], want: &[(&str, &str)]) -> bool {
    let mut it = have.iter();
    want.iter().all(|(n, t)| it.any(|(hn, ht)| hn == n && ht == t))
}

fn find<'a>(events: &'a [Value], node: &str, event_type: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["node"] == node && e["event_type"] == event_type).collect()
}

/// The job's one `__end__` event, last.
fn end(job: &Value) -> Value {
    let all = events(job);
    let last = all.last().unwrap_or_else(|| panic!("no events: {job:#}")).clone();
    assert_eq!(last["node"], "__end__", "the last event is __end__: {job:#}");
    assert_eq!(find(&all, "__end__", last["event_type"].as_str().unwrap()).len(), 1, "{job:#}");
    last
}

fn assert_completed(job: &Value) {
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["error_message"], Value::Null, "{job:#}");
}

/// The LLM node's `node_completed` data carries its usage.
fn assert_usage(events: &[Value], node: &str) {
    let done = find(events, node, "node_completed");
    let usage = &done.first().unwrap_or_else(|| panic!("no {node} node_completed in {events:#?}"))["data"]["usage"];
    assert!(usage["input_tokens"].as_u64().is_some_and(|n| n > 0) && usage["output_tokens"].as_u64().is_some_and(|n| n > 0), "{node}: {usage}");
    assert_eq!(usage["model"], "kiln-demo", "{node}: {usage}");
    assert!(usage.get("cost_usd").is_some(), "{node}: {usage}");
}

fn ts(e: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let s = e["timestamp"].as_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(&format!("{s}Z")))
        .unwrap_or_else(|e| panic!("timestamp {s:?}: {e}"))
}

#[tokio::test]
async fn init_runs_every_node_in_order_and_publishes_a_preview_that_a_chat_changes() {
    let w = shared().await;
    let c = w.user("l4-flow").await;
    let s = session("l4-flow");
    let started = Instant::now();
    let answer = c.init(&s, payload("AuroraAI Automations", "")).await;
    assert_eq!(answer["session_id"], s.as_str());
    let page_id = answer["landing_page_id"].as_str().unwrap_or_else(|| panic!("a new page: {answer}")).to_string();
    let id = answer["job_id"].as_str().unwrap().to_string();
    let job = c.wait_terminal(&id, JOB_TIMEOUT).await;
    println!("init to completed (router, planner, designer, coder in a container, check, deployer): {:?}", started.elapsed());
    assert_completed(&job);
    assert_eq!((job["type"].as_str(), job["session_id"].as_str()), (Some("init"), Some(s.as_str())), "{job:#}");
    let all = events(&job);
    let order = [
        ("router", "node"), ("router", "node_completed"),
        ("design_planner", "node"), ("design_planner", "node_completed"),
        ("designer", "node"), ("designer", "node_completed"),
        ("coder", "node"), ("coder_tools", "tool"), ("coder", "node_completed"),
        ("build_check", "node"), ("build_check", "node_completed"),
        ("deployer", "node"), ("deployer", "node_completed"),
        ("__end__", "job_completed"),
    ];
    assert!(in_order(&steps(&job), &order), "{:#?}", steps(&job));
    assert!(find(&all, "deployment_fixer", "node").is_empty() && all.iter().all(|e| e["event_type"] != "error"), "{all:#?}");
    let ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|i| i.starts_with(&format!("{id}:"))), "{ids:?}");
    let plan = &find(&all, "design_planner", "node_completed")[0]["data"];
    assert_eq!(
        (&plan["theme"], &plan["color_count"], &plan["typography_count"], &plan["section_count"], &plan["animation_count"]),
        (&json!("dark"), &json!(4), &json!(2), &json!(3), &json!(2)),
        "{plan}"
    );
    for node in ["router", "design_planner", "designer"] {
        assert_usage(&all, node);
    }
    let tools = find(&all, "coder_tools", "tool");
    assert_eq!(tools[0]["message"], "Created 3 file(s)", "{:#?}", tools);
    let mut files: Vec<&str> = tools[0]["data"]["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["index.html", "script.js", "styles.css"]);
    assert!(!serde_json::to_string(&all).unwrap().contains("<!doctype html>"), "no event carries a file's content");

    // The preview: the URL in the final event and the deployer's, served without credentials.
    let preview = end(&job)["data"]["preview_url"].as_str().unwrap_or_else(|| panic!("preview_url in __end__: {job:#}")).to_string();
    assert_eq!(find(&all, "deployer", "node_completed")[0]["data"]["preview_url"], preview.as_str());
    assert!(preview.ends_with(&format!("/preview/{page_id}/")), "{preview}");
    let (status, ct, cache, html) = fetch(&preview).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(cache.contains("max-age"), "{cache}");
    assert!(html.contains("<title>AuroraAI Automations</title>") && html.contains("href=\"styles.css\""), "{html}");
    let (status, ct, _, css) = fetch(&format!("{preview}styles.css")).await;
    assert_eq!((status, ct.starts_with("text/css")), (StatusCode::OK, true), "{ct} {css}");
    let (status, ct, _, _) = fetch(&format!("{preview}script.js")).await;
    assert_eq!((status, ct.starts_with("text/javascript")), (StatusCode::OK, true), "{ct}");
    assert_eq!(fetch(&format!("{preview}design/spec.md")).await.0, StatusCode::NOT_FOUND, "design notes are not published");

    let (status, page) = c.page_by_session(&s).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!((page["id"].as_str(), page["status"].as_str(), page["preview_url"].as_str()), (Some(page_id.as_str()), Some("generated"), Some(preview.as_str())), "{page}");
    assert_eq!(page["business_data"]["campaign"]["productName"], "AuroraAI Automations");

    // A chat renames the page: the router says code, the coder updates the same workspace, the
    // same preview URL serves the new HTML.
    let started = Instant::now();
    let chat = c.chat(&s, "Headline: Nimbus Flow").await;
    let job = c.wait_terminal(&chat, JOB_TIMEOUT).await;
    println!("chat to completed (router, coder, check, deployer): {:?}", started.elapsed());
    assert_completed(&job);
    assert_eq!(job["type"], "chat");
    let all = events(&job);
    assert!(
        in_order(&steps(&job), &[("router", "node_completed"), ("coder", "node"), ("coder_tools", "tool"), ("build_check", "node_completed"), ("deployer", "node_completed"), ("__end__", "job_completed")]),
        "{:#?}",
        steps(&job)
    );
    assert!(find(&all, "design_planner", "node").is_empty(), "a code route skips the design: {:#?}", steps(&job));
    let tools = find(&all, "coder_tools", "tool");
    assert!(tools.iter().any(|t| t["message"].as_str().unwrap().starts_with("Updated ") && t["data"]["files"].as_array().unwrap().contains(&json!("index.html"))), "{tools:#?}");
    assert_eq!(end(&job)["data"]["preview_url"], preview.as_str());
    let (_, _, _, changed) = fetch(&preview).await;
    assert!(changed.contains("<title>Nimbus Flow</title>") && !changed.contains("AuroraAI"), "{changed}");

    // A second init of the session keeps its page.
    let again = c.init(&s, payload("AuroraAI Automations", "")).await;
    assert_eq!(again["landing_page_id"], Value::Null, "{again}");
    let (_, _) = c.cancel(again["job_id"].as_str().unwrap()).await;
}

#[tokio::test]
async fn a_broken_build_is_repaired_by_the_deployment_fixer() {
    let w = shared().await;
    let c = w.user("l4-fix").await;
    let s = session("l4-fix");
    let answer = c.init(&s, payload("Breaker", "BREAK_BUILD")).await;
    let job = c.wait_terminal(answer["job_id"].as_str().unwrap(), JOB_TIMEOUT).await;
    assert_completed(&job);
    let all = events(&job);
    let st = steps(&job);
    assert!(
        in_order(&st, &[("coder", "node_completed"), ("build_check", "node"), ("build_check", "error"), ("deployment_fixer", "node"), ("deployment_fixer", "node_completed"), ("build_check", "node"), ("build_check", "node_completed"), ("deployer", "node_completed"), ("__end__", "job_completed")]),
        "{st:#?}"
    );
    let failed = &find(&all, "build_check", "error")[0];
    assert!(serde_json::to_string(&failed["data"]).unwrap().contains("styles.css"), "the check names the missing file: {failed}");
    let fixes = find(&all, "deployment_fixer", "node");
    assert_eq!(fixes.len(), 1, "one attempt was enough: {st:#?}");
    assert_eq!(fixes[0]["data"]["attempt"], 1, "{}", fixes[0]);
    let preview = end(&job)["data"]["preview_url"].as_str().unwrap().to_string();
    let (status, ct, _, _) = fetch(&format!("{preview}styles.css")).await;
    assert_eq!((status, ct.starts_with("text/css")), (StatusCode::OK, true), "the fixer's file is published");
}

#[tokio::test]
async fn a_fixer_that_never_succeeds_fails_the_job_and_the_preview_stays() {
    let w = shared().await;
    let c = w.user("l4-broken").await;
    let s = session("l4-broken");
    let answer = c.init(&s, payload("Steady Page", "")).await;
    let first = c.wait_terminal(answer["job_id"].as_str().unwrap(), JOB_TIMEOUT).await;
    assert_completed(&first);
    let preview = end(&first)["data"]["preview_url"].as_str().unwrap().to_string();
    let (_, _, _, before) = fetch(&preview).await;

    let started = Instant::now();
    let chat = c.chat(&s, "ALWAYS_BROKEN: add a stylesheet nobody writes").await;
    let job = c.wait_terminal(&chat, JOB_TIMEOUT).await;
    println!("a hopeless chat to failed (3 fix attempts): {:?}", started.elapsed());
    assert_eq!(job["status"], "failed", "{job:#}");
    let error = job["error_message"].as_str().unwrap_or_else(|| panic!("an error_message: {job:#}"));
    assert!(error.contains("fix attempts") && error.contains("ALWAYS_BROKEN.css"), "{error}");
    let all = events(&job);
    let attempts: Vec<&Value> = find(&all, "deployment_fixer", "node").iter().map(|e| &e["data"]["attempt"]).collect();
    assert_eq!(attempts, [&json!(1), &json!(2), &json!(3)], "{:#?}", steps(&job));
    assert_eq!(find(&all, "build_check", "error").len(), 4, "the first check and one per attempt: {:#?}", steps(&job));
    assert!(find(&all, "deployer", "node").is_empty(), "nothing is published: {:#?}", steps(&job));
    let last = end(&job);
    assert_eq!(last["event_type"], "job_failed");
    assert!(last["message"].as_str().unwrap().contains("fix attempts"), "{last}");
    let (_, _, _, after) = fetch(&preview).await;
    assert_eq!(before, after, "the preview did not change");
    let (_, page) = c.page_by_session(&s).await;
    assert_eq!(page["status"], "failed", "{page}");
}

#[tokio::test]
async fn two_chats_on_one_session_run_one_after_the_other() {
    let w = shared().await;
    let c = w.user("l4-serial").await;
    let s = session("l4-serial");
    let answer = c.init(&s, payload("Serial Page", "")).await;
    assert_completed(&c.wait_terminal(answer["job_id"].as_str().unwrap(), JOB_TIMEOUT).await);

    let a = c.chat(&s, "Headline: First Rename").await;
    let b = c.chat(&s, "Headline: Second Rename").await;
    let job_b = c.job(&b).await;
    let first = &events(&job_b)[0];
    assert_eq!((first["node"].as_str(), first["event_type"].as_str()), (Some("queue"), Some("waiting")), "{job_b:#}");
    assert_eq!(first["message"], format!("Waiting for job {a} of this session to finish"));
    let (ja, jb) = (c.wait_terminal(&a, JOB_TIMEOUT).await, c.wait_terminal(&b, JOB_TIMEOUT).await);
    assert_completed(&ja);
    assert_completed(&jb);
    // B's first node starts after A's end.
    let a_end = ts(&end(&ja));
    let b_start = ts(events(&jb).iter().find(|e| e["node"] == "router").unwrap_or_else(|| panic!("{jb:#}")));
    assert!(b_start >= a_end, "B started at {b_start} before A ended at {a_end}");
    let preview = end(&jb)["data"]["preview_url"].as_str().unwrap().to_string();
    assert!(fetch(&preview).await.3.contains("<title>Second Rename</title>"), "the later chat's page is the preview");
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_ends_it() {
    let w = shared().await;
    let c = w.user("l4-cancel").await;
    let s = session("l4-cancel");
    let answer = c.init(&s, payload("Slow Page", "kiln-l4-slow")).await;
    let id = answer["job_id"].as_str().unwrap().to_string();
    // The designer answers after 8 s: cancel while it waits.
    c.poll_until(&id, JOB_TIMEOUT, "designer start", |j| events(j).iter().any(|e| e["node"] == "designer")).await;
    assert_eq!(c.job(&id).await["status"], "running");
    let started = Instant::now();
    let (status, body) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let job = c.wait_terminal(&id, Duration::from_secs(60)).await;
    println!("cancel to cancelled: {:?}", started.elapsed());
    assert_eq!(job["status"], "cancelled", "{job:#}");
    assert_eq!(end(&job)["event_type"], "job_cancelled");
    // Nothing follows: no coder ever, the log stays as it is.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let later = c.job(&id).await;
    assert_eq!(events(&later).len(), events(&job).len(), "{later:#}");
    assert!(find(&events(&later), "coder", "node").is_empty());
    let (_, page) = c.page_by_session(&s).await;
    assert_ne!(page["status"], "generated", "{page}");
    let (status, body) = c.cancel(&id).await;
    assert!(status.is_client_error(), "an ended job is not cancelled again: {status} {body}");
}

#[tokio::test]
async fn the_stream_resumes_after_last_event_id_losing_and_repeating_nothing() {
    let w = shared().await;
    let c = w.user("l4-sse").await;
    let s = session("l4-sse");
    let answer = c.init(&s, payload("Streamed Page", "")).await;
    let id = answer["job_id"].as_str().unwrap().to_string();
    let is_end = |e: &SseEvent| e.data["node"] == "__end__";
    let head = c.stream(&id, None, JOB_TIMEOUT, |e| is_end(e) || e.data["node"] == "designer").await;
    assert!(head.len() >= 3, "{head:#?}");
    let last = head.last().unwrap().id.clone().expect("events carry ids");
    assert!(!head.iter().any(is_end), "the first stream stopped before the end: {head:#?}");
    let tail = c.stream(&id, Some(&last), JOB_TIMEOUT, is_end).await;
    let next: u64 = last.parse::<u64>().expect("numeric event ids") + 1;
    assert_eq!(tail.first().and_then(|e| e.id.clone()), Some(next.to_string()), "the resumed stream starts after Last-Event-ID");
    assert!(tail.last().is_some_and(is_end), "the stream reaches __end__: {tail:#?}");
    let streamed: Vec<Value> = head.iter().chain(&tail).map(|e| e.data.clone()).collect();
    let job = c.job(&id).await;
    assert_completed(&job);
    assert_eq!(streamed, events(&job), "the stream and the job hold the same events, once each");
    for e in head.iter().chain(&tail) {
        assert_eq!(e.event.as_deref(), e.data["event_type"].as_str(), "{e:?}");
    }
}

#[tokio::test]
async fn another_users_jobs_and_pages_are_not_found() {
    let w = shared().await;
    let (owner, other) = (w.user("l4-owner").await, w.user("l4-other").await);
    let s = session("l4-owned");
    let answer = owner.init(&s, payload("Private Page", "")).await;
    let (id, page) = (answer["job_id"].as_str().unwrap().to_string(), answer["landing_page_id"].as_str().unwrap().to_string());
    for (method, path) in [
        (Method::GET, format!("/v1/jobs/{id}")),
        (Method::GET, format!("/v1/jobs/{id}/stream")),
        (Method::POST, format!("/v1/jobs/{id}/cancel")),
        (Method::GET, format!("/v1/landing-pages/{page}")),
        (Method::GET, format!("/v1/landing-pages/by-session/{s}")),
        (Method::DELETE, format!("/v1/landing-pages/{page}")),
    ] {
        let (status, body) = other.send(method.clone(), &path, None, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    // The other user's chat on the same session name is its own session, which has no page.
    let (status, body) = other.send(Method::POST, "/v1/agent/chat", Some(&s), Some(json!({"message": "hi"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, list) = other.get(&format!("/v1/jobs?session_id={s}")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["jobs"], json!([]), "{list}");
    // The owner's job is untouched and completes.
    assert_completed(&owner.wait_terminal(&id, JOB_TIMEOUT).await);
    let _ = &w.model;
}

#[tokio::test]
async fn a_clarify_chat_asks_and_a_deploy_only_chat_publishes_without_coding() {
    let w = shared().await;
    let c = w.user("l4-routes").await;
    let s = session("l4-routes");
    let answer = c.init(&s, payload("Routed Page", "")).await;
    let first = c.wait_terminal(answer["job_id"].as_str().unwrap(), JOB_TIMEOUT).await;
    assert_completed(&first);
    let preview = end(&first)["data"]["preview_url"].as_str().unwrap().to_string();
    let (_, _, _, before) = fetch(&preview).await;

    let job = c.wait_terminal(&c.chat(&s, "CLARIFY_ME: make it better").await, JOB_TIMEOUT).await;
    assert_completed(&job);
    let st = steps(&job);
    assert!(in_order(&st, &[("router", "node_completed"), ("router", "clarify"), ("__end__", "job_completed")]), "{st:#?}");
    assert!(st.iter().all(|(n, _)| !["coder", "build_check", "deployer"].contains(&n.as_str())), "{st:#?}");
    let reply = end(&job)["data"]["reply"].as_str().unwrap_or_default().to_string();
    assert!(reply.contains("Which section should change"), "the router's question is the reply: {job:#}");

    let job = c.wait_terminal(&c.chat(&s, "DEPLOY_ONLY").await, JOB_TIMEOUT).await;
    assert_completed(&job);
    let st = steps(&job);
    assert!(in_order(&st, &[("router", "node_completed"), ("build_check", "node_completed"), ("deployer", "node_completed"), ("__end__", "job_completed")]), "{st:#?}");
    assert!(st.iter().all(|(n, _)| n != "coder" && n != "designer"), "{st:#?}");
    assert_eq!(find(&events(&job), "router", "node_completed")[0]["data"]["route"], "deploy");
    assert_eq!(fetch(&preview).await.3, before, "republished as it was");
}
