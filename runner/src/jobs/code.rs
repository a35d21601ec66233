//! `code` jobs: the agent once, then one commit, a push and a pull request.

use kiln_schemas::runner::{Outcome, RunnerEvent};

use super::run::{failed, finished, JobRun, Published};

impl JobRun {
    pub(super) async fn run_code(&self) -> RunnerEvent {
        let result = self
            .run_agent(&self.assignment.prompt, 1, None, None, None)
            .await;
        if let Some(over) = self.workspace_over_limit().await {
            return failed(over);
        }
        if !result.succeeded() {
            return failed(result.failure("The agent"));
        }
        let body = format!(
            "{}\n\n---\nOpened by Kiln for job `{}`.",
            self.assignment.prompt.trim(),
            self.job_id()
        );
        match self.publish(&body).await {
            Ok(Published::PullRequest(url)) => finished(
                Outcome::Completed,
                format!("Opened pull request {url}"),
                Some(url),
                None,
                None,
                None,
            ),
            Ok(Published::BranchOnly(what)) => finished(
                Outcome::Completed,
                format!("The agent's changes are committed: {what}"),
                None,
                None,
                None,
                None,
            ),
            Ok(Published::NothingToCommit) => finished(
                Outcome::Completed,
                "The agent finished without changes; no pull request was opened".into(),
                None,
                None,
                None,
                None,
            ),
            Err(e) => failed(e),
        }
    }
}
