//! D1 access: users, refresh tokens, the job index, clients and repositories, runners. Every
//! query binds its parameters; every read of an owned resource filters by owner.

use kiln_schemas::jobs::{ClientRef, FeatureRef, JobView, ListQuery, RalphParams, RepositoryRef};
use kiln_schemas::status::{CompletionReason, JobStatus, JobType};
use kiln_schemas::runner::UsageTotals;
use serde::{Deserialize, Serialize};
use wasm_bindgen::JsValue;
use worker::D1Database;

use crate::http::{ApiError, ApiResult};

pub fn s(v: &str) -> JsValue {
    JsValue::from_str(v)
}

pub fn opt(v: Option<&str>) -> JsValue {
    v.map(JsValue::from_str).unwrap_or(JsValue::NULL)
}

pub fn n(v: i64) -> JsValue {
    JsValue::from_f64(v as f64)
}

/// A row of `jobs`, joined with its client's name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobRow {
    pub id: String,
    pub owner: String,
    pub job_type: String,
    pub status: String,
    pub queue: String,
    pub prompt: String,
    pub title: Option<String>,
    pub branch_name: String,
    pub client_id: Option<String>,
    pub feature_id: Option<String>,
    pub repository_id: Option<String>,
    pub github_org: String,
    pub github_repo: String,
    pub base_branch: Option<String>,
    pub created_by_team_member_id: Option<String>,
    pub params: String,
    pub priority: i64,
    pub attempts: i64,
    pub pr_url: Option<String>,
    pub completion_reason: Option<String>,
    pub total_iterations: Option<i64>,
    pub error_message: Option<String>,
    pub original_job_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub created_ms: i64,
    #[serde(default)]
    pub status_seq: i64,
    #[serde(default)]
    pub client_name: Option<String>,
    /// JSON `UsageTotals`; `None` until a runner reports usage.
    #[serde(default)]
    pub usage: Option<String>,
    /// An app build's idea as the user wrote it (migration 0005).
    #[serde(default)]
    pub initial_prompt: Option<String>,
    /// The requirements gatherer's summary, once collecting ended.
    #[serde(default)]
    pub requirements_summary: Option<String>,
    /// 1 while an app build is paused between steps.
    #[serde(default)]
    pub is_paused: i64,
    /// A running app build's `AppPhase`.
    #[serde(default)]
    pub phase: Option<String>,
    /// A landing job's session and page (migration 0006).
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub landing_page_id: Option<String>,
}

impl JobRow {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn job_type(&self) -> JobType {
        JobType::parse(&self.job_type).unwrap_or(JobType::Code)
    }

    pub fn ralph(&self) -> Option<RalphParams> {
        serde_json::from_str::<serde_json::Value>(&self.params)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("ralph")?.clone()).ok())
    }

    /// An app build's latest continuation requirements, kept in `params` (`continuation`).
    pub fn continuation(&self) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.params)
            .ok()
            .and_then(|v| v.get("continuation")?.as_str().map(str::to_string))
    }

    /// The job's own `timeoutSeconds`, kept in `params` beside the ralph settings.
    pub fn timeout_seconds(&self) -> Option<u32> {
        serde_json::from_str::<serde_json::Value>(&self.params)
            .ok()
            .and_then(|v| v.get("timeoutSeconds")?.as_u64())
            .and_then(|n| u32::try_from(n).ok())
    }

    pub fn view(&self) -> JobView {
        let ralph = self.ralph();
        JobView {
            id: self.id.clone(),
            status: self.status(),
            job_type: self.job_type(),
            prompt: self.prompt.clone(),
            title: self.title.clone(),
            branch_name: self.branch_name.clone(),
            client: self.client_id.clone().map(|id| ClientRef { id, name: self.client_name.clone().unwrap_or_default() }),
            feature: self.feature_id.clone().map(|id| FeatureRef { id, title: None }),
            repository: Some(RepositoryRef {
                id: self.repository_id.clone(),
                owner_name: self.github_org.clone(),
                repo_name: self.github_repo.clone(),
            }),
            priority: self.priority as i32,
            attempts: self.attempts as u32,
            pr_url: self.pr_url.clone(),
            error_message: self.error_message.clone(),
            original_job_id: self.original_job_id.clone(),
            created_by_team_member_id: self.created_by_team_member_id.clone(),
            max_iterations: ralph.as_ref().map(|r| r.max_iterations),
            completion_promise: ralph.as_ref().map(|r| r.completion_promise.clone()),
            feedback_commands: ralph.as_ref().map(|r| r.feedback_commands.clone()),
            completion_reason: self
                .completion_reason
                .as_deref()
                .and_then(|c| serde_json::from_value::<CompletionReason>(serde_json::Value::String(c.into())).ok()),
            total_iterations: self.total_iterations.map(|n| n as u32),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            started_at: self.started_at.clone(),
            completed_at: self.completed_at.clone(),
            messages: None,
            messages_next_after: None,
            usage: self.usage.as_deref().and_then(|u| serde_json::from_str(u).ok()),
        }
    }
}

const JOB_SELECT: &str = "SELECT j.*, c.name AS client_name FROM jobs j LEFT JOIN clients c ON c.id = j.client_id";

/// Deletes a job's row (one whose room never opened).
pub async fn delete_job_row(db: &D1Database, id: &str) -> ApiResult<()> {
    db.prepare("DELETE FROM jobs WHERE id = ?1").bind(&[s(id)])?.run().await?;
    Ok(())
}

pub async fn insert_job(db: &D1Database, j: &JobRow) -> ApiResult<()> {
    db.prepare(
        "INSERT INTO jobs (id, owner, job_type, status, queue, prompt, title, branch_name, client_id, feature_id,
           repository_id, github_org, github_repo, base_branch, created_by_team_member_id, params, priority, attempts,
           original_job_id, created_at, updated_at, created_ms, initial_prompt, requirements_summary, is_paused, phase,
           session_id, landing_page_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, 0, ?18, ?19, ?19, ?20,
           ?21, ?22, ?23, ?24, ?25, ?26)",
    )
    .bind(&[
        s(&j.id),
        s(&j.owner),
        s(&j.job_type),
        s(&j.status),
        s(&j.queue),
        s(&j.prompt),
        opt(j.title.as_deref()),
        s(&j.branch_name),
        opt(j.client_id.as_deref()),
        opt(j.feature_id.as_deref()),
        opt(j.repository_id.as_deref()),
        s(&j.github_org),
        s(&j.github_repo),
        opt(j.base_branch.as_deref()),
        opt(j.created_by_team_member_id.as_deref()),
        s(&j.params),
        n(j.priority),
        opt(j.original_job_id.as_deref()),
        s(&j.created_at),
        n(j.created_ms),
        opt(j.initial_prompt.as_deref()),
        opt(j.requirements_summary.as_deref()),
        n(j.is_paused),
        opt(j.phase.as_deref()),
        opt(j.session_id.as_deref()),
        opt(j.landing_page_id.as_deref()),
    ])?
    .run()
    .await?;
    Ok(())
}

/// A job by id, only if `owner` owns it.
pub async fn get_job(db: &D1Database, id: &str, owner: &str) -> ApiResult<Option<JobRow>> {
    Ok(db
        .prepare(format!("{JOB_SELECT} WHERE j.id = ?1 AND j.owner = ?2"))
        .bind(&[s(id), s(owner)])?
        .first::<JobRow>(None)
        .await?)
}

/// A job by id whoever owns it (internal use: Durable Objects, runners).
pub async fn get_job_any(db: &D1Database, id: &str) -> ApiResult<Option<JobRow>> {
    Ok(db.prepare(format!("{JOB_SELECT} WHERE j.id = ?1")).bind(&[s(id)])?.first::<JobRow>(None).await?)
}

/// Jobs of `queue` that D1 holds `queued` or `running`, created before `created_before_ms` (the
/// queue's reconciliation), oldest first.
pub async fn jobs_in_flight(db: &D1Database, queue: &str, created_before_ms: i64) -> ApiResult<Vec<JobRow>> {
    Ok(db
        .prepare(format!(
            "{JOB_SELECT} WHERE j.queue = ?1 AND j.status IN ('queued', 'running') AND j.created_ms < ?2 ORDER BY j.created_ms LIMIT 1000"
        ))
        .bind(&[s(queue), n(created_before_ms)])?
        .all()
        .await?
        .results::<JobRow>()?)
}

/// The job or 404, owner-scoped: another owner's job is indistinguishable from a missing one.
pub async fn owned_job(db: &D1Database, id: &str, owner: &str) -> ApiResult<JobRow> {
    get_job(db, id, owner).await?.ok_or_else(|| ApiError::NotFound("job not found".into()))
}

pub async fn list_jobs(db: &D1Database, owner: &str, q: &ListQuery) -> ApiResult<(Vec<JobRow>, u64)> {
    let mut filter = String::from(" WHERE j.owner = ?1");
    let mut args = vec![s(owner)];
    if !q.statuses.is_empty() {
        let marks: Vec<String> = q
            .statuses
            .iter()
            .map(|st| {
                args.push(s(st.as_str()));
                format!("?{}", args.len())
            })
            .collect();
        filter.push_str(&format!(" AND j.status IN ({})", marks.join(",")));
    }
    if let Some(c) = &q.client_id {
        args.push(s(c));
        filter.push_str(&format!(" AND j.client_id = ?{}", args.len()));
    }
    if let Some(f) = &q.feature_id {
        args.push(s(f));
        filter.push_str(&format!(" AND j.feature_id = ?{}", args.len()));
    }
    #[derive(Deserialize)]
    struct Count {
        total: i64,
    }
    let mut page_args = args.clone();
    page_args.push(n(q.limit as i64));
    page_args.push(n(q.offset as i64));
    // The count and the page in one round trip (and one transaction: they agree).
    let results = db
        .batch(vec![
            db.prepare(format!("SELECT COUNT(*) AS total FROM jobs j{filter}")).bind(&args)?,
            db.prepare(format!(
                "{JOB_SELECT}{filter} ORDER BY j.created_ms DESC, j.id DESC LIMIT ?{} OFFSET ?{}",
                args.len() + 1,
                args.len() + 2
            ))
            .bind(&page_args)?,
        ])
        .await?;
    let [count, page] = <[worker::d1::D1Result; 2]>::try_from(results)
        .map_err(|r| ApiError::Internal(format!("a batch of 2 statements answered {} results", r.len())))?;
    let total = count.results::<Count>()?.first().map_or(0, |c| c.total as u64);
    let rows = page.results::<JobRow>()?;
    Ok((rows, total))
}

/// Fields a status change may set on the job row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobPatch {
    pub pr_url: Option<String>,
    pub completion_reason: Option<String>,
    pub total_iterations: Option<i64>,
    pub error_message: Option<String>,
    pub attempts: Option<i64>,
    /// The job's usage so far (the room's totals).
    #[serde(default)]
    pub usage: Option<UsageTotals>,
    /// An app build's columns as its room holds them (written whole with each status copy).
    #[serde(default)]
    pub app: Option<AppColumns>,
}

/// What a status copy writes of an app build: its phase (`NULL` clears it), whether it is paused,
/// and its requirements summary (kept when `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppColumns {
    pub phase: Option<String>,
    pub is_paused: bool,
    pub requirements_summary: Option<String>,
}

impl JobRow {
    /// What [`update_job_status`] writes, applied to a copy of the row (the job room's): the same
    /// columns, the same rules, so both answer the same view. Stale writes (`status_seq` not
    /// newer) change nothing.
    pub fn apply_status(&mut self, status: JobStatus, status_seq: u64, now: &str, patch: &JobPatch) {
        if self.status_seq >= status_seq as i64 {
            return;
        }
        self.status = status.as_str().to_string();
        self.updated_at = now.to_string();
        if status == JobStatus::Running {
            self.started_at = Some(now.to_string());
        }
        if status.is_terminal() {
            self.completed_at = Some(now.to_string());
        }
        fn keep<T: Clone>(column: &mut Option<T>, new: &Option<T>) {
            if new.is_some() {
                column.clone_from(new);
            }
        }
        keep(&mut self.pr_url, &patch.pr_url);
        keep(&mut self.completion_reason, &patch.completion_reason);
        keep(&mut self.total_iterations, &patch.total_iterations);
        keep(&mut self.error_message, &patch.error_message);
        if let Some(a) = patch.attempts {
            self.attempts = a;
        }
        self.status_seq = status_seq as i64;
        keep(&mut self.usage, &patch.usage.as_ref().and_then(|u| serde_json::to_string(u).ok()));
        if let Some(app) = &patch.app {
            self.phase.clone_from(&app.phase);
            self.is_paused = app.is_paused as i64;
        }
        keep(&mut self.requirements_summary, &patch.app.as_ref().and_then(|a| a.requirements_summary.clone()));
    }
}

pub async fn update_job_status(
    db: &D1Database,
    id: &str,
    status: JobStatus,
    status_seq: u64,
    now: &str,
    patch: &JobPatch,
) -> ApiResult<()> {
    let started = (status == JobStatus::Running).then_some(now);
    let completed = status.is_terminal().then_some(now);
    db.prepare(
        "UPDATE jobs SET status = ?2, updated_at = ?3,
           started_at = COALESCE(?4, started_at), completed_at = COALESCE(?5, completed_at),
           pr_url = COALESCE(?6, pr_url), completion_reason = COALESCE(?7, completion_reason),
           total_iterations = COALESCE(?8, total_iterations), error_message = COALESCE(?9, error_message),
           attempts = COALESCE(?10, attempts), status_seq = ?11, usage = COALESCE(?12, usage),
           phase = CASE WHEN ?13 = 1 THEN ?14 ELSE phase END,
           is_paused = CASE WHEN ?13 = 1 THEN ?15 ELSE is_paused END,
           requirements_summary = COALESCE(?16, requirements_summary)
         WHERE id = ?1 AND status_seq < ?11",
    )
    .bind(&[
        s(id),
        s(status.as_str()),
        s(now),
        opt(started),
        opt(completed),
        opt(patch.pr_url.as_deref()),
        opt(patch.completion_reason.as_deref()),
        patch.total_iterations.map(n).unwrap_or(JsValue::NULL),
        opt(patch.error_message.as_deref()),
        patch.attempts.map(n).unwrap_or(JsValue::NULL),
        n(status_seq as i64),
        opt(patch.usage.as_ref().and_then(|u| serde_json::to_string(u).ok()).as_deref()),
        n(patch.app.is_some() as i64),
        opt(patch.app.as_ref().and_then(|a| a.phase.as_deref())),
        n(patch.app.as_ref().is_some_and(|a| a.is_paused) as i64),
        opt(patch.app.as_ref().and_then(|a| a.requirements_summary.as_deref())),
    ])?
    .run()
    .await?;
    Ok(())
}

// ---- clients and repositories ----

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRow {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoRow {
    pub id: String,
    pub client_id: String,
    pub owner: String,
    pub owner_name: String,
    pub repo_name: String,
    pub default_branch: String,
    pub created_at: String,
}

pub async fn insert_client(db: &D1Database, c: &ClientRow) -> ApiResult<()> {
    db.prepare("INSERT INTO clients (id, owner, name, created_at) VALUES (?1, ?2, ?3, ?4)")
        .bind(&[s(&c.id), s(&c.owner), s(&c.name), s(&c.created_at)])?
        .run()
        .await?;
    Ok(())
}

pub async fn get_client(db: &D1Database, id: &str, owner: &str) -> ApiResult<Option<ClientRow>> {
    Ok(db
        .prepare("SELECT * FROM clients WHERE id = ?1 AND owner = ?2")
        .bind(&[s(id), s(owner)])?
        .first::<ClientRow>(None)
        .await?)
}

pub async fn list_clients(db: &D1Database, owner: &str) -> ApiResult<Vec<ClientRow>> {
    Ok(db
        .prepare("SELECT * FROM clients WHERE owner = ?1 ORDER BY created_at, id")
        .bind(&[s(owner)])?
        .all()
        .await?
        .results()?)
}

pub async fn repos_of_owner(db: &D1Database, owner: &str) -> ApiResult<Vec<RepoRow>> {
    Ok(db
        .prepare("SELECT * FROM repositories WHERE owner = ?1 ORDER BY created_at, id")
        .bind(&[s(owner)])?
        .all()
        .await?
        .results()?)
}

pub async fn get_repo(db: &D1Database, id: &str, owner: &str) -> ApiResult<Option<RepoRow>> {
    Ok(db
        .prepare("SELECT * FROM repositories WHERE id = ?1 AND owner = ?2")
        .bind(&[s(id), s(owner)])?
        .first::<RepoRow>(None)
        .await?)
}

/// Inserts a repository, or answers the existing one for the same client and org/repo.
pub async fn upsert_repo(db: &D1Database, r: &RepoRow) -> ApiResult<RepoRow> {
    db.prepare(
        "INSERT INTO repositories (id, client_id, owner, owner_name, repo_name, default_branch, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (client_id, owner_name, repo_name) DO UPDATE SET default_branch = excluded.default_branch",
    )
    .bind(&[s(&r.id), s(&r.client_id), s(&r.owner), s(&r.owner_name), s(&r.repo_name), s(&r.default_branch), s(&r.created_at)])?
    .run()
    .await?;
    db.prepare("SELECT * FROM repositories WHERE client_id = ?1 AND owner_name = ?2 AND repo_name = ?3")
        .bind(&[s(&r.client_id), s(&r.owner_name), s(&r.repo_name)])?
        .first::<RepoRow>(None)
        .await?
        .ok_or_else(|| ApiError::Internal("repository vanished after insert".into()))
}

// ---- runners ----

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerRow {
    pub id: String,
    pub name: String,
    pub token_hash: String,
    pub created_at: String,
}

pub async fn insert_runner(db: &D1Database, r: &RunnerRow) -> ApiResult<()> {
    db.prepare("INSERT INTO runners (id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)")
        .bind(&[s(&r.id), s(&r.name), s(&r.token_hash), s(&r.created_at)])?
        .run()
        .await?;
    Ok(())
}

pub async fn runner_by_token_hash(db: &D1Database, hash: &str) -> ApiResult<Option<RunnerRow>> {
    Ok(db
        .prepare("SELECT id, name, token_hash, created_at FROM runners WHERE token_hash = ?1")
        .bind(&[s(hash)])?
        .first::<RunnerRow>(None)
        .await?)
}

// ---- repository grants ----

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRow {
    pub id: String,
    pub owner: String,
    pub repository: String,
    pub created_at: String,
}

impl GrantRow {
    pub fn view(&self) -> kiln_schemas::grants::Grant {
        kiln_schemas::grants::Grant {
            id: self.id.clone(),
            owner: self.owner.clone(),
            repository: self.repository.clone(),
            created_at: self.created_at.clone(),
        }
    }
}

/// Inserts a grant, or answers the existing one for the same owner and repository (`false`).
pub async fn insert_grant(db: &D1Database, g: &GrantRow) -> ApiResult<(GrantRow, bool)> {
    let result = db
        .prepare(
            "INSERT INTO grants (id, owner, repository, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (owner, repository) DO NOTHING",
        )
        .bind(&[s(&g.id), s(&g.owner), s(&g.repository), s(&g.created_at)])?
        .run()
        .await?;
    let inserted = result.meta()?.and_then(|m| m.changes).unwrap_or(0) > 0;
    let row = db
        .prepare("SELECT * FROM grants WHERE owner = ?1 AND repository = ?2")
        .bind(&[s(&g.owner), s(&g.repository)])?
        .first::<GrantRow>(None)
        .await?
        .ok_or_else(|| ApiError::Internal("grant vanished after insert".into()))?;
    Ok((row, inserted))
}

/// Every grant, or those stored for exactly `owner`.
pub async fn list_grants(db: &D1Database, owner: Option<&str>) -> ApiResult<Vec<GrantRow>> {
    let stmt = match owner {
        Some(o) => db.prepare("SELECT * FROM grants WHERE owner = ?1 ORDER BY created_at, id").bind(&[s(o)])?,
        None => db.prepare("SELECT * FROM grants ORDER BY created_at, id"),
    };
    Ok(stmt.all().await?.results()?)
}

/// The grants that apply to a user: to everyone, to their id, to their email.
pub async fn grants_of_user(db: &D1Database, user_id: &str, email: &str) -> ApiResult<Vec<GrantRow>> {
    Ok(db
        .prepare("SELECT * FROM grants WHERE owner IN ('*', ?1, ?2) ORDER BY created_at, id")
        .bind(&[s(&user_id.to_ascii_lowercase()), s(&email.to_ascii_lowercase())])?
        .all()
        .await?
        .results()?)
}

/// Deletes a grant; `false` when there was none.
pub async fn delete_grant(db: &D1Database, id: &str) -> ApiResult<bool> {
    let result = db.prepare("DELETE FROM grants WHERE id = ?1").bind(&[s(id)])?.run().await?;
    Ok(result.meta()?.and_then(|m| m.changes).unwrap_or(0) > 0)
}

// ---- app builds (migration 0005): written by the job's room ----

/// Sets whether an app build is paused (the room's `is_paused`, copied when it changes).
pub async fn set_job_paused(db: &D1Database, id: &str, paused: bool, now: &str) -> ApiResult<()> {
    db.prepare("UPDATE jobs SET is_paused = ?2, updated_at = ?3 WHERE id = ?1")
        .bind(&[s(id), n(paused as i64), s(now)])?
        .run()
        .await?;
    Ok(())
}

/// The job's App: inserted with `new_id` the first time, its PRD and spec replaced after that.
pub async fn upsert_app(
    db: &D1Database,
    new_id: &str,
    job_id: &str,
    owner: &str,
    spec: &serde_json::Value,
    prd_markdown: &str,
    now: &str,
) -> ApiResult<()> {
    db.prepare(
        "INSERT INTO apps (id, job_id, owner, spec, prd_markdown, prd_generated_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6)
         ON CONFLICT (job_id) DO UPDATE SET spec = excluded.spec, prd_markdown = excluded.prd_markdown,
           prd_generated_at = excluded.prd_generated_at, updated_at = excluded.updated_at",
    )
    .bind(&[s(new_id), s(job_id), s(owner), s(&spec.to_string()), s(prd_markdown), s(now)])?
    .run()
    .await?;
    Ok(())
}

/// Replaces a job's backlog with `tickets` (in their order) in one batch.
pub async fn replace_tickets(
    db: &D1Database,
    job_id: &str,
    owner: &str,
    tickets: &[kiln_schemas::app::Ticket],
    now: &str,
) -> ApiResult<()> {
    let mut stmts = vec![db.prepare("DELETE FROM tickets WHERE job_id = ?1").bind(&[s(job_id)])?];
    for (i, t) in tickets.iter().enumerate() {
        stmts.push(
            db.prepare(
                "INSERT INTO tickets (id, job_id, owner, parent_id, type, title, description, status, assigned_to,
                   dependencies, ordinal, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
            )
            .bind(&[
                s(&t.id),
                s(job_id),
                s(owner),
                opt(t.parent_id.as_deref()),
                s(t.kind.as_str()),
                s(&t.title),
                s(&t.description),
                s(t.status.as_str()),
                s(&t.assigned_to),
                s(&serde_json::to_string(&t.dependencies)?),
                n(i as i64),
                s(now),
            ])?,
        );
    }
    db.batch(stmts).await?;
    Ok(())
}

/// Sets one ticket's status (and who builds it, when known).
pub async fn set_ticket_status(
    db: &D1Database,
    job_id: &str,
    ticket_id: &str,
    status: kiln_schemas::app::TicketStatus,
    assigned_to: &str,
    now: &str,
) -> ApiResult<()> {
    db.prepare("UPDATE tickets SET status = ?3, assigned_to = ?4, updated_at = ?5 WHERE id = ?2 AND job_id = ?1")
        .bind(&[s(job_id), s(ticket_id), s(status.as_str()), s(assigned_to), s(now)])?
        .run()
        .await?;
    Ok(())
}

/// Keeps an app build's continuation requirements in its row (`params.continuation`).
pub async fn set_job_continuation(db: &D1Database, id: &str, text: &str) -> ApiResult<()> {
    db.prepare(
        "UPDATE jobs SET params = json_set(CASE WHEN json_valid(params) THEN params ELSE '{}' END, '$.continuation', ?2)
         WHERE id = ?1",
    )
    .bind(&[s(id), s(text)])?
    .run()
    .await?;
    Ok(())
}

/// Writes a landing page's status (its room's copy at a status change of one of its jobs).
pub async fn set_page_status(db: &D1Database, page_id: &str, page: &crate::landing_room::PageStatus, now: &str) -> ApiResult<()> {
    let sections = page.sections.as_ref().and_then(|v| serde_json::to_string(v).ok());
    db.prepare(
        "UPDATE landing_pages SET status = ?2, preview_url = COALESCE(?3, preview_url),
           sections = COALESCE(?4, sections), updated_at = ?5 WHERE id = ?1",
    )
    .bind(&[s(page_id), s(&page.status), opt(page.preview_url.as_deref()), opt(sections.as_deref()), s(now)])?
    .run()
    .await?;
    Ok(())
}

/// A landing page's `business_data` (the init payload), whoever owns it (the queue's dispatch).
pub async fn page_business_data(db: &D1Database, page_id: &str) -> ApiResult<Option<serde_json::Value>> {
    #[derive(Deserialize)]
    struct Row {
        business_data: String,
    }
    let row = db.prepare("SELECT business_data FROM landing_pages WHERE id = ?1").bind(&[s(page_id)])?.first::<Row>(None).await?;
    Ok(row.map(|r| serde_json::from_str(&r.business_data).unwrap_or(serde_json::Value::Null)))
}
