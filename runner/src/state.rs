//! What the runner keeps across restarts: the runner token and id the edge issued when it
//! registered, in `RUNNER_STATE_DIR/runner.json` (mode 0600), with the edge URL and runner name
//! they were issued for. A later start without `RUNNER_TOKEN` uses that token instead of
//! registering again, but only with the same edge and name (a token is never sent to another
//! edge). One runner uses a state directory at a time: it holds `runner.lock` while it runs.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::EdgeCredential;

pub const STATE_FILE: &str = "runner.json";
pub const LOCK_FILE: &str = "runner.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io {
        context,
        path,
        source,
    }
}

/// A registration the edge granted: the contents of `runner.json`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRegistration {
    pub runner_id: String,
    pub token: String,
    /// The edge that issued the token (`RUNNER_EDGE_URL`, normalised).
    pub edge_url: String,
    /// The name the runner registered under.
    pub name: String,
    /// RFC 3339.
    pub registered_at: String,
}

impl std::fmt::Debug for SavedRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedRegistration")
            .field("runner_id", &self.runner_id)
            .field("token", &"<redacted>")
            .field("edge_url", &self.edge_url)
            .field("name", &self.name)
            .field("registered_at", &self.registered_at)
            .finish()
    }
}

impl SavedRegistration {
    /// Whether this registration may be used by a runner with this edge and name.
    pub fn fits(&self, edge_url: &str, name: &str) -> bool {
        self.edge_url == edge_url && self.name == name
    }
}

/// How the runner gets its token at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartCredential {
    /// `RUNNER_TOKEN`: used as given, never saved, never renewed.
    Configured(String),
    /// The saved registration; renewed on a 401 when a registration token is set.
    Saved(SavedRegistration),
    /// Register with the operator's registration token (and save the result).
    Register,
    /// Nothing to start with.
    Missing,
}

/// Picks the start credential: `RUNNER_TOKEN`, else a saved registration for this edge and name,
/// else a registration.
pub fn choose(
    configured: Option<&EdgeCredential>,
    saved: Option<&SavedRegistration>,
    edge_url: &str,
    name: &str,
) -> StartCredential {
    match configured {
        Some(EdgeCredential::Token(t)) => StartCredential::Configured(t.clone()),
        _ => match saved.filter(|s| s.fits(edge_url, name)) {
            Some(s) => StartCredential::Saved(s.clone()),
            None if matches!(configured, Some(EdgeCredential::Registration(_))) => {
                StartCredential::Register
            }
            None => StartCredential::Missing,
        },
    }
}

/// A state directory this runner holds the lock of (released when dropped, or when the process
/// dies).
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

/// The outcome of [`StateDir::open`].
#[derive(Debug)]
pub enum Opened {
    Locked(StateDir),
    /// Another runner holds the lock; its pid, when it wrote one.
    InUse {
        pid: Option<u32>,
    },
}

impl StateDir {
    /// Creates the directory if needed (mode 0700) and takes its lock without waiting.
    pub fn open(dir: &Path) -> Result<Opened, StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating the state directory", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                return Ok(Opened::InUse { pid });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", &lock_path)(e)),
        }
        // For the message a second runner on this directory gets.
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(Opened::Locked(StateDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/runner.json`.
    pub fn file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved registration, if there is a readable one. A file others may read is tightened
    /// to 0600; one that does not parse is ignored (a registration replaces it).
    pub fn load(&self) -> Result<Option<SavedRegistration>, StateError> {
        let path = self.file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let mode = std::fs::metadata(&path)
            .map_err(io("reading", &path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the saved runner token was readable by others; setting its mode to 0600");
            std::fs::set_permissions(&path, Permissions::from_mode(0o600))
                .map_err(io("setting the mode of", &path))?;
        }
        match serde_json::from_str(&text) {
            Ok(saved) => Ok(Some(saved)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the saved registration does not parse; ignored");
                Ok(None)
            }
        }
    }

    /// Writes the registration to `runner.json` atomically (a temporary file renamed over it),
    /// mode 0600 from the first byte.
    pub fn save(&self, saved: &SavedRegistration) -> Result<(), StateError> {
        let path = self.file();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        // The umask can only remove bits; this makes the mode exact.
        f.set_permissions(Permissions::from_mode(0o600))
            .map_err(io("setting the mode of", &tmp))?;
        let json = serde_json::to_vec_pretty(saved).expect("a registration serializes");
        f.write_all(&json)
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("replacing", &path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(token: &str) -> SavedRegistration {
        SavedRegistration {
            runner_id: "r-1".into(),
            token: token.into(),
            edge_url: "http://edge:8787/".into(),
            name: "box-1".into(),
            registered_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_start_credential_prefers_runner_token_then_a_fitting_saved_one() {
        let s = saved("tok");
        let token = EdgeCredential::Token("given".into());
        let reg = EdgeCredential::Registration("reg".into());
        let edge = "http://edge:8787/";
        assert_eq!(
            choose(Some(&token), Some(&s), edge, "box-1"),
            StartCredential::Configured("given".into())
        );
        assert_eq!(
            choose(Some(&reg), Some(&s), edge, "box-1"),
            StartCredential::Saved(s.clone())
        );
        assert_eq!(
            choose(None, Some(&s), edge, "box-1"),
            StartCredential::Saved(s.clone())
        );
        // Another edge or another name: the token is not theirs.
        assert_eq!(
            choose(Some(&reg), Some(&s), "http://other:8787/", "box-1"),
            StartCredential::Register
        );
        assert_eq!(
            choose(Some(&reg), Some(&s), edge, "box-2"),
            StartCredential::Register
        );
        assert_eq!(
            choose(None, Some(&s), "http://other:8787/", "box-1"),
            StartCredential::Missing
        );
        assert_eq!(
            choose(Some(&reg), None, edge, "box-1"),
            StartCredential::Register
        );
        assert_eq!(choose(None, None, edge, "box-1"), StartCredential::Missing);
    }

    #[test]
    fn a_saved_registration_round_trips_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/state");
        let Opened::Locked(state) = StateDir::open(&dir).unwrap() else {
            panic!("the lock is free")
        };
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(state.load().unwrap(), None);
        state.save(&saved("first")).unwrap();
        assert_eq!(mode(&state.file()), 0o600);
        assert_eq!(state.load().unwrap(), Some(saved("first")));
        // Overwriting a file someone loosened gives 0600 again.
        std::fs::set_permissions(state.file(), Permissions::from_mode(0o644)).unwrap();
        state.save(&saved("second")).unwrap();
        assert_eq!(mode(&state.file()), 0o600);
        assert_eq!(state.load().unwrap().unwrap().token, "second");
        // Loading tightens a loosened file.
        std::fs::set_permissions(state.file(), Permissions::from_mode(0o644)).unwrap();
        state.load().unwrap();
        assert_eq!(mode(&state.file()), 0o600);
        assert!(!format!("{:?}", saved("secret-token")).contains("secret-token"));
    }

    #[test]
    fn a_file_that_does_not_parse_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let Opened::Locked(state) = StateDir::open(tmp.path()).unwrap() else {
            panic!("the lock is free")
        };
        std::fs::write(state.file(), "{not json").unwrap();
        assert_eq!(state.load().unwrap(), None);
    }

    #[test]
    fn one_runner_holds_a_state_directory_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let first = StateDir::open(tmp.path()).unwrap();
        assert!(matches!(first, Opened::Locked(_)));
        match StateDir::open(tmp.path()).unwrap() {
            Opened::InUse { pid } => assert_eq!(pid, Some(std::process::id())),
            Opened::Locked(_) => panic!("the directory is held"),
        }
        drop(first);
        assert!(matches!(
            StateDir::open(tmp.path()).unwrap(),
            Opened::Locked(_)
        ));
    }
}
