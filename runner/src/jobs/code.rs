//! `code` jobs: the agent once, then one commit, a push and a pull request.

use kiln_schemas::runner::{Outcome, RunnerEvent};

use super::run::{failed, finished, JobRun, Published};
use crate::workspace::RepoRef;

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

impl JobRun {
    /// A job a webhook started from a GitHub issue comments on that issue with the pull request
    /// it opened. Only on the job's own repository; a failure is noted in the job's log and
    /// does not fail the job (the pull request exists).
    pub(super) async fn answer_source_issue(&self, pr_url: &str) {
        let Some(issue) = &self.assignment.source_issue else {
            return;
        };
        let a = &self.assignment;
        if !issue.org.eq_ignore_ascii_case(&a.github_org)
            || !issue.repo.eq_ignore_ascii_case(&a.github_repo)
        {
            self.sink
                .system(format!(
                    "Not commenting on {}/{}#{}: it is not this job's repository",
                    issue.org, issue.repo, issue.number
                ))
                .await;
            return;
        }
        let repo = match RepoRef::new(&a.github_org, &a.github_repo) {
            Ok(r) => r,
            Err(e) => {
                self.sink
                    .system(format!("Not commenting on the issue: {e}"))
                    .await;
                return;
            }
        };
        let body = format!(
            "Kiln opened {pr_url} for this issue (job `{}`).",
            self.job_id()
        );
        match self
            .services
            .github
            .comment_on_issue(&repo, issue.number, &body)
            .await
        {
            Ok(url) => {
                self.sink
                    .system(format!(
                        "Commented on issue #{} with the pull request: {url}",
                        issue.number
                    ))
                    .await
            }
            Err(e) => {
                self.sink
                    .system(format!("Commenting on issue #{} failed: {e}", issue.number))
                    .await
            }
        }
    }
}
