//! Outbound webhook deliveries (issue 12 §2). A job's room calls [`job_created`] and
//! [`job_changed`] after it committed the change; they record one delivery per matching
//! subscription and event kind (D1 `webhook_deliveries`) and send one Cloudflare Queues message per
//! delivery, in the background (the room never waits on them, let alone on a receiver).
//!
//! The consumer ([`consume`]) acknowledges each message at once and makes the attempt in
//! `waitUntil` (the Worker runs with `queue_consumer_no_wait_for_wait_until`, so a batch ends
//! without waiting for its receivers: a slow receiver holds no other delivery). An attempt is
//! claimed in D1 first (`attempts` moves from the message's count to the next, so a duplicate
//! message sends nothing), then POSTs the stored payload signed with `Kiln-Signature`, within
//! `WEBHOOK_TIMEOUT_SECS`, records the attempt, and on failure sends the next message delayed by the
//! backoff (`WEBHOOK_RETRY_BASE_SECS` doubling to `WEBHOOK_RETRY_MAX_DELAY_SECS`) until
//! `WEBHOOK_RETRY_WINDOW_SECS` after the event (or the last redeliver): then it is `failed`.

use kiln_schemas::status::{JobStatus, JobType};
use kiln_schemas::subscriptions::{
    check_target, kinds_of_change, matches, retry_delay_secs, DeliveryMessage, DeliveryPayload, EventKind, JobSummary,
    TargetPolicy,
};
use kiln_schemas::webhooks::{signature_header, DELIVERY_HEADER, SIGNATURE_HEADER};
use serde::Deserialize;
use worker::{Context, Env, MessageBatch, MessageBuilder, MessageExt, State};

use crate::cache::{self, TtlCache};
use crate::env::{new_id, now_ms};
use crate::http::{ApiError, ApiResult};
use crate::job_room::RoomMeta;
use crate::store::{n, opt, s, JobPatch};
use crate::time::rfc3339;

/// The Queues binding deliveries go through.
pub const QUEUE_BINDING: &str = "WEBHOOK_DELIVERIES";
/// Messages one `sendBatch` carries at most (Cloudflare's limit).
const SEND_BATCH: usize = 100;
/// The longest error text kept for an attempt.
const MAX_ERROR_CHARS: usize = 300;
/// A pending delivery whose `next_attempt_at` is this far past has lost its message (a failed
/// send, an attempt cut off): [`sweep`] sends it again.
const SWEEP_GRACE_MS: i64 = 60_000;
/// The most deliveries one sweep sends again.
const SWEEP_LIMIT: usize = 100;
/// A consumer sweeps at most this often per isolate.
const SWEEP_EVERY_MS: i64 = 30_000;

/// The delivery settings (vars).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub timeout_ms: u64,
    pub retry_base_secs: u32,
    pub retry_max_delay_secs: u32,
    pub retry_window_ms: i64,
    pub policy: TargetPolicy,
}

fn var(env: &Env, name: &str) -> Option<String> {
    env.var(name).ok().map(|v| v.to_string())
}

fn num<T: std::str::FromStr>(env: &Env, name: &str, default: T) -> T {
    var(env, name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

impl Settings {
    pub fn from_env(env: &Env) -> Settings {
        Settings {
            timeout_ms: num::<u64>(env, "WEBHOOK_TIMEOUT_SECS", 10).clamp(1, 30) * 1000,
            retry_base_secs: num(env, "WEBHOOK_RETRY_BASE_SECS", 10u32).max(1),
            // Queues delays a message at most 12 hours.
            retry_max_delay_secs: num(env, "WEBHOOK_RETRY_MAX_DELAY_SECS", 3600u32).clamp(1, 43_200),
            retry_window_ms: num::<i64>(env, "WEBHOOK_RETRY_WINDOW_SECS", 86_400).max(1) * 1000,
            policy: TargetPolicy {
                allow_http: var(env, "ALLOW_HTTP_WEBHOOK_TARGETS").is_some_and(|v| v.trim() == "true"),
                allow_private: var(env, "ALLOW_PRIVATE_WEBHOOK_TARGETS").is_some_and(|v| v.trim() == "true"),
            },
        }
    }
}

/// A job event to fan out to its owner's subscriptions.
struct JobEvent {
    owner: String,
    job_type: JobType,
    kinds: Vec<EventKind>,
    job: JobSummary,
}

fn summary(meta: &RoomMeta, from: Option<JobStatus>, seq: u64, patch: &JobPatch) -> JobSummary {
    JobSummary {
        id: meta.job_id.clone(),
        job_type: meta.job_type,
        status: meta.status.as_str().to_string(),
        previous_status: from.map(|f| f.as_str().to_string()),
        face_status: meta.face_status().to_string(),
        queue: meta.queue.clone(),
        status_seq: seq,
        pr_url: patch.pr_url.clone(),
        error_message: patch.error_message.clone(),
        completion_reason: patch.completion_reason.clone(),
    }
}

/// A job's room was created: `job.created` (its status event is a new room's first, seq 1).
pub fn job_created(state: &State, env: &Env, meta: &RoomMeta) {
    let event = JobEvent {
        owner: meta.owner.clone(),
        job_type: meta.job_type,
        kinds: kinds_of_change(None, false, None),
        job: summary(meta, None, 1, &JobPatch::default()),
    };
    spawn(state, env, event);
}

/// A job's status changed from `from` to `meta.status` (its `jobStatus` event is `seq`):
/// `job.status`, and `job.pr_opened` / `job.finished` when they apply.
pub fn job_changed(state: &State, env: &Env, from: JobStatus, meta: &RoomMeta, seq: u64, patch: &JobPatch) {
    let event = JobEvent {
        owner: meta.owner.clone(),
        job_type: meta.job_type,
        kinds: kinds_of_change(Some(from.as_str()), meta.status.is_terminal(), patch.pr_url.as_deref()),
        job: summary(meta, Some(from), seq, patch),
    };
    spawn(state, env, event);
}

fn spawn(state: &State, env: &Env, event: JobEvent) {
    let env = env.clone();
    state.wait_until(async move {
        let job_id = event.job.id.clone();
        if let Err(e) = record(&env, event).await {
            worker::console_error!("job {job_id}: recording webhook deliveries failed: {e:?}");
        }
    });
}

#[derive(Deserialize, Clone)]
struct SubscriptionFilter {
    id: String,
    events: String,
    job_types: Option<String>,
}

/// How long an isolate trusts the enabled subscriptions it read for an owner. A subscription made,
/// changed or deleted here is seen at once in this isolate ([`forget_subscriptions`]); other
/// isolates may go on from their copy for up to this long.
const SUBSCRIPTIONS_TTL_MS: i64 = 5_000;

thread_local! {
    /// Each owner's enabled subscriptions: every status change of every job reads them, and most
    /// owners have none (a D1 read per change was three per job).
    static OWNER_SUBSCRIPTIONS: std::cell::RefCell<TtlCache<Vec<SubscriptionFilter>>> =
        std::cell::RefCell::new(TtlCache::new(SUBSCRIPTIONS_TTL_MS, 4096));
}

/// Forgets `owner`'s subscriptions in this isolate (one of them was made, changed or deleted).
pub fn forget_subscriptions(owner: &str) {
    OWNER_SUBSCRIPTIONS.with(|c| c.borrow_mut().forget(owner));
}

/// Stores the deliveries an event makes and sends their messages.
async fn record(env: &Env, event: JobEvent) -> ApiResult<()> {
    let db = crate::env::db(env)?;
    let subs = cache::read_through(&OWNER_SUBSCRIPTIONS, &event.owner, now_ms, async {
        Ok::<_, ApiError>(
            db.prepare("SELECT id, events, job_types FROM webhook_subscriptions WHERE owner = ?1 AND enabled = 1")
                .bind(&[s(&event.owner)])?
                .all()
                .await?
                .results::<SubscriptionFilter>()?,
        )
    })
    .await?;
    if subs.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let created_at = rfc3339(now);
    let mut statements = vec![];
    let mut messages = vec![];
    for sub in &subs {
        let events: Vec<EventKind> = serde_json::from_str(&sub.events).unwrap_or_default();
        let types: Option<Vec<JobType>> = sub.job_types.as_deref().and_then(|t| serde_json::from_str(t).ok());
        for kind in &event.kinds {
            if !matches(&events, types.as_deref(), *kind, event.job_type) {
                continue;
            }
            let id = new_id();
            let payload = DeliveryPayload { id: id.clone(), event: *kind, created_at: created_at.clone(), job: event.job.clone() };
            statements.push(
                db.prepare(
                    "INSERT INTO webhook_deliveries (id, subscription_id, owner, event, job_id, payload, status, attempts, \
                     created_at, created_ms, window_start_ms, next_attempt_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?8, ?8, ?7)",
                )
                .bind(&[
                    s(&id),
                    s(&sub.id),
                    s(&event.owner),
                    s(kind.as_str()),
                    s(&event.job.id),
                    s(&serde_json::to_string(&payload)?),
                    s(&created_at),
                    n(now),
                ])?,
            );
            messages.push(DeliveryMessage { delivery_id: id, attempts: 0 });
        }
    }
    if statements.is_empty() {
        return Ok(());
    }
    // A failed write is tried again (it is one batch: all rows or none); a failed send leaves the
    // rows pending for the sweep.
    let mut tries = 0;
    loop {
        match db.batch(statements.clone()).await {
            Ok(_) => break,
            Err(e) if tries < 2 => {
                tries += 1;
                worker::console_warn!("job {}: storing deliveries failed, retrying: {e}", event.job.id);
                worker::Delay::from(std::time::Duration::from_millis(250 * tries)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    send(env, messages).await
}

/// Sends delivery messages now.
pub async fn send(env: &Env, messages: Vec<DeliveryMessage>) -> ApiResult<()> {
    let queue = env.queue(QUEUE_BINDING)?;
    for chunk in messages.chunks(SEND_BATCH) {
        queue.send_batch(chunk.to_vec()).await?;
    }
    Ok(())
}

/// The Queues consumer: each message's attempt runs in `waitUntil`, the message acknowledged at
/// once (the attempt sends the next message itself when it must be retried).
pub async fn consume(batch: MessageBatch<serde_json::Value>, env: Env, ctx: Context) -> worker::Result<()> {
    let settings = Settings::from_env(&env);
    if sweep_due() {
        let env = env.clone();
        ctx.wait_until(async move {
            if let Err(e) = sweep(&env).await {
                worker::console_error!("webhook sweep: {e:?}");
            }
        });
    }
    for message in batch.messages()? {
        match serde_json::from_value::<DeliveryMessage>(message.body().clone()) {
            Ok(body) => {
                let env = env.clone();
                ctx.wait_until(async move {
                    let id = body.delivery_id.clone();
                    if let Err(e) = attempt(&env, settings, body).await {
                        worker::console_error!("webhook delivery {id}: {e:?}");
                    }
                });
            }
            Err(e) => worker::console_error!("webhook queue: dropping a message that is not a delivery: {e}"),
        }
        message.ack();
    }
    Ok(())
}

#[derive(Deserialize)]
struct DeliveryRow {
    id: String,
    event: String,
    payload: String,
    status: String,
    attempts: u32,
    window_start_ms: i64,
    subscription_id: String,
    url: String,
    secret: String,
    enabled: i64,
}

/// What one POST came to.
struct Outcome {
    response_code: Option<u16>,
    latency_ms: u64,
    error: Option<String>,
}

impl Outcome {
    fn delivered(&self) -> bool {
        self.response_code.is_some_and(|c| (200..300).contains(&c))
    }
}

/// One attempt of the delivery a message names, if it is still the one due.
async fn attempt(env: &Env, settings: Settings, message: DeliveryMessage) -> ApiResult<()> {
    let db = crate::env::db(env)?;
    let row = db
        .prepare(
            "SELECT d.id, d.event, d.payload, d.status, d.attempts, d.window_start_ms, d.subscription_id, s.url, s.secret, s.enabled \
             FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id WHERE d.id = ?1",
        )
        .bind(&[s(&message.delivery_id)])?
        .first::<DeliveryRow>(None)
        .await?;
    let Some(row) = row else { return Ok(()) };
    if row.status != "pending" || row.attempts != message.attempts {
        // Delivered, failed, or a duplicate of a message whose attempt was made.
        return Ok(());
    }
    let k = row.attempts;
    let n_attempt = k + 1;
    let now = now_ms();
    // Claim attempt k+1: of two messages for the same attempt, one sends.
    let claimed = db
        .prepare(
            "UPDATE webhook_deliveries SET attempts = ?2, next_attempt_at = ?4 WHERE id = ?1 AND attempts = ?3 AND status = 'pending'",
        )
        // Until the attempt is recorded, `next_attempt_at` is when the sweep takes it for lost.
        .bind(&[s(&row.id), n(n_attempt as i64), n(k as i64), s(&rfc3339(now + settings.timeout_ms as i64 + SWEEP_GRACE_MS))])?
        .run()
        .await?
        .meta()?
        .and_then(|m| m.changes)
        .unwrap_or(0);
    if claimed != 1 {
        return Ok(());
    }
    let outcome = if row.enabled == 0 {
        Outcome { response_code: None, latency_ms: 0, error: Some("subscription disabled".into()) }
    } else if let Err(e) = check_target(&row.url, settings.policy) {
        Outcome { response_code: None, latency_ms: 0, error: Some(e) }
    } else {
        match crate::api::subscriptions::open_secret(env, &row.subscription_id, &row.secret) {
            Ok(secret) => post(&row, &secret, n_attempt, settings.timeout_ms).await,
            Err(e) => {
                worker::console_error!("webhook delivery {}: the subscription's secret does not open: {e:?}", row.id);
                Outcome { response_code: None, latency_ms: 0, error: Some("the subscription's secret could not be read".into()) }
            }
        }
    };
    let at = rfc3339(now);
    let done = now_ms();
    let (status, next) = if outcome.delivered() {
        ("delivered", None)
    } else {
        let delay_ms = i64::from(retry_delay_secs(n_attempt, settings.retry_base_secs, settings.retry_max_delay_secs)) * 1000;
        let give_up = row.enabled == 0 || outcome.error.as_deref().is_some_and(|e| e.starts_with("url:"));
        if give_up || done + delay_ms > row.window_start_ms + settings.retry_window_ms {
            ("failed", None)
        } else {
            ("pending", Some(delay_ms))
        }
    };
    let next_at = next.map(|d| rfc3339(done + d));
    let delivered_at = (status == "delivered").then(|| rfc3339(done));
    db.batch(vec![
        db.prepare(
            "INSERT OR REPLACE INTO webhook_attempts (delivery_id, n, at, response_code, latency_ms, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&[
            s(&row.id),
            n(n_attempt as i64),
            s(&at),
            outcome.response_code.map(|c| n(c as i64)).unwrap_or(wasm_bindgen::JsValue::NULL),
            n(outcome.latency_ms as i64),
            opt(outcome.error.as_deref()),
        ])?,
        db.prepare(
            "UPDATE webhook_deliveries SET status = ?2, next_attempt_at = ?3, delivered_at = COALESCE(?4, delivered_at) \
             WHERE id = ?1 AND attempts = ?5",
        )
        .bind(&[s(&row.id), s(status), opt(next_at.as_deref()), opt(delivered_at.as_deref()), n(n_attempt as i64)])?,
    ])
    .await?;
    if let Some(delay_ms) = next {
        let msg = DeliveryMessage { delivery_id: row.id.clone(), attempts: n_attempt };
        let delay = u32::try_from(delay_ms / 1000).unwrap_or(u32::MAX);
        env.queue(QUEUE_BINDING)?.send(MessageBuilder::new(msg).delay_seconds(delay).build()).await?;
    }
    Ok(())
}

/// POSTs a delivery's payload, signed, within `timeout_ms`; redirects are not followed.
async fn post(row: &DeliveryRow, secret: &str, n_attempt: u32, timeout_ms: u64) -> Outcome {
    use futures::future::{select, Either};
    let started = now_ms();
    let elapsed = || (now_ms() - started).max(0) as u64;
    let signature = signature_header(secret.as_bytes(), started / 1000, row.payload.as_bytes());
    let request = (|| -> worker::Result<worker::Request> {
        let headers = worker::Headers::new();
        headers.set("content-type", "application/json")?;
        headers.set("user-agent", "Kiln-Webhooks/1")?;
        headers.set(SIGNATURE_HEADER, &signature)?;
        headers.set(DELIVERY_HEADER, &row.id)?;
        headers.set("Kiln-Event", &row.event)?;
        headers.set("Kiln-Attempt", &n_attempt.to_string())?;
        let mut init = worker::RequestInit::new();
        init.with_method(worker::Method::Post)
            .with_headers(headers)
            .with_redirect(worker::RequestRedirect::Manual)
            .with_body(Some(row.payload.clone().into()));
        worker::Request::new_with_init(&row.url, &init)
    })();
    let request = match request {
        Ok(r) => r,
        Err(e) => return Outcome { response_code: None, latency_ms: 0, error: Some(clip(&format!("invalid request: {e}"))) },
    };
    let controller = worker::AbortController::default();
    let signal = controller.signal();
    let fetch = Box::pin(async move { worker::Fetch::Request(request).send_with_signal(&signal).await });
    let timer = Box::pin(worker::Delay::from(std::time::Duration::from_millis(timeout_ms)));
    match select(fetch, timer).await {
        Either::Left((Ok(resp), _)) => {
            let code = resp.status_code();
            let error = match code {
                200..=299 => None,
                300..=399 => Some(format!("answered {code}: redirects are not followed")),
                _ => Some(format!("answered {code}")),
            };
            Outcome { response_code: Some(code), latency_ms: elapsed(), error }
        }
        Either::Left((Err(e), _)) => Outcome { response_code: None, latency_ms: elapsed(), error: Some(clip(&format!("request failed: {e}"))) },
        Either::Right(_) => {
            controller.abort();
            Outcome { response_code: None, latency_ms: elapsed(), error: Some(format!("no answer within {} s", timeout_ms / 1000)) }
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_ERROR_CHARS).collect()
}

/// A delivery to send again (the redeliver action): pending again from its current attempt
/// count, with a fresh retry window; same id and payload, so a receiver that saw it dedupes it.
pub async fn redeliver(env: &Env, delivery_id: &str, attempts: u32) -> ApiResult<()> {
    let db = crate::env::db(env)?;
    let now = now_ms();
    db.prepare("UPDATE webhook_deliveries SET status = 'pending', window_start_ms = ?2, next_attempt_at = ?3 WHERE id = ?1")
        .bind(&[s(delivery_id), n(now), s(&rfc3339(now))])?
        .run()
        .await?;
    send(env, vec![DeliveryMessage { delivery_id: delivery_id.to_string(), attempts }]).await.map_err(|e| {
        worker::console_error!("webhook delivery {delivery_id}: queueing a redelivery failed: {e:?}");
        ApiError::Unavailable("could not queue the delivery; try again".into())
    })
}

/// Whether this isolate's consumer should sweep now (at most every [`SWEEP_EVERY_MS`]).
fn sweep_due() -> bool {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_ms();
    let last = LAST.load(Ordering::Relaxed);
    now - last >= SWEEP_EVERY_MS && LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

#[derive(Deserialize)]
struct Stale {
    id: String,
    attempts: u32,
}

/// Sends again the pending deliveries whose message was lost: `next_attempt_at` more than
/// [`SWEEP_GRACE_MS`] past (a send that failed after the rows were stored, an attempt that never
/// recorded its end). Run by the consumer (at most every 30 s per isolate) and the cron trigger.
/// A message the queue still holds makes a duplicate at worst, and the claim sends it once.
pub async fn sweep(env: &Env) -> ApiResult<usize> {
    let db = crate::env::db(env)?;
    let now = now_ms();
    let stale = db
        .prepare(format!(
            "SELECT id, attempts FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at < ?1 ORDER BY next_attempt_at LIMIT {SWEEP_LIMIT}"
        ))
        .bind(&[s(&rfc3339(now - SWEEP_GRACE_MS))])?
        .all()
        .await?
        .results::<Stale>()?;
    if stale.is_empty() {
        return Ok(0);
    }
    let due = rfc3339(now);
    let statements = stale
        .iter()
        .map(|r| {
            db.prepare("UPDATE webhook_deliveries SET next_attempt_at = ?2 WHERE id = ?1 AND attempts = ?3 AND status = 'pending'")
                .bind(&[s(&r.id), s(&due), n(r.attempts as i64)])
        })
        .collect::<worker::Result<Vec<_>>>()?;
    db.batch(statements).await?;
    worker::console_warn!("webhook sweep: sending {} lost deliveries again", stale.len());
    send(env, stale.iter().map(|r| DeliveryMessage { delivery_id: r.id.clone(), attempts: r.attempts }).collect()).await?;
    Ok(stale.len())
}
