//! The LLM client against the real scripted model server (`kiln_e2e::model`): streaming in both
//! wire formats, roles, retries (429 with Retry-After, 5xx, stalls, errors and cuts mid-stream),
//! what is not retried, cancellation, the budget, and where the key goes (and does not).
//! The last test measures the client's own overhead against a hand-written server.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_e2e::model::{self, ModelServer, Script};
use kiln_runner::llm::{
    Api, ApiKey, Budget, CancelToken, ChatRequest, Completion, LlmClient, LlmConfig, LlmError,
    Message, Meter, ModelRef, Price, Prices, Provider, RetryPolicy, TextEvent,
};
use serde_json::{json, Value};

const ANTHROPIC_KEY: &str = "sk-ant-test-0123456789";
const OPENAI_KEY: &str = "sk-oai-test-9876543210";
const BOTH: [Api; 2] = [Api::Anthropic, Api::Openai];

fn server(script: Value) -> ModelServer {
    ModelServer::start(Script::from_value(script).expect("a valid script"))
}

fn rules(rules: Value) -> ModelServer {
    server(json!({ "rules": rules }))
}

/// Retries that wait tens of milliseconds, so the tests stay quick.
fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(40),
        max_backoff: Duration::from_millis(160),
        max_retry_wait: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        stall_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
    }
}

/// Providers `anthropic` and `openai` on the scripted server; the role `default` goes to
/// `api`'s provider, model `<api>-test-model`.
fn config_for(s: &ModelServer, api: Api, policy: RetryPolicy) -> LlmConfig {
    let mut c = LlmConfig {
        policy,
        ..Default::default()
    };
    c.providers.insert(
        "anthropic".into(),
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &s.url(),
            Some(ApiKey::new(ANTHROPIC_KEY)),
        ),
    );
    c.providers.insert(
        "openai".into(),
        Provider::new(
            "openai",
            Api::Openai,
            &s.openai_base_url(),
            Some(ApiKey::new(OPENAI_KEY)),
        ),
    );
    c.roles.insert("default".into(), model_of(api));
    c
}

fn model_of(api: Api) -> ModelRef {
    ModelRef {
        provider: api.as_str().into(),
        model: format!("{}-test-model", api.as_str()),
    }
}

/// A client whose only provider is `p`, serving the role `default` with `model`.
fn client_of(p: Provider, model: &str, policy: RetryPolicy) -> LlmClient {
    let mut config = LlmConfig {
        policy,
        ..Default::default()
    };
    let route = ModelRef {
        provider: p.name.clone(),
        model: model.into(),
    };
    config.roles.insert("default".into(), route);
    config.providers.insert(p.name.clone(), p);
    LlmClient::new(config).expect("a client")
}

fn client(s: &ModelServer, api: Api, policy: RetryPolicy) -> LlmClient {
    LlmClient::new(config_for(s, api, policy)).expect("a client")
}

fn ask(prompt: &str) -> ChatRequest {
    ChatRequest {
        system: Some("You are a test step.".into()),
        messages: vec![Message::user(prompt)],
        ..ChatRequest::for_role("step")
    }
}

/// What a callback saw.
#[derive(Debug, Default)]
struct Seen {
    deltas: Vec<(Instant, String)>,
    restarts: Vec<(u32, String)>,
}

impl Seen {
    /// The text as a viewer would show it: deltas since the last restart.
    fn shown(&self) -> String {
        self.deltas.iter().map(|(_, d)| d.as_str()).collect()
    }
}

async fn call(
    client: &LlmClient,
    req: &ChatRequest,
    meter: &Mutex<Meter>,
) -> (Result<Completion, LlmError>, Seen) {
    let mut seen = Seen::default();
    let cancel = CancelToken::default();
    let r = client
        .complete(req, meter, &cancel, |ev| match ev {
            TextEvent::Delta(t) => seen.deltas.push((Instant::now(), t.to_string())),
            TextEvent::Restart { attempt, reason } => {
                seen.restarts.push((attempt, reason.to_string()));
                seen.deltas.clear();
            }
        })
        .await;
    (r, seen)
}

fn unmetered() -> Mutex<Meter> {
    Mutex::new(Meter::default())
}

const LONG: &str = "Kiln streams every answer in pieces, as the vendor sends them, so a step can show its tokens while the model is still writing.";

#[tokio::test]
async fn text_streams_in_pieces_in_both_formats_with_usage_and_model() {
    let s = server(json!({"model": "kiln-scripted-1", "rules": [
        {"text": LONG, "chunks": 6, "chunk_delay_ms": 40}
    ]}));
    for api in BOTH {
        s.clear_requests();
        let c = client(&s, api, quick());
        let meter = unmetered();
        let (r, seen) = call(&c, &ask("stream please"), &meter).await;
        let done = r.unwrap_or_else(|e| panic!("{api:?}: {e}"));
        assert_eq!(done.text, LONG, "{api:?}");
        assert_eq!(
            seen.shown(),
            LONG,
            "{api:?}: the deltas add up to the answer"
        );
        assert_eq!(seen.deltas.len(), 6, "{api:?}: one delta per piece");
        let spread = seen.deltas[5].0 - seen.deltas[0].0;
        assert!(
            spread >= Duration::from_millis(150),
            "{api:?}: deltas arrive as they are sent, not all at the end ({spread:?})"
        );
        assert!(seen.restarts.is_empty());

        let u = &done.usage;
        assert_eq!(u.provider, api.as_str());
        assert_eq!(u.model, "kiln-scripted-1", "the answered model");
        assert_eq!(u.requested_model, format!("{}-test-model", api.as_str()));
        assert_eq!(
            u.output_tokens,
            (LONG.len() as u64).div_ceil(4),
            "the server's usage"
        );
        assert!(u.input_tokens > 0 && !u.usage_estimated, "{u:?}");
        assert_eq!(u.attempts, 1);
        assert_eq!(u.cost_usd, None, "no price configured");
        let stop = if api == Api::Anthropic {
            "end_turn"
        } else {
            "stop"
        };
        assert_eq!(u.stop_reason.as_deref(), Some(stop));
        let t = u.timing;
        let first_token = t.first_token_us.expect("a first token");
        let last_token = t.last_token_us.expect("a last token");
        assert!(
            t.request_us <= t.headers_us
                && t.headers_us <= t.first_byte_us.unwrap()
                && t.first_byte_us.unwrap() <= first_token
                && first_token + 150_000 <= last_token
                && last_token <= t.done_us,
            "{t:?}"
        );
        assert_eq!(u.first_token_ms, Some(first_token / 1000));
        assert!(
            u.latency_ms >= 200 && u.latency_ms == t.done_us / 1000,
            "{u:?}"
        );
        assert_eq!(meter.lock().unwrap().totals().calls, 1);

        let reqs = s.chat_requests();
        assert_eq!(reqs.len(), 1, "{api:?}");
        let r = &reqs[0];
        assert!(r.stream, "{api:?} asked for a stream");
        assert_eq!(r.model.as_deref(), Some(u.requested_model.as_str()));
        assert_eq!(r.system, "You are a test step.");
        assert_eq!(r.prompt, "stream please");
        match api {
            Api::Anthropic => {
                assert_eq!(r.api, Some(model::Api::Anthropic));
                assert_eq!(r.path, "/v1/messages");
            }
            Api::Openai => {
                assert_eq!(r.api, Some(model::Api::Openai));
                assert_eq!(r.path, "/v1/chat/completions");
            }
        }
    }
}

#[tokio::test]
async fn a_role_picks_its_provider_and_model_and_its_system_prompt_its_reply() {
    let s = rules(json!([
        {"when": {"system": "requirements gatherer"}, "text": "What should the app do?"},
        {"when": {"system": "chief executive"}, "text": "Ship the smallest thing."},
        {"text": "catch-all"}
    ]));
    let mut config = config_for(&s, Api::Anthropic, quick());
    config.roles.insert(
        "gatherer".into(),
        ModelRef {
            provider: "openai".into(),
            model: "gpt-gatherer".into(),
        },
    );
    config.roles.insert(
        "ceo".into(),
        ModelRef {
            provider: "anthropic".into(),
            model: "claude-ceo".into(),
        },
    );
    let c = LlmClient::new(config).unwrap();
    let meter = unmetered();
    let gatherer = ChatRequest {
        system: Some("You are the requirements gatherer.".into()),
        messages: vec![Message::user("I want a todo app")],
        ..ChatRequest::for_role("gatherer")
    };
    let ceo = ChatRequest {
        system: Some("You are the chief executive.".into()),
        messages: vec![Message::user("Plan it")],
        ..ChatRequest::for_role("ceo")
    };
    let other = ChatRequest {
        system: Some("You are the secretary.".into()),
        messages: vec![Message::user("Write it down")],
        ..ChatRequest::for_role("secretary")
    };
    let (g, _) = call(&c, &gatherer, &meter).await;
    let (e, _) = call(&c, &ceo, &meter).await;
    let (o, _) = call(&c, &other, &meter).await;
    assert_eq!(g.unwrap().text, "What should the app do?");
    assert_eq!(e.unwrap().text, "Ship the smallest thing.");
    assert_eq!(o.unwrap().text, "catch-all");
    let seen: Vec<(Option<model::Api>, Option<String>)> = s
        .chat_requests()
        .into_iter()
        .map(|r| (r.api, r.model))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Some(model::Api::Openai), Some("gpt-gatherer".into())),
            (Some(model::Api::Anthropic), Some("claude-ceo".into())),
            (
                Some(model::Api::Anthropic),
                Some("anthropic-test-model".into())
            ),
        ],
        "each role's provider and model; the secretary falls back to default"
    );
    assert_eq!(meter.lock().unwrap().totals().calls, 3);

    let unrouted = LlmClient::new(LlmConfig::default()).unwrap();
    let (r, _) = call(&unrouted, &gatherer, &meter).await;
    let e = r.unwrap_err();
    assert!(
        matches!(e, LlmError::NoRoute { .. }) && e.to_string().contains("\"gatherer\""),
        "{e}"
    );
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_answered() {
    let s = rules(json!([
        {"error": {"status": 429, "retry_after": 1}, "fail_first": 1, "text": "after the wait"}
    ]));
    for api in BOTH {
        s.set_script(s.script()); // the rule's counters start again
        s.clear_requests();
        let c = client(&s, api, quick());
        let started = Instant::now();
        let (r, seen) = call(&c, &ask("hello"), &unmetered()).await;
        let waited = started.elapsed();
        let done = r.unwrap_or_else(|e| panic!("{api:?}: {e}"));
        assert_eq!(done.text, "after the wait");
        assert!(
            waited >= Duration::from_secs(1),
            "{api:?}: Retry-After: 1 was honoured ({waited:?})"
        );
        assert!(waited < Duration::from_secs(3), "{api:?}: {waited:?}");
        assert_eq!(done.usage.attempts, 2);
        assert!(
            seen.restarts.is_empty(),
            "nothing was streamed before the retry"
        );
        let statuses: Vec<u16> = s.chat_requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![429, 200], "{api:?}");
    }
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_until_an_answer_or_the_last_attempt() {
    let s = rules(json!([
        {"when": {"prompt": "flaky"}, "error": {"status": 500}, "fail_first": 2, "text": "third time lucky"},
        {"when": {"prompt": "down"}, "error": {"status": 529}}
    ]));
    for api in BOTH {
        s.set_script(s.script());
        s.clear_requests();
        let c = client(&s, api, quick());
        let (r, _) = call(&c, &ask("flaky"), &unmetered()).await;
        let done = r.unwrap_or_else(|e| panic!("{api:?}: {e}"));
        assert_eq!(
            (done.text.as_str(), done.usage.attempts),
            ("third time lucky", 3)
        );
        let statuses: Vec<u16> = s.chat_requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![500, 500, 200], "{api:?}");

        s.clear_requests();
        let (r, _) = call(&c, &ask("down"), &unmetered()).await;
        let e = r.unwrap_err();
        assert!(
            matches!(e, LlmError::GaveUp { attempts: 4, .. }),
            "{api:?}: {e:?}"
        );
        assert_eq!(e.status(), Some(529));
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{} answered HTTP 529", api.as_str()))
                && text.ends_with("(gave up after 4 attempts)"),
            "{text}"
        );
        assert_eq!(s.chat_requests().len(), 4, "{api:?}: max_attempts requests");
    }
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_a_long_retry_after_fails_at_once() {
    let s = rules(json!([
        {"when": {"prompt": "bad"}, "error": {"status": 400, "message": "max_tokens: 999999 > 8192, the maximum"}},
        {"when": {"prompt": "quota"}, "error": {"status": 429, "retry_after": 3600, "message": "Daily quota exhausted"}}
    ]));
    for api in BOTH {
        s.clear_requests();
        let c = client(&s, api, quick());
        let (r, _) = call(&c, &ask("bad"), &unmetered()).await;
        let e = r.unwrap_err();
        assert!(
            matches!(e, LlmError::Status { status: 400, .. }),
            "{api:?}: {e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{} answered HTTP 400 invalid_request_error: max_tokens: 999999 > 8192, the maximum",
                api.as_str()
            )
        );
        assert_eq!(s.chat_requests().len(), 1, "{api:?}: a 400 is not retried");

        s.clear_requests();
        let started = Instant::now();
        let (r, _) = call(&c, &ask("quota"), &unmetered()).await;
        let e = r.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no waiting an hour"
        );
        assert!(
            matches!(e, LlmError::RetryAfterTooLong { .. }),
            "{api:?}: {e:?}"
        );
        assert!(
            e.to_string().contains("Daily quota exhausted")
                && e.to_string()
                    .contains("asks to wait 3600 s, longer than the 5 s"),
            "{e}"
        );
        assert_eq!(s.chat_requests().len(), 1);
    }
}

#[tokio::test]
async fn a_stall_mid_stream_is_abandoned_and_the_text_restarted() {
    let s = rules(json!([
        {"name": "stalls", "times": 1, "text": LONG, "chunks": 4, "stall_mid_ms": 5000},
        {"text": LONG, "chunks": 4}
    ]));
    let policy = RetryPolicy {
        stall_timeout: Duration::from_millis(300),
        ..quick()
    };
    for api in BOTH {
        s.set_script(s.script());
        s.clear_requests();
        let c = client(&s, api, policy);
        let started = Instant::now();
        let (r, seen) = call(&c, &ask("hello"), &unmetered()).await;
        let done = r.unwrap_or_else(|e| panic!("{api:?}: {e}"));
        assert!(started.elapsed() < Duration::from_secs(3), "{api:?}");
        assert_eq!(done.text, LONG, "{api:?}: only the last attempt's text");
        assert_eq!(seen.shown(), LONG);
        assert_eq!(seen.restarts.len(), 1, "{api:?}: {:?}", seen.restarts);
        let (attempt, reason) = &seen.restarts[0];
        assert_eq!(*attempt, 2);
        assert!(
            reason.contains("sent nothing for 0.3 s (the stall timeout)"),
            "{reason}"
        );
        assert_eq!(done.usage.attempts, 2);
        assert_eq!(s.chat_requests().len(), 2);
    }
}

#[tokio::test]
async fn a_provider_that_never_answers_fails_clearly_after_its_attempts() {
    let s = rules(json!([{"text": "too late", "stall_before_ms": 5000}]));
    let policy = RetryPolicy {
        stall_timeout: Duration::from_millis(300),
        max_attempts: 2,
        ..quick()
    };
    let c = client(&s, Api::Anthropic, policy);
    let started = Instant::now();
    let (r, _) = call(&c, &ask("hello"), &unmetered()).await;
    let e = r.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        e.to_string(),
        "anthropic sent nothing for 0.3 s (the stall timeout) (gave up after 2 attempts)"
    );
    assert_eq!(s.chat_requests().len(), 2);

    // A request timeout shorter than the stall timeout ends the attempt, and is not retried.
    let c = client(
        &s,
        Api::Openai,
        RetryPolicy {
            request_timeout: Duration::from_millis(400),
            ..quick()
        },
    );
    s.clear_requests();
    let (r, _) = call(&c, &ask("hello"), &unmetered()).await;
    let e = r.unwrap_err();
    assert_eq!(
        e.to_string(),
        "openai did not finish its answer within 0.4 s (the request timeout)"
    );
    assert_eq!(s.chat_requests().len(), 1);
}

#[tokio::test]
async fn an_error_mid_stream_is_retried_when_the_vendor_says_it_may_pass() {
    let s = rules(json!([
        {"when": {"prompt": "overloaded"}, "error": {"status": 529}, "error_mid_stream": true,
         "fail_first": 1, "text": LONG, "chunks": 4},
        {"when": {"prompt": "invalid"}, "error": {"status": 400, "message": "bad tool schema"},
         "error_mid_stream": true, "text": LONG, "chunks": 4}
    ]));
    for api in BOTH {
        s.set_script(s.script());
        s.clear_requests();
        let c = client(&s, api, quick());
        let (r, seen) = call(&c, &ask("overloaded"), &unmetered()).await;
        let done = r.unwrap_or_else(|e| panic!("{api:?}: {e}"));
        assert_eq!(done.text, LONG);
        assert_eq!(seen.shown(), LONG);
        assert_eq!(seen.restarts.len(), 1, "{api:?}");
        let kind = if api == Api::Anthropic {
            "overloaded_error"
        } else {
            "server_error"
        };
        assert!(
            seen.restarts[0]
                .1
                .contains(&format!("reported an error mid-stream ({kind})")),
            "{:?}",
            seen.restarts
        );
        assert_eq!(done.usage.attempts, 2);
        if api == Api::Anthropic {
            // The failed attempt's message_start reported its input tokens: they are billed.
            let one = s.chat_requests()[1].body.to_string().len() as u64 / 4;
            assert!(done.usage.input_tokens > one, "{:?}", done.usage);
        }

        s.clear_requests();
        let (r, seen) = call(&c, &ask("invalid"), &unmetered()).await;
        let e = r.unwrap_err();
        assert!(matches!(e, LlmError::Stream { .. }), "{api:?}: {e:?}");
        assert!(e.to_string().ends_with("bad tool schema"), "{api:?}: {e}");
        assert!(
            !seen.deltas.is_empty(),
            "the text before the error was delivered"
        );
        assert_eq!(s.chat_requests().len(), 1, "{api:?}: not retried");
    }
}

#[tokio::test]
async fn a_connection_cut_mid_stream_is_retried_and_reported_when_it_persists() {
    let s = rules(json!([
        {"when": {"prompt": "once"}, "times": 1, "text": LONG, "chunks": 4, "cut_mid_stream": true},
        {"when": {"prompt": "once"}, "text": LONG, "chunks": 4},
        {"when": {"prompt": "always"}, "text": LONG, "chunks": 4, "cut_mid_stream": true}
    ]));
    for api in BOTH {
        s.set_script(s.script());
        s.clear_requests();
        let c = client(
            &s,
            api,
            RetryPolicy {
                max_attempts: 2,
                ..quick()
            },
        );
        let (r, seen) = call(&c, &ask("once"), &unmetered()).await;
        let done = r.unwrap_or_else(|e| panic!("{api:?}: {e}"));
        assert_eq!(done.text, LONG);
        assert_eq!(seen.shown(), LONG);
        assert_eq!(
            seen.restarts.len(),
            1,
            "{api:?}: the cut attempt had delivered text"
        );

        s.clear_requests();
        let (r, _) = call(&c, &ask("always"), &unmetered()).await;
        let e = r.unwrap_err();
        assert!(matches!(e.last(), LlmError::Cut { .. }), "{api:?}: {e:?}");
        assert!(
            e.to_string().starts_with(&format!(
                "the connection to {} broke mid-answer",
                api.as_str()
            )),
            "{e}"
        );
        assert_eq!(s.chat_requests().len(), 2);
    }
}

#[tokio::test]
async fn cancelling_mid_stream_returns_at_once_and_counts_what_was_used() {
    let s = rules(json!([{"text": LONG, "chunks": 10, "chunk_delay_ms": 300}]));
    for api in BOTH {
        let c = client(&s, api, quick());
        let meter = unmetered();
        let cancel = CancelToken::default();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let mut first_tx = Some(first_tx);
        let mut deltas = 0;
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                first_rx.await.expect("a first delta");
                tokio::time::sleep(Duration::from_millis(100)).await;
                let at = Instant::now();
                cancel.cancel();
                at
            })
        };
        let r = c
            .complete(&ask("hello"), &meter, &cancel, |ev| {
                if let TextEvent::Delta(_) = ev {
                    deltas += 1;
                    if let Some(tx) = first_tx.take() {
                        let _ = tx.send(());
                    }
                }
            })
            .await;
        let returned = Instant::now();
        let cancelled_at = canceller.await.unwrap();
        assert!(matches!(r, Err(LlmError::Cancelled)), "{api:?}: {r:?}");
        let took = returned - cancelled_at;
        assert!(
            took < Duration::from_millis(100),
            "{api:?}: returned {took:?} after the cancel"
        );
        assert!(
            (1..10).contains(&deltas),
            "{api:?}: cancelled mid-stream ({deltas})"
        );
        let totals = meter.lock().unwrap().totals();
        assert_eq!(totals.calls, 1, "{api:?}: the cancelled call is counted");
        if api == Api::Anthropic {
            assert!(
                totals.input_tokens > 0,
                "message_start's input usage is counted"
            );
        }
    }
    // A cancelled job starts no call (and a call runs in a task of its own, as a step's does).
    let c = client(&s, Api::Anthropic, quick());
    let cancel = CancelToken::default();
    cancel.cancel();
    s.clear_requests();
    let r = tokio::spawn(async move {
        c.complete(&ask("hello"), &unmetered(), &cancel, |_| {})
            .await
    })
    .await
    .unwrap();
    assert!(matches!(r, Err(LlmError::Cancelled)));
    assert!(s.chat_requests().is_empty());
}

#[tokio::test]
async fn the_budget_ends_the_job_with_a_clear_reason_and_refuses_the_next_call() {
    let s = rules(json!([{"text": LONG}]));
    let c = client(&s, Api::Anthropic, quick());
    let meter = Mutex::new(Meter::new(Budget {
        max_tokens: Some(60),
        max_usd: None,
    }));
    let (r, _) = call(&c, &ask("hello"), &meter).await;
    let e = r.unwrap_err();
    let LlmError::Budget {
        exceeded,
        usage: Some(usage),
    } = &e
    else {
        panic!("over budget: {e:?}")
    };
    let used = usage.input_tokens + usage.output_tokens;
    assert!(used > 60, "{usage:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "LLM budget exceeded: the job used {used} tokens, over its budget of 60 (the last call to anthropic-test-model used {used})"
        )
    );
    assert_eq!(exceeded.totals.tokens(), used);

    s.clear_requests();
    let (r, _) = call(&c, &ask("hello again"), &meter).await;
    let e = r.unwrap_err();
    assert!(matches!(e, LlmError::Budget { usage: None, .. }), "{e:?}");
    assert!(
        e.to_string().contains("no further model call starts"),
        "{e}"
    );
    assert!(s.chat_requests().is_empty(), "a refused call sends nothing");

    // USD: priced from the table, by the requested model.
    let mut config = config_for(&s, Api::Openai, quick());
    config.prices = Prices::new(BTreeMap::from([(
        "openai-test-model".to_string(),
        Price {
            input_per_mtok: 100.0,
            output_per_mtok: 200.0,
        },
    )]));
    let c = LlmClient::new(config).unwrap();
    let meter = Mutex::new(Meter::new(Budget {
        max_tokens: None,
        max_usd: Some(0.05),
    }));
    let (r, _) = call(&c, &ask("hi"), &meter).await;
    let done = r.expect("the first call fits");
    let u = &done.usage;
    let expected = (u.input_tokens as f64 * 100.0 + u.output_tokens as f64 * 200.0) / 1e6;
    assert!((u.cost_usd.unwrap() - expected).abs() < 1e-12, "{u:?}");
    let mut spent = u.cost_usd.unwrap();
    let mut last = Ok(());
    for _ in 0..20 {
        match call(&c, &ask("hi"), &meter).await.0 {
            Ok(d) => spent += d.usage.cost_usd.unwrap(),
            Err(e) => {
                last = Err(e);
                break;
            }
        }
    }
    let e = last.expect_err("the USD budget ends the calls");
    assert!(spent <= 0.05, "every call that succeeded fitted: {spent}");
    assert!(
        e.to_string()
            .starts_with("LLM budget exceeded: the job spent $"),
        "{e}"
    );
}

/// A one-connection-at-a-time HTTP server that records each request's head and answers with
/// `frames`, taking `Instant::now()` just before it writes the frame marked last-text.
struct RawServer {
    url: String,
    heads: std::sync::mpsc::Receiver<String>,
    last_text_sent: std::sync::mpsc::Receiver<Instant>,
}

fn raw_server(frames: Vec<String>, last_text: usize, calls: usize) -> RawServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (heads_tx, heads) = std::sync::mpsc::channel();
    let (sent_tx, last_text_sent) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..calls {
            let (mut sock, _) = listener.accept().unwrap();
            sock.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            let mut byte = [0u8; 4096];
            let head_end = loop {
                let n = sock.read(&mut byte).unwrap();
                buf.extend_from_slice(&byte[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < head_end + length {
                let n = sock.read(&mut byte).unwrap();
                buf.extend_from_slice(&byte[..n]);
            }
            heads_tx.send(head).unwrap();
            sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
            for (i, f) in frames.iter().enumerate() {
                std::thread::sleep(Duration::from_millis(2));
                if i == last_text {
                    sent_tx.send(Instant::now()).unwrap();
                }
                sock.write_all(f.as_bytes()).unwrap();
            }
        }
    });
    RawServer {
        url,
        heads,
        last_text_sent,
    }
}

fn anthropic_frames(pieces: &[&str]) -> (Vec<String>, usize) {
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut f = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"model": "raw-model", "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for p in pieces {
        f.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
        ));
    }
    let last_text = f.len() - 1;
    f.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
    ));
    f.push(ev("message_stop", json!({"type": "message_stop"})));
    (f, last_text)
}

#[tokio::test]
async fn the_key_is_sent_the_vendors_way_and_never_appears_in_an_error() {
    // How each format sends it, read from the raw request.
    let (frames, last) = anthropic_frames(&["a"]);
    let raw = raw_server(frames, last, 1);
    let c = client_of(
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &raw.url,
            Some(ApiKey::new(ANTHROPIC_KEY)),
        ),
        "anthropic-test-model",
        quick(),
    );
    let (r, _) = call(&c, &ask("hi"), &unmetered()).await;
    assert_eq!(r.unwrap().text, "a");
    let head = raw.heads.recv().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("post /v1/messages http/1.1"), "{head}");
    assert!(
        head.contains(&format!(
            "x-api-key: {}",
            ANTHROPIC_KEY.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(head.contains("anthropic-version: 2023-06-01"), "{head}");
    assert!(!head.contains("authorization:"), "{head}");

    let frames = vec![
        "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\n".to_string(),
        "data: [DONE]\n\n".to_string(),
    ];
    let raw = raw_server(frames, 0, 1);
    let c = client_of(
        Provider::new(
            "openai",
            Api::Openai,
            &format!("{}/v1", raw.url),
            Some(ApiKey::new(OPENAI_KEY)),
        ),
        "openai-test-model",
        quick(),
    );
    let (r, _) = call(&c, &ask("hi"), &unmetered()).await;
    let done = r.unwrap();
    assert_eq!(done.text, "b");
    assert!(
        done.usage.usage_estimated,
        "no usage chunk: estimated {:?}",
        done.usage
    );
    let head = raw.heads.recv().unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("post /v1/chat/completions http/1.1"),
        "{head}"
    );
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            OPENAI_KEY.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(!head.contains("x-api-key"), "{head}");

    // The scripted server checks the key; a wrong one is refused, and no error shows it, even
    // when the vendor quotes it back.
    let s = server(json!({"api_key": "sk-the-right-key-42", "rules": [
        {"when": {"prompt": "echo"}, "error": {"status": 401, "message": "Incorrect API key provided: sk-the-right-key-42. Find yours in the dashboard."}},
        {"text": "welcome"}
    ]}));
    for api in BOTH {
        let mut right = config_for(&s, api, quick());
        for p in right.providers.values_mut() {
            p.api_key = Some(ApiKey::new("sk-the-right-key-42"));
        }
        let mut wrong = right.clone();
        for p in wrong.providers.values_mut() {
            p.api_key = Some(ApiKey::new("sk-wrong-key-000"));
        }
        let (r, _) = call(
            &LlmClient::new(right.clone()).unwrap(),
            &ask("hi"),
            &unmetered(),
        )
        .await;
        assert_eq!(r.unwrap().text, "welcome", "{api:?}");
        assert_eq!(
            s.chat_requests().last().unwrap().api_key.as_deref(),
            Some("sk-the-right-key-42")
        );

        let wrong_client = LlmClient::new(wrong).unwrap();
        let (r, _) = call(&wrong_client, &ask("hi"), &unmetered()).await;
        let e = r.unwrap_err();
        assert_eq!(e.status(), Some(401), "{api:?}: {e}");
        let shown = format!("{e} {e:?} {wrong_client:?}");
        assert!(!shown.contains("sk-wrong-key-000"), "{shown}");

        let (r, _) = call(&LlmClient::new(right).unwrap(), &ask("echo"), &unmetered()).await;
        let e = r.unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(
            shown.contains("Incorrect API key provided: [redacted]."),
            "{shown}"
        );
        assert!(!shown.contains("sk-the-right-key-42"), "{shown}");
    }
}

#[tokio::test]
async fn an_unreachable_provider_is_retried_then_named() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/v1");
    let c = client_of(
        Provider::new("local", Api::Openai, &base, None),
        "llama",
        RetryPolicy {
            max_attempts: 2,
            ..quick()
        },
    );
    let (r, _) = call(&c, &ask("hi"), &unmetered()).await;
    let e = r.unwrap_err();
    assert!(matches!(e, LlmError::GaveUp { attempts: 2, .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(&format!(
            "could not reach local at {base}/chat/completions: "
        )),
        "{e}"
    );
}

/// The client's own overhead: from the moment the server writes the last text delta to the
/// moment the callback has it (loopback, HTTP, SSE and JSON parsing), over 50 calls.
#[tokio::test]
async fn client_overhead_from_the_servers_last_delta_to_the_callback() {
    const CALLS: usize = 50;
    let (frames, last_text) = anthropic_frames(&["one ", "two ", "three"]);
    let raw = raw_server(frames, last_text, CALLS);
    let c = client_of(
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &raw.url,
            Some(ApiKey::new(ANTHROPIC_KEY)),
        ),
        "anthropic-test-model",
        quick(),
    );
    let mut to_last_delta = vec![];
    let mut to_return = vec![];
    let mut to_request = vec![];
    for _ in 0..CALLS {
        let (r, seen) = call(&c, &ask("hi"), &unmetered()).await;
        let returned = Instant::now();
        let done = r.unwrap();
        assert_eq!(done.text, "one two three");
        to_request.push(Duration::from_micros(done.usage.timing.request_us));
        let sent = raw.last_text_sent.recv().unwrap();
        let got = seen.deltas.last().unwrap().0;
        to_last_delta.push(got.duration_since(sent));
        to_return.push(returned.duration_since(sent));
    }
    to_last_delta.sort();
    to_return.sort();
    to_request.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    println!(
        "client overhead over {CALLS} calls: call start -> request handed to HTTP p50 {:?} p99 {:?}; server's last delta -> callback p50 {:?} p99 {:?}; -> complete() returned (after message_delta and message_stop, 2 ms apart each) p50 {:?} p99 {:?}",
        pct(&to_request, 50),
        pct(&to_request, 99),
        pct(&to_last_delta, 50),
        pct(&to_last_delta, 99),
        pct(&to_return, 50),
        pct(&to_return, 99),
    );
    assert!(
        pct(&to_last_delta, 50) < Duration::from_millis(5),
        "p50 {:?}",
        pct(&to_last_delta, 50)
    );
}
