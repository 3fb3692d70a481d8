//! HTTP/1.1 connections to one backend endpoint, driven by the request that holds them.
//!
//! An exchange runs in the request's own task: the request head and body go out in vectored
//! writes, the response head is parsed from the first bytes read ([`wire`]), and the body is
//! decoded from the connection's read buffer as the client side asks for it. The chunks a
//! backend wrote together are read in one system call and passed on one by one, each a slice of
//! that buffer: no task switch, no channel, no copy. (hyper's client runs a task per connection,
//! hands every chunk across a channel to the request's task, and reads chunked framing a byte at
//! a time: two fifths of the instructions of a stream through the edge went there.)
//!
//! HTTP/1.1 carries one exchange at a time, so a connection always has exactly one owner: the
//! request using it, or its endpoint's idle list. A body read to its end gives the connection
//! back; a body dropped before its end (the client went away) drops it, which closes the socket
//! and so stops the backend's work at once.

pub(crate) mod decode;
pub(crate) mod wire;

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy::pool::Pool;
use crate::stream::ChunksBody;
use decode::Decoded;
pub use decode::Decoder;
pub use wire::WireError;

/// How much room a read is given; the buffer grows by this when less is left.
const READ_SIZE: usize = 8 * 1024;
/// Slices per vectored write.
const WRITE_SLICES: usize = 16;

/// Why an exchange failed.
#[derive(Debug)]
pub enum H1Error {
    Io(std::io::Error),
    Wire(WireError),
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Io(e) => e.fmt(f),
            H1Error::Wire(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for H1Error {}

/// A failed exchange.
#[derive(Debug)]
pub struct SendError {
    pub error: H1Error,
    /// Whether any of the request was written.
    pub sent: bool,
    /// The request back, when the connection gave no answer at all: none of the request was
    /// written, or the connection was closed or reset before a byte of a response came. On a
    /// parked connection the latter is a backend that closed it while it lay idle (llama.cpp's
    /// server closes some connections after a stream without saying so): the request may go
    /// out again on a new connection.
    pub request: Option<Request<ChunksBody>>,
}

/// One open connection, with what was read from it and not yet used.
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed: the rest of a response head, body bytes, framing.
    buf: BytesMut,
    /// The current request's head, its allocation kept for the next one.
    head: Vec<u8>,
    /// The last response left the connection fit for another exchange.
    keep_alive: bool,
}

impl Conn {
    fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
            keep_alive: true,
        }
    }

    /// Whether the connection may carry another exchange: the last response allowed it and left
    /// no byte behind, and the backend has neither closed it nor sent anything since, as far as
    /// the runtime has seen: the socket is read only when the reactor has seen it become
    /// readable, so this costs no system call. A close the reactor has not seen yet (a backend
    /// that closes right after its last chunk without saying so, as llama.cpp's server does
    /// after some streams) shows as a connection that ends before any answer, and the request
    /// is sent again on a new one ([`SendError::request`]).
    fn reusable(&mut self) -> bool {
        self.keep_alive
            && self.buf.is_empty()
            && matches!(self.io.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// Gives the next read room.
    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
    }

    /// Sends `req` and reads until the response head arrives; the response's body is the
    /// decoder of its framing, to be read through [`H1Body`]. A backend may answer before it has
    /// read the whole request body and then close: when a write fails after some bytes went out,
    /// what it answered is still read (and the connection is not reused).
    pub async fn send(&mut self, req: Request<ChunksBody>) -> Result<Response<Decoder>, SendError> {
        self.head.clear();
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        wire::write_head(&mut self.head, req.method(), target, req.headers());
        let head_request = req.method() == Method::HEAD;
        let write_failed = match write_all(&mut self.io, &self.head, req.body().rest()).await {
            Ok(()) => None,
            Err((error, 0)) => {
                return Err(SendError {
                    error: H1Error::Io(error),
                    sent: false,
                    request: Some(req),
                });
            }
            Err((error, _)) => Some(error),
        };
        // Kept until an answer starts: a connection that ends before one gives it back.
        let mut req = Some(req);
        let mut answered = false;
        let mut fail = |error, unanswered: bool| SendError {
            error,
            sent: true,
            request: if unanswered { req.take() } else { None },
        };
        let mut interim = 0;
        loop {
            match wire::parse_head(&mut self.buf, head_request, &mut interim) {
                Ok(Some(head)) => {
                    self.keep_alive = head.keep_alive && write_failed.is_none();
                    return Ok(head.response);
                }
                Ok(None) => {}
                Err(e) => return Err(fail(H1Error::Wire(e), false)),
            }
            self.reserve();
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    let error = write_failed.map_or(H1Error::Wire(WireError::Closed), H1Error::Io);
                    return Err(fail(error, !answered));
                }
                Ok(_) => answered = true,
                Err(e) => {
                    let reset = matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    );
                    let error = write_failed.map_or(H1Error::Io(e), H1Error::Io);
                    return Err(fail(error, reset && !answered));
                }
            }
        }
    }
}

/// Writes `head`, then `body`, in vectored writes. On failure, returns the error and how many
/// bytes had gone out.
async fn write_all(
    io: &mut TcpStream,
    head: &[u8],
    body: &[Bytes],
) -> Result<(), (std::io::Error, usize)> {
    let part = |i: usize| -> &[u8] { if i == 0 { head } else { &body[i - 1] } };
    let parts = body.len() + 1;
    let (mut at, mut offset, mut written) = (0, 0, 0);
    while at < parts {
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let batch = (at..parts.min(at + WRITE_SLICES)).zip(slices.iter_mut());
        for (i, slice) in batch {
            *slice = IoSlice::new(&part(i)[if i == at { offset } else { 0 }..]);
        }
        let n = parts.min(at + WRITE_SLICES) - at;
        let mut w = match io.write_vectored(&slices[..n]).await {
            Ok(0) => return Err((std::io::ErrorKind::WriteZero.into(), written)),
            Ok(w) => w,
            Err(e) => return Err((e, written)),
        };
        written += w;
        while at < parts && w >= part(at).len() - offset {
            w -= part(at).len() - offset;
            (at, offset) = (at + 1, 0);
        }
        offset += w;
    }
    Ok(())
}

/// The idle connections of one endpoint, freshest last, and how new ones are made.
///
/// Each data worker thread has its own idle list: a socket is registered with the event loop of
/// the worker that opened it, so only that worker takes it again (another worker could drive it,
/// but each readiness change would then cross threads).
pub struct Conns {
    idle: Box<[Mutex<VecDeque<Parked>>]>,
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
    /// `connect_for`, for `workers` worker threads; at most `max_idle` in all are kept idle, each
    /// for at most `idle_for`. The idle lists share `max_idle` out: with 10 and 4 workers, two
    /// lists hold 3 and two hold 2.
    pub fn new(
        host: &str,
        port: u16,
        max_idle: usize,
        idle_for: Duration,
        connect_for: Duration,
        workers: usize,
    ) -> Conns {
        Conns {
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
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
        let (idle, _) = self.local();
        loop {
            let mut parked = lock(idle).pop_back()?;
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
        // Boxed once for its life: parking and taking it moves a pointer.
        Ok(Box::new(Conn::new(stream)))
    }

    /// Parks a connection whose exchange ended at `since` (the last byte of the response came
    /// then: the backend's keep-alive clock runs from about that moment, not from when the
    /// client finished reading), if it can carry another one; the oldest parked connection
    /// makes room when the list is full.
    fn put(&self, mut conn: Box<Conn>, since: Instant) {
        let (idle, max_idle) = self.local();
        if max_idle == 0 || !conn.reusable() {
            return;
        }
        let parked = Parked { conn, since };
        let evicted = {
            let mut idle = lock(idle);
            let evicted = if idle.len() >= max_idle {
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
        let mut left = 0;
        for idle in &self.idle {
            let mut closed = Vec::new();
            {
                let mut idle = lock(idle);
                let mut kept = VecDeque::with_capacity(idle.len());
                for mut parked in idle.drain(..) {
                    if self.usable(&mut parked, now) {
                        kept.push_back(parked);
                    } else {
                        closed.push(parked);
                    }
                }
                *idle = kept;
                left += idle.len();
            }
            // Closed outside the lock.
            drop(closed);
        }
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
        self.idle.iter().map(|idle| lock(idle).len()).sum()
    }

    /// The idle list of the worker running this code (the first outside the workers), and how
    /// many connections it may hold.
    fn local(&self) -> (&Mutex<VecDeque<Parked>>, usize) {
        let lists = self.idle.len();
        let i = crate::server::current_worker() % lists;
        let share = self.max_idle / lists + usize::from(i < self.max_idle % lists);
        (&self.idle[i], share)
    }
}

fn lock(idle: &Mutex<VecDeque<Parked>>) -> std::sync::MutexGuard<'_, VecDeque<Parked>> {
    // The list holds no invariant a panic elsewhere could break.
    idle.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A response body read from a held connection; the connection goes back to its endpoint's
/// idle list when the body was read to its end.
pub struct H1Body {
    decoder: Decoder,
    /// `None` once the connection failed or closed: it is not reused then.
    conn: Option<Box<Conn>>,
    home: Arc<Conns>,
    /// When the response's last byte came, once it did.
    ended: Option<Instant>,
}

impl H1Body {
    /// The body of a response received on `conn` (framed as `decoder` says), which returns to
    /// `home` after the body.
    pub fn new(decoder: Decoder, conn: Box<Conn>, home: Arc<Conns>) -> H1Body {
        H1Body {
            ended: decoder.is_done().then(Instant::now),
            decoder,
            conn: Some(conn),
            home,
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        let Some(conn) = &mut this.conn else {
            return Poll::Ready(None);
        };
        loop {
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.ended.get_or_insert_with(Instant::now);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.ended.get_or_insert_with(Instant::now);
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Wire(e))));
                }
            }
            conn.reserve();
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    // Closed by the backend: the end of a body that runs to the close.
                    this.conn = None;
                    return match this.decoder.at_close() {
                        Ok(()) => {
                            this.ended.get_or_insert_with(Instant::now);
                            Poll::Ready(None)
                        }
                        Err(e) => Poll::Ready(Some(Err(H1Error::Wire(e)))),
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended.is_some()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
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
mod tests;
