use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A backend that answers every request on a connection with `answer`, counting
/// connections; closes a connection after `per_conn` answers.
async fn backend(answer: &'static str, per_conn: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                for _ in 0..per_conn {
                    let mut got = Vec::new();
                    // Requests here carry a 2-byte body after the head.
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"{}") {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// Connections to the test backend on `port`, connecting within a second.
fn conns(port: u16, max_idle: usize, idle_for: Duration) -> Arc<Conns> {
    Arc::new(Conns::new(
        "127.0.0.1",
        port,
        max_idle,
        idle_for,
        Duration::from_secs(1),
    ))
}

fn request() -> Request<ChunksBody> {
    let body = ChunksBody::new(Arc::from(vec![Bytes::from_static(b"{}")]), 2);
    let mut req = Request::new(body);
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/v1/chat/completions");
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("b"));
    req.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(2));
    req
}

async fn exchange(conns: &Arc<Conns>) -> Bytes {
    let mut conn = match conns.take() {
        Some(c) => c,
        None => conns.connect().await.unwrap(),
    };
    let response = conn.send(request()).await.map_err(|e| e.error).unwrap();
    let body = H1Body::new(response.into_body(), conn, Arc::clone(conns));
    body.collect().await.unwrap().to_bytes()
}

/// A request on a new connection: its response body, not yet read.
async fn on_new_connection(conns: &Arc<Conns>) -> H1Body {
    let mut conn = conns.connect().await.unwrap();
    let response = conn.send(request()).await.map_err(|e| e.error).unwrap();
    H1Body::new(response.into_body(), conn, Arc::clone(conns))
}

const SIZED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
const CHUNKED: &str =
    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";

#[tokio::test]
async fn a_body_read_to_its_end_gives_the_connection_back() {
    for (answer, expect) in [(SIZED, "hello"), (CHUNKED, "abcde")] {
        let (port, accepted) = backend(answer, usize::MAX).await;
        let conns = conns(port, 4, Duration::from_secs(30));
        for _ in 0..5 {
            assert_eq!(exchange(&conns).await, expect);
            assert_eq!(conns.idle(), 1, "{answer}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "{answer}");
    }
}

#[tokio::test]
async fn a_body_dropped_early_closes_the_connection() {
    let (port, accepted) = backend(CHUNKED, usize::MAX).await;
    let conns = conns(port, 4, Duration::from_secs(30));
    drop(on_new_connection(&conns).await);
    assert_eq!(conns.idle(), 0);
    assert_eq!(exchange(&conns).await, "abcde");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_taken() {
    // One answer per connection, then the backend closes it.
    let (port, accepted) = backend(SIZED, 1).await;
    let conns = conns(port, 4, Duration::from_secs(30));
    assert_eq!(exchange(&conns).await, "hello");
    // Parked, then closed by the backend: the sweep (or the next take) notices.
    let mut waited = 0;
    while conns.sweep() > 0 && waited < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    assert_eq!(conns.idle(), 0);
    assert!(conns.take().is_none());
    assert_eq!(exchange(&conns).await, "hello");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_expire_and_are_bounded() {
    let (port, _) = backend(SIZED, usize::MAX).await;
    let conns = conns(port, 2, Duration::from_millis(50));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(on_new_connection(&conns).await);
    }
    for body in held {
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }
    assert_eq!(conns.idle(), 2);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(conns.take().is_none());
    assert_eq!(conns.idle(), 0);
}

#[tokio::test]
async fn a_refused_connect_fails() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let conns = Conns::new(
        "127.0.0.1",
        port,
        2,
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    assert!(conns.connect().await.is_err());
}
