//! Seed 001's landing-page face (`/v1/*`), as its frontend calls it: `POST /v1/agent/init` and
//! `/v1/agent/chat` (a session's jobs), `/v1/jobs` (a job with its node events, polled, paged by
//! `?after=` or streamed as Server-Sent Events; lists; cancel) and `/v1/landing-pages`. Views of
//! the one core: the job's D1 row, its room's event log (`node` events), the page's row the rooms
//! write. Every read is owner-scoped (another user's id answers 404 like a missing one; the
//! service principal sees every user's); errors carry FastAPI's `detail` beside `error`.

pub mod agent;
pub mod jobs;
pub mod pages;

use kiln_schemas::events::ServerEvent;
use kiln_schemas::landing::NodeEventView;
use kiln_schemas::validate::is_uuid;
use worker::{Method, Url};

use super::Ctx;
use crate::auth::Principal;
use crate::env;
use crate::http::{self, ApiError, ApiResult};
use crate::job_room::{IndexedEvents, MAX_EVENTS_READ};
use crate::landing_store::{self, node_view, LandingJobRow, NodePage, PageRow, Scope};

/// What `who` may see.
pub fn scope(who: &Principal) -> Scope<'_> {
    match who {
        Principal::Service => Scope::Any,
        Principal::User { id, .. } => Scope::Owner(id),
    }
}

/// A landing job `who` may see, or 404.
pub async fn owned_job(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<LandingJobRow> {
    let not_found = || ApiError::NotFound("job not found".into());
    if !is_uuid(id) {
        return Err(not_found());
    }
    landing_store::get_job(&env::db(&ctx.env)?, &id.to_ascii_lowercase(), scope(who)).await?.ok_or_else(not_found)
}

/// A landing page `who` may see, or 404.
pub async fn owned_page(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<PageRow> {
    let not_found = || ApiError::NotFound("landing page not found".into());
    if !is_uuid(id) {
        return Err(not_found());
    }
    landing_store::get_page(&env::db(&ctx.env)?, &id.to_ascii_lowercase(), scope(who)).await?.ok_or_else(not_found)
}

/// A query parameter, if given.
pub fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string())
}

/// Pages of the room's log a whole read goes through at most (a landing job holds far fewer
/// events).
const MAX_PAGES: usize = 20;

/// The job's node events from index `from` on (all when `None`), with their count and the last,
/// read from its room a page at a time: only the events answered cross from the room.
pub async fn node_page(ctx: &Ctx, job_id: &str, from: Option<u64>) -> ApiResult<NodePage> {
    let room = env::job_room(&ctx.env, job_id)?;
    let views = |evs: &[ServerEvent]| evs.iter().filter_map(|e| node_view(job_id, e)).collect::<Vec<_>>();
    let mut page = NodePage::default();
    let mut offset = from.unwrap_or(0);
    for _ in 0..MAX_PAGES {
        let read: IndexedEvents =
            http::call(&room, Method::Get, &format!("/indexed-events?kind=node&offset={offset}&limit={MAX_EVENTS_READ}"), None::<&()>).await?;
        page.total = read.total;
        page.last = read.last.as_ref().and_then(|e| node_view(job_id, e));
        offset += read.events.len() as u64;
        let full = read.events.len() == MAX_EVENTS_READ;
        page.events.extend(views(&read.events));
        if !full || offset >= read.total {
            break;
        }
    }
    Ok(page)
}

/// The job's node event at index `index`, with its seq, or (when the job has no event there) its
/// last one and how many it has.
pub async fn node_at(ctx: &Ctx, job_id: &str, index: u64) -> ApiResult<(u64, Option<(u64, NodeEventView)>)> {
    let room = env::job_room(&ctx.env, job_id)?;
    let read: IndexedEvents = http::call(&room, Method::Get, &format!("/indexed-events?kind=node&offset={index}&limit=1"), None::<&()>).await?;
    let ev = read.events.first().or(read.last.as_ref());
    Ok((read.total, ev.and_then(|e| node_view(job_id, e).map(|v| (e.seq, v)))))
}
