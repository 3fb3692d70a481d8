//! The admin listener (SPEC §5): health, readiness, metrics, pushed control-plane events and
//! the state summary. It listens on its own address (loopback by default); none of these paths
//! exists on the data listeners.
//!
//! | path | auth | answer |
//! |---|---|---|
//! | `GET /healthz` | none | 200 while the process runs |
//! | `GET /readyz` | none | 200 once a whole state is loaded, else 503 |
//! | `GET /metrics` | none | Prometheus text |
//! | `POST /admin/v1/events` | admin token | applies one event or an array, all or nothing, then 200 |
//! | `GET /admin/v1/state` | admin token | revision, counts, last sync |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::metrics as m;
use crate::registry::{Applied, Event, Registry};
use crate::sync::SyncStatus;

/// Admin connections open at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Bound on reading an admin request head.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reading a pushed batch.
pub const ADMIN_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the admin endpoints read.
pub struct Admin {
    pub registry: Arc<Registry>,
    pub status: Arc<SyncStatus>,
    pub token: Option<Secret>,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    /// `file` or `pull`.
    pub source: &'static str,
}

/// Serves the admin listener until `shutdown`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let admin = Arc::clone(&admin);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, Infallible>(handle(&admin, req).await) }
                }),
            )
            .into_owned();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// Answers one admin request.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if admin.registry.is_loaded() => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "no state loaded yet\n"),
        (&Method::GET, "/metrics") => metrics(admin),
        (_, p) if p.starts_with("/admin/") => {
            if !authorized(admin, &req) {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
            }
            match (req.method(), p) {
                (&Method::POST, "/admin/v1/events") => push(admin, req).await,
                (&Method::GET, "/admin/v1/state") => state(admin),
                (_, "/admin/v1/events" | "/admin/v1/state") => {
                    error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
                }
                _ => error(StatusCode::NOT_FOUND, "unknown admin path"),
            }
        }
        (_, "/healthz" | "/readyz" | "/metrics") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "unknown path"),
    }
}

fn authorized(admin: &Admin, req: &Request<Incoming>) -> bool {
    let Some(token) = &admin.token else {
        return false;
    };
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|presented| token.matches(presented))
}

/// `POST /admin/v1/events`: one event or an array. Nothing is applied unless every event parses
/// and validates; the answer comes after the events are applied, so a 200 revocation is in force
/// for every request that starts afterwards.
async fn push(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = Limited::new(req.into_body(), admin.max_body_bytes);
    let bytes = match tokio::time::timeout(ADMIN_BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large or broken"),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "body not received in time"),
    };
    let events = match parse_events(&bytes) {
        Ok(events) => events,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let count = events.len();
    // The writer lock may be held for seconds by a large snapshot: wait for it on a blocking
    // thread, not on a runtime worker that serves requests.
    let registry = Arc::clone(&admin.registry);
    let applied = tokio::task::spawn_blocking(move || registry.apply_batch(events)).await;
    let outcomes = match applied {
        Ok(Ok(o)) => o,
        Err(e) => {
            tracing::error!("pushed batch not applied: {e}");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the batch could not be applied",
            );
        }
        Ok(Err((index, why))) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("event {index} is invalid, nothing applied: {why}"),
            );
        }
    };
    let (mut applied, mut stale, mut rejected) = (0, 0, Vec::new());
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let result = match outcome {
            Applied::Changed => {
                applied += 1;
                "applied"
            }
            Applied::Stale => {
                stale += 1;
                "stale"
            }
            Applied::Rejected(reason) => {
                tracing::error!("pushed event {index} refused: {reason}");
                rejected.push(json!({"index": index, "reason": reason}));
                "rejected"
            }
        };
        metrics::counter!(m::SYNC_EVENTS, "source" => "push", "result" => result).increment(1);
    }
    tracing::info!(
        count,
        applied,
        stale,
        rejected = rejected.len(),
        "events pushed"
    );
    json_response(
        StatusCode::OK,
        &json!({"applied": applied, "stale": stale, "rejected": rejected,
                "revision": admin.registry.revision()}),
    )
}

/// One event object or an array of them; the error names the event and what is wrong.
fn parse_events(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("body is not JSON: {e}"))?;
    let items = match value {
        Value::Array(items) => items,
        one @ Value::Object(_) => vec![one],
        _ => return Err("body must be an event object or an array of events".to_owned()),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value::<Event>(v)
                .map_err(|e| format!("event {i} is invalid, nothing applied: {e}"))
        })
        .collect()
}

fn state(admin: &Admin) -> Response<Full<Bytes>> {
    let (deployments, keys) = admin.registry.counts();
    let last_sync = admin.status.last_contact_ms().map(|ms| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    });
    json_response(
        StatusCode::OK,
        &json!({
            "revision": admin.registry.revision(),
            "loaded": admin.registry.is_loaded(),
            "deployments": deployments,
            "keys": keys,
            "source": admin.source,
            "lastSyncAt": last_sync,
            "reconnects": admin.status.reconnects(),
        }),
    )
}

fn metrics(admin: &Admin) -> Response<Full<Bytes>> {
    // Gauges that describe the state are read when scraped rather than kept up to date on every
    // event.
    let (deployments, keys) = admin.registry.counts();
    metrics::gauge!(m::REVISION).set(admin.registry.revision() as f64);
    metrics::gauge!(m::ENTRIES, "kind" => "deployments").set(deployments as f64);
    metrics::gauge!(m::ENTRIES, "kind" => "keys").set(keys as f64);
    if let Some(ms) = admin.status.last_contact_ms() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        metrics::gauge!(m::SYNC_LAG).set(now.saturating_sub(ms) as f64 / 1000.0);
    }
    let mut r = Response::new(Full::new(Bytes::from(m::render(&admin.metrics))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({"error": {"message": message}}))
}
