//! The HTTP side of `kiln`: JSON requests with the resolved credential, the saved access token
//! refreshed through `/api/auth/refresh/` when it has expired (or the server says so), and the
//! server's `{"error"}` envelope turned into an error message.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use kiln_schemas::auth::{RefreshRequest, TokenPair};
use kiln_schemas::ErrorBody;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::{needs_refresh, ConfigFile, HostEntry};

/// Refresh a saved access token this long before it expires.
const REFRESH_MARGIN_SECS: u64 = 30;

/// The credential a command acts with.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `KILN_TOKEN`: used as it is, never refreshed.
    Fixed(String),
    /// Tokens `kiln login` saved in the config file for this server.
    Saved { entry: HostEntry, path: PathBuf },
    /// No credential: only the public endpoints work.
    None,
}

/// An answer outside 2xx, with the server's `{"error"}` message when it sent one.
#[derive(Debug)]
pub struct ServerError {
    pub status: StatusCode,
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status.as_u16())
    }
}

impl std::error::Error for ServerError {}

/// Reads an `{"error": "..."}` body; anything else is described by its status and a short excerpt.
pub fn error_message(status: StatusCode, body: &str) -> String {
    if let Ok(ErrorBody { error }) = serde_json::from_str::<ErrorBody>(body) {
        return error;
    }
    let excerpt: String = body.trim().chars().take(200).collect();
    let reason = status.canonical_reason().unwrap_or("error");
    if excerpt.is_empty() {
        format!("the server answered {reason}")
    } else {
        format!("the server answered {reason}: {excerpt}")
    }
}

pub struct Client {
    base: String,
    http: reqwest::Client,
    auth: Auth,
}

impl Client {
    pub fn new(base: &str, auth: Auth) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("kiln-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { base: base.to_string(), http, auth })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The access token to send, refreshed first when the saved one has expired.
    pub async fn token(&mut self) -> anyhow::Result<String> {
        match &self.auth {
            Auth::Fixed(t) => Ok(t.clone()),
            Auth::None => bail!(
                "not logged in to {}: run `kiln login` (or set KILN_TOKEN)",
                self.base
            ),
            Auth::Saved { entry, .. } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                if needs_refresh(&entry.access, now, REFRESH_MARGIN_SECS) {
                    self.refresh().await?;
                }
                match &self.auth {
                    Auth::Saved { entry, .. } => Ok(entry.access.clone()),
                    _ => unreachable!("refresh keeps saved tokens saved"),
                }
            }
        }
    }

    /// Whether a 401 can be cured by refreshing (saved tokens only).
    pub fn can_refresh(&self) -> bool {
        matches!(self.auth, Auth::Saved { .. })
    }

    /// Trades the saved refresh token for a new pair and saves it.
    pub async fn refresh(&mut self) -> anyhow::Result<()> {
        let Auth::Saved { entry, path } = &mut self.auth else {
            bail!("only tokens saved by `kiln login` can be refreshed");
        };
        let url = format!("{}/api/auth/refresh/", self.base);
        let resp = self
            .http
            .post(&url)
            .json(&RefreshRequest { refresh: entry.refresh.clone() })
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST {
            bail!(
                "the saved login for {} has expired ({}): run `kiln login` again",
                self.base,
                error_message(status, &text)
            );
        }
        if !status.is_success() {
            return Err(ServerError { status, message: error_message(status, &text) }.into());
        }
        let pair: TokenPair = serde_json::from_str(&text).context("reading the refreshed tokens")?;
        entry.access = pair.access;
        entry.refresh = pair.refresh;
        // Saved at once: the old refresh token is spent.
        let mut file = ConfigFile::load(path)?;
        let host = file.hosts.entry(self.base.clone()).or_insert_with(|| entry.clone());
        host.access = entry.access.clone();
        host.refresh = entry.refresh.clone();
        file.save(path)?;
        Ok(())
    }

    /// `method path` with an optional JSON body and no credential; answers the JSON body.
    pub async fn public(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let (status, text) = self.send(method, path, None, body).await?;
        Self::decode(status, &text)
    }

    /// `method path` with the credential (refreshed and retried once on 401 when it is saved).
    pub async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let token = self.token().await?;
        let (mut status, mut text) = self.send(method.clone(), path, Some(&token), body).await?;
        if status == StatusCode::UNAUTHORIZED && self.can_refresh() {
            self.refresh().await?;
            let token = self.token().await?;
            (status, text) = self.send(method, path, Some(&token), body).await?;
        }
        Self::decode(status, &text)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            let why = if e.is_timeout() { "timed out".to_string() } else { root_cause(&e) };
            anyhow!("cannot reach {} ({method} {path}): {why}", self.base)
        })?;
        let status = resp.status();
        let text = resp.text().await.with_context(|| format!("reading the answer to {method} {path}"))?;
        Ok((status, text))
    }

    fn decode(status: StatusCode, text: &str) -> anyhow::Result<Value> {
        if !status.is_success() {
            return Err(ServerError { status, message: error_message(status, text) }.into());
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(text).with_context(|| format!("the server's answer is not JSON: {}", text.chars().take(200).collect::<String>()))
    }
}

/// The innermost cause of an error, which for connection failures is the useful part.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `/jobs/<id>` with the id percent-encoded as one path segment, plus `suffix` (e.g. `/cancel`).
pub fn job_path(id: &str, suffix: &str) -> String {
    let mut u = url::Url::parse("http://x/jobs/").expect("static URL");
    u.path_segments_mut().expect("a base URL").pop_if_empty().push(id);
    format!("{}{suffix}", u.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_show_the_envelope_message() {
        assert_eq!(error_message(StatusCode::NOT_FOUND, r#"{"error":"job not found"}"#), "job not found");
        assert_eq!(error_message(StatusCode::BAD_GATEWAY, ""), "the server answered Bad Gateway");
        assert_eq!(error_message(StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>"), "the server answered Internal Server Error: <html>oops</html>");
        let e = ServerError { status: StatusCode::NOT_FOUND, message: "job not found".into() };
        assert_eq!(e.to_string(), "job not found (HTTP 404)");
    }

    #[test]
    fn job_ids_are_one_path_segment() {
        assert_eq!(job_path("6f1c", ""), "/jobs/6f1c");
        assert_eq!(job_path("a/../b?x", "/cancel"), "/jobs/a%2F..%2Fb%3Fx/cancel");
    }
}
