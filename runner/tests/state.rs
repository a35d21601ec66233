//! The runner token kept across restarts (`RUNNER_STATE_DIR/runner.json`) against the fake edge:
//! saved at registration with mode 0600, reused by later starts, replaced when the edge refuses
//! it, never sent to another edge, and one runner per state directory.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use kiln_runner::app::StartError;
use kiln_runner::config::EdgeCredential;
use kiln_runner::state::SavedRegistration;

fn saved(dir: &Path) -> SavedRegistration {
    let text = std::fs::read_to_string(dir.join("runner.json")).expect("runner.json is written");
    serde_json::from_str(&text).expect("runner.json parses")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn on(edge: &FakeEdge, state: &Path) -> RunnerOptions {
    RunnerOptions {
        edge: Some(edge.clone()),
        state_dir: Some(state.to_path_buf()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_registration_is_saved_with_mode_0600_and_reused_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let edge = FakeEdge::start().await;

    let first = TestRunner::start(on(&edge, &state)).await;
    assert_eq!(edge.registered_names(), vec!["test-runner"]);
    let s = saved(&state);
    assert_eq!(s.token, edge.issued_tokens()[0]);
    assert_eq!(s.runner_id, "runner-1");
    assert_eq!(s.edge_url, format!("{}/", edge.url));
    assert_eq!(s.name, "test-runner");
    assert!(chrono::DateTime::parse_from_rfc3339(&s.registered_at).is_ok());
    assert_eq!(mode(&state.join("runner.json")), 0o600);
    assert_eq!(mode(&state), 0o700);
    first.stop().await;

    // A restart with the registration token still set: no new registration.
    let second = TestRunner::start(on(&edge, &state)).await;
    assert_eq!(edge.registered_names().len(), 1, "registered once");
    assert_eq!(edge.connected_tokens().last(), Some(&s.token));
    second.stop().await;

    // And without it: the saved token is all the runner needs.
    let third = TestRunner::start(RunnerOptions {
        credential: None,
        ..on(&edge, &state)
    })
    .await;
    assert_eq!(edge.registered_names().len(), 1);
    assert_eq!(edge.connected_tokens().len(), 3);
    assert!(edge.connected_tokens().iter().all(|t| t == &s.token));
    assert_eq!(edge.refused_connects(), 0);
    assert_eq!(saved(&state), s, "the file is unchanged");
    third.stop().await;
}

#[tokio::test]
async fn a_saved_token_the_edge_refuses_is_replaced_by_a_new_registration() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let edge = FakeEdge::start().await;
    TestRunner::start(on(&edge, &state)).await.stop().await;
    let old = saved(&state);

    edge.revoke_tokens();
    // Loosened by hand: the overwrite is 0600 again.
    std::fs::set_permissions(
        state.join("runner.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let runner = TestRunner::start(on(&edge, &state)).await;
    assert_eq!(
        edge.refused_connects(),
        1,
        "the saved token was tried first"
    );
    assert_eq!(
        edge.registered_names().len(),
        2,
        "then the runner registered"
    );
    let new = saved(&state);
    assert_ne!(new.token, old.token);
    assert_eq!(new.token, edge.issued_tokens()[0]);
    assert_eq!(edge.connected_tokens().last(), Some(&new.token));
    assert_eq!(mode(&state.join("runner.json")), 0o600);

    // Event posts use the new token too: a job runs to its end.
    let events = runner
        .run(
            assignment(kiln_schemas::status::JobType::Code, "look around"),
            60,
        )
        .await;
    assert_started_and_finished(&events);
    runner.stop().await;
}

#[tokio::test]
async fn a_saved_token_refused_without_a_registration_token_is_kept_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let edge = FakeEdge::start().await;
    TestRunner::start(on(&edge, &state)).await.stop().await;
    let old = saved(&state);
    edge.revoke_tokens();
    let start = TestRunner::try_start(RunnerOptions {
        credential: None,
        ..on(&edge, &state)
    });
    // It starts, but no session is accepted: it keeps trying (with backoff) and does not register.
    let waited = tokio::time::timeout(std::time::Duration::from_secs(3), start).await;
    assert!(waited.is_err(), "no hello without a valid token");
    assert!(edge.refused_connects() >= 2, "{}", edge.refused_connects());
    assert_eq!(edge.registered_names().len(), 1);
    assert_eq!(saved(&state), old);
}

#[tokio::test]
async fn a_saved_token_is_only_used_with_the_edge_and_name_it_was_issued_for() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let first_edge = FakeEdge::start().await;
    TestRunner::start(on(&first_edge, &state))
        .await
        .stop()
        .await;
    let first = saved(&state);

    let other_edge = FakeEdge::start().await;
    TestRunner::start(on(&other_edge, &state))
        .await
        .stop()
        .await;
    assert_eq!(other_edge.registered_names().len(), 1);
    assert_eq!(
        other_edge.refused_connects(),
        0,
        "the first edge's token never went to the other edge"
    );
    let second = saved(&state);
    assert_eq!(second.edge_url, format!("{}/", other_edge.url));
    assert_ne!(second.token, first.token);

    TestRunner::start(RunnerOptions {
        name: "renamed".into(),
        ..on(&other_edge, &state)
    })
    .await
    .stop()
    .await;
    assert_eq!(
        other_edge.registered_names(),
        vec!["test-runner", "renamed"]
    );
    assert_eq!(saved(&state).name, "renamed");

    // Nothing fits and nothing to register with: the runner says what to set.
    let err = TestRunner::try_start(RunnerOptions {
        credential: None,
        ..on(&first_edge, &state)
    })
    .await
    .err()
    .expect("no credential");
    assert!(matches!(err, StartError::NoCredential), "{err}");
}

#[tokio::test]
async fn runner_token_beats_the_saved_registration_and_is_never_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let edge = FakeEdge::start().await;
    let issued = kiln_runner::edge::register(
        &kiln_runner::edge::http_client(),
        &edge.url.parse().unwrap(),
        edge::REGISTRATION_TOKEN,
        "given",
    )
    .await
    .unwrap();
    let runner = TestRunner::start(RunnerOptions {
        credential: Some(EdgeCredential::Token(issued.token.clone())),
        ..on(&edge, &state)
    })
    .await;
    assert_eq!(edge.connected_tokens(), vec![issued.token]);
    assert!(!state.exists(), "the state directory is not touched");
    runner.stop().await;
}

#[tokio::test]
async fn one_runner_holds_a_state_directory_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let edge = FakeEdge::start().await;
    let first = TestRunner::start(on(&edge, &state)).await;
    let kept = saved(&state);

    // A second runner on the same directory registers for itself and leaves the file alone.
    let second = TestRunner::start(RunnerOptions {
        name: "second".into(),
        ..on(&edge, &state)
    })
    .await;
    assert_eq!(edge.registered_names(), vec!["test-runner", "second"]);
    assert_eq!(saved(&state), kept);
    second.stop().await;

    // Without a registration token it cannot start at all.
    let err = TestRunner::try_start(RunnerOptions {
        credential: None,
        ..on(&edge, &state)
    })
    .await
    .err()
    .expect("the directory is in use");
    match &err {
        StartError::StateInUse { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("RUNNER_STATE_DIR"), "{err}");
    first.stop().await;

    // Once the first has stopped, the directory is free again.
    TestRunner::start(RunnerOptions {
        credential: None,
        ..on(&edge, &state)
    })
    .await
    .stop()
    .await;
    assert_eq!(edge.registered_names().len(), 2);
}
