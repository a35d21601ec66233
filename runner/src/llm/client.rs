//! [`LlmClient`]: routes a request, sends it, reads the stream, retries, meters.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE};
use serde_json::Value;

use super::config::{Api, LlmConfig, ModelRef, Provider};
use super::error::{redact, LlmError};
use super::meter::Meter;
use super::retry::{self, next_wait, Wait};
use super::sse::SseParser;
use super::usage::{StepUsage, Timing};
use super::{anthropic, openai, ChatRequest, Completion, Read, Reading, TextEvent};
use crate::jobs::CancelToken;

/// The most of an error answer's body that is read.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// The runner's LLM client: cheap to clone (one connection pool).
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    config: Arc<LlmConfig>,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("config", &self.config)
            .finish()
    }
}

fn lock(meter: &Mutex<Meter>) -> MutexGuard<'_, Meter> {
    meter.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error and its causes, one after the other (reqwest's own says only "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let more = c.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        source = c.source();
    }
    s
}

/// The vendor's error type and message from an error answer's body (Anthropic's
/// `{"type":"error","error":{"type","message"}}`, OpenAI's `{"error":{"message","type","code"}}`,
/// a bare `{"error": "…"}` or `{"message": "…"}`), else the body's text.
fn vendor_error(body: &[u8]) -> (Option<String>, String) {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        match v.get("error") {
            Some(Value::String(m)) => return (None, m.clone()),
            Some(e @ Value::Object(_)) => {
                let kind = str_of(e, "code").or_else(|| str_of(e, "type"));
                if let Some(m) = str_of(e, "message") {
                    return (kind, m);
                }
            }
            _ => {}
        }
        if let Some(m) = str_of(&v, "message") {
            return (None, m);
        }
    }
    if text.is_empty() {
        (None, "(an empty body)".into())
    } else {
        (None, text.chars().take(500).collect())
    }
}

/// The request every attempt of a call sends.
struct Outgoing<'a> {
    url: &'a str,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

/// One call in progress: what every attempt adds up to.
struct Call<'a> {
    provider: &'a Provider,
    t0: Instant,
    attempts: u32,
    /// Usage reported by earlier attempts.
    input_tokens: u64,
    output_tokens: u64,
    any_usage: bool,
    model: Option<String>,
    /// The current attempt's reading.
    reading: Reading,
    /// The current attempt's text.
    text: String,
    timing: Timing,
}

impl Call<'_> {
    fn us(t0: Instant) -> u64 {
        t0.elapsed().as_micros() as u64
    }

    /// Adds the current attempt's usage to the call's.
    fn fold(&mut self) {
        let r = std::mem::take(&mut self.reading);
        if r.input_tokens.is_some() || r.output_tokens.is_some() {
            self.any_usage = true;
        }
        self.input_tokens += r.input_tokens.unwrap_or(0);
        self.output_tokens += r.output_tokens.unwrap_or(0);
        if r.model.is_some() {
            self.model = r.model;
        }
        if r.stop_reason.is_some() {
            self.reading.stop_reason = r.stop_reason;
        }
    }
}

impl LlmClient {
    pub fn new(config: LlmConfig) -> Result<LlmClient, LlmError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.policy.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(concat!("kiln-runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Client(chain(&e)))?;
        Ok(LlmClient {
            http,
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// The provider and model a request goes to: its own `model`, else its role's, else
    /// `default`'s.
    pub fn route(&self, req: &ChatRequest) -> Result<(&Provider, ModelRef), LlmError> {
        match &req.model {
            Some(m) => self
                .config
                .providers
                .get(&m.provider)
                .map(|p| (p, m.clone()))
                .ok_or_else(|| LlmError::UnknownProvider {
                    provider: m.provider.clone(),
                }),
            None => self
                .config
                .route(&req.role)
                .map(|(p, m)| (p, m.clone()))
                .ok_or_else(|| LlmError::NoRoute {
                    role: req.role.clone(),
                }),
        }
    }

    /// Calls the model of `req`'s role, streaming: every piece of text goes to `on_text` as it
    /// arrives (and [`TextEvent::Restart`] when a retry starts the text over). The job's `meter`
    /// admits the call and counts it; `cancel` aborts it at once. See the module docs for the
    /// retry rules.
    pub async fn complete<F>(
        &self,
        req: &ChatRequest,
        meter: &Mutex<Meter>,
        cancel: &CancelToken,
        mut on_text: F,
    ) -> Result<Completion, LlmError>
    where
        F: FnMut(TextEvent<'_>) + Send,
    {
        let t0 = Instant::now();
        let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (provider, model) = self.route(req)?;
        let prices = &self.config.prices;
        lock(meter)
            .admit(&model.model, prices.get(&model.model).is_some())
            .map_err(|exceeded| LlmError::Budget {
                exceeded,
                usage: None,
            })?;
        if cancel.is_cancelled() {
            return Err(LlmError::Cancelled);
        }

        let (body, mut headers) = match provider.api {
            Api::Anthropic => (
                anthropic::body(&model.model, req),
                anthropic::headers(provider.api_key.as_ref().map(|k| k.expose())),
            ),
            Api::Openai => (
                openai::body(&model.model, req),
                openai::headers(provider.api_key.as_ref().map(|k| k.expose())),
            ),
        };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        for (name, value) in &provider.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(n, v);
            }
        }
        let body = serde_json::to_vec(&body).expect("JSON values serialize");
        let url = provider.endpoint();
        let out = Outgoing {
            url: &url,
            headers: &headers,
            body: &body,
        };

        let mut call = Call {
            provider,
            t0,
            attempts: 0,
            input_tokens: 0,
            output_tokens: 0,
            any_usage: false,
            model: None,
            reading: Reading::default(),
            text: String::new(),
            timing: Timing::default(),
        };
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(LlmError::Cancelled),
            r = self.run(&mut call, &out, &mut on_text) => r,
        };
        call.fold();

        let (input_tokens, output_tokens, usage_estimated) = if outcome.is_ok() && !call.any_usage {
            (
                (out.body.len() as u64).div_ceil(4),
                (call.text.chars().count() as u64).div_ceil(4),
                true,
            )
        } else {
            (call.input_tokens, call.output_tokens, false)
        };
        let answered = call.model.clone().unwrap_or_else(|| model.model.clone());
        let cost_usd = prices
            .cost(&model.model, input_tokens, output_tokens)
            .or_else(|| prices.cost(&answered, input_tokens, output_tokens));
        let latency_us = if outcome.is_ok() {
            call.timing.done_us
        } else {
            Call::us(t0)
        };
        let usage = StepUsage {
            provider: provider.name.clone(),
            model: answered,
            requested_model: model.model.clone(),
            input_tokens,
            output_tokens,
            usage_estimated,
            latency_ms: latency_us / 1000,
            first_token_ms: call.timing.first_token_us.map(|u| u / 1000),
            cost_usd,
            attempts: call.attempts,
            stop_reason: call.reading.stop_reason.take(),
            started_at,
            timing: call.timing,
        };
        let over = if call.attempts > 0 {
            lock(meter).record(&usage)
        } else {
            Ok(())
        };
        outcome?;
        match over {
            Ok(()) => Ok(Completion {
                text: call.text,
                usage,
            }),
            Err(exceeded) => Err(LlmError::Budget {
                exceeded,
                usage: Some(Box::new(usage)),
            }),
        }
    }

    /// Attempts until one succeeds, an error is not worth another, or the attempts run out.
    async fn run<F>(
        &self,
        call: &mut Call<'_>,
        out: &Outgoing<'_>,
        on_text: &mut F,
    ) -> Result<(), LlmError>
    where
        F: FnMut(TextEvent<'_>) + Send,
    {
        let policy = self.config.policy;
        let mut backoff = policy.backoff();
        loop {
            call.fold();
            call.attempts += 1;
            call.timing.attempt_us = Call::us(call.t0);
            let err = match self.attempt(call, out, on_text).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !err.retryable() || call.attempts >= policy.max_attempts {
                return Err(if call.attempts > 1 {
                    LlmError::GaveUp {
                        attempts: call.attempts,
                        last: Box::new(err),
                    }
                } else {
                    err
                });
            }
            let wait = match next_wait(&policy, err.retry_after(), &mut backoff) {
                Wait::TooLong { asked, cap } => {
                    return Err(LlmError::RetryAfterTooLong {
                        asked,
                        cap,
                        last: Box::new(err),
                    })
                }
                Wait::Retry(d) => d,
            };
            tracing::warn!(
                provider = %call.provider.name,
                attempt = call.attempts,
                wait_ms = wait.as_millis() as u64,
                "LLM request failed, trying again: {err}"
            );
            if !call.text.is_empty() {
                on_text(TextEvent::Restart {
                    attempt: call.attempts + 1,
                    reason: &err.to_string(),
                });
                call.text.clear();
                call.timing.first_token_us = None;
                call.timing.last_token_us = None;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One HTTP request and its stream.
    async fn attempt<F>(
        &self,
        call: &mut Call<'_>,
        out: &Outgoing<'_>,
        on_text: &mut F,
    ) -> Result<(), LlmError>
    where
        F: FnMut(TextEvent<'_>) + Send,
    {
        let policy = &self.config.policy;
        let provider: &Provider = call.provider;
        let key = provider.api_key.as_ref().map(|k| k.expose());
        let deadline = Instant::now() + policy.request_timeout;
        // The next wait: the stall timeout, or what is left of the request timeout.
        let limit = || {
            let left = deadline.saturating_duration_since(Instant::now());
            (left.min(policy.stall_timeout), left <= policy.stall_timeout)
        };
        let expired = |at_deadline: bool| {
            if at_deadline {
                LlmError::Timeout {
                    provider: provider.name.clone(),
                    after: policy.request_timeout,
                }
            } else {
                LlmError::Stalled {
                    provider: provider.name.clone(),
                    after: policy.stall_timeout,
                }
            }
        };

        call.timing.request_us = Call::us(call.t0);
        let send = self
            .http
            .post(out.url)
            .headers(out.headers.clone())
            .body(out.body.to_vec())
            .send();
        let (wait, at_deadline) = limit();
        let mut resp = match tokio::time::timeout(wait, send).await {
            Err(_) => return Err(expired(at_deadline)),
            Ok(Err(e)) => {
                return Err(LlmError::Connect {
                    provider: provider.name.clone(),
                    url: out.url.to_string(),
                    message: redact(&chain(&e), key),
                })
            }
            Ok(Ok(r)) => r,
        };
        call.timing.headers_us = Call::us(call.t0);
        call.timing.first_byte_us = None;

        let status = resp.status();
        let json_body = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !status.is_success() || json_body {
            let retry_after = retry::retry_after(resp.headers(), SystemTime::now());
            let mut raw = Vec::new();
            while raw.len() < ERROR_BODY_LIMIT {
                let (wait, _) = limit();
                match tokio::time::timeout(wait, resp.chunk()).await {
                    Ok(Ok(Some(c))) => raw.extend_from_slice(&c),
                    _ => break,
                }
            }
            let (kind, message) = vendor_error(&raw);
            let message = redact(&message, key);
            if status.is_success() {
                return Err(LlmError::Protocol {
                    provider: provider.name.clone(),
                    message: format!(
                        "HTTP {} with a JSON body, not an event stream: {message}",
                        status.as_u16()
                    ),
                });
            }
            return Err(LlmError::Status {
                provider: provider.name.clone(),
                status: status.as_u16(),
                kind,
                message,
                retry_after,
            });
        }

        let api = provider.api;
        let mut parser = SseParser::new();
        let mut done = false;
        let mut failure: Option<LlmError> = None;
        loop {
            let (wait, at_deadline) = limit();
            let chunk = match tokio::time::timeout(wait, resp.chunk()).await {
                Err(_) => return Err(expired(at_deadline)),
                Ok(Err(e)) => {
                    return Err(LlmError::Cut {
                        provider: provider.name.clone(),
                        message: redact(&chain(&e), key),
                    })
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            let t0 = call.t0;
            call.timing
                .first_byte_us
                .get_or_insert_with(|| Call::us(t0));
            let (reading, text, timing) = (&mut call.reading, &mut call.text, &mut call.timing);
            parser.feed(&chunk, |ev| {
                if failure.is_some() || done {
                    return;
                }
                let read = match api {
                    Api::Anthropic => anthropic::read(&ev, reading),
                    Api::Openai => openai::read(&ev, reading),
                };
                match read {
                    Ok(Read::Nothing) => {}
                    Ok(Read::Text(t)) => {
                        let now = Call::us(t0);
                        timing.first_token_us.get_or_insert(now);
                        text.push_str(&t);
                        on_text(TextEvent::Delta(&t));
                        timing.last_token_us = Some(Call::us(t0));
                    }
                    Ok(Read::Done) => done = true,
                    Ok(Read::Error { kind, message }) => {
                        failure = Some(LlmError::Stream {
                            provider: provider.name.clone(),
                            kind,
                            message: redact(&message, key),
                        })
                    }
                    Err(message) => {
                        failure = Some(LlmError::Protocol {
                            provider: provider.name.clone(),
                            message: redact(&message, key),
                        })
                    }
                }
            });
            if let Some(f) = failure.take() {
                return Err(f);
            }
            if done {
                break;
            }
        }
        if !done {
            // Some OpenAI-compatible servers end the body after the finish reason, without
            // `[DONE]`: that is a whole answer. Anything else ended early.
            let whole = api == Api::Openai && call.reading.stop_reason.is_some() && parser.finish();
            if !whole {
                let last = match api {
                    Api::Anthropic => "message_stop",
                    Api::Openai => "data: [DONE]",
                };
                return Err(LlmError::Cut {
                    provider: provider.name.clone(),
                    message: format!("the stream ended before its final event ({last})"),
                });
            }
        }
        call.timing.done_us = Call::us(call.t0);
        // Read the body's end (normally here already) so the connection returns to the pool.
        let _ = tokio::time::timeout(Duration::from_millis(20), async {
            while let Ok(Some(_)) = resp.chunk().await {}
        })
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_errors_read_in_every_shape() {
        assert_eq!(
            vendor_error(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            (Some("overloaded_error".into()), "Overloaded".into())
        );
        assert_eq!(
            vendor_error(br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#),
            (Some("rate_limit_exceeded".into()), "Rate limit reached".into())
        );
        assert_eq!(
            vendor_error(br#"{"error":"model not found"}"#),
            (None, "model not found".into())
        );
        assert_eq!(
            vendor_error(b"  <html>502 Bad Gateway</html> "),
            (None, "<html>502 Bad Gateway</html>".into())
        );
        assert_eq!(vendor_error(b""), (None, "(an empty body)".into()));
    }
}
