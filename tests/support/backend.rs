//! A recording OpenAI-style backend for end-to-end tests.
//!
//! It records every request it receives (method, path, headers, body) and answers according to
//! the `x-mock` request header, which the edge forwards like any other client header:
//!
//! | `x-mock` | answer |
//! |---|---|
//! | (none) | 200 JSON chat completion naming the `model` it received |
//! | `stream:N` | SSE with N data events, then `[DONE]` |
//! | `gated` | SSE: one event, then waits for [`Backend::open_gate`], then `[DONE]` |
//! | `endless` | SSE: an event every 20 ms until the connection goes away |
//! | `hang` | never answers |
//! | `silent` | SSE: one event, then silence |
//! | `break` | SSE: one event, then the connection is cut |
//! | `status:NNN` | that status with an OpenAI-style error body and some hop-by-hop headers |
//! | `usage-stream` | SSE: two content events, then — if the request asked with `stream_options.include_usage` — a usage-only chunk (prompt 7, completion 3), then `[DONE]` |
//!
//! Whenever a response body or a pending answer is dropped before it finished (the edge went
//! away), `"closed:<x-mock>"` is recorded in [`Backend::events`].
//!
//! `POST /v1/load_lora_adapter` answers like vLLM with run-time LoRA updating on: 200 and the
//! `lora_name` is registered, or 400 "… has already been loaded" when it already is — unless
//! [`Backend::answer_loads`] set another status, and after [`Backend::delay_loads`]. With
//! [`Backend::check_models`], a chat request whose `model` is neither the base model nor a
//! registered adapter is answered 404 like vLLM; [`Backend::forget_adapters`] plays a restart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("backend received JSON")
    }
}

#[derive(Clone, Default)]
struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<String>>>,
    gate: Arc<Notify>,
    vllm: Arc<Mutex<Vllm>>,
}

/// The vLLM-like adapter registry of a backend.
#[derive(Default)]
struct Vllm {
    /// Registered adapter names.
    loaded: std::collections::BTreeSet<String>,
    /// A forced answer to load calls: status and body.
    load_answer: Option<(u16, String)>,
    /// Pause before answering a load call.
    load_delay: Duration,
    /// When set, chat requests must name this base model or a registered adapter.
    base: Option<String>,
}

pub struct Backend {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

/// Records `closed:<what>` when dropped before `done()`.
struct CloseGuard {
    what: String,
    events: Arc<Mutex<Vec<String>>>,
    done: bool,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        if !self.done {
            self.events
                .lock()
                .unwrap()
                .push(format!("closed:{}", self.what));
        }
    }
}

/// A response body fed by a task through a channel.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    guard: CloseGuard,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                self.guard.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map(Frame::data))),
            Poll::Pending => Poll::Pending,
        }
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

impl Backend {
    /// An HTTP/1.1 backend on an ephemeral port.
    pub async fn start() -> Backend {
        Self::start_with(false).await
    }

    /// An h2c (prior knowledge) backend on an ephemeral port.
    pub async fn start_h2c() -> Backend {
        Self::start_with(true).await
    }

    /// An HTTP/1.1 backend on a chosen address (e.g. to bring a dead endpoint back).
    pub async fn start_on(addr: SocketAddr) -> Backend {
        Self::serve(TcpListener::bind(addr).await.unwrap(), false)
    }

    async fn start_with(h2: bool) -> Backend {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), h2)
    }

    fn serve(listener: TcpListener, h2: bool) -> Backend {
        let addr = listener.local_addr().unwrap();
        let shared = Shared::default();
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(answer(s, req).await) }
                    });
                    let io = TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        Backend { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<String> {
        self.shared.events.lock().unwrap().clone()
    }

    /// The load calls received (`POST /v1/load_lora_adapter`).
    pub fn loads(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path == "/v1/load_lora_adapter")
            .collect()
    }

    /// The chat requests received.
    pub fn chats(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path == "/v1/chat/completions")
            .collect()
    }

    /// Answers every load call with `status` and `body` (e.g. 500), registering nothing.
    pub fn answer_loads(&self, status: u16, body: &str) {
        self.shared.vllm.lock().unwrap().load_answer = Some((status, body.to_owned()));
    }

    /// Waits `delay` before answering a load call.
    pub fn delay_loads(&self, delay: Duration) {
        self.shared.vllm.lock().unwrap().load_delay = delay;
    }

    /// Registers an adapter as if loaded at start (`--lora-modules`).
    pub fn preload(&self, name: &str) {
        self.shared
            .vllm
            .lock()
            .unwrap()
            .loaded
            .insert(name.to_owned());
    }

    /// Answers 404 to chat requests for a model that is neither `base` nor a registered adapter.
    pub fn check_models(&self, base: &str) {
        self.shared.vllm.lock().unwrap().base = Some(base.to_owned());
    }

    /// Forgets every registered adapter, like a restarted server.
    pub fn forget_adapters(&self) {
        self.shared.vllm.lock().unwrap().loaded.clear();
    }

    pub fn open_gate(&self) {
        self.shared.gate.notify_one();
    }

    /// Waits (bounded) until `event` was recorded.
    pub async fn wait_event(&self, event: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.events().iter().any(|e| e == event) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sse_event(n: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{n} \"}}}}]}}\n\n"
    ))
}

fn sse(
    what: &str,
    s: &Shared,
    plan: impl FnOnce(
        mpsc::Sender<Result<Bytes, std::io::Error>>,
        Arc<Notify>,
    ) -> tokio::task::JoinHandle<()>,
) -> Response<BoxBody> {
    let (tx, rx) = mpsc::channel(4);
    plan(tx, Arc::clone(&s.gate));
    let body = ChannelBody {
        rx,
        guard: CloseGuard {
            what: what.to_owned(),
            events: Arc::clone(&s.events),
            done: false,
        },
    };
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

async fn answer(s: Shared, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mock = parts
        .headers
        .get("x-mock")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    s.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if parts.uri.path() == "/v1/load_lora_adapter" {
        return load_adapter(&s, &body).await;
    }
    let model = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model").cloned())
        .unwrap_or(serde_json::Value::Null);
    if let Some(unknown) = unknown_model(&s, &model) {
        return unknown;
    }

    if let Some(n) = mock.strip_prefix("stream:") {
        let n: usize = n.parse().unwrap();
        return sse(&mock, &s, move |tx, _| {
            tokio::spawn(async move {
                for i in 0..n {
                    if tx.send(Ok(sse_event(i))).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            })
        });
    }
    if let Some(code) = mock.strip_prefix("status:") {
        let status = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        let mut r = Response::new(full(
            r#"{"error":{"message":"backend says no","type":"backend","param":null,"code":"backend_code"}}"#,
        ));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-backend", HeaderValue::from_static("yes"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("connection", HeaderValue::from_static("x-hop"));
        return r;
    }
    let include_usage = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/stream_options/include_usage")
                .and_then(|u| u.as_bool())
        })
        .unwrap_or(false);
    match mock.as_str() {
        "usage-stream" => sse(&mock, &s, move |tx, _| {
            tokio::spawn(async move {
                let _ = tx.send(Ok(sse_event(0))).await;
                let _ = tx.send(Ok(sse_event(1))).await;
                if include_usage {
                    let usage = Bytes::from_static(
                        b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n",
                    );
                    let _ = tx.send(Ok(usage)).await;
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            })
        }),
        "gated" => sse(&mock, &s, |tx, gate| {
            tokio::spawn(async move {
                let _ = tx.send(Ok(sse_event(0))).await;
                gate.notified().await;
                let _ = tx.send(Ok(sse_event(1))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            })
        }),
        "endless" => sse(&mock, &s, |tx, _| {
            tokio::spawn(async move {
                for i in 0.. {
                    if tx.send(Ok(sse_event(i))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        }),
        "silent" => sse(&mock, &s, |tx, _| {
            tokio::spawn(async move {
                let _ = tx.send(Ok(sse_event(0))).await;
                tx.closed().await;
            })
        }),
        "break" => sse(&mock, &s, |tx, _| {
            tokio::spawn(async move {
                let _ = tx.send(Ok(sse_event(0))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("backend crashed"))).await;
            })
        }),
        "hang" => {
            let _guard = CloseGuard {
                what: mock.clone(),
                events: Arc::clone(&s.events),
                done: false,
            };
            std::future::pending::<()>().await;
            unreachable!()
        }
        _ => {
            let body = serde_json::json!({
                "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            });
            let mut r = Response::new(full(body.to_string()));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
    }
}

fn json_response(status: u16, body: String) -> Response<BoxBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// vLLM's `POST /v1/load_lora_adapter`.
async fn load_adapter(s: &Shared, body: &[u8]) -> Response<BoxBody> {
    let delay = s.vllm.lock().unwrap().load_delay;
    tokio::time::sleep(delay).await;
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let name = request["lora_name"].as_str().unwrap_or("").to_owned();
    let mut vllm = s.vllm.lock().unwrap();
    if let Some((status, body)) = vllm.load_answer.clone() {
        return json_response(status, body);
    }
    if !vllm.loaded.insert(name.clone()) {
        let message = format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
        );
        let body = serde_json::json!({"error": {"message": message, "type": "InvalidUserInput",
            "param": null, "code": 400}});
        return json_response(400, body.to_string());
    }
    let mut r = Response::new(full(format!(
        "Success: LoRA adapter '{name}' added successfully."
    )));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    r
}

/// vLLM's answer to a chat request for a model it does not serve, when models are checked.
fn unknown_model(s: &Shared, model: &serde_json::Value) -> Option<Response<BoxBody>> {
    let vllm = s.vllm.lock().unwrap();
    let base = vllm.base.as_deref()?;
    let name = model.as_str().unwrap_or("");
    if name == base || vllm.loaded.contains(name) {
        return None;
    }
    let body = serde_json::json!({"error": {"message": format!("The model `{name}` does not exist."),
        "type": "NotFoundError", "param": "model", "code": 404}});
    Some(json_response(404, body.to_string()))
}
