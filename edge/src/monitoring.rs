//! Seed 002's monitoring (issue 10 item 5): request metrics from real traffic, `GET
//! /api/v1/monitoring/metrics`, `/health`'s `services` and the metrics channel's numbers.
//!
//! Every request's class (method and route, ids elided), status and latency are added to an
//! isolate-local [`Recorder`] (no I/O on the request's path); at most once a second per isolate
//! the aggregate is sent to the `Metrics` Durable Object in `waitUntil` (`metrics_object.rs`),
//! which keeps minute buckets for a day and hour buckets for 30 days ([`Store`]): each bucket
//! counts requests, 4xx and 5xx per class, with a latency histogram (fixed bounds; percentiles
//! are the bound of the histogram bucket that holds the rank). Latency is the Worker's clock, which
//! advances on I/O only: CPU time inside a request is not counted.
//!
//! Pure parts natively tested; the handlers are wasm32 only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Upper bounds (ms) of the latency histogram's buckets; one more bucket holds the rest.
pub const BOUNDS_MS: [f64; 24] = [
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 750.0, 1000.0,
    1500.0, 2000.0, 3000.0, 5000.0, 10000.0, 30000.0,
];
/// Distinct request classes kept per bucket; the rest count as `other`.
pub const MAX_CLASSES: usize = 64;
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
/// Minute buckets cover a day, hour buckets 30 days.
pub const MINUTE_KEEP_MS: i64 = 24 * HOUR_MS;
pub const HOUR_KEEP_MS: i64 = 30 * 24 * HOUR_MS;
/// An isolate sends what it recorded at most this often.
pub const FLUSH_MS: i64 = 1000;

/// `time_range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    H1,
    H24,
    D7,
    D30,
}

impl Range {
    pub fn parse(s: &str) -> Option<Range> {
        Some(match s {
            "1h" => Range::H1,
            "24h" => Range::H24,
            "7d" => Range::D7,
            "30d" => Range::D30,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Range::H1 => "1h",
            Range::H24 => "24h",
            Range::D7 => "7d",
            Range::D30 => "30d",
        }
    }

    pub fn ms(self) -> i64 {
        match self {
            Range::H1 => HOUR_MS,
            Range::H24 => 24 * HOUR_MS,
            Range::D7 => 7 * 24 * HOUR_MS,
            Range::D30 => 30 * 24 * HOUR_MS,
        }
    }
}

pub const SECTIONS: [&str; 4] = ["health", "performance", "ml", "business"];

/// The query of `GET /api/v1/monitoring/metrics`: `metrics` (comma-separated sections, default
/// all) and `time_range` (default 1h). Unknown names are errors.
pub fn parse_query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(Vec<&'static str>, Range), String> {
    let mut sections = vec![];
    let mut range = Range::H1;
    for (k, v) in pairs {
        match k {
            "metrics" => {
                for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let Some(known) = SECTIONS.iter().copied().find(|s| *s == name) else {
                        return Err(format!("unknown metrics {name:?}; metrics are {}", SECTIONS.join(", ")));
                    };
                    if !sections.contains(&known) {
                        sections.push(known);
                    }
                }
            }
            "time_range" => {
                range = Range::parse(v.trim()).ok_or_else(|| format!("unknown time_range {v:?}; ranges are 1h, 24h, 7d, 30d"))?;
            }
            other => return Err(format!("unknown parameter {other:?}; parameters are metrics and time_range")),
        }
    }
    if sections.is_empty() {
        sections = SECTIONS.to_vec();
    }
    Ok((sections, range))
}

/// A request's class: its method and path with id-like segments as `:id` (at most 5 segments).
pub fn path_class(method: &str, path: &str) -> String {
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let mut out = String::from(method);
    out.push(' ');
    for (i, seg) in segments.iter().enumerate() {
        if i == 5 {
            out.push_str("/…");
            break;
        }
        out.push('/');
        let id_like = seg.len() > 24
            || (seg.len() >= 6 && seg.chars().any(|c| c.is_ascii_digit()))
            || seg.contains(['.', '@', '%', ':']);
        out.push_str(if id_like { ":id" } else { seg });
    }
    if segments.is_empty() {
        out.push('/');
    }
    out
}

/// Counts of one class in one bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub n: u64,
    /// Answers 400–499 and 500–599.
    pub e4: u64,
    pub e5: u64,
    pub sum_ms: f64,
    /// Requests per latency bucket ([`BOUNDS_MS`], then over the last bound); trailing zeros cut.
    pub h: Vec<u64>,
}

impl Counts {
    pub fn add(&mut self, status: u16, ms: f64) {
        self.n += 1;
        match status {
            400..=499 => self.e4 += 1,
            500..=599 => self.e5 += 1,
            _ => {}
        }
        self.sum_ms += ms;
        let i = BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(BOUNDS_MS.len());
        if self.h.len() <= i {
            self.h.resize(i + 1, 0);
        }
        self.h[i] += 1;
    }

    pub fn merge(&mut self, other: &Counts) {
        self.n += other.n;
        self.e4 += other.e4;
        self.e5 += other.e5;
        self.sum_ms += other.sum_ms;
        if self.h.len() < other.h.len() {
            self.h.resize(other.h.len(), 0);
        }
        for (a, b) in self.h.iter_mut().zip(&other.h) {
            *a += b;
        }
    }

    /// The latency at quantile `q` (0–1): the upper bound of the histogram bucket holding it
    /// (the last bound for the overflow bucket). `None` without requests.
    pub fn percentile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.h.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(BOUNDS_MS.get(i).copied().unwrap_or(BOUNDS_MS[BOUNDS_MS.len() - 1]));
            }
        }
        Some(BOUNDS_MS[BOUNDS_MS.len() - 1])
    }

    pub fn avg_ms(&self) -> Option<f64> {
        (self.n > 0).then(|| round2(self.sum_ms / self.n as f64))
    }

    /// The summary of these counts over `secs` seconds.
    pub fn summary(&self, secs: f64) -> Value {
        json!({
            "requests": self.n,
            "requests_per_second": round2(self.n as f64 / secs.max(1.0)),
            "avg_latency_ms": self.avg_ms(),
            "latency_ms": {"p50": self.percentile(0.5), "p95": self.percentile(0.95), "p99": self.percentile(0.99)},
            "client_errors": self.e4,
            "server_errors": self.e5,
            "error_rate": rate(self.e5, self.n),
            "client_error_rate": rate(self.e4, self.n),
        })
    }
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64 * 10_000.0).round() / 10_000.0
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One bucket: counts per class.
pub type Bucket = BTreeMap<String, Counts>;

fn add_to(bucket: &mut Bucket, class: &str, counts: &Counts) {
    let key = if bucket.contains_key(class) || bucket.len() < MAX_CLASSES { class } else { "other" };
    bucket.entry(key.to_string()).or_default().merge(counts);
}

/// What an isolate recorded since its last flush: minute buckets (start ms) of counts per class.
#[derive(Debug, Default)]
pub struct Recorder {
    pub pending: BTreeMap<i64, Bucket>,
    pub flushed_ms: i64,
}

/// A flush: minute start → class → counts.
pub type Batch = BTreeMap<i64, Bucket>;

impl Recorder {
    pub fn record(&mut self, class: &str, status: u16, ms: f64, now_ms: i64) {
        let mut one = Counts::default();
        one.add(status, ms);
        add_to(self.pending.entry(now_ms - now_ms.rem_euclid(MINUTE_MS)).or_default(), class, &one);
    }

    /// What to send now: everything pending if the last flush is [`FLUSH_MS`] old (or `force`).
    pub fn take(&mut self, now_ms: i64, force: bool) -> Option<Batch> {
        if self.pending.is_empty() || (!force && now_ms - self.flushed_ms < FLUSH_MS) {
            return None;
        }
        self.flushed_ms = now_ms;
        Some(std::mem::take(&mut self.pending))
    }

    /// Puts back a batch whose flush failed (merged with what came since).
    pub fn restore(&mut self, batch: Batch) {
        for (start, bucket) in batch {
            let mine = self.pending.entry(start).or_default();
            for (class, counts) in bucket {
                add_to(mine, &class, &counts);
            }
        }
    }
}

/// The Metrics object's buckets: minutes for a day, hours for 30 days.
#[derive(Debug, Default)]
pub struct Store {
    pub minutes: BTreeMap<i64, Bucket>,
    pub hours: BTreeMap<i64, Bucket>,
}

impl Store {
    /// Adds a batch; answers the (resolution, start) of every bucket it touched.
    pub fn add(&mut self, batch: &Batch, now_ms: i64) -> Vec<(&'static str, i64)> {
        let mut touched = vec![];
        for (minute, bucket) in batch {
            let hour = minute - minute.rem_euclid(HOUR_MS);
            for (class, counts) in bucket {
                add_to(self.minutes.entry(*minute).or_default(), class, counts);
                add_to(self.hours.entry(hour).or_default(), class, counts);
            }
            touched.push(("m", *minute));
            touched.push(("h", hour));
        }
        touched.sort();
        touched.dedup();
        self.prune(now_ms);
        touched
    }

    /// Forgets buckets past their keep; answers the cut-offs (minutes, hours) for storage.
    pub fn prune(&mut self, now_ms: i64) -> (i64, i64) {
        let (m, h) = (now_ms - MINUTE_KEEP_MS, now_ms - HOUR_KEEP_MS - HOUR_MS);
        self.minutes.retain(|start, _| *start > m - MINUTE_MS);
        self.hours.retain(|start, _| *start > h);
        (m - MINUTE_MS, h)
    }

    fn buckets(&self, range: Range) -> &BTreeMap<i64, Bucket> {
        if range == Range::H1 || range == Range::H24 {
            &self.minutes
        } else {
            &self.hours
        }
    }

    /// Totals over the range ending now, per class too.
    pub fn totals(&self, range: Range, now_ms: i64) -> (Counts, Bucket) {
        let since = now_ms - range.ms();
        let mut total = Counts::default();
        let mut by_class = Bucket::new();
        let buckets = self.buckets(range);
        let width = if std::ptr::eq(buckets, &self.minutes) { MINUTE_MS } else { HOUR_MS };
        for (_, bucket) in buckets.range(since - width + 1..) {
            for (class, counts) in bucket {
                total.merge(counts);
                by_class.entry(class.clone()).or_default().merge(counts);
            }
        }
        (total, by_class)
    }

    /// The `performance` section's request part over `range`.
    pub fn summary(&self, range: Range, now_ms: i64) -> Value {
        let (total, by_class) = self.totals(range, now_ms);
        let secs = range.ms() as f64 / 1000.0;
        let mut out = total.summary(secs);
        let mut classes: Vec<(&String, &Counts)> = by_class.iter().collect();
        classes.sort_by(|a, b| b.1.n.cmp(&a.1.n).then(a.0.cmp(b.0)));
        let top: Map<String, Value> = classes
            .iter()
            .take(20)
            .map(|(c, n)| {
                let v = json!({
                    "requests": n.n,
                    "p50_ms": n.percentile(0.5),
                    "p95_ms": n.percentile(0.95),
                    "p99_ms": n.percentile(0.99),
                    "error_rate": rate(n.e5, n.n),
                    "client_error_rate": rate(n.e4, n.n),
                });
                ((*c).clone(), v)
            })
            .collect();
        out["by_endpoint"] = Value::Object(top);
        // A series: minutes over an hour, hours beyond.
        let (series_src, width) = if range == Range::H1 { (&self.minutes, MINUTE_MS) } else { (&self.hours, HOUR_MS) };
        let since = now_ms - range.ms();
        let series: Vec<Value> = series_src
            .range(since - width + 1..)
            .map(|(start, bucket)| {
                let mut c = Counts::default();
                for counts in bucket.values() {
                    c.merge(counts);
                }
                json!({"start": crate::time::rfc3339(*start), "requests": c.n, "p95_ms": c.percentile(0.95), "errors": c.e5})
            })
            .collect();
        out["series"] = Value::Array(series);
        out["window"] = json!({"time_range": range.as_str(), "resolution": if width == MINUTE_MS { "1m" } else { "1h" }});
        out
    }

    /// Requests per second and mean latency over the last minute (the metrics channel).
    pub fn last_minute(&self, now_ms: i64) -> (f64, Option<f64>) {
        let mut c = Counts::default();
        for (_, bucket) in self.minutes.range(now_ms - 2 * MINUTE_MS + 1..) {
            for counts in bucket.values() {
                c.merge(counts);
            }
        }
        // The current minute is partial: count the previous whole one and this one over their span.
        let start = self.minutes.range(now_ms - 2 * MINUTE_MS + 1..).next().map(|(s, _)| *s).unwrap_or(now_ms);
        let secs = ((now_ms - start) as f64 / 1000.0).clamp(1.0, 120.0);
        (round2(c.n as f64 / secs), c.avg_ms())
    }
}

/// A service's status in `/health`'s `services`.
pub fn status_of(ok: bool, degraded: bool) -> &'static str {
    if !ok {
        "down"
    } else if degraded {
        "degraded"
    } else {
        "ok"
    }
}

/// The mean of the runners' reported loads: (cpu, memory), `None` without reports.
pub fn mean_load(loads: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    if loads.is_empty() {
        return (None, None);
    }
    let n = loads.len() as f64;
    let cpu = loads.iter().map(|l| l.0).sum::<f64>() / n;
    let mem = loads.iter().map(|l| l.1).sum::<f64>() / n;
    (Some(round2(cpu)), Some(round2(mem)))
}

#[cfg(target_arch = "wasm32")]
pub use wasm::*;

#[cfg(target_arch = "wasm32")]
mod wasm {
    use std::cell::RefCell;

    use serde::Deserialize;
    use serde_json::{json, Map, Value};
    use worker::{Env, Method, Request};

    #[derive(Deserialize)]
    struct Count {
        n: f64,
    }

    use super::{mean_load, parse_query, path_class, status_of, Batch, Range, Recorder};
    use crate::api::Ctx;
    use crate::auth::Principal;
    use crate::env::{self, now_ms};
    use crate::http::{self, json, ApiError, ApiResult};
    use crate::queue_object::Stats;
    use crate::time::rfc3339;

    thread_local! {
        static RECORDER: RefCell<Recorder> = RefCell::new(Recorder::default());
    }

    const DEFAULT_QUEUE: &str = "default";
    const OBJECT: &str = "global";

    fn object(env: &Env) -> worker::Result<worker::Stub> {
        env.durable_object("METRICS")?.id_from_name(OBJECT)?.get_stub()
    }

    /// Records one answered request (no I/O) and answers the batch to send now, if one is due.
    pub fn record(method: &Method, path: &str, status: u16, started_ms: i64) -> Option<Batch> {
        let now = now_ms();
        let class = path_class(method.as_ref(), path);
        RECORDER.with(|r| {
            let mut r = r.borrow_mut();
            r.record(&class, status, (now - started_ms).max(0) as f64, now);
            r.take(now, false)
        })
    }

    /// Sends a batch to the Metrics object (in `waitUntil`); a failed send is kept for the next.
    pub async fn flush(env: Env, batch: Batch) {
        if let Err(e) = send(&env, &batch).await {
            worker::console_warn!("monitoring flush: {e:?}");
            RECORDER.with(|r| r.borrow_mut().restore(batch));
        }
    }

    async fn send(env: &Env, batch: &Batch) -> ApiResult<()> {
        let _: Value = http::call(&object(env)?, Method::Post, "/record", Some(batch)).await?;
        Ok(())
    }

    /// Sends what this isolate holds now (before a read, so it sees its own requests).
    async fn flush_now(env: &Env) {
        if let Some(batch) = RECORDER.with(|r| r.borrow_mut().take(now_ms(), true)) {
            flush(env.clone(), batch).await;
        }
    }

    async fn queue_stats(env: &Env) -> ApiResult<Stats> {
        http::call(&env::queue(env, DEFAULT_QUEUE)?, Method::Get, "/stats", None::<&()>).await
    }

    /// A D1 round trip: its time in ms, or the error.
    async fn database(env: &Env) -> Result<f64, String> {
        let start = now_ms();
        let db = env::db(env).map_err(|e| e.to_string())?;
        db.prepare("SELECT 1 AS one").first::<Value>(None).await.map_err(|e| e.to_string())?;
        Ok((now_ms() - start) as f64)
    }

    /// `/health`'s `services`: edge, database (a D1 round trip), queue (its object answers) and
    /// runners (connected: ok; none: down).
    pub async fn services(env: &Env, stats: Option<&Stats>) -> Value {
        let db = database(env).await;
        let runners = stats.map_or(0, |s| s.runners_connected);
        json!({
            "edge": {"status": "ok"},
            "database": match &db {
                Ok(ms) => json!({"status": status_of(true, *ms > 1000.0), "latency_ms": ms}),
                Err(_) => json!({"status": "down"}),
            },
            "queue": match stats {
                Some(s) => json!({"status": status_of(true, s.queued > 0 && s.free_slots == 0 && s.runners_connected == 0), "running": s.running, "queued": s.queued}),
                None => json!({"status": "down"}),
            },
            "runners": {"status": status_of(runners > 0, false), "connected": runners},
        })
    }

    fn runner_loads(stats: &Stats) -> Vec<(f64, f64)> {
        stats.runners.iter().filter_map(|r| r.load.map(|l| (l.cpu_percent, l.memory_percent))).collect()
    }

    async fn object_summary(env: &Env, range: Range) -> ApiResult<Value> {
        http::call(&object(env)?, Method::Get, &format!("/summary?time_range={}", range.as_str()), None::<&()>).await
    }

    /// The metrics channel's numbers (seed 002's `metrics_update`): cpu and memory as the
    /// runners' mean, requests per second and mean latency over the last minute.
    /// `active_connections` is the channel's own to add (it counts its sockets).
    pub async fn snapshot(env: &Env) -> Value {
        let now = now_ms();
        flush_now(env).await;
        let stats = queue_stats(env).await.ok();
        let (cpu, mem) = stats.as_ref().map_or((None, None), |s| mean_load(&runner_loads(s)));
        let recent: Value = http::call(&match object(env) {
            Ok(o) => o,
            Err(_) => return json!({"timestamp": rfc3339(now)}),
        }, Method::Get, "/recent", None::<&()>)
        .await
        .unwrap_or(Value::Null);
        json!({
            "timestamp": rfc3339(now),
            "cpu_percent": cpu,
            "memory_percent": mem,
            "active_connections": Value::Null,
            "requests_per_second": recent.get("requests_per_second").cloned().unwrap_or(Value::Null),
            "avg_latency_ms": recent.get("avg_latency_ms").cloned().unwrap_or(Value::Null),
            "runners_connected": stats.as_ref().map(|s| s.runners_connected),
            "jobs_running": stats.as_ref().map(|s| s.running),
            "jobs_queued": stats.as_ref().map(|s| s.queued),
        })
    }

    /// `GET /api/v1/monitoring/metrics?metrics=&time_range=`.
    pub async fn metrics(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
        let url = req.url()?;
        let pairs: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (sections, range) = parse_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
        let now = now_ms();
        let mut out = Map::new();
        out.insert("timestamp".into(), json!(rfc3339(now)));
        out.insert("time_range".into(), json!(range.as_str()));
        let stats = queue_stats(&ctx.env).await.ok();
        for section in sections {
            let value = match section {
                "health" => health(&ctx.env, stats.as_ref()).await,
                "performance" => performance(&ctx.env, range).await?,
                "ml" => ml(&ctx.env, who, range, now).await?,
                _ => business(&ctx.env, who, range, now).await?,
            };
            out.insert(section.into(), value);
        }
        json(&Value::Object(out))
    }

    async fn health(env: &Env, stats: Option<&Stats>) -> Value {
        let mut v = services(env, stats).await;
        if let Some(s) = stats {
            v["queue"]["max_concurrent"] = json!(s.max_concurrent);
            v["queue"]["free_slots"] = json!(s.free_slots);
            let runners: Vec<Value> = s
                .runners
                .iter()
                .map(|r| {
                    json!({
                        "name": r.name,
                        "cpu_percent": r.load.map(|l| l.cpu_percent),
                        "memory_percent": r.load.map(|l| l.memory_percent),
                        "last_seen": r.last_seen,
                    })
                })
                .collect();
            let (cpu, mem) = mean_load(&runner_loads(s));
            v["runners"]["list"] = Value::Array(runners);
            v["runners"]["cpu_percent"] = json!(cpu);
            v["runners"]["memory_percent"] = json!(mem);
        }
        v
    }

    async fn performance(env: &Env, range: Range) -> ApiResult<Value> {
        flush_now(env).await;
        let mut v = object_summary(env, range).await?;
        // Channel connections are counted by each owner's Dashboard object (it adds them to its
        // own `metrics_update`); there is no cheap global count to read here.
        v["active_connections"] = Value::Null;
        Ok(v)
    }

    /// Owner-scoped rows (the service principal sees every owner's).
    fn scope(who: &Principal) -> (&'static str, String) {
        match who {
            Principal::Service => ("?1 = ?1", String::new()),
            _ => ("owner = ?1", who.owner().to_string()),
        }
    }

    async fn ml(env: &Env, who: &Principal, range: Range, now: i64) -> ApiResult<Value> {
        #[derive(Deserialize)]
        struct Row {
            job_type: String,
            model: Option<String>,
            jobs: f64,
            input_tokens: Option<f64>,
            output_tokens: Option<f64>,
            cost_usd: Option<f64>,
        }
        let (cond, owner) = scope(who);
        let sql = format!(
            "SELECT job_type, json_extract(result, '$.model') AS model, COUNT(*) AS jobs,
                    SUM(json_extract(usage, '$.input_tokens')) AS input_tokens,
                    SUM(json_extract(usage, '$.output_tokens')) AS output_tokens,
                    SUM(json_extract(usage, '$.cost_usd')) AS cost_usd
             FROM jobs WHERE {cond} AND created_ms > ?2 AND usage IS NOT NULL
             GROUP BY job_type, model ORDER BY cost_usd DESC LIMIT 100"
        );
        let rows: Vec<Row> = env::db(env)?
            .prepare(&sql)
            .bind(&[crate::store::s(&owner), crate::store::n(now - range.ms())])?
            .all()
            .await?
            .results()?;
        let (mut tin, mut tout, mut cost) = (0.0, 0.0, 0.0);
        let by_model: Vec<Value> = rows
            .iter()
            .map(|r| {
                tin += r.input_tokens.unwrap_or(0.0);
                tout += r.output_tokens.unwrap_or(0.0);
                cost += r.cost_usd.unwrap_or(0.0);
                json!({
                    "job_type": r.job_type,
                    "model": r.model,
                    "jobs": r.jobs as u64,
                    "input_tokens": r.input_tokens.unwrap_or(0.0) as u64,
                    "output_tokens": r.output_tokens.unwrap_or(0.0) as u64,
                    "cost_usd": super::round2(r.cost_usd.unwrap_or(0.0) * 100.0) / 100.0,
                })
            })
            .collect();
        Ok(json!({
            "input_tokens": tin as u64,
            "output_tokens": tout as u64,
            "total_tokens": (tin + tout) as u64,
            "cost_usd": super::round2(cost * 100.0) / 100.0,
            "by_model": by_model,
        }))
    }

    async fn business(env: &Env, who: &Principal, range: Range, now: i64) -> ApiResult<Value> {
        #[derive(Deserialize)]
        struct Row {
            job_type: String,
            status: String,
            n: f64,
        }
        let (cond, owner) = scope(who);
        let db = env::db(env)?;
        let binds = [crate::store::s(&owner), crate::store::n(now - range.ms())];
        let rows: Vec<Row> = db
            .prepare(format!(
                "SELECT job_type, status, COUNT(*) AS n FROM jobs WHERE {cond} AND created_ms > ?2 GROUP BY job_type, status"
            ))
            .bind(&binds)?
            .all()
            .await?
            .results()?;
        async fn count(db: &worker::D1Database, sql: String, binds: &[wasm_bindgen::JsValue]) -> ApiResult<u64> {
            let c: Option<Count> = db.prepare(&sql).bind(binds)?.first(None).await?;
            Ok(c.map_or(0, |c| c.n as u64))
        }
        let competitions =
            count(&db, format!("SELECT COUNT(*) AS n FROM competitions WHERE {cond} AND created_ms > ?2"), &binds).await?;
        let assets = count(
            &db,
            format!("SELECT COUNT(*) AS n FROM pipelines_3d WHERE {cond} AND created_ms > ?2 AND stage = 'completed'"),
            &binds,
        )
        .await?;
        let mut by_state = Map::new();
        let mut by_kind = Map::new();
        let mut total = 0u64;
        let mut tasks_completed = 0u64;
        for r in &rows {
            let n = r.n as u64;
            total += n;
            *by_state.entry(r.status.clone()).or_insert(json!(0)) = json!(by_state.get(&r.status).and_then(Value::as_u64).unwrap_or(0) + n);
            *by_kind.entry(r.job_type.clone()).or_insert(json!(0)) = json!(by_kind.get(&r.job_type).and_then(Value::as_u64).unwrap_or(0) + n);
            if r.job_type == "agent_task" && r.status == "completed" {
                tasks_completed += n;
            }
        }
        Ok(json!({
            "jobs": total,
            "jobs_by_state": by_state,
            "jobs_by_kind": by_kind,
            "tasks_completed": tasks_completed,
            "competitions": competitions,
            "assets_3d": assets,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_refuse_unknown_names() {
        assert_eq!(parse_query([]).unwrap(), (SECTIONS.to_vec(), Range::H1));
        let (s, r) = parse_query([("metrics", "health, performance"), ("time_range", "7d")]).unwrap();
        assert_eq!((s, r), (vec!["health", "performance"], Range::D7));
        assert!(parse_query([("metrics", "health,cpu")]).unwrap_err().contains("\"cpu\""));
        assert!(parse_query([("time_range", "2h")]).unwrap_err().contains("1h, 24h, 7d, 30d"));
        assert!(parse_query([("range", "1h")]).unwrap_err().contains("unknown parameter"));
        assert_eq!(parse_query([("metrics", "ml,ml")]).unwrap().0, vec!["ml"]);
    }

    #[test]
    fn classes_elide_ids() {
        assert_eq!(path_class("GET", "/jobs/3f2a9c1e-0000-4000-8000-000000000000"), "GET /jobs/:id");
        assert_eq!(path_class("POST", "/api/v1/agents/commerce/execute"), "POST /api/v1/agents/commerce/execute");
        assert_eq!(path_class("GET", "/api/v1/tasks/abc123/"), "GET /api/v1/tasks/:id");
        assert_eq!(path_class("GET", "/"), "GET /");
        assert_eq!(path_class("GET", "/a/b/c/d/e/f/g"), "GET /a/b/c/d/e/…");
    }

    #[test]
    fn percentiles_are_histogram_bounds() {
        let mut c = Counts::default();
        for ms in [0.5, 1.5, 4.0, 8.0, 12.0, 40.0, 90.0, 400.0, 2500.0, 60_000.0] {
            c.add(200, ms);
        }
        c.add(500, 3.0);
        c.add(404, 3.0);
        assert_eq!(c.n, 12);
        assert_eq!((c.e4, c.e5), (1, 1));
        assert_eq!(c.percentile(0.5), Some(10.0), "the 6th of 12 is 8 ms, in (7.5, 10]");
        assert_eq!(c.percentile(0.99), Some(30_000.0), "overflow reports the last bound");
        assert_eq!(c.percentile(0.0), Some(1.0));
        assert_eq!(Counts::default().percentile(0.5), None);
        let s = c.summary(60.0);
        assert_eq!(s["requests"], 12);
        assert_eq!(s["error_rate"], 0.0833);
        assert_eq!(s["requests_per_second"], 0.2);
    }

    #[test]
    fn recorder_flushes_at_most_once_a_second() {
        let mut r = Recorder::default();
        let t = 10 * HOUR_MS + 5_000;
        r.record("GET /jobs/:id", 200, 3.0, t);
        let batch = r.take(t, false).expect("first flush is due");
        assert_eq!(batch[&(10 * HOUR_MS)]["GET /jobs/:id"].n, 1);
        r.record("GET /jobs/:id", 200, 3.0, t + 10);
        assert!(r.take(t + 10, false).is_none(), "within a second");
        assert!(r.take(t + 10, true).is_some(), "forced");
        r.record("x", 200, 1.0, t + 20);
        let b = r.take(t + 2000, false).unwrap();
        r.restore(b);
        assert_eq!(r.pending[&(10 * HOUR_MS)]["x"].n, 1, "a failed flush is kept");
        // Classes are bounded per bucket.
        let mut r = Recorder::default();
        for i in 0..(MAX_CLASSES + 10) {
            r.record(&format!("GET /c{i}"), 200, 1.0, t);
        }
        let b = r.take(t, true).unwrap();
        assert_eq!(b[&(10 * HOUR_MS)].len(), MAX_CLASSES + 1);
        assert_eq!(b[&(10 * HOUR_MS)]["other"].n, 10);
    }

    #[test]
    fn the_store_keeps_minutes_a_day_and_hours_a_month() {
        let mut store = Store::default();
        let now = 100 * 24 * HOUR_MS;
        let mut r = Recorder::default();
        // 120 requests over the last two minutes, one 5xx; one a week ago; one 40 days ago.
        for i in 0..120 {
            r.record("GET /jobs/:id", if i == 0 { 500 } else { 200 }, 10.0, now - 1000 * i);
        }
        r.record("GET /queue", 200, 100.0, now - 7 * 24 * HOUR_MS + HOUR_MS);
        r.record("GET /old", 200, 100.0, now - 40 * 24 * HOUR_MS);
        let touched = store.add(&r.take(now, true).unwrap(), now);
        assert!(touched.contains(&("h", now - 40 * 24 * HOUR_MS - (now - 40 * 24 * HOUR_MS).rem_euclid(HOUR_MS))));
        assert!(store.hours.keys().all(|h| *h > now - 31 * 24 * HOUR_MS), "40 days ago is gone");
        assert!(store.minutes.keys().all(|m| *m > now - 25 * HOUR_MS), "a week ago is not a minute bucket");
        let (h1, _) = store.totals(Range::H1, now);
        assert_eq!((h1.n, h1.e5), (120, 1));
        let (d7, classes) = store.totals(Range::D7, now);
        assert_eq!(d7.n, 121);
        assert!(classes.contains_key("GET /queue"));
        let (d30, _) = store.totals(Range::D30, now);
        assert_eq!(d30.n, 121);
        let s = store.summary(Range::H1, now);
        assert_eq!(s["latency_ms"]["p50"], 10.0);
        assert_eq!(s["by_endpoint"]["GET /jobs/:id"]["requests"], 120);
        assert!(s["series"].as_array().unwrap().len() >= 2);
        let (rps, avg) = store.last_minute(now);
        assert!(rps > 0.9 && rps <= 2.0, "{rps}");
        assert_eq!(avg, Some(10.0));
    }

    #[test]
    fn services_and_loads() {
        assert_eq!(status_of(true, false), "ok");
        assert_eq!(status_of(true, true), "degraded");
        assert_eq!(status_of(false, true), "down");
        assert_eq!(mean_load(&[]), (None, None));
        assert_eq!(mean_load(&[(10.0, 50.0), (20.0, 70.0)]), (Some(15.0), Some(60.0)));
    }
}
