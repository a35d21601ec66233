//! Agent profiles: how each agent CLI is started, how its output reads, and how a follow-up
//! message of a task job reaches it. A profile is data about a real CLI, not code per agent:
//!
//! | profile | first run | output | follow-up |
//! |---|---|---|---|
//! | `claude` | `claude --print --verbose --output-format stream-json --dangerously-skip-permissions`, prompt on stdin | stream-json: `system/init` (session id), `assistant`, `result` (cost, usage) | a new run with `--resume <session_id>`, the message on stdin |
//! | `codex` | `codex exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox -`, prompt on stdin | JSON lines: `thread.started` (thread id), `item.completed`, `turn.completed` (usage) | a new run of `... resume <thread_id> -`, the message on stdin |
//! | `text` | any command, prompt on stdin | plain lines | one more line on the running command's stdin |
//!
//! `claude --print` reads its whole input before it answers, so a follow-up written to its stdin
//! would wait until the session ends; resuming the session in a new run answers it at once.

use serde_json::Value;

use crate::config::AgentFormat;

/// Tokens and cost one agent run reported.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Cache reads and writes (Claude) or cached input (Codex), already part of the bill.
    pub cached_tokens: u64,
    /// `None` when the CLI does not report a price (Codex).
    pub cost_usd: Option<f64>,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_tokens += other.cached_tokens;
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
    }

    /// One line for a job's log: `1234 tokens in, 56 out, 0 cached, $0.0123`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} tokens in, {} out, {} cached",
            self.input_tokens, self.output_tokens, self.cached_tokens
        );
        if let Some(c) = self.cost_usd {
            s.push_str(&format!(", ${c:.4}"));
        }
        s
    }
}

impl AgentFormat {
    /// The profile's name, as `RUNNER_AGENT` takes it and `/health` shows it.
    pub fn profile_name(self) -> &'static str {
        match self {
            AgentFormat::Text => "text",
            AgentFormat::ClaudeStreamJson => "claude",
            AgentFormat::CodexJson => "codex",
        }
    }

    /// The command a profile runs when `RUNNER_AGENT_CMD` does not name one.
    pub fn default_command(self) -> &'static str {
        match self {
            // A text agent has no CLI of its own: `cat` echoes the prompt, which at least shows
            // that jobs flow; operators name their command.
            AgentFormat::Text => "cat",
            AgentFormat::ClaudeStreamJson => {
                "claude --print --verbose --output-format stream-json --dangerously-skip-permissions"
            }
            AgentFormat::CodexJson => {
                "codex exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox"
            }
        }
    }

    /// The default command given the model to ask for (`RUNNER_AGENT_MODEL`) and what the
    /// agent's environment holds. Codex reads a custom endpoint only from its configuration, so
    /// an `OPENAI_BASE_URL` passed to it becomes a model provider on its command line (`-c`
    /// overrides, which a `resume` run inherits).
    pub fn default_command_for(
        self,
        model: Option<&str>,
        env: &[(String, String)],
    ) -> Result<String, String> {
        let mut cmd = self.default_command().to_string();
        if let Some(m) = model {
            let ok = !m.is_empty()
                && m.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c));
            if !ok {
                return Err(format!("{m:?} is not a model name"));
            }
            match self {
                AgentFormat::ClaudeStreamJson => cmd.push_str(&format!(" --model {m}")),
                AgentFormat::CodexJson => cmd.push_str(&format!(" -c model={m}")),
                AgentFormat::Text => {}
            }
        }
        let url = env
            .iter()
            .find(|(k, _)| k == "OPENAI_BASE_URL")
            .map(|(_, v)| v.as_str());
        if let (AgentFormat::CodexJson, Some(url)) = (self, url) {
            if url.is_empty()
                || url.contains(['\'', '"', '\\'])
                || url.chars().any(char::is_whitespace)
            {
                return Err(format!("OPENAI_BASE_URL {url:?} cannot be passed to codex"));
            }
            cmd.push_str(&format!(
                " -c model_provider=kiln -c model_providers.kiln.name=kiln -c 'model_providers.kiln.base_url=\"{url}\"' -c model_providers.kiln.wire_api=responses -c model_providers.kiln.env_key=OPENAI_API_KEY"
            ));
        }
        Ok(cmd)
    }

    /// Whether stdout lines are JSON events (else plain text).
    pub fn is_json(self) -> bool {
        !matches!(self, AgentFormat::Text)
    }

    /// Whether a follow-up message is one more line on the running agent's stdin (else a new run
    /// that resumes the agent's session).
    pub fn follows_up_on_stdin(self) -> bool {
        matches!(self, AgentFormat::Text)
    }

    /// The first run's command line (`base` is the profile's command).
    pub fn first_command(self, base: &str) -> String {
        match self {
            AgentFormat::CodexJson => format!("{base} -"),
            _ => base.to_string(),
        }
    }

    /// The command line of a run that resumes `session` with the message on stdin; `None` for a
    /// profile that follows up on stdin, or a session id that is not safe on a command line.
    pub fn resume_command(self, base: &str, session: &str) -> Option<String> {
        if !is_session_id(session) {
            return None;
        }
        match self {
            AgentFormat::Text => None,
            AgentFormat::ClaudeStreamJson => Some(format!("{base} --resume {session}")),
            AgentFormat::CodexJson => Some(format!("{base} resume {session} -")),
        }
    }

    /// The session a later run can resume, from the event that announces it.
    pub fn session_id(self, event: &Value) -> Option<String> {
        let (kind, key) = match self {
            AgentFormat::Text => return None,
            AgentFormat::ClaudeStreamJson => ("system", "session_id"),
            AgentFormat::CodexJson => ("thread.started", "thread_id"),
        };
        if event.get("type").and_then(Value::as_str) != Some(kind) {
            return None;
        }
        event.get(key).and_then(Value::as_str).map(str::to_string)
    }

    /// Usage reported by an event: Claude's `result`, Codex's `turn.completed`.
    pub fn usage(self, event: &Value) -> Option<Usage> {
        let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        match (self, event.get("type").and_then(Value::as_str)?) {
            (AgentFormat::ClaudeStreamJson, "result") => {
                let u = event.get("usage");
                let u = u.unwrap_or(&Value::Null);
                Some(Usage {
                    input_tokens: n(u, "input_tokens"),
                    output_tokens: n(u, "output_tokens"),
                    cached_tokens: n(u, "cache_read_input_tokens")
                        + n(u, "cache_creation_input_tokens"),
                    cost_usd: event.get("total_cost_usd").and_then(Value::as_f64),
                })
            }
            (AgentFormat::CodexJson, "turn.completed") => {
                let u = event.get("usage")?;
                Some(Usage {
                    input_tokens: n(u, "input_tokens"),
                    output_tokens: n(u, "output_tokens"),
                    cached_tokens: n(u, "cached_input_tokens"),
                    cost_usd: None,
                })
            }
            _ => None,
        }
    }

    /// The human-readable text of an event: Claude's result or assistant text blocks, Codex's
    /// agent messages.
    pub fn text(self, event: &Value) -> Option<String> {
        match (self, event.get("type")?.as_str()?) {
            (AgentFormat::ClaudeStreamJson, "result") => {
                event.get("result")?.as_str().map(str::to_string)
            }
            (AgentFormat::ClaudeStreamJson, "assistant") => {
                let texts: Vec<&str> = event
                    .pointer("/message/content")?
                    .as_array()?
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|b| b.get("text").and_then(Value::as_str))
                    .collect();
                (!texts.is_empty()).then(|| texts.join("\n"))
            }
            (AgentFormat::CodexJson, "item.completed") => {
                let item = event.get("item")?;
                (item.get("type").and_then(Value::as_str) == Some("agent_message"))
                    .then(|| item.get("text").and_then(Value::as_str).map(str::to_string))
                    .flatten()
            }
            _ => None,
        }
    }
}

/// Session ids go on a command line: only letters, digits, `-` and `_` (UUIDs and the like).
fn is_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CLAUDE: AgentFormat = AgentFormat::ClaudeStreamJson;
    const CODEX: AgentFormat = AgentFormat::CodexJson;

    #[test]
    fn commands_follow_each_cli() {
        let base = CLAUDE.default_command();
        assert_eq!(CLAUDE.first_command(base), base);
        assert_eq!(
            CLAUDE.resume_command(base, "6f1c-22").unwrap(),
            format!("{base} --resume 6f1c-22")
        );
        let base = CODEX.default_command();
        assert_eq!(CODEX.first_command(base), format!("{base} -"));
        assert_eq!(
            CODEX.resume_command(base, "t_1").unwrap(),
            format!("{base} resume t_1 -")
        );
        assert_eq!(AgentFormat::Text.resume_command("cat", "s"), None);
        assert!(AgentFormat::Text.follows_up_on_stdin());
        assert!(!CLAUDE.follows_up_on_stdin());
    }

    #[test]
    fn codex_gets_a_custom_endpoint_as_a_model_provider() {
        let env = vec![("OPENAI_BASE_URL".to_string(), "http://127.0.0.1:8790/v1".to_string())];
        let cmd = CODEX.default_command_for(Some("kiln-demo"), &env).unwrap();
        assert!(cmd.starts_with(CODEX.default_command()), "{cmd}");
        assert!(cmd.contains(r#"-c 'model_providers.kiln.base_url="http://127.0.0.1:8790/v1"'"#), "{cmd}");
        assert!(cmd.contains("-c model_provider=kiln") && cmd.contains("-c model=kiln-demo"), "{cmd}");
        assert_eq!(CODEX.default_command_for(None, &[]).unwrap(), CODEX.default_command());
        assert_eq!(
            CLAUDE.default_command_for(Some("claude-sonnet-4-5"), &env).unwrap(),
            format!("{} --model claude-sonnet-4-5", CLAUDE.default_command())
        );
        let bad = vec![("OPENAI_BASE_URL".to_string(), "http://x/'; rm -rf /".to_string())];
        assert!(CODEX.default_command_for(None, &bad).is_err());
        assert!(CLAUDE.default_command_for(Some("m; id"), &[]).is_err());
    }

    #[test]
    fn a_session_id_never_brings_shell_syntax() {
        for bad in ["", "a b", "x;rm -rf /", "$(id)", "a\nb", &"x".repeat(129)] {
            assert_eq!(CLAUDE.resume_command("claude", bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sessions_come_from_the_announcing_event() {
        let init =
            json!({"type": "system", "subtype": "init", "session_id": "abc-1", "model": "m"});
        assert_eq!(CLAUDE.session_id(&init).as_deref(), Some("abc-1"));
        assert_eq!(
            CLAUDE.session_id(&json!({"type": "result", "session_id": "x"})),
            None
        );
        let started = json!({"type": "thread.started", "thread_id": "0199-aa"});
        assert_eq!(CODEX.session_id(&started).as_deref(), Some("0199-aa"));
        assert_eq!(CLAUDE.session_id(&started), None);
    }

    #[test]
    fn usage_and_cost_are_read_from_each_cli() {
        let result = json!({
            "type": "result", "subtype": "success", "result": "done", "total_cost_usd": 0.0123,
            "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 7}
        });
        let u = CLAUDE.usage(&result).unwrap();
        assert_eq!(
            u,
            Usage {
                input_tokens: 100,
                output_tokens: 20,
                cached_tokens: 12,
                cost_usd: Some(0.0123)
            }
        );
        assert_eq!(u.describe(), "100 tokens in, 20 out, 12 cached, $0.0123");
        let turn = json!({"type": "turn.completed", "usage": {"input_tokens": 9, "cached_input_tokens": 3, "output_tokens": 4}});
        let c = CODEX.usage(&turn).unwrap();
        assert_eq!(
            (c.input_tokens, c.output_tokens, c.cached_tokens, c.cost_usd),
            (9, 4, 3, None)
        );
        let mut total = u;
        total.add(&c);
        assert_eq!(total.input_tokens, 109);
        assert_eq!(total.cost_usd, Some(0.0123));
        assert_eq!(CLAUDE.usage(&json!({"type": "assistant"})), None);
    }

    #[test]
    fn text_is_what_a_person_reads() {
        let a = json!({"type": "assistant", "message": {"content": [
            {"type": "text", "text": "one"}, {"type": "tool_use", "name": "Write"}, {"type": "text", "text": "two"}]}});
        assert_eq!(CLAUDE.text(&a).as_deref(), Some("one\ntwo"));
        assert_eq!(
            CLAUDE
                .text(&json!({"type": "result", "result": "fin"}))
                .as_deref(),
            Some("fin")
        );
        let m = json!({"type": "item.completed", "item": {"id": "i1", "type": "agent_message", "text": "hi"}});
        assert_eq!(CODEX.text(&m).as_deref(), Some("hi"));
        let cmd = json!({"type": "item.completed", "item": {"type": "command_execution", "command": "ls"}});
        assert_eq!(CODEX.text(&cmd), None);
    }
}
