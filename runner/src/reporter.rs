//! A job's events on their way to the edge: indexed densely from 0 per lease, gathered into
//! batches (every 50 ms or 100 events, whichever comes first), and posted until stored. A batch
//! that failed is sent again unchanged, so the edge's dedup by index stores it once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{BatchAck, EventBatch, IndexedEvent, RunnerEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::edge::{EdgeClient, EdgeError};
use crate::metrics::Metrics;

pub const MAX_BATCH: usize = 100;
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Events waiting to be batched; a full buffer slows the job's output down.
const BUFFER: usize = 10_000;

/// Assigns indices and cuts batches.
#[derive(Debug)]
pub struct EventBatcher {
    lease_id: String,
    next_index: u64,
    pending: Vec<RunnerEvent>,
}

impl EventBatcher {
    pub fn new(lease_id: impl Into<String>) -> Self {
        EventBatcher {
            lease_id: lease_id.into(),
            next_index: 0,
            pending: Vec::new(),
        }
    }

    pub fn push(&mut self, event: RunnerEvent) {
        self.pending.push(event);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.pending.len() >= MAX_BATCH
    }

    /// Takes up to [`MAX_BATCH`] pending events as the next batch; their indices are used up.
    pub fn seal(&mut self) -> Option<EventBatch> {
        if self.pending.is_empty() {
            return None;
        }
        let n = self.pending.len().min(MAX_BATCH);
        let events = self
            .pending
            .drain(..n)
            .enumerate()
            .map(|(i, event)| IndexedEvent {
                index: self.next_index + i as u64,
                event,
            })
            .collect();
        self.next_index += n as u64;
        Some(EventBatch {
            lease_id: self.lease_id.clone(),
            events,
        })
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

/// Where a job sends its events. Cheap to clone; sending never fails (events for a job whose
/// reporter has stopped are dropped).
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<RunnerEvent>,
}

impl EventSink {
    pub async fn send(&self, event: RunnerEvent) {
        let _ = self.tx.send(event).await;
    }

    /// A `system` log line.
    pub async fn system(&self, content: impl Into<String>) {
        self.send(RunnerEvent::Log {
            stream: LogStream::System,
            content: content.into(),
        })
        .await;
    }

    /// A sink whose events go to a channel (tests).
    pub fn channel(capacity: usize) -> (EventSink, mpsc::Receiver<RunnerEvent>) {
        let (tx, rx) = mpsc::channel(capacity);
        (EventSink { tx }, rx)
    }
}

pub type PostBatch =
    Box<dyn FnMut(EventBatch) -> BoxFuture<'static, Result<BatchAck, EdgeError>> + Send>;

/// Starts the reporter of one job. It ends when every sink is dropped and all is stored, or when
/// the lease is lost (then `on_lease_lost` has been called). Posted and retried batches are
/// counted in `metrics`.
pub fn spawn(
    client: EdgeClient,
    job_id: String,
    lease_id: String,
    metrics: Arc<Metrics>,
    on_lease_lost: impl FnOnce() + Send + 'static,
) -> (EventSink, JoinHandle<ReportEnd>) {
    let post: PostBatch = Box::new(move |batch| {
        let client = client.clone();
        let job_id = job_id.clone();
        Box::pin(async move { client.post_events(&job_id, &batch).await })
    });
    spawn_with(post, lease_id, metrics, on_lease_lost)
}

/// [`spawn`] with the HTTP call supplied.
pub fn spawn_with(
    post: PostBatch,
    lease_id: String,
    metrics: Arc<Metrics>,
    on_lease_lost: impl FnOnce() + Send + 'static,
) -> (EventSink, JoinHandle<ReportEnd>) {
    let (tx, rx) = mpsc::channel(BUFFER);
    let task = tokio::spawn(async move {
        let end = run(post, EventBatcher::new(lease_id), rx, &metrics).await;
        if end == ReportEnd::LeaseLost {
            on_lease_lost();
        }
        end
    });
    (EventSink { tx }, task)
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

async fn run(
    mut post: PostBatch,
    mut batcher: EventBatcher,
    mut rx: mpsc::Receiver<RunnerEvent>,
    metrics: &Metrics,
) -> ReportEnd {
    let mut closed = false;
    loop {
        if batcher.is_empty() {
            if closed {
                return ReportEnd::Drained;
            }
            match rx.recv().await {
                Some(ev) => batcher.push(ev),
                None => return ReportEnd::Drained,
            }
        }
        let deadline = Instant::now() + FLUSH_INTERVAL;
        while !closed && !batcher.is_full() {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => batcher.push(ev),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let batch = batcher.seal().expect("the batcher holds events");
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
    use std::sync::Mutex;

    fn log(i: usize) -> RunnerEvent {
        RunnerEvent::Log {
            stream: LogStream::Stdout,
            content: format!("line {i}"),
        }
    }

    #[test]
    fn indices_are_dense_across_batches() {
        let mut b = EventBatcher::new("lease-1");
        assert!(b.seal().is_none());
        for i in 0..250 {
            b.push(log(i));
        }
        assert!(b.is_full());
        let sizes: Vec<(u64, usize)> = std::iter::from_fn(|| b.seal())
            .map(|batch| {
                assert_eq!(batch.lease_id, "lease-1");
                for w in batch.events.windows(2) {
                    assert_eq!(w[1].index, w[0].index + 1);
                }
                (batch.events[0].index, batch.events.len())
            })
            .collect();
        assert_eq!(sizes, vec![(0, 100), (100, 100), (200, 50)]);
        b.push(log(0));
        assert_eq!(b.seal().unwrap().events[0].index, 250);
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
        let (sink, task) = spawn_with(post, "l".into(), metrics.clone(), || {});
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
        let (sink, task) = spawn_with(post, "l".into(), Arc::default(), || {});
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
    async fn a_lost_lease_stops_the_reporter_and_says_so() {
        let (post, calls) = fake_post(0, false);
        let lost = Arc::new(Mutex::new(false));
        let flag = lost.clone();
        let metrics = Arc::new(Metrics::default());
        let (sink, task) = spawn_with(post, "l".into(), metrics.clone(), move || {
            *flag.lock().unwrap() = true
        });
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
