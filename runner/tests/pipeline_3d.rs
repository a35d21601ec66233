//! The 3D pipeline (`pipeline_3d`, seed 002) through a whole runner: the fake edge assigns the
//! jobs and keeps their artifacts, the text-to-3D vendor and WordPress are `kiln_e2e::fake3d`'s
//! (Tripo3D's task model and the media endpoint), serving real GLB files the fakes generate (a
//! valid one with a 256×256 texture, one over the face limit, one with a 100×60 texture).
//! Checked: the stages and progress in order with their data, the validation report, the model
//! stored at the edge and in WordPress byte for byte under the right credentials; a model over the
//! face limit and one with a broken texture failing at validating with their reports; a failed
//! vendor task, a vendor error, a wrong key, no key, and a generation timeout failing at
//! generating with the reason; a cancel while polling stopping the polls.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{assert_started_and_finished, finished, RunnerOptions, TestRunner};
use kiln_e2e::fake3d::{FakeVendor, FakeWordPress};
use kiln_runner::three_d::{glb, ThreeDConfig, ThreeDFile};
use kiln_schemas::runner::{Assignment, DashboardParams, EdgeMessage, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;
use serde_json::Value;

const KEY: &str = "tripo-test-key";
const WP_USER: &str = "kiln";
const WP_PASSWORD: &str = "abcd EFGH ijkl MNOP";

fn settings(
    vendor: &FakeVendor,
    wp: Option<&FakeWordPress>,
    key: Option<&str>,
    timeout_secs: u64,
) -> ThreeDConfig {
    let mut vars = HashMap::new();
    if let Some(k) = key {
        vars.insert("TRIPO_API_KEY".to_string(), k.to_string());
    }
    vars.insert(
        "WORDPRESS_APP_PASSWORD".to_string(),
        WP_PASSWORD.to_string(),
    );
    ThreeDConfig::resolve(
        Some(ThreeDFile {
            vendor_url: Some(vendor.url()),
            poll_ms: Some(50),
            poll_max_ms: Some(200),
            generate_timeout_secs: Some(timeout_secs),
            wordpress_url: wp.map(|w| w.url()),
            wordpress_user: wp.map(|_| WP_USER.to_string()),
            ..Default::default()
        }),
        &vars,
    )
    .unwrap()
}

async fn runner(three_d: ThreeDConfig) -> TestRunner {
    TestRunner::start(RunnerOptions {
        three_d,
        ..Default::default()
    })
    .await
}

fn job(prompt: &str, max_faces: u32) -> Assignment {
    let mut a = common::assignment(JobType::Pipeline3d, prompt);
    a.github_org = String::new();
    a.github_repo = String::new();
    a.dashboard = Some(DashboardParams::Pipeline3d {
        format: "glb".into(),
        max_faces,
        max_texture_size: 2048,
    });
    a
}

/// `(percent, stage, data)` of each progress event.
fn progress(events: &[RunnerEvent]) -> Vec<(f64, String, Value)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Progress {
                percent,
                stage,
                data,
            } => Some((*percent, stage.clone().unwrap_or_default(), data.clone())),
            _ => None,
        })
        .collect()
}

fn result(events: &[RunnerEvent]) -> Value {
    match events.last() {
        Some(RunnerEvent::Finished { result, .. }) => result.clone().unwrap_or(Value::Null),
        other => panic!("not finished: {other:?}"),
    }
}

#[test]
fn the_validator_measures_the_three_models() {
    for (name, bytes) in kiln_e2e::fake3d::test_models() {
        let r = glb::validate(&bytes, 50_000, 2048);
        println!("{name}: {} bytes, {r:?}", bytes.len());
        match name {
            "valid" => {
                assert!(r.valid, "{r:?}");
                assert_eq!(
                    (r.triangles, r.meshes, r.textures, r.images.clone()),
                    (5_000, 1, 1, vec![[256, 256]])
                );
            }
            "over_faces" => {
                assert!(!r.valid);
                assert_eq!(r.triangles, 60_000);
                assert_eq!(r.problems, ["60000 triangles, over the limit of 50000"]);
            }
            "broken_texture" => {
                assert!(!r.valid);
                assert_eq!((r.triangles, r.images.clone()), (500, vec![[100, 60]]));
                assert_eq!(
                    r.problems,
                    ["image 0 is 100×60: sides must be powers of two"]
                );
            }
            _ => unreachable!(),
        }
    }
    // The same valid model against tighter limits.
    let valid = kiln_e2e::fake3d::test_models().remove(0).1;
    let r = glb::validate(&valid, 4_999, 128);
    assert_eq!(
        r.problems,
        [
            "5000 triangles, over the limit of 4999",
            "image 0 is 256×256, over the largest side of 128"
        ]
    );
    // A model without a texture, and a truncated one.
    let bare = kiln_e2e::fake3d::glb(kiln_e2e::fake3d::GlbSpec {
        indexed: 2,
        plain: 0,
        image: None,
    });
    assert_eq!(
        glb::validate(&bare, 10, 10).problems,
        ["the model has no textures"]
    );
    let r = glb::validate(&valid[..valid.len() / 2], 50_000, 2048);
    assert!(
        !r.valid && r.problems[0].contains("does not parse"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_model_is_generated_validated_and_uploaded_to_the_edge_and_wordpress() {
    let vendor = FakeVendor::start(KEY);
    let wp = FakeWordPress::start(WP_USER, WP_PASSWORD);
    let runner = runner(settings(&vendor, Some(&wp), Some(KEY), 30)).await;
    let a = job("a low-poly teapot", 50_000);
    let id = a.job_id.clone();
    let t = std::time::Instant::now();
    let events = runner.run(a, 60).await;
    println!("valid pipeline: {} ms", t.elapsed().as_millis());
    assert_started_and_finished(&events);
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");

    let p = progress(&events);
    let stages: Vec<(f64, &str)> = p.iter().map(|(n, s, _)| (*n, s.as_str())).collect();
    // 0 at the start, the vendor's 40 and 80 scaled by 0.6, 60 once downloaded.
    assert_eq!(
        stages,
        [
            (0.0, "generating"),
            (24.0, "generating"),
            (48.0, "generating"),
            (60.0, "generating"),
            (70.0, "validating"),
            (85.0, "uploading"),
            (100.0, "completed")
        ]
    );
    for (_, _, data) in &p {
        assert_eq!(data["prompt"], "a low-poly teapot");
        assert_eq!(data["format"], "glb");
        assert!(
            data["started_at"]
                .as_str()
                .is_some_and(|s| s.ends_with('Z')),
            "{data}"
        );
    }
    assert_eq!(p[1].2["vendor_status"], "queued");
    assert_eq!(p[1].2["vendor_task_id"], "task-1");
    let model = vendor.model("valid").unwrap();
    assert_eq!(p[3].2["bytes"], model.len());

    let r = result(&events);
    assert_eq!(r["report"]["valid"], true);
    assert_eq!(r["report"]["triangles"], 5000);
    assert_eq!(r["report"]["images"], serde_json::json!([[256, 256]]));
    assert_eq!(
        r["asset_url"],
        format!("{}/api/v1/3d/{id}/asset", runner.edge.url)
    );
    let (lease, stored) = runner
        .edge
        .artifact(&id, "model.glb")
        .expect("the model is stored at the edge");
    assert_eq!(
        lease,
        format!("lease-{}", &id[..8]),
        "under the job's lease"
    );
    assert!(
        stored == model,
        "the edge keeps the vendor's model byte for byte"
    );

    let uploads = wp.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].filename, format!("kiln-3d-{id}.glb"));
    assert_eq!(uploads[0].content_type, "model/gltf-binary");
    assert!(uploads[0].bytes == model);
    assert_eq!(r["wordpress_media_id"], uploads[0].id);
    assert_eq!(
        r["wordpress_url"],
        format!("{}/wp-content/uploads/kiln-3d-{id}.glb", wp.url())
    );
    assert_eq!(vendor.task("teapot").unwrap().polls, 3);
    assert_eq!((vendor.unauthorized(), wp.refused()), (0, 0));
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wordpress_failure_after_the_edge_has_the_model_fails_with_the_reason_and_the_asset() {
    let vendor = FakeVendor::start(KEY);
    let wp = FakeWordPress::start(WP_USER, WP_PASSWORD);
    wp.fail_next(1);
    let runner = runner(settings(&vendor, Some(&wp), Some(KEY), 30)).await;
    let a = job("a teacup", 50_000);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        message.contains("while uploading") && message.contains("WordPress answered 500"),
        "{message}"
    );
    let asset = format!("{}/api/v1/3d/{id}/asset", runner.edge.url);
    let r = result(&events);
    assert_eq!(
        (r["stage"].as_str(), r["asset_url"].as_str()),
        (Some("uploading"), Some(asset.as_str())),
        "{r:#}"
    );
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("WordPress answered 500")),
        "{r:#}"
    );
    assert_eq!(r["report"]["valid"], true);
    let last = progress(&events).pop().unwrap();
    assert_eq!(
        (
            last.1.as_str(),
            last.2["failed_stage"].as_str(),
            last.2["asset_url"].as_str()
        ),
        ("failed", Some("uploading"), Some(asset.as_str()))
    );
    assert!(last.2["error"]
        .as_str()
        .is_some_and(|e| e.contains("WordPress answered 500")));
    assert!(
        runner.edge.artifact(&id, "model.glb").is_some(),
        "the edge has the model"
    );
    assert!(wp.uploads().is_empty());
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_that_fail_validation_fail_the_job_with_their_report() {
    let vendor = FakeVendor::start(KEY);
    let wp = FakeWordPress::start(WP_USER, WP_PASSWORD);
    let runner = runner(settings(&vendor, Some(&wp), Some(KEY), 30)).await;

    let a = job("a dense castle [faces]", 50_000);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        message.contains("while validating")
            && message.contains("60000 triangles, over the limit of 50000"),
        "{message}"
    );
    let r = result(&events);
    assert_eq!(
        (r["stage"].as_str(), r["report"]["valid"].as_bool()),
        (Some("validating"), Some(false))
    );
    assert_eq!(r["report"]["triangles"], 60000);
    let last = progress(&events).pop().unwrap();
    assert_eq!(
        (last.0, last.1.as_str(), last.2["failed_stage"].as_str()),
        (70.0, "failed", Some("validating"))
    );
    assert!(
        runner.edge.artifact(&id, "model.glb").is_none(),
        "nothing is uploaded"
    );

    let a = job("a rusty sign [texture]", 50_000);
    let events = runner.run(a, 60).await;
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        message.contains("image 0 is 100×60: sides must be powers of two"),
        "{message}"
    );
    assert_eq!(
        result(&events)["report"]["images"],
        serde_json::json!([[100, 60]])
    );

    // The valid model is refused too when the job asks for fewer faces.
    let events = runner.run(job("a small teapot", 1_000), 60).await;
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        message.contains("5000 triangles, over the limit of 1000"),
        "{message}"
    );
    assert!(wp.uploads().is_empty());
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_failures_end_the_job_failed_while_generating_with_the_reason() {
    let vendor = FakeVendor::start(KEY);
    let runner = runner(settings(&vendor, None, Some(KEY), 1)).await;

    let events = runner.run(job("a chair [fail]", 50_000), 60).await;
    assert_started_and_finished(&events);
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        message,
        "3D pipeline failed while generating: the 3D vendor's task ended failed: the prompt could not be modelled"
    );
    assert_eq!(result(&events)["stage"], "generating");

    let events = runner.run(job("a lamp [vendor-error]", 50_000), 60).await;
    let (_, message, ..) = finished(&events);
    assert!(
        message.contains("the 3D vendor answered 500 (creating the task): server overloaded"),
        "{message}"
    );

    let t = std::time::Instant::now();
    let events = runner.run(job("a tower [slow]", 50_000), 60).await;
    let (_, message, ..) = finished(&events);
    assert!(
        message.contains("did not finish the model within 1 s"),
        "{message}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    runner.stop().await;

    // A wrong key: the vendor's 401 is the reason. No key: nothing is asked of the vendor.
    let runner = self::runner(settings(&vendor, None, Some("wrong"), 30)).await;
    let events = runner.run(job("a cup", 50_000), 60).await;
    let (_, message, ..) = finished(&events);
    assert!(
        message.contains("answered 401 (creating the task): Authentication failed"),
        "{message}"
    );
    assert!(
        !message.contains("wrong"),
        "the key is not echoed: {message}"
    );
    runner.stop().await;
    let before = vendor.tasks().len();
    let runner = self::runner(settings(&vendor, None, None, 30)).await;
    let events = runner.run(job("a bowl", 50_000), 60).await;
    let (_, message, ..) = finished(&events);
    assert_eq!(
        message,
        "This runner has no text-to-3D vendor key (TRIPO_API_KEY is not set)"
    );
    assert_eq!(vendor.tasks().len(), before);
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_generating_stops_the_polls() {
    let vendor = FakeVendor::start(KEY);
    let runner = runner(settings(&vendor, None, Some(KEY), 60)).await;
    let a = job("a galleon [slow]", 50_000);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    common::edge::wait_until("polls", Duration::from_secs(20), || {
        vendor.task("galleon").is_some_and(|t| t.polls >= 2)
    })
    .await;
    runner
        .edge
        .send(EdgeMessage::Cancel { job_id: id.clone() })
        .await;
    runner.wait_released(&id).await;
    let polls = vendor.task("galleon").unwrap().polls;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        vendor.task("galleon").unwrap().polls,
        polls,
        "no poll after the cancel"
    );
    assert!(
        !runner.has_finished(&id),
        "a cancelled job sends no finished"
    );
    let p = progress(&runner.edge.events(&id));
    assert!(p.iter().all(|(_, s, _)| s == "generating"), "{p:?}");
    assert_eq!(p.last().unwrap().0, 6.0, "the vendor's 10 scaled");
    runner.stop().await;
}
