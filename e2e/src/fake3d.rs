//! Seed 002's 3D pipeline's outside world, faked: [`FakeVendor`] speaks Tripo3D's task model
//! (`POST /v2/openapi/task` → a task id; `GET /v2/openapi/task/<id>` → status, progress and, once
//! done, the model's URL; the model's download) and [`FakeWordPress`] WordPress's media endpoint
//! (`POST /wp-json/wp/v2/media`, Basic auth with an application password). Both strict about their
//! credentials and recording every call. [`glb`] writes real GLB files (a JSON chunk and a BIN
//! chunk with positions, indices and a real PNG) for the vendor to serve.
//!
//! What the vendor does follows markers in the prompt: `[vendor-error]` refuses the task (500),
//! `[fail]` fails it at the first poll, `[slow]` never finishes (progress 10), `[faces]` serves the
//! model named `over_faces`, `[texture]` the one named `broken_texture`, anything else `valid`;
//! a task succeeds at its third poll (progress 40, 80, then success).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// What a test GLB holds.
#[derive(Debug, Clone, Copy)]
pub struct GlbSpec {
    /// Triangles of the indexed primitive.
    pub indexed: u32,
    /// Triangles of the primitive without indices.
    pub plain: u32,
    /// The texture's PNG size; `None`: no texture at all.
    pub image: Option<(u32, u32)>,
}

fn pad4(v: &mut Vec<u8>, byte: u8) {
    while !v.len().is_multiple_of(4) {
        v.push(byte);
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A real RGB PNG of `w`×`h` (a gradient), its pixels in stored deflate blocks.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let mut raw = Vec::with_capacity(((w * 3 + 1) * h) as usize);
    for y in 0..h {
        raw.push(0);
        for x in 0..w {
            raw.extend([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128]);
        }
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let n = block.len() as u16;
        z.extend(n.to_le_bytes());
        z.extend((!n).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend(adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend(crc32(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    out
}

/// A GLB as [`GlbSpec`] says: one mesh of two primitives (triangles, one indexed and one not),
/// and a material whose base color is the PNG texture.
pub fn glb(spec: GlbSpec) -> Vec<u8> {
    let mut bin = Vec::new();
    let mut views = Vec::new();
    let mut accessors = Vec::new();
    let mut view = |bin: &mut Vec<u8>, data: &[u8], target: Option<u32>| {
        pad4(bin, 0);
        let mut v = json!({"buffer": 0, "byteOffset": bin.len(), "byteLength": data.len()});
        if let Some(t) = target {
            v["target"] = json!(t);
        }
        bin.extend_from_slice(data);
        views.push(v);
        views.len() - 1
    };
    let positions = |n: u32| -> Vec<u8> {
        let mut p = Vec::with_capacity(n as usize * 12);
        for i in 0..n {
            let (x, y, z) = (
                (i % 100) as f32,
                (i / 100 % 100) as f32,
                (i / 10_000) as f32,
            );
            for c in [x, y, z] {
                p.extend(c.to_le_bytes());
            }
        }
        p
    };
    // Every vertex lies in [0, 99] × [0, 99] × [0, n / 10000]: the exact bounds, as glTF requires.
    let bounds = |n: u32| -> (Value, Value) {
        let mut max = [0f32; 3];
        for i in 0..n {
            let p = [
                (i % 100) as f32,
                (i / 100 % 100) as f32,
                (i / 10_000) as f32,
            ];
            for k in 0..3 {
                max[k] = max[k].max(p[k]);
            }
        }
        (json!([0.0, 0.0, 0.0]), json!(max))
    };
    let mut primitives = Vec::new();
    if spec.indexed > 0 {
        let verts = spec.indexed + 2;
        let pv = view(&mut bin, &positions(verts), Some(34962));
        let (min, max) = bounds(verts);
        accessors.push(json!({"bufferView": pv, "componentType": 5126, "count": verts, "type": "VEC3", "min": min, "max": max}));
        let pos = accessors.len() - 1;
        let mut ix = Vec::with_capacity(spec.indexed as usize * 12);
        for i in 0..spec.indexed {
            for k in [i, i + 1, i + 2] {
                ix.extend(k.to_le_bytes());
            }
        }
        let iv = view(&mut bin, &ix, Some(34963));
        accessors.push(json!({"bufferView": iv, "componentType": 5125, "count": spec.indexed * 3, "type": "SCALAR"}));
        let ind = accessors.len() - 1;
        primitives.push(
            json!({"attributes": {"POSITION": pos}, "indices": ind, "mode": 4, "material": 0}),
        );
    }
    if spec.plain > 0 {
        let verts = spec.plain * 3;
        let pv = view(&mut bin, &positions(verts), Some(34962));
        let (min, max) = bounds(verts);
        accessors.push(json!({"bufferView": pv, "componentType": 5126, "count": verts, "type": "VEC3", "min": min, "max": max}));
        primitives.push(
            json!({"attributes": {"POSITION": accessors.len() - 1}, "mode": 4, "material": 0}),
        );
    }
    let mut doc = json!({
        "asset": {"version": "2.0", "generator": "kiln-e2e fake3d"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"name": "model", "primitives": primitives}],
        "materials": [{"pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0]}}],
    });
    if let Some((w, h)) = spec.image {
        let iv = view(&mut bin, &png(w, h), None);
        doc["images"] = json!([{"bufferView": iv, "mimeType": "image/png"}]);
        doc["samplers"] = json!([{}]);
        doc["textures"] = json!([{"source": 0, "sampler": 0}]);
        doc["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"] = json!({"index": 0});
    }
    pad4(&mut bin, 0);
    doc["accessors"] = json!(accessors);
    doc["bufferViews"] = json!(views);
    doc["buffers"] = json!([{"byteLength": bin.len()}]);
    let mut js = serde_json::to_vec(&doc).expect("JSON");
    pad4(&mut js, b' ');
    let total = 12 + 8 + js.len() + 8 + bin.len();
    let mut out = Vec::with_capacity(total);
    out.extend(b"glTF");
    out.extend(2u32.to_le_bytes());
    out.extend((total as u32).to_le_bytes());
    out.extend((js.len() as u32).to_le_bytes());
    out.extend(b"JSON");
    out.extend(js);
    out.extend((bin.len() as u32).to_le_bytes());
    out.extend(b"BIN\0");
    out.extend(bin);
    out
}

/// The three models the tests use: valid (4,000 indexed + 1,000 plain triangles, a 256×256
/// texture), over the default face limit (40,000 + 20,000 = 60,000 > 50,000), and a broken
/// texture (a 100×60 PNG).
pub fn test_models() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "valid",
            glb(GlbSpec {
                indexed: 4_000,
                plain: 1_000,
                image: Some((256, 256)),
            }),
        ),
        (
            "over_faces",
            glb(GlbSpec {
                indexed: 40_000,
                plain: 20_000,
                image: Some((256, 256)),
            }),
        ),
        (
            "broken_texture",
            glb(GlbSpec {
                indexed: 500,
                plain: 0,
                image: Some((100, 60)),
            }),
        ),
    ]
}

fn serve(
    name: &str,
    app: Router,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a fake");
    serve_on(name, listener, app)
}

fn serve_on(
    name: &str,
    listener: std::net::TcpListener,
    app: Router,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let addr = listener.local_addr().expect("its address");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let name = name.to_string();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap_or_else(|e| panic!("serving the fake {name}: {e}"));
        });
    });
    (addr, tx, thread)
}

/// One vendor task.
#[derive(Debug, Clone)]
pub struct VendorTask {
    pub id: String,
    pub prompt: String,
    pub polls: u32,
}

#[derive(Default)]
struct VendorState {
    key: String,
    base: String,
    tasks: Vec<VendorTask>,
    models: HashMap<String, Vec<u8>>,
    unauthorized: u32,
    downloads: u32,
}

type Vs = Arc<Mutex<VendorState>>;

/// A Tripo3D-style text-to-3D vendor.
pub struct FakeVendor {
    addr: SocketAddr,
    state: Vs,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn vendor_error(status: StatusCode, code: i64, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

fn authorized(s: &VendorState, headers: &HeaderMap) -> bool {
    let want = format!("Bearer {}", s.key);
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str())
}

async fn create_task(
    State(s): State<Vs>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let mut s = s.lock().expect("lock");
    if !authorized(&s, &headers) {
        s.unauthorized += 1;
        return vendor_error(StatusCode::UNAUTHORIZED, 1002, "Authentication failed");
    }
    let body = body.map(|Json(v)| v).unwrap_or(Value::Null);
    let (Some("text_to_model"), Some(prompt)) = (body["type"].as_str(), body["prompt"].as_str())
    else {
        return vendor_error(
            StatusCode::BAD_REQUEST,
            2002,
            "type text_to_model and a prompt are required",
        );
    };
    if prompt.contains("[vendor-error]") {
        return vendor_error(StatusCode::INTERNAL_SERVER_ERROR, 1000, "server overloaded");
    }
    let id = format!("task-{}", s.tasks.len() + 1);
    s.tasks.push(VendorTask {
        id: id.clone(),
        prompt: prompt.to_string(),
        polls: 0,
    });
    Json(json!({"code": 0, "data": {"task_id": id}})).into_response()
}

async fn get_task(State(s): State<Vs>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let mut s = s.lock().expect("lock");
    if !authorized(&s, &headers) {
        s.unauthorized += 1;
        return vendor_error(StatusCode::UNAUTHORIZED, 1002, "Authentication failed");
    }
    let base = s.base.clone();
    let Some(t) = s.tasks.iter_mut().find(|t| t.id == id) else {
        return vendor_error(StatusCode::NOT_FOUND, 2001, "task not found");
    };
    t.polls += 1;
    let data = if t.prompt.contains("[fail]") {
        json!({"task_id": id, "type": "text_to_model", "status": "failed", "progress": 0, "error": "the prompt could not be modelled"})
    } else if t.prompt.contains("[slow]") {
        json!({"task_id": id, "type": "text_to_model", "status": "running", "progress": 10})
    } else if t.polls < 3 {
        let status = if t.polls == 1 { "queued" } else { "running" };
        json!({"task_id": id, "type": "text_to_model", "status": status, "progress": t.polls * 40})
    } else {
        let model = if t.prompt.contains("[faces]") {
            "over_faces"
        } else if t.prompt.contains("[texture]") {
            "broken_texture"
        } else {
            "valid"
        };
        json!({"task_id": id, "type": "text_to_model", "status": "success", "progress": 100,
               "output": {"model": format!("{base}/models/{model}.glb")}})
    };
    Json(json!({"code": 0, "data": data})).into_response()
}

async fn get_model(State(s): State<Vs>, Path(file): Path<String>) -> Response {
    let mut s = s.lock().expect("lock");
    let name = file.strip_suffix(".glb").unwrap_or(&file).to_string();
    match s.models.get(&name).cloned() {
        Some(b) => {
            s.downloads += 1;
            ([("content-type", "model/gltf-binary")], b).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn vendor_app(key: &str) -> (Router, Vs) {
    let state: Vs = Arc::new(Mutex::new(VendorState {
        key: key.to_string(),
        models: test_models()
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect(),
        ..Default::default()
    }));
    let app = Router::new()
        .route("/v2/openapi/task", post(create_task))
        .route("/v2/openapi/task/{id}", get(get_task))
        .route("/models/{file}", get(get_model))
        .with_state(state.clone());
    (app, state)
}

impl FakeVendor {
    /// Serves [`test_models`] to callers with `key`.
    pub fn start(key: &str) -> FakeVendor {
        let (app, state) = vendor_app(key);
        let (addr, tx, thread) = serve("3D vendor", app);
        state.lock().expect("lock").base = format!("http://{addr}");
        FakeVendor {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every task created so far.
    pub fn tasks(&self) -> Vec<VendorTask> {
        self.state.lock().expect("lock").tasks.clone()
    }

    /// The task made for a prompt containing `marker`.
    pub fn task(&self, marker: &str) -> Option<VendorTask> {
        self.tasks().into_iter().find(|t| t.prompt.contains(marker))
    }

    /// Calls refused for their key.
    pub fn unauthorized(&self) -> u32 {
        self.state.lock().expect("lock").unauthorized
    }

    pub fn downloads(&self) -> u32 {
        self.state.lock().expect("lock").downloads
    }

    /// The model served as `name`.
    pub fn model(&self, name: &str) -> Option<Vec<u8>> {
        self.state.lock().expect("lock").models.get(name).cloned()
    }
}

impl Drop for FakeVendor {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One upload WordPress accepted.
#[derive(Debug, Clone)]
pub struct Upload {
    pub id: u64,
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
struct WpState {
    authorization: String,
    base: String,
    uploads: Vec<Upload>,
    refused: u32,
    /// Uploads still to fail with a 500 (a site in trouble).
    failing: u32,
}

type Ws = Arc<Mutex<WpState>>;

/// A WordPress site's media endpoint.
pub struct FakeWordPress {
    addr: SocketAddr,
    state: Ws,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn upload_media(State(s): State<Ws>, headers: HeaderMap, body: Bytes) -> Response {
    let mut s = s.lock().expect("lock");
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if header("authorization") != s.authorization {
        s.refused += 1;
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"code": "rest_cannot_create", "message": "Sorry, you are not allowed to create posts as this user.", "data": {"status": 401}})),
        )
            .into_response();
    }
    if s.failing > 0 {
        s.failing -= 1;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"code": "rest_upload_unknown_error", "message": "The uploaded file could not be moved to wp-content/uploads.", "data": {"status": 500}})),
        )
            .into_response();
    }
    let disposition = header("content-disposition");
    let Some(filename) = disposition
        .split("filename=")
        .nth(1)
        .map(|f| f.trim_matches('"').to_string())
        .filter(|f| !f.is_empty())
    else {
        return (StatusCode::BAD_REQUEST, Json(json!({"code": "rest_upload_no_content_disposition", "message": "No Content-Disposition supplied."}))).into_response();
    };
    if body.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": "rest_upload_no_data", "message": "No data supplied."})),
        )
            .into_response();
    }
    let id = 100 + s.uploads.len() as u64 + 1;
    let source_url = format!("{}/wp-content/uploads/{filename}", s.base);
    s.uploads.push(Upload {
        id,
        filename,
        content_type: header("content-type"),
        bytes: body.to_vec(),
    });
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "source_url": source_url, "media_type": "file"})),
    )
        .into_response()
}

fn wordpress_app(user: &str, password: &str) -> (Router, Ws) {
    let state: Ws = Arc::new(Mutex::new(WpState {
        authorization: format!("Basic {}", base64(format!("{user}:{password}").as_bytes())),
        ..Default::default()
    }));
    let app = Router::new()
        .route("/wp-json/wp/v2/media", post(upload_media))
        .layer(axum::extract::DefaultBodyLimit::max(128 * 1024 * 1024))
        .with_state(state.clone());
    (app, state)
}

impl FakeWordPress {
    /// Accepts uploads from `user` with the application password `password`.
    pub fn start(user: &str, password: &str) -> FakeWordPress {
        let (app, state) = wordpress_app(user, password);
        let (addr, tx, thread) = serve("WordPress", app);
        state.lock().expect("lock").base = format!("http://{addr}");
        FakeWordPress {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn uploads(&self) -> Vec<Upload> {
        self.state.lock().expect("lock").uploads.clone()
    }

    /// Uploads refused for their credentials.
    pub fn refused(&self) -> u32 {
        self.state.lock().expect("lock").refused
    }

    /// Makes the next `n` uploads fail with a 500.
    pub fn fail_next(&self, n: u32) {
        self.state.lock().expect("lock").failing = n;
    }
}

impl Drop for FakeWordPress {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The vendor and a WordPress site on one listener: the demo 3D vendor of `kiln-fake3d`, which
/// `scripts/dev` runs when no vendor key is set. Every request is a line on stderr unless `quiet`.
pub struct Demo3d {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Demo3d {
    /// Serves on `listener`: the vendor for `key`, WordPress for `user` with `password`.
    pub fn start(
        listener: std::net::TcpListener,
        key: &str,
        user: &str,
        password: &str,
        quiet: bool,
    ) -> std::io::Result<Demo3d> {
        let base = format!("http://{}", listener.local_addr()?);
        let (vendor, vs) = vendor_app(key);
        let (wp, ws) = wordpress_app(user, password);
        vs.lock().expect("lock").base = base.clone();
        ws.lock().expect("lock").base = base;
        let mut app = vendor.merge(wp);
        if !quiet {
            app = app.layer(axum::middleware::from_fn(
                |req: axum::extract::Request, next: axum::middleware::Next| async move {
                    let line = format!("{} {}", req.method(), req.uri().path());
                    let res = next.run(req).await;
                    eprintln!("{line} -> {}", res.status().as_u16());
                    res
                },
            ));
        }
        let (addr, tx, thread) = serve_on("demo 3D vendor", listener, app);
        Ok(Demo3d {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Demo3d {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_png_are_well_formed() {
        assert_eq!(base64(b"admin:abcd efgh"), "YWRtaW46YWJjZCBlZmdo");
        assert_eq!(base64(b"ab"), "YWI=");
        let p = png(4, 2);
        assert_eq!(&p[12..16], b"IHDR");
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
