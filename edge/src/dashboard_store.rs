//! Storage of seed 002's agent dashboard (`/api/v1/*`): the D1 rows its REST face reads and the
//! job rooms of its kinds write (agents with their seeded defaults; tasks and learning cycles as
//! jobs with `agent_type`, `progress` and `result`; competitions and their pairwise results;
//! 3D pipelines), their seed 002 views, agent status and stats and the providers' Elo computed
//! from rows, and the channel messages a room publishes. Pure and natively tested, but the D1
//! statements and the room's hook (wasm32 only).

use std::collections::BTreeMap;

use kiln_schemas::dashboard::{
    elo, task_status, AgentStats, AgentView, CompetitionView, EntryView, Pipeline3dView, ProviderStats, TaskMetrics, TaskView,
    ValidationReport, DEFAULT_TASK_LIMIT, MAX_TASK_LIMIT,
};
use kiln_schemas::runner::{DashboardParams, UsageTotals};
use kiln_schemas::status::JobStatus;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Elo's start and K factor.
pub const ELO_START: f64 = 1500.0;
pub const ELO_K: f64 = 32.0;
/// Recent failed and slow tasks a learning cycle reviews.
pub const LEARN_RECENT: usize = 20;
/// A task counts as slow past this (a learning cycle reviews it).
pub const SLOW_TASK_MS: f64 = 10_000.0;
/// `GET /api/v1/round-table` answers this many by default, at most [`MAX_COMPETITION_LIMIT`].
pub const DEFAULT_COMPETITION_LIMIT: i64 = 20;
pub const MAX_COMPETITION_LIMIT: i64 = 100;
/// The most providers a competition may name.
pub const MAX_PROVIDERS: usize = 12;
/// A 3D model's limits a request may ask for.
pub const MAX_FACES_LIMIT: u32 = 2_000_000;
pub const MAX_TEXTURE_LIMIT: u32 = 8192;

/// An agent's id: `<type>-001`.
pub fn agent_id(kind: &str) -> String {
    format!("{kind}-001")
}

/// An agent's type as a path names it: lower-case letters, digits, `_` and `-`, 1–40 of them.
pub fn valid_agent_type(t: &str) -> bool {
    !t.is_empty() && t.len() <= 40 && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A row of `agents`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRow {
    pub owner: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub description: String,
    /// JSON arrays.
    pub capabilities: String,
    pub tools: String,
    pub ml_models: String,
    pub model: String,
    pub technique: String,
    pub instructions: String,
    pub stopped: i64,
    pub learning_cycles: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// The agents every owner starts with.
pub fn default_agents(owner: &str, now: &str) -> Vec<AgentRow> {
    let agent = |kind: &str, name: &str, description: &str, caps: &[&str], tools: Value, ml: &[&str], technique: &str, instructions: &str| {
        AgentRow {
            owner: owner.to_string(),
            kind: kind.to_string(),
            name: name.to_string(),
            description: description.to_string(),
            capabilities: json!(caps).to_string(),
            tools: tools.to_string(),
            ml_models: json!(ml).to_string(),
            model: format!("agent.{kind}"),
            technique: technique.to_string(),
            instructions: instructions.to_string(),
            stopped: 0,
            learning_cycles: 0,
            created_at: now.to_string(),
            updated_at: now.to_string(),
        }
    };
    let tool = |name: &str, description: &str| json!({"name": name, "description": description});
    vec![
        agent(
            "commerce",
            "Commerce Agent",
            "E-commerce operations: products, pricing, inventory",
            &["product_management", "pricing_optimization", "inventory_planning"],
            json!([tool("product_catalog", "Create and update products"), tool("pricing", "Suggest prices from costs and demand")]),
            &["demand_forecast"],
            "chain_of_thought",
            "You run an online store's catalogue. Answer with concrete product data (names, prices, SKUs, copy) and say which assumptions you made.",
        ),
        agent(
            "marketing",
            "Marketing Agent",
            "Campaigns, copy and audience planning",
            &["campaign_planning", "copywriting", "audience_segmentation"],
            json!([tool("campaign_brief", "Draft a campaign brief"), tool("copy", "Write ad and email copy")]),
            &["audience_segments"],
            "few_shot",
            "You plan marketing campaigns. Give a target audience, channels, a schedule and ready-to-use copy.",
        ),
        agent(
            "support",
            "Support Agent",
            "Customer support answers and ticket triage",
            &["ticket_triage", "customer_replies", "faq_answers"],
            json!([tool("reply", "Draft a reply to a customer"), tool("triage", "Classify and prioritise a ticket")]),
            &["sentiment"],
            "react",
            "You answer customers politely and precisely. Classify the request, then write the reply; escalate what you cannot resolve.",
        ),
        agent(
            "analytics",
            "Analytics Agent",
            "Sales and traffic analysis, reports",
            &["trend_analysis", "reporting", "anomaly_detection"],
            json!([tool("report", "Summarise metrics into a report"), tool("trends", "Find trends and anomalies")]),
            &["anomaly_detector"],
            "self_consistency",
            "You analyse business data. State the figures you used, the trends you see and how confident you are.",
        ),
        agent(
            "content",
            "Content Agent",
            "Articles, product descriptions and SEO",
            &["content_writing", "seo", "editing"],
            json!([tool("article", "Write an article or a page"), tool("seo", "Suggest titles, keywords and metadata")]),
            &[],
            "zero_shot",
            "You write clear, accurate content for an online brand, with a title, a meta description and the body.",
        ),
    ]
}

/// What the owner's jobs say of one agent (one grouped query).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentActivity {
    pub agent_type: String,
    #[serde(default)]
    pub completed: f64,
    #[serde(default)]
    pub failed: f64,
    #[serde(default)]
    pub avg_latency_ms: Option<f64>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    #[serde(default)]
    pub running: f64,
    #[serde(default)]
    pub learning: f64,
    /// The last job of the agent that ended: `<job_type>:<status>`.
    #[serde(default)]
    pub last_end: Option<String>,
}

/// Seed 002's status of an agent: `stopped`, else `learning` while a learning cycle is pending
/// or running, `running` while a task runs, else how its last job ended (`completed`, `error`;
/// `idle` after a learning cycle or a cancel), `idle` with none.
pub fn agent_status(stopped: bool, a: Option<&AgentActivity>) -> &'static str {
    if stopped {
        return "stopped";
    }
    let Some(a) = a else { return "idle" };
    if a.learning > 0.0 {
        return "learning";
    }
    if a.running > 0.0 {
        return "running";
    }
    match a.last_end.as_deref() {
        Some("agent_task:completed") => "completed",
        Some("agent_task:failed") => "error",
        _ => "idle",
    }
}

fn json_list<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    serde_json::from_str(text).unwrap_or_default()
}

impl AgentRow {
    pub fn view(&self, a: Option<&AgentActivity>) -> AgentView {
        let (completed, failed) = a.map_or((0.0, 0.0), |a| (a.completed, a.failed));
        AgentView {
            id: agent_id(&self.kind),
            kind: self.kind.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            status: agent_status(self.stopped != 0, a).to_string(),
            capabilities: json_list(&self.capabilities),
            tools: json_list(&self.tools),
            ml_models: json_list(&self.ml_models),
            model: self.model.clone(),
            technique: self.technique.clone(),
            instructions: self.instructions.clone(),
            stats: AgentStats {
                tasks_completed: completed as u64,
                success_rate: if completed + failed > 0.0 { completed / (completed + failed) } else { 0.0 },
                avg_latency_ms: a.and_then(|a| a.avg_latency_ms).unwrap_or(0.0),
                total_cost_usd: a.and_then(|a| a.cost_usd).unwrap_or(0.0),
                learning_cycles: self.learning_cycles.max(0) as u64,
            },
        }
    }

    /// An agent_task's inputs as the agent is now.
    pub fn task_params(&self, parameters: &Map<String, Value>, use_round_table: bool) -> DashboardParams {
        DashboardParams::AgentTask {
            agent_type: self.kind.clone(),
            model_role: self.model.clone(),
            technique: self.technique.clone(),
            instructions: self.instructions.clone(),
            parameters: Value::Object(parameters.clone()),
            use_round_table,
        }
    }
}

/// A job's `params` for a dashboard kind: its inputs under `dashboard`.
pub fn job_params(p: &DashboardParams) -> String {
    json!({ "dashboard": p }).to_string()
}

/// A dashboard job's inputs from its row's `params` (the queue's assignment).
pub fn params_of(params: &str) -> Option<DashboardParams> {
    let v: Value = serde_json::from_str(params).ok()?;
    serde_json::from_value(v.get("dashboard")?.clone()).ok()
}

/// Milliseconds between two RFC 3339 times.
pub fn ms_between(from: &str, to: &str) -> Option<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(from).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(to).ok()?;
    Some((b - a).num_milliseconds().max(0) as f64)
}

/// A task's row of `jobs` (an agent_task).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    pub id: String,
    pub owner: String,
    pub status: String,
    pub prompt: String,
    #[serde(default)]
    pub agent_type: Option<String>,
    #[serde(default)]
    pub params: String,
    #[serde(default)]
    pub progress: f64,
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub usage: Option<String>,
    pub created_at: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub completed_at: Option<String>,
    #[serde(default)]
    pub created_ms: i64,
}

impl TaskRow {
    pub fn core_status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn result_value(&self) -> Option<Value> {
        self.result.as_deref().and_then(|r| serde_json::from_str(r).ok())
    }

    pub fn latency_ms(&self) -> Option<f64> {
        ms_between(self.started_at.as_deref()?, self.completed_at.as_deref()?)
    }

    pub fn view(&self) -> TaskView {
        let status = self.core_status();
        let usage: Option<UsageTotals> = self.usage.as_deref().and_then(|u| serde_json::from_str(u).ok());
        let result = self.result_value();
        let use_round_table = matches!(params_of(&self.params), Some(DashboardParams::AgentTask { use_round_table: true, .. }));
        let competition_id = result.as_ref().and_then(|r| r.get("competition_id")?.as_str().map(str::to_string));
        TaskView {
            task_id: self.id.clone(),
            agent_type: self.agent_type.clone().unwrap_or_default(),
            prompt: self.prompt.clone(),
            status: task_status(status).to_string(),
            result,
            error: self.error_message.clone(),
            created_at: self.created_at.clone(),
            metrics: TaskMetrics {
                start_time: self.started_at.clone().unwrap_or_else(|| self.created_at.clone()),
                end_time: self.completed_at.clone().filter(|_| status.is_terminal()),
                latency_ms: self.latency_ms().filter(|_| status.is_terminal()),
                cost_usd: usage.map(|u| u.cost_usd),
                input_tokens: usage.map(|u| u.input_tokens),
                output_tokens: usage.map(|u| u.output_tokens),
            },
            progress: if status == JobStatus::Completed { 100.0 } else { self.progress },
            use_round_table,
            competition_id,
        }
    }

    /// What a learning cycle reviews of this task.
    pub fn review(&self) -> Value {
        json!({
            "task_id": self.id,
            "prompt": self.prompt,
            "status": task_status(self.core_status()),
            "error": self.error_message,
            "latency_ms": self.latency_ms(),
            "answer": self.result_value().and_then(|r| r.get("answer").cloned()),
        })
    }
}

/// The tasks a learning cycle reviews: failed ones and slow completed ones, newest first.
pub fn learn_recent(rows: &[TaskRow]) -> Vec<Value> {
    rows.iter()
        .filter(|r| match r.core_status() {
            JobStatus::Failed => true,
            JobStatus::Completed => r.latency_ms().is_some_and(|l| l > SLOW_TASK_MS),
            _ => false,
        })
        .take(LEARN_RECENT)
        .map(TaskRow::review)
        .collect()
}

/// `GET /api/v1/tasks`'s filters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskFilter {
    pub limit: i64,
    pub agent_type: Option<String>,
    /// The core statuses a seed 002 status stands for.
    pub statuses: Option<Vec<&'static str>>,
}

/// Reads `?limit=` (1–100, default 20), `?agent_type=` and `?status=` (pending, running,
/// completed, failed, cancelled); other parameters are ignored.
pub fn parse_task_filter<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<TaskFilter, String> {
    let mut f = TaskFilter { limit: DEFAULT_TASK_LIMIT as i64, ..Default::default() };
    for (k, v) in pairs {
        match k {
            "limit" => {
                f.limit = v
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_TASK_LIMIT as i64).contains(n))
                    .ok_or_else(|| format!("limit must be a number from 1 to {MAX_TASK_LIMIT}"))?
            }
            "agent_type" => {
                if !valid_agent_type(v) {
                    return Err("agent_type must be an agent's type (lower-case letters, digits, _ and -)".into());
                }
                f.agent_type = Some(v.to_string())
            }
            "status" => {
                f.statuses = Some(match v {
                    "pending" => vec!["collecting", "queued"],
                    "running" => vec!["running"],
                    "completed" => vec!["completed"],
                    "failed" => vec!["failed"],
                    "cancelled" => vec!["cancelled"],
                    _ => return Err("status must be one of pending, running, completed, failed, cancelled".into()),
                })
            }
            _ => {}
        }
    }
    Ok(f)
}

/// `?limit=` (1–100, default 20) and `?offset=` (from 0) of the competitions list.
pub fn parse_page<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<(i64, i64), String> {
    let (mut limit, mut offset) = (DEFAULT_COMPETITION_LIMIT, 0);
    for (k, v) in pairs {
        match k {
            "limit" => {
                limit = v
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_COMPETITION_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit must be a number from 1 to {MAX_COMPETITION_LIMIT}"))?
            }
            "offset" => {
                offset = v.trim().parse::<i64>().ok().filter(|n| *n >= 0).ok_or("offset must be a whole number from 0")?
            }
            _ => {}
        }
    }
    Ok((limit, offset))
}

/// Checks a competition's provider list: 1–12 distinct names of at most 200 characters.
pub fn check_providers(p: &Option<Vec<String>>) -> Result<(), String> {
    let Some(list) = p else { return Ok(()) };
    if list.is_empty() || list.len() > MAX_PROVIDERS {
        return Err(format!("providers must name 1 to {MAX_PROVIDERS} providers, or be null for every enabled one"));
    }
    let mut seen = std::collections::HashSet::new();
    for name in list {
        if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err("a provider's name must be 1 to 200 printable characters".into());
        }
        if !seen.insert(name.as_str()) {
            return Err(format!("provider {name} is named twice"));
        }
    }
    Ok(())
}

/// A row of `competitions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompetitionRow {
    pub id: String,
    pub owner: String,
    #[serde(default)]
    pub task_id: Option<String>,
    pub prompt: String,
    pub stage: String,
    #[serde(default)]
    pub result: Option<String>,
    pub created_at: String,
    #[serde(default)]
    pub completed_at: Option<String>,
    pub created_ms: i64,
}

impl CompetitionRow {
    /// The competition as it stands: its full result once it ended, else its stage.
    pub fn view(&self) -> CompetitionView {
        let stored: Option<CompetitionView> = self.result.as_deref().and_then(|r| serde_json::from_str(r).ok());
        let mut v = stored.unwrap_or_else(|| CompetitionView {
            id: String::new(),
            prompt: String::new(),
            task_id: None,
            stage: String::new(),
            winner: None,
            entries: vec![],
            ab_test: None,
            total_cost_usd: 0.0,
            duration_ms: None,
            error: None,
            created_at: String::new(),
            completed_at: None,
        });
        // The row is the authority on what the edge knows of it.
        v.id = self.id.clone();
        v.prompt = self.prompt.clone();
        v.task_id = self.task_id.clone();
        v.stage = self.stage.clone();
        v.created_at = self.created_at.clone();
        v.completed_at = self.completed_at.clone();
        v
    }
}

/// A pairwise result: `(a, b, score_a)`.
pub type Pair = (String, String, f64);

/// A competition's final result from its job's `result` (a `CompetitionView` plus `pairs`): the
/// view to store and its pairwise results `(a, b, score_a)`. `None` when unreadable.
pub fn competition_result(result: &Value) -> Option<(CompetitionView, Vec<Pair>)> {
    let mut view = result.clone();
    let pairs = view.as_object_mut()?.remove("pairs").unwrap_or(Value::Null);
    // A task answered through a round table carries it under `competition`.
    if let Some(c) = view.get("competition").cloned() {
        return competition_result(&c).map(|(v, p)| if p.is_empty() { (v, read_pairs(&pairs)) } else { (v, p) });
    }
    let view: CompetitionView = serde_json::from_value(view).ok()?;
    Some((view, read_pairs(&pairs)))
}

fn read_pairs(pairs: &Value) -> Vec<Pair> {
    pairs
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let s = p.get("score_a")?.as_f64()?;
                    (0.0..=1.0).contains(&s).then_some(())?;
                    Some((p.get("a")?.as_str()?.to_string(), p.get("b")?.as_str()?.to_string(), s))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A row of `competition_pairs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRow {
    pub a: String,
    pub b: String,
    pub score_a: f64,
    pub created_ms: i64,
}

fn p50(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

/// Per provider: participations, wins, scores, latencies and cost from the ended competitions'
/// entries, and the Elo rating from every pairwise result in time order. Sorted by rating.
pub fn provider_stats(competitions: &[CompetitionView], pairs: &[PairRow]) -> Vec<ProviderStats> {
    #[derive(Default)]
    struct Acc {
        participations: u64,
        wins: u64,
        scores: Vec<f64>,
        latencies: Vec<f64>,
        cost: f64,
        rating: f64,
    }
    let mut by: BTreeMap<String, Acc> = BTreeMap::new();
    let new = || Acc { rating: ELO_START, ..Default::default() };
    for c in competitions {
        let winner = c.winner.as_ref().map(|w| w.provider.as_str());
        for e in &c.entries {
            let acc = by.entry(e.provider.clone()).or_insert_with(new);
            acc.participations += 1;
            if winner == Some(e.provider.as_str()) {
                acc.wins += 1;
            }
            if e.status == "ok" {
                acc.scores.push(e.total_score);
                acc.latencies.push(e.latency_ms);
            }
            acc.cost += e.cost_usd;
        }
    }
    let mut ordered: Vec<&PairRow> = pairs.iter().collect();
    ordered.sort_by_key(|p| p.created_ms);
    for p in ordered {
        if p.a == p.b {
            continue;
        }
        let ra = by.entry(p.a.clone()).or_insert_with(new).rating;
        let rb = by.entry(p.b.clone()).or_insert_with(new).rating;
        let (na, nb) = elo(ra, rb, p.score_a, ELO_K);
        by.get_mut(&p.a).unwrap().rating = na;
        by.get_mut(&p.b).unwrap().rating = nb;
    }
    let mut out: Vec<ProviderStats> = by
        .into_iter()
        .map(|(provider, a)| ProviderStats {
            provider,
            participations: a.participations,
            wins: a.wins,
            win_rate: if a.participations > 0 { a.wins as f64 / a.participations as f64 } else { 0.0 },
            mean_score: if a.scores.is_empty() { 0.0 } else { a.scores.iter().sum::<f64>() / a.scores.len() as f64 },
            p50_latency_ms: p50(a.latencies),
            total_cost_usd: a.cost,
            rating: a.rating,
        })
        .collect();
    out.sort_by(|a, b| b.rating.total_cmp(&a.rating).then_with(|| a.provider.cmp(&b.provider)));
    out
}

/// A row of `pipelines_3d`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineRow {
    pub id: String,
    pub owner: String,
    pub prompt: String,
    pub format: String,
    pub max_faces: i64,
    pub max_texture_size: i64,
    pub stage: String,
    #[serde(default)]
    pub progress: f64,
    #[serde(default)]
    pub report: Option<String>,
    #[serde(default)]
    pub asset_key: Option<String>,
    #[serde(default)]
    pub wordpress_media_id: Option<i64>,
    #[serde(default)]
    pub wordpress_url: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_ms: i64,
}

/// Where the edge serves a pipeline's model.
pub fn asset_path(id: &str) -> String {
    format!("/api/v1/3d/{id}/asset")
}

/// The R2 prefix of a job's artifacts.
pub fn artifact_prefix(job_id: &str) -> String {
    format!("artifacts/{job_id}/")
}

impl PipelineRow {
    pub fn view(&self) -> Pipeline3dView {
        Pipeline3dView {
            id: self.id.clone(),
            prompt: self.prompt.clone(),
            format: self.format.clone(),
            stage: self.stage.clone(),
            progress: self.progress,
            report: self.report.as_deref().and_then(|r| serde_json::from_str::<ValidationReport>(r).ok()),
            asset_url: self.asset_key.as_ref().map(|_| asset_path(&self.id)),
            wordpress_media_id: self.wordpress_media_id.and_then(|n| u64::try_from(n).ok()),
            wordpress_url: self.wordpress_url.clone(),
            error: self.error.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// A pipeline's stage a progress event may set (the end stages are the job's status).
pub fn pipeline_progress_stage(stage: Option<&str>) -> Option<&str> {
    stage.filter(|s| matches!(*s, "generating" | "validating" | "uploading"))
}

/// A competition's stage a progress event may set.
pub fn competition_progress_stage(stage: Option<&str>) -> Option<&str> {
    stage.filter(|s| matches!(*s, "generating" | "scoring" | "ab_testing"))
}

/// The first 80 characters of a prompt.
pub fn preview(prompt: &str) -> String {
    let mut s: String = prompt.chars().take(80).collect();
    if prompt.chars().count() > 80 {
        s.push('…');
    }
    s
}

/// `task_update` (channel `tasks`).
pub fn task_update(task_id: &str, agent_type: &str, status: JobStatus, progress: f64, extra: Value, ts: &str) -> Value {
    let mut data = json!({"agent_id": agent_id(agent_type), "agent_type": agent_type});
    if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    json!({"type": "task_update", "task_id": task_id, "status": task_status(status), "progress": progress, "data": data, "timestamp": ts})
}

/// `agent_status_update` (channel `agents`).
pub fn agent_status_update(agent_type: &str, status: &str, data: Value, ts: &str) -> Value {
    let mut d = json!({"agent_type": agent_type});
    if let (Some(m), Some(e)) = (d.as_object_mut(), data.as_object()) {
        m.extend(e.clone());
    }
    json!({"type": "agent_status_update", "agent_id": agent_id(agent_type), "status": status, "data": d, "timestamp": ts})
}

/// `competition_update` (channel `round_table`).
pub fn competition_update(id: &str, stage: &str, data: Value, ts: &str) -> Value {
    json!({"type": "competition_update", "competition_id": id, "stage": stage, "data": data, "timestamp": ts})
}

/// `pipeline_update` (channel `3d_pipeline`).
pub fn pipeline_update(id: &str, stage: &str, progress: f64, data: Value, ts: &str) -> Value {
    json!({"type": "pipeline_update", "pipeline_id": id, "stage": stage, "progress": progress, "data": data, "timestamp": ts})
}

/// `error` (any channel).
pub fn error_message(message: &str, ts: &str) -> Value {
    json!({"type": "error", "error_type": "error", "message": message, "timestamp": ts})
}

/// The status an agent shows when a job of it ends.
pub fn agent_status_at_end(learn: bool, status: JobStatus) -> &'static str {
    match (learn, status) {
        (false, JobStatus::Completed) => "completed",
        (false, JobStatus::Failed) => "error",
        _ => "idle",
    }
}

/// What a learning cycle's result says: the new instructions (non-blank, at most 20 000
/// characters) and its changes.
pub fn learned(result: Option<&Value>) -> Option<(String, Value)> {
    let r = result?;
    let text = r.get("instructions")?.as_str()?.trim();
    if text.is_empty() || text.chars().count() > 20_000 {
        return None;
    }
    Some((text.to_string(), r.get("changes").cloned().unwrap_or(json!([]))))
}

/// The winner entry of a finished competition (rank 1), for messages.
pub fn winner_of(v: &CompetitionView) -> Option<&EntryView> {
    v.winner.as_ref().or_else(|| v.entries.iter().find(|e| e.rank == 1))
}

#[cfg(target_arch = "wasm32")]
pub use d1::*;

#[cfg(target_arch = "wasm32")]
mod d1 {
    use serde::Deserialize;
    use wasm_bindgen::JsValue;
    use worker::D1Database;

    use super::*;
    use crate::http::ApiResult;
    use crate::store::{n, opt, s};

    /// The owner's agents, seeded with the defaults on first use.
    pub async fn agents(db: &D1Database, owner: &str, now: &str) -> ApiResult<Vec<AgentRow>> {
        let rows = list_agents(db, owner).await?;
        if !rows.is_empty() {
            return Ok(rows);
        }
        let stmts = default_agents(owner, now)
            .iter()
            .map(|a| {
                db.prepare(
                    "INSERT OR IGNORE INTO agents (owner, type, name, description, capabilities, tools, ml_models, model,
                       technique, instructions, stopped, learning_cycles, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, 0, ?11, ?11)",
                )
                .bind(&[
                    s(&a.owner),
                    s(&a.kind),
                    s(&a.name),
                    s(&a.description),
                    s(&a.capabilities),
                    s(&a.tools),
                    s(&a.ml_models),
                    s(&a.model),
                    s(&a.technique),
                    s(&a.instructions),
                    s(now),
                ])
            })
            .collect::<worker::Result<Vec<_>>>()?;
        db.batch(stmts).await?;
        list_agents(db, owner).await
    }

    async fn list_agents(db: &D1Database, owner: &str) -> ApiResult<Vec<AgentRow>> {
        Ok(db.prepare("SELECT * FROM agents WHERE owner = ?1 ORDER BY type").bind(&[s(owner)])?.all().await?.results()?)
    }

    /// One agent (the defaults seeded first when the owner has none).
    pub async fn agent(db: &D1Database, owner: &str, kind: &str, now: &str) -> ApiResult<Option<AgentRow>> {
        Ok(agents(db, owner, now).await?.into_iter().find(|a| a.kind == kind))
    }

    pub async fn set_stopped(db: &D1Database, owner: &str, kind: &str, stopped: bool, now: &str) -> ApiResult<()> {
        db.prepare("UPDATE agents SET stopped = ?3, updated_at = ?4 WHERE owner = ?1 AND type = ?2")
            .bind(&[s(owner), s(kind), n(stopped as i64), s(now)])?
            .run()
            .await?;
        Ok(())
    }

    /// A learning cycle's new instructions.
    pub async fn set_instructions(db: &D1Database, owner: &str, kind: &str, instructions: &str, now: &str) -> ApiResult<()> {
        db.prepare(
            "UPDATE agents SET instructions = ?3, learning_cycles = learning_cycles + 1, updated_at = ?4 WHERE owner = ?1 AND type = ?2",
        )
        .bind(&[s(owner), s(kind), s(instructions), s(now)])?
        .run()
        .await?;
        Ok(())
    }

    const ACTIVITY: &str = "SELECT j.agent_type AS agent_type,
           SUM(j.job_type = 'agent_task' AND j.status = 'completed') AS completed,
           SUM(j.job_type = 'agent_task' AND j.status = 'failed') AS failed,
           AVG(CASE WHEN j.job_type = 'agent_task' AND j.status = 'completed'
                    THEN (julianday(j.completed_at) - julianday(j.started_at)) * 86400000.0 END) AS avg_latency_ms,
           SUM(CASE WHEN j.job_type = 'agent_task' THEN COALESCE(json_extract(j.usage, '$.cost_usd'), 0) ELSE 0 END) AS cost_usd,
           SUM(j.job_type = 'agent_task' AND j.status = 'running') AS running,
           SUM(j.job_type = 'agent_learn' AND j.status IN ('queued', 'running')) AS learning,
           (SELECT e.job_type || ':' || e.status FROM jobs e
             WHERE e.owner = j.owner AND e.agent_type = j.agent_type AND e.status IN ('completed', 'failed', 'cancelled')
             ORDER BY e.completed_at DESC, e.created_ms DESC LIMIT 1) AS last_end
         FROM jobs j WHERE j.owner = ?1 AND j.agent_type IS NOT NULL";

    /// What the owner's jobs say of each agent.
    pub async fn activity(db: &D1Database, owner: &str, kind: Option<&str>) -> ApiResult<Vec<AgentActivity>> {
        let (sql, args) = match kind {
            Some(k) => (format!("{ACTIVITY} AND j.agent_type = ?2 GROUP BY j.agent_type"), vec![s(owner), s(k)]),
            None => (format!("{ACTIVITY} GROUP BY j.agent_type"), vec![s(owner)]),
        };
        Ok(db.prepare(sql).bind(&args)?.all().await?.results()?)
    }

    /// Whether a learning cycle of the agent is pending or running.
    pub async fn learning(db: &D1Database, owner: &str, kind: &str) -> ApiResult<bool> {
        #[derive(Deserialize)]
        struct Row {
            #[allow(dead_code)]
            id: String,
        }
        let row = db
            .prepare(
                "SELECT id FROM jobs WHERE owner = ?1 AND agent_type = ?2 AND job_type = 'agent_learn'
                   AND status IN ('collecting', 'queued', 'running') LIMIT 1",
            )
            .bind(&[s(owner), s(kind)])?
            .first::<Row>(None)
            .await?;
        Ok(row.is_some())
    }

    const TASK_SELECT: &str = "SELECT id, owner, status, prompt, agent_type, params, progress, result, error_message, usage,
           created_at, started_at, completed_at, created_ms FROM jobs";

    /// A task (an agent_task job) of `owner`.
    pub async fn task(db: &D1Database, owner: &str, id: &str) -> ApiResult<Option<TaskRow>> {
        Ok(db
            .prepare(format!("{TASK_SELECT} WHERE id = ?1 AND owner = ?2 AND job_type = 'agent_task'"))
            .bind(&[s(id), s(owner)])?
            .first::<TaskRow>(None)
            .await?)
    }

    pub async fn tasks(db: &D1Database, owner: &str, f: &TaskFilter) -> ApiResult<Vec<TaskRow>> {
        let mut sql = format!("{TASK_SELECT} WHERE owner = ?1 AND job_type = 'agent_task'");
        let mut args = vec![s(owner)];
        if let Some(t) = &f.agent_type {
            args.push(s(t));
            sql.push_str(&format!(" AND agent_type = ?{}", args.len()));
        }
        if let Some(st) = &f.statuses {
            let marks: Vec<String> = st
                .iter()
                .map(|x| {
                    args.push(s(x));
                    format!("?{}", args.len())
                })
                .collect();
            sql.push_str(&format!(" AND status IN ({})", marks.join(",")));
        }
        args.push(n(f.limit));
        sql.push_str(&format!(" ORDER BY created_ms DESC, id DESC LIMIT ?{}", args.len()));
        Ok(db.prepare(sql).bind(&args)?.all().await?.results()?)
    }

    /// The agent's latest ended tasks (for a learning cycle).
    pub async fn ended_tasks(db: &D1Database, owner: &str, kind: &str) -> ApiResult<Vec<TaskRow>> {
        Ok(db
            .prepare(format!(
                "{TASK_SELECT} WHERE owner = ?1 AND agent_type = ?2 AND job_type = 'agent_task' AND status IN ('completed', 'failed')
                 ORDER BY created_ms DESC LIMIT 200"
            ))
            .bind(&[s(owner), s(kind)])?
            .all()
            .await?
            .results()?)
    }

    /// Sets a new job's agent (its row was just inserted).
    pub async fn set_agent_type(db: &D1Database, id: &str, kind: &str) -> ApiResult<()> {
        db.prepare("UPDATE jobs SET agent_type = ?2 WHERE id = ?1").bind(&[s(id), s(kind)])?.run().await?;
        Ok(())
    }

    pub async fn insert_competition(db: &D1Database, c: &CompetitionRow) -> ApiResult<()> {
        db.prepare(
            "INSERT INTO competitions (id, owner, task_id, prompt, stage, result, created_at, completed_at, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, NULL, ?7)",
        )
        .bind(&[s(&c.id), s(&c.owner), opt(c.task_id.as_deref()), s(&c.prompt), s(&c.stage), s(&c.created_at), n(c.created_ms)])?
        .run()
        .await?;
        Ok(())
    }

    pub async fn competition(db: &D1Database, owner: &str, id: &str) -> ApiResult<Option<CompetitionRow>> {
        Ok(db.prepare("SELECT * FROM competitions WHERE id = ?1 AND owner = ?2").bind(&[s(id), s(owner)])?.first(None).await?)
    }

    pub async fn competitions(db: &D1Database, owner: &str, limit: i64, offset: i64) -> ApiResult<Vec<CompetitionRow>> {
        Ok(db
            .prepare("SELECT * FROM competitions WHERE owner = ?1 ORDER BY created_ms DESC, id DESC LIMIT ?2 OFFSET ?3")
            .bind(&[s(owner), n(limit), n(offset)])?
            .all()
            .await?
            .results()?)
    }

    /// The owner's ended competitions (for provider stats), at most the latest 1000.
    pub async fn completed_competitions(db: &D1Database, owner: &str) -> ApiResult<Vec<CompetitionRow>> {
        Ok(db
            .prepare("SELECT * FROM competitions WHERE owner = ?1 AND stage = 'completed' ORDER BY created_ms DESC LIMIT 1000")
            .bind(&[s(owner)])?
            .all()
            .await?
            .results()?)
    }

    pub async fn pairs(db: &D1Database, owner: &str) -> ApiResult<Vec<PairRow>> {
        Ok(db
            .prepare("SELECT a, b, score_a, created_ms FROM competition_pairs WHERE owner = ?1 ORDER BY created_ms, rowid")
            .bind(&[s(owner)])?
            .all()
            .await?
            .results()?)
    }

    pub async fn insert_pipeline(db: &D1Database, p: &PipelineRow) -> ApiResult<()> {
        db.prepare(
            "INSERT INTO pipelines_3d (id, owner, prompt, format, max_faces, max_texture_size, stage, progress, created_at,
               updated_at, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?8, ?9)",
        )
        .bind(&[
            s(&p.id),
            s(&p.owner),
            s(&p.prompt),
            s(&p.format),
            n(p.max_faces),
            n(p.max_texture_size),
            s(&p.stage),
            s(&p.created_at),
            n(p.created_ms),
        ])?
        .run()
        .await?;
        Ok(())
    }

    pub async fn pipeline(db: &D1Database, owner: &str, id: &str) -> ApiResult<Option<PipelineRow>> {
        Ok(db.prepare("SELECT * FROM pipelines_3d WHERE id = ?1 AND owner = ?2").bind(&[s(id), s(owner)])?.first(None).await?)
    }

    pub async fn pipelines(db: &D1Database, owner: &str, limit: i64, offset: i64) -> ApiResult<Vec<PipelineRow>> {
        Ok(db
            .prepare("SELECT * FROM pipelines_3d WHERE owner = ?1 ORDER BY created_ms DESC, id DESC LIMIT ?2 OFFSET ?3")
            .bind(&[s(owner), n(limit), n(offset)])?
            .all()
            .await?
            .results()?)
    }

    /// The job's agent and prompt, as its row holds them.
    #[derive(Debug, Deserialize)]
    pub struct JobFacts {
        #[serde(default)]
        pub agent_type: Option<String>,
        pub prompt: String,
        #[serde(default)]
        pub started_at: Option<String>,
        #[serde(default)]
        pub progress: f64,
    }

    pub async fn job_facts(db: &D1Database, id: &str) -> ApiResult<Option<JobFacts>> {
        Ok(db.prepare("SELECT agent_type, prompt, started_at, progress FROM jobs WHERE id = ?1").bind(&[s(id)])?.first(None).await?)
    }

    /// A running job's last progress.
    pub async fn set_progress(db: &D1Database, id: &str, percent: f64) -> ApiResult<()> {
        db.prepare("UPDATE jobs SET progress = ?2 WHERE id = ?1").bind(&[s(id), JsValue::from_f64(percent)])?.run().await?;
        Ok(())
    }

    /// An ended job's result (and 100 for a completed one), written before its status copy.
    pub async fn set_result(db: &D1Database, id: &str, result: Option<&Value>, completed: bool) -> ApiResult<()> {
        let text = result.map(|r| r.to_string());
        db.prepare("UPDATE jobs SET result = COALESCE(?2, result), progress = CASE WHEN ?3 = 1 THEN 100 ELSE progress END WHERE id = ?1")
            .bind(&[s(id), opt(text.as_deref()), n(completed as i64)])?
            .run()
            .await?;
        Ok(())
    }

    pub async fn set_competition_stage(db: &D1Database, id: &str, stage: &str) -> ApiResult<()> {
        db.prepare("UPDATE competitions SET stage = ?2 WHERE id = ?1 AND stage NOT IN ('completed', 'failed')")
            .bind(&[s(id), s(stage)])?
            .run()
            .await?;
        Ok(())
    }

    /// A competition's end: its stage, full result and pairwise results (written again whole).
    pub async fn end_competition(
        db: &D1Database,
        id: &str,
        owner: &str,
        stage: &str,
        view: &CompetitionView,
        pairs: &[Pair],
        now_ms: i64,
    ) -> ApiResult<()> {
        let now = crate::time::rfc3339(now_ms);
        let mut stmts = vec![
            db.prepare("UPDATE competitions SET stage = ?2, result = ?3, completed_at = ?4 WHERE id = ?1")
                .bind(&[s(id), s(stage), s(&serde_json::to_string(view)?), s(&now)])?,
            db.prepare("DELETE FROM competition_pairs WHERE competition_id = ?1").bind(&[s(id)])?,
        ];
        for (a, b, score) in pairs {
            stmts.push(
                db.prepare("INSERT INTO competition_pairs (competition_id, owner, a, b, score_a, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                    .bind(&[s(id), s(owner), s(a), s(b), JsValue::from_f64(*score), n(now_ms)])?,
            );
        }
        db.batch(stmts).await?;
        Ok(())
    }

    /// A competition row for a task answered through a round table (created at its end).
    pub async fn insert_competition_if_absent(db: &D1Database, c: &CompetitionRow) -> ApiResult<()> {
        db.prepare(
            "INSERT OR IGNORE INTO competitions (id, owner, task_id, prompt, stage, result, created_at, completed_at, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, NULL, ?7)",
        )
        .bind(&[s(&c.id), s(&c.owner), opt(c.task_id.as_deref()), s(&c.prompt), s(&c.stage), s(&c.created_at), n(c.created_ms)])?
        .run()
        .await?;
        Ok(())
    }

    pub async fn set_pipeline_stage(db: &D1Database, id: &str, stage: &str, progress: f64, now: &str) -> ApiResult<()> {
        db.prepare(
            "UPDATE pipelines_3d SET stage = ?2, progress = ?3, updated_at = ?4 WHERE id = ?1 AND stage NOT IN ('completed', 'failed')",
        )
        .bind(&[s(id), s(stage), JsValue::from_f64(progress), s(now)])?
        .run()
        .await?;
        Ok(())
    }

    /// A pipeline's end: stage, progress, the report, where the asset went, the error.
    #[allow(clippy::too_many_arguments)]
    pub async fn end_pipeline(
        db: &D1Database,
        id: &str,
        stage: &str,
        progress: f64,
        report: Option<&Value>,
        asset_key: Option<&str>,
        wordpress_media_id: Option<i64>,
        wordpress_url: Option<&str>,
        error: Option<&str>,
        now: &str,
    ) -> ApiResult<()> {
        let report = report.map(|r| r.to_string());
        db.prepare(
            "UPDATE pipelines_3d SET stage = ?2, progress = ?3, report = COALESCE(?4, report), asset_key = COALESCE(?5, asset_key),
               wordpress_media_id = COALESCE(?6, wordpress_media_id), wordpress_url = COALESCE(?7, wordpress_url), error = ?8,
               updated_at = ?9 WHERE id = ?1",
        )
        .bind(&[
            s(id),
            s(stage),
            JsValue::from_f64(progress),
            opt(report.as_deref()),
            opt(asset_key),
            wordpress_media_id.map(n).unwrap_or(JsValue::NULL),
            opt(wordpress_url),
            opt(error),
            s(now),
        ])?
        .run()
        .await?;
        Ok(())
    }
}

/// The job room's part for dashboard kinds: one call on each stored batch of events and on each
/// status change copies progress, results and rows to D1 and publishes the channel messages.
#[cfg(target_arch = "wasm32")]
pub mod room {
    use kiln_schemas::events::{EventBody, ServerEvent};
    use kiln_schemas::status::{JobStatus, JobType};
    use serde_json::{json, Value};
    use worker::{D1Database, Env};

    use super::*;
    use crate::env::now_ms;
    use crate::job_room::RoomMeta;
    use crate::time::rfc3339;

    /// What a hook does: its channel messages (none when `live` is off: a repair writes rows
    /// only) and its D1 writes, each of which may fail (`fail`: an injected fault in test builds);
    /// `ok` turns false at the first failed write, and the room then repairs the rows.
    pub struct Out<'a> {
        env: &'a Env,
        owner: &'a str,
        job_id: &'a str,
        live: bool,
        fail: &'a dyn Fn() -> bool,
        ok: std::cell::Cell<bool>,
    }

    impl<'a> Out<'a> {
        pub fn new(env: &'a Env, meta: &'a RoomMeta, live: bool, fail: &'a dyn Fn() -> bool) -> Self {
            Out { env, owner: &meta.owner, job_id: &meta.job_id, live, fail, ok: std::cell::Cell::new(true) }
        }

        /// Whether every D1 write succeeded.
        pub fn ok(&self) -> bool {
            self.ok.get()
        }

        async fn publish(&self, channel: &str, msg: &Value) {
            if !self.live {
                return;
            }
            if let Err(e) = crate::channels::publish(self.env, self.owner, channel, msg).await {
                worker::console_error!("publishing on {channel}: {e:?}");
            }
        }

        fn log<T>(&self, what: &str, r: crate::http::ApiResult<T>) {
            if let Err(e) = r {
                worker::console_error!("job {}: dashboard {what} failed (the room's alarm writes it again): {e:?}", self.job_id);
                self.ok.set(false);
            }
        }

        /// One D1 write (not even started when a fault is injected).
        async fn write<T>(&self, what: &str, w: impl std::future::Future<Output = crate::http::ApiResult<T>>) {
            if (self.fail)() {
                self.log::<()>(what, Err(crate::http::ApiError::Unavailable("injected fault: dashboard row write".into())));
                return;
            }
            self.log(what, w.await);
        }
    }

    /// The progress events of stored events (their JSON texts).
    pub fn progress_of(texts: &[String]) -> Vec<(f64, Option<String>, Value)> {
        texts
            .iter()
            .filter_map(|t| serde_json::from_str::<ServerEvent>(t).ok())
            .filter_map(|e| match e.body {
                EventBody::Progress { percent, stage, data, .. } => Some((percent, stage, data)),
                _ => None,
            })
            .collect()
    }

    /// The rows' copy of a job's last progress (idempotent: the repair writes it again).
    pub async fn write_progress(out: &Out<'_>, db: &D1Database, meta: &RoomMeta, percent: f64, stage: Option<&str>, now: &str) {
        let id = &meta.job_id;
        out.write("progress copy", set_progress(db, id, percent)).await;
        match meta.job_type {
            JobType::RoundTable => {
                if let Some(stage) = competition_progress_stage(stage) {
                    out.write("competition stage", set_competition_stage(db, id, stage)).await;
                }
            }
            JobType::Pipeline3d => {
                if let Some(stage) = pipeline_progress_stage(stage) {
                    out.write("pipeline stage", set_pipeline_stage(db, id, stage, percent, now)).await;
                }
            }
            _ => {}
        }
    }

    /// Stored events of a runner batch: each `progress` is published, the batch's last one
    /// copied to the rows.
    pub async fn on_events(out: &Out<'_>, meta: &RoomMeta, texts: &[String]) {
        let progress = progress_of(texts);
        let Some(last) = progress.last().cloned() else { return };
        let db = match crate::env::db(out.env) {
            Ok(db) => db,
            Err(e) => return out.log("D1 binding", Err::<(), _>(e.into())),
        };
        let id = &meta.job_id;
        let now = rfc3339(now_ms());
        write_progress(out, &db, meta, last.0, last.1.as_deref(), &now).await;
        match meta.job_type {
            JobType::AgentTask => {
                let Ok(Some(facts)) = job_facts(&db, id).await else { return };
                let kind = facts.agent_type.unwrap_or_default();
                for (percent, stage, data) in &progress {
                    let mut extra = json!({ "stage": stage });
                    if let (Some(m), Some(d)) = (extra.as_object_mut(), data.as_object()) {
                        m.extend(d.clone());
                    }
                    out.publish("tasks", &task_update(id, &kind, JobStatus::Running, *percent, extra, &now)).await;
                }
            }
            JobType::RoundTable => {
                for (percent, stage, data) in &progress {
                    if let Some(stage) = competition_progress_stage(stage.as_deref()) {
                        let mut d = json!({ "progress": percent });
                        if let (Some(m), Some(x)) = (d.as_object_mut(), data.as_object()) {
                            m.extend(x.clone());
                        }
                        out.publish("round_table", &competition_update(id, stage, d, &now)).await;
                    }
                }
            }
            JobType::Pipeline3d => {
                for (percent, stage, data) in &progress {
                    if let Some(stage) = pipeline_progress_stage(stage.as_deref()) {
                        out.publish("3d_pipeline", &pipeline_update(id, stage, *percent, data.clone(), &now)).await;
                    }
                }
            }
            _ => {}
        }
    }

    /// A status change of a dashboard job; for an end, called before the status's D1 copy so
    /// that a reader who sees the end sees its result.
    pub async fn on_status(out: &Out<'_>, meta: &RoomMeta, error: Option<&str>, result: Option<&Value>) {
        let env = out.env;
        let db = match crate::env::db(env) {
            Ok(db) => db,
            Err(e) => return out.log("D1 binding", Err::<(), _>(e.into())),
        };
        let id = &meta.job_id;
        let status = meta.status;
        let ended = status.is_terminal();
        let now_ms = now_ms();
        let now = rfc3339(now_ms);
        if ended {
            out.write("result copy", set_result(&db, id, result, status == JobStatus::Completed)).await;
        }
        let facts = match job_facts(&db, id).await {
            Ok(Some(f)) => f,
            other => {
                out.log("job row", other);
                return;
            }
        };
        let kind = facts.agent_type.clone().unwrap_or_default();
        let why = error.map(str::to_string).unwrap_or_else(|| format!("job {}", status.as_str()));
        match meta.job_type {
            JobType::AgentTask => {
                let progress = if status == JobStatus::Completed { 100.0 } else { facts.progress };
                let mut extra = json!({});
                if ended {
                    extra = json!({ "result": result, "error": error });
                }
                out.publish("tasks", &task_update(id, &kind, status, progress, extra, &now)).await;
                let agent = match status {
                    JobStatus::Running => Some("running"),
                    s if s.is_terminal() => Some(agent_status_at_end(false, s)),
                    _ => None,
                };
                if let Some(a) = agent {
                    let data = json!({
                        "task_id": id,
                        "prompt_preview": preview(&facts.prompt),
                        "started_at": facts.started_at.clone().unwrap_or_else(|| now.clone()),
                    });
                    out.publish("agents", &agent_status_update(&kind, a, data, &now)).await;
                }
                if status == JobStatus::Failed {
                    let msg = format!("Agent {} failed: {why}", agent_id(&kind));
                    out.publish("tasks", &error_message(&msg, &now)).await;
                    out.publish("agents", &error_message(&msg, &now)).await;
                }
                // A task answered through a round table carries its competition.
                if status == JobStatus::Completed {
                    if let Some((view, pairs)) = result.and_then(competition_result) {
                        let row = CompetitionRow {
                            id: id.clone(),
                            owner: meta.owner.clone(),
                            task_id: Some(id.clone()),
                            prompt: facts.prompt.clone(),
                            stage: "completed".into(),
                            created_at: now.clone(),
                            created_ms: now_ms,
                            ..Default::default()
                        };
                        out.write("task's competition", insert_competition_if_absent(&db, &row)).await;
                        out.write("task's competition", end_competition(&db, id, &meta.owner, "completed", &view, &pairs, now_ms)).await;
                    }
                }
            }
            JobType::AgentLearn => {
                let mut data = json!({ "task_id": id });
                if status == JobStatus::Completed {
                    match learned(result) {
                        Some((instructions, changes)) => {
                            out.write("new instructions", set_instructions(&db, &meta.owner, &kind, &instructions, &now)).await;
                            data = json!({ "task_id": id, "changes": changes });
                        }
                        None => {
                            let msg = format!("Agent {}: the learning cycle answered no instructions", agent_id(&kind));
                            out.publish("agents", &json!({"type": "error", "error_type": "warning", "message": msg, "timestamp": now})).await;
                        }
                    }
                }
                let a = match status {
                    JobStatus::Running | JobStatus::Queued | JobStatus::Collecting => "learning",
                    _ => "idle",
                };
                out.publish("agents", &agent_status_update(&kind, a, data, &now)).await;
                if status == JobStatus::Failed {
                    let msg = format!("Agent {} learning failed: {why}", agent_id(&kind));
                    out.publish("agents", &error_message(&msg, &now)).await;
                }
            }
            JobType::RoundTable => {
                if !ended {
                    if status == JobStatus::Running {
                        out.publish("round_table", &competition_update(id, "generating", json!({"progress": facts.progress}), &now)).await;
                    }
                    return;
                }
                let parsed = result.and_then(competition_result).filter(|_| status == JobStatus::Completed);
                let (stage, view, pairs) = match parsed {
                    Some((mut v, pairs)) => {
                        v.stage = "completed".into();
                        ("completed", v, pairs)
                    }
                    None => {
                        let mut v = CompetitionRow { id: id.clone(), stage: "failed".into(), ..Default::default() }.view();
                        v.error = Some(if status == JobStatus::Completed { "the round table answered no readable result".into() } else { why.clone() });
                        ("failed", v, vec![])
                    }
                };
                out.write("competition end", end_competition(&db, id, &meta.owner, stage, &view, &pairs, now_ms)).await;
                let data = json!({
                    "winner": winner_of(&view).map(|w| w.provider.clone()),
                    "entries_count": view.entries.len(),
                    "total_cost_usd": view.total_cost_usd,
                    "error": view.error,
                });
                out.publish("round_table", &competition_update(id, stage, data, &now)).await;
                if stage == "failed" {
                    out.publish("round_table", &error_message(&format!("Competition {id} failed: {}", view.error.clone().unwrap_or_default()), &now)).await;
                }
            }
            JobType::Pipeline3d => {
                if !ended {
                    return;
                }
                let r = result.cloned().unwrap_or(Value::Null);
                let report = r.get("report").filter(|v| v.is_object());
                let (stage, progress, err) = match status {
                    JobStatus::Completed => ("completed", 100.0, None),
                    JobStatus::Cancelled => ("failed", facts.progress, Some("cancelled by user".to_string())),
                    _ => ("failed", facts.progress, Some(why.clone())),
                };
                // A failure after the upload to R2 (WordPress's, say) keeps the stored model's URL.
                let asset_key = first_artifact(env, id).await;
                let media = r.get("wordpress_media_id").and_then(Value::as_i64);
                let wp_url = r.get("wordpress_url").and_then(Value::as_str);
                out.write("pipeline end", end_pipeline(&db, id, stage, progress, report, asset_key.as_deref(), media, wp_url, err.as_deref(), &now)).await;
                let data = json!({
                    "prompt": preview(&facts.prompt),
                    "report": report,
                    "asset_url": asset_key.as_ref().map(|_| asset_path(id)),
                    "wordpress_url": wp_url,
                    "error": err,
                });
                out.publish("3d_pipeline", &pipeline_update(id, stage, progress, data, &now)).await;
                if let Some(e) = &err {
                    out.publish("3d_pipeline", &error_message(&format!("3D pipeline {id} failed: {e}"), &now)).await;
                }
            }
            _ => {}
        }
    }

    /// How a dashboard job ended, kept by its room for [`repair`].
    #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
    pub struct End {
        pub error: Option<String>,
        pub result: Option<Value>,
    }

    /// Writes a dashboard job's rows again from its room's state (its last progress event, and
    /// for an ended job how it ended), publishing nothing: every write is idempotent, so a repair
    /// after a failed write leaves the rows as if it had succeeded. Answers whether all succeeded.
    pub async fn repair(env: &Env, meta: &RoomMeta, last: Option<(f64, Option<String>)>, end: Option<&End>, fail: &dyn Fn() -> bool) -> bool {
        let out = Out::new(env, meta, false, fail);
        let db = match crate::env::db(env) {
            Ok(db) => db,
            Err(e) => {
                out.log("D1 binding", Err::<(), _>(e.into()));
                return false;
            }
        };
        if let Some((percent, stage)) = &last {
            write_progress(&out, &db, meta, *percent, stage.as_deref(), &rfc3339(now_ms())).await;
        }
        if meta.status.is_terminal() {
            let end = end.cloned().unwrap_or_default();
            on_status(&out, meta, end.error.as_deref(), end.result.as_ref()).await;
        }
        out.ok()
    }

    /// The key of the first file a job stored under `artifacts/<job_id>/`.
    pub async fn first_artifact(env: &Env, job_id: &str) -> Option<String> {
        let bucket = crate::env::artifacts(env).ok()?;
        let listed = bucket.list().prefix(artifact_prefix(job_id)).limit(10).execute().await.ok()?;
        let mut keys: Vec<String> = listed.objects().iter().map(|o| o.key()).collect();
        keys.sort_by_key(|k| !k.ends_with(".glb"));
        keys.into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_agents() {
        let rows = default_agents("u1", "2026-01-01T00:00:00.000Z");
        assert_eq!(rows.len(), 5);
        for r in &rows {
            assert!(valid_agent_type(&r.kind));
            assert!(kiln_schemas::dashboard::TECHNIQUES.contains(&r.technique.as_str()), "{}", r.technique);
            let v = r.view(None);
            assert_eq!(v.id, format!("{}-001", r.kind));
            assert_eq!(v.status, "idle");
            assert!(!v.capabilities.is_empty() && !v.tools.is_empty());
            assert_eq!(v.model, format!("agent.{}", r.kind));
        }
    }

    #[test]
    fn status_follows_jobs() {
        let a = |running: f64, learning: f64, last: Option<&str>| AgentActivity {
            agent_type: "commerce".into(),
            running,
            learning,
            last_end: last.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(agent_status(true, Some(&a(1.0, 1.0, None))), "stopped");
        assert_eq!(agent_status(false, Some(&a(1.0, 1.0, None))), "learning");
        assert_eq!(agent_status(false, Some(&a(1.0, 0.0, None))), "running");
        assert_eq!(agent_status(false, Some(&a(0.0, 0.0, Some("agent_task:completed")))), "completed");
        assert_eq!(agent_status(false, Some(&a(0.0, 0.0, Some("agent_task:failed")))), "error");
        assert_eq!(agent_status(false, Some(&a(0.0, 0.0, Some("agent_learn:completed")))), "idle");
        assert_eq!(agent_status(false, None), "idle");
        let row = &default_agents("u", "t")[0];
        let mut act = a(0.0, 0.0, None);
        act.completed = 3.0;
        act.failed = 1.0;
        act.avg_latency_ms = Some(250.0);
        let v = row.view(Some(&act));
        assert_eq!((v.stats.tasks_completed, v.stats.success_rate, v.stats.avg_latency_ms), (3, 0.75, 250.0));
    }

    #[test]
    fn task_views_and_filters() {
        let params = job_params(&default_agents("u", "t")[0].task_params(&Map::new(), true));
        assert!(matches!(params_of(&params), Some(DashboardParams::AgentTask { use_round_table: true, .. })));
        let row = TaskRow {
            id: "j1".into(),
            status: "completed".into(),
            prompt: "p".into(),
            agent_type: Some("commerce".into()),
            params,
            progress: 90.0,
            result: Some(r#"{"answer":"a","competition_id":"j1"}"#.into()),
            usage: Some(r#"{"input_tokens":3,"output_tokens":4,"cached_tokens":0,"cost_usd":0.5}"#.into()),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            started_at: Some("2026-01-01T00:00:01.000Z".into()),
            completed_at: Some("2026-01-01T00:00:01.250Z".into()),
            ..Default::default()
        };
        let v = row.view();
        assert_eq!((v.status.as_str(), v.progress, v.metrics.latency_ms), ("completed", 100.0, Some(250.0)));
        assert_eq!((v.metrics.cost_usd, v.competition_id.as_deref(), v.use_round_table), (Some(0.5), Some("j1"), true));
        let f = parse_task_filter([("limit", "5"), ("status", "pending"), ("agent_type", "support")].into_iter()).unwrap();
        assert_eq!((f.limit, f.statuses.unwrap(), f.agent_type.as_deref()), (5, vec!["collecting", "queued"], Some("support")));
        for bad in [("limit", "0"), ("limit", "101"), ("status", "done"), ("agent_type", "A B")] {
            assert!(parse_task_filter([bad].into_iter()).is_err(), "{bad:?}");
        }
        assert_eq!(parse_task_filter(std::iter::empty()).unwrap().limit, 20);
        let mut slow = row.clone();
        slow.completed_at = Some("2026-01-01T00:00:30.000Z".into());
        let mut failed = row.clone();
        failed.status = "failed".into();
        assert_eq!(learn_recent(&[row, slow, failed]).len(), 2);
    }

    fn entry(provider: &str, score: f64, rank: u32) -> EntryView {
        EntryView {
            provider: provider.into(),
            model: "m".into(),
            status: "ok".into(),
            answer: Some("x".into()),
            error: None,
            scores: Map::new(),
            total_score: score,
            rank,
            latency_ms: 100.0 * rank as f64,
            cost_usd: 0.01,
        }
    }

    #[test]
    fn provider_stats_and_elo_in_time_order() {
        let comp = |w: &str, l: &str| {
            let mut v = CompetitionRow { id: "c".into(), stage: "completed".into(), ..Default::default() }.view();
            v.entries = vec![entry(w, 40.0, 1), entry(l, 30.0, 2)];
            v.winner = Some(entry(w, 40.0, 1));
            v
        };
        let comps = vec![comp("a", "b"), comp("a", "b")];
        let pairs = vec![
            PairRow { a: "a".into(), b: "b".into(), score_a: 1.0, created_ms: 1 },
            PairRow { a: "b".into(), b: "a".into(), score_a: 0.0, created_ms: 2 },
        ];
        let st = provider_stats(&comps, &pairs);
        assert_eq!(st[0].provider, "a");
        assert_eq!((st[0].participations, st[0].wins, st[0].win_rate), (2, 2, 1.0));
        let (r1, _) = elo(1500.0, 1500.0, 1.0, 32.0);
        let (r2, _) = elo(r1, 3000.0 - r1, 1.0, 32.0);
        assert!((st[0].rating - r2).abs() < 1e-9 && (st[1].rating - (3000.0 - r2)).abs() < 1e-9);
        assert_eq!((st[1].wins, st[1].mean_score), (0, 30.0));
    }

    #[test]
    fn competition_results_and_pipelines() {
        let mut v = serde_json::to_value(CompetitionRow { id: "c".into(), stage: "completed".into(), ..Default::default() }.view()).unwrap();
        v["pairs"] = json!([{"a": "x", "b": "y", "score_a": 1}, {"a": "x", "b": "y", "score_a": 7}]);
        let (view, pairs) = competition_result(&v).unwrap();
        assert_eq!((view.stage.as_str(), pairs), ("completed", vec![("x".to_string(), "y".to_string(), 1.0)]));
        assert!(competition_result(&json!({"answer": "a"})).is_none());
        assert!(check_providers(&None).is_ok());
        assert!(check_providers(&Some(vec!["a/b".into(), "c/d".into()])).is_ok());
        assert!(check_providers(&Some(vec![])).is_err());
        assert!(check_providers(&Some(vec!["a".into(), "a".into()])).is_err());
        let p = PipelineRow { id: "p".into(), stage: "completed".into(), asset_key: Some("artifacts/p/m.glb".into()), ..Default::default() };
        assert_eq!(p.view().asset_url.as_deref(), Some("/api/v1/3d/p/asset"));
        assert_eq!(pipeline_progress_stage(Some("completed")), None);
        assert_eq!(learned(Some(&json!({"instructions": " new ", "changes": ["x"]}))).unwrap().0, "new");
        assert!(learned(Some(&json!({"instructions": ""}))).is_none());
    }
}
