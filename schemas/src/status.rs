//! Job kinds, statuses and the one table of allowed status transitions that edge and runner share.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind of work a job does (seed 003's `jobType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobType {
    /// Agent once, one commit, push, pull request.
    Code,
    /// Interactive: messages are relayed to the running agent until the job is completed.
    Task,
    /// Agent and feedback commands in a loop until the completion promise or a limit.
    Ralph,
}

impl JobType {
    pub const ALL: [JobType; 3] = [JobType::Code, JobType::Task, JobType::Ralph];

    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Code => "code",
            JobType::Task => "task",
            JobType::Ralph => "ralph",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A job's lifecycle status (seed 003: `queued → running → completed | failed | cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Terminal statuses never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// Whether `self → to` is allowed. `running → queued` is the requeue of a job whose runner
    /// was lost; `queued → failed` is a job that can never be dispatched (attempts exhausted).
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Queued)
        )
    }
}

/// Why a ralph loop ended (seed 003's `completion_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompletionReason {
    PromiseDetected,
    MaxIterations,
    ManualStop,
    IterationError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_statuses_have_no_way_out() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobStatus::ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?} must be refused");
            }
        }
    }

    #[test]
    fn the_documented_lifecycle_is_allowed() {
        use JobStatus::*;
        assert!(Queued.can_become(Running));
        assert!(Running.can_become(Completed));
        assert!(Running.can_become(Failed));
        assert!(Queued.can_become(Cancelled));
        assert!(Running.can_become(Cancelled));
        assert!(Running.can_become(Queued), "requeue after a lost runner");
        assert!(!Queued.can_become(Completed), "a job never completes without running");
        assert!(!Queued.can_become(Queued));
    }

    #[test]
    fn names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for t in JobType::ALL {
            assert_eq!(JobType::parse(t.as_str()), Some(t));
        }
        assert_eq!(JobType::parse("Code"), None);
    }
}
