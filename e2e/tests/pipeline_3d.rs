//! Seed 002's 3D pipeline end to end: `POST /api/v1/3d` on a real `wrangler dev`, the real runner
//! binary (process executor, `[three_d]` from its config file, the vendor key and WordPress
//! application password from its environment) against `kiln_e2e::fake3d`'s Tripo3D-style vendor
//! and WordPress, which serve real GLB files. Checked: a valid model's pipeline row through to
//! `completed` with its report, the model served back from R2 byte for byte to its owner only and
//! uploaded to WordPress; a model over the face limit failing at validation with its report and no
//! asset; the artifact endpoint's refusals (no runner token, a bad name, no lease, a lease the
//! runner does not hold).

use std::time::{Duration, Instant};

use kiln_e2e::fake3d::{FakeVendor, FakeWordPress};
use kiln_e2e::{Method, StatusCode, TestEdge, TestRunner};
use serde_json::{json, Value};

const KEY: &str = "tripo-e2e-key";
const WP_USER: &str = "kiln";
const WP_PASSWORD: &str = "wxyz 1234 ABCD 5678";

async fn wait_stage(api: &kiln_e2e::Api, token: &str, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, p) = api.get(&format!("/api/v1/3d/{id}"), token).await;
        assert_eq!(status, StatusCode::OK, "{p}");
        if p["stage"] == want {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline {id} did not become {want}: {p:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_to_3d_through_the_rest_face_the_runner_the_vendor_r2_and_wordpress() {
    let vendor = FakeVendor::start(KEY);
    let wp = FakeWordPress::start(WP_USER, WP_PASSWORD);
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runner.toml");
    std::fs::write(
        &config,
        format!(
            "[three_d]\nvendor_url = \"{}\"\npoll_ms = 100\npoll_max_ms = 300\ngenerate_timeout_secs = 60\nwordpress_url = \"{}\"\nwordpress_user = \"{WP_USER}\"\n",
            vendor.url(),
            wp.url()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let _runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_CONFIG", config.as_str()),
            ("TRIPO_API_KEY", KEY),
            ("WORDPRESS_APP_PASSWORD", WP_PASSWORD),
        ],
    )
    .await
    .expect("starting a runner");
    let api = edge.api();
    let token = api.new_user("three-d").await;
    let other = api.new_user("three-d-other").await;

    // A valid model.
    let t = Instant::now();
    let (status, created) = api
        .post("/api/v1/3d", &token, json!({"prompt": "a low-poly teapot"}))
        .await;
    assert!(status.is_success(), "{status} {created}");
    let id = created["id"].as_str().unwrap().to_string();
    let p = wait_stage(&api, &token, &id, "completed").await;
    println!(
        "valid pipeline through the edge: {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(p["progress"], 100.0, "{p:#}");
    assert_eq!(p["report"]["valid"], true, "{p:#}");
    assert_eq!(p["report"]["triangles"], 5000);
    assert_eq!(p["report"]["images"], json!([[256, 256]]));
    assert_eq!(p["asset_url"], format!("/api/v1/3d/{id}/asset"));
    let model = vendor.model("valid").unwrap();
    let uploads = wp.uploads();
    assert_eq!(uploads.len(), 1);
    assert!(uploads[0].bytes == model, "WordPress has the model");
    assert_eq!(p["wordpress_media_id"], uploads[0].id, "{p:#}");

    let http = reqwest::Client::new();
    let asset = format!("{}/api/v1/3d/{id}/asset", edge.url());
    let res = http.get(&asset).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "model/gltf-binary");
    let served = res.bytes().await.unwrap();
    assert!(
        served.as_ref() == model.as_slice(),
        "R2 serves the vendor's model byte for byte"
    );
    let res = http.get(&asset).bearer_auth(&other).send().await.unwrap();
    assert_eq!(res.status(), 404, "another owner's asset is not found");

    // A model over the face limit.
    let (status, created) = api
        .post(
            "/api/v1/3d",
            &token,
            json!({"prompt": "a dense castle [faces]"}),
        )
        .await;
    assert!(status.is_success(), "{status} {created}");
    let bad = created["id"].as_str().unwrap().to_string();
    let p = wait_stage(&api, &token, &bad, "failed").await;
    assert!(
        p["error"]
            .as_str()
            .unwrap_or("")
            .contains("60000 triangles, over the limit of 50000"),
        "{p:#}"
    );
    assert_eq!(p["report"]["valid"], false, "{p:#}");
    assert_eq!(p["report"]["triangles"], 60000);
    assert!(p["asset_url"].is_null(), "{p:#}");
    let (status, _) = api.get(&format!("/api/v1/3d/{bad}/asset"), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(wp.uploads().len(), 1, "nothing more uploaded");

    // WordPress failing after the model is in R2: failed with the reason, the asset kept.
    wp.fail_next(1);
    let (status, created) = api
        .post("/api/v1/3d", &token, json!({"prompt": "a teacup"}))
        .await;
    assert!(status.is_success(), "{status} {created}");
    let wp_failed = created["id"].as_str().unwrap().to_string();
    let p = wait_stage(&api, &token, &wp_failed, "failed").await;
    let error = p["error"].as_str().unwrap_or("");
    assert!(
        error.contains("while uploading") && error.contains("WordPress answered 500"),
        "{p:#}"
    );
    assert_eq!(
        p["asset_url"],
        format!("/api/v1/3d/{wp_failed}/asset"),
        "{p:#}"
    );
    assert_eq!(p["report"]["valid"], true, "{p:#}");
    let res = http
        .get(format!("{}/api/v1/3d/{wp_failed}/asset", edge.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.bytes().await.unwrap().as_ref() == model.as_slice());
    assert_eq!(wp.uploads().len(), 1, "the failed upload stored nothing");

    // The artifact endpoint's refusals, with a runner token of its own.
    let reg = kiln_e2e::runner_registration_token();
    let (status, body) = api
        .send(
            Method::POST,
            "/runner/v1/register",
            Some(&reg),
            Some(json!({"name": "hand"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let runner_token = body["token"].as_str().unwrap().to_string();
    let put = |query: String, auth: Option<String>| {
        let http = http.clone();
        let url = format!("{}/runner/v1/jobs/{id}/artifact{query}", edge.url());
        async move {
            let mut req = http.put(url).body(vec![1u8, 2, 3]);
            if let Some(a) = auth {
                req = req.bearer_auth(a);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, b) = put("?lease_id=x&name=model.glb".into(), Some(token.clone())).await;
    assert_eq!(s, 401, "a user token opens no runner endpoint: {b}");
    let (s, b) = put("?lease_id=x&name=../x".into(), Some(runner_token.clone())).await;
    assert_eq!((s, b["error"].is_string()), (400, true), "{b}");
    let (s, b) = put("?name=model.glb".into(), Some(runner_token.clone())).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = put(
        "?lease_id=not-the-lease&name=model.glb".into(),
        Some(runner_token.clone()),
    )
    .await;
    assert_eq!(s, 409, "{b}");
    // What the refused calls sent is not stored.
    let res = http.get(&asset).bearer_auth(&token).send().await.unwrap();
    assert!(res.bytes().await.unwrap().as_ref() == model.as_slice());
}
