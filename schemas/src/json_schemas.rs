//! The JSON Schemas of every wire type, generated from the Rust types. The checked-in copies under
//! `schemas/json/` are compared against these by a test; `KILN_BLESS=1 cargo test -p kiln-schemas`
//! rewrites them.

use schemars::{schema_for, Schema};

/// `(file stem, schema)` for every wire type.
pub fn all() -> Vec<(&'static str, Schema)> {
    use crate::{app, auth, events, grants, jobs, landing, runner, webhooks};
    vec![
        ("error", schema_for!(crate::ErrorBody)),
        ("auth.register_request", schema_for!(auth::RegisterRequest)),
        ("auth.login_request", schema_for!(auth::LoginRequest)),
        ("auth.refresh_request", schema_for!(auth::RefreshRequest)),
        ("auth.token_pair", schema_for!(auth::TokenPair)),
        ("auth.registered_user", schema_for!(auth::RegisteredUser)),
        ("auth.user", schema_for!(auth::UserView)),
        ("auth.login_response", schema_for!(auth::LoginResponse)),
        ("auth.detail", schema_for!(auth::Detail)),
        ("jobs.create_request", schema_for!(jobs::CreateJobRequest)),
        ("jobs.create_response", schema_for!(jobs::CreateJobResponse)),
        ("jobs.job", schema_for!(jobs::JobView)),
        ("jobs.list", schema_for!(jobs::JobList)),
        ("jobs.cancel_response", schema_for!(jobs::CancelResponse)),
        ("jobs.retry_response", schema_for!(jobs::RetryResponse)),
        ("jobs.iterations", schema_for!(jobs::IterationList)),
        ("queue.view", schema_for!(jobs::QueueView)),
        ("health", schema_for!(jobs::Health)),
        ("ws.server_event", schema_for!(events::ServerEvent)),
        ("ws.error", schema_for!(events::SocketError)),
        ("ws.client_message", schema_for!(events::ClientMessage)),
        ("runner.register_request", schema_for!(runner::RegisterRunnerRequest)),
        ("runner.register_response", schema_for!(runner::RegisterRunnerResponse)),
        ("runner.runner_message", schema_for!(runner::RunnerMessage)),
        ("runner.edge_message", schema_for!(runner::EdgeMessage)),
        ("runner.event_batch", schema_for!(runner::EventBatch)),
        ("runner.batch_ack", schema_for!(runner::BatchAck)),
        ("runner.repo_result", schema_for!(runner::RepoResult)),
        ("app.job", schema_for!(app::AppJobView)),
        ("app.message", schema_for!(app::MessageView)),
        ("app.app", schema_for!(app::AppView)),
        ("app.ticket", schema_for!(app::TicketView)),
        ("app.file_structure", schema_for!(app::FileStructure)),
        ("app.file_content", schema_for!(app::FileContent)),
        ("app.pause_answer", schema_for!(app::PauseAnswer)),
        ("app.purge_answer", schema_for!(app::PurgeAnswer)),
        ("app.workspace_snapshot", schema_for!(app::WorkspaceSnapshot)),
        ("landing.init_answer", schema_for!(landing::InitAnswer)),
        ("landing.chat_answer", schema_for!(landing::ChatAnswer)),
        ("landing.job", schema_for!(landing::LandingJobEnvelope)),
        ("landing.page", schema_for!(landing::LandingPageView)),
        ("landing.preview_bundle", schema_for!(landing::PreviewBundle)),
        ("landing.published", schema_for!(landing::Published)),
        ("runner.gather_reply", schema_for!(runner::GatherReply)),
        ("grants.request", schema_for!(grants::GrantRequest)),
        ("grants.grant", schema_for!(grants::Grant)),
        ("grants.list", schema_for!(grants::GrantList)),
        ("webhooks.create_request", schema_for!(webhooks::CreateHookRequest)),
        ("webhooks.hook", schema_for!(webhooks::HookView)),
        ("webhooks.hook_with_secret", schema_for!(webhooks::HookWithSecret)),
        ("webhooks.list", schema_for!(webhooks::HookList)),
        ("webhooks.inbound_answer", schema_for!(webhooks::InboundAnswer)),
    ]
}
