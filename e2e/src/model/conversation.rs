//! A request to either wire format, read into one shape: what the rules match on and what the
//! reply templates expand.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The wire format a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// Anthropic Messages (`POST /v1/messages`).
    Anthropic,
    /// OpenAI chat completions (`POST /v1/chat/completions`).
    Openai,
    /// OpenAI Responses (`POST /v1/responses`), what Codex CLI speaks.
    Responses,
}

/// One message of a conversation, summarised: its role, its text, the tools it called and the
/// tool results it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageSummary {
    /// `user`, `assistant`, `system`, `developer` or `tool` (OpenAI's tool results).
    pub role: String,
    /// The text blocks, joined by newlines.
    pub text: String,
    /// The names of the tools the message calls (assistant messages).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<String>,
    /// The tool results the message carries (Anthropic user messages, OpenAI `tool` messages).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_results: Vec<ToolResult>,
}

/// A tool result sent back to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    pub text: String,
    /// Anthropic's `is_error` (OpenAI has no such flag: always false there).
    pub is_error: bool,
}

/// A chat request, either format.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub api: Api,
    pub model: String,
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage`.
    pub include_usage: bool,
    /// The system prompt: Anthropic's `system`, OpenAI's `system`/`developer` messages, and the
    /// `system`-role messages Claude Code puts among the messages (its environment block).
    pub system: String,
    /// Every message but OpenAI's system ones, in order.
    pub messages: Vec<MessageSummary>,
    /// The names of the tools the request offers.
    pub tools: Vec<String>,
    /// The length of the request body, for the token estimate.
    pub body_chars: usize,
}

fn text_of(content: &Value) -> (String, Vec<String>, Vec<ToolResult>) {
    let mut texts = vec![];
    let mut calls = vec![];
    let mut results = vec![];
    match content {
        Value::String(s) => texts.push(s.clone()),
        Value::Array(blocks) => {
            for b in blocks {
                match b.get("type").and_then(Value::as_str) {
                    Some("text" | "input_text" | "output_text") => {
                        if let Some(t) = b.get("text").and_then(Value::as_str) {
                            texts.push(t.to_string());
                        }
                    }
                    Some("tool_use") => calls.push(
                        b.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    Some("tool_result") => {
                        let (t, _, _) = text_of(b.get("content").unwrap_or(&Value::Null));
                        let is_error = b.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                        results.push(ToolResult { text: t, is_error });
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    (texts.join("\n"), calls, results)
}

impl Conversation {
    /// The parts every format shares: the model, `stream`, the tools' names (found at `name_at`
    /// in each of `tools`) and the body's size.
    fn read(
        body: &Value,
        api: Api,
        model: &str,
        system: String,
        messages: Vec<MessageSummary>,
        name_at: &str,
    ) -> Conversation {
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .filter_map(|t| t.pointer(name_at).and_then(Value::as_str))
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Conversation {
            api,
            model: model.to_string(),
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: false,
            system,
            messages,
            tools,
            body_chars: body.to_string().chars().count(),
        }
    }

    /// Reads an Anthropic Messages request body.
    pub fn anthropic(body: &Value) -> Result<Conversation, String> {
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .ok_or("model: field required")?;
        let raw = body
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("messages: field required")?;
        let mut system = match body.get("system") {
            Some(s) => text_of(s).0,
            None => String::new(),
        };
        let mut messages = vec![];
        for m in raw {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or("messages: each message needs a role")?;
            let (text, tool_calls, tool_results) =
                text_of(m.get("content").unwrap_or(&Value::Null));
            if role == "system" {
                system.push('\n');
                system.push_str(&text);
            }
            messages.push(MessageSummary {
                role: role.to_string(),
                text,
                tool_calls,
                tool_results,
            });
        }
        Ok(Conversation::read(
            body,
            Api::Anthropic,
            model,
            system,
            messages,
            "/name",
        ))
    }

    /// Reads an OpenAI chat completions request body.
    pub fn openai(body: &Value) -> Result<Conversation, String> {
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .ok_or("you must provide a model parameter")?;
        let raw = body
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("'messages' is a required property")?;
        let mut system = vec![];
        let mut messages = vec![];
        for m in raw {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or("each message needs a 'role'")?;
            let (text, _, _) = text_of(m.get("content").unwrap_or(&Value::Null));
            match role {
                "system" | "developer" => system.push(text),
                "tool" => messages.push(MessageSummary {
                    role: role.to_string(),
                    text: String::new(),
                    tool_calls: vec![],
                    tool_results: vec![ToolResult {
                        text,
                        is_error: false,
                    }],
                }),
                _ => {
                    let tool_calls = m
                        .get("tool_calls")
                        .and_then(Value::as_array)
                        .map(|cs| {
                            cs.iter()
                                .filter_map(|c| c.pointer("/function/name").and_then(Value::as_str))
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default();
                    messages.push(MessageSummary {
                        role: role.to_string(),
                        text,
                        tool_calls,
                        tool_results: vec![],
                    })
                }
            }
        }
        let mut c = Conversation::read(
            body,
            Api::Openai,
            model,
            system.join("\n"),
            messages,
            "/function/name",
        );
        c.include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(c)
    }

    /// Reads an OpenAI Responses request body. Consecutive output items (assistant messages,
    /// function and custom tool calls, reasoning) make one assistant message; consecutive call
    /// outputs make one `tool` message.
    pub fn responses(body: &Value) -> Result<Conversation, String> {
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .ok_or("Missing required parameter: 'model'.")?;
        let mut system: Vec<String> = body
            .get("instructions")
            .and_then(Value::as_str)
            .map(String::from)
            .into_iter()
            .collect();
        let items = match body.get("input") {
            Some(Value::String(s)) => vec![serde_json::json!({"role": "user", "content": s})],
            Some(Value::Array(items)) => items.clone(),
            _ => return Err("Missing required parameter: 'input'.".into()),
        };
        let mut messages: Vec<MessageSummary> = vec![];
        let mut push = |role: &str,
                        text: String,
                        call: Option<String>,
                        result: Option<ToolResult>| {
            let joins = matches!(messages.last(), Some(m) if m.role == role && (role == "assistant" || role == "tool"));
            if !joins {
                messages.push(MessageSummary {
                    role: role.into(),
                    text: String::new(),
                    tool_calls: vec![],
                    tool_results: vec![],
                });
            }
            let m = messages.last_mut().expect("a message");
            if !text.is_empty() {
                if !m.text.is_empty() {
                    m.text.push('\n');
                }
                m.text.push_str(&text);
            }
            m.tool_calls.extend(call);
            m.tool_results.extend(result);
        };
        for item in &items {
            let kind = item
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("message");
            let name = || {
                item.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            match kind {
                "message" => {
                    let role = item
                        .get("role")
                        .and_then(Value::as_str)
                        .ok_or("input: a message needs a role")?;
                    let (text, _, _) = text_of(item.get("content").unwrap_or(&Value::Null));
                    match role {
                        "system" | "developer" => system.push(text),
                        _ => push(role, text, None, None),
                    }
                }
                "function_call" | "custom_tool_call" => {
                    push("assistant", String::new(), Some(name()), None)
                }
                "reasoning" => push("assistant", String::new(), None, None),
                "function_call_output" | "custom_tool_call_output" => {
                    let (text, _, _) = text_of(item.get("output").unwrap_or(&Value::Null));
                    push(
                        "tool",
                        String::new(),
                        None,
                        Some(ToolResult {
                            text,
                            is_error: false,
                        }),
                    )
                }
                _ => {}
            }
        }
        let mut c = Conversation::read(
            body,
            Api::Responses,
            model,
            system.join("\n"),
            messages,
            "/name",
        );
        c.include_usage = true;
        Ok(c)
    }

    /// The turn: how many assistant messages the request already holds. A stateless multi-turn
    /// tool loop is scripted by it (turn 0 calls a tool, turn 1 answers).
    pub fn turn(&self) -> u32 {
        self.messages
            .iter()
            .filter(|m| m.role == "assistant")
            .count() as u32
    }

    /// The user's prompts, oldest first: the text of every user message that has some, without
    /// the `<system-reminder>` blocks Claude Code adds and the `<environment_context>` of Codex.
    pub fn prompts(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| strip_reminders(&m.text))
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// The last user message that has text (tool results alone are not a prompt).
    pub fn prompt(&self) -> String {
        self.prompts().pop().unwrap_or_default()
    }

    /// Every message's text and tool results, for the `conversation` matcher.
    pub fn all_text(&self) -> String {
        let mut s = String::new();
        for m in &self.messages {
            s.push_str(&m.text);
            s.push('\n');
            for r in &m.tool_results {
                s.push_str(&r.text);
                s.push('\n');
            }
        }
        s
    }

    /// Whether the last message carries tool results (the model is being told what its tool did).
    pub fn after_tool(&self) -> bool {
        self.messages
            .last()
            .is_some_and(|m| !m.tool_results.is_empty())
    }

    /// The last tool result, when the last message carries one.
    pub fn last_tool_result(&self) -> Option<&ToolResult> {
        self.messages.last().and_then(|m| m.tool_results.last())
    }

    /// The agent's working directory, when its system prompt or environment block names it
    /// (Claude Code: `Primary working directory: /path`; Codex: `<cwd>/path</cwd>`).
    pub fn cwd(&self) -> Option<String> {
        let all = self.all_text();
        if let Some(i) = all.find("<cwd>") {
            let rest = &all[i + "<cwd>".len()..];
            if let Some(end) = rest.find("</cwd>").filter(|_| rest.starts_with('/')) {
                return Some(rest[..end].to_string());
            }
        }
        const LABELS: [&str; 3] = [
            "Primary working directory: ",
            "Working directory: ",
            "working directory: ",
        ];
        let haystacks = [self.system.as_str(), &self.all_text()].map(str::to_string);
        for h in &haystacks {
            for label in LABELS {
                if let Some(i) = h.find(label) {
                    let rest = &h[i + label.len()..];
                    let path = rest.split_whitespace().next().unwrap_or_default();
                    if path.starts_with('/') {
                        return Some(path.to_string());
                    }
                }
            }
        }
        None
    }

    /// The LLM step's role: `X` of the system prompt's line `Kiln role: X` (every step of the
    /// runner's pipelines starts its system prompt with one), if any.
    pub fn role(&self) -> Option<String> {
        self.system.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("Kiln role:")?.trim();
            (!rest.is_empty()).then(|| rest.to_string())
        })
    }

    /// The value of the last prompt line `<label>: value` (e.g. `Ticket id: S1`), trimmed.
    pub fn prompt_field(&self, label: &str) -> Option<String> {
        let prefix = format!("{label}:");
        self.prompts().iter().rev().find_map(|p| {
            p.lines().find_map(|l| {
                let v = l.trim().strip_prefix(prefix.as_str())?.trim();
                (!v.is_empty()).then(|| v.to_string())
            })
        })
    }

    /// What a scripted landing page is titled: the prompts' last `Headline: …` (anywhere in a
    /// line: a chat message that renames the page), else the init payload's product name as the
    /// prompt shows it (`"productName": "…"` in JSON, or a `productName: …` / `Product name: …`
    /// line).
    pub fn landing_product(&self) -> Option<String> {
        let prompts = self.prompts();
        let clean = |v: &str| {
            let v = v
                .trim()
                .trim_end_matches(',')
                .trim()
                .trim_matches(|c| c == '"' || c == '\'' || c == '`');
            (!v.is_empty()).then(|| v.to_string())
        };
        let headline = prompts.iter().rev().find_map(|p| {
            p.lines()
                .rev()
                .find_map(|l| clean(&l[l.find("Headline:")? + "Headline:".len()..]))
        });
        headline.or_else(|| {
            prompts.iter().rev().find_map(|p| {
                p.lines().find_map(|l| {
                    let lower = l.to_ascii_lowercase();
                    let at = ["productname", "product name"]
                        .iter()
                        .find_map(|k| Some(lower.find(k)? + k.len()))?;
                    let rest = l[at..]
                        .trim_start_matches(|c: char| c == '"' || c == ':' || c.is_whitespace());
                    let end = rest.find('"').unwrap_or(rest.len());
                    clean(&rest[..end])
                })
            })
        })
    }

    /// The ralph iteration: `N` of the runner's "this is iteration N of at most M" in the prompts;
    /// 1 when no prompt says (the first iteration's prompt is the job's own).
    pub fn iteration(&self) -> u32 {
        const MARK: &str = "this is iteration ";
        self.prompts()
            .iter()
            .rev()
            .find_map(|p| {
                let i = p.find(MARK)?;
                let digits: String = p[i + MARK.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .unwrap_or(1)
    }

    /// The text between the first `<promise>` and `</promise>` in the prompts, if any.
    pub fn promise(&self) -> Option<String> {
        self.prompts().iter().find_map(|p| {
            let start = p.find("<promise>")? + "<promise>".len();
            let len = p[start..].find("</promise>")?;
            Some(p[start..start + len].to_string()).filter(|s| !s.trim().is_empty())
        })
    }

    /// The deterministic input token count: the request body's characters / 4, rounded up.
    pub fn input_tokens(&self) -> u64 {
        tokens(self.body_chars)
    }
}

/// Characters / 4, rounded up, at least 1.
pub fn tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

/// `text` without the harness's own sections (`<system-reminder>…</system-reminder>`,
/// `<environment_context>…</environment_context>`), trimmed.
pub fn strip_reminders(text: &str) -> String {
    let mut text = text.to_string();
    for tag in ["system-reminder", "environment_context"] {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find(&open) {
            out.push_str(&rest[..start]);
            rest = match rest[start..].find(&close) {
                Some(end) => &rest[start + end + close.len()..],
                None => "",
            };
        }
        out.push_str(rest);
        text = out;
    }
    text.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claude_code_requests_are_read() {
        let body = json!({
            "model": "claude-x",
            "system": [{"type": "text", "text": "You are a Claude agent"}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "<system-reminder>\nattribution\n</system-reminder>\n"},
                    {"type": "text", "text": "add a README"}]},
                {"role": "system", "content": [{"type": "text", "text": " - Primary working directory: /tmp/w\n - Is a git repository: false"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Write", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "denied", "is_error": true}]}
            ],
            "tools": [{"name": "Write", "input_schema": {}}],
            "stream": true
        });
        let c = Conversation::anthropic(&body).unwrap();
        assert_eq!(c.turn(), 1);
        assert_eq!(c.prompt(), "add a README");
        assert_eq!(c.cwd().as_deref(), Some("/tmp/w"));
        assert!(c.after_tool());
        assert!(c.last_tool_result().unwrap().is_error);
        assert_eq!(c.tools, vec!["Write"]);
        assert_eq!(c.iteration(), 1);
        assert!(
            c.system.contains("Claude agent") && c.system.contains("Primary working directory")
        );
    }

    #[test]
    fn codex_responses_requests_are_read() {
        let body = json!({
            "model": "kiln-demo",
            "instructions": "be brief",
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context>\n  <cwd>/tmp/cx</cwd>\n</environment_context>"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "add a file"}]},
                {"type": "reasoning", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "on it"}]},
                {"type": "function_call", "name": "exec_command", "arguments": "{}", "call_id": "c1"},
                {"type": "function_call_output", "call_id": "c1", "output": "Exit code: 0"}
            ],
            "tools": [{"type": "function", "name": "exec_command"}, {"type": "web_search"}],
            "stream": true
        });
        let c = Conversation::responses(&body).unwrap();
        assert_eq!(c.system, "be brief\nYou are Codex");
        assert_eq!(c.prompts(), vec!["add a file"]);
        assert_eq!(c.turn(), 1);
        assert_eq!(c.messages[2].tool_calls, vec!["exec_command"]);
        assert_eq!(c.messages[2].text, "on it");
        assert!(c.after_tool());
        assert_eq!(c.last_tool_result().unwrap().text, "Exit code: 0");
        assert_eq!(c.cwd().as_deref(), Some("/tmp/cx"));
        assert_eq!(c.tools, vec!["exec_command"]);
    }

    #[test]
    fn the_ralph_iteration_and_promise_come_from_the_prompt() {
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Fix it. Say <promise>SHIPPED</promise> when done.\n\n---\n## Progress so far (this is iteration 3 of at most 5)\n"}
        ]});
        let c = Conversation::openai(&body).unwrap();
        assert_eq!(c.iteration(), 3);
        assert_eq!(c.promise().as_deref(), Some("SHIPPED"));
        assert_eq!(c.system, "sys");
        assert_eq!(c.turn(), 0);
    }
}
