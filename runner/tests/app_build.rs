//! App builds (seed 000) through a whole runner: the fake edge assigns, the runner's LLM steps
//! talk to the real scripted model server (`kiln_e2e::model`), the stand-in agent builds each
//! ticket under the process executor (words of the ticket's title pick what it does: `write`,
//! `fail`, `flaky`), and the events, the model's requests and the workspace snapshots the edge
//! got are checked: the lifecycle in order, tickets in dependency order with one commit each,
//! a ticket failing twice and its dependents not built, backlogs and PRDs asked for again,
//! the budget, pause and resume between steps, cancel, a continuation over a snapshot.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{assert_started_and_finished, assignment, finished, RunnerOptions, TestRunner};
use kiln_e2e::model::{ModelServer, RecordedRequest, Script};
use kiln_runner::llm::{Api, ApiKey, Budget, LlmConfig, ModelRef, Provider, RetryPolicy};
use kiln_runner::workspace::Workspaces;
use kiln_schemas::app::{SnapshotFile, TicketStatus, WorkspaceSnapshot};
use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{AppBuildParams, Assignment, EdgeMessage, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;
use serde_json::{json, Value};

const PRD: &str = "# Todo PRD\n\nA todo list for one person.\n\n```json\n{\"name\": \"todo\", \"features\": [\"list\", \"add\"]}\n```";

fn backlog(tickets: Value) -> String {
    format!(
        "The backlog:\n```json\n{}\n```",
        json!({ "tickets": tickets })
    )
}

/// E1, then S2 (after S1) before S1 in the backlog, and T1: built S1, S2, T1.
fn todo_backlog() -> String {
    backlog(json!([
        {"id": "E1", "type": "epic", "title": "Todo app", "description": "The app.", "parent": null, "dependencies": []},
        {"id": "S2", "type": "story", "title": "List write", "description": "Show the todos.", "parent": "E1", "dependencies": ["S1"]},
        {"id": "S1", "type": "story", "title": "Model write", "description": "Store todos.", "parent": "E1", "dependencies": []},
        {"id": "T1", "type": "task", "title": "Styles write", "description": "Make it tidy.", "parent": "E1", "dependencies": []}
    ]))
}

/// Executives who agree in the first round, the PRD, and `tickets` for the backlog.
fn script(tickets: &str) -> Value {
    json!({"rules": [
        {"when": {"role": "ceo"}, "text": "CEO: a todo list first, nothing else."},
        {"when": {"role": "cto"}, "text": "CTO: plain HTML and JavaScript will do."},
        {"when": {"role": "secretary"}, "text": "Decided: a todo list in plain HTML. CONSENSUS"},
        {"when": {"role": "prd"}, "text": PRD},
        {"when": {"role": "tickets"}, "text": tickets},
        {"text": "no rule for this request"}
    ]})
}

fn model(script: Value) -> ModelServer {
    ModelServer::start(Script::from_value(script).expect("a valid script"))
}

/// `[llm]` with the scripted server as provider `anthropic` for every role.
fn llm(server: &ModelServer, budget: Budget) -> LlmConfig {
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
        budget,
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
            model: "app-test-model".into(),
        },
    );
    c
}

async fn runner(server: &ModelServer, budget: Budget) -> TestRunner {
    TestRunner::start(RunnerOptions {
        llm: llm(server, budget),
        ..Default::default()
    })
    .await
}

fn app_job(continuation: Option<&str>, paused: bool) -> Assignment {
    let mut a = assignment(JobType::AppBuild, "a todo app");
    a.github_org = String::new();
    a.github_repo = String::new();
    a.branch_name = String::new();
    a.app = Some(AppBuildParams {
        initial_prompt: "a todo app".into(),
        requirements_summary: "A todo list for one person: add, list and tick off todos.".into(),
        continuation: continuation.map(Into::into),
        paused,
    });
    a
}

/// The events that make the lifecycle, as short labels (tickets by the model's ids).
fn lifecycle(events: &[RunnerEvent]) -> Vec<String> {
    let mut local: HashMap<String, String> = HashMap::new();
    let mut out = vec![];
    for e in events {
        match e {
            RunnerEvent::Phase { phase, .. } => out.push(format!("phase {}", phase.as_str())),
            RunnerEvent::Dialogue { agent, order, .. } => out.push(format!("{agent} #{order}")),
            RunnerEvent::Prd { .. } => out.push("prd".into()),
            RunnerEvent::Backlog { tickets } => out.push(format!("backlog of {}", tickets.len())),
            RunnerEvent::Ticket {
                ticket_id,
                status,
                metadata,
                ..
            } => {
                let id = metadata["local_id"]
                    .as_str()
                    .unwrap_or(ticket_id)
                    .to_string();
                local.insert(ticket_id.clone(), id.clone());
                out.push(format!("{id} {}", status.as_str()));
            }
            RunnerEvent::Finished { outcome, .. } => out.push(format!("finished {outcome:?}")),
            _ => {}
        }
    }
    out
}

fn system_lines(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log {
                stream: LogStream::System,
                content,
            } => Some(content.clone()),
            _ => None,
        })
        .collect()
}

fn role_of(r: &RecordedRequest) -> String {
    r.system
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Kiln role: "))
        .unwrap_or("?")
        .to_string()
}

fn snapshot_files(snap: &WorkspaceSnapshot) -> HashMap<String, String> {
    snap.files
        .iter()
        .map(|f| (f.path.clone(), f.content.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_build_plans_writes_the_prd_and_builds_its_tickets_in_dependency_order() {
    let server = model(script(&todo_backlog()));
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(None, false);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    assert_eq!(
        lifecycle(&events),
        [
            "phase planning",
            "CEO #1",
            "CTO #2",
            "Secretary #3",
            "prd",
            "phase prd_ready",
            "phase ticketing",
            "backlog of 4",
            "phase tickets_ready",
            "phase building",
            "S1 in_progress",
            "E1 in_progress",
            "S1 done",
            "S2 in_progress",
            "S2 done",
            "T1 in_progress",
            "T1 done",
            "E1 done",
            "finished Completed",
        ],
        "the lifecycle; the secretary's CONSENSUS ends planning after one round; S2 after S1; \
         the epic follows its stories and task"
    );
    let epic_done = events.iter().find_map(|e| match e {
        RunnerEvent::Ticket {
            status: TicketStatus::Done,
            message,
            metadata,
            ..
        } if metadata["local_id"] == "E1" => Some((message.clone(), metadata.clone())),
        _ => None,
    });
    assert_eq!(
        epic_done,
        Some((
            "E1: all 3 of its tickets are built".to_string(),
            json!({"local_id": "E1", "tickets": 3, "done": 3})
        ))
    );

    // The dialogue, PRD and backlog as the model wrote them; tickets with UUIDs and their links.
    let dialogue: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Dialogue { message, .. } => Some(message.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(dialogue[0], "CEO: a todo list first, nothing else.");
    let (spec, markdown) = events
        .iter()
        .find_map(|e| match e {
            RunnerEvent::Prd { spec, prd_markdown } => Some((spec.clone(), prd_markdown.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(spec, json!({"name": "todo", "features": ["list", "add"]}));
    assert_eq!(markdown, "# Todo PRD\n\nA todo list for one person.");
    let tickets = events
        .iter()
        .find_map(|e| match e {
            RunnerEvent::Backlog { tickets } => Some(tickets.clone()),
            _ => None,
        })
        .unwrap();
    let by_title: HashMap<&str, &kiln_schemas::app::Ticket> =
        tickets.iter().map(|t| (t.title.as_str(), t)).collect();
    let (epic, s1, s2) = (
        by_title["Todo app"],
        by_title["Model write"],
        by_title["List write"],
    );
    assert!(
        uuid::Uuid::parse_str(&s1.id).is_ok(),
        "UUIDs, not the model's ids"
    );
    assert_eq!(s2.dependencies, vec![s1.id.clone()]);
    assert_eq!(s2.parent_id.as_deref(), Some(epic.id.as_str()));
    assert!(tickets.iter().all(|t| t.status == TicketStatus::Todo));
    assert_eq!(
        s1.assigned_to, "text",
        "the runner's agent profile builds them"
    );

    // The model was asked by role, each turn seeing the requirements and the dialogue so far.
    let asked = server.chat_requests();
    let roles: Vec<String> = asked.iter().map(role_of).collect();
    assert_eq!(roles, ["ceo", "cto", "secretary", "prd", "tickets"]);
    assert!(
        asked[0].prompt.contains("A todo list for one person"),
        "{}",
        asked[0].prompt
    );
    assert!(
        asked[1].prompt.contains("CEO: CEO: a todo list first"),
        "the CTO sees the CEO: {}",
        asked[1].prompt
    );
    assert!(
        asked[3]
            .prompt
            .contains("Decided: a todo list in plain HTML"),
        "the PRD sees the planning"
    );
    assert!(
        asked[4].prompt.contains("# Todo PRD"),
        "the backlog sees the PRD"
    );

    // Each ticket: one agent run with its prompt, one commit, a snapshot after it.
    let snap = runner.edge.snapshot(&id).expect("a snapshot at the edge");
    let files = snapshot_files(&snap);
    for (n, title, local) in [
        (1, "Model write", "S1"),
        (2, "List write", "S2"),
        (3, "Styles write", "T1"),
    ] {
        let f = &files[&format!("kiln/iteration-{n}.txt")];
        assert!(
            f.starts_with(&format!("Ticket: {title}\nTicket id: {local}\n")),
            "build {n} was {local}'s: {f}"
        );
        assert!(f.contains("# Todo PRD"), "the prompt carries the PRD");
    }
    let puts = runner.edge.snapshot_puts(&id);
    assert_eq!(
        puts.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [1, 2, 3],
        "a snapshot after every ticket, under the job's lease"
    );
    let commits: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Ticket {
                status: TicketStatus::Done,
                metadata,
                ..
            } if metadata["local_id"] != "E1" => {
                Some(metadata["commit"].as_str().unwrap().to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(commits.len(), 3);
    assert!(
        commits.iter().all(|c| c.len() == 40)
            && commits[0] != commits[1]
            && commits[1] != commits[2]
    );
    let log = system_lines(&events);
    assert_eq!(
        log.iter().filter(|l| l.starts_with("Committed ")).count(),
        3,
        "one commit per ticket"
    );

    // Narrations, usage per LLM step, every step's start and end in the log.
    let narrations = events
        .iter()
        .filter(|e| {
            matches!(e, RunnerEvent::Stage { role, sender, metadata, .. }
            if role == "system" && sender == "Kiln" && metadata["type"] == "description")
        })
        .count();
    assert!(narrations >= 4, "a narration at each phase");
    let usage: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Usage { usage } => Some(usage.source.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(usage, ["ceo", "cto", "secretary", "prd", "tickets"]);
    for n in 1..=8 {
        assert!(
            log.iter().any(|l| l.starts_with(&format!("Step {n} ("))),
            "step {n} starts: {log:#?}"
        );
        assert!(
            log.iter()
                .any(|l| l.starts_with(&format!("Step {n} ended in "))),
            "step {n} ends"
        );
    }
    assert!(log.iter().any(
        |l| l.starts_with("LLM ceo: anthropic/app-test-model") && l.contains("engine overhead")
    ));
    runner.wait_released(&id).await;
    assert!(
        !runner.worktrees_dir().join(&id).exists(),
        "the workspace is removed"
    );
    assert!(
        !runner.worktrees_dir().join(format!("{id}.git")).exists(),
        "with its git directory"
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_failing_twice_fails_the_job_and_its_dependents_are_not_built() {
    // No consensus: three full rounds. E1 holds the broken chain, E2 the flaky task.
    let tickets = backlog(json!([
        {"id": "E1", "type": "epic", "title": "Pages", "parent": null},
        {"id": "E2", "type": "epic", "title": "Looks", "parent": null},
        {"id": "S1", "type": "story", "title": "Broken fail", "parent": "E1", "dependencies": []},
        {"id": "S2", "type": "story", "title": "Page write", "parent": "E1", "dependencies": ["S1"]},
        {"id": "S3", "type": "story", "title": "More write", "parent": "E1", "dependencies": ["S2"]},
        {"id": "T1", "type": "task", "title": "Styles flaky write", "parent": "E2", "dependencies": []}
    ]));
    let mut s = script(&tickets);
    s["rules"][2] = json!({"when": {"role": "secretary"}, "text": "Still open: storage."});
    let server = model(s);
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(None, false);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    let labels = lifecycle(&events);
    let turns: Vec<&String> = labels.iter().filter(|l| l.contains(" #")).collect();
    assert_eq!(
        turns.len(),
        9,
        "three rounds of three without consensus: {labels:?}"
    );
    assert_eq!(turns[8], "Secretary #9");
    let building: Vec<&str> = labels
        .iter()
        .skip_while(|l| *l != "phase building")
        .skip(1)
        .map(String::as_str)
        .collect();
    assert_eq!(
        building,
        [
            "S1 in_progress",
            "E1 in_progress",
            "S1 in_progress",
            "S1 failed",
            "E1 failed",
            "S2 failed",
            "S3 failed",
            "T1 in_progress",
            "E2 in_progress",
            "T1 in_progress",
            "T1 done",
            "E2 done",
            "finished Failed",
        ],
        "S1 tried twice; S2 and S3 (through S2) not built; flaky T1 done on its second try; \
         E1 failed with S1, E2 done with T1"
    );
    let messages: HashMap<String, String> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Ticket {
                status: TicketStatus::Failed,
                message,
                metadata,
                ..
            } => Some((
                metadata["local_id"].as_str().unwrap().to_string(),
                message.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        messages["S1"],
        "Failed after 2 attempts: the agent exited with code 1"
    );
    assert_eq!(messages["S2"], "not built: its dependency S1 failed");
    assert_eq!(messages["S3"], "not built: its dependency S2 failed");
    assert_eq!(messages["E1"], "E1: its ticket S1 failed");
    let s1_log = events.iter().find_map(|e| match e {
        RunnerEvent::Ticket {
            status: TicketStatus::Failed,
            metadata,
            ..
        } if metadata["local_id"] == "S1" => metadata["log"].as_str().map(str::to_string),
        _ => None,
    });
    assert!(
        s1_log.unwrap().contains("agent: about to fail"),
        "a log snippet rides with the ticket"
    );
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    let error = error.unwrap();
    assert!(
        error.starts_with(
            "3 of 4 tickets were not built: S1 \"Broken fail\" (the agent exited with code 1)"
        ) && error.contains("S2 (not built: its dependency S1 failed)")
            && error.contains("S3 (not built: its dependency S2 failed)"),
        "{error}"
    );
    // Built tickets (failed or not) were committed and snapshotted; skipped ones were not.
    assert_eq!(runner.edge.snapshot_puts(&id).len(), 2);
    let files = snapshot_files(&runner.edge.snapshot(&id).unwrap());
    assert!(files["kiln/iteration-4.txt"].starts_with("Ticket: Styles flaky write"));
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_backlog_is_asked_for_again_with_the_reason() {
    let cycle = backlog(json!([
        {"id": "S1", "type": "story", "title": "A write", "dependencies": ["S2"]},
        {"id": "S2", "type": "story", "title": "B write", "dependencies": ["S1"]}
    ]));
    let good =
        backlog(json!([{"id": "S1", "type": "story", "title": "A write", "dependencies": []}]));
    let mut s = script(&good);
    s["rules"][4] = json!({"when": {"role": "tickets", "user_messages": 1}, "text": cycle});
    s["rules"]
        .as_array_mut()
        .unwrap()
        .insert(5, json!({"when": {"role": "tickets"}, "text": good}));
    let server = model(s);
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(None, false);
    let events = runner.run(a, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let asked: Vec<RecordedRequest> = server
        .chat_requests()
        .into_iter()
        .filter(|r| role_of(r) == "tickets")
        .collect();
    assert_eq!(asked.len(), 2, "the backlog asked for twice");
    assert!(
        asked[1]
            .prompt
            .contains("the dependencies of tickets S1, S2 form a cycle"),
        "the second ask carries the reason, in the model's ids: {}",
        asked[1].prompt
    );
    let backlogs = events
        .iter()
        .filter(|e| matches!(e, RunnerEvent::Backlog { .. }))
        .count();
    assert_eq!(backlogs, 1, "only the valid backlog reaches the edge");
    assert!(system_lines(&events).iter().any(|l| l.contains("the answer could not be used (the dependencies of tickets S1, S2 form a cycle); asking again")));
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prd_without_its_spec_twice_fails_the_job_clearly() {
    let mut s = script(&todo_backlog());
    s["rules"][3] = json!({"when": {"role": "prd"}, "text": "# PRD\n\nNo spec here."});
    let server = model(s);
    let runner = runner(&server, Budget::default()).await;
    let events = runner.run(app_job(None, false), 60).await;
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some("Writing the PRD failed: the prd step's answer could not be used after 2 tries: the answer has no fenced ```json block holding the spec")
    );
    assert!(!lifecycle(&events)
        .iter()
        .any(|l| l == "prd" || l.starts_with("backlog")));
    assert_eq!(
        server
            .chat_requests()
            .iter()
            .filter(|r| role_of(r) == "prd")
            .count(),
        2
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_fails_the_job_naming_it() {
    let server = model(script(&todo_backlog()));
    let budget = Budget {
        max_tokens: Some(100),
        max_usd: None,
    };
    let runner = runner(&server, budget).await;
    let events = runner.run(app_job(None, false), 60).await;
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    let error = error.unwrap();
    assert!(
        error.starts_with("LLM budget exceeded: the job used ")
            && error.contains("over its budget of 100"),
        "{error}"
    );
    assert_eq!(
        server.chat_requests().len(),
        1,
        "no call starts past the budget"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RunnerEvent::Usage { usage } if usage.source == "ceo")),
        "the call that went over is still reported"
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, RunnerEvent::Dialogue { .. })));
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_app_build_waits_between_steps_until_resumed() {
    let mut s = script(&todo_backlog());
    // The CEO takes a while, so a pause arrives while its step runs.
    s["rules"][0]["stall_before_ms"] = json!(700);
    let server = model(s);
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(None, true);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    let paused = |e: &RunnerEvent| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("Paused: the job waits for resume before"));
    runner
        .edge
        .wait_event(&id, "the paused line", 20, paused)
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        server.chat_requests().is_empty(),
        "dispatched paused: no step starts"
    );
    runner
        .edge
        .send(EdgeMessage::Resume { job_id: id.clone() })
        .await;

    // Paused while the CEO speaks: the CEO's turn ends, the CTO's does not start.
    runner
        .edge
        .wait_event(&id, "the CEO's step", 20, |e| {
            matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("Step 1 (LLM, role ceo) started"))
        })
        .await;
    runner
        .edge
        .send(EdgeMessage::Pause { job_id: id.clone() })
        .await;
    let events = runner
        .edge
        .wait_event(&id, "the second pause", 20, |e| {
            matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("Paused: the job waits for resume before CTO, round 1"))
        })
        .await;
    assert_eq!(lifecycle(&events), ["phase planning", "CEO #1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.chat_requests().len(), 1, "nothing runs while paused");
    assert_eq!(
        lifecycle(&runner.edge.events(&id)),
        ["phase planning", "CEO #1"]
    );
    runner
        .edge
        .send(EdgeMessage::Resume { job_id: id.clone() })
        .await;
    let events = runner.edge.wait_finished(&id, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed);
    let log = system_lines(&events);
    assert!(log
        .iter()
        .any(|l| l == "Pause requested: the job pauses when the running step ends"));
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("Resumed after "))
            .count(),
        2
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_paused_app_build_leaves_no_workspace() {
    let server = model(script(&todo_backlog()));
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(None, true);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &id,
            "the paused line",
            20,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("Paused:")),
        )
        .await;
    assert!(runner.worktrees_dir().join(&id).is_dir());
    assert!(runner.worktrees_dir().join(format!("{id}.git")).is_dir());
    runner
        .edge
        .send(EdgeMessage::Cancel { job_id: id.clone() })
        .await;
    runner.wait_released(&id).await;
    assert!(
        !runner.has_finished(&id),
        "a cancelled job sends nothing more"
    );
    assert!(!runner.worktrees_dir().join(&id).exists());
    assert!(!runner.worktrees_dir().join(format!("{id}.git")).exists());
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_plans_only_the_new_requirements_over_the_restored_workspace() {
    let tickets =
        backlog(json!([{"id": "S1", "type": "story", "title": "Dark write", "dependencies": []}]));
    let server = model(script(&tickets));
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(Some("add a dark mode"), false);
    let id = a.job_id.clone();
    runner.edge.set_snapshot(
        &id,
        WorkspaceSnapshot {
            files: vec![SnapshotFile {
                path: "index.html".into(),
                content: "<h1>todo</h1>\n".into(),
                size: 14,
            }],
            omitted: vec![],
        },
    );
    let events = runner.run(a, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    assert!(system_lines(&events)
        .iter()
        .any(|l| l == "Restored 1 files of the earlier run from its snapshot"));
    let asked = server.chat_requests();
    assert!(
        asked[0]
            .prompt
            .contains("Plan and build only these new requirements now")
            && asked[0].prompt.contains("add a dark mode"),
        "{}",
        asked[0].prompt
    );
    assert!(
        asked[0].prompt.contains("A todo list for one person"),
        "in the context of the earlier summary"
    );
    let files = snapshot_files(&runner.edge.snapshot(&id).unwrap());
    assert_eq!(
        files["index.html"], "<h1>todo</h1>\n",
        "the earlier run's files stay"
    );
    assert!(files["kiln/iteration-1.txt"].starts_with("Ticket: Dark write"));
    assert_eq!(
        lifecycle(&events)
            .iter()
            .filter(|l| l.ends_with(" done"))
            .count(),
        1,
        "only the new ticket is built"
    );
    runner.stop().await;
}

#[tokio::test]
async fn an_app_workspace_is_a_new_repository_its_agent_cannot_reach() {
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspaces::new(
        dir.path().join("repos"),
        dir.path().join("worktrees"),
        "file:///nowhere",
        None,
    );
    let id = uuid::Uuid::new_v4().to_string();
    let wt = ws.create_app_workspace(&id).await.unwrap();
    assert_eq!(wt.path, dir.path().join("worktrees").join(&id));
    assert!(
        !wt.path.join(".git").exists(),
        "no git directory inside the workspace"
    );
    std::fs::write(wt.path.join("index.html"), "hi\n").unwrap();
    let first = ws.commit_allow_empty(&wt, "S1: page").await.unwrap();
    let second = ws
        .commit_allow_empty(&wt, "S2: nothing changed")
        .await
        .unwrap();
    assert_ne!(
        first, second,
        "a ticket that changed nothing is still one commit"
    );
    let log = ws.log(&wt).await.unwrap();
    assert_eq!(
        log.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["S2: nothing changed", "S1: page"]
    );
    assert_eq!(log[1].0, first);
    let remotes = common::git(&wt.git_dir, &["remote"]);
    assert_eq!(remotes.trim(), "", "no remote");
    // A leftover of the same job is replaced; removal takes the git directory too.
    let again = ws.create_app_workspace(&id).await.unwrap();
    assert!(!again.path.join("index.html").exists());
    ws.remove_worktree(&again).await;
    assert!(!again.path.exists() && !again.git_dir.exists());
    // A crash's leftovers are swept.
    let left = ws.create_app_workspace(&id).await.unwrap();
    let swept = ws.sweep(&[]).await;
    assert!(
        swept.worktrees.contains(&id) && swept.worktrees.contains(&format!("{id}.git")),
        "{swept:?}"
    );
    assert!(!left.git_dir.exists());
    assert!(ws.create_app_workspace("../x").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_refusing_with_429_then_answering_costs_a_retry_not_the_job() {
    let mut s = script(&todo_backlog());
    s["rules"][0] = json!({"when": {"role": "ceo"}, "error": {"status": 429, "retry_after": 0}, "fail_first": 1, "text": "CEO: a todo list first."});
    let server = model(s);
    let runner = runner(&server, Budget::default()).await;
    let events = runner.run(app_job(None, false), 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let statuses: Vec<(String, u16)> = server
        .chat_requests()
        .iter()
        .map(|r| (role_of(r), r.status))
        .collect();
    assert_eq!(
        &statuses[..2],
        [("ceo".to_string(), 429), ("ceo".to_string(), 200)]
    );
    assert!(
        system_lines(&events)
            .iter()
            .any(|l| l.starts_with("LLM ceo: ") && l.contains("2 attempt(s)")),
        "the step's line counts the attempts"
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_during_a_ticket_holds_the_next_one_before_it_is_announced() {
    let tickets = backlog(json!([
        {"id": "S1", "type": "story", "title": "Page slow write", "dependencies": []},
        {"id": "S2", "type": "story", "title": "Script write", "dependencies": ["S1"]}
    ]));
    let server = model(script(&tickets));
    let runner = runner(&server, Budget::default()).await;
    let a = app_job(None, false);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(&id, "S1 in progress", 30, |e| {
            matches!(
                e,
                RunnerEvent::Ticket {
                    status: TicketStatus::InProgress,
                    ..
                }
            )
        })
        .await;
    runner
        .edge
        .send(EdgeMessage::Pause { job_id: id.clone() })
        .await;
    runner
        .edge
        .wait_event(&id, "the pause before S2", 30, |e| {
            matches!(e, RunnerEvent::Log { content, .. } if content == "Paused: the job waits for resume before ticket S2")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let building: Vec<String> = lifecycle(&runner.edge.events(&id))
        .into_iter()
        .skip_while(|l| l != "phase building")
        .collect();
    assert_eq!(
        building,
        ["phase building", "S1 in_progress", "S1 done"],
        "S1 finishes; S2 is not announced while paused"
    );
    runner
        .edge
        .send(EdgeMessage::Resume { job_id: id.clone() })
        .await;
    let events = runner.edge.wait_finished(&id, 30).await;
    assert_eq!(finished(&events).0, Outcome::Completed);
    assert!(lifecycle(&events).contains(&"S2 done".to_string()));
    runner.stop().await;
}
