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
                for _ in 0..per_conn {
                    if !read_request(&mut s).await || s.write_all(answer.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// Reads one request of [`request`]'s shape (its body is the 2 bytes `{}`); false when the
/// connection closed first.
async fn read_request(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"{}") {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return false;
        }
        got.extend_from_slice(&buf[..n]);
    }
    true
}

/// Connections to the test backend on `port`, connecting within a second.
fn conns(port: u16, max_idle: usize, idle_for: Duration) -> Arc<Conns> {
    Arc::new(Conns::new(
        "127.0.0.1",
        port,
        max_idle,
        idle_for,
        Duration::from_secs(1),
        1,
    ))
}

fn request() -> Request<ChunksBody> {
    request_with(vec![Bytes::from_static(b"{}")])
}

/// A request whose body is `chunks`, sent as they are (one slice each).
fn request_with(chunks: Vec<Bytes>) -> Request<ChunksBody> {
    let len: usize = chunks.iter().map(Bytes::len).sum();
    let body = ChunksBody::new(Arc::from(chunks), len);
    let mut req = Request::new(body);
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/v1/chat/completions");
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("b"));
    req.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
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
async fn each_worker_keeps_its_own_idle_connections() {
    use crate::server::set_current_worker;
    let (port, accepted) = backend(SIZED, usize::MAX).await;
    // 3 idle connections shared out between 2 workers: 2 for worker 0, 1 for worker 1.
    let conns = Arc::new(Conns::new(
        "127.0.0.1",
        port,
        3,
        Duration::from_secs(30),
        Duration::from_secs(1),
        2,
    ));
    let finish_three = || async {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(on_new_connection(&conns).await);
        }
        for body in held {
            assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        }
    };
    set_current_worker(1);
    finish_three().await;
    assert_eq!(conns.idle(), 1);
    set_current_worker(0);
    assert!(
        conns.take().is_none(),
        "worker 0 took worker 1's connection"
    );
    finish_three().await;
    assert_eq!(conns.idle(), 3);
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    let taken: Vec<_> = std::iter::from_fn(|| conns.take()).collect();
    assert_eq!(taken.len(), 2);
    set_current_worker(1);
    assert!(conns.take().is_some());
    assert!(conns.take().is_none());
    set_current_worker(0);
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
        1,
    );
    assert!(conns.connect().await.is_err());
}

/// A backend that reads one request head (and at least `read` bytes), answers `answer` and keeps
/// the connection open until `close_after`, then drops it without reading more. Returns the port
/// and what it read.
async fn early_answer(
    answer: &'static str,
    read: usize,
    close_after: Duration,
) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = Vec::new();
        while got.len() < read || !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(answer.as_bytes()).await.unwrap();
        tokio::time::sleep(close_after).await;
        got
    });
    (port, task)
}

#[tokio::test]
async fn head_and_body_slices_go_out_as_one_request() {
    // More slices than one vectored write takes, some of them empty.
    let chunks: Vec<Bytes> = (0..40)
        .map(|i| {
            if i % 3 == 0 {
                Bytes::new()
            } else {
                Bytes::from(format!("[{i}]"))
            }
        })
        .collect();
    let body: Vec<u8> = chunks.concat();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let sent = [head.as_bytes(), &body].concat();
    let (port, task) = early_answer(SIZED, sent.len(), Duration::ZERO).await;
    let conns = conns(port, 4, Duration::from_secs(30));
    let mut conn = conns.connect().await.unwrap();
    let response = conn
        .send(request_with(chunks))
        .await
        .map_err(|e| e.error)
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(
        String::from_utf8(task.await.unwrap()).unwrap(),
        String::from_utf8(sent).unwrap()
    );
}

#[tokio::test]
async fn an_answer_sent_before_the_body_was_read_is_still_read() {
    let answer = "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!";
    let (port, _task) = early_answer(answer, 0, Duration::from_millis(50)).await;
    let conns = conns(port, 4, Duration::from_secs(30));
    let mut conn = conns.connect().await.unwrap();
    // Far more than the socket buffers hold: the write fails once the backend closes.
    let big = Bytes::from(vec![b'x'; 32 << 20]);
    let response = conn
        .send(request_with(vec![big]))
        .await
        .map_err(|e| e.error)
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    let body = H1Body::new(response.into_body(), conn, Arc::clone(&conns));
    assert_eq!(body.collect().await.unwrap().to_bytes(), "big!");
    assert_eq!(
        conns.idle(),
        0,
        "a connection whose request was cut is not reused"
    );
}

/// A backend that answers the first request on each connection with [`SIZED`] (keep-alive),
/// then reads the second one whole and closes the connection without answering, as a backend
/// closing an idle connection just as a request arrives does.
async fn closes_on_second_request() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                if read_request(&mut s).await {
                    s.write_all(SIZED.as_bytes()).await.unwrap();
                    read_request(&mut s).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_connection_closed_before_any_answer_gives_the_request_back() {
    let closing = conns(closes_on_second_request().await, 4, Duration::from_secs(30));
    assert_eq!(exchange(&closing).await, "hello");
    let mut parked = closing.take().expect("the answered connection is parked");
    let err = parked.send(request()).await.unwrap_err();
    assert!(err.sent);
    assert!(
        matches!(err.error, H1Error::Wire(WireError::Closed)),
        "{err:?}"
    );
    let again = err
        .request
        .expect("nothing was answered: the request comes back");
    assert_eq!(again.body().rest(), [Bytes::from_static(b"{}")]);
    // Once an answer has begun, a failure keeps the request: it may have been acted on.
    let (port, _task) = early_answer("HTTP/1.1 200 OK\r\ncontent-len", 0, Duration::ZERO).await;
    let mut conn = conns(port, 4, Duration::from_secs(30))
        .connect()
        .await
        .unwrap();
    let err = conn.send(request()).await.unwrap_err();
    assert!(err.sent && err.request.is_none(), "{err:?}");
}

#[tokio::test]
async fn interim_responses_past_the_bound_fail_the_exchange() {
    // `n` interim responses, then the answer (leaked: the test backend answers a `'static`).
    let after = |n: usize| -> &'static str {
        Box::leak(("HTTP/1.1 100 Continue\r\n\r\n".repeat(n) + SIZED).into_boxed_str())
    };
    let max = super::wire::MAX_INTERIM as usize;
    let at_bound = conns(backend(after(max), 1).await.0, 4, Duration::from_secs(30));
    assert_eq!(exchange(&at_bound).await, "hello");
    let past = conns(
        backend(after(max + 1), 1).await.0,
        4,
        Duration::from_secs(30),
    );
    let err = past
        .connect()
        .await
        .unwrap()
        .send(request())
        .await
        .unwrap_err();
    assert!(err.sent);
    assert!(
        matches!(err.error, H1Error::Wire(WireError::Interim)),
        "{err:?}"
    );
}
