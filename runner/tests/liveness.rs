//! Half-open connections: the runner pings the edge over its socket, and one that hears nothing
//! from the edge (no pong, no message) for half the lease time stops its jobs before the edge
//! could expire their leases and give them to another runner, then connects again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_schemas::runner::RunnerEvent;

const LEASE_SECS: u32 = 4;

async fn runner_with_short_leases() -> TestRunner {
    let edge = FakeEdge::start().await;
    edge.set_lease_secs(LEASE_SECS);
    TestRunner::start(RunnerOptions {
        edge: Some(edge),
        ..RunnerOptions::default()
    })
    .await
}

#[tokio::test]
async fn pongs_keep_a_quiet_edge_alive() {
    // The fake edge never sends a message after its welcome: only the pongs to the runner's
    // pings tell the runner it is there. A job outlives the silence limit many times over.
    let runner = runner_with_short_leases().await;
    let (id, _, pid) = start_hanging_job(&runner).await;
    tokio::time::sleep(Duration::from_secs(3 * LEASE_SECS as u64)).await;
    assert!(
        runner.supervisor.held().iter().any(|h| h.job_id == id),
        "the job still runs"
    );
    assert!(process_alive(pid));
    assert_eq!(runner.edge.hellos().len(), 1, "the session stayed up");
    runner
        .edge
        .send(kiln_schemas::runner::EdgeMessage::Cancel { job_id: id.clone() })
        .await;
    runner.wait_released(&id).await;
}

#[tokio::test]
async fn a_silent_edge_makes_the_runner_stop_its_jobs_within_half_the_lease() {
    let runner = runner_with_short_leases().await;
    let (id, branch, pid) = start_hanging_job(&runner).await;

    // The socket stays open, but the edge neither reads nor writes; event posts still succeed.
    let silent_at = Instant::now();
    runner.edge.go_silent();
    let sup = runner.supervisor.clone();
    wait_until("the job to be stopped", Duration::from_secs(20), || {
        sup.held().is_empty()
    })
    .await;
    let took = silent_at.elapsed();
    wait_until("the job to be cleaned up", Duration::from_secs(20), || {
        sup.counts() == (0, 0)
    })
    .await;
    println!(
        "edge silent → job stopped in {} ms, cleaned up in {} ms",
        took.as_millis(),
        silent_at.elapsed().as_millis()
    );
    let half = Duration::from_millis(LEASE_SECS as u64 * 500);
    assert!(
        took >= half - Duration::from_millis(1100),
        "stopped after {took:?}: too early for a silence limit of {half:?}"
    );
    assert!(
        took < Duration::from_secs(LEASE_SECS as u64),
        "stopped after {took:?}: not before the lease ({LEASE_SECS} s) could expire"
    );
    assert!(!process_alive(pid), "the agent was killed");
    assert!(
        !runner.worktrees_dir().join(&id).exists(),
        "the worktree is gone"
    );
    let events = runner.edge.events(&id);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RunnerEvent::Finished { .. })),
        "a stopped job reports nothing more: the edge requeues it when its lease expires"
    );
    assert!(
        !runner.remotes.branches(ORG, REPO).contains(&branch),
        "nothing was pushed"
    );

    // The runner drops the dead socket and connects again, holding nothing.
    let hellos = runner.edge.wait_hellos(2).await;
    match &hellos[1] {
        kiln_schemas::runner::RunnerMessage::Hello { running, .. } => {
            assert!(running.is_empty(), "{running:?}")
        }
        other => panic!("{other:?}"),
    }
}
