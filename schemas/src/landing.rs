//! Seed 001's landing-page face: init and chat jobs over a session, their node events, landing
//! pages and their previews. Every shape here is a view of the one core: a job (kinds
//! `landing_init`, `landing_chat`), its event log (`node` events), and the rows its room writes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::status::JobStatus;

/// The longest session id a client may choose.
pub const MAX_SESSION_ID_CHARS: usize = 128;
/// The largest init payload, serialized.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The longest chat message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 10_000;
/// The node of a job's last event.
pub const END_NODE: &str = "__end__";
/// How many times `deployment_fixer` tries before the job fails.
pub const MAX_FIX_ATTEMPTS: u32 = 3;
/// The largest preview a deployer may publish (all files).
pub const MAX_PREVIEW_BYTES: usize = 8 * 1024 * 1024;
/// The largest session workspace (a git bundle) kept between jobs.
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;

/// Seed 001's status of a landing job: `pending → running → completed | failed | cancelled`.
pub fn landing_status(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Collecting | JobStatus::Queued => "pending",
        JobStatus::Running => "running",
        JobStatus::Completed => "completed",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

/// A session id: from the body's `session_id` when present (it wins), else the `X-Session-Id`
/// header. 1–128 characters of ASCII letters, digits, `-`, `_`, `.`, `:`.
pub fn session_id(body: Option<&Value>, header: Option<&str>) -> Result<String, String> {
    let from_body = match body.and_then(|b| b.get("session_id")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err("session_id must be a string".into()),
    };
    let id = from_body
        .or(header)
        .ok_or("a session is required: send the X-Session-Id header or session_id in the body")?;
    if id.is_empty() || id.chars().count() > MAX_SESSION_ID_CHARS {
        return Err(format!("session_id must be 1 to {MAX_SESSION_ID_CHARS} characters"));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')) {
        return Err("session_id may hold only ASCII letters, digits, '-', '_', '.' and ':'".into());
    }
    Ok(id.to_string())
}

/// `POST /v1/agent/init`'s `payload`, checked: an object whose documented sections
/// (`campaign`, `audience`, `messaging`, `branding`) are objects when present and whose documented
/// fields have their documented types; unknown fields are kept as sent.
pub fn parse_payload(body: &Value) -> Result<Map<String, Value>, String> {
    let payload = match body.get("payload") {
        Some(Value::Object(m)) => m,
        Some(_) => return Err("payload must be a JSON object".into()),
        None => return Err("payload is required".into()),
    };
    if serde_json::to_vec(payload).map(|v| v.len()).unwrap_or(usize::MAX) > MAX_PAYLOAD_BYTES {
        return Err(format!("payload is over {MAX_PAYLOAD_BYTES} bytes"));
    }
    // (section, field, kind): s = string, a = array of strings, o = object of strings.
    const FIELDS: &[(&str, &str, char)] = &[
        ("campaign", "objective", 's'),
        ("campaign", "productName", 's'),
        ("campaign", "primaryOffer", 's'),
        ("audience", "description", 's'),
        ("audience", "personaKeywords", 'a'),
        ("audience", "uvp", 's'),
        ("messaging", "tone", 's'),
        ("messaging", "seoKeywords", 'a'),
        ("messaging", "eventTracking", 'a'),
        ("branding", "theme", 's'),
        ("branding", "colorPalette", 'o'),
        ("branding", "fonts", 's'),
        ("branding", "layoutPreference", 's'),
        ("branding", "sections", 'a'),
    ];
    for section in ["campaign", "audience", "messaging", "branding"] {
        match payload.get(section) {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => return Err(format!("payload.{section} must be an object")),
        }
    }
    for (section, field, kind) in FIELDS {
        let Some(v) = payload.get(*section).and_then(|s| s.get(*field)) else { continue };
        let ok = match (kind, v) {
            (_, Value::Null) => true,
            ('s', Value::String(_)) => true,
            ('a', Value::Array(items)) => items.iter().all(Value::is_string),
            ('o', Value::Object(m)) => m.values().all(Value::is_string),
            _ => false,
        };
        if !ok {
            let want = match kind {
                's' => "a string",
                'a' => "an array of strings",
                _ => "an object of strings",
            };
            return Err(format!("payload.{section}.{field} must be {want}"));
        }
    }
    Ok(payload.clone())
}

/// `POST /v1/agent/chat`'s `message`, checked.
pub fn parse_message(body: &Value) -> Result<String, String> {
    let m = body.get("message").and_then(Value::as_str).ok_or("message is required and must be a string")?;
    if m.trim().is_empty() {
        return Err("message may not be blank".into());
    }
    let n = m.chars().count();
    if n > MAX_MESSAGE_CHARS {
        return Err(format!("message is {n} characters; at most {MAX_MESSAGE_CHARS} are allowed"));
    }
    Ok(m.to_string())
}

/// Answer of `POST /v1/agent/init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InitAnswer {
    pub job_id: String,
    pub session_id: String,
    /// `null` when the session already had its landing page.
    pub landing_page_id: Option<String>,
}

/// Answer of `POST /v1/agent/chat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatAnswer {
    pub reply: String,
    pub job_id: String,
}

impl ChatAnswer {
    pub fn new(job_id: &str) -> ChatAnswer {
        ChatAnswer { reply: format!("Chat job accepted. Poll /v1/jobs/{job_id} for progress."), job_id: job_id.into() }
    }
}

/// One node event as seed 001 renders it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeEventView {
    /// `<job_id>:<seq>` (`crate::app::event_id`).
    pub id: String,
    pub node: String,
    pub timestamp: String,
    /// `node`, `node_completed`, `tool`, `error`, `job_completed`, …
    pub event_type: String,
    pub message: String,
    pub data: Value,
}

/// A landing job as seed 001 renders it (`{"job": …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LandingJobView {
    pub id: String,
    /// `init` or `chat`.
    #[serde(rename = "type")]
    pub kind: String,
    /// [`landing_status`].
    pub status: String,
    pub session_id: String,
    pub user_id: String,
    pub title: String,
    pub description: String,
    pub events: Vec<NodeEventView>,
    pub created_at: String,
    pub updated_at: String,
    pub error_message: Option<String>,
    /// Kiln's addition: with `?after=N`, the index to pass next (the number of events so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<u64>,
}

/// `{"job": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LandingJobEnvelope {
    pub job: LandingJobView,
}

/// A session's landing page (`/v1/landing-pages`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LandingPageView {
    pub id: String,
    pub session_id: String,
    /// `pending`, `generating`, `generated` or `failed`.
    pub status: String,
    pub preview_url: Option<String>,
    /// The init payload as sent.
    pub business_data: Value,
    /// The sections the page has, as the design planner chose them.
    pub sections: Value,
    pub created_at: String,
    pub updated_at: String,
}

pub const PAGE_STATUSES: [&str; 4] = ["pending", "generating", "generated", "failed"];

/// A file of a preview the deployer publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreviewFile {
    /// Relative, `/`-separated (checked with [`preview_path`]).
    pub path: String,
    /// Text as is, or base64 when `base64` is set.
    pub content: String,
    #[serde(default)]
    pub base64: bool,
}

/// `PUT /runner/v1/jobs/<id>/preview?lease_id=`: the built page, replacing the page's preview.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreviewBundle {
    pub files: Vec<PreviewFile>,
}

/// Answer to a [`PreviewBundle`]: where the page is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Published {
    pub preview_url: String,
    pub files: u32,
    pub bytes: u64,
}

/// Checks a path inside a preview (`/preview/<page>/<path>`, or a published file's): relative,
/// `/`-separated, no empty, `.` or `..` segment, no backslash or NUL, at most 512 bytes. The empty
/// path is the page's `index.html`; a path ending in `/` is that directory's `index.html`.
pub fn preview_path(path: &str) -> Result<String, String> {
    if path.len() > 512 || path.contains('\0') || path.contains('\\') {
        return Err("bad preview path".into());
    }
    let mut p = path.trim_start_matches('/').to_string();
    if p.is_empty() || p.ends_with('/') {
        p.push_str("index.html");
    }
    if p.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err("bad preview path".into());
    }
    Ok(p)
}

/// The content type a preview file is served with, by extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" | "md" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_body_session_wins_and_one_is_required() {
        assert_eq!(session_id(Some(&json!({"session_id": "b"})), Some("h")).unwrap(), "b");
        assert_eq!(session_id(Some(&json!({})), Some("h")).unwrap(), "h");
        assert_eq!(session_id(None, Some("campaign-landing-42")).unwrap(), "campaign-landing-42");
        assert!(session_id(Some(&json!({})), None).unwrap_err().contains("X-Session-Id"));
        assert!(session_id(Some(&json!({"session_id": 4})), Some("h")).is_err());
        assert!(session_id(None, Some("../x")).is_err());
        assert!(session_id(None, Some("")).is_err());
        assert!(session_id(None, Some(&"a".repeat(129))).is_err());
    }

    #[test]
    fn payloads_are_typed_and_keep_extras() {
        let ok = json!({"payload": {
            "campaign": {"objective": "signups", "productName": "Aurora"},
            "branding": {"colorPalette": {"primary": "#7C3AED"}, "sections": ["hero"]},
            "extra": {"kept": true}
        }});
        let p = parse_payload(&ok).unwrap();
        assert_eq!(p["extra"]["kept"], true);
        for (bad, want) in [
            (json!({}), "required"),
            (json!({"payload": []}), "object"),
            (json!({"payload": {"campaign": "x"}}), "payload.campaign"),
            (json!({"payload": {"audience": {"personaKeywords": "ops"}}}), "personaKeywords"),
            (json!({"payload": {"branding": {"colorPalette": {"primary": 1}}}}), "colorPalette"),
            (json!({"payload": {"messaging": {"tone": 3}}}), "tone"),
            (json!({"payload": {"x": "y".repeat(MAX_PAYLOAD_BYTES)}}), "bytes"),
        ] {
            let e = parse_payload(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn messages_and_answers() {
        assert_eq!(parse_message(&json!({"message": "more blue"})).unwrap(), "more blue");
        assert!(parse_message(&json!({})).is_err());
        assert!(parse_message(&json!({"message": " "})).is_err());
        assert!(parse_message(&json!({"message": "x".repeat(MAX_MESSAGE_CHARS + 1)})).is_err());
        assert_eq!(ChatAnswer::new("j1").reply, "Chat job accepted. Poll /v1/jobs/j1 for progress.");
        assert_eq!(landing_status(JobStatus::Queued), "pending");
    }

    #[test]
    fn preview_paths_stay_inside() {
        assert_eq!(preview_path("").unwrap(), "index.html");
        assert_eq!(preview_path("/").unwrap(), "index.html");
        assert_eq!(preview_path("css/site.css").unwrap(), "css/site.css");
        assert_eq!(preview_path("docs/").unwrap(), "docs/index.html");
        for bad in ["../x", "a/../../b", "a//b", "./a", "a\\b", "a\0b"] {
            assert!(preview_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(content_type("index.HTML"), "text/html; charset=utf-8");
        assert_eq!(content_type("x"), "application/octet-stream");
    }
}
