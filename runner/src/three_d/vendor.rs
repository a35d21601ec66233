//! The text-to-3D vendor, Tripo3D's task model: `POST /v2/openapi/task` creates a task,
//! `GET /v2/openapi/task/<id>` says its status, progress and, once it succeeded, the model's URL.

use std::time::Duration;

use serde_json::{json, Value};

/// Largest model downloaded (the artifact endpoint's limit).
pub const MAX_MODEL_BYTES: usize = kiln_schemas::runner::MAX_ARTIFACT_BYTES;

/// A task's state as the vendor reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskState {
    /// `queued` or `running`, with the vendor's progress (0–100).
    Running { progress: f64, status: String },
    /// `success`, with the model's URL.
    Succeeded { model_url: String },
    /// `failed`, `cancelled`, `banned`, `expired`, `unknown`: the vendor's word.
    Failed { reason: String },
}

#[derive(Clone)]
pub struct Vendor {
    http: reqwest::Client,
    base: url::Url,
    key: String,
}

fn endpoint(base: &url::Url, path: &str) -> String {
    format!("{}{}", base.as_str().trim_end_matches('/'), path)
}

/// The vendor's own message in an error answer, shortened.
fn vendor_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let m = v
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(200).collect());
    m.trim().to_string()
}

impl Vendor {
    pub fn new(http: reqwest::Client, base: url::Url, key: String) -> Vendor {
        Vendor { http, base, key }
    }

    async fn call(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value, String> {
        let res = req
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "the 3D vendor could not be reached ({what}): {}",
                    e.without_url()
                )
            })?;
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "the 3D vendor answered {} ({what}): {}",
                status.as_u16(),
                vendor_message(&body)
            ));
        }
        let v: Value = serde_json::from_str(&body)
            .map_err(|_| format!("the 3D vendor's answer ({what}) is not JSON"))?;
        if v.get("code").and_then(Value::as_i64).unwrap_or(0) != 0 {
            return Err(format!(
                "the 3D vendor refused ({what}): {}",
                vendor_message(&body)
            ));
        }
        Ok(v.get("data").cloned().unwrap_or(Value::Null))
    }

    /// Creates a text-to-model task; answers its id.
    pub async fn create(&self, prompt: &str) -> Result<String, String> {
        let req = self
            .http
            .post(endpoint(&self.base, "/v2/openapi/task"))
            .json(&json!({"type": "text_to_model", "prompt": prompt}));
        let data = self.call(req, "creating the task").await?;
        data.get("task_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| "the 3D vendor's answer has no task_id".to_string())
    }

    pub async fn status(&self, task_id: &str) -> Result<TaskState, String> {
        let mut url = url::Url::parse(&endpoint(&self.base, "/v2/openapi/task"))
            .map_err(|e| e.to_string())?;
        url.path_segments_mut()
            .map_err(|_| "bad vendor URL")?
            .push(task_id);
        let data = self.call(self.http.get(url), "polling the task").await?;
        let status = data
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        let progress = data
            .get("progress")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
            .clamp(0.0, 100.0);
        Ok(match status.as_str() {
            "queued" | "running" => TaskState::Running { progress, status },
            "success" => {
                let output = data.get("output").cloned().unwrap_or(Value::Null);
                let url = ["model", "pbr_model", "base_model"]
                    .iter()
                    .find_map(|k| output.get(*k).and_then(Value::as_str))
                    .ok_or("the 3D vendor's finished task has no model URL")?;
                TaskState::Succeeded {
                    model_url: url.to_string(),
                }
            }
            other => TaskState::Failed {
                reason: match data
                    .get("error")
                    .or(data.get("message"))
                    .and_then(Value::as_str)
                {
                    Some(m) => format!("the 3D vendor's task ended {other}: {m}"),
                    None => format!("the 3D vendor's task ended {other}"),
                },
            },
        })
    }

    /// Downloads the model (at most [`MAX_MODEL_BYTES`]).
    pub async fn download(&self, model_url: &str) -> Result<Vec<u8>, String> {
        let url: url::Url = model_url
            .parse()
            .map_err(|_| "the 3D vendor's model URL is not a URL".to_string())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("the 3D vendor's model URL is not http(s)".into());
        }
        let mut res = self
            .http
            .get(url)
            .timeout(Duration::from_secs(300))
            .send()
            .await
            .map_err(|e| format!("the model could not be downloaded: {}", e.without_url()))?;
        if !res.status().is_success() {
            return Err(format!(
                "the model's download answered {}",
                res.status().as_u16()
            ));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|e| format!("the model's download broke off: {}", e.without_url()))?
        {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_MODEL_BYTES {
                return Err(format!("the model is over {MAX_MODEL_BYTES} bytes"));
            }
        }
        Ok(bytes)
    }
}
