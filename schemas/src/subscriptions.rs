//! Outbound webhooks (issue 12 §2): subscriptions to job events, their deliveries and attempts,
//! the payload a receiver gets, the target check and the retry schedule. Pure; the edge stores
//! and sends them (`edge/src/api/subscriptions.rs`, `edge/src/deliveries.rs`).
//!
//! A receiver gets `POST <url>` with the JSON [`DeliveryPayload`] and the headers
//! `Kiln-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (the subscription's
//! secret), `Kiln-Delivery: <delivery id>` and `Kiln-Event: <type>`. Delivery is at least once: a
//! receiver dedupes on `Kiln-Delivery` (equal to the payload's `id`), which a retry and a
//! redelivery keep.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::JobType;

/// What a subscription listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum EventKind {
    /// A job was created (its first status).
    #[serde(rename = "job.created")]
    JobCreated,
    /// A job's status changed.
    #[serde(rename = "job.status")]
    JobStatus,
    /// A job ended with a pull request.
    #[serde(rename = "job.pr_opened")]
    JobPrOpened,
    /// A job reached a terminal status (completed, failed, cancelled).
    #[serde(rename = "job.finished")]
    JobFinished,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [EventKind::JobCreated, EventKind::JobStatus, EventKind::JobPrOpened, EventKind::JobFinished];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::JobCreated => "job.created",
            EventKind::JobStatus => "job.status",
            EventKind::JobPrOpened => "job.pr_opened",
            EventKind::JobFinished => "job.finished",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not yet answered with 2xx; attempts continue (with backoff) until the retry window ends.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// The retry window ended without a 2xx (or the subscription was disabled meanwhile).
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        [DeliveryStatus::Pending, DeliveryStatus::Delivered, DeliveryStatus::Failed].into_iter().find(|k| k.as_str() == s)
    }
}

/// `POST /webhook-subscriptions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscriptionRequest {
    pub url: String,
    pub events: Vec<String>,
    /// Only jobs of these kinds (absent or null: every kind).
    #[serde(default)]
    pub job_types: Option<Vec<String>>,
    /// The signing secret (16 to 256 characters); absent: the edge makes one. Shown once.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// `PATCH /webhook-subscriptions/<id>`: what is present changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSubscriptionRequest {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// `[]` clears the filter (every kind).
    #[serde(default)]
    pub job_types: Option<Vec<String>>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A subscription as the API answers it. `secret` only in the answer to its creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriptionView {
    pub id: String,
    pub url: String,
    pub events: Vec<EventKind>,
    pub job_types: Option<Vec<JobType>>,
    pub enabled: bool,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `GET /webhook-subscriptions`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SubscriptionList {
    pub subscriptions: Vec<SubscriptionView>,
}

/// One POST to the receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptView {
    /// 1, 2, ... over the delivery's life (redeliveries continue the count).
    pub n: u32,
    pub at: String,
    /// The receiver's HTTP status; null when none came (timeout, connection error).
    pub response_code: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

/// A delivery with its attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryView {
    /// Also the payload's `id` and the `Kiln-Delivery` header.
    pub id: String,
    pub subscription_id: String,
    pub event: EventKind,
    pub job_id: String,
    pub status: DeliveryStatus,
    pub created_at: String,
    pub delivered_at: Option<String>,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<AttemptView>,
}

/// `GET /webhook-subscriptions/<id>/deliveries` (newest first).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
}

/// The job as a delivery describes it (at the event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobSummary {
    pub id: String,
    pub job_type: JobType,
    /// The core status (`queued`, `running`, `completed`, ...).
    pub status: String,
    /// The status before this change (`job.status`, `job.finished`, `job.pr_opened`).
    pub previous_status: Option<String>,
    /// The status as the job's own face names it (seed 000's for an app build).
    pub face_status: String,
    pub queue: String,
    /// The seq of the job's `jobStatus` event for this change (orders a job's deliveries).
    pub status_seq: u64,
    pub pr_url: Option<String>,
    pub error_message: Option<String>,
    pub completion_reason: Option<String>,
}

/// The body of every delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryPayload {
    /// The delivery's id (= `Kiln-Delivery`): the same on every retry and redelivery.
    pub id: String,
    #[serde(rename = "type")]
    pub event: EventKind,
    pub created_at: String,
    pub job: JobSummary,
}

/// The body of a Cloudflare Queues message: one delivery's next attempt. `attempts` is the count
/// recorded when it was sent: a message whose delivery has moved on (a duplicate) is dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryMessage {
    pub delivery_id: String,
    pub attempts: u32,
}

/// The event kinds a status change brings: `job.created` for a new job (`from` = None), else
/// `job.status`, plus `job.pr_opened` when it carries a pull request and `job.finished` at a
/// terminal status.
pub fn kinds_of_change(from: Option<&str>, terminal: bool, pr_url: Option<&str>) -> Vec<EventKind> {
    let Some(_) = from else { return vec![EventKind::JobCreated] };
    let mut kinds = vec![EventKind::JobStatus];
    if pr_url.is_some_and(|u| !u.is_empty()) {
        kinds.push(EventKind::JobPrOpened);
    }
    if terminal {
        kinds.push(EventKind::JobFinished);
    }
    kinds
}

/// Does a subscription with these filters want `kind` of a `job_type` job?
pub fn matches(events: &[EventKind], job_types: Option<&[JobType]>, kind: EventKind, job_type: JobType) -> bool {
    events.contains(&kind) && job_types.is_none_or(|t| t.is_empty() || t.contains(&job_type))
}

/// Checks a list of event kinds (at least one, known, no duplicates kept).
pub fn parse_events(events: &[String]) -> Result<Vec<EventKind>, String> {
    if events.is_empty() {
        return Err("events: name at least one of job.created, job.status, job.pr_opened, job.finished".into());
    }
    let mut out = vec![];
    for e in events {
        let k = EventKind::parse(e)
            .ok_or_else(|| format!("events: unknown event {e:?} (job.created, job.status, job.pr_opened, job.finished)"))?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Checks a job-type filter; `None` or empty: every kind.
pub fn parse_job_types(types: Option<&[String]>) -> Result<Option<Vec<JobType>>, String> {
    let Some(types) = types.filter(|t| !t.is_empty()) else { return Ok(None) };
    let mut out = vec![];
    for t in types {
        let k = JobType::ALL.into_iter().find(|k| k.as_str() == t).ok_or_else(|| format!("job_types: unknown job type {t:?}"))?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(Some(out))
}

/// The most characters of a subscription's URL.
pub const MAX_URL_LEN: usize = 2048;
/// A caller-chosen secret's length bounds.
pub const MIN_SECRET_LEN: usize = 16;
pub const MAX_SECRET_LEN: usize = 256;
/// Subscriptions one owner may hold.
pub const MAX_SUBSCRIPTIONS_PER_OWNER: usize = 50;

pub fn check_secret(secret: &str) -> Result<(), String> {
    let n = secret.chars().count();
    if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&n) || secret.chars().any(|c| c.is_control()) {
        return Err(format!("secret: {MIN_SECRET_LEN} to {MAX_SECRET_LEN} printable characters"));
    }
    Ok(())
}

/// Which targets a deployment accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetPolicy {
    /// `http://` URLs (development); otherwise https only.
    pub allow_http: bool,
    /// Private, loopback, link-local and other non-public addresses and names.
    pub allow_private: bool,
}

/// Checks a receiver URL: `https://` (or `http://` when allowed), a host, no credentials, no
/// fragment, and (unless allowed) no private, loopback, link-local, unspecified or local-only host
/// (IP literals in any usual form, `localhost`, `*.localhost`, `*.local`, `*.internal`). Names are
/// not resolved here: a Worker's fetch reaches only public addresses in production.
pub fn check_target(url: &str, policy: TargetPolicy) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("url: at most {MAX_URL_LEN} characters"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("url: no spaces or control characters".into());
    }
    let (scheme, rest) = url.split_once("://").ok_or("url: an absolute https:// URL")?;
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "http" if policy.allow_http => {}
        "http" => return Err("url: https only".into()),
        _ => return Err("url: an https:// URL".into()),
    }
    if rest.contains('#') {
        return Err("url: no fragment".into());
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("url: no credentials in the URL".into());
    }
    let host = host_of(authority).ok_or("url: no valid host")?;
    if !policy.allow_private && is_private_host(&host) {
        return Err("url: private, loopback and link-local targets are not allowed".into());
    }
    Ok(())
}

/// The host of an authority (`host[:port]`, `[v6][:port]`), lowercased, brackets removed.
fn host_of(authority: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.parse::<u16>().is_err() {
            return None;
        }
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ok = !host.is_empty()
        && (host.parse::<std::net::Ipv6Addr>().is_ok()
            || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'));
    ok.then_some(host)
}

fn is_private_host(host: &str) -> bool {
    if host == "localhost" || [".localhost", ".local", ".internal", ".home.arpa"].iter().any(|s| host.ends_with(s)) {
        return true;
    }
    if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
        if let Some(v4) = v6.to_ipv4_mapped() {
            return is_private_v4(v4);
        }
        let s = v6.segments();
        return v6.is_loopback()
            || v6.is_unspecified()
            || (s[0] & 0xfe00) == 0xfc00 // unique local
            || (s[0] & 0xffc0) == 0xfe80 // link-local
            || (s[0] & 0xffc0) == 0xfec0; // site-local (deprecated)
    }
    match parse_v4_loose(host) {
        Some(v4) => is_private_v4(v4),
        None => false,
    }
}

/// An IPv4 address as URL parsers read it: dotted with 1 to 4 parts, each decimal, octal
/// (`0` prefix) or hex (`0x`), the last part filling the remaining bytes (`127.1`, `2130706433`).
fn parse_v4_loose(host: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = vec![];
    for p in &parts {
        let n = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            if h.is_empty() { 0 } else { u64::from_str_radix(h, 16).ok()? }
        } else if p.len() > 1 && p.starts_with('0') {
            u64::from_str_radix(&p[1..], 8).ok()?
        } else {
            p.parse::<u64>().ok()?
        };
        nums.push(n);
    }
    let last = *nums.last()?;
    let head = &nums[..nums.len() - 1];
    if head.iter().any(|&n| n > 255) || last >= 1u64 << (8 * (5 - nums.len())) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (8 * (3 - i));
    }
    v |= last;
    Some(std::net::Ipv4Addr::from(v as u32))
}

fn is_private_v4(ip: std::net::Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || o[0] >= 240
}

/// The delay before attempt `attempts + 1` after `attempts` failed ones: `base` doubling, at most
/// `max` (seconds; at least 1).
pub fn retry_delay_secs(attempts: u32, base: u32, max: u32) -> u32 {
    let shift = attempts.saturating_sub(1).min(31);
    base.max(1).saturating_mul(1u32 << shift).min(max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROD: TargetPolicy = TargetPolicy { allow_http: false, allow_private: false };
    const DEV: TargetPolicy = TargetPolicy { allow_http: true, allow_private: true };

    #[test]
    fn targets() {
        assert!(check_target("https://hooks.example.com/kiln?x=1", PROD).is_ok());
        assert!(check_target("https://hooks.example.com:8443/kiln", PROD).is_ok());
        assert!(check_target("https://93.184.216.34/", PROD).is_ok());
        for bad in [
            "http://hooks.example.com/",
            "ftp://hooks.example.com/",
            "hooks.example.com",
            "https://",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/#x",
            "https://hooks example.com/",
            "https://hooks.example.com:99999/",
            "https://localhost/",
            "https://LOCALHOST./",
            "https://api.localhost/",
            "https://printer.local/",
            "https://db.internal/",
            "https://127.0.0.1/",
            "https://127.1/",
            "https://2130706433/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://10.1.2.3/",
            "https://172.16.0.1/",
            "https://172.31.255.255/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::1]/",
            "https://[::]/",
            "https://[fe80::1]/",
            "https://[fd00::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:a9fe:a9fe]/",
        ] {
            assert!(check_target(bad, PROD).is_err(), "{bad} should be refused");
        }
        assert!(check_target("https://172.32.0.1/", PROD).is_ok());
        assert!(check_target("http://127.0.0.1:8080/hook", DEV).is_ok());
        assert!(check_target("http://127.0.0.1:8080/hook", TargetPolicy { allow_http: true, allow_private: false }).is_err());
        assert!(check_target("ftp://127.0.0.1/", DEV).is_err());
    }

    #[test]
    fn events_and_types() {
        assert_eq!(
            parse_events(&["job.status".into(), "job.created".into(), "job.status".into()]).unwrap(),
            vec![EventKind::JobStatus, EventKind::JobCreated]
        );
        assert!(parse_events(&[]).is_err());
        assert!(parse_events(&["job.deleted".into()]).is_err());
        assert_eq!(parse_job_types(None).unwrap(), None);
        assert_eq!(parse_job_types(Some(&[])).unwrap(), None);
        assert_eq!(parse_job_types(Some(&["code".into(), "landing_init".into()])).unwrap(), Some(vec![JobType::Code, JobType::LandingInit]));
        assert!(parse_job_types(Some(&["cooking".into()])).is_err());
        let ev = [EventKind::JobFinished];
        assert!(matches(&ev, None, EventKind::JobFinished, JobType::Task));
        assert!(!matches(&ev, None, EventKind::JobStatus, JobType::Task));
        assert!(matches(&ev, Some(&[JobType::Task]), EventKind::JobFinished, JobType::Task));
        assert!(!matches(&ev, Some(&[JobType::Code]), EventKind::JobFinished, JobType::Task));
        assert_eq!(serde_json::to_value(EventKind::JobPrOpened).unwrap(), "job.pr_opened");
    }

    #[test]
    fn kinds() {
        assert_eq!(kinds_of_change(None, false, None), vec![EventKind::JobCreated]);
        assert_eq!(kinds_of_change(Some("queued"), false, None), vec![EventKind::JobStatus]);
        assert_eq!(
            kinds_of_change(Some("running"), true, Some("https://github.com/o/r/pull/1")),
            vec![EventKind::JobStatus, EventKind::JobPrOpened, EventKind::JobFinished]
        );
        assert_eq!(kinds_of_change(Some("running"), true, Some("")), vec![EventKind::JobStatus, EventKind::JobFinished]);
    }

    #[test]
    fn backoff() {
        assert_eq!(retry_delay_secs(1, 10, 3600), 10);
        assert_eq!(retry_delay_secs(2, 10, 3600), 20);
        assert_eq!(retry_delay_secs(4, 10, 3600), 80);
        assert_eq!(retry_delay_secs(20, 10, 3600), 3600);
        assert_eq!(retry_delay_secs(200, 10, 3600), 3600);
        assert_eq!(retry_delay_secs(1, 0, 0), 1);
        // A day of retries at 10 s doubling to an hour is about 33 attempts: within Queues' limits.
        let (mut t, mut n) = (0u64, 0u32);
        while t < 86_400 {
            n += 1;
            t += u64::from(retry_delay_secs(n, 10, 3600));
        }
        assert!(n < 40, "{n}");
    }

    #[test]
    fn secrets() {
        assert!(check_secret("0123456789abcdef").is_ok());
        assert!(check_secret("short").is_err());
        assert!(check_secret(&"x".repeat(257)).is_err());
        assert!(check_secret("0123456789abcdef\n").is_err());
    }
}
