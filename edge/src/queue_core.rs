//! The dispatch state of one queue, as plain data: pending jobs ordered by priority then age,
//! leases (job → runner, expiry), connected runners and their free slots, the concurrency limits.
//! Owners are served fairly: each free slot goes to the owner with the fewest running jobs (ties:
//! whose next job waited longest), under `max_per_owner`; `priority` orders an owner's own jobs.
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
    /// Jobs with one serial key run one at a time, oldest first (a landing page's jobs:
    /// `landing:<landing_page_id>`); a key's waiting job blocks no other job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When the job was submitted (epoch ms; 0 when not known): its assignment says how long ago.
    #[serde(default)]
    pub submitted_ms: i64,
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
    /// The job's room accepted the lease (the job is `running` under it). Until then the runner
    /// has not been told, and the queue retries telling the room under the same lease id.
    #[serde(default)]
    pub announced: bool,
}

/// A connected runner socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerSlot {
    pub runner_id: String,
    pub capacity: u32,
    /// The socket this slot came from: only that socket's close forgets the runner.
    #[serde(default)]
    pub socket_id: String,
}

/// What to do with a job whose lease expired.
#[derive(Debug, Clone, PartialEq)]
pub enum Expired {
    /// Back in the queue; `attempts` dispatches so far.
    Requeued { job_id: String, lease_id: String, runner_id: String, attempts: u32 },
    /// Out of attempts.
    Failed { job_id: String, lease_id: String, runner_id: String, attempts: u32 },
    /// A lease the room never accepted (so no runner was told): back in the queue, no attempt used.
    Returned { job_id: String },
}

#[derive(Debug, Clone, Default)]
pub struct QueueState {
    pub pending: Vec<Pending>,
    pub leases: BTreeMap<String, Lease>,
    pub runners: Vec<RunnerSlot>,
    pub next_order: u64,
    /// Jobs whose lease was released (ended: its runner's `finished`, a cancel) → the runner that
    /// held it and when a heartbeat first came after the release, for a lease's time. A runner
    /// lists a job until the edge has its last events, and heartbeats may arrive in any order
    /// with the release: such a job is neither renewed nor cancelled again. Not persisted: after
    /// a restart a runner may at worst hear one needless cancel.
    pub released: BTreeMap<String, (String, i64)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent: u32,
    /// Jobs of one owner running at once (0: only `max_concurrent` applies).
    pub max_per_owner: u32,
    pub lease_ms: i64,
    pub max_attempts: u32,
}

impl QueueState {
    fn sort_key(p: &Pending) -> (i64, u64) {
        (-(p.priority as i64), p.order)
    }

    /// Adds a new job; returns its 1-based position among its owner's pending jobs. A job the
    /// queue already holds (pending or leased) is left as it is (enqueue is idempotent).
    pub fn enqueue(&mut self, mut job: Pending) -> u32 {
        if self.leases.contains_key(&job.job_id) {
            return 0;
        }
        if let Some(pos) = self.position(&job.job_id) {
            return pos;
        }
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

    /// 1-based position of a pending job in its owner's line (priority, then age).
    pub fn position(&self, job_id: &str) -> Option<u32> {
        let owner = &self.pending.iter().find(|p| p.job_id == job_id)?.owner;
        self.pending.iter().filter(|p| &p.owner == owner).position(|p| p.job_id == job_id).map(|i| i as u32 + 1)
    }

    /// Whether the job is pending or leased here.
    pub fn holds(&self, job_id: &str) -> bool {
        self.leases.contains_key(job_id) || self.pending.iter().any(|p| p.job_id == job_id)
    }

    pub fn running(&self) -> u32 {
        self.leases.len() as u32
    }

    fn running_of(&self, owner: &str) -> u32 {
        self.leases.values().filter(|l| l.pending.owner == owner).count() as u32
    }

    /// Whether a pending job may be leased now as far as its serial key goes: no job of its key
    /// is leased, and it is its key's oldest pending job.
    fn serial_free(&self, p: &Pending) -> bool {
        let Some(key) = &p.serial else { return true };
        !self.leases.values().any(|l| l.pending.serial.as_ref() == Some(key))
            && !self.pending.iter().any(|o| o.serial.as_ref() == Some(key) && o.order < p.order)
    }

    /// The pending job to dispatch next: the head (priority, then age) of the owner with the
    /// fewest running jobs below `max_per_owner`; ties go to the owner whose head waited longest.
    /// A job its serial key holds back is skipped: the owner's next job stands in for it.
    fn next_pending(&self, limits: Limits) -> Option<usize> {
        let mut seen = std::collections::BTreeSet::new();
        let mut best: Option<((u32, u64), usize)> = None;
        for (i, p) in self.pending.iter().enumerate() {
            if seen.contains(p.owner.as_str()) || !self.serial_free(p) {
                continue;
            }
            seen.insert(p.owner.as_str());
            let running = self.running_of(&p.owner);
            if limits.max_per_owner > 0 && running >= limits.max_per_owner {
                continue;
            }
            let key = (running, p.order);
            if best.as_ref().is_none_or(|(b, _)| key < *b) {
                best = Some((key, i));
            }
        }
        best.map(|(_, i)| i)
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
        socket_id: &str,
        capacity: u32,
        held: &[(String, String)],
        now_ms: i64,
        limits: Limits,
    ) -> Vec<String> {
        self.runners.retain(|r| r.runner_id != runner_id);
        self.runners.push(RunnerSlot { runner_id: runner_id.to_string(), capacity, socket_id: socket_id.to_string() });
        // A hello may follow lost messages: whatever it holds without a lease is told again.
        self.released.retain(|_, (r, _)| r != runner_id);
        self.heartbeat(runner_id, held, now_ms, limits)
    }

    /// Socket `socket_id` of `runner_id` closed: the runner stops counting as capacity, unless it
    /// has connected again on another socket since. Returns whether the runner was forgotten.
    pub fn disconnect(&mut self, runner_id: &str, socket_id: &str) -> bool {
        let before = self.runners.len();
        self.runners.retain(|r| !(r.runner_id == runner_id && r.socket_id == socket_id));
        let forgotten = self.runners.len() != before;
        if forgotten {
            self.released.retain(|_, (r, _)| r != runner_id);
        }
        forgotten
    }

    /// The socket a runner is currently connected on.
    pub fn socket_of(&self, runner_id: &str) -> Option<&str> {
        self.runners.iter().find(|r| r.runner_id == runner_id).map(|r| r.socket_id.as_str())
    }

    /// Renews the leases `runner_id` still holds; returns the jobs it reports but does not hold a
    /// lease for (cancelled, requeued elsewhere, or leased to another runner): the runner must stop
    /// them. A lease belongs to the runner it was given to: naming its id from another runner
    /// neither renews nor moves it. A job released while the runner held it (see
    /// [`QueueState::released`]) is not stale: the runner is delivering its end, or was told.
    pub fn heartbeat(&mut self, runner_id: &str, held: &[(String, String)], now_ms: i64, limits: Limits) -> Vec<String> {
        self.released.retain(|_, (_, at)| *at == i64::MAX || *at + limits.lease_ms > now_ms);
        let mut stale = vec![];
        for (job_id, lease_id) in held {
            match self.leases.get_mut(job_id) {
                Some(l) if &l.lease_id == lease_id && l.runner_id == runner_id => {
                    l.expires_at_ms = now_ms + limits.lease_ms;
                    // The runner has it, so the room accepted it.
                    l.announced = true;
                }
                None if self.released.get(job_id).is_some_and(|(r, _)| r == runner_id) => {}
                _ => stale.push(job_id.clone()),
            }
        }
        // Tolerated for a lease's time from the first heartbeat after the release.
        for (_, at) in self.released.values_mut() {
            if *at == i64::MAX {
                *at = now_ms;
            }
        }
        stale
    }

    /// Pairs pending jobs with free slots while the concurrency limits allow, owners served fairly
    /// (see [`QueueState::next_pending`]). The runner with the most free slots gets each job (ties:
    /// the first connected). `new_lease_id` names leases; they start unannounced.
    pub fn dispatch(&mut self, now_ms: i64, started_at: &str, limits: Limits, mut new_lease_id: impl FnMut() -> String) -> Vec<Lease> {
        let mut out = vec![];
        while self.running() < limits.max_concurrent && !self.pending.is_empty() {
            let Some(next) = self.next_pending(limits) else { break };
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
            let mut job = self.pending.remove(next);
            job.attempts += 1;
            self.released.remove(&job.job_id);
            let lease = Lease {
                job_id: job.job_id.clone(),
                lease_id: new_lease_id(),
                runner_id,
                attempt: job.attempts,
                expires_at_ms: now_ms + limits.lease_ms,
                started_at: started_at.to_string(),
                pending: job,
                announced: false,
            };
            self.leases.insert(lease.job_id.clone(), lease.clone());
            out.push(lease);
        }
        out
    }

    /// Removes a job wherever it is (finished, cancelled). Returns its lease if it was running.
    pub fn release(&mut self, job_id: &str) -> Option<Lease> {
        self.pending.retain(|p| p.job_id != job_id);
        let lease = self.leases.remove(job_id);
        if let Some(l) = &lease {
            if l.announced && self.runners.iter().any(|r| r.runner_id == l.runner_id) {
                self.released.insert(job_id.to_string(), (l.runner_id.clone(), i64::MAX));
            }
        }
        lease
    }

    /// Gives a leased job back to the queue at its old place (a dispatch the job refused).
    pub fn unlease(&mut self, job_id: &str) {
        if let Some(lease) = self.leases.remove(job_id) {
            let mut job = lease.pending;
            job.attempts = job.attempts.saturating_sub(1);
            self.insert_pending(job);
        }
    }

    /// The room accepted lease `lease_id` of `job_id`. Returns false if the queue holds the job
    /// under another lease (or not at all).
    pub fn mark_announced(&mut self, job_id: &str, lease_id: &str) -> bool {
        match self.leases.get_mut(job_id) {
            Some(l) if l.lease_id == lease_id => {
                l.announced = true;
                true
            }
            _ => false,
        }
    }

    /// Leases whose room has not accepted them yet.
    pub fn unannounced(&self) -> Vec<Lease> {
        self.leases.values().filter(|l| !l.announced).cloned().collect()
    }

    /// Puts back a lease whose room could not be told that it expired, to try again at `retry_at_ms`.
    pub fn reinstate(&mut self, mut lease: Lease, retry_at_ms: i64) {
        self.pending.retain(|p| p.job_id != lease.job_id);
        lease.expires_at_ms = retry_at_ms;
        self.leases.insert(lease.job_id.clone(), lease);
    }

    /// Expires leases not renewed by `now_ms`: requeued while attempts remain, else failed. A lease
    /// the room never accepted goes back without using an attempt.
    pub fn expire(&mut self, now_ms: i64, limits: Limits) -> Vec<Expired> {
        let expired: Vec<String> =
            self.leases.values().filter(|l| l.expires_at_ms <= now_ms).map(|l| l.job_id.clone()).collect();
        let mut out = vec![];
        for job_id in expired {
            let lease = self.leases.remove(&job_id).expect("listed above");
            if !lease.announced {
                let mut job = lease.pending;
                job.attempts = job.attempts.saturating_sub(1);
                self.insert_pending(job);
                out.push(Expired::Returned { job_id });
                continue;
            }
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

/// Test-only faults from `KILN_FAULTS` (`name=N,name=N`), read only by builds with the `faults`
/// feature: each named fault fires the next N times its point is reached.
#[cfg(any(test, feature = "faults"))]
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Faults(BTreeMap<String, u32>);

#[cfg(any(test, feature = "faults"))]
impl Faults {
    pub fn parse(spec: &str) -> Faults {
        Faults(
            spec.split(',')
                .filter_map(|item| item.split_once('='))
                .filter_map(|(k, v)| Some((k.trim().to_string(), v.trim().parse().ok()?)))
                .collect(),
        )
    }

    /// Whether fault `name` fires now (using one up).
    pub fn fire(&mut self, name: &str) -> bool {
        match self.0.get_mut(name) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The runner to send a request to: the one with the fewest requests in flight (ties: the first
/// listed).
pub fn least_busy(runners: &[String], in_flight: impl Fn(&str) -> u32) -> Option<&str> {
    runners.iter().min_by_key(|r| in_flight(r)).map(String::as_str)
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_go_to_the_least_busy_runner() {
        let runners: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let busy = |r: &str| match r {
            "a" => 2,
            "b" => 1,
            _ => 1,
        };
        assert_eq!(least_busy(&runners, busy), Some("b"), "fewest in flight, first of equals");
        assert_eq!(least_busy(&runners, |_| 0), Some("a"));
        assert_eq!(least_busy(&[], |_| 0), None);
    }

    use super::*;

    const LIMITS: Limits = Limits { max_concurrent: 2, max_per_owner: 0, lease_ms: 30_000, max_attempts: 3 };

    fn job(id: &str, priority: i32) -> Pending {
        owned(id, "o", priority)
    }

    fn owned(id: &str, owner: &str, priority: i32) -> Pending {
        Pending { job_id: id.into(), priority, order: 0, attempts: 0, owner: owner.into(), title: None, created_at: "t".into(), serial: None, submitted_ms: 0 }
    }

    fn serial(id: &str, owner: &str, key: &str, priority: i32) -> Pending {
        Pending { serial: Some(key.into()), ..owned(id, owner, priority) }
    }

    fn leased(leases: Vec<Lease>) -> Vec<String> {
        leases.into_iter().map(|l| l.job_id).collect()
    }

    #[test]
    fn a_serial_keys_jobs_run_one_at_a_time_oldest_first() {
        let limits = Limits { max_concurrent: 4, ..LIMITS };
        let mut q = QueueState::default();
        q.enqueue(serial("s1", "alice", "landing:p", 0));
        // A later job of the key with a higher priority still waits for the older one.
        q.enqueue(serial("s2", "alice", "landing:p", 5));
        q.enqueue(serial("t1", "alice", "landing:other", 0));
        q.enqueue(owned("a1", "alice", 0));
        q.enqueue(serial("b1", "bob", "landing:p", 0));
        q.connect("r1", "s1", 4, &[], 0, limits);
        let first = leased(q.dispatch(0, "t", limits, ids()));
        // s2 is alice's head by priority but held by its key: her other jobs stand in for it;
        // bob's job shares the key name (keys are per page, so per owner in practice) and waits.
        assert_eq!(first, ["s1", "t1", "a1"], "{first:?}");
        assert!(q.dispatch(0, "t", limits, ids()).is_empty(), "s2 and b1 wait for s1");
        assert_eq!(q.position("s2"), Some(1));
        q.release("s1");
        let next = leased(q.dispatch(0, "t", limits, ids()));
        assert_eq!(next, ["s2"], "the key's oldest waiting job (s2 was enqueued before b1), not both");
        q.release("s2");
        assert_eq!(leased(q.dispatch(0, "t", limits, ids())), ["b1"]);
    }

    #[test]
    fn a_requeued_serial_job_keeps_its_place_in_its_key() {
        let mut q = QueueState::default();
        q.enqueue(serial("s1", "alice", "k", 0));
        q.enqueue(serial("s2", "alice", "k", 0));
        q.connect("r1", "s1", 2, &[], 0, LIMITS);
        assert_eq!(leased(dispatch_announced(&mut q, 0, LIMITS)), ["s1"]);
        assert!(matches!(q.expire(30_000, LIMITS).as_slice(), [Expired::Requeued { .. }]));
        assert_eq!(leased(q.dispatch(30_000, "t", LIMITS, ids())), ["s1"], "the older job again, not s2");
        let stored = serde_json::to_string(&q.pending[0]).unwrap();
        assert_eq!(serde_json::from_str::<Pending>(&stored).unwrap().serial.as_deref(), Some("k"));
        let old: Pending = serde_json::from_str(r#"{"job_id":"x","priority":0,"order":1,"attempts":0,"owner":"o","title":null,"created_at":"t"}"#).unwrap();
        assert_eq!(old.serial, None, "entries persisted before serial keys read as unkeyed");
    }

    /// Dispatches and has every room accept its lease.
    fn dispatch_announced(q: &mut QueueState, now: i64, limits: Limits) -> Vec<Lease> {
        let leases = q.dispatch(now, "t", limits, ids());
        for l in &leases {
            assert!(q.mark_announced(&l.job_id, &l.lease_id));
        }
        leases
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
        q.connect("r1", "s-r1", 1, &[], 0, LIMITS);
        let leases = q.dispatch(0, "t", LIMITS, ids());
        assert_eq!(leases.len(), 1, "r1 has one slot");
        q.connect("r2", "s-r2", 4, &[], 0, LIMITS);
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
        q.connect("r1", "s-r1", 1, &[], 0, LIMITS);
        for attempt in 1..=3 {
            let leases = dispatch_announced(&mut q, 0, LIMITS);
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
        q.connect("r1", "s-r1", 2, &[], 0, LIMITS);
        let lease = q.dispatch(0, "t", LIMITS, ids()).remove(0);
        let held = vec![("a".to_string(), lease.lease_id.clone())];
        assert!(q.heartbeat("r1", &held, 20_000, LIMITS).is_empty());
        assert!(q.expire(30_000, LIMITS).is_empty(), "renewed at 20s");
        assert!(q.disconnect("r1", "s-r1"));
        assert_eq!(q.free_slots(), 0);
        let stale = q.connect("r1", "s-r1", 2, &[held[0].clone(), ("gone".into(), "x".into())], 40_000, LIMITS);
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
        q.connect("r1", "s-r1", 1, &[], 0, LIMITS);
        let lease = dispatch_announced(&mut q, 0, LIMITS).remove(0);
        let stolen = vec![("a".to_string(), lease.lease_id.clone())];
        assert_eq!(q.connect("r2", "s-r2", 1, &stolen, 10_000, LIMITS), stolen.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>(), "r2 must drop it");
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
        q.connect("r1", "s-r1", 1, &[], 0, LIMITS);
        q.dispatch(0, "t", LIMITS, ids());
        q.unlease("a");
        assert_eq!(q.position("a"), Some(1));
        assert_eq!(q.pending[0].attempts, 0);
    }

    #[test]
    fn owners_are_served_fairly_and_priority_orders_only_within_an_owner() {
        let mut q = QueueState::default();
        for i in 0..10 {
            q.enqueue(owned(&format!("a{i}"), "alice", 0));
        }
        // Bob's job is older than none of Alice's, and has a lower priority than all of them.
        q.enqueue(owned("b0", "bob", -5));
        assert_eq!(q.position("b0"), Some(1), "positions count in the owner's own line");
        assert_eq!(q.position("a3"), Some(4));
        q.connect("r1", "s1", 10, &[], 0, LIMITS);
        let first: Vec<_> = q.dispatch(0, "t", LIMITS, ids()).into_iter().map(|l| l.job_id).collect();
        assert_eq!(first, ["a0", "b0"], "the second slot goes to the owner with nothing running");
        q.release("a0");
        let next: Vec<_> = q.dispatch(0, "t", LIMITS, ids()).into_iter().map(|l| l.job_id).collect();
        assert_eq!(next, ["a1"]);
        // A later, higher-priority job of Alice's goes before her older ones, not before Bob's turn.
        q.enqueue(owned("a-urgent", "alice", 9));
        q.enqueue(owned("b1", "bob", 0));
        q.release("a1");
        q.release("b0");
        let next: Vec<_> = q.dispatch(0, "t", LIMITS, ids()).into_iter().map(|l| l.job_id).collect();
        assert_eq!(next, ["a-urgent", "b1"], "{next:?}");
    }

    #[test]
    fn one_owner_cannot_take_more_than_max_per_owner() {
        let limits = Limits { max_concurrent: 4, max_per_owner: 2, ..LIMITS };
        let mut q = QueueState::default();
        for i in 0..5 {
            q.enqueue(owned(&format!("a{i}"), "alice", 0));
        }
        q.connect("r1", "s1", 4, &[], 0, limits);
        assert_eq!(q.dispatch(0, "t", limits, ids()).len(), 2, "alice alone gets two of four slots");
        assert_eq!(q.free_slots(), 2);
        q.enqueue(owned("b0", "bob", 0));
        q.enqueue(owned("c0", "carol", 0));
        q.enqueue(owned("c1", "carol", 0));
        let next: Vec<_> = q.dispatch(0, "t", limits, ids()).into_iter().map(|l| l.job_id).collect();
        assert_eq!(next, ["b0", "c0"]);
        assert!(q.dispatch(0, "t", limits, ids()).is_empty(), "the global limit holds");
    }

    #[test]
    fn enqueue_is_idempotent() {
        let mut q = QueueState::default();
        assert_eq!(q.enqueue(job("a", 0)), 1);
        assert_eq!(q.enqueue(job("b", 0)), 2);
        assert_eq!(q.enqueue(job("a", 0)), 1, "already pending: same place");
        assert_eq!(q.pending.len(), 2);
        q.connect("r1", "s1", 1, &[], 0, LIMITS);
        q.dispatch(0, "t", LIMITS, ids());
        assert_eq!(q.enqueue(job("a", 0)), 0, "already leased: left alone");
        assert_eq!((q.pending.len(), q.running()), (1, 1));
        assert!(q.holds("a") && q.holds("b") && !q.holds("c"));
    }

    #[test]
    fn a_lease_the_room_never_accepted_returns_without_using_an_attempt() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.connect("r1", "s1", 1, &[], 0, LIMITS);
        let lease = q.dispatch(0, "t", LIMITS, ids()).remove(0);
        assert_eq!(q.unannounced().len(), 1, "the room has not accepted it yet");
        assert_eq!(q.expire(30_000, LIMITS), vec![Expired::Returned { job_id: "a".into() }]);
        assert_eq!((q.position("a"), q.pending[0].attempts), (Some(1), 0));
        // Dispatched again: a new lease; the old one is no longer the job's.
        let again = q.dispatch(30_000, "t", LIMITS, || "second".to_string()).remove(0);
        assert!(!q.mark_announced("a", &lease.lease_id));
        assert!(q.mark_announced("a", &again.lease_id));
        assert!(q.unannounced().is_empty());
        assert_eq!(again.attempt, 1);
    }

    #[test]
    fn a_heartbeat_for_a_lease_means_the_room_accepted_it() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.connect("r1", "s1", 1, &[], 0, LIMITS);
        let lease = q.dispatch(0, "t", LIMITS, ids()).remove(0);
        q.heartbeat("r1", &[("a".into(), lease.lease_id.clone())], 1_000, LIMITS);
        assert!(q.unannounced().is_empty());
    }

    #[test]
    fn a_lease_whose_expiry_the_room_did_not_take_is_tried_again() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.connect("r1", "s1", 1, &[], 0, LIMITS);
        let lease = dispatch_announced(&mut q, 0, LIMITS).remove(0);
        let limits = Limits { max_attempts: 1, ..LIMITS };
        assert!(matches!(q.expire(30_000, limits).as_slice(), [Expired::Failed { .. }]));
        assert!(!q.holds("a"));
        let mut held = lease.clone();
        held.announced = true;
        q.reinstate(held, 31_000);
        assert_eq!(q.next_expiry(), Some(31_000));
        assert!(matches!(q.expire(31_000, limits).as_slice(), [Expired::Failed { .. }]));
    }

    #[test]
    fn only_the_socket_a_runner_is_connected_on_forgets_it() {
        let mut q = QueueState::default();
        q.connect("r1", "old", 2, &[], 0, LIMITS);
        // A reconnect: the new socket says hello before the old one's close arrives.
        q.connect("r1", "new", 2, &[], 1_000, LIMITS);
        assert!(!q.disconnect("r1", "old"), "the old socket's close must not forget the runner");
        assert_eq!((q.free_slots(), q.socket_of("r1")), (2, Some("new")));
        assert!(q.disconnect("r1", "new"));
        assert_eq!(q.free_slots(), 0);
    }

    #[test]
    fn a_heartbeat_sent_before_a_release_does_not_cancel_the_job() {
        let mut q = QueueState::default();
        q.enqueue(job("a", 0));
        q.enqueue(job("b", 0));
        q.connect("r1", "s1", 1, &[], 0, LIMITS);
        let a = dispatch_announced(&mut q, 0, LIMITS).remove(0);
        let held = vec![("a".to_string(), a.lease_id.clone())];
        // The runner posts a's end; the room releases it and b takes the slot; then a heartbeat
        // the runner sent while still delivering a's end arrives.
        q.release("a");
        let b = dispatch_announced(&mut q, 0, LIMITS).remove(0);
        assert_eq!(b.runner_id, "r1");
        assert!(q.heartbeat("r1", &held, 1_000, LIMITS).is_empty(), "a ended here: nothing to cancel");
        assert!(q.heartbeat("r2", &held, 1_000, LIMITS) == ["a"], "another runner naming it is told");
        assert_eq!(q.free_slots(), 0, "the heartbeat took no slot");
        // A heartbeat that does not name it (sent before the assignment, arriving late) changes
        // nothing; a lease's time after the release, naming it is stale again.
        let hb = vec![("b".to_string(), b.lease_id.clone())];
        assert!(q.heartbeat("r1", &hb, 2_000, LIMITS).is_empty());
        assert!(q.heartbeat("r1", &held, 3_000, LIMITS).is_empty());
        assert_eq!(q.heartbeat("r1", &held, 31_000, LIMITS), ["a"]);
        // A hello is answered with every job it holds without a lease.
        q.release("b");
        assert_eq!(q.connect("r1", "s2", 1, &hb, 4_000, LIMITS), ["b"]);
    }

    #[test]
    fn faults_are_named_counts() {
        let mut f = Faults::parse("queue_room_calls=2, room_d1_copies=1,bogus,x=y");
        assert_eq!([f.fire("queue_room_calls"), f.fire("queue_room_calls"), f.fire("queue_room_calls")], [true, true, false]);
        assert_eq!([f.fire("room_d1_copies"), f.fire("room_d1_copies"), f.fire("x"), f.fire("bogus")], [true, false, false, false]);
    }
}
