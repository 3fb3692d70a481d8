//! One client connection, from its first byte to its close.
//!
//! The protocol is told by ALPN, or else by the first bytes (HTTP/2's preface). An HTTP/2
//! connection is one hyper connection for its life. An HTTP/1.1 connection is served by a hyper
//! connection only while it is in use: once it has had no request in flight for a while, the
//! hyper connection is ended (it is idle, so nothing is cut) and the socket is parked: it waits
//! for the client's next bytes holding no buffer, and a new hyper connection picks them up.
//! hyper keeps about 16 KiB of buffers per connection; a parked one costs the edge its task
//! (under 3 KiB) and its socket. nginx frees an idle keep-alive connection's buffers the same
//! way. A head half read when the connection is parked is read again by the next hyper
//! connection, and parking then waits for a request to start, so the header timeout still
//! bounds a slow client.
//!
//! How long "a while" is trades memory for CPU: parking and waking again cost CPU and two more
//! wake-ups, which a client with a request every few milliseconds would pay on each one. So a
//! connection that has carried more than one request keeps its hyper connection for
//! [`PARK_AFTER_WARM`] while at most `limits.warm_connections` HTTP/1.1 connections hold one
//! ([`Warm`]); beyond that many, and on a connection that has carried one request only (most
//! never carry another: a one-off `curl`, a client's spare pooled connection), idle ones are
//! parked after [`PARK_AFTER`].
//!
//! A connection closes gracefully on shutdown, or once it has had no request in flight for
//! `timeouts.client_idle`; it is dropped when the shutdown grace is over.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Activity;
use super::io::{ClientStream, Rewind, sniff_h2};
use crate::router::{self, ConnInfo, Edge};
use crate::stream::EdgeBody;

/// How long an idle HTTP/1.1 connection keeps its hyper connection when it is not warm: long
/// enough that a client sending requests back to back keeps it, short enough that a burst of
/// clients that then go idle never holds many buffers at once (the allocator keeps the
/// high-water mark).
pub const PARK_AFTER: Duration = Duration::from_millis(10);

/// How long an idle HTTP/1.1 connection that has carried more than one request keeps its hyper
/// connection while at most `limits.warm_connections` hold one: a client with a request every
/// few hundred milliseconds (an agent's loop, a batch) is not parked and woken again for each.
pub const PARK_AFTER_WARM: Duration = Duration::from_secs(1);

/// The HTTP/1.1 connections of the data listeners that hold a hyper connection now (busy or
/// idle), and how many may before idle ones are parked after [`PARK_AFTER`] rather than
/// [`PARK_AFTER_WARM`]. So idle connections that keep their buffers number about `limit` at
/// most, each for a second at most.
#[derive(Debug)]
pub struct Warm {
    live: AtomicUsize,
    limit: usize,
}

impl Warm {
    /// A budget of `limit` connections (`limits.warm_connections`).
    pub fn new(limit: usize) -> Arc<Warm> {
        Arc::new(Warm {
            live: AtomicUsize::new(0),
            limit,
        })
    }

    /// Counts one more hyper connection until the guard is dropped.
    fn hold(&self) -> Held<'_> {
        self.live.fetch_add(1, Ordering::Relaxed);
        Held(self)
    }

    /// How long an idle connection that has carried `requests` may keep its hyper connection,
    /// given how many hold one now.
    fn park_after(&self, requests: u64) -> Duration {
        if requests > 1 && self.live.load(Ordering::Relaxed) <= self.limit {
            PARK_AFTER_WARM
        } else {
            PARK_AFTER
        }
    }
}

/// One hyper connection counted in [`Warm`].
struct Held<'a>(&'a Warm);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a connection that is closing may take to flush its last bytes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The protocol builders every connection of a listener uses.
#[derive(Clone)]
pub struct Builders {
    pub h1: http1::Builder,
    pub h2: http2::Builder<TokioExecutor>,
    pub client_header: Duration,
    /// Connections parked now.
    pub parked: metrics::Gauge,
    /// Connections holding a hyper connection now, shared by the data listeners.
    pub warm: Arc<Warm>,
}

/// One accepted connection, its slot held until it ends.
pub struct Conn {
    pub builders: Builders,
    pub shutdown: CancellationToken,
    pub force: CancellationToken,
    pub client_idle: Duration,
    pub edge: Arc<Edge>,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
    /// Counts the connection on its worker while it lives.
    pub _placed: super::workers::Placed,
}

/// Why a hyper connection was asked to end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It has not been.
    No,
    /// It has been idle long enough (`Warm::park_after`): park the socket.
    Park,
    /// Shutdown, or idle for `client_idle`: close.
    Close,
}

impl Conn {
    /// Serves the connection until it ends.
    pub async fn serve<S: ClientStream>(self, mut stream: S, sni: Option<Arc<str>>) {
        let peer = self.peer;
        let info = ConnInfo {
            peer_ip: peer.ip(),
            client_ip: ip_value(peer.ip()),
            sni,
        };
        let activity = Activity::new();
        let service = Handler {
            edge: Arc::clone(&self.edge),
            info,
            activity: Arc::clone(&activity),
        };
        let (h2, prefix) = match stream.alpn_h2() {
            Some(h2) => (h2, Bytes::new()),
            None => {
                let sniffed = tokio::select! {
                    s = tokio::time::timeout(self.builders.client_header, sniff_h2(&mut stream)) => s,
                    _ = self.shutdown.cancelled() => return,
                };
                match sniffed {
                    Ok(Ok(Some(found))) => found,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => return tracing::debug!(%peer, "connection failed: {e}"),
                    Err(_) => return tracing::debug!(%peer, "no request within client_header"),
                }
            }
        };
        let stream = Rewind::new(stream, prefix);
        if h2 {
            // Boxed: an HTTP/1.1 connection's task is then sized for HTTP/1.1's states.
            Box::pin(self.serve_h2(stream, service, &activity)).await;
        } else {
            self.serve_h1(stream, service, &activity).await;
        }
    }

    /// HTTP/2: one hyper connection until the client, shutdown or the idle timeout ends it.
    async fn serve_h2<S: ClientStream>(
        self,
        stream: Rewind<S>,
        service: Handler,
        activity: &Activity,
    ) {
        let conn = self
            .builders
            .h2
            .serve_connection(TokioIo::new(stream), service);
        let mut conn = std::pin::pin!(conn);
        let mut ending = Ending::No;
        // One shutdown token watched at a time, as for HTTP/1.1.
        let mut shutting_down = false;
        let idle = tokio::time::sleep(self.client_idle / 4);
        let mut idle = std::pin::pin!(idle);
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                _ = self.force.cancelled(), if shutting_down => break Ok(()),
                _ = self.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    if ending == Ending::No {
                        ending = Ending::Close;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                _ = idle.as_mut(), if ending == Ending::No => {
                    if activity.idle_for().is_some_and(|idle| idle >= self.client_idle) {
                        ending = Ending::Close;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        idle.as_mut().reset(Instant::now() + self.client_idle / 4);
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, "connection ended: {e}");
        }
        drop(self.slot);
    }

    /// HTTP/1.1: a hyper connection while requests come, the socket parked between them.
    async fn serve_h1<S: ClientStream>(
        self,
        mut stream: Rewind<S>,
        service: Handler,
        activity: &Activity,
    ) {
        let peer = self.peer;
        // Requests started when the last parking found a request's head half read: the socket
        // is not parked again before the next request starts, so the header timeout holds.
        let mut no_park_before: Option<u64> = None;
        loop {
            // Boxed, like the future that drives it: a parked connection's task holds neither.
            let mut conn = Box::new(
                self.builders
                    .h1
                    .serve_connection(TokioIo::new(stream), service.clone()),
            );
            let held = self.builders.warm.hold();
            let Some((ending, result)) =
                Box::pin(self.drive_h1(&mut conn, activity, no_park_before)).await
            else {
                return;
            };
            let parts = conn.into_parts();
            drop(held);
            let (inner, unread) = parts.io.into_inner().into_parts();
            let mut unread_buf = parts.read_buf;
            if unread.is_empty() {
                drop(unread);
            } else {
                // Bytes put back before hyper read them again (its own buffer comes first).
                let mut all = Vec::with_capacity(unread_buf.len() + unread.len());
                all.extend_from_slice(&unread_buf);
                all.extend_from_slice(&unread);
                unread_buf = Bytes::from(all);
            }
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
                return;
            }
            if ending != Ending::Park {
                // The client closed, keep-alive ended, or the edge is closing: say goodbye.
                let mut inner = inner;
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, inner.shutdown()).await;
                return;
            }
            stream = if unread_buf.is_empty() {
                // Even empty, it holds hyper's whole read buffer.
                drop(unread_buf);
                match self.park(inner, activity).await {
                    Some(s) => Rewind::new(s, Bytes::new()),
                    None => return,
                }
            } else {
                // A request began arriving as the connection was parked: serve it at once.
                no_park_before = Some(activity.started());
                Rewind::new(inner, unread_buf)
            };
        }
    }

    /// Drives one hyper HTTP/1.1 connection until it ends: by itself (the client closed, or
    /// asked to), or because it was asked to end for shutdown, for `client_idle`, or for
    /// parking (once idle for `Warm::park_after`; when `no_park_before` is given, only once more
    /// requests than that have started). Returns how it was asked to end and how it ended;
    /// `None` when the shutdown grace ran out.
    async fn drive_h1<I>(
        &self,
        conn: &mut http1::Connection<I, Handler>,
        activity: &Activity,
        no_park_before: Option<u64>,
    ) -> Option<(Ending, hyper::Result<()>)>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin,
    {
        let mut ending = Ending::No;
        // Only one shutdown token is watched at a time (each poll of one takes two locks):
        // `force` is only ever cancelled after `shutdown`.
        let mut shutting_down = false;
        // Requests ended when the timer was last armed for the connection's idleness.
        let mut seen_ended = activity.ended();
        // Not past `client_idle`, which the same timer enforces.
        let park_after = || {
            let warm = &self.builders.warm;
            warm.park_after(activity.started()).min(self.client_idle)
        };
        let timer = tokio::time::sleep(park_after());
        let mut timer = std::pin::pin!(timer);
        loop {
            // Ready when the connection ended (`Some`), or when it just went idle: a request
            // ended since the timer was last armed and none is in flight (`None`). Requests
            // start and end inside this poll, so the timer is looked at once per idle spell,
            // and wakes a connection at most once per parking delay while requests keep coming.
            let event = std::future::poll_fn(|cx| match conn.poll_without_shutdown(cx) {
                Poll::Ready(result) => Poll::Ready(Some(result)),
                Poll::Pending if !activity.busy() && activity.ended() != seen_ended => {
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            });
            tokio::select! {
                event = event => match event {
                    Some(result) => return Some((ending, result)),
                    None => {
                        seen_ended = activity.ended();
                        // Parking is due a parking delay after the request ended. A timer
                        // already due by then stays: it finds the connection idle for less and
                        // waits the rest, so a busy keep-alive connection moves its timer about
                        // once per delay rather than once per request.
                        let due = activity
                            .idle_since()
                            .map(|since| since + park_after());
                        if let (Some(due), Ending::No) = (due, ending) {
                            if timer.deadline() > due {
                                timer.as_mut().reset(due);
                            }
                        }
                    }
                },
                _ = self.force.cancelled(), if shutting_down => return None,
                _ = self.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    if ending != Ending::Close {
                        ending = Ending::Close;
                        Pin::new(&mut *conn).graceful_shutdown();
                    }
                }
                _ = timer.as_mut(), if ending == Ending::No => {
                    let parkable = no_park_before.is_none_or(|n| activity.started() > n);
                    let park_after = park_after();
                    let now = Instant::now();
                    match activity.idle_for() {
                        // Re-armed when the request ends.
                        None => timer.as_mut().reset(now + self.client_idle),
                        Some(idle) if idle >= self.client_idle => {
                            ending = Ending::Close;
                            Pin::new(&mut *conn).graceful_shutdown();
                        }
                        Some(idle) if idle >= park_after && parkable => {
                            ending = Ending::Park;
                            Pin::new(&mut *conn).graceful_shutdown();
                        }
                        Some(idle) if parkable => timer.as_mut().reset(now + (park_after - idle)),
                        Some(idle) => timer.as_mut().reset(now + (self.client_idle - idle)),
                    }
                }
            }
        }
    }

    /// Waits for the client's next bytes, holding no buffer. `None` when the connection should
    /// close instead: the client closed it, it stayed idle for `client_idle`, or the edge is
    /// shutting down.
    async fn park<S: ClientStream>(&self, mut stream: S, activity: &Activity) -> Option<S> {
        let idle = activity.idle_for().unwrap_or_default();
        let left = self.client_idle.saturating_sub(idle);
        // Counted as parked while it waits, and out before the close that may follow: a client
        // that saw the close then finds it counted out.
        let woke = {
            self.builders.parked.increment(1.0);
            let _unpark = Unpark(&self.builders.parked);
            tokio::select! {
                came = tokio::time::timeout(left, stream.wait_for_data()) => match came {
                    Ok(Ok(true)) => Woke::Data,
                    Ok(Ok(false)) => Woke::Gone,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, "connection ended: {e}");
                        Woke::Gone
                    }
                    Err(_) => Woke::Close,
                },
                _ = self.shutdown.cancelled() => Woke::Close,
            }
        };
        match woke {
            Woke::Data => Some(stream),
            Woke::Gone => None,
            Woke::Close => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
                None
            }
        }
    }
}

/// A connection's request handler: the router, with the request counted on the connection
/// until its response body ends.
///
/// Each request's future is boxed, once (the router boxes nothing more): hyper then keeps a
/// pointer per connection rather than a slot the size of the largest request state, and its
/// HTTP/1.1 connection can be taken apart for parking (that needs an `Unpin` future).
#[derive(Clone)]
struct Handler {
    edge: Arc<Edge>,
    info: ConnInfo,
    activity: Arc<Activity>,
}

type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<EdgeBody>, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<Incoming>> for Handler {
    type Response = http::Response<EdgeBody>;
    type Error = Infallible;
    type Future = HandlerFuture;

    fn call(&self, req: http::Request<Incoming>) -> HandlerFuture {
        let edge = Arc::clone(&self.edge);
        let info = self.info.clone();
        let in_flight = self.activity.enter();
        Box::pin(async move {
            let mut response = router::handle(&edge, &info, req).await;
            response.body_mut().hold(in_flight);
            Ok(response)
        })
    }
}

/// The client's address as a header value (`x-forwarded-for`), written on the stack: one
/// allocation per connection, for the value's own bytes.
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 48]; // IPv6 text is at most 45 bytes
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let written = write!(cursor, "{ip}").is_ok();
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    match buf.get(..len) {
        Some(text) if written => HeaderValue::from_bytes(text).ok(),
        _ => None,
    }
    .unwrap_or_else(|| HeaderValue::from_static("unknown"))
}

/// How a parked connection's wait ended.
enum Woke {
    /// The client sent bytes: serve them.
    Data,
    /// The client closed the connection, or it failed.
    Gone,
    /// Idle for `client_idle`, or the edge is shutting down: close it.
    Close,
}

/// Counts a connection out of the parked ones, however its wait ends.
struct Unpark<'a>(&'a metrics::Gauge);

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn client_ip_values() {
        // The text `Display` gives, the longest ones included.
        for ip in [
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "::ffff:255.255.255.255",
            "1234:5678:9abc:def0:1234:5678:9abc:def0",
        ] {
            assert_eq!(ip_value(ip.parse().unwrap()), ip);
        }
    }
}
