//! The request pipeline of SPEC §2, top to bottom:
//! host → deployment → CORS preflight → key → route → (proxy: body → pin → upstream → stream).
//!
//! [`serve`] is one function of early returns in the SPEC's decision order. Every failure is an
//! [`EdgeError`], turned into a response in one place ([`handle`]) and logged there once.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access::{Access, UsageTarget};
use crate::auth;
use crate::error::{EdgeError, Source};
use crate::headers::{self as h};
use crate::host::Slug;
use crate::limits::{AuthFailures, Decision, RateLimiter};
use crate::proxy::{self, Upstreams};
use crate::registry::{ApiKey, AuthMode, Deployment, Registry};
use crate::stream::{EdgeBody, read_request_body};
use crate::usage::UsageSink;

/// What the edge does for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Proxied to the deployment's pool at this upstream path.
    Proxy(&'static str),
    /// `GET /v1/models`, answered at the edge.
    Models,
}

/// One row of the route table.
pub struct Route {
    pub path: &'static str,
    pub method: Method,
    /// The `allow` header for a 405 on this path.
    pub allow: &'static str,
    pub action: Action,
}

/// Every operation the edge serves. Another OpenAI operation is one more row.
pub static ROUTES: [Route; 2] = [
    Route {
        path: "/v1/chat/completions",
        method: Method::POST,
        allow: "POST, OPTIONS",
        action: Action::Proxy("/v1/chat/completions"),
    },
    Route {
        path: "/v1/models",
        method: Method::GET,
        allow: "GET, OPTIONS",
        action: Action::Models,
    },
];

/// Looks a request up in [`ROUTES`]: unknown path → 404, known path and other method → 405.
pub fn route(method: &Method, path: &str) -> Result<Action, EdgeError> {
    let row = ROUTES
        .iter()
        .find(|r| r.path == path)
        .ok_or(EdgeError::UnknownUrl)?;
    if row.method == *method {
        Ok(row.action)
    } else {
        Err(EdgeError::MethodNotAllowed(row.allow))
    }
}

/// Everything the pipeline reads; shared by all connections.
pub struct Edge {
    pub registry: Arc<Registry>,
    pub upstreams: Upstreams,
    /// Normalised base domains.
    pub base_domains: Vec<String>,
    pub max_body_bytes: usize,
    pub client_body: std::time::Duration,
    /// Where proxied requests' usage is counted.
    pub usage: Arc<UsageSink>,
    /// Whether each request gets an access log line.
    pub access_log: bool,
    /// Token buckets per key (per deployment without keys), when `[rate_limits]` is set.
    pub rate: Option<Arc<RateLimiter>>,
    /// Failed key checks per client address, when `limits.max_auth_failures` is not 0.
    pub auth_failures: Option<Arc<AuthFailures>>,
}

/// Per-connection facts the pipeline needs.
#[derive(Clone)]
pub struct ConnInfo {
    /// The client's address (the TCP peer).
    pub peer_ip: std::net::IpAddr,
    /// The client's IP, as sent upstream in `x-forwarded-for`.
    pub client_ip: HeaderValue,
    /// The TLS server name the client asked for (normalised), on TLS connections that sent one.
    pub sni: Option<Arc<str>>,
}

static EXPOSE_HEADERS: HeaderValue = HeaderValue::from_static(
    "x-request-id, retry-after, retry-after-ms, x-should-retry, x-ratelimit-limit-requests, \
     x-ratelimit-remaining-requests, x-ratelimit-reset-requests",
);

/// Serves one request; never fails (errors become OpenAI error responses).
///
/// This and the steps below it return `async move` blocks rather than being `async fn`s: an
/// `async fn` keeps each argument twice in its future (as passed and as bound), and a request's
/// futures nest several levels deep, each moved into the next.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc comment
pub fn handle<'a>(
    edge: &'a Edge,
    conn: &'a ConnInfo,
    req: Request<Incoming>,
) -> impl Future<Output = Response<EdgeBody>> + Send + 'a {
    async move {
        let request_id = h::request_id(req.headers());
        let mut access = Access::begin(request_id.clone(), edge.access_log);
        let mut response = match serve(edge, conn, req, &request_id, &mut access).await {
            Ok(response) => response,
            Err(err) => {
                match err.source() {
                    Source::Client => {
                        tracing::debug!(request_id = ?request_id, code = err.code(), "refused")
                    }
                    Source::Upstream => {
                        tracing::warn!(request_id = ?request_id, code = err.code(), "upstream failure")
                    }
                }
                access.code = err.code();
                err.into_response()
            }
        };
        access.status = response.status().as_u16();
        if access.code == "client_closed" {
            // No error of the edge's own: a success, or the backend's error passed through.
            access.code = if access.status >= 400 {
                "upstream"
            } else {
                "ok"
            };
        }
        let headers = response.headers_mut();
        if let Some(quota) = access.quota {
            quota.apply(false, headers);
        }
        headers.insert(&h::X_REQUEST_ID, request_id);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            EXPOSE_HEADERS.clone(),
        );
        response.body_mut().attach(access);
        response
    }
}

/// SPEC §2's decision order, one early return per step. Fills `access` as it learns.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc comment
fn serve<'a>(
    edge: &'a Edge,
    conn: &'a ConnInfo,
    req: Request<Incoming>,
    request_id: &'a HeaderValue,
    access: &'a mut Access,
) -> impl Future<Output = Result<Response<EdgeBody>, EdgeError>> + Send + 'a {
    async move {
        // 1. Host → slug → enabled deployment. Disabled and unknown look the same.
        let host = host_of(&req).ok_or(EdgeError::DeploymentNotFound)?;
        if let Some(sni) = &conn.sni {
            if !same_host(host, sni) {
                return Err(EdgeError::MisdirectedRequest);
            }
        }
        let slug =
            Slug::from_host(host, &edge.base_domains).ok_or(EdgeError::DeploymentNotFound)?;
        access.slug = Some(slug);
        let deployment = edge
            .registry
            .deployment(&slug)
            .filter(|d| d.enabled)
            .ok_or(EdgeError::DeploymentNotFound)?;

        // 2. CORS preflight: browsers send no key with it.
        if req.method() == Method::OPTIONS {
            return Ok(preflight(&req));
        }

        // 3. Key.
        let key = match deployment.auth_mode {
            AuthMode::FixedApiKey => Some(checked_key(edge, conn, &deployment, &req, access)?),
            AuthMode::None => None,
        };

        // 4. Route.
        let action = route(req.method(), req.uri().path())?;

        // 5. Rate limit, per key (per deployment when it has none).
        if let Some(rate) = &edge.rate {
            let subject = key.as_ref().map_or(&deployment.id, |k| &k.id);
            match rate.check(subject, tokio::time::Instant::now()) {
                Decision::Allowed(quota) => access.quota = Some(quota),
                Decision::Limited(quota) => return Err(EdgeError::RateLimited(quota)),
            }
        }

        match action {
            Action::Models => Ok(json(deployment.models_body())),
            Action::Proxy(path) => {
                // Every proxied request counts for usage, whatever its outcome.
                access.usage_target = Some(UsageTarget {
                    sink: Arc::clone(&edge.usage),
                    deployment: Arc::clone(&deployment),
                    key,
                });
                // Not boxed here: the listener boxes each request's whole future once.
                forward(edge, conn, req, &deployment, path, request_id, access).await
            }
        }
    }
}

/// The host a request is addressed to: the URI authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1.1 target, which RFC 9112 puts above `Host`), else the one `Host` header.
fn host_of(req: &Request<Incoming>) -> Option<&[u8]> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().as_bytes());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => Some(host.as_bytes()),
        _ => None,
    }
}

/// Whether a `Host` value (port and trailing dot ignored, any case) names `sni` (already
/// normalised by [`crate::tls::normalise_sni`]); when not, the request is misdirected (421).
pub fn same_host(host: &[u8], sni: &str) -> bool {
    let name = match memchr::memrchr(b':', host) {
        Some(i) if !host.starts_with(b"[") => &host[..i],
        _ => host,
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    name.eq_ignore_ascii_case(sni.as_bytes())
}

/// The key check with its brake: an address with too many recent failures is refused before
/// its key is even hashed, and every invalid key counts against its address.
fn checked_key(
    edge: &Edge,
    conn: &ConnInfo,
    deployment: &Deployment,
    req: &Request<Incoming>,
    access: &mut Access,
) -> Result<Arc<ApiKey>, EdgeError> {
    let Some(failures) = &edge.auth_failures else {
        return authenticate(&edge.registry, deployment, req, access);
    };
    let now = tokio::time::Instant::now();
    if let Some(left) = failures.is_blocked(conn.peer_ip, now) {
        return Err(EdgeError::AuthBlocked(left));
    }
    let checked = authenticate(&edge.registry, deployment, req, access);
    if let Err(EdgeError::InvalidApiKey) = &checked {
        failures.record_failure(conn.peer_ip, now);
    }
    checked
}

/// The key must hash to a live key of this very deployment.
fn authenticate(
    registry: &Registry,
    deployment: &Deployment,
    req: &Request<Incoming>,
    access: &mut Access,
) -> Result<Arc<ApiKey>, EdgeError> {
    let presented = auth::presented_key(req.headers())?;
    access.key = Some(presented.prefix);
    match registry.key(&presented.hash) {
        Some(key) if key.enabled && *key.deployment_id == *deployment.id => Ok(key),
        _ => Err(EdgeError::InvalidApiKey),
    }
}

/// Reads, pins and sends a request to the deployment's pool; streams the answer back.
async fn forward(
    edge: &Edge,
    conn: &ConnInfo,
    req: Request<Incoming>,
    deployment: &Deployment,
    path: &'static str,
    request_id: &HeaderValue,
    access: &mut Access,
) -> Result<Response<EdgeBody>, EdgeError> {
    let upstream = deployment.upstream.as_ref().map_err(|e| *e)?;
    let (parts, body) = req.into_parts();
    let body = read_request_body(body, edge.max_body_bytes, edge.client_body).await?;
    let pinned = proxy::pin::pin(&body, upstream.owned, &upstream.members)
        .map_err(EdgeError::InvalidBody)?;
    let strip_usage = pinned.strip_usage;
    let headers = proxy::request_headers(parts.headers, request_id, &conn.client_ip);
    let affinity = upstream.affinity.as_deref();
    let reply = edge
        .upstreams
        .send(
            &upstream.pool,
            affinity,
            upstream.load.as_deref(),
            path,
            headers,
            pinned,
        )
        .await?;
    crate::metrics::hot().upstream_ttfb.record(reply.waited);
    access.ttfb = Some(reply.waited);
    access.endpoint = Some(Arc::clone(&reply.endpoint.label));
    Ok(edge.upstreams.client_response(reply, strip_usage))
}

fn json(body: bytes::Bytes) -> Response<EdgeBody> {
    let mut r = Response::new(EdgeBody::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, h::APPLICATION_JSON.clone());
    r
}

/// 204 with the CORS headers a browser needs before a keyed POST.
fn preflight(req: &Request<Incoming>) -> Response<EdgeBody> {
    let mut r = Response::new(EdgeBody::from(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let out = r.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    // `*` does not cover `authorization`, so the requested names are echoed (the browser
    // already limits them to valid header names).
    let requested = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    out.insert(
        header::VARY,
        HeaderValue::from_static("access-control-request-headers"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_comparison() {
        assert!(same_host(b"acme.arkor.app", "acme.arkor.app"));
        assert!(same_host(b"ACME.arkor.app.:443", "acme.arkor.app"));
        assert!(!same_host(b"other.arkor.app", "acme.arkor.app"));
        assert!(!same_host(b"acme.arkor.app.evil", "acme.arkor.app"));
    }

    #[test]
    fn route_table() {
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions"),
            Ok(Action::Proxy("/v1/chat/completions"))
        );
        assert_eq!(route(&Method::GET, "/v1/models"), Ok(Action::Models));
        assert_eq!(
            route(&Method::GET, "/v1/chat/completions"),
            Err(EdgeError::MethodNotAllowed("POST, OPTIONS"))
        );
        assert_eq!(
            route(&Method::POST, "/v1/models"),
            Err(EdgeError::MethodNotAllowed("GET, OPTIONS"))
        );
        for path in [
            "/",
            "/v1",
            "/v1/chat/completions/",
            "/V1/models",
            "/v1/embeddings",
        ] {
            assert_eq!(
                route(&Method::POST, path),
                Err(EdgeError::UnknownUrl),
                "{path}"
            );
        }
    }
}
