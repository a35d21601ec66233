//! Storage of seed 000's app-builder face: the D1 rows it reads, writes at create and deletes
//! (app_build jobs, apps, tickets), their views, and the files tree of a workspace snapshot kept
//! in R2. The views and the tree are pure and tested natively; the D1 statements are wasm32 only.

use std::collections::BTreeMap;

use kiln_schemas::app::{
    AppJobView, AppView, FileContent, FileEntry, FileStructure, MessageView, StepView, TicketStatus, TicketType,
    TicketView, WorkspaceSnapshot, WORKSPACE_ROOT,
};
use kiln_schemas::status::{app_status, AppPhase, JobStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The R2 key of a job's workspace snapshot (binding `ARTIFACTS`).
pub fn snapshot_key(job_id: &str) -> String {
    format!("snapshots/{job_id}.json")
}

/// Whose rows a read may see: one owner's, or (the service principal) anyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Owner(&'a str),
    Any,
}

impl Scope<'_> {
    /// The owner to filter by; `None` for [`Scope::Any`].
    pub fn owner(&self) -> Option<&str> {
        match self {
            Scope::Owner(o) => Some(o),
            Scope::Any => None,
        }
    }
}

/// An app_build row of `jobs`: the columns the face renders.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppJobRow {
    pub id: String,
    pub owner: String,
    pub status: String,
    pub queue: String,
    pub prompt: String,
    #[serde(default)]
    pub initial_prompt: Option<String>,
    #[serde(default)]
    pub requirements_summary: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub is_paused: Option<i64>,
    #[serde(default)]
    pub phase: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_ms: i64,
    #[serde(default)]
    pub usage: Option<String>,
}

impl AppJobRow {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    /// Seed 000's status: the core status with the pipeline's phase.
    pub fn face_status(&self) -> &'static str {
        app_status(self.status(), self.phase.as_deref().and_then(AppPhase::parse))
    }

    /// The job as seed 000 renders it (`steps` and `messages` are the detail's).
    pub fn view(&self) -> AppJobView {
        AppJobView {
            id: self.id.clone(),
            initial_prompt: self.initial_prompt.clone().unwrap_or_else(|| self.prompt.clone()),
            prompt: self.prompt.clone(),
            requirements_summary: self.requirements_summary.clone(),
            status: self.face_status().to_string(),
            error_message: self.error_message.clone(),
            is_paused: self.is_paused.unwrap_or(0) != 0,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            steps: None,
            messages: None,
            usage: self.usage.as_deref().and_then(|u| serde_json::from_str(u).ok()),
        }
    }
}

/// A row of `apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRow {
    pub id: String,
    pub job_id: String,
    pub owner: String,
    pub spec: String,
    pub prd_markdown: String,
    #[serde(default)]
    pub prd_generated_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl AppRow {
    pub fn view(&self) -> AppView {
        AppView {
            id: self.id.clone(),
            job_id: self.job_id.clone(),
            // A spec that does not parse is shown as an empty object, never as null.
            spec: serde_json::from_str(&self.spec).unwrap_or_else(|_| Value::Object(Default::default())),
            prd_markdown: self.prd_markdown.clone(),
            prd_generated_at: self.prd_generated_at.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// A row of `tickets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketRow {
    pub id: String,
    pub job_id: String,
    pub owner: String,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    pub status: String,
    #[serde(default)]
    pub assigned_to: Option<String>,
    #[serde(default)]
    pub dependencies: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl TicketRow {
    /// The ticket as seed 000 renders it: `type`, `status` and `dependencies` never null.
    pub fn view(&self) -> TicketView {
        TicketView {
            id: self.id.clone(),
            job_id: self.job_id.clone(),
            parent_id: self.parent_id.clone(),
            kind: TicketType::parse(&self.kind).unwrap_or(TicketType::Task),
            title: self.title.clone(),
            description: self.description.clone().unwrap_or_default(),
            status: TicketStatus::parse(&self.status).unwrap_or(TicketStatus::Todo),
            assigned_to: self.assigned_to.clone().unwrap_or_default(),
            dependencies: self
                .dependencies
                .as_deref()
                .and_then(|d| serde_json::from_str::<Vec<String>>(d).ok())
                .unwrap_or_default(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// One message as the job's room answers `GET /messages` (a `stageUpdate` of its log).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomMessage {
    pub seq: u64,
    pub role: String,
    #[serde(default)]
    pub sender: Option<String>,
    pub content: String,
    #[serde(default)]
    pub metadata: Value,
    pub timestamp: String,
}

/// A page of the room's `GET /messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomMessages {
    pub messages: Vec<RoomMessage>,
    #[serde(default)]
    pub next_after: Option<u64>,
}

/// One executive dialogue turn as the room answers `GET /steps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomStep {
    pub seq: u64,
    pub agent: String,
    pub message: String,
    pub order: u32,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomSteps {
    pub steps: Vec<RoomStep>,
}

/// The sender shown for a role when none was given: never null for agents and the system.
pub fn default_sender(role: &str, user: &str) -> String {
    match role {
        "user" => user.to_string(),
        "agent" => "Agent".to_string(),
        _ => "System".to_string(),
    }
}

impl RoomMessage {
    /// Seed 000's JobMessage: its id is `<job_id>:<seq>` and `created_at` the event's timestamp.
    pub fn view(&self, job_id: &str) -> MessageView {
        let metadata = match &self.metadata {
            Value::Object(_) => self.metadata.clone(),
            _ => Value::Object(Default::default()),
        };
        MessageView {
            id: kiln_schemas::app::event_id(job_id, self.seq),
            job_id: job_id.to_string(),
            role: self.role.clone(),
            sender: self.sender.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| default_sender(&self.role, "")),
            content: self.content.clone(),
            metadata,
            created_at: self.timestamp.clone(),
        }
    }
}

impl RoomStep {
    pub fn view(&self, job_id: &str) -> StepView {
        StepView {
            id: kiln_schemas::app::event_id(job_id, self.seq),
            agent_name: self.agent.clone(),
            message: self.message.clone(),
            order: self.order,
            created_at: self.timestamp.clone(),
        }
    }
}

/// Why a files path has no answer in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotMiss {
    /// Nothing at that path.
    Missing,
    /// A file where a directory was asked for (or the reverse).
    WrongKind(&'static str),
    /// The file exists but was left out of the snapshot (binary, oversize, or past its limit).
    Omitted,
}

/// A directory of the snapshot's tree: `Some(size)` for a stored file, `None` for one left out.
#[derive(Default)]
struct Dir<'a> {
    dirs: BTreeMap<&'a str, Dir<'a>>,
    files: BTreeMap<&'a str, Option<u64>>,
}

impl<'a> Dir<'a> {
    fn insert(&mut self, path: &'a str, size: Option<u64>) {
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some(name) = parts.pop() else { return };
        let mut dir = self;
        for p in parts {
            dir = dir.dirs.entry(p).or_default();
        }
        dir.files.insert(name, size);
    }

    /// Entries in the runner's order (directories first, then by name), each counting toward
    /// `budget`; answers whether anything was left out.
    fn entries(&self, at: &str, budget: &mut u32) -> (Vec<FileEntry>, bool) {
        let mut out = vec![];
        for (name, dir) in &self.dirs {
            if *budget == 0 {
                return (out, true);
            }
            *budget -= 1;
            let path = format!("{at}/{name}");
            let (children, cut) = dir.entries(&path, budget);
            out.push(FileEntry { name: name.to_string(), path, kind: "directory".into(), size: None, children: Some(children) });
            if cut {
                return (out, true);
            }
        }
        for (name, size) in &self.files {
            if *budget == 0 {
                return (out, true);
            }
            *budget -= 1;
            out.push(FileEntry { name: name.to_string(), path: format!("{at}/{name}"), kind: "file".into(), size: *size, children: None });
        }
        (out, false)
    }
}

fn tree(snap: &WorkspaceSnapshot) -> Dir<'_> {
    let mut root = Dir::default();
    for f in &snap.files {
        root.insert(&f.path, Some(f.size));
    }
    for p in &snap.omitted {
        root.insert(p, None);
    }
    root
}

/// `files/structure/` from a snapshot: the entries under `rel` (relative to `/app`, as
/// `schemas::app::workspace_path` answers it), directories first then by name, at most `limit`
/// of them (then `truncated`).
pub fn snapshot_structure(snap: &WorkspaceSnapshot, rel: &str, limit: u32) -> Result<FileStructure, SnapshotMiss> {
    let root = tree(snap);
    let mut dir = &root;
    let mut parts = rel.split('/').filter(|p| !p.is_empty()).peekable();
    while let Some(p) = parts.next() {
        match dir.dirs.get(p) {
            Some(d) => dir = d,
            None if parts.peek().is_none() && dir.files.contains_key(p) => {
                return Err(SnapshotMiss::WrongKind("is a file, not a directory"))
            }
            None => return Err(SnapshotMiss::Missing),
        }
    }
    let at = if rel.is_empty() { WORKSPACE_ROOT.to_string() } else { format!("{WORKSPACE_ROOT}/{rel}") };
    let mut budget = limit;
    let (structure, truncated) = dir.entries(&at, &mut budget);
    Ok(FileStructure { structure, truncated, source: "snapshot".into(), detail: None })
}

/// `files/content/` from a snapshot.
pub fn snapshot_content(snap: &WorkspaceSnapshot, rel: &str) -> Result<FileContent, SnapshotMiss> {
    if let Some(f) = snap.files.iter().find(|f| f.path.trim_matches('/') == rel) {
        return Ok(FileContent { path: format!("{WORKSPACE_ROOT}/{rel}"), content: f.content.clone(), size: f.size });
    }
    if snap.omitted.iter().any(|p| p.trim_matches('/') == rel) {
        return Err(SnapshotMiss::Omitted);
    }
    let dir = format!("{rel}/");
    let is_dir = rel.is_empty()
        || snap.files.iter().map(|f| f.path.trim_start_matches('/')).chain(snap.omitted.iter().map(|p| p.trim_start_matches('/'))).any(|p| p.starts_with(&dir));
    Err(if is_dir { SnapshotMiss::WrongKind("is a directory, not a file") } else { SnapshotMiss::Missing })
}

/// The answer when a job has no workspace to show (the frontend polls; an empty tree is normal).
pub fn no_workspace(why: &str) -> FileStructure {
    FileStructure { structure: vec![], truncated: false, source: "none".into(), detail: Some(format!("no workspace yet: {why}")) }
}

/// Whether a runner's `{"error"}` says it no longer holds the job's workspace (the job moved or
/// ended between the queue's answer and the runner's): the snapshot answers then.
pub fn runner_lacks_workspace(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("does not hold") || e.contains("no workspace")
}

/// The HTTP status of a runner's `{"error"}` to a files request (its wording: `files.rs` in the
/// runner): a missing path 404, a binary file 415, an oversize one 413, anything else 400.
pub fn runner_error_status(error: &str) -> u16 {
    let e = error.to_ascii_lowercase();
    if e.contains("binary") {
        415
    } else if e.contains(" over ") || e.contains("too large") || e.contains("larger than") {
        413
    } else if e.contains("not found") || e.contains("no such") || e.contains("does not exist") {
        404
    } else {
        400
    }
}

#[cfg(target_arch = "wasm32")]
pub use d1::*;

#[cfg(target_arch = "wasm32")]
mod d1 {
    use wasm_bindgen::JsValue;
    use worker::D1Database;

    use super::{AppJobRow, AppRow, Scope, TicketRow};
    use crate::http::ApiResult;
    use crate::store::{n, opt, s};

    fn scope(sc: Scope) -> JsValue {
        opt(sc.owner())
    }

    const JOB_COLUMNS: &str = "id, owner, status, queue, prompt, initial_prompt, requirements_summary, error_message,
        is_paused, phase, created_at, updated_at, created_ms, usage";

    /// The most jobs, apps or tickets one list answers (newest first).
    pub const MAX_LIST: i64 = 1000;

    /// Inserts a new app build in `collecting` (its room is opened first).
    pub async fn insert_app_job(db: &D1Database, id: &str, owner: &str, queue: &str, idea: &str, created_at: &str, created_ms: i64) -> ApiResult<()> {
        db.prepare(
            "INSERT INTO jobs (id, owner, job_type, status, queue, prompt, initial_prompt, branch_name, github_org,
               github_repo, params, priority, attempts, created_at, updated_at, created_ms)
             VALUES (?1, ?2, 'app_build', 'collecting', ?3, ?4, ?4, '', '', '', '{}', 0, 0, ?5, ?5, ?6)",
        )
        .bind(&[s(id), s(owner), s(queue), s(idea), s(created_at), n(created_ms)])?
        .run()
        .await?;
        Ok(())
    }

    /// An app build by id within `sc`.
    pub async fn get_app_job(db: &D1Database, id: &str, sc: Scope<'_>) -> ApiResult<Option<AppJobRow>> {
        Ok(db
            .prepare(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND job_type = 'app_build' AND (?2 IS NULL OR owner = ?2)"
            ))
            .bind(&[s(id), scope(sc)])?
            .first::<AppJobRow>(None)
            .await?)
    }

    /// App builds within `sc`, newest first.
    pub async fn list_app_jobs(db: &D1Database, sc: Scope<'_>) -> ApiResult<Vec<AppJobRow>> {
        Ok(db
            .prepare(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE job_type = 'app_build' AND (?1 IS NULL OR owner = ?1)
                 ORDER BY created_ms DESC, id DESC LIMIT ?2"
            ))
            .bind(&[scope(sc), n(MAX_LIST)])?
            .all()
            .await?
            .results::<AppJobRow>()?)
    }

    /// Sets the idea (`initial_prompt` and `prompt`) of a job still collecting; `false` when the
    /// job is no longer collecting.
    pub async fn set_idea(db: &D1Database, id: &str, idea: &str, now: &str) -> ApiResult<bool> {
        let result = db
            .prepare(
                "UPDATE jobs SET initial_prompt = ?2, prompt = ?2, updated_at = ?3
                 WHERE id = ?1 AND job_type = 'app_build' AND status = 'collecting'",
            )
            .bind(&[s(id), s(idea), s(now)])?
            .run()
            .await?;
        Ok(result.meta()?.and_then(|m| m.changes).unwrap_or(0) > 0)
    }

    /// Deletes a job's rows: the job, its App and its tickets, in one batch.
    pub async fn delete_app_job_rows(db: &D1Database, id: &str) -> ApiResult<()> {
        let statements = vec![
            db.prepare("DELETE FROM tickets WHERE job_id = ?1").bind(&[s(id)])?,
            db.prepare("DELETE FROM apps WHERE job_id = ?1").bind(&[s(id)])?,
            db.prepare("DELETE FROM jobs WHERE id = ?1").bind(&[s(id)])?,
        ];
        db.batch(statements).await?;
        Ok(())
    }

    pub async fn list_apps(db: &D1Database, sc: Scope<'_>) -> ApiResult<Vec<AppRow>> {
        Ok(db
            .prepare("SELECT * FROM apps WHERE (?1 IS NULL OR owner = ?1) ORDER BY created_at DESC, id DESC LIMIT ?2")
            .bind(&[scope(sc), n(MAX_LIST)])?
            .all()
            .await?
            .results::<AppRow>()?)
    }

    pub async fn get_app(db: &D1Database, id: &str, sc: Scope<'_>) -> ApiResult<Option<AppRow>> {
        Ok(db
            .prepare("SELECT * FROM apps WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)")
            .bind(&[s(id), scope(sc)])?
            .first::<AppRow>(None)
            .await?)
    }

    /// The App of a job (whose owner the caller already checked).
    pub async fn app_of_job(db: &D1Database, job_id: &str) -> ApiResult<Option<AppRow>> {
        Ok(db.prepare("SELECT * FROM apps WHERE job_id = ?1").bind(&[s(job_id)])?.first::<AppRow>(None).await?)
    }

    /// A job's backlog in its order (the job's owner already checked).
    pub async fn tickets_of_job(db: &D1Database, job_id: &str) -> ApiResult<Vec<TicketRow>> {
        Ok(db
            .prepare("SELECT * FROM tickets WHERE job_id = ?1 ORDER BY ordinal, id")
            .bind(&[s(job_id)])?
            .all()
            .await?
            .results::<TicketRow>()?)
    }

    pub async fn get_ticket(db: &D1Database, id: &str, sc: Scope<'_>) -> ApiResult<Option<TicketRow>> {
        Ok(db
            .prepare("SELECT * FROM tickets WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)")
            .bind(&[s(id), scope(sc)])?
            .first::<TicketRow>(None)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_schemas::app::SnapshotFile;
    use serde_json::json;

    fn snap(files: &[(&str, &str)], omitted: &[&str]) -> WorkspaceSnapshot {
        WorkspaceSnapshot {
            files: files
                .iter()
                .map(|(p, c)| SnapshotFile { path: p.to_string(), content: c.to_string(), size: c.len() as u64 })
                .collect(),
            omitted: omitted.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn names(entries: &[FileEntry]) -> Vec<String> {
        entries.iter().map(|e| e.name.clone()).collect()
    }

    #[test]
    fn a_snapshot_lists_as_a_tree_directories_first() {
        let s = snap(&[("index.html", "<p>"), ("src/b.js", "b"), ("src/a.js", "aa"), ("README.md", "r"), ("src/lib/x.rs", "x")], &["logo.png"]);
        let t = snapshot_structure(&s, "", 200).unwrap();
        assert_eq!((t.source.as_str(), t.truncated, t.detail.clone()), ("snapshot", false, None));
        assert_eq!(names(&t.structure), ["src", "README.md", "index.html", "logo.png"]);
        let src = &t.structure[0];
        assert_eq!((src.kind.as_str(), src.path.as_str(), src.size), ("directory", "/app/src", None));
        let children = src.children.as_ref().unwrap();
        assert_eq!(names(children), ["lib", "a.js", "b.js"]);
        assert_eq!((children[1].path.as_str(), children[1].size), ("/app/src/a.js", Some(2)));
        assert_eq!(children[0].children.as_ref().unwrap()[0].path, "/app/src/lib/x.rs");
        let logo = &t.structure[3];
        assert_eq!((logo.kind.as_str(), logo.size), ("file", None), "an omitted file is listed without a size");
        // The JSON the frontend reads.
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["structure"][1], json!({"name": "README.md", "path": "/app/README.md", "type": "file", "size": 1}));
    }

    #[test]
    fn a_snapshot_listing_honours_path_and_limit() {
        let s = snap(&[("src/a.js", "a"), ("src/b.js", "b"), ("src/lib/x.rs", "x"), ("top.txt", "t")], &[]);
        let sub = snapshot_structure(&s, "src", 200).unwrap();
        assert_eq!(names(&sub.structure), ["lib", "a.js", "b.js"]);
        assert_eq!(sub.structure[0].path, "/app/src/lib");
        // Every entry counts, nested ones included: src, lib, x.rs.
        let cut = snapshot_structure(&s, "", 3).unwrap();
        assert!(cut.truncated);
        assert_eq!(names(&cut.structure), ["src"]);
        let src = cut.structure[0].children.as_ref().unwrap();
        assert_eq!(names(src), ["lib"]);
        assert_eq!(names(src[0].children.as_ref().unwrap()), ["x.rs"]);
        let exact = snapshot_structure(&s, "", 6).unwrap();
        assert!(!exact.truncated, "six entries fit a limit of six");
        assert!(snapshot_structure(&s, "", 5).unwrap().truncated);
        assert_eq!(snapshot_structure(&s, "nope", 10), Err(SnapshotMiss::Missing));
        assert_eq!(snapshot_structure(&s, "src/nope/deeper", 10), Err(SnapshotMiss::Missing));
        assert!(matches!(snapshot_structure(&s, "top.txt", 10), Err(SnapshotMiss::WrongKind(_))));
        let empty = snapshot_structure(&WorkspaceSnapshot::default(), "", 10).unwrap();
        assert!(empty.structure.is_empty() && !empty.truncated);
    }

    #[test]
    fn snapshot_content_says_why_a_file_has_none() {
        let s = snap(&[("src/a.js", "let a = 1;")], &["bin/tool"]);
        let f = snapshot_content(&s, "src/a.js").unwrap();
        assert_eq!((f.path.as_str(), f.content.as_str(), f.size), ("/app/src/a.js", "let a = 1;", 10));
        assert_eq!(snapshot_content(&s, "bin/tool"), Err(SnapshotMiss::Omitted));
        assert_eq!(snapshot_content(&s, "src/b.js"), Err(SnapshotMiss::Missing));
        assert!(matches!(snapshot_content(&s, "src"), Err(SnapshotMiss::WrongKind(_))));
        assert!(matches!(snapshot_content(&s, ""), Err(SnapshotMiss::WrongKind(_))));
    }

    #[test]
    fn job_rows_render_seed_000s_fields() {
        let row = AppJobRow {
            id: "j".into(),
            owner: "u".into(),
            status: "running".into(),
            queue: "default".into(),
            prompt: "a todo app".into(),
            initial_prompt: None,
            requirements_summary: Some("tags".into()),
            is_paused: Some(1),
            phase: Some("ticketing".into()),
            created_at: "t0".into(),
            updated_at: "t1".into(),
            ..Default::default()
        };
        let v = row.view();
        assert_eq!(v.initial_prompt, "a todo app", "never null: the prompt stands in");
        assert_eq!((v.status.as_str(), v.is_paused), ("ticketing", true));
        let json = serde_json::to_value(&v).unwrap();
        for key in ["id", "initial_prompt", "prompt", "requirements_summary", "status", "error_message", "is_paused", "created_at", "updated_at"] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        assert!(json.get("steps").is_none() && json.get("messages").is_none(), "the list has no detail");
        for (status, phase, want) in [
            ("collecting", None, "collecting"),
            ("queued", None, "queued"),
            ("running", None, "planning"),
            ("running", Some("building"), "building"),
            ("completed", Some("building"), "build_done"),
            ("cancelled", None, "failed"),
            ("bogus", None, "failed"),
        ] {
            let r = AppJobRow { status: status.into(), phase: phase.map(Into::into), ..row.clone() };
            assert_eq!(r.face_status(), want, "{status} {phase:?}");
        }
    }

    #[test]
    fn tickets_and_apps_are_never_null_where_the_frontend_reads() {
        let t = TicketRow {
            id: "t".into(),
            job_id: "j".into(),
            owner: "u".into(),
            parent_id: None,
            kind: "story".into(),
            title: "Login".into(),
            description: None,
            status: "in_progress".into(),
            assigned_to: None,
            dependencies: Some(r#"["a","b"]"#.into()),
            created_at: "t0".into(),
            updated_at: "t1".into(),
        };
        let v = serde_json::to_value(t.view()).unwrap();
        assert_eq!((v["type"].clone(), v["status"].clone(), v["dependencies"].clone()), (json!("story"), json!("in_progress"), json!(["a", "b"])));
        assert_eq!((v["description"].clone(), v["assigned_to"].clone(), v["parent_id"].clone()), (json!(""), json!(""), Value::Null));
        let bad = TicketRow { dependencies: Some("not json".into()), kind: "?".into(), status: "?".into(), ..t };
        let v = serde_json::to_value(bad.view()).unwrap();
        assert_eq!((v["dependencies"].clone(), v["type"].clone(), v["status"].clone()), (json!([]), json!("task"), json!("todo")));

        let app = AppRow {
            id: "a".into(),
            job_id: "j".into(),
            owner: "u".into(),
            spec: r#"{"name":"Todo"}"#.into(),
            prd_markdown: "# PRD".into(),
            prd_generated_at: Some("t0".into()),
            created_at: "t0".into(),
            updated_at: "t0".into(),
        };
        assert_eq!(app.view().spec, json!({"name": "Todo"}));
        assert_eq!(AppRow { spec: "{".into(), ..app }.view().spec, json!({}));
    }

    #[test]
    fn messages_and_steps_are_events_with_job_scoped_ids() {
        let m = RoomMessage {
            seq: 7,
            role: "agent".into(),
            sender: None,
            content: "What colours?".into(),
            metadata: Value::Null,
            timestamp: "2026-01-01T00:00:00.000Z".into(),
        };
        let v = m.view("job");
        assert_eq!((v.id.as_str(), v.sender.as_str(), v.metadata.clone()), ("job:7", "Agent", json!({})));
        assert_eq!(v.created_at, "2026-01-01T00:00:00.000Z", "created_at is the stageUpdate's timestamp");
        let sys = RoomMessage { role: "system".into(), sender: Some(String::new()), ..m.clone() };
        assert_eq!(sys.view("job").sender, "System");
        assert_eq!(default_sender("user", "ann@example.com"), "ann@example.com");
        let s = RoomStep { seq: 9, agent: "CTO".into(), message: "Rust".into(), order: 2, timestamp: "t".into() };
        let v = serde_json::to_value(s.view("job")).unwrap();
        assert_eq!(v, json!({"id": "job:9", "agent_name": "CTO", "message": "Rust", "order": 2, "created_at": "t"}));
    }

    #[test]
    fn runner_errors_map_to_statuses() {
        assert_eq!(runner_error_status("binary file"), 415);
        assert_eq!(runner_error_status("file is over 524288 bytes"), 413);
        assert_eq!(runner_error_status("not found: /app/x"), 404);
        assert_eq!(runner_error_status("no such file or directory"), 404);
        assert_eq!(runner_error_status("path is a symlink"), 400);
        // The runner's own wording (runner/src/files.rs, edge/connection.rs).
        assert_eq!(runner_error_status("/app/src does not exist"), 404);
        assert_eq!(runner_error_status("/app/x is a symbolic link"), 400);
        assert_eq!(runner_error_status("file is over 524288 bytes (600000 bytes)"), 413);
        assert!(runner_lacks_workspace("this runner does not hold the job"));
        assert!(runner_lacks_workspace("this job has no workspace on this runner"));
        assert!(!runner_lacks_workspace("binary file"));
        assert_eq!(snapshot_key("j"), "snapshots/j.json");
        let none = serde_json::to_value(no_workspace("the job has not started")).unwrap();
        assert_eq!(none, json!({"structure": [], "truncated": false, "source": "none", "detail": "no workspace yet: the job has not started"}));
    }
}
