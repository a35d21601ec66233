//! Storage of seed 001's landing-page face (`/v1/*`): the D1 rows it reads and writes (landing
//! jobs, landing pages), their seed 001 views, the node events of a job's log as seed 001 shows
//! them, and the query and body checks of the face. Pure and natively tested, but the D1
//! statements (wasm32 only).

use kiln_schemas::app::event_id;
use kiln_schemas::events::{EventBody, ServerEvent};
use kiln_schemas::landing::{landing_status, parse_payload, LandingJobView, LandingPageView, NodeEventView, END_NODE};
use kiln_schemas::status::{JobStatus, JobType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::app_store::Scope;

/// `GET /v1/jobs` and `GET /v1/landing-pages` answer this many by default, at most [`MAX_LIST`].
pub const DEFAULT_LIST: i64 = 50;
pub const MAX_LIST: i64 = 100;
/// The most sections a page may be given by `PATCH`.
pub const MAX_SECTIONS: usize = 100;

/// A landing job's row of `jobs`: the columns the face renders.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LandingJobRow {
    pub id: String,
    pub owner: String,
    pub job_type: String,
    pub status: String,
    pub prompt: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub landing_page_id: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_ms: i64,
}

/// Seed 001's `type` of a landing kind.
pub fn kind_name(t: JobType) -> &'static str {
    match t {
        JobType::LandingChat => "chat",
        _ => "init",
    }
}

/// Seed 001's `description` of a landing kind.
pub fn description(t: JobType) -> &'static str {
    match t {
        JobType::LandingChat => "Asynchronous chat graph execution",
        _ => "Asynchronous init graph execution",
    }
}

/// Seed 001's `title` of a landing kind.
pub fn title(t: JobType) -> &'static str {
    match t {
        JobType::LandingChat => "Chat request",
        _ => "Init request",
    }
}

/// A job's node events as its view needs them: how many the job has, the ones answered (all, or
/// those from an index on), and the last of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePage {
    pub total: u64,
    pub events: Vec<NodeEventView>,
    pub last: Option<NodeEventView>,
}

impl NodePage {
    /// All of a job's node events.
    pub fn whole(all: Vec<NodeEventView>) -> NodePage {
        NodePage { total: all.len() as u64, last: all.last().cloned(), events: all }
    }
}

/// The status an `__end__` node says its job ended with.
pub fn end_status(end: &NodeEventView) -> Option<&'static str> {
    match end.event_type.as_str() {
        "job_completed" => Some("completed"),
        "job_failed" => Some("failed"),
        "job_cancelled" => Some("cancelled"),
        _ => None,
    }
}

impl LandingJobRow {
    pub fn job_type(&self) -> JobType {
        JobType::parse(&self.job_type).unwrap_or(JobType::LandingInit)
    }

    pub fn core_status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    /// The job as seed 001 shows it, with the `page` of its node events answered (all of them, or
    /// from `from` on). The status is the row's, unless the log already holds the `__end__` node
    /// (the room writes it with the terminal status, and no node event after it; its D1 copy
    /// follows): read the row before the log, and a terminal status always comes with its
    /// `__end__`.
    pub fn view(&self, page: NodePage, from: Option<u64>) -> LandingJobView {
        let NodePage { total, events, last } = page;
        let end = last.as_ref().filter(|e| e.node == END_NODE);
        let status = end.and_then(end_status).unwrap_or_else(|| landing_status(self.core_status())).to_string();
        let error_message = self
            .error_message
            .clone()
            .or_else(|| end.filter(|e| e.event_type == "job_failed").map(|e| e.message.clone()));
        let mut updated_at = self.updated_at.clone();
        if let Some(last) = &last {
            if last.timestamp > updated_at {
                updated_at = last.timestamp.clone();
            }
        }
        let t = self.job_type();
        LandingJobView {
            id: self.id.clone(),
            kind: kind_name(t).to_string(),
            status,
            session_id: self.session_id.clone().unwrap_or_default(),
            user_id: self.owner.clone(),
            title: self.title.clone().unwrap_or_else(|| title(t).to_string()),
            description: description(t).to_string(),
            events,
            created_at: self.created_at.clone(),
            updated_at,
            error_message,
            next_after: from.map(|_| total),
        }
    }

    /// The job in a list: no `events` key (a list reads no room; poll the job for them).
    pub fn list_view(&self) -> Value {
        let mut v = serde_json::to_value(self.view(NodePage::default(), None)).unwrap_or(Value::Null);
        if let Some(m) = v.as_object_mut() {
            m.remove("events");
        }
        v
    }
}

/// A node event of a job's log as seed 001 shows it (`None` for the log's other events).
pub fn node_view(job_id: &str, ev: &ServerEvent) -> Option<NodeEventView> {
    match &ev.body {
        EventBody::Node { node, event_type, message, data, timestamp } => Some(NodeEventView {
            id: event_id(job_id, ev.seq),
            node: node.clone(),
            timestamp: timestamp.clone(),
            event_type: event_type.clone(),
            message: message.clone(),
            data: if data.is_null() { Value::Object(Map::new()) } else { data.clone() },
        }),
        _ => None,
    }
}

/// One Server-Sent Event of a node event: `id` is its index in the job's events.
pub fn sse_frame(index: u64, ev: &NodeEventView) -> String {
    let data = serde_json::to_string(ev).unwrap_or_default();
    // An event type is one line; a JSON text has no raw newline.
    let event = ev.event_type.replace(['\r', '\n'], " ");
    format!("id: {index}\nevent: {event}\ndata: {data}\n\n")
}

/// An event index of `?after=`: a whole number from 0.
pub fn parse_index(name: &str, v: &str) -> Result<u64, String> {
    v.trim().parse::<u64>().map_err(|_| format!("{name} must be an event index: a whole number from 0"))
}

/// The first event index a stream sends: after `Last-Event-ID` (the last one the client saw), else
/// from `?after=`, else from 0.
pub fn stream_start(last_event_id: Option<&str>, after: Option<&str>) -> Result<u64, String> {
    match (last_event_id.map(str::trim).filter(|s| !s.is_empty()), after) {
        (Some(id), _) => Ok(parse_index("Last-Event-ID", id)? + 1),
        (None, Some(a)) => parse_index("after", a),
        (None, None) => Ok(0),
    }
}

/// `?limit=`: 1 to [`MAX_LIST`], [`DEFAULT_LIST`] when absent.
pub fn parse_limit(v: Option<&str>) -> Result<i64, String> {
    match v {
        None => Ok(DEFAULT_LIST),
        Some(v) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| format!("limit must be a number from 1 to {MAX_LIST}")),
    }
}

/// `GET /v1/jobs`'s filters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobFilter {
    pub session_id: Option<String>,
    /// The core statuses a seed 001 status stands for.
    pub statuses: Option<Vec<&'static str>>,
    pub limit: i64,
}

/// The seed 001 statuses a job list filters by.
pub const JOB_STATUSES: [&str; 5] = ["pending", "running", "completed", "failed", "cancelled"];

/// Reads `?session_id=`, `?status=` (seed 001's names) and `?limit=`; other parameters are
/// ignored.
pub fn parse_job_filter<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<JobFilter, String> {
    let mut f = JobFilter { limit: DEFAULT_LIST, ..Default::default() };
    for (k, v) in pairs {
        match k {
            "session_id" => f.session_id = Some(v.to_string()),
            "status" => {
                f.statuses = Some(match v {
                    "pending" => vec!["queued", "collecting"],
                    "running" => vec!["running"],
                    "completed" => vec!["completed"],
                    "failed" => vec!["failed"],
                    "cancelled" => vec!["cancelled"],
                    _ => return Err(format!("status must be one of {}", JOB_STATUSES.join(", "))),
                })
            }
            "limit" => f.limit = parse_limit(Some(v))?,
            _ => {}
        }
    }
    Ok(f)
}

/// A row of `landing_pages`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageRow {
    pub id: String,
    pub owner: String,
    pub session_id: String,
    pub status: String,
    #[serde(default)]
    pub preview_url: Option<String>,
    pub business_data: String,
    pub sections: String,
    pub created_at: String,
    pub updated_at: String,
}

impl PageRow {
    pub fn view(&self) -> LandingPageView {
        let parse = |s: &str, empty: Value| serde_json::from_str(s).unwrap_or(empty);
        LandingPageView {
            id: self.id.clone(),
            session_id: self.session_id.clone(),
            status: self.status.clone(),
            preview_url: self.preview_url.clone(),
            business_data: parse(&self.business_data, Value::Object(Map::new())),
            sections: parse(&self.sections, Value::Array(vec![])),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// `PATCH /v1/landing-pages/<id>`'s body, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PagePatch {
    /// Checked as an init payload is.
    pub business_data: Option<Map<String, Value>>,
    /// Strings or objects.
    pub sections: Option<Vec<Value>>,
}

/// A patch holds `business_data` (an object, checked as an init payload) and/or `sections` (an
/// array of strings or objects); anything else is refused.
pub fn parse_page_patch(body: &Value) -> Result<PagePatch, String> {
    let Some(m) = body.as_object() else { return Err("the body must be a JSON object".into()) };
    if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "business_data" | "sections")) {
        return Err(format!("{k} cannot be changed: a patch holds business_data and/or sections"));
    }
    let mut p = PagePatch::default();
    if let Some(b) = m.get("business_data") {
        let checked = parse_payload(&serde_json::json!({ "payload": b }))
            .map_err(|e| e.replacen("payload", "business_data", 1))?;
        p.business_data = Some(checked);
    }
    if let Some(s) = m.get("sections") {
        let Value::Array(items) = s else { return Err("sections must be an array".into()) };
        if items.len() > MAX_SECTIONS {
            return Err(format!("sections may hold at most {MAX_SECTIONS} entries"));
        }
        if !items.iter().all(|i| i.is_string() || i.is_object()) {
            return Err("sections must hold strings or objects".into());
        }
        if serde_json::to_vec(s).map(|v| v.len()).unwrap_or(usize::MAX) > kiln_schemas::landing::MAX_PAYLOAD_BYTES {
            return Err(format!("sections are over {} bytes", kiln_schemas::landing::MAX_PAYLOAD_BYTES));
        }
        p.sections = Some(items.clone());
    }
    if p.business_data.is_none() && p.sections.is_none() {
        return Err("a patch holds business_data and/or sections".into());
    }
    Ok(p)
}

/// The R2 prefix of a page's preview.
pub fn preview_prefix(page_id: &str) -> String {
    format!("previews/{page_id}/")
}

#[cfg(target_arch = "wasm32")]
pub use d1::*;

#[cfg(target_arch = "wasm32")]
mod d1 {
    use wasm_bindgen::JsValue;
    use worker::D1Database;

    use super::{JobFilter, LandingJobRow, PageRow, Scope};
    use crate::http::ApiResult;
    use crate::store::{n, opt, s};

    fn scope(sc: Scope) -> JsValue {
        opt(sc.owner())
    }

    const JOB_COLUMNS: &str = "id, owner, job_type, status, prompt, title, session_id, landing_page_id, error_message,
        created_at, updated_at, created_ms";

    /// A landing job by id within `sc`.
    pub async fn get_job(db: &D1Database, id: &str, sc: Scope<'_>) -> ApiResult<Option<LandingJobRow>> {
        Ok(db
            .prepare(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND job_type IN ('landing_init', 'landing_chat')
                 AND (?2 IS NULL OR owner = ?2)"
            ))
            .bind(&[s(id), scope(sc)])?
            .first::<LandingJobRow>(None)
            .await?)
    }

    /// Landing jobs within `sc`, newest first.
    pub async fn list_jobs(db: &D1Database, sc: Scope<'_>, f: &JobFilter) -> ApiResult<Vec<LandingJobRow>> {
        // A seed 001 status stands for one or two core ones.
        let first = f.statuses.as_ref().and_then(|s| s.first().copied());
        let second = f.statuses.as_ref().and_then(|s| s.last().copied());
        Ok(db
            .prepare(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE job_type IN ('landing_init', 'landing_chat')
                 AND (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR session_id = ?2)
                 AND (?3 IS NULL OR status IN (?3, ?4))
                 ORDER BY created_ms DESC, id DESC LIMIT ?5"
            ))
            .bind(&[scope(sc), opt(f.session_id.as_deref()), opt(first), opt(second), n(f.limit)])?
            .all()
            .await?
            .results::<LandingJobRow>()?)
    }

    /// The newest job of an owner's session that is still pending or running.
    pub async fn unfinished_job_of_session(db: &D1Database, owner: &str, session_id: &str) -> ApiResult<Option<String>> {
        #[derive(serde::Deserialize)]
        struct Row {
            id: String,
        }
        let row = db
            .prepare(
                "SELECT id FROM jobs WHERE owner = ?1 AND session_id = ?2 AND job_type IN ('landing_init', 'landing_chat')
                 AND status IN ('queued', 'running') ORDER BY created_ms DESC, id DESC LIMIT 1",
            )
            .bind(&[s(owner), s(session_id)])?
            .first::<Row>(None)
            .await?;
        Ok(row.map(|r| r.id))
    }

    /// Whether a job of the page is pending or running.
    pub async fn page_busy(db: &D1Database, page_id: &str) -> ApiResult<bool> {
        #[derive(serde::Deserialize)]
        struct Row {
            #[allow(dead_code)]
            id: String,
        }
        let row = db
            .prepare(
                "SELECT id FROM jobs WHERE landing_page_id = ?1 AND job_type IN ('landing_init', 'landing_chat')
                 AND status IN ('queued', 'running') LIMIT 1",
            )
            .bind(&[s(page_id)])?
            .first::<Row>(None)
            .await?;
        Ok(row.is_some())
    }

    /// Creates the session's page unless the owner has one; `true` when this call created it.
    pub async fn insert_page_if_absent(
        db: &D1Database,
        id: &str,
        owner: &str,
        session_id: &str,
        business_data: &str,
        now: &str,
    ) -> ApiResult<bool> {
        let result = db
            .prepare(
                "INSERT INTO landing_pages (id, owner, session_id, status, business_data, sections, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'pending', ?4, '[]', ?5, ?5) ON CONFLICT (owner, session_id) DO NOTHING",
            )
            .bind(&[s(id), s(owner), s(session_id), s(business_data), s(now)])?
            .run()
            .await?;
        Ok(result.meta()?.and_then(|m| m.changes).unwrap_or(0) > 0)
    }

    pub async fn page_of_session(db: &D1Database, session_id: &str, sc: Scope<'_>) -> ApiResult<Option<PageRow>> {
        Ok(db
            .prepare("SELECT * FROM landing_pages WHERE session_id = ?1 AND (?2 IS NULL OR owner = ?2) ORDER BY created_at LIMIT 1")
            .bind(&[s(session_id), scope(sc)])?
            .first::<PageRow>(None)
            .await?)
    }

    pub async fn get_page(db: &D1Database, id: &str, sc: Scope<'_>) -> ApiResult<Option<PageRow>> {
        Ok(db
            .prepare("SELECT * FROM landing_pages WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)")
            .bind(&[s(id), scope(sc)])?
            .first::<PageRow>(None)
            .await?)
    }

    /// Pages within `sc`, newest first.
    pub async fn list_pages(db: &D1Database, sc: Scope<'_>, limit: i64) -> ApiResult<Vec<PageRow>> {
        Ok(db
            .prepare("SELECT * FROM landing_pages WHERE (?1 IS NULL OR owner = ?1) ORDER BY created_at DESC, id DESC LIMIT ?2")
            .bind(&[scope(sc), n(limit)])?
            .all()
            .await?
            .results::<PageRow>()?)
    }

    /// Sets what a patch or an init gives (`None` leaves a column as it is).
    pub async fn update_page(db: &D1Database, id: &str, business_data: Option<&str>, sections: Option<&str>, now: &str) -> ApiResult<()> {
        db.prepare(
            "UPDATE landing_pages SET business_data = COALESCE(?2, business_data), sections = COALESCE(?3, sections),
               updated_at = ?4 WHERE id = ?1",
        )
        .bind(&[s(id), opt(business_data), opt(sections), s(now)])?
        .run()
        .await?;
        Ok(())
    }

    pub async fn delete_page(db: &D1Database, id: &str) -> ApiResult<()> {
        db.prepare("DELETE FROM landing_pages WHERE id = ?1").bind(&[s(id)])?.run().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(seq: u64, node: &str, event_type: &str, message: &str) -> ServerEvent {
        ServerEvent {
            seq,
            body: EventBody::Node {
                node: node.into(),
                event_type: event_type.into(),
                message: message.into(),
                data: Value::Null,
                timestamp: format!("2026-01-01T00:00:0{seq}.000Z"),
            },
        }
    }

    fn row(status: &str) -> LandingJobRow {
        LandingJobRow {
            id: "j".into(),
            owner: "u".into(),
            job_type: "landing_chat".into(),
            status: status.into(),
            prompt: "more blue".into(),
            title: Some("Chat request".into()),
            session_id: Some("s1".into()),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            updated_at: "2026-01-01T00:00:01.000Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn node_events_only_with_ids_and_objects() {
        let status = ServerEvent {
            seq: 1,
            body: EventBody::JobStatus {
                job_id: "j".into(),
                status: "queued".into(),
                message: "m".into(),
                timestamp: "t".into(),
                pr_url: None,
                completion_reason: None,
                total_iterations: None,
                error_message: None,
            },
        };
        assert!(node_view("j", &status).is_none());
        let v = node_view("j", &node(2, "router", "node", "Planning")).unwrap();
        assert_eq!(v.id, "j:2");
        assert_eq!(v.data, json!({}));
    }

    #[test]
    fn the_end_node_decides_the_status_and_after_slices() {
        let evs: Vec<_> = [node(2, "router", "node", "a"), node(3, "router", "node_completed", "b"), node(5, END_NODE, "job_failed", "boom")]
            .iter()
            .map(|e| node_view("j", e).unwrap())
            .collect();
        let v = row("running").view(NodePage::whole(evs.clone()), None);
        assert_eq!((v.kind.as_str(), v.status.as_str()), ("chat", "failed"));
        assert_eq!(v.error_message.as_deref(), Some("boom"));
        assert_eq!(v.updated_at, "2026-01-01T00:00:05.000Z");
        assert_eq!(v.description, "Asynchronous chat graph execution");
        assert_eq!(v.next_after, None);
        let json = serde_json::to_value(&v).unwrap();
        assert!(json.get("next_after").is_none());
        // A page from index 1 (as the room answers it): the status still comes from the last.
        let from = |n: usize| NodePage { total: 3, events: evs[n.min(3)..].to_vec(), last: evs.last().cloned() };
        let v = row("running").view(from(1), Some(1));
        assert_eq!(v.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["j:3", "j:5"]);
        assert_eq!(v.next_after, Some(3));
        let v = row("running").view(from(9), Some(9));
        assert!(v.events.is_empty());
        assert_eq!((v.status.as_str(), v.next_after), ("failed", Some(3)));
        assert_eq!(v.updated_at, "2026-01-01T00:00:05.000Z");
        let running = NodePage { total: 2, events: vec![], last: Some(evs[1].clone()) };
        assert_eq!(row("running").view(running, Some(2)).status, "running");
        assert_eq!(row("queued").view(NodePage::default(), None).status, "pending");
        assert!(row("queued").list_view().get("events").is_none());
    }

    #[test]
    fn frames_and_cursors() {
        let v = node_view("j", &node(2, "coder", "tool", "Created 2 file(s)")).unwrap();
        let f = sse_frame(4, &v);
        assert!(f.starts_with("id: 4\nevent: tool\ndata: {"), "{f}");
        assert!(f.ends_with("}\n\n"));
        assert_eq!(f.matches('\n').count(), 4);
        assert_eq!(stream_start(Some("4"), Some("1")), Ok(5));
        assert_eq!(stream_start(None, Some("2")), Ok(2));
        assert_eq!(stream_start(Some(" "), None), Ok(0));
        assert!(stream_start(Some("x"), None).unwrap_err().contains("Last-Event-ID"));
        assert!(stream_start(None, Some("-1")).is_err());
    }

    #[test]
    fn job_filters() {
        let f = parse_job_filter([("status", "pending"), ("session_id", "s"), ("limit", "3")].into_iter()).unwrap();
        assert_eq!(f.statuses, Some(vec!["queued", "collecting"]));
        assert_eq!((f.session_id.as_deref(), f.limit), (Some("s"), 3));
        assert_eq!(parse_job_filter(std::iter::empty()).unwrap().limit, DEFAULT_LIST);
        assert!(parse_job_filter([("status", "queued")].into_iter()).is_err());
        assert!(parse_job_filter([("limit", "0")].into_iter()).is_err());
        assert!(parse_job_filter([("limit", "101")].into_iter()).is_err());
    }

    #[test]
    fn page_patches() {
        let p = parse_page_patch(&json!({"sections": ["hero", {"id": "faq"}]})).unwrap();
        assert_eq!(p.sections.unwrap().len(), 2);
        let p = parse_page_patch(&json!({"business_data": {"campaign": {"productName": "A"}, "x": 1}})).unwrap();
        assert_eq!(p.business_data.unwrap()["x"], 1);
        for (bad, want) in [
            (json!([]), "object"),
            (json!({}), "business_data and/or sections"),
            (json!({"status": "generated"}), "status cannot"),
            (json!({"sections": "hero"}), "array"),
            (json!({"sections": [1]}), "strings or objects"),
            (json!({"business_data": []}), "business_data must be"),
            (json!({"business_data": {"campaign": {"objective": 3}}}), "campaign.objective"),
        ] {
            let e = parse_page_patch(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn page_views_parse_their_json() {
        let p = PageRow { business_data: "{\"a\":1}".into(), sections: "[\"hero\"]".into(), ..Default::default() };
        let v = p.view();
        assert_eq!(v.business_data, json!({"a": 1}));
        assert_eq!(v.sections, json!(["hero"]));
    }
}
