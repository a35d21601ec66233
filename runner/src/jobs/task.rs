//! `task` jobs: an interactive agent. The prompt is its first input line, each delivered message
//! another; `complete` closes its input and the job ends when the agent does. No commit, no PR.

use kiln_schemas::runner::{Outcome, RunnerEvent};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::run::{failed, finished, prompt_line, JobRun};
use super::JobControl;
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
    pub(super) async fn run_task(
        &self,
        mut controls: mpsc::UnboundedReceiver<JobControl>,
    ) -> RunnerEvent {
        let mut exec = match self.start(self.agent_spec(1)).await {
            Ok(e) => e,
            Err(e) => return failed(format!("The agent could not start: {e}")),
        };
        let (input, lines) = mpsc::unbounded_channel();
        if let Some(stdin) = exec.stdin.take() {
            tokio::spawn(feed_stdin(stdin, lines));
        }
        let _ = input.send(prompt_line(&self.assignment.prompt));
        let mut input = Some(input);
        let mut collector = OutputCollector::new(self.services.agent.format, None);
        let mut completed = false;
        loop {
            tokio::select! {
                chunk = exec.output.recv() => match chunk {
                    Some(chunk) => {
                        for ev in collector.feed(&chunk) {
                            self.sink.send(ev).await;
                        }
                    }
                    None => break,
                },
                Some(control) = controls.recv() => match control {
                    JobControl::Deliver(message) => match &input {
                        Some(tx) => { let _ = tx.send(prompt_line(&message)); }
                        None => self.sink.system("A message arrived after the session was completed; not delivered").await,
                    },
                    JobControl::Complete => {
                        if input.take().is_some() {
                            completed = true;
                            self.sink.system("Session completed: the agent's input is closed; waiting for it to finish").await;
                        }
                    }
                    JobControl::Stop => {}
                },
            }
        }
        for ev in collector.finish() {
            self.sink.send(ev).await;
        }
        drop(input);
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
