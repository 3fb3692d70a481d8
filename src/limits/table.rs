//! The bounded map behind both limiters: a DashMap that never holds more than its bound and
//! drops entries that carry no state any more.

use super::*;

/// An entry that carries no state once expired, so dropping it changes no decision.
pub(super) trait Expiring {
    fn expired(&self, now: u64) -> bool;
}

/// A DashMap that never holds more than `max` entries.
pub(super) struct Table<K, V> {
    pub(super) map: DashMap<K, V>,
    /// Slots taken: counted before an insert and released after a removal, so it is never
    /// below the map's length and concurrent inserts cannot overshoot `max`.
    pub(super) slots: AtomicUsize,
    max: usize,
    /// Times are nanoseconds since `epoch`: 8-byte timestamps and exact integer arithmetic.
    epoch: Instant,
    /// Clock time of the last "table full" warning; `u64::MAX` before the first.
    last_warning: AtomicU64,
    /// New keys served untracked since the last warning.
    pub(super) untracked: AtomicU64,
    full_message: &'static str,
}

impl<K: Eq + Hash + Clone, V: Expiring> Table<K, V> {
    pub(super) fn new(max: usize, full_message: &'static str) -> Self {
        Table {
            map: DashMap::new(),
            slots: AtomicUsize::new(0),
            max,
            epoch: Instant::now(),
            last_warning: AtomicU64::new(u64::MAX),
            untracked: AtomicU64::new(0),
            full_message,
        }
    }

    pub(super) fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Applies `f` to `key`'s entry, inserting `fresh` when absent. When the table is full even
    /// after an inline sweep, `f` runs on `fresh` unstored (fail open).
    pub(super) fn update<R>(&self, key: &K, now: u64, fresh: V, f: impl FnOnce(&mut V) -> R) -> R {
        if let Some(mut entry) = self.map.get_mut(key) {
            return f(&mut entry);
        }
        if !self.take_slot(now) {
            self.note_untracked(now);
            let mut scratch = fresh;
            return f(&mut scratch);
        }
        match self.map.entry(key.clone()) {
            // Another thread inserted it meanwhile: give the slot back.
            Entry::Occupied(mut entry) => {
                self.slots.fetch_sub(1, Relaxed);
                f(entry.get_mut())
            }
            Entry::Vacant(slot) => f(&mut slot.insert(fresh)),
        }
    }

    pub(super) fn take_slot(&self, now: u64) -> bool {
        let take = || {
            self.slots
                .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
                .is_ok()
        };
        take() || (self.sweep_some(now) > 0 && take())
    }

    /// Drops expired entries among the first [`INLINE_SWEEP_SCAN`]. Iteration follows hash
    /// order, which is unrelated to age, so this is a fair sample of the table.
    pub(super) fn sweep_some(&self, now: u64) -> usize {
        // Collected first: removing while the iterator holds a shard's read lock would deadlock.
        // This allocation is on the full-table path only.
        let expired: Vec<K> = self
            .map
            .iter()
            .take(INLINE_SWEEP_SCAN)
            .filter(|e| e.value().expired(now))
            .map(|e| e.key().clone())
            .collect();
        let removed = expired
            .iter()
            .filter(|k| self.map.remove_if(*k, |_, v| v.expired(now)).is_some())
            .count();
        self.slots.fetch_sub(removed, Relaxed);
        removed
    }

    pub(super) fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        self.map.retain(|_, v| {
            let keep = !v.expired(now);
            removed += usize::from(!keep);
            keep
        });
        self.slots.fetch_sub(removed, Relaxed);
        removed
    }

    /// Counts a key served untracked; warns at most once a minute. Returns whether it warned.
    pub(super) fn note_untracked(&self, now: u64) -> bool {
        self.untracked.fetch_add(1, Relaxed);
        let last = self.last_warning.load(Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= FULL_WARNING_EVERY;
        // Only the thread that moves `last_warning` warns, so racing requests log once.
        let won = due
            && self
                .last_warning
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok();
        if !won {
            return false;
        }
        let untracked = self.untracked.swap(0, Relaxed);
        tracing::warn!(max = self.max, untracked, "{}", self.full_message);
        true
    }
}
