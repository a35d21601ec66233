//! The runner protocol (`/runner/v1/*`): registration, the runner's outbound WebSocket to its
//! queue, and the idempotent event batches a runner posts for the jobs it holds.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::{Ticket, TicketStatus};
use crate::events::LogStream;
use crate::jobs::{Iteration, RalphParams};
use crate::status::{AppPhase, CompletionReason, JobType};

/// `POST /runner/v1/register` (bearer: the operator's registration token).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RegisterRunnerRequest {
    pub name: String,
}

/// Answer of `POST /runner/v1/register`. The token is shown once; the edge keeps only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RegisterRunnerResponse {
    pub runner_id: String,
    pub token: String,
}

/// A runner's agent CLI and git, as it found them at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RunnerTools {
    /// The agent profile: `claude`, `codex` or `text`.
    pub profile: String,
    /// What the agent CLI's `--version` printed (in the job image, under the Docker executor);
    /// `None` for a `text` agent or a CLI that did not answer.
    pub agent_version: Option<String>,
    /// Whether the agent has credentials for its model: a vendor key or token passed to it, or
    /// the demo model.
    pub agent_authenticated: bool,
    /// The agent talks to Kiln's scripted demo model.
    pub demo_model: bool,
    /// What `git --version` printed on the runner's host.
    pub git_version: Option<String>,
    /// Whether the runner holds a forge token (`GITHUB_TOKEN`) to push over https and open pull
    /// requests.
    pub forge_token: bool,
    /// The providers this runner's round tables use (seed 002's `GET
    /// /api/v1/round-table/providers`); none for a runner without `[llm]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_table: Vec<crate::dashboard::ProviderView>,
}

/// A job a runner holds, with the lease it holds it under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HeldJob {
    pub job_id: String,
    pub lease_id: String,
}

/// Messages a runner sends on `/runner/v1/connect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunnerMessage {
    /// First message after connecting: total capacity (slots) and the jobs still running here (after a
    /// reconnect), whose leases the queue re-attaches to this socket.
    Hello {
        name: String,
        capacity: u32,
        running: Vec<HeldJob>,
        version: String,
        /// What the runner found of its agent CLI and git at start (Kiln's addition: `GET /health`
        /// reports it; runners that predate it send none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tools: Option<RunnerTools>,
    },
    /// Sent every `heartbeat_secs`: renews the leases of the jobs listed.
    Heartbeat { running: Vec<HeldJob> },
    /// The answer to an [`EdgeMessage::Request`].
    Reply { request_id: String, result: Value },
    /// The runner host's load, sent with each heartbeat (Kiln's addition for seed 002's
    /// monitoring; the queue keeps the last one per runner). Runners that predate it send none.
    Load(RunnerLoad),
}

/// A runner host's CPU and memory use (percent, 0–100).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunnerLoad {
    /// CPU busy since the previous report, all cores together.
    pub cpu_percent: f64,
    /// Memory in use (total minus available).
    pub memory_percent: f64,
}

/// A repository a runner is asked to mirror or fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RepoSpec {
    pub github_org: String,
    pub github_repo: String,
}

/// The per-repository outcome of a sync or clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RepoResult {
    pub repo: String,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An edge-to-runner request that expects a [`RunnerMessage::Reply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RunnerRequest {
    /// `git fetch` every listed mirror (`POST /sync`); reply: `Vec<RepoResult>`.
    Sync { repos: Vec<RepoSpec> },
    /// Create (or refresh) the bare mirror of every listed repository; reply: `Vec<RepoResult>`.
    Clone { repos: Vec<RepoSpec> },
    /// One turn of an app build's requirements gatherer (an LLM step that holds no job slot);
    /// reply: [`GatherReply`] or `{"error"}`. Sent to any runner.
    Gather(GatherRequest),
    /// List a held job's workspace (`files/structure/`); reply: `crate::app::FileStructure` or
    /// `{"error"}`. Sent to the runner that holds the job.
    ListFiles {
        job_id: String,
        /// Relative to `/app` (checked by `crate::app::workspace_path`).
        path: String,
        limit: u32,
    },
    /// Read one file of a held job's workspace (`files/content/`); reply:
    /// `crate::app::FileContent` or `{"error"}`. Sent to the runner that holds the job.
    ReadFile { job_id: String, path: String },
}

/// What the requirements gatherer is asked: the idea, the conversation so far, and whether this
/// turn must end with the summary (rounds exhausted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GatherRequest {
    pub job_id: String,
    pub initial_prompt: String,
    /// The transcript, oldest first: `user` and `agent` turns.
    pub transcript: Vec<ChatTurn>,
    pub must_summarise: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatTurn {
    /// `user` or `agent`.
    pub role: String,
    pub content: String,
}

/// The gatherer's answer: its reply as written (`REQUIREMENTS_SUMMARY` included, split by the
/// edge with `crate::app::split_summary`), the model that wrote it and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GatherReply {
    pub reply: String,
    /// The gatherer's display name (`sender` of its messages).
    pub sender: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageReport>,
}

/// What an app build's run starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AppBuildParams {
    pub initial_prompt: String,
    pub requirements_summary: String,
    /// A continuation run's new requirements (`/continue/`): the runner plans and builds only
    /// them, over the workspace the earlier run left (restored from its snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<String>,
    /// The job was paused before it was dispatched: wait for `resume` before the first step.
    #[serde(default)]
    pub paused: bool,
}

/// Everything a runner needs to run one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Assignment {
    pub job_id: String,
    pub lease_id: String,
    /// 1 for the first dispatch, +1 for each requeue.
    pub attempt: u32,
    pub job_type: JobType,
    pub prompt: String,
    pub title: Option<String>,
    pub branch_name: String,
    pub github_org: String,
    pub github_repo: String,
    /// The branch the work starts from and the pull request targets; the remote's HEAD if absent.
    pub base_branch: Option<String>,
    pub ralph: Option<RalphParams>,
    /// The job's own wall-clock limit in seconds (`timeoutSeconds`); the runner caps it with its
    /// `RUNNER_JOB_TIMEOUT`. Absent: the runner's limit alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    /// An app build's inputs (`job_type: app_build`, whose repository fields are empty: its
    /// workspace is a new git repository on the runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppBuildParams>,
    /// A landing job's inputs (`landing_init`, `landing_chat`; repository fields empty: the
    /// session's workspace is a git repository kept as a bundle between jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landing: Option<LandingParams>,
    /// A dashboard job's inputs (seed 002 kinds; repository fields empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<DashboardParams>,
    /// The GitHub issue (or pull request) a webhook started this job from: the runner comments on
    /// it with the pull request it opens (issue 12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_issue: Option<crate::webhooks::IssueRef>,
    /// How long the job waited for this dispatch since it was submitted, in ms (a duration, so
    /// no clock is compared across machines). A fetch of the repository that started after the
    /// submission serves the job: the work starts from the remote as it was then or later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
}

/// What a dashboard job (seed 002) starts from, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DashboardParams {
    /// An agent's task: the prompt is the job's; the agent's definition as it was at submit.
    AgentTask {
        agent_type: String,
        /// The LLM role its steps use (`[llm.roles]`; falls back to `default`).
        model_role: String,
        technique: String,
        instructions: String,
        parameters: Value,
        /// Answer through a round table (the winner's answer is the result).
        use_round_table: bool,
    },
    /// A learning cycle: review these recent tasks and rewrite the instructions.
    AgentLearn { agent_type: String, instructions: String, recent: Vec<Value> },
    /// Every listed provider (`provider/model` as the runner's `[llm]` names them; `None`: the
    /// runner's round-table providers) answers the prompt, a judge scores, the top two are
    /// compared.
    RoundTable {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        providers: Option<Vec<String>>,
    },
    /// Text to 3D, validated and uploaded.
    Pipeline3d { format: String, max_faces: u32, max_texture_size: u32 },
}

/// What a landing job (seed 001) starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LandingParams {
    pub session_id: String,
    pub landing_page_id: String,
    /// The session's init payload (`business_data`), for init and chat jobs alike.
    pub payload: Value,
    /// A chat job's request; `None` for init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Messages the queue sends to a runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeMessage {
    /// Answer to `hello`.
    Welcome { runner_id: String, heartbeat_secs: u32, lease_secs: u32 },
    /// Run this job now.
    Assign { assignment: Assignment },
    /// Stop this job at once (container or process killed, worktree removed).
    Cancel { job_id: String },
    /// A user's message for a running task job's agent.
    Deliver { job_id: String, message: String },
    /// Finish a task job: close the agent's input and complete.
    Complete { job_id: String },
    /// Stop a ralph job after its current iteration.
    Stop { job_id: String },
    /// Pause a pipeline job between steps (the step running finishes).
    Pause { job_id: String },
    /// Go on with a paused pipeline job.
    Resume { job_id: String },
    /// Repository work answered with a `reply`.
    Request { request_id: String, request: RunnerRequest },
    /// A protocol error (the socket stays open).
    Error { message: String },
}

/// What a runner reports about a job it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunnerEvent {
    /// A line of output or a system note.
    Log { stream: LogStream, content: String },
    /// A structured agent event (one line of `claude-stream-json`).
    Agent { event: Value },
    /// The job started running on this runner.
    Started { message: String },
    /// Tokens and cost that one agent run (or LLM step) reported.
    Usage { usage: UsageReport },
    /// A ralph iteration finished.
    Iteration { iteration: Iteration },
    /// An app build's pipeline entered a phase (a `jobStatus` with seed 000's status).
    Phase { phase: AppPhase, message: String },
    /// A conversation turn or a narration (`stageUpdate`; narrations carry
    /// `metadata.type = "description"`).
    Stage { role: String, sender: String, content: String, metadata: Value },
    /// An executive dialogue turn (`agentDialogue`).
    Dialogue { agent: String, message: String, order: u32 },
    /// The PRD and spec (`prdReady`; the room saves them as the job's App).
    Prd { spec: Value, prd_markdown: String },
    /// A new backlog (checked with `crate::app::build_order`): the room announces `ticketReset`,
    /// replaces the job's tickets and sends a `ticketUpdate` for each.
    Backlog { tickets: Vec<Ticket> },
    /// A pipeline node's event (`node`; seed 001's job events). Tool events never carry raw
    /// file contents.
    Node {
        node: String,
        event_type: String,
        message: String,
        #[serde(default)]
        data: Value,
    },
    /// How far the job is (`progress`; seed 002's `task_update`/`pipeline_update`/
    /// `competition_update` are views of it).
    Progress {
        percent: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<String>,
        #[serde(default)]
        data: Value,
    },
    /// A ticket changed (`ticketUpdate`; the room updates its row).
    Ticket {
        ticket_id: String,
        status: TicketStatus,
        message: String,
        #[serde(default)]
        metadata: Value,
    },
    /// The job ended.
    Finished {
        outcome: Outcome,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pr_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        completion_reason: Option<CompletionReason>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_iterations: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_message: Option<String>,
        /// What the job produced, for faces that show it (a landing job: `preview_url`,
        /// `landing_page_id`, `sections`); the room puts it in the `__end__` node's `data`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
    },
}

/// Tokens and cost that one agent run or LLM step reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageReport {
    /// What spent them: the agent profile (`claude`, `codex`) or an LLM step's role.
    pub source: String,
    /// The model, when the reporter names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Cache reads and writes, already counted in the price.
    #[serde(default)]
    pub cached_tokens: u64,
    /// `None` when the reporter knows no price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// A job's usage so far: every [`UsageReport`] summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageTotals {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    /// The priced reports' cost (unpriced ones add nothing).
    pub cost_usd: f64,
}

impl UsageTotals {
    pub fn add(&mut self, r: &UsageReport) {
        self.input_tokens += r.input_tokens;
        self.output_tokens += r.output_tokens;
        self.cached_tokens += r.cached_tokens;
        self.cost_usd += r.cost_usd.unwrap_or(0.0);
    }

    pub fn is_empty(&self) -> bool {
        *self == UsageTotals::default()
    }
}

/// How a job ended on the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Failed,
}

/// One event with its runner-side index: dense from 0 per lease, so a retried batch is stored once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IndexedEvent {
    pub index: u64,
    #[serde(flatten)]
    pub event: RunnerEvent,
}

/// `POST /runner/v1/jobs/<job_id>/events` (bearer: the runner token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventBatch {
    pub lease_id: String,
    pub events: Vec<IndexedEvent>,
}

/// Answer to an [`EventBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BatchAck {
    /// Events stored by this call.
    pub stored: u32,
    /// Events already stored by an earlier try of the same batch.
    pub duplicates: u32,
    /// False when the lease is no longer this runner's (cancelled, requeued): stop the job.
    pub lease_valid: bool,
}

/// `PUT /runner/v1/jobs/<job_id>/artifact?lease_id=&name=<file name>` (bearer: the runner token):
/// a file a job produced (a 3D model), raw bytes up to `MAX_ARTIFACT_BYTES`, kept in R2 at
/// `artifacts/<job_id>/<name>`; answers `{"url"}` where the edge serves it to the job's owner.
pub const MAX_ARTIFACT_BYTES: usize = 64 * 1024 * 1024;

/// `PUT|GET /runner/v1/jobs/<job_id>/bundle?lease_id=` (bearer: the runner token): a landing
/// session's workspace as a git bundle (`application/octet-stream`, at most
/// `crate::landing::MAX_BUNDLE_BYTES`), kept in R2 per landing page between jobs (404: none yet).
/// `PUT /runner/v1/jobs/<job_id>/preview?lease_id=`: a `crate::landing::PreviewBundle` that
/// replaces the job's landing page's preview, answered by `crate::landing::Published`.
///
/// `PUT /runner/v1/jobs/<job_id>/snapshot?lease_id=` (bearer: the runner token): the workspace's
/// text files as a run of an app build ends, kept in R2 for the files API and continuation runs.
pub const MAX_SNAPSHOT_BYTES: usize = 16 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn indexed_events_are_flat() {
        let ev = IndexedEvent { index: 4, event: RunnerEvent::Log { stream: LogStream::Stdout, content: "hi".into() } };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v, json!({"index": 4, "type": "log", "stream": "stdout", "content": "hi"}));
        assert_eq!(serde_json::from_value::<IndexedEvent>(v).unwrap(), ev);
    }

    #[test]
    fn edge_messages_are_tagged() {
        let m = EdgeMessage::Cancel { job_id: "j".into() };
        assert_eq!(serde_json::to_value(&m).unwrap(), json!({"type": "cancel", "job_id": "j"}));
        let r = EdgeMessage::Request { request_id: "r".into(), request: RunnerRequest::Sync { repos: vec![] } };
        assert_eq!(serde_json::to_value(&r).unwrap()["request"]["op"], "sync");
    }
}
