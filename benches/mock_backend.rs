//! A minimal OpenAI-compatible backend for load runs without a GPU.
//!
//! `cargo bench --bench mock_backend -- [--listen 127.0.0.1:9100] [--chunks 32]`
//!
//! Answers every POST at once: a chat completion JSON, or — when the body asks for
//! `"stream":true` — an event stream of `--chunks` content events and `[DONE]`, each event its
//! own frame. It does no work per request beyond that, so it is the "direct" limit that proxies
//! are measured against.

#![allow(clippy::print_stdout)] // a command-line tool: it prints where it listens

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const COMPLETION: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock backend."},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":6,"total_tokens":14}}"#;

/// Pre-rendered events, sent one frame each.
struct Events {
    events: Arc<[Bytes]>,
    next: usize,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.events.get(self.next).cloned();
        self.next += 1;
        Poll::Ready(next.map(|e| Ok(Frame::data(e))))
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn parse_args() -> (SocketAddr, usize) {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 9100).into();
    let mut chunks = 32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()).unwrap_or(listen),
            "--chunks" => chunks = args.next().and_then(|v| v.parse().ok()).unwrap_or(chunks),
            _ => {} // `cargo bench` adds `--bench`
        }
    }
    (listen, chunks)
}

fn main() -> std::io::Result<()> {
    let (listen, chunks) = parse_args();
    let mut events: Vec<Bytes> = (0..chunks)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"mock\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let events: Arc<[Bytes]> = events.into();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!(
            "mock backend on {} ({chunks} chunks per stream)",
            listener.local_addr()?
        );
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let events = Arc::clone(&events);
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let events = Arc::clone(&events);
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let stream = memchr::memmem::find(&body, b"\"stream\":true").is_some();
                        let mut r: Response<BoxBody> = if stream {
                            let mut r = Response::new(Events { events, next: 0 }.boxed());
                            r.headers_mut().insert(
                                "content-type",
                                HeaderValue::from_static("text/event-stream"),
                            );
                            r
                        } else {
                            let mut r = Response::new(
                                http_body_util::Full::new(Bytes::from_static(
                                    COMPLETION.as_bytes(),
                                ))
                                .boxed(),
                            );
                            r.headers_mut().insert(
                                "content-type",
                                HeaderValue::from_static("application/json"),
                            );
                            r
                        };
                        r.headers_mut()
                            .insert("x-mock", HeaderValue::from_static("1"));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}
