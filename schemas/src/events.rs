//! The per-job event log and the live channel (seed 000 §4): what the server sends
//! (`{"kind", "seq", ...}`), what a client may send (`{"kind":"chat","content"}`), and how events
//! render as seed 003's job messages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::{Iteration, JobMessage};
use crate::runner::{UsageReport, UsageTotals};
use crate::status::CompletionReason;

/// Largest chat message a client may send over the socket.
pub const MAX_CHAT_BYTES: usize = 64 * 1024;

/// Which stream a log line came from (seed 003's message types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    System,
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::System => "system",
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One event of a job's log. The tag is seed 000's `kind`; field names follow seed 000 where it
/// defines the kind and are Kiln's own (snake_case) elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind")]
pub enum EventBody {
    /// A status change of the job.
    #[serde(rename = "jobStatus", rename_all = "camelCase")]
    JobStatus {
        job_id: String,
        status: String,
        message: String,
        timestamp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pr_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        completion_reason: Option<CompletionReason>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_iterations: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_message: Option<String>,
    },
    /// A conversation turn from user, agent or system.
    #[serde(rename = "stageUpdate")]
    StageUpdate { role: String, sender: String, content: String, metadata: Value, timestamp: String },
    /// A line of agent output or a system note.
    #[serde(rename = "log")]
    Log { stream: LogStream, content: String, timestamp: String },
    /// A finished ralph iteration.
    #[serde(rename = "iteration")]
    Iteration { iteration: Iteration, timestamp: String },
    /// One structured event of an agent that speaks a JSON stream (`claude-stream-json`).
    #[serde(rename = "agentEvent")]
    AgentEvent { event: Value, timestamp: String },
    /// Tokens and cost of one agent run or LLM step, with the job's totals after it.
    #[serde(rename = "usage")]
    Usage { usage: UsageReport, totals: UsageTotals, timestamp: String },
    /// An executive dialogue turn of an app build's planning (seed 000).
    #[serde(rename = "agentDialogue", rename_all = "camelCase")]
    AgentDialogue { job_id: String, agent: String, message: String, order: u32, timestamp: String },
    /// An app build's PRD and structured spec, saved as its App (seed 000).
    #[serde(rename = "prdReady", rename_all = "camelCase")]
    PrdReady { job_id: String, spec: Value, prd_markdown: String, timestamp: String },
    /// A ticket changed (seed 000): `todo → in_progress → done | failed`, with log snippets or
    /// stage names in `metadata`.
    #[serde(rename = "ticketUpdate", rename_all = "camelCase")]
    TicketUpdate {
        job_id: String,
        ticket_id: String,
        status: String,
        title: String,
        assigned_to: String,
        message: String,
        metadata: Value,
        timestamp: String,
    },
    /// The backlog is about to be rewritten: fetch the tickets again (seed 000).
    #[serde(rename = "ticketReset", rename_all = "camelCase")]
    TicketReset { job_id: String, timestamp: String },
    /// A pipeline node's event (seed 001's job events): `event_type` is `node` (started),
    /// `node_completed`, `tool`, `error`, …; the job's last is node `__end__` with
    /// `job_completed`, `job_failed` or `job_cancelled`, written by the room.
    #[serde(rename = "node")]
    Node { node: String, event_type: String, message: String, data: Value, timestamp: String },
    /// How far a running step is (seed 002's tasks and pipelines): 0–100, the stage it is in
    /// (`generating`, `scoring`, …) and what it reports.
    #[serde(rename = "progress")]
    Progress {
        percent: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<String>,
        data: Value,
        timestamp: String,
    },
}

impl EventBody {
    /// The wire `kind` (the serde tag).
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::JobStatus { .. } => "jobStatus",
            EventBody::StageUpdate { .. } => "stageUpdate",
            EventBody::Log { .. } => "log",
            EventBody::Iteration { .. } => "iteration",
            EventBody::AgentEvent { .. } => "agentEvent",
            EventBody::Usage { .. } => "usage",
            EventBody::AgentDialogue { .. } => "agentDialogue",
            EventBody::PrdReady { .. } => "prdReady",
            EventBody::TicketUpdate { .. } => "ticketUpdate",
            EventBody::TicketReset { .. } => "ticketReset",
            EventBody::Node { .. } => "node",
            EventBody::Progress { .. } => "progress",
        }
    }

    pub fn timestamp(&self) -> &str {
        match self {
            EventBody::JobStatus { timestamp, .. }
            | EventBody::StageUpdate { timestamp, .. }
            | EventBody::Log { timestamp, .. }
            | EventBody::Iteration { timestamp, .. }
            | EventBody::AgentEvent { timestamp, .. }
            | EventBody::Usage { timestamp, .. }
            | EventBody::AgentDialogue { timestamp, .. }
            | EventBody::PrdReady { timestamp, .. }
            | EventBody::TicketUpdate { timestamp, .. }
            | EventBody::TicketReset { timestamp, .. }
            | EventBody::Node { timestamp, .. }
            | EventBody::Progress { timestamp, .. } => timestamp,
        }
    }

    /// This event as one of seed 003's job messages, if it is one.
    pub fn as_job_message(&self) -> Option<JobMessage> {
        let (kind, content) = match self {
            EventBody::JobStatus { message, .. } => ("system", message.clone()),
            EventBody::StageUpdate { role, content, .. } => match role.as_str() {
                "user" => ("user_input", content.clone()),
                "agent" => ("stdout", content.clone()),
                _ => ("system", content.clone()),
            },
            EventBody::Log { stream, content, .. } => (stream.as_str(), content.clone()),
            EventBody::Iteration { iteration, .. } => (
                "system",
                format!(
                    "iteration {} finished (exit code {}){}",
                    iteration.iteration_number,
                    iteration.exit_code.map_or("none".to_string(), |c| c.to_string()),
                    if iteration.promise_detected { ", completion promise detected" } else { "" }
                ),
            ),
            EventBody::AgentEvent { event, .. } => ("stdout", event.to_string()),
            // The runner's system line says the same in words.
            EventBody::Usage { .. } => return None,
            EventBody::AgentDialogue { agent, message, .. } => ("stdout", format!("{agent}: {message}")),
            EventBody::PrdReady { .. } => ("system", "PRD ready".to_string()),
            EventBody::TicketUpdate { title, status, message, .. } => {
                ("system", format!("ticket {title:?} {status}: {message}"))
            }
            EventBody::TicketReset { .. } => return None,
            EventBody::Node { node, event_type, message, .. } => ("system", format!("[{node} {event_type}] {message}")),
            EventBody::Progress { .. } => return None,
        };
        Some(JobMessage { kind: kind.to_string(), content, created_at: self.timestamp().to_string() })
    }
}

/// A message the server sends on `/ws/jobs/<id>/`: an event with its dense per-job `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServerEvent {
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// Sent on the socket when a client message is refused; the socket stays open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename = "error")]
pub struct SocketError {
    pub message: String,
}

/// What a client may send on `/ws/jobs/<id>/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind")]
pub enum ClientMessage {
    #[serde(rename = "chat")]
    Chat { content: String },
}

impl ClientMessage {
    /// Parses and checks a client frame; errors are fit to send back as [`SocketError`].
    pub fn parse(text: &str) -> Result<ClientMessage, String> {
        let value: Value = serde_json::from_str(text).map_err(|_| "message is not valid JSON".to_string())?;
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| "message needs a string field \"kind\"".to_string())?;
        match kind {
            "chat" => {
                let content = value
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| "chat needs a string field \"content\"".to_string())?;
                if content.trim().is_empty() {
                    return Err("chat content is empty".into());
                }
                if content.len() > MAX_CHAT_BYTES {
                    return Err(format!("chat content is over {MAX_CHAT_BYTES} bytes"));
                }
                Ok(ClientMessage::Chat { content: content.to_string() })
            }
            other => Err(format!("unknown message kind {other:?}; only \"chat\" is supported")),
        }
    }
}

/// Parses a replay cursor (`?after=<seq>`): absent means "from the start".
pub fn parse_cursor(after: Option<&str>) -> Result<u64, String> {
    match after {
        None | Some("") => Ok(0),
        Some(s) => s.parse::<u64>().map_err(|_| "after must be a non-negative integer".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_events_are_flat_with_kind_and_seq() {
        let ev = ServerEvent {
            seq: 3,
            body: EventBody::StageUpdate {
                role: "user".into(),
                sender: "ann@example.com".into(),
                content: "hi".into(),
                metadata: json!({}),
                timestamp: "2026-01-01T00:00:00.000Z".into(),
            },
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["kind"], "stageUpdate");
        assert_eq!(ev.body.kind(), "stageUpdate", "kind() matches the serde tag");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["role"], "user");
        assert_eq!(serde_json::from_value::<ServerEvent>(v).unwrap(), ev);

        let st = EventBody::JobStatus {
            job_id: "j".into(),
            status: "queued".into(),
            message: "queued".into(),
            timestamp: "t".into(),
            pr_url: None,
            completion_reason: None,
            total_iterations: None,
            error_message: None,
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v, json!({"kind": "jobStatus", "jobId": "j", "status": "queued", "message": "queued", "timestamp": "t"}));
    }

    #[test]
    fn client_messages_are_checked() {
        assert_eq!(
            ClientMessage::parse(r#"{"kind":"chat","content":"hello"}"#).unwrap(),
            ClientMessage::Chat { content: "hello".into() }
        );
        for (bad, want) in [
            ("not json", "not valid JSON"),
            ("{}", "kind"),
            (r#"{"kind":"shout","content":"x"}"#, "unknown message kind"),
            (r#"{"kind":"chat"}"#, "content"),
            (r#"{"kind":"chat","content":"   "}"#, "empty"),
        ] {
            let err = ClientMessage::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
        let big = json!({"kind": "chat", "content": "x".repeat(MAX_CHAT_BYTES + 1)}).to_string();
        assert!(ClientMessage::parse(&big).unwrap_err().contains("over"));
        let edge = json!({"kind": "chat", "content": "x".repeat(MAX_CHAT_BYTES)}).to_string();
        assert!(ClientMessage::parse(&edge).is_ok());
    }

    #[test]
    fn events_render_as_seed_003_messages() {
        let user = EventBody::StageUpdate {
            role: "user".into(),
            sender: "a".into(),
            content: "go".into(),
            metadata: json!({}),
            timestamp: "t".into(),
        };
        assert_eq!(user.as_job_message().unwrap().kind, "user_input");
        let out = EventBody::Log { stream: LogStream::Stderr, content: "boom".into(), timestamp: "t".into() };
        let m = out.as_job_message().unwrap();
        assert_eq!((m.kind.as_str(), m.content.as_str(), m.created_at.as_str()), ("stderr", "boom", "t"));
    }

    #[test]
    fn cursors() {
        assert_eq!(parse_cursor(None), Ok(0));
        assert_eq!(parse_cursor(Some("17")), Ok(17));
        assert!(parse_cursor(Some("-1")).is_err());
        assert!(parse_cursor(Some("abc")).is_err());
    }
}
