//! `ralph` jobs: the agent and the feedback commands in a loop. Each iteration's prompt is the
//! original one plus the progress of the earlier iterations (kept in a file beside the worktree);
//! the loop ends on the completion promise, the iteration cap, a stop, or an agent that fails
//! twice on the same iteration. One commit and one pull request at the end, partial work included.

use chrono::{SecondsFormat, Utc};
use kiln_schemas::jobs::{
    FeedbackResult, Iteration, RalphParams, DEFAULT_COMPLETION_PROMISE, DEFAULT_MAX_ITERATIONS,
};
use kiln_schemas::runner::{Outcome, RunnerEvent};
use kiln_schemas::status::CompletionReason;
use tokio::sync::mpsc;

use super::run::{failed, finished, progress_path, Inbox, JobRun, Published};
use super::JobControl;
use crate::output::tail_chars;

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The prompt of an iteration: the original, plus what earlier iterations did.
pub fn build_prompt(original: &str, progress: &str, iteration: u32, max_iterations: u32) -> String {
    if progress.trim().is_empty() {
        return original.to_string();
    }
    format!(
        "{}\n\n---\n## Progress so far (this is iteration {iteration} of at most {max_iterations})\n\n{}",
        original.trim_end(),
        progress.trim_end()
    )
}

/// The progress notes of one iteration. `feedback_output` holds the tail of each failed feedback
/// command's output, so the next iteration can see what to fix.
pub fn progress_entry(it: &Iteration, feedback_output: &[(String, String)]) -> String {
    let mut s = format!("### Iteration {}\n", it.iteration_number);
    match (&it.error, it.exit_code) {
        (Some(e), _) => s.push_str(&format!("- Agent failed: {e}\n")),
        (None, Some(code)) => s.push_str(&format!("- Agent exit code: {code}\n")),
        (None, None) => s.push_str("- Agent exit code: unknown\n"),
    }
    if !it.feedback_results.is_empty() {
        let results: Vec<String> = it
            .feedback_results
            .iter()
            .map(|f| {
                format!(
                    "`{}` {} (exit {})",
                    f.command,
                    if f.passed { "passed" } else { "FAILED" },
                    f.exit_code
                )
            })
            .collect();
        s.push_str(&format!("- Feedback: {}\n", results.join("; ")));
    }
    for (command, output) in feedback_output.iter().filter(|(_, o)| !o.trim().is_empty()) {
        s.push_str(&format!(
            "- Output of `{command}`:\n```\n{}\n```\n",
            tail_chars(output.trim(), 300)
        ));
    }
    if !it.output_summary.trim().is_empty() {
        s.push_str(&format!(
            "- Agent output (end):\n```\n{}\n```\n",
            it.output_summary.trim()
        ));
    }
    s.push('\n');
    s
}

/// Why the loop ends after a successful iteration, if it does.
pub fn loop_end(
    promise_detected: bool,
    stop_requested: bool,
    iteration: u32,
    max_iterations: u32,
) -> Option<CompletionReason> {
    if promise_detected {
        Some(CompletionReason::PromiseDetected)
    } else if stop_requested {
        Some(CompletionReason::ManualStop)
    } else if iteration >= max_iterations {
        Some(CompletionReason::MaxIterations)
    } else {
        None
    }
}

fn reason_str(r: CompletionReason) -> &'static str {
    match r {
        CompletionReason::PromiseDetected => "promise_detected",
        CompletionReason::MaxIterations => "max_iterations",
        CompletionReason::ManualStop => "manual_stop",
        CompletionReason::IterationError => "iteration_error",
    }
}

impl JobRun {
    pub(super) async fn run_ralph(
        &self,
        mut controls: mpsc::UnboundedReceiver<JobControl>,
    ) -> RunnerEvent {
        let params = self
            .assignment
            .ralph
            .clone()
            .unwrap_or_else(|| RalphParams {
                max_iterations: DEFAULT_MAX_ITERATIONS,
                completion_promise: DEFAULT_COMPLETION_PROMISE.into(),
                feedback_commands: vec![],
            });
        let max = params.max_iterations.max(1);
        let progress_file = progress_path(&self.services, self.job_id());
        let mut progress = String::new();
        let mut inbox = Inbox::default();
        let mut iterations: Vec<Iteration> = Vec::new();
        let mut reason = CompletionReason::MaxIterations;
        let mut total = 0;

        'iterations: for i in 1..=max {
            total = i;
            for attempt in 1..=2 {
                self.sink
                    .system(if attempt == 1 {
                        format!("Iteration {i} of {max}")
                    } else {
                        format!("Iteration {i}: retrying")
                    })
                    .await;
                let prompt = build_prompt(&self.assignment.prompt, &progress, i, max);
                let started_at = now();
                let agent = self
                    .run_agent(
                        &prompt,
                        i,
                        Some(params.completion_promise.clone()),
                        None,
                        Some((&mut controls, &mut inbox)),
                    )
                    .await;
                if let Some(over) = self.workspace_over_limit().await {
                    return failed(over);
                }
                let mut it = Iteration {
                    id: uuid::Uuid::new_v4().to_string(),
                    iteration_number: i,
                    started_at,
                    completed_at: None,
                    exit_code: agent.exit_code,
                    error: None,
                    promise_detected: agent.promise_detected,
                    output_summary: agent.summary.clone(),
                    feedback_results: vec![],
                };
                let mut feedback_output = Vec::new();
                if agent.succeeded() {
                    for command in &params.feedback_commands {
                        self.sink.system(format!("$ {command}")).await;
                        let r = self
                            .run_command(command, i, Some((&mut controls, &mut inbox)))
                            .await;
                        if let Some(over) = self.workspace_over_limit().await {
                            return failed(over);
                        }
                        if !r.succeeded() {
                            feedback_output.push((
                                command.clone(),
                                r.error.clone().unwrap_or(r.summary.clone()),
                            ));
                        }
                        it.feedback_results.push(FeedbackResult {
                            command: command.clone(),
                            exit_code: r.exit_code.unwrap_or(-1),
                            passed: r.succeeded(),
                        });
                    }
                } else {
                    it.error = Some(agent.failure("the agent"));
                }
                it.completed_at = Some(now());
                progress.push_str(&progress_entry(&it, &feedback_output));
                if let Err(e) = tokio::fs::write(&progress_file, &progress).await {
                    tracing::warn!(job_id = self.job_id(), error = %e, "could not write the progress file");
                }
                self.sink
                    .send(RunnerEvent::Iteration {
                        iteration: it.clone(),
                    })
                    .await;
                iterations.push(it);

                if agent.succeeded() {
                    match loop_end(agent.promise_detected, inbox.stop, i, max) {
                        Some(r) => {
                            reason = r;
                            break 'iterations;
                        }
                        None => continue 'iterations,
                    }
                }
                if attempt == 2 {
                    reason = CompletionReason::IterationError;
                    break 'iterations;
                }
                if inbox.stop {
                    reason = CompletionReason::ManualStop;
                    break 'iterations;
                }
            }
        }

        let outcome = if reason == CompletionReason::IterationError {
            Outcome::Failed
        } else {
            Outcome::Completed
        };
        let error_message = (outcome == Outcome::Failed).then(|| {
            let last = iterations
                .last()
                .and_then(|it| it.error.clone())
                .unwrap_or_default();
            format!("Iteration {total} failed twice: {last}")
        });
        let summary = format!(
            "Ralph loop ended after {total} iteration(s): {}",
            reason_str(reason)
        );
        self.sink.system(summary.clone()).await;

        let mut body = format!(
            "{}\n\n---\nOpened by Kiln for ralph job `{}`: {summary}.\n\n",
            self.assignment.prompt.trim(),
            self.job_id()
        );
        for it in &iterations {
            body.push_str(&format!(
                "- Iteration {}: exit {}{}\n",
                it.iteration_number,
                it.exit_code.map_or("?".to_string(), |c| c.to_string()),
                if it.promise_detected {
                    ", completion promise"
                } else {
                    ""
                }
            ));
        }
        let (pr_url, message) = match self.publish(&body).await {
            Ok(Published::PullRequest(url)) => (
                Some(url.clone()),
                format!("{summary}; opened pull request {url}"),
            ),
            Ok(Published::BranchOnly(what)) => (None, format!("{summary}; {what}")),
            Ok(Published::NothingToCommit) => {
                (None, format!("{summary}; no changes, so no pull request"))
            }
            Err(e) => {
                return finished(
                    Outcome::Failed,
                    e.clone(),
                    None,
                    Some(reason),
                    Some(total),
                    Some(e),
                );
            }
        };
        finished(
            outcome,
            message,
            pr_url,
            Some(reason),
            Some(total),
            error_message,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iteration(
        n: u32,
        exit: Option<i32>,
        error: Option<&str>,
        feedback: &[(&str, i32)],
    ) -> Iteration {
        Iteration {
            id: "id".into(),
            iteration_number: n,
            started_at: "t0".into(),
            completed_at: Some("t1".into()),
            exit_code: exit,
            error: error.map(str::to_string),
            promise_detected: false,
            output_summary: "wrote the scaffold".into(),
            feedback_results: feedback
                .iter()
                .map(|(c, e)| FeedbackResult {
                    command: c.to_string(),
                    exit_code: *e,
                    passed: *e == 0,
                })
                .collect(),
        }
    }

    #[test]
    fn the_first_prompt_is_the_original() {
        assert_eq!(build_prompt("Build it.", "", 1, 5), "Build it.");
    }

    #[test]
    fn later_prompts_carry_the_progress() {
        let p1 = progress_entry(
            &iteration(1, Some(0), None, &[("npm test", 1), ("npm run lint", 0)]),
            &[("npm test".into(), "1 failing: login".into())],
        );
        assert!(
            p1.starts_with("### Iteration 1\n- Agent exit code: 0\n"),
            "{p1}"
        );
        assert!(
            p1.contains("`npm test` FAILED (exit 1); `npm run lint` passed (exit 0)"),
            "{p1}"
        );
        assert!(
            p1.contains("Output of `npm test`:\n```\n1 failing: login\n```"),
            "{p1}"
        );
        assert!(p1.contains("wrote the scaffold"));
        let p2 = progress_entry(
            &iteration(2, None, Some("the agent could not run: gone"), &[]),
            &[],
        );
        assert!(p2.contains("- Agent failed: the agent could not run: gone"));
        assert!(!p2.contains("Feedback"));

        let prompt = build_prompt("Build it.\n", &(p1.clone() + &p2), 3, 5);
        assert!(prompt.starts_with("Build it.\n\n---\n## Progress so far (this is iteration 3 of at most 5)\n\n### Iteration 1"), "{prompt}");
        assert!(prompt.contains("### Iteration 2"));
    }

    #[test]
    fn the_loop_ends_for_the_right_reason() {
        use CompletionReason::*;
        assert_eq!(loop_end(true, true, 5, 5), Some(PromiseDetected));
        assert_eq!(loop_end(false, true, 5, 5), Some(ManualStop));
        assert_eq!(loop_end(false, false, 5, 5), Some(MaxIterations));
        assert_eq!(loop_end(false, false, 2, 5), None);
        assert_eq!(loop_end(false, true, 1, 5), Some(ManualStop));
    }
}
