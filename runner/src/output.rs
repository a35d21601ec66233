//! Command output to events: chunks are split into lines, lines become `log` events (or `agent`
//! events for JSON lines of a `claude-stream-json` agent), and the tail of stdout is kept for a
//! ralph iteration's summary and completion-promise check.

use kiln_schemas::events::LogStream;
use kiln_schemas::runner::RunnerEvent;
use serde_json::Value;

use crate::agent::Usage;
use crate::config::AgentFormat;
use crate::executor::OutputChunk;

/// Longest line sent as one event: the rest of a longer line is dropped, and the line ends with
/// a marker saying how many bytes went (`… [truncated 1234567 bytes]`).
pub const MAX_LINE_BYTES: usize = 128 * 1024;
/// Characters of output an iteration summary keeps.
pub const SUMMARY_CHARS: usize = 500;

/// The marker that ends a truncated line.
pub fn truncated_marker(bytes: u64) -> String {
    format!("… [truncated {bytes} bytes]")
}

/// Splits a byte stream into lines (`\n`, with a trailing `\r` dropped), lossily as UTF-8. A
/// line keeps at most [`MAX_LINE_BYTES`]; what is beyond is only counted, so a line of any length
/// costs no more memory than that.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes of the current line beyond [`MAX_LINE_BYTES`], dropped.
    cut: u64,
}

impl LineSplitter {
    pub fn push(&mut self, mut data: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        while !data.is_empty() {
            let (part, newline) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], Some(i)),
                None => (data, None),
            };
            let room = MAX_LINE_BYTES.saturating_sub(self.buf.len());
            let keep = part.len().min(room);
            self.buf.extend_from_slice(&part[..keep]);
            self.cut += (part.len() - keep) as u64;
            match newline {
                Some(i) => {
                    lines.push(self.take());
                    data = &data[i + 1..];
                }
                None => break,
            }
        }
        lines
    }

    /// The last line, if output ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.buf.is_empty() || self.cut > 0).then(|| self.take())
    }

    fn take(&mut self) -> String {
        if self.cut == 0 && self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        let mut line = String::from_utf8_lossy(&self.buf).into_owned();
        if self.cut > 0 {
            line.push_str(&truncated_marker(self.cut));
        }
        self.buf.clear();
        self.cut = 0;
        line
    }
}

/// The event for one line of output.
pub fn line_event(format: AgentFormat, stream: LogStream, line: String) -> RunnerEvent {
    if format.is_json() && stream == LogStream::Stdout {
        if let Some(event) = parse_json_object(&line) {
            return RunnerEvent::Agent { event };
        }
    }
    RunnerEvent::Log {
        stream,
        content: line,
    }
}

fn parse_json_object(line: &str) -> Option<Value> {
    let trimmed = line.trim();
    if !trimmed.starts_with('{') {
        return None;
    }
    serde_json::from_str::<Value>(trimmed)
        .ok()
        .filter(Value::is_object)
}

/// The last `n` characters of `s`.
pub fn tail_chars(s: &str, n: usize) -> &str {
    let count = s.chars().count();
    if count <= n {
        return s;
    }
    let (idx, _) = s
        .char_indices()
        .nth(count - n)
        .expect("index within the string");
    &s[idx..]
}

/// Turns one command's output into events and remembers what a ralph iteration needs.
#[derive(Debug)]
pub struct OutputCollector {
    format: AgentFormat,
    stdout: LineSplitter,
    stderr: LineSplitter,
    promise: Option<String>,
    promise_seen: bool,
    /// Recent stdout text, bounded.
    tail: String,
    /// The agent's session, once announced (what a follow-up resumes).
    session_id: Option<String>,
    /// Usage the agent reported, summed over the run.
    usage: Option<Usage>,
}

impl OutputCollector {
    pub fn new(format: AgentFormat, promise: Option<String>) -> Self {
        OutputCollector {
            format,
            stdout: LineSplitter::default(),
            stderr: LineSplitter::default(),
            promise: promise.filter(|p| !p.is_empty()),
            promise_seen: false,
            tail: String::new(),
            session_id: None,
            usage: None,
        }
    }

    pub fn feed(&mut self, chunk: &OutputChunk) -> Vec<RunnerEvent> {
        let lines = match chunk.stream {
            LogStream::Stderr => self.stderr.push(&chunk.data),
            _ => self.stdout.push(&chunk.data),
        };
        lines
            .into_iter()
            .map(|l| self.line(chunk.stream, l))
            .collect()
    }

    /// Flushes unterminated last lines.
    pub fn finish(&mut self) -> Vec<RunnerEvent> {
        let mut events = Vec::new();
        if let Some(l) = self.stdout.finish() {
            events.push(self.line(LogStream::Stdout, l));
        }
        if let Some(l) = self.stderr.finish() {
            events.push(self.line(LogStream::Stderr, l));
        }
        events
    }

    fn line(&mut self, stream: LogStream, line: String) -> RunnerEvent {
        let event = line_event(self.format, stream, line);
        if stream == LogStream::Stdout {
            if let RunnerEvent::Agent { event } = &event {
                if let Some(id) = self.format.session_id(event) {
                    self.session_id = Some(id);
                }
                if let Some(u) = self.format.usage(event) {
                    self.usage.get_or_insert_with(Usage::default).add(&u);
                }
            }
            let text = match &event {
                RunnerEvent::Agent { event } => self.format.text(event),
                RunnerEvent::Log { content, .. } => Some(content.clone()),
                _ => None,
            };
            if let Some(p) = &self.promise {
                let raw_has = matches!(&event, RunnerEvent::Log { content, .. } if content.contains(p.as_str()));
                if raw_has || text.as_deref().is_some_and(|t| t.contains(p.as_str())) {
                    self.promise_seen = true;
                }
            }
            if let Some(t) = text {
                if !self.tail.is_empty() {
                    self.tail.push('\n');
                }
                self.tail.push_str(&t);
                if self.tail.len() > 8 * SUMMARY_CHARS {
                    self.tail = tail_chars(&self.tail, 2 * SUMMARY_CHARS).to_string();
                }
            }
        }
        event
    }

    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn promise_detected(&self) -> bool {
        self.promise_seen
    }

    /// The last ~500 characters of stdout text.
    pub fn summary(&self) -> String {
        tail_chars(self.tail.trim(), SUMMARY_CHARS).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn out(s: &str) -> OutputChunk {
        OutputChunk {
            stream: LogStream::Stdout,
            data: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn lines_are_split_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"hel"), Vec::<String>::new());
        assert_eq!(s.push(b"lo\r\nwor"), vec!["hello"]);
        assert_eq!(s.push(b"ld\n\n"), vec!["world", ""]);
        assert_eq!(s.finish(), None);
        s.push(b"tail");
        assert_eq!(s.finish(), Some("tail".into()));
        assert_eq!(s.push(&[0xff, b'\n']), vec!["\u{fffd}"]);
    }

    #[test]
    fn overlong_lines_are_truncated_with_a_marker() {
        let mut s = LineSplitter::default();
        // A line of 2 MiB and 3 bytes, in chunks, then a short one.
        let total = 2 * 1024 * 1024 + 3;
        let mut lines = Vec::new();
        for chunk in vec![b'x'; total].chunks(10_000) {
            lines.extend(s.push(chunk));
        }
        assert!(lines.is_empty());
        assert!(
            s.buf.len() <= MAX_LINE_BYTES,
            "the splitter keeps no more than a line"
        );
        lines.extend(s.push(b"\nshort\n"));
        assert_eq!(lines.len(), 2);
        let cut = total - MAX_LINE_BYTES;
        assert_eq!(
            lines[0],
            format!("{}… [truncated {cut} bytes]", "x".repeat(MAX_LINE_BYTES))
        );
        assert_eq!(lines[1], "short");
        // An unterminated long line is truncated too.
        s.push(&vec![b'y'; MAX_LINE_BYTES + 5]);
        assert!(s.finish().unwrap().ends_with("y… [truncated 5 bytes]"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn json_lines_become_agent_events_only_for_stream_json_stdout() {
        let line = r#"{"type":"system","subtype":"init"}"#.to_string();
        assert_eq!(
            line_event(
                AgentFormat::ClaudeStreamJson,
                LogStream::Stdout,
                line.clone()
            ),
            RunnerEvent::Agent {
                event: json!({"type": "system", "subtype": "init"})
            }
        );
        assert!(matches!(
            line_event(AgentFormat::Text, LogStream::Stdout, line.clone()),
            RunnerEvent::Log { .. }
        ));
        assert!(matches!(
            line_event(AgentFormat::ClaudeStreamJson, LogStream::Stderr, line),
            RunnerEvent::Log {
                stream: LogStream::Stderr,
                ..
            }
        ));
        for text in ["plain text", "{not json", "42", "[1,2]", ""] {
            assert_eq!(
                line_event(
                    AgentFormat::ClaudeStreamJson,
                    LogStream::Stdout,
                    text.into()
                ),
                RunnerEvent::Log {
                    stream: LogStream::Stdout,
                    content: text.into()
                }
            );
        }
    }

    #[test]
    fn the_collector_keeps_the_session_and_sums_usage() {
        let mut c = OutputCollector::new(AgentFormat::ClaudeStreamJson, None);
        assert_eq!((c.session_id(), c.usage()), (None, None));
        c.feed(&out(concat!(
            r#"{"type":"system","subtype":"init","session_id":"s-1"}"#, "\n",
            r#"{"type":"result","result":"ok","total_cost_usd":0.5,"usage":{"input_tokens":10,"output_tokens":2}}"#, "\n",
            r#"{"type":"result","result":"again","total_cost_usd":0.25,"usage":{"input_tokens":1,"output_tokens":1}}"#, "\n",
        )));
        assert_eq!(c.session_id(), Some("s-1"));
        let u = c.usage().unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cost_usd),
            (11, 3, Some(0.75))
        );
        assert_eq!(c.summary(), "ok\nagain");
    }

    #[test]
    fn the_promise_is_seen_in_stdout_only() {
        let mut c = OutputCollector::new(AgentFormat::Text, Some("RALPH_COMPLETE".into()));
        c.feed(&OutputChunk {
            stream: LogStream::Stderr,
            data: b"RALPH_COMPLETE\n".to_vec(),
        });
        assert!(!c.promise_detected());
        c.feed(&out("all done RALPH_COMP"));
        assert!(!c.promise_detected());
        c.feed(&out("LETE\n"));
        assert!(c.promise_detected());
    }

    #[test]
    fn the_promise_is_seen_inside_stream_json() {
        let mut c = OutputCollector::new(AgentFormat::ClaudeStreamJson, Some("DONE".into()));
        let events = c.feed(&out("{\"type\":\"result\",\"result\":\"all DONE\"}\n"));
        assert!(matches!(events[0], RunnerEvent::Agent { .. }));
        assert!(c.promise_detected());
        assert_eq!(c.summary(), "all DONE");
    }

    #[test]
    fn no_promise_means_never_detected() {
        let mut c = OutputCollector::new(AgentFormat::Text, Some(String::new()));
        c.feed(&out("anything\n"));
        assert!(!c.promise_detected());
    }

    #[test]
    fn summaries_keep_the_last_500_characters() {
        let mut c = OutputCollector::new(AgentFormat::Text, None);
        for i in 0..400 {
            c.feed(&out(&format!("line {i} é\n")));
        }
        let s = c.summary();
        assert_eq!(s.chars().count(), SUMMARY_CHARS);
        assert!(s.ends_with("line 399 é"));
        assert_eq!(tail_chars("héllo", 3), "llo");
        assert_eq!(tail_chars("hi", 3), "hi");
    }

    #[test]
    fn finish_flushes_partial_lines() {
        let mut c = OutputCollector::new(AgentFormat::Text, None);
        assert!(c.feed(&out("no newline")).is_empty());
        assert_eq!(
            c.finish(),
            vec![RunnerEvent::Log {
                stream: LogStream::Stdout,
                content: "no newline".into()
            }]
        );
    }
}
