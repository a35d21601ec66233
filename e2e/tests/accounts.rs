//! Accounts and the auth face end to end against a real `wrangler dev` (issue 6 item 5, issue 8
//! §2): the shapes seed 000's frontend (DRF + simplejwt) reads from register, login, refresh, me
//! and logout; `detail` beside `error` under `/api/`; login answering the same, at the same cost,
//! for unknown emails and wrong passwords; failed logins and registrations limited per email and
//! per client address (also under concurrency); logout and refresh-token family revocation; old
//! password hashes upgraded at login; CORS for allowed and refused origins.
//!
//! The shared edge runs with small limits; each test sends its own client address
//! (`CF-Connecting-IP`, which `wrangler dev` keeps when a request carries it) and its own emails,
//! so tests never share a rate-limit key.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Digest;
use kiln_e2e::{unique_email, Api, Method, StatusCode, TestEdge, PASSWORD};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

const PER_EMAIL: usize = 3;
const PER_ADDRESS: usize = 6;
const WINDOW_SECS: u64 = 900;
const WRONG: &str = "Wrong-Horse-1";

static SHARED: OnceCell<TestEdge> = OnceCell::const_new();

/// The edge shared by tests that isolate themselves by email and address: limits of
/// [`PER_EMAIL`] and [`PER_ADDRESS`] failures, and CORS for Vite's dev server and `*.example.com`.
async fn shared() -> &'static TestEdge {
    SHARED
        .get_or_init(|| async {
            TestEdge::start(&[
                ("AUTH_FAILURES_PER_EMAIL", &PER_EMAIL.to_string()),
                ("AUTH_FAILURES_PER_ADDRESS", &PER_ADDRESS.to_string()),
                ("AUTH_FAILURE_WINDOW_SECS", &WINDOW_SECS.to_string()),
                ("CORS_ORIGINS", "http://localhost:5173, https://*.example.com"),
            ])
            .await
            .expect("starting wrangler dev")
        })
        .await
}

/// A client address of this test's own (from the benchmarking range 198.18.0.0/15).
fn address() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("198.{}.{}.{}", 18 + (b[0] & 1), b[1], b[2])
}

/// A client of one edge from one address.
struct Client {
    api: Api,
    address: String,
}

impl Client {
    fn new(edge: &TestEdge) -> Client {
        Client { api: edge.api(), address: address() }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("CF-Connecting-IP", self.address.as_str())];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        self.api.send_with(Method::POST, path, &headers, Some(body)).await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("CF-Connecting-IP", self.address.as_str())];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let (status, _, body) = self.api.send_with(Method::GET, path, &headers, None).await;
        (status, body)
    }

    async fn register(&self, body: Value) -> (StatusCode, Value) {
        let (status, _, body) = self.post("/api/auth/register/", None, body).await;
        (status, body)
    }

    async fn login(&self, email: &str, password: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.post("/api/auth/login/", None, json!({"email": email, "password": password})).await
    }

    async fn refresh(&self, path: &str, refresh: &str) -> (StatusCode, Value) {
        let (status, _, body) = self.post(path, None, json!({"refresh": refresh})).await;
        (status, body)
    }

    /// Registers `email` with [`PASSWORD`] and answers the register answer.
    async fn new_user(&self, email: &str) -> Value {
        let (status, body) = self.register(json!({"email": email, "password": PASSWORD})).await;
        assert_eq!(status, StatusCode::CREATED, "register {email}: {body}");
        body
    }
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key:?} in {v}")).to_string()
}

/// DRF's error envelope under `/api/`: `error` and `detail`, the same text.
fn assert_api_error(status: StatusCode, body: &Value, want: StatusCode, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {body}"));
    assert!(!error.is_empty(), "{what}: {body}");
    assert_eq!(body["detail"], body["error"], "{what}: detail beside error, the same text: {body}");
}

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap_or_else(|| panic!("not a JWT: {token}"));
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url payload")).expect("JSON claims")
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn assert_access_token(token: &str, user_id: &str) {
    let claims = jwt_claims(token);
    let exp = claims["exp"].as_i64().unwrap_or_else(|| panic!("access tokens carry exp: {claims}"));
    assert!(exp > now_secs() && exp <= now_secs() + 3600, "exp {exp} is minutes away");
    assert_eq!(claims["sub"], user_id, "{claims}");
}

// --- shapes -------------------------------------------------------------------------------------

#[tokio::test]
async fn register_login_and_me_answer_the_frontends_shapes() {
    let c = Client::new(shared().await);
    let email = unique_email("shape");
    let (status, reg) = c.register(json!({"email": email, "password": PASSWORD, "name": "  Ann Lee "})).await;
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    let id = text(&reg, "id");
    uuid::Uuid::parse_str(&id).expect("user ids are UUIDs");
    // Today's clients read the top-level fields; the frontend reads the tokens and `user`.
    assert_eq!(reg["email"], email.as_str());
    assert!(reg.as_object().unwrap().contains_key("username"), "{reg}");
    assert_eq!(reg["name"], "Ann Lee", "names are trimmed");
    assert_eq!(reg["user"], json!({"id": id, "email": email, "name": "Ann Lee"}));
    assert_access_token(&text(&reg, "access"), &id);
    assert!(text(&reg, "refresh").len() >= 32);
    assert!(!reg.to_string().contains("password"), "never echo secrets: {reg}");

    let (status, _, login) = c.login(&email.to_uppercase(), PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user"], json!({"id": id, "email": email, "name": "Ann Lee"}));
    let access = text(&login, "access");
    assert_access_token(&access, &id);
    assert_ne!(text(&login, "refresh"), text(&reg, "refresh"), "each login has its own refresh token");

    let (status, me) = c.get("/api/auth/me/", Some(&access)).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me, json!({"id": id, "email": email, "name": "Ann Lee"}));

    // Without a name, `name` is a string all the same (the username when one was given).
    let plain = unique_email("plain");
    let reg = c.new_user(&plain).await;
    assert_eq!(reg["user"]["name"], "", "{reg}");
    let handle = unique_email("handle");
    let (status, reg) = c.register(json!({"email": handle, "password": PASSWORD, "username": "annl"})).await;
    assert_eq!((status, reg["username"].clone(), reg["user"]["name"].clone()), (StatusCode::CREATED, json!("annl"), json!("annl")));

    for (body, what) in [
        (json!({"email": unique_email("n"), "password": PASSWORD, "name": 7}), "a name that is not a string"),
        (json!({"email": unique_email("n"), "password": PASSWORD, "name": "x".repeat(151)}), "an overlong name"),
    ] {
        let (status, answer) = c.register(body).await;
        assert_api_error(status, &answer, StatusCode::BAD_REQUEST, what);
    }
}

#[tokio::test]
async fn refresh_rotates_on_both_paths_and_answers_both_tokens() {
    let c = Client::new(shared().await);
    let reg = c.new_user(&unique_email("rot")).await;
    let id = text(&reg, "id");
    let mut refresh = text(&reg, "refresh");
    for path in ["/api/auth/token/refresh/", "/api/auth/refresh/", "/api/auth/token/refresh/"] {
        let (status, pair) = c.refresh(path, &refresh).await;
        assert_eq!(status, StatusCode::OK, "{path}: {pair}");
        assert_access_token(&text(&pair, "access"), &id);
        let next = text(&pair, "refresh");
        assert_ne!(next, refresh, "{path} rotates");
        let (status, me) = c.get("/api/auth/me/", Some(&text(&pair, "access"))).await;
        assert_eq!((status, me["id"].clone()), (StatusCode::OK, json!(id)));
        refresh = next;
    }
}

#[tokio::test]
async fn api_errors_carry_detail_and_other_faces_keep_error_only() {
    let edge = shared().await;
    let c = Client::new(edge);
    let (status, body) = c.get("/api/auth/me/", None).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "me without a token");
    let (status, body) = c.get("/api/auth/me/", Some("not-a-jwt")).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "me with a malformed token");
    let (status, body) = c.get("/api/no-such-thing/", Some(&kiln_e2e::agent_api_secret())).await;
    assert_api_error(status, &body, StatusCode::NOT_FOUND, "an unknown /api/ path");
    let (status, body) =
        edge.api().send_raw(Method::POST, "/api/auth/login/", None, Some("application/json"), "{\"email\":").await;
    assert_api_error(status, &body, StatusCode::BAD_REQUEST, "malformed JSON on login");
    let (status, _, body) = c.post("/api/auth/register/", None, json!({"email": "nope", "password": PASSWORD})).await;
    assert_api_error(status, &body, StatusCode::BAD_REQUEST, "a bad email");
    let (status, body) = c.refresh("/api/auth/token/refresh/", "krt_nothing").await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "an unknown refresh token");

    // Seed 003's faces keep their envelope.
    for path in ["/jobs", "/clients", "/nothing"] {
        let (status, body) = c.get(path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert!(body["error"].is_string() && body.get("detail").is_none(), "{path}: {{\"error\"}} only: {body}");
    }
}

// --- logout and refresh-token families ----------------------------------------------------------

#[tokio::test]
async fn logout_revokes_the_refresh_token_and_answers_json() {
    let c = Client::new(shared().await);
    let email = unique_email("out");
    let reg = c.new_user(&email).await;
    let (_, _, other_login) = c.login(&email, PASSWORD).await;
    let refresh = text(&reg, "refresh");
    let (status, pair) = c.refresh("/api/auth/token/refresh/", &refresh).await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    let current = text(&pair, "refresh");

    let (status, _, body) = c.post("/api/auth/logout/", Some(&text(&pair, "access")), json!({"refresh": current})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"detail": "Logged out."}), "a JSON body: the frontend parses every 2xx but 204");
    let (status, body) = c.refresh("/api/auth/token/refresh/", &current).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "refresh after logout");
    let (status, _, body) = c.post("/api/auth/logout/", None, json!({"refresh": current})).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "logout twice");
    let (status, _, body) = c.post("/api/auth/logout/", None, json!({})).await;
    assert_api_error(status, &body, StatusCode::BAD_REQUEST, "logout without a refresh token");

    // Another login of the same user is another session: still alive.
    let (status, body) = c.refresh("/api/auth/refresh/", &text(&other_login, "refresh")).await;
    assert_eq!(status, StatusCode::OK, "another session survives a logout: {body}");
}

#[tokio::test]
async fn reusing_a_rotated_refresh_token_revokes_its_whole_family() {
    let c = Client::new(shared().await);
    let email = unique_email("family");
    let reg = c.new_user(&email).await;
    let (_, _, other) = c.login(&email, PASSWORD).await;
    let first = text(&reg, "refresh");
    let (_, second) = c.refresh("/api/auth/refresh/", &first).await;
    let (status, third) = c.refresh("/api/auth/refresh/", &text(&second, "refresh")).await;
    assert_eq!(status, StatusCode::OK, "{third}");
    let newest = text(&third, "refresh");

    // The first token was spent: presenting it again is reuse (a stolen copy, or a replay).
    let (status, body) = c.refresh("/api/auth/refresh/", &first).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "reuse of a spent refresh token");
    assert!(body["error"].as_str().unwrap().contains("revoked"), "{body}");
    // ...which revoked every token descended from that login, the newest included.
    let (status, body) = c.refresh("/api/auth/refresh/", &newest).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "the newest token of a revoked family");
    // The user's other login is another family.
    let (status, body) = c.refresh("/api/auth/refresh/", &text(&other, "refresh")).await;
    assert_eq!(status, StatusCode::OK, "another family is untouched: {body}");
}

#[tokio::test]
async fn expired_refresh_tokens_are_refused_and_purged() {
    let mut edge = TestEdge::start(&[("REFRESH_TOKEN_TTL_SECS", "1")]).await.expect("starting wrangler dev");
    let c = Client::new(&edge);
    let email = unique_email("expiry");
    let reg = c.new_user(&email).await;
    let id = text(&reg, "id");
    let (_, _, first) = c.login(&email, PASSWORD).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for token in [text(&reg, "refresh"), text(&first, "refresh")] {
        let (status, body) = c.refresh("/api/auth/token/refresh/", &token).await;
        assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "an expired refresh token");
    }
    // A login purges what has expired: only its own token is left.
    let (status, _, last) = c.login(&email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{last}");
    edge.stop();
    let rows = edge.d1(&format!("SELECT token_hash FROM refresh_tokens WHERE user_id = '{id}'")).expect("reading D1");
    let digest = |t: &str| sha2::Sha256::digest(t.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let kept: Vec<&str> = rows.iter().filter_map(|r| r["token_hash"].as_str()).collect();
    assert_eq!(kept, vec![digest(&text(&last, "refresh"))], "expired tokens are deleted");
}

// --- rate limits --------------------------------------------------------------------------------

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    let value = headers.get("retry-after").unwrap_or_else(|| panic!("a 429 carries Retry-After: {headers:?}"));
    value.to_str().unwrap().parse().unwrap_or_else(|_| panic!("Retry-After is seconds: {value:?}"))
}

fn assert_limited(status: StatusCode, headers: &reqwest::header::HeaderMap, body: &Value, what: &str) {
    assert_api_error(status, body, StatusCode::TOO_MANY_REQUESTS, what);
    assert!(body["error"].as_str().unwrap().contains("too many failed attempts"), "{what}: {body}");
    let secs = retry_after(headers);
    assert!((1..=WINDOW_SECS).contains(&secs), "{what}: Retry-After {secs} is within the window");
}

#[tokio::test]
async fn failed_logins_are_limited_per_email_with_retry_after() {
    let edge = shared().await;
    let c = Client::new(edge);
    let email = unique_email("victim");
    c.new_user(&email).await;
    for i in 0..PER_EMAIL {
        let (status, _, body) = c.login(&email, WRONG).await;
        assert_api_error(status, &body, StatusCode::UNAUTHORIZED, &format!("failure {}", i + 1));
    }
    let (status, headers, body) = c.login(&email, WRONG).await;
    assert_limited(status, &headers, &body, "one failure past the email's limit");
    // The right password does not get through a limited email either (guessing stops here)...
    let (status, headers, body) = c.login(&email, PASSWORD).await;
    assert_limited(status, &headers, &body, "the right password on a limited email");
    // ...not even from another address: the limit is the email's.
    let elsewhere = Client::new(edge);
    let (status, headers, body) = elsewhere.login(&email, PASSWORD).await;
    assert_limited(status, &headers, &body, "a limited email from another address");
    // Another email from the same address is unaffected (the address is under its own limit).
    let other = unique_email("bystander");
    c.new_user(&other).await;
    let (status, _, body) = c.login(&other, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "another email: {body}");

    // An unknown email is limited exactly like a known one (no oracle in the limits either).
    let ghost = unique_email("ghost");
    let g = Client::new(edge);
    for _ in 0..PER_EMAIL {
        assert_eq!(g.login(&ghost, WRONG).await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, body) = g.login(&ghost, WRONG).await;
    assert_limited(status, &headers, &body, "an unknown email past its limit");
}

#[tokio::test]
async fn failed_attempts_are_limited_per_address() {
    let edge = shared().await;
    let c = Client::new(edge);
    // Each email stays under its own limit; the address reaches its.
    for i in 0..PER_ADDRESS {
        let (status, _, body) = c.login(&unique_email("spray"), WRONG).await;
        assert_api_error(status, &body, StatusCode::UNAUTHORIZED, &format!("failure {} from one address", i + 1));
    }
    let (status, headers, body) = c.login(&unique_email("spray"), WRONG).await;
    assert_limited(status, &headers, &body, "a fresh email from an address past its limit");
    let (status, body) = c.register(json!({"email": unique_email("spray"), "password": PASSWORD})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "registration from a limited address: {body}");
    // Another address is unaffected.
    let other = Client::new(edge);
    let email = unique_email("fine");
    other.new_user(&email).await;
    let (status, _, body) = other.login(&email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "another address: {body}");
}

#[tokio::test]
async fn registering_a_taken_email_counts_as_a_failure() {
    let edge = shared().await;
    let c = Client::new(edge);
    let email = unique_email("taken");
    c.new_user(&email).await;
    for _ in 0..PER_EMAIL {
        let (status, body) = c.register(json!({"email": email, "password": PASSWORD})).await;
        assert_api_error(status, &body, StatusCode::CONFLICT, "a taken email");
    }
    let (status, headers, body) = c.post("/api/auth/register/", None, json!({"email": email, "password": PASSWORD})).await;
    assert_limited(status, &headers, &body, "probing a taken email past the limit");
    // Invalid input is refused before anything is counted or hashed.
    let fresh = Client::new(edge);
    for _ in 0..PER_ADDRESS + 2 {
        let (status, body) = fresh.register(json!({"email": unique_email("weak"), "password": "short"})).await;
        assert_api_error(status, &body, StatusCode::BAD_REQUEST, "a weak password");
    }
    fresh.new_user(&unique_email("after-weak")).await;
}

#[tokio::test]
async fn successful_logins_are_not_failures() {
    let c = Client::new(shared().await);
    let email = unique_email("good");
    c.new_user(&email).await;
    for _ in 0..PER_EMAIL - 1 {
        assert_eq!(c.login(&email, WRONG).await.0, StatusCode::UNAUTHORIZED);
    }
    // Were these counted, the email would be past its limit below.
    for _ in 0..PER_EMAIL + 1 {
        let (status, _, body) = c.login(&email, PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _, body) = c.login(&email, WRONG).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "the last failure the limit allows");
    let (status, headers, body) = c.login(&email, WRONG).await;
    assert_limited(status, &headers, &body, "one more");
}

#[tokio::test]
async fn concurrent_failures_never_pass_the_limit() {
    let edge = shared().await;
    let c = Client::new(edge);
    let email = unique_email("burst");
    c.new_user(&email).await;
    // Ten wrong passwords at once: every one is in flight before any has failed, so only a count
    // and record that happen together can hold the line.
    let attempts = (0..10).map(|_| {
        let other = Client { api: c.api.clone(), address: address() };
        let email = email.clone();
        async move { other.login(&email, WRONG).await.0 }
    });
    let statuses = futures::future::join_all(attempts).await;
    let refused = statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((refused, limited), (PER_EMAIL, 10 - PER_EMAIL), "{statuses:?}");
}

// --- no oracle ----------------------------------------------------------------------------------

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn unknown_emails_and_wrong_passwords_answer_the_same_at_the_same_cost() {
    // An edge of its own without limits: forty refusals in a row.
    let edge = TestEdge::start(&[("AUTH_FAILURES_PER_EMAIL", "0"), ("AUTH_FAILURES_PER_ADDRESS", "0")])
        .await
        .expect("starting wrangler dev");
    let c = Client::new(&edge);
    let email = unique_email("known");
    c.new_user(&email).await;
    let unknown = unique_email("unknown");
    // Warm the isolate.
    c.login(&email, WRONG).await;
    c.login(&unknown, WRONG).await;
    let (mut wrong, mut missing) = (vec![], vec![]);
    let mut answers = vec![];
    for _ in 0..20 {
        for (who, samples) in [(&email, &mut wrong), (&unknown, &mut missing)] {
            let start = Instant::now();
            let (status, _, body) = c.login(who, WRONG).await;
            samples.push(start.elapsed());
            answers.push((status, body));
        }
    }
    let (status, body) = answers[0].clone();
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "a refused login");
    assert!(answers.iter().all(|a| *a == (status, body.clone())), "every refusal answers the same: {answers:?}");
    let (wrong, missing) = (median(wrong), median(missing));
    let ratio = wrong.as_secs_f64().max(missing.as_secs_f64()) / wrong.as_secs_f64().min(missing.as_secs_f64());
    println!("median refused login: wrong password {wrong:?}, unknown email {missing:?} (ratio {ratio:.2})");
    assert!(ratio < 3.0, "an unknown email costs what a wrong password costs: {wrong:?} vs {missing:?}");
    // And both cost a hash: far more than a login refused before hashing (a malformed body).
    let start = Instant::now();
    for _ in 0..5 {
        c.post("/api/auth/login/", None, json!({"email": email})).await;
    }
    let no_hash = start.elapsed() / 5;
    assert!(missing > no_hash * 2, "the unknown email was hashed: {missing:?} vs {no_hash:?} without a hash");
}

// --- password hash upgrade ----------------------------------------------------------------------

/// PBKDF2-HMAC-SHA256 with one 32-byte block, as the edge stores it.
fn pbkdf2_sha256(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prf = |data: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(password.as_bytes()).unwrap();
        mac.update(data);
        let out: [u8; 32] = mac.finalize().into_bytes().into();
        out
    };
    let mut u = prf(&[salt, &1u32.to_be_bytes()].concat());
    let mut t = u;
    for _ in 1..iterations {
        u = prf(&u);
        t.iter_mut().zip(u).for_each(|(t, u)| *t ^= u);
    }
    t
}

#[tokio::test]
async fn a_hash_with_old_parameters_is_upgraded_at_login() {
    let mut edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let c = Client::new(&edge);
    let email = unique_email("legacy");
    c.new_user(&email).await;
    let stored = |edge: &TestEdge| {
        let rows = edge.d1(&format!("SELECT password_hash FROM users WHERE email = '{email}'")).expect("reading D1");
        rows[0]["password_hash"].as_str().expect("a hash").to_string()
    };
    edge.stop();
    let current = stored(&edge);
    assert!(current.starts_with("pbkdf2-sha256$100000$"), "the development count: {current}");
    // As if the user had registered when hashes had 20,000 iterations.
    let salt = [7u8; 16];
    let old = format!(
        "pbkdf2-sha256$20000${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(pbkdf2_sha256(PASSWORD, &salt, 20_000))
    );
    edge.d1(&format!("UPDATE users SET password_hash = '{old}' WHERE email = '{email}'")).expect("writing D1");
    assert_eq!(stored(&edge), old);
    edge.restart().await.expect("restarting wrangler dev");

    let (status, _, body) = c.login(&email, WRONG).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a wrong password against the old hash: {body}");
    let (status, _, body) = c.login(&email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "the old hash verifies: {body}");
    edge.stop();
    let upgraded = stored(&edge);
    assert!(upgraded.starts_with("pbkdf2-sha256$100000$"), "stored again at today's parameters: {upgraded}");
    assert_ne!(upgraded.split('$').nth(2), old.split('$').nth(2), "with a fresh salt");
    edge.restart().await.expect("restarting wrangler dev");
    let (status, _, body) = c.login(&email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "the upgraded hash verifies: {body}");
    let (status, _, _) = c.login(&email, WRONG).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

// --- CORS ---------------------------------------------------------------------------------------

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

async fn preflight(api: &Api, path: &str, origin: &str) -> (StatusCode, reqwest::header::HeaderMap) {
    let headers = [
        ("Origin", origin),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization, content-type"),
    ];
    let (status, headers, _) = api.send_with(Method::OPTIONS, path, &headers, None).await;
    (status, headers)
}

#[tokio::test]
async fn cors_answers_allowed_origins_on_every_face_and_nothing_to_others() {
    let edge = shared().await;
    let api = edge.api();
    for (path, origin) in [
        ("/api/auth/login/", "http://localhost:5173"),
        ("/api/jobs/", "https://app.example.com"),
        ("/jobs", "https://a.b.example.com"),
        ("/runner/v1/register", "http://localhost:5173"),
    ] {
        let (status, h) = preflight(&api, path, origin).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "preflight {path} from {origin}");
        assert_eq!(header(&h, "access-control-allow-origin").as_deref(), Some(origin), "{path}: {h:?}");
        let methods = header(&h, "access-control-allow-methods").unwrap_or_default();
        assert!(["GET", "POST", "PATCH", "DELETE"].iter().all(|m| methods.contains(m)), "{methods}");
        let allowed = header(&h, "access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
        assert!(header(&h, "access-control-max-age").is_some_and(|s| s.parse::<u32>().unwrap() > 0));
        assert_eq!(header(&h, "vary").as_deref(), Some("Origin"));
    }
    for origin in ["https://evil-example.com", "https://example.com", "http://app.example.com", "http://localhost:5174", "null"] {
        let (status, h) = preflight(&api, "/api/auth/login/", origin).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(header(&h, "access-control-allow-origin").is_none(), "{origin} is refused: {h:?}");
        assert!(header(&h, "access-control-allow-methods").is_none(), "{origin}: {h:?}");
    }

    // Actual answers, successes and errors alike.
    let c = Client::new(edge);
    let email = unique_email("cors");
    c.new_user(&email).await;
    let login = |origin: &'static str, password: &'static str| {
        let api = api.clone();
        let email = email.clone();
        let address = c.address.clone();
        async move {
            let body = json!({"email": email, "password": password});
            api.send_with(Method::POST, "/api/auth/login/", &[("Origin", origin), ("CF-Connecting-IP", address.as_str())], Some(body)).await
        }
    };
    let (status, h, _) = login("http://localhost:5173", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "access-control-allow-origin").as_deref(), Some("http://localhost:5173"));
    assert_eq!(header(&h, "vary").as_deref(), Some("Origin"));
    assert_ne!(header(&h, "access-control-allow-origin").as_deref(), Some("*"));
    let (status, h, _) = login("https://shop.example.com", WRONG).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(header(&h, "access-control-allow-origin").as_deref(), Some("https://shop.example.com"), "errors too");
    let (status, h, _) = api.send_with(Method::GET, "/jobs", &[("Origin", "https://x.example.com")], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(header(&h, "access-control-allow-origin").as_deref(), Some("https://x.example.com"), "seed 003's face too");
    let (status, h, _) = login("https://evil-example.com", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "CORS is the browser's business: the request itself is served");
    assert!(header(&h, "access-control-allow-origin").is_none(), "{h:?}");
    assert_eq!(header(&h, "vary").as_deref(), Some("Origin"));
}

#[tokio::test]
async fn the_development_settings_allow_vites_dev_server() {
    // wrangler.toml's [vars] as scripts/dev runs them.
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    for origin in ["http://localhost:5173", "http://127.0.0.1:5173"] {
        let (status, h) = preflight(&api, "/api/auth/register/", origin).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(header(&h, "access-control-allow-origin").as_deref(), Some(origin), "{h:?}");
    }
    let (_, h) = preflight(&api, "/api/auth/register/", "https://app.example.com").await;
    assert!(header(&h, "access-control-allow-origin").is_none(), "{h:?}");
}

#[tokio::test]
async fn production_sends_no_cors_headers_until_its_origins_are_set() {
    let edge = TestEdge::start_env("production", &[]).await.expect("starting wrangler dev --env production");
    let api = edge.api();
    for origin in ["http://localhost:5173", "https://app.example.com"] {
        let (status, h) = preflight(&api, "/api/auth/login/", origin).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(header(&h, "access-control-allow-origin").is_none(), "{origin}: {h:?}");
        assert!(header(&h, "vary").is_none(), "CORS is off altogether: {h:?}");
    }
    let (status, h, body) = api.send_with(Method::GET, "/api/auth/me/", &[("Origin", "http://localhost:5173")], None).await;
    assert_api_error(status, &body, StatusCode::UNAUTHORIZED, "me without a token in production");
    assert!(header(&h, "access-control-allow-origin").is_none(), "{h:?}");
}
