//! arkor-edge: the data plane behind every `https://<slug>.arkor.app` deployment URL.
//!
//! A request flows through these modules, in order:
//!
//! | module | role |
//! |---|---|
//! | [`server`] | accept loop, connection cap, HTTP/1.1 + h2c, graceful shutdown |
//! | [`router`] | SPEC §2's decision order: host → deployment → preflight → key → route |
//! | [`host`] | `Host` / `:authority` → [`host::Slug`] |
//! | [`auth`] | Bearer parsing, [`auth::KeyHash`] (SHA-256), redacted prefixes |
//! | [`registry`] | deployments by slug and keys by hash; one writer, lock-free readers |
//! | [`proxy`] | pools, model pinning ([`proxy::pin`]), the upstream client, `builtin:echo` |
//! | [`stream`] | body limits, pass-through with idle timeout, terminal SSE error event |
//! | [`error`] | [`error::EdgeError`]: every failure's status, code and OpenAI envelope |
//!
//! Around them: [`config`] (the TOML file) and [`sync`] (control-plane sources feeding the
//! registry). [`start`] wires everything on already-chosen addresses, so tests run the whole edge
//! on port 0.

pub mod auth;
pub mod config;
pub mod error;
pub mod headers;
pub mod host;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod router;
pub mod server;
pub mod stream;
pub mod sync;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use config::Config;
use proxy::Upstreams;
use proxy::pool::Pools;
use registry::Registry;
use router::Edge;
use server::ServerLimits;
use sync::file::FileSource;

/// A running edge.
pub struct Running {
    /// Where the plain HTTP listener is bound.
    pub http_addr: SocketAddr,
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

/// Loads the first state, binds the listeners and starts serving. Fails when the first state
/// cannot be loaded or an address cannot be bound.
pub async fn start(config: Config) -> Result<Running, String> {
    let pools = Arc::new(Pools::from_config(&config.pools)?);
    let registry = Arc::new(Registry::new(pools));
    let path = match config.state_source() {
        config::StateSource::File(path) => path,
        config::StateSource::Pull(url) => {
            return Err(format!(
                "control_plane.url: pulling from {url} is not wired yet"
            ));
        }
    };
    let mut file = FileSource::new(
        path,
        config.control_plane.poll_interval,
        Arc::clone(&registry),
    );
    let report = file.load_initial().await?;
    tracing::info!(
        revision = report.revision,
        objects = report.changed,
        rejected = report.rejected.len(),
        "control-plane state loaded"
    );

    let addr = config
        .http_addr()
        .ok_or_else(|| "listen.http: no address".to_owned())?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen.http: cannot bind {addr}: {e}"))?;
    let http_addr = listener
        .local_addr()
        .map_err(|e| format!("listen.http: {e}"))?;

    let t = &config.timeouts;
    let edge = Arc::new(Edge {
        registry: Arc::clone(&registry),
        upstreams: Upstreams::new(t.upstream_connect, t.upstream_first_byte, t.upstream_idle),
        base_domains: config.normalised_base_domains(),
        max_body_bytes: config.limits.max_body_bytes,
        client_body: t.client_body,
    });
    let limits = ServerLimits {
        max_connections: config.limits.max_connections,
        max_header_bytes: config.limits.max_header_bytes,
        client_header: t.client_header,
        shutdown_grace: t.shutdown_grace,
    };

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(file.watch(shutdown.clone()));
    tasks.spawn(server::serve(listener, edge, limits, shutdown.clone()));
    tracing::info!(%http_addr, "serving");
    Ok(Running {
        http_addr,
        registry,
        shutdown,
        tasks,
    })
}
