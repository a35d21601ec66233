//! `/ws/jobs/<id>/`: the per-job live channel (seed 000 §4), served by the job's room.

use worker::{Headers, Request, RequestInit};

use super::Ctx;
use crate::auth::Principal;
use crate::env;
use crate::http::{ApiError, ApiResult};

/// `expires_at_ms`: when the socket's credential expires (a user's JWT); the room closes the
/// socket then.
pub async fn connect(req: Request, ctx: &Ctx, who: &Principal, expires_at_ms: Option<i64>, job_id: &str) -> ApiResult {
    let upgrade = req.headers().get("upgrade")?.unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::BadRequest("this endpoint expects a WebSocket upgrade".into()));
    }
    // Owner-scoped like every other read: the room answers 404 for another owner's job (no D1
    // read on the way to a socket).
    if !kiln_schemas::validate::is_uuid(job_id) {
        return Err(ApiError::NotFound("job not found".into()));
    }
    let url = req.url()?;
    let after = url.query_pairs().find(|(k, _)| k == "after").map(|(_, v)| v.to_string());
    let mut target = worker::Url::parse("https://room/ws").expect("static url");
    {
        let mut q = target.query_pairs_mut();
        if let Some(after) = &after {
            q.append_pair("after", after);
        }
        q.append_pair("sender", who.display_name());
        q.append_pair("owner", who.owner());
        if let Some(exp) = expires_at_ms {
            q.append_pair("expires_at_ms", &exp.to_string());
        }
    }
    let headers = Headers::new();
    headers.set("upgrade", "websocket")?;
    let mut init = RequestInit::new();
    init.with_headers(headers);
    let forwarded = Request::new_with_init(target.as_str(), &init)?;
    Ok(env::job_room(&ctx.env, job_id)?.fetch_with_request(forwarded).await?)
}
