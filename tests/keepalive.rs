//! Idle HTTP/1.1 keep-alive connections are parked (no buffers held) and served again when the
//! client speaks; the idle timeout, a client's close and a request arriving in pieces all work
//! across parking; within `limits.warm_connections`, an idle connection that has carried more
//! than one request keeps its buffers for a second first. One test in its own binary, so the
//! parked-connections gauge is this edge's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use http::Method;
use support::backend::Backend;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODELS: &[u8] = b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\n\r\n";

/// Longer than the edge's short parking delay (10 ms) plus its timer's slack.
const PARKED_BY: Duration = Duration::from_millis(700);

/// Longer than the edge's parking delay for warm connections (1 s) plus its timer's slack.
const WARM_PARKED_BY: Duration = Duration::from_millis(1800);

/// A raw HTTP/1.1 client connection that reads responses one at a time.
struct Raw {
    s: TcpStream,
    got: Vec<u8>,
}

impl Raw {
    async fn connect(edge: &TestEdge) -> Raw {
        Raw {
            s: TcpStream::connect(edge.addr).await.unwrap(),
            got: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed inside a response: {:?}", self.got);
        self.got.extend_from_slice(&buf[..n]);
    }

    /// Sends `GET /v1/models` and reads its 200 response.
    async fn models_ok(&mut self) {
        self.send(MODELS).await;
        assert_eq!(self.response().await, "http/1.1 200 ok");
    }

    /// A connection that has carried two requests (a reused one, which may stay warm).
    async fn reused(edge: &TestEdge) -> Raw {
        let mut s = Raw::connect(edge).await;
        s.models_ok().await;
        s.models_ok().await;
        s
    }

    /// Reads one response (head and a `content-length` body); returns its status line.
    async fn response(&mut self) -> String {
        let head_end = loop {
            if let Some(i) = self.got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8_lossy(&self.got[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a content-length")
            .trim()
            .parse()
            .unwrap();
        while self.got.len() < head_end + len {
            self.fill().await;
        }
        self.got.drain(..head_end + len);
        head.lines().next().unwrap().to_owned()
    }

    /// Waits for the edge to close the connection; whether it did within `within` with no
    /// byte left unread.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(within, self.s.read_to_end(&mut rest)).await;
        closed.is_ok() && rest.is_empty() && self.got.is_empty()
    }
}

async fn parked(edge: &TestEdge) -> f64 {
    let text = edge.admin(Method::GET, "/metrics", None, "").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix("arkor_edge_parked_connections "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn idle_connections_are_parked_and_served_again() {
    let backend = Backend::start().await;

    // One warm connection. A connection with one request is parked after 10 ms; once it has
    // carried a second, it keeps its buffers for a second. Another, over the budget, is parked
    // after 10 ms. Parked and closed connections leave the budget: a third is warm again, then
    // parked after its second.
    let edge = TestEdge::start(&[backend.url()], "[limits]\nwarm_connections = 1\n").await;
    let mut first = Raw::connect(&edge).await;
    first.models_ok().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(parked(&edge).await, 1.0);
    first.models_ok().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(parked(&edge).await, 0.0);
    let over = Raw::reused(&edge).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(parked(&edge).await, 1.0);
    drop(first);
    let mut third = Raw::reused(&edge).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(parked(&edge).await, 1.0);
    tokio::time::sleep(WARM_PARKED_BY).await;
    assert_eq!(parked(&edge).await, 2.0);
    third.models_ok().await;
    assert_eq!(parked(&edge).await, 1.0);
    drop((third, over));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(parked(&edge).await, 0.0);
    edge.stop().await;

    // No warm connections: idle ones are parked after 10 ms.
    let edge = TestEdge::start(
        &[backend.url()],
        "[limits]\nwarm_connections = 0\n[timeouts]\nclient_idle = \"2s\"\n",
    )
    .await;
    let mut s = Raw::connect(&edge).await;
    s.models_ok().await;

    // Idle: parked, and the next request on the same socket is served.
    tokio::time::sleep(PARKED_BY).await;
    assert_eq!(parked(&edge).await, 1.0);
    s.models_ok().await;
    assert_eq!(parked(&edge).await, 0.0);

    // A head that is half sent when the connection parks is completed and served.
    s.send(&MODELS[..20]).await;
    tokio::time::sleep(PARKED_BY).await;
    s.send(&MODELS[20..]).await;
    assert_eq!(s.response().await, "http/1.1 200 ok");

    // Pipelined requests after a park: both answered, in order.
    tokio::time::sleep(PARKED_BY).await;
    s.send(&[MODELS, MODELS].concat()).await;
    assert_eq!(s.response().await, "http/1.1 200 ok");
    assert_eq!(s.response().await, "http/1.1 200 ok");

    // A client closing a parked connection ends it.
    let mut other = Raw::connect(&edge).await;
    other.models_ok().await;
    tokio::time::sleep(PARKED_BY).await;
    assert_eq!(parked(&edge).await, 2.0);
    drop(other);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(parked(&edge).await, 1.0);

    // The idle timeout still closes a parked connection.
    assert!(
        s.closed_within(Duration::from_secs(4)).await,
        "an idle connection was kept past client_idle"
    );
    assert_eq!(parked(&edge).await, 0.0);
    edge.stop().await;

    // A client_idle shorter than the warm delay still closes a warm connection in time.
    let edge = TestEdge::start(&[backend.url()], "[timeouts]\nclient_idle = \"300ms\"\n").await;
    let mut s = Raw::reused(&edge).await;
    assert!(
        s.closed_within(Duration::from_millis(800)).await,
        "a warm connection was kept past client_idle"
    );
    edge.stop().await;
}
