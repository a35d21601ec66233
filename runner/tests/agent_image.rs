//! The agent image `kiln-agent:latest` (built by `scripts/agent-image`, which `scripts/dockerd`
//! runs) on a real daemon (`DOCKER_HOST`, else the repository's private
//! `.kiln/docker/docker.sock`): the pinned agent CLIs run in it without Node.js, and uid 1000 —
//! the user job containers run as — has git, a home and a writable `/app`. These tests fail, with
//! directions, when no daemon answers or the image is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use futures::StreamExt;

const IMAGE: &str = "kiln-agent:latest";
const AGENT_UID: u32 = 1000;

/// The version `images/agent/package.json` pins for an npm package.
fn pinned_version(package: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/agent/package.json");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["dependencies"][package]
        .as_str()
        .unwrap_or_else(|| panic!("{} pins no {package}", path.display()))
        .to_string()
}

async fn docker() -> Docker {
    let host = common::docker_host().await;
    let docker = Docker::connect_with_host(&host)
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    assert!(
        docker.inspect_image(IMAGE).await.is_ok(),
        "the Docker daemon at {host} has no image {IMAGE}: run scripts/dockerd (it runs \
         scripts/agent-image) to build it"
    );
    docker
}

/// A started container of the agent image running as `user`. [`Container::remove`] removes it;
/// a test that fails before that leaves it to end by itself within two minutes (auto-removed).
struct Container {
    docker: Docker,
    name: String,
}

impl Container {
    async fn start(docker: &Docker, user: &str, app: Option<&Path>) -> (Container, Duration) {
        let name = format!("kiln-agent-image-test-{}", uuid::Uuid::new_v4());
        let body = ContainerCreateBody {
            image: Some(IMAGE.into()),
            cmd: Some(vec!["sleep".into(), "120".into()]),
            user: Some(user.into()),
            host_config: Some(HostConfig {
                binds: app.map(|dir| vec![format!("{}:/app", dir.display())]),
                network_mode: Some("none".into()),
                init: Some(true),
                auto_remove: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = Instant::now();
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .unwrap();
        docker.start_container(&name, None).await.unwrap();
        let took = t.elapsed();
        (
            Container {
                docker: docker.clone(),
                name,
            },
            took,
        )
    }

    /// Runs `sh -c command` in the container (as the container's user, in its working directory):
    /// (stdout, stderr, exit code).
    async fn sh(&self, command: &str) -> (String, String, i64) {
        let exec = self
            .docker
            .create_exec(
                &self.name,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec![
                        "sh".to_string(),
                        "-c".to_string(),
                        command.to_string(),
                    ]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let StartExecResults::Attached { mut output, .. } =
            self.docker.start_exec(&exec.id, None).await.unwrap()
        else {
            panic!("the exec started detached");
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(item) = output.next().await {
            match item.unwrap() {
                bollard::container::LogOutput::StdErr { message } => {
                    err.extend_from_slice(&message)
                }
                other => out.extend_from_slice(&other.into_bytes()),
            }
        }
        let code = loop {
            let info = self.docker.inspect_exec(&exec.id).await.unwrap();
            if let (Some(false), Some(code)) = (info.running, info.exit_code) {
                break code;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            code,
        )
    }

    /// Like [`Container::sh`], and the command must succeed: its trimmed stdout.
    async fn ok(&self, command: &str) -> String {
        let (out, err, code) = self.sh(command).await;
        assert_eq!(
            code, 0,
            "`{command}` failed: stdout {out:?}, stderr {err:?}"
        );
        out.trim().to_string()
    }

    async fn remove(self) {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        let _ = self.docker.remove_container(&self.name, Some(opts)).await;
    }
}

/// A directory for `/app` that uid 1000 may write, as the runner's worktrees are: given to uid
/// 1000 when the tests run as root, else opened to everyone.
fn app_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kiln-agent-app-")
        .tempdir()
        .unwrap();
    if nix::unistd::getuid().is_root() {
        std::os::unix::fs::chown(dir.path(), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    dir
}

#[tokio::test]
async fn the_agent_clis_run_as_uid_1000_with_git_a_home_and_a_writable_app() {
    let docker = docker().await;
    let app = app_dir();
    let (c, took) = Container::start(&docker, "1000:1000", Some(app.path())).await;
    eprintln!(
        "agent image: container create + start in {} ms",
        took.as_millis()
    );

    let claude = pinned_version("@anthropic-ai/claude-code");
    let codex = pinned_version("@openai/codex");
    assert_eq!(
        c.ok("claude --version").await,
        format!("{claude} (Claude Code)")
    );
    assert_eq!(c.ok("codex --version").await, format!("codex-cli {codex}"));
    assert_eq!(c.ok("command -v claude").await, "/usr/local/bin/claude");
    assert_eq!(c.ok("command -v codex").await, "/usr/local/bin/codex");
    // Both are self-contained executables: the image has no Node.js.
    let (_, _, code) = c.sh("command -v node").await;
    assert_ne!(code, 0, "the image has no node");

    assert!(
        c.ok("git --version").await.starts_with("git version 2."),
        "git is installed"
    );
    assert_eq!(c.ok("id -u; id -g").await, "1000\n1000");
    assert_eq!(c.ok("id -un").await, "agent", "uid 1000 is the user agent");
    assert_eq!(c.ok("pwd").await, "/app", "the working directory is /app");
    assert_eq!(c.ok("echo $HOME").await, "/home/agent");
    assert_eq!(c.ok("stat -c %u:%g \"$HOME\"").await, "1000:1000");

    // /app is the host directory, and uid 1000 writes there.
    c.ok("echo from-the-agent > /app/written.txt").await;
    assert_eq!(
        std::fs::read_to_string(app.path().join("written.txt")).unwrap(),
        "from-the-agent\n"
    );
    // Its home is writable (the CLIs keep settings and sessions there), and git works in it.
    c.ok(
        "mkdir ~/.claude && cd ~ && git init -q repo && cd repo && echo a > a && git add a && \
          git -c user.name=Agent -c user.email=agent@example.com commit -q -m first",
    )
    .await;
    assert_eq!(c.ok("git -C ~/repo log --format=%s").await, "first");
    // /tmp is there for everyone, and the CA bundle is installed for HTTPS to the vendors.
    c.ok("touch /tmp/x && test -s /etc/ssl/certs/ca-certificates.crt")
        .await;
    c.remove().await;
}

#[tokio::test]
async fn the_image_gives_app_to_uid_1000_and_git_trusts_a_worktree_owned_by_another_user() {
    let docker = docker().await;
    let (c, _) = Container::start(&docker, "1000:1000", None).await;
    assert_eq!(c.ok("stat -c %u:%g /app").await, "1000:1000");
    c.ok("touch /app/file").await;
    // A runner that is not root keeps its worktrees its own: git in the container (another uid)
    // must still accept them rather than stop at "dubious ownership".
    let app = tempfile::tempdir().unwrap();
    common::git(app.path(), &["init", "--quiet"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(app.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    c.remove().await;
    let (c, _) = Container::start(&docker, "1000:1000", Some(app.path())).await;
    assert_ne!(
        c.ok("stat -c %u /app").await,
        "1000",
        "another user owns the worktree"
    );
    assert_eq!(
        c.ok("git -C /app rev-parse --is-inside-work-tree").await,
        "true"
    );
    c.remove().await;
}
