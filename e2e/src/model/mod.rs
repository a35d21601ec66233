//! The scripted local model server: one server for the whole project, the demo model of
//! `scripts/dev` (binary `kiln-model-server`) and the model of every test that runs an agent CLI
//! or an LLM step.
//!
//! It speaks three wire formats the way the vendors do:
//! - **Anthropic Messages**: `POST /v1/messages` (Claude Code adds `?beta=true`), streaming SSE
//!   (`message_start`, `ping`, `content_block_start`, `content_block_delta` with `text_delta` or
//!   `input_json_delta`, `content_block_stop`, `message_delta` with the stop reason and usage,
//!   `message_stop`) or one JSON `message`; `POST /v1/messages/count_tokens`; errors as
//!   `{"type":"error","error":{"type":"rate_limit_error","message":…}}`.
//! - **OpenAI chat completions**: `POST /v1/chat/completions`, streaming (`data: {chunk}` lines,
//!   the usage chunk of `stream_options.include_usage`, `data: [DONE]`) or one `chat.completion`,
//!   with `tool_calls`; errors as `{"error":{"message","type","param","code"}}`. The OpenAI base
//!   URL is [`ModelServer::openai_base_url`] (it ends in `/v1`).
//! - **OpenAI Responses** (what Codex CLI speaks): `POST /v1/responses`, streaming
//!   (`response.created`, `response.in_progress`, per output item `response.output_item.added`,
//!   `response.output_text.delta`s or `response.function_call_arguments.delta`s and their `done`
//!   events, `response.output_item.done`, then `response.completed` with the usage; every event
//!   with its `sequence_number`) or one `response` object; OpenAI's error shape.
//! - `GET /v1/models` (Anthropic's shape when `anthropic-version` is sent, else OpenAI's).
//! - Every answer carries usage: input tokens = the request body's characters / 4, output tokens
//!   = the answer's text and tool-call characters / 4 (rounded up).
//! - `GET /_kiln/requests[?full=1]` is the request log, `DELETE` clears it; `GET`/`PUT
//!   /_kiln/script` reads or replaces the script.
//!
//! # Starting one in a test
//!
//! ```no_run
//! use kiln_e2e::model::{ModelServer, Script};
//! let server = ModelServer::start(Script::from_value(serde_json::json!({"rules": [
//!     {"when": {"prompt": "hello"}, "text": "Hi there", "chunks": 3},
//!     {"text": "I only answer hello"}
//! ]})).unwrap());
//! // ANTHROPIC_BASE_URL = server.url(); OPENAI_BASE_URL = server.openai_base_url()
//! let seen = server.requests(); // every request, in order
//! ```
//!
//! [`ModelServer::start`] binds 127.0.0.1 on a free port and serves from a thread of its own (it
//! outlives any one test's runtime); dropping the handle stops it. [`ModelServer::demo`] serves
//! the demo script.
//!
//! # Script format
//!
//! A script is JSON: `{"model"?: string, "api_key"?: string, "rules": [rule…]}`. `model` is the
//! model name every answer carries (unset: the requested one is echoed). `api_key`, when set, is
//! required of every request (`x-api-key` or `Authorization: Bearer`; else 401). Rules are tried
//! in order; **the first that applies answers**. A request no rule applies to is answered 400
//! `invalid_request_error` naming its prompt, so end a script with a catch-all rule.
//!
//! A rule:
//!
//! | field | meaning |
//! |---|---|
//! | `name` | shown as `rule` in the request log (default `#index`) |
//! | `when` | conditions, all of which must hold (below); absent: always |
//! | `times` | answer at most N requests, then let them fall through |
//! | `text` | the answer's text (a template); streamed in `chunks` pieces |
//! | `tool_calls` | `[{"name": "Write", "input": {…}}]`: `tool_use` blocks / OpenAI `tool_calls` / Responses `function_call` items, after the text; strings in `input` are templates |
//! | `chunks` | pieces a streamed text is cut into (default one per 24 chars, ≤ 16) |
//! | `chunk_delay_ms` | pause between streamed pieces |
//! | `stop_reason` | override (`end_turn`/`tool_use` by default; OpenAI's `finish_reason` is mapped) |
//! | `model` | override the answer's model for this rule |
//! | `error` | `{"status": 429, "type"?, "message"?, "retry_after"?}`: answer with this error (vendor shape; `retry_after` seconds → `retry-after` header; the type defaults to the vendor's for the status: 429 `rate_limit_error`, 529 `overloaded_error`, …) |
//! | `fail_first` | with `error`: only the first N requests this rule answers fail, later ones get `text`/`tool_calls` |
//! | `stall_before_ms` | pause before the first byte (before the status line) |
//! | `stall_mid_ms` | pause in the middle of a stream (after half the text's pieces) |
//! | `error_mid_stream` | with `error`: a streamed request gets a 200 stream whose middle carries the error (Anthropic `event: error`, OpenAI `data: {"error": …}`, Responses `response.failed`) and ends there; `fail_first` counts these too |
//! | `cut_mid_stream` | the connection breaks in the middle of a stream (no final events, the body never ends cleanly) |
//!
//! `when`:
//!
//! | field | holds when |
//! |---|---|
//! | `prompt` | substring of the prompt: the last user message that has text (tool results alone are not one; Claude Code's `<system-reminder>` and Codex's `<environment_context>` blocks are left out) |
//! | `conversation` | substring of any message's text or tool result |
//! | `system` | substring of the system prompt (Anthropic `system`, OpenAI `system`/`developer` messages, Claude Code's `system`-role environment message): how an LLM step's **role** is told apart |
//! | `model` | substring of the requested model |
//! | `api` | `"anthropic"`, `"openai"` (chat completions) or `"responses"` |
//! | `turn` / `min_turn` | exactly / at least N assistant messages in the request: a multi-turn tool loop stays stateless (turn 0 calls a tool, turn 1 answers) |
//! | `offers_tool` | the request offers a tool of this name |
//! | `has_tools` | whether it offers any tool |
//! | `after_tool` | whether the last message carries tool results |
//! | `tool_error` | whether the last tool result is an error (`is_error`) |
//! | `iteration` | the ralph iteration: N of the runner's "this is iteration N of at most M", which every iteration's prompt after the first carries (1 when absent) |
//! | `has_promise` | whether a prompt holds `<promise>…</promise>` |
//! | `role` | the LLM step's role: exactly `X` of the system prompt's line `Kiln role: X` (the runner's pipeline steps start their system prompts with it: `gatherer`, `ceo`, `cto`, `secretary`, `prd`, `tickets`) |
//! | `user_messages` / `min_user_messages` | exactly / at least N user messages with text (tool results alone are not one): a requirements chat asks until the user has answered, then summarises |
//! | `from_match` | the rule applies from the Nth request (1-based) that reached it and met its other conditions; earlier ones fall through |
//!
//! Templates (`{{name}}`, unknown names left as written): `prompt`, `prompt_line` (its first
//! line, ≤ 120 chars), `prompts` (every prompt of the conversation as a numbered list),
//! `prompt_count`, `cwd` (the agent's working directory from Claude Code's environment block
//! `Primary working directory: …` or Codex's `<cwd>…</cwd>`; `.` when absent), `turn`, `iteration`, `promise` (the text of
//! the prompt's `<promise>…</promise>`), `model` (answered), `requested_model`, `tool_result`
//! (the last tool result's text), `answer` (1 for the rule's first answer, 2 for its second…),
//! `role` (the step's `Kiln role:`), `idea` (the first prompt's first line, ≤ 200 chars: an app
//! build's idea as its gatherer is first told it), `ticket_id` and `ticket_title` (the values of
//! the prompt's `Ticket id: …` and `Ticket: …` lines, which every ticket build's prompt carries),
//! `product` (what a landing page is titled: the prompts' last `Headline: …`, found anywhere in a
//! line, else the payload's product name as `"productName": "…"` or a `productName: …` /
//! `Product name: …` line; `Your product` when none) and `fix_attempt` (the prompt's
//! `Fix attempt: …` line).
//!
//! Recipes:
//! - retry: `{"error": {"status": 429, "retry_after": 1}, "fail_first": 2, "text": "ok"}`;
//! - a promise on ralph iteration 3: `{"when": {"iteration": 3}, "text": "<promise>DONE</promise>"}`
//!   before a rule for the other iterations; counting instead of reading the prompt:
//!   `{"when": {"turn": 0, "from_match": 3}, …}` answers the third agent run;
//! - a role: `{"when": {"role": "gatherer", "min_user_messages": 2}, "text": "Thanks.\nREQUIREMENTS_SUMMARY: …"}`
//!   before `{"when": {"role": "gatherer"}, "text": "Who is it for?"}`;
//! - a file written by Claude Code: turn 0 `{"tool_calls": [{"name": "Write", "input":
//!   {"file_path": "{{cwd}}/out.txt", "content": "…"}}]}`, then `{"when": {"after_tool": true},
//!   "text": "done"}`.
//!
//! # The demo script
//!
//! [`Script::demo`] (`e2e/src/model/demo.json`, the binary's default) answers as `kiln-demo` and
//! says so (its texts start `[demo model]`, its PRD's title names it). It walks an app build end to end: the `gatherer`
//! asks one question while it has heard only the idea, then (or whenever its prompt names
//! `REQUIREMENTS_SUMMARY`) thanks and writes `REQUIREMENTS_SUMMARY: Build "<idea>" …`; `ceo`, `cto`
//! and `secretary` take one short turn each, the secretary's saying `CONSENSUS`; `prd` answers a
//! small markdown PRD and the spec in a fenced `json` block (`name`, `pages`, `features`);
//! `tickets` a backlog in one (epic `E1`, stories `S1` and `S2`, `S2` depending on `S1`). A ticket build
//! (Claude Code, its prompt holding `Ticket id: …`) is answered with a `Write` of `<cwd>/index.html`
//! for `S1`, `<cwd>/app.js` for `S2` (together a small list app) and `<cwd>/<id>.md` for any other
//! ticket, then `[demo model] Built ticket <id>: <title>.`. Other agent runs: to a request
//! offering Claude Code's `Write` tool it answers with a `Write` of `<cwd>/KILN_DEMO.md` listing
//! the conversation's requests (to Codex, offering `exec_command`, a `cat > <cwd>/KILN_DEMO.md` heredoc of the same text); after the tool result it answers
//! `[demo model] Wrote KILN_DEMO.md for: <prompt> (request N of this conversation)` (with the
//! prompt's `<promise>…</promise>` repeated, so a demo ralph loop ends), or says the write failed;
//! anything else (side requests, OpenAI chat, LLM steps) gets a labelled one-line answer.
//!
//! Landing pages (seed 001): the `router` answers a fenced `json` block `{"route", "reason"}`:
//! `clarify` when the prompt holds `CLARIFY_ME` (the reason is the question), `deploy` for
//! `DEPLOY_ONLY`, `design` when it says `Job: init`, else `code`; the `design_planner` a
//! dark theme's guidelines (4 colors, 2 typography entries, 3 sections, 2 animations); the
//! `designer` a short markdown spec titled with `{{product}}`. The `coder` agent run (prompt line
//! `Landing node: coder`, Claude Code) reads `index.html`, `styles.css` and `script.js` (turn 0:
//! Claude Code writes over a file only once it has read it), writes the three (turn 1; the page's
//! `<title>` and `<h1>` are `{{product}}`, so a chat saying `Headline: X` changes the page), then
//! reports; with `BREAK_BUILD` in the conversation it leaves `styles.css` out, with `ALWAYS_BROKEN`
//! it also links `ALWAYS_BROKEN.css`, which nobody writes. The `deployment_fixer` (`Landing node:
//! deployment_fixer`) reads and writes `styles.css`, or, when its conversation names
//! `ALWAYS_BROKEN` (the check's errors name `ALWAYS_BROKEN.css`), answers that it could not
//! repair the page and writes nothing.
//!
//! # What Claude Code 2.1.328 sends
//!
//! `POST /v1/messages?beta=true`, streaming, with `x-api-key`, `anthropic-version: 2023-06-01`,
//! `anthropic-beta` (a list), `x-app: cli`, `user-agent: claude-cli/<version> (external, sdk-cli)`
//! and `x-claude-code-session-id`. The body has `system` (blocks), `messages` (the prompt's user
//! message with `<system-reminder>` blocks first, then a `system`-role message with the environment:
//! `Primary working directory: /path`), `tools` (`Agent`, `Bash`, `Edit`, `Read`, `Write`, …; `Write`
//! takes `{"file_path": absolute path, "content"}`), `thinking`, `metadata`, `max_tokens`. With
//! `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1` and `--print` it sends nothing else (without it,
//! also `HEAD /api/hello`, answered 200). As root, `--dangerously-skip-permissions` needs
//! `IS_SANDBOX=1`. Its stream-json `assistant` events carry the answered model (`kiln-demo`); its
//! `result` prices the tokens by the *requested* model (`total_cost_usd`, `modelUsage`).
//!
//! # What Codex CLI 0.169.0 sends
//!
//! Only through a provider of `$CODEX_HOME/config.toml` (`model_provider = "kiln"`,
//! `[model_providers.kiln]` with `base_url = "<openai_base_url>"`, `wire_api = "responses"` —
//! `"chat"` is refused — and `env_key = "OPENAI_API_KEY"`): `POST /v1/responses`, streaming, with
//! `Authorization: Bearer`, `originator: codex_exec`, `session-id`. The body has `instructions`,
//! `input` (developer messages, a user message holding `<environment_context>` with
//! `<cwd>/path</cwd>`, then the prompt), `tools` (`exec_command` takes `{"cmd": "…"}`,
//! `write_stdin`, …). `codex exec --json --dangerously-bypass-approvals-and-sandbox` runs the
//! command; `codex exec … resume <thread_id> "<prompt>"` continues a thread.

mod anthropic;
mod conversation;
mod openai;
mod responses;
mod script;
mod server;

pub use conversation::{Api, Conversation, MessageSummary, ToolResult};
pub use script::{ErrorReply, Rule, Script, ToolCall, When, DEMO_JSON};
pub use server::RecordedRequest;

use std::net::SocketAddr;

use server::ServerState;

/// A running model server; stopped when dropped.
pub struct ModelServer {
    addr: SocketAddr,
    state: ServerState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ModelServer {
    /// Serves `script` on 127.0.0.1 (a free port) from a thread of its own.
    pub fn start(script: Script) -> ModelServer {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding the model server");
        ModelServer::start_on(listener, script).expect("starting the model server")
    }

    /// Serves the demo script (see the module docs).
    pub fn demo() -> ModelServer {
        ModelServer::start(Script::demo())
    }

    /// Serves `script` on a listener already bound.
    pub fn start_on(
        listener: std::net::TcpListener,
        script: Script,
    ) -> anyhow::Result<ModelServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = ServerState::new(script);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serving = state.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-model-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    server::serve_state(listener, serving, async {
                        let _ = rx.await;
                    })
                    .await
                    .expect("serving the model server");
                });
            })?;
        Ok(ModelServer {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`: the value for `ANTHROPIC_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1`: the value for `OPENAI_BASE_URL`.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.url())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests()
    }

    /// The chat requests so far (`/v1/messages` and `/v1/chat/completions`), in order.
    pub fn chat_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.api.is_some() && !r.path.contains("count_tokens"))
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state.clear_requests()
    }

    /// Replaces the script; the rules' counters start again.
    pub fn set_script(&self, script: Script) {
        self.state.set_script(script)
    }

    pub fn script(&self) -> Script {
        self.state.script()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `script` on `listener` until `shutdown` resolves (the binary's entry point); with
/// `log`, a line per request goes to stderr.
pub async fn serve(
    listener: tokio::net::TcpListener,
    script: Script,
    log: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = ServerState::new(script);
    if log {
        state.log_requests();
    }
    server::serve_state(listener, state, shutdown).await
}
