//! Child processes in process groups of their own: stopped as a group (wrangler spawns workerd,
//! a runner spawns agents), and reaped by a watchdog if the test process dies first.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A running process group led by a child of the test process.
pub struct GroupChild {
    name: String,
    child: Child,
    watchdog: Option<Child>,
    stopped: bool,
}

impl GroupChild {
    /// Spawns `cmd` as the leader of a new process group, stdin closed, stdout and stderr appended
    /// to `log`. If the test process dies without dropping the handle (a handle in a static, a
    /// killed test binary), a watchdog stops the group and removes `dir`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, dir: Option<&Path>) -> anyhow::Result<GroupChild> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.process_group(0).stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().map_err(|e| anyhow::anyhow!("spawning {name} ({cmd:?}): {e}"))?;
        let watchdog = spawn_watchdog(child.id(), dir);
        Ok(GroupChild { name: name.to_string(), child, watchdog, stopped: false })
    }

    /// Whether the group leader has exited (and its exit status, once).
    /// The process's id (the leader of its group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM to the whole group, SIGKILL to whatever is left after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && group_alive(pgid, &mut self.child) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// SIGKILL to the whole group at once: a process that vanishes without saying goodbye.
    pub fn kill(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        self.stopped = true;
        // Members of the group other than the leader may take a moment to go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && killpg(pgid, None).is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        if !self.stopped {
            self.terminate(Duration::from_secs(5));
        }
    }
}

impl std::fmt::Debug for GroupChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pgid {})", self.name, self.child.id())
    }
}

/// True while any member of the group lives (the leader is reaped as a side effect once it exits,
/// so that its zombie does not count).
fn group_alive(pgid: Pid, leader: &mut Child) -> bool {
    let _ = leader.try_wait();
    killpg(pgid, None).is_ok()
}

/// A tiny shell in its own group that kills group `pgid` once the test process is gone: handles
/// held in statics are never dropped, and a test binary can be killed by a timeout.
fn spawn_watchdog(pgid: u32, dir: Option<&Path>) -> Option<Child> {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
         kill -TERM -{pgid} 2>/dev/null; sleep 3; kill -KILL -{pgid} 2>/dev/null; \
         if [ -n \"$1\" ]; then rm -rf -- \"$1\"; fi"
    );
    Command::new("sh")
        .args(["-c", &script, "watchdog"])
        .arg(dir.map(|d| d.as_os_str()).unwrap_or_default())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// The last `max` bytes of a log file, for failure messages.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}
