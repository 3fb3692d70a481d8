//! HTTP/1.1 connections to one backend endpoint, driven by the request that holds them.
//!
//! hyper's pooled client runs every connection in a task of its own and hands each response
//! chunk to the request's task across a one-slot channel: a task wake-up (often on the other
//! core) and a separate write to the client for every chunk. Here the request's own task polls
//! the connection: while it waits for the response head, then inside the response body before
//! each read of it. The chunks a backend wrote together are then read, passed through and
//! written to the client in one poll, and an exchange costs no task switch.
//!
//! HTTP/1.1 carries one exchange at a time, so a connection always has exactly one owner: the
//! request using it, or its endpoint's idle list. A body read to its end gives the connection
//! back; a body dropped before its end (the client went away) drops it, which closes the socket
//! and so stops the backend's work at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::pool::Pool;
use crate::stream::ChunksBody;
use tokio_util::sync::CancellationToken;

type Driver = http1::Connection<TokioIo<TcpStream>, ChunksBody>;

/// One open connection: the handle requests are sent on and the state machine that moves its
/// bytes. `driver` is `None` once the connection has ended.
pub struct Conn {
    sender: http1::SendRequest<ChunksBody>,
    driver: Option<Driver>,
}

impl Conn {
    /// Moves the connection's bytes as far as they go without waiting. Returns whether the
    /// connection is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(result) = Pin::new(driver).poll(cx) {
                if let Err(e) = result {
                    tracing::debug!("upstream connection ended: {e}");
                }
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Whether the connection is open and ready for its next request. Polls it once without a
    /// waker, which is how a close by the backend is noticed while nobody holds the connection.
    fn reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Sends `req` and drives the connection until the response head arrives. On failure the
    /// error carries the request back when none of it was written (the connection had closed
    /// before), so it may go out on another connection.
    pub async fn send(
        &mut self,
        req: Request<ChunksBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ChunksBody>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        std::future::poll_fn(|cx| {
            // An ended connection has answered or failed the request: `response` is ready then.
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// The idle connections of one endpoint, freshest last, and how new ones are made.
pub struct Conns {
    idle: Mutex<VecDeque<Parked>>,
    host: Box<str>,
    port: u16,
    max_idle: usize,
    idle_for: Duration,
    connect_for: Duration,
}

struct Parked {
    conn: Box<Conn>,
    since: Instant,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("idle", &self.idle())
            .finish()
    }
}

impl Conns {
    /// Connections to `host:port` (a name or an IP literal, without brackets), made within
    /// `connect_for`; at most `max_idle` are kept idle, each for at most `idle_for`.
    pub fn new(
        host: &str,
        port: u16,
        max_idle: usize,
        idle_for: Duration,
        connect_for: Duration,
    ) -> Conns {
        Conns {
            idle: Mutex::new(VecDeque::new()),
            host: host.into(),
            port,
            max_idle,
            idle_for,
            connect_for,
        }
    }

    /// The most recently parked connection that is still open and within its idle time, if any.
    /// Connections found closed or too old on the way are dropped.
    pub fn take(&self) -> Option<Box<Conn>> {
        let now = Instant::now();
        loop {
            let mut parked = self.lock().pop_back()?;
            if self.usable(&mut parked, now) {
                return Some(parked.conn);
            }
        }
    }

    /// Opens a new connection (no request is sent yet). Fails when the connect fails or takes
    /// longer than the endpoint's connect timeout.
    pub async fn connect(&self) -> std::io::Result<Box<Conn>> {
        let connect = TcpStream::connect((&*self.host, self.port));
        let stream = tokio::time::timeout(self.connect_for, connect)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        stream.set_nodelay(true)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        // Boxed once for its life: parking and taking it moves a pointer.
        Ok(Box::new(Conn {
            sender,
            driver: Some(driver),
        }))
    }

    /// Parks a connection whose exchange ended at `since` (the last byte of the response came
    /// then: the backend's keep-alive clock runs from about that moment, not from when the
    /// client finished reading), if it can carry another one; the oldest parked connection
    /// makes room when the list is full.
    fn put(&self, mut conn: Box<Conn>, since: Instant) {
        if self.max_idle == 0 || !conn.reusable() {
            return;
        }
        let parked = Parked { conn, since };
        let evicted = {
            let mut idle = self.lock();
            let evicted = if idle.len() >= self.max_idle {
                idle.pop_front()
            } else {
                None
            };
            idle.push_back(parked);
            evicted
        };
        // Closed outside the lock.
        drop(evicted);
    }

    /// Drops the parked connections that outlived the idle time or were closed by the backend;
    /// returns how many are left. Run periodically, so sockets the backend closed do not linger.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut closed = Vec::new();
        let left = {
            let mut idle = self.lock();
            let mut kept = VecDeque::with_capacity(idle.len());
            for mut parked in idle.drain(..) {
                if self.usable(&mut parked, now) {
                    kept.push_back(parked);
                } else {
                    closed.push(parked);
                }
            }
            *idle = kept;
            idle.len()
        };
        drop(closed);
        left
    }

    /// Whether a parked connection is within its idle time and still open.
    fn usable(&self, parked: &mut Parked, now: Instant) -> bool {
        now.duration_since(parked.since) < self.idle_for && parked.conn.reusable()
    }

    /// How long a connection may stay parked.
    pub fn idle_for(&self) -> Duration {
        self.idle_for
    }

    /// How many connections are parked.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked>> {
        // The list holds no invariant a panic elsewhere could break.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A response body read from a held connection, which it drives; the connection goes back to
/// its endpoint's idle list when the body was read to its end.
pub struct H1Body {
    body: Incoming,
    conn: Option<Box<Conn>>,
    home: Arc<Conns>,
    /// When the response's last byte came, once it did.
    ended: Option<Instant>,
}

impl H1Body {
    /// The body of a response received on `conn`, which returns to `home` after the body.
    pub fn new(body: Incoming, conn: Box<Conn>, home: Arc<Conns>) -> H1Body {
        let ended = body.is_end_stream().then(Instant::now);
        H1Body {
            body,
            conn: Some(conn),
            home,
            ended,
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn {
            // Reads what the backend sent (and finishes the exchange when that was its end);
            // a connection that ended fails or ends the body below.
            conn.drive(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => {
                this.ended.get_or_insert_with(Instant::now);
            }
            Poll::Ready(None) => {
                this.ended.get_or_insert_with(Instant::now);
            }
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended.is_some() || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // A body of known length is complete once its last byte came, and the server may stop
        // reading it there: it is done then too.
        if let (Some(conn), Some(ended)) = (self.conn.take(), self.ended) {
            self.home.put(conn, ended);
        }
    }
}

/// Sweeps the idle connections of every HTTP/1.1 endpoint of `pool` twice per idle time, until
/// `shutdown`; returns at once when the pool has none.
pub async fn sweep(pool: Arc<Pool>, shutdown: CancellationToken) {
    let conns: Vec<&Arc<Conns>> = pool
        .endpoints
        .iter()
        .filter_map(|e| e.conns.as_ref())
        .collect();
    let Some(period) = conns.iter().map(|c| c.idle_for / 2).min() else {
        return;
    };
    let mut ticker = tokio::time::interval(period.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for c in &conns {
            c.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
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
        let response = conn
            .send(request())
            .await
            .map_err(|e| e.into_error())
            .unwrap();
        let body = H1Body::new(response.into_body(), conn, Arc::clone(conns));
        body.collect().await.unwrap().to_bytes()
    }

    /// A request on a new connection: its response body, not yet read.
    async fn on_new_connection(conns: &Arc<Conns>) -> H1Body {
        let mut conn = conns.connect().await.unwrap();
        let response = conn
            .send(request())
            .await
            .map_err(|e| e.into_error())
            .unwrap();
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
}
