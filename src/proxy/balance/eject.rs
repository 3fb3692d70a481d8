//! Passive ejection (outlier detection): endpoints that keep failing are left out for a while.
//!
//! `failures_to_eject` consecutive failures (connect failures or 5xx) eject an endpoint for
//! `base_ejection × 2^level`, capped at `max_ejection`, where `level` counts the ejections since
//! the endpoint last succeeded: a backend that comes back still broken stays out longer each
//! time, one that answers again starts over. An ejection ends by itself when its time is up, or
//! at once when an active health check passes.
//!
//! Failures reported while an endpoint is ejected (requests that were already running) are
//! ignored: they are the same outage, and must neither lengthen it nor count toward the next.
//! At most `max_ejected_share` of the pool (rounded down, never all of it) is ejected at once;
//! a failure that would exceed that leaves the endpoint in, with its count kept, so it is
//! ejected by its next failure once another endpoint has returned. When every endpoint a
//! request may still use is ejected, the pick fails open to the one returning first.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Balancer;

impl Balancer {
    /// Reports a successful exchange (a response that is not a 5xx): clears the consecutive
    /// failures and the ejection backoff level. It does not end a running ejection.
    pub fn success(&self, endpoint: usize) {
        if let Some(slot) = self.slots.get(endpoint) {
            let mut state = slot.lock();
            state.failures = 0;
            state.level = 0;
        }
    }

    /// Reports a failure: a connect failure or a 5xx. Returns `true` when this failure ejected
    /// the endpoint (to log and count once), `false` otherwise — including when the endpoint
    /// was already ejected or the ejected share of the pool is at its cap.
    pub fn failure(&self, endpoint: usize, now: Instant) -> bool {
        let at = self.nanos(now);
        let Some(slot) = self.slots.get(endpoint) else {
            return false;
        };
        let mut state = slot.lock();
        if slot.is_ejected(at) {
            return false;
        }
        state.failures = state.failures.saturating_add(1);
        if state.failures < self.config.failures_to_eject {
            return false;
        }
        // Lock order: the endpoint's state, then `ejecting`; nothing takes them the other way.
        let _deciding = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let ejected = self.slots.iter().filter(|s| s.is_ejected(at)).count();
        if ejected >= self.max_ejected {
            return false;
        }
        let until = at.saturating_add(duration_nanos(self.ejection_time(state.level)));
        slot.ejected_until.store(until, Ordering::Release);
        state.level = state.level.saturating_add(1);
        state.failures = 0;
        true
    }

    /// Whether `endpoint` is ejected at `now` (`false` for an unknown index).
    pub fn is_ejected(&self, endpoint: usize, now: Instant) -> bool {
        let at = self.nanos(now);
        self.slots.get(endpoint).is_some_and(|s| s.is_ejected(at))
    }

    /// Reports an active health check. A pass ends any ejection at once and clears the
    /// consecutive failures, but keeps the backoff level: only real traffic proves the endpoint
    /// serves again. A failed check counts as one failure, like a failed request.
    pub fn health_check(&self, endpoint: usize, healthy: bool, now: Instant) {
        if !healthy {
            self.failure(endpoint, now);
            return;
        }
        if let Some(slot) = self.slots.get(endpoint) {
            let mut state = slot.lock();
            state.failures = 0;
            slot.ejected_until.store(0, Ordering::Release);
        }
    }

    /// How long the ejection at backoff `level` lasts.
    fn ejection_time(&self, level: u32) -> Duration {
        let factor = 1u32 << level.min(31);
        self.config
            .base_ejection
            .saturating_mul(factor)
            .min(self.config.max_ejection)
    }

    /// Fail-open choice when every endpoint not excluded is ejected: the one whose ejection
    /// ends first (lowest index on a tie). `None` when every endpoint is excluded.
    pub(super) fn soonest_return(&self, exclude: &[usize]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !exclude.contains(i))
            .min_by_key(|(_, s)| s.ejected_until.load(Ordering::Acquire))
            .map(|(i, _)| i)
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
