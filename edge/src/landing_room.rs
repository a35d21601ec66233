//! A landing job's room logic (seed 001), pure and natively tested: the `__end__` node its room
//! writes at every terminal transition, the page status each of its statuses implies, and the
//! queue's serial key that keeps one session's jobs one at a time.

use kiln_schemas::landing::END_NODE;
use kiln_schemas::status::JobStatus;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The serial key of a landing page's jobs: the queue leases at most one job per key at a time.
pub fn serial_key(landing_page_id: &str) -> String {
    format!("landing:{landing_page_id}")
}

/// The `__end__` node of a job that became `status` (terminal): `(node, event_type, message,
/// data)`. Completed: `job_completed` with the finished `result` (or `{}`); failed: `job_failed`
/// with the error as message; cancelled: `job_cancelled`. `None` for a status that does not end.
pub fn end_node(status: JobStatus, message: &str, error: Option<&str>, result: Option<&Value>) -> Option<(String, String, String, Value)> {
    let (event_type, message, data) = match status {
        JobStatus::Completed => {
            let data = result.filter(|r| r.is_object()).cloned().unwrap_or_else(|| json!({}));
            ("job_completed", message.to_string(), data)
        }
        JobStatus::Failed => {
            let error = error.filter(|e| !e.is_empty()).unwrap_or(message);
            ("job_failed", error.to_string(), json!({ "error": error }))
        }
        JobStatus::Cancelled => ("job_cancelled", message.to_string(), json!({})),
        _ => return None,
    };
    Some((END_NODE.to_string(), event_type.to_string(), message, data))
}

/// What a landing job's room writes to its page (`landing_pages`) at a status change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageStatus {
    /// `generating`, `generated` or `failed`.
    pub status: String,
    /// Set with `generated` (kept when `None`).
    pub preview_url: Option<String>,
    /// The sections (a JSON array) with `generated` (kept when `None`).
    pub sections: Option<Value>,
}

impl PageStatus {
    /// The page status a landing job's status implies: running → `generating`, completed →
    /// `generated` with the `result`'s `preview_url` and `sections`, failed or cancelled →
    /// `failed`; queued: none (the page keeps what it has).
    pub fn of(status: JobStatus, result: Option<&Value>) -> Option<PageStatus> {
        let (status, preview_url, sections) = match status {
            JobStatus::Running => ("generating", None, None),
            JobStatus::Completed => (
                "generated",
                result.and_then(|r| r.get("preview_url")).and_then(Value::as_str).map(str::to_string),
                result.and_then(|r| r.get("sections")).filter(|v| v.is_array()).cloned(),
            ),
            JobStatus::Failed | JobStatus::Cancelled => ("failed", None, None),
            JobStatus::Queued | JobStatus::Collecting => return None,
        };
        Some(PageStatus { status: status.into(), preview_url, sections })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_landing_jobs_status_sets_its_pages() {
        let result = json!({"preview_url": "https://e/preview/p/", "sections": ["hero", "faq"]});
        assert_eq!(PageStatus::of(JobStatus::Queued, None), None);
        assert_eq!(PageStatus::of(JobStatus::Running, None).unwrap().status, "generating");
        let done = PageStatus::of(JobStatus::Completed, Some(&result)).unwrap();
        assert_eq!(done.status, "generated");
        assert_eq!(done.preview_url.as_deref(), Some("https://e/preview/p/"));
        assert_eq!(done.sections, Some(json!(["hero", "faq"])));
        let bare = PageStatus::of(JobStatus::Completed, Some(&json!({"sections": "x"}))).unwrap();
        assert_eq!((bare.preview_url, bare.sections), (None, None), "absent or malformed: kept");
        assert_eq!(PageStatus::of(JobStatus::Failed, None).unwrap().status, "failed");
        assert_eq!(PageStatus::of(JobStatus::Cancelled, Some(&result)).unwrap().status, "failed");
    }

    #[test]
    fn every_end_has_its_node() {
        let r = json!({"preview_url": "u"});
        let (node, kind, _, data) = end_node(JobStatus::Completed, "done", None, Some(&r)).unwrap();
        assert_eq!((node.as_str(), kind.as_str(), data), (END_NODE, "job_completed", r));
        assert_eq!(end_node(JobStatus::Completed, "done", None, None).unwrap().3, json!({}));
        let (_, kind, message, data) = end_node(JobStatus::Failed, "job failed", Some("no build"), None).unwrap();
        assert_eq!((kind.as_str(), message.as_str(), data["error"].as_str()), ("job_failed", "no build", Some("no build")));
        assert_eq!(end_node(JobStatus::Failed, "runner lost", None, None).unwrap().2, "runner lost");
        assert_eq!(end_node(JobStatus::Cancelled, "cancelled by user", None, None).unwrap().1, "job_cancelled");
        assert!(end_node(JobStatus::Running, "x", None, None).is_none());
        assert_eq!(serial_key("p1"), "landing:p1");
    }
}
