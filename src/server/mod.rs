//! The data listeners: worker threads ([`workers`]), accept loop, connection cap, TLS handshake,
//! and graceful shutdown; each connection is served by [`conn`] (HTTP/1.1 or HTTP/2) over the
//! streams of [`io`].
//!
//! A connection slot is taken before anything else is done for a connection; when none is free
//! the socket is closed at once, which costs the edge almost nothing. The TLS handshake runs in
//! the connection's own task under `tls.handshake_timeout`, so a slow handshake holds one slot
//! and nothing else.

mod conn;
mod io;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use conn::{Builders, Conn};
pub use conn::{PARK_AFTER, PARK_AFTER_WARM, Warm};
#[cfg(test)]
pub(crate) use workers::set_current_worker;
pub use workers::{Listener, current_worker, start as start_workers};

use crate::router::Edge;
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
    /// HTTP/1.1 connections holding buffers, counted across the data listeners.
    pub warm: Arc<Warm>,
}

/// Serves `listener` (plain, or TLS when `tls` is given) on one worker until `shutdown`, then
/// lets open connections finish for up to `shutdown_grace`. `slots` is shared by all data
/// listeners, and a listener's shutdown waits until every slot is free again (or the grace has
/// passed). A connection accepted here may be handed over to another worker, and connections
/// other workers accepted arrive in `handovers.inbox` ([`workers`]).
async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    edge: Arc<Edge>,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    mut handovers: workers::Handovers,
) {
    let builders = builders(&limits);
    // Cancelled when the grace is over: connections still open are then dropped.
    let force = CancellationToken::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer, slot, placed) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(h) = handovers.inbox.recv() => match TcpStream::from_std(h.socket) {
                Ok(stream) => (stream, h.peer, h.slot, h.placed),
                Err(e) => {
                    tracing::warn!("cannot take over a connection: {e}");
                    continue;
                }
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::debug!(%peer, "connection limit reached, closing");
                        drop(stream);
                        continue;
                    };
                    let placed = handovers.spread.place(handovers.me);
                    if placed.worker() == handovers.me {
                        (stream, peer, slot, placed)
                    } else {
                        match hand_over(&handovers, stream, peer, slot, placed) {
                            Some(kept) => kept,
                            None => continue,
                        }
                    }
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
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            builders: builders.clone(),
            shutdown: shutdown.clone(),
            force: force.clone(),
            client_idle: limits.client_idle,
            edge: Arc::clone(&edge),
            peer,
            slot,
            _placed: placed,
        };
        match &tls {
            None => {
                tokio::spawn(conn.serve(stream, None));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let timeout = limits.handshake_timeout;
                tokio::spawn(async move {
                    // The handshake's state is boxed, and so is the stream after it: the task
                    // then keeps room for neither while the connection lives (a TLS stream is
                    // 1.2 KB; the task measured 12.7 KB unboxed, 3.0 KB boxed, 2.7 KB plain).
                    let handshake = Box::pin(handshake(&acceptor, stream, timeout, peer));
                    if let Some((tls, sni)) = handshake.await {
                        conn.serve(tls, sni).await;
                    }
                });
            }
        }
    }
    drop(listener);
    // Connections handed over and not yet taken in are closed, and their slots freed.
    let worker = handovers.me;
    drop(handovers);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => tracing::info!(worker, "all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(worker, "shutdown grace elapsed, closing the connections still open");
            force.cancel();
        }
    }
}

/// Sends a connection this worker accepted to the worker `placed` names; `None` once it is on
/// its way. When that worker's queue is full (it is not taking connections in), the connection
/// comes back, to be served here. Only a socket that cannot move between event loops (no
/// descriptor left for the registration) is closed, as an accept that failed would be.
fn hand_over(
    handovers: &workers::Handovers,
    stream: TcpStream,
    peer: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    placed: workers::Placed,
) -> Option<(
    TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
    workers::Placed,
)> {
    let to = &handovers.to[placed.worker()];
    let socket = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, "cannot hand a connection over: {e}");
            return None;
        }
    };
    let handover = workers::Handover {
        socket,
        peer,
        slot,
        placed,
    };
    let back = match to.try_send(handover) {
        Ok(()) => return None,
        Err(mpsc::error::TrySendError::Full(h) | mpsc::error::TrySendError::Closed(h)) => h,
    };
    match TcpStream::from_std(back.socket) {
        Ok(stream) => {
            let placed = handovers.spread.count_on(handovers.me);
            Some((stream, back.peer, back.slot, placed))
        }
        Err(e) => {
            tracing::warn!(%peer, "cannot take a connection back: {e}");
            None
        }
    }
}

/// The TLS handshake of an accepted connection, within `timeout`: the stream and its SNI
/// (normalised), or `None` when it failed or took too long.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
    peer: SocketAddr,
) -> Option<(Box<TlsStream<TcpStream>>, Option<Arc<str>>)> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let sni = tls.get_ref().1.server_name().map(normalise_sni);
            Some((Box::new(tls), sni.map(Arc::from)))
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "tls handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake timed out");
            None
        }
    }
}

fn builders(limits: &ServerLimits) -> Builders {
    let mut h1 = http1::Builder::new();
    // Response bytes are copied into one buffer (bounded by `max_buf_size`) and written with one
    // `write`, instead of being queued as separate slices for `writev`. A stream's chunks come in
    // threes (size line, data, CRLF), and the queue holds at most 16 slices, so a burst of SSE
    // chunks took several `writev` calls, each waking the client: copying the few hundred bytes
    // costs far less than those system calls (BENCHMARKS.md).
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.client_header)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true)
        .writev(false);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_INTERVAL);
    Builders {
        h1,
        h2,
        client_header: limits.client_header,
        parked: metrics::gauge!(crate::metrics::PARKED_CONNECTIONS),
        warm: Arc::clone(&limits.warm),
    }
}

/// How often an HTTP/2 connection is pinged to find dead peers (one missed answer closes it).
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// Requests in flight on one connection, how many have started and ended, and when the last
/// one ended: what the idle and parking timers read.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    started: AtomicU64,
    ended: AtomicU64,
    idle_since: std::sync::Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            idle_since: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// Marks a request as started; the guard marks it finished when dropped (with its
    /// response body, so a stream counts until its last byte).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// How many requests have started on the connection.
    fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// How many requests have ended on the connection.
    fn ended(&self) -> u64 {
        self.ended.load(Ordering::Acquire)
    }

    /// Whether a request is in flight.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// How long the connection has had no request in flight, if it has none.
    fn idle_for(&self) -> Option<Duration> {
        self.idle_since().map(|since| since.elapsed())
    }

    /// Since when the connection has had no request in flight, if it has none.
    fn idle_since(&self) -> Option<Instant> {
        if self.busy() {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        *a.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.ended.fetch_add(1, Ordering::Release);
    }
}
