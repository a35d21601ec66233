//! The `app_build` kind (seed 000's app builder, issue 8 §3): its steps on the pipeline engine.
//! The workspace is a new git repository (a continuation run restores the earlier run's
//! snapshot into it first); then
//!
//! 1. **planning**: the executives' dialogue, CEO → CTO → Secretary rounds (LLM roles `ceo`,
//!    `cto`, `secretary`), each turn a `dialogue` event; at most [`MAX_ROUNDS`], ended early by a
//!    turn that says `CONSENSUS`;
//! 2. **PRD** (role `prd`): markdown and a fenced json spec → `prd`, phase `prd_ready`;
//! 3. **ticketing** (role `tickets`): a fenced json backlog with the model's own ids, mapped to
//!    UUIDs and checked with `build_order` → `backlog`, phase `tickets_ready`;
//! 4. **building**: one agent run per story and task in dependency order, each a commit and a
//!    snapshot; a failed ticket is tried once more, then `failed`, and every ticket that depends
//!    on it (transitively) is not built. An epic follows the stories and tasks under it
//!    ([`Epics`]): `in_progress` when the first starts, `failed` when one fails, `done` when all
//!    are done.
//!
//! An answer that cannot be used (PRD or backlog) is asked for once more with the reason, then
//! fails the job; a spent LLM budget fails it naming the budget.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use kiln_schemas::app::{build_order, Ticket, TicketStatus, TicketType};
use kiln_schemas::runner::{AppBuildParams, Outcome, RunnerEvent};
use kiln_schemas::status::AppPhase;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::run::{failed, finished, JobRun};
use super::JobControl;
use crate::pipeline::{LlmStep, Pipeline, StepError};

/// Rounds of the executives' dialogue at most.
pub const MAX_ROUNDS: u32 = 3;
/// The word that ends the dialogue early.
pub const CONSENSUS: &str = "CONSENSUS";
/// Answers asked for when the PRD or the backlog cannot be used (the first and one more).
const ANSWER_ATTEMPTS: u32 = 2;
/// Agent runs per ticket (the first and one retry).
const TICKET_ATTEMPTS: u32 = 2;

const EXECUTIVES: [(&str, &str, &str); 3] = [
    (
        "ceo",
        "CEO",
        "You are the CEO of a small software studio, planning an app with your CTO and your Secretary. Speak for the product: scope, the users, what the first version must do and what waits. Be brief (a short paragraph). When the plan is agreed, say CONSENSUS.",
    ),
    (
        "cto",
        "CTO",
        "You are the CTO of a small software studio, planning an app with your CEO and your Secretary. Speak for the build: stack, structure, data, risks, in a short paragraph. When the plan is agreed, say CONSENSUS.",
    ),
    (
        "secretary",
        "Secretary",
        "You are the Secretary of a small software studio, keeping the record of the CEO and CTO's planning. Sum up what is decided and what is still open, in a short paragraph. When nothing is open, say CONSENSUS.",
    ),
];

const PRD_SYSTEM: &str = "You are the Secretary of a small software studio. From the requirements and the executives' planning, write the product requirements document in markdown (overview, users, features, technical approach, out of scope), then one fenced ```json block holding the structured spec as one JSON object (for example {\"name\": ..., \"summary\": ..., \"features\": [...], \"stack\": {...}}).";

const TICKETS_SYSTEM: &str = "You turn a product requirements document into a backlog. Answer with one fenced ```json block: {\"tickets\": [{\"id\": \"E1\", \"type\": \"epic\", \"title\": \"...\", \"description\": \"...\", \"parent\": null, \"dependencies\": []}, {\"id\": \"S1\", \"type\": \"story\", \"title\": \"...\", \"description\": \"...\", \"parent\": \"E1\", \"dependencies\": []}, ...]}. Types are epic, story and task; every story and task is built by one coding agent run, after the tickets it depends on (ids of this backlog). No cycles.";

/// The text every step is told the app is: the idea, the gathered requirements, and a
/// continuation's new ones.
fn requirements(p: &AppBuildParams) -> String {
    let mut s = format!(
        "The idea: {}\n\nThe requirements gathered from the user:\n{}",
        p.initial_prompt.trim(),
        p.requirements_summary.trim()
    );
    if let Some(more) = &p.continuation {
        s.push_str(&format!(
            "\n\nThat app was built. Plan and build only these new requirements now, over the existing workspace:\n{}",
            more.trim()
        ));
    }
    s
}

/// The last fenced ```json block of a text: (where its fence starts, its content).
pub fn fenced_json(text: &str) -> Option<(usize, &str)> {
    let mut found = None;
    let mut from = 0;
    while let Some(at) = text[from..].find("```") {
        let start = from + at;
        let after = &text[start + 3..];
        let lang_end = after.find('\n')?;
        let lang = after[..lang_end].trim();
        let body_start = start + 3 + lang_end + 1;
        let Some(close) = text[body_start..].find("```") else {
            break;
        };
        if lang.eq_ignore_ascii_case("json") {
            found = Some((start, &text[body_start..body_start + close]));
        }
        from = body_start + close + 3;
    }
    found
}

/// A PRD answer: (the markdown before the spec, the spec object).
pub fn parse_prd(text: &str) -> Result<(String, Value), String> {
    let (at, body) =
        fenced_json(text).ok_or("the answer has no fenced ```json block holding the spec")?;
    let spec: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the spec's json block is not valid JSON: {e}"))?;
    if !spec.is_object() {
        return Err("the spec must be a JSON object".into());
    }
    let markdown = text[..at].trim().to_string();
    if markdown.is_empty() {
        return Err("the answer has no PRD before the spec".into());
    }
    Ok((markdown, spec))
}

/// A backlog answer with the model's own ids: the tickets with new UUIDs (parents and
/// dependencies mapped; an id the backlog does not hold is kept, so `build_order` names it),
/// checked with `build_order`, and each ticket's local id.
pub fn parse_backlog(text: &str, assigned_to: &str) -> Result<(Vec<Ticket>, Vec<String>), String> {
    let body = fenced_json(text).map(|(_, b)| b).unwrap_or(text);
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the backlog's json block is not valid JSON: {e}"))?;
    let items = v
        .get("tickets")
        .and_then(Value::as_array)
        .ok_or("the backlog must be an object with a \"tickets\" array")?;
    let local_id = |t: &Value, i: usize| -> Result<String, String> {
        match t.get("id") {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(format!("ticket {} has no id", i + 1)),
        }
    };
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut locals = Vec::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        let id = local_id(t, i)?;
        ids.entry(id.clone())
            .or_insert_with(|| uuid::Uuid::new_v4().to_string());
        locals.push(id);
    }
    let map = |id: &str| ids.get(id).cloned().unwrap_or_else(|| id.to_string());
    let text_of = |t: &Value, k: &str| {
        t.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let mut tickets = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    for (i, t) in items.iter().enumerate() {
        let local = &locals[i];
        if !seen.insert(local.clone()) {
            return Err(format!("ticket id {local} is used twice"));
        }
        let kind = t
            .get("type")
            .and_then(Value::as_str)
            .and_then(|k| TicketType::parse(&k.to_ascii_lowercase()))
            .ok_or_else(|| format!("ticket {local} has no type epic, story or task"))?;
        let parent = match t.get("parent").or_else(|| t.get("parent_id")) {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if p.trim().is_empty() => None,
            Some(Value::String(p)) => Some(map(p.trim())),
            Some(other) => return Err(format!("ticket {local}'s parent {other} is not an id")),
        };
        let dependencies = match t.get("dependencies") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(ds)) => ds
                .iter()
                .map(|d| match d {
                    Value::String(s) => Ok(map(s.trim())),
                    Value::Number(n) => Ok(map(&n.to_string())),
                    other => Err(format!(
                        "ticket {local} names a dependency {other} that is not an id"
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(format!(
                    "ticket {local}'s dependencies must be an array of ids"
                ))
            }
        };
        tickets.push(Ticket {
            id: map(local),
            parent_id: parent,
            kind,
            title: text_of(t, "title"),
            description: text_of(t, "description"),
            status: TicketStatus::Todo,
            assigned_to: if kind == TicketType::Epic {
                String::new()
            } else {
                assigned_to.to_string()
            },
            dependencies,
        });
    }
    // Errors name the model's ids, not the UUIDs it never saw.
    let local_of: HashMap<&str, &str> = ids.iter().map(|(l, u)| (u.as_str(), l.as_str())).collect();
    build_order(&tickets).map_err(|e| {
        local_of
            .iter()
            .fold(e, |e, (uuid, local)| e.replace(uuid, local))
    })?;
    Ok((tickets, locals))
}

/// The epics of a backlog, following the stories and tasks under them (their descendants by
/// `parent_id`): an epic becomes `in_progress` when the first of them starts, `failed` when one
/// fails (built or not), `done` when all are done; an epic with none is `done` when the build
/// ends. Pure: each call answers the `ticket` events to emit, once per change.
pub struct Epics {
    epics: Vec<Epic>,
}

struct Epic {
    id: String,
    local: String,
    /// Indices of the stories and tasks under it.
    members: HashSet<usize>,
    done: usize,
    status: TicketStatus,
}

impl Epics {
    pub fn new(tickets: &[Ticket], locals: &[String]) -> Epics {
        let index: HashMap<&str, usize> = tickets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.as_str(), i))
            .collect();
        let mut members: HashMap<usize, HashSet<usize>> = HashMap::new();
        for (i, t) in tickets.iter().enumerate() {
            if t.kind == TicketType::Epic {
                continue;
            }
            // Up the parents (a cycle of parents ends the walk).
            let mut at = t.parent_id.as_deref();
            for _ in 0..tickets.len() {
                let Some(&j) = at.and_then(|p| index.get(p)) else {
                    break;
                };
                if tickets[j].kind == TicketType::Epic {
                    members.entry(j).or_default().insert(i);
                }
                at = tickets[j].parent_id.as_deref();
            }
        }
        let epics = tickets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == TicketType::Epic)
            .map(|(j, t)| Epic {
                id: t.id.clone(),
                local: locals.get(j).cloned().unwrap_or_else(|| t.id.clone()),
                members: members.remove(&j).unwrap_or_default(),
                done: 0,
                status: TicketStatus::Todo,
            })
            .collect();
        Epics { epics }
    }

    fn event(e: &Epic, message: String) -> RunnerEvent {
        RunnerEvent::Ticket {
            ticket_id: e.id.clone(),
            status: e.status,
            message,
            metadata: json!({"local_id": e.local, "tickets": e.members.len(), "done": e.done}),
        }
    }

    /// Ticket `i` (a story or task, by its local id `local`) starts being built.
    pub fn started(&mut self, i: usize, local: &str) -> Vec<RunnerEvent> {
        let mut out = vec![];
        for e in &mut self.epics {
            if e.status == TicketStatus::Todo && e.members.contains(&i) {
                e.status = TicketStatus::InProgress;
                out.push(Self::event(
                    e,
                    format!("{}: building its first ticket, {local}", e.local),
                ));
            }
        }
        out
    }

    /// Ticket `i` ended `done` (`ok`) or `failed`.
    pub fn settled(&mut self, i: usize, local: &str, ok: bool) -> Vec<RunnerEvent> {
        let mut out = vec![];
        for e in &mut self.epics {
            if !e.members.contains(&i)
                || matches!(e.status, TicketStatus::Done | TicketStatus::Failed)
            {
                continue;
            }
            if !ok {
                e.status = TicketStatus::Failed;
                out.push(Self::event(
                    e,
                    format!("{}: its ticket {local} failed", e.local),
                ));
                continue;
            }
            e.done += 1;
            if e.done == e.members.len() {
                e.status = TicketStatus::Done;
                out.push(Self::event(
                    e,
                    format!("{}: all {} of its tickets are built", e.local, e.done),
                ));
            }
        }
        out
    }

    /// The build ended: an epic with nothing under it is done.
    pub fn finish(&mut self) -> Vec<RunnerEvent> {
        let mut out = vec![];
        for e in &mut self.epics {
            if e.members.is_empty() && e.status == TicketStatus::Todo {
                e.status = TicketStatus::Done;
                out.push(Self::event(
                    e,
                    format!("{}: nothing under it to build", e.local),
                ));
            }
        }
        out
    }
}

/// The prompt of one ticket's agent run: `Ticket:` and `Ticket id:` lines first, then the
/// ticket's description and the PRD.
pub fn ticket_prompt(
    title: &str,
    local_id: &str,
    kind: &str,
    description: &str,
    prd: &str,
) -> String {
    format!(
        "Ticket: {title}\nTicket id: {local_id}\nType: {kind}\n\n{description}\n\nBuild this ticket in the current directory (the app's workspace, /app in its container), over what earlier tickets built. The product requirements document:\n\n{prd}\n"
    )
}

/// A dialogue turn that ends the planning.
fn says_consensus(text: &str) -> bool {
    text.contains(CONSENSUS)
}

fn phase(p: &Pipeline, phase: AppPhase, message: &str) {
    p.emit(RunnerEvent::Phase {
        phase,
        message: message.to_string(),
    });
}

fn step_failure(e: StepError, what: &str) -> RunnerEvent {
    match e {
        StepError::Budget(m) => failed(m),
        StepError::Failed(m) => failed(format!("{what} failed: {m}")),
    }
}

/// Runs an app build; answers its `finished` event.
pub(super) async fn run(
    job: &mut JobRun,
    controls: mpsc::UnboundedReceiver<JobControl>,
) -> RunnerEvent {
    let Some(params) = job.assignment.app.clone() else {
        return failed("The assignment of this app build carries no app parameters");
    };
    let s = job.services.clone();
    let job_id = job.job_id().to_string();
    let lease_id = job.assignment.lease_id.clone();

    let t = Instant::now();
    let wt = match s.workspaces.create_app_workspace(&job_id).await {
        Ok(wt) => wt,
        Err(e) => return failed(format!("Preparing the app's workspace failed: {e}")),
    };
    let path = wt.path.clone();
    job.worktree = Some(wt);
    if params.continuation.is_some() {
        match s.edge.get_snapshot(&job_id, &lease_id).await {
            Ok(Some(snap)) => {
                let n = snap.files.len();
                let dir = path.clone();
                let restored =
                    tokio::task::spawn_blocking(move || crate::files::restore(&dir, &snap)).await;
                match restored {
                    Ok(Ok(())) => {
                        job.sink
                            .system(format!(
                                "Restored {n} files of the earlier run from its snapshot"
                            ))
                            .await
                    }
                    Ok(Err(e)) => {
                        return failed(format!("Restoring the earlier run's workspace failed: {e}"))
                    }
                    Err(e) => {
                        return failed(format!("Restoring the earlier run's workspace failed: {e}"))
                    }
                }
            }
            Ok(None) => {
                job.sink
                    .system("No snapshot of an earlier run: building over an empty workspace")
                    .await
            }
            Err(e) => return failed(format!("Fetching the earlier run's workspace failed: {e}")),
        }
        if let Err(e) = s
            .workspaces
            .commit_all(job.worktree(), "The workspace of the earlier run")
            .await
        {
            return failed(format!("Committing the restored workspace failed: {e}"));
        }
    }
    job.sink
        .system(format!(
            "App workspace ready (a new git repository) in {} ms",
            t.elapsed().as_millis()
        ))
        .await;
    if let Err(f) = job.prepare_sandbox(&path).await {
        return f;
    }

    let job = &*job;
    let mut pipeline = job.pipeline(controls, params.paused);
    let build = App {
        job,
        params: &params,
        requirements: requirements(&params),
        snapshots_put: 0,
    }
    .run(&mut pipeline);
    // A workspace that outgrows its limit ends the job like any other job's.
    job.within_workspace_limit(build).await
}

struct App<'a> {
    job: &'a JobRun,
    params: &'a AppBuildParams,
    requirements: String,
    snapshots_put: u32,
}

impl App<'_> {
    async fn run(mut self, p: &mut Pipeline) -> RunnerEvent {
        let continuing = self.params.continuation.is_some();
        phase(p, AppPhase::Planning, "The executives are planning the app");
        p.narrate(if continuing {
            "The CEO, CTO and Secretary are planning the new requirements."
        } else {
            "The CEO, CTO and Secretary are planning the app."
        });
        let dialogue = match self.plan(p).await {
            Ok(d) => d,
            Err(e) => return self.end_early(p, step_failure(e, "Planning")).await,
        };

        p.checkpoint("the PRD").await;
        p.narrate("The Secretary is writing the product requirements document.");
        let prd_prompt = format!(
            "{}\n\nThe executives' planning:\n{}\n\nWrite the PRD and its spec.",
            self.requirements,
            transcript(&dialogue)
        );
        let prd = p
            .llm(
                LlmStep::new("PRD", "prd", PRD_SYSTEM, prd_prompt).attempts(ANSWER_ATTEMPTS),
                |text| {
                    let (markdown, spec) = parse_prd(text)?;
                    let ev = RunnerEvent::Prd {
                        spec,
                        prd_markdown: markdown.clone(),
                    };
                    Ok((markdown, vec![ev]))
                },
            )
            .await;
        let prd = match prd {
            Ok(m) => m,
            Err(e) => return self.end_early(p, step_failure(e, "Writing the PRD")).await,
        };
        phase(p, AppPhase::PrdReady, "The PRD is ready");

        // A paused job stops before it announces what comes next.
        p.checkpoint("the backlog").await;
        phase(p, AppPhase::Ticketing, "Splitting the PRD into tickets");
        p.narrate("The PRD is being split into epics, stories and tasks.");
        let assigned = self.job.services.agent.format.profile_name().to_string();
        let tickets_prompt = format!(
            "{}\n\nThe product requirements document:\n\n{prd}\n\nWrite the backlog.",
            self.requirements
        );
        let backlog = p
            .llm(
                LlmStep::new("Backlog", "tickets", TICKETS_SYSTEM, tickets_prompt)
                    .attempts(ANSWER_ATTEMPTS),
                |text| {
                    let (tickets, locals) = parse_backlog(text, &assigned)?;
                    let ev = RunnerEvent::Backlog {
                        tickets: tickets.clone(),
                    };
                    Ok(((tickets, locals), vec![ev]))
                },
            )
            .await;
        let (tickets, locals) = match backlog {
            Ok(b) => b,
            Err(e) => {
                return self
                    .end_early(p, step_failure(e, "Writing the backlog"))
                    .await
            }
        };
        let order = build_order(&tickets).expect("parse_backlog checked the order");
        phase(
            p,
            AppPhase::TicketsReady,
            &format!("{} tickets, {} to build", tickets.len(), order.len()),
        );

        p.checkpoint("the build").await;
        phase(p, AppPhase::Building, "Building the tickets");
        p.narrate(format!(
            "Building {} tickets in dependency order.",
            order.len()
        ));
        let mut done: Vec<usize> = Vec::new();
        let mut epics = Epics::new(&tickets, &locals);
        let mut broken: HashMap<String, String> = HashMap::new(); // uuid → why
        let mut failures: Vec<String> = Vec::new();
        for (position, &i) in order.iter().enumerate() {
            let t = &tickets[i];
            let local = &locals[i];
            if let Some(dep) = t.dependencies.iter().find(|d| broken.contains_key(*d)) {
                let dep_local = tickets
                    .iter()
                    .position(|x| &x.id == dep)
                    .map(|j| locals[j].clone())
                    .unwrap_or_else(|| dep.clone());
                let why = format!("not built: its dependency {dep_local} failed");
                p.emit(RunnerEvent::Ticket {
                    ticket_id: t.id.clone(),
                    status: TicketStatus::Failed,
                    message: why.clone(),
                    metadata: json!({"local_id": local, "blocked_by": dep}),
                });
                failures.push(format!("{local} ({why})"));
                broken.insert(t.id.clone(), why);
                epics
                    .settled(i, local, false)
                    .into_iter()
                    .for_each(|e| p.emit(e));
                continue;
            }
            let built = self
                .build_ticket(p, t, local, &prd, position as u32 + 1, || {
                    epics.started(i, local)
                })
                .await;
            epics
                .settled(i, local, built.is_ok())
                .into_iter()
                .for_each(|e| p.emit(e));
            match built {
                Ok(()) => done.push(i),
                Err(why) => {
                    failures.push(format!("{local} {:?} ({why})", t.title));
                    broken.insert(t.id.clone(), why);
                }
            }
        }
        epics.finish().into_iter().for_each(|e| p.emit(e));
        if self.snapshots_put == 0 {
            self.put_snapshot(p).await;
        }
        if failures.is_empty() {
            p.narrate(format!("All {} tickets are built.", done.len()));
            finished(
                Outcome::Completed,
                format!("Built {} tickets", done.len()),
                None,
                None,
                None,
                None,
            )
        } else {
            let message = format!(
                "{} of {} tickets were not built: {}",
                failures.len(),
                order.len(),
                failures.join("; ")
            );
            p.narrate(format!(
                "The build ended with failed tickets: {}",
                failures.join("; ")
            ));
            finished(
                Outcome::Failed,
                message.clone(),
                None,
                None,
                None,
                Some(message),
            )
        }
    }

    /// A run that ends before building still leaves its workspace's snapshot.
    async fn end_early(&mut self, p: &mut Pipeline, f: RunnerEvent) -> RunnerEvent {
        if self.params.continuation.is_none() {
            return f;
        }
        if self.snapshots_put == 0 {
            self.put_snapshot(p).await;
        }
        f
    }

    /// The executives' dialogue: (agent, message) turns.
    async fn plan(&self, p: &mut Pipeline) -> Result<Vec<(String, String)>, StepError> {
        let mut turns: Vec<(String, String)> = Vec::new();
        for round in 1..=MAX_ROUNDS {
            for (role, agent, system) in EXECUTIVES {
                let prompt = format!(
                    "{}\n\nThe planning so far:\n{}\n\nRound {round} of at most {MAX_ROUNDS}. Your turn, {agent}.",
                    self.requirements,
                    if turns.is_empty() { "(nothing yet: you open it)".to_string() } else { transcript(&turns) }
                );
                let order = turns.len() as u32 + 1;
                let text = p
                    .llm(
                        LlmStep::new(format!("{agent}, round {round}"), role, system, prompt),
                        |text| {
                            let text = text.trim().to_string();
                            let ev = RunnerEvent::Dialogue {
                                agent: agent.to_string(),
                                message: text.clone(),
                                order,
                            };
                            Ok((text, vec![ev]))
                        },
                    )
                    .await?;
                let agreed = says_consensus(&text);
                turns.push((agent.to_string(), text));
                if agreed {
                    p.system(format!(
                        "{agent} declared consensus in round {round}: planning ends"
                    ));
                    return Ok(turns);
                }
            }
        }
        p.system(format!(
            "No consensus after {MAX_ROUNDS} rounds: planning ends"
        ));
        Ok(turns)
    }

    /// Builds one ticket: agent runs (a second when the first fails), a commit, a snapshot.
    async fn build_ticket(
        &mut self,
        p: &mut Pipeline,
        t: &Ticket,
        local: &str,
        prd: &str,
        iteration: u32,
        started: impl FnOnce() -> Vec<RunnerEvent>,
    ) -> Result<(), String> {
        let job = self.job;
        let prompt = ticket_prompt(&t.title, local, t.kind.as_str(), &t.description, prd);
        let t0 = Instant::now();
        let mut started = Some(started);
        let mut last = None;
        for attempt in 1..=TICKET_ATTEMPTS {
            p.checkpoint(&format!("ticket {local}")).await;
            p.emit(RunnerEvent::Ticket {
                ticket_id: t.id.clone(),
                status: TicketStatus::InProgress,
                message: if attempt == 1 {
                    format!("Building {local}: {}", t.title)
                } else {
                    format!("Building {local} again (attempt {attempt} of {TICKET_ATTEMPTS})")
                },
                metadata: json!({"local_id": local, "attempt": attempt}),
            });
            // Its epics follow it.
            if let Some(f) = started.take() {
                f().into_iter().for_each(|e| p.emit(e));
            }
            let r = p
                .agent(
                    job,
                    &format!("ticket {local} {:?}, attempt {attempt}", t.title),
                    &prompt,
                    iteration,
                )
                .await;
            if r.succeeded() {
                last = Some(Ok(r));
                break;
            }
            let why = r.failure("the agent");
            if attempt < TICKET_ATTEMPTS {
                p.system(format!(
                    "Ticket {local} failed ({why}); trying it once more"
                ));
            }
            last = Some(Err((why, r)));
        }
        let ok = matches!(last, Some(Ok(_)));
        let message = if ok {
            format!("{local}: {}", t.title)
        } else {
            format!("{local} (failed): {}", t.title)
        };
        let commit = job
            .services
            .workspaces
            .commit_allow_empty(
                job.worktree(),
                &format!(
                    "{message}\n\nKiln app build {}, ticket {}",
                    job.job_id(),
                    t.id
                ),
            )
            .await;
        let sha = match commit {
            Ok(sha) => {
                job.sink
                    .system(format!(
                        "Committed {} for ticket {local}",
                        &sha[..sha.len().min(12)]
                    ))
                    .await;
                Some(sha)
            }
            Err(e) => {
                job.sink
                    .system(format!("Committing ticket {local} failed: {e}"))
                    .await;
                None
            }
        };
        self.put_snapshot(p).await;
        let secs = t0.elapsed().as_secs_f64();
        match last.expect("at least one attempt ran") {
            Ok(r) => {
                let Some(sha) = sha else {
                    let why = "its work could not be committed".to_string();
                    p.emit(RunnerEvent::Ticket {
                        ticket_id: t.id.clone(),
                        status: TicketStatus::Failed,
                        message: why.clone(),
                        metadata: json!({"local_id": local, "log": r.summary}),
                    });
                    return Err(why);
                };
                p.emit(RunnerEvent::Ticket {
                    ticket_id: t.id.clone(),
                    status: TicketStatus::Done,
                    message: format!("Built {local} in {secs:.1} s"),
                    metadata: json!({"local_id": local, "log": r.summary, "commit": sha}),
                });
                Ok(())
            }
            Err((why, r)) => {
                p.emit(RunnerEvent::Ticket {
                    ticket_id: t.id.clone(),
                    status: TicketStatus::Failed,
                    message: format!("Failed after {TICKET_ATTEMPTS} attempts: {why}"),
                    metadata: json!({"local_id": local, "log": r.summary, "error": why, "commit": sha}),
                });
                Err(why)
            }
        }
    }

    /// Keeps the workspace's text files at the edge (the files API after the run, and the next
    /// continuation's start). A failure is said, not fatal.
    async fn put_snapshot(&mut self, p: &Pipeline) {
        let job = self.job;
        let dir = job.worktree().path.clone();
        let t = Instant::now();
        let snap = match tokio::task::spawn_blocking(move || crate::files::snapshot(&dir)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return p.system(format!("Snapshot of the workspace failed: {e}")),
            Err(e) => return p.system(format!("Snapshot of the workspace failed: {e}")),
        };
        let n = snap.files.len();
        match job
            .services
            .edge
            .put_snapshot(job.job_id(), &job.assignment.lease_id, &snap)
            .await
        {
            Ok(()) => {
                self.snapshots_put += 1;
                p.system(format!(
                    "Snapshot of the workspace ({n} files) kept at the edge in {} ms",
                    t.elapsed().as_millis()
                ));
            }
            Err(e) => p.system(format!("Keeping the workspace's snapshot failed: {e}")),
        }
    }
}

fn transcript(turns: &[(String, String)]) -> String {
    turns
        .iter()
        .map(|(a, m)| format!("{a}: {m}"))
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_json_fence_holds_the_spec() {
        let text =
            "# PRD\nA todo app.\n```ts\nconst x = 1;\n```\n```json\n{\"name\": \"todo\"}\n```\n";
        let (md, spec) = parse_prd(text).unwrap();
        assert_eq!(spec, json!({"name": "todo"}));
        assert!(md.starts_with("# PRD") && md.contains("const x"), "{md}");
        assert!(parse_prd("# PRD only").unwrap_err().contains("fenced"));
        assert!(parse_prd("# PRD\n```json\n{nope\n```")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_prd("# PRD\n```json\n[1]\n```")
            .unwrap_err()
            .contains("object"));
        assert!(parse_prd("```json\n{}\n```")
            .unwrap_err()
            .contains("no PRD"));
    }

    #[test]
    fn backlogs_get_uuids_with_their_links() {
        let text = r#"Here:
```json
{"tickets": [
  {"id": "E1", "type": "epic", "title": "App", "parent": null, "dependencies": []},
  {"id": "S2", "type": "story", "title": "List", "parent": "E1", "dependencies": ["S1"]},
  {"id": "S1", "type": "story", "title": "Model", "parent": "E1", "dependencies": []}
]}
```"#;
        let (tickets, locals) = parse_backlog(text, "text").unwrap();
        assert_eq!(locals, ["E1", "S2", "S1"]);
        assert!(tickets.iter().all(|t| uuid::Uuid::parse_str(&t.id).is_ok()));
        assert_eq!(
            tickets[1].parent_id.as_deref(),
            Some(tickets[0].id.as_str())
        );
        assert_eq!(tickets[1].dependencies, [tickets[2].id.clone()]);
        assert_eq!(tickets[0].assigned_to, "", "epics are not built");
        assert_eq!(tickets[2].assigned_to, "text");
        assert_eq!(build_order(&tickets).unwrap(), [2, 1]);
    }

    #[test]
    fn bad_backlogs_say_why_in_the_models_ids() {
        let cycle = r#"```json
{"tickets": [{"id": "S1", "type": "story", "title": "a", "dependencies": ["S2"]},
             {"id": "S2", "type": "story", "title": "b", "dependencies": ["S1"]}]}
```"#;
        let e = parse_backlog(cycle, "text").unwrap_err();
        assert!(e.contains("S1, S2") && e.contains("cycle"), "{e}");
        let dangling =
            r#"{"tickets": [{"id": "S1", "type": "story", "title": "a", "dependencies": ["S9"]}]}"#;
        assert!(parse_backlog(dangling, "text").unwrap_err().contains("S9"));
        assert!(parse_backlog("no json", "text").is_err());
        assert!(parse_backlog(
            r#"{"tickets": [{"id": "S1", "type": "bug", "title": "a"}]}"#,
            "t"
        )
        .unwrap_err()
        .contains("type"));
    }

    /// (local id, status) of the epics' events.
    fn said(events: Vec<RunnerEvent>, locals: &[String], tickets: &[Ticket]) -> Vec<String> {
        events
            .into_iter()
            .map(|e| match e {
                RunnerEvent::Ticket {
                    ticket_id, status, ..
                } => {
                    let i = tickets.iter().position(|t| t.id == ticket_id).unwrap();
                    format!("{} {}", locals[i], status.as_str())
                }
                other => panic!("not a ticket event: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn epics_follow_the_stories_and_tasks_under_them() {
        // E1 holds S1 and (through S2) T1; E2 holds S3; E3 is empty; E4 is under E1 and holds T2.
        let text = r#"{"tickets": [
  {"id": "E1", "type": "epic", "title": "a"},
  {"id": "S1", "type": "story", "title": "b", "parent": "E1"},
  {"id": "S2", "type": "story", "title": "c", "parent": "E1"},
  {"id": "T1", "type": "task", "title": "d", "parent": "S2"},
  {"id": "E2", "type": "epic", "title": "e"},
  {"id": "S3", "type": "story", "title": "f", "parent": "E2"},
  {"id": "E3", "type": "epic", "title": "g"},
  {"id": "E4", "type": "epic", "title": "h", "parent": "E1"},
  {"id": "T2", "type": "task", "title": "i", "parent": "E4"}
]}"#;
        let (tickets, locals) = parse_backlog(text, "text").unwrap();
        let at = |l: &str| locals.iter().position(|x| x == l).unwrap();
        let mut epics = Epics::new(&tickets, &locals);
        let say = |e| said(e, &locals, &tickets);
        assert_eq!(say(epics.started(at("S1"), "S1")), ["E1 in_progress"]);
        assert_eq!(
            say(epics.settled(at("S1"), "S1", true)),
            Vec::<String>::new()
        );
        assert!(epics.started(at("S2"), "S2").is_empty(), "announced once");
        assert_eq!(
            say(epics.settled(at("S2"), "S2", true)),
            Vec::<String>::new()
        );
        assert_eq!(say(epics.started(at("T1"), "T1")), Vec::<String>::new());
        assert_eq!(
            say(epics.settled(at("T1"), "T1", true)),
            Vec::<String>::new()
        );
        assert_eq!(
            say(epics.started(at("T2"), "T2")),
            ["E4 in_progress"],
            "E1 is already in progress"
        );
        assert_eq!(
            say(epics.settled(at("T2"), "T2", true)),
            ["E1 done", "E4 done"],
            "the last ticket under both"
        );
        assert_eq!(say(epics.started(at("S3"), "S3")), ["E2 in_progress"]);
        assert_eq!(say(epics.settled(at("S3"), "S3", false)), ["E2 failed"]);
        assert_eq!(say(epics.finish()), ["E3 done"], "nothing under it");
        assert!(epics.finish().is_empty());

        // A failure fails the epic at once and nothing after it changes it.
        let mut epics = Epics::new(&tickets, &locals);
        assert_eq!(
            say(epics.settled(at("T1"), "T1", false)),
            ["E1 failed"],
            "a ticket not built fails it too"
        );
        assert!(epics.started(at("S1"), "S1").is_empty());
        assert!(epics.settled(at("S1"), "S1", true).is_empty());
        assert!(epics.settled(at("S2"), "S2", true).is_empty());
        match &epics.settled(at("T2"), "T2", true)[..] {
            [RunnerEvent::Ticket {
                status,
                message,
                metadata,
                ..
            }] => {
                assert_eq!(*status, TicketStatus::Done);
                assert_eq!(message, "E4: all 1 of its tickets are built");
                assert_eq!(
                    *metadata,
                    json!({"local_id": "E4", "tickets": 1, "done": 1})
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parents_in_a_cycle_end_the_walk() {
        let t = |id: &str, kind, parent: Option<&str>| Ticket {
            id: id.into(),
            parent_id: parent.map(Into::into),
            kind,
            title: id.into(),
            description: String::new(),
            status: TicketStatus::Todo,
            assigned_to: String::new(),
            dependencies: vec![],
        };
        let tickets = vec![
            t("E1", TicketType::Epic, Some("S1")),
            t("S1", TicketType::Story, Some("E1")),
        ];
        let locals = vec!["E1".to_string(), "S1".to_string()];
        let mut epics = Epics::new(&tickets, &locals);
        assert_eq!(
            said(epics.settled(1, "S1", true), &locals, &tickets),
            ["E1 done"]
        );
    }

    #[test]
    fn ticket_prompts_lead_with_the_ticket() {
        let p = ticket_prompt("Add the list", "S1", "story", "A list of todos.", "# PRD");
        let mut lines = p.lines();
        assert_eq!(lines.next(), Some("Ticket: Add the list"));
        assert_eq!(lines.next(), Some("Ticket id: S1"));
        assert!(p.contains("A list of todos.") && p.ends_with("# PRD\n"));
    }
}
