//! Opening pull requests through the GitHub REST API (`POST /repos/{org}/{repo}/pulls`), and
//! commenting on the issue a webhook's job came from (`POST /repos/{org}/{repo}/issues/{n}/comments`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::workspace::RepoRef;

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("GitHub API request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("GitHub API answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("GitHub API answer has no html_url")]
    NoUrl,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewPullRequest {
    pub title: String,
    pub head: String,
    pub base: String,
    pub body: String,
}

#[derive(Debug, Deserialize)]
struct PullRequest {
    html_url: Option<String>,
}

#[derive(Clone)]
pub struct GithubClient {
    http: reqwest::Client,
    api_url: String,
    token: Option<String>,
}

impl GithubClient {
    pub fn new(http: reqwest::Client, api_url: &str, token: Option<String>) -> Self {
        GithubClient {
            http,
            api_url: api_url.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// Whether pull requests can be opened: without a token the runner pushes branches only.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.api_url, path))
            .header("Accept", "application/vnd.github+json")
            .header("User-Agent", "kiln-runner")
            .header("X-GitHub-Api-Version", "2022-11-28");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    /// Opens the pull request and returns its `html_url`. When one is already open for the branch
    /// (a retried job), that one's URL is returned.
    pub async fn open_pull_request(
        &self,
        repo: &RepoRef,
        pr: &NewPullRequest,
    ) -> Result<String, GithubError> {
        let path = format!("/repos/{}/{}/pulls", repo.org, repo.repo);
        let res = self
            .request(reqwest::Method::POST, &path)
            .json(pr)
            .send()
            .await?;
        let status = res.status();
        if status.is_success() {
            return res
                .json::<PullRequest>()
                .await?
                .html_url
                .ok_or(GithubError::NoUrl);
        }
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let message = error_message(&body);
        if status.as_u16() == 422 && message.contains("already exists") {
            if let Some(url) = self.existing(repo, &pr.head).await? {
                return Ok(url);
            }
        }
        Err(GithubError::Status {
            status: status.as_u16(),
            message,
        })
    }

    /// Comments on an issue (or a pull request's conversation) and returns the comment's
    /// `html_url` (`POST /repos/{org}/{repo}/issues/{number}/comments`).
    pub async fn comment_on_issue(
        &self,
        repo: &RepoRef,
        number: u64,
        body: &str,
    ) -> Result<String, GithubError> {
        let path = format!("/repos/{}/{}/issues/{number}/comments", repo.org, repo.repo);
        let res = self
            .request(reqwest::Method::POST, &path)
            .json(&serde_json::json!({ "body": body }))
            .send()
            .await?;
        let status = res.status();
        if status.is_success() {
            return res
                .json::<PullRequest>()
                .await?
                .html_url
                .ok_or(GithubError::NoUrl);
        }
        let body: Value = res.json().await.unwrap_or(Value::Null);
        Err(GithubError::Status {
            status: status.as_u16(),
            message: error_message(&body),
        })
    }

    async fn existing(&self, repo: &RepoRef, branch: &str) -> Result<Option<String>, GithubError> {
        let path = format!("/repos/{}/{}/pulls", repo.org, repo.repo);
        let head = format!("{}:{}", repo.org, branch);
        let res = self
            .request(reqwest::Method::GET, &path)
            .query(&[("head", head.as_str()), ("state", "open")])
            .send()
            .await?;
        if !res.status().is_success() {
            return Ok(None);
        }
        let prs: Vec<PullRequest> = res.json().await?;
        Ok(prs.into_iter().find_map(|p| p.html_url))
    }
}

/// GitHub's `message` plus the `errors[].message` details.
fn error_message(body: &Value) -> String {
    let mut parts: Vec<String> = body
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .into_iter()
        .collect();
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        parts.extend(
            errors
                .iter()
                .filter_map(|e| e.get("message").and_then(Value::as_str))
                .map(str::to_string),
        );
    }
    if parts.is_empty() {
        "no error message".into()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_messages_include_details() {
        let body = json!({"message": "Validation Failed", "errors": [{"message": "A pull request already exists for o:b."}]});
        assert_eq!(
            error_message(&body),
            "Validation Failed: A pull request already exists for o:b."
        );
        assert_eq!(error_message(&Value::Null), "no error message");
    }
}
