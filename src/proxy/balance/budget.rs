//! Retry budget (Finagle / linkerd style): retries stay a bounded fraction of the traffic.
//!
//! A per-request retry limit alone lets a pool-wide outage multiply the load on what is left
//! (every request tries `1 + retries` endpoints). The budget caps retries at `ratio` of the
//! requests seen over the last `ttl`, plus a floor of `min_per_second` that is always allowed,
//! so a quiet pool (few requests) can still retry at all.
//!
//! Bookkeeping:
//! - Requests are counted in 10 slots of `ttl / 10`, each an `AtomicU64` holding the slot's
//!   epoch (low 32 bits of its number since creation) and its count, so [`RetryBudget::deposit`],
//!   called once per request, is lock-free. A count lives between `0.9 × ttl` and `ttl`: the
//!   current slot plus the nine before it. An epoch reused after 2^32 slots (over a year with
//!   the default 1 s slots) could revive a stale count only if its slot was never written since.
//! - Retries are rarer; [`RetryBudget::withdraw`] takes one `Mutex` so that two concurrent
//!   retries cannot both take the last unit. Retries granted by the ratio are counted in the same
//!   sliding window; the floor is a token bucket of `min_per_second` tokens refilled at
//!   `min_per_second` per second, used only once the ratio is spent.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Slots of the sliding window.
const SLOTS: usize = 10;
/// Shortest slot: a zero `ttl` must not divide by zero.
const MIN_SLOT: Duration = Duration::from_millis(1);

/// Bounds the retries of one pool; shared by all its requests.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    slot: Duration,
    /// Slot numbers count from here.
    origin: Instant,
    /// Requests per slot: `(epoch as u32) << 32 | count`.
    deposits: [AtomicU64; SLOTS],
    spent: Mutex<Spent>,
}

/// What retries have used, under the budget's lock.
#[derive(Debug)]
struct Spent {
    /// Retries granted by the ratio, per slot: `(epoch, count)`.
    retries: [(u64, u32); SLOTS],
    /// Floor tokens left, and when they were last refilled.
    floor: f64,
    floor_at: Option<Instant>,
}

impl RetryBudget {
    /// A budget allowing retries up to `ratio` (default 0.2) of the requests deposited over the
    /// last `ttl` (default 10 s), plus `min_per_second` (default 10) always. A negative or NaN
    /// ratio is taken as 0.
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> RetryBudget {
        RetryBudget {
            ratio: ratio.max(0.0),
            min_per_second,
            slot: (ttl / SLOTS as u32).max(MIN_SLOT),
            origin: Instant::now(),
            deposits: Default::default(),
            spent: Mutex::new(Spent {
                retries: [(0, 0); SLOTS],
                floor: f64::from(min_per_second),
                floor_at: None,
            }),
        }
    }

    /// Counts one request (its first attempt, not its retries), earning `ratio` of a retry.
    pub fn deposit(&self, now: Instant) {
        let epoch = self.epoch(now);
        let tag = epoch as u32;
        let Some(slot) = self.deposits.get(epoch as usize % SLOTS) else {
            return;
        };
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let held = (current >> 32) as u32;
            let next = if held == tag {
                // The count saturates rather than wrapping into the epoch bits.
                let count = (current as u32).saturating_add(1);
                (u64::from(tag) << 32) | u64::from(count)
            } else if is_newer(held, tag) {
                // A caller with a later `now` already reused this slot: our request is older
                // than the whole window it now represents.
                return;
            } else {
                (u64::from(tag) << 32) | 1
            };
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Asks for one retry. `true` grants it (and spends it); `false` means the budget is spent
    /// and the request should fail with what it has.
    pub fn withdraw(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        // The epsilon keeps `0.2 × 100` from landing just under 20 in floating point.
        let earned = (self.ratio * self.deposits_in_window(epoch) as f64 + 1e-9).floor();
        if f64::from(spent.retries_in_window(epoch)) < earned {
            spent.record(epoch);
            return true;
        }
        spent.refill(now, self.min_per_second);
        if spent.floor >= 1.0 {
            spent.floor -= 1.0;
            return true;
        }
        false
    }

    /// The slot number of `now`.
    fn epoch(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.slot.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Requests deposited in the current slot and the `SLOTS - 1` before it.
    fn deposits_in_window(&self, epoch: u64) -> u64 {
        let tag = epoch as u32;
        self.deposits
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|v| tag.wrapping_sub((v >> 32) as u32) < SLOTS as u32)
            .map(|v| u64::from(v as u32))
            .sum()
    }
}

impl Spent {
    fn retries_in_window(&self, epoch: u64) -> u32 {
        self.retries
            .iter()
            .filter(|(e, _)| epoch.checked_sub(*e).is_some_and(|age| age < SLOTS as u64))
            .map(|(_, n)| *n)
            .fold(0, u32::saturating_add)
    }

    fn record(&mut self, epoch: u64) {
        if let Some(slot) = self.retries.get_mut(epoch as usize % SLOTS) {
            if slot.0 == epoch {
                slot.1 = slot.1.saturating_add(1);
            } else if slot.0 < epoch {
                *slot = (epoch, 1);
            }
        }
    }

    fn refill(&mut self, now: Instant, per_second: u32) {
        let cap = f64::from(per_second);
        if let Some(at) = self.floor_at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * cap;
            self.floor = (self.floor + earned).min(cap);
        }
        self.floor_at = Some(self.floor_at.map_or(now, |at| at.max(now)));
    }
}

/// Whether epoch tag `a` is later than `b`, allowing for wrap-around.
fn is_newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn grants(budget: &RetryBudget, now: Instant, asks: u32) -> u32 {
        (0..asks).filter(|_| budget.withdraw(now)).count() as u32
    }

    #[test]
    fn ratio_of_requests_plus_the_floor() {
        let budget = RetryBudget::new(0.2, 10, TTL);
        let t0 = Instant::now();
        for _ in 0..100 {
            budget.deposit(t0);
        }
        assert_eq!(grants(&budget, t0, 100), 30, "20 earned + a floor of 10");
        assert!(!budget.withdraw(t0));
        // Another 50 requests earn 10 more.
        for _ in 0..50 {
            budget.deposit(t0);
        }
        assert_eq!(grants(&budget, t0, 100), 10);
    }

    #[test]
    fn the_floor_alone_allows_min_per_second() {
        let budget = RetryBudget::new(0.2, 10, TTL);
        let t0 = Instant::now();
        assert_eq!(grants(&budget, t0, 50), 10);
        assert_eq!(grants(&budget, t0 + Duration::from_millis(500), 50), 5);
        assert_eq!(
            grants(&budget, t0 + Duration::from_secs(60), 50),
            10,
            "the floor caps"
        );
        let none = RetryBudget::new(0.2, 0, TTL);
        assert_eq!(grants(&none, t0, 5), 0);
    }

    #[test]
    fn the_window_slides() {
        let budget = RetryBudget::new(0.2, 0, TTL);
        let t0 = Instant::now();
        for _ in 0..100 {
            budget.deposit(t0);
        }
        assert_eq!(grants(&budget, t0, 10), 10);
        // Half a window on, 50 more requests: 150 × 0.2 = 30 earned, 10 used.
        let t5 = t0 + TTL / 2;
        for _ in 0..50 {
            budget.deposit(t5);
        }
        assert_eq!(grants(&budget, t5, 100), 20);
        // A whole window after t0: its requests and retries are gone, t5's remain (50 × 0.2 =
        // 10 earned, all 20 taken at t5 still count).
        let t10 = t0 + TTL;
        assert!(!budget.withdraw(t10));
        // After t5's window too, nothing is left at all; new traffic earns anew.
        let t15 = t5 + TTL;
        assert!(!budget.withdraw(t15));
        for _ in 0..10 {
            budget.deposit(t15);
        }
        assert_eq!(grants(&budget, t15, 10), 2);
    }

    #[test]
    fn deposits_older_than_the_slot_they_land_in_are_dropped() {
        let budget = RetryBudget::new(1.0, 0, TTL);
        let t0 = Instant::now();
        budget.deposit(t0 + TTL);
        // Same slot index, a whole window older: not counted, and the newer count survives.
        budget.deposit(t0);
        assert_eq!(budget.deposits_in_window(budget.epoch(t0 + TTL)), 1);
    }

    #[test]
    fn zero_ttl_does_not_divide_by_zero() {
        let budget = RetryBudget::new(0.5, 0, Duration::ZERO);
        let t0 = Instant::now();
        budget.deposit(t0);
        budget.deposit(t0);
        assert!(budget.withdraw(t0));
        assert!(!budget.withdraw(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn concurrent_deposits_are_all_counted() {
        let budget = std::sync::Arc::new(RetryBudget::new(0.2, 0, TTL));
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = std::sync::Arc::clone(&budget);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        budget.deposit(t0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.deposits_in_window(budget.epoch(t0)), 40_000);
    }

    #[test]
    fn epoch_tags_wrap() {
        assert!(is_newer(1, 0));
        assert!(is_newer(0, u32::MAX));
        assert!(!is_newer(u32::MAX, 0));
        assert!(!is_newer(5, 5));
    }
}
