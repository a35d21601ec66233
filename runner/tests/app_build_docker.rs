//! An app build under the Docker executor: the tickets' agent runs happen in the job's container,
//! named as seed 000 names it (`project_engine_<job_id>_container`), over the app's workspace
//! mounted at `/app`; the container and the workspace are gone when the job ends.

mod common;

use std::time::Duration;

use common::{assignment, docker_host, finished, RunnerOptions, TestRunner};
use kiln_e2e::model::{ModelServer, Script};
use kiln_runner::config::ExecutorKind;
use kiln_runner::docker::{container_name, DockerClient};
use kiln_runner::llm::{Api, ApiKey, LlmConfig, ModelRef, Provider};
use kiln_schemas::app::TicketStatus;
use kiln_schemas::runner::{AppBuildParams, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_build_runs_its_tickets_in_the_jobs_named_container() {
    let host = docker_host().await;
    let backlog = json!({"tickets": [
        {"id": "S1", "type": "story", "title": "Page slow write", "dependencies": []},
        {"id": "S2", "type": "story", "title": "Script write", "dependencies": ["S1"]}
    ]});
    let server = ModelServer::start(
        Script::from_value(json!({"rules": [
            {"when": {"role": "secretary"}, "text": "Agreed. CONSENSUS"},
            {"when": {"role": "prd"}, "text": "# PRD\n\nA page.\n\n```json\n{\"name\": \"page\"}\n```"},
            {"when": {"role": "tickets"}, "text": format!("```json\n{backlog}\n```")},
            {"text": "A page first."}
        ]}))
        .unwrap(),
    );
    let mut llm = LlmConfig::default();
    llm.providers.insert(
        "anthropic".into(),
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &server.url(),
            Some(ApiKey::new("sk-ant-test")),
        ),
    );
    llm.roles.insert(
        "default".into(),
        ModelRef {
            provider: "anthropic".into(),
            model: "docker-test-model".into(),
        },
    );
    let runner = TestRunner::start(RunnerOptions {
        executor: ExecutorKind::Docker,
        docker_host: Some(host.clone()),
        llm,
        ..Default::default()
    })
    .await;
    let docker = DockerClient::connect(Some(&host)).await.unwrap();

    let mut a = assignment(JobType::AppBuild, "a page");
    a.app = Some(AppBuildParams {
        initial_prompt: "a page".into(),
        requirements_summary: "One page.".into(),
        continuation: None,
        paused: false,
    });
    let id = a.job_id.clone();
    let name = container_name(&id);
    assert_eq!(name, format!("project_engine_{id}_container"));
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(&id, "S1 in progress", 60, |e| {
            matches!(
                e,
                RunnerEvent::Ticket {
                    status: TicketStatus::InProgress,
                    ..
                }
            )
        })
        .await;
    assert!(
        docker.container_exists(&name).await.unwrap(),
        "the ticket runs in {name}"
    );
    let events = runner.edge.wait_finished(&id, 90).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let agent_lines: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log { content, .. } if content.starts_with("agent: job ") => Some(content),
            _ => None,
        })
        .collect();
    assert_eq!(
        agent_lines.len(),
        2,
        "one agent run per ticket: {agent_lines:?}"
    );
    assert!(
        agent_lines[0].ends_with("prompt: Ticket: Page slow write"),
        "{}",
        agent_lines[0]
    );
    let snap = runner.edge.snapshot(&id).expect("a snapshot");
    let paths: Vec<&str> = snap.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["kiln/iteration-1.txt", "kiln/iteration-2.txt"],
        "written in the container's /app"
    );
    runner.wait_released(&id).await;
    let mut gone = false;
    for _ in 0..50 {
        if !docker.container_exists(&name).await.unwrap() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the container is removed");
    assert!(!runner.worktrees_dir().join(&id).exists());
    assert!(!runner.worktrees_dir().join(format!("{id}.git")).exists());
    runner.stop().await;
}
