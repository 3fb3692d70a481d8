//! arkor-edge: the data plane behind every `https://<slug>.arkor.app` deployment URL.
//!
//! A request flows through these modules, in order:
//!
//! | module | role |
//! |---|---|
//! | [`server`] | worker threads (one event loop each), accept loop, connection cap, HTTP/1.1 (idle connections parked) + HTTP/2, graceful shutdown |
//! | [`router`] | SPEC §2's decision order: host → deployment → preflight → key → route |
//! | [`host`] | `Host` / `:authority` → [`host::Slug`] |
//! | [`auth`] | Bearer parsing, [`auth::KeyHash`] (SHA-256), redacted prefixes |
//! | [`registry`] | deployments by slug and keys by hash; one writer, sharded readers |
//! | [`proxy`] | pools, model pinning ([`proxy::pin`]), vLLM adapter loads ([`proxy::adapters`]), upstream HTTP/1.1 connections driven by their request ([`proxy::h1`]), `builtin:echo` |
//! | [`stream`] | body limits, pass-through with idle timeout, terminal SSE error event |
//! | [`error`] | [`error::EdgeError`]: every failure's status, code and OpenAI envelope |
//!
//! Around them: [`config`] (the TOML file) and [`sync`] (control-plane sources feeding the
//! registry); `search` (private) holds the byte searches the JSON readers share. `fuzzing`
//! (hidden) holds the property checks the fuzz targets and the corpus replay test run. [`start`]
//! wires everything on already-chosen addresses, so tests run the whole edge on port 0.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod host;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod router;
mod search;
pub mod server;
pub mod stream;
pub mod sync;
pub mod tls;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use config::{Config, StateSource};
use proxy::Upstreams;
use proxy::pool::Pools;
use registry::{Registry, persist};
use router::Edge;
use server::ServerLimits;
use sync::SyncStatus;
use sync::file::FileSource;
use sync::pull::{PullSettings, PullSource};
use usage::UsageSink;
use usage::report::Reporter;

/// A running edge.
pub struct Running {
    /// Where the plain HTTP listener is bound, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// Where the HTTPS listener is bound, if enabled.
    pub https_addr: Option<SocketAddr>,
    /// Where the admin listener is bound, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The registry the edge serves from.
    pub registry: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops accepting and waits for in-flight requests (up to `timeouts.shutdown_grace`).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// A token that, when cancelled, starts the shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every task has ended (after the shutdown token was cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Loads the first state, binds the listeners and starts serving.
///
/// The state comes from the persisted copy in `state_dir` (if any), then the configured source.
/// With a snapshot file, a start fails only when neither can be read. With a control plane, a
/// control plane that is down never stops the start: the persisted state is served (or nothing,
/// with `/readyz` at 503) while the pull loop keeps trying.
pub async fn start(config: Config) -> Result<Running, String> {
    let metrics = metrics::handle();
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(metrics::upkeep(metrics.clone(), shutdown.clone()));
    let workers = config.workers();
    let pools = Arc::new(Pools::from_config(
        &config.pools,
        config.timeouts.upstream_connect,
        workers,
    )?);
    for pool in pools.all() {
        tasks.spawn(proxy::h1::sweep(Arc::clone(pool), shutdown.clone()));
        if pool.health_path.is_some() {
            tasks.spawn(proxy::health::run(Arc::clone(pool), shutdown.clone()));
        }
    }
    let registry = Arc::new(Registry::new(pools));
    let status = Arc::new(SyncStatus::default());

    let state_dir = config.state_dir();
    match persist::load(&state_dir, &registry).await {
        Ok(Some(r)) => tracing::info!(
            revision = r.revision,
            took_ms = r.took.as_millis() as u64,
            "persisted state loaded"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!("persisted state ignored: {e}"),
    }

    let source = config.state_source();
    let usage = Arc::new(UsageSink::new(
        config.usage.max_entries,
        matches!(source, StateSource::Pull(_)),
    ));
    let source_name = match source {
        StateSource::File(path) => {
            let mut file = FileSource::new(
                path,
                config.control_plane.poll_interval,
                Arc::clone(&registry),
                Arc::clone(&status),
            );
            match file.load_initial().await {
                Ok(r) => tracing::info!(
                    revision = r.revision,
                    rejected = r.rejected.len(),
                    took_ms = r.took.as_millis() as u64,
                    "snapshot file loaded"
                ),
                Err(e) if registry.is_loaded() => {
                    tracing::error!("{e}; serving the persisted state");
                }
                Err(e) => return Err(e),
            }
            tasks.spawn(file.watch(shutdown.clone()));
            "file"
        }
        StateSource::Pull(url) => {
            let cp = &config.control_plane;
            let pull = PullSource::new(
                url.clone(),
                cp.secret.clone(),
                Arc::clone(&registry),
                Arc::clone(&status),
                PullSettings {
                    request_timeout: cp.request_timeout,
                    stream_idle: cp.stream_idle,
                    backoff_max: cp.backoff_max,
                },
            )
            .spool_snapshots_in(state_dir.clone());
            if !registry.is_loaded() {
                if let Err(e) = pull.load_snapshot().await {
                    tracing::error!("no state yet, the control plane is unreachable: {e}");
                }
            }
            tasks.spawn(pull.run(shutdown.clone()));
            let reporter = Reporter {
                sink: Arc::clone(&usage),
                endpoint: format!("{url}/v1/edge/usage"),
                token: cp.secret.clone(),
                interval: config.usage.report_interval,
                timeout: cp.request_timeout,
            };
            tasks.spawn(reporter.run(shutdown.clone()));
            "pull"
        }
    };
    let persister = persist::run(state_dir, Arc::clone(&registry), shutdown.clone());
    tasks.spawn(async move {
        persister.await;
    });

    let mut listeners = Vec::new();
    let mut http_addr = None;
    if let Some(addr) = config.http_addr() {
        let (socket, bound) = bind_data("listen.http", addr).await?;
        http_addr = Some(bound);
        listeners.push(server::Listener { socket, tls: None });
    }
    let mut https_addr = None;
    if let Some(addr) = config.https_addr() {
        let tls = Arc::new(tls::Tls::new(config.cert_files())?);
        tasks.spawn(Arc::clone(&tls).watch(config.tls.reload_interval, shutdown.clone()));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
        let (socket, bound) = bind_data("listen.https", addr).await?;
        https_addr = Some(bound);
        listeners.push(server::Listener {
            socket,
            tls: Some(acceptor),
        });
    }

    let admin_addr = match config.admin_addr() {
        None => None,
        Some(addr) => {
            let admin_listener = bind("listen.admin", addr).await?;
            let bound = admin_listener
                .local_addr()
                .map_err(|e| format!("listen.admin: {e}"))?;
            let admin = Arc::new(admin::Admin {
                registry: Arc::clone(&registry),
                status: Arc::clone(&status),
                token: config.admin.secret.clone(),
                metrics,
                max_body_bytes: config.admin.max_body_bytes,
                source: source_name,
            });
            tasks.spawn(admin::serve(admin_listener, admin, shutdown.clone()));
            Some(bound)
        }
    };

    let rate = config.rate_limits.as_ref().map(|r| {
        let limits = limits::RateLimitConfig {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        };
        Arc::new(limits::RateLimiter::new(limits, r.max_subjects))
    });
    let auth_failures = (config.limits.max_auth_failures > 0).then(|| {
        let brake = limits::AuthFailureConfig {
            max_failures: config.limits.max_auth_failures,
            window: config.limits.auth_failure_window,
        };
        Arc::new(limits::AuthFailures::new(
            brake,
            limits::DEFAULT_MAX_ADDRESSES,
        ))
    });
    if rate.is_some() || auth_failures.is_some() {
        tasks.spawn(limits::sweep_loop(
            rate.clone(),
            auth_failures.clone(),
            limits::SWEEP_INTERVAL,
            shutdown.clone(),
        ));
    }
    let t = &config.timeouts;
    let edge = Arc::new(Edge {
        registry: Arc::clone(&registry),
        upstreams: Upstreams::new(t.upstream_first_byte, t.upstream_idle),
        base_domains: config.normalised_base_domains(),
        max_body_bytes: config.limits.max_body_bytes,
        client_body: t.client_body,
        usage,
        access_log: config.log.access,
        rate,
        auth_failures,
    });
    let limits = ServerLimits {
        max_connections: config.limits.max_connections,
        max_header_bytes: config.limits.max_header_bytes,
        client_header: t.client_header,
        client_idle: t.client_idle,
        handshake_timeout: config.tls.handshake_timeout,
        shutdown_grace: t.shutdown_grace,
        warm: server::Warm::new(config.limits.warm_connections),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
    if !listeners.is_empty() {
        let started = server::start_workers(workers, &listeners, &edge, &limits, &slots, &shutdown);
        match started {
            Ok(ended) => {
                tasks.spawn(ended);
            }
            Err(e) => {
                // Workers already started stop with the token; nothing else would stop them.
                shutdown.cancel();
                return Err(e);
            }
        }
    }
    // The workers hold their own copies of the sockets.
    drop(listeners);
    tracing::info!(http = ?http_addr, https = ?https_addr, admin = ?admin_addr, workers, source = source_name, "serving");
    Ok(Running {
        http_addr,
        https_addr,
        admin_addr,
        registry,
        shutdown,
        tasks,
    })
}

/// Binds a data listener: the socket, to be shared by the workers, and its bound address.
async fn bind_data(
    field: &str,
    addr: SocketAddr,
) -> Result<(std::net::TcpListener, SocketAddr), String> {
    let listener = bind(field, addr).await?;
    let bound = listener.local_addr().map_err(|e| format!("{field}: {e}"))?;
    let socket = listener.into_std().map_err(|e| format!("{field}: {e}"))?;
    Ok((socket, bound))
}

async fn bind(field: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{field}: cannot bind {addr}: {e}"))
}
