//! The data listeners: accept loop, connection cap, TLS handshake, HTTP/1.1 and HTTP/2 via
//! hyper-util's `auto::Builder`, and graceful shutdown.
//!
//! A connection slot is taken before anything else is done for a connection; when none is free
//! the socket is closed at once, which costs the edge almost nothing. The TLS handshake runs in
//! the connection's own task under `tls.handshake_timeout`, so a slow handshake holds one slot
//! and nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::router::{self, ConnInfo, Edge};
use crate::tls::normalise_sni;

/// HTTP/2 streams one client connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// HTTP/2 flow-control windows: what one stream, and one connection, may make the edge buffer
/// from a client before it must stop sending.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Most response bytes queued per HTTP/2 stream for a slow reader.
pub const H2_SEND_BUFFER: usize = 256 * 1024;

/// Listener settings taken from config.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub client_header: Duration,
    pub client_idle: Duration,
    pub handshake_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `listener` (plain, or TLS when `tls` is given) until `shutdown`, then lets open
/// connections finish for up to `shutdown_grace`. `slots` is shared by all data listeners, and a
/// listener's shutdown waits until every slot is free again (or the grace has passed).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    edge: Arc<Edge>,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let builder = builder(&limits);
    // Cancelled when the grace is over: connections still open are then dropped.
    let force = CancellationToken::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(5);
                    a
                }
                Err(e) => {
                    // Out of descriptors or similar: do not spin, the condition is shared.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "connection limit reached, closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            builder: builder.clone(),
            shutdown: shutdown.clone(),
            force: force.clone(),
            client_idle: limits.client_idle,
            edge: Arc::clone(&edge),
            peer,
            slot,
        };
        match &tls {
            None => conn.spawn(TokioIo::new(stream), None),
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let timeout = limits.handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let sni = tls.get_ref().1.server_name().map(normalise_sni);
                            conn.serve(TokioIo::new(tls), sni.map(Arc::from)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "tls handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("shutdown grace elapsed, closing the connections still open");
            force.cancel();
        }
    }
}

fn builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.client_header)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_INTERVAL);
    b
}

/// How often an HTTP/2 connection is pinged to find dead peers (one missed answer closes it).
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// Requests in flight on one connection, and when the last one ended: what the idle timer reads.
#[derive(Debug)]
pub struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// Marks a request as started; the guard marks it finished when dropped (with its
    /// response body, so a stream counts until its last byte).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// How long the connection has had no request in flight, if it has none.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(since.elapsed())
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        *a.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        a.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One accepted connection, its slot held until it ends.
struct Conn {
    builder: auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
    force: CancellationToken,
    client_idle: Duration,
    edge: Arc<Edge>,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
}

impl Conn {
    fn spawn<I>(self, io: I, sni: Option<Arc<str>>)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        tokio::spawn(self.serve(io, sni));
    }

    /// Serves the connection until it ends; closes it gracefully on shutdown, or once it has
    /// had no request in flight for `client_idle`.
    async fn serve<I>(self, io: I, sni: Option<Arc<str>>)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let Conn {
            builder,
            shutdown,
            force,
            client_idle,
            edge,
            peer,
            slot,
        } = self;
        let info = ConnInfo {
            peer_ip: peer.ip(),
            client_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            sni,
        };
        let activity = Activity::new();
        let tracker = Arc::clone(&activity);
        let service = service_fn(move |req| {
            let edge = Arc::clone(&edge);
            let info = info.clone();
            let in_flight = tracker.enter();
            async move {
                let mut response = router::handle(&edge, &info, req).await;
                response.body_mut().hold(in_flight);
                Ok::<_, Infallible>(response)
            }
        });
        let conn = builder.serve_connection(io, service).into_owned();
        let mut conn = std::pin::pin!(conn);
        let mut closing = false;
        let mut check = tokio::time::interval(client_idle / 4);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                _ = force.cancelled() => break Ok(()),
                _ = shutdown.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = check.tick(), if !closing => {
                    if activity.idle_for().is_some_and(|idle| idle >= client_idle) {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, "connection ended: {e}");
        }
        drop(slot);
    }
}
