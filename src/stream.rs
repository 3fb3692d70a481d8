//! Bodies on both sides of the edge.
//!
//! * [`read_request_body`]: the client's body, refused at `limits.max_body_bytes` without reading
//!   past it, and within `timeouts.client_body`.
//! * [`ChunksBody`]: a pinned body sent upstream as shared slices (re-sendable for a retry).
//! * [`EdgeBody`]: what the client receives: a fixed answer, or the backend's body passed through
//!   frame by frame as it arrives, with an idle timeout, and a terminal SSE error event when a
//!   stream breaks after its head was sent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::access::Access;
use crate::error::EdgeError;
use crate::proxy::echo::EchoBody;
use crate::proxy::h1::H1Body;
use crate::usage::Usage;
use crate::usage::scan::{Forward, JsonUsageScan, SseUsageScan};

/// Reads a whole request body of at most `max` bytes within `deadline`.
///
/// A declared length over `max` is refused before any byte is read; a chunked body is refused as
/// soon as it passes `max`.
pub async fn read_request_body(
    mut body: Incoming,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, EdgeError> {
    if body.size_hint().lower() > max as u64 {
        return Err(EdgeError::BodyTooLarge);
    }
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut rest = BytesMut::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| EdgeError::BodyIncomplete)?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers carry nothing the edge forwards
            };
            total += data.len();
            if total > max {
                return Err(EdgeError::BodyTooLarge);
            }
            // The common case, one frame, keeps the buffer hyper read into: no copy.
            match first.take() {
                None if rest.is_empty() => first = Some(data),
                Some(prev) => {
                    rest.reserve(total);
                    rest.extend_from_slice(&prev);
                    rest.extend_from_slice(&data);
                }
                None => rest.extend_from_slice(&data),
            }
        }
        Ok(first.unwrap_or_else(|| rest.freeze()))
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(Err(EdgeError::BodyIncomplete))
}

/// A body made of shared slices, sent as they are. Cloning it is an `Arc` increment.
#[derive(Debug, Clone)]
pub struct ChunksBody {
    chunks: Arc<[Bytes]>,
    next: usize,
    remaining: u64,
}

impl ChunksBody {
    /// A body of `chunks`, `len` bytes in all.
    pub fn new(chunks: Arc<[Bytes]>, len: usize) -> ChunksBody {
        ChunksBody {
            chunks,
            next: 0,
            remaining: len as u64,
        }
    }

    /// The chunks not yet taken as frames.
    pub fn rest(&self) -> &[Bytes] {
        &self.chunks[self.next..]
    }
}

impl Body for ChunksBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        while let Some(chunk) = self.chunks.get(self.next).cloned() {
            self.next += 1;
            if !chunk.is_empty() {
                self.remaining -= chunk.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A backend's response body: a remote server's, or the in-process echo's.
pub enum UpstreamBody {
    /// From an h2c connection of hyper's pooled client.
    Remote(Incoming),
    /// From an HTTP/1.1 connection the body drives itself.
    H1(H1Body),
    /// From `builtin:echo`.
    Echo(EchoBody),
}

impl UpstreamBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ()>>> {
        fn logged<E: std::fmt::Display>(r: Result<Frame<Bytes>, E>) -> Result<Frame<Bytes>, ()> {
            r.map_err(|e| tracing::debug!("upstream body failed: {e}"))
        }
        match self {
            UpstreamBody::Remote(b) => Pin::new(b).poll_frame(cx).map(|f| f.map(logged)),
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map(|f| f.map(logged)),
            UpstreamBody::Echo(b) => b.poll_frame(cx).map(|f| f.map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Remote(b) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::Echo(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Remote(b) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::Echo(_) => SizeHint::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Streaming,
    Done,
}

/// How a response body is scanned for its `usage`.
pub enum UsageScan {
    /// Not a JSON or event-stream body.
    None,
    /// A non-streamed JSON body.
    Json(JsonUsageScan),
    /// An event stream; may cut the usage-only chunk the client did not ask for.
    Sse(Box<SseUsageScan>),
}

impl UsageScan {
    fn usage(&self) -> Option<Usage> {
        match self {
            UsageScan::None => None,
            UsageScan::Json(s) => s.usage(),
            UsageScan::Sse(s) => s.usage(),
        }
    }
}

pin_project! {
    /// The backend's body on its way to the client, frame by frame.
    pub struct Passthrough {
        body: UpstreamBody,
        // Re-armed lazily: a frame only records when it came; the timer is moved when it fires
        // early. That keeps timer-wheel work off the per-chunk path.
        #[pin]
        idle: Sleep,
        idle_for: Duration,
        last_frame: Instant,
        sse: bool,
        phase: Phase,
        scan: UsageScan,
        // Parts of the last frame still to send (only when the event-stream scan cut something).
        pending: Option<Forward>,
        failure: Option<EdgeError>,
        // Keeps the request counted on its endpoint; records the gaps between chunks.
        endpoint: Option<crate::proxy::InFlight>,
    }
}

impl Passthrough {
    /// Wraps a backend body whose head arrived at `since` (its first silence counts from then);
    /// `sse` says whether it is an event stream (failures then end with an error event instead
    /// of a broken connection).
    pub fn new(
        body: UpstreamBody,
        since: Instant,
        idle_for: Duration,
        sse: bool,
        scan: UsageScan,
        endpoint: Option<crate::proxy::InFlight>,
    ) -> Passthrough {
        Passthrough {
            body,
            idle: tokio::time::sleep_until(since + idle_for),
            idle_for,
            last_frame: since,
            sse,
            phase: Phase::Streaming,
            scan,
            pending: None,
            failure: None,
            endpoint,
        }
    }

    /// The usage seen so far (the final one once the body ended).
    pub fn usage(&self) -> Option<Usage> {
        self.scan.usage()
    }

    /// Why the body ended early, if it did.
    pub fn failure(&self) -> Option<EdgeError> {
        self.failure
    }
}

impl Body for Passthrough {
    type Data = Bytes;
    type Error = EdgeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, EdgeError>>> {
        let mut this = self.project();
        loop {
            if let Some(part) = this.pending.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
            *this.pending = None;
            let failure = match *this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Streaming => match this.body.poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let now = Instant::now();
                        if let Some(e) = this.endpoint.as_ref() {
                            e.chunk_gap.record(now.duration_since(*this.last_frame));
                        }
                        *this.last_frame = now;
                        let frame = match frame.into_data() {
                            Ok(data) => data,
                            Err(other) => return Poll::Ready(Some(Ok(other))),
                        };
                        match this.scan {
                            UsageScan::None => {}
                            UsageScan::Json(s) => s.feed(&frame),
                            UsageScan::Sse(s) => {
                                // Most frames pass whole: no `Forward` to fill and drain.
                                if let Some(parts) = s.scan(&frame) {
                                    *this.pending = Some(parts);
                                    continue;
                                }
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                    Poll::Ready(None) => {
                        *this.phase = Phase::Done;
                        if let UsageScan::Sse(s) = this.scan {
                            *this.pending = Some(s.finish());
                            continue;
                        }
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Some(Err(()))) => EdgeError::UpstreamFailed,
                    Poll::Pending => loop {
                        if this.idle.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        let deadline = *this.last_frame + *this.idle_for;
                        if deadline <= Instant::now() {
                            break EdgeError::UpstreamIdle;
                        }
                        // Frames came since the timer was armed: wait out the rest from the last one.
                        this.idle.as_mut().reset(deadline);
                    },
                },
            };
            tracing::warn!(code = failure.code(), "upstream body ended early");
            *this.phase = Phase::Done;
            *this.failure = Some(failure);
            return if *this.sse {
                Poll::Ready(Some(Ok(Frame::data(failure.sse_event()))))
            } else {
                // Not an event stream: the only honest signal left is breaking the connection.
                Poll::Ready(Some(Err(failure)))
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.as_ref().is_none_or(Forward::is_empty)
            && (self.phase == Phase::Done
                || (self.phase == Phase::Streaming
                    && self.body.is_end_stream()
                    && !matches!(self.scan, UsageScan::Sse(_))))
    }

    fn size_hint(&self) -> SizeHint {
        match (self.phase, &self.scan) {
            // Cutting the usage chunk changes the length.
            (Phase::Streaming, UsageScan::None | UsageScan::Json(_)) => self.body.size_hint(),
            (Phase::Streaming, UsageScan::Sse(_)) => SizeHint::default(),
            (Phase::Done, _) if self.pending.is_some() => SizeHint::default(),
            (Phase::Done, _) => SizeHint::with_exact(0),
        }
    }
}

pin_project! {
    /// Every response body the edge sends, with the request's [`Access`] record, which is
    /// finished (logged, counted) when the body is done or dropped.
    pub struct EdgeBody {
        #[pin]
        kind: Kind,
        access: Option<Access>,
        in_flight: Option<crate::server::InFlight>,
    }

    impl PinnedDrop for EdgeBody {
        fn drop(this: Pin<&mut Self>) {
            // A stream cut short by the client still has the usage seen so far.
            let this = this.project();
            if let (Some(access), KindProj::Proxied { inner }) = (this.access.as_mut(), this.kind.project()) {
                if access.usage.is_none() {
                    access.usage = inner.usage();
                }
            }
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        /// A fixed answer (errors, `/v1/models`, preflight).
        Full { data: Option<Bytes> },
        /// A backend's body.
        Proxied { #[pin] inner: Passthrough },
    }
}

impl EdgeBody {
    /// A backend's body on its way through.
    pub fn proxied(inner: Passthrough) -> EdgeBody {
        EdgeBody {
            kind: Kind::Proxied { inner },
            access: None,
            in_flight: None,
        }
    }

    /// Attaches the request's record; it is finished with the body.
    pub fn attach(&mut self, access: Access) {
        self.access = Some(access);
    }

    /// Keeps the request counted as in flight on its connection until the body is done.
    pub fn hold(&mut self, in_flight: crate::server::InFlight) {
        self.in_flight = Some(in_flight);
    }
}

impl From<Bytes> for EdgeBody {
    fn from(data: Bytes) -> EdgeBody {
        EdgeBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            access: None,
            in_flight: None,
        }
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = EdgeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, EdgeError>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Proxied { mut inner } => {
                let polled = inner.as_mut().poll_frame(cx);
                if let (Some(access), Poll::Ready(None | Some(Err(_)))) =
                    (this.access.as_mut(), &polled)
                {
                    access.usage = inner.usage();
                    if let Some(f) = inner.failure() {
                        access.code = f.code();
                    }
                }
                polled
            }
        };
        if let (Some(access), Poll::Ready(Some(Ok(frame)))) = (this.access.as_mut(), &polled) {
            if let Some(data) = frame.data_ref() {
                access.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Proxied { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Proxied { inner } => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::echo;

    #[tokio::test]
    async fn chunks_body_sends_every_slice_with_exact_length() {
        let chunks: Arc<[Bytes]> = vec![
            Bytes::from_static(b"{"),
            Bytes::new(),
            Bytes::from_static(b"\"a\":1}"),
        ]
        .into();
        let body = ChunksBody::new(chunks, 7);
        assert_eq!(body.size_hint().exact(), Some(7));
        let again = body.clone();
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"{\"a\":1}");
        assert_eq!(again.collect().await.unwrap().to_bytes(), all);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_ends_with_an_error_event() {
        let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"a b"}]}"#;
        let echo = echo::respond(body, Some(Duration::from_secs(3600))).into_body();
        let mut pass = std::pin::pin!(EdgeBody::proxied(Passthrough::new(
            UpstreamBody::Echo(echo),
            Instant::now(),
            Duration::from_secs(5),
            true,
            UsageScan::None,
            None,
        )));
        let mut frames = Vec::new();
        while let Some(f) = pass.frame().await {
            frames.push(f.unwrap().into_data().unwrap());
        }
        // role chunk, first word, then the idle error event; nothing after it.
        assert_eq!(frames.len(), 3);
        let last = std::str::from_utf8(&frames[2]).unwrap();
        assert!(last.starts_with("data: {\"error\":"), "{last}");
        assert!(last.contains("upstream_timeout"));
        assert!(!last.contains("[DONE]"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_json_body_breaks_the_connection() {
        let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"a b"}]}"#;
        let echo = echo::respond(body, Some(Duration::from_secs(3600))).into_body();
        let mut pinned = std::pin::pin!(Passthrough::new(
            UpstreamBody::Echo(echo),
            Instant::now(),
            Duration::from_secs(5),
            false,
            UsageScan::None,
            None,
        ));
        assert!(pinned.frame().await.unwrap().is_ok());
        assert!(pinned.frame().await.unwrap().is_ok());
        assert_eq!(
            pinned.frame().await.unwrap().unwrap_err(),
            EdgeError::UpstreamIdle
        );
        assert!(pinned.frame().await.is_none());
    }
}
