//! Kiln's own overhead per LLM step, end to end (issue 8's benchmark; target ≤ 10 ms p99): app
//! builds through seed 000's face on a real edge (`wrangler dev`), a real runner (the process
//! executor, the `text` agent) and the scripted model server answering every step with a fixed,
//! known latency (`STALL_MS` before its first byte, `CHUNKS` pieces `CHUNK_DELAY_MS` apart). Each
//! job's socket is read by a task that stamps every message with the wall clock as it arrives.
//!
//! Per LLM step (nine dialogue turns without consensus, the PRD, the backlog), from the step's
//! log line (`pipeline::Overhead`: the call's marks on the wall clock and the provider's times)
//! and the arrival of the step's own event (`agentDialogue`, `prdReady`, `ticketReset`) on the
//! subscriber's socket:
//! - step start → first token, less the server's time to its first byte (the runner);
//! - last token → event handed to the runner's reporter, less the server's time from its last
//!   text to its stream's end (the runner);
//! - handed → on the socket (reporter batching, the POST, the job's room, the broadcast);
//! - last token → on the socket, less the server's tail;
//! - Kiln's overhead per step: the first plus the fourth.
//!
//! The runner and this process share the host's clock. The gatherer's turns (a chat message →
//! the reply on the socket, whole and less the steps' typical call) are shown apart: they travel
//! through the room and the queue to the runner and back, not through the pipeline. A build
//! whose socket failed is left out (its events came by replay) and counted.
//!
//! Two edges in turn, as the other benchmarks do: the `wrangler dev` command and wrangler's dev
//! server without the DevTools inspector.
//!
//! `cargo build -p kiln-runner && scripts/build-edge && cargo run -p kiln-e2e --bin bench_steps
//! [JOBS]` (20 by default; `--release` for both builds measures an optimised runner;
//! `KILN_BENCH_VERBOSE=1` prints every step).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use kiln_e2e::app::{chat, AppClient};
use kiln_e2e::model::{ModelServer, Script};
use futures::StreamExt;
use kiln_e2e::{EdgeServer, TestEdge, TestRunner};
use tokio_tungstenite::tungstenite::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const JOBS: usize = 20;
/// The script's latency of every answer.
const STALL_MS: u64 = 20;
const CHUNKS: u64 = 8;
const CHUNK_DELAY_MS: u64 = 3;
/// LLM steps of one build: nine dialogue turns (no consensus), the PRD and the backlog.
const STEPS_PER_JOB: usize = 11;
const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// One answer of the script, with its latency.
fn answer(when: Value, text: &str) -> Value {
    json!({"when": when, "text": text, "stall_before_ms": STALL_MS, "chunks": CHUNKS, "chunk_delay_ms": CHUNK_DELAY_MS})
}

fn script() -> Script {
    let backlog = json!({"tickets": [
        {"id": "E1", "type": "epic", "title": "The list", "description": "The app.", "parent": null, "dependencies": []},
        {"id": "S1", "type": "story", "title": "Page", "description": "The page.", "parent": "E1", "dependencies": []}
    ]});
    let turn = "We keep the first version small and plain: one page with the list, storage in the browser, nothing else yet.";
    Script::from_value(json!({"model": "bench-model", "rules": [
        answer(json!({"role": "gatherer", "turn": 0}), "Who will use the list, and what must they do with it first?"),
        answer(json!({"role": "gatherer", "min_turn": 1}), "Thank you.\nREQUIREMENTS_SUMMARY: A plain list of things for one person: add, tick off, remove; kept in the browser."),
        answer(json!({"role": "prd"}), "# PRD\n\nA plain list for one person.\n\n## Features\n\n- add\n- tick off\n- remove\n\n```json\n{\"name\": \"list\", \"features\": [\"add\", \"tick\", \"remove\"]}\n```"),
        answer(json!({"role": "tickets"}), &format!("```json\n{backlog}\n```")),
        answer(json!({}), turn),
    ]}))
    .expect("a valid script")
}

/// What a step's log line says (`pipeline::Overhead::describe`), in microseconds.
#[derive(Debug, Clone, Copy, Default)]
struct StepLine {
    before_first_token: u64,
    after_last_token: u64,
    started_at: u64,
    first_token_at: u64,
    last_token_at: u64,
    handed_at: u64,
    server_first_byte: u64,
    server_tail: u64,
}

/// The role and the marks of an `LLM <role>: …; engine overhead …; at (unix us) …` line.
fn parse_step_line(line: &str) -> Option<(String, StepLine)> {
    let role = line.strip_prefix("LLM ")?.split(':').next()?.to_string();
    let rest = line.split("engine overhead ").nth(1)?;
    if !rest.contains("; at (unix us) start ") {
        return None;
    }
    let n: Vec<u64> = rest.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map_while(|s| s.parse().ok()).collect();
    let [before_first_token, after_last_token, started_at, first_token_at, last_token_at, handed_at, server_first_byte, server_tail, ..] = n[..] else {
        return None;
    };
    Some((role, StepLine { before_first_token, after_last_token, started_at, first_token_at, last_token_at, handed_at, server_first_byte, server_tail }))
}

/// One LLM step, measured.
#[derive(Debug, Clone)]
struct Sample {
    role: String,
    line: StepLine,
    /// When the step's own event reached the socket (unix us).
    arrived_at: u64,
}

impl Sample {
    fn handed_to_socket(&self) -> i64 {
        self.arrived_at as i64 - self.line.handed_at as i64
    }

    fn last_token_to_socket(&self) -> i64 {
        self.arrived_at as i64 - self.line.last_token_at as i64 - self.line.server_tail as i64
    }
}

/// A job's messages as they arrive: (unix us, message).
type Stamped = mpsc::UnboundedReceiver<(u64, Value)>;

/// Reads a job's socket in a task of its own (aborted with the handle), stamping each message as
/// it arrives. A socket that fails is opened again after the last `seq` it delivered, and a
/// `{"kind": "_reset"}` stands where it failed (that build's stamps are not the live path's).
fn stamped(ws_base: String, job_id: String, token: String) -> (Stamped, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut after: Option<u64> = None;
        loop {
            let mut url = format!("{ws_base}/ws/jobs/{job_id}/?token={token}");
            if let Some(a) = after {
                url.push_str(&format!("&after={a}"));
            }
            let why = match tokio_tungstenite::connect_async(url.as_str()).await {
                Err(e) => format!("connecting: {e}"),
                Ok((mut ws, _)) => loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            let at = now_us();
                            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                            if let Some(seq) = v["seq"].as_u64() {
                                after = Some(seq);
                            }
                            if tx.send((at, v)).is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break e.to_string(),
                        None => break "closed".to_string(),
                    }
                },
            };
            if tx.send((now_us(), json!({"kind": "_reset", "why": why}))).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (rx, task)
}

async fn until(rx: &mut Stamped, seen: &mut Vec<(u64, Value)>, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<(u64, Value)> {
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((at, v))) => {
                seen.push((at, v.clone()));
                if pred(&v) {
                    return Ok((at, v));
                }
            }
            Ok(None) => bail!("the socket ended before {what}"),
            Err(_) => bail!("no {what} within {JOB_TIMEOUT:?}"),
        }
    }
}

/// Pairs each step's log line with its own event, in the order both arrived.
fn samples(events: &[(u64, Value)]) -> anyhow::Result<Vec<Sample>> {
    let (mut dialogue, mut prd, mut backlog) = (VecDeque::new(), VecDeque::new(), VecDeque::new());
    let mut lines = vec![];
    for (at, e) in events {
        match e["kind"].as_str() {
            Some("agentDialogue") => dialogue.push_back(*at),
            Some("prdReady") => prd.push_back(*at),
            Some("ticketReset") => backlog.push_back(*at),
            Some("log") if e["stream"] == "system" => {
                if let Some(parsed) = e["content"].as_str().and_then(parse_step_line) {
                    lines.push(parsed);
                }
            }
            _ => {}
        }
    }
    let mut out = vec![];
    for (role, line) in lines {
        let queue = match role.as_str() {
            "ceo" | "cto" | "secretary" => &mut dialogue,
            "prd" => &mut prd,
            "tickets" => &mut backlog,
            other => bail!("a step of an unexpected role {other}"),
        };
        let arrived_at = queue.pop_front().with_context(|| format!("no event on the socket for the {role} step"))?;
        let marks = [line.started_at, line.first_token_at, line.last_token_at, line.handed_at, arrived_at];
        if marks.windows(2).any(|w| w[0] > w[1]) {
            bail!("the {role} step's marks are out of order (start, first token, last token, handed, arrived): {marks:?}");
        }
        out.push(Sample { role, line, arrived_at });
    }
    Ok(out)
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

/// Nearest-rank percentiles of microsecond samples, in milliseconds.
fn stats(mut v: Vec<i64>) -> Stats {
    v.sort_unstable();
    let at = |p: f64| {
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1] as f64 / 1000.0
    };
    Stats { p50: at(50.0), p99: at(99.0), max: v[v.len() - 1] as f64 / 1000.0 }
}

fn row(name: &str, v: Vec<i64>) {
    let n = v.len();
    let s = stats(v);
    println!("| {name:<76} | {n:>7} | {:>8.2} | {:>8.2} | {:>8.2} |", s.p50, s.p99, s.max);
}

/// What one edge's builds measured.
struct Measured {
    steps: Vec<Sample>,
    /// Chat sent → the gatherer's reply on the socket, per build (us).
    gather: Vec<i64>,
    /// `queued` → `build_done`, per build.
    builds: Vec<Duration>,
    /// Builds whose socket failed (why), not measured.
    left_out: Vec<String>,
}

/// `jobs` app builds one after another on a fresh edge served by `server` and a fresh runner.
async fn measure(server: EdgeServer, model_url: &str, jobs: usize) -> anyhow::Result<Measured> {
    let edge = TestEdge::start_with(server, &[("MAX_CONCURRENT_JOBS", "4")]).await?;
    let state = tempfile::tempdir()?;
    let state_dir = state.path().display().to_string();
    let runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_STATE_DIR", state_dir.as_str()),
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("ANTHROPIC_BASE_URL", model_url),
            ("ANTHROPIC_API_KEY", "sk-ant-bench"),
            ("RUNNER_LLM_MODEL", "anthropic/bench-model"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await?;
    let user = AppClient::register(&edge, "bench-steps").await;
    let mut out = Measured { steps: vec![], gather: vec![], builds: vec![], left_out: vec![] };
    for i in 0..jobs {
        let job = user.create_job(&format!("A plain list, build {i}")).await;
        let id = job["id"].as_str().context("a job id")?.to_string();
        let (mut rx, reader) = stamped(edge.ws_url(), id.clone(), user.access.clone());
        let mut seen = vec![];
        until(&mut rx, &mut seen, "the gatherer's question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent").await?;
        let (mut ws_send, sent_at) = (user.socket(&id).await, now_us());
        ws_send.send_json(&chat("Just me; adding and ticking off things first")).await;
        let (replied_at, _) = until(&mut rx, &mut seen, "the gatherer's summary", |e| {
            e["kind"] == "stageUpdate" && e["role"] == "agent" && e["content"].as_str().is_some_and(|c| c.contains("Thank you"))
        })
        .await?;
        ws_send.close().await;
        out.gather.push(replied_at as i64 - sent_at as i64);
        let t0 = Instant::now();
        let (_, end) = until(&mut rx, &mut seen, "the build's end", |e| {
            e["kind"] == "jobStatus" && (e["status"] == "build_done" || e["status"] == "failed")
        })
        .await?;
        if end["status"] != "build_done" {
            let log = runner.log();
            let from = (log.len().saturating_sub(4000)..).find(|&i| log.is_char_boundary(i)).unwrap_or(0);
            bail!("build {i} ({id}) failed: {end}\nthe runner's log ends:\n{}", &log[from..]);
        }
        out.builds.push(t0.elapsed());
        // The last step's log line may trail the build's end by a batch.
        let more = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(m) = rx.recv().await {
                seen.push(m);
            }
        });
        let _ = more.await;
        reader.abort();
        let resets: Vec<&Value> = seen.iter().map(|(_, v)| v).filter(|v| v["kind"] == "_reset").collect();
        if !resets.is_empty() {
            eprintln!("build {}/{jobs}: left out, its socket failed ({})", i + 1, resets[0]["why"]);
            out.left_out.push(resets[0]["why"].as_str().unwrap_or_default().to_string());
            continue;
        }
        let measured = samples(&seen)?;
        if measured.len() != STEPS_PER_JOB {
            bail!("build {i} ({id}): {} LLM steps measured, {STEPS_PER_JOB} expected", measured.len());
        }
        if std::env::var_os("KILN_BENCH_VERBOSE").is_some() {
            for s in &measured {
                eprintln!(
                    "  {:<9} first token {:>6} us, handed {:>5} us, on the socket {:>6} us after its last token (server: first byte {:>6} us, tail {:>4} us)",
                    s.role,
                    s.line.before_first_token,
                    s.line.after_last_token,
                    s.last_token_to_socket(),
                    s.line.server_first_byte,
                    s.line.server_tail
                );
            }
        }
        out.steps.extend(measured);
        eprintln!("build {}/{jobs}: {:.1} s", i + 1, out.builds.last().unwrap().as_secs_f64());
    }
    Ok(out)
}

fn print(label: &str, jobs: usize, m: &Measured) {
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    let latency_ms = STALL_MS + (CHUNKS - 1) * CHUNK_DELAY_MS;
    println!(
        "\n{label}: Kiln's overhead per LLM step, end to end, over {} steps of {} app builds (this tool's {build} build; the runner binary as built); \
         the script answers {STALL_MS} ms to its first byte, then {CHUNKS} pieces {CHUNK_DELAY_MS} ms apart; milliseconds",
        m.steps.len(),
        jobs - m.left_out.len()
    );
    println!("| {:<76} | {:>7} | {:>8} | {:>8} | {:>8} |", "segment", "samples", "p50", "p99", "max");
    println!("|{:-<78}|{:->9}|{:->10}|{:->10}|{:->10}|", "", "", "", "", "");
    let col = |f: &dyn Fn(&Sample) -> i64| m.steps.iter().map(f).collect::<Vec<i64>>();
    row("step start → first token, less the server's first byte (runner)", col(&|s| s.line.before_first_token as i64));
    row("last token → event handed to the reporter, less the server's tail (runner)", col(&|s| s.line.after_last_token as i64));
    row("event handed → on the subscriber's socket (reporter, POST, room, broadcast)", col(&|s| s.handed_to_socket()));
    row("last token → on the subscriber's socket, less the server's tail", col(&|s| s.last_token_to_socket()));
    row("Kiln per LLM step: the first row + the one above (target p99 ≤ 10 ms)", col(&|s| s.line.before_first_token as i64 + s.last_token_to_socket()));
    row("(the server: request → first byte, as the runner saw it)", col(&|s| s.line.server_first_byte as i64));
    row("(the call: step start → last token)", col(&|s| (s.line.last_token_at - s.line.started_at) as i64));
    // A turn's own call is not marked; the steps' calls show what the server took.
    let server = stats(col(&|s| (s.line.last_token_at - s.line.started_at) as i64)).p50;
    row(&format!("gatherer turn: chat sent → reply on the socket (the server's {latency_ms} ms scripted included)"), m.gather.clone());
    row(
        &format!("gatherer turn, less the steps' p50 call ({server:.1} ms)"),
        m.gather.iter().map(|g| g - (server * 1000.0) as i64).collect(),
    );
    if !m.left_out.is_empty() {
        println!("left out: {} build(s) whose socket failed: {}", m.left_out.len(), m.left_out.join("; "));
    }
    let mut b = m.builds.clone();
    b.sort();
    println!(
        "whole builds (queued → build_done: 11 LLM steps, 1 ticket with its commit and snapshot): p50 {:.2} s, max {:.2} s",
        b[b.len() / 2].as_secs_f64(),
        b[b.len() - 1].as_secs_f64()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("the argument is the number of app builds")?,
        None => JOBS,
    };
    let model = ModelServer::start(script());
    for (label, server) in [("wrangler dev", EdgeServer::WranglerDev), ("workerd direct (scripts/dev)", EdgeServer::Direct)] {
        eprintln!("{label}:");
        let m = measure(server, &model.url(), jobs).await?;
        print(label, jobs, &m);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_read_back() {
        let line = "LLM cto: anthropic/m answered as m, 1 in / 2 out tokens, 41 ms, first token at 21 ms, 1 attempt(s); engine overhead 412 us before the first token, 37 us after the last; at (unix us) start 1000, first token 21412, last token 41000, handed 41040; server first byte 21000 us, tail 3 us";
        let (role, s) = parse_step_line(line).unwrap();
        assert_eq!(role, "cto");
        assert_eq!((s.before_first_token, s.after_last_token, s.started_at, s.handed_at, s.server_tail), (412, 37, 1000, 41040, 3));
        assert!(parse_step_line("LLM cto: x; engine overhead 1 us before the first token, 2 us after the last").is_none());
        let sample = Sample { role, line: s, arrived_at: 45_000 };
        assert_eq!((sample.handed_to_socket(), sample.last_token_to_socket()), (3960, 3997));
    }

    #[test]
    fn steps_pair_with_their_events_in_order() {
        let log = |role: &str, handed: u64| {
            json!({"kind": "log", "stream": "system", "content": format!("LLM {role}: x; engine overhead 1 us before the first token, 2 us after the last; at (unix us) start 1, first token 2, last token 3, handed {handed}; server first byte 1 us, tail 0 us")})
        };
        let events = vec![
            (10, json!({"kind": "agentDialogue", "order": 1})),
            (11, log("ceo", 9)),
            (20, json!({"kind": "prdReady"})),
            (22, json!({"kind": "ticketReset"})),
            (23, log("prd", 19)),
            (24, log("tickets", 21)),
        ];
        let s = samples(&events).unwrap();
        assert_eq!(s.iter().map(|s| (s.arrived_at, s.line.handed_at)).collect::<Vec<_>>(), [(10, 9), (20, 19), (22, 21)]);
        assert!(samples(&[(1, log("ceo", 0))]).is_err(), "a step without its event");
    }
}
