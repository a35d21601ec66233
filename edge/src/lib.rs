//! Kiln's control plane: a Cloudflare Worker. Pure logic (auth, queue) is plain Rust tested
//! natively; the Worker entry, handlers and Durable Objects build only for wasm32.

pub mod app_store;
pub mod app_room;
pub mod auth;
pub mod cache;
pub mod channels;
pub mod cors;
pub mod dashboard_store;
pub mod landing_room;
pub mod preview;
pub mod landing_store;
pub mod monitoring;
pub mod queue_core;
pub mod rate_limit;
pub mod sealed;
pub mod time;

#[cfg(target_arch = "wasm32")]
mod api;
#[cfg(target_arch = "wasm32")]
mod dashboard_object;
#[cfg(target_arch = "wasm32")]
mod deliveries;
#[cfg(target_arch = "wasm32")]
mod env;
#[cfg(target_arch = "wasm32")]
mod http;
#[cfg(target_arch = "wasm32")]
mod job_room;
#[cfg(target_arch = "wasm32")]
mod metrics_object;
#[cfg(target_arch = "wasm32")]
mod queue_object;
#[cfg(target_arch = "wasm32")]
mod room_pool;
#[cfg(target_arch = "wasm32")]
mod store;

#[cfg(target_arch = "wasm32")]
pub use dashboard_object::Dashboard;
#[cfg(target_arch = "wasm32")]
pub use job_room::JobRoom;
#[cfg(target_arch = "wasm32")]
pub use metrics_object::Metrics;
#[cfg(target_arch = "wasm32")]
pub use queue_object::Queue;
#[cfg(target_arch = "wasm32")]
pub use rate_limit::RateLimiter;

#[cfg(target_arch = "wasm32")]
#[worker::event(fetch)]
async fn fetch(req: worker::Request, env: worker::Env, ctx: worker::Context) -> worker::Result<worker::Response> {
    api::handle(req, env, Some(&ctx)).await
}

/// Outbound webhook deliveries (Cloudflare Queues `WEBHOOK_DELIVERIES`).
#[cfg(target_arch = "wasm32")]
#[worker::event(queue)]
async fn queue(batch: worker::MessageBatch<serde_json::Value>, env: worker::Env, ctx: worker::Context) -> worker::Result<()> {
    deliveries::consume(batch, env, ctx).await
}

/// The cron trigger: sends again webhook deliveries whose queue message was lost.
#[cfg(target_arch = "wasm32")]
#[worker::event(scheduled)]
async fn scheduled(_event: worker::ScheduledEvent, env: worker::Env, _ctx: worker::ScheduleContext) {
    if let Err(e) = deliveries::sweep(&env).await {
        worker::console_error!("webhook sweep: {e:?}");
    }
}
