//! A mock OpenAI-compatible chat backend for load runs without a GPU: the server part, shared
//! by the `arkor-mock-backend` binary and the allocation bench.
//!
//! Every POST is answered as a chat completion: JSON, or an event stream when the body asks for
//! `"stream":true` (one frame per event, then `[DONE]`). When the body asks for
//! `"include_usage":true`, every event carries `"usage":null` and a usage event comes before
//! `[DONE]`, as OpenAI's API documents (and vLLM and SGLang do). The latency to the first token, the pause between
//! tokens, the response size and injected errors are set by [`MockOptions`]. With the defaults
//! (no delay, no errors) it does no work beyond writing pre-rendered bytes, so it is the
//! "direct" limit proxies are measured against.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// How the mock answers.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Tokens (content events) per completion.
    pub tokens: usize,
    /// Bytes of content per token (at least 1).
    pub token_bytes: usize,
    /// Wait before the response head (time to first token).
    pub first_token: Duration,
    /// Wait between two tokens of a stream.
    pub token_interval: Duration,
    /// Share of requests answered `500` with an OpenAI error body (0.0–1.0).
    pub error_rate: f64,
    /// Share of streams cut after half their tokens by dropping the connection (0.0–1.0).
    pub break_rate: f64,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            tokens: 32,
            token_bytes: 5,
            first_token: Duration::ZERO,
            token_interval: Duration::ZERO,
            error_rate: 0.0,
            break_rate: 0.0,
        }
    }
}

/// The pre-rendered answers.
struct Answers {
    options: MockOptions,
    completion: Bytes,
    events: Arc<[Bytes]>,
    /// The same events with `"usage":null`, for a stream that asked for usage.
    events_null_usage: Arc<[Bytes]>,
    usage_event: Bytes,
}

const ERROR_BODY: &str = r#"{"error":{"message":"injected by the mock backend","type":"server_error","param":null,"code":"mock_error"}}"#;

impl Answers {
    fn new(options: MockOptions) -> Answers {
        let token_bytes = options.token_bytes.max(1);
        let word = |i: usize| {
            let mut w = format!("t{i}");
            w.truncate(token_bytes);
            while w.len() < token_bytes {
                w.push('x');
            }
            w
        };
        let content: Vec<String> = (0..options.tokens).map(word).collect();
        let completion = format!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"mock","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":8,"completion_tokens":{},"total_tokens":{}}}}}"#,
            content.join(""),
            options.tokens,
            options.tokens + 8
        );
        let event = |w: &str, usage: &str| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"mock\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}]{usage}}}\n\n"
            ))
        };
        let events: Vec<Bytes> = content.iter().map(|w| event(w, "")).collect();
        let events_null_usage: Vec<Bytes> = content
            .iter()
            .map(|w| event(w, ",\"usage\":null"))
            .collect();
        let usage_event = Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"mock\",\"choices\":[],\"usage\":{{\"prompt_tokens\":8,\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\n",
            options.tokens,
            options.tokens + 8
        ));
        Answers {
            options,
            completion: Bytes::from(completion),
            events: events.into(),
            events_null_usage: events_null_usage.into(),
            usage_event,
        }
    }
}

/// A stream's events, one frame each, paced by `token_interval`.
struct Events {
    answers: Arc<Answers>,
    next: usize,
    usage: bool,
    /// Cut the stream (an error frame, which makes hyper drop the connection) at this event.
    break_at: Option<usize>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Events {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let tokens = this.answers.events.len();
        if this.next > 0 && this.next <= tokens && !this.answers.options.token_interval.is_zero() {
            let interval = this.answers.options.token_interval;
            let pause = this
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pause = None;
        }
        let i = this.next;
        this.next += 1;
        if this.break_at == Some(i) {
            return Poll::Ready(Some(Err(std::io::Error::other("injected stream break"))));
        }
        let frame = if i < tokens && this.usage {
            this.answers.events_null_usage[i].clone()
        } else if i < tokens {
            this.answers.events[i].clone()
        } else if i == tokens && this.usage {
            this.answers.usage_event.clone()
        } else if i == tokens || (i == tokens + 1 && this.usage) {
            Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn with_type(mut r: Response<BoxBody>, content_type: &'static str) -> Response<BoxBody> {
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    r
}

async fn answer(answers: Arc<Answers>, body: Bytes) -> Response<BoxBody> {
    let options = &answers.options;
    if !options.first_token.is_zero() {
        tokio::time::sleep(options.first_token).await;
    }
    if options.error_rate > 0.0 && fastrand::f64() < options.error_rate {
        let mut r = Response::new(
            http_body_util::Full::new(Bytes::from_static(ERROR_BODY.as_bytes()))
                .map_err(|e: Infallible| match e {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return with_type(r, "application/json");
    }
    if memchr::memmem::find(&body, b"\"stream\":true").is_none() {
        let full = http_body_util::Full::new(answers.completion.clone())
            .map_err(|e: Infallible| match e {});
        return with_type(Response::new(full.boxed()), "application/json");
    }
    let usage = memchr::memmem::find(&body, b"\"include_usage\":true").is_some();
    let break_at = (options.break_rate > 0.0 && fastrand::f64() < options.break_rate)
        .then_some(answers.events.len() / 2);
    let events = Events {
        answers: Arc::clone(&answers),
        next: 0,
        usage,
        break_at,
        pause: None,
    };
    with_type(Response::new(events.boxed()), "text/event-stream")
}

/// Serves the mock on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, options: MockOptions) {
    let answers = Arc::new(Answers::new(options));
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answers = Arc::clone(&answers);
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answers = Arc::clone(&answers);
                async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, Infallible>(answer(answers, body).await)
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
