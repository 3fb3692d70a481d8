//! The threads that serve the data listeners: `listen.workers` of them, each running its own
//! single-threaded runtime (one event loop, one timer wheel), as nginx's worker processes and
//! Envoy's worker threads do.
//!
//! Every worker accepts from the same listening sockets, and a connection stays on the worker
//! that accepted it for its life, with every task it spawns and the backend connections it
//! opens ([`crate::proxy::h1::Conns`] keeps an idle list per worker). A worker that is busy
//! reaches its next accept later than an idle one, so new connections go mostly to the idle.
//!
//! Why not one runtime with work stealing: there, ready work wakes an idle worker to steal it,
//! a `futex` call and a context switch each time (about one per stream at 3,000 streams/s).
//! Against that runtime, measured alternately on 2 cores, a worker per core cost about 9% less
//! CPU per non-streamed request at saturation and 6% less per stream at 3,000 streams/s, and
//! about 4% more per stream at saturation, where each of two workers sleeps and wakes more
//! often than one stealing runtime did (BENCHMARKS.md, "Runtime shape"). The cost in kind is
//! that work does not move: one connection carrying many HTTP/2 streams keeps to one core while
//! another may idle. The edge's work per request is small next to a model's, so connections,
//! not single clients, are what fill the cores.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{ServerLimits, serve};
use crate::router::Edge;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The index of the data worker this thread is (0 up to `listen.workers` − 1); 0 on any other
/// thread.
pub fn current_worker() -> usize {
    CURRENT.with(Cell::get)
}

/// Makes this thread worker `index`.
pub(crate) fn set_current_worker(index: usize) {
    CURRENT.with(|c| c.set(index));
}

/// A data listener: its socket (non-blocking) and, for HTTPS, its TLS acceptor.
pub struct Listener {
    pub socket: std::net::TcpListener,
    pub tls: Option<TlsAcceptor>,
}

/// Starts `workers` threads that each [`serve`] every listener of `listeners` until `shutdown`;
/// the future returned ends when all of them have ended (after their connections closed, or the
/// shutdown grace passed). `slots` is shared: `limits.max_connections` counts across workers.
pub fn start(
    workers: usize,
    listeners: &[Listener],
    edge: &Arc<Edge>,
    limits: &ServerLimits,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Result<impl Future<Output = ()> + Send + 'static, String> {
    let mut ended = Vec::with_capacity(workers);
    for index in 0..workers {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a worker's runtime: {e}"))?;
        let own = {
            // Registers the worker's copies of the sockets with its own event loop.
            let _in = runtime.enter();
            listeners
                .iter()
                .map(|l| Ok((TcpListener::from_std(l.socket.try_clone()?)?, l.tls.clone())))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| format!("cannot share a listener with a worker: {e}"))?
        };
        let (done, end) = oneshot::channel();
        let (edge, limits, slots, shutdown) = (
            Arc::clone(edge),
            limits.clone(),
            Arc::clone(slots),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name(format!("arkor-worker-{index}"))
            .spawn(move || {
                set_current_worker(index);
                run(runtime, own, edge, limits, slots, shutdown);
                let _ = done.send(());
            })
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        ended.push(end);
    }
    Ok(async move {
        for end in ended {
            // An error is a worker that panicked: it has ended too.
            let _ = end.await;
        }
    })
}

/// One worker's life: serves its copies of the listeners on `runtime` until they are done,
/// then drops the runtime (and with it any task still there) before returning.
fn run(
    runtime: Runtime,
    listeners: Vec<(TcpListener, Option<TlsAcceptor>)>,
    edge: Arc<Edge>,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    runtime.block_on(async move {
        let mut served = JoinSet::new();
        for (listener, tls) in listeners {
            served.spawn(serve(
                listener,
                tls,
                Arc::clone(&edge),
                limits.clone(),
                Arc::clone(&slots),
                shutdown.clone(),
            ));
        }
        while served.join_next().await.is_some() {}
    });
}
