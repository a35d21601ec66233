//! Seed 002's agent dashboard: agents, tasks, the LLM round table, the 3D pipeline, monitoring,
//! and the five broadcast channels' messages. Every shape here is a view of the one core: jobs
//! (kinds `agent_task`, `agent_learn`, `round_table`, `pipeline_3d`), their event logs (`progress`
//! events, node events, the finished `result`) and the rows their rooms write.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::status::JobStatus;

pub const DEFAULT_TASK_LIMIT: u32 = 20;
pub const MAX_TASK_LIMIT: u32 = 100;
pub const MAX_TASK_PROMPT_CHARS: usize = 20_000;
pub const MAX_PARAMETERS_BYTES: usize = 16 * 1024;
/// The largest message a channel sends or takes.
pub const MAX_CHANNEL_MESSAGE_BYTES: usize = 64 * 1024;
/// Close code of a socket opened on a channel that does not exist.
pub const UNKNOWN_CHANNEL_CLOSE: u16 = 4004;
/// The five channels (`/api/ws/<name>`).
pub const CHANNELS: [&str; 5] = ["agents", "round_table", "tasks", "3d_pipeline", "metrics"];
/// Seconds between `metrics_update`s on the metrics channel.
pub const METRICS_INTERVAL_SECS: u64 = 5;
/// Seconds of silence after which a channel sends `keepalive`.
pub const KEEPALIVE_SECS: u64 = 25;

/// Seed 002's status of a task: `pending → running → completed | failed` (and `cancelled`).
pub fn task_status(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Collecting | JobStatus::Queued => "pending",
        JobStatus::Running => "running",
        JobStatus::Completed => "completed",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

/// An agent's live status (seed 002).
pub const AGENT_STATUSES: [&str; 6] = ["idle", "running", "completed", "error", "learning", "stopped"];

/// A prompting technique an agent uses (`technique_used`).
pub const TECHNIQUES: [&str; 5] = ["chain_of_thought", "few_shot", "react", "self_consistency", "zero_shot"];

/// Statistics computed from an agent's real tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStats {
    pub tasks_completed: u64,
    /// Completed / (completed + failed); 0 with no finished task.
    pub success_rate: f64,
    pub avg_latency_ms: f64,
    pub total_cost_usd: f64,
    pub learning_cycles: u64,
}

/// An agent definition with its live status (`GET /api/v1/agents`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    /// `<type>-001`.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub description: String,
    pub status: String,
    pub capabilities: Vec<String>,
    pub tools: Vec<Value>,
    pub ml_models: Vec<String>,
    /// The LLM role its tasks use (`[llm.roles]` on runners), e.g. `agent.commerce`.
    pub model: String,
    pub technique: String,
    /// The instructions its tasks run with; learning cycles change them.
    pub instructions: String,
    pub stats: AgentStats,
}

/// `POST /api/v1/agents/{type}/execute` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecuteRequest {
    pub task: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub use_round_table: bool,
}

/// Answer of `execute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecuteAnswer {
    pub task_id: String,
    pub agent_type: String,
    /// `started`.
    pub status: String,
    pub result: Option<Value>,
    /// How long the request took to accept the task.
    pub latency_ms: f64,
    pub technique_used: String,
}

/// `POST /api/v1/tasks` body (camelCase, as documented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitTask {
    pub agent_type: String,
    pub prompt: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub use_round_table: bool,
}

/// Checks a task's prompt and parameters (execute and submit alike).
pub fn check_task(prompt: &str, parameters: &Map<String, Value>) -> Result<(), String> {
    if prompt.trim().is_empty() {
        return Err("the task's prompt may not be blank".into());
    }
    let n = prompt.chars().count();
    if n > MAX_TASK_PROMPT_CHARS {
        return Err(format!("the task's prompt is {n} characters; at most {MAX_TASK_PROMPT_CHARS} are allowed"));
    }
    if serde_json::to_vec(parameters).map(|v| v.len()).unwrap_or(usize::MAX) > MAX_PARAMETERS_BYTES {
        return Err(format!("parameters are over {MAX_PARAMETERS_BYTES} bytes"));
    }
    Ok(())
}

/// A task's timings and spend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskMetrics {
    pub start_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
}

/// A task (`/api/v1/tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    pub task_id: String,
    pub agent_type: String,
    pub prompt: String,
    /// [`task_status`].
    pub status: String,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: String,
    pub metrics: TaskMetrics,
    /// 0–100, as the running step reported it.
    pub progress: f64,
    #[serde(default)]
    pub use_round_table: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub competition_id: Option<String>,
}

/// `POST /api/v1/round-table/compete` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompeteRequest {
    pub prompt: String,
    #[serde(default)]
    pub task_id: Option<String>,
    /// Provider names; `None`: every enabled provider.
    #[serde(default)]
    pub providers: Option<Vec<String>>,
}

/// Stages of a competition (`competition_update`).
pub const COMPETITION_STAGES: [&str; 5] = ["generating", "scoring", "ab_testing", "completed", "failed"];

/// One provider's entry in a competition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntryView {
    pub provider: String,
    pub model: String,
    /// `ok`, `failed` or `timeout`.
    pub status: String,
    pub answer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Rubric criterion → score (0–10).
    pub scores: Map<String, Value>,
    pub total_score: f64,
    /// 1 for the winner; failed entries rank last.
    pub rank: u32,
    pub latency_ms: f64,
    pub cost_usd: f64,
}

/// The A/B comparison of the top two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AbTest {
    pub a: String,
    pub b: String,
    pub winner: String,
    pub reasoning: String,
}

/// A competition (`/api/v1/round-table/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompetitionView {
    pub id: String,
    pub prompt: String,
    pub task_id: Option<String>,
    pub stage: String,
    pub winner: Option<EntryView>,
    pub entries: Vec<EntryView>,
    pub ab_test: Option<AbTest>,
    pub total_cost_usd: f64,
    pub duration_ms: Option<f64>,
    pub error: Option<String>,
    pub created_at: String,
    pub completed_at: Option<String>,
}

/// `GET /api/v1/round-table/providers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderView {
    pub name: String,
    pub display_name: String,
    pub model: String,
    pub enabled: bool,
}

/// Per provider in `GET /api/v1/round-table/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderStats {
    pub provider: String,
    pub participations: u64,
    pub wins: u64,
    /// wins / participations.
    pub win_rate: f64,
    pub mean_score: f64,
    pub p50_latency_ms: f64,
    pub total_cost_usd: f64,
    /// Elo from every pairwise result (start 1500, K 32).
    pub rating: f64,
}

/// Elo update of one pairwise result: `(new a, new b)`; `score_a` 1 (a won), 0.5 or 0.
pub fn elo(a: f64, b: f64, score_a: f64, k: f64) -> (f64, f64) {
    let expect_a = 1.0 / (1.0 + 10f64.powf((b - a) / 400.0));
    let delta = k * (score_a - expect_a);
    (a + delta, b - delta)
}

/// `POST /api/v1/3d` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Create3d {
    pub prompt: String,
    /// `glb` (the only format validated).
    #[serde(default = "glb")]
    pub format: String,
    /// The most triangles the model may have.
    #[serde(default = "default_max_faces")]
    pub max_faces: u32,
    /// The largest texture side in pixels.
    #[serde(default = "default_max_texture")]
    pub max_texture_size: u32,
}

fn glb() -> String {
    "glb".into()
}
fn default_max_faces() -> u32 {
    50_000
}
fn default_max_texture() -> u32 {
    2048
}

/// Stages of a 3D pipeline (`pipeline_update`).
pub const PIPELINE_STAGES: [&str; 6] = ["pending", "generating", "validating", "uploading", "completed", "failed"];

/// What validation found in a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidationReport {
    pub valid: bool,
    pub triangles: u64,
    pub max_faces: u32,
    pub meshes: u32,
    pub textures: u32,
    /// `[width, height]` of each image.
    pub images: Vec<[u32; 2]>,
    pub problems: Vec<String>,
}

/// A 3D pipeline (`/api/v1/3d/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Pipeline3dView {
    pub id: String,
    pub prompt: String,
    pub format: String,
    pub stage: String,
    pub progress: f64,
    pub report: Option<ValidationReport>,
    /// Served by the edge from R2.
    pub asset_url: Option<String>,
    pub wordpress_media_id: Option<u64>,
    pub wordpress_url: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// `{"type": "ping"}` and `{"type": "subscribe", "filters": {...}}`, what a channel takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChannelClientMessage {
    Ping,
    Subscribe {
        #[serde(default)]
        filters: Map<String, Value>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elo_moves_toward_the_winner_and_keeps_the_sum() {
        let (a, b) = elo(1500.0, 1500.0, 1.0, 32.0);
        assert!((a - 1516.0).abs() < 1e-9 && (b - 1484.0).abs() < 1e-9);
        let (a, b) = elo(1600.0, 1400.0, 0.5, 32.0);
        assert!(a < 1600.0 && b > 1400.0);
        assert!((a + b - 3000.0).abs() < 1e-9);
    }

    #[test]
    fn tasks_are_checked() {
        assert!(check_task("price it", &Map::new()).is_ok());
        assert!(check_task(" ", &Map::new()).is_err());
        assert!(check_task(&"x".repeat(MAX_TASK_PROMPT_CHARS + 1), &Map::new()).is_err());
        let mut big = Map::new();
        big.insert("x".into(), Value::String("y".repeat(MAX_PARAMETERS_BYTES)));
        assert!(check_task("ok", &big).is_err());
        assert_eq!(task_status(JobStatus::Queued), "pending");
    }

    #[test]
    fn channel_messages_parse() {
        let m: ChannelClientMessage = serde_json::from_str(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(m, ChannelClientMessage::Ping);
        let m: ChannelClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","filters":{"agent_type":"commerce"}}"#).unwrap();
        assert!(matches!(m, ChannelClientMessage::Subscribe { filters } if filters["agent_type"] == "commerce"));
        let c: Create3d = serde_json::from_str(r#"{"prompt":"a ring"}"#).unwrap();
        assert_eq!((c.format.as_str(), c.max_faces, c.max_texture_size), ("glb", 50_000, 2048));
    }
}
