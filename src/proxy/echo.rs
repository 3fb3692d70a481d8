//! `builtin:echo`: an in-process OpenAI chat completion backend that answers with the last user
//! message, word by word, so the edge can be tried and tested without a GPU.
//!
//! It behaves like a real backend behind the edge: it reads the (pinned) body the edge would
//! send upstream, reports the `model` it received, honours `stream`,
//! `stream_options.include_usage` and `max_tokens` / `max_completion_tokens`, and counts a
//! "token" per whitespace-separated word. A streamed answer is rendered one event at a time, so
//! its memory does not grow with the answer.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use serde_json::{Value, json};
use tokio::time::Sleep;

/// Longest answer in words when the request sets no limit.
pub const DEFAULT_MAX_WORDS: usize = 1024;
/// Longest answer in words whatever the request asks.
pub const MAX_WORDS: usize = 16_384;

/// Answers one chat completion request body.
pub fn respond(body: &[u8], word_delay: Option<Duration>) -> Response<EchoBody> {
    match Request::parse(body) {
        Ok(req) if req.stream => stream_response(req, word_delay),
        Ok(req) => whole_response(req),
        Err(message) => {
            let body = json!({"error": {"message": message, "type": "invalid_request_error",
                "param": null, "code": null}});
            let mut r = Response::new(EchoBody::once(Bytes::from(body.to_string())));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
    }
}

/// What the echo needs from a request.
struct Request {
    model: String,
    stream: bool,
    include_usage: bool,
    answer: String,
    prompt_tokens: usize,
    max_words: usize,
}

impl Request {
    fn parse(body: &[u8]) -> Result<Request, &'static str> {
        let v: Value = serde_json::from_slice(body).map_err(|_| "The body is not valid JSON.")?;
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .ok_or("'model' is a required property")?
            .to_owned();
        let messages = v
            .get("messages")
            .and_then(Value::as_array)
            .filter(|m| !m.is_empty())
            .ok_or("'messages' must be a non-empty array")?;
        let mut prompt_tokens = 0;
        let mut answer = String::new();
        for m in messages {
            let text = content_text(m.get("content"));
            prompt_tokens += text.split_whitespace().count();
            if m.get("role").and_then(Value::as_str) == Some("user") {
                answer = text;
            }
        }
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let limit = v
            .get("max_completion_tokens")
            .or_else(|| v.get("max_tokens"))
            .and_then(Value::as_u64);
        let max_words = limit.map_or(DEFAULT_MAX_WORDS, |n| (n as usize).min(MAX_WORDS));
        Ok(Request {
            model,
            stream,
            include_usage,
            answer,
            prompt_tokens,
            max_words,
        })
    }
}

/// The text of a message's `content`: a string, or the `text` of its text parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("chatcmpl-echo-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn whole_response(req: Request) -> Response<EchoBody> {
    let words: Vec<&str> = req.answer.split_whitespace().collect();
    let n = words.len().min(req.max_words);
    let finish = if n < words.len() { "length" } else { "stop" };
    let body = json!({
        "id": completion_id(), "object": "chat.completion", "created": now(), "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": words[..n].join(" ")},
            "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": n,
            "total_tokens": req.prompt_tokens + n},
    });
    let mut r = Response::new(EchoBody::once(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn stream_response(req: Request, word_delay: Option<Duration>) -> Response<EchoBody> {
    let events = Events {
        id: completion_id(),
        created: now(),
        model: Value::from(req.model.as_str()).to_string(),
        answer: req.answer,
        pos: 0,
        sent: 0,
        max_words: req.max_words,
        prompt_tokens: req.prompt_tokens,
        include_usage: req.include_usage,
        stage: Stage::Role,
    };
    let mut r = Response::new(EchoBody {
        source: Source::Stream(Box::new(events)),
        word_delay,
        sleep: None,
    });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Role,
    Words,
    Finish,
    Usage,
    Done,
    End,
}

/// Renders a stream's events one at a time.
struct Events {
    id: String,
    created: u64,
    /// The model as a JSON string literal.
    model: String,
    answer: String,
    pos: usize,
    sent: usize,
    max_words: usize,
    prompt_tokens: usize,
    include_usage: bool,
    stage: Stage,
}

impl Events {
    fn chunk(&self, choices: &str, usage: &str) -> Bytes {
        Bytes::from(format!(
            "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"choices\":[{}]{}}}\n\n",
            self.id, self.created, self.model, choices, usage
        ))
    }

    fn next_word(&mut self) -> Option<(usize, usize)> {
        let rest = &self.answer[self.pos..];
        let start = self.pos + (rest.len() - rest.trim_start().len());
        if start >= self.answer.len() {
            return None;
        }
        let len = self.answer[start..]
            .find(char::is_whitespace)
            .unwrap_or(self.answer.len() - start);
        self.pos = start + len;
        Some((start, start + len))
    }

    /// The next event, or `None` after `[DONE]`. `more` says whether a word was just sent
    /// (the caller paces words, not the frame around them).
    fn next(&mut self) -> Option<(Bytes, bool)> {
        loop {
            match self.stage {
                Stage::Role => {
                    self.stage = Stage::Words;
                    let c = r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#;
                    return Some((self.chunk(c, ""), false));
                }
                Stage::Words => {
                    if self.sent < self.max_words {
                        if let Some((s, e)) = self.next_word() {
                            let lead = if self.sent == 0 { "" } else { " " };
                            let text = Value::from(format!("{lead}{}", &self.answer[s..e]));
                            self.sent += 1;
                            let c = format!(
                                r#"{{"index":0,"delta":{{"content":{text}}},"logprobs":null,"finish_reason":null}}"#
                            );
                            return Some((self.chunk(&c, ""), true));
                        }
                    }
                    self.stage = Stage::Finish;
                }
                Stage::Finish => {
                    self.stage = Stage::Usage;
                    let truncated = self.sent == self.max_words && self.next_word().is_some();
                    let reason = if truncated { "length" } else { "stop" };
                    let c = format!(
                        r#"{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}"#
                    );
                    return Some((self.chunk(&c, ""), false));
                }
                Stage::Usage => {
                    self.stage = Stage::Done;
                    if self.include_usage {
                        let u = format!(
                            r#","usage":{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
                            self.prompt_tokens,
                            self.sent,
                            self.prompt_tokens + self.sent
                        );
                        return Some((self.chunk("", &u), false));
                    }
                }
                Stage::Done => {
                    self.stage = Stage::End;
                    return Some((Bytes::from_static(b"data: [DONE]\n\n"), false));
                }
                Stage::End => return None,
            }
        }
    }
}

enum Source {
    Once(Option<Bytes>),
    Stream(Box<Events>),
}

/// The echo's response body.
pub struct EchoBody {
    source: Source,
    word_delay: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl EchoBody {
    fn once(bytes: Bytes) -> EchoBody {
        EchoBody {
            source: Source::Once(Some(bytes)),
            word_delay: None,
            sleep: None,
        }
    }

    /// Next frame; never fails.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        match &mut self.source {
            Source::Once(bytes) => Poll::Ready(bytes.take().map(Frame::data)),
            Source::Stream(events) => Poll::Ready(events.next().map(|(bytes, word)| {
                if let (true, Some(d)) = (word, self.word_delay) {
                    self.sleep = Some(Box::pin(tokio::time::sleep(d)));
                }
                Frame::data(bytes)
            })),
        }
    }

    /// Whether the body has nothing more to send.
    pub fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Once(b) => b.is_none(),
            Source::Stream(e) => e.stage == Stage::End,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn collect(mut body: EchoBody) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(f) = poll_fn(|cx| body.poll_frame(cx)).await {
            out.push(f.into_data().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn answers_whole_with_usage() {
        let r = respond(
            br#"{"model":"m1","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello  there world"}]}"#,
            None,
        );
        assert_eq!(r.status(), 200);
        let frames = collect(r.into_body()).await;
        let v: Value = serde_json::from_slice(&frames[0]).unwrap();
        assert_eq!(v["model"], "m1");
        assert_eq!(v["choices"][0]["message"]["content"], "hello there world");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }

    #[tokio::test]
    async fn streams_word_by_word_with_optional_usage() {
        let body = br#"{"model":"m1","stream":true,"stream_options":{"include_usage":true},
            "messages":[{"role":"user","content":[{"type":"text","text":"one two"},{"type":"text","text":"three"}]}]}"#;
        let frames = collect(respond(body, None).into_body()).await;
        // role, 3 words, finish, usage, [DONE]
        assert_eq!(frames.len(), 7);
        let words: String = frames[1..4]
            .iter()
            .map(|f| {
                let v: Value = serde_json::from_slice(&f[6..]).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(words, "one two three");
        let usage: Value = serde_json::from_slice(&frames[5][6..]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(&frames[6][..], b"data: [DONE]\n\n");
    }

    #[tokio::test]
    async fn honours_max_tokens() {
        let body = br#"{"model":"m","stream":true,"max_tokens":2,"messages":[{"role":"user","content":"a b c d"}]}"#;
        let frames = collect(respond(body, None).into_body()).await;
        assert_eq!(frames.len(), 5);
        let fin: Value = serde_json::from_slice(&frames[3][6..]).unwrap();
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
    }

    #[tokio::test]
    async fn refuses_a_body_without_messages() {
        let r = respond(br#"{"model":"m"}"#, None);
        assert_eq!(r.status(), 400);
    }
}
