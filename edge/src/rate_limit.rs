//! Failed logins and registrations, limited per email and per client address over a sliding
//! window (`AUTH_FAILURES_PER_EMAIL`, `AUTH_FAILURES_PER_ADDRESS`, `AUTH_FAILURE_WINDOW_SECS`).
//!
//! The design (why it is correct under concurrency): every attempt first *reserves* a row in D1's
//! `auth_failures` for each key with one conditional statement,
//! `INSERT … SELECT … WHERE (SELECT COUNT(*) … within the window) < limit`, both keys in one batch
//! (a D1 batch is a transaction). D1 runs writes one at a time on its primary, so the count and the
//! insert are atomic: however many attempts race — all from isolates on different machines — at
//! most `limit` rows per key are ever inside a window, and the attempts past it are refused before
//! any password is hashed. A successful attempt deletes its reservations (a refund); a failed one
//! keeps them, and they are the failure log. A check-then-record design would let every racing
//! attempt pass the check before any of them recorded its failure, and a per-isolate counter would
//! not be shared at all. The window slides: the answer to a refused attempt is `Retry-After` = when
//! the oldest failure in the window leaves it. Rows older than the window are purged
//! opportunistically (on successful logins); keys are stored hashed, so the table holds no emails.
//!
//! Pure parts (addresses, keys, retry times) are here and tested natively; the D1 statements are
//! wasm32 only.

use sha2::{Digest, Sha256};

/// The limits, from the Worker's settings. A limit of 0 turns that key's limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_email: u32,
    pub per_address: u32,
    pub window_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_email: 10, per_address: 50, window_ms: 15 * 60 * 1000 }
    }
}

/// The key a client address is limited under when the request names none.
pub const UNKNOWN_ADDRESS: &str = "unknown";

/// The client's address: `CF-Connecting-IP` (set by Cloudflare's edge, and by `wrangler dev`),
/// else the first hop of `X-Forwarded-For`, else a fixed key shared by every such request.
pub fn client_address(cf_connecting_ip: Option<&str>, x_forwarded_for: Option<&str>) -> String {
    let usable = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
            .then(|| s.to_ascii_lowercase())
    };
    cf_connecting_ip
        .and_then(usable)
        .or_else(|| x_forwarded_for.and_then(|x| x.split(',').next()).and_then(usable))
        .unwrap_or_else(|| UNKNOWN_ADDRESS.to_string())
}

/// The keys an attempt for `email` (normalised) from `address` counts under, each with its limit;
/// keys whose limit is 0 are left out. Emails are hashed: the table holds no addresses of people.
pub fn keys(limits: &Limits, email: &str, address: &str) -> Vec<(String, u32)> {
    let email_key = format!("email:{}", hex(&Sha256::digest(email.as_bytes())));
    [(email_key, limits.per_email), (format!("addr:{address}"), limits.per_address)]
        .into_iter()
        .filter(|(_, limit)| *limit > 0)
        .collect()
}

/// Seconds until a refused key admits an attempt again: when its oldest failure in the window
/// (`oldest_ms`) leaves it. At least 1.
pub fn retry_after_secs(oldest_ms: Option<i64>, window_ms: i64, now_ms: i64) -> u64 {
    let wait_ms = oldest_ms.map(|o| o + window_ms - now_ms).unwrap_or(1000).max(1);
    (wait_ms as u64).div_ceil(1000).max(1)
}

/// The message of a refused attempt.
pub fn refusal(retry_after: u64) -> String {
    format!("too many failed attempts; try again in {retry_after} seconds")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Per-principal REST requests in a fixed one-minute window (`RATE_LIMIT_PER_MINUTE`, default
/// 600; 0: off). Counted by one `RateLimiter` Durable Object per principal, in memory, which
/// grants isolates blocks of requests ([`block`]): never more than the limit across isolates;
/// an object that restarts mid-window starts the window's count again.
pub const DEFAULT_PER_MINUTE: u32 = 600;
pub const WINDOW_MS: i64 = 60_000;

/// A fixed window's counter: `(window start, count)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub count: u32,
}

impl Window {
    /// Counts a request at `now`: `Ok(remaining)` or `Err(retry_after_secs)` past `limit`
    /// (a refused request is not counted).
    pub fn hit(&mut self, limit: u32, now_ms: i64) -> Result<u32, u64> {
        self.take(limit, 1, now_ms).map(|_| limit - self.count)
    }

    /// Grants up to `want` requests of the window at `now` (at least one, or
    /// `Err(retry_after_secs)` when none is left).
    pub fn take(&mut self, limit: u32, want: u32, now_ms: i64) -> Result<u32, u64> {
        let start = window_start(now_ms);
        if start != self.start_ms {
            *self = Window { start_ms: start, count: 0 };
        }
        if self.count >= limit {
            let wait = (start + WINDOW_MS - now_ms).max(1) as u64;
            return Err(wait.div_ceil(1000).max(1));
        }
        let granted = want.max(1).min(limit - self.count);
        self.count += granted;
        Ok(granted)
    }
}

pub fn window_start(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(WINDOW_MS)
}

/// Requests an isolate takes from a principal's counter at once (a twentieth of the limit): it
/// spends them without asking again until the window ends. Never more than the limit is
/// admitted; with several isolates, a principal may be refused while another isolate still
/// holds some of the window's grants.
pub fn block(limit: u32) -> u32 {
    (limit / 20).max(1)
}

/// What an isolate holds of each principal's window: `(window start, requests left)`.
#[derive(Debug, Default)]
pub struct Grants(pub std::collections::HashMap<String, (i64, u32)>);

impl Grants {
    /// Spends one held request of `owner` in the window at `now`, if one is held.
    pub fn spend(&mut self, owner: &str, now_ms: i64) -> bool {
        match self.0.get_mut(owner) {
            Some((start, left)) if *start == window_start(now_ms) && *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    /// Keeps a fresh grant (one of it spent by the request that asked).
    pub fn keep(&mut self, owner: &str, now_ms: i64, granted: u32) {
        if self.0.len() >= 10_000 {
            let start = window_start(now_ms);
            self.0.retain(|_, (s, _)| *s == start);
        }
        self.0.insert(owner.to_string(), (window_start(now_ms), granted.saturating_sub(1)));
    }
}

#[cfg(target_arch = "wasm32")]
pub use d1::{purge, refund, reserve, Reservation};
#[cfg(target_arch = "wasm32")]
pub use object::{check, RateLimiter};

#[cfg(target_arch = "wasm32")]
mod object {
    use std::cell::{Cell, RefCell};

    use serde::Deserialize;
    use serde_json::json;
    use worker::{durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, State};

    use super::{block, Grants, Window};

    thread_local! {
        static GRANTS: RefCell<Grants> = RefCell::new(Grants::default());
    }
    use crate::env::now_ms;
    use crate::http::{self, ApiError, ApiResult};

    /// One per principal (named by its owner id): the current window's count, in memory.
    #[durable_object]
    pub struct RateLimiter {
        window: Cell<Window>,
    }

    impl DurableObject for RateLimiter {
        fn new(_state: State, _env: Env) -> Self {
            Self { window: Cell::new(Window::default()) }
        }

        async fn fetch(&self, req: Request) -> worker::Result<Response> {
            let url = req.url()?;
            let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).and_then(|(_, v)| v.parse::<u32>().ok());
            let (limit, want) = (param("limit").unwrap_or(0), param("want").unwrap_or(1));
            let mut w = self.window.get();
            let answer = w.take(limit, want, now_ms());
            self.window.set(w);
            match answer {
                Ok(granted) => Response::from_json(&json!({"ok": true, "granted": granted})),
                Err(retry) => Response::from_json(&json!({"ok": false, "retry_after": retry})),
            }
        }
    }

    #[derive(Deserialize)]
    struct Answer {
        ok: bool,
        #[serde(default)]
        granted: u32,
        #[serde(default)]
        retry_after: u64,
    }

    /// Counts one REST request of `owner`; 429 with `Retry-After` past the limit (0: off). The
    /// isolate spends a grant it holds without I/O; else it takes [`block`] from the principal's
    /// object.
    pub async fn check(env: &worker::Env, owner: &str, limit: u32) -> ApiResult<()> {
        if limit == 0 || GRANTS.with(|g| g.borrow_mut().spend(owner, now_ms())) {
            return Ok(());
        }
        let stub = env.durable_object("RATE_LIMITER")?.id_from_name(owner)?.get_stub()?;
        let path = format!("/take?limit={limit}&want={}", block(limit));
        let a: Answer = http::call(&stub, Method::Post, &path, None::<&()>).await?;
        if a.ok {
            GRANTS.with(|g| g.borrow_mut().keep(owner, now_ms(), a.granted));
            return Ok(());
        }
        Err(ApiError::TooManyRequests {
            message: format!("rate limit of {limit} requests a minute reached; try again in {} seconds", a.retry_after),
            retry_after_secs: a.retry_after,
        })
    }
}

#[cfg(target_arch = "wasm32")]
mod d1 {
    use serde::Deserialize;
    use worker::D1Database;

    use super::{keys, refusal, retry_after_secs, Limits};
    use crate::env::new_id;
    use crate::http::{ApiError, ApiResult};
    use crate::store::{n, s};

    /// The rows an attempt holds: deleted by [`refund`] when it succeeds.
    #[derive(Debug, Default)]
    pub struct Reservation {
        ids: Vec<String>,
    }

    #[derive(Deserialize)]
    struct Id {
        id: String,
    }

    /// Reserves a failure for the attempt under each key, or refuses it (429 with the seconds to
    /// wait) when any key is at its limit — then nothing is held.
    pub async fn reserve(db: &D1Database, limits: &Limits, email: &str, address: &str, now: i64) -> ApiResult<Reservation> {
        let keys = keys(limits, email, address);
        if keys.is_empty() {
            return Ok(Reservation::default());
        }
        let since = now - limits.window_ms;
        let mut statements = Vec::with_capacity(keys.len());
        for (key, limit) in &keys {
            statements.push(
                db.prepare(
                    "INSERT INTO auth_failures (id, key, at_ms)
                     SELECT ?1, ?2, ?3
                     WHERE (SELECT COUNT(*) FROM auth_failures WHERE key = ?2 AND at_ms > ?4) < ?5
                     RETURNING id",
                )
                .bind(&[s(&new_id()), s(key), n(now), n(since), n(i64::from(*limit))])?,
            );
        }
        let results = db.batch(statements).await?;
        let mut held = Reservation::default();
        let mut refused = vec![];
        for ((key, _), result) in keys.iter().zip(&results) {
            match result.results::<Id>()?.into_iter().next() {
                Some(row) => held.ids.push(row.id),
                None => refused.push(key.clone()),
            }
        }
        if refused.is_empty() {
            return Ok(held);
        }
        refund(db, held).await?;
        let mut wait = 1;
        for key in refused {
            #[derive(Deserialize)]
            struct Oldest {
                oldest: Option<f64>,
            }
            let oldest = db
                .prepare("SELECT MIN(at_ms) AS oldest FROM auth_failures WHERE key = ?1 AND at_ms > ?2")
                .bind(&[s(&key), n(since)])?
                .first::<Oldest>(None)
                .await?
                .and_then(|o| o.oldest)
                .map(|o| o as i64);
            wait = wait.max(retry_after_secs(oldest, limits.window_ms, now));
        }
        Err(ApiError::TooManyRequests { message: refusal(wait), retry_after_secs: wait })
    }

    /// Gives back what an attempt reserved (it succeeded, so it was no failure).
    pub async fn refund(db: &D1Database, reservation: Reservation) -> ApiResult<()> {
        if reservation.ids.is_empty() {
            return Ok(());
        }
        let statements = reservation
            .ids
            .iter()
            .map(|id| db.prepare("DELETE FROM auth_failures WHERE id = ?1").bind(&[s(id)]))
            .collect::<worker::Result<Vec<_>>>()?;
        db.batch(statements).await?;
        Ok(())
    }

    /// The statement that forgets failures older than the window (run beside other writes).
    pub fn purge(db: &D1Database, limits: &Limits, now: i64) -> worker::Result<worker::D1PreparedStatement> {
        db.prepare("DELETE FROM auth_failures WHERE at_ms <= ?1").bind(&[n(now - limits.window_ms)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_address_prefers_cloudflares_header() {
        assert_eq!(client_address(Some("203.0.113.7"), Some("198.51.100.1")), "203.0.113.7");
        assert_eq!(client_address(None, Some("198.51.100.1, 10.0.0.1")), "198.51.100.1", "XFF's first hop");
        assert_eq!(client_address(Some(""), Some(" 198.51.100.1 ")), "198.51.100.1");
        assert_eq!(client_address(Some("2001:DB8::1"), None), "2001:db8::1");
        assert_eq!(client_address(None, None), UNKNOWN_ADDRESS);
        assert_eq!(client_address(Some("not an address"), Some("<script>")), UNKNOWN_ADDRESS, "junk is not a key");
    }

    #[test]
    fn keys_hash_the_email_and_skip_disabled_limits() {
        let limits = Limits::default();
        let k = keys(&limits, "ann@example.com", "203.0.113.7");
        assert_eq!(k.len(), 2);
        assert!(k[0].0.starts_with("email:") && !k[0].0.contains("ann"), "{k:?}");
        assert_eq!(k[0].1, 10);
        assert_eq!(k[1], ("addr:203.0.113.7".to_string(), 50));
        assert_eq!(keys(&limits, "ann@example.com", "x")[0], k[0], "the same email is the same key");
        assert_ne!(keys(&limits, "bob@example.com", "x")[0], k[0]);
        let no_email = Limits { per_email: 0, ..limits };
        assert_eq!(keys(&no_email, "ann@example.com", "a").len(), 1);
        assert!(keys(&Limits { per_email: 0, per_address: 0, window_ms: 1 }, "a@b.io", "a").is_empty());
    }

    #[test]
    fn a_fixed_window_refuses_past_its_limit_until_it_ends() {
        let mut w = Window::default();
        let t = 10 * WINDOW_MS + 15_000;
        assert_eq!(w.hit(2, t), Ok(1));
        assert_eq!(w.hit(2, t + 1), Ok(0));
        assert_eq!(w.hit(2, t + 2), Err(45), "45 s to the window's end");
        assert_eq!(w.hit(2, t + 44_500), Err(1), "rounded up, never 0");
        assert_eq!(w.hit(2, t + 45_000), Ok(1), "a new window");
        // Grants in blocks, never past the limit.
        let mut w = Window::default();
        assert_eq!(w.take(10, 4, t), Ok(4));
        assert_eq!(w.take(10, 4, t), Ok(4));
        assert_eq!(w.take(10, 4, t), Ok(2));
        assert_eq!(w.take(10, 4, t), Err(45));
        assert_eq!(block(600), 30);
        assert_eq!(block(5), 1);
    }

    #[test]
    fn an_isolate_spends_its_grants_within_their_window() {
        let mut g = Grants::default();
        let t = 10 * WINDOW_MS;
        assert!(!g.spend("ann", t), "nothing held");
        g.keep("ann", t, 3);
        assert!(g.spend("ann", t + 1));
        assert!(g.spend("ann", t + 2));
        assert!(!g.spend("ann", t + 3), "the third was spent by the request that asked");
        assert!(!g.spend("bob", t));
        g.keep("ann", t, 5);
        assert!(!g.spend("ann", t + WINDOW_MS), "a grant ends with its window");
    }

    #[test]
    fn retry_after_is_when_the_oldest_failure_leaves_the_window() {
        let window = 900_000;
        assert_eq!(retry_after_secs(Some(1_000_000), window, 1_000_000), 900);
        assert_eq!(retry_after_secs(Some(1_000_000), window, 1_000_000 + 899_001), 1);
        assert_eq!(retry_after_secs(Some(1_000_000), window, 1_000_000 + 600_500), 300, "rounded up");
        assert_eq!(retry_after_secs(Some(0), window, 10_000_000), 1, "never 0");
        assert_eq!(retry_after_secs(None, window, 5), 1);
        assert!(refusal(30).contains("30 seconds"));
    }
}
