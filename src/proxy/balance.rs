//! Which endpoint of a pool gets the next attempt: load-aware picks, passive ejection of failing
//! endpoints, and a retry budget.
//!
//! One [`Balancer`] per pool, shared by every request through an `Arc`. It is pure bookkeeping:
//! it sends nothing and reads no clock (every call takes `now`, a [`tokio::time::Instant`], so
//! tests drive it with paused or hand-made time). The request path asks [`Balancer::pick`] for an
//! endpoint, holds the [`InFlight`] guard of [`Balancer::start`] while the attempt runs, and
//! reports the outcome ([`Balancer::observe_latency`], [`Balancer::success`],
//! [`Balancer::failure`]).
//!
//! - **Adapter targets** (`affinity = Some(target id)`) use rendezvous hashing with bounded load,
//!   so an adapter keeps landing on the GPU that already holds it in memory, and spills to its
//!   next endpoint only while its own is clearly busier than the pool (`rendezvous.rs`).
//! - **Base-model targets** use the power of two choices over a peak-EWMA cost, latency ×
//!   (in flight + 1), which steers away from a slow or busy GPU without herding onto one
//!   (`ewma.rs`).
//! - **Ejection**: consecutive failures take an endpoint out for an exponentially growing while,
//!   never more than a share of the pool, and failing open when nothing else is left
//!   (`eject.rs`).
//! - **Retries** are bounded by a [`RetryBudget`] per pool, so a sick backend cannot turn
//!   into a retry storm against the healthy ones (`budget.rs`).
//!
//! Concurrency: in-flight counts and ejection deadlines are atomics read without locks; the
//! latency estimate and failure count of an endpoint sit behind that endpoint's own short
//! `Mutex`. No lock spans endpoints, except the one taken only when a failure is about to eject,
//! so that the ejected share is counted exactly. Memory is fixed per endpoint.

mod budget;
mod eject;
mod ewma;
mod rendezvous;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

pub use budget::RetryBudget;
pub use rendezvous::rendezvous_weight;

use ewma::PeakEwma;

/// Pools up to this many endpoints are picked from without a heap allocation.
const INLINE_PICK: usize = 16;

/// Tuning of one pool's [`Balancer`]. [`Default`] gives the values documented on each field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceConfig {
    /// `c` of bounded-load rendezvous: an adapter's endpoint is skipped while its in-flight count
    /// would exceed `c` × the mean over eligible endpoints (counting the request being placed).
    /// Default 1.25; values below 1 (or NaN) are taken as 1, the least that always fits.
    pub load_factor: f64,
    /// Time constant of the peak-EWMA latency estimate. Default 10 s.
    pub ewma_decay: Duration,
    /// Latency assumed for an endpoint before its first sample, and the value an estimate
    /// drifts back to when no samples arrive. Default 1 s (a GPU's first-token latency).
    pub default_rtt: Duration,
    /// Consecutive failures (connect failures or 5xx) that eject an endpoint. Default 5; 0 is
    /// taken as 1.
    pub failures_to_eject: u32,
    /// First ejection time; each further ejection without a success in between doubles it.
    /// Default 10 s.
    pub base_ejection: Duration,
    /// Cap on the ejection time. Default 5 min.
    pub max_ejection: Duration,
    /// Largest share of the pool ejected at once, rounded down, and always leaving one endpoint.
    /// Default 0.5.
    pub max_ejected_share: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            load_factor: 1.25,
            ewma_decay: Duration::from_secs(10),
            default_rtt: Duration::from_secs(1),
            failures_to_eject: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.5,
        }
    }
}

/// Load and health bookkeeping for the endpoints of one pool, indexed `0..endpoints` in config
/// order. Indices outside that range are ignored by every method (a pick never returns one).
#[derive(Debug)]
pub struct Balancer {
    config: BalanceConfig,
    /// Ejection deadlines are stored as nanoseconds after this instant, so they fit an atomic.
    origin: Instant,
    slots: Box<[Slot]>,
    /// How many endpoints may be ejected at the same time.
    max_ejected: usize,
    /// Held only while deciding an ejection, so two endpoints failing together cannot both take
    /// the last ejection allowed.
    ejecting: Mutex<()>,
}

/// One endpoint's state.
#[derive(Debug)]
struct Slot {
    in_flight: AtomicU32,
    /// End of the current ejection, in nanoseconds after `origin`; not ejected once passed.
    ejected_until: AtomicU64,
    state: Mutex<State>,
}

/// The part of an endpoint's state that changes together, under the endpoint's own lock.
#[derive(Debug)]
struct State {
    ewma: PeakEwma,
    /// Consecutive failures since the last success or ejection.
    failures: u32,
    /// Ejections since the last success: the next one lasts `base_ejection × 2^level`.
    level: u32,
}

impl Slot {
    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Acquire) > now
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held, and every state it guards is valid on its own,
        // so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Balancer {
    /// A balancer for `endpoints` endpoints, all healthy and idle, each starting from the
    /// default latency estimate. Out-of-range settings are clamped (see [`BalanceConfig`]).
    pub fn new(endpoints: usize, config: BalanceConfig) -> Balancer {
        let config = BalanceConfig {
            load_factor: config.load_factor.max(1.0),
            failures_to_eject: config.failures_to_eject.max(1),
            max_ejected_share: config.max_ejected_share.clamp(0.0, 1.0),
            ..config
        };
        // NaN clamps to NaN; the cast of NaN is 0, which means "never eject": the safe reading.
        let share = (config.max_ejected_share * endpoints as f64).floor() as usize;
        let slots = (0..endpoints)
            .map(|_| Slot {
                in_flight: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
                state: Mutex::new(State {
                    ewma: PeakEwma::new(config.default_rtt),
                    failures: 0,
                    level: 0,
                }),
            })
            .collect();
        Balancer {
            config,
            origin: Instant::now(),
            slots,
            max_ejected: share.min(endpoints.saturating_sub(1)),
            ejecting: Mutex::new(()),
        }
    }

    /// Picks an endpoint for one attempt of a request.
    ///
    /// `affinity`: the target id of an adapter target, placed by rendezvous hashing with bounded
    /// load; `None` for base models, placed by the power of two choices on peak-EWMA cost.
    /// `exclude`: endpoints this request already tried. Ejected endpoints are skipped unless
    /// every endpoint not excluded is ejected: then the one whose ejection ends first is
    /// returned, so a pool that looks all-bad is still tried rather than failing every request.
    /// Returns `None` only when every endpoint is excluded (or the pool is empty).
    pub fn pick(&self, affinity: Option<&str>, exclude: &[usize], now: Instant) -> Option<usize> {
        let at = self.nanos(now);
        // One consistent snapshot: ejections may change while we choose. Pools are a handful
        // of GPU servers: the snapshot lives on the stack unless the pool is unusually large.
        let candidates = (0..self.slots.len())
            .filter(|i| !exclude.contains(i))
            .filter(|&i| self.slots.get(i).is_some_and(|s| !s.is_ejected(at)));
        let mut inline = [0usize; INLINE_PICK];
        let heap: Vec<usize>;
        let eligible: &[usize] = if self.slots.len() <= INLINE_PICK {
            let mut n = 0;
            for (slot, i) in inline.iter_mut().zip(candidates) {
                *slot = i;
                n += 1;
            }
            &inline[..n]
        } else {
            heap = candidates.collect();
            &heap
        };
        if eligible.is_empty() {
            return self.soonest_return(exclude);
        }
        match affinity {
            Some(target) => rendezvous::choose(target, eligible, self.config.load_factor, |i| {
                self.in_flight(i)
            }),
            None => self.power_of_two(eligible, now),
        }
    }

    /// Marks a request in flight on `endpoint` until the returned guard is dropped. Hold it for
    /// the whole exchange, streamed body included: that is the load the picks weigh.
    pub fn start(self: &Arc<Self>, endpoint: usize) -> InFlight {
        if let Some(slot) = self.slots.get(endpoint) {
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight {
            balancer: Arc::clone(self),
            endpoint,
        }
    }

    /// Feeds one time-to-first-byte sample into the endpoint's peak-EWMA estimate: a sample
    /// above the estimate replaces it at once, a lower one pulls it down gradually.
    pub fn observe_latency(&self, endpoint: usize, ttfb: Duration, now: Instant) {
        if let Some(slot) = self.slots.get(endpoint) {
            let (prior, decay) = (self.config.default_rtt, self.config.ewma_decay);
            slot.lock().ewma.observe(ttfb, now, prior, decay);
        }
    }

    /// Requests currently in flight on `endpoint` (0 for an unknown index).
    pub fn in_flight(&self, endpoint: usize) -> u32 {
        self.slots
            .get(endpoint)
            .map_or(0, |s| s.in_flight.load(Ordering::Relaxed))
    }

    /// Power of two choices: two distinct random endpoints, the cheaper wins. Comparing two
    /// rather than taking the global best keeps concurrent picks from all herding onto the one
    /// endpoint that looked best a moment ago.
    fn power_of_two(&self, eligible: &[usize], now: Instant) -> Option<usize> {
        let n = eligible.len();
        if n < 2 {
            return eligible.first().copied();
        }
        let first = fastrand::usize(..n);
        let mut second = fastrand::usize(..n - 1);
        if second >= first {
            second += 1;
        }
        let (a, b) = (*eligible.get(first)?, *eligible.get(second)?);
        // Ties go to `a`, itself drawn at random, so equal endpoints share evenly.
        Some(if self.cost(b, now) < self.cost(a, now) {
            b
        } else {
            a
        })
    }

    /// Expected wait on an endpoint: its latency estimate times the requests it would hold.
    fn cost(&self, endpoint: usize, now: Instant) -> f64 {
        let Some(slot) = self.slots.get(endpoint) else {
            return f64::INFINITY;
        };
        let rtt = slot
            .lock()
            .ewma
            .estimate(now, self.config.default_rtt, self.config.ewma_decay);
        rtt * f64::from(slot.in_flight.load(Ordering::Relaxed).saturating_add(1))
    }

    /// `now` as nanoseconds after `origin` (0 before it), the unit of ejection deadlines.
    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One request in flight on one endpoint; dropping it ends the request for the balancer.
#[must_use = "the request counts as in flight only while the guard is held"]
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<Balancer>,
    endpoint: usize,
}

impl InFlight {
    /// The endpoint this guard counts against.
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.balancer.slots.get(self.endpoint) {
            slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
