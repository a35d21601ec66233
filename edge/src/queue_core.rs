//! The dispatch state of one queue, as plain data: pending jobs ordered by priority then age,
//! leases (job → runner, expiry), connected runners and their free slots, the concurrency limit.
//! The Queue Durable Object persists this and performs the I/O; every decision is made here,
//! synchronously, so it can be tested natively with an explicit clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A job waiting for a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub job_id: String,
    pub priority: i32,
    /// Enqueue order; a requeued job keeps its original one.
    pub order: u64,
    /// Dispatches so far (0 for a new job).
    pub attempts: u32,
    pub owner: String,
    pub title: Option<String>,
    pub created_at: String,
}

/// A job held by a runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub job_id: String,
    pub lease_id: String,
    pub runner_id: String,
    pub attempt: u32,
    pub expires_at_ms: i64,
    pub started_at: String,
    /// The pending entry it came from, to requeue it as it was.
    pub pending: Pending,
}

/// A connected runner socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerSlot {
    pub runner_id: String,
    pub capacity: u32,
}

/// What to do with a job whose lease expired.
#[derive(Debug, Clone, PartialEq)]
pub enum Expired {
    /// Back in the queue; `attempts` dispatches so far.
    Requeued { job_id: String, lease_id: String, runner_id: String, attempts: u32 },
    /// Out of attempts.
    Failed { job_id: String, lease_id: String, runner_id: String, attempts: u32 },
}

#[derive(Debug, Clone, Default)]
pub struct QueueState {
    pub pending: Vec<Pending>,
    pub leases: BTreeMap<String, Lease>,
    pub runners: Vec<RunnerSlot>,
    pub next_order: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent: u32,
    pub lease_ms: i64,
    pub max_attempts: u32,
}

impl QueueState {
    fn sort_key(p: &Pending) -> (i64, u64) {
        (-(p.priority as i64), p.order)
    }

    /// Adds a new job; returns its 1-based position among pending jobs.
    pub fn enqueue(&mut self, mut job: Pending) -> u32 {
        job.order = self.next_order;
        self.next_order += 1;
        self.insert_pending(job.clone());
        self.position(&job.job_id).unwrap_or(0)
    }

    fn insert_pending(&mut self, job: Pending) {
        let key = Self::sort_key(&job);
        let at = self.pending.partition_point(|p| Self::sort_key(p) < key);
        self.pending.insert(at, job);
    }

    /// 1-based position of a pending job.
    pub fn position(&self, job_id: &str) -> Option<u32> {
        self.pending.iter().position(|p| p.job_id == job_id).map(|i| i as u32 + 1)
    }

    pub fn running(&self) -> u32 {
        self.leases.len() as u32
    }

    fn held_by(&self, runner_id: &str) -> u32 {
        self.leases.values().filter(|l| l.runner_id == runner_id).count() as u32
    }

    /// Free slots over all connected runners (ignoring the global limit).
    pub fn free_slots(&self) -> u32 {
        self.runners.iter().map(|r| r.capacity.saturating_sub(self.held_by(&r.runner_id))).sum()
    }

    /// A runner (re)connected with `capacity` slots, still running `held` (job, lease) pairs:
    /// matching leases are renewed and re-attached. Returns held jobs it must drop (no lease).
    pub fn connect(
        &mut self,
        runner_id: &str,
        capacity: u32,
        held: &[(String, String)],
        now_ms: i64,
        limits: Limits,
    ) -> Vec<String> {
        self.runners.retain(|r| r.runner_id != runner_id);
        self.runners.push(RunnerSlot { runner_id: runner_id.to_string(), capacity });
        self.heartbeat(runner_id, held, now_ms, limits)
    }

    pub fn disconnect(&mut self, runner_id: &str) {
        self.runners.retain(|r| r.runner_id != runner_id);
    }

    /// Renews the leases `runner_id` still holds; returns the jobs it reports but does not hold a
    /// lease for (cancelled, requeued elsewhere, or leased to another runner): the runner must stop
    /// them. A lease belongs to the runner it was given to: naming its id from another runner
    /// neither renews nor moves it.
    pub fn heartbeat(&mut self, runner_id: &str, held: &[(String, String)], now_ms: i64, limits: Limits) -> Vec<String> {
        let mut stale = vec![];
        for (job_id, lease_id) in held {
            match self.leases.get_mut(job_id) {
                Some(l) if &l.lease_id == lease_id && l.runner_id == runner_id => {
                    l.expires_at_ms = now_ms + limits.lease_ms;
                }
                _ => stale.push(job_id.clone()),
            }
        }
        stale
    }

    /// Pairs pending jobs with free slots while the concurrency limit allows. The runner with the
    /// most free slots gets each job (ties: the first connected). `new_lease_id` names leases.
    pub fn dispatch(&mut self, now_ms: i64, started_at: &str, limits: Limits, mut new_lease_id: impl FnMut() -> String) -> Vec<Lease> {
        let mut out = vec![];
        while self.running() < limits.max_concurrent && !self.pending.is_empty() {
            let best = self
                .runners
                .iter()
                .map(|r| (r.capacity.saturating_sub(self.held_by(&r.runner_id)), r.runner_id.clone()))
                .filter(|(free, _)| *free > 0)
                .fold(None::<(u32, String)>, |best, cand| match best {
                    Some(b) if b.0 >= cand.0 => Some(b),
                    _ => Some(cand),
                });
            let Some((_, runner_id)) = best else { break };
            let mut job = self.pending.remove(0);
            job.attempts += 1;
            let lease = Lease {
                job_id: job.job_id.clone(),
                lease_id: new_lease_id(),
                runner_id,
                attempt: job.attempts,
                expires_at_ms: now_ms + limits.lease_ms,
                started_at: started_at.to_string(),
                pending: job,
            };
            self.leases.insert(lease.job_id.clone(), lease.clone());
            out.push(lease);
        }
        out
    }

    /// Removes a job wherever it is (finished, cancelled). Returns its lease if it was running.
    pub fn release(&mut self, job_id: &str) -> Option<Lease> {
        self.pending.retain(|p| p.job_id != job_id);
        self.leases.remove(job_id)
    }

    /// Gives a leased job back to the queue at its old place (a dispatch the job refused).
    pub fn unlease(&mut self, job_id: &str) {
        if let Some(lease) = self.leases.remove(job_id) {
            let mut job = lease.pending;
            job.attempts = job.attempts.saturating_sub(1);
            self.insert_pending(job);
        }
    }

    /// Expires leases not renewed by `now_ms`: requeued while attempts remain, else failed.
    pub fn expire(&mut self, now_ms: i64, limits: Limits) -> Vec<Expired> {
        let expired: Vec<String> =
            self.leases.values().filter(|l| l.expires_at_ms <= now_ms).map(|l| l.job_id.clone()).collect();
        let mut out = vec![];
        for job_id in expired {
            let lease = self.leases.remove(&job_id).expect("listed above");
            let attempts = lease.pending.attempts;
            if attempts < limits.max_attempts {
                self.insert_pending(lease.pending);
                out.push(Expired::Requeued { job_id, lease_id: lease.lease_id, runner_id: lease.runner_id, attempts });
            } else {
                out.push(Expired::Failed { job_id, lease_id: lease.lease_id, runner_id: lease.runner_id, attempts });
            }
        }
        out
    }

    /// When the next lease expires, if any.
    pub fn next_expiry(&self) -> Option<i64> {
        self.leases.values().map(|l| l.expires_at_ms).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_concurrent: 2, lease_ms: 30_000, max_attempts: 3 };

    fn job(id: &str, priority: i32) -> Pending {
        Pending { job_id: id.into(), priority, order: 0, attempts: 0, owner: "o".into(), title: None, created_at: "t".into() }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("lease-{n}")
        }
    }

    #[test]
    fn pending_is_ordered_by_priority_then_age() {
        let mut q = QueueState::default();
        assert_eq!(q.enqueue(job("a", 0)), 1);
        assert_eq!(q.enqueue(job("b", 0)), 2);
        assert_eq!(q.enqueue(job("c", 5)), 1, "higher priority goes first");
        assert_eq!(q.enqueue(job("d", -1)), 4);
        let order: Vec<_> = q.pending.iter().map(|p| p.job_id.as_str()).collect();
        assert_eq!(order, ["c", "a", "b", "d"]);
    }

    #[test]
    fn nothing_dispatches_without_a_runner() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        assert!(q.dispatch(0, "t", LIMITS, ids()).is_empty());
    }

    #[test]
    fn dispatch_respects_the_global_limit_and_runner_capacity() {
        let mut q = QueueState::default();
        for id in ["a", "b", "c", "d"] {
            q.enqueue(job(id, 0));
        }
        q.connect("r1", 1, &[], 0, LIMITS);
        let leases = q.dispatch(0, "t", LIMITS, ids());
        assert_eq!(leases.len(), 1, "r1 has one slot");
        q.connect("r2", 4, &[], 0, LIMITS);
        let leases = q.dispatch(0, "t", LIMITS, ids());
        assert_eq!(leases.len(), 1, "the global limit is 2");
        assert_eq!(leases[0].runner_id, "r2");
        assert_eq!(q.running(), 2);
        assert_eq!(q.pending.len(), 2);
        q.release("a");
        let leases = q.dispatch(0, "t", LIMITS, ids());
        assert_eq!(leases.iter().map(|l| l.job_id.as_str()).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn leases_expire_into_requeue_then_failure() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.enqueue(job("b", 0));
        q.connect("r1", 1, &[], 0, LIMITS);
        for attempt in 1..=3 {
            let leases = q.dispatch(0, "t", LIMITS, ids());
            assert_eq!((leases[0].job_id.as_str(), leases[0].attempt), ("a", attempt), "a keeps its place");
            let lease_id = leases[0].lease_id.clone();
            assert!(q.expire(29_999, LIMITS).is_empty(), "not yet");
            let expired = q.expire(30_000, LIMITS);
            if attempt < 3 {
                assert_eq!(expired, vec![Expired::Requeued { job_id: "a".into(), lease_id, runner_id: "r1".into(), attempts: attempt }]);
            } else {
                assert_eq!(expired, vec![Expired::Failed { job_id: "a".into(), lease_id, runner_id: "r1".into(), attempts: 3 }]);
            }
        }
        assert_eq!(q.position("b"), Some(1));
    }

    #[test]
    fn heartbeats_renew_and_reconnects_reattach() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.connect("r1", 2, &[], 0, LIMITS);
        let lease = q.dispatch(0, "t", LIMITS, ids()).remove(0);
        let held = vec![("a".to_string(), lease.lease_id.clone())];
        assert!(q.heartbeat("r1", &held, 20_000, LIMITS).is_empty());
        assert!(q.expire(30_000, LIMITS).is_empty(), "renewed at 20s");
        q.disconnect("r1");
        assert_eq!(q.free_slots(), 0);
        let stale = q.connect("r1", 2, &[held[0].clone(), ("gone".into(), "x".into())], 40_000, LIMITS);
        assert_eq!(stale, vec!["gone".to_string()]);
        assert_eq!(q.next_expiry(), Some(70_000));
        assert_eq!(q.free_slots(), 1);
        let wrong = vec![("a".to_string(), "other-lease".to_string())];
        assert_eq!(q.heartbeat("r1", &wrong, 50_000, LIMITS), vec!["a".to_string()], "a stale lease is refused");
    }

    #[test]
    fn another_runner_cannot_renew_or_move_a_lease() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.connect("r1", 1, &[], 0, LIMITS);
        let lease = q.dispatch(0, "t", LIMITS, ids()).remove(0);
        let stolen = vec![("a".to_string(), lease.lease_id.clone())];
        assert_eq!(q.connect("r2", 1, &stolen, 10_000, LIMITS), stolen.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>(), "r2 must drop it");
        assert_eq!(q.heartbeat("r2", &stolen, 20_000, LIMITS), vec!["a".to_string()]);
        let l = &q.leases["a"];
        assert_eq!((l.runner_id.as_str(), l.expires_at_ms), ("r1", 30_000), "neither moved nor renewed");
        assert_eq!(q.free_slots(), 1, "r2's slot stays free, r1's stays taken");
        let expired = q.expire(30_000, LIMITS);
        assert_eq!(expired, vec![Expired::Requeued { job_id: "a".into(), lease_id: lease.lease_id, runner_id: "r1".into(), attempts: 1 }]);
    }

    #[test]
    fn unlease_puts_a_job_back_in_place() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.enqueue(job("b", 0));
        q.connect("r1", 1, &[], 0, LIMITS);
        q.dispatch(0, "t", LIMITS, ids());
        q.unlease("a");
        assert_eq!(q.position("a"), Some(1));
        assert_eq!(q.pending[0].attempts, 0);
    }
}
