//! Scripts: the rules a [`super::ModelServer`] answers by (format in the module docs of
//! [`super`]), how a rule is chosen, and how its reply templates expand.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::conversation::{tokens, Api, Conversation};
use super::server::Step;

/// The script of the demo model (`e2e/src/model/demo.json`).
pub const DEMO_JSON: &str = include_str!("demo.json");

/// A list of rules; the first that matches a request answers it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The `model` every answer carries; unset, answers echo the request's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// When set, requests must carry this key (`x-api-key` or `Authorization: Bearer`); others are
    /// answered 401 in the vendor's error shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    pub rules: Vec<Rule>,
}

/// When a rule applies and what it answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Shown in the request log (`rule`); the rule's index when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The conditions, all of which must hold; none matches every request.
    #[serde(default)]
    pub when: When,
    /// The rule answers at most this many requests, then lets them fall through to later rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,

    /// The answer's text (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Tool calls after the text (`tool_use` blocks, OpenAI `tool_calls`); string values of the
    /// inputs are templates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// How many pieces a streamed text is cut into (default: one per 24 characters, at most 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
    /// A pause between streamed pieces.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_delay_ms: u64,
    /// Overrides the stop reason (`end_turn`/`tool_use` by default; OpenAI's `finish_reason` is
    /// mapped: `max_tokens` → `length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Overrides the script's `model` for this rule's answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,

    /// An error answer: always, or for the first `fail_first` requests the rule answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReply>,
    /// With `error`: only the first N requests this rule answers get the error; later ones get the
    /// text and tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_first: Option<u32>,

    /// A pause before the first byte of the answer (before its status line).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stall_before_ms: u64,
    /// A pause in the middle of a stream (after half of the text's pieces).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stall_mid_ms: u64,
    /// With `error`: a streamed request gets a 200 stream that carries the error in the middle
    /// (Anthropic's `event: error`, OpenAI's `data: {"error": …}`) and ends there.
    #[serde(default, skip_serializing_if = "is_false")]
    pub error_mid_stream: bool,
    /// The connection breaks in the middle of a stream (no final events, no end of the body).
    #[serde(default, skip_serializing_if = "is_false")]
    pub cut_mid_stream: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The conditions of a rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// A substring of the prompt: the last user message that has text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A substring of any message (text or tool result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// A substring of the system prompt (how an LLM step's role is told apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// A substring of the requested model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `anthropic` or `openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<Api>,
    /// Exactly this many assistant messages in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    /// At least this many assistant messages in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_turn: Option<u32>,
    /// The request offers a tool of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offers_tool: Option<String>,
    /// Whether the request offers any tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_tools: Option<bool>,
    /// Whether the last message carries tool results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_tool: Option<bool>,
    /// Whether the last tool result is an error (Anthropic's `is_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_error: Option<bool>,
    /// The ralph iteration, read from the runner's "this is iteration N of at most M" (1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// Whether the prompts hold a `<promise>…</promise>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_promise: Option<bool>,
    /// The LLM step's role: exactly `X` of the system prompt's line `Kiln role: X`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Exactly this many user messages with text (prompts) in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_messages: Option<u32>,
    /// At least this many user messages with text (prompts) in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_user_messages: Option<u32>,
    /// The rule applies from the Nth request (1-based) that meets its other conditions; earlier
    /// ones fall through to later rules. Counts every request that reached this rule and met them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_match: Option<u32>,
}

/// A tool call of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub name: String,
    #[serde(default = "empty_object")]
    pub input: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// The HTTP status (429, 529, 500, 400, …).
    pub status: u16,
    /// The vendor's error type; by default the one the vendor uses for `status`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Seconds, sent as `retry-after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Script {
    /// Parses a script from JSON text.
    pub fn parse(json: &str) -> anyhow::Result<Script> {
        let s: Script = serde_json::from_str(json)?;
        s.check()?;
        Ok(s)
    }

    /// Reads a script from a JSON value (`serde_json::json!` in tests).
    pub fn from_value(v: Value) -> anyhow::Result<Script> {
        let s: Script = serde_json::from_value(v)?;
        s.check()?;
        Ok(s)
    }

    /// The demo model's script: labelled `kiln-demo`, drives Claude Code to write `KILN_DEMO.md`.
    pub fn demo() -> Script {
        Script::parse(DEMO_JSON).expect("the demo script parses")
    }

    fn check(&self) -> anyhow::Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            let label = r.label(i);
            if r.fail_first.is_some() && r.error.is_none() {
                anyhow::bail!("rule {label}: fail_first needs an error");
            }
            if r.error.is_none() && r.text.is_none() && r.tool_calls.is_empty() {
                anyhow::bail!("rule {label}: answers nothing (give text, tool_calls or error)");
            }
            if r.fail_first.is_some() && r.text.is_none() && r.tool_calls.is_empty() {
                anyhow::bail!("rule {label}: fail_first needs the text or tool calls that follow the failures");
            }
            if let Some(e) = &r.error {
                if !(400..=599).contains(&e.status) {
                    anyhow::bail!("rule {label}: error status {} is not an error", e.status);
                }
            }
            if r.error_mid_stream && r.error.is_none() {
                anyhow::bail!("rule {label}: error_mid_stream needs an error");
            }
            if r.error_mid_stream && r.text.is_none() {
                anyhow::bail!(
                    "rule {label}: error_mid_stream needs the text streamed before the error"
                );
            }
            if r.chunks == Some(0) {
                anyhow::bail!("rule {label}: chunks must be at least 1");
            }
        }
        Ok(())
    }
}

impl Rule {
    /// The rule's name, or `#index`.
    pub fn label(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("#{index}"))
    }

    pub(super) fn stall_before(&self) -> Duration {
        Duration::from_millis(self.stall_before_ms)
    }
}

impl When {
    /// Whether `c` meets every condition but `from_match` (which needs the rule's counter).
    pub fn matches(&self, c: &Conversation) -> bool {
        let has = |needle: &Option<String>, hay: &str| {
            needle.as_ref().is_none_or(|n| hay.contains(n.as_str()))
        };
        let is = |want: Option<bool>, got: bool| want.is_none_or(|w| w == got);
        has(&self.prompt, &c.prompt())
            && has(&self.conversation, &c.all_text())
            && has(&self.system, &c.system)
            && has(&self.model, &c.model)
            && self.api.is_none_or(|a| a == c.api)
            && self.turn.is_none_or(|t| t == c.turn())
            && self.min_turn.is_none_or(|t| c.turn() >= t)
            && self
                .offers_tool
                .as_ref()
                .is_none_or(|t| c.tools.iter().any(|o| o == t))
            && is(self.has_tools, !c.tools.is_empty())
            && is(self.after_tool, c.after_tool())
            && is(
                self.tool_error,
                c.last_tool_result().is_some_and(|r| r.is_error),
            )
            && self.iteration.is_none_or(|i| i == c.iteration())
            && is(self.has_promise, c.promise().is_some())
            && self.role.as_ref().is_none_or(|r| c.role().as_ref() == Some(r))
            && self.user_messages.is_none_or(|n| c.prompts().len() == n as usize)
            && self.min_user_messages.is_none_or(|n| c.prompts().len() >= n as usize)
    }
}

/// Per-rule counters, kept by the server while a script is loaded.
#[derive(Debug, Clone, Default)]
pub(super) struct Counters {
    /// Requests that reached the rule and met its conditions.
    pub matched: u32,
    /// Requests the rule answered.
    pub answered: u32,
}

/// The rule chosen for a request.
pub(super) struct Choice {
    pub index: usize,
    /// The rule answers with its error (a plain error rule, or one of its first `fail_first`).
    pub fail: bool,
    /// How many requests the rule answered before this one.
    pub answered_before: u32,
}

/// Picks the first rule that applies to `c`, updating the counters of every rule it evaluated.
pub(super) fn choose(
    script: &Script,
    counters: &mut [Counters],
    c: &Conversation,
) -> Option<Choice> {
    for (index, rule) in script.rules.iter().enumerate() {
        let n = &mut counters[index];
        if rule.times.is_some_and(|t| n.answered >= t) || !rule.when.matches(c) {
            continue;
        }
        n.matched += 1;
        if rule.when.from_match.is_some_and(|from| n.matched < from) {
            continue;
        }
        let answered_before = n.answered;
        n.answered += 1;
        let fail = match (&rule.error, rule.fail_first) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(_), Some(first)) => answered_before < first,
        };
        return Some(Choice {
            index,
            fail,
            answered_before,
        });
    }
    None
}

/// The values a reply's templates may use.
pub(super) struct TemplateVars {
    vars: Vec<(&'static str, String)>,
}

impl TemplateVars {
    pub fn new(c: &Conversation, model: &str, answered_before: u32) -> TemplateVars {
        let prompt = c.prompt();
        let first_line = prompt
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim();
        let prompt_line = if first_line.chars().count() > 120 {
            format!("{}…", first_line.chars().take(120).collect::<String>())
        } else {
            first_line.to_string()
        };
        let prompts = c.prompts();
        let numbered: Vec<String> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}. {}", i + 1, p.replace('\n', "\n   ")))
            .collect();
        // The first prompt's first line: an app build's idea, as its gatherer is first told it.
        let idea = prompts
            .first()
            .and_then(|p| p.lines().map(str::trim).find(|l| !l.is_empty()))
            .map(|l| match l.chars().count() > 200 {
                true => format!("{}…", l.chars().take(200).collect::<String>()),
                false => l.to_string(),
            })
            .unwrap_or_default();
        let tool_result = c
            .last_tool_result()
            .map(|r| r.text.clone())
            .unwrap_or_default();
        TemplateVars {
            vars: vec![
                ("prompt", prompt.clone()),
                ("prompt_line", prompt_line),
                ("prompts", numbered.join("\n")),
                ("prompt_count", prompts.len().to_string()),
                ("cwd", c.cwd().unwrap_or_else(|| ".".into())),
                ("turn", c.turn().to_string()),
                ("iteration", c.iteration().to_string()),
                ("promise", c.promise().unwrap_or_default()),
                ("model", model.to_string()),
                ("requested_model", c.model.clone()),
                ("tool_result", tool_result),
                ("answer", (answered_before + 1).to_string()),
                ("role", c.role().unwrap_or_default()),
                ("idea", idea),
                ("ticket_id", c.prompt_field("Ticket id").unwrap_or_default()),
                ("ticket_title", c.prompt_field("Ticket").unwrap_or_default()),
                (
                    "product",
                    c.landing_product()
                        .unwrap_or_else(|| "Your product".into()),
                ),
                (
                    "fix_attempt",
                    c.prompt_field("Fix attempt").unwrap_or_default(),
                ),
            ],
        }
    }

    /// `{{name}}` replaced by its value; unknown names are left as written.
    pub fn expand(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find("}}") {
                Some(end) => {
                    let name = after[..end].trim();
                    match self.vars.iter().find(|(k, _)| *k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&rest[start..start + 2 + end + 2]),
                    }
                    rest = &after[end + 2..];
                }
                None => {
                    out.push_str(&rest[start..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Expands every string inside a JSON value.
    pub fn expand_value(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.expand(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.expand_value(x)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.expand_value(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// A reply ready to be written in either format.
#[derive(Debug, Clone)]
pub(super) struct Answer {
    pub model: String,
    pub text: Option<String>,
    pub tool_calls: Vec<(String, Value)>,
    /// The text cut into the pieces a stream sends.
    pub pieces: Vec<String>,
    pub chunk_delay: Duration,
    /// Anthropic's stop reason.
    pub stop_reason: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Answer {
    pub fn new(rule: &Rule, script: &Script, c: &Conversation, answered_before: u32) -> Answer {
        let model = rule
            .model
            .clone()
            .or_else(|| script.model.clone())
            .unwrap_or_else(|| c.model.clone());
        let vars = TemplateVars::new(c, &model, answered_before);
        let text = rule.text.as_ref().map(|t| vars.expand(t));
        let tool_calls: Vec<(String, Value)> = rule
            .tool_calls
            .iter()
            .map(|t| (vars.expand(&t.name), vars.expand_value(&t.input)))
            .collect();
        let text_chars = text.as_deref().map_or(0, |t| t.chars().count());
        let tool_chars: usize = tool_calls
            .iter()
            .map(|(n, i)| n.len() + i.to_string().chars().count())
            .sum();
        let pieces = match &text {
            Some(t) => split(
                t,
                rule.chunks
                    .unwrap_or_else(|| text_chars.div_ceil(24).clamp(1, 16)),
            ),
            None => vec![],
        };
        let stop_reason = rule.stop_reason.clone().unwrap_or_else(|| {
            if tool_calls.is_empty() {
                "end_turn"
            } else {
                "tool_use"
            }
            .to_string()
        });
        Answer {
            model,
            text,
            tool_calls,
            pieces,
            chunk_delay: Duration::from_millis(rule.chunk_delay_ms),
            stop_reason,
            input_tokens: c.input_tokens(),
            output_tokens: tokens(text_chars + tool_chars),
        }
    }

    /// The streamed text: a step per piece (made by `piece`), `chunk_delay` between pieces, and
    /// [`Step::Mid`] before the middle piece (after the only one, when there is one).
    pub fn text_steps(&self, mut piece: impl FnMut(&str) -> Step) -> Vec<Step> {
        let mid = self.pieces.len() / 2;
        let mut steps = vec![];
        for (i, p) in self.pieces.iter().enumerate() {
            if i > 0 {
                steps.push(Step::Sleep(self.chunk_delay));
                if i == mid {
                    steps.push(Step::Mid);
                }
            }
            steps.push(piece(p));
        }
        if self.pieces.len() == 1 {
            steps.push(Step::Mid);
        }
        steps
    }

    /// OpenAI's `finish_reason` for the stop reason.
    pub fn finish_reason(&self) -> &str {
        match self.stop_reason.as_str() {
            "end_turn" | "stop_sequence" => "stop",
            "tool_use" => "tool_calls",
            "max_tokens" => "length",
            other => other,
        }
    }
}

/// `text` cut into `n` pieces of about the same number of characters (fewer if it is shorter).
pub fn split(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let n = n.clamp(1, chars.len());
    let size = chars.len().div_ceil(n);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convo(prompt: &str, assistant_turns: usize) -> Conversation {
        let mut messages = vec![json!({"role": "user", "content": prompt})];
        for _ in 0..assistant_turns {
            messages.push(json!({"role": "assistant", "content": "ok"}));
            messages.push(json!({"role": "user", "content": prompt}));
        }
        Conversation::anthropic(&json!({"model": "m", "messages": messages})).unwrap()
    }

    #[test]
    fn the_demo_script_parses() {
        let demo = Script::demo();
        assert_eq!(demo.model.as_deref(), Some("kiln-demo"));
        assert!(demo.rules.len() >= 3);
    }

    #[test]
    fn first_match_wins_and_counters_drive_fail_first_times_and_from_match() {
        let script = Script::from_value(json!({"rules": [
            {"when": {"prompt": "retry"}, "error": {"status": 429}, "fail_first": 2, "text": "ok"},
            {"when": {"prompt": "third", "from_match": 3}, "text": "now"},
            {"when": {"prompt": "once"}, "times": 1, "text": "first"},
            {"text": "fallback"}
        ]}))
        .unwrap();
        let mut counters = vec![Counters::default(); script.rules.len()];
        let mut pick = |p: &str| {
            let ch = choose(&script, &mut counters, &convo(p, 0)).unwrap();
            (ch.index, ch.fail)
        };
        assert_eq!(pick("retry"), (0, true));
        assert_eq!(pick("retry"), (0, true));
        assert_eq!(pick("retry"), (0, false));
        assert_eq!(pick("third"), (3, false));
        assert_eq!(pick("third"), (3, false));
        assert_eq!(pick("third"), (1, false));
        assert_eq!(pick("once"), (2, false));
        assert_eq!(pick("once"), (3, false));
    }

    #[test]
    fn bad_scripts_are_refused() {
        assert!(Script::from_value(json!({"rules": [{"when": {}}]})).is_err());
        assert!(Script::from_value(json!({"rules": [{"text": "x", "fail_first": 1}]})).is_err());
        assert!(Script::from_value(json!({"rules": [{"text": "x", "colour": 1}]})).is_err());
        assert!(Script::from_value(json!({"rules": [{"error": {"status": 200}}]})).is_err());
    }

    #[test]
    fn templates_expand_and_text_is_split() {
        let c = convo("make a thing\nwith details", 1);
        let vars = TemplateVars::new(&c, "kiln-demo", 0);
        assert_eq!(
            vars.expand(
                "{{model}} turn {{turn}}: {{prompt_line}} ({{prompt_count}}) {{unknown}} {{"
            ),
            "kiln-demo turn 1: make a thing (2) {{unknown}} {{"
        );
        assert_eq!(
            vars.expand_value(&json!({"a": ["{{cwd}}/f"]})),
            json!({"a": ["./f"]})
        );
        assert_eq!(split("abcdefg", 3), vec!["abc", "def", "g"]);
        assert_eq!(split("ab", 5), vec!["a", "b"]);
        assert_eq!(split("héllo", 1), vec!["héllo"]);
    }
}
