//! `task` jobs: an interactive agent, no commit, no PR. How a delivered message reaches the agent
//! is its profile's choice (`crate::agent`): a `text` agent keeps running and gets the prompt and
//! each message as lines on its stdin, `complete` closes its input and the job ends when the agent
//! does; a `claude` or `codex` agent answers the prompt in one run, then each message in a new run
//! that resumes its session, and the job ends on `complete` once the running turn is answered.
//! A task that waits longer than `RUNNER_TASK_IDLE_TIMEOUT` for a message after its agent's last
//! turn (a `text` agent: after its last output) fails, naming the setting.

use kiln_schemas::runner::{Outcome, RunnerEvent};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::run::{failed, finished, prompt_line, Inbox, JobRun};
use super::JobControl;
use crate::config::describe_duration;
use crate::executor::StdinWriter;
use crate::output::OutputCollector;

/// Writes each line it receives; closes the agent's input when the channel closes.
async fn feed_stdin(mut stdin: StdinWriter, mut lines: mpsc::UnboundedReceiver<String>) {
    while let Some(line) = lines.recv().await {
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
    let _ = stdin.shutdown().await;
}

impl JobRun {
    /// The `finished` event of a task that waited too long for a message.
    fn idle_failure(&self) -> RunnerEvent {
        failed(format!(
            "The task waited {} for a message (RUNNER_TASK_IDLE_TIMEOUT)",
            describe_duration(self.services.limits.task_idle_timeout)
        ))
    }

    pub(super) async fn run_task(
        &self,
        controls: mpsc::UnboundedReceiver<JobControl>,
    ) -> RunnerEvent {
        if self.services.agent.format.follows_up_on_stdin() {
            self.run_task_on_stdin(controls).await
        } else {
            self.run_task_in_turns(controls).await
        }
    }

    /// One run per turn: the prompt, then each message in a run that resumes the session.
    async fn run_task_in_turns(
        &self,
        mut controls: mpsc::UnboundedReceiver<JobControl>,
    ) -> RunnerEvent {
        let mut inbox = Inbox::default();
        let mut input = self.assignment.prompt.clone();
        let mut session: Option<String> = None;
        let mut turn = 1;
        loop {
            let result = self
                .run_agent(
                    &input,
                    turn,
                    None,
                    session.as_deref(),
                    Some((&mut controls, &mut inbox)),
                )
                .await;
            if let Some(over) = self.workspace_over_limit().await {
                return failed(over);
            }
            if !result.succeeded() {
                return failed(result.failure(&format!("The agent (turn {turn})")));
            }
            if result.session_id.is_some() {
                session = result.session_id;
            }
            if session.is_none() {
                return failed(format!(
                    "The {} agent announced no session, so follow-up messages cannot reach it",
                    self.services.agent.format.profile_name()
                ));
            }
            // The next turn: a message that arrived meanwhile, else wait for one (or the end), no
            // longer than the idle limit.
            let idle_until = tokio::time::Instant::now() + self.services.limits.task_idle_timeout;
            let next = loop {
                if let Some(m) = inbox.messages.pop_front() {
                    break Some(m);
                }
                if inbox.complete {
                    break None;
                }
                let Ok(control) = tokio::time::timeout_at(idle_until, controls.recv()).await else {
                    return self.idle_failure();
                };
                match control {
                    Some(c) => {
                        if let Some(note) = inbox.note(c) {
                            self.sink.system(note).await;
                        }
                    }
                    // The job table is gone: the runner is stopping.
                    None => break None,
                }
            };
            match next {
                Some(m) => {
                    turn += 1;
                    input = m;
                    self.sink
                        .system(format!(
                            "Turn {turn}: the agent resumes its session to answer a message"
                        ))
                        .await;
                }
                None => {
                    return finished(
                        Outcome::Completed,
                        format!("Session completed after {turn} turn(s)"),
                        None,
                        None,
                        None,
                        None,
                    )
                }
            }
        }
    }

    /// One long run: the prompt and each message are lines on the agent's stdin.
    async fn run_task_on_stdin(
        &self,
        mut controls: mpsc::UnboundedReceiver<JobControl>,
    ) -> RunnerEvent {
        let mut exec = match self.start(self.agent_spec(1)).await {
            Ok(e) => e,
            Err(e) => return failed(format!("The agent could not start: {e}")),
        };
        self.mark(|m| {
            m.agent_started.get_or_insert_with(std::time::Instant::now);
        });
        let (input, lines) = mpsc::unbounded_channel();
        if let Some(stdin) = exec.stdin.take() {
            tokio::spawn(feed_stdin(stdin, lines));
        }
        let _ = input.send(prompt_line(&self.assignment.prompt));
        let mut input = Some(input);
        let mut collector = OutputCollector::new(self.services.agent.format, None);
        let mut completed = false;
        // Without turns to go by, the agent is idle once it has said nothing for a while and no
        // message came; after `complete`, only the job's time limit applies.
        let idle = self.services.limits.task_idle_timeout;
        let mut idle_until = tokio::time::Instant::now() + idle;
        loop {
            let waiting = input.is_some();
            tokio::select! {
                chunk = exec.output.recv() => match chunk {
                    Some(chunk) => {
                        idle_until = tokio::time::Instant::now() + idle;
                        for ev in collector.feed(&chunk) {
                            self.sink.send(ev).await;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(idle_until), if waiting => {
                    for ev in collector.finish() {
                        self.sink.send(ev).await;
                    }
                    return self.idle_failure();
                }
                Some(control) = controls.recv() => match control {
                    JobControl::Deliver(message) => match &input {
                        Some(tx) => {
                            idle_until = tokio::time::Instant::now() + idle;
                            let _ = tx.send(prompt_line(&message));
                        }
                        None => self.sink.system("A message arrived after the session was completed; not delivered").await,
                    },
                    JobControl::Complete => {
                        if input.take().is_some() {
                            completed = true;
                            self.sink.system("Session completed: the agent's input is closed; waiting for it to finish").await;
                        }
                    }
                    // The supervisor passes these to app builds only.
                    JobControl::Stop | JobControl::Pause | JobControl::Resume => {}
                },
            }
        }
        self.mark(|m| m.agent_exited = Some(std::time::Instant::now()));
        for ev in collector.finish() {
            self.sink.send(ev).await;
        }
        drop(input);
        if let Some(over) = self.workspace_over_limit().await {
            return failed(over);
        }
        match exec.exit_code().await {
            Ok(code) if completed => finished(
                Outcome::Completed,
                format!("Session completed (the agent exited with code {code})"),
                None,
                None,
                None,
                None,
            ),
            Ok(0) => finished(
                Outcome::Completed,
                "The agent finished".into(),
                None,
                None,
                None,
                None,
            ),
            Ok(code) => failed(format!("The agent exited with code {code}")),
            Err(e) => failed(format!("The agent's exit code is unknown: {e}")),
        }
    }
}
