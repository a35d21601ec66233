//! The README's "Build an app (seed 000)" walkthrough, exactly as written, on `scripts/dev` with no
//! configuration (only its ports and state directories differ, so this test never meets a
//! developer's running Kiln): the demo model answers every LLM step, the real Claude Code CLI in
//! the agent image builds the two stories, and the output shows what the README promises.
//!
//! Like `quickstart.rs` this runs the real script, which builds what it needs in release mode.

use std::time::Duration;

use kiln_e2e::dev::{readme_block, DevKiln};

#[tokio::test]
async fn the_readme_app_walkthrough_builds_an_app_on_scripts_dev_with_the_demo_model() {
    let walkthrough = readme_block("## Build an app");
    assert!(
        walkthrough.contains(r#"-d '{"prompt":"A reading list for people who read a lot"}'"#),
        "the README's idea changed; this test checks what it promises:\n{walkthrough}"
    );

    let (dev, body) = DevKiln::start("app-quickstart").await;
    assert_eq!(body["agent"]["demoModel"], true, "{body}");
    let stdout = dev.run_block(&walkthrough, Duration::from_secs(240), "the README's walkthrough").await;
    let context = || dev.context(&stdout, "");

    // What the README shows.
    for line in [
        "Client Relations: [demo model] Thanks for the idea: \"A reading list for people who read a lot\".",
        "{\"role\":\"user\",\"content\":\"Readers who want to remember what they read\"}",
        "Build \"A reading list for people who read a lot\" as a small single-page web app",
        "● queued requirements collected; job queued",
        "[CEO] [demo model] CEO: ",
        "[Secretary] [demo model] Secretary: Recorded: one page, localStorage, two stories in order. CONSENSUS",
        "● prd_ready The PRD is ready",
        "● tickets_ready 3 tickets, 2 to build",
        "→ Write /app/index.html",
        "→ Write /app/app.js",
        "● build_done Built 2 tickets",
        "story Page skeleton: done\nstory List behaviour: done",
        "{\"features\":[\"Add an item\",\"Mark an item done\",\"Keep the list in the browser\"],\"name\":\"Kiln demo app\",\"pages\":[\"Home\"]}",
        "{\"path\":\"/app/index.html\",\"type\":\"file\",",
        "// Written by Kiln's demo model (kiln-demo) for ticket S2: List behaviour",
    ] {
        assert!(stdout.contains(line), "the output lacks {line:?}:\n{}", context());
    }

    dev.stop().await;
}
