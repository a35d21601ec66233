//! One job's life on this runner: wait for a slot, `started`, worktree and sandbox, the handler
//! of its kind, `finished`, clean-up. A cancel (or a lost lease) drops the handler wherever it
//! is, removes the sandbox and the worktree, and sends nothing more. A job that outlives its time
//! limit (`RUNNER_JOB_TIMEOUT`, or its own shorter `timeoutSeconds`) or whose worktree outgrows
//! `RUNNER_WORKSPACE_MAX_MB` is dropped the same way but ends `failed`, naming the limit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_schemas::runner::{Assignment, Outcome, RunnerEvent};
use kiln_schemas::status::{CompletionReason, JobType};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};

use super::{CancelToken, JobControl, JobServices};
use crate::config::describe_duration;
use crate::executor::{ExecError, ExecSpec, Execution, Sandbox, StdinWriter};
use crate::github::NewPullRequest;
use crate::metrics::Metrics;
use crate::output::OutputCollector;
use crate::pipeline::Pipeline;
use crate::reporter::{self, EventSink};
use crate::workspace::{RepoRef, Worktree};

pub(super) async fn run_job(
    services: Arc<JobServices>,
    assignment: Assignment,
    slots: Arc<Semaphore>,
    started: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    controls: mpsc::UnboundedReceiver<JobControl>,
    cancel: CancelToken,
) {
    let assigned = Instant::now();
    let job_id = assignment.job_id.clone();
    let on_lost = cancel.clone();
    let lost_id = job_id.clone();
    let metrics = services.metrics.clone();
    let (sink, reporter) = reporter::spawn(
        services.edge.clone(),
        job_id.clone(),
        assignment.lease_id.clone(),
        services.event_buffer_bytes,
        metrics.clone(),
        move || {
            tracing::warn!(job_id = lost_id, "lease no longer valid; stopping the job");
            on_lost.cancel();
        },
    );

    let permit = tokio::select! {
        p = slots.acquire_owned() => p.expect("the slot semaphore is never closed"),
        _ = cancel.cancelled() => {
            reporter.abort();
            Metrics::inc(&metrics.jobs_cancelled);
            return;
        }
    };
    started.store(true, Ordering::SeqCst);
    Metrics::inc(&metrics.jobs_started);
    let slot = Instant::now();

    // The wall-clock limit counts from the slot: time spent waiting for one is not the job's.
    let (limit, source) = services.limits.job_limit(assignment.timeout_seconds);
    let queued = assignment.queued_ms;
    let mut job = JobRun {
        services,
        assignment,
        sink,
        worktree: None,
        sandbox: None,
        cancel: cancel.clone(),
        marks: Default::default(),
        submitted: submitted_at(assigned, queued),
    };
    let finished = tokio::select! {
        f = job.execute(controls) => Some(f),
        _ = cancel.cancelled() => None,
        _ = tokio::time::sleep(limit) => {
            tracing::warn!(job_id, limit_secs = limit.as_secs(), source, "job over its time limit; stopping it");
            Some(failed(format!(
                "The job exceeded its time limit of {} ({source})",
                describe_duration(limit)
            )))
        }
    };
    let JobRun {
        sink,
        worktree,
        sandbox,
        services,
        marks,
        ..
    } = job;
    let marks = marks.into_inner().unwrap_or_else(|e| e.into_inner());
    let ended_count = match &finished {
        Some(RunnerEvent::Finished {
            outcome: Outcome::Completed,
            ..
        }) => &metrics.jobs_completed,
        Some(_) => &metrics.jobs_failed,
        None => &metrics.jobs_cancelled,
    };
    match finished {
        Some(event) => {
            if let RunnerEvent::Finished { outcome, .. } = &event {
                tracing::info!(job_id, ?outcome, "job finished");
            }
            // Nothing of the job runs any more once the edge hears that it ended: the sandbox
            // goes first (the worktree is removed while the events are delivered).
            cleanup(&services, &job_id, None, sandbox).await;
            // The edge frees the slot when it hears `finished`, so it is free here first: an
            // assignment for it never finds this runner full.
            ended.store(true, Ordering::SeqCst);
            drop(permit);
            // The job stays held (its lease renewed) until the edge has every event, unless it is
            // cancelled meanwhile or the runner stops: then what is undelivered is dropped.
            let stop_reporter = reporter.abort_handle();
            let mut handed = None;
            let deliver = async {
                sink.send(event).await;
                handed = Some(Instant::now());
                drop(sink);
                reporter.await
            };
            let mut cleaned = Duration::ZERO;
            let cleanup = async {
                let t = Instant::now();
                cleanup(&services, &job_id, worktree, None).await;
                cleaned = t.elapsed();
            };
            let delivered = async {
                tokio::select! {
                    end = deliver => tracing::debug!(job_id, ?end, "events delivered"),
                    _ = cancel.cancelled() => {
                        stop_reporter.abort();
                        tracing::warn!(job_id, "stopped before the edge had every event");
                    }
                }
            };
            tokio::join!(cleanup, delivered);
            marks.log(&job_id, assigned, slot, handed, cleaned);
        }
        None => {
            // The edge freed the slot at the cancel (or lease loss).
            ended.store(true, Ordering::SeqCst);
            drop(permit);
            reporter.abort();
            drop(sink);
            let t = Instant::now();
            cleanup(&services, &job_id, worktree, sandbox).await;
            tracing::info!(
                job_id,
                cleanup_ms = t.elapsed().as_millis() as u64,
                "job cancelled and cleaned up"
            );
        }
    }
    Metrics::inc(ended_count);
}

async fn cleanup(
    services: &JobServices,
    job_id: &str,
    worktree: Option<Worktree>,
    sandbox: Option<Arc<dyn Sandbox>>,
) {
    if let Some(sandbox) = sandbox {
        if let Err(e) = sandbox.destroy().await {
            tracing::warn!(job_id, error = %e, "could not remove the job's sandbox");
        }
    }
    if let Some(wt) = worktree {
        services.workspaces.remove_worktree(&wt).await;
    }
    let _ = tokio::fs::remove_file(progress_path(services, job_id)).await;
}

/// Where a ralph job keeps its progress notes: beside the worktree, so they are never committed.
pub(super) fn progress_path(services: &JobServices, job_id: &str) -> PathBuf {
    services
        .workspaces
        .worktrees_dir()
        .join(format!("{job_id}.progress.md"))
}

/// The `finished` event of a failed job.
pub(super) fn failed(message: impl Into<String>) -> RunnerEvent {
    let message = message.into();
    RunnerEvent::Finished {
        outcome: Outcome::Failed,
        message: message.clone(),
        pr_url: None,
        completion_reason: None,
        total_iterations: None,
        error_message: Some(message),
        result: None,
    }
}

/// What an agent run or command produced.
pub(crate) struct CommandResult {
    /// `None` when the command could not be run or its exit code is unknown.
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub summary: String,
    pub promise_detected: bool,
    /// The agent's session, when its profile announces one.
    pub session_id: Option<String>,
}

impl CommandResult {
    /// A command that never started.
    pub fn not_run(error: String) -> Self {
        CommandResult {
            exit_code: None,
            error: Some(error),
            summary: String::new(),
            promise_detected: false,
            session_id: None,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// A one-line description of a failure.
    pub fn failure(&self, what: &str) -> String {
        match (&self.error, self.exit_code) {
            (Some(e), _) => format!("{what} could not run: {e}"),
            (None, Some(code)) => format!("{what} exited with code {code}"),
            (None, None) => format!("{what} ended without an exit code"),
        }
    }
}

/// The edge's messages for a job, noted while its commands run.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    /// Ralph: stop after the current iteration.
    pub stop: bool,
    /// Task: follow-up messages not yet given to the agent, oldest first.
    pub messages: std::collections::VecDeque<String>,
    /// Task: the session is completed; no more messages come.
    pub complete: bool,
}

impl Inbox {
    /// Notes a message; answers what the job's log should say about it, if anything.
    pub fn note(&mut self, control: JobControl) -> Option<String> {
        match control {
            JobControl::Stop if !self.stop => {
                self.stop = true;
                Some("Stop requested: the job stops after this iteration".into())
            }
            JobControl::Stop => None,
            JobControl::Deliver(m) if !self.complete => {
                self.messages.push_back(m);
                None
            }
            JobControl::Deliver(_) => {
                Some("A message arrived after the session was completed; not delivered".into())
            }
            JobControl::Complete => {
                let first = !self.complete;
                self.complete = true;
                first.then(|| "Session completed: the job ends when the agent's turn does".into())
            }
            // The supervisor passes these to pipeline kinds only (app builds, landing jobs).
            JobControl::Pause | JobControl::Resume => None,
        }
    }
}

/// Published work.
pub(crate) enum Published {
    NothingToCommit,
    PullRequest(String),
    /// The branch is pushed but no pull request was opened; the text says where and why.
    BranchOnly(String),
}

pub(crate) struct JobRun {
    pub services: Arc<JobServices>,
    pub assignment: Assignment,
    pub sink: EventSink,
    pub worktree: Option<Worktree>,
    pub sandbox: Option<Arc<dyn Sandbox>>,
    /// The job's cancel token (LLM steps abort their calls with it).
    pub cancel: CancelToken,
    /// When its workspace was ready and its agent ran, for the job's timing line.
    pub marks: std::sync::Mutex<Marks>,
    /// When the job was submitted, on this runner's clock: the assignment's arrival less the
    /// time it says the job waited (so never earlier than the submission).
    pub submitted: Instant,
}

/// When a job assigned at `assigned` was submitted, on this runner's clock: `queued_ms` before
/// (the arrival is after the edge's dispatch, so this is never before the submission); the
/// assignment itself when the edge did not say.
pub(crate) fn submitted_at(assigned: Instant, queued_ms: Option<u64>) -> Instant {
    queued_ms
        .and_then(|q| assigned.checked_sub(Duration::from_millis(q)))
        .unwrap_or(assigned)
}

/// Instants of a job's life on this runner, logged (`job timings`, info) when it ends.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    pub worktree_ready: Option<Instant>,
    /// The first agent run's start and the last one's end.
    pub agent_started: Option<Instant>,
    pub agent_exited: Option<Instant>,
}

impl Marks {
    /// One info line: slot wait, then from the slot to the worktree and to the agent's start,
    /// from the agent's exit to `finished` handed to the reporter, and the clean-up (µs).
    fn log(
        &self,
        job_id: &str,
        assigned: Instant,
        slot: Instant,
        handed: Option<Instant>,
        cleanup: Duration,
    ) {
        let us = |from: Instant, to: Option<Instant>| {
            to.map(|t| t.saturating_duration_since(from).as_micros() as u64)
        };
        let after_agent_us = self.agent_exited.and_then(|exit| us(exit, handed));
        tracing::info!(
            job_id,
            slot_wait_us = slot.duration_since(assigned).as_micros() as u64,
            to_worktree_us = us(slot, self.worktree_ready),
            to_agent_us = us(slot, self.agent_started),
            after_agent_us,
            cleanup_us = cleanup.as_micros() as u64,
            "job timings"
        );
    }
}

impl JobRun {
    pub fn job_id(&self) -> &str {
        &self.assignment.job_id
    }

    async fn execute(&mut self, controls: mpsc::UnboundedReceiver<JobControl>) -> RunnerEvent {
        let a = &self.assignment;
        let s = &self.services;
        self.sink
            .send(RunnerEvent::Started {
                message: format!(
                    "Job started on runner {} ({} executor, attempt {})",
                    s.runner_name,
                    s.executor.kind().as_str(),
                    a.attempt
                ),
            })
            .await;
        if a.job_type == JobType::AppBuild {
            return super::app_build::run(self, controls).await;
        }
        if matches!(a.job_type, JobType::LandingInit | JobType::LandingChat) {
            return super::landing::run(self, controls).await;
        }
        if matches!(
            a.job_type,
            JobType::AgentTask | JobType::AgentLearn | JobType::RoundTable
        ) {
            return super::dashboard::run(self, controls).await;
        }
        if a.job_type == JobType::Pipeline3d {
            return super::pipeline_3d::run(self, controls).await;
        }
        if a.job_type.is_dashboard() {
            // Seed 002's kinds land in the dashboard's own modules.
            return failed(format!(
                "This runner does not run {} jobs yet",
                a.job_type.as_str()
            ));
        }
        let repo = match RepoRef::new(&a.github_org, &a.github_repo) {
            Ok(r) => r,
            Err(e) => return failed(e.to_string()),
        };
        if let Err(e) = s.may_touch(&repo, &a.branch_name, a.base_branch.as_deref()) {
            return failed(e);
        }
        self.sink
            .system(format!(
                "Fetching {} and creating the worktree on branch {}",
                repo.slug(),
                a.branch_name
            ))
            .await;
        let t = Instant::now();
        let wt = match s
            .workspaces
            .create_worktree_since(
                &repo,
                &a.job_id,
                &a.branch_name,
                a.base_branch.as_deref(),
                self.submitted,
            )
            .await
        {
            Ok(wt) => wt,
            Err(e) => return failed(format!("Preparing the workspace failed: {e}")),
        };
        self.sink
            .system(format!(
                "Worktree ready on {} from {} in {} ms",
                wt.branch,
                wt.base_branch,
                t.elapsed().as_millis()
            ))
            .await;
        let path = wt.path.clone();
        self.worktree = Some(wt);
        self.mark(|m| m.worktree_ready = Some(Instant::now()));
        if let Err(f) = self.prepare_sandbox(&path).await {
            return f;
        }

        let this = &*self;
        let handler = async move {
            match this.assignment.job_type {
                JobType::Code => this.run_code().await,
                JobType::Task => this.run_task(controls).await,
                JobType::Ralph => this.run_ralph(controls).await,
                JobType::AppBuild
                | JobType::LandingInit
                | JobType::LandingChat
                | JobType::AgentTask
                | JobType::AgentLearn
                | JobType::RoundTable
                | JobType::Pipeline3d => unreachable!("pipeline kinds are run before the worktree"),
            }
        };
        // Handlers check the worktree after every command; this catches one that grows it while
        // a long command runs.
        this.within_workspace_limit(handler).await
    }

    /// A pipeline for the job's steps: its sink, the runner's model and budget, the job's cancel
    /// and controls, started `paused` or not.
    pub fn pipeline(&self, controls: mpsc::UnboundedReceiver<JobControl>, paused: bool) -> Pipeline {
        let llm = self.services.llm.clone();
        let budget = llm.config().budget;
        Pipeline::new(self.sink.clone(), llm, budget, self.cancel.clone(), controls, paused)
    }

    /// `work`'s `finished` event, or a failed one as soon as the worktree outgrows its limit.
    pub async fn within_workspace_limit(&self, work: impl std::future::Future<Output = RunnerEvent>) -> RunnerEvent {
        tokio::select! {
            f = work => f,
            over = self.watch_workspace() => failed(over),
        }
    }

    /// Creates the job's sandbox over `path` (saying so, and whether the agent is on the demo
    /// model); the `finished` event of a failed job when it cannot be made.
    pub async fn prepare_sandbox(&mut self, path: &std::path::Path) -> Result<(), RunnerEvent> {
        let s = self.services.clone();
        let t = Instant::now();
        let sandbox = match s.executor.create_sandbox(self.job_id(), path).await {
            Ok(sb) => Arc::from(sb),
            Err(e) => {
                return Err(failed(format!(
                    "Creating the {} sandbox failed: {e}",
                    s.executor.kind().as_str()
                )))
            }
        };
        self.sandbox = Some(sandbox);
        self.sink
            .system(format!(
                "{} sandbox ready in {} ms",
                s.executor.kind().as_str(),
                t.elapsed().as_millis()
            ))
            .await;
        if s.agent.demo_model {
            self.sink
                .system(format!(
                    "Agent {} on Kiln's demo model: its answers are scripted by a local server, not a vendor's model (set ANTHROPIC_API_KEY or OPENAI_API_KEY for a real one)",
                    s.agent.format.profile_name()
                ))
                .await;
        }
        Ok(())
    }

    /// The worktree's size (apparent bytes, symbolic links not followed).
    async fn workspace_bytes(&self) -> u64 {
        let path = self.worktree().path.clone();
        tokio::task::spawn_blocking(move || crate::metrics::bytes_under(&path))
            .await
            .unwrap_or(0)
    }

    /// `Some(message)` when the worktree holds more than `RUNNER_WORKSPACE_MAX_MB`: the job
    /// fails with it (nothing over the limit is committed or pushed).
    pub async fn workspace_over_limit(&self) -> Option<String> {
        let max = self.services.limits.workspace_max_bytes;
        let bytes = self.workspace_bytes().await;
        (bytes > max).then(|| {
            format!(
                "The workspace holds {} MiB, over its limit of {} MiB (RUNNER_WORKSPACE_MAX_MB)",
                bytes.div_ceil(1024 * 1024),
                max / (1024 * 1024)
            )
        })
    }

    /// Resolves (with the message) once the worktree is over its limit; checked every 15 s.
    pub async fn watch_workspace(&self) -> String {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Some(over) = self.workspace_over_limit().await {
                return over;
            }
        }
    }

    pub fn sandbox(&self) -> &Arc<dyn Sandbox> {
        self.sandbox
            .as_ref()
            .expect("the sandbox exists while a handler runs")
    }

    pub fn worktree(&self) -> &Worktree {
        self.worktree
            .as_ref()
            .expect("the worktree exists while a handler runs")
    }

    /// The agent's command: prompt on stdin, `JOB_ID`, `ITERATION` and the `RUNNER_AGENT_ENV`
    /// variables in its environment (feedback commands do not get those).
    pub fn agent_spec(&self, iteration: u32) -> ExecSpec {
        let mut spec = ExecSpec::new(
            self.services.agent.command.clone(),
            self.job_id(),
            iteration,
        )
        .with_stdin();
        spec.env
            .extend(self.services.agent.env.vars.iter().cloned());
        spec
    }

    /// Starts a command; output is streamed as events by [`JobRun::stream`].
    pub async fn start(&self, spec: ExecSpec) -> Result<Execution, ExecError> {
        self.sandbox().exec(spec).await
    }

    /// Streams an execution's output as events until it ends, then returns its result. While it
    /// runs, the edge's messages for the job are noted in `inbox` (ralph's stop, a task's
    /// follow-ups and completion) for the handler to act on between runs.
    pub async fn stream(
        &self,
        mut exec: Execution,
        mut collector: OutputCollector,
        mut controls: Option<(&mut mpsc::UnboundedReceiver<JobControl>, &mut Inbox)>,
    ) -> CommandResult {
        loop {
            let control = async {
                match controls.as_mut() {
                    Some((rx, _)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                chunk = exec.output.recv() => match chunk {
                    Some(chunk) => {
                        for ev in collector.feed(&chunk) {
                            self.sink.send(ev).await;
                        }
                    }
                    None => break,
                },
                Some(c) = control => {
                    if let Some((_, inbox)) = controls.as_mut() {
                        if let Some(note) = inbox.note(c) {
                            self.sink.system(note).await;
                        }
                    }
                }
            }
        }
        for ev in collector.finish() {
            self.sink.send(ev).await;
        }
        let (exit_code, error) = match exec.exit_code().await {
            Ok(code) => (Some(code), None),
            Err(e) => (None, Some(e.to_string())),
        };
        if let Some(u) = collector.usage() {
            let note = if self.services.agent.demo_model {
                " (the CLI's price at list rates; the demo model costs nothing)"
            } else {
                ""
            };
            self.sink
                .system(format!("Agent usage: {}{note}", u.describe()))
                .await;
            self.sink
                .send(RunnerEvent::Usage {
                    usage: kiln_schemas::runner::UsageReport {
                        source: self.services.agent.format.profile_name().to_string(),
                        model: None,
                        input_tokens: u.input_tokens,
                        output_tokens: u.output_tokens,
                        cached_tokens: u.cached_tokens,
                        cost_usd: u.cost_usd,
                    },
                })
                .await;
        }
        CommandResult {
            exit_code,
            error,
            summary: collector.summary(),
            promise_detected: collector.promise_detected(),
            session_id: collector.session_id().map(str::to_string),
        }
    }

    /// Runs the agent once with the prompt on stdin (then closed); with `resume`, the run
    /// continues that session of the agent (profiles that resume; see `crate::agent`).
    pub async fn run_agent(
        &self,
        prompt: &str,
        iteration: u32,
        promise: Option<String>,
        resume: Option<&str>,
        controls: Option<(&mut mpsc::UnboundedReceiver<JobControl>, &mut Inbox)>,
    ) -> CommandResult {
        let agent = &self.services.agent;
        let mut spec = self.agent_spec(iteration);
        spec.command = match resume {
            None => agent.format.first_command(&agent.command),
            Some(session) => match agent.format.resume_command(&agent.command, session) {
                Some(c) => c,
                None => {
                    return CommandResult::not_run(format!(
                        "the {} agent cannot resume session {session:?}",
                        agent.format.profile_name()
                    ))
                }
            },
        };
        if let Some(p) = &promise {
            spec.env.push(("COMPLETION_PROMISE".into(), p.clone()));
        }
        let mut exec = match self.start(spec).await {
            Ok(e) => e,
            Err(e) => return CommandResult::not_run(e.to_string()),
        };
        self.mark(|m| {
            m.agent_started.get_or_insert_with(Instant::now);
        });
        if let Some(stdin) = exec.stdin.take() {
            tokio::spawn(write_and_close(stdin, prompt_line(prompt)));
        }
        let result = self
            .stream(
                exec,
                OutputCollector::new(self.services.agent.format, promise),
                controls,
            )
            .await;
        self.mark(|m| m.agent_exited = Some(Instant::now()));
        result
    }

    /// Notes an instant of the job's life for its timing line.
    pub(super) fn mark(&self, f: impl FnOnce(&mut Marks)) {
        f(&mut self.marks.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs a command without input (ralph's feedback commands); its output is plain text.
    pub async fn run_command(
        &self,
        command: &str,
        iteration: u32,
        controls: Option<(&mut mpsc::UnboundedReceiver<JobControl>, &mut Inbox)>,
    ) -> CommandResult {
        let exec = match self
            .start(ExecSpec::new(command, self.job_id(), iteration))
            .await
        {
            Ok(e) => e,
            Err(e) => return CommandResult::not_run(e.to_string()),
        };
        self.stream(
            exec,
            OutputCollector::new(crate::config::AgentFormat::Text, None),
            controls,
        )
        .await
    }

    /// The pull request title: the job's title, else the prompt's first line.
    pub fn title(&self) -> String {
        let a = &self.assignment;
        let base = a
            .title
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| {
                a.prompt
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("Kiln job")
            });
        let mut title: String = base.chars().take(72).collect();
        if base.chars().count() > 72 {
            title.push('…');
        }
        title
    }

    /// Commits everything in the worktree, pushes the branch, opens the pull request.
    pub async fn publish(&self, body: &str) -> Result<Published, String> {
        let wt = self.worktree();
        let ws = &self.services.workspaces;
        let title = self.title();
        let message = format!("{title}\n\nKiln job {}", self.job_id());
        // Again with the base branch the worktree resolved (the repository's default when the
        // job named none), before anything leaves this host.
        self.services
            .may_touch(&wt.repo, &wt.branch, Some(&wt.base_branch))?;
        let sha = match ws.commit_all(wt, &message).await {
            Ok(None) => return Ok(Published::NothingToCommit),
            Ok(Some(sha)) => sha,
            Err(e) => return Err(format!("Committing the changes failed: {e}")),
        };
        self.sink
            .system(format!("Committed {}", &sha[..sha.len().min(12)]))
            .await;
        ws.push(wt)
            .await
            .map_err(|e| format!("Pushing branch {} failed: {e}", wt.branch))?;
        let remote = ws.remote_url(&wt.repo);
        self.sink
            .system(format!("Pushed branch {} to {remote}", wt.branch))
            .await;
        if !self.services.github.has_token() {
            return Ok(Published::BranchOnly(format!(
                "pushed branch {} to {remote}; no pull request was opened: the runner has no GITHUB_TOKEN",
                wt.branch
            )));
        }
        let pr = NewPullRequest {
            title,
            head: wt.branch.clone(),
            base: wt.base_branch.clone(),
            body: body.to_string(),
        };
        let url = self
            .services
            .github
            .open_pull_request(&wt.repo, &pr)
            .await
            .map_err(|e| {
                format!(
                    "Pushed branch {} but opening the pull request failed: {e}",
                    wt.branch
                )
            })?;
        self.sink.system(format!("Opened pull request {url}")).await;
        self.answer_source_issue(&url).await;
        Ok(Published::PullRequest(url))
    }
}

/// The `finished` event.
pub(super) fn finished(
    outcome: Outcome,
    message: String,
    pr_url: Option<String>,
    completion_reason: Option<CompletionReason>,
    total_iterations: Option<u32>,
    error_message: Option<String>,
) -> RunnerEvent {
    RunnerEvent::Finished {
        outcome,
        message,
        pr_url,
        completion_reason,
        total_iterations,
        error_message,
        result: None,
    }
}

/// The text written to an agent's stdin for a prompt or message: ends with one newline.
pub(super) fn prompt_line(text: &str) -> String {
    let mut s = text.trim_end_matches(['\n', '\r']).to_string();
    s.push('\n');
    s
}

/// Writes `text`, then closes the stream so the agent reads end-of-file. A broken pipe (the
/// agent did not read its input) is not an error.
pub(super) async fn write_and_close(mut stdin: StdinWriter, text: String) {
    let _ = stdin.write_all(text.as_bytes()).await;
    let _ = stdin.flush().await;
    let _ = stdin.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lines_end_in_one_newline() {
        assert_eq!(prompt_line("hi"), "hi\n");
        assert_eq!(prompt_line("hi\n\n"), "hi\n");
        assert_eq!(prompt_line("a\nb"), "a\nb\n");
    }

    #[test]
    fn a_jobs_submission_is_its_arrival_less_its_wait() {
        let assigned = Instant::now();
        assert_eq!(submitted_at(assigned, None), assigned);
        assert_eq!(
            submitted_at(assigned, Some(250)),
            assigned - Duration::from_millis(250)
        );
    }

    #[test]
    fn failures_describe_themselves() {
        let r = CommandResult {
            exit_code: Some(3),
            error: None,
            summary: String::new(),
            promise_detected: false,
            session_id: None,
        };
        assert_eq!(r.failure("the agent"), "the agent exited with code 3");
        assert!(!r.succeeded());
        let r = CommandResult::not_run("gone".into());
        assert_eq!(r.failure("the agent"), "the agent could not run: gone");
    }
}
