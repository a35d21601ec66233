//! Job rooms opened ahead of the submissions that will use them.
//!
//! A job's room is a new Durable Object, and a new Durable Object is a new SQLite database: its
//! file, its journal switched to WAL, its schema and their commits. That was the largest step of
//! `POST /jobs` (about 2 ms of the edge's one thread locally). So each isolate keeps a few job ids
//! whose rooms are already open, made after an answer (`waitUntil`), and a submission takes one.
//!
//! An id here is a fresh random job id like any other (`env::new_id`), handed to one submission
//! only (`take` removes it). Its room holds the schema and nothing else until that submission's
//! `/init`, so until then it answers as any unknown job's room does. An isolate that goes away
//! leaves its few empty rooms behind; nothing refers to them.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use worker::{Env, Method};

use crate::env::{self, new_id};
use crate::http;

/// Rooms kept open ahead, per isolate: enough for a user's burst of a few submissions; a longer
/// burst opens the rest on the submission's own path, as without the pool.
const TARGET: usize = 2;

/// How long a refill waits after the answer that asked for it: the job just submitted is
/// dispatched, and its submitter's first reads and socket answered, before the next room is
/// opened (on one thread they would otherwise take turns). Only the next submission needs it.
const PAUSE: Duration = Duration::from_millis(50);

thread_local! {
    static READY: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static OPENING: Cell<usize> = const { Cell::new(0) };
    /// Whether this isolate has submitted a job: only such an isolate keeps rooms ahead.
    static SUBMITTING: Cell<bool> = const { Cell::new(false) };
}

/// A job id whose room is open, if one is ready (a submission's id).
pub fn take() -> Option<String> {
    SUBMITTING.with(|s| s.set(true));
    READY.with(|r| r.borrow_mut().pop())
}

/// Whether the pool wants one more room (counting those being opened).
pub fn wanted() -> bool {
    SUBMITTING.with(Cell::get) && READY.with(|r| r.borrow().len()) + OPENING.with(Cell::get) < TARGET
}

/// Opens one more room and keeps its id; a room that did not open is forgotten (its id was never
/// handed out).
pub async fn refill(env: Env) {
    if !wanted() {
        return;
    }
    OPENING.with(|o| o.set(o.get() + 1));
    worker::Delay::from(PAUSE).await;
    let id = new_id();
    let opened = match env::job_room(&env, &id) {
        Ok(room) => http::call::<()>(&room, Method::Post, "/warm", None::<&()>).await,
        Err(e) => Err(e.into()),
    };
    OPENING.with(|o| o.set(o.get() - 1));
    match opened {
        Ok(()) => READY.with(|r| r.borrow_mut().push(id)),
        Err(e) => worker::console_warn!("opening a job room ahead: {e:?}"),
    }
}
