//! Proxying `POST /v1/chat/completions`: pinning, body limits, streaming, cancellation and
//! upstream failures, against real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use support::backend::Backend;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn edge_with(extra: &str) -> (TestEdge, Backend) {
    let backend = Backend::start().await;
    let edge = TestEdge::start(&[backend.url()], extra).await;
    (edge, backend)
}

async fn post_keyed(edge: &TestEdge, extra: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
    let auth = bearer(KEYED_KEY);
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(extra);
    send(
        edge.addr,
        Method::POST,
        "keyed.arkor.app",
        "/v1/chat/completions",
        &h,
        body,
    )
    .await
}

#[tokio::test]
async fn the_backend_only_ever_sees_the_pinned_model() {
    let (edge, backend) = edge_with("").await;
    let attacks = [
        r#"{"model":"job-2","messages":[]}"#,
        r#"{"messages":[],"model":"job-2"}"#,
        r#"{"messages":[]}"#,
        r#"{"model":"job-2","model":"job-3","messages":[]}"#,
        r#"{"m\u006fdel":"job-2","messages":[]}"#,
        r#"{"model":{"id":"job-2"},"messages":[]}"#,
        r#"{"model":["job-2"],"messages":[],"model":null}"#,
        r#"{"messages":[{"role":"user","content":"{\"model\":\"job-2\"}"}],"extra":{"model":"job-2"}}"#,
    ];
    for (i, body) in attacks.iter().enumerate() {
        let a = post_keyed(&edge, &[], *body).await;
        assert_eq!(a.status, 200, "{body}: {}", a.text());
        let seen = &backend.seen()[i];
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(seen.headers["content-type"], "application/json");
        // Exactly one top-level model, the pinned one, whichever way the backend reads it.
        let text = std::str::from_utf8(&seen.body).unwrap();
        assert_eq!(seen.json()["model"], KEYED_MODEL, "{body} -> {text}");
        assert_eq!(
            text.matches(r#""model":"job-1:step-7""#).count(),
            1,
            "{text}"
        );
        assert!(!text.starts_with(r#"{"model":"job-1:step-7","model""#));
        let top: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).unwrap();
        assert_eq!(top.keys().filter(|k| *k == "model").count(), 1);
        // And the backend's answer names it.
        assert_eq!(a.json()["model"], KEYED_MODEL);
    }
    // Every other byte is the client's: the nested look-alike survives untouched.
    let last = backend.seen().last().unwrap().body.clone();
    assert_eq!(
        &last[..],
        br#"{"model":"job-1:step-7","messages":[{"role":"user","content":"{\"model\":\"job-2\"}"}],"extra":{"model":"job-2"}}"#
    );
    edge.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_json_objects_are_400_and_never_forwarded() {
    let (edge, backend) = edge_with("").await;
    for body in [
        "",
        "not json",
        "[]",
        r#"{"model":"x",}"#,
        r#"{"Model":"job-2","messages":[]}"#,
        r#"{"model\u0000":"job-2"}"#,
        "{\"a\":NaN}",
        "\u{feff}{}",
        r#"{"a":1}{"model":"job-2"}"#,
    ] {
        let a = post_keyed(&edge, &[], body).await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (400, "invalid_body"),
            "{body:?}"
        );
        assert_eq!(a.headers["x-should-retry"], "false");
    }
    assert!(backend.seen().is_empty());
    edge.stop().await;
}

#[tokio::test]
async fn chunked_request_bodies_are_pinned_too() {
    let (edge, backend) = edge_with("").await;
    let body = r#"{"model":"job-2","messages":[{"role":"user","content":"hi"}]}"#;
    let (a, b) = body.split_at(20);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: keyed.arkor.app\r\nauthorization: Bearer {KEYED_KEY}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let out = raw(edge.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        &backend.seen()[0].body[..],
        br#"{"model":"job-1:step-7","messages":[{"role":"user","content":"hi"}]}"#
    );
    edge.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413_without_reading_them() {
    let (edge, backend) = edge_with("[limits]\nmax_body_bytes = 1024\n").await;
    // Declared too large, body never sent: answered at once, so nothing waited for the body.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: keyed.arkor.app\r\nauthorization: Bearer {KEYED_KEY}\r\n\
         content-length: 10000000\r\n\r\n{{\"mo"
    );
    let out = raw(edge.addr, head.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("body_too_large"));
    assert!(out.contains("x-should-retry: false"));

    // Chunked, past the limit: refused once it passes the limit, the rest never sent.
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: keyed.arkor.app\r\nauthorization: Bearer {KEYED_KEY}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("800\r\n{}\r\n", "a".repeat(0x800));
    s.write_all(chunk.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("413 without the rest of the body")
        .unwrap();
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");

    // Exactly at the limit is fine.
    let body = format!(r#"{{"messages":[],"pad":"{}"}}"#, "p".repeat(1024 - 24));
    assert_eq!(body.len(), 1024);
    let a = post_keyed(&edge, &[], body.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(backend.seen().len(), 1);
    // One byte more is not.
    let a = post_keyed(&edge, &[], format!("{body} ")).await;
    assert_eq!(a.status, 413);
    assert_eq!(backend.seen().len(), 1);
    edge.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_its_body_gets_408() {
    let (edge, backend) = edge_with("[timeouts]\nclient_body = \"200ms\"\n").await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: keyed.arkor.app\r\nauthorization: Bearer {KEYED_KEY}\r\n\
         content-length: 100\r\n\r\n{{\"mo"
    );
    let out = raw(edge.addr, head.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(backend.seen().is_empty());
    edge.stop().await;
}

#[tokio::test]
async fn streams_pass_each_chunk_as_it_arrives() {
    let (edge, backend) = edge_with("").await;
    let req = Request::post(format!("http://{}/v1/chat/completions", edge.addr))
        .header("host", "keyed.arkor.app")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "gated")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert!(resp.headers().get("content-encoding").is_none());
    let mut body = resp.into_body();
    // The backend holds its second event until the gate opens; the first must already be here.
    let first = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .expect("first chunk forwarded before the stream ended")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    backend.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"), "{rest:?}");
    edge.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_stream() {
    let (edge, backend) = edge_with("").await;
    let req = Request::post(format!("http://{}/v1/chat/completions", edge.addr))
        .header("host", "keyed.arkor.app")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "endless")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert!(backend.events().is_empty());
    drop(body);
    assert!(
        backend
            .wait_event("closed:endless", Duration::from_secs(3))
            .await,
        "the backend kept streaming after the client left: {:?}",
        backend.events()
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_before_the_head_cancels_too() {
    let (edge, backend) = edge_with("").await;
    let body = chat("x", false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: keyed.arkor.app\r\nauthorization: Bearer {KEYED_KEY}\r\n\
         x-mock: hang\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    for _ in 0..100 {
        if !backend.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(backend.seen().len(), 1);
    drop(s);
    assert!(
        backend
            .wait_event("closed:hang", Duration::from_secs(3))
            .await,
        "the backend kept working after the client left"
    );
    edge.stop().await;
}

#[tokio::test]
async fn backend_errors_pass_through_with_hop_by_hop_headers_dropped() {
    let (edge, _backend) = edge_with("").await;
    for status in [400u16, 429, 500, 503] {
        let code = format!("status:{status}");
        let a = post_keyed(&edge, &[("x-mock", &code)], chat("x", false)).await;
        assert_eq!(a.status.as_u16(), status);
        assert_eq!(a.json()["error"]["code"], "backend_code");
        assert_eq!(a.headers["x-backend"], "yes");
        assert!(
            a.headers.get("x-hop").is_none(),
            "connection-listed header passed"
        );
        assert!(a.headers.get("keep-alive").is_none());
    }
    edge.stop().await;
}

#[tokio::test]
async fn a_broken_stream_ends_with_an_error_event() {
    let (edge, _backend) = edge_with("").await;
    let a = post_keyed(&edge, &[("x-mock", "break")], chat("x", true)).await;
    assert_eq!(a.status, 200);
    let text = a.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{text}");
    let last: serde_json::Value =
        serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error");
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!text.contains("[DONE]"));
    edge.stop().await;
}

#[tokio::test]
async fn a_silent_stream_ends_with_an_error_event() {
    let (edge, _backend) = edge_with("[timeouts]\nupstream_idle = \"200ms\"\n").await;
    let a = post_keyed(&edge, &[("x-mock", "silent")], chat("x", true)).await;
    let text = a.text();
    assert!(text.ends_with("\n\n"));
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let v: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
    edge.stop().await;
}

#[tokio::test]
async fn no_response_head_in_time_is_504() {
    let (edge, backend) = edge_with("[timeouts]\nupstream_first_byte = \"300ms\"\n").await;
    let a = post_keyed(&edge, &[("x-mock", "hang")], chat("x", false)).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (504, "upstream_timeout")
    );
    assert_eq!(a.json()["error"]["type"], "server_error");
    assert!(
        backend
            .wait_event("closed:hang", Duration::from_secs(3))
            .await
    );
    edge.stop().await;
}

/// An address nothing listens on.
async fn dead_endpoint() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test]
async fn refused_connections_are_retried_on_another_endpoint() {
    let backend = Backend::start().await;
    let dead = dead_endpoint().await;
    let edge = TestEdge::start(&[dead.clone(), backend.url()], "").await;
    for _ in 0..4 {
        let a = post_keyed(&edge, &[], chat("x", false)).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(
        backend.seen().len(),
        4,
        "each request reached the live backend exactly once"
    );
    edge.stop().await;

    let edge = TestEdge::start(&[dead.clone(), dead_endpoint().await], "").await;
    let a = post_keyed(&edge, &[], chat("x", false)).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (503, "upstream_unavailable")
    );
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.headers["retry-after-ms"], "1000");
    edge.stop().await;
}

#[tokio::test]
async fn a_model_no_pool_serves_is_503() {
    let (edge, backend) = edge_with("").await;
    let a = post_chat(edge.addr, "nopool.arkor.app", &[]).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (503, "upstream_unavailable")
    );
    assert!(backend.seen().is_empty());
    edge.stop().await;
}

#[tokio::test]
async fn hop_by_hop_and_forwarding_headers_are_rewritten() {
    let (edge, backend) = edge_with("").await;
    let a = post_keyed(
        &edge,
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-forwarded-for", "6.6.6.6"),
            ("cookie", "s=1"),
            ("x-stainless-os", "Linux"),
        ],
        chat("x", false),
    )
    .await;
    assert_eq!(a.status, 200);
    let h = &backend.seen()[0].headers;
    assert!(h.get("x-secret").is_none());
    assert!(h.get("cookie").is_none());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-stainless-os"], "Linux");
    assert_eq!(h["accept-encoding"], "identity");
    edge.stop().await;
}

#[tokio::test]
async fn http2_clients_and_h2c_backends() {
    let backend = Backend::start_h2c().await;
    let edge = TestEdge::start(&[format!("h2c://{}", backend.addr)], "").await;
    let tcp = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // :authority names the deployment; a conflicting host header loses.
    let req = Request::post("http://keyed.arkor.app/v1/chat/completions")
        .header("host", "nope.arkor.app")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "stream:5")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("data: ").count(), 6, "{text}");
    assert_eq!(backend.seen()[0].json()["model"], KEYED_MODEL);
    edge.stop().await;
}

#[tokio::test]
async fn an_http2_stream_reset_cancels_the_upstream_stream() {
    let (edge, backend) = edge_with("").await;
    let tcp = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::post("http://keyed.arkor.app/v1/chat/completions")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "endless")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    // Dropping the body resets the stream; the connection itself stays open.
    drop(body);
    assert!(
        backend
            .wait_event("closed:endless", Duration::from_secs(3))
            .await,
        "the backend kept streaming after the client reset the stream"
    );
    // The connection still serves other requests.
    let req = Request::get("http://keyed.arkor.app/v1/models")
        .header("authorization", bearer(KEYED_KEY))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    edge.stop().await;
}

#[tokio::test]
async fn the_builtin_echo_streams_the_last_user_message() {
    let edge = TestEdge::start(&["http://127.0.0.1:9".to_owned()], "").await;
    let body = r#"{"model":"x","stream":true,"stream_options":{"include_usage":true},
        "messages":[{"role":"user","content":"one two three"}]}"#;
    let a = send(
        edge.addr,
        Method::POST,
        "echo.arkor.app",
        "/v1/chat/completions",
        &[],
        body,
    )
    .await;
    assert_eq!(a.status, 200);
    let text = a.text();
    let mut content = String::new();
    let mut usage = None;
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["model"], "demo/echo");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(content, "one two three");
    assert_eq!(usage.unwrap()["completion_tokens"], 3);
    assert!(text.ends_with("data: [DONE]\n\n"));
    edge.stop().await;
}

#[tokio::test]
async fn the_pool_sends_its_own_credential_never_the_clients() {
    let backend = Backend::start().await;
    let edge = TestEdge::start_pool(&[backend.url()], "api_key = \"backend-secret\"", "").await;
    let a = post_keyed(&edge, &[], chat("x", false)).await;
    assert_eq!(a.status, 200);
    let a = post_chat(
        edge.addr,
        "open.arkor.app",
        &[("authorization", "Bearer client-value")],
    )
    .await;
    assert_eq!(a.status, 200);
    for seen in backend.seen() {
        assert_eq!(seen.headers["authorization"], "Bearer backend-secret");
    }
    edge.stop().await;
}

/// A backend that answers one streamed chat completion with all of `events` written at once,
/// each event its own chunk (as OpenAI-compatible servers send them when asked for usage).
async fn burst_backend(events: &'static [&'static str]) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // The request head, then its body by Content-Length.
        let body_len = loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the edge closed before its request was whole");
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap();
                break end + 4 + len;
            }
        };
        while req.len() < body_len {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            req.extend_from_slice(&buf[..n]);
        }
        let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        for event in events {
            wire.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        s.write_all(&wire).await.unwrap();
        // Held open: the edge may keep the connection for its next request.
        let _ = s.read(&mut buf).await;
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_burst_of_chunks_goes_on_whole_with_the_usage_chunk_counted_and_cut() {
    const CONTENT: [&str; 3] = [
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    ];
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";
    static EVENTS: [&str; 5] = [CONTENT[0], CONTENT[1], CONTENT[2], USAGE, DONE];
    let backend = burst_backend(&EVENTS).await;
    let edge = TestEdge::start(&[backend], "").await;
    // The client did not ask for usage: the edge asked for it, counts it and cuts its chunk.
    let a = post_keyed(&edge, &[], chat("x", true)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.text(), [CONTENT.concat().as_str(), DONE].concat());
    let mut text = String::new();
    for _ in 0..100 {
        text = edge.admin(Method::GET, "/metrics", None, "").await.text();
        if text.contains("arkor_edge_usage_tokens_total{kind=\"completion\"} 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        text.contains("arkor_edge_usage_tokens_total{kind=\"prompt\"} 7")
            && text.contains("arkor_edge_usage_tokens_total{kind=\"completion\"} 2"),
        "{text}"
    );
    edge.stop().await;
}
