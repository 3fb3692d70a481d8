//! Deletes remembered against late, older upserts (SPEC §4): the revision of the delete by
//! object id, for [`TOMBSTONE_TTL`], at most [`MAX_TOMBSTONES`] (oldest forgotten first).
//!
//! Only the registry's writer touches it. Every upsert asks it, so a lookup borrows the id
//! (no allocation) and an empty table answers at once; a snapshot of millions of objects asks
//! millions of times.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::{MAX_TOMBSTONES, TOMBSTONE_TTL};

/// What kind of object a tombstone is for: ids of deployments and keys may meet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    Deployment,
    Key,
}

#[derive(Default)]
pub struct Tombstones {
    deployments: HashMap<Arc<str>, Stone, foldhash::fast::RandomState>,
    keys: HashMap<Arc<str>, Stone, foldhash::fast::RandomState>,
    /// Every tombstone laid, oldest first; an entry whose tombstone was replaced or lifted
    /// since is skipped when it reaches the front.
    order: VecDeque<(Kind, Arc<str>, u64)>,
    /// Numbers the tombstones laid, so the queue can tell its entry from a newer one.
    laid: u64,
}

struct Stone {
    revision: u64,
    at: Instant,
    serial: u64,
}

impl Tombstones {
    fn table(&mut self, kind: Kind) -> &mut HashMap<Arc<str>, Stone, foldhash::fast::RandomState> {
        match kind {
            Kind::Deployment => &mut self.deployments,
            Kind::Key => &mut self.keys,
        }
    }

    /// The revision of the delete of `id`, if one is remembered.
    pub fn get(&self, kind: Kind, id: &str) -> Option<u64> {
        let table = match kind {
            Kind::Deployment => &self.deployments,
            Kind::Key => &self.keys,
        };
        table
            .get(id)
            .filter(|s| s.at.elapsed() < TOMBSTONE_TTL)
            .map(|s| s.revision)
    }

    /// Remembers that `id` was deleted at `revision`.
    pub fn insert(&mut self, kind: Kind, id: &str, revision: u64) {
        self.expire();
        self.laid += 1;
        let serial = self.laid;
        let id: Arc<str> = Arc::from(id);
        let stone = Stone {
            revision,
            at: Instant::now(),
            serial,
        };
        self.table(kind).insert(Arc::clone(&id), stone);
        self.order.push_back((kind, id, serial));
        while self.order.len() > MAX_TOMBSTONES {
            self.pop_oldest();
        }
    }

    /// Forgets the delete of `id` (it was upserted anew).
    pub fn remove(&mut self, kind: Kind, id: &str) {
        let table = self.table(kind);
        if !table.is_empty() {
            table.remove(id);
        }
    }

    /// Drops tombstones past their time from the front of the queue.
    fn expire(&mut self) {
        while let Some((kind, id, serial)) = self.order.front() {
            let live = match kind {
                Kind::Deployment => &self.deployments,
                Kind::Key => &self.keys,
            }
            .get(&**id)
            .is_some_and(|s| s.serial == *serial && s.at.elapsed() < TOMBSTONE_TTL);
            if live {
                return;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((kind, id, serial)) = self.order.pop_front() {
            let table = self.table(kind);
            if table.get(&*id).is_some_and(|s| s.serial == serial) {
                table.remove(&*id);
            }
        }
    }

    /// How many tombstones are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.deployments.len() + self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tombstones_expire_and_are_lifted() {
        let mut t = Tombstones::default();
        t.insert(Kind::Deployment, "a", 5);
        assert_eq!(t.get(Kind::Deployment, "a"), Some(5));
        assert_eq!(t.get(Kind::Key, "a"), None);
        t.remove(Kind::Deployment, "a");
        assert_eq!(t.get(Kind::Deployment, "a"), None);

        t.insert(Kind::Key, "k", 7);
        tokio::time::advance(TOMBSTONE_TTL / 2).await;
        // Laid again later: the first queue entry must not take the second tombstone away.
        t.insert(Kind::Key, "k", 9);
        tokio::time::advance(TOMBSTONE_TTL / 2 + std::time::Duration::from_secs(1)).await;
        t.insert(Kind::Deployment, "b", 1);
        assert_eq!(t.get(Kind::Key, "k"), Some(9));
        tokio::time::advance(TOMBSTONE_TTL).await;
        assert_eq!(t.get(Kind::Key, "k"), None, "past its time");
        t.insert(Kind::Deployment, "c", 1);
        assert_eq!(t.len(), 1, "expired ones are dropped as new ones are laid");
    }
}
