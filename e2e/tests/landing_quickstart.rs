//! The README's "Landing pages (seed 001)" walkthrough, exactly as written, on `scripts/dev` with
//! no configuration (only its ports and state directories differ): the demo model answers every
//! node, the real Claude Code CLI in the agent image writes the page, and the output is the one
//! the README shows, line for line (ids aside). Then the block again, as a newcomer who runs it
//! twice: the same user logs in, the second init on the session refines the same page.
//!
//! Like `quickstart.rs` this runs the real script, which builds what it needs in release mode.

use std::time::Duration;

use kiln_e2e::dev::{readme_block, DevKiln};
use kiln_e2e::repo_root;

/// The ```text block after "What you see" in the README's section `heading`.
fn readme_output(heading: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("reading README.md");
    let section = &readme[readme.find(heading).expect("the section")..];
    let start = section.find("```text\n").expect("a ```text block") + "```text\n".len();
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_string()
}

/// Every UUID as `<id>`, this Kiln's address as the README's, lines ended by `\n` (curl -I prints
/// the headers' CRLF).
fn normalized(text: &str, port: u16) -> String {
    let text = text.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:8787").replace('\r', "");
    let mut out = String::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let candidate = rest.get(..36).filter(|c| uuid::Uuid::parse_str(c).is_ok() && c.as_bytes()[8] == b'-');
        match candidate {
            Some(_) => {
                out.push_str("<id>");
                rest = &rest[36..];
            }
            None => {
                let ch = rest.chars().next().unwrap();
                out.push(ch);
                rest = &rest[ch.len_utf8()..];
            }
        }
    }
    out
}

#[tokio::test]
async fn the_readme_landing_walkthrough_prints_what_the_readme_shows() {
    let heading = "## Landing pages (seed 001)";
    let block = readme_block(heading);
    let (dev, body) = DevKiln::start("landing-quickstart").await;
    assert_eq!(body["agent"]["demoModel"], true, "{body}");

    let stdout = dev.run_block(&block, Duration::from_secs(300), "the README's landing walkthrough").await;
    let want = normalized(&readme_output(heading), 8787);
    let got = normalized(&stdout, dev.port);
    assert_eq!(got, want, "the walkthrough's output differs from the README's:\n{}", dev.context(&stdout, ""));

    // Run again: the same user, a second init of the same session refines its page.
    let again = dev.run_block(&block, Duration::from_secs(300), "the walkthrough run again").await;
    let first = again.lines().next().unwrap_or_default();
    assert!(first.ends_with(r#""session_id":"campaign-landing-42","landing_page_id":null}"#), "{}", dev.context(&again, ""));
    assert_eq!(again.lines().nth(1), Some("completed"), "{}", dev.context(&again, ""));
    assert!(again.contains("coder_tools tool: Updated 1 file(s)\n"), "{}", dev.context(&again, ""));
    assert!(again.contains("    <title>Aurora Flows</title>\n"), "{}", dev.context(&again, ""));
    dev.stop().await;
}
