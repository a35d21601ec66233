//! Seed 002's 3D pipeline (`pipeline_3d`): `generating` (a text-to-3D task at the vendor, polled
//! with backoff until its model is ready, then downloaded) → `validating` (the GLB parsed: its
//! triangles within `max_faces`, its textures present and their images powers of two within
//! `max_texture_size`) → `uploading` (to the edge's artifact store, and to WordPress media when the
//! runner has a site) → `completed`. Each stage is a `progress` event with its `stage` and data
//! (prompt, format, started_at, and what the stage learned); the vendor's own progress is scaled
//! into 0–60, then 70, 85, 100. A failure anywhere ends the job failed with the reason (a model
//! that fails validation, with its report in the result). A cancel drops the job wherever it is
//! (while polling too: nothing more is asked of the vendor). A WordPress upload that fails after the
//! model is in R2 fails the job with the reason and the R2 asset's URL in its result.

use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use kiln_schemas::dashboard::ValidationReport;
use kiln_schemas::runner::{DashboardParams, Outcome, RunnerEvent};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::run::{failed, JobRun};
use super::JobControl;
use crate::three_d::vendor::{TaskState, Vendor};
use crate::three_d::{glb, wordpress};

/// Consecutive failed polls given up on.
const POLL_ERRORS: u32 = 3;
/// The artifact's name at the edge.
pub const MODEL_NAME: &str = "model.glb";
pub const GLB_TYPE: &str = "model/gltf-binary";

struct Run<'a> {
    job: &'a JobRun,
    base: Map<String, Value>,
    percent: f64,
}

impl Run<'_> {
    async fn progress(&mut self, percent: f64, stage: &str, extra: Value) {
        self.percent = percent;
        let mut data = self.base.clone();
        if let Value::Object(m) = extra {
            data.extend(m);
        }
        self.job
            .sink
            .send(RunnerEvent::Progress {
                percent,
                stage: Some(stage.into()),
                data: Value::Object(data),
            })
            .await;
    }

    /// Ends the job failed at `stage`, telling the stage first; the event and the result both
    /// carry the reason and what was done before it (the report, the R2 asset's URL).
    async fn fail(
        &mut self,
        stage: &str,
        reason: String,
        mut result: Map<String, Value>,
    ) -> RunnerEvent {
        let percent = self.percent;
        result.insert("failed_stage".into(), json!(stage));
        result.insert("error".into(), json!(reason));
        self.progress(percent, "failed", Value::Object(result.clone()))
            .await;
        result.insert("stage".into(), json!(stage));
        match failed(format!("3D pipeline failed while {stage}: {reason}")) {
            RunnerEvent::Finished {
                outcome,
                message,
                pr_url,
                completion_reason,
                total_iterations,
                error_message,
                ..
            } => RunnerEvent::Finished {
                outcome,
                message,
                pr_url,
                completion_reason,
                total_iterations,
                error_message,
                result: Some(Value::Object(result)),
            },
            other => other,
        }
    }
}

fn report_value(r: &ValidationReport) -> Value {
    serde_json::to_value(r).expect("a report serializes")
}

/// Runs a 3D pipeline; answers its `finished` event.
pub(super) async fn run(
    job: &mut JobRun,
    _controls: mpsc::UnboundedReceiver<JobControl>,
) -> RunnerEvent {
    let Some(DashboardParams::Pipeline3d {
        format,
        max_faces,
        max_texture_size,
    }) = job.assignment.dashboard.clone()
    else {
        return failed("The assignment of this 3D pipeline carries no pipeline_3d parameters");
    };
    if format != "glb" {
        return failed(format!(
            "The 3D pipeline makes glb models; {format:?} is not one"
        ));
    }
    let cfg = job.services.three_d.clone();
    let Some(key) = cfg.vendor_key.clone() else {
        return failed(format!(
            "This runner has no text-to-3D vendor key ({} is not set)",
            cfg.vendor_key_env
        ));
    };
    let prompt = job.assignment.prompt.clone();
    let started_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut base = Map::new();
    base.insert("prompt".into(), json!(prompt));
    base.insert("format".into(), json!(format));
    base.insert("started_at".into(), json!(started_at));
    let mut r = Run {
        job,
        base,
        percent: 0.0,
    };
    let http = reqwest::Client::new();
    let vendor = Vendor::new(http.clone(), cfg.vendor_url.clone(), key);

    // generating
    let t = Instant::now();
    r.progress(0.0, "generating", json!({})).await;
    let task_id = match vendor.create(&prompt).await {
        Ok(id) => id,
        Err(e) => return r.fail("generating", e, Map::new()).await,
    };
    r.base.insert("vendor_task_id".into(), json!(task_id));
    let deadline = t + cfg.generate_timeout;
    let mut wait = cfg.poll;
    let mut errors = 0;
    let model_url = loop {
        let now = Instant::now();
        if now >= deadline {
            let secs = cfg.generate_timeout.as_secs();
            return r
                .fail(
                    "generating",
                    format!("the 3D vendor did not finish the model within {secs} s"),
                    Map::new(),
                )
                .await;
        }
        tokio::time::sleep(wait.min(deadline - now)).await;
        wait = (wait * 2).min(cfg.poll_max);
        match vendor.status(&task_id).await {
            Ok(TaskState::Running { progress, status }) => {
                errors = 0;
                let scaled = (progress * 0.6).round();
                if scaled != r.percent {
                    r.progress(
                        scaled,
                        "generating",
                        json!({"vendor_status": status, "vendor_progress": progress}),
                    )
                    .await;
                }
            }
            Ok(TaskState::Succeeded { model_url }) => break model_url,
            Ok(TaskState::Failed { reason }) => {
                return r.fail("generating", reason, Map::new()).await
            }
            Err(e) => {
                errors += 1;
                if errors >= POLL_ERRORS {
                    return r.fail("generating", e, Map::new()).await;
                }
                tracing::warn!(job_id = r.job.job_id(), error = %e, "polling the 3D vendor failed; trying again");
            }
        }
    };
    let model = match vendor.download(&model_url).await {
        Ok(b) => b,
        Err(e) => return r.fail("generating", e, Map::new()).await,
    };
    let generate_ms = t.elapsed().as_millis() as u64;
    r.progress(
        60.0,
        "generating",
        json!({"bytes": model.len(), "generate_ms": generate_ms}),
    )
    .await;

    // validating
    r.progress(70.0, "validating", json!({})).await;
    let t = Instant::now();
    let bytes = std::sync::Arc::new(model);
    let b = bytes.clone();
    let report =
        match tokio::task::spawn_blocking(move || glb::validate(&b, max_faces, max_texture_size))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return r
                    .fail("validating", format!("validation stopped: {e}"), Map::new())
                    .await
            }
        };
    let validate_ms = t.elapsed().as_millis() as u64;
    let mut result = Map::new();
    result.insert("report".into(), report_value(&report));
    if !report.valid {
        let why = report.problems.join("; ");
        return r
            .fail(
                "validating",
                format!("the model is not valid: {why}"),
                result,
            )
            .await;
    }

    // uploading
    r.progress(
        85.0,
        "uploading",
        json!({"report": report_value(&report), "validate_ms": validate_ms}),
    )
    .await;
    let bytes = std::sync::Arc::try_unwrap(bytes).unwrap_or_else(|a| (*a).clone());
    let (job_id, lease_id) = (
        r.job.job_id().to_string(),
        r.job.assignment.lease_id.clone(),
    );
    let asset_url = match r
        .job
        .services
        .edge
        .put_artifact(&job_id, &lease_id, MODEL_NAME, bytes.clone())
        .await
    {
        Ok(url) => url,
        Err(e) => {
            return r
                .fail(
                    "uploading",
                    format!("the model could not be stored: {e}"),
                    result,
                )
                .await
        }
    };
    result.insert("asset_url".into(), json!(asset_url));
    if let Some(wp) = &cfg.wordpress {
        let name = format!("kiln-3d-{job_id}.glb");
        match wordpress::upload(&http, wp, &name, GLB_TYPE, bytes).await {
            Ok(m) => {
                result.insert("wordpress_media_id".into(), json!(m.id));
                if let Some(u) = m.url {
                    result.insert("wordpress_url".into(), json!(u));
                }
            }
            Err(e) => return r.fail("uploading", e, result).await,
        }
    }

    r.progress(100.0, "completed", Value::Object(result.clone()))
        .await;
    RunnerEvent::Finished {
        outcome: Outcome::Completed,
        message: format!(
            "3D model ready: {} triangles, {} textures",
            report.triangles, report.textures
        ),
        pr_url: None,
        completion_reason: None,
        total_iterations: None,
        error_message: None,
        result: Some(Value::Object(result)),
    }
}
