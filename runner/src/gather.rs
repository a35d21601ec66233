//! The app builder's requirements gatherer: one LLM turn (role `gatherer`) per user message while
//! a job is `collecting`. It holds no job slot: turns run beside the jobs, at most
//! `RUNNER_CHAT_CONCURRENCY` at once, each with its own budget and time limit, and all of them
//! are cancelled when the runner stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_schemas::app::SUMMARY_MARKER;
use kiln_schemas::runner::{GatherReply, GatherRequest, UsageReport};
use tokio::sync::Semaphore;

use crate::jobs::CancelToken;
use crate::llm::{Budget, ChatRequest, LlmClient, LlmError, Message, Meter};

/// The step's role (`[llm.roles] gatherer`).
pub const ROLE: &str = "gatherer";
/// The gatherer's display name: the `sender` of its messages.
pub const SENDER: &str = "Client Relations";
/// Default of `RUNNER_CHAT_CONCURRENCY`.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Longest a turn may take, waiting for a free turn included: under the 120 s the edge's queue
/// waits for a reply, so the client hears this runner's reason rather than a timeout.
pub const TURN_TIME_LIMIT: Duration = Duration::from_secs(110);
/// Most tokens a turn's reply may have.
const MAX_REPLY_TOKENS: u32 = 2048;
/// Most input and output tokens one turn may use (within the runner's `[llm]` budget).
pub const TURN_BUDGET_TOKENS: u64 = 200_000;

/// What the model is told it is.
pub fn system_prompt(must_summarise: bool) -> String {
    let mut s = format!(
        "Kiln role: {ROLE}\n\
         You are the requirements gatherer of an app builder: a client describes an app they want \
         and you find out what it must do before a team plans and builds it.\n\
         - Ask focused questions, one or two at a time: who uses the app, the main things they \
         must be able to do, the screens, the data it keeps, anything it must not do.\n\
         - Be brief and friendly; do not write code or plans.\n\
         - When you know enough to build a first version (or the client asks you to go ahead), \
         end your reply with a line `{SUMMARY_MARKER}: ` followed by a complete summary of the \
         requirements: the app's purpose, its users, its features and screens, its data, and \
         what is out of scope."
    );
    if must_summarise {
        s.push_str(&format!(
            "\n- No more questions now: end this reply with `{SUMMARY_MARKER}: ` and the summary \
             of what you have, filling gaps with sensible choices."
        ));
    }
    s
}

/// Why a turn failed, in words a client may read (the detail goes to the runner's log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GatherError(pub String);

fn fail(msg: impl Into<String>) -> GatherError {
    GatherError(msg.into())
}

/// The request as the model's conversation: the idea first (its first line is the idea as the
/// client wrote it), then the transcript with consecutive turns of one side joined, ending with
/// a user message (the summary demand added to it when `must_summarise`).
pub fn conversation(req: &GatherRequest) -> Result<Vec<Message>, GatherError> {
    let mut turns: Vec<(bool, &str)> = Vec::with_capacity(req.transcript.len() + 1);
    let first_is_idea = req
        .transcript
        .first()
        .is_some_and(|t| t.role == "user" && t.content.trim() == req.initial_prompt.trim());
    if !first_is_idea && !req.initial_prompt.trim().is_empty() {
        turns.push((true, req.initial_prompt.as_str()));
    }
    for t in &req.transcript {
        let user = match t.role.as_str() {
            "user" => true,
            "agent" => false,
            other => {
                return Err(fail(format!(
                    "a transcript turn's role must be user or agent, not {other:?}"
                )))
            }
        };
        if !t.content.trim().is_empty() {
            turns.push((user, t.content.as_str()));
        }
    }
    if turns.is_empty() {
        return Err(fail(
            "the conversation is empty: there is no idea to ask about",
        ));
    }
    let mut messages: Vec<Message> = Vec::new();
    for (user, text) in turns {
        match messages.last_mut() {
            Some(m) if (m.role == crate::llm::MessageRole::User) == user => {
                m.content.push_str("\n\n");
                m.content.push_str(text);
            }
            _ => messages.push(if user {
                Message::user(text)
            } else {
                Message::assistant(text)
            }),
        }
    }
    if messages[0].role != crate::llm::MessageRole::User {
        messages.insert(0, Message::user("(The client has not written yet.)"));
    }
    let demand = format!(
        "Please end your reply now with {SUMMARY_MARKER}: and the summary of the requirements so far."
    );
    match messages.last_mut() {
        Some(m) if m.role == crate::llm::MessageRole::User => {
            if req.must_summarise {
                m.content.push_str("\n\n");
                m.content.push_str(&demand);
            }
        }
        _ => messages.push(Message::user(if req.must_summarise {
            demand
        } else {
            "Please go on.".to_string()
        })),
    }
    Ok(messages)
}

/// A client-facing sentence for a failed call (provider and status at most; never a key, a URL
/// or the vendor's own text).
fn explain(e: &LlmError) -> GatherError {
    match e {
        LlmError::NoRoute { .. } | LlmError::UnknownProvider { .. } => fail(
            "this runner has no LLM model for the requirements gatherer (set [llm.roles] gatherer or default, or RUNNER_LLM_MODEL)",
        ),
        LlmError::Cancelled => fail("the gatherer's turn was cancelled: the runner is stopping"),
        LlmError::Budget { .. } => fail("the gatherer's turn went over its token or cost budget"),
        LlmError::RetryAfterTooLong { last, .. } | LlmError::GaveUp { last, .. } => match last.last() {
            LlmError::Status { status: 429, provider, .. } => {
                fail(format!("the model provider {provider} is rate limiting this runner; try again shortly"))
            }
            other => explain(other),
        },
        LlmError::Status { provider, status, .. } => {
            fail(format!("the model provider {provider} answered HTTP {status}"))
        }
        LlmError::Timeout { provider, .. } | LlmError::Stalled { provider, .. } => {
            fail(format!("the model provider {provider} did not answer in time"))
        }
        LlmError::Connect { provider, .. } | LlmError::Cut { provider, .. } => {
            fail(format!("the model provider {provider} could not be reached"))
        }
        LlmError::Stream { provider, .. } | LlmError::Protocol { provider, .. } => {
            fail(format!("the model provider {provider} failed mid-answer"))
        }
        LlmError::Client(_) => fail("the runner's LLM client could not start"),
    }
}

/// One gatherer turn: the model's reply as written, `REQUIREMENTS_SUMMARY` included.
pub async fn turn(
    llm: &LlmClient,
    req: &GatherRequest,
    budget: Budget,
    cancel: &CancelToken,
) -> Result<GatherReply, GatherError> {
    let messages = conversation(req)?;
    let chat = ChatRequest {
        system: Some(system_prompt(req.must_summarise)),
        messages,
        max_tokens: Some(MAX_REPLY_TOKENS),
        ..ChatRequest::for_role(ROLE)
    };
    let meter = Mutex::new(Meter::new(budget));
    let done = llm
        .complete(&chat, &meter, cancel, |_| {})
        .await
        .map_err(|e| {
            tracing::warn!(job_id = %req.job_id, error = %e, "a gatherer turn failed");
            explain(&e)
        })?;
    let reply = done.text.trim().to_string();
    if reply.is_empty() {
        return Err(fail("the model's reply was empty"));
    }
    let u = &done.usage;
    Ok(GatherReply {
        reply,
        sender: SENDER.to_string(),
        usage: Some(UsageReport {
            source: ROLE.to_string(),
            model: Some(u.model.clone()),
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cached_tokens: 0,
            cost_usd: u.cost_usd,
        }),
    })
}

/// The runner's gatherer: the runner's one LLM client (shared with its jobs' steps: one set of
/// settings, one connection pool; `None` without a provider), its turns' concurrency and their
/// cancellation. Cheap to clone.
#[derive(Clone)]
pub struct Gatherer {
    llm: Option<LlmClient>,
    permits: Arc<Semaphore>,
    budget: Budget,
    time_limit: Duration,
    cancel: CancelToken,
}

impl Gatherer {
    /// A gatherer over the runner's LLM client, `concurrency` turns at once.
    pub fn new(llm: LlmClient, concurrency: usize) -> Gatherer {
        let budget = llm.config().budget.within(Budget {
            max_tokens: Some(TURN_BUDGET_TOKENS),
            max_usd: None,
        });
        Gatherer {
            llm: (!llm.config().providers.is_empty()).then_some(llm),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            budget,
            time_limit: TURN_TIME_LIMIT,
            cancel: CancelToken::default(),
        }
    }

    pub fn with_time_limit(mut self, limit: Duration) -> Gatherer {
        self.time_limit = limit;
        self
    }

    /// Whether an LLM provider is configured.
    pub fn has_provider(&self) -> bool {
        self.llm.is_some()
    }

    /// Cancels every turn in progress and refuses new ones (the runner is stopping).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Answers one turn, waiting for a free turn first.
    pub async fn answer(&self, req: &GatherRequest) -> Result<GatherReply, GatherError> {
        let Some(llm) = &self.llm else {
            return Err(fail(
                "this runner has no LLM provider configured (set ANTHROPIC_API_KEY or OPENAI_API_KEY, or [llm.providers] in its config)",
            ));
        };
        if self.cancel.is_cancelled() {
            return Err(fail("the runner is stopping"));
        }
        let work = async {
            let _permit = tokio::select! {
                p = self.permits.acquire() => p.map_err(|_| fail("the runner is stopping"))?,
                _ = self.cancel.cancelled() => return Err(fail("the runner is stopping")),
            };
            turn(llm, req, self.budget, &self.cancel).await
        };
        match tokio::time::timeout(self.time_limit, work).await {
            Ok(r) => r,
            Err(_) => Err(fail(format!(
                "the gatherer's turn took longer than {}",
                match self.time_limit.as_millis() {
                    ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
                    ms => format!("{ms} ms"),
                }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_schemas::runner::ChatTurn;

    fn req(turns: &[(&str, &str)], must: bool) -> GatherRequest {
        GatherRequest {
            job_id: "j".into(),
            initial_prompt: "A todo app".into(),
            transcript: turns
                .iter()
                .map(|(r, c)| ChatTurn {
                    role: r.to_string(),
                    content: c.to_string(),
                })
                .collect(),
            must_summarise: must,
        }
    }

    fn shape(m: &[Message]) -> Vec<(&str, &str)> {
        m.iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect()
    }

    #[test]
    fn the_idea_comes_first_and_turns_alternate() {
        let m = conversation(&req(&[], false)).unwrap();
        assert_eq!(shape(&m), [("user", "A todo app")]);
        let m = conversation(&req(
            &[
                ("user", "A todo app"),
                ("agent", "Who uses it?"),
                ("user", "Me"),
            ],
            false,
        ))
        .unwrap();
        assert_eq!(
            shape(&m),
            [
                ("user", "A todo app"),
                ("assistant", "Who uses it?"),
                ("user", "Me")
            ]
        );
        let m = conversation(&req(
            &[
                ("agent", "Hi"),
                ("agent", "Who?"),
                ("user", "a"),
                ("user", "b"),
            ],
            false,
        ))
        .unwrap();
        assert_eq!(
            shape(&m),
            [
                ("user", "A todo app"),
                ("assistant", "Hi\n\nWho?"),
                ("user", "a\n\nb")
            ]
        );
        let m = conversation(&req(&[("user", "Me"), ("agent", "Ok")], false)).unwrap();
        assert_eq!(
            m.last().unwrap().role.as_str(),
            "user",
            "the model answers a user message"
        );
        let m = conversation(&req(&[("agent", "Who?"), ("user", "Me")], true)).unwrap();
        assert!(m.last().unwrap().content.starts_with("Me\n\n"));
        assert!(m.last().unwrap().content.contains(SUMMARY_MARKER));
        assert!(conversation(&req(&[("boss", "x")], false))
            .unwrap_err()
            .0
            .contains("user or agent"));
    }

    #[test]
    fn the_system_prompt_names_the_role_first() {
        assert!(system_prompt(false).starts_with("Kiln role: gatherer\n"));
        assert!(system_prompt(true).contains("No more questions"));
        assert!(!system_prompt(false).contains("No more questions"));
    }
}
