//! Bounds against slow or greedy clients: header timeout, header size, connection cap, idle
//! connections, and graceful shutdown with a stream in flight.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use support::backend::Backend;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn edge_with(extra: &str) -> (TestEdge, Backend) {
    let backend = Backend::start().await;
    let edge = TestEdge::start(&[backend.url()], extra).await;
    (edge, backend)
}

/// Reads until EOF or error; returns what was read and whether the peer closed within `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(within, s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn a_slow_head_is_cut_off_while_others_are_served() {
    let (edge, _backend) = edge_with("[timeouts]\nclient_header = \"300ms\"\n").await;
    let mut slow = TcpStream::connect(edge.addr).await.unwrap();
    let dribble = tokio::spawn(async move {
        for b in b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\n".iter() {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(3)).await;
        closed
    });
    // Others are served meanwhile.
    for _ in 0..5 {
        let a = send(
            edge.addr,
            Method::GET,
            "open.arkor.app",
            "/v1/models",
            &[],
            "",
        )
        .await;
        assert_eq!(a.status, 200);
    }
    assert!(dribble.await.unwrap(), "the slow client was never cut off");
    edge.stop().await;
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let (edge, _backend) = edge_with("[limits]\nmax_header_bytes = 8192\n").await;
    let big = "a".repeat(10_000);
    let req = format!("GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\nx-big: {big}\r\n\r\n");
    let out = raw(edge.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    edge.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let (edge, _backend) = edge_with("[limits]\nmax_connections = 3\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(edge.addr).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut extra = TcpStream::connect(edge.addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\n\r\n")
        .await;
    let (out, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(
        closed && out.is_empty(),
        "a 4th connection was served: {out:?}"
    );
    // Freeing a slot lets a new connection in.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        let out = raw(
            edge.addr,
            b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\nconnection: close\r\n\r\n",
            Duration::from_secs(1),
        )
        .await;
        if out.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served);
    edge.stop().await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_busy_ones_are_not() {
    let (edge, backend) = edge_with("[timeouts]\nclient_idle = \"400ms\"\n").await;
    let h2 = |addr| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        (sender, tokio::spawn(conn))
    };
    // Idle: closed by the edge.
    let (_idle, idle_conn) = h2(edge.addr).await;
    let ended = tokio::time::timeout(Duration::from_secs(3), idle_conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");

    // Busy with a stream that is silent longer than client_idle: kept.
    let (mut busy, busy_conn) = h2(edge.addr).await;
    let req = Request::post("http://keyed.arkor.app/v1/chat/completions")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "gated")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = busy.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !busy_conn.is_finished(),
        "a connection with a stream in flight was closed"
    );
    backend.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    edge.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_a_stream_finish() {
    let (mut edge, backend) = edge_with("").await;
    let req = Request::post(format!("http://{}/v1/chat/completions", edge.addr))
        .header("host", "keyed.arkor.app")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "gated")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();

    let running = edge.running.take().unwrap();
    let stopping = tokio::spawn(running.shutdown());
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(edge.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after shutdown started");
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for the stream"
    );
    backend.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(
        rest.ends_with(b"data: [DONE]\n\n"),
        "the stream was cut: {rest:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown finished once the stream did")
        .unwrap();
}

#[tokio::test]
async fn shutdown_grace_bounds_the_wait() {
    let (mut edge, backend) = edge_with("[timeouts]\nshutdown_grace = \"300ms\"\n").await;
    let req = Request::post(format!("http://{}/v1/chat/completions", edge.addr))
        .header("host", "keyed.arkor.app")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "endless")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    edge.running.take().unwrap().shutdown().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with an endless stream"
    );
    // The stream still open at the end of the grace was closed, upstream too.
    let rest = tokio::time::timeout(Duration::from_secs(3), body.collect()).await;
    assert!(
        rest.is_ok(),
        "the client's stream stayed open after shutdown"
    );
    assert!(
        backend
            .wait_event("closed:endless", Duration::from_secs(3))
            .await
    );
}
