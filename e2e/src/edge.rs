//! [`TestEdge`]: Kiln's real Worker on a local workerd (`wrangler dev`), one per test or shared,
//! each with its own migrated D1 database and Durable Object storage in a temporary directory.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use crate::procs::{tail, GroupChild};
use crate::{free_port, repo_root, Api};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How the Worker is served on workerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeServer {
    /// The `wrangler dev` command, as `scripts/dev` runs it (with its DevTools inspector).
    WranglerDev,
    /// `scripts/serve-edge.mjs`, as `scripts/dev` serves: one workerd through Miniflare, without
    /// `wrangler dev`'s proxy workerd and inspector (which cost every request and subrequest).
    Direct,
}

/// A running `wrangler dev` serving the repository's Worker (edge/build/worker/shim.mjs).
pub struct TestEdge {
    server: EdgeServer,
    /// wrangler.toml's `[env.<name>]` to run (`--env`), or the top level.
    wrangler_env: Option<String>,
    port: u16,
    vars: Vec<(String, String)>,
    /// The Worker's entry point when it is not wrangler.toml's `main` (the faults build).
    script: Option<PathBuf>,
    dir: TempDir,
    proc: Option<GroupChild>,
}

impl TestEdge {
    /// Starts `wrangler dev` on a free port over a fresh copy of a migrated state directory, with
    /// `vars` overriding wrangler.toml's `[vars]` (e.g. `("MAX_CONCURRENT_JOBS", "1")`), and waits
    /// until `GET /health` answers.
    pub async fn start(vars: &[(&str, &str)]) -> anyhow::Result<TestEdge> {
        Self::start_with(EdgeServer::WranglerDev, vars).await
    }

    /// [`TestEdge::start`] on the given server.
    pub async fn start_with(server: EdgeServer, vars: &[(&str, &str)]) -> anyhow::Result<TestEdge> {
        Self::launch(server, None, vars).await
    }

    /// [`TestEdge::start`] with wrangler.toml's `[env.<name>]` (`wrangler dev --env <name>`), e.g.
    /// `production`.
    pub async fn start_env(name: &str, vars: &[(&str, &str)]) -> anyhow::Result<TestEdge> {
        Self::launch(EdgeServer::WranglerDev, Some(name), vars).await
    }

    /// [`TestEdge::start`] on the Worker built with the test-only `faults` feature
    /// (`edge/build-faults/`, built here when missing or older than the edge's sources), so `vars`
    /// may set `KILN_FAULTS` (ARCHITECTURE.md lists the faults).
    pub async fn start_with_faults(vars: &[(&str, &str)]) -> anyhow::Result<TestEdge> {
        let script = faults_build().await?.clone();
        let mut edge = Self::prepare(EdgeServer::WranglerDev, None, vars).await?;
        edge.script = Some(script);
        edge.first_spawn().await?;
        Ok(edge)
    }

    async fn launch(server: EdgeServer, wrangler_env: Option<&str>, vars: &[(&str, &str)]) -> anyhow::Result<TestEdge> {
        let mut edge = Self::prepare(server, wrangler_env, vars).await?;
        edge.first_spawn().await?;
        Ok(edge)
    }

    /// The first start, on the port chosen for it or, when another process bound that port in
    /// the meantime (a free port is free only until someone takes it), on another.
    async fn first_spawn(&mut self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            match self.spawn().await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    attempt += 1;
                    self.port = free_port();
                }
                other => return other,
            }
        }
    }

    async fn prepare(server: EdgeServer, wrangler_env: Option<&str>, vars: &[(&str, &str)]) -> anyhow::Result<TestEdge> {
        let template = migrated_template().await?;
        let dir = tempfile::Builder::new().prefix("kiln-edge-").tempdir()?;
        copy_dir(template, &dir.path().join("state")).context("copying the migrated state")?;
        let edge = TestEdge {
            server,
            wrangler_env: wrangler_env.map(str::to_string),
            port: free_port(),
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            script: None,
            dir,
            proc: None,
        };
        Ok(edge)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// An HTTP client for this edge.
    pub fn api(&self) -> Api {
        Api::new(&self.url())
    }

    /// Where D1, Durable Object storage and queues persist (`--persist-to`).
    pub fn persist_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// wrangler's and workerd's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops wrangler dev (and workerd) and starts it again on the same port and state.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    /// Stops wrangler dev and workerd: SIGTERM to the group, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }

    /// Runs `sql` on this edge's D1 database (`wrangler d1 execute --local` on its state) and
    /// answers the rows of the last statement. Stop the edge first when the statement writes
    /// ([`TestEdge::stop`], then [`TestEdge::restart`]): workerd holds the database open.
    pub fn d1(&self, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut cmd = wrangler_command()?;
        cmd.args(["d1", "execute", "DB", "--local", "--json", "--persist-to"]).arg(self.persist_dir());
        if let Some(name) = &self.wrangler_env {
            cmd.args(["--env", name]);
        }
        let out = cmd.arg("--command").arg(sql).env("CI", "true").output().context("running wrangler d1 execute")?;
        if !out.status.success() {
            bail!(
                "wrangler d1 execute failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("wrangler d1 execute answered {:?}", String::from_utf8_lossy(&out.stdout)))?;
        let last = answer.as_array().and_then(|a| a.last()).cloned().unwrap_or_default();
        Ok(last["results"].as_array().cloned().unwrap_or_default())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("wrangler.log")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let root = repo_root();
        let shim = self.script.clone().unwrap_or_else(|| root.join("edge/build/worker/shim.mjs"));
        if !shim.exists() {
            bail!("{} is missing: build the Worker first with scripts/build-edge (scripts/test does)", shim.display());
        }
        let mut cmd = match self.server {
            EdgeServer::WranglerDev => {
                let mut cmd = wrangler_command()?;
                cmd.args(["dev", "--ip", "127.0.0.1", "--show-interactive-dev-session=false"])
                    .args(["--inspector-port", &free_port().to_string()]);
                if self.script.is_some() {
                    cmd.arg(&shim);
                }
                cmd
            }
            EdgeServer::Direct => {
                let mut node = Command::new("node");
                node.arg(root.join("scripts/serve-edge.mjs"));
                if self.script.is_some() {
                    node.arg(&shim);
                }
                offline_and_quiet(&mut node, &root);
                node
            }
        };
        cmd.args(["--port", &self.port.to_string()]).arg("--persist-to").arg(self.persist_dir());
        if let Some(name) = &self.wrangler_env {
            cmd.args(["--env", name]);
        }
        for (k, v) in &self.vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        let log = self.log_path();
        std::fs::write(&log, format!("--- wrangler dev on port {}\n", self.port)).ok();
        let mut proc = GroupChild::spawn("wrangler dev", cmd, &log, Some(self.dir.path()))?;

        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let health = format!("{}/health", self.url());
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = proc.exited() {
                bail!("wrangler dev exited with {status} before answering; its log:\n{}", tail(&log, 8000));
            }
            if let Ok(resp) = http.get(&health).send().await {
                // wrangler's proxy answers 502/503 while workerd is still loading the Worker.
                if !matches!(resp.status().as_u16(), 502 | 503) {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                proc.terminate(Duration::from_secs(5));
                bail!("GET {health} did not answer within {READY_TIMEOUT:?}; wrangler's log:\n{}", tail(&log, 8000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.proc = Some(proc);
        Ok(())
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `node_modules/.bin/wrangler` run from the repository root, offline and quiet, with its config
/// and caches inside the repository's ignored `.kiln/` directory.
pub(crate) fn wrangler_command() -> anyhow::Result<Command> {
    let root = repo_root();
    let bin = root.join("node_modules/.bin/wrangler");
    if !bin.exists() {
        bail!("{} is missing: run scripts/setup", bin.display());
    }
    let mut cmd = Command::new(bin);
    offline_and_quiet(&mut cmd, &root);
    Ok(cmd)
}

/// Runs from the repository root with wrangler offline and quiet, its config and caches inside
/// the repository's ignored `.kiln/` directory.
fn offline_and_quiet(cmd: &mut Command, root: &Path) {
    cmd.current_dir(root)
        .env("WRANGLER_SEND_METRICS", "false")
        .env("WRANGLER_SEND_ERROR_REPORTS", "false")
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
        .env("WRANGLER_HIDE_BANNER", "true")
        .env("XDG_CONFIG_HOME", root.join(".kiln/xdg/config"))
        .env("XDG_CACHE_HOME", root.join(".kiln/xdg/cache"))
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0");
}

static FAULTS_BUILD: OnceCell<PathBuf> = OnceCell::const_new();

/// `edge/build-faults/worker/shim.mjs`: the Worker with the test-only `faults` feature, built
/// (`scripts/build-edge --out-dir build-faults -- --features faults`) when it is missing or older
/// than any source of the edge or the schemas. Production builds never have the feature.
async fn faults_build() -> anyhow::Result<&'static PathBuf> {
    FAULTS_BUILD
        .get_or_try_init(|| async {
            tokio::task::spawn_blocking(|| {
                let root = repo_root();
                let shim = root.join("edge/build-faults/worker/shim.mjs");
                let built = std::fs::metadata(&shim).and_then(|m| m.modified()).ok();
                let newest = ["edge/src", "schemas/src", "edge/Cargo.toml", "Cargo.lock"]
                    .iter()
                    .filter_map(|p| newest_mtime(&root.join(p)))
                    .max();
                if built.is_none() || newest > built {
                    let out = Command::new(root.join("scripts/build-edge"))
                        .args(["--out-dir", "build-faults", "--", "--features", "faults"])
                        .current_dir(&root)
                        .output()
                        .context("running scripts/build-edge for the faults build")?;
                    if !out.status.success() {
                        bail!("the faults build failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                    }
                }
                Ok(shim)
            })
            .await
            .map_err(|e| anyhow!("the faults build panicked: {e}"))?
        })
        .await
}

fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.filter_map(|e| e.ok()).filter_map(|e| newest_mtime(&e.path())).max()
}

static TEMPLATE: OnceCell<PathBuf> = OnceCell::const_new();

/// A state directory with every D1 migration applied, built once per set of migrations (keyed by
/// their content, wrangler.toml and the npm lockfile) and copied for each edge: applying
/// migrations costs seconds, copying a few files does not.
async fn migrated_template() -> anyhow::Result<&'static PathBuf> {
    TEMPLATE
        .get_or_try_init(|| async {
            tokio::task::spawn_blocking(build_template).await.map_err(|e| anyhow!("template builder panicked: {e}"))?
        })
        .await
}

fn build_template() -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let key = template_key(&root)?;
    let templates = root.join(".kiln/e2e/templates");
    let done = templates.join(format!("{key:016x}"));
    if done.join(".complete").exists() {
        return Ok(done);
    }
    std::fs::create_dir_all(&templates)?;
    let work = tempfile::Builder::new().prefix("building-").tempdir_in(&templates)?;
    let state = work.path().join("state");
    std::fs::create_dir_all(&state)?;
    let out = wrangler_command()?
        .args(["d1", "migrations", "apply", "DB", "--local", "--persist-to"])
        .arg(&state)
        .env("CI", "true") // never ask for confirmation
        .output()
        .context("running wrangler d1 migrations apply")?;
    if !out.status.success() {
        bail!(
            "wrangler d1 migrations apply failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(state.join(".complete"), b"")?;
    // Another test process may have finished the same template meanwhile: either copy is good.
    match std::fs::rename(&state, &done) {
        Ok(()) => {}
        Err(_) if done.join(".complete").exists() => {}
        Err(e) => return Err(e).context(format!("moving the template to {}", done.display())),
    }
    Ok(done)
}

fn template_key(root: &Path) -> anyhow::Result<u64> {
    let mut h = DefaultHasher::new();
    let mut migrations: Vec<PathBuf> = match std::fs::read_dir(root.join("migrations")) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => vec![],
    };
    migrations.sort();
    for p in migrations.iter().chain([&root.join("wrangler.toml"), &root.join("package-lock.json")]) {
        p.file_name().hash(&mut h);
        std::fs::read(p).unwrap_or_default().hash(&mut h);
    }
    Ok(h.finish())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_name() != ".complete" {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
