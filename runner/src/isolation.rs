//! Who a job's commands run as, for both executors. A root runner runs them as another user
//! (`RUNNER_CONTAINER_USER`, default 1000:1000) and gives each job's worktree to that user, so
//! they cannot read what only the runner may (its environment through `/proc/<pid>/environ`, the
//! 0700 `RUNNER_STATE_DIR`); a runner that is not root can only run them as itself. The decision
//! is pure ([`JobUser::decide`]) so it is tested without being root.

use std::path::Path;

use crate::config::{ContainerUser, ExecutorKind};

/// The user a job's commands run as, and whether the runner must give it the worktree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUser {
    pub user: ContainerUser,
    /// The runner is root and `user` is not: worktrees (and process-executor homes) are given to
    /// `user` before its commands run.
    pub give_worktree: bool,
    /// `user` is not the runner's own user.
    pub separate: bool,
}

impl JobUser {
    /// `runner`: the runner's own uid:gid; `configured`: `RUNNER_CONTAINER_USER`.
    pub fn decide(runner: ContainerUser, configured: ContainerUser) -> JobUser {
        if runner.uid == 0 {
            JobUser {
                user: configured,
                give_worktree: configured.uid != 0,
                separate: configured.uid != 0,
            }
        } else {
            JobUser {
                user: runner,
                give_worktree: false,
                separate: false,
            }
        }
    }

    /// For the runner as it runs now.
    pub fn current(configured: ContainerUser) -> JobUser {
        JobUser::decide(
            ContainerUser {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            },
            configured,
        )
    }

    /// What `/health` says as `isolation`: how far a job's commands are kept from the runner.
    pub fn isolation(&self, executor: ExecutorKind) -> String {
        match (executor, self.separate) {
            (ExecutorKind::Docker, _) => format!(
                "container: a hardened container per job, commands as {}",
                self.user
            ),
            (ExecutorKind::Process, true) => format!(
                "user: commands run on the host as {}, apart from the runner's user",
                self.user
            ),
            (ExecutorKind::Process, false) => {
                "none: commands run as the runner's own user".to_string()
            }
        }
    }

    /// The loud warning a runner logs at start when its commands are not kept from it.
    pub fn warning(&self, executor: ExecutorKind) -> Option<&'static str> {
        (executor == ExecutorKind::Process && !self.separate).then_some(
            "RUNNER_EXECUTOR=process without isolation: the runner is not root, so job commands run as the runner's own user and can read its files (RUNNER_STATE_DIR, the token in runner.json) and its environment through /proc; run the runner as root (commands then run as RUNNER_CONTAINER_USER) or use the docker executor",
        )
    }
}

/// Gives a directory tree to `user`, so the job's commands can edit it. Symbolic links are
/// changed themselves, never followed; the git metadata a worktree points to (in the runner's
/// mirror) stays the runner's.
pub fn give_tree(path: &Path, user: ContainerUser) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))?;
    if !std::fs::symlink_metadata(path)?.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        give_tree(&entry?.path(), user)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: ContainerUser = ContainerUser {
        uid: 1000,
        gid: 1000,
    };

    #[test]
    fn a_root_runner_runs_commands_as_the_configured_user() {
        let root = ContainerUser { uid: 0, gid: 0 };
        let u = JobUser::decide(root, AGENT);
        assert_eq!(
            u,
            JobUser {
                user: AGENT,
                give_worktree: true,
                separate: true
            }
        );
        assert_eq!(u.warning(ExecutorKind::Process), None);
        assert!(u.isolation(ExecutorKind::Process).starts_with("user: "));
        // An operator who configures root gets no separation, and is told so.
        let u = JobUser::decide(root, root);
        assert!(!u.separate && !u.give_worktree);
        assert!(u.warning(ExecutorKind::Process).is_some());
    }

    #[test]
    fn a_runner_that_is_not_root_warns_under_the_process_executor() {
        let own = ContainerUser { uid: 1234, gid: 99 };
        let u = JobUser::decide(own, AGENT);
        assert_eq!(
            u,
            JobUser {
                user: own,
                give_worktree: false,
                separate: false
            }
        );
        assert_eq!(
            u.isolation(ExecutorKind::Process),
            "none: commands run as the runner's own user"
        );
        let warning = u.warning(ExecutorKind::Process).unwrap();
        assert!(warning.contains("RUNNER_EXECUTOR=process"), "{warning}");
        // A container is its own isolation: no warning there.
        assert_eq!(u.warning(ExecutorKind::Docker), None);
        assert!(u.isolation(ExecutorKind::Docker).starts_with("container: "));
    }
}
