//! Metric names, described once, and the Prometheus recorder.
//!
//! Labels are bounded sets only (status class, error code, pool, endpoint, sync result): never a
//! slug or a key, since a fleet has millions of them. Counters and gauges go through the
//! `metrics` crate; the histograms recorded per request and per streamed chunk are
//! [`histogram::Seconds`], rendered on the same page by [`render`].

mod histogram;

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use metrics::{Counter, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use histogram::{BOUNDS, Seconds};

/// Requests answered, by `class` (`2xx`…`5xx`) and `code` (the edge's error code, or
/// `upstream` when the backend's own status was passed through).
pub const REQUESTS: &str = "arkor_edge_requests_total";
/// From request head to the end of the response body, seconds.
pub const REQUEST_DURATION: &str = "arkor_edge_request_duration_seconds";
/// From sending to a backend to its response head, seconds.
pub const UPSTREAM_TTFB: &str = "arkor_edge_upstream_ttfb_seconds";
/// Response body bytes sent to clients.
pub const RESPONSE_BYTES: &str = "arkor_edge_response_bytes_total";
/// Highest control-plane revision applied.
pub const REVISION: &str = "arkor_edge_state_revision";
/// Deployments and keys held (`kind` = `deployments` | `keys`).
pub const ENTRIES: &str = "arkor_edge_state_entries";
/// Control-plane changes by `source` (`file`, `pull`, `push`) and `result`
/// (`applied`, `stale`, `rejected`).
pub const SYNC_EVENTS: &str = "arkor_edge_sync_events_total";
/// Reconnections of the pull stream.
pub const SYNC_RECONNECTS: &str = "arkor_edge_sync_reconnects_total";
/// Seconds since the control plane was last heard from (pull mode).
pub const SYNC_LAG: &str = "arkor_edge_sync_lag_seconds";
/// Persisted-state writes by `result` (`ok`, `failed`).
pub const STATE_WRITES: &str = "arkor_edge_state_writes_total";
/// Tokens counted from backend `usage` objects, by `kind` (`prompt`, `completion`).
pub const USAGE_TOKENS: &str = "arkor_edge_usage_tokens_total";
/// Usage reports posted, by `result` (`ok`, `failed`, `dropped`).
pub const USAGE_REPORTS: &str = "arkor_edge_usage_reports_total";

/// Idle HTTP/1.1 client connections parked without buffers, waiting for their next request.
pub const PARKED_CONNECTIONS: &str = "arkor_edge_parked_connections";

/// Client connections each data worker serves (label `worker`: 0 up to `listen.workers` − 1).
pub const WORKER_CONNECTIONS: &str = "arkor_edge_worker_connections";

/// Per pool and endpoint (endpoints are few, so these labels are bounded): requests in flight.
pub const ENDPOINT_IN_FLIGHT: &str = "arkor_edge_endpoint_in_flight";
/// Attempts sent to an endpoint.
pub const ENDPOINT_PICKS: &str = "arkor_edge_endpoint_picks_total";
/// Times an endpoint was ejected for consecutive failures.
pub const ENDPOINT_EJECTIONS: &str = "arkor_edge_endpoint_ejections_total";
/// Time to the response head, per endpoint, seconds.
pub const ENDPOINT_TTFB: &str = "arkor_edge_endpoint_ttfb_seconds";
/// Gaps between consecutive reads of a response body, per endpoint, seconds (chunks that came
/// together in one read count as one).
pub const ENDPOINT_CHUNK_GAP: &str = "arkor_edge_endpoint_chunk_gap_seconds";
/// Retries per pool.
pub const POOL_RETRIES: &str = "arkor_edge_pool_retries_total";
/// Retries refused because the pool's retry budget was spent.
pub const POOL_BUDGET_EXHAUSTED: &str = "arkor_edge_pool_retry_budget_exhausted_total";
/// Run-time adapter loads on vLLM pools, by `pool` and `result` (`loaded`, `already_loaded`,
/// `rejected` (4xx), `failed` (5xx or a broken connection), `unreachable`, `timeout`).
pub const ADAPTER_LOADS: &str = "arkor_edge_adapter_loads_total";
/// Time of one adapter load call, per pool, seconds.
pub const ADAPTER_LOAD_SECONDS: &str = "arkor_edge_adapter_load_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use; later calls share it).
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&BOUNDS)
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    // Fails only when another recorder is already installed; the handle then
                    // renders an empty page rather than stopping the edge.
                    let _ = metrics::set_global_recorder(recorder);
                    describe();
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// How often the recorder's histogram samples are folded into their buckets when nobody scrapes:
/// it keeps raw samples until then (8 bytes each). Only adapter loads record through it; the
/// per-request and per-chunk histograms fold as they record ([`Seconds`]).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Folds histogram samples every [`UPKEEP_INTERVAL`] until `shutdown`.
pub async fn upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => handle.run_upkeep(),
        }
    }
}

/// The whole `/metrics` page: the recorder's metrics, then the [`Seconds`] histograms.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut page = handle.render();
    histogram::render(&mut page, |name| match name {
        REQUEST_DURATION => "Request head to end of response body.",
        UPSTREAM_TTFB => "Upstream request to response head, every attempt included.",
        ENDPOINT_TTFB => "Time to the response head, per pool and endpoint.",
        ENDPOINT_CHUNK_GAP => {
            "Gaps between consecutive reads of body chunks, per pool and endpoint."
        }
        _ => "",
    });
    page
}

/// The [`Seconds`] histogram `name` with `labels` (shared by every caller with the same ones).
///
/// Before the recorder is installed ([`handle`]) it is a detached one that nobody renders, as
/// `metrics::histogram!` gives a no-op then: code that builds pools without serving (the fuzz
/// targets, over and over with new endpoint names) registers nothing.
pub fn seconds(name: &'static str, labels: &[(&'static str, &str)]) -> Arc<Seconds> {
    if HANDLE.get().is_none() {
        return Arc::default();
    }
    histogram::register(name, labels)
}

fn describe() {
    describe_counter!(REQUESTS, "Requests answered, by status class and code.");
    describe_counter!(
        RESPONSE_BYTES,
        Unit::Bytes,
        "Response body bytes sent to clients."
    );
    describe_gauge!(
        PARKED_CONNECTIONS,
        "Idle HTTP/1.1 client connections parked without buffers."
    );
    describe_gauge!(
        WORKER_CONNECTIONS,
        "Client connections each data worker thread serves."
    );
    describe_gauge!(REVISION, "Highest control-plane revision applied.");
    describe_gauge!(ENTRIES, "Deployments and keys held.");
    describe_counter!(SYNC_EVENTS, "Control-plane changes by source and result.");
    describe_counter!(
        SYNC_RECONNECTS,
        "Reconnections of the control-plane event stream."
    );
    describe_gauge!(
        SYNC_LAG,
        Unit::Seconds,
        "Seconds since the control plane was last heard from."
    );
    describe_counter!(STATE_WRITES, "Persisted-state writes by result.");
    describe_counter!(USAGE_TOKENS, "Tokens counted from backend usage objects.");
    describe_counter!(
        USAGE_REPORTS,
        "Usage reports posted to the control plane, by result."
    );
    describe_counter!(
        ADAPTER_LOADS,
        "Run-time adapter loads on vLLM pools, by pool and result."
    );
    describe_histogram!(
        ADAPTER_LOAD_SECONDS,
        Unit::Seconds,
        "Time of one adapter load call, per pool."
    );
}

/// Handles of the metrics every request records, registered once. `metrics::counter!` with
/// labels builds its key and looks it up in the recorder on every call, which allocates; a
/// handle is an `Arc` to the same atomic, so recording through it allocates nothing.
pub struct Hot {
    /// [`REQUEST_DURATION`].
    pub request_duration: Arc<Seconds>,
    /// [`RESPONSE_BYTES`].
    pub response_bytes: Counter,
    /// [`UPSTREAM_TTFB`].
    pub upstream_ttfb: Arc<Seconds>,
    /// [`USAGE_TOKENS`] `kind="prompt"`.
    pub prompt_tokens: Counter,
    /// [`USAGE_TOKENS`] `kind="completion"`.
    pub completion_tokens: Counter,
    /// [`REQUESTS`] by (class, code): both static strings from bounded sets.
    requests: DashMap<(&'static str, &'static str), Counter>,
}

impl Hot {
    /// The [`REQUESTS`] counter of one status class and code.
    pub fn requests(&self, class: &'static str, code: &'static str) -> Counter {
        if let Some(c) = self.requests.get(&(class, code)) {
            return c.clone();
        }
        let c = metrics::counter!(REQUESTS, "class" => class, "code" => code);
        self.requests.insert((class, code), c.clone());
        c
    }
}

/// The request path's metric handles (the recorder is installed first, so they are live).
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        let _ = handle();
        Hot {
            request_duration: seconds(REQUEST_DURATION, &[]),
            response_bytes: metrics::counter!(RESPONSE_BYTES),
            upstream_ttfb: seconds(UPSTREAM_TTFB, &[]),
            prompt_tokens: metrics::counter!(USAGE_TOKENS, "kind" => "prompt"),
            completion_tokens: metrics::counter!(USAGE_TOKENS, "kind" => "completion"),
            requests: DashMap::new(),
        }
    })
}
