//! Webhooks (issue 12): the signature schemes, the `/webhooks` management shapes, and the pure
//! mapping of an inbound delivery to a `POST /jobs` body.
//!
//! Two signature schemes, both HMAC-SHA256 and both verified in constant time:
//! - GitHub's `X-Hub-Signature-256: sha256=<hex>` over the raw body ([`verify_github`]).
//! - Kiln's own `Kiln-Signature: t=<unix seconds>,v1=<hex>` over `"<t>.<body>"`
//!   ([`sign`], [`signature_header`], [`verify_signature_header`]): inbound generic hooks verify
//!   it, outbound deliveries are signed with it. A header may carry several `v1=` (a sender
//!   rotating its secret); one match is enough. Timestamps more than [`TOLERANCE_SECS`] away
//!   from now (past or future) are refused, so a captured delivery cannot be replayed later.
//!
//! A receiver verifies a Kiln delivery like this (any language has the same three steps):
//!
//! ```
//! use kiln_schemas::webhooks::{signature_header, verify_signature_header};
//! let (secret, body, now) = (b"whsec_example", br#"{"event":"job.created"}"#, 1_700_000_000);
//! let header = signature_header(secret, now, body); // what the sender put in Kiln-Signature
//! // 1. split "t=...,v1=..."; 2. HMAC-SHA256(secret, "<t>.<raw body>") as lowercase hex equals a v1
//! // (compared in constant time); 3. |now - t| <= 300 s.
//! assert!(verify_signature_header(secret, &header, body, now + 10).is_ok());
//! assert!(verify_signature_header(secret, &header, b"{}", now).is_err());
//! ```

use hmac::{Hmac, Mac};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::jobs::NewJob;
use crate::validate::{is_branch_name, is_repo_component};

type HmacSha256 = Hmac<Sha256>;

/// Kiln's signature header (inbound generic hooks, outbound deliveries).
pub const SIGNATURE_HEADER: &str = "Kiln-Signature";
/// A delivery's id on Kiln's scheme: the same id is the same delivery (also `Idempotency-Key`).
pub const DELIVERY_HEADER: &str = "Kiln-Delivery";
/// GitHub's signature, event and delivery headers.
pub const GITHUB_SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
pub const GITHUB_EVENT_HEADER: &str = "X-GitHub-Event";
pub const GITHUB_DELIVERY_HEADER: &str = "X-GitHub-Delivery";
/// How far a signature's timestamp may be from now, either way.
pub const TOLERANCE_SECS: i64 = 300;
/// The most rules one hook holds.
pub const MAX_RULES: usize = 20;
/// The largest template (its JSON text).
pub const MAX_TEMPLATE_BYTES: usize = 16 * 1024;
/// The longest hook name.
pub const MAX_NAME_BYTES: usize = 200;
/// The longest delivery id kept for idempotency.
pub const MAX_DELIVERY_ID_BYTES: usize = 200;
/// The comment authors a comment rule accepts unless it names its own: people with write access.
pub const DEFAULT_COMMENT_ASSOCIATIONS: [&str; 3] = ["OWNER", "MEMBER", "COLLABORATOR"];

// ----- Signatures -----------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length")
}

/// HMAC-SHA256 of `"<timestamp>.<body>"`, lowercase hex: Kiln's `v1` signature.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    hex(&m.finalize().into_bytes())
}

/// The `Kiln-Signature` value: `t=<timestamp>,v1=<sign(...)>`.
pub fn signature_header(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", sign(secret, timestamp, body))
}

/// Why a signature was refused (each is a 401; the text is safe to answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    Mismatch,
    /// The timestamp is more than [`TOLERANCE_SECS`] before now.
    Stale,
    /// The timestamp is more than [`TOLERANCE_SECS`] after now.
    Future,
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignatureError::Missing => "signature header missing",
            SignatureError::Malformed => "signature header malformed",
            SignatureError::Mismatch => "signature does not match",
            SignatureError::Stale => "signature timestamp is older than 5 minutes",
            SignatureError::Future => "signature timestamp is more than 5 minutes in the future",
        })
    }
}

/// The timestamp and the `v1` signatures of a `Kiln-Signature` value.
pub fn parse_signature_header(header: &str) -> Result<(i64, Vec<Vec<u8>>), SignatureError> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or(SignatureError::Malformed)?;
        match k.trim() {
            "t" => t = Some(v.trim().parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            "v1" => sigs.push(unhex(v.trim()).filter(|s| s.len() == 32).ok_or(SignatureError::Malformed)?),
            // Other schemes (a future v2) are ignored, as Stripe's receivers do.
            _ => {}
        }
    }
    match t {
        Some(t) if !sigs.is_empty() => Ok((t, sigs)),
        _ => Err(SignatureError::Malformed),
    }
}

/// Verifies a `Kiln-Signature` value against `body` at `now` (unix seconds): answers the signed
/// timestamp. The signature is checked before the clock, so a stale but genuine delivery is told
/// apart from a forged one.
pub fn verify_signature_header(secret: &[u8], header: &str, body: &[u8], now: i64) -> Result<i64, SignatureError> {
    if header.trim().is_empty() {
        return Err(SignatureError::Missing);
    }
    let (t, sigs) = parse_signature_header(header)?;
    let matched = sigs.iter().any(|sig| {
        let mut m = mac(secret);
        m.update(t.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        m.verify_slice(sig).is_ok()
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if now - t > TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    if t - now > TOLERANCE_SECS {
        return Err(SignatureError::Future);
    }
    Ok(t)
}

/// GitHub's `X-Hub-Signature-256` value for `body`: `sha256=<hex>`.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(body);
    format!("sha256={}", hex(&m.finalize().into_bytes()))
}

/// Verifies GitHub's `X-Hub-Signature-256` value (`sha256=<hex>` of the raw body).
pub fn verify_github(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), SignatureError> {
    let header = header.map(str::trim).filter(|h| !h.is_empty()).ok_or(SignatureError::Missing)?;
    let sig = header
        .strip_prefix("sha256=")
        .and_then(unhex)
        .filter(|s| s.len() == 32)
        .ok_or(SignatureError::Malformed)?;
    let mut m = mac(secret);
    m.update(body);
    m.verify_slice(&sig).map_err(|_| SignatureError::Mismatch)
}

// ----- Management shapes ----------------------------------------------------------------------

/// What sends to a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    /// `POST /webhooks/github/<id>`: GitHub's signature and events, mapped by rules.
    Github,
    /// `POST /webhooks/generic/<id>`: Kiln's signature, the body mapped by the template.
    Generic,
}

impl HookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Github => "github",
            HookKind::Generic => "generic",
        }
    }

    pub fn parse(s: &str) -> Option<HookKind> {
        match s {
            "github" => Some(HookKind::Github),
            "generic" => Some(HookKind::Generic),
            _ => None,
        }
    }
}

/// A GitHub event a rule maps to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GithubEvent {
    Issues,
    PullRequest,
    IssueComment,
}

impl GithubEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            GithubEvent::Issues => "issues",
            GithubEvent::PullRequest => "pull_request",
            GithubEvent::IssueComment => "issue_comment",
        }
    }
}

/// One rule of a GitHub hook: `{event: "issues"|"pull_request", action: "labeled", label, job}`
/// or `{event: "issue_comment", command: "/kiln", job, associations?}`. `job` holds the job's
/// own settings (`jobType`, `maxIterations`, `priority`, `timeoutSeconds`, ...): the prompt, the
/// repository and the branch come from the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rule {
    pub event: GithubEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Comment authors (`author_association`) a comment rule accepts; default
    /// [`DEFAULT_COMMENT_ASSOCIATIONS`] (anyone may comment on a public repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associations: Option<Vec<String>>,
    #[serde(default)]
    pub job: Map<String, Value>,
}

/// Fields of a rule's `job` that the event fills.
const EVENT_FIELDS: [&str; 5] = ["prompt", "githubOrg", "githubRepo", "clientId", "branchName"];

impl Rule {
    /// Validates one rule (errors fit for a 400, prefixed by the caller with its index).
    pub fn parse(v: &Value) -> Result<Rule, String> {
        let obj = v.as_object().ok_or("must be an object")?;
        for k in obj.keys() {
            if !["event", "action", "label", "command", "associations", "job"].contains(&k.as_str()) {
                return Err(format!("unknown field {k:?}"));
            }
        }
        let rule: Rule = serde_json::from_value(v.clone()).map_err(|e| {
            let e = e.to_string();
            if e.contains("unknown variant") {
                "event must be one of issues, pull_request, issue_comment".to_string()
            } else {
                e
            }
        })?;
        let nonempty = |s: &Option<String>| s.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        match rule.event {
            GithubEvent::Issues | GithubEvent::PullRequest => {
                if rule.action.as_deref() != Some("labeled") {
                    return Err("action must be \"labeled\" for issues and pull_request rules".into());
                }
                let label = nonempty(&rule.label).ok_or("label is required for a labeled rule")?;
                if label.len() > 100 {
                    return Err("label must be at most 100 bytes".into());
                }
                if rule.command.is_some() || rule.associations.is_some() {
                    return Err("command and associations belong to issue_comment rules".into());
                }
            }
            GithubEvent::IssueComment => {
                if rule.action.as_deref().is_some_and(|a| a != "created") {
                    return Err("action must be \"created\" (or absent) for issue_comment rules".into());
                }
                let command = nonempty(&rule.command).ok_or("command is required for an issue_comment rule")?;
                if command.len() > 100 || command.chars().any(char::is_whitespace) {
                    return Err("command must be one word of at most 100 bytes, e.g. \"/kiln\"".into());
                }
                if rule.label.is_some() {
                    return Err("label belongs to issues and pull_request rules".into());
                }
                if let Some(a) = &rule.associations {
                    if a.is_empty() || a.iter().any(|s| s.trim().is_empty() || s.len() > 40) {
                        return Err("associations must be a non-empty list of GitHub author associations".into());
                    }
                }
            }
        }
        for k in EVENT_FIELDS {
            if rule.job.contains_key(k) {
                return Err(format!("job.{k} comes from the event and cannot be set"));
            }
        }
        // The job settings must make a valid job once the event fills the rest.
        let mut probe = rule.job.clone();
        probe.insert("prompt".into(), Value::String("probe".into()));
        probe.insert("githubOrg".into(), Value::String("org".into()));
        probe.insert("githubRepo".into(), Value::String("repo".into()));
        probe.insert("branchName".into(), Value::String("kiln/issue-1".into()));
        NewJob::parse(&Value::Object(probe)).map_err(|e| format!("job: {e}"))?;
        Ok(Rule { label: nonempty(&rule.label), command: nonempty(&rule.command), ..rule })
    }
}

/// `POST /webhooks`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NewHook {
    pub kind: HookKind,
    pub name: String,
    pub rules: Vec<Rule>,
    pub template: Option<Value>,
}

/// The wire shape of `POST /webhooks` (for the JSON Schema; [`NewHook::parse`] enforces it).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateHookRequest {
    pub kind: HookKind,
    pub name: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Value>,
}

impl NewHook {
    /// Validates a create body: a github hook needs rules (and no template), a generic hook a
    /// template (and no rules). Errors are fit for a 400.
    pub fn parse(body: &Value) -> Result<NewHook, String> {
        let obj = body.as_object().ok_or("request body must be a JSON object")?;
        for k in obj.keys() {
            if !["kind", "name", "rules", "template"].contains(&k.as_str()) {
                return Err(format!("unknown field {k:?}"));
            }
        }
        let kind = match obj.get("kind") {
            Some(Value::String(s)) => HookKind::parse(s).ok_or("kind must be \"github\" or \"generic\"")?,
            None | Some(Value::Null) => return Err("kind is required: \"github\" or \"generic\"".into()),
            Some(_) => return Err("kind must be a string".into()),
        };
        let name = match obj.get("name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            None | Some(Value::Null) | Some(Value::String(_)) => return Err("name is required".into()),
            Some(_) => return Err("name must be a string".into()),
        };
        if name.len() > MAX_NAME_BYTES {
            return Err(format!("name must be at most {MAX_NAME_BYTES} bytes"));
        }
        let rules = match obj.get("rules") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(items)) => {
                if items.len() > MAX_RULES {
                    return Err(format!("rules must have at most {MAX_RULES} entries"));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Rule::parse(r).map_err(|e| format!("rules[{i}]: {e}")))
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(_) => return Err("rules must be an array".into()),
        };
        let template = match obj.get("template") {
            None | Some(Value::Null) => None,
            Some(t) => {
                check_template(t)?;
                Some(t.clone())
            }
        };
        match kind {
            HookKind::Github if rules.is_empty() => return Err("a github hook needs at least one rule".into()),
            HookKind::Github if template.is_some() => {
                return Err("template belongs to generic hooks; github hooks map events by rules".into())
            }
            HookKind::Generic if template.is_none() => return Err("a generic hook needs a template".into()),
            HookKind::Generic if !rules.is_empty() => {
                return Err("rules belong to github hooks; generic hooks map bodies by their template".into())
            }
            _ => {}
        }
        Ok(NewHook { kind, name, rules, template })
    }
}

/// A hook as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HookView {
    pub id: String,
    pub kind: HookKind,
    pub name: String,
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Value>,
    /// Where the sender posts: `/webhooks/<kind>/<id>`.
    pub path: String,
    pub created_at: String,
    pub secret_rotated_at: Option<String>,
}

/// Answer of `POST /webhooks` and `POST /webhooks/<id>/rotate-secret`: the only time the secret
/// is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HookWithSecret {
    #[serde(flatten)]
    pub hook: HookView,
    pub secret: String,
}

/// `GET /webhooks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HookList {
    pub webhooks: Vec<HookView>,
}

/// Answer to an inbound delivery: 201 `{accepted: true, job_id}` when it started a job, 202
/// `{accepted: false, reason}` when it maps to none (nothing stored), 200 for GitHub's `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InboundAnswer {
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a job started by a GitHub issue (or pull request) came from: the runner comments on
/// it with the pull request it opens (in the job's params as `sourceIssue`, and in
/// `Assignment.source_issue`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IssueRef {
    pub org: String,
    pub repo: String,
    pub number: u64,
}

impl IssueRef {
    /// The `sourceIssue` of a job row's params JSON, if any.
    pub fn from_params(params: &str) -> Option<IssueRef> {
        let v: Value = serde_json::from_str(params).ok()?;
        serde_json::from_value(v.get("sourceIssue")?.clone()).ok()
    }
}

// ----- Mapping deliveries to jobs -------------------------------------------------------------

/// What a GitHub delivery maps to: a `POST /jobs` body (checked by `NewJob::parse`) and the
/// issue it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub job: Value,
    pub issue: Option<IssueRef>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The prompt of an issue or pull request: its title, then its body.
fn issue_prompt(kind: &str, org: &str, repo: &str, number: u64, title: &str, body: &str) -> String {
    let mut p = format!("{title}\n\n");
    if !body.trim().is_empty() {
        p.push_str(body.trim());
        p.push_str("\n\n");
    }
    p.push_str(&format!("(GitHub {kind} {org}/{repo}#{number})"));
    p
}

/// Maps a GitHub delivery (`X-GitHub-Event`, parsed body) to a job by the first rule that
/// matches; `Err(reason)` when none does (answered 202, nothing stored). The branch is
/// `kiln/issue-<n>` (`kiln/pr-<n>` for a pull request); the caller makes it unique.
pub fn map_github(rules: &[Rule], event: &str, payload: &Value) -> Result<Mapped, String> {
    let relevant: Vec<&Rule> = rules.iter().filter(|r| r.event.as_str() == event).collect();
    if relevant.is_empty() {
        return Err(format!("no rule for {event:?} events"));
    }
    let org = str_at(payload, &["repository", "owner", "login"]).ok_or("the payload names no repository owner")?;
    let repo = str_at(payload, &["repository", "name"]).ok_or("the payload names no repository")?;
    if !is_repo_component(org) || !is_repo_component(repo) {
        return Err("the payload's repository name is not valid".into());
    }
    let action = payload.get("action").and_then(Value::as_str).unwrap_or("");
    let mut last_reason = String::new();
    for rule in relevant {
        let (item_key, kind) = match rule.event {
            GithubEvent::PullRequest => ("pull_request", "pull request"),
            _ => ("issue", "issue"),
        };
        let item = match payload.get(item_key) {
            Some(i) if i.is_object() => i,
            _ => return Err(format!("the payload has no {item_key}")),
        };
        let number = item.get("number").and_then(Value::as_u64).ok_or_else(|| format!("the {kind} has no number"))?;
        let title = item.get("title").and_then(Value::as_str).unwrap_or("");
        let body = item.get("body").and_then(Value::as_str).unwrap_or("");
        let prompt = match rule.event {
            GithubEvent::Issues | GithubEvent::PullRequest => {
                if action != "labeled" {
                    last_reason = format!("{event} action {action:?} starts no job (rules match \"labeled\")");
                    continue;
                }
                let label = str_at(payload, &["label", "name"]).unwrap_or("");
                let want = rule.label.as_deref().unwrap_or("");
                if !label.eq_ignore_ascii_case(want) {
                    last_reason = format!("label {label:?} starts no job");
                    continue;
                }
                issue_prompt(kind, org, repo, number, title, body)
            }
            GithubEvent::IssueComment => {
                if action != "created" {
                    last_reason = format!("issue_comment action {action:?} starts no job (rules match \"created\")");
                    continue;
                }
                let text = str_at(payload, &["comment", "body"]).unwrap_or("").trim_start();
                let command = rule.command.as_deref().unwrap_or("");
                let rest = match text.strip_prefix(command) {
                    Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => rest.trim(),
                    _ => {
                        last_reason = format!("the comment does not start with {command:?}");
                        continue;
                    }
                };
                let association = str_at(payload, &["comment", "author_association"]).unwrap_or("NONE");
                let allowed = match &rule.associations {
                    Some(a) => a.iter().any(|x| x.eq_ignore_ascii_case(association)),
                    None => DEFAULT_COMMENT_ASSOCIATIONS.iter().any(|x| x.eq_ignore_ascii_case(association)),
                };
                if !allowed {
                    last_reason = format!("a comment by a {association} author starts no job");
                    continue;
                }
                if rest.is_empty() {
                    issue_prompt(kind, org, repo, number, title, body)
                } else {
                    format!("{rest}\n\nOn GitHub issue {org}/{repo}#{number}: {title}\n\n{}", body.trim())
                        .trim_end()
                        .to_string()
                }
            }
        };
        let is_pr = rule.event == GithubEvent::PullRequest || item.get("pull_request").is_some();
        let branch = if is_pr { format!("kiln/pr-{number}") } else { format!("kiln/issue-{number}") };
        let mut job = rule.job.clone();
        job.insert("prompt".into(), Value::String(prompt));
        job.insert("githubOrg".into(), Value::String(org.into()));
        job.insert("githubRepo".into(), Value::String(repo.into()));
        job.insert("branchName".into(), Value::String(branch));
        if !job.contains_key("title") && !title.trim().is_empty() {
            let t: String = title.trim().chars().take(200).collect();
            job.insert("title".into(), Value::String(t));
        }
        return Ok(Mapped {
            job: Value::Object(job),
            issue: Some(IssueRef { org: org.into(), repo: repo.into(), number }),
        });
    }
    Err(last_reason)
}

/// A placeholder's path: `body` then keys or array indices (`body.items.0.name`).
fn parse_path(p: &str) -> Result<Vec<&str>, String> {
    let parts: Vec<&str> = p.split('.').collect();
    if parts.first() != Some(&"body")
        || parts.iter().any(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        return Err(format!("{{{{ {p} }}}} is not a path like {{{{ body.field }}}}"));
    }
    Ok(parts[1..].to_vec())
}

/// The placeholders of a template string, as (byte range, path).
fn placeholders(s: &str) -> Result<Vec<(std::ops::Range<usize>, &str)>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = s[from..].find("{{") {
        let start = from + open;
        let close = s[start + 2..].find("}}").ok_or("a template string has \"{{\" without \"}}\"")?;
        let end = start + 2 + close + 2;
        let path = s[start + 2..end - 2].trim();
        parse_path(path)?;
        out.push((start..end, path));
        from = end;
    }
    Ok(out)
}

fn check_template_value(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) => placeholders(s).map(|_| ()),
        Value::Array(items) => items.iter().try_for_each(check_template_value),
        Value::Object(m) => m.values().try_for_each(check_template_value),
        _ => Ok(()),
    }
}

/// Validates a generic hook's template: a JSON object whose strings may hold `{{ body.path }}`
/// placeholders, at most [`MAX_TEMPLATE_BYTES`].
pub fn check_template(t: &Value) -> Result<(), String> {
    if !t.is_object() {
        return Err("template must be a JSON object (a POST /jobs body with {{ body.path }} placeholders)".into());
    }
    if t.to_string().len() > MAX_TEMPLATE_BYTES {
        return Err(format!("template must be at most {MAX_TEMPLATE_BYTES} bytes"));
    }
    check_template_value(t).map_err(|e| format!("template: {e}"))
}

fn lookup<'a>(body: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(body, |v, k| match v {
        Value::Object(m) => m.get(*k),
        Value::Array(a) => a.get(k.parse::<usize>().ok()?),
        _ => None,
    })
}

fn render_value(t: &Value, body: &Value) -> Result<Value, String> {
    Ok(match t {
        Value::String(s) => {
            let found = placeholders(s)?;
            // A string that is one placeholder takes the value as it is (a number stays a number).
            if let [(range, path)] = found.as_slice() {
                if range.start == 0 && range.end == s.len() {
                    let parts = parse_path(path)?;
                    return lookup(body, &parts).cloned().ok_or_else(|| format!("the body has no {path}"));
                }
            }
            let mut out = String::new();
            let mut at = 0;
            for (range, path) in found {
                out.push_str(&s[at..range.start]);
                let parts = parse_path(path)?;
                match lookup(body, &parts) {
                    Some(Value::String(v)) => out.push_str(v),
                    Some(Value::Null) | None => return Err(format!("the body has no {path}")),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => out.push_str(&v.to_string()),
                    Some(_) => return Err(format!("{path} is not a string, number or boolean")),
                }
                at = range.end;
            }
            out.push_str(&s[at..]);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| render_value(i, body)).collect::<Result<_, _>>()?),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| Ok((k.clone(), render_value(v, body)?))).collect::<Result<_, String>>()?)
        }
        other => other.clone(),
    })
}

/// Renders a generic hook's template over a delivery's JSON body: each `{{ body.path }}` is
/// replaced by the value at that path (plain substitution: nothing is evaluated). `Err(reason)`
/// when the body lacks a path the template names.
pub fn render_template(template: &Value, body: &Value) -> Result<Value, String> {
    render_value(template, body)
}

/// A delivery id fit to store: printable ASCII, at most [`MAX_DELIVERY_ID_BYTES`].
pub fn valid_delivery_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_DELIVERY_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `base` when no job of the hook's owner uses it yet, else `base-<suffix>` (a later delivery
/// for the same issue gets a branch of its own).
pub fn unique_branch(base: &str, taken: bool, suffix: &str) -> String {
    if !taken {
        return base.to_string();
    }
    let clean: String = suffix.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>().to_ascii_lowercase();
    let b = format!("{base}-{clean}");
    if is_branch_name(&b) {
        b
    } else {
        base.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"whsec_test";

    #[test]
    fn kiln_signatures_verify_and_refuse_tampering_and_stale_or_future_timestamps() {
        let body = br#"{"a":1}"#;
        let h = signature_header(SECRET, 1000, body);
        assert!(h.starts_with("t=1000,v1="));
        assert_eq!(verify_signature_header(SECRET, &h, body, 1000), Ok(1000));
        assert_eq!(verify_signature_header(SECRET, &h, body, 1300), Ok(1000));
        assert_eq!(verify_signature_header(SECRET, &h, body, 1301), Err(SignatureError::Stale));
        assert_eq!(verify_signature_header(SECRET, &h, body, 699), Err(SignatureError::Future));
        assert_eq!(verify_signature_header(SECRET, &h, br#"{"a":2}"#, 1000), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature_header(b"other", &h, body, 1000), Err(SignatureError::Mismatch));
        // A different timestamp with the same v1 does not verify (the timestamp is signed).
        let moved = h.replace("t=1000", "t=1001");
        assert_eq!(verify_signature_header(SECRET, &moved, body, 1000), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature_header(SECRET, "", body, 1000), Err(SignatureError::Missing));
        for bad in ["t=1", "v1=00", "t=x,v1=00", "nonsense", "t=1,v1=zz"] {
            assert_eq!(verify_signature_header(SECRET, bad, body, 1), Err(SignatureError::Malformed), "{bad}");
        }
        // Several v1 (a rotating sender): one match is enough; unknown schemes are ignored.
        let two = format!("t=1000,v1={},v1={},v2=abc", sign(b"old", 1000, body), sign(SECRET, 1000, body));
        assert_eq!(verify_signature_header(SECRET, &two, body, 1000), Ok(1000));
    }

    #[test]
    fn kiln_signatures_match_an_independent_hmac() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut m = mac(b"Jefe");
        m.update(b"what do ya want for nothing?");
        assert_eq!(hex(&m.finalize().into_bytes()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // sign() is that HMAC over "<t>.<body>".
        let mut m = mac(b"Jefe");
        m.update(b"5.what do ya want for nothing?");
        assert_eq!(sign(b"Jefe", 5, b"what do ya want for nothing?"), hex(&m.finalize().into_bytes()));
    }

    #[test]
    fn github_signatures() {
        let body = br#"{"zen":"hi"}"#;
        let h = github_signature(SECRET, body);
        assert!(h.starts_with("sha256=") && h.len() == 71);
        assert_eq!(verify_github(SECRET, Some(&h), body), Ok(()));
        assert_eq!(verify_github(SECRET, Some(&h), b"{}"), Err(SignatureError::Mismatch));
        assert_eq!(verify_github(b"x", Some(&h), body), Err(SignatureError::Mismatch));
        assert_eq!(verify_github(SECRET, None, body), Err(SignatureError::Missing));
        assert_eq!(verify_github(SECRET, Some("sha1=abc"), body), Err(SignatureError::Malformed));
        assert_eq!(verify_github(SECRET, Some("sha256=abcd"), body), Err(SignatureError::Malformed));
    }

    fn labeled_rule() -> Value {
        json!({"event": "issues", "action": "labeled", "label": "kiln", "job": {"jobType": "code"}})
    }

    #[test]
    fn hooks_are_validated() {
        let ok = NewHook::parse(&json!({"kind": "github", "name": "repo events", "rules": [labeled_rule(),
            {"event": "issue_comment", "command": "/kiln", "job": {"jobType": "ralph", "maxIterations": 3}}]}))
        .unwrap();
        assert_eq!(ok.rules.len(), 2);
        assert_eq!(ok.rules[1].command.as_deref(), Some("/kiln"));
        let generic = NewHook::parse(&json!({"kind": "generic", "name": "g",
            "template": {"prompt": "{{ body.title }}: {{ body.text }}", "githubOrg": "acme", "githubRepo": "shop", "jobType": "task"}}))
        .unwrap();
        assert!(generic.template.is_some());
        let bad = [
            (json!([]), "JSON object"),
            (json!({"name": "x"}), "kind is required"),
            (json!({"kind": "gitlab", "name": "x"}), "kind must be"),
            (json!({"kind": "github", "name": " "}), "name is required"),
            (json!({"kind": "github", "name": "x"}), "at least one rule"),
            (json!({"kind": "github", "name": "x", "rules": {}}), "rules must be an array"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "push", "job": {}}]}), "rules[0]: event must be one of"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "opened", "label": "k"}]}), "labeled"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "labeled"}]}), "label is required"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issue_comment"}]}), "command is required"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issue_comment", "command": "/kiln fix"}]}), "one word"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "labeled", "label": "k", "job": {"prompt": "x"}}]}), "job.prompt comes from the event"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "labeled", "label": "k", "job": {"jobType": "app_build"}}]}), "job: jobType"),
            (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "labeled", "label": "k", "job": {"jobType": "ralph", "maxIterations": 0}}]}), "maxIterations"),
            (json!({"kind": "github", "name": "x", "rules": [labeled_rule()], "template": {}}), "template belongs"),
            (json!({"kind": "generic", "name": "x"}), "needs a template"),
            (json!({"kind": "generic", "name": "x", "template": "{{ body.x }}"}), "JSON object"),
            (json!({"kind": "generic", "name": "x", "template": {"prompt": "{{ env.SECRET }}"}}), "not a path"),
            (json!({"kind": "generic", "name": "x", "template": {"prompt": "{{ body.x"}}), "without"),
            (json!({"kind": "generic", "name": "x", "template": {"p": "x"}, "rules": [labeled_rule()]}), "rules belong"),
            (json!({"kind": "generic", "name": "x", "template": {"p": "x"}, "secret": "mine"}), "unknown field"),
        ];
        for (body, want) in bad {
            let e = NewHook::parse(&body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    fn labeled_payload(label: &str) -> Value {
        json!({
            "action": "labeled",
            "label": {"name": label},
            "issue": {"number": 42, "title": "Fix the login page", "body": "It 500s on empty passwords."},
            "repository": {"name": "shop", "owner": {"login": "acme"}},
        })
    }

    #[test]
    fn github_events_map_by_rules() {
        let hook = NewHook::parse(&json!({"kind": "github", "name": "x", "rules": [labeled_rule(),
            {"event": "issue_comment", "command": "/kiln", "job": {"jobType": "task"}}]}))
        .unwrap();
        let m = map_github(&hook.rules, "issues", &labeled_payload("Kiln")).unwrap();
        assert_eq!(m.issue, Some(IssueRef { org: "acme".into(), repo: "shop".into(), number: 42 }));
        assert_eq!(m.job["githubOrg"], "acme");
        assert_eq!(m.job["branchName"], "kiln/issue-42");
        assert_eq!(m.job["jobType"], "code");
        assert_eq!(m.job["title"], "Fix the login page");
        let prompt = m.job["prompt"].as_str().unwrap();
        assert!(prompt.starts_with("Fix the login page\n\nIt 500s on empty passwords."), "{prompt}");
        assert!(NewJob::parse(&m.job).is_ok());

        assert!(map_github(&hook.rules, "issues", &labeled_payload("bug")).unwrap_err().contains("label \"bug\""));
        let mut opened = labeled_payload("kiln");
        opened["action"] = json!("opened");
        assert!(map_github(&hook.rules, "issues", &opened).unwrap_err().contains("\"opened\""));
        assert!(map_github(&hook.rules, "push", &json!({})).unwrap_err().contains("no rule for \"push\""));
        assert!(map_github(&hook.rules, "pull_request", &json!({})).unwrap_err().contains("no rule"));

        let comment = |body: &str, assoc: &str| {
            json!({"action": "created", "comment": {"body": body, "author_association": assoc},
                   "issue": {"number": 7, "title": "Flaky test", "body": ""},
                   "repository": {"name": "shop", "owner": {"login": "acme"}}})
        };
        let m = map_github(&hook.rules, "issue_comment", &comment("/kiln fix the failing test", "MEMBER")).unwrap();
        assert!(m.job["prompt"].as_str().unwrap().starts_with("fix the failing test\n\nOn GitHub issue acme/shop#7"));
        assert_eq!(m.job["jobType"], "task");
        let m = map_github(&hook.rules, "issue_comment", &comment("/kiln", "OWNER")).unwrap();
        assert!(m.job["prompt"].as_str().unwrap().starts_with("Flaky test"));
        assert!(map_github(&hook.rules, "issue_comment", &comment("/kilnx go", "OWNER")).is_err());
        assert!(map_github(&hook.rules, "issue_comment", &comment("please /kiln", "OWNER")).is_err());
        let stranger = map_github(&hook.rules, "issue_comment", &comment("/kiln rm -rf", "NONE")).unwrap_err();
        assert!(stranger.contains("NONE"), "{stranger}");
        let mut pr_comment = comment("/kiln", "OWNER");
        pr_comment["issue"]["pull_request"] = json!({"url": "x"});
        assert_eq!(map_github(&hook.rules, "issue_comment", &pr_comment).unwrap().job["branchName"], "kiln/pr-7");

        let mut bad_repo = labeled_payload("kiln");
        bad_repo["repository"]["name"] = json!("../etc");
        assert!(map_github(&hook.rules, "issues", &bad_repo).is_err());
    }

    #[test]
    fn templates_substitute_paths_and_nothing_else() {
        let t = json!({"prompt": "{{ body.title }}: {{body.text}} ({{ body.n }})", "githubOrg": "acme",
                       "maxIterations": "{{ body.n }}", "feedbackCommands": ["{{ body.items.1 }}"], "x": 5});
        check_template(&t).unwrap();
        let body = json!({"title": "T", "text": "{{ body.title }} $(rm -rf /)", "n": 3, "items": ["a", "b"]});
        let out = render_template(&t, &body).unwrap();
        assert_eq!(out["prompt"], "T: {{ body.title }} $(rm -rf /) (3)", "values are not expanded again");
        assert_eq!(out["maxIterations"], 3);
        assert_eq!(out["feedbackCommands"], json!(["b"]));
        assert_eq!(out["x"], 5);
        assert!(render_template(&t, &json!({"title": "T", "n": 1, "items": [1, 2]})).unwrap_err().contains("body.text"));
        let obj = render_template(&json!({"p": "a {{ body.o }}"}), &json!({"o": {"k": 1}})).unwrap_err();
        assert!(obj.contains("not a string"), "{obj}");
    }

    #[test]
    fn issue_refs_come_from_params() {
        let p = json!({"ralph": null, "sourceIssue": {"org": "acme", "repo": "shop", "number": 3}}).to_string();
        assert_eq!(IssueRef::from_params(&p), Some(IssueRef { org: "acme".into(), repo: "shop".into(), number: 3 }));
        assert_eq!(IssueRef::from_params(r#"{"ralph":null}"#), None);
        assert_eq!(IssueRef::from_params("not json"), None);
    }

    #[test]
    fn branches_and_delivery_ids() {
        assert_eq!(unique_branch("kiln/issue-4", false, "abc"), "kiln/issue-4");
        assert_eq!(unique_branch("kiln/issue-4", true, "72d4-a1b2-C3d4-e5f6-aaaa"), "kiln/issue-4-72d4a1b2c3d4");
        assert!(valid_delivery_id("72d4a1b2-0000-11ee-8000-000000000000"));
        assert!(!valid_delivery_id(""));
        assert!(!valid_delivery_id("has space"));
        assert!(!valid_delivery_id(&"x".repeat(201)));
    }
}
