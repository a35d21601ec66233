//! Seed 003's jobs API: request validation and response shapes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::status::{CompletionReason, JobStatus, JobType};
use crate::validate::{is_branch_name, is_repo_component, is_uuid};

pub const DEFAULT_MAX_ITERATIONS: u32 = 10;
pub const MAX_MAX_ITERATIONS: u32 = 100;
pub const DEFAULT_COMPLETION_PROMISE: &str = "RALPH_COMPLETE";
pub const MAX_PROMPT_BYTES: usize = 256 * 1024;
pub const MAX_FEEDBACK_COMMANDS: usize = 20;
pub const MAX_FEEDBACK_COMMAND_BYTES: usize = 4096;
/// The longest `timeoutSeconds` a job may ask for: one day.
pub const MAX_TIMEOUT_SECONDS: u32 = 86_400;
pub const DEFAULT_LIST_LIMIT: u32 = 50;
pub const MAX_LIST_LIMIT: u32 = 500;

/// `POST /jobs` as documented by seed 003 (all fields optional on the wire; [`NewJob::parse`]
/// enforces the table). Kiln's own additions: `priority` (higher runs first, default 0) and
/// `timeoutSeconds`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateJobRequest {
    pub prompt: Option<String>,
    pub client_id: Option<String>,
    pub github_org: Option<String>,
    pub github_repo: Option<String>,
    pub branch_name: Option<String>,
    pub job_type: Option<JobType>,
    pub feature_id: Option<String>,
    pub repository_id: Option<String>,
    pub title: Option<String>,
    pub created_by_team_member_id: Option<String>,
    pub max_iterations: Option<u32>,
    pub completion_promise: Option<String>,
    pub feedback_commands: Option<Vec<String>>,
    pub priority: Option<i32>,
    /// Kiln's addition: the job's wall-clock limit once running, 1 to 86400 seconds; the runner's
    /// `RUNNER_JOB_TIMEOUT` caps it.
    pub timeout_seconds: Option<u32>,
}

/// Where a job's code lives: a client's registered repository, or an org/repo pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobTarget {
    Client { client_id: String },
    Repo { github_org: String, github_repo: String },
}

/// Ralph loop settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RalphParams {
    pub max_iterations: u32,
    pub completion_promise: String,
    pub feedback_commands: Vec<String>,
}

/// A validated `POST /jobs` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub prompt: String,
    pub target: JobTarget,
    /// `None` when the branch is to be generated (task and ralph jobs).
    pub branch_name: Option<String>,
    pub job_type: JobType,
    pub feature_id: Option<String>,
    pub repository_id: Option<String>,
    pub title: Option<String>,
    pub created_by_team_member_id: Option<String>,
    pub ralph: Option<RalphParams>,
    pub priority: i32,
    /// `timeoutSeconds`: the job's wall-clock limit once running, capped by the runner's
    /// `RUNNER_JOB_TIMEOUT`.
    pub timeout_seconds: Option<u32>,
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

fn opt_uuid(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match opt_string(obj, key)? {
        Some(s) if !is_uuid(&s) => Err(format!("{key} must be a UUID")),
        other => Ok(other.map(|s| s.to_ascii_lowercase())),
    }
}

impl NewJob {
    /// Validates a `POST /jobs` body against seed 003's table. Errors are messages fit for a 400.
    pub fn parse(body: &Value) -> Result<NewJob, String> {
        let obj = body.as_object().ok_or("request body must be a JSON object")?;

        let prompt = match obj.get("prompt") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err("prompt is required".into())
            }
            Some(_) => return Err("prompt must be a string".into()),
        };
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(format!("prompt must be at most {MAX_PROMPT_BYTES} bytes"));
        }

        let job_type = match opt_string(obj, "jobType")? {
            None => JobType::Code,
            Some(s) => JobType::parse(&s)
                .ok_or_else(|| format!("jobType must be one of code, task, ralph (got {s:?})"))?,
        };
        if !job_type.is_seed_003() {
            return Err(format!("jobType {} is not created here: use POST /api/jobs/", job_type.as_str()));
        }

        let client_id = opt_uuid(obj, "clientId")?;
        let github_org = opt_string(obj, "githubOrg")?;
        let github_repo = opt_string(obj, "githubRepo")?;
        let target = match (client_id, github_org, github_repo) {
            (Some(client_id), _, _) => JobTarget::Client { client_id },
            (None, Some(org), Some(repo)) => {
                if !is_repo_component(&org) {
                    return Err("githubOrg is not a valid GitHub owner name".into());
                }
                if !is_repo_component(&repo) {
                    return Err("githubRepo is not a valid GitHub repository name".into());
                }
                JobTarget::Repo { github_org: org, github_repo: repo }
            }
            (None, Some(_), None) => return Err("githubRepo is required with githubOrg".into()),
            (None, None, Some(_)) => return Err("githubOrg is required with githubRepo".into()),
            (None, None, None) => {
                return Err("either clientId or githubOrg and githubRepo is required".into())
            }
        };

        let branch_name = opt_string(obj, "branchName")?;
        if let Some(b) = &branch_name {
            if !is_branch_name(b) {
                return Err("branchName is not a valid git branch name".into());
            }
        }
        if job_type == JobType::Code && branch_name.is_none() {
            return Err("branchName is required for code jobs".into());
        }

        let title = opt_string(obj, "title")?;
        if title.as_ref().is_some_and(|t| t.len() > 500) {
            return Err("title must be at most 500 bytes".into());
        }

        let priority = match obj.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => match v.as_i64() {
                Some(p) if (-100..=100).contains(&p) => p as i32,
                _ => return Err("priority must be an integer from -100 to 100".into()),
            },
        };

        let timeout_seconds = match obj.get("timeoutSeconds") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=MAX_TIMEOUT_SECONDS as u64).contains(&n) => Some(n as u32),
                _ => {
                    return Err(format!(
                        "timeoutSeconds must be an integer from 1 to {MAX_TIMEOUT_SECONDS}"
                    ))
                }
            },
        };

        let ralph = if job_type == JobType::Ralph {
            let max_iterations = match obj.get("maxIterations") {
                None | Some(Value::Null) => DEFAULT_MAX_ITERATIONS,
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=MAX_MAX_ITERATIONS as u64).contains(&n) => n as u32,
                    _ => return Err("maxIterations must be an integer from 1 to 100".into()),
                },
            };
            let completion_promise = opt_string(obj, "completionPromise")?
                .unwrap_or_else(|| DEFAULT_COMPLETION_PROMISE.to_string());
            if completion_promise.len() > 200 {
                return Err("completionPromise must be at most 200 bytes".into());
            }
            let feedback_commands = match obj.get("feedbackCommands") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(items)) => {
                    if items.len() > MAX_FEEDBACK_COMMANDS {
                        return Err(format!(
                            "feedbackCommands must have at most {MAX_FEEDBACK_COMMANDS} entries"
                        ));
                    }
                    items
                        .iter()
                        .map(|c| match c.as_str() {
                            Some(s) if !s.trim().is_empty() && s.len() <= MAX_FEEDBACK_COMMAND_BYTES => {
                                Ok(s.to_string())
                            }
                            _ => Err("feedbackCommands must be non-empty strings".to_string()),
                        })
                        .collect::<Result<_, _>>()?
                }
                Some(_) => return Err("feedbackCommands must be an array of strings".into()),
            };
            Some(RalphParams { max_iterations, completion_promise, feedback_commands })
        } else {
            None
        };

        Ok(NewJob {
            prompt,
            target,
            branch_name,
            job_type,
            feature_id: opt_uuid(obj, "featureId")?,
            repository_id: opt_uuid(obj, "repositoryId")?,
            title,
            created_by_team_member_id: opt_uuid(obj, "createdByTeamMemberId")?,
            ralph,
            priority,
            timeout_seconds,
        })
    }
}

/// The generated branch of a task or ralph job: `kiln/<type>-<first 8 of the id>`.
pub fn generated_branch(job_type: JobType, job_id: &str) -> String {
    format!("kiln/{}-{}", job_type.as_str(), &job_id[..8.min(job_id.len())])
}

/// Answer of `POST /jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateJobResponse {
    pub id: String,
    pub status: JobStatus,
    /// 1-based place among the queued jobs.
    pub position: u32,
    pub branch_name: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_type: Option<JobType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_promise: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_commands: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ClientRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FeatureRef {
    pub id: String,
    pub title: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RepositoryRef {
    pub id: Option<String>,
    pub owner_name: String,
    pub repo_name: String,
}

/// One of seed 003's job messages (`system`, `stdout`, `stderr`, `user_input`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobMessage {
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
    pub created_at: String,
}

/// A job as `GET /jobs/:id` and `GET /jobs` render it (seed 003, snake_case).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub job_type: JobType,
    pub prompt: String,
    pub title: Option<String>,
    pub branch_name: String,
    pub client: Option<ClientRef>,
    pub feature: Option<FeatureRef>,
    pub repository: Option<RepositoryRef>,
    pub priority: i32,
    pub attempts: u32,
    pub pr_url: Option<String>,
    pub error_message: Option<String>,
    pub original_job_id: Option<String>,
    pub created_by_team_member_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_promise: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_commands: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_reason: Option<CompletionReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_iterations: Option<u32>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<JobMessage>>,
    /// With `messages`, when the log holds more after them: the `seq` to pass as
    /// `messagesAfter` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_next_after: Option<u64>,
    /// Kiln's addition: tokens and cost the job's agent runs reported, as of its last status
    /// change (live, per run, as `usage` events on its channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::runner::UsageTotals>,
}

/// Answer of `GET /jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    pub total: u64,
}

/// Answer of `POST /jobs/:id/cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelResponse {
    pub id: String,
    pub status: JobStatus,
    pub was_running: bool,
}

/// Answer of `POST /jobs/:id/retry`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryResponse {
    pub id: String,
    pub original_job_id: String,
    pub status: JobStatus,
    pub branch_name: String,
    pub position: u32,
    pub created_at: String,
}

/// `GET /jobs` query parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    pub statuses: Vec<JobStatus>,
    pub client_id: Option<String>,
    pub feature_id: Option<String>,
    pub limit: u32,
    pub offset: u32,
}

impl ListQuery {
    /// Parses `status` (comma-separated), `clientId`, `featureId`, `limit`, `offset`.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut q = ListQuery { limit: DEFAULT_LIST_LIMIT, ..Default::default() };
        for (k, v) in pairs {
            match k {
                "status" => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let st = JobStatus::parse(s).ok_or_else(|| format!("unknown status {s:?}"))?;
                        if !q.statuses.contains(&st) {
                            q.statuses.push(st);
                        }
                    }
                }
                "clientId" => q.client_id = Some(v.to_string()),
                "featureId" => q.feature_id = Some(v.to_string()),
                "limit" => {
                    q.limit = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit must be an integer from 1 to {MAX_LIST_LIMIT}"))?
                }
                "offset" => {
                    q.offset = v.parse::<u32>().map_err(|_| "offset must be a non-negative integer")?
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// An entry of `GET /queue`'s lists.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct QueueEntry {
    pub id: String,
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// Answer of `GET /queue`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub running: Vec<QueueEntry>,
    pub queued: Vec<QueueEntry>,
    pub max_concurrent: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueCounts {
    pub running: u32,
    pub queued: u32,
    pub max_concurrent: u32,
}

/// Answer of `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    pub status: String,
    pub queue: QueueCounts,
    /// Seed 003's block, from what the connected runners with the `claude` profile report
    /// (default when reading an edge that predates it).
    #[serde(default)]
    pub claude: ClaudeHealth,
    /// Seed 003's block, from what the connected runners report.
    #[serde(default)]
    pub git: GitHealth,
    /// Kiln's addition: connected runners, their free slots, and each one's tools.
    pub runners: RunnerCounts,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaudeHealth {
    /// Some connected runner's Claude Code has credentials (a vendor key, or the demo model).
    pub authenticated: bool,
    /// The Claude Code version of the first connected runner that reports one.
    pub version: Option<String>,
    /// Kiln's addition: every connected Claude Code runner talks to the demo model.
    pub demo_model: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct GitHealth {
    /// Some connected runner holds a forge token (pushes over https, opens pull requests).
    pub authenticated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RunnerCounts {
    pub connected: u32,
    pub free_slots: u32,
    /// Each connected runner that reported its tools, by name.
    #[serde(default)]
    pub tools: Vec<NamedRunnerTools>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NamedRunnerTools {
    pub name: String,
    #[serde(flatten)]
    pub tools: crate::runner::RunnerTools,
}

impl Health {
    /// Seed 003's `claude` and `git` blocks from the runners' reports.
    pub fn from_runners(queue: QueueCounts, connected: u32, free_slots: u32, tools: Vec<NamedRunnerTools>) -> Health {
        let claude: Vec<&crate::runner::RunnerTools> = tools.iter().map(|t| &t.tools).filter(|t| t.profile == "claude").collect();
        Health {
            status: "ok".into(),
            queue,
            claude: ClaudeHealth {
                authenticated: claude.iter().any(|t| t.agent_authenticated),
                version: claude.iter().find_map(|t| t.agent_version.clone()),
                demo_model: !claude.is_empty() && claude.iter().all(|t| t.demo_model),
            },
            git: GitHealth { authenticated: tools.iter().any(|t| t.tools.forge_token) },
            runners: RunnerCounts { connected, free_slots, tools },
        }
    }
}

/// One ralph iteration (seed 003's `GET /jobs/:id/iterations`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Iteration {
    pub id: String,
    pub iteration_number: u32,
    pub started_at: String,
    pub completed_at: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub promise_detected: bool,
    pub output_summary: String,
    pub feedback_results: Vec<FeedbackResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackResult {
    pub command: String,
    pub exit_code: i32,
    pub passed: bool,
}

/// Answer of `GET /jobs/:id/iterations`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IterationList {
    pub job_id: String,
    pub current_iteration: u32,
    pub max_iterations: u32,
    pub completion_reason: Option<CompletionReason>,
    pub iterations: Vec<Iteration>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CLIENT: &str = "14cddf8f-ce78-4b49-9eb4-9d17a7d1f568";

    fn tools(name: &str, profile: &str, version: Option<&str>, authenticated: bool, demo: bool, forge: bool) -> NamedRunnerTools {
        NamedRunnerTools {
            name: name.into(),
            tools: crate::runner::RunnerTools {
                profile: profile.into(),
                agent_version: version.map(str::to_string),
                agent_authenticated: authenticated,
                demo_model: demo,
                git_version: Some("git version 2.39.5".into()),
                forge_token: forge,
                round_table: vec![],
            },
        }
    }

    #[test]
    fn health_tells_what_the_runners_report() {
        let q = QueueCounts { running: 0, queued: 0, max_concurrent: 2 };
        let none = Health::from_runners(q.clone(), 0, 0, vec![]);
        let v = serde_json::to_value(&none).unwrap();
        assert_eq!(v["claude"], json!({"authenticated": false, "version": null, "demoModel": false}));
        assert_eq!(v["git"], json!({"authenticated": false}));

        let h = Health::from_runners(
            q,
            2,
            3,
            vec![
                tools("a", "text", None, false, false, false),
                tools("b", "claude", Some("2.1.328 (Claude Code)"), true, true, true),
            ],
        );
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["claude"], json!({"authenticated": true, "version": "2.1.328 (Claude Code)", "demoModel": true}));
        assert_eq!(v["git"], json!({"authenticated": true}));
        assert_eq!(v["runners"]["tools"][1]["name"], "b");
        assert_eq!(v["runners"]["tools"][1]["profile"], "claude", "flattened: {v}");
    }

    #[test]
    fn a_timeout_is_optional_and_bounded() {
        let base = json!({"prompt": "x", "githubOrg": "o", "githubRepo": "r", "jobType": "task"});
        assert_eq!(NewJob::parse(&base).unwrap().timeout_seconds, None);
        for (value, want) in [(json!(1), 1), (json!(3600), 3600), (json!(86400), 86400)] {
            let mut body = base.clone();
            body["timeoutSeconds"] = value;
            assert_eq!(NewJob::parse(&body).unwrap().timeout_seconds, Some(want));
        }
        for bad in [json!(0), json!(86401), json!(-5), json!(1.5), json!("60")] {
            let mut body = base.clone();
            body["timeoutSeconds"] = bad.clone();
            let err = NewJob::parse(&body).unwrap_err();
            assert_eq!(err, "timeoutSeconds must be an integer from 1 to 86400", "{bad}");
        }
    }

    #[test]
    fn a_code_job_needs_a_branch() {
        let err = NewJob::parse(&json!({"prompt": "x", "clientId": CLIENT})).unwrap_err();
        assert!(err.contains("branchName"), "{err}");
        let job = NewJob::parse(&json!({"prompt": "x", "clientId": CLIENT, "branchName": "f/x"})).unwrap();
        assert_eq!(job.job_type, JobType::Code);
        assert_eq!(job.branch_name.as_deref(), Some("f/x"));
        assert!(job.ralph.is_none());
    }

    #[test]
    fn task_and_ralph_branches_are_generated() {
        let job = NewJob::parse(&json!({"prompt": "x", "githubOrg": "o", "githubRepo": "r", "jobType": "task"})).unwrap();
        assert_eq!(job.branch_name, None);
        assert_eq!(generated_branch(JobType::Task, "abcdef0123"), "kiln/task-abcdef01");
    }

    #[test]
    fn ralph_defaults_and_bounds() {
        let job = NewJob::parse(&json!({"prompt": "x", "githubOrg": "o", "githubRepo": "r", "jobType": "ralph"})).unwrap();
        assert_eq!(
            job.ralph,
            Some(RalphParams { max_iterations: 10, completion_promise: "RALPH_COMPLETE".into(), feedback_commands: vec![] })
        );
        for bad in [json!(0), json!(101), json!(2.5), json!("3"), json!(-1)] {
            let body = json!({"prompt": "x", "githubOrg": "o", "githubRepo": "r", "jobType": "ralph", "maxIterations": bad});
            assert!(NewJob::parse(&body).unwrap_err().contains("maxIterations"));
        }
        let body = json!({"prompt": "x", "githubOrg": "o", "githubRepo": "r", "jobType": "ralph",
            "maxIterations": 100, "completionPromise": "DONE", "feedbackCommands": ["npm test"]});
        let r = NewJob::parse(&body).unwrap().ralph.unwrap();
        assert_eq!((r.max_iterations, r.completion_promise.as_str(), r.feedback_commands.len()), (100, "DONE", 1));
        let body = json!({"prompt": "x", "githubOrg": "o", "githubRepo": "r", "jobType": "ralph", "feedbackCommands": "npm test"});
        assert!(NewJob::parse(&body).unwrap_err().contains("feedbackCommands"));
    }

    #[test]
    fn bad_bodies_get_clear_errors() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({}), "prompt is required"),
            (json!({"prompt": "  "}), "prompt is required"),
            (json!({"prompt": 3}), "prompt must be a string"),
            (json!({"prompt": "x"}), "clientId or githubOrg"),
            (json!({"prompt": "x", "githubOrg": "o"}), "githubRepo is required"),
            (json!({"prompt": "x", "githubOrg": "../etc", "githubRepo": "r", "branchName": "b"}), "githubOrg"),
            (json!({"prompt": "x", "clientId": "nope", "branchName": "b"}), "clientId must be a UUID"),
            (json!({"prompt": "x", "clientId": CLIENT, "branchName": "b", "jobType": "deploy"}), "jobType"),
            (json!({"prompt": "x", "clientId": CLIENT, "branchName": "b", "jobType": "app_build"}), "POST /api/jobs/"),
            (json!({"prompt": "x", "clientId": CLIENT, "branchName": "a..b"}), "branchName"),
            (json!({"prompt": "x", "clientId": CLIENT, "branchName": "b", "priority": 1000}), "priority"),
        ];
        for (body, want) in cases {
            let err = NewJob::parse(&body).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn list_query() {
        let q = ListQuery::parse([("status", "queued,running,queued"), ("limit", "5"), ("offset", "10")]).unwrap();
        assert_eq!(q.statuses, vec![JobStatus::Queued, JobStatus::Running]);
        assert_eq!((q.limit, q.offset), (5, 10));
        assert_eq!(ListQuery::parse([]).unwrap().limit, 50);
        assert!(ListQuery::parse([("status", "bogus")]).is_err());
        assert!(ListQuery::parse([("limit", "0")]).is_err());
        assert!(ListQuery::parse([("limit", "x")]).is_err());
        assert!(ListQuery::parse([("offset", "-1")]).is_err());
    }
}
