//! `kiln submit`'s request body: a job file's fields, overridden by flags, checked with the same
//! validation the server applies (`NewJob::parse`) so mistakes are reported before anything is sent,
//! in terms of the flags.

use anyhow::{anyhow, bail};
use kiln_schemas::jobs::{CreateJobRequest, NewJob};
use serde_json::{Map, Value};

use crate::args::SubmitArgs;

/// Each `POST /jobs` field and the flag that sets it.
pub const FIELD_FLAGS: &[(&str, &str)] = &[
    ("prompt", "--prompt"),
    ("clientId", "--client-id"),
    ("githubOrg", "--org"),
    ("githubRepo", "--repo"),
    ("branchName", "--branch"),
    ("jobType", "--type"),
    ("featureId", "--feature-id"),
    ("repositoryId", "--repository-id"),
    ("title", "--title"),
    ("createdByTeamMemberId", "--team-member-id"),
    ("maxIterations", "--max-iterations"),
    ("completionPromise", "--completion-promise"),
    ("feedbackCommands", "--feedback-command"),
    ("priority", "--priority"),
    ("timeoutSeconds", "--timeout"),
];

/// The request fields, from the wire type itself.
fn known_fields() -> Vec<String> {
    match serde_json::to_value(CreateJobRequest::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => vec![],
    }
}

/// The body to send: `file`'s object (if any) with every flag given laid over it, and `prompt`
/// (already read from `--prompt`, `--prompt-file` or stdin) as the prompt.
pub fn build_body(file: Option<Value>, args: &SubmitArgs, prompt: Option<String>) -> anyhow::Result<Value> {
    let mut body = match file {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => bail!("the job file must hold a JSON object (the body of POST /jobs)"),
    };
    let known = known_fields();
    if let Some(unknown) = body.keys().find(|k| !known.contains(k)) {
        bail!("the job file has an unknown field {unknown:?}; POST /jobs takes {}", known.join(", "));
    }
    // A field added to the request later is caught by `every_request_field_has_a_flag`, not by the
    // build, so the workspace keeps compiling until it has its flag.
    #[allow(clippy::needless_update)]
    let flags = CreateJobRequest {
        prompt,
        client_id: args.client_id.clone(),
        github_org: args.org.clone(),
        github_repo: args.repo.clone(),
        branch_name: args.branch.clone(),
        job_type: args.job_type.map(Into::into),
        feature_id: args.feature_id.clone(),
        repository_id: args.repository_id.clone(),
        title: args.title.clone(),
        created_by_team_member_id: args.team_member_id.clone(),
        max_iterations: args.max_iterations,
        completion_promise: args.completion_promise.clone(),
        feedback_commands: (!args.feedback_commands.is_empty()).then(|| args.feedback_commands.clone()),
        priority: args.priority,
        timeout_seconds: args.timeout_seconds,
        ..CreateJobRequest::default()
    };
    let Value::Object(set) = serde_json::to_value(&flags)? else { unreachable!("a struct is an object") };
    for (k, v) in set {
        if !v.is_null() {
            body.insert(k, v);
        }
    }
    let body = Value::Object(body);
    NewJob::parse(&body).map_err(|e| anyhow!("{}", with_flag_hint(&e)))?;
    Ok(body)
}

/// A validation message with the flags of the fields it names: `branchName is required for code
/// jobs (--branch)`.
pub fn with_flag_hint(message: &str) -> String {
    let mut named: Vec<(usize, &str)> =
        FIELD_FLAGS.iter().filter_map(|(field, flag)| message.find(field).map(|at| (at, *flag))).collect();
    if named.is_empty() {
        return message.to_string();
    }
    named.sort();
    let flags: Vec<&str> = named.into_iter().map(|(_, f)| f).collect();
    format!("{message} ({})", flags.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::TypeArg;
    use serde_json::json;

    fn args() -> SubmitArgs {
        SubmitArgs::default()
    }

    #[test]
    fn every_request_field_has_a_flag() {
        let mut known = known_fields();
        known.sort();
        let mut flagged: Vec<String> = FIELD_FLAGS.iter().map(|(f, _)| f.to_string()).collect();
        flagged.sort();
        assert_eq!(known, flagged, "CreateJobRequest and FIELD_FLAGS disagree");
    }

    #[test]
    fn flags_build_a_seed_003_body() {
        let a = SubmitArgs {
            job_type: Some(TypeArg::Ralph),
            org: Some("acme".into()),
            repo: Some("shop".into()),
            max_iterations: Some(3),
            completion_promise: Some("DONE".into()),
            feedback_commands: vec!["make test".into()],
            priority: Some(-2),
            title: Some("Loop".into()),
            timeout_seconds: Some(900),
            ..args()
        };
        let body = build_body(None, &a, Some("go".into())).unwrap();
        assert_eq!(
            body,
            json!({"prompt": "go", "jobType": "ralph", "githubOrg": "acme", "githubRepo": "shop", "maxIterations": 3,
                   "completionPromise": "DONE", "feedbackCommands": ["make test"], "priority": -2, "title": "Loop",
                   "timeoutSeconds": 900})
        );
        let too_long = SubmitArgs { timeout_seconds: Some(86_401), ..a };
        let err = build_body(None, &too_long, Some("go".into())).unwrap_err().to_string();
        assert_eq!(err, "timeoutSeconds must be an integer from 1 to 86400 (--timeout)");
    }

    #[test]
    fn flags_override_the_file() {
        let file = json!({"prompt": "from file", "githubOrg": "acme", "githubRepo": "shop", "branchName": "a", "title": "T"});
        let a = SubmitArgs { branch: Some("b".into()), ..args() };
        let body = build_body(Some(file), &a, None).unwrap();
        assert_eq!(body["branchName"], "b");
        assert_eq!(body["prompt"], "from file");
        assert_eq!(body["title"], "T");
    }

    #[test]
    fn bad_bodies_name_the_flag() {
        let a = SubmitArgs { org: Some("acme".into()), repo: Some("shop".into()), ..args() };
        let err = build_body(None, &a, Some("go".into())).unwrap_err().to_string();
        assert_eq!(err, "branchName is required for code jobs (--branch)");
        let err = build_body(None, &args(), None).unwrap_err().to_string();
        assert_eq!(err, "prompt is required (--prompt)");
        let a = SubmitArgs { client_id: Some("nope".into()), branch: Some("b".into()), ..args() };
        let err = build_body(None, &a, Some("go".into())).unwrap_err().to_string();
        assert_eq!(err, "clientId must be a UUID (--client-id)");
        let err = build_body(Some(json!({"prompt": "x", "colour": "red"})), &args(), None).unwrap_err().to_string();
        assert!(err.contains("unknown field \"colour\""), "{err}");
        let err = build_body(Some(json!([1])), &args(), None).unwrap_err().to_string();
        assert!(err.contains("JSON object"), "{err}");
        assert_eq!(with_flag_hint("githubRepo is required with githubOrg"), "githubRepo is required with githubOrg (--repo, --org)");
        assert_eq!(with_flag_hint("request body must be a JSON object"), "request body must be a JSON object");
    }
}
