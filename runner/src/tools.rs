//! What the runner tells the edge about its tools in `hello`, which `GET /health` reports (seed
//! 003's `claude` and `git` blocks): the agent CLI's version as jobs will run it (in the job image
//! under the Docker executor), whether the agent has credentials, git's version and whether a
//! forge token is held. Found once, at start.

use std::path::Path;
use std::time::Duration;

use kiln_schemas::runner::RunnerTools;

use crate::config::{AgentFormat, AgentProfile};
use crate::executor::{ExecSpec, Executor};

/// Variables that give each agent CLI its credentials.
fn credential_vars(format: AgentFormat) -> &'static [&'static str] {
    match format {
        AgentFormat::ClaudeStreamJson => &[
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_AUTH_TOKEN",
            "CLAUDE_CODE_OAUTH_TOKEN",
        ],
        AgentFormat::CodexJson => &["OPENAI_API_KEY", "CODEX_API_KEY"],
        AgentFormat::Text => &[],
    }
}

/// The CLI a profile runs (`None` for a text agent, whose command is the operator's own).
fn cli(format: AgentFormat) -> Option<&'static str> {
    match format {
        AgentFormat::ClaudeStreamJson => Some("claude"),
        AgentFormat::CodexJson => Some("codex"),
        AgentFormat::Text => None,
    }
}

/// The report, from what was found (pure).
pub fn report(
    agent: &AgentProfile,
    agent_version: Option<String>,
    git_version: Option<String>,
    forge_token: bool,
) -> RunnerTools {
    let keys = credential_vars(agent.format);
    RunnerTools {
        profile: agent.format.profile_name().to_string(),
        agent_version,
        agent_authenticated: agent.demo_model
            || agent
                .env
                .vars
                .iter()
                .any(|(k, v)| keys.contains(&k.as_str()) && !v.is_empty()),
        demo_model: agent.demo_model,
        git_version,
        forge_token,
        round_table: vec![],
    }
}

/// The round table's providers as `hello` reports them (`[llm.round_table] providers`).
pub fn round_table(llm: &crate::llm::LlmConfig) -> Vec<kiln_schemas::dashboard::ProviderView> {
    llm.round_table
        .providers
        .iter()
        .map(|m| kiln_schemas::dashboard::ProviderView {
            name: m.to_string(),
            display_name: format!("{} ({})", m.model, m.provider),
            model: m.model.clone(),
            enabled: llm.providers.contains_key(&m.provider),
        })
        .collect()
}

/// Runs the agent CLI's `--version` the way a job would run it: in a sandbox of `executor` over
/// an empty directory under `worktrees_dir`. `None` when the profile has no CLI of its own or it
/// does not answer within 30 seconds.
pub async fn agent_version(
    executor: &dyn Executor,
    agent: &AgentProfile,
    worktrees_dir: &Path,
) -> Option<String> {
    let cli = cli(agent.format)?;
    let id = format!("probe-{}", uuid::Uuid::new_v4());
    let dir = worktrees_dir.join(&id);
    tokio::fs::create_dir_all(&dir).await.ok()?;
    let version = run_version(executor, cli, &id, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    if version.is_none() {
        tracing::warn!(
            cli,
            "the agent CLI did not answer `--version` in the job sandbox: jobs will fail to start it"
        );
    }
    version
}

async fn run_version(executor: &dyn Executor, cli: &str, id: &str, dir: &Path) -> Option<String> {
    let sandbox = executor.create_sandbox(id, dir).await.ok()?;
    let probe = async {
        let mut exec = sandbox
            .exec(ExecSpec::new(format!("{cli} --version"), id, 0))
            .await
            .ok()?;
        let mut out = Vec::new();
        while let Some(chunk) = exec.output.recv().await {
            if chunk.stream == kiln_schemas::events::LogStream::Stdout {
                out.extend(chunk.data);
            }
        }
        let code = exec.exit_code().await.ok()?;
        let text = String::from_utf8_lossy(&out).trim().to_string();
        (code == 0 && !text.is_empty()).then_some(text)
    };
    let version = tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .ok()
        .flatten();
    if let Err(e) = sandbox.destroy().await {
        tracing::warn!(error = %e, "could not remove the probe's sandbox");
    }
    version
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentEnv;

    fn profile(format: AgentFormat, vars: &[(&str, &str)], demo: bool) -> AgentProfile {
        AgentProfile {
            command: format.default_command().into(),
            format,
            env: AgentEnv {
                vars: vars
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                missing: vec![],
            },
            demo_model: demo,
        }
    }

    #[test]
    fn credentials_follow_the_profile() {
        let claude = AgentFormat::ClaudeStreamJson;
        let r = report(
            &profile(claude, &[("ANTHROPIC_API_KEY", "sk")], false),
            Some("2.1".into()),
            None,
            true,
        );
        assert!(r.agent_authenticated && r.forge_token && !r.demo_model);
        assert_eq!(
            (r.profile.as_str(), r.agent_version.as_deref()),
            ("claude", Some("2.1"))
        );
        // An OpenAI key does not sign Claude Code in; an empty value is no key.
        assert!(
            !report(
                &profile(claude, &[("OPENAI_API_KEY", "sk")], false),
                None,
                None,
                false
            )
            .agent_authenticated
        );
        assert!(
            !report(
                &profile(claude, &[("ANTHROPIC_API_KEY", "")], false),
                None,
                None,
                false
            )
            .agent_authenticated
        );
        assert!(
            report(
                &profile(AgentFormat::CodexJson, &[("OPENAI_API_KEY", "sk")], false),
                None,
                None,
                false
            )
            .agent_authenticated
        );
        // The demo model needs no key.
        let demo = report(&profile(claude, &[], true), None, None, false);
        assert!(demo.agent_authenticated && demo.demo_model);
        assert!(
            !report(&profile(AgentFormat::Text, &[], false), None, None, false).agent_authenticated
        );
    }
}
