//! An incremental Server-Sent Events parser (the WHATWG `text/event-stream` rules that LLM
//! vendors use): bytes go in as they arrive, whole events come out. Lines end in `\n`, `\r\n` or
//! `\r`; `event:` names the event, `data:` lines are joined with `\n`, a blank line dispatches,
//! lines starting with `:` are comments, one space after the colon is dropped. `id:` and `retry:`
//! are read and ignored (no vendor stream is resumed). A line cut between two chunks, a UTF-8
//! character included, is kept until its end arrives.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field (`None`: the default, `message`).
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to that line end.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds bytes; every event they complete is passed to `out`, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut out: impl FnMut(SseEvent)) {
        if bytes.is_empty() {
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = bytes {
                bytes = rest;
            }
        }
        while let Some(pos) = bytes.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.line.extend_from_slice(&bytes[..pos]);
            let cr = bytes[pos] == b'\r';
            bytes = &bytes[pos + 1..];
            if cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            let line = std::mem::take(&mut self.line);
            if let Some(ev) = self.line_done(&line) {
                out(ev);
            }
        }
        self.line.extend_from_slice(bytes);
    }

    /// The stream ended: an event whose blank line never came is dropped, as the standard says.
    /// True when nothing was pending (the stream ended on an event boundary).
    pub fn finish(&mut self) -> bool {
        let clean = self.line.is_empty() && self.data.is_none() && self.event.is_none();
        *self = SseParser::default();
        clean
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            let event = self.event.take();
            return self.data.take().map(|data| SseEvent { event, data });
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = vec![];
        for c in chunks {
            p.feed(c, |e| out.push(e));
        }
        out
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        }
    }

    #[test]
    fn events_and_data_lines() {
        let got = parse_in(&[
            b"event: message_start\ndata: {\"a\":1}\n\nevent: ping\ndata: {}\n\ndata: [DONE]\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                ev(Some("message_start"), "{\"a\":1}"),
                ev(Some("ping"), "{}"),
                ev(None, "[DONE]"),
            ]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let text = "event: x\r\ndata: h\u{e9}llo\r\ndata:second\r\n\r\n: comment\n\ndata: \u{1f525}\rid: 7\r\r";
        let whole = parse_in(&[text.as_bytes()]);
        assert_eq!(
            whole,
            vec![ev(Some("x"), "h\u{e9}llo\nsecond"), ev(None, "\u{1f525}")]
        );
        let bytes = text.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let got = parse_in(&[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!(got, whole, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn a_blank_line_without_data_dispatches_nothing_and_comments_are_skipped() {
        assert_eq!(parse_in(&[b"event: lonely\n\n:keep-alive\n\n"]), vec![]);
        assert_eq!(parse_in(&[b"data\n\n"]), vec![ev(None, "")]);
        assert_eq!(
            parse_in(&[b"data:  two spaces\n\n"]),
            vec![ev(None, " two spaces")]
        );
    }

    #[test]
    fn finish_tells_a_cut_event_apart() {
        let mut p = SseParser::new();
        p.feed(b"data: {}\n\n", |_| {});
        assert!(p.finish());
        p.feed(b"data: {\"half\":", |_| panic!("not an event yet"));
        assert!(!p.finish());
        p.feed(b"data: x\n", |_| panic!("no blank line yet"));
        assert!(!p.finish());
    }
}
