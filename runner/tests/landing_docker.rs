//! Landing jobs under the Docker executor: the coder, the fixer and the build check run in the
//! job's container (busybox's sh, grep and sed for the check) over the session's workspace at
//! `/app`, as another user than the runner's, and a chat job's workspace restored from the
//! bundle works there the same.

mod common;

use common::landing::*;
use common::{docker_host, RunnerOptions, TestRunner};
use kiln_runner::config::ExecutorKind;
use kiln_runner::docker::{container_name, DockerClient};
use kiln_schemas::runner::RunnerEvent;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_landing_session_builds_checks_and_repairs_its_page_in_the_jobs_container() {
    let host = docker_host().await;
    let server = model_server();
    let runner = TestRunner::start(RunnerOptions {
        executor: ExecutorKind::Docker,
        docker_host: Some(host.clone()),
        llm: llm(&server),
        // The scripted agent is the command itself (`sh -c`): nothing to mount.
        agent_command: Some(AGENT.to_string()),
        ..Default::default()
    })
    .await;
    let docker = DockerClient::connect(Some(&host)).await.unwrap();
    let page = new_page();

    let a = landing_job(&page, payload("signups"), None);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &id,
            "the coder's start",
            60,
            |e| matches!(e, RunnerEvent::Node { node, .. } if node == "coder"),
        )
        .await;
    assert!(docker.container_exists(&container_name(&id)).await.unwrap());
    let events = runner.edge.wait_finished(&id, 90).await;
    assert_completed(&events);
    assert_eq!(path(&events)[6..], CODED_AND_PUBLISHED);
    assert!(lines(&events).iter().any(|l| l == "OK: index.html builds"));
    let preview = runner.edge.preview(&page).unwrap();
    assert_eq!(
        preview
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>(),
        ["index.html", "script.js", "styles.css"]
    );
    runner.wait_released(&id).await;

    // A chat whose coder breaks the build: busybox's check finds it, the fixer repairs it.
    let a = landing_job(
        &page,
        payload("signups"),
        Some("Drop the styles BREAK_BUILD"),
    );
    let id = a.job_id.clone();
    let events = runner.run(a, 90).await;
    assert_completed(&events);
    assert_eq!(
        node_data(&events, "build_check", "error")["errors"],
        json!(["index.html references styles.css, which does not exist"])
    );
    let (_, _, message, data) = nodes(&events)
        .into_iter()
        .find(|(n, t, m, _)| n == "coder_tools" && t == "tool" && m.starts_with("Deleted"))
        .expect("the coder's deletion");
    assert_eq!(
        (message.as_str(), &data["files"]),
        ("Deleted 1 file(s)", &json!(["styles.css"]))
    );
    assert_eq!(
        node_data(&events, "deployment_fixer_tools", "tool")["files"],
        json!(["styles.css"])
    );
    let (_, log) = clone_bundle(&runner.edge.bundle(&page).unwrap());
    assert_eq!(
        log,
        [
            "landing_chat: Drop the styles BREAK_BUILD",
            "landing_init: Aurora"
        ]
    );
    runner.wait_released(&id).await;
    assert!(!docker.container_exists(&container_name(&id)).await.unwrap());
    runner.stop().await;
}
