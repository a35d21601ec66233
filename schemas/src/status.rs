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
    /// Seed 000's app builder: requirements chat (`collecting`), then a pipeline on a runner
    /// (executive planning, PRD, tickets, one build agent run per ticket). Its face renders the
    /// core status with its [`AppPhase`] as seed 000's statuses ([`app_status`]).
    AppBuild,
    /// Seed 001's init job: a landing page's node graph from a session's payload.
    LandingInit,
    /// Seed 001's chat job: the graph again over the session's page, with a user's request.
    LandingChat,
    /// Seed 002's task for one of the owner's agents (`/api/v1/tasks`, `execute`).
    AgentTask,
    /// Seed 002's learning cycle of an agent (`learn`).
    AgentLearn,
    /// Seed 002's LLM round table (`/api/v1/round-table/compete`).
    RoundTable,
    /// Seed 002's 3D asset pipeline (`/api/v1/3d`).
    Pipeline3d,
}

impl JobType {
    pub const ALL: [JobType; 10] = [
        JobType::Code,
        JobType::Task,
        JobType::Ralph,
        JobType::AppBuild,
        JobType::LandingInit,
        JobType::LandingChat,
        JobType::AgentTask,
        JobType::AgentLearn,
        JobType::RoundTable,
        JobType::Pipeline3d,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Code => "code",
            JobType::Task => "task",
            JobType::Ralph => "ralph",
            JobType::AppBuild => "app_build",
            JobType::LandingInit => "landing_init",
            JobType::LandingChat => "landing_chat",
            JobType::AgentTask => "agent_task",
            JobType::AgentLearn => "agent_learn",
            JobType::RoundTable => "round_table",
            JobType::Pipeline3d => "pipeline_3d",
        }
    }

    /// Whether `POST /jobs` (seed 003) may create this kind; the others have their own face.
    pub fn is_seed_003(self) -> bool {
        matches!(self, JobType::Code | JobType::Task | JobType::Ralph)
    }

    /// Seed 001's landing-page kinds.
    pub fn is_landing(self) -> bool {
        matches!(self, JobType::LandingInit | JobType::LandingChat)
    }

    /// Seed 002's dashboard kinds.
    pub fn is_dashboard(self) -> bool {
        matches!(self, JobType::AgentTask | JobType::AgentLearn | JobType::RoundTable | JobType::Pipeline3d)
    }

    /// Whether a job of this kind may go `from → to`: [`JobStatus::can_become`], and for an app
    /// build also a continuation run (`completed | failed → queued`, seed 000's `/continue/`).
    pub fn allows(self, from: JobStatus, to: JobStatus) -> bool {
        from.can_become(to)
            || (self == JobType::AppBuild
                && matches!((from, to), (JobStatus::Completed | JobStatus::Failed, JobStatus::Queued)))
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A job's core lifecycle status (seed 003: `queued → running → completed | failed |
/// cancelled`; an app build starts in `collecting`, its requirements chat, before it is queued).
/// Faces with their own names map these (with an app build's [`AppPhase`]) onto them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Collecting,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Collecting,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Collecting => "collecting",
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

    /// The core status behind a status as any face names it in a `jobStatus` event: the core
    /// names, seed 000's (`build_done`, the app phases) and seed 001's (`pending`).
    pub fn from_face(s: &str) -> Option<Self> {
        Self::parse(s).or(match s {
            "build_done" => Some(JobStatus::Completed),
            "pending" => Some(JobStatus::Queued),
            _ => AppPhase::parse(s).map(|_| JobStatus::Running),
        })
    }

    /// Terminal statuses never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// Whether `self → to` is allowed. `running → queued` is the requeue of a job whose runner
    /// was lost; `queued → failed` is a job that can never be dispatched (attempts exhausted).
    /// Kinds may allow more ([`JobType::allows`]).
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Collecting, Queued)
                | (Collecting, Failed)
                | (Collecting, Cancelled)
                | (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Queued)
        )
    }
}

/// Where an app build's pipeline is while its core status is `running` (seed 000's statuses
/// between `queued` and `build_done`). Set by the runner, forward only, reset by a requeue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AppPhase {
    Planning,
    PrdReady,
    Ticketing,
    TicketsReady,
    Building,
}

impl AppPhase {
    pub const ALL: [AppPhase; 5] =
        [AppPhase::Planning, AppPhase::PrdReady, AppPhase::Ticketing, AppPhase::TicketsReady, AppPhase::Building];

    pub fn as_str(self) -> &'static str {
        match self {
            AppPhase::Planning => "planning",
            AppPhase::PrdReady => "prd_ready",
            AppPhase::Ticketing => "ticketing",
            AppPhase::TicketsReady => "tickets_ready",
            AppPhase::Building => "building",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Phases only move forward (skipping is allowed: a continuation run may go from planning
    /// straight to ticketing); staying is not a change.
    pub fn can_become(self, to: AppPhase) -> bool {
        (to as u8) > (self as u8)
    }
}

/// Seed 000's status of an app build: the core status, with the phase while it runs.
/// `completed` is `build_done`; `cancelled` is `failed` (seed 000 has no cancelled status).
pub fn app_status(status: JobStatus, phase: Option<AppPhase>) -> &'static str {
    match status {
        JobStatus::Collecting => "collecting",
        JobStatus::Queued => "queued",
        JobStatus::Running => phase.unwrap_or(AppPhase::Planning).as_str(),
        JobStatus::Completed => "build_done",
        JobStatus::Failed | JobStatus::Cancelled => "failed",
    }
}

/// Every status seed 000 documents, in lifecycle order.
pub const APP_STATUSES: [&str; 9] =
    ["collecting", "queued", "planning", "prd_ready", "ticketing", "tickets_ready", "building", "build_done", "failed"];

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
    fn collecting_leads_to_the_queue_and_app_builds_continue() {
        use JobStatus::*;
        assert!(Collecting.can_become(Queued));
        assert!(Collecting.can_become(Failed));
        assert!(!Collecting.can_become(Running), "a collecting job is queued before it runs");
        assert!(!Queued.can_become(Collecting));
        assert!(JobType::AppBuild.allows(Completed, Queued), "continuation");
        assert!(JobType::AppBuild.allows(Failed, Queued), "continuation after a failure");
        assert!(!JobType::AppBuild.allows(Cancelled, Queued));
        assert!(!JobType::Code.allows(Completed, Queued));
        assert!(JobType::Code.allows(Queued, Running));
    }

    #[test]
    fn app_statuses_are_seed_000s() {
        use JobStatus::*;
        assert_eq!(app_status(Collecting, None), "collecting");
        assert_eq!(app_status(Running, None), "planning");
        assert_eq!(app_status(Running, Some(AppPhase::Ticketing)), "ticketing");
        assert_eq!(app_status(Completed, Some(AppPhase::Building)), "build_done");
        assert_eq!(app_status(Cancelled, None), "failed");
        for s in JobStatus::ALL {
            for p in AppPhase::ALL.map(Some).into_iter().chain([None]) {
                assert!(APP_STATUSES.contains(&app_status(s, p)));
            }
        }
        assert!(AppPhase::Planning.can_become(AppPhase::PrdReady));
        assert!(AppPhase::Planning.can_become(AppPhase::Ticketing));
        assert!(!AppPhase::Building.can_become(AppPhase::Planning));
        assert!(!AppPhase::Building.can_become(AppPhase::Building));
        for p in AppPhase::ALL {
            assert_eq!(AppPhase::parse(p.as_str()), Some(p));
        }
    }

    #[test]
    fn face_statuses_map_to_core_ones() {
        assert_eq!(JobStatus::from_face("build_done"), Some(JobStatus::Completed));
        assert_eq!(JobStatus::from_face("ticketing"), Some(JobStatus::Running));
        assert_eq!(JobStatus::from_face("pending"), Some(JobStatus::Queued));
        assert_eq!(JobStatus::from_face("failed"), Some(JobStatus::Failed));
        assert_eq!(JobStatus::from_face("nope"), None);
        for s in APP_STATUSES {
            assert!(JobStatus::from_face(s).is_some(), "{s}");
        }
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
