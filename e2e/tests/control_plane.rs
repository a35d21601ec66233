//! Issue 2 end to end against a real `wrangler dev`: auth (register, login, refresh rotation, bad
//! tokens, the service credential), seed 003's jobs API (validation, listing, detail, cancel,
//! retry, owner scoping), `/queue` and `/health`, the per-job WebSocket channel of seed 000 §4
//! (auth, replay from a cursor, live events, chat, bad client messages, reconnects), and a restart
//! of `wrangler dev` that keeps users, jobs and events.
//!
//! Tests that only need isolation by user share one edge; tests that count queue-wide state, change
//! settings or restart the edge start their own.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use kiln_e2e::{dev_var, unique_email, Method, StatusCode, TestEdge, WsAuth, WsClient, PASSWORD};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(800);

static SHARED: OnceCell<TestEdge> = OnceCell::const_new();

/// The edge shared by tests that isolate themselves by user.
async fn shared() -> &'static TestEdge {
    SHARED.get_or_init(|| start(&[])).await
}

/// A new edge on which every user may name the repositories of the `acme` org these tests use
/// (repository grants are `e2e/tests/trust.rs`'s subject).
async fn start(vars: &[(&str, &str)]) -> TestEdge {
    let edge = TestEdge::start(vars).await.expect("starting wrangler dev");
    edge.api().grant("*", "acme/*").await;
    edge
}

/// A client of `token`'s user named `name`, with the repository `acme/<repo>`: its id.
async fn client_with_repository(api: &kiln_e2e::Api, token: &str, name: &str, repo: &str) -> String {
    let (_, client) = api.post("/clients", token, json!({"name": name})).await;
    let client_id = client["id"].as_str().expect("client id").to_string();
    let (status, body) =
        api.post(&format!("/clients/{client_id}/repository"), token, json!({"githubOrg": "acme", "githubRepo": repo})).await;
    assert!(status.is_success(), "{body}");
    client_id
}

fn code_job(branch: &str) -> Value {
    json!({"prompt": "Add a logout button to the header", "githubOrg": "acme", "githubRepo": "shop", "branchName": branch})
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert!(
        body.get("error").and_then(Value::as_str).is_some_and(|e| !e.is_empty()),
        "{what}: errors are {{\"error\": \"...\"}}, got {body}"
    );
}

fn assert_rfc3339(v: &Value, what: &str) {
    let s = v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{what} {s:?} is not RFC 3339: {e}"));
}

fn assert_uuid(v: &Value, what: &str) {
    let s = v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("{what} {s:?} is not a UUID: {e}"));
}

fn ids(list: &Value) -> Vec<String> {
    list["jobs"].as_array().unwrap_or_else(|| panic!("no jobs array: {list}")).iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
}

// --- JWT surgery --------------------------------------------------------------------------------

fn jwt_parts(token: &str) -> (Value, Value, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "an access token is a JWT: {token}");
    let decode = |p: &str| -> Value { serde_json::from_slice(&B64.decode(p).expect("base64url")).expect("JSON") };
    (decode(parts[0]), decode(parts[1]), parts[2].to_string())
}

fn hmac_sign(alg: &str, secret: &[u8], input: &str) -> Vec<u8> {
    macro_rules! sign {
        ($h:ty) => {{
            let mut mac = Hmac::<$h>::new_from_slice(secret).expect("any key length");
            mac.update(input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }};
    }
    match alg {
        "HS256" => sign!(sha2::Sha256),
        "HS384" => sign!(sha2::Sha384),
        "HS512" => sign!(sha2::Sha512),
        other => panic!("access tokens are expected to be HMAC-signed JWTs, got alg {other:?}"),
    }
}

/// The token's claims changed by `edit`, signed again with `secret`.
fn resign(token: &str, secret: &[u8], edit: impl FnOnce(&mut Value)) -> String {
    let (header, mut claims, _) = jwt_parts(token);
    edit(&mut claims);
    let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let sig = hmac_sign(header["alg"].as_str().expect("alg"), secret, &input);
    format!("{input}.{}", B64.encode(sig))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

// --- auth ---------------------------------------------------------------------------------------

#[tokio::test]
async fn register_login_and_refresh_rotation() {
    let api = shared().await.api();
    let email = unique_email("ann");
    let (status, user) = api.register(&email, PASSWORD).await;
    assert!(status == StatusCode::CREATED || status == StatusCode::OK, "register: {status} {user}");
    assert_eq!(user["email"], email.as_str(), "{user}");
    assert!(user.get("password").is_none() && user.get("password_hash").is_none(), "never echo secrets: {user}");

    let (status, pair) = api.login(&email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    let access = pair["access"].as_str().expect("access").to_string();
    let refresh = pair["refresh"].as_str().expect("refresh").to_string();
    let (_, claims, _) = jwt_parts(&access);
    let exp = claims["exp"].as_i64().expect("access tokens expire");
    assert!(exp > now_secs() && exp <= now_secs() + 3600, "access tokens live minutes, not longer: exp {exp}");

    let (status, list) = api.get("/jobs", &access).await;
    assert_eq!(status, StatusCode::OK, "{list}");

    // Refresh answers a new pair and the old refresh token stops working.
    let (status, pair2) = api.send(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh": refresh}))).await;
    assert_eq!(status, StatusCode::OK, "{pair2}");
    let refresh2 = pair2["refresh"].as_str().expect("refresh").to_string();
    let access2 = pair2["access"].as_str().expect("access").to_string();
    assert_ne!(refresh2, refresh);
    assert_eq!(api.get("/jobs", &access2).await.0, StatusCode::OK);
    // The new one works once, too.
    let (status, pair3) = api.send(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh": refresh2}))).await;
    assert_eq!(status, StatusCode::OK, "{pair3}");
    let (status, body) = api.send(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh": refresh2}))).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "reusing a rotated refresh token");
    // Reuse revokes the login's whole family of tokens (e2e/tests/accounts.rs has the details).
    let refresh3 = pair3["refresh"].as_str().expect("refresh").to_string();
    let (status, body) = api.send(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh": refresh3}))).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "the newest token after a reuse");

    // Login is case-insensitive on the email, like registration's duplicate check.
    let (status, body) = api.login(&email.to_uppercase(), PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "login with the email in capitals: {body}");
}

#[tokio::test]
async fn registration_refuses_duplicates_and_bad_input() {
    let api = shared().await.api();
    let email = unique_email("dup");
    assert!(api.register(&email, PASSWORD).await.0.is_success());

    let (status, body) = api.register(&email, PASSWORD).await;
    assert!(status == StatusCode::CONFLICT || status == StatusCode::BAD_REQUEST, "duplicate email: {status} {body}");
    assert!(body["error"].is_string(), "{body}");
    let (status, body) = api.register(&email.to_uppercase(), PASSWORD).await;
    assert!(status == StatusCode::CONFLICT || status == StatusCode::BAD_REQUEST, "same email in capitals: {status} {body}");

    let fresh = unique_email("bad");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"email": fresh, "password": ""}), "empty password"),
        (json!({"email": fresh}), "missing password"),
        (json!({"email": fresh, "password": "short1"}), "short password"),
        (json!({"email": fresh, "password": "alllowercaseletters"}), "single-class password"),
        (json!({"email": fresh, "password": "12345678"}), "digits-only password"),
        (json!({"email": fresh, "password": 12345678}), "password not a string"),
        (json!({"password": PASSWORD}), "missing email"),
        (json!({"email": "", "password": PASSWORD}), "empty email"),
        (json!({"email": "not-an-email", "password": PASSWORD}), "email without @"),
        (json!([fresh, PASSWORD]), "body not an object"),
    ];
    for (body, what) in cases {
        let (status, answer) = api.send(Method::POST, "/api/auth/register/", None, Some(body)).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, what);
    }
    for raw in ["{\"email\": ", "not json at all", ""] {
        let (status, answer) =
            api.send_raw(Method::POST, "/api/auth/register/", None, Some("application/json"), raw.to_string()).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, &format!("malformed JSON {raw:?}"));
    }
    // None of the refused attempts created the user.
    let (status, body) = api.login(&fresh, PASSWORD).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "login of a user that was never created");
}

#[tokio::test]
async fn login_and_refresh_refuse_bad_credentials() {
    let api = shared().await.api();
    let email = unique_email("bob");
    api.register_and_login(&email).await;

    let (status, body) = api.login(&email, "Wrong-Password-1").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "wrong password");
    let (status, body) = api.login(&unique_email("nobody"), PASSWORD).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unknown user");
    let (status, body) =
        api.send_raw(Method::POST, "/api/auth/login/", None, Some("application/json"), "{\"email\":").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed JSON on login");
    let (status, body) = api.send(Method::POST, "/api/auth/login/", None, Some(json!({"email": email}))).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "login without a password");

    let (access, _) = api.register_and_login(&unique_email("carl")).await;
    for (body, want, what) in [
        (json!({"refresh": "no-such-token"}), StatusCode::UNAUTHORIZED, "unknown refresh token"),
        (json!({"refresh": access}), StatusCode::UNAUTHORIZED, "an access token used as refresh token"),
        (json!({}), StatusCode::BAD_REQUEST, "missing refresh"),
    ] {
        let (status, answer) = api.send(Method::POST, "/api/auth/refresh/", None, Some(body)).await;
        assert_error(status, &answer, want, what);
    }
    let (status, body) =
        api.send_raw(Method::POST, "/api/auth/refresh/", None, Some("application/json"), "{\"refresh\"").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed JSON on refresh");
}

#[tokio::test]
async fn missing_malformed_expired_and_forged_tokens_get_401() {
    let api = shared().await.api();
    let (access, refresh) = api.register_and_login(&unique_email("eve")).await;
    let (other, _) = api.register_and_login(&unique_email("mallory")).await;
    let secret = dev_var("JWT_SECRET");

    // Control: the token re-signed with the real secret and unchanged claims is accepted, so the
    // refusals below are about what was changed, not about how the test signs.
    let resigned = resign(&access, secret.as_bytes(), |_| {});
    assert_eq!(api.get("/jobs", &resigned).await.0, StatusCode::OK, "a faithfully re-signed token");

    let (_, other_claims, _) = jwt_parts(&other);
    let (header, _, sig) = jwt_parts(&access);
    let (_, mut claims, _) = jwt_parts(&access);
    claims["sub"] = other_claims["sub"].clone();
    let swapped_sub = format!("{}.{}.{sig}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let alg_none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        B64.encode(jwt_parts(&access).1.to_string())
    );
    let expired = resign(&access, secret.as_bytes(), |c| {
        c["exp"] = json!(now_secs() - 3600);
        if c.get("iat").is_some() {
            c["iat"] = json!(now_secs() - 7200);
        }
        if c.get("nbf").is_some() {
            c["nbf"] = json!(now_secs() - 7200);
        }
    });
    let wrong_key = resign(&access, b"not-the-signing-secret-of-this-edge", |_| {});
    let truncated = access[..access.len() - 4].to_string();

    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "no Authorization header"),
        (Some(String::new()), "empty Authorization header"),
        (Some("Bearer".into()), "Bearer without a token"),
        (Some("Bearer ".into()), "Bearer and a space"),
        (Some(format!("Basic {}", B64.encode("ann:pw"))), "Basic scheme"),
        (Some(format!("Token {access}")), "unknown scheme with a valid token"),
        (Some("Bearer not-a-jwt".into()), "not a JWT"),
        (Some("Bearer a.b.c".into()), "three garbage segments"),
        (Some(format!("Bearer {truncated}")), "truncated signature"),
        (Some(format!("Bearer {swapped_sub}")), "claims changed without re-signing (forged)"),
        (Some(format!("Bearer {wrong_key}")), "signed with another key (forged)"),
        (Some(format!("Bearer {alg_none}")), "alg none (forged)"),
        (Some(format!("Bearer {expired}")), "expired"),
        (Some(format!("Bearer {refresh}")), "a refresh token used as access token"),
        (Some(format!("Bearer {}x", dev_var("AGENT_API_SECRET"))), "service secret with a suffix"),
    ];
    for (header, what) in cases {
        let (status, body) = api.send_raw(Method::GET, "/jobs", header.as_deref(), None, "").await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, &format!("GET /jobs, {what}"));
    }
    // The error never echoes internals such as the signing secret.
    let (_, body) = api.send_raw(Method::GET, "/jobs", Some(&format!("Bearer {wrong_key}")), None, "").await;
    assert!(!body.to_string().contains(&secret), "{body}");
}

#[tokio::test]
async fn every_endpoint_but_health_and_auth_needs_a_token() {
    let api = shared().await.api();
    let id = uuid::Uuid::new_v4();
    for (method, path) in [
        (Method::GET, "/jobs".to_string()),
        (Method::POST, "/jobs".to_string()),
        (Method::GET, format!("/jobs/{id}")),
        (Method::POST, format!("/jobs/{id}/cancel")),
        (Method::POST, format!("/jobs/{id}/retry")),
        (Method::GET, "/queue".to_string()),
        (Method::GET, "/clients".to_string()),
    ] {
        let (status, body) = api.send(method.clone(), &path, None, Some(json!({}))).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, &format!("{method} {path} without a token"));
    }
    let (status, body) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "/health is open: {body}");
}

#[tokio::test]
async fn the_service_credential_works_like_a_user() {
    let api = shared().await.api();
    let secret = kiln_e2e::agent_api_secret();
    let created = api.create_job(&secret, code_job("feature/service")).await;
    let id = created["id"].as_str().unwrap();
    let job = api.job(&secret, id).await;
    assert_eq!(job["status"], "queued");
    let (status, list) = api.get("/jobs", &secret).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert!(ids(&list).contains(&id.to_string()), "{list}");
    let (status, q) = api.get("/queue", &secret).await;
    assert_eq!(status, StatusCode::OK, "{q}");
    // A user does not see the service's jobs.
    let user = api.new_user("outsider").await;
    assert_eq!(api.get(&format!("/jobs/{id}"), &user).await.0, StatusCode::NOT_FOUND);
}

// --- jobs ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_validates_the_body_as_seed_003_documents() {
    let api = shared().await.api();
    let token = api.new_user("validate").await;
    let unknown_client = uuid::Uuid::new_v4().to_string();
    let repo = json!({"githubOrg": "acme", "githubRepo": "shop"});
    let with = |extra: Value| {
        let mut v = repo.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "empty body"),
        (with(json!({"branchName": "b"})), "missing prompt"),
        (with(json!({"prompt": "", "branchName": "b"})), "empty prompt"),
        (with(json!({"prompt": "   ", "branchName": "b"})), "blank prompt"),
        (with(json!({"prompt": 42, "branchName": "b"})), "prompt not a string"),
        (json!({"prompt": "x", "branchName": "b"}), "neither clientId nor githubOrg/githubRepo"),
        (json!({"prompt": "x", "githubOrg": "acme", "branchName": "b"}), "githubOrg without githubRepo"),
        (json!({"prompt": "x", "githubRepo": "shop", "branchName": "b"}), "githubRepo without githubOrg"),
        (with(json!({"prompt": "x"})), "code job (the default) without branchName"),
        (with(json!({"prompt": "x", "jobType": "code"})), "code job without branchName"),
        (with(json!({"prompt": "x", "branchName": "b", "jobType": "deploy"})), "unknown jobType"),
        (with(json!({"prompt": "x", "branchName": "b", "jobType": 1})), "jobType not a string"),
        (json!({"prompt": "x", "clientId": "not-a-uuid", "branchName": "b"}), "clientId not a UUID"),
        (json!({"prompt": "x", "githubOrg": "../etc", "githubRepo": "shop", "branchName": "b"}), "githubOrg with a path"),
        (json!({"prompt": "x", "githubOrg": "acme", "githubRepo": "a b", "branchName": "b"}), "githubRepo with a space"),
        (with(json!({"prompt": "x", "branchName": "a..b"})), "branchName with .."),
        (with(json!({"prompt": "x", "branchName": "-f"})), "branchName that looks like an option"),
        (with(json!({"prompt": "x", "jobType": "ralph", "maxIterations": 0})), "maxIterations 0"),
        (with(json!({"prompt": "x", "jobType": "ralph", "maxIterations": 101})), "maxIterations 101"),
        (with(json!({"prompt": "x", "jobType": "ralph", "maxIterations": -1})), "maxIterations negative"),
        (with(json!({"prompt": "x", "jobType": "ralph", "maxIterations": 2.5})), "maxIterations fractional"),
        (with(json!({"prompt": "x", "jobType": "ralph", "maxIterations": "10"})), "maxIterations a string"),
        (with(json!({"prompt": "x", "jobType": "ralph", "completionPromise": 7})), "completionPromise not a string"),
        (with(json!({"prompt": "x", "jobType": "ralph", "feedbackCommands": "npm test"})), "feedbackCommands a string"),
        (with(json!({"prompt": "x", "jobType": "ralph", "feedbackCommands": [1]})), "feedbackCommands of numbers"),
        (with(json!({"prompt": "x", "jobType": "ralph", "feedbackCommands": [""]})), "an empty feedback command"),
        (json!(["prompt", "x"]), "body not an object"),
    ];
    for (body, what) in cases {
        let (status, answer) = api.post("/jobs", &token, body.clone()).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, &format!("{what}: {body}"));
    }
    for raw in ["{\"prompt\": \"x\",", "prompt=x", ""] {
        let (status, answer) =
            api.send_raw(Method::POST, "/jobs", Some(&format!("Bearer {token}")), Some("application/json"), raw.to_string()).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, &format!("malformed JSON {raw:?}"));
    }
    let (status, answer) =
        api.post("/jobs", &token, json!({"prompt": "x", "clientId": unknown_client, "branchName": "b"})).await;
    assert!(
        status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
        "a client that does not exist: {status} {answer}"
    );
    // Nothing refused was created.
    let (_, list) = api.get("/jobs", &token).await;
    assert_eq!(list["total"], 0, "{list}");
}

#[tokio::test]
async fn create_answers_seed_003_shapes_for_each_job_type() {
    let api = shared().await.api();
    let token = api.new_user("shapes").await;

    let (status, code) = api.post("/jobs", &token, code_job("feature/logout-button")).await;
    assert_eq!(status, StatusCode::CREATED, "{code}");
    assert_uuid(&code["id"], "id");
    assert_eq!(code["status"], "queued", "{code}");
    assert!(code["position"].as_u64().is_some_and(|p| p >= 1), "position is 1-based: {code}");
    assert_eq!(code["branchName"], "feature/logout-button", "{code}");
    assert_rfc3339(&code["createdAt"], "createdAt");

    let (status, task) = api
        .post("/jobs", &token, json!({"prompt": "Spec a feature", "githubOrg": "acme", "githubRepo": "shop", "jobType": "task"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let generated = task["branchName"].as_str().unwrap_or_default();
    assert!(!generated.is_empty(), "task jobs get a generated branch: {task}");

    let (status, ralph) = api
        .post("/jobs", &token, json!({"prompt": "Loop", "githubOrg": "acme", "githubRepo": "shop", "jobType": "ralph"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ralph}");
    assert_eq!(ralph["jobType"], "ralph", "{ralph}");
    assert_eq!(ralph["maxIterations"], 10, "default maxIterations: {ralph}");
    assert_eq!(ralph["completionPromise"], "RALPH_COMPLETE", "default completionPromise: {ralph}");
    assert!(!ralph["branchName"].as_str().unwrap_or_default().is_empty(), "{ralph}");

    for n in [1, 100] {
        let body = json!({"prompt": "Loop", "githubOrg": "acme", "githubRepo": "shop", "jobType": "ralph",
            "branchName": format!("feature/auth-{n}"), "maxIterations": n, "completionPromise": "DONE",
            "feedbackCommands": ["npm test", "npm run lint"]});
        let (status, r) = api.post("/jobs", &token, body).await;
        assert_eq!(status, StatusCode::CREATED, "{r}");
        assert_eq!(r["maxIterations"], n, "{r}");
        assert_eq!(r["completionPromise"], "DONE", "{r}");
        assert_eq!(r["branchName"], format!("feature/auth-{n}"), "{r}");
        assert_eq!(r["feedbackCommands"], json!(["npm test", "npm run lint"]), "{r}");
        let job = api.job(&token, r["id"].as_str().unwrap()).await;
        assert_eq!(job["max_iterations"], n, "{job}");
        assert_eq!(job["feedback_commands"], json!(["npm test", "npm run lint"]), "{job}");
    }

    // By clientId: the client's repository is the job's.
    let (status, client) = api.post("/clients", &token, json!({"name": "Acme"})).await;
    assert_eq!(status, StatusCode::CREATED, "{client}");
    let client_id = client["id"].as_str().unwrap().to_string();
    let (status, with_repo) = api
        .post(&format!("/clients/{client_id}/repository"), &token, json!({"githubOrg": "acme", "githubRepo": "web", "defaultBranch": "main"}))
        .await;
    assert!(status.is_success(), "{with_repo}");
    let feature = uuid::Uuid::new_v4().to_string();
    let member = uuid::Uuid::new_v4().to_string();
    let (status, by_client) = api
        .post("/jobs", &token, json!({"prompt": "Add a footer", "clientId": client_id, "branchName": "feature/footer",
            "jobType": "code", "featureId": feature, "title": "Footer", "createdByTeamMemberId": member}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{by_client}");
    let job = api.job(&token, by_client["id"].as_str().unwrap()).await;
    assert_eq!(job["client"]["id"], client_id.as_str(), "{job}");
    assert_eq!(job["client"]["name"], "Acme", "{job}");
    assert_eq!(job["repository"]["owner_name"], "acme", "{job}");
    assert_eq!(job["repository"]["repo_name"], "web", "{job}");
    assert_eq!(job["feature"]["id"], feature.as_str(), "{job}");
    assert_eq!(job["title"], "Footer", "{job}");
    assert_eq!(job["created_by_team_member_id"], member.as_str(), "{job}");
}

#[tokio::test]
async fn get_renders_the_job_and_its_messages() {
    let edge = shared().await;
    let api = edge.api();
    let token = api.new_user("detail").await;
    let created = api.create_job(&token, code_job("feature/detail")).await;
    let id = created["id"].as_str().unwrap();

    let job = api.job(&token, id).await;
    assert_eq!(job["id"], id);
    assert_eq!(job["status"], "queued");
    assert_eq!(job["job_type"], "code");
    assert_eq!(job["prompt"], "Add a logout button to the header");
    assert_eq!(job["branch_name"], "feature/detail");
    assert_eq!(job["repository"]["owner_name"], "acme", "{job}");
    assert_eq!(job["repository"]["repo_name"], "shop", "{job}");
    assert_rfc3339(&job["created_at"], "created_at");
    assert!(job.get("messages").is_none(), "messages only with includeMessages=true: {job}");

    // A chat message over the socket becomes a user_input message.
    let mut ws = WsClient::connect(&edge.ws_url(), id, WsAuth::Header(&token), None).await.expect("socket");
    ws.send_json(&json!({"kind": "chat", "content": "please also add a tooltip"})).await;
    ws.until(WAIT, "the chat's stageUpdate", |m| m["kind"] == "stageUpdate").await;

    let (status, job) = api.get(&format!("/jobs/{id}?includeMessages=true"), &token).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let messages = job["messages"].as_array().unwrap_or_else(|| panic!("messages: {job}"));
    for m in messages {
        assert!(["system", "stdout", "stderr", "user_input"].contains(&m["type"].as_str().unwrap_or("")), "{m}");
        assert!(m["content"].is_string(), "{m}");
        assert_rfc3339(&m["created_at"], "message created_at");
    }
    assert_eq!(messages.first().map(|m| m["type"].clone()), Some(json!("system")), "creation is a system message: {job}");
    assert!(
        messages.iter().any(|m| m["type"] == "user_input" && m["content"] == "please also add a tooltip"),
        "{job}"
    );
    let (status, job) = api.get(&format!("/jobs/{id}?includeMessages=false"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(job.get("messages").is_none(), "{job}");

    for missing in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_string()] {
        let (status, body) = api.get(&format!("/jobs/{missing}"), &token).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, &format!("GET /jobs/{missing}"));
    }
}

#[tokio::test]
async fn list_filters_paginates_and_puts_the_newest_first() {
    let api = shared().await.api();
    let token = api.new_user("lister").await;
    let feature_a = uuid::Uuid::new_v4().to_string();
    let feature_b = uuid::Uuid::new_v4().to_string();
    let mut created = vec![];
    for i in 0..6 {
        let mut body = code_job(&format!("feature/list-{i}"));
        body["featureId"] = json!(if i % 2 == 0 { &feature_a } else { &feature_b });
        created.push(api.create_job(&token, body).await["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cancelled = [&created[1], &created[4]];
    for id in cancelled {
        let (status, body) = api.post(&format!("/jobs/{id}/cancel"), &token, json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let (status, all) = api.get("/jobs", &token).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["total"], 6, "{all}");
    assert_eq!(ids(&all), newest_first, "newest first");

    let mut paged = vec![];
    for offset in [0, 2, 4] {
        let (status, page) = api.get(&format!("/jobs?limit=2&offset={offset}"), &token).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["total"], 6, "total counts every match, not the page: {page}");
        assert_eq!(ids(&page).len(), 2, "{page}");
        paged.extend(ids(&page));
    }
    assert_eq!(paged, newest_first, "pages concatenate to the full list");
    let (_, beyond) = api.get("/jobs?offset=6", &token).await;
    assert_eq!((ids(&beyond).len(), beyond["total"].clone()), (0, json!(6)), "{beyond}");

    let (_, only) = api.get("/jobs?status=cancelled", &token).await;
    assert_eq!(only["total"], 2, "{only}");
    assert_eq!(ids(&only), vec![created[4].clone(), created[1].clone()]);
    assert!(only["jobs"].as_array().unwrap().iter().all(|j| j["status"] == "cancelled"));
    let (_, both) = api.get("/jobs?status=queued,cancelled", &token).await;
    assert_eq!(both["total"], 6, "{both}");
    let (_, none) = api.get("/jobs?status=completed,failed", &token).await;
    assert_eq!(none["total"], 0, "{none}");
    let (_, queued_page) = api.get("/jobs?status=queued&limit=1&offset=1", &token).await;
    assert_eq!(queued_page["total"], 4, "{queued_page}");
    assert_eq!(ids(&queued_page), vec![created[3].clone()], "{queued_page}");

    let (_, by_feature) = api.get(&format!("/jobs?featureId={feature_a}"), &token).await;
    assert_eq!(ids(&by_feature), vec![created[4].clone(), created[2].clone(), created[0].clone()], "{by_feature}");
    assert_eq!(by_feature["total"], 3);

    for bad in ["status=bogus", "status=queued,bogus", "limit=0", "limit=abc", "limit=-1", "offset=-1", "offset=x"] {
        let (status, body) = api.get(&format!("/jobs?{bad}"), &token).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, &format!("GET /jobs?{bad}"));
    }
}

#[tokio::test]
async fn list_filters_by_client_and_defaults_to_fifty() {
    let api = shared().await.api();
    let token = api.new_user("many").await;
    let client_id = client_with_repository(&api, &token, "Many", "many").await;
    let mut by_client = vec![];
    for i in 0..52 {
        let body = if i < 3 {
            json!({"prompt": "x", "clientId": client_id, "branchName": format!("c/{i}")})
        } else {
            code_job(&format!("many/{i}"))
        };
        let id = api.create_job(&token, body).await["id"].as_str().unwrap().to_string();
        if i < 3 {
            by_client.push(id);
        }
    }
    let (_, list) = api.get("/jobs", &token).await;
    assert_eq!(list["total"], 52, "{}", list["total"]);
    assert_eq!(ids(&list).len(), 50, "the default limit is 50");
    let (_, list) = api.get("/jobs?limit=100", &token).await;
    assert_eq!(ids(&list).len(), 52);
    let (_, filtered) = api.get(&format!("/jobs?clientId={client_id}"), &token).await;
    by_client.reverse();
    assert_eq!(ids(&filtered), by_client, "{filtered}");
    assert_eq!(filtered["total"], 3);
}

#[tokio::test]
async fn cancel_and_retry_follow_the_lifecycle() {
    let api = shared().await.api();
    let token = api.new_user("retry").await;
    let id = api.create_job(&token, code_job("feature-x")).await["id"].as_str().unwrap().to_string();

    let (status, body) = api.post(&format!("/jobs/{id}/retry"), &token, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "retrying a queued job");

    let (status, body) = api.post(&format!("/jobs/{id}/cancel"), &token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"id": id, "status": "cancelled", "wasRunning": false}));
    let job = api.job(&token, &id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let (status, body) = api.post(&format!("/jobs/{id}/cancel"), &token, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "cancelling a cancelled job");
    assert_eq!(api.job(&token, &id).await["status"], "cancelled");

    let (status, retried) = api.post(&format!("/jobs/{id}/retry"), &token, json!({})).await;
    assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status} {retried}");
    let new_id = retried["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    assert_uuid(&retried["id"], "retry id");
    assert_eq!(retried["originalJobId"], id.as_str(), "{retried}");
    assert_eq!(retried["status"], "queued", "{retried}");
    let branch = retried["branchName"].as_str().unwrap_or_default();
    assert!(branch.starts_with("feature-x") && branch != "feature-x", "a fresh branch derived from the original: {retried}");

    let new_job = api.job(&token, &new_id).await;
    assert_eq!(new_job["status"], "queued");
    assert_eq!(new_job["original_job_id"], id.as_str(), "{new_job}");
    assert_eq!(new_job["prompt"], "Add a logout button to the header");
    assert_eq!(new_job["job_type"], "code");
    assert_eq!(api.job(&token, &id).await["status"], "cancelled", "the original keeps its status");

    let (status, body) = api.post(&format!("/jobs/{new_id}/retry"), &token, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "retrying the queued retry");
    // A cancelled job can be retried again: each retry is a new job.
    let (status, again) = api.post(&format!("/jobs/{id}/retry"), &token, json!({})).await;
    assert!(status.is_success(), "{again}");
    assert_ne!(again["id"], retried["id"]);

    for path in [format!("/jobs/{}/cancel", uuid::Uuid::new_v4()), format!("/jobs/{}/retry", uuid::Uuid::new_v4())] {
        let (status, body) = api.post(&path, &token, json!({})).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, &path);
    }
}

/// `GET /jobs/:id` answers from the job's room, the list from D1: both show the same job at each
/// step of its life (a client's name included), and another owner's id is a 404 from the room.
#[tokio::test]
async fn a_job_reads_the_same_from_its_room_and_from_the_list() {
    let api = shared().await.api();
    let token = api.new_user("same").await;
    let client_id = client_with_repository(&api, &token, "Same Co", "same").await;
    let agree = |what: &'static str, id: String| {
        let (api, token) = (api.clone(), token.clone());
        async move {
            let one = api.job(&token, &id).await;
            let (_, list) = api.get("/jobs?limit=100", &token).await;
            let listed = list["jobs"].as_array().expect("jobs").iter().find(|j| j["id"] == id.as_str()).cloned();
            assert_eq!(Some(one.clone()), listed, "{what}: GET /jobs/:id and the list differ");
            one
        }
    };
    let by_client = api
        .create_job(&token, json!({"prompt": "x", "clientId": client_id, "branchName": "same/client"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let job = agree("a client's queued job", by_client.clone()).await;
    assert_eq!(job["client"]["name"], "Same Co", "{job}");
    let id = api.create_job(&token, code_job("same/one")).await["id"].as_str().unwrap().to_string();
    assert_eq!(agree("queued", id.clone()).await["status"], "queued");
    let (status, body) = api.post(&format!("/jobs/{id}/cancel"), &token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cancelled = agree("cancelled", id.clone()).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["completed_at"].is_string(), "{cancelled}");
    let (_, retried) = api.post(&format!("/jobs/{id}/retry"), &token, json!({})).await;
    let retried = retried["id"].as_str().expect("retry id").to_string();
    assert_eq!(agree("a retry", retried.clone()).await["original_job_id"], id.as_str());

    let other = api.new_user("same-other").await;
    for path in [format!("/jobs/{id}"), format!("/jobs/{by_client}"), "/jobs/not-a-uuid".to_string()] {
        let (status, body) = api.get(&path, &other).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, &path);
    }
}

#[tokio::test]
async fn another_users_job_is_404_everywhere_and_never_listed() {
    let edge = shared().await;
    let api = edge.api();
    let ann = api.new_user("owner").await;
    let bob = api.new_user("stranger").await;
    let id = api.create_job(&ann, code_job("feature/private")).await["id"].as_str().unwrap().to_string();
    let ralph = api
        .create_job(&ann, json!({"prompt": "x", "githubOrg": "acme", "githubRepo": "shop", "jobType": "ralph"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();

    for (method, path, body) in [
        (Method::GET, format!("/jobs/{id}"), None),
        (Method::GET, format!("/jobs/{id}?includeMessages=true"), None),
        (Method::POST, format!("/jobs/{id}/cancel"), Some(json!({}))),
        (Method::POST, format!("/jobs/{id}/retry"), Some(json!({}))),
        (Method::POST, format!("/jobs/{id}/message"), Some(json!({"message": "hi"}))),
        (Method::POST, format!("/jobs/{id}/complete"), Some(json!({}))),
        (Method::POST, format!("/jobs/{ralph}/stop"), Some(json!({}))),
        (Method::GET, format!("/jobs/{ralph}/iterations"), None),
    ] {
        let (status, answer) = api.send(method.clone(), &path, Some(&bob), body).await;
        assert_error(status, &answer, StatusCode::NOT_FOUND, &format!("{method} {path} as another user"));
    }
    let refused = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&bob), None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::NOT_FOUND, "{refused:?}");

    let (_, list) = api.get("/jobs", &bob).await;
    assert_eq!((list["total"].clone(), ids(&list).len()), (json!(0), 0), "{list}");
    let (_, q) = api.get("/queue", &bob).await;
    assert!(!q.to_string().contains(&id), "another user's job in /queue: {q}");
    // Bob's attempts changed nothing.
    assert_eq!(api.job(&ann, &id).await["status"], "queued");
    let (_, list) = api.get("/jobs", &ann).await;
    assert_eq!(list["total"], 2);
}

#[tokio::test]
async fn queue_and_health_report_the_real_sets() {
    let edge = start(&[("MAX_CONCURRENT_JOBS", "3")]).await;
    let api = edge.api();
    let (status, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["queue"], json!({"running": 0, "queued": 0, "maxConcurrent": 3}), "{health}");

    let token = api.new_user("queue").await;
    let mut ids = vec![];
    for i in 1..=3u64 {
        let mut body = code_job(&format!("feature/q{i}"));
        body["title"] = json!(format!("job {i}"));
        let created = api.create_job(&token, body).await;
        assert_eq!(created["position"], i, "no runner: each job queues behind the last: {created}");
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let (status, q) = api.get("/queue", &token).await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(q["maxConcurrent"], 3, "{q}");
    assert_eq!(q["running"], json!([]), "{q}");
    let queued = q["queued"].as_array().unwrap_or_else(|| panic!("{q}"));
    assert_eq!(queued.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect::<Vec<_>>(), ids, "oldest first: {q}");
    assert_eq!(queued[0]["title"], "job 1", "{q}");
    assert_rfc3339(&queued[0]["created_at"], "queued created_at");

    let (_, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(health["queue"], json!({"running": 0, "queued": 3, "maxConcurrent": 3}), "{health}");

    api.post(&format!("/jobs/{}/cancel", ids[0]), &token, json!({})).await;
    let (_, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(health["queue"]["queued"], 2, "{health}");
    let (_, q) = api.get("/queue", &token).await;
    assert_eq!(q["queued"].as_array().unwrap().len(), 2, "{q}");
    let created = api.create_job(&token, code_job("feature/q4")).await;
    assert_eq!(created["position"], 3, "{created}");
}

// --- the live channel ---------------------------------------------------------------------------

#[tokio::test]
async fn sockets_authenticate_by_header_or_dev_query_token() {
    let edge = shared().await;
    let api = edge.api();
    let (token, refresh) = api.register_and_login(&unique_email("sock")).await;
    let id = api.create_job(&token, code_job("feature/ws-auth")).await["id"].as_str().unwrap().to_string();
    let ws = edge.ws_url();

    let mut by_header = WsClient::connect(&ws, &id, WsAuth::Header(&token), None).await.expect("header auth");
    let first = by_header.expect_json(WAIT, "the replayed creation event").await;
    assert_eq!(first["kind"], "jobStatus", "{first}");
    let mut by_query = WsClient::connect(&ws, &id, WsAuth::Query(&token), None).await.expect("?token= in dev");
    assert_eq!(by_query.expect_json(WAIT, "the replayed creation event").await, first);

    for (auth, what) in [
        (WsAuth::None, "no credential"),
        (WsAuth::Header("not-a-jwt"), "garbage header token"),
        (WsAuth::Query("not-a-jwt"), "garbage query token"),
        (WsAuth::Header(&refresh), "refresh token"),
    ] {
        let refused = WsClient::connect(&ws, &id, auth, None).await.err().unwrap_or_else(|| panic!("{what}: upgraded"));
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{what}: {refused:?}");
    }
    let refused = WsClient::connect_path(&ws, &format!("/ws/jobs/{id}/"), Some("Basic abc")).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    let missing = uuid::Uuid::new_v4().to_string();
    let refused = WsClient::connect(&ws, &missing, WsAuth::Header(&token), None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::NOT_FOUND, "no such job: {refused:?}");
}

#[tokio::test]
async fn the_query_token_can_be_turned_off() {
    let edge = start(&[("ALLOW_WS_TOKEN_QUERY", "false")]).await;
    let api = edge.api();
    let token = api.new_user("prod").await;
    let id = api.create_job(&token, code_job("feature/prod")).await["id"].as_str().unwrap().to_string();
    let refused = WsClient::connect(&edge.ws_url(), &id, WsAuth::Query(&token), None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("the header still works");
}

#[tokio::test]
async fn replay_from_a_cursor_then_live_events_and_chat() {
    let edge = shared().await;
    let api = edge.api();
    let token = api.new_user("live").await;
    let id = api.create_job(&token, code_job("feature/live")).await["id"].as_str().unwrap().to_string();
    let ws = edge.ws_url();

    let mut a = WsClient::connect(&ws, &id, WsAuth::Header(&token), None).await.expect("socket a");
    let created = a.expect_json(WAIT, "the creation event").await;
    assert_eq!(created["seq"], 1, "{created}");
    assert_eq!(created["kind"], "jobStatus");
    assert_eq!(created["jobId"], id.as_str());
    assert_eq!(created["status"], "queued");
    assert!(created["message"].is_string(), "{created}");
    assert_rfc3339(&created["timestamp"], "jobStatus timestamp");
    assert_eq!(a.next_json(QUIET).await, None, "nothing else happened yet");

    let mut b = WsClient::connect(&ws, &id, WsAuth::Query(&token), Some(1)).await.expect("socket b after 1");
    assert_eq!(b.next_json(QUIET).await, None, "after=1 skips the creation event");

    a.send_json(&json!({"kind": "chat", "content": "Here are more details"})).await;
    let on_a = a.expect_json(WAIT, "the chat broadcast to its sender").await;
    let on_b = b.expect_json(WAIT, "the chat broadcast to another socket").await;
    assert_eq!(on_a, on_b, "every socket sees the same event");
    assert_eq!(on_a["seq"], 2, "{on_a}");
    assert_eq!(on_a["kind"], "stageUpdate");
    assert_eq!(on_a["role"], "user");
    assert_eq!(on_a["content"], "Here are more details");
    assert!(on_a["sender"].as_str().is_some_and(|s| !s.is_empty()), "the sender comes from the token: {on_a}");
    assert!(on_a.get("metadata").is_some(), "{on_a}");
    assert_rfc3339(&on_a["timestamp"], "stageUpdate timestamp");

    // Cancel shows up live as a jobStatus event.
    api.post(&format!("/jobs/{id}/cancel"), &token, json!({})).await;
    let cancelled = a.until(WAIT, "the cancel's jobStatus", |m| m["kind"] == "jobStatus").await.pop().unwrap();
    assert_eq!((cancelled["status"].clone(), cancelled["seq"].clone()), (json!("cancelled"), json!(3)), "{cancelled}");
    assert_eq!(b.expect_json(WAIT, "cancel on b").await, cancelled);

    // Replay from each cursor gives exactly the events after it, in order.
    let all = vec![created.clone(), on_a.clone(), cancelled.clone()];
    for after in 0..=3u64 {
        let mut c = WsClient::connect(&ws, &id, WsAuth::Header(&token), Some(after)).await.expect("replay socket");
        let got = c.drain(QUIET).await;
        assert_eq!(got, all[after as usize..].to_vec(), "replay after {after}");
    }
    let mut c = WsClient::connect(&ws, &id, WsAuth::Header(&token), Some(99)).await.expect("cursor past the end");
    assert_eq!(c.next_json(QUIET).await, None);
    // The chat is persisted: it is in the job's messages.
    let (_, job) = api.get(&format!("/jobs/{id}?includeMessages=true"), &token).await;
    assert!(job["messages"].as_array().unwrap().iter().any(|m| m["content"] == "Here are more details"), "{job}");
}

#[tokio::test]
async fn bad_client_messages_get_an_error_and_the_socket_stays_open() {
    let edge = shared().await;
    let api = edge.api();
    let token = api.new_user("badmsg").await;
    let id = api.create_job(&token, code_job("feature/bad-messages")).await["id"].as_str().unwrap().to_string();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), Some(1)).await.expect("socket");
    let mut watcher = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), Some(1)).await.expect("socket");

    let over = "x".repeat(64 * 1024 + 1);
    let bad: Vec<(String, &str)> = vec![
        ("not json".into(), "bad JSON"),
        ("{\"kind\": \"chat\", \"content\": ".into(), "truncated JSON"),
        (json!({"kind": "shout", "content": "hi"}).to_string(), "unknown kind"),
        (json!({"content": "hi"}).to_string(), "no kind"),
        (json!({"kind": "chat"}).to_string(), "no content"),
        (json!({"kind": "chat", "content": ""}).to_string(), "empty content"),
        (json!({"kind": "chat", "content": "  \n "}).to_string(), "blank content"),
        (json!({"kind": "chat", "content": 5}).to_string(), "content not a string"),
        (json!({"kind": "chat", "content": over}).to_string(), "content over 64 KiB"),
        (json!(["chat", "hi"]).to_string(), "not an object"),
    ];
    for (text, what) in bad {
        ws.send_text(&text).await;
        let answer = ws.expect_json(WAIT, what).await;
        assert_eq!(answer["kind"], "error", "{what}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {answer}");
    }
    assert_eq!(watcher.next_json(QUIET).await, None, "errors go only to the sender and are not events");

    let exactly = "y".repeat(64 * 1024);
    ws.send_json(&json!({"kind": "chat", "content": exactly})).await;
    let ok = ws.expect_json(WAIT, "a 64 KiB chat, the socket still open").await;
    assert_eq!((ok["kind"].clone(), ok["seq"].clone()), (json!("stageUpdate"), json!(2)), "errors took no seq");
    assert_eq!(ok["content"].as_str().map(str::len), Some(64 * 1024));
    assert_eq!(watcher.expect_json(WAIT, "the chat on the other socket").await, ok);

    let mut replay = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let kinds: Vec<Value> = replay.drain(QUIET).await.iter().map(|e| e["kind"].clone()).collect();
    assert_eq!(kinds, vec![json!("jobStatus"), json!("stageUpdate")], "refused messages were not persisted");
}

#[tokio::test]
async fn create_cancel_and_retry_are_jobstatus_events() {
    let edge = shared().await;
    let api = edge.api();
    let token = api.new_user("statuses").await;
    let id = api.create_job(&token, code_job("feature/status-events")).await["id"].as_str().unwrap().to_string();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let created = ws.expect_json(WAIT, "creation").await;
    assert_eq!((created["kind"].clone(), created["status"].clone()), (json!("jobStatus"), json!("queued")));

    api.post(&format!("/jobs/{id}/cancel"), &token, json!({})).await;
    let cancelled = ws.expect_json(WAIT, "cancel").await;
    assert_eq!((cancelled["kind"].clone(), cancelled["status"].clone()), (json!("jobStatus"), json!("cancelled")), "{cancelled}");
    assert_eq!(cancelled["jobId"], id.as_str());

    let (_, retried) = api.post(&format!("/jobs/{id}/retry"), &token, json!({})).await;
    let new_id = retried["id"].as_str().unwrap_or_else(|| panic!("{retried}")).to_string();
    let note = ws.expect_json(WAIT, "the retry on the original's channel").await;
    assert_eq!(note["kind"], "jobStatus", "{note}");
    assert_eq!(note["jobId"], id.as_str(), "{note}");
    assert!(note["message"].as_str().is_some_and(|m| m.contains(&new_id)), "it says where the work went: {note}");

    let mut new_ws = WsClient::connect(&edge.ws_url(), &new_id, WsAuth::Header(&token), None).await.expect("socket");
    let first = new_ws.expect_json(WAIT, "the retry's creation").await;
    assert_eq!(
        (first["kind"].clone(), first["status"].clone(), first["seq"].clone(), first["jobId"].clone()),
        (json!("jobStatus"), json!("queued"), json!(1), json!(new_id))
    );
}

#[tokio::test]
async fn reconnecting_with_the_last_seq_loses_and_repeats_nothing() {
    let edge = shared().await;
    let api = edge.api();
    let token = api.new_user("reconnect").await;
    let id = api.create_job(&token, code_job("feature/reconnect")).await["id"].as_str().unwrap().to_string();
    const CHATS: usize = 40;

    // A writer sends chats steadily while a reader disconnects and reconnects in the middle.
    let mut writer = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("writer");
    let write = tokio::spawn(async move {
        for i in 1..=CHATS {
            writer.send_json(&json!({"kind": "chat", "content": format!("message {i}")})).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        writer
    });

    let mut seen: Vec<Value> = vec![];
    let mut reader = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("reader");
    while seen.len() < 12 {
        seen.push(reader.expect_json(WAIT, "events before the reconnect").await);
    }
    reader.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await; // events keep coming meanwhile
    let last = seen.last().unwrap()["seq"].as_u64().unwrap();
    let mut reader = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), Some(last)).await.expect("reader again");
    let total = CHATS as u64 + 1;
    while seen.last().unwrap()["seq"].as_u64().unwrap() < total {
        seen.push(reader.expect_json(WAIT, "events after the reconnect").await);
    }
    let _writer = write.await.unwrap();
    assert_eq!(reader.next_json(QUIET).await, None, "nothing after the last event");

    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "dense, in order, no gap, no duplicate");
    let contents: Vec<String> = seen[1..].iter().map(|e| e["content"].as_str().unwrap().to_string()).collect();
    assert_eq!(contents, (1..=CHATS).map(|i| format!("message {i}")).collect::<Vec<_>>());
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len());
}

// --- restart ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_restart_of_wrangler_dev_keeps_users_jobs_and_events() {
    let mut edge = start(&[]).await;
    let api = edge.api();
    let email = unique_email("durable");
    let (access, refresh) = api.register_and_login(&email).await;
    let kept = api.create_job(&access, code_job("feature/kept")).await["id"].as_str().unwrap().to_string();
    let queued = api.create_job(&access, code_job("feature/still-queued")).await["id"].as_str().unwrap().to_string();
    let mut ws = WsClient::connect(&edge.ws_url(), &kept, WsAuth::Header(&access), None).await.expect("socket");
    ws.send_json(&json!({"kind": "chat", "content": "before the restart"})).await;
    ws.until(WAIT, "the chat", |m| m["kind"] == "stageUpdate").await;
    api.post(&format!("/jobs/{kept}/cancel"), &access, json!({})).await;
    ws.until(WAIT, "the cancel", |m| m["status"] == "cancelled").await;
    let mut replay = WsClient::connect(&edge.ws_url(), &kept, WsAuth::Header(&access), None).await.expect("socket");
    let events_before = replay.drain(QUIET).await;
    assert_eq!(events_before.len(), 3, "{events_before:#?}");
    let (_, list_before) = api.get("/jobs", &access).await;
    drop((ws, replay));

    edge.restart().await.expect("restarting wrangler dev");

    // Users: the same password logs in, the old access token is still valid (the signing secret
    // persists) and the refresh token issued before the restart works once.
    let (status, _) = api.login(&email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "login after the restart");
    let (status, body) = api.send(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh": refresh}))).await;
    assert_eq!(status, StatusCode::OK, "refresh after the restart: {body}");
    let (status, list_after) = api.get("/jobs", &access).await;
    assert_eq!(status, StatusCode::OK, "{list_after}");
    assert_eq!(list_after, list_before, "jobs survive the restart unchanged");
    assert_eq!(api.job(&access, &kept).await["status"], "cancelled");
    assert_eq!(api.job(&access, &queued).await["status"], "queued");
    let (_, q) = api.get("/queue", &access).await;
    assert_eq!(q["queued"].as_array().map(|a| a.iter().map(|e| e["id"].clone()).collect::<Vec<_>>()), Some(vec![json!(queued)]), "{q}");
    let (_, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(health["queue"]["queued"], 1, "{health}");

    // Events: the same log replays, and new events continue the sequence.
    let mut ws = WsClient::connect(&edge.ws_url(), &kept, WsAuth::Header(&access), None).await.expect("socket after restart");
    let events_after = ws.drain(QUIET).await;
    assert_eq!(events_after, events_before, "the event log survives the restart");
    ws.send_json(&json!({"kind": "chat", "content": "after the restart"})).await;
    let next = ws.expect_json(WAIT, "a chat after the restart").await;
    assert_eq!((next["seq"].clone(), next["content"].clone()), (json!(4), json!("after the restart")), "{next}");
    let mut from_cursor = WsClient::connect(&edge.ws_url(), &kept, WsAuth::Header(&access), Some(2)).await.expect("socket");
    let tail: Vec<Value> = from_cursor.drain(QUIET).await.iter().map(|e| e["seq"].clone()).collect();
    assert_eq!(tail, vec![json!(3), json!(4)]);
}
