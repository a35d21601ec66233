//! The pipeline engine: one small engine every pipeline kind (the app builder now, landing pages
//! and the dashboard's tasks next) runs its steps through. A kind is a module that decides which
//! steps to run and what their answers mean; the engine runs each step the same way:
//!
//! - **Between steps** it honours pause and cancellation: a `pause` from the edge (or a job
//!   dispatched paused) makes the next step wait, saying so in a system line, until `resume`;
//!   a cancel ends the wait at once (the job's task is then dropped by its supervisor).
//! - **Every step's start and end** is a system line of the job's log, numbered.
//! - **LLM steps** ([`Pipeline::llm`]): a role, a system prompt (the engine writes its first line,
//!   `Kiln role: <role>`), messages → the model's streamed text through the runner's one
//!   [`LlmClient`]; every call's usage is a `usage` event and a system line (provider, model,
//!   tokens, latency, cost, the engine's own overhead), and the job's [`Meter`] enforces its
//!   budget (over it: [`StepError::Budget`], and the job ends `failed` naming it). The kind's
//!   `accept` turns the text into its value and events; an answer it cannot use is asked for
//!   again with the reason (as many times as the step allows), then fails the step.
//! - **Agent runs and commands** ([`Pipeline::agent`], [`Pipeline::command`]) run in the job's
//!   sandbox through the job's own machinery (`JobRun::run_agent`, the runner's agent profile).

use std::sync::Mutex;
use std::time::Instant;

use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{RunnerEvent, UsageReport};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::AgentFormat;
use crate::executor::ExecSpec;
use crate::jobs::{CancelToken, CommandResult, JobControl, JobRun};
use crate::llm::{
    Budget, ChatRequest, LlmClient, LlmError, Message, Meter, ModelRef, StepUsage, TextEvent,
};
use crate::output::OutputCollector;
use crate::reporter::EventSink;

/// Why a step could not give its kind what it needed.
#[derive(Debug, Clone, PartialEq)]
pub enum StepError {
    /// The job's LLM budget is spent: the job ends `failed` with this reason.
    Budget(String),
    /// The step failed (the model could not be reached, its answer could not be used).
    Failed(String),
}

impl StepError {
    pub fn message(&self) -> &str {
        match self {
            StepError::Budget(m) | StepError::Failed(m) => m,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// One LLM step.
#[derive(Debug, Clone)]
pub struct LlmStep {
    /// What the log calls it (`CEO, round 1`).
    pub name: String,
    /// `[llm.roles]` key and the system prompt's `Kiln role:` line.
    pub role: String,
    /// The system prompt after the role line.
    pub system: String,
    pub messages: Vec<Message>,
    /// Answers asked for in all when the kind cannot use one (1: no second try).
    pub attempts: u32,
}

impl LlmStep {
    pub fn new(
        name: impl Into<String>,
        role: impl Into<String>,
        system: impl Into<String>,
        prompt: impl Into<String>,
    ) -> LlmStep {
        LlmStep {
            name: name.into(),
            role: role.into(),
            system: system.into(),
            messages: vec![Message::user(prompt)],
            attempts: 1,
        }
    }

    pub fn attempts(mut self, n: u32) -> LlmStep {
        self.attempts = n.max(1);
        self
    }
}

/// The system prompt of a role: `Kiln role: <role>`, then the step's own.
pub fn system_prompt(role: &str, system: &str) -> String {
    format!("Kiln role: {role}\n{system}")
}

/// The engine's own time in one LLM call, the model server's latency subtracted, and the
/// call's marks on the wall clock (so a subscriber on the same host can measure on to its
/// socket: `e2e/src/bin/bench_steps.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overhead {
    /// Step start → first text delta, less the provider's time to its first byte.
    pub before_first_token_us: u64,
    /// Last text delta → the step's events handed to the reporter, less the provider's time
    /// from its last text to the end of its stream.
    pub after_last_token_us: u64,
    /// Microseconds since the Unix epoch: the call's start, its first and last text deltas, and
    /// the moment its events were handed to the reporter (0: not known).
    pub started_at_us: u64,
    pub first_token_at_us: u64,
    pub last_token_at_us: u64,
    pub handed_at_us: u64,
    /// The provider's time to its first byte, and from its last text to its stream's end (what
    /// the two overheads subtract).
    pub server_first_byte_us: u64,
    pub server_tail_us: u64,
}

impl Overhead {
    /// How the engine writes it in the step's system line (the benchmarks read it back).
    pub fn describe(&self) -> String {
        format!(
            "engine overhead {} us before the first token, {} us after the last; at (unix us) start {}, first token {}, last token {}, handed {}; server first byte {} us, tail {} us",
            self.before_first_token_us,
            self.after_last_token_us,
            self.started_at_us,
            self.first_token_at_us,
            self.last_token_at_us,
            self.handed_at_us,
            self.server_first_byte_us,
            self.server_tail_us,
        )
    }

    /// Reads [`Overhead::describe`]'s text out of a log line (a line with only the two
    /// overheads reads with the marks 0).
    pub fn parse(line: &str) -> Option<Overhead> {
        let rest = line.split("engine overhead ").nth(1)?;
        let mut nums = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u64>().ok());
        let mut o = Overhead {
            before_first_token_us: nums.next()??,
            after_last_token_us: nums.next()??,
            ..Default::default()
        };
        if rest.contains("; at (unix us) start ") {
            for field in [
                &mut o.started_at_us,
                &mut o.first_token_at_us,
                &mut o.last_token_at_us,
                &mut o.handed_at_us,
                &mut o.server_first_byte_us,
                &mut o.server_tail_us,
            ] {
                *field = nums.next()??;
            }
        }
        Some(o)
    }
}

/// What one LLM step's calls cost, every answer it asked for summed (a kind puts it in the
/// step's own events: seed 001's nodes carry it in their data).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepCost {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `None` when a model of the step has no price.
    pub cost_usd: Option<f64>,
    /// The model that answered last.
    pub model: String,
}

impl StepCost {
    fn add(&mut self, u: &StepUsage) {
        let first = self.model.is_empty() && self.input_tokens == 0 && self.output_tokens == 0;
        self.input_tokens += u.input_tokens;
        self.output_tokens += u.output_tokens;
        self.cost_usd = match (first, self.cost_usd, u.cost_usd) {
            (true, _, c) => c,
            (false, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.model = u.model.clone();
    }

    /// `{input_tokens, output_tokens, cost_usd, model}`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "model": self.model,
        })
    }
}

/// Why one call of a parallel step has no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ParallelFailure {
    Failed(String),
    TimedOut(String),
}

impl ParallelFailure {
    pub fn message(&self) -> &str {
        match self {
            ParallelFailure::Failed(m) | ParallelFailure::TimedOut(m) => m,
        }
    }
}

/// One call of [`Pipeline::llm_parallel`]: the model asked, how long it took, its answer.
#[derive(Debug, Clone)]
pub struct ParallelAnswer {
    pub model: ModelRef,
    pub latency_ms: f64,
    pub outcome: Result<(String, StepUsage), ParallelFailure>,
}

/// A pipeline job's engine: its event sink, the LLM client and the job's meter, the edge's
/// pause/resume messages and the job's cancel token.
pub struct Pipeline {
    sink: EventSink,
    llm: LlmClient,
    meter: Mutex<Meter>,
    cancel: CancelToken,
    controls: mpsc::UnboundedReceiver<JobControl>,
    paused: bool,
    steps: u32,
    overheads: Vec<Overhead>,
    /// The last LLM step's cost so far.
    step_cost: StepCost,
}

impl Pipeline {
    pub fn new(
        sink: EventSink,
        llm: LlmClient,
        budget: Budget,
        cancel: CancelToken,
        controls: mpsc::UnboundedReceiver<JobControl>,
        paused: bool,
    ) -> Pipeline {
        Pipeline {
            sink,
            llm,
            meter: Mutex::new(Meter::new(budget)),
            cancel,
            controls,
            paused,
            steps: 0,
            overheads: Vec::new(),
            step_cost: StepCost::default(),
        }
    }

    pub fn sink(&self) -> &EventSink {
        &self.sink
    }

    /// Every LLM call's overhead so far, in order.
    pub fn overheads(&self) -> &[Overhead] {
        &self.overheads
    }

    /// What the last LLM step cost (all its answers; a failed step's too).
    pub fn last_step_cost(&self) -> &StepCost {
        &self.step_cost
    }

    /// Hands an event to the reporter.
    pub fn emit(&self, event: RunnerEvent) {
        self.sink.push(event);
    }

    pub fn system(&self, line: impl Into<String>) {
        self.emit(RunnerEvent::Log {
            stream: kiln_schemas::events::LogStream::System,
            content: line.into(),
        });
    }

    /// A narration: a `stageUpdate` from Kiln with `metadata.type = "description"`.
    pub fn narrate(&self, text: impl Into<String>) {
        self.emit(RunnerEvent::Stage {
            role: "system".into(),
            sender: "Kiln".into(),
            content: text.into(),
            metadata: json!({"type": "description"}),
        });
    }

    fn note(&mut self, control: JobControl) {
        match control {
            JobControl::Pause if !self.paused => {
                self.paused = true;
                self.system("Pause requested: the job pauses when the running step ends");
            }
            JobControl::Resume if self.paused => self.paused = false,
            JobControl::Pause | JobControl::Resume => {}
            other => tracing::debug!(?other, "a message a pipeline does not take; ignored"),
        }
    }

    /// The point between two steps: takes the edge's pause/resume messages and, while paused,
    /// waits (saying so) until resumed or cancelled.
    pub async fn checkpoint(&mut self, next: &str) {
        while let Ok(c) = self.controls.try_recv() {
            self.note(c);
        }
        if !self.paused {
            return;
        }
        self.system(format!("Paused: the job waits for resume before {next}"));
        let t = Instant::now();
        while self.paused {
            tokio::select! {
                c = self.controls.recv() => match c {
                    Some(c) => self.note(c),
                    // The supervisor is gone: nothing can resume the job.
                    None => std::future::pending().await,
                },
                _ = self.cancel.cancelled() => return,
            }
        }
        self.system(format!(
            "Resumed after {} s: going on with {next}",
            t.elapsed().as_secs()
        ));
    }

    /// Numbers the next step, waits at the checkpoint, logs its start.
    async fn begin(&mut self, kind: &str, name: &str) -> u32 {
        self.checkpoint(name).await;
        self.steps += 1;
        self.system(format!("Step {} ({kind}) started: {name}", self.steps));
        self.steps
    }

    fn end(&self, n: u32, name: &str, t: Instant, outcome: &str) {
        self.system(format!(
            "Step {n} ended in {} ms: {name}: {outcome}",
            t.elapsed().as_millis()
        ));
    }

    /// Runs an LLM step. `accept` turns the answer's text into the kind's value and the events
    /// that announce it (handed to the reporter at once), or says why the text cannot be used:
    /// then the model is asked again with that reason, up to `step.attempts` answers.
    pub async fn llm<T>(
        &mut self,
        step: LlmStep,
        mut accept: impl FnMut(&str) -> Result<(T, Vec<RunnerEvent>), String>,
    ) -> Result<T, StepError> {
        let n = self
            .begin(&format!("LLM, role {}", step.role), &step.name)
            .await;
        let t = Instant::now();
        self.step_cost = StepCost::default();
        let mut messages = step.messages.clone();
        let mut last_reason = String::new();
        for attempt in 1..=step.attempts.max(1) {
            let req = ChatRequest {
                system: Some(system_prompt(&step.role, &step.system)),
                messages: messages.clone(),
                ..ChatRequest::for_role(step.role.clone())
            };
            let started = Instant::now();
            let mut first: Option<Instant> = None;
            let mut last: Option<Instant> = None;
            let result = self
                .llm
                .complete(&req, &self.meter, &self.cancel, |ev| match ev {
                    TextEvent::Delta(_) => {
                        let now = Instant::now();
                        first.get_or_insert(now);
                        last = Some(now);
                    }
                    TextEvent::Restart { .. } => {
                        first = None;
                        last = None;
                    }
                })
                .await;
            let done = match result {
                Ok(done) => done,
                Err(LlmError::Budget { exceeded, usage }) => {
                    if let Some(u) = usage {
                        self.report_usage(&step.role, &u, None);
                    }
                    let reason = exceeded.reason.clone();
                    self.end(n, &step.name, t, &reason);
                    return Err(StepError::Budget(reason));
                }
                Err(e) => {
                    let reason = format!("the {} step's model call failed: {e}", step.role);
                    self.end(n, &step.name, t, &reason);
                    return Err(StepError::Failed(reason));
                }
            };
            match accept(&done.text) {
                Ok((value, events)) => {
                    for ev in events {
                        self.sink.push(ev);
                    }
                    let handed = Instant::now();
                    let overhead = overhead(&done.usage, started, first, last, handed);
                    self.overheads.push(overhead);
                    self.report_usage(&step.role, &done.usage, Some(overhead));
                    self.end(n, &step.name, t, "done");
                    return Ok(value);
                }
                Err(reason) => {
                    self.report_usage(&step.role, &done.usage, None);
                    last_reason = reason;
                    if attempt < step.attempts {
                        self.system(format!(
                            "Step {n}: the answer could not be used ({last_reason}); asking again"
                        ));
                        messages.push(Message::assistant(done.text));
                        messages.push(Message::user(format!(
                            "Your answer could not be used: {last_reason}. Answer again, in exactly the format asked for."
                        )));
                    }
                }
            }
        }
        let reason = format!(
            "the {} step's answer could not be used after {} tries: {last_reason}",
            step.role,
            step.attempts.max(1)
        );
        self.end(n, &step.name, t, &reason);
        Err(StepError::Failed(reason))
    }

    /// Runs one LLM step whose calls go to several models at once (a round table's answers, a
    /// self-consistency's samples), each given at most `limit`: a call that fails or runs out
    /// of time is that answer's outcome, not the step's. Only a spent budget fails the step.
    /// The step's `attempts` does not apply (every answer is the kind's to judge).
    pub async fn llm_parallel(
        &mut self,
        step: &LlmStep,
        models: &[ModelRef],
        limit: std::time::Duration,
    ) -> Result<Vec<ParallelAnswer>, StepError> {
        let n = self
            .begin(
                &format!("LLM, role {}, {} calls at once", step.role, models.len()),
                &step.name,
            )
            .await;
        let t = Instant::now();
        self.step_cost = StepCost::default();
        let (llm, meter, cancel) = (&self.llm, &self.meter, &self.cancel);
        let calls = models.iter().map(|m| {
            let req = ChatRequest {
                model: Some(m.clone()),
                system: Some(system_prompt(&step.role, &step.system)),
                messages: step.messages.clone(),
                ..ChatRequest::for_role(step.role.clone())
            };
            async move {
                let started = Instant::now();
                let r =
                    tokio::time::timeout(limit, llm.complete(&req, meter, cancel, |_| {})).await;
                (m.clone(), started.elapsed(), r)
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut answers = Vec::with_capacity(results.len());
        let mut budget = None;
        for (model, took, r) in results {
            let outcome = match r {
                Err(_) => Err(ParallelFailure::TimedOut(format!(
                    "no answer within {} ms",
                    limit.as_millis()
                ))),
                Ok(Ok(done)) => {
                    self.report_usage(&step.role, &done.usage, None);
                    Ok((done.text, done.usage))
                }
                Ok(Err(LlmError::Budget { exceeded, usage })) => {
                    if let Some(u) = usage {
                        self.report_usage(&step.role, &u, None);
                    }
                    budget.get_or_insert(exceeded.reason.clone());
                    Err(ParallelFailure::Failed(exceeded.reason))
                }
                Ok(Err(e)) => Err(ParallelFailure::Failed(e.to_string())),
            };
            answers.push(ParallelAnswer {
                model,
                latency_ms: took.as_secs_f64() * 1000.0,
                outcome,
            });
        }
        let ok = answers.iter().filter(|a| a.outcome.is_ok()).count();
        if let Some(reason) = budget {
            self.end(n, &step.name, t, &reason);
            return Err(StepError::Budget(reason));
        }
        self.end(
            n,
            &step.name,
            t,
            &format!("{ok} of {} answered", answers.len()),
        );
        Ok(answers)
    }

    fn report_usage(&mut self, role: &str, u: &StepUsage, overhead: Option<Overhead>) {
        self.step_cost.add(u);
        let cost = u.cost_usd.map(|c| format!(", ${c:.4}")).unwrap_or_default();
        let first = u
            .first_token_ms
            .map(|f| format!(", first token at {f} ms"))
            .unwrap_or_default();
        let estimated = if u.usage_estimated {
            " (estimated)"
        } else {
            ""
        };
        let overhead = overhead
            .map(|o| format!("; {}", o.describe()))
            .unwrap_or_default();
        self.system(format!(
            "LLM {role}: {}/{} answered as {}, {} in / {} out tokens{estimated}, {} ms{first}{cost}, {} attempt(s){overhead}",
            u.provider, u.requested_model, u.model, u.input_tokens, u.output_tokens, u.latency_ms, u.attempts
        ));
        self.emit(RunnerEvent::Usage {
            usage: UsageReport {
                source: role.to_string(),
                model: Some(u.model.clone()),
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                cached_tokens: 0,
                cost_usd: u.cost_usd,
            },
        });
    }

    /// Runs the job's agent once in its sandbox with `prompt` (`ITERATION` = `iteration`).
    pub(crate) async fn agent(
        &mut self,
        job: &JobRun,
        name: &str,
        prompt: &str,
        iteration: u32,
    ) -> CommandResult {
        let n = self.begin("agent", name).await;
        let t = Instant::now();
        let r = job.run_agent(prompt, iteration, None, None, None).await;
        let outcome = if r.succeeded() {
            "done".to_string()
        } else {
            r.failure("the agent")
        };
        self.end(n, name, t, &outcome);
        r
    }

    /// Runs a command in the job's sandbox.
    #[allow(dead_code)] // no kind runs a command whose output it does not read (see command_observed)
    pub(crate) async fn command(
        &mut self,
        job: &JobRun,
        name: &str,
        command: &str,
        iteration: u32,
    ) -> CommandResult {
        let n = self.begin("command", name).await;
        let t = Instant::now();
        let r = job.run_command(command, iteration, None).await;
        let outcome = if r.succeeded() {
            "done".to_string()
        } else {
            r.failure("the command")
        };
        self.end(n, name, t, &outcome);
        r
    }
}

impl Pipeline {
    /// Runs a command in the job's sandbox like [`Pipeline::command`], handing each line of its
    /// stdout to `observe` as well as to the job's log (a kind that reads a check's findings).
    pub(crate) async fn command_observed(
        &mut self,
        job: &JobRun,
        name: &str,
        command: &str,
        iteration: u32,
        mut observe: impl FnMut(&str),
    ) -> CommandResult {
        let n = self.begin("command", name).await;
        let t = Instant::now();
        let r = match job
            .start(ExecSpec::new(command, job.job_id(), iteration))
            .await
        {
            Err(e) => CommandResult::not_run(e.to_string()),
            Ok(mut exec) => {
                let mut collector = OutputCollector::new(AgentFormat::Text, None);
                let mut pass = |events: Vec<RunnerEvent>, sink: &EventSink| {
                    for ev in events {
                        if let RunnerEvent::Log {
                            stream: LogStream::Stdout,
                            content,
                        } = &ev
                        {
                            observe(content);
                        }
                        sink.push(ev);
                    }
                };
                while let Some(chunk) = exec.output.recv().await {
                    pass(collector.feed(&chunk), &self.sink);
                }
                pass(collector.finish(), &self.sink);
                let (exit_code, error) = match exec.exit_code().await {
                    Ok(code) => (Some(code), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                CommandResult {
                    exit_code,
                    error,
                    summary: collector.summary(),
                    promise_detected: false,
                    session_id: None,
                }
            }
        };
        let outcome = if r.succeeded() {
            "done".to_string()
        } else {
            r.failure("the command")
        };
        self.end(n, name, t, &outcome);
        r
    }
}

/// The engine's time in a call: `started` (the step's call began) to the first delta less the
/// provider's time to its first byte, and the last delta to `handed` less the provider's time
/// from its last text to its stream's end. Microseconds of the client's marks are since its
/// own start, which follows `started` by the few instructions between them. The marks go on
/// the wall clock through one reading of it taken now.
fn overhead(
    u: &StepUsage,
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    handed: Instant,
) -> Overhead {
    let tm = &u.timing;
    let server_first_byte = tm
        .first_byte_us
        .unwrap_or(tm.headers_us)
        .saturating_sub(tm.request_us);
    let server_tail = tm
        .done_us
        .saturating_sub(tm.last_token_us.unwrap_or(tm.done_us));
    let before = first.map_or(0, |f| {
        let seen = f.duration_since(started).as_micros() as u64;
        seen.saturating_sub(server_first_byte)
    });
    let after = last.map_or(0, |l| {
        let seen = handed.duration_since(l).as_micros() as u64;
        seen.saturating_sub(server_tail)
    });
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let wall_us = wall
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let at =
        |i: Instant| wall_us.saturating_sub(now.saturating_duration_since(i).as_micros() as u64);
    Overhead {
        before_first_token_us: before,
        after_last_token_us: after,
        started_at_us: at(started),
        first_token_at_us: first.map_or(0, at),
        last_token_at_us: last.map_or(0, at),
        handed_at_us: at(handed),
        server_first_byte_us: server_first_byte,
        server_tail_us: server_tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overheads_read_back_from_their_line() {
        let o = Overhead {
            before_first_token_us: 412,
            after_last_token_us: 37,
            started_at_us: 1_780_000_000_000_001,
            first_token_at_us: 1_780_000_000_020_413,
            last_token_at_us: 1_780_000_000_041_000,
            handed_at_us: 1_780_000_000_041_040,
            server_first_byte_us: 20_000,
            server_tail_us: 3,
        };
        let line = format!(
            "LLM ceo: a/b answered as b, 1 in / 2 out tokens, 3 ms, 1 attempt(s); {}",
            o.describe()
        );
        assert_eq!(Overhead::parse(&line), Some(o));
        assert_eq!(Overhead::parse("LLM ceo: no overhead here"), None);
        let short = Overhead {
            before_first_token_us: 412,
            after_last_token_us: 37,
            ..Default::default()
        };
        assert_eq!(
            Overhead::parse(
                "LLM ceo: x; engine overhead 412 us before the first token, 37 us after the last"
            ),
            Some(short)
        );
        assert_eq!(
            Overhead::parse("LLM ceo: x; engine overhead 412 us before the first token, 37 us after the last; at (unix us) start 5"),
            None,
            "a cut line"
        );
    }

    #[test]
    fn roles_open_the_system_prompt() {
        assert_eq!(system_prompt("ceo", "Plan."), "Kiln role: ceo\nPlan.");
    }
}
