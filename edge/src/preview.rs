//! Landing pages' previews (seed 001): what a deployer publishes (`PUT
//! /runner/v1/jobs/<id>/preview`, checked here) and how the Worker serves it at
//! `/preview/<landing_page_id>/<path>` from R2 (`ARTIFACTS`, `previews/<page>/<path>`), without
//! credentials: the page id is an unguessable UUID. The checks are pure and natively tested; the
//! serving is wasm32 only.

use base64::Engine;
use kiln_schemas::landing::{preview_path, PreviewBundle, MAX_PREVIEW_BYTES};

/// The most files one preview holds.
pub const MAX_PREVIEW_FILES: usize = 1000;
/// The largest preview request body: its files' bytes, base64 growing binary ones by a third,
/// plus the JSON around them.
pub const MAX_PREVIEW_BODY_BYTES: usize = MAX_PREVIEW_BYTES / 3 * 4 + 1024 * 1024;
/// How long a browser or cache may keep a served file.
pub const CACHE_CONTROL: &str = "public, max-age=60";

/// The R2 key of a preview file.
pub fn object_key(page_id: &str, path: &str) -> String {
    format!("previews/{page_id}/{path}")
}

/// The R2 key of a page's preview manifest (the files it holds), outside the served prefix.
pub fn manifest_key(page_id: &str) -> String {
    format!("preview-manifests/{page_id}.json")
}

/// The R2 key of a landing session's workspace (a git bundle).
pub fn bundle_key(page_id: &str) -> String {
    format!("sessions/{page_id}.bundle")
}

/// Whether `id` can be a landing page id (what the face creates: a UUID; anything of letters,
/// digits and `-`, 1 to 64 characters, is looked up).
pub fn page_id_ok(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A request path's file inside a preview: percent-decoded first (so `%2e%2e` is `..`), then
/// checked with [`preview_path`]. `None`: refused.
pub fn request_path(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    preview_path(&String::from_utf8(out).ok()?).ok()
}

/// Whether an `If-None-Match` header names `etag` (a list, weak tags, or `*`).
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    if_none_match.split(',').any(|t| t.trim() == "*" || bare(t) == bare(etag))
}

/// A preview file's checked path and its bytes.
pub type PreviewBytes = (String, Vec<u8>);

/// A preview's files checked and decoded: every path through [`preview_path`] (normalized, no
/// two alike), base64 decoded, at most [`MAX_PREVIEW_FILES`] files and [`MAX_PREVIEW_BYTES`]
/// bytes. Errors: `(status, message)`.
pub fn decode_bundle(bundle: PreviewBundle) -> Result<Vec<PreviewBytes>, (u16, String)> {
    if bundle.files.is_empty() {
        return Err((400, "a preview needs at least one file".into()));
    }
    if bundle.files.len() > MAX_PREVIEW_FILES {
        return Err((400, format!("a preview holds at most {MAX_PREVIEW_FILES} files")));
    }
    let mut out: Vec<PreviewBytes> = Vec::with_capacity(bundle.files.len());
    let mut total = 0usize;
    for f in bundle.files {
        let path = preview_path(&f.path).map_err(|_| (400, format!("bad preview path {:?}", truncate(&f.path))))?;
        if f.path.ends_with('/') || f.path.is_empty() {
            return Err((400, format!("bad preview path {:?}: name the file", truncate(&f.path))));
        }
        if out.iter().any(|(p, _)| *p == path) {
            return Err((400, format!("preview path {path:?} given twice")));
        }
        let bytes = if f.base64 {
            base64::engine::general_purpose::STANDARD
                .decode(f.content.as_bytes())
                .map_err(|_| (400, format!("{path}: content is not valid base64")))?
        } else {
            f.content.into_bytes()
        };
        total += bytes.len();
        if total > MAX_PREVIEW_BYTES {
            return Err((413, format!("preview over {MAX_PREVIEW_BYTES} bytes")));
        }
        out.push((path, bytes));
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The files of an older preview that a newer one lacks (to delete).
pub fn stale<'a>(old: &'a [String], new: &[String]) -> Vec<&'a String> {
    old.iter().filter(|p| !new.contains(p)).collect()
}

/// `<base>/preview/<page>/`, `base` without its trailing slash.
pub fn preview_url(base: &str, page_id: &str) -> String {
    format!("{}/preview/{page_id}/", base.trim_end_matches('/'))
}

#[cfg(target_arch = "wasm32")]
pub use serve::serve;

#[cfg(target_arch = "wasm32")]
mod serve {
    use kiln_schemas::landing::content_type;
    use worker::{Headers, Method, Request, Response};

    use super::*;
    use crate::api::Ctx;
    use crate::http::{ApiError, ApiResult};

    /// `GET|HEAD /preview/<page>/<path…>`: the file from R2 with its content type, a short public
    /// cache and an ETag (`If-None-Match` → 304); `/preview/<page>` → 301 to `/preview/<page>/`.
    pub async fn serve(req: &Request, ctx: &Ctx) -> ApiResult {
        let method = req.method();
        if !matches!(method, Method::Get | Method::Head) {
            return Err(ApiError::NotFound("no such preview route".into()));
        }
        let url = req.url()?;
        // The raw path, as sent (percent-encoded): decoded once, here.
        let rest = url.path().strip_prefix("/preview/").unwrap_or_default();
        let (page_id, file) = match rest.split_once('/') {
            Some((p, f)) => (p, Some(f)),
            None => (rest, None),
        };
        if !page_id_ok(page_id) {
            return Err(ApiError::NotFound("no such preview".into()));
        }
        let Some(file) = file else {
            let headers = Headers::new();
            headers.set("location", &format!("/preview/{page_id}/"))?;
            return Ok(Response::empty()?.with_status(301).with_headers(headers));
        };
        let Some(path) = request_path(file) else {
            return Err(ApiError::BadRequest("bad preview path".into()));
        };
        let bucket = crate::env::artifacts(&ctx.env)?;
        let key = object_key(page_id, &path);
        let object = if method == Method::Head { bucket.head(key).await? } else { bucket.get(key).execute().await? };
        let Some(object) = object else {
            return Err(ApiError::NotFound("no such file in this preview".into()));
        };
        let etag = object.http_etag();
        let headers = Headers::new();
        headers.set("content-type", content_type(&path))?;
        headers.set("cache-control", CACHE_CONTROL)?;
        headers.set("etag", &etag)?;
        headers.set("x-content-type-options", "nosniff")?;
        if req.headers().get("if-none-match")?.is_some_and(|h| etag_matches(&h, &etag)) {
            return Ok(Response::empty()?.with_status(304).with_headers(headers));
        }
        headers.set("content-length", &object.size().to_string())?;
        if method == Method::Head {
            return Ok(Response::empty()?.with_headers(headers));
        }
        let bytes = match object.body() {
            Some(body) => body.bytes().await?,
            None => vec![],
        };
        Ok(Response::from_bytes(bytes)?.with_headers(headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_schemas::landing::PreviewFile;

    fn file(path: &str, content: &str, base64: bool) -> PreviewFile {
        PreviewFile { path: path.into(), content: content.into(), base64 }
    }

    #[test]
    fn request_paths_are_decoded_then_checked() {
        assert_eq!(request_path("").as_deref(), Some("index.html"));
        assert_eq!(request_path("styles.css").as_deref(), Some("styles.css"));
        assert_eq!(request_path("img/a%20b.png").as_deref(), Some("img/a b.png"));
        assert_eq!(request_path("docs/").as_deref(), Some("docs/index.html"));
        for bad in ["../x", "%2e%2e/x", "a/%2E%2E/%2e%2e/b", "a%2fb%2f..%2f..%2fc", "%5c", "%00", "%zz", "%4", "%ff"] {
            assert_eq!(request_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn etags_match_lists_weak_tags_and_star() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("\"x\", W/\"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }

    #[test]
    fn bundles_are_checked_and_decoded() {
        let ok = PreviewBundle {
            files: vec![file("index.html", "<html>", false), file("/img/dot.png", "iVBORw0K", true)],
        };
        let files = decode_bundle(ok).unwrap();
        assert_eq!(files[0], ("index.html".to_string(), b"<html>".to_vec()));
        assert_eq!(files[1].0, "img/dot.png");
        assert_eq!(&files[1].1[..4], b"\x89PNG");
        for (bad, status, want) in [
            (vec![], 400, "at least one"),
            (vec![file("../x", "", false)], 400, "bad preview path"),
            (vec![file("a/", "", false)], 400, "name the file"),
            (vec![file("a", "", false), file("/a", "", false)], 400, "twice"),
            (vec![file("a", "!!", true)], 400, "base64"),
            (vec![file("a", &"x".repeat(MAX_PREVIEW_BYTES), false), file("b", "y", false)], 413, "bytes"),
        ] {
            let (s, e) = decode_bundle(PreviewBundle { files: bad }).unwrap_err();
            assert!(s == status && e.contains(want), "{s} {e}");
        }
        let many = (0..=MAX_PREVIEW_FILES).map(|i| file(&format!("f{i}"), "", false)).collect();
        assert_eq!(decode_bundle(PreviewBundle { files: many }).unwrap_err().0, 400);
    }

    #[test]
    fn keys_urls_and_stale_files() {
        assert_eq!(object_key("p", "a/b.css"), "previews/p/a/b.css");
        assert!(!manifest_key("p").starts_with("previews/"), "the manifest is never served");
        assert_eq!(bundle_key("p"), "sessions/p.bundle");
        assert_eq!(preview_url("https://kiln.example/", "p"), "https://kiln.example/preview/p/");
        let old = vec!["index.html".to_string(), "old.css".to_string()];
        let new = vec!["index.html".to_string(), "styles.css".to_string()];
        assert_eq!(stale(&old, &new), vec![&"old.css".to_string()]);
        assert!(page_id_ok("0b7c5f0e-2f4a-4e0b-9c1d-1a2b3c4d5e6f"));
        assert!(!page_id_ok("") && !page_id_ok("a.b") && !page_id_ok(&"a".repeat(65)));
    }
}
