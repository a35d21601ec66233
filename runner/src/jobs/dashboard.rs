//! Seed 002's LLM kinds on the pipeline engine (issue 10):
//!
//! - `agent_task`: one LLM step (role `agent.<type>`, falling back to `default`) with the agent's
//!   instructions and a system prompt that applies its technique (chain-of-thought, few-shot
//!   with examples as earlier turns, ReAct-style, self-consistency: n samples at once and the
//!   majority answer, zero-shot); with `use_round_table`, a round table whose winner answers.
//! - `agent_learn`: one step (role `agent_learn`) over the recent tasks → new instructions and
//!   the changes made (a fenced json answer, asked for once more when unreadable).
//! - `round_table`: every provider answers at once (`generating`, each within the round table's
//!   time limit; a failure or a timeout is that entry's outcome), a judge (role `judge`) scores
//!   the answers anonymised as "Answer A/B/…" in random order (`scoring`), the top two are
//!   compared in random order (role `ab_judge`, `ab_testing`), the winner is named
//!   (`completed`). The result is a `CompetitionView` plus `pairs` for the edge's Elo.
//!
//! Progress: a task 10 when its step starts, 90 when the answer is in, 100 at the end; a round
//! table 10/40/70/100 at generating/scoring/ab_testing/completed.

use std::collections::BTreeMap;
use std::time::Instant;

use kiln_schemas::dashboard::{AbTest, CompetitionView, EntryView};
use kiln_schemas::runner::{DashboardParams, Outcome, RunnerEvent};
use rand::seq::SliceRandom;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::app_build::fenced_json;
use super::run::{failed, JobRun};
use super::JobControl;
use crate::llm::{Message, ModelRef};
use crate::pipeline::{LlmStep, ParallelFailure, Pipeline, StepError};

/// The judge's rubric, each criterion scored 0–10.
pub const RUBRIC: [&str; 5] = [
    "relevance",
    "accuracy",
    "clarity",
    "completeness",
    "creativity",
];
/// Self-consistency's samples when the task's parameters name none, and the most allowed.
const DEFAULT_SAMPLES: usize = 3;
const MAX_SAMPLES: usize = 7;
/// Answers asked for when the judge's, the A/B judge's or the learner's cannot be read.
const ANSWER_ATTEMPTS: u32 = 2;

pub(super) async fn run(
    job: &mut JobRun,
    controls: mpsc::UnboundedReceiver<JobControl>,
) -> RunnerEvent {
    let Some(params) = job.assignment.dashboard.clone() else {
        return failed("The assignment of this dashboard job carries no dashboard parameters");
    };
    let job = &*job;
    let mut p = job.pipeline(controls, false);
    let prompt = job.assignment.prompt.clone();
    let job_id = job.job_id().to_string();
    let competes = matches!(
        params,
        DashboardParams::RoundTable { .. }
            | DashboardParams::AgentTask {
                use_round_table: true,
                ..
            }
    );
    let end = match params {
        DashboardParams::AgentTask {
            agent_type,
            model_role,
            technique,
            instructions,
            parameters,
            use_round_table,
        } => {
            let task = Task {
                agent_type,
                role: if model_role.trim().is_empty() {
                    "default".into()
                } else {
                    model_role
                },
                technique,
                instructions,
                parameters,
            };
            if use_round_table {
                task_by_round_table(&mut p, job, &job_id, &prompt, &task).await
            } else {
                agent_task(&mut p, job, &prompt, &task).await
            }
        }
        DashboardParams::AgentLearn {
            agent_type,
            instructions,
            recent,
        } => agent_learn(&mut p, &agent_type, &instructions, &recent).await,
        DashboardParams::RoundTable { providers } => {
            let models = match providers_of(job, providers.as_deref()) {
                Ok(m) => m,
                Err(e) => return failed(e),
            };
            let step = LlmStep::new(
                "round table: answers",
                "round_table",
                ROUND_TABLE_SYSTEM,
                prompt.clone(),
            );
            round_table(&mut p, job, &job_id, &prompt, None, step, &models)
                .await
                .map(|(view, extra)| {
                    let message = match &view.winner {
                        Some(w) => format!("Round table won by {}", w.provider),
                        None => "Round table ended".into(),
                    };
                    (message, competition_result(&view, extra))
                })
        }
        DashboardParams::Pipeline3d { .. } => Err("pipeline_3d is not an LLM kind".into()),
    };
    match end {
        Ok((message, result)) => RunnerEvent::Finished {
            outcome: Outcome::Completed,
            message,
            pr_url: None,
            completion_reason: None,
            total_iterations: None,
            error_message: None,
            result: Some(result),
        },
        Err(why) => {
            if competes {
                // A competition's `failed` stage (`competition_update`).
                progress(&p, 100.0, "failed", json!({"error": why}));
            }
            failed(why)
        }
    }
}

type End = Result<(String, Value), String>;

fn progress(p: &Pipeline, percent: f64, stage: &str, data: Value) {
    p.emit(RunnerEvent::Progress {
        percent,
        stage: Some(stage.to_string()),
        data,
    });
}

fn step_error(e: StepError) -> String {
    e.message().to_string()
}

/// An agent's task as the assignment gives it.
struct Task {
    agent_type: String,
    role: String,
    technique: String,
    instructions: String,
    parameters: Value,
}

/// The system prompt of a technique (after the agent's instructions).
pub fn technique_prompt(technique: &str) -> &'static str {
    match technique {
        "chain_of_thought" => "Technique: chain of thought. Think through the task step by step, numbering your steps, then give the final answer on a last line that starts with `Answer:`.",
        "few_shot" => "Technique: few-shot. The earlier turns are worked examples; answer the task in the same form and style as their answers.",
        "react" => "Technique: ReAct. Work in a loop of `Thought:` (what you need next), `Action:` (what you would look up or compute) and `Observation:` (what you found or reasoned), as many times as needed, then end with a line that starts with `Final Answer:`.",
        "self_consistency" => "Technique: self-consistency. Reason the task out independently, then give your final answer on a last line that starts with `Answer:`; keep that line short so it can be compared with other reasoning paths.",
        _ => "Technique: zero-shot. Answer the task directly and concisely.",
    }
}

/// The few-shot examples: the task's `parameters.examples` (`[{input, output}]`), else two of
/// Kiln's own.
fn examples(parameters: &Value) -> Vec<(String, String)> {
    let given: Vec<(String, String)> = parameters
        .get("examples")
        .and_then(Value::as_array)
        .map(|xs| {
            xs.iter()
                .filter_map(|x| {
                    Some((
                        x.get("input")?.as_str()?.to_string(),
                        x.get("output")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if !given.is_empty() {
        return given;
    }
    vec![
        (
            "Summarise in one sentence: our shop ships in 2 days and returns are free for 30 days."
                .into(),
            "Orders ship in two days and can be returned free of charge within 30 days.".into(),
        ),
        (
            "Suggest a price for a handmade ceramic mug that costs $6 to make.".into(),
            "$24: about four times the cost, in line with handmade ceramics.".into(),
        ),
    ]
}

/// The step of a task: system prompt (instructions, technique) and messages (few-shot examples
/// as earlier turns, then the task with its parameters).
fn task_step(name: &str, prompt: &str, task: &Task) -> LlmStep {
    let technique = if kiln_schemas::dashboard::TECHNIQUES.contains(&task.technique.as_str()) {
        task.technique.as_str()
    } else {
        "zero_shot"
    };
    let system = format!(
        "You are Kiln's {} agent.\n{}\n\n{}",
        task.agent_type,
        task.instructions.trim(),
        technique_prompt(technique)
    );
    let mut text = prompt.to_string();
    if let Some(obj) = task.parameters.as_object() {
        let shown: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "examples" && k.as_str() != "samples")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !shown.is_empty() {
            text.push_str(&format!("\n\nParameters: {}", Value::Object(shown)));
        }
    }
    let mut step = LlmStep::new(name, task.role.clone(), system, text.clone());
    if technique == "few_shot" {
        let mut messages = vec![];
        for (i, o) in examples(&task.parameters) {
            messages.push(Message::user(i));
            messages.push(Message::assistant(o));
        }
        messages.push(Message::user(text));
        step.messages = messages;
    }
    step
}

/// The answer in a technique's text: after the last `Answer:` / `Final Answer:` line when there
/// is one, else the whole text.
pub fn final_answer(text: &str) -> String {
    for line in text.lines().rev() {
        let l = line.trim().trim_start_matches(['*', '#', ' ']);
        for tag in ["Final Answer:", "Answer:"] {
            if let Some(rest) = l.strip_prefix(tag) {
                let rest = rest.trim().trim_matches('*').trim();
                if !rest.is_empty() {
                    return rest.to_string();
                }
            }
        }
    }
    text.trim().to_string()
}

/// Self-consistency's vote: the most frequent answer (compared trimmed, lowercase, spaces
/// collapsed, a final period dropped); ties go to the earliest. `(answer, votes)`.
pub fn majority(answers: &[String]) -> Option<(String, usize)> {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
            .trim_end_matches('.')
            .to_string()
    };
    let mut counts: Vec<(String, usize, usize)> = vec![];
    for (i, a) in answers.iter().enumerate() {
        let k = norm(a);
        match counts.iter_mut().find(|(n, _, _)| *n == k) {
            Some(c) => c.1 += 1,
            None => counts.push((k, 1, i)),
        }
    }
    let best = counts
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))?;
    Some((answers[best.2].clone(), best.1))
}

async fn agent_task(p: &mut Pipeline, job: &JobRun, prompt: &str, task: &Task) -> End {
    progress(p, 10.0, "running", json!({"technique": task.technique}));
    let step = task_step(&format!("{} agent: task", task.agent_type), prompt, task);
    let (answer, extra) = if task.technique == "self_consistency" {
        let n = task
            .parameters
            .get("samples")
            .and_then(Value::as_u64)
            .map_or(DEFAULT_SAMPLES, |n| (n as usize).clamp(1, MAX_SAMPLES));
        let config = job.services.llm.config();
        let model = config
            .route(&task.role)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                format!(
                    "no model serves role {} (nor default) on this runner",
                    task.role
                )
            })?;
        let models = vec![model; n];
        let limit = config.policy.request_timeout;
        let answers = p
            .llm_parallel(&step, &models, limit)
            .await
            .map_err(step_error)?;
        let mut finals = vec![];
        let mut errors = vec![];
        let mut used = String::new();
        for a in answers {
            match a.outcome {
                Ok((text, usage)) => {
                    used = usage.model;
                    finals.push(final_answer(&text));
                }
                Err(f) => errors.push(f.message().to_string()),
            }
        }
        let (answer, votes) = majority(&finals)
            .ok_or_else(|| format!("no sample of the task was answered: {}", errors.join("; ")))?;
        p.system(format!("Self-consistency: {votes} of {n} samples agree"));
        (
            answer,
            json!({"model": used, "samples": n, "votes": votes, "cost_usd": p.last_step_cost().cost_usd}),
        )
    } else {
        let text = p
            .llm(step, |t| Ok((t.to_string(), vec![])))
            .await
            .map_err(step_error)?;
        let c = p.last_step_cost();
        let answer = match task.technique.as_str() {
            "chain_of_thought" | "react" => final_answer(&text),
            _ => text.trim().to_string(),
        };
        (
            answer,
            json!({"model": c.model, "cost_usd": c.cost_usd, "input_tokens": c.input_tokens, "output_tokens": c.output_tokens}),
        )
    };
    progress(p, 90.0, "running", json!({}));
    let mut result = json!({"answer": answer, "technique": task.technique});
    for (k, v) in extra.as_object().into_iter().flatten() {
        result[k] = v.clone();
    }
    progress(p, 100.0, "completed", json!({}));
    Ok((format!("The {} agent answered", task.agent_type), result))
}

async fn task_by_round_table(
    p: &mut Pipeline,
    job: &JobRun,
    job_id: &str,
    prompt: &str,
    task: &Task,
) -> End {
    let models = providers_of(job, None)?;
    let step = task_step(
        &format!("{} agent: round table answers", task.agent_type),
        prompt,
        task,
    );
    let (view, extra) = round_table(
        p,
        job,
        job_id,
        prompt,
        Some(job_id.to_string()),
        step,
        &models,
    )
    .await?;
    let winner = view
        .winner
        .clone()
        .ok_or("the round table named no winner")?;
    let text = winner.answer.clone().unwrap_or_default();
    let answer = match task.technique.as_str() {
        "chain_of_thought" | "react" | "self_consistency" => final_answer(&text),
        _ => text.trim().to_string(),
    };
    let result = json!({
        "answer": answer,
        "technique": task.technique,
        "model": winner.model,
        "provider": winner.provider,
        "competition_id": job_id,
        "cost_usd": view.total_cost_usd,
        "competition": competition_result(&view, extra),
    });
    Ok((
        format!(
            "The {} agent answered through a round table won by {}",
            task.agent_type, winner.provider
        ),
        result,
    ))
}

const LEARN_SYSTEM: &str = "You improve an AI agent's instructions from its recent tasks. You are given the agent's current instructions and its recent failed and slow tasks (prompts, errors, latencies). Rewrite the instructions so those failures and delays are less likely, keeping what works. Answer with one fenced ```json block: {\"instructions\": \"the complete new instructions\", \"changes\": [\"one short line per change and why\"]}.";

/// The learner's answer: `(instructions, changes)`.
pub fn parse_learning(text: &str) -> Result<(String, Vec<String>), String> {
    let body = fenced_json(text)
        .map(|(_, b)| b)
        .ok_or("the answer has no fenced ```json block")?;
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the json block is not valid JSON: {e}"))?;
    let instructions = v
        .get("instructions")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or("the answer has no non-empty \"instructions\" string")?
        .to_string();
    let changes = v
        .get("changes")
        .and_then(Value::as_array)
        .ok_or("the answer has no \"changes\" list")?
        .iter()
        .map(|c| match c {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    Ok((instructions, changes))
}

async fn agent_learn(
    p: &mut Pipeline,
    agent_type: &str,
    instructions: &str,
    recent: &[Value],
) -> End {
    progress(p, 10.0, "learning", json!({"reviewed": recent.len()}));
    let mut text = format!(
        "Agent: {agent_type}\n\nCurrent instructions:\n{}\n\nRecent tasks ({}):\n",
        instructions.trim(),
        recent.len()
    );
    for (i, t) in recent.iter().enumerate() {
        text.push_str(&format!("{}. {}\n", i + 1, t));
    }
    let step = LlmStep::new(
        format!("{agent_type} agent: learning"),
        "agent_learn",
        LEARN_SYSTEM,
        text,
    )
    .attempts(ANSWER_ATTEMPTS);
    let (new, changes) = p
        .llm(step, |t| Ok((parse_learning(t)?, vec![])))
        .await
        .map_err(step_error)?;
    progress(p, 90.0, "learning", json!({}));
    let result = json!({"instructions": new, "changes": changes, "reviewed": recent.len()});
    progress(p, 100.0, "completed", json!({}));
    Ok((
        format!(
            "The {agent_type} agent's instructions were rewritten ({} change(s))",
            changes.len()
        ),
        result,
    ))
}

const ROUND_TABLE_SYSTEM: &str = "Answer the user's prompt as well as you can: relevant, accurate, clear, complete, and creative where it helps.";

const JUDGE_SYSTEM: &str = "You judge answers to one prompt. Score every answer on each criterion from 0 to 10: relevance, accuracy, clarity, completeness, creativity. Answer with one fenced ```json block: {\"scores\": {\"A\": {\"relevance\": n, \"accuracy\": n, \"clarity\": n, \"completeness\": n, \"creativity\": n}, \"B\": {...}, ...}, \"reasoning\": \"why the best answer is best\"}, one entry per answer label.";

const AB_SYSTEM: &str = "You compare two answers to one prompt and pick the better one. Answer with one fenced ```json block: {\"winner\": \"A\" or \"B\" or \"tie\", \"reasoning\": \"why\"}.";

/// The providers of a round table: those named (each `provider/model`) or the runner's list.
fn providers_of(job: &JobRun, named: Option<&[String]>) -> Result<Vec<ModelRef>, String> {
    let config = job.services.llm.config();
    let models = match named {
        Some(names) if !names.is_empty() => names
            .iter()
            .map(|n| ModelRef::parse(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a round-table provider is not provider/model: {e}"))?,
        _ => config.round_table.providers.clone(),
    };
    if models.is_empty() {
        return Err(
            "This runner has no round-table providers ([llm.round_table] providers)".into(),
        );
    }
    Ok(models)
}

/// Answer labels: A, B, … Z, then A2, B2, ….
fn label(i: usize) -> String {
    let c = (b'A' + (i % 26) as u8) as char;
    if i < 26 {
        c.to_string()
    } else {
        format!("{c}{}", i / 26 + 1)
    }
}

/// Each label's rubric scores.
pub type Scores = BTreeMap<String, Map<String, Value>>;

/// The judge's scores: label → criterion → 0–10, every label and criterion present.
pub fn parse_scores(text: &str, labels: &[String]) -> Result<(Scores, String), String> {
    let body = fenced_json(text)
        .map(|(_, b)| b)
        .ok_or("the answer has no fenced ```json block")?;
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the json block is not valid JSON: {e}"))?;
    let scores = v
        .get("scores")
        .and_then(Value::as_object)
        .ok_or("the answer has no \"scores\" object")?;
    let mut out = BTreeMap::new();
    for l in labels {
        let s = scores
            .get(l.as_str())
            .and_then(Value::as_object)
            .ok_or_else(|| format!("no scores for Answer {l}"))?;
        let mut m = Map::new();
        for c in RUBRIC {
            let n = s
                .get(c)
                .and_then(Value::as_f64)
                .filter(|n| (0.0..=10.0).contains(n))
                .ok_or_else(|| format!("Answer {l}'s {c} is not a number from 0 to 10"))?;
            m.insert(c.to_string(), json!(n));
        }
        out.insert(l.clone(), m);
    }
    let reasoning = v
        .get("reasoning")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((out, reasoning))
}

/// The A/B judge's answer: `(Some(0)` for A, `Some(1)` for B, `None` for a tie, reasoning).
pub fn parse_ab(text: &str) -> Result<(Option<usize>, String), String> {
    let body = fenced_json(text)
        .map(|(_, b)| b)
        .ok_or("the answer has no fenced ```json block")?;
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| format!("the json block is not valid JSON: {e}"))?;
    let w = v
        .get("winner")
        .and_then(Value::as_str)
        .ok_or("the answer has no \"winner\"")?;
    let winner = match w.trim().to_ascii_uppercase().as_str() {
        "A" => Some(0),
        "B" => Some(1),
        "TIE" => None,
        other => return Err(format!("winner {other:?} is not A, B or tie")),
    };
    let reasoning = v
        .get("reasoning")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((winner, reasoning))
}

/// Every pairwise result the scores imply (answered entries only; `score_a` 1, 0.5 or 0).
pub fn score_pairs(entries: &[EntryView]) -> Vec<Value> {
    let ok: Vec<&EntryView> = entries.iter().filter(|e| e.status == "ok").collect();
    let mut pairs = vec![];
    for i in 0..ok.len() {
        for j in i + 1..ok.len() {
            let (a, b) = (ok[i], ok[j]);
            let score_a = if a.total_score > b.total_score {
                1.0
            } else if a.total_score < b.total_score {
                0.0
            } else {
                0.5
            };
            pairs.push(
                json!({"a": a.provider, "b": b.provider, "score_a": score_a, "source": "scores"}),
            );
        }
    }
    pairs
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The round table's result: the view with `pairs` and the judge's reasoning beside it.
fn competition_result(view: &CompetitionView, extra: Value) -> Value {
    let mut v = serde_json::to_value(view).expect("views serialize");
    for (k, x) in extra.as_object().into_iter().flatten() {
        v[k] = x.clone();
    }
    v
}

/// Runs a round table: `step` (system prompt, messages) goes to every model at once.
/// `(view, {pairs, judge_reasoning})`.
async fn round_table(
    p: &mut Pipeline,
    job: &JobRun,
    job_id: &str,
    prompt: &str,
    task_id: Option<String>,
    step: LlmStep,
    models: &[ModelRef],
) -> Result<(CompetitionView, Value), String> {
    let t = Instant::now();
    let created_at = now();
    let limit = job.services.llm.config().round_table.timeout;
    let names: Vec<String> = models.iter().map(ToString::to_string).collect();
    progress(p, 10.0, "generating", json!({"providers": names}));
    let answers = p
        .llm_parallel(&step, models, limit)
        .await
        .map_err(step_error)?;
    let mut total_cost = p.last_step_cost().cost_usd.unwrap_or(0.0);
    let mut entries: Vec<EntryView> = answers
        .into_iter()
        .map(|a| {
            let provider = a.model.to_string();
            match a.outcome {
                Ok((text, usage)) => EntryView {
                    provider,
                    model: usage.model.clone(),
                    status: "ok".into(),
                    answer: Some(text),
                    error: None,
                    scores: Map::new(),
                    total_score: 0.0,
                    rank: 0,
                    latency_ms: a.latency_ms,
                    cost_usd: usage.cost_usd.unwrap_or(0.0),
                },
                Err(f) => EntryView {
                    provider,
                    model: a.model.model.clone(),
                    status: match f {
                        ParallelFailure::TimedOut(_) => "timeout".into(),
                        ParallelFailure::Failed(_) => "failed".into(),
                    },
                    answer: None,
                    error: Some(f.message().to_string()),
                    scores: Map::new(),
                    total_score: 0.0,
                    rank: 0,
                    latency_ms: a.latency_ms,
                    cost_usd: 0.0,
                },
            }
        })
        .collect();
    for e in entries.iter().filter(|e| e.status != "ok") {
        p.system(format!(
            "Round table: {} {}: {}",
            e.provider,
            e.status,
            e.error.as_deref().unwrap_or("")
        ));
    }
    let ok: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].status == "ok")
        .collect();
    if ok.is_empty() {
        let why: Vec<String> = entries
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.provider,
                    e.error.as_deref().unwrap_or(&e.status)
                )
            })
            .collect();
        return Err(format!(
            "No round-table provider answered ({})",
            why.join("; ")
        ));
    }
    let mut judge_reasoning = String::new();
    let mut ab_test = None;
    let mut pairs = vec![];
    // Ranking order of entry indexes, best first.
    let mut order: Vec<usize> = ok.clone();
    if ok.len() >= 2 {
        // Scoring: anonymised labels in random order; the mapping stays here.
        progress(p, 40.0, "scoring", json!({"answers": ok.len()}));
        let mut shuffled = ok.clone();
        shuffled.shuffle(&mut rand::rng());
        let labels: Vec<String> = (0..shuffled.len()).map(label).collect();
        let mut text = format!("Prompt:\n{prompt}\n");
        for (l, &i) in labels.iter().zip(&shuffled) {
            text.push_str(&format!(
                "\n--- Answer {l} ---\n{}\n",
                entries[i].answer.as_deref().unwrap_or("")
            ));
        }
        let judge = LlmStep::new("round table: judge", "judge", JUDGE_SYSTEM, text)
            .attempts(ANSWER_ATTEMPTS);
        let (scores, reasoning) = p
            .llm(judge, |t| Ok((parse_scores(t, &labels)?, vec![])))
            .await
            .map_err(step_error)?;
        total_cost += p.last_step_cost().cost_usd.unwrap_or(0.0);
        judge_reasoning = reasoning;
        for (l, &i) in labels.iter().zip(&shuffled) {
            let s = scores[l].clone();
            entries[i].total_score = s.values().filter_map(Value::as_f64).sum();
            entries[i].scores = s;
        }
        order.sort_by(|&a, &b| {
            entries[b]
                .total_score
                .total_cmp(&entries[a].total_score)
                .then(entries[a].latency_ms.total_cmp(&entries[b].latency_ms))
        });
        pairs = score_pairs(&entries);

        // A/B of the top two, in random order.
        progress(
            p,
            70.0,
            "ab_testing",
            json!({"a": entries[order[0]].provider, "b": entries[order[1]].provider}),
        );
        let mut ab = [order[0], order[1]];
        ab.shuffle(&mut rand::rng());
        let text = format!(
            "Prompt:\n{prompt}\n\n--- Answer A ---\n{}\n\n--- Answer B ---\n{}\n",
            entries[ab[0]].answer.as_deref().unwrap_or(""),
            entries[ab[1]].answer.as_deref().unwrap_or("")
        );
        let step = LlmStep::new("round table: A/B comparison", "ab_judge", AB_SYSTEM, text)
            .attempts(ANSWER_ATTEMPTS);
        let (winner, reasoning) = p
            .llm(step, |t| Ok((parse_ab(t)?, vec![])))
            .await
            .map_err(step_error)?;
        total_cost += p.last_step_cost().cost_usd.unwrap_or(0.0);
        let (a, b) = (&entries[ab[0]].provider, &entries[ab[1]].provider);
        let (score_a, name) = match winner {
            Some(0) => (1.0, a.clone()),
            Some(_) => (0.0, b.clone()),
            None => (0.5, "tie".to_string()),
        };
        pairs.push(json!({"a": a, "b": b, "score_a": score_a, "source": "ab_test"}));
        // The A/B winner ranks first; a tie keeps the scores' order.
        if let Some(w) = winner {
            if ab[w] == order[1] {
                order.swap(0, 1);
            }
        }
        ab_test = Some(AbTest {
            a: a.clone(),
            b: b.clone(),
            winner: name,
            reasoning,
        });
    }
    // Failed entries rank after every answer, in the order they were listed.
    order.extend((0..entries.len()).filter(|i| entries[*i].status != "ok"));
    for (rank, &i) in order.iter().enumerate() {
        entries[i].rank = rank as u32 + 1;
    }
    let ranked: Vec<EntryView> = order.iter().map(|&i| entries[i].clone()).collect();
    let winner = ranked.first().cloned();
    let w = winner.as_ref().expect("an answer exists");
    let why = ab_test
        .as_ref()
        .map(|a| a.reasoning.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| judge_reasoning.clone());
    p.system(format!(
        "Round table won by {} ({} answered of {})",
        w.provider,
        ok.len(),
        ranked.len()
    ));
    progress(
        p,
        100.0,
        "completed",
        json!({"winner": w.provider, "reasoning": why}),
    );
    let view = CompetitionView {
        id: job_id.to_string(),
        prompt: prompt.to_string(),
        task_id,
        stage: "completed".into(),
        winner,
        entries: ranked,
        ab_test,
        total_cost_usd: total_cost,
        duration_ms: Some(t.elapsed().as_secs_f64() * 1000.0),
        error: None,
        created_at,
        completed_at: Some(now()),
    };
    Ok((
        view,
        json!({"pairs": pairs, "judge_reasoning": judge_reasoning, "reasoning": why}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_and_majorities_are_read() {
        assert_eq!(final_answer("1. think\nAnswer: $24"), "$24");
        assert_eq!(final_answer("Thought: x\nFinal Answer: **Paris**"), "Paris");
        assert_eq!(final_answer("  just this  "), "just this");
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            majority(&v(&["$30", "$24", "$24."])),
            Some(("$24".into(), 2))
        );
        assert_eq!(
            majority(&v(&["a", "b"])),
            Some(("a".into(), 1)),
            "a tie goes to the earliest"
        );
        assert_eq!(majority(&[]), None);
    }

    #[test]
    fn judges_answers_are_checked() {
        let labels = vec!["A".to_string(), "B".to_string()];
        let full = |n: i32| json!({"relevance": n, "accuracy": n, "clarity": n, "completeness": n, "creativity": n});
        let ok = format!(
            "```json\n{}\n```",
            json!({"scores": {"A": full(7), "B": full(3)}, "reasoning": "A"})
        );
        let (s, why) = parse_scores(&ok, &labels).unwrap();
        assert_eq!(s["A"]["clarity"], 7.0);
        assert_eq!(why, "A");
        let missing = format!("```json\n{}\n```", json!({"scores": {"A": full(7)}}));
        assert!(parse_scores(&missing, &labels)
            .unwrap_err()
            .contains("Answer B"));
        let high = format!(
            "```json\n{}\n```",
            json!({"scores": {"A": full(11), "B": full(1)}})
        );
        assert!(parse_scores(&high, &labels)
            .unwrap_err()
            .contains("0 to 10"));
        assert!(parse_scores("no json", &labels).is_err());
        assert_eq!(
            parse_ab("```json\n{\"winner\": \"b\", \"reasoning\": \"r\"}\n```").unwrap(),
            (Some(1), "r".into())
        );
        assert_eq!(
            parse_ab("```json\n{\"winner\": \"tie\"}\n```").unwrap().0,
            None
        );
        assert!(parse_ab("```json\n{\"winner\": \"C\"}\n```").is_err());
        assert_eq!(
            (label(0), label(25), label(26)),
            ("A".into(), "Z".into(), "A2".into())
        );
    }

    #[test]
    fn learning_answers_are_checked() {
        let (i, c) = parse_learning(
            "```json\n{\"instructions\": \"new\", \"changes\": [\"a\", {\"b\": 1}]}\n```",
        )
        .unwrap();
        assert_eq!((i.as_str(), c.len()), ("new", 2));
        assert!(
            parse_learning("```json\n{\"instructions\": \" \", \"changes\": []}\n```").is_err()
        );
        assert!(parse_learning("```json\n{\"instructions\": \"x\"}\n```").is_err());
    }
}
