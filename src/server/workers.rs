//! The threads that serve the data listeners: `listen.workers` of them, each running its own
//! single-threaded runtime (one event loop, one timer wheel), as nginx's worker processes and
//! Envoy's worker threads do.
//!
//! Every worker accepts from the same listening sockets. A worker that accepts a connection
//! while it serves at least two more than the least loaded worker hands the socket over to
//! that one ([`Spread`]); otherwise it serves the connection itself. A worker woken for new
//! connections accepts every one that is waiting, so without the hand-over a burst of them (a
//! load balancer opening its pool) would all land on whichever worker woke first. The hand-over
//! costs one wake-up of the other worker, once per connection. From then on a connection stays
//! on its worker for its life, with every task it spawns and the backend connections it opens
//! ([`crate::proxy::h1::Conns`] keeps an idle list per worker).
//!
//! Why not one runtime with work stealing: there, ready work wakes an idle worker to steal it,
//! a `futex` call and a context switch each time (about one per stream at 3,000 streams/s).
//! Against that runtime, measured alternately on 2 cores, workers of their own cost 13% less
//! CPU per non-streamed request at 19,500 requests/s and about the same at saturation and at
//! 3,000 streams/s; at stream saturation they made 6% more streams/s at 5% more CPU per stream
//! (BENCHMARKS.md, "Runtime shape"). The cost in kind is that work does not move: one
//! connection carrying many HTTP/2 streams keeps to one core while another may idle. The edge's
//! work per request is small next to a model's, so connections, not single clients, are what
//! fill the cores.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
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

/// The connections each worker serves, and which worker serves the next one.
pub struct Spread {
    open: Box<[AtomicUsize]>,
    gauges: Box<[metrics::Gauge]>,
}

impl Spread {
    /// No connections yet on any of `workers` workers.
    pub fn new(workers: usize) -> Arc<Spread> {
        let workers = workers.max(1);
        Arc::new(Spread {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            gauges: (0..workers)
                .map(|i| {
                    metrics::gauge!(crate::metrics::WORKER_CONNECTIONS, "worker" => i.to_string())
                })
                .collect(),
        })
    }

    /// Places a connection that worker `me` accepted: on `me`, unless the least loaded worker
    /// serves at least two fewer (then on that one). It counts there at once, so the accepts
    /// that follow it see it.
    pub fn place(self: &Arc<Self>, me: usize) -> Placed {
        let load = |i: usize| self.open[i].load(Ordering::Relaxed);
        let least = (0..self.open.len()).min_by_key(|&i| load(i)).unwrap_or(0);
        let worker = if load(least) + 1 < load(me) {
            least
        } else {
            me
        };
        self.count_on(worker)
    }

    /// Counts a connection on `worker`.
    pub fn count_on(self: &Arc<Self>, worker: usize) -> Placed {
        self.open[worker].fetch_add(1, Ordering::Relaxed);
        self.gauges[worker].increment(1.0);
        Placed {
            spread: Arc::clone(self),
            worker,
        }
    }
}

/// A connection counted on its worker, until it is dropped.
pub struct Placed {
    spread: Arc<Spread>,
    worker: usize,
}

impl Placed {
    /// The worker that serves the connection.
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.spread.open[self.worker].fetch_sub(1, Ordering::Relaxed);
        self.spread.gauges[self.worker].decrement(1.0);
    }
}

/// An accepted connection on its way to the worker that serves it: the socket (out of the
/// accepting worker's event loop), the client's address, its connection slot and its count.
pub struct Handover {
    pub socket: std::net::TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
    pub placed: Placed,
}

/// How many connections handed over to one worker may wait for it: bounded, and when full the
/// accepting worker serves the connection itself.
const HANDOVER_QUEUE: usize = 256;

/// One worker's end of a listener's hand-overs: who it is, the queues of every worker for this
/// listener, and its own.
pub struct Handovers {
    pub me: usize,
    pub spread: Arc<Spread>,
    pub to: Arc<[mpsc::Sender<Handover>]>,
    pub inbox: mpsc::Receiver<Handover>,
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
    let spread = Spread::new(workers);
    // Per listener, a hand-over queue per worker: `queues[listener]`, `inboxes[worker][listener]`.
    let mut inboxes: Vec<Vec<mpsc::Receiver<Handover>>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut queues: Vec<Arc<[mpsc::Sender<Handover>]>> = Vec::with_capacity(listeners.len());
    for _ in listeners {
        let mut to = Vec::with_capacity(workers);
        for inbox in &mut inboxes {
            let (sender, receiver) = mpsc::channel(HANDOVER_QUEUE);
            to.push(sender);
            inbox.push(receiver);
        }
        queues.push(to.into());
    }
    let mut ended = Vec::with_capacity(workers);
    for (index, inboxes) in inboxes.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a worker's runtime: {e}"))?;
        let own = {
            // Registers the worker's copies of the sockets with its own event loop.
            let _in = runtime.enter();
            listeners
                .iter()
                .zip(&queues)
                .zip(inboxes)
                .map(|((l, to), inbox)| {
                    let handovers = Handovers {
                        me: index,
                        spread: Arc::clone(&spread),
                        to: Arc::clone(to),
                        inbox,
                    };
                    let socket = TcpListener::from_std(l.socket.try_clone()?)?;
                    Ok((socket, l.tls.clone(), handovers))
                })
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
    listeners: Vec<(TcpListener, Option<TlsAcceptor>, Handovers)>,
    edge: Arc<Edge>,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    runtime.block_on(async move {
        let mut served = JoinSet::new();
        for (listener, tls, handovers) in listeners {
            served.spawn(serve(
                listener,
                tls,
                Arc::clone(&edge),
                limits.clone(),
                Arc::clone(&slots),
                shutdown.clone(),
                handovers,
            ));
        }
        while served.join_next().await.is_some() {}
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(spread: &Spread) -> Vec<usize> {
        spread
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn connections_one_worker_accepts_are_spread_out() {
        let spread = Spread::new(3);
        let mut placed: Vec<Placed> = (0..30).map(|_| spread.place(0)).collect();
        let counts = loads(&spread);
        assert_eq!(counts.iter().sum::<usize>(), 30);
        let (most, fewest) = (counts.iter().max(), counts.iter().min());
        assert!(
            most.zip(fewest).is_some_and(|(m, f)| m - f <= 2),
            "{counts:?}"
        );
        // Each is counted where it went, until dropped.
        let on_2 = placed.iter().filter(|p| p.worker() == 2).count();
        assert_eq!(on_2, counts[2]);
        placed.retain(|p| p.worker() != 2);
        assert_eq!(loads(&spread), [counts[0], counts[1], 0]);
    }

    #[test]
    fn a_worker_within_one_of_the_least_loaded_keeps_its_connection() {
        let spread = Spread::new(2);
        let _first = spread.count_on(0);
        let second = spread.place(0);
        assert_eq!(
            second.worker(),
            0,
            "one more than the other is no reason to move"
        );
        let third = spread.place(0);
        assert_eq!(third.worker(), 1);
        assert_eq!(spread.place(1).worker(), 1);
    }
}
