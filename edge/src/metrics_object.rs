//! The Metrics Durable Object (one, named `global`): the request metrics every isolate flushes
//! (`monitoring::Recorder`), kept as minute buckets for a day and hour buckets for 30 days
//! (`monitoring::Store`), in memory and in SQLite (one row per bucket, read back at start).
//!
//! Internal API (called by the Worker, never exposed): `POST /record` (a batch), `GET
//! /summary?time_range=` (the performance section's request part), `GET /recent` (requests per
//! second and mean latency over the last minute).

use std::cell::RefCell;

use serde::Deserialize;
use serde_json::json;
use worker::{durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, SqlStorage, SqlStorageValue, State};

use crate::env::now_ms;
use crate::http::{body_json, json, ApiError, ApiResult};
use crate::monitoring::{Batch, Bucket, Range, Store};

#[durable_object]
pub struct Metrics {
    state: State,
    store: RefCell<Option<Store>>,
}

#[derive(Deserialize)]
struct Row {
    res: String,
    start: i64,
    data: String,
}

impl Metrics {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> ApiResult<T> {
        let mut slot = self.store.borrow_mut();
        if slot.is_none() {
            let sql = self.sql();
            sql.exec("CREATE TABLE IF NOT EXISTS buckets (res TEXT NOT NULL, start INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (res, start))", None)?;
            let rows: Vec<Row> = sql.exec("SELECT res, start, data FROM buckets", None)?.to_array()?;
            let mut store = Store::default();
            for row in rows {
                let Ok(bucket) = serde_json::from_str::<Bucket>(&row.data) else { continue };
                if row.res == "m" {
                    store.minutes.insert(row.start, bucket);
                } else {
                    store.hours.insert(row.start, bucket);
                }
            }
            *slot = Some(store);
        }
        Ok(f(slot.as_mut().expect("loaded")))
    }

    fn record(&self, batch: &Batch) -> ApiResult<()> {
        let now = now_ms();
        let (touched, rows, (m_cut, h_cut)) = self.with_store(|store| {
            let touched = store.add(batch, now);
            let rows: Vec<(&'static str, i64, String)> = touched
                .iter()
                .filter_map(|(res, start)| {
                    let bucket = if *res == "m" { store.minutes.get(start) } else { store.hours.get(start) };
                    Some((*res, *start, serde_json::to_string(bucket?).ok()?))
                })
                .collect();
            (touched, rows, store.prune(now))
        })?;
        let _ = touched;
        let sql = self.sql();
        for (res, start, data) in rows {
            sql.exec(
                "INSERT OR REPLACE INTO buckets (res, start, data) VALUES (?, ?, ?)",
                vec![SqlStorageValue::from(res.to_string()), SqlStorageValue::from(start), SqlStorageValue::from(data)],
            )?;
        }
        sql.exec(
            "DELETE FROM buckets WHERE (res = 'm' AND start <= ?) OR (res = 'h' AND start <= ?)",
            vec![SqlStorageValue::from(m_cut), SqlStorageValue::from(h_cut)],
        )?;
        Ok(())
    }

    async fn route(&self, mut req: Request) -> ApiResult {
        let url = req.url()?;
        match (req.method(), url.path()) {
            (Method::Post, "/record") => {
                let batch: Batch = serde_json::from_value(body_json(&mut req).await?)
                    .map_err(|e| ApiError::BadRequest(format!("a batch: {e}")))?;
                self.record(&batch)?;
                json(&json!({"ok": true}))
            }
            (Method::Get, "/summary") => {
                let range = url
                    .query_pairs()
                    .find(|(k, _)| k == "time_range")
                    .and_then(|(_, v)| Range::parse(&v))
                    .unwrap_or(Range::H1);
                let now = now_ms();
                json(&self.with_store(|s| s.summary(range, now))?)
            }
            (Method::Get, "/recent") => {
                let now = now_ms();
                let (rps, avg) = self.with_store(|s| s.last_minute(now))?;
                json(&json!({"requests_per_second": rps, "avg_latency_ms": avg}))
            }
            _ => Err(ApiError::NotFound("no such endpoint".into())),
        }
    }
}

impl DurableObject for Metrics {
    fn new(state: State, _env: Env) -> Self {
        Self { state, store: RefCell::new(None) }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(self.route(req).await.unwrap_or_else(ApiError::into_response))
    }
}
