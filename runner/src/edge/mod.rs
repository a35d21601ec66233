//! Talking to the edge: registration and event batches over HTTP (this module), and the runner's
//! outbound WebSocket session (`connection`).

pub mod connection;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use kiln_schemas::app::WorkspaceSnapshot;
use kiln_schemas::landing::{PreviewBundle, Published, MAX_BUNDLE_BYTES, MAX_PREVIEW_BYTES};
use kiln_schemas::runner::{
    BatchAck, EventBatch, RegisterRunnerRequest, RegisterRunnerResponse, MAX_ARTIFACT_BYTES,
    MAX_SNAPSHOT_BYTES,
};
use url::Url;

use crate::backoff::Backoff;
use crate::state::{SavedRegistration, StateDir};

/// Attempts of a snapshot, bundle or preview upload or download before its transient errors are given up on.
const SNAPSHOT_ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

impl EdgeError {
    /// Whether trying the same request again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            EdgeError::Http { .. } => true,
            EdgeError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
        }
    }

    /// Whether the edge refused the credential (401).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, EdgeError::Status { status: 401, .. })
    }
}

/// `base` plus an absolute path, keeping any path prefix the base has.
pub fn endpoint(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    url.set_path(&format!("{}{}", base.path().trim_end_matches('/'), path));
    url.set_query(None);
    url
}

/// The WebSocket URL of `/runner/v1/connect`: http→ws, https→wss.
pub fn connect_url(base: &Url) -> Url {
    let mut url = endpoint(base, "/runner/v1/connect");
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme)
        .expect("ws and wss are valid for an http(s) URL");
    url
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(concat!("kiln-runner/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client with rustls and default settings builds")
}

async fn read_json<T: serde::de::DeserializeOwned>(
    url: &Url,
    res: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, EdgeError> {
    let http = |source| EdgeError::Http {
        url: url.to_string(),
        source,
    };
    let res = res.map_err(http)?;
    let status = res.status();
    if !status.is_success() {
        let mut body = res.text().await.unwrap_or_default();
        body.truncate(500);
        return Err(EdgeError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            body,
        });
    }
    res.json::<T>().await.map_err(http)
}

/// Exchanges an operator's registration token for a runner token.
pub async fn register(
    http: &reqwest::Client,
    base: &Url,
    registration_token: &str,
    name: &str,
) -> Result<RegisterRunnerResponse, EdgeError> {
    let url = endpoint(base, "/runner/v1/register");
    let res = http
        .post(url.clone())
        .bearer_auth(registration_token)
        .json(&RegisterRunnerRequest {
            name: name.to_string(),
        })
        .send()
        .await;
    read_json(&url, res).await
}

/// Registers with the operator's registration token and saves what the edge issued in the
/// state directory (when this runner holds it): at start, and again when the edge refuses the
/// token it has.
pub struct Registrar {
    pub http: reqwest::Client,
    pub base: Url,
    pub registration_token: String,
    pub name: String,
    pub state: Option<Arc<StateDir>>,
}

impl Registrar {
    pub async fn register(&self) -> Result<RegisterRunnerResponse, EdgeError> {
        let r = register(&self.http, &self.base, &self.registration_token, &self.name).await?;
        match &self.state {
            Some(state) => {
                let saved = SavedRegistration {
                    runner_id: r.runner_id.clone(),
                    token: r.token.clone(),
                    edge_url: self.base.to_string(),
                    name: self.name.clone(),
                    registered_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                };
                match state.save(&saved) {
                    Ok(()) => {
                        tracing::info!(runner_id = %r.runner_id, path = %state.file().display(), "registered with the edge; the runner token is saved for later starts")
                    }
                    Err(e) => {
                        tracing::warn!(runner_id = %r.runner_id, error = %e, "registered with the edge but could not save the runner token; the next start registers again")
                    }
                }
            }
            None => {
                tracing::info!(runner_id = %r.runner_id, name = %self.name, "registered with the edge (not saved: the state directory is another runner's)")
            }
        }
        Ok(r)
    }
}

/// The runner's authenticated HTTP client for the edge. Clones share the token, so a token
/// renewed after a registration reaches every user at once.
#[derive(Clone)]
pub struct EdgeClient {
    http: reqwest::Client,
    base: Url,
    token: Arc<RwLock<String>>,
}

impl EdgeClient {
    pub fn new(http: reqwest::Client, base: Url, token: String) -> Self {
        EdgeClient {
            http,
            base,
            token: Arc::new(RwLock::new(token)),
        }
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn token(&self) -> String {
        self.token.read().unwrap().clone()
    }

    /// Replaces the token (after a new registration).
    pub fn set_token(&self, token: String) {
        *self.token.write().unwrap() = token;
    }

    /// `POST /runner/v1/jobs/{job_id}/events`.
    pub async fn post_events(
        &self,
        job_id: &str,
        batch: &EventBatch,
    ) -> Result<BatchAck, EdgeError> {
        let mut url = endpoint(&self.base, "/runner/v1/jobs");
        url.path_segments_mut()
            .expect("http URLs have paths")
            .push(job_id)
            .push("events");
        let res = self
            .http
            .post(url.clone())
            .bearer_auth(self.token())
            .json(batch)
            .send()
            .await;
        read_json(&url, res).await
    }

    fn snapshot_url(&self, job_id: &str, lease_id: &str) -> Url {
        self.job_url(job_id, "snapshot", lease_id)
    }

    /// `/runner/v1/jobs/{job_id}/{what}?lease_id=`.
    fn job_url(&self, job_id: &str, what: &str, lease_id: &str) -> Url {
        let mut url = endpoint(&self.base, "/runner/v1/jobs");
        url.path_segments_mut()
            .expect("http URLs have paths")
            .push(job_id)
            .push(what);
        url.query_pairs_mut().append_pair("lease_id", lease_id);
        url
    }

    /// `GET /runner/v1/jobs/{job_id}/bundle?lease_id=`: the landing session's workspace as a git
    /// bundle, `None` when the session has none yet (404). Transient failures are retried.
    pub async fn get_bundle(
        &self,
        job_id: &str,
        lease_id: &str,
    ) -> Result<Option<Vec<u8>>, EdgeError> {
        let url = self.job_url(job_id, "bundle", lease_id);
        retry_transient(|| async {
            let res = self
                .http
                .get(url.clone())
                .bearer_auth(self.token())
                .timeout(Duration::from_secs(120))
                .send()
                .await;
            let res = match check_status(&url, res).await {
                Ok(res) => res,
                Err(EdgeError::Status { status: 404, .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let http = |source| EdgeError::Http {
                url: url.to_string(),
                source,
            };
            let bytes = res.bytes().await.map_err(http)?;
            if bytes.len() > MAX_BUNDLE_BYTES {
                return Err(too_big(&url, "bundle", bytes.len(), MAX_BUNDLE_BYTES));
            }
            Ok(Some(bytes.to_vec()))
        })
        .await
    }

    /// PUTs `body` to `url`, retrying transient failures; answers the response (its status checked).
    async fn put_retried(
        &self,
        url: &Url,
        content_type: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<reqwest::Response, EdgeError> {
        retry_transient(|| async {
            let res = self
                .http
                .put(url.clone())
                .bearer_auth(self.token())
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .timeout(timeout)
                .body(body.clone())
                .send()
                .await;
            check_status(url, res).await
        })
        .await
    }

    /// `PUT /runner/v1/jobs/{job_id}/bundle?lease_id=`: keeps the session's workspace (a git
    /// bundle of at most `MAX_BUNDLE_BYTES`) for its next job. Transient failures are retried.
    pub async fn put_bundle(
        &self,
        job_id: &str,
        lease_id: &str,
        bundle: Vec<u8>,
    ) -> Result<(), EdgeError> {
        let url = self.job_url(job_id, "bundle", lease_id);
        if bundle.len() > MAX_BUNDLE_BYTES {
            return Err(too_big(&url, "bundle", bundle.len(), MAX_BUNDLE_BYTES));
        }
        self.put_retried(&url, "application/octet-stream", bundle, Duration::from_secs(120))
            .await
            .map(|_| ())
    }

    /// `PUT /runner/v1/jobs/{job_id}/artifact?lease_id=&name=`: keeps a file the job produced
    /// (at most `MAX_ARTIFACT_BYTES`) in R2; answers where the edge serves it to the job's owner.
    /// Transient failures are retried.
    pub async fn put_artifact(
        &self,
        job_id: &str,
        lease_id: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<String, EdgeError> {
        let mut url = self.job_url(job_id, "artifact", lease_id);
        url.query_pairs_mut().append_pair("name", name);
        if bytes.len() > MAX_ARTIFACT_BYTES {
            return Err(too_big(&url, "artifact", bytes.len(), MAX_ARTIFACT_BYTES));
        }
        #[derive(serde::Deserialize)]
        struct Stored {
            url: String,
        }
        let res = self
            .put_retried(&url, "application/octet-stream", bytes, Duration::from_secs(300))
            .await?;
        Ok(read_json::<Stored>(&url, Ok(res)).await?.url)
    }

    /// `PUT /runner/v1/jobs/{job_id}/preview?lease_id=`: publishes the landing page's files,
    /// replacing its preview; answers where it is served. Files of more than `MAX_PREVIEW_BYTES`
    /// in all (decoded) are refused here. Transient failures are retried.
    pub async fn put_preview(
        &self,
        job_id: &str,
        lease_id: &str,
        preview: &PreviewBundle,
    ) -> Result<Published, EdgeError> {
        let url = self.job_url(job_id, "preview", lease_id);
        // The files' own bytes: base64 content decodes to three quarters of its length.
        let bytes: usize = preview
            .files
            .iter()
            .map(|f| {
                if f.base64 {
                    f.content.len() / 4 * 3
                } else {
                    f.content.len()
                }
            })
            .sum();
        if bytes > MAX_PREVIEW_BYTES {
            return Err(too_big(&url, "preview", bytes, MAX_PREVIEW_BYTES));
        }
        let body = serde_json::to_vec(preview).expect("a preview serializes");
        let res = self
            .put_retried(&url, "application/json", body, Duration::from_secs(120))
            .await?;
        read_json::<Published>(&url, Ok(res)).await
    }

    /// `PUT /runner/v1/jobs/{job_id}/snapshot?lease_id=`: keeps the workspace's text files in
    /// R2. Transient failures are retried with backoff (a few times: a later snapshot or the
    /// run's last one replaces this one anyway).
    pub async fn put_snapshot(
        &self,
        job_id: &str,
        lease_id: &str,
        snapshot: &WorkspaceSnapshot,
    ) -> Result<(), EdgeError> {
        let url = self.snapshot_url(job_id, lease_id);
        let body = serde_json::to_vec(snapshot).expect("a snapshot serializes");
        if body.len() > MAX_SNAPSHOT_BYTES {
            return Err(EdgeError::Status {
                url: url.to_string(),
                status: 413,
                body: format!(
                    "the snapshot is {} bytes; at most {MAX_SNAPSHOT_BYTES} are sent",
                    body.len()
                ),
            });
        }
        self.put_retried(&url, "application/json", body, Duration::from_secs(120))
            .await
            .map(|_| ())
    }

    /// `GET /runner/v1/jobs/{job_id}/snapshot?lease_id=`: the snapshot an earlier run of the job
    /// left, `None` when there is none (404).
    pub async fn get_snapshot(
        &self,
        job_id: &str,
        lease_id: &str,
    ) -> Result<Option<WorkspaceSnapshot>, EdgeError> {
        let url = self.snapshot_url(job_id, lease_id);
        retry_transient(|| async {
            let res = self
                .http
                .get(url.clone())
                .bearer_auth(self.token())
                .timeout(Duration::from_secs(120))
                .send()
                .await;
            match check_status(&url, res).await {
                Ok(res) => res
                    .json::<WorkspaceSnapshot>()
                    .await
                    .map(Some)
                    .map_err(|source| EdgeError::Http {
                        url: url.to_string(),
                        source,
                    }),
                Err(EdgeError::Status { status: 404, .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }
}

/// A body over its limit, refused before it is sent (or kept).
fn too_big(url: &Url, what: &str, len: usize, max: usize) -> EdgeError {
    EdgeError::Status {
        url: url.to_string(),
        status: 413,
        body: format!("the {what} is {len} bytes; at most {max} are allowed"),
    }
}

/// The response when its status is a success, else [`EdgeError::Status`] with its body's start.
async fn check_status(
    url: &Url,
    res: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, EdgeError> {
    let res = res.map_err(|source| EdgeError::Http {
        url: url.to_string(),
        source,
    })?;
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    let mut body = res.text().await.unwrap_or_default();
    body.truncate(500);
    Err(EdgeError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        body,
    })
}

/// Calls `attempt` until it succeeds, fails for good, or [`SNAPSHOT_ATTEMPTS`] transient
/// failures have passed.
async fn retry_transient<T, F, Fut>(mut attempt: F) -> Result<T, EdgeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EdgeError>>,
{
    let mut backoff = Backoff::default();
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(e) if e.is_transient() && tries < SNAPSHOT_ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "a snapshot, bundle or preview request failed; retrying");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_prefixes_and_switch_schemes() {
        let base = Url::parse("http://127.0.0.1:8787").unwrap();
        assert_eq!(
            endpoint(&base, "/runner/v1/register").as_str(),
            "http://127.0.0.1:8787/runner/v1/register"
        );
        assert_eq!(
            connect_url(&base).as_str(),
            "ws://127.0.0.1:8787/runner/v1/connect"
        );
        let base = Url::parse("https://kiln.example.com/edge/?x=1").unwrap();
        assert_eq!(
            connect_url(&base).as_str(),
            "wss://kiln.example.com/edge/runner/v1/connect"
        );
    }

    #[tokio::test]
    async fn bundles_and_previews_over_their_limits_are_refused_before_they_are_sent() {
        // Nothing listens on the discard port: a request sent would fail as unreachable.
        let edge = EdgeClient::new(
            http_client(),
            Url::parse("http://127.0.0.1:9").unwrap(),
            "t".into(),
        );
        let e = edge
            .put_bundle("j", "l", vec![0; MAX_BUNDLE_BYTES + 1])
            .await
            .unwrap_err();
        assert!(
            matches!(e, EdgeError::Status { status: 413, .. }) && !e.is_transient(),
            "{e}"
        );
        let file = |content: String, base64| kiln_schemas::landing::PreviewFile {
            path: "a".into(),
            content,
            base64,
        };
        let over = PreviewBundle {
            files: vec![
                file("x".repeat(MAX_PREVIEW_BYTES / 2 + 1), false),
                file("x".repeat(MAX_PREVIEW_BYTES / 2), false),
            ],
        };
        let e = edge.put_preview("j", "l", &over).await.unwrap_err();
        assert!(matches!(e, EdgeError::Status { status: 413, .. }), "{e}");
        // base64 counts what it decodes to: 4/3 of the limit in base64 is the limit.
        let over = PreviewBundle {
            files: vec![file("A".repeat((MAX_PREVIEW_BYTES / 3 + 1) * 4), true)],
        };
        assert!(matches!(
            edge.put_preview("j", "l", &over).await.unwrap_err(),
            EdgeError::Status { status: 413, .. }
        ));
    }

    #[test]
    fn transient_errors() {
        let status = |s| EdgeError::Status {
            url: "u".into(),
            status: s,
            body: String::new(),
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(401).is_transient());
        assert!(!status(404).is_transient());
    }
}
