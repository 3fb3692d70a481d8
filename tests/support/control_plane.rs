//! An in-test control plane: the HTTP side of SPEC §4 on an ephemeral port.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/edge/snapshot` | the document set by [`ControlPlane::set_snapshot`] (status settable) |
//! | `GET /v1/edge/events?after=N` | `410` when `N` is below [`ControlPlane::set_gone_below`]; else an SSE stream replaying every pushed event with a revision above `N`, then each new [`ControlPlane::push`] |
//! | `POST /v1/edge/usage` | records the body, answers [`ControlPlane::set_usage_status`] (200 by default) |
//!
//! Every request is recorded ([`ControlPlane::requests`]). [`ControlPlane::stop`] closes the
//! listener and every connection; [`ControlPlane::restart`] listens again on the same port, with
//! the same history and settings.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One request as the control plane received it.
#[derive(Debug, Clone)]
pub struct CpRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/edge/events?after=3`.
    pub path: String,
    pub authorization: Option<String>,
}

type Chunk = Result<Bytes, std::io::Error>;

#[derive(Default)]
struct Streams {
    /// Pushed events in order: (revision, JSON text).
    history: Vec<(u64, String)>,
    /// Open event streams.
    open: Vec<mpsc::UnboundedSender<Chunk>>,
}

struct Shared {
    snapshot: Mutex<Value>,
    snapshot_status: AtomicU16,
    gone_below: AtomicU64,
    usage_status: AtomicU16,
    streams: Mutex<Streams>,
    requests: Mutex<Vec<CpRequest>>,
    usage: Mutex<Vec<Bytes>>,
}

pub struct ControlPlane {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Cancels the current listener and its connections.
    running: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

/// An event stream body fed by [`ControlPlane::push`] and [`ControlPlane::send_raw`].
struct StreamBody {
    rx: mpsc::UnboundedReceiver<Chunk>,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data)))
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, content_type: &'static str, b: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(
        http_body_util::Full::new(b.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    r
}

impl ControlPlane {
    /// Starts on an ephemeral port with an empty snapshot at revision 0.
    pub async fn start() -> ControlPlane {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cp = ControlPlane {
            addr,
            shared: Arc::new(Shared {
                snapshot: Mutex::new(
                    serde_json::json!({"revision": 0, "deployments": [], "keys": []}),
                ),
                snapshot_status: AtomicU16::new(200),
                gone_below: AtomicU64::new(0),
                usage_status: AtomicU16::new(200),
                streams: Mutex::new(Streams::default()),
                requests: Mutex::new(Vec::new()),
                usage: Mutex::new(Vec::new()),
            }),
            running: Mutex::new(None),
        };
        cp.serve(listener);
        cp
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let shared = Arc::clone(&self.shared);
        let token = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                };
                let shared = Arc::clone(&shared);
                let token = token.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(answer(&shared, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    // Dropping the connection on stop closes its socket at once.
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        *self.running.lock().unwrap() = Some((stop, task));
    }

    /// Closes the listener and every connection; pushed history and settings are kept.
    pub async fn stop(&self) {
        let running = self.running.lock().unwrap().take();
        if let Some((stop, task)) = running {
            stop.cancel();
            let _ = task.await;
        }
        self.shared.streams.lock().unwrap().open.clear();
    }

    /// Listens again on the same port (retrying briefly if the port is not free yet).
    pub async fn restart(&self) {
        self.stop().await;
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }

    /// The document answered at `/v1/edge/snapshot`.
    pub fn set_snapshot(&self, doc: Value) {
        *self.shared.snapshot.lock().unwrap() = doc;
    }

    /// The status answered at `/v1/edge/snapshot` (200 by default; others carry no document).
    pub fn set_snapshot_status(&self, status: u16) {
        self.shared.snapshot_status.store(status, Ordering::Relaxed);
    }

    /// `events?after=N` answers 410 when `N < revision` (0 turns it off).
    pub fn set_gone_below(&self, revision: u64) {
        self.shared.gone_below.store(revision, Ordering::Relaxed);
    }

    /// The status answered to usage posts.
    pub fn set_usage_status(&self, status: u16) {
        self.shared.usage_status.store(status, Ordering::Relaxed);
    }

    /// Appends an event (it must carry `revision`) to the history and sends it to every open
    /// stream.
    pub fn push(&self, event: Value) {
        let revision = event["revision"].as_u64().expect("event has a revision");
        let text = event.to_string();
        let mut streams = self.shared.streams.lock().unwrap();
        let chunk = Bytes::from(format!("data: {text}\n\n"));
        streams.open.retain(|tx| tx.send(Ok(chunk.clone())).is_ok());
        streams.history.push((revision, text));
    }

    /// Writes raw bytes (garbage, comments, partial lines) into every open stream.
    pub fn send_raw(&self, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let mut streams = self.shared.streams.lock().unwrap();
        streams.open.retain(|tx| tx.send(Ok(bytes.clone())).is_ok());
    }

    /// Cuts every open stream abruptly (no chunked terminator), as a crash would.
    pub fn disconnect_all(&self) {
        let mut streams = self.shared.streams.lock().unwrap();
        for tx in streams.open.drain(..) {
            let _ = tx.send(Err(std::io::Error::other("control plane cut the stream")));
        }
    }

    /// Event streams currently open (the client may have gone away unnoticed).
    pub fn open_streams(&self) -> usize {
        let mut streams = self.shared.streams.lock().unwrap();
        streams.open.retain(|tx| !tx.is_closed());
        streams.open.len()
    }

    /// Waits (bounded) until at least `n` event streams are open.
    pub async fn wait_streams(&self, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.open_streams() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<CpRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Paths (with query) of the requests received so far.
    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.path).collect()
    }

    /// Bodies of the usage posts received so far.
    pub fn usage_posts(&self) -> Vec<Bytes> {
        self.shared.usage.lock().unwrap().clone()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.lock().unwrap().take() {
            stop.cancel();
            task.abort();
        }
    }
}

fn after(query: Option<&str>) -> u64 {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn answer(s: &Shared, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    s.requests.lock().unwrap().push(CpRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string()),
        authorization: parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/v1/edge/snapshot") => {
            let status = StatusCode::from_u16(s.snapshot_status.load(Ordering::Relaxed)).unwrap();
            if !status.is_success() {
                return full(
                    status,
                    "application/json",
                    r#"{"error":"snapshot refused"}"#,
                );
            }
            let doc = s.snapshot.lock().unwrap().to_string();
            full(status, "application/json", doc)
        }
        (&Method::GET, "/v1/edge/events") => events(s, after(parts.uri.query())),
        (&Method::POST, "/v1/edge/usage") => {
            s.usage.lock().unwrap().push(body);
            let status = StatusCode::from_u16(s.usage_status.load(Ordering::Relaxed)).unwrap();
            full(status, "application/json", "{}")
        }
        _ => full(StatusCode::NOT_FOUND, "application/json", "{}"),
    }
}

fn events(s: &Shared, after: u64) -> Response<BoxBody> {
    if after < s.gone_below.load(Ordering::Relaxed) {
        return full(StatusCode::GONE, "application/json", r#"{"error":"gone"}"#);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    // Replay and registration under one lock, so a concurrent push is neither lost nor doubled.
    let mut streams = s.streams.lock().unwrap();
    for (revision, text) in &streams.history {
        if *revision > after {
            let _ = tx.send(Ok(Bytes::from(format!("data: {text}\n\n"))));
        }
    }
    streams.open.push(tx);
    drop(streams);
    let mut r = Response::new(StreamBody { rx }.boxed());
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}
