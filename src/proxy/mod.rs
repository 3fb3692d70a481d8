//! The upstream side: connections ([`h1`] for HTTP/1.1 endpoints, hyper's pooled client for h2c),
//! the attempt loop, and the headers each way.
//!
//! A request is sent to the endpoints of its pool in pick order. It moves on to the next endpoint
//! only when the connection could not be made (connect refused or timed out) or the endpoint
//! could not load the request's adapter (`adapters`), so a backend never receives the same
//! request twice; every other failure is final. The whole wait for a response
//! head is bounded by `timeouts.upstream_first_byte`.

pub mod adapters;
pub mod balance;
pub mod client;
pub mod echo;
pub mod h1;
pub mod health;
pub mod pin;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use crate::error::EdgeError;
use crate::headers::{self as h, strip_hop_by_hop};
use crate::stream::{ChunksBody, EdgeBody, Passthrough, UpstreamBody, UsageScan};
use crate::usage::scan::{JsonUsageScan, SseUsageScan};
use adapters::{AdapterLoad, Ensured};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Uri};
use pin::Pinned;
use pool::{Endpoint, EndpointSpec, Pool};
use tokio::time::Instant;

/// Client headers the edge never forwards upstream (besides hop-by-hop ones): credentials and
/// cookies, framing and encodings the edge sets itself, and forwarding headers it rewrites.
fn not_forwarded(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "cookie"
            | "host"
            | "content-length"
            | "content-type"
            | "content-encoding"
            | "accept-encoding"
            | "expect"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
    )
}

/// How one attempt ended.
enum Attempt {
    /// A response head arrived.
    Answered(Response<UpstreamBody>),
    /// The connection could not be made: nothing was sent, another endpoint may be tried.
    NotSent,
    /// The request may have reached the backend, and then the connection failed.
    Failed,
    /// No response head before the deadline.
    TimedOut,
}

/// A response head from a backend, with where it came from.
pub struct Sent<'p> {
    pub response: Response<UpstreamBody>,
    pub endpoint: &'p Endpoint,
    /// Keeps the request counted on its endpoint until the exchange ends.
    pub guard: InFlight,
    /// When the response head arrived.
    pub answered: Instant,
    /// From the call to the response head, every attempt included.
    pub waited: Duration,
}

/// A request in flight on a pool endpoint: counted by the balancer and the endpoint's gauge
/// until dropped (the router keeps it with the response body).
pub struct InFlight {
    _balancer: balance::InFlight,
    gauge: metrics::Gauge,
    /// The endpoint's chunk-gap histogram, for the body pass-through.
    pub chunk_gap: Arc<crate::metrics::Seconds>,
}

impl InFlight {
    fn start(pool: &Pool, index: usize) -> InFlight {
        let m = &pool.endpoints[index].metrics;
        m.in_flight.increment(1.0);
        InFlight {
            _balancer: pool.balancer.start(index),
            gauge: m.in_flight.clone(),
            chunk_gap: Arc::clone(&m.chunk_gap),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Sends requests to the pools' backends, with the first-byte and idle timeouts.
pub struct Upstreams {
    first_byte: Duration,
    idle: Duration,
}

impl Upstreams {
    /// Upstream calls bounded by `first_byte` (to the response head) and `idle` (silence
    /// inside a body).
    pub fn new(first_byte: Duration, idle: Duration) -> Upstreams {
        Upstreams { first_byte, idle }
    }

    /// Sends a pinned body to the pool. The balancer picks each attempt's endpoint (sticky for
    /// `affinity`, an adapter's target id); with `load` (an adapter on a pool that loads them),
    /// the endpoint first loads the adapter if it has not yet. A further endpoint is tried only
    /// while no request byte has reached a backend (connect refused or failed, adapter load
    /// failed), at most `retries` times and within the pool's retry budget. Returns the response
    /// (head received), the endpoint, and the guard that keeps the request counted on that
    /// endpoint until the exchange ends.
    ///
    /// Not an `async fn`: the body's slices move into one shared list before the future is
    /// built, so the future holds neither the body nor a second copy of its arguments.
    pub fn send<'p>(
        &'p self,
        pool: &'p Pool,
        affinity: Option<&'p str>,
        load: Option<&'p AdapterLoad>,
        path: &'static str,
        mut headers: HeaderMap,
        body: Pinned,
    ) -> impl Future<Output = Result<Sent<'p>, EdgeError>> + Send + 'p {
        // One allocation holds the slices for every attempt (a retry re-sends the same body).
        let chunks: Arc<[Bytes]> = Arc::from(body.chunks.as_slice());
        let len = body.len;
        drop(body);
        async move {
            let start = Instant::now();
            let deadline = start + self.first_byte;
            pool.budget.deposit(start);
            // Retries are at most 10 (config), so the tried set fits on the stack.
            let mut tried = [0usize; 11];
            let mut attempts = 0usize;
            let mut now = start;
            loop {
                if attempts > 0 {
                    now = Instant::now();
                }
                let index = pool
                    .balancer
                    .pick(affinity, &tried[..attempts], now)
                    .ok_or(EdgeError::UpstreamUnavailable)?;
                tried[attempts] = index;
                attempts += 1;
                let endpoint = &pool.endpoints[index];
                let guard = InFlight::start(pool, index);
                endpoint.metrics.picks.increment(1);
                if let Some(load) = load {
                    if !self
                        .load_step(pool, index, load, deadline, attempts)
                        .await?
                    {
                        continue;
                    }
                }
                // Time to first byte starts here: a load's wait says nothing of the endpoint's speed.
                let sent_at = if load.is_some() { Instant::now() } else { now };
                // The last possible attempt takes the headers; earlier ones send a copy.
                let last = attempts > pool.retries as usize || attempts >= pool.endpoints.len();
                let attempt_headers = if last {
                    std::mem::take(&mut headers)
                } else {
                    headers.clone()
                };
                let outcome = self
                    .attempt(
                        pool,
                        endpoint,
                        path,
                        attempt_headers,
                        &chunks,
                        len,
                        deadline,
                    )
                    .await;
                match outcome {
                    Attempt::Answered(response) => {
                        let answered = Instant::now();
                        let ttfb = answered - sent_at;
                        pool.balancer.observe_latency(index, ttfb, answered);
                        endpoint.metrics.ttfb.record(ttfb);
                        if response.status().is_server_error() {
                            self.failed(pool, index, answered);
                        } else {
                            pool.balancer.success(index);
                        }
                        if let (Some(load), Some(loads)) = (load, &pool.loads) {
                            if response.status() == http::StatusCode::NOT_FOUND {
                                // vLLM no longer knows the adapter (restarted, or unloaded): the
                                // next request loads it again.
                                loads.forget(index, &load.target);
                            }
                        }
                        return Ok(Sent {
                            response,
                            endpoint,
                            guard,
                            answered,
                            waited: answered - start,
                        });
                    }
                    Attempt::NotSent => {
                        self.failed(pool, index, Instant::now());
                        if let Some(loads) = &pool.loads {
                            // A refused connect often means a restart, which forgets every adapter.
                            loads.forget_endpoint(index);
                        }
                        if !self.may_retry(pool, attempts) {
                            return Err(EdgeError::UpstreamUnavailable);
                        }
                    }
                    Attempt::Failed => {
                        self.failed(pool, index, Instant::now());
                        return Err(EdgeError::UpstreamFailed);
                    }
                    Attempt::TimedOut => return Err(EdgeError::UpstreamTimeout),
                }
            }
        }
    }

    /// One attempt on one endpoint.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        pool: &Pool,
        endpoint: &Endpoint,
        path: &'static str,
        headers: HeaderMap,
        chunks: &Arc<[Bytes]>,
        len: usize,
        deadline: Instant,
    ) -> Attempt {
        let (h2c, host) = match &endpoint.spec {
            EndpointSpec::Echo { word_delay } => {
                let whole = chunks.concat();
                let r = echo::respond(&whole, *word_delay);
                return Attempt::Answered(r.map(UpstreamBody::Echo));
            }
            EndpointSpec::Http { h2c, host, .. } => (*h2c, host),
        };
        // HTTP/1.1 requests name only the path (origin form); h2c ones the whole URI.
        let uri = match &endpoint.conns {
            Some(_) => endpoint.path(path).map(Uri::from),
            None => endpoint.uri(path),
        };
        let Some(uri) = uri else {
            return Attempt::NotSent;
        };
        let mut req = Request::new(ChunksBody::new(Arc::clone(chunks), len));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        // Set here rather than by the client, which would format both for every request.
        if !h2c {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, crate::headers::content_length(len));
        if let Some(auth) = &pool.authorization {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        if let Some(conns) = &endpoint.conns {
            return attempt_h1(pool, endpoint, conns, req, deadline).await;
        }
        match tokio::time::timeout_at(deadline, pool.client.for_h2c(h2c).request(req)).await {
            Ok(Ok(response)) => Attempt::Answered(response.map(UpstreamBody::Remote)),
            Ok(Err(e)) if e.is_connect() => {
                tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "upstream connect failed: {e}");
                Attempt::NotSent
            }
            Ok(Err(e)) => {
                tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "upstream request failed: {e}");
                Attempt::Failed
            }
            Err(_) => Attempt::TimedOut,
        }
    }

    /// Before an attempt on a pool that loads adapters: makes sure endpoint `index` has the
    /// request's adapter. `Ok(true)`: send; `Ok(false)`: the load failed and another endpoint
    /// may be tried (nothing was sent); `Err`: no attempt is left, or the deadline passed.
    async fn load_step(
        &self,
        pool: &Pool,
        index: usize,
        load: &AdapterLoad,
        deadline: Instant,
        attempts: usize,
    ) -> Result<bool, EdgeError> {
        let Some(loads) = &pool.loads else {
            return Ok(true);
        };
        match loads.ensure(pool, index, load, deadline).await {
            Ensured::Ready => Ok(true),
            Ensured::Failed { unhealthy } => {
                if unhealthy {
                    self.failed(pool, index, Instant::now());
                }
                if self.may_retry(pool, attempts) {
                    Ok(false)
                } else {
                    Err(EdgeError::UpstreamUnavailable)
                }
            }
            Ensured::PastDeadline => Err(EdgeError::UpstreamTimeout),
        }
    }

    /// Whether a request that made `attempts` attempts, none of which sent a byte, may try
    /// another endpoint: within `retries`, the pool's size and its retry budget.
    fn may_retry(&self, pool: &Pool, attempts: usize) -> bool {
        let more = attempts <= pool.retries as usize && attempts < pool.endpoints.len();
        if !more {
            return false;
        }
        if !pool.budget.withdraw(Instant::now()) {
            pool.metrics.budget_exhausted.increment(1);
            return false;
        }
        pool.metrics.retries.increment(1);
        true
    }

    fn failed(&self, pool: &Pool, index: usize, now: Instant) {
        if pool.balancer.failure(index, now) {
            let endpoint = &pool.endpoints[index];
            endpoint.metrics.ejections.increment(1);
            tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "endpoint ejected after consecutive failures");
        }
    }

    /// The response the client gets from a backend response: hop-by-hop headers dropped, the
    /// body passed through frame by frame (scanned for its usage), streams marked uncacheable
    /// and unbuffered. `strip_usage`: the edge asked for the usage chunk, the client did not.
    pub fn client_response(&self, reply: Sent<'_>, strip_usage: bool) -> Response<EdgeBody> {
        let (mut parts, body) = reply.response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map_or(&b""[..], |v| v.as_bytes());
        let sse = content_type.starts_with(b"text/event-stream");
        let scan = if sse {
            UsageScan::Sse(Box::new(SseUsageScan::new(strip_usage)))
        } else if content_type.starts_with(b"application/json") {
            UsageScan::Json(JsonUsageScan::new())
        } else {
            UsageScan::None
        };
        if sse {
            parts
                .headers
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            parts
                .headers
                .insert(&h::X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::CONTENT_ENCODING);
        }
        let inner = Passthrough::new(
            body,
            reply.answered,
            self.idle,
            sse,
            scan,
            Some(reply.guard),
        );
        Response::from_parts(parts, EdgeBody::proxied(inner))
    }
}

/// One attempt on an HTTP/1.1 endpoint: on an idle connection if there is one, else on a new
/// one. A parked connection that the backend turns out to have closed (nothing of the request
/// could be written, or the connection ended before a byte of an answer) is replaced by a new
/// one, and the request goes out once more: a backend that closes an idle connection has not
/// taken the request in. A new connection that fails before writing is a connect failure; one
/// that fails after is not retried.
///
/// Not an `async fn`, which would keep the request twice in its future.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc comment
fn attempt_h1<'a>(
    pool: &'a Pool,
    endpoint: &'a Endpoint,
    conns: &'a Arc<h1::Conns>,
    mut req: Request<ChunksBody>,
    deadline: Instant,
) -> impl Future<Output = Attempt> + Send + 'a {
    async move {
        let mut parked = conns.take();
        loop {
            let reused = parked.is_some();
            let mut conn = match parked.take() {
                Some(conn) => conn,
                None => match tokio::time::timeout_at(deadline, conns.connect()).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "upstream connect failed: {e}");
                        return Attempt::NotSent;
                    }
                    Err(_) => return Attempt::TimedOut,
                },
            };
            match tokio::time::timeout_at(deadline, conn.send(req)).await {
                Ok(Ok(response)) => {
                    let home = Arc::clone(conns);
                    return Attempt::Answered(
                        response.map(|body| UpstreamBody::H1(h1::H1Body::new(body, conn, home))),
                    );
                }
                Ok(Err(h1::SendError {
                    error: e,
                    sent,
                    request,
                })) => match request {
                    // A parked connection the backend had closed, before it wrote or answered a
                    // byte: once more, on a new connection.
                    Some(again) if reused => {
                        tracing::debug!(pool = %pool.name, endpoint = %endpoint.label, "parked upstream connection was closed ({e}); sending on a new one");
                        req = again;
                    }
                    _ => {
                        tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "upstream request failed: {e}");
                        return if sent {
                            Attempt::Failed
                        } else {
                            Attempt::NotSent
                        };
                    }
                },
                Err(_) => return Attempt::TimedOut,
            }
        }
    }
}

/// The headers a backend receives: the client's, less hop-by-hop and [`not_forwarded`] ones,
/// plus the edge's own (`content-type`, `accept-encoding: identity`, request id, client address).
pub fn request_headers(
    mut headers: HeaderMap,
    request_id: &HeaderValue,
    client_ip: &HeaderValue,
) -> HeaderMap {
    h::strip_hop_by_hop_and(&mut headers, not_forwarded);
    headers.insert(header::CONTENT_TYPE, h::APPLICATION_JSON.clone());
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.insert(&h::X_REQUEST_ID, request_id.clone());
    headers.insert(&h::X_FORWARDED_FOR, client_ip.clone());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;

    #[test]
    fn upstream_headers_drop_credentials_and_framing() {
        let mut hm = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer ark_live_secretsecretsecretsecret"),
            ("cookie", "a=b"),
            ("host", "acme.arkor.app"),
            ("content-type", "application/json; charset=utf-16"),
            ("content-encoding", "gzip"),
            ("content-length", "10"),
            ("accept-encoding", "gzip"),
            ("x-forwarded-for", "1.2.3.4"),
            ("connection", "close"),
            ("x-stainless-lang", "python"),
            ("user-agent", "OpenAI/Python"),
        ] {
            hm.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = request_headers(
            hm,
            &HeaderValue::from_static("rid"),
            &HeaderValue::from_static("127.0.0.1"),
        );
        assert!(out.get("authorization").is_none());
        assert!(out.get("cookie").is_none());
        assert!(out.get("host").is_none());
        assert!(out.get("content-length").is_none());
        assert!(out.get("content-encoding").is_none());
        assert!(out.get("connection").is_none());
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["accept-encoding"], "identity");
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
        assert_eq!(out["x-request-id"], "rid");
        assert_eq!(out["x-stainless-lang"], "python");
        assert_eq!(out["user-agent"], "OpenAI/Python");
    }
}
