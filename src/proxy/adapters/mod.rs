//! Run-time adapter loading on vLLM pools (`load_adapters = true`).
//!
//! The first time the edge routes an adapter target to an endpoint, it asks that vLLM server to
//! load it — `POST /v1/load_lora_adapter` with `{"lora_name": <target id>, "lora_path": <the
//! pool's rendered source>}` — before the request itself is sent. So the load step runs while no
//! request byte has reached the backend, and a failed load moves the request to another endpoint
//! like a refused connect.
//!
//! - **Coalesced**: each endpoint has a table of target id → shared cell. Every request for the
//!   same (endpoint, target) waits on the one load in flight and shares its outcome, success or
//!   failure; only the request that ran the load reports it to metrics and passive health.
//! - **Marks**: a successful load leaves the cell in the table, so later requests go straight
//!   through. A failed one is removed, so the next request tries again.
//! - **Forgetting**: vLLM keeps run-time adapters until it restarts (or someone unloads them).
//!   A 404 from an endpoint for a marked target, or a refused connect to it (a restart shows as
//!   one), drops the marks, and the next request loads again. The 404 itself is passed through:
//!   the backend already answered it.
//! - **Bounded**: at most `max_loaded_adapters` marks per endpoint; a new target beyond that
//!   evicts a random one, which costs at most one extra load call, answered "already loaded".
//!   Each load, and each wait for one, ends by the pool's `load_timeout` and the request's own
//!   first-byte deadline, whichever comes first.
//!
//! vLLM's answers: 2xx is loaded; a 400 whose body says the adapter "has already been loaded" is
//! loaded too; any other status, a transport error or the timeout is a failed load. Only a refused
//! connect or a 5xx counts toward the endpoint's ejection: a 4xx is about the adapter (a wrong
//! path, run-time loading switched off), not the server's health.

pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::error::EdgeError;
use crate::metrics as m;
use crate::proxy::pool::{Endpoint, EndpointSpec, Pool};
use crate::stream::ChunksBody;
pub use source::AdapterSources;

/// vLLM's route for loading an adapter at run time (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).
pub const LOAD_PATH: &str = "/v1/load_lora_adapter";
/// What vLLM says when the adapter name is already registered (400 InvalidUserInput).
const ALREADY_LOADED: &[u8] = b"has already been loaded";
/// Most bytes of a load answer read, to recognise "already loaded" and to log.
const MAX_ANSWER_BYTES: usize = 8 * 1024;

/// What the edge sends to load one adapter target, rendered once per deployment.
#[derive(Debug, Clone)]
pub struct AdapterLoad {
    /// The target id: vLLM's `lora_name`, which requests then send as `model`.
    pub target: Arc<str>,
    /// `{"lora_name":…,"lora_path":…}`.
    body: Bytes,
}

/// How the load step of one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The endpoint has the adapter (or needs no load): send the request.
    Ready,
    /// The endpoint could not load it; nothing was sent. `unhealthy`: this request ran the load
    /// and it failed on a refused connect or a 5xx, so it counts toward ejection.
    Failed { unhealthy: bool },
    /// The request's first-byte deadline passed while waiting.
    PastDeadline,
}

/// A finished load, shared by every request that waited on it.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    loaded: bool,
    unhealthy: bool,
}

type Table = HashMap<Arc<str>, Arc<OnceCell<Outcome>>>;

/// One pool's loading state: the sources, the bounds and one mark table per endpoint.
#[derive(Debug)]
pub struct AdapterLoads {
    sources: AdapterSources,
    timeout: Duration,
    capacity: usize,
    tables: Box<[Mutex<Table>]>,
    metrics: LoadMetrics,
}

impl AdapterLoads {
    /// Loading state for a pool of `endpoints` endpoints named `pool`.
    pub fn new(
        pool: &str,
        sources: AdapterSources,
        endpoints: usize,
        timeout: Duration,
        capacity: usize,
    ) -> AdapterLoads {
        AdapterLoads {
            sources,
            timeout,
            capacity: capacity.max(1),
            tables: (0..endpoints).map(|_| Mutex::default()).collect(),
            metrics: LoadMetrics::new(pool),
        }
    }

    /// The load of an adapter target, rendered when a deployment is applied. Fails (503 for
    /// the deployment's requests) when the job id cannot be put in a path safely.
    pub fn request_for(
        &self,
        target: Arc<str>,
        job_id: &str,
        step: Option<u64>,
    ) -> Result<AdapterLoad, EdgeError> {
        let Some(path) = self.sources.render(job_id, step, &target) else {
            tracing::warn!(adapter = %target, "adapter job id is not a plain path segment: not loaded, its requests get 503");
            return Err(EdgeError::NoPool);
        };
        let body = serde_json::json!({"lora_name": &*target, "lora_path": path}).to_string();
        Ok(AdapterLoad {
            target,
            body: Bytes::from(body),
        })
    }

    /// Makes sure endpoint `index` has `load`'s adapter before a request is sent there: at once
    /// when it is marked loaded, else by running (or joining) the endpoint's one load of it.
    pub async fn ensure(
        &self,
        pool: &Pool,
        index: usize,
        load: &AdapterLoad,
        deadline: Instant,
    ) -> Ensured {
        let Some(endpoint) = pool.endpoints.get(index) else {
            return Ensured::Failed { unhealthy: false };
        };
        if !matches!(endpoint.spec, EndpointSpec::Http { .. }) {
            return Ensured::Ready; // in-process backends serve any model
        }
        let Some(cell) = self.cell(index, &load.target) else {
            return Ensured::Failed { unhealthy: false };
        };
        if cell.get().is_some_and(|o| o.loaded) {
            return Ensured::Ready;
        }
        let bound = deadline.min(Instant::now() + self.timeout);
        let mut ran = false;
        let waited = tokio::time::timeout_at(
            bound,
            cell.get_or_init(|| {
                ran = true;
                self.call(pool, endpoint, load)
            }),
        )
        .await;
        match waited {
            Ok(outcome) if outcome.loaded => Ensured::Ready,
            Ok(outcome) => {
                self.remove_if_same(index, &load.target, &cell);
                Ensured::Failed {
                    unhealthy: ran && outcome.unhealthy,
                }
            }
            Err(_) => {
                if ran {
                    self.metrics.timeout.increment(1);
                    tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, adapter = %load.target, "adapter load timed out");
                }
                if Instant::now() >= deadline {
                    Ensured::PastDeadline
                } else {
                    Ensured::Failed { unhealthy: false }
                }
            }
        }
    }

    /// Drops the mark of `target` on endpoint `index` (the endpoint said it does not know it).
    pub fn forget(&self, index: usize, target: &str) {
        if let Some(table) = self.tables.get(index) {
            lock(table).remove(target);
        }
    }

    /// Drops every mark of endpoint `index` (it refused a connection: it may have restarted).
    pub fn forget_endpoint(&self, index: usize) {
        if let Some(table) = self.tables.get(index) {
            lock(table).clear();
        }
    }

    /// Marks held for endpoint `index` (loaded or loading).
    pub fn marks(&self, index: usize) -> usize {
        self.tables.get(index).map_or(0, |t| lock(t).len())
    }

    /// The shared cell of (endpoint, target), made on first use; a full table evicts a
    /// random mark first.
    fn cell(&self, index: usize, target: &Arc<str>) -> Option<Arc<OnceCell<Outcome>>> {
        let mut table = lock(self.tables.get(index)?);
        if let Some(cell) = table.get(&**target) {
            return Some(Arc::clone(cell));
        }
        if table.len() >= self.capacity {
            let victim = table.keys().nth(fastrand::usize(..table.len())).cloned();
            if let Some(victim) = victim {
                table.remove(&victim);
            }
        }
        let cell = Arc::new(OnceCell::new());
        table.insert(Arc::clone(target), Arc::clone(&cell));
        Some(cell)
    }

    /// Removes a failed cell, unless a newer one already took its place.
    fn remove_if_same(&self, index: usize, target: &str, cell: &Arc<OnceCell<Outcome>>) {
        if let Some(table) = self.tables.get(index) {
            let mut table = lock(table);
            if table.get(target).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                table.remove(target);
            }
        }
    }

    /// One load call, reported to metrics and logs once, by the request that runs it.
    async fn call(&self, pool: &Pool, endpoint: &Endpoint, load: &AdapterLoad) -> Outcome {
        let started = Instant::now();
        let answer = request(pool, endpoint, load).await;
        self.metrics.seconds.record(started.elapsed().as_secs_f64());
        let (counter, outcome) = match &answer {
            Answer::Loaded => (&self.metrics.loaded, (true, false)),
            Answer::AlreadyLoaded => (&self.metrics.already_loaded, (true, false)),
            Answer::Status(s, _) if s.is_server_error() => (&self.metrics.failed, (false, true)),
            Answer::Status(..) => (&self.metrics.rejected, (false, false)),
            Answer::Unreachable => (&self.metrics.unreachable, (false, true)),
            Answer::Broken => (&self.metrics.failed, (false, false)),
        };
        counter.increment(1);
        if let Answer::Status(status, text) = &answer {
            tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, adapter = %load.target, %status,
                "adapter load refused (is VLLM_ALLOW_RUNTIME_LORA_UPDATING=True set, and is the adapter at its source?): {text}");
        }
        Outcome {
            loaded: outcome.0,
            unhealthy: outcome.1,
        }
    }
}

/// How a load call was answered.
enum Answer {
    Loaded,
    AlreadyLoaded,
    /// Any other status, with the start of the body for the log.
    Status(StatusCode, String),
    /// The connection could not be made.
    Unreachable,
    /// The connection failed after it was made.
    Broken,
}

/// `POST /v1/load_lora_adapter` on one endpoint, with the pool's credential.
async fn request(pool: &Pool, endpoint: &Endpoint, load: &AdapterLoad) -> Answer {
    let EndpointSpec::Http { h2c, .. } = &endpoint.spec else {
        return Answer::Loaded;
    };
    let Some(uri) = endpoint.uri(LOAD_PATH) else {
        return Answer::Unreachable;
    };
    let len = load.body.len();
    let mut req = Request::new(ChunksBody::new(Arc::from([load.body.clone()]), len));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(auth) = &pool.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let response = match pool.client.for_h2c(*h2c).request(req).await {
        Ok(response) => response,
        Err(e) if e.is_connect() => {
            tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "adapter load: connect failed: {e}");
            return Answer::Unreachable;
        }
        Err(e) => {
            tracing::warn!(pool = %pool.name, endpoint = %endpoint.label, "adapter load failed: {e}");
            return Answer::Broken;
        }
    };
    let status = response.status();
    let text = read_prefix(response.into_body()).await;
    if status.is_success() {
        Answer::Loaded
    } else if status == StatusCode::BAD_REQUEST
        && memchr::memmem::find(&text, ALREADY_LOADED).is_some()
    {
        Answer::AlreadyLoaded
    } else {
        Answer::Status(status, String::from_utf8_lossy(&text).into_owned())
    }
}

/// The first [`MAX_ANSWER_BYTES`] of a body; the rest is not read.
async fn read_prefix(mut body: Incoming) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < MAX_ANSWER_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_ANSWER_BYTES - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    out
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Nothing panics while the lock is held and a table is valid at every step, so a
    // poisoned lock is still safe to use.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-pool load counters by result, and the time of each load call.
#[derive(Debug)]
struct LoadMetrics {
    loaded: metrics::Counter,
    already_loaded: metrics::Counter,
    rejected: metrics::Counter,
    failed: metrics::Counter,
    unreachable: metrics::Counter,
    timeout: metrics::Counter,
    seconds: metrics::Histogram,
}

impl LoadMetrics {
    fn new(pool: &str) -> LoadMetrics {
        let counter = |result: &'static str| metrics::counter!(m::ADAPTER_LOADS, "pool" => pool.to_owned(), "result" => result);
        LoadMetrics {
            loaded: counter("loaded"),
            already_loaded: counter("already_loaded"),
            rejected: counter("rejected"),
            failed: counter("failed"),
            unreachable: counter("unreachable"),
            timeout: counter("timeout"),
            seconds: metrics::histogram!(m::ADAPTER_LOAD_SECONDS, "pool" => pool.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(capacity: usize) -> AdapterLoads {
        let sources = AdapterSources::parse("/m/{job_id}", None).unwrap();
        AdapterLoads::new("t", sources, 2, Duration::from_secs(1), capacity)
    }

    #[test]
    fn marks_are_bounded_per_endpoint() {
        let l = loads(3);
        for i in 0..10 {
            let target: Arc<str> = format!("job-{i}").into();
            assert!(l.cell(0, &target).is_some());
            assert!(l.marks(0) <= 3);
        }
        assert_eq!((l.marks(0), l.marks(1)), (3, 0));
        assert!(l.cell(2, &Arc::from("x")).is_none(), "no such endpoint");
    }

    #[test]
    fn one_cell_per_target_until_forgotten() {
        let l = loads(10);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = l.cell(0, &a).unwrap();
        assert!(Arc::ptr_eq(&first, &l.cell(0, &a).unwrap()));
        assert!(!Arc::ptr_eq(&first, &l.cell(1, &a).unwrap()));
        l.forget(0, "a");
        let second = l.cell(0, &a).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        // A stale failed cell does not remove its replacement.
        l.remove_if_same(0, "a", &first);
        assert!(Arc::ptr_eq(&second, &l.cell(0, &a).unwrap()));
        l.cell(0, &b).unwrap();
        l.forget_endpoint(0);
        assert_eq!((l.marks(0), l.marks(1)), (0, 1));
    }

    #[test]
    fn loads_are_rendered_once_per_target() {
        let l = loads(10);
        let load = l
            .request_for("job-1:step-2".into(), "job-1", Some(2))
            .unwrap();
        assert_eq!(
            &load.body[..],
            br#"{"lora_name":"job-1:step-2","lora_path":"/m/job-1"}"#
        );
        assert_eq!(
            l.request_for("x".into(), "../etc", None).unwrap_err(),
            EdgeError::NoPool
        );
    }
}
