//! The upstream side: pooled clients, the attempt loop, and the headers each way.
//!
//! A request is sent to the endpoints of its pool in pick order. It moves on to the next endpoint
//! only when the connection could not be made (connect refused or timed out), so a backend never
//! receives the same request twice; every other failure is final. The whole wait for a response
//! head is bounded by `timeouts.upstream_first_byte`.

pub mod balance;
pub mod client;
pub mod echo;
pub mod pin;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use tokio::time::Instant;

use crate::error::EdgeError;
use crate::headers::{self as h, strip_hop_by_hop};
use crate::stream::{ChunksBody, EdgeBody, Passthrough, UpstreamBody, UsageScan};
use crate::usage::scan::{JsonUsageScan, SseUsageScan};
use pin::Pinned;
use pool::{Endpoint, EndpointSpec, Pool};

/// Client headers the edge never forwards upstream (besides hop-by-hop ones): credentials and
/// cookies, framing and encodings the edge sets itself, and forwarding headers it rewrites.
static NOT_FORWARDED: [HeaderName; 13] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::ACCEPT_ENCODING,
    header::EXPECT,
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-real-ip"),
];

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

    /// Sends a pinned body to the pool, trying further endpoints only while no request byte has
    /// reached a backend. Returns the response (head received) and the endpoint that gave it.
    pub async fn send<'p>(
        &self,
        pool: &'p Pool,
        path: &'static str,
        headers: HeaderMap,
        body: Pinned,
    ) -> Result<(Response<UpstreamBody>, &'p Endpoint), EdgeError> {
        let deadline = Instant::now() + self.first_byte;
        let chunks: Arc<[Bytes]> = body.chunks.into();
        for endpoint in pool.attempts() {
            let client = match &endpoint.spec {
                EndpointSpec::Echo { word_delay } => {
                    let whole = chunks.concat();
                    let r = echo::respond(&whole, *word_delay);
                    return Ok((r.map(UpstreamBody::Echo), endpoint));
                }
                EndpointSpec::Http { h2c, .. } => pool.client.for_h2c(*h2c),
            };
            let uri = endpoint.uri(path).ok_or(EdgeError::UpstreamUnavailable)?;
            let mut req = Request::new(ChunksBody::new(Arc::clone(&chunks), body.len));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            *req.headers_mut() = headers.clone();
            if let Some(auth) = &pool.authorization {
                req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
            }
            match tokio::time::timeout_at(deadline, client.request(req)).await {
                Ok(Ok(response)) => return Ok((response.map(UpstreamBody::Remote), endpoint)),
                Ok(Err(e)) if e.is_connect() => {
                    tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "upstream connect failed: {e}");
                }
                Ok(Err(e)) => {
                    tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "upstream request failed: {e}");
                    return Err(EdgeError::UpstreamFailed);
                }
                Err(_) => return Err(EdgeError::UpstreamTimeout),
            }
        }
        Err(EdgeError::UpstreamUnavailable)
    }

    /// The response the client gets from a backend response: hop-by-hop headers dropped, the
    /// body passed through frame by frame (scanned for its usage), streams marked uncacheable
    /// and unbuffered. `strip_usage`: the edge asked for the usage chunk, the client did not.
    pub fn client_response(
        &self,
        upstream: Response<UpstreamBody>,
        strip_usage: bool,
    ) -> Response<EdgeBody> {
        let (mut parts, body) = upstream.into_parts();
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
        let inner = Passthrough::new(body, self.idle, sse, scan);
        Response::from_parts(parts, EdgeBody::proxied(inner))
    }
}

/// The headers a backend receives: the client's, less hop-by-hop and [`NOT_FORWARDED`] ones,
/// plus the edge's own (`content-type`, `accept-encoding: identity`, request id, client address).
pub fn request_headers(
    mut headers: HeaderMap,
    request_id: &HeaderValue,
    client_ip: &HeaderValue,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for name in &NOT_FORWARDED {
        headers.remove(name);
    }
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
