//! The README's "Dashboard (seed 002)" walk, exactly as written, on `scripts/dev` with no
//! configuration (only its ports and state directories differ): a task and a round table answered
//! by the demo model, a 3D pipeline on the demo 3D vendor and WordPress (`kiln-fake3d`) watched on
//! its channel from `pending` to `completed` with its validation report and its model from R2, and
//! one rejected at validation; the output shows what the README promises.
//!
//! Like `quickstart.rs` this runs the real script, which builds what it needs in release mode.

use std::time::Duration;

use kiln_e2e::dev::DevKiln;
use kiln_e2e::repo_root;

/// Every ```sh block of the `## Dashboard (seed 002)` section, in order.
fn readme_walk() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("reading README.md");
    let start = readme.find("## Dashboard (seed 002)").expect("README.md has a \"Dashboard (seed 002)\" section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut blocks = vec![];
    let mut rest = section;
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + "```sh\n".len()..];
        let end = body.find("```").expect("the block ends");
        blocks.push(&body[..end]);
        rest = &body[end + 3..];
    }
    assert!(blocks.len() >= 2, "the section has its two blocks:\n{section}");
    blocks.join("\n")
}

#[tokio::test]
async fn the_readme_dashboard_walk_runs_on_scripts_dev_with_the_demo_model_and_3d_vendor() {
    let walk = readme_walk();
    assert!(
        walk.contains(r#"-d '{"prompt":"A low-poly coffee mug"}'"#) && walk.contains("/api/ws/3d_pipeline?after=0"),
        "the README's walk changed; this test checks what it promises:\n{walk}"
    );
    let (dev, health) = DevKiln::start("dashboard-quickstart").await;
    assert_eq!(health["agent"]["demoModel"], true, "{health}");
    let scratch = dev.dir.path().join("walk");
    std::fs::create_dir_all(&scratch).unwrap();
    let stdout = dev.run_block_in(&walk, &scratch, Duration::from_secs(180), "the README's dashboard walk").await;
    let context = || dev.context(&stdout, "");

    for line in [
        r#""agentType":"marketing","prompt":"A tagline for a mug shop","status":"completed","result":{"answer":"[demo model] "#,
        r#"{"stage":"completed","winner":"anthropic/kiln-rt-"#,
        r#""participations":1,"wins":1,"win_rate":1.0"#,
        r#""stage":"pending","timestamp""#,
        r#""vendor_status":"queued","vendor_task_id":"task-1""#,
        r#""stage":"validating","timestamp""#,
        r#""stage":"uploading","timestamp""#,
        r#""stage":"completed","timestamp""#,
        r#""prompt":"A low-poly coffee mug","format":"glb","stage":"completed","progress":100.0,"report":{"valid":true,"triangles":5000,"max_faces":50000,"meshes":1,"textures":1,"images":[[256,256]],"problems":[]}"#,
        r#""wordpress_media_id":101,"#,
        r#"{"stage":"failed","error":"3D pipeline failed while validating: the model is not valid: 60000 triangles, over the limit of 50000"}"#,
    ] {
        assert!(stdout.contains(line), "the output lacks {line:?}:\n{}", context());
    }
    let glb = std::fs::read(scratch.join("mug.glb")).expect("the walk saved the model");
    assert_eq!((&glb[..4], glb.len()), (&b"glTF"[..], 330_080), "the GLB from R2");
    dev.stop().await;
}
