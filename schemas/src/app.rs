//! Seed 000's app builder: its REST shapes (`/api/jobs/`, `/api/job-messages/`, `/api/apps/`,
//! `/api/tickets/`, `/api/jobs/<id>/files/`), the ticket backlog and its validation, the
//! requirements gatherer's summary marker and the workspace path sandbox. Every shape here is a
//! view of the one core: jobs, their event logs and the rows their rooms write.

use std::collections::{HashMap, HashSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest idea `POST /api/jobs/` takes, in characters.
pub const MAX_IDEA_CHARS: usize = 5000;
/// The marker after which the requirements gatherer writes its summary.
pub const SUMMARY_MARKER: &str = "REQUIREMENTS_SUMMARY";
/// User messages the gatherer answers before it must summarise what it has.
pub const MAX_GATHER_ROUNDS: u32 = 8;
/// The workspace root every files path lives under.
pub const WORKSPACE_ROOT: &str = "/app";
pub const DEFAULT_FILES_LIMIT: u32 = 200;
pub const MAX_FILES_LIMIT: u32 = 1000;
/// The largest file `files/content/` reads.
pub const MAX_FILE_BYTES: u64 = 512 * 1024;

/// `POST /api/jobs/` body, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NewAppJob {
    pub prompt: String,
}

impl NewAppJob {
    pub fn parse(body: &Value) -> Result<NewAppJob, String> {
        let prompt = idea(body.get("prompt"), "prompt")?;
        Ok(NewAppJob { prompt })
    }
}

/// `PATCH /api/jobs/<id>/` body: the new `initial_prompt`.
pub fn parse_patch(body: &Value) -> Result<String, String> {
    if !body.is_object() {
        return Err("body must be a JSON object".into());
    }
    idea(body.get("initial_prompt"), "initial_prompt")
}

fn idea(v: Option<&Value>, name: &str) -> Result<String, String> {
    let text = v.and_then(Value::as_str).ok_or_else(|| format!("{name} is required and must be a string"))?;
    if text.trim().is_empty() {
        return Err(format!("{name} may not be blank"));
    }
    let chars = text.chars().count();
    if chars > MAX_IDEA_CHARS {
        return Err(format!("{name} is {chars} characters; at most {MAX_IDEA_CHARS} are allowed"));
    }
    Ok(text.to_string())
}

/// `POST /api/jobs/<id>/continue/` body, checked: the new requirements.
pub fn parse_continue(body: &Value) -> Result<String, String> {
    idea(body.get("requirements"), "requirements")
}

/// A job as seed 000 renders it. `steps` and `messages` only in the detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AppJobView {
    pub id: String,
    pub initial_prompt: String,
    pub prompt: String,
    pub requirements_summary: Option<String>,
    /// One of [`crate::status::APP_STATUSES`].
    pub status: String,
    pub error_message: Option<String>,
    pub is_paused: bool,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepView>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<MessageView>>,
    /// Kiln's addition: tokens and cost so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::runner::UsageTotals>,
}

/// One executive dialogue turn (an `agentDialogue` event) as a job's step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepView {
    /// The event's id: `<job_id>:<seq>`.
    pub id: String,
    pub agent_name: String,
    pub message: String,
    pub order: u32,
    pub created_at: String,
}

/// One chat message (a `stageUpdate` event) as seed 000's JobMessage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MessageView {
    /// The event's id: `<job_id>:<seq>`.
    pub id: String,
    pub job_id: String,
    pub role: String,
    pub sender: String,
    pub content: String,
    pub metadata: Value,
    /// Equals the `stageUpdate` event's `timestamp` (the frontend de-duplicates by it).
    pub created_at: String,
}

/// The id of a message or step: its job and its `seq` in the job's log.
pub fn event_id(job_id: &str, seq: u64) -> String {
    format!("{job_id}:{seq}")
}

/// Splits an id made by [`event_id`].
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let (job, seq) = id.rsplit_once(':')?;
    let seq = seq.parse().ok()?;
    crate::validate::is_uuid(job).then_some((job, seq))
}

/// Who may speak in a job's transcript.
pub const MESSAGE_ROLES: [&str; 3] = ["user", "agent", "system"];

/// `POST /api/job-messages/` body, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NewMessage {
    pub job_id: String,
    pub role: String,
    pub sender: Option<String>,
    pub content: String,
    pub metadata: Value,
}

impl NewMessage {
    pub fn parse(body: &Value) -> Result<NewMessage, String> {
        let text = |k: &str| body.get(k).and_then(Value::as_str);
        let job_id = text("job_id").ok_or("job_id is required and must be a string")?;
        if !crate::validate::is_uuid(job_id) {
            return Err("job_id must be a job's id".into());
        }
        let role = text("role").ok_or("role is required: user, agent or system")?;
        if !MESSAGE_ROLES.contains(&role) {
            return Err(format!("role must be user, agent or system, not {role:?}"));
        }
        let content = text("content").ok_or("content is required and must be a string")?;
        if content.trim().is_empty() {
            return Err("content may not be blank".into());
        }
        if content.len() > crate::events::MAX_CHAT_BYTES {
            return Err(format!("content is over {} bytes", crate::events::MAX_CHAT_BYTES));
        }
        let sender = match body.get("sender") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= 200 => Some(s.clone()),
            Some(_) => return Err("sender must be a string of at most 200 bytes".into()),
        };
        let metadata = match body.get("metadata") {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err("metadata must be a JSON object".into()),
        };
        Ok(NewMessage { job_id: job_id.into(), role: role.into(), sender, content: content.into(), metadata })
    }
}

/// The App of a job: its PRD and spec (`/api/apps/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AppView {
    pub id: String,
    pub job_id: String,
    pub spec: Value,
    pub prd_markdown: String,
    pub prd_generated_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TicketType {
    Epic,
    Story,
    Task,
}

impl TicketType {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketType::Epic => "epic",
            TicketType::Story => "story",
            TicketType::Task => "task",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [TicketType::Epic, TicketType::Story, TicketType::Task].into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TicketStatus {
    Todo,
    InProgress,
    Done,
    Failed,
}

impl TicketStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketStatus::Todo => "todo",
            TicketStatus::InProgress => "in_progress",
            TicketStatus::Done => "done",
            TicketStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [TicketStatus::Todo, TicketStatus::InProgress, TicketStatus::Done, TicketStatus::Failed]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// One ticket of a backlog, as the runner writes it (ids are UUIDs the runner gives).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Ticket {
    pub id: String,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: TicketType,
    pub title: String,
    #[serde(default)]
    pub description: String,
    pub status: TicketStatus,
    /// Who builds it (the runner's agent profile, or a role); empty until assigned.
    #[serde(default)]
    pub assigned_to: String,
    /// Ids of tickets that must be done first.
    #[serde(default)]
    pub dependencies: Vec<String>,
}

/// A ticket as `/api/tickets/` renders it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TicketView {
    pub id: String,
    pub job_id: String,
    pub parent_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: TicketType,
    pub title: String,
    pub description: String,
    pub status: TicketStatus,
    pub assigned_to: String,
    pub dependencies: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// The largest backlog a job may have.
pub const MAX_TICKETS: usize = 200;

/// Checks a backlog (unique ids, parents and dependencies that exist, a parent that is not the
/// ticket itself, no dependency cycles, no epic to build) and answers the order to build its
/// stories and tasks in: every ticket after its dependencies, otherwise in the backlog's order.
pub fn build_order(tickets: &[Ticket]) -> Result<Vec<usize>, String> {
    if tickets.is_empty() {
        return Err("the backlog is empty".into());
    }
    if tickets.len() > MAX_TICKETS {
        return Err(format!("the backlog has {} tickets; at most {MAX_TICKETS} are allowed", tickets.len()));
    }
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tickets.iter().enumerate() {
        if t.id.is_empty() {
            return Err(format!("ticket {} has no id", i + 1));
        }
        if t.title.trim().is_empty() {
            return Err(format!("ticket {} has no title", t.id));
        }
        if index.insert(t.id.as_str(), i).is_some() {
            return Err(format!("ticket id {} is used twice", t.id));
        }
    }
    for t in tickets {
        if let Some(p) = &t.parent_id {
            if p == &t.id {
                return Err(format!("ticket {} is its own parent", t.id));
            }
            if !index.contains_key(p.as_str()) {
                return Err(format!("ticket {} names a parent {p} that is not in the backlog", t.id));
            }
        }
        for d in &t.dependencies {
            if !index.contains_key(d.as_str()) {
                return Err(format!("ticket {} depends on {d}, which is not in the backlog", t.id));
            }
            if d == &t.id {
                return Err(format!("ticket {} depends on itself", t.id));
            }
        }
    }
    // Kahn's algorithm, taking the earliest ready ticket each time (stable).
    let n = tickets.len();
    let mut waiting: Vec<usize> = tickets.iter().map(|t| t.dependencies.iter().collect::<HashSet<_>>().len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, t) in tickets.iter().enumerate() {
        for d in t.dependencies.iter().collect::<HashSet<_>>() {
            dependents[index[d.as_str()]].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() < n {
        let stuck: Vec<&str> = (0..n).filter(|i| !order.contains(i)).map(|i| tickets[i].id.as_str()).collect();
        return Err(format!("the dependencies of tickets {} form a cycle", stuck.join(", ")));
    }
    Ok(order.into_iter().filter(|&i| tickets[i].kind != TicketType::Epic).collect())
}

/// Splits a gatherer's reply at [`SUMMARY_MARKER`]: the text before it, and the summary after it
/// (a marker followed by nothing is no summary). A `:` after the marker is dropped.
pub fn split_summary(reply: &str) -> (String, Option<String>) {
    match reply.find(SUMMARY_MARKER) {
        None => (reply.trim().to_string(), None),
        Some(at) => {
            let before = reply[..at].trim().to_string();
            let after = reply[at + SUMMARY_MARKER.len()..].trim_start_matches([':', '*', '#', ' ']).trim();
            if after.is_empty() {
                (reply.trim().to_string(), None)
            } else {
                (before, Some(after.to_string()))
            }
        }
    }
}

/// One entry of `files/structure/`: a directory (with `children`, as deep as the limit allowed)
/// or a file (with `size`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileEntry {
    pub name: String,
    /// Absolute, under `/app`.
    pub path: String,
    /// `file` or `directory` (a symbolic link is listed as `symlink` and never followed).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<Vec<FileEntry>>,
}

/// `GET /api/jobs/<id>/files/structure/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileStructure {
    pub structure: Vec<FileEntry>,
    /// Set when the listing stopped at `limit` entries.
    #[serde(default)]
    pub truncated: bool,
    /// Where the answer came from: `runner` (the live workspace), `snapshot` (kept after the job
    /// ended) or `none` (no workspace yet).
    pub source: String,
    /// Why the tree is empty, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /api/jobs/<id>/files/content/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileContent {
    pub path: String,
    pub content: String,
    pub size: u64,
}

/// A workspace's text files, kept in R2 when the job's run ends so the files API still answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceSnapshot {
    pub files: Vec<SnapshotFile>,
    /// Files left out: binary, over [`MAX_FILE_BYTES`], or past the snapshot's size limit.
    #[serde(default)]
    pub omitted: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotFile {
    /// Relative to `/app`, `/`-separated.
    pub path: String,
    pub content: String,
    pub size: u64,
}

/// Checks a files path: absolute, `/app` or under it, no `.`/`..` segments, no NUL or
/// backslash. Answers it relative to `/app` (`""` for the root), `/`-separated, without empty
/// segments.
pub fn workspace_path(path: &str) -> Result<String, String> {
    if path.contains('\0') || path.contains('\\') {
        return Err("path may not contain NUL or backslashes".into());
    }
    let rest = path
        .strip_prefix(WORKSPACE_ROOT)
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .ok_or_else(|| format!("path must be {WORKSPACE_ROOT} or under it"))?;
    let mut parts = Vec::new();
    for seg in rest.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." {
            return Err("path may not contain . or .. segments".into());
        }
        parts.push(seg);
    }
    Ok(parts.join("/"))
}

/// `files/structure/` query `limit`: 1 to 1000, default 200.
pub fn parse_files_limit(v: Option<&str>) -> Result<u32, String> {
    match v {
        None | Some("") => Ok(DEFAULT_FILES_LIMIT),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_FILES_LIMIT).contains(&n) => Ok(n),
            _ => Err(format!("limit must be an integer from 1 to {MAX_FILES_LIMIT}")),
        },
    }
}

/// Answer of `pause/` and `resume/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PauseAnswer {
    pub detail: String,
    pub is_paused: bool,
    pub status: String,
}

/// Answer of `DELETE /api/jobs/purge/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PurgeAnswer {
    pub deleted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(id: &str, kind: TicketType, parent: Option<&str>, deps: &[&str]) -> Ticket {
        Ticket {
            id: id.into(),
            parent_id: parent.map(Into::into),
            kind,
            title: format!("ticket {id}"),
            description: String::new(),
            status: TicketStatus::Todo,
            assigned_to: String::new(),
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn ideas_are_bounded() {
        assert_eq!(NewAppJob::parse(&json!({"prompt": "a todo app"})).unwrap().prompt, "a todo app");
        assert!(NewAppJob::parse(&json!({})).unwrap_err().contains("required"));
        assert!(NewAppJob::parse(&json!({"prompt": "  "})).unwrap_err().contains("blank"));
        assert!(NewAppJob::parse(&json!({"prompt": 3})).is_err());
        let max = "é".repeat(MAX_IDEA_CHARS);
        assert!(NewAppJob::parse(&json!({"prompt": max})).is_ok(), "characters, not bytes");
        let over = "a".repeat(MAX_IDEA_CHARS + 1);
        assert!(NewAppJob::parse(&json!({"prompt": over})).unwrap_err().contains("5000"));
        assert_eq!(parse_patch(&json!({"initial_prompt": "x"})).unwrap(), "x");
        assert!(parse_patch(&json!([])).is_err());
        assert!(parse_continue(&json!({"requirements": "dark mode"})).is_ok());
        assert!(parse_continue(&json!({})).is_err());
    }

    #[test]
    fn messages_are_checked() {
        let id = "0b8f5a52-8d3c-4c1e-9a57-3f1f3c2b9e10";
        let m = NewMessage::parse(&json!({"job_id": id, "role": "agent", "sender": "Gatherer", "content": "hi"})).unwrap();
        assert_eq!((m.role.as_str(), m.sender.as_deref(), m.metadata.clone()), ("agent", Some("Gatherer"), json!({})));
        for (bad, want) in [
            (json!({"role": "user", "content": "x"}), "job_id"),
            (json!({"job_id": "nope", "role": "user", "content": "x"}), "job's id"),
            (json!({"job_id": id, "role": "boss", "content": "x"}), "role"),
            (json!({"job_id": id, "role": "user", "content": ""}), "blank"),
            (json!({"job_id": id, "role": "user", "content": "x", "metadata": 3}), "metadata"),
            (json!({"job_id": id, "role": "user", "content": "x", "sender": 3}), "sender"),
        ] {
            let e = NewMessage::parse(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let eid = event_id(id, 17);
        assert_eq!(parse_event_id(&eid), Some((id, 17)));
        assert_eq!(parse_event_id("x:1"), None);
        assert_eq!(parse_event_id(id), None);
    }

    #[test]
    fn backlogs_build_in_dependency_order() {
        let b = vec![
            t("e", TicketType::Epic, None, &[]),
            t("s2", TicketType::Story, Some("e"), &["s3"]),
            t("s1", TicketType::Story, Some("e"), &[]),
            t("s3", TicketType::Task, Some("e"), &["s1"]),
        ];
        let order: Vec<&str> = build_order(&b).unwrap().into_iter().map(|i| b[i].id.as_str()).collect();
        assert_eq!(order, ["s1", "s3", "s2"], "epics are not built; dependencies first");
    }

    #[test]
    fn bad_backlogs_are_refused() {
        let cases = [
            (vec![], "empty"),
            (vec![t("a", TicketType::Story, None, &["b"]), t("b", TicketType::Story, None, &["a"])], "cycle"),
            (vec![t("a", TicketType::Story, None, &["zz"])], "not in the backlog"),
            (vec![t("a", TicketType::Story, Some("zz"), &[])], "parent"),
            (vec![t("a", TicketType::Story, None, &[]), t("a", TicketType::Story, None, &[])], "twice"),
            (vec![t("a", TicketType::Story, None, &["a"])], "itself"),
        ];
        for (b, want) in cases {
            let e = build_order(&b).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn summaries_are_split_at_the_marker() {
        assert_eq!(split_summary("What colours?"), ("What colours?".into(), None));
        let (before, s) = split_summary("Thanks!\nREQUIREMENTS_SUMMARY: A todo app with tags.");
        assert_eq!((before.as_str(), s.as_deref()), ("Thanks!", Some("A todo app with tags.")));
        assert_eq!(split_summary("REQUIREMENTS_SUMMARY").1, None);
        assert_eq!(split_summary("## REQUIREMENTS_SUMMARY\n- tags").1.as_deref(), Some("- tags"));
    }

    #[test]
    fn workspace_paths_stay_in_app() {
        assert_eq!(workspace_path("/app").unwrap(), "");
        assert_eq!(workspace_path("/app/").unwrap(), "");
        assert_eq!(workspace_path("/app/src//App.tsx").unwrap(), "src/App.tsx");
        for bad in ["/etc/passwd", "/app/../etc", "/application", "app/x", "/app/./x", "/app/a\0b", "/app\\x", ""] {
            assert!(workspace_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_files_limit(None), Ok(200));
        assert_eq!(parse_files_limit(Some("1000")), Ok(1000));
        assert!(parse_files_limit(Some("0")).is_err());
        assert!(parse_files_limit(Some("1001")).is_err());
        assert!(parse_files_limit(Some("x")).is_err());
    }

    #[test]
    fn tickets_have_seed_000_field_names() {
        let v = serde_json::to_value(t("a", TicketType::Story, None, &[])).unwrap();
        assert_eq!(v["type"], "story");
        assert_eq!(v["status"], "todo");
        assert_eq!(v["dependencies"], json!([]));
    }
}
