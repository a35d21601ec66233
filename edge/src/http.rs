//! One error envelope for every REST answer (`{"error": "..."}`; under `/api/` also DRF's
//! `{"detail": "..."}` with the same text, for seed 000's frontend), JSON helpers, and typed calls
//! between the Worker and its Durable Objects.

use serde::{de::DeserializeOwned, Serialize};
use worker::{Headers, Method, Request, RequestInit, Response, Stub};

/// An error answer. `Internal` is logged and shown only as "internal error".
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    Conflict(String),
    Unavailable(String),
    /// 413: a request body over [`MAX_BODY_BYTES`].
    TooLarge(String),
    /// 429 with `Retry-After`.
    TooManyRequests { message: String, retry_after_secs: u64 },
    Internal(String),
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

impl From<worker::Error> for ApiError {
    fn from(e: worker::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl ApiError {
    /// The answer in the envelope of seed 003's faces: `{"error"}`.
    pub fn into_response(self) -> Response {
        self.respond(false)
    }

    /// The answer, with `detail` beside `error` when `with_detail` (the `/api/` face).
    pub fn respond(self, with_detail: bool) -> Response {
        let mut retry_after = None;
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (400, m),
            ApiError::Unauthorized(m) => (401, m),
            ApiError::Forbidden(m) => (403, m),
            ApiError::NotFound(m) => (404, m),
            ApiError::Conflict(m) => (409, m),
            ApiError::Unavailable(m) => (503, m),
            ApiError::TooLarge(m) => (413, m),
            ApiError::TooManyRequests { message, retry_after_secs } => {
                retry_after = Some(retry_after_secs);
                (429, message)
            }
            ApiError::Internal(m) => {
                worker::console_error!("internal error: {m}");
                (500, "internal error".to_string())
            }
        };
        let mut resp = if with_detail {
            drf_error(status, &msg)
        } else {
            error_response(status, &msg)
        };
        if let Some(secs) = retry_after {
            resp.headers_mut().set("Retry-After", &secs.to_string()).ok();
        }
        resp
    }
}

/// An error answer of the `/api/` face: `{"error", "detail"}` with the same text. For statuses
/// [`ApiError`] has no variant of (415 for a file the files API will not show).
pub fn drf_error(status: u16, msg: &str) -> Response {
    #[derive(Serialize)]
    struct WithDetail<'a> {
        error: &'a str,
        detail: &'a str,
    }
    json_status(&WithDetail { error: msg, detail: msg }, status)
}

pub fn error_response(status: u16, msg: &str) -> Response {
    json_status(&kiln_schemas::ErrorBody { error: msg.to_string() }, status)
}

pub fn json<T: Serialize>(value: &T) -> ApiResult {
    Ok(Response::from_json(value)?)
}

pub fn json_status<T: Serialize>(value: &T, status: u16) -> Response {
    Response::from_json(value).map(|r| r.with_status(status)).unwrap_or_else(|_| Response::empty().unwrap().with_status(500))
}

/// The largest request body any endpoint reads (and a Durable Object's internal call carries):
/// 1 MiB. A runner's event batch is at most 256 KiB; a job's prompt far less.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Reads a JSON body; over [`MAX_BODY_BYTES`] is a 413 (refused on its `Content-Length` before it
/// is read), malformed JSON a 400. Every body is read here.
pub async fn body_json(req: &mut Request) -> ApiResult<serde_json::Value> {
    let too_large = || ApiError::TooLarge(format!("request body over {MAX_BODY_BYTES} bytes"));
    let declared = req.headers().get("content-length")?.and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let text = req.text().await.map_err(|_| ApiError::BadRequest("could not read request body".into()))?;
    if text.len() > MAX_BODY_BYTES {
        return Err(too_large());
    }
    serde_json::from_str(&text).map_err(|_| ApiError::BadRequest("request body is not valid JSON".into()))
}

/// Reads a typed JSON body; malformed JSON or a wrong shape is a 400.
pub async fn body_as<T: DeserializeOwned>(req: &mut Request) -> ApiResult<T> {
    let value = body_json(req).await?;
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("invalid request body: {}", strip_serde(&e))))
}

/// serde's messages name fields and types, never internal state; drop the position suffix.
fn strip_serde(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A JSON call to a Durable Object's internal API. Answers with status ≥ 400 carrying
/// `{"error"}` come back as the matching [`ApiError`]; an empty answer (204) reads as `null`.
pub async fn call<T: DeserializeOwned>(stub: &Stub, method: Method, path: &str, body: Option<&impl Serialize>) -> ApiResult<T> {
    let mut init = RequestInit::new();
    init.with_method(method);
    if let Some(body) = body {
        let headers = Headers::new();
        headers.set("content-type", "application/json")?;
        init.with_headers(headers);
        init.with_body(Some(serde_json::to_string(body)?.into()));
    }
    let req = Request::new_with_init(&format!("https://do{path}"), &init)?;
    let mut resp = stub.fetch_with_request(req).await?;
    let status = resp.status_code();
    let text = resp.text().await?;
    if status >= 400 {
        let msg = serde_json::from_str::<kiln_schemas::ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        return Err(match status {
            400 => ApiError::BadRequest(msg),
            401 => ApiError::Unauthorized(msg),
            403 => ApiError::Forbidden(msg),
            404 => ApiError::NotFound(msg),
            409 => ApiError::Conflict(msg),
            413 => ApiError::TooLarge(msg),
            429 => ApiError::TooManyRequests { message: msg, retry_after_secs: 1 },
            502..=504 => ApiError::Unavailable(msg),
            _ => ApiError::Internal(msg),
        });
    }
    Ok(serde_json::from_str(if text.is_empty() { "null" } else { &text })?)
}
