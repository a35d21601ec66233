//! The pure part of an app build's room (native tests): the requirements gatherer's turns (when
//! one runs, what it is asked, how its reply becomes messages), backoff after a failed turn, and
//! how runner pipeline events become log events. `job_room.rs` does the storage and I/O.

use kiln_schemas::app::{build_order, split_summary, Ticket, MAX_GATHER_ROUNDS};
use kiln_schemas::events::EventBody;
use kiln_schemas::runner::{ChatTurn, GatherReply, GatherRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A gather turn older than this is taken for lost (its room was restarted mid-call) and run again.
pub const GATHER_STALE_MS: i64 = 150_000;
/// The longest wait between tries of a failed gather turn.
pub const GATHER_MAX_BACKOFF_MS: i64 = 60_000;
/// The sender of the room's own notes.
pub const SYSTEM_SENDER: &str = "Kiln";

/// The requirements gatherer's state, kept in the room's meta.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatherState {
    /// A turn is owed: the job was created, or a user wrote since the last turn began.
    #[serde(default)]
    pub pending: bool,
    /// When the turn in flight began (epoch ms).
    #[serde(default)]
    pub running_since_ms: Option<i64>,
    /// Failed tries in a row (no runner, an error, a timeout).
    #[serde(default)]
    pub failures: u32,
    /// Not before this (epoch ms): the backoff after a failure.
    #[serde(default)]
    pub not_before_ms: i64,
}

/// What the room's alarm does about the gatherer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatherStep {
    /// Run a turn now.
    Run,
    /// Come back at this time (a turn in flight, or a backoff).
    Later(i64),
    /// Nothing owed.
    Idle,
}

impl GatherState {
    pub fn decide(&self, collecting: bool, now_ms: i64) -> GatherStep {
        if !collecting {
            return GatherStep::Idle;
        }
        if let Some(since) = self.running_since_ms {
            if now_ms < since + GATHER_STALE_MS {
                return GatherStep::Later(since + GATHER_STALE_MS);
            }
            // Lost mid-call: the turn is owed again.
            return if now_ms < self.not_before_ms { GatherStep::Later(self.not_before_ms) } else { GatherStep::Run };
        }
        if !self.pending {
            return GatherStep::Idle;
        }
        if now_ms < self.not_before_ms {
            GatherStep::Later(self.not_before_ms)
        } else {
            GatherStep::Run
        }
    }

    /// A turn begins: what is owed so far is what it answers.
    pub fn begin(&mut self, now_ms: i64) {
        self.pending = false;
        self.running_since_ms = Some(now_ms);
    }

    /// Whether a reply to the turn that began at `turn` (epoch ms) is for the turn in flight (a
    /// turn taken for lost and run again has another start; its late reply is dropped).
    pub fn is_current(&self, turn: Option<i64>) -> bool {
        turn.is_some() && self.running_since_ms == turn
    }

    /// The turn ended well. Answers whether another is owed (a user wrote meanwhile).
    pub fn succeeded(&mut self) -> bool {
        self.running_since_ms = None;
        self.failures = 0;
        self.not_before_ms = 0;
        self.pending
    }

    /// The turn failed: it is owed again after a backoff. Answers whether this is the first
    /// failure in a row (the one the user is told about).
    pub fn failed(&mut self, now_ms: i64) -> bool {
        self.running_since_ms = None;
        self.pending = true;
        self.failures += 1;
        self.not_before_ms = now_ms + backoff_ms(self.failures);
        self.failures == 1
    }
}

/// Wait before try `failures + 1`: 2 s, 4 s, 8 s ... at most [`GATHER_MAX_BACKOFF_MS`].
pub fn backoff_ms(failures: u32) -> i64 {
    (1_000i64 << failures.min(16)).min(GATHER_MAX_BACKOFF_MS)
}

/// One message of the transcript: a `stageUpdate`'s role and content.
pub fn gather_request(job_id: &str, initial_prompt: &str, messages: &[(String, String)]) -> GatherRequest {
    let transcript: Vec<ChatTurn> = messages
        .iter()
        .filter(|(role, _)| role == "user" || role == "agent")
        .map(|(role, content)| ChatTurn { role: role.clone(), content: content.clone() })
        .collect();
    let rounds = transcript.iter().filter(|t| t.role == "user").count() as u32;
    GatherRequest {
        job_id: job_id.to_string(),
        initial_prompt: initial_prompt.to_string(),
        transcript,
        must_summarise: rounds >= MAX_GATHER_ROUNDS,
    }
}

/// A gatherer's reply turned into what the room posts: the agent's messages (the text before the
/// summary, then the summary as a message of its own) and the summary, if it wrote one.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherOutcome {
    pub sender: String,
    /// (content, metadata) of each agent message, in order.
    pub messages: Vec<(String, Value)>,
    pub summary: Option<String>,
    pub reply: GatherReply,
}

/// Reads a runner's answer to a gather request: a [`GatherReply`], or `{"error"}`.
pub fn gather_outcome(answer: &Value) -> Result<GatherOutcome, String> {
    if let Some(e) = answer.get("error") {
        return Err(e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string()));
    }
    let reply: GatherReply = serde_json::from_value(answer.clone()).map_err(|e| format!("unreadable gather reply: {e}"))?;
    let sender = if reply.sender.trim().is_empty() { "Gatherer".to_string() } else { reply.sender.clone() };
    let (before, summary) = split_summary(&reply.reply);
    let mut messages = vec![];
    match &summary {
        None => {
            if before.is_empty() {
                return Err("the gatherer answered nothing".into());
            }
            messages.push((before, json!({})));
        }
        Some(s) => {
            if !before.is_empty() {
                messages.push((before, json!({})));
            }
            messages.push((format!("Requirements summary:\n\n{s}"), json!({ "type": "requirements_summary" })));
        }
    }
    Ok(GatherOutcome { sender, messages, summary, reply })
}

/// A backlog's events: `ticketReset`, then one `ticketUpdate` per ticket in the backlog's order.
/// A bad backlog (see [`build_order`]) answers why.
pub fn backlog_events(job_id: &str, tickets: &[Ticket], timestamp: &str) -> Result<Vec<EventBody>, String> {
    build_order(tickets)?;
    let mut out = vec![EventBody::TicketReset { job_id: job_id.to_string(), timestamp: timestamp.to_string() }];
    for t in tickets {
        out.push(EventBody::TicketUpdate {
            job_id: job_id.to_string(),
            ticket_id: t.id.clone(),
            status: t.status.as_str().to_string(),
            title: t.title.clone(),
            assigned_to: t.assigned_to.clone(),
            message: format!("{} created", t.kind.as_str()),
            metadata: json!({ "type": t.kind.as_str(), "parent_id": t.parent_id, "dependencies": t.dependencies }),
            timestamp: timestamp.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_schemas::app::{TicketStatus, TicketType};

    fn msgs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
    }

    #[test]
    fn a_turn_runs_when_owed_and_not_twice_at_once() {
        let mut g = GatherState { pending: true, ..Default::default() };
        assert_eq!(g.decide(true, 1_000), GatherStep::Run);
        assert_eq!(g.decide(false, 1_000), GatherStep::Idle, "not while the job is not collecting");
        g.begin(1_000);
        assert_eq!(g.decide(true, 2_000), GatherStep::Later(1_000 + GATHER_STALE_MS), "one turn at a time");
        g.pending = true; // a user wrote meanwhile
        assert!(g.succeeded(), "the next turn answers what came meanwhile");
        assert_eq!(g.decide(true, 3_000), GatherStep::Run);
        g.begin(3_000);
        assert!(!g.succeeded());
        assert_eq!(g.decide(true, 4_000), GatherStep::Idle);
    }

    #[test]
    fn a_lost_turn_is_run_again() {
        let mut g = GatherState::default();
        g.begin(0);
        assert_eq!(g.decide(true, GATHER_STALE_MS - 1), GatherStep::Later(GATHER_STALE_MS));
        assert_eq!(g.decide(true, GATHER_STALE_MS), GatherStep::Run);
        // Run again: the lost turn's late reply is no longer the current one's.
        assert!(g.is_current(Some(0)));
        g.begin(GATHER_STALE_MS);
        assert!(!g.is_current(Some(0)) && g.is_current(Some(GATHER_STALE_MS)));
        assert!(!g.is_current(None));
        g.succeeded();
        assert!(!g.is_current(Some(GATHER_STALE_MS)), "no turn in flight takes no reply");
    }

    #[test]
    fn failures_back_off_and_are_told_once() {
        let mut g = GatherState::default();
        g.begin(0);
        assert!(g.failed(0), "the first failure is told");
        assert_eq!(g.decide(true, 1_000), GatherStep::Later(2_000));
        assert_eq!(g.decide(true, 2_000), GatherStep::Run);
        g.begin(2_000);
        assert!(!g.failed(2_000), "later failures in a row are not");
        assert_eq!(g.not_before_ms, 2_000 + 4_000);
        assert_eq!(backoff_ms(30), GATHER_MAX_BACKOFF_MS);
        g.begin(6_000);
        g.succeeded();
        assert_eq!((g.failures, g.not_before_ms), (0, 0));
    }

    #[test]
    fn requests_carry_the_conversation_and_rounds_run_out() {
        let r = gather_request("j", "an idea", &msgs(&[("user", "hi"), ("system", "note"), ("agent", "what colour?")]));
        assert_eq!(r.transcript.len(), 2, "system notes are not the gatherer's conversation");
        assert!(!r.must_summarise);
        let many: Vec<(String, String)> =
            (0..MAX_GATHER_ROUNDS).flat_map(|i| [("user".to_string(), format!("m{i}")), ("agent".to_string(), "ok".to_string())]).collect();
        assert!(gather_request("j", "x", &many).must_summarise);
        assert!(!gather_request("j", "x", &many[1..many.len() - 2]).must_summarise);
    }

    #[test]
    fn replies_become_messages_and_a_summary() {
        let o = gather_outcome(&json!({"reply": "What colour?", "sender": "Client Relations"})).unwrap();
        assert_eq!((o.sender.as_str(), o.messages.len(), o.summary), ("Client Relations", 1, None));
        let o = gather_outcome(&json!({"reply": "Thanks!\nREQUIREMENTS_SUMMARY: A todo app.", "sender": ""})).unwrap();
        assert_eq!(o.sender, "Gatherer");
        assert_eq!(o.summary.as_deref(), Some("A todo app."));
        assert_eq!(o.messages[0].0, "Thanks!");
        assert!(o.messages[1].0.contains("A todo app."));
        assert_eq!(o.messages[1].1["type"], "requirements_summary");
        let o = gather_outcome(&json!({"reply": "REQUIREMENTS_SUMMARY: only this", "sender": "G"})).unwrap();
        assert_eq!(o.messages.len(), 1);
        assert_eq!(gather_outcome(&json!({"error": "no model"})).unwrap_err(), "no model");
        assert!(gather_outcome(&json!({"reply": "  ", "sender": "G"})).is_err());
        assert!(gather_outcome(&json!({"nope": 1})).is_err());
    }

    #[test]
    fn backlogs_become_a_reset_and_one_update_per_ticket() {
        let t = |id: &str, kind, parent: Option<&str>, deps: &[&str]| Ticket {
            id: id.into(),
            parent_id: parent.map(Into::into),
            kind,
            title: format!("T {id}"),
            description: String::new(),
            status: TicketStatus::Todo,
            assigned_to: String::new(),
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
        };
        let b = vec![t("e", TicketType::Epic, None, &[]), t("s", TicketType::Story, Some("e"), &[])];
        let ev = backlog_events("j", &b, "ts").unwrap();
        assert_eq!(ev.iter().map(|e| e.kind()).collect::<Vec<_>>(), ["ticketReset", "ticketUpdate", "ticketUpdate"]);
        let bad = vec![t("a", TicketType::Story, None, &["a"])];
        assert!(backlog_events("j", &bad, "ts").unwrap_err().contains("itself"));
    }
}
