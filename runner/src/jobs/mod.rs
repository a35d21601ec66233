//! The jobs this runner holds: the table the edge's messages act on (assign, cancel, deliver,
//! complete, stop), the capacity limit, and what heartbeats report.

mod app_build;
mod code;
mod dashboard;
mod landing;
mod pipeline_3d;
mod ralph;
mod run;
mod task;

pub use app_build::{fenced_json, parse_backlog, parse_prd, ticket_prompt};
pub use ralph::{build_prompt, progress_entry};
pub(crate) use run::{CommandResult, JobRun};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_schemas::grants::{ProtectedBranches, RepoPattern};
use kiln_schemas::runner::{Assignment, HeldJob};
use kiln_schemas::status::JobType;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{AgentProfile, JobLimits};
use crate::edge::EdgeClient;
use crate::executor::Executor;
use crate::github::GithubClient;
use crate::llm::LlmClient;
use crate::metrics::Metrics;
use crate::workspace::{RepoRef, Workspaces};

/// What every job needs from the runner.
pub struct JobServices {
    pub executor: Arc<dyn Executor>,
    pub workspaces: Arc<Workspaces>,
    pub github: GithubClient,
    pub edge: EdgeClient,
    pub agent: AgentProfile,
    /// `RUNNER_REPOSITORIES`; empty: every repository.
    pub repositories: Vec<RepoPattern>,
    pub protected_branches: ProtectedBranches,
    pub runner_name: String,
    pub metrics: Arc<Metrics>,
    /// `RUNNER_JOB_TIMEOUT`, `RUNNER_TASK_IDLE_TIMEOUT`, `RUNNER_WORKSPACE_MAX_MB`.
    pub limits: JobLimits,
    /// `RUNNER_EVENT_BUFFER_MB`, in bytes: each job's buffer of events not yet posted.
    pub event_buffer_bytes: usize,
    /// The LLM client of pipeline jobs' steps (`[llm]`; its budget is every job's).
    pub llm: LlmClient,
    /// `[three_d]`: the 3D pipeline's vendor and WordPress site.
    pub three_d: crate::three_d::ThreeDConfig,
}

impl JobServices {
    /// Whether this runner may work on `repo` and push `branch`: the repository is within
    /// `RUNNER_REPOSITORIES` and the branch is not protected (nor the base branch it targets).
    pub fn may_touch(
        &self,
        repo: &RepoRef,
        branch: &str,
        base_branch: Option<&str>,
    ) -> Result<(), String> {
        if !self.repositories.is_empty()
            && !self
                .repositories
                .iter()
                .any(|p| p.matches(&repo.org, &repo.repo))
        {
            let list: Vec<String> = self.repositories.iter().map(|p| p.to_string()).collect();
            return Err(format!(
                "This runner does not work on {}: its RUNNER_REPOSITORIES are {}",
                repo.slug(),
                list.join(", ")
            ));
        }
        self.protected_branches
            .check(branch, base_branch)
            .map_err(|e| format!("Refused: {e}"))
    }
}

/// A message from the edge for a running job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobControl {
    /// A user's message for a task job's agent.
    Deliver(String),
    /// Close a task job's input and finish.
    Complete,
    /// Stop a ralph job after the current iteration.
    Stop,
    /// Pause a pipeline job between steps.
    Pause,
    /// Go on with a paused pipeline job.
    Resume,
}

/// Fires once; every clone sees it.
#[derive(Clone)]
pub struct CancelToken(Arc<watch::Sender<bool>>);

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken(Arc::new(watch::channel(false).0))
    }
}

impl CancelToken {
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

struct JobEntry {
    lease_id: String,
    job_type: JobType,
    controls: mpsc::UnboundedSender<JobControl>,
    cancel: CancelToken,
    /// False while the job waits for a free slot.
    started: Arc<AtomicBool>,
    /// The job gave its slot back: its `finished` is handed to the reporter (the edge frees the
    /// slot when it hears it), or it was cancelled (the edge freed it already).
    ended: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl JobEntry {
    fn takes_slot(&self) -> bool {
        !self.ended.load(Ordering::SeqCst) && !self.cancel.is_cancelled()
    }
}

struct Inner {
    services: Arc<JobServices>,
    capacity: u32,
    slots: Arc<Semaphore>,
    jobs: Mutex<HashMap<String, JobEntry>>,
}

/// The job table. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    pub fn new(services: Arc<JobServices>, capacity: u32) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                services,
                capacity,
                slots: Arc::new(Semaphore::new(capacity as usize)),
                jobs: Mutex::default(),
            }),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    /// Takes a job. The edge is the authority on capacity: an assignment beyond it is accepted,
    /// logged, and waits here for a slot (its lease is renewed by heartbeats meanwhile). A job
    /// holds a slot until it hands over its `finished` or is cancelled, as the edge counts it;
    /// removing its worktree and delivering its last events happen off the slot.
    pub fn assign(&self, assignment: Assignment) {
        let job_id = assignment.job_id.clone();
        let mut jobs = self.inner.jobs.lock().unwrap();
        if let Some(held) = jobs.get(&job_id) {
            tracing::warn!(job_id, lease_id = %assignment.lease_id, held_lease = %held.lease_id, "assignment for a job already held; ignored");
            return;
        }
        let in_slots = jobs.values().filter(|e| e.takes_slot()).count();
        if in_slots >= self.inner.capacity as usize {
            tracing::warn!(
                job_id,
                held = in_slots,
                capacity = self.inner.capacity,
                "assignment beyond capacity; it waits for a free slot"
            );
        }
        tracing::info!(
            job_id,
            job_type = assignment.job_type.as_str(),
            attempt = assignment.attempt,
            "job assigned"
        );
        Metrics::inc(&self.inner.services.metrics.jobs_assigned);
        let (controls, controls_rx) = mpsc::unbounded_channel();
        let cancel = CancelToken::default();
        let started = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let entry = JobEntry {
            lease_id: assignment.lease_id.clone(),
            job_type: assignment.job_type,
            controls,
            cancel: cancel.clone(),
            started: started.clone(),
            ended: ended.clone(),
            task: None,
        };
        jobs.insert(job_id.clone(), entry);
        let services = self.inner.services.clone();
        let slots = self.inner.slots.clone();
        let weak = Arc::downgrade(&self.inner);
        let key = job_id.clone();
        let task = tokio::spawn(async move {
            run::run_job(services, assignment, slots, started, ended, controls_rx, cancel).await;
            if let Some(inner) = weak.upgrade() {
                inner.jobs.lock().unwrap().remove(&job_id);
            }
        });
        // The task removes its entry when done, which waits for this lock: the entry is still here.
        if let Some(entry) = jobs.get_mut(&key) {
            entry.task = Some(task);
        }
    }

    /// Kills a job at once: no further events, workspace removed. False if it is not held here.
    pub fn cancel(&self, job_id: &str) -> bool {
        match self.inner.jobs.lock().unwrap().get(job_id) {
            Some(entry) => {
                tracing::info!(job_id, "cancelling job");
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every job held (as [`Supervisor::cancel`] does each); answers how many.
    pub fn cancel_all(&self) -> usize {
        let jobs = self.inner.jobs.lock().unwrap();
        for (job_id, entry) in jobs.iter() {
            tracing::warn!(job_id, "cancelling job");
            entry.cancel.cancel();
        }
        jobs.len()
    }

    /// Passes a message to a job. False if it is not held here.
    pub fn control(&self, job_id: &str, control: JobControl) -> bool {
        let jobs = self.inner.jobs.lock().unwrap();
        let Some(entry) = jobs.get(job_id) else {
            return false;
        };
        let fits = matches!(
            (&control, entry.job_type),
            (JobControl::Deliver(_) | JobControl::Complete, JobType::Task)
                | (JobControl::Stop, JobType::Ralph)
                | (
                    JobControl::Pause | JobControl::Resume,
                    JobType::AppBuild | JobType::LandingInit | JobType::LandingChat
                )
        );
        if !fits {
            tracing::warn!(
                job_id,
                ?control,
                job_type = entry.job_type.as_str(),
                "message does not apply to this kind of job; ignored"
            );
            return false;
        }
        entry.controls.send(control).is_ok()
    }

    /// The jobs held, for `hello` and heartbeats. A cancelled job being cleaned up is not
    /// listed: its lease is not to be renewed.
    pub fn held(&self) -> Vec<HeldJob> {
        let jobs = self.inner.jobs.lock().unwrap();
        let mut held: Vec<HeldJob> = jobs
            .iter()
            .filter(|(_, e)| !e.cancel.is_cancelled())
            .map(|(id, e)| HeldJob {
                job_id: id.clone(),
                lease_id: e.lease_id.clone(),
            })
            .collect();
        held.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        held
    }

    /// Whether the job is in the table: held, or cancelled and still being cleaned up.
    pub fn holds(&self, job_id: &str) -> bool {
        self.inner.jobs.lock().unwrap().contains_key(job_id)
    }

    /// (running, waiting for a slot).
    pub fn counts(&self) -> (u32, u32) {
        let jobs = self.inner.jobs.lock().unwrap();
        let running = jobs
            .values()
            .filter(|e| e.started.load(Ordering::SeqCst))
            .count() as u32;
        (running, jobs.len() as u32 - running)
    }

    /// Cancels every job and waits until their workspaces are cleaned up.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut jobs = self.inner.jobs.lock().unwrap();
            jobs.values_mut()
                .filter_map(|e| {
                    e.cancel.cancel();
                    e.task.take()
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
    }
}
