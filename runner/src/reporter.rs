//! A job's events on their way to the edge: indexed densely from 0 per lease, gathered into
//! batches (every 50 ms, or at 100 events or 256 KiB of JSON, or at once when a pipeline step's
//! event or `finished` waits, whichever comes first), and posted
//! until stored. A batch that failed is sent again unchanged, so the edge's dedup by index stores
//! it once.
//!
//! The buffer between the job and its reporter is bounded in bytes: when the edge is slower than
//! the job's output (or away), output lines (`stdout`, `stderr`, agent events) are dropped and
//! counted (`kiln_runner_events_dropped_total`), never the job's own events (`started`, system
//! lines, iterations, `finished`). Dropping starts when the buffer is full and goes on until it is
//! half empty; then a system line says how many lines and bytes were dropped, where they were.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{BatchAck, EventBatch, IndexedEvent, RunnerEvent};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::edge::{EdgeClient, EdgeError};
use crate::metrics::Metrics;

/// Most events in one batch.
pub const MAX_BATCH: usize = 100;
/// Most bytes of JSON events in one batch (an event larger than this goes alone).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// The default bound of a job's event buffer (`RUNNER_EVENT_BUFFER_MB`).
pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// What an event costs beyond its own JSON in a batch (`{"index":..,"event":..}`).
const EVENT_OVERHEAD: usize = 32;

/// The bytes an event takes in a batch: its JSON plus the index around it.
pub fn event_bytes(event: &RunnerEvent) -> usize {
    serde_json::to_string(event).map_or(0, |s| s.len()) + EVENT_OVERHEAD
}

/// Whether an event may be dropped when the buffer is full: the command's output only.
fn droppable(event: &RunnerEvent) -> bool {
    matches!(
        event,
        RunnerEvent::Agent { .. }
            | RunnerEvent::Log {
                stream: LogStream::Stdout | LogStream::Stderr,
                ..
            }
    )
}

/// Whether an event is posted at once rather than waiting out the batch window: a pipeline step's
/// events (usage, node, stage, dialogue, prd, backlog, ticket, progress, phase) and a job's end.
/// Output and system lines, `started` and iterations keep the window, so a burst of them is
/// still one POST.
pub fn urgent(event: &RunnerEvent) -> bool {
    !matches!(
        event,
        RunnerEvent::Log { .. }
            | RunnerEvent::Agent { .. }
            | RunnerEvent::Iteration { .. }
            | RunnerEvent::Started { .. }
    )
}

/// The system line that stands where output was dropped.
pub fn dropped_line(events: u64, bytes: u64) -> String {
    format!(
        "… [dropped {events} output lines ({bytes} bytes): the edge took events more slowly than the job wrote them]"
    )
}

/// Assigns indices.
#[derive(Debug)]
pub struct EventBatcher {
    lease_id: String,
    next_index: u64,
}

impl EventBatcher {
    pub fn new(lease_id: impl Into<String>) -> Self {
        EventBatcher {
            lease_id: lease_id.into(),
            next_index: 0,
        }
    }

    /// The next batch of `events`; their indices are used up.
    pub fn seal(&mut self, events: Vec<RunnerEvent>) -> EventBatch {
        let n = events.len() as u64;
        let events = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| IndexedEvent {
                index: self.next_index + i as u64,
                event,
            })
            .collect();
        self.next_index += n;
        EventBatch {
            lease_id: self.lease_id.clone(),
            events,
        }
    }
}

/// A job's events waiting for their batch, bounded in bytes.
#[derive(Debug)]
pub struct EventBuffer {
    limit: usize,
    queue: VecDeque<(RunnerEvent, usize)>,
    bytes: usize,
    /// Dropping output until the buffer is half empty.
    dropping: bool,
    /// Dropped since the last marker line.
    dropped_events: u64,
    dropped_bytes: u64,
    /// Urgent events queued (see [`urgent`]).
    urgent: usize,
}

impl EventBuffer {
    pub fn new(limit: usize) -> Self {
        EventBuffer {
            limit: limit.max(MAX_BATCH_BYTES),
            queue: VecDeque::new(),
            bytes: 0,
            dropping: false,
            dropped_events: 0,
            dropped_bytes: 0,
            urgent: 0,
        }
    }

    /// Queues an event; false when it was dropped.
    pub fn push(&mut self, event: RunnerEvent) -> bool {
        let size = event_bytes(&event);
        if droppable(&event) {
            if self.dropping && self.bytes <= self.limit / 2 {
                self.dropping = false;
            }
            if !self.dropping && self.bytes + size > self.limit {
                self.dropping = true;
            }
            if self.dropping {
                self.dropped_events += 1;
                self.dropped_bytes += size as u64;
                return false;
            }
        }
        if self.dropped_events > 0 {
            let marker = RunnerEvent::Log {
                stream: LogStream::System,
                content: dropped_line(self.dropped_events, self.dropped_bytes),
            };
            self.dropped_events = 0;
            self.dropped_bytes = 0;
            let size = event_bytes(&marker);
            self.bytes += size;
            self.queue.push_back((marker, size));
        }
        self.bytes += size;
        self.urgent += urgent(&event) as usize;
        self.queue.push_back((event, size));
        true
    }

    /// Whether an urgent event waits: the batch goes now.
    pub fn has_urgent(&self) -> bool {
        self.urgent > 0
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a whole batch is waiting.
    pub fn has_full_batch(&self) -> bool {
        self.queue.len() >= MAX_BATCH || self.bytes >= MAX_BATCH_BYTES
    }

    /// Takes the next batch's events: up to [`MAX_BATCH`] events and [`MAX_BATCH_BYTES`] bytes
    /// (at least one event).
    pub fn take_batch(&mut self) -> Vec<RunnerEvent> {
        let mut events = Vec::new();
        let mut bytes = 0;
        while let Some((_, size)) = self.queue.front() {
            if events.len() >= MAX_BATCH || (!events.is_empty() && bytes + size > MAX_BATCH_BYTES) {
                break;
            }
            let (event, size) = self.queue.pop_front().expect("the front exists");
            self.urgent -= urgent(&event) as usize;
            bytes += size;
            self.bytes -= size;
            events.push(event);
        }
        events
    }
}

/// How a reporter ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportEnd {
    /// Every event was stored.
    Drained,
    /// The edge said the lease is no longer ours: the job must stop without further events.
    LeaseLost,
}

struct State {
    buffer: EventBuffer,
    /// Every sink is dropped: nothing more will come.
    closed: bool,
    /// The reporter ended: further events go nowhere.
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes the buffer when the last sink goes.
struct SinkHandle(Arc<Shared>);

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.0.state().closed = true;
        self.0.notify.notify_one();
    }
}

/// Where a job sends its events. Cheap to clone; sending never waits and never fails: output
/// the buffer has no room for is dropped and counted, and events for a job whose reporter has
/// stopped go nowhere.
#[derive(Clone)]
pub struct EventSink {
    handle: Arc<SinkHandle>,
}

impl EventSink {
    pub async fn send(&self, event: RunnerEvent) {
        self.push(event);
    }

    pub fn push(&self, event: RunnerEvent) {
        let shared = &self.handle.0;
        {
            let mut st = shared.state();
            if st.stopped {
                return;
            }
            if !st.buffer.push(event) {
                Metrics::inc(&shared.metrics.events_dropped);
            }
        }
        shared.notify.notify_one();
    }

    /// A `system` log line.
    pub async fn system(&self, content: impl Into<String>) {
        self.push(RunnerEvent::Log {
            stream: LogStream::System,
            content: content.into(),
        });
    }
}

pub type PostBatch =
    Box<dyn FnMut(EventBatch) -> BoxFuture<'static, Result<BatchAck, EdgeError>> + Send>;

/// Starts the reporter of one job, its buffer bounded to `buffer_bytes`. It ends when every sink
/// is dropped and all is stored, or when the lease is lost (then `on_lease_lost` has been
/// called). Posted, retried and dropped events are counted in `metrics`.
pub fn spawn(
    client: EdgeClient,
    job_id: String,
    lease_id: String,
    buffer_bytes: usize,
    metrics: Arc<Metrics>,
    on_lease_lost: impl FnOnce() + Send + 'static,
) -> (EventSink, JoinHandle<ReportEnd>) {
    let post: PostBatch = Box::new(move |batch| {
        let client = client.clone();
        let job_id = job_id.clone();
        Box::pin(async move { client.post_events(&job_id, &batch).await })
    });
    spawn_with(post, lease_id, buffer_bytes, metrics, on_lease_lost)
}

/// [`spawn`] with the HTTP call supplied.
pub fn spawn_with(
    post: PostBatch,
    lease_id: String,
    buffer_bytes: usize,
    metrics: Arc<Metrics>,
    on_lease_lost: impl FnOnce() + Send + 'static,
) -> (EventSink, JoinHandle<ReportEnd>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buffer: EventBuffer::new(buffer_bytes),
            closed: false,
            stopped: false,
        }),
        notify: Notify::new(),
        metrics,
    });
    let sink = EventSink {
        handle: Arc::new(SinkHandle(shared.clone())),
    };
    let task = tokio::spawn(async move {
        let end = run(post, EventBatcher::new(lease_id), &shared).await;
        {
            let mut st = shared.state();
            st.stopped = true;
            st.buffer = EventBuffer::new(0);
        }
        if end == ReportEnd::LeaseLost {
            on_lease_lost();
        }
        end
    });
    (sink, task)
}

fn lease_gone(e: &EdgeError) -> bool {
    matches!(
        e,
        EdgeError::Status {
            status: 404 | 409 | 410,
            ..
        }
    )
}

async fn run(mut post: PostBatch, mut batcher: EventBatcher, shared: &Shared) -> ReportEnd {
    let metrics = shared.metrics.clone();
    loop {
        // The first event of the next batch.
        loop {
            let notified = shared.notify.notified();
            {
                let st = shared.state();
                if !st.buffer.is_empty() {
                    break;
                }
                if st.closed {
                    return ReportEnd::Drained;
                }
            }
            notified.await;
        }
        // More, until the batch is full, the flush interval is up, an urgent event waits or
        // nothing more will come.
        let deadline = Instant::now() + FLUSH_INTERVAL;
        loop {
            let notified = shared.notify.notified();
            {
                let st = shared.state();
                if st.closed || st.buffer.has_full_batch() || st.buffer.has_urgent() {
                    break;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let events = shared.state().buffer.take_batch();
        let batch = batcher.seal(events);
        let mut backoff = Backoff::default();
        loop {
            match post(batch.clone()).await {
                Ok(ack) if !ack.lease_valid => return ReportEnd::LeaseLost,
                Ok(_) => {
                    Metrics::inc(&metrics.batches_posted);
                    Metrics::add(&metrics.events_posted, batch.events.len() as u64);
                    break;
                }
                Err(e) if lease_gone(&e) => {
                    tracing::warn!(error = %e, "the edge no longer knows this job's lease");
                    return ReportEnd::LeaseLost;
                }
                Err(e) => {
                    Metrics::inc(&metrics.batches_retried);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "posting events failed; retrying the same batch");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(i: usize) -> RunnerEvent {
        RunnerEvent::Log {
            stream: LogStream::Stdout,
            content: format!("line {i}"),
        }
    }

    fn system(s: &str) -> RunnerEvent {
        RunnerEvent::Log {
            stream: LogStream::System,
            content: s.into(),
        }
    }

    #[test]
    fn indices_are_dense_across_batches() {
        let mut buf = EventBuffer::new(DEFAULT_BUFFER_BYTES);
        let mut b = EventBatcher::new("lease-1");
        for i in 0..250 {
            assert!(buf.push(log(i)));
        }
        assert!(buf.has_full_batch());
        let sizes: Vec<(u64, usize)> = std::iter::from_fn(|| {
            let events = buf.take_batch();
            (!events.is_empty()).then(|| b.seal(events))
        })
        .map(|batch| {
            assert_eq!(batch.lease_id, "lease-1");
            for w in batch.events.windows(2) {
                assert_eq!(w[1].index, w[0].index + 1);
            }
            (batch.events[0].index, batch.events.len())
        })
        .collect();
        assert_eq!(sizes, vec![(0, 100), (100, 100), (200, 50)]);
        assert_eq!(b.seal(vec![log(0)]).events[0].index, 250);
    }

    #[test]
    fn batches_are_bounded_in_bytes() {
        let mut buf = EventBuffer::new(DEFAULT_BUFFER_BYTES);
        let line = "x".repeat(100 * 1024);
        for _ in 0..7 {
            buf.push(RunnerEvent::Log {
                stream: LogStream::Stdout,
                content: line.clone(),
            });
        }
        // One event larger than a batch still goes, alone.
        buf.push(RunnerEvent::Log {
            stream: LogStream::Stdout,
            content: "y".repeat(MAX_BATCH_BYTES + 1),
        });
        let mut counts = vec![];
        loop {
            let events = buf.take_batch();
            if events.is_empty() {
                break;
            }
            let json = serde_json::to_string(&EventBatcher::new("l").seal(events.clone())).unwrap();
            if events.len() > 1 {
                assert!(
                    json.len() <= MAX_BATCH_BYTES,
                    "a batch of {} bytes",
                    json.len()
                );
            }
            counts.push(events.len());
        }
        assert_eq!(counts, vec![2, 2, 2, 1, 1]);
        assert_eq!(buf.bytes(), 0);
    }

    #[test]
    fn a_full_buffer_drops_output_not_the_jobs_own_events_and_says_so() {
        let limit = 1024 * 1024;
        let mut buf = EventBuffer::new(limit);
        let line = |c: char| RunnerEvent::Log {
            stream: LogStream::Stdout,
            content: c.to_string().repeat(10 * 1024),
        };
        let mut accepted = 0;
        for _ in 0..200 {
            if buf.push(line('a')) {
                accepted += 1;
            }
        }
        assert!((90..=102).contains(&accepted), "{accepted} accepted");
        assert!(buf.bytes() <= limit);
        // The job's own events are never dropped.
        assert!(buf.push(system("Committed abc")));
        assert!(buf.push(RunnerEvent::Started {
            message: "started".into()
        }));
        // Still dropping output until half the buffer is gone.
        assert!(!buf.push(line('b')));
        while buf.bytes() > limit / 2 {
            buf.take_batch();
        }
        assert!(buf.push(line('c')));
        let rest: Vec<RunnerEvent> = std::iter::from_fn(|| {
            let b = buf.take_batch();
            (!b.is_empty()).then_some(b)
        })
        .flatten()
        .collect();
        let markers: Vec<(usize, &str)> = rest
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                RunnerEvent::Log {
                    stream: LogStream::System,
                    content,
                } if content.starts_with("… [dropped ") => Some((i, content.as_str())),
                _ => None,
            })
            .collect();
        // Each marker stands where output went missing, right before the next event kept.
        assert_eq!(markers.len(), 2, "{markers:?}");
        let (i, first) = markers[0];
        assert!(
            first.starts_with(&format!("… [dropped {} output lines", 200 - accepted)),
            "{first}"
        );
        assert_eq!(rest[i + 1], system("Committed abc"));
        let (i, second) = markers[1];
        assert!(second.starts_with("… [dropped 1 output lines"), "{second}");
        assert_eq!(rest[i + 1], line('c'));
        assert_eq!(i + 2, rest.len());
    }

    type Calls = Arc<Mutex<Vec<EventBatch>>>;

    /// A post that fails the first `failures` calls, then answers with `lease_valid`.
    fn fake_post(failures: usize, lease_valid: bool) -> (PostBatch, Calls) {
        let calls: Calls = Arc::default();
        let seen = calls.clone();
        let post: PostBatch = Box::new(move |batch| {
            let mut calls = seen.lock().unwrap();
            calls.push(batch.clone());
            let fail = calls.len() <= failures;
            Box::pin(async move {
                if fail {
                    Err(EdgeError::Status {
                        url: "u".into(),
                        status: 503,
                        body: String::new(),
                    })
                } else {
                    Ok(BatchAck {
                        stored: batch.events.len() as u32,
                        duplicates: 0,
                        lease_valid,
                    })
                }
            })
        });
        (post, calls)
    }

    #[tokio::test]
    async fn a_failed_batch_is_sent_again_unchanged() {
        let (post, calls) = fake_post(2, true);
        let metrics = Arc::new(Metrics::default());
        let (sink, task) = spawn_with(
            post,
            "l".into(),
            DEFAULT_BUFFER_BYTES,
            metrics.clone(),
            || {},
        );
        for i in 0..3 {
            sink.send(log(i)).await;
        }
        // Sent while the first batch is being retried: must land in a second batch.
        tokio::time::sleep(Duration::from_millis(120)).await;
        sink.send(log(3)).await;
        drop(sink);
        assert_eq!(task.await.unwrap(), ReportEnd::Drained);
        let calls = calls.lock().unwrap();
        assert_eq!(
            calls.len(),
            4,
            "two failures, the retry, then the second batch"
        );
        assert_eq!(calls[0], calls[1]);
        assert_eq!(calls[1], calls[2]);
        assert_eq!(calls[0].events.len(), 3);
        assert_eq!(calls[3].events.len(), 1);
        assert_eq!(calls[3].events[0].index, 3);
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(count(&metrics.batches_retried), 2);
        assert_eq!(count(&metrics.batches_posted), 2);
        assert_eq!(count(&metrics.events_posted), 4);
    }

    #[tokio::test]
    async fn events_are_batched_within_the_flush_interval() {
        let (post, calls) = fake_post(0, true);
        let (sink, task) = spawn_with(
            post,
            "l".into(),
            DEFAULT_BUFFER_BYTES,
            Arc::default(),
            || {},
        );
        for i in 0..250 {
            sink.send(log(i)).await;
        }
        drop(sink);
        task.await.unwrap();
        let sizes: Vec<usize> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|b| b.events.len())
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[tokio::test]
    async fn a_step_event_goes_at_once_and_output_keeps_the_window() {
        let (post, calls) = fake_post(0, true);
        let (sink, task) = spawn_with(post, "l".into(), DEFAULT_BUFFER_BYTES, Arc::default(), || {});
        let posted = || calls.lock().unwrap().iter().map(|b| b.events.len()).collect::<Vec<_>>();
        for i in 0..3 {
            sink.send(log(i)).await;
        }
        sink.send(RunnerEvent::Progress { percent: 10.0, stage: None, data: serde_json::Value::Null }).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(posted(), [4], "the progress event took the lines before it along, well within the window");
        sink.send(log(4)).await;
        sink.send(log(5)).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(posted(), [4], "output lines wait for the window");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(posted(), [4, 2], "then go as one batch");
        drop(sink);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_lost_lease_stops_the_reporter_and_says_so() {
        let (post, calls) = fake_post(0, false);
        let lost = Arc::new(Mutex::new(false));
        let flag = lost.clone();
        let metrics = Arc::new(Metrics::default());
        let (sink, task) = spawn_with(
            post,
            "l".into(),
            DEFAULT_BUFFER_BYTES,
            metrics.clone(),
            move || *flag.lock().unwrap() = true,
        );
        sink.send(log(0)).await;
        assert_eq!(task.await.unwrap(), ReportEnd::LeaseLost);
        assert!(*lost.lock().unwrap());
        // Later events go nowhere and do not block.
        sink.send(log(1)).await;
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert_eq!(
            metrics
                .events_posted
                .load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a batch refused for its lease is not counted as posted"
        );
    }
}
