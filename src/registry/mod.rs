//! The edge's view of deployments and keys: one writer, readers that never wait for a snapshot.
//!
//! Readers (every request) look deployments up by slug and keys by SHA-256 in sharded tables
//! (DashMap, 256 shards): a lookup takes one shard's read lock, which a writer holds only for
//! one insert, never for a whole snapshot. Every change — a snapshot from the file or the control plane, a single
//! event pulled or pushed — goes through [`Registry::apply_event`] or
//! [`Registry::apply_snapshot`], serialised by one writer mutex, so revision rules hold whichever
//! path brings a change and in whatever order:
//!
//! * an object is never replaced by an older (or equal) revision of itself;
//! * a delete leaves a tombstone for [`TOMBSTONE_TTL`], so a late older upsert cannot revive it;
//! * an event or object that does not parse is rejected alone and never poisons the rest.
//!
//! A fleet's millions of entries are updated one event at a time, never rebuilt whole, and a
//! snapshot is read in blocks (see [`walk`]), so loading one costs little beyond the state.

mod index;
pub mod model;
pub mod persist;
mod snapshot;
mod tombstones;
pub mod walk;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use serde::Deserialize;

use dashmap::mapref::entry::Entry;
use index::{ByHash, BySlug, DeploymentById, KeyById};
use tombstones::{Kind, Tombstones};

use crate::auth::KeyHash;
use crate::host::Slug;
use crate::proxy::pool::Pools;
pub use model::{
    ApiKey, AuthMode, Deployment, DeploymentDoc, KeyDoc, ShortText, TargetDoc, Upstream,
};

/// How long a delete is remembered against late, older upserts.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most tombstones remembered at once (oldest evicted first).
pub const MAX_TOMBSTONES: usize = 1_000_000;
/// Shards of the request path's tables: many, so that growing one moves few entries while
/// readers of that shard wait.
const SHARDS: usize = 256;

/// The tables' hasher: fast, seeded at random per process (slugs are chosen by users).
type Hasher = foldhash::fast::RandomState;

/// One control-plane event (SPEC §4).
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// Global, increasing revision of this event.
    pub revision: u64,
    /// What changes.
    #[serde(flatten)]
    pub op: Op,
}

/// The change an event carries.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    UpsertDeployment { deployment: DeploymentDoc },
    DeleteDeployment { id: String },
    UpsertKey { key: KeyDoc },
    DeleteKey { id: String },
}

/// What applying one change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The state changed.
    Changed,
    /// Already known at this or a newer revision: nothing to do (idempotent).
    Stale,
    /// Refused; the reason is logged by the caller.
    Rejected(String),
}

/// The outcome of applying a snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot's revision.
    pub revision: u64,
    /// Objects inserted or updated.
    pub changed: usize,
    /// Objects removed because the snapshot no longer holds them.
    pub removed: usize,
    /// Objects that did not parse or validate, each with its reason.
    pub rejected: Vec<String>,
    /// How long checking and applying the document took.
    pub took: Duration,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// The writer's own indexes, only touched under the writer mutex.
struct Writer {
    deployments: HashSet<DeploymentById, Hasher>,
    keys: HashSet<KeyById, Hasher>,
    tombstones: Tombstones,
    /// Counts snapshots; objects a snapshot holds are marked with its number.
    epoch: u32,
    /// The id of the deployment whose key was upserted last.
    last_owner: Option<Arc<str>>,
}

/// The writer's lock; publishes the entry counts when released.
struct WriterGuard<'a> {
    registry: &'a Registry,
    guard: std::sync::MutexGuard<'a, Writer>,
}

impl std::ops::Deref for WriterGuard<'_> {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.guard
    }
}

impl std::ops::DerefMut for WriterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.guard
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let r = self.registry;
        r.deployment_count
            .store(self.guard.deployments.len(), Ordering::Relaxed);
        r.key_count.store(self.guard.keys.len(), Ordering::Relaxed);
    }
}

/// Deployments by slug and keys by hash, for the request path; fed by one writer.
pub struct Registry {
    by_slug: DashMap<BySlug, (), Hasher>,
    by_hash: DashMap<ByHash, (), Hasher>,
    writer: Mutex<Writer>,
    revision: AtomicU64,
    loaded: AtomicBool,
    /// Entry counts, published by the writer so readers (metrics, admin) never take its lock,
    /// which a large snapshot holds for seconds.
    deployment_count: AtomicUsize,
    key_count: AtomicUsize,
    pools: Arc<Pools>,
    /// Signalled after every change, for the persister (a stored permit coalesces bursts).
    changed: tokio::sync::Notify,
    /// Counts changes, so the persister can tell whether the state moved since it last wrote.
    generation: AtomicU64,
}

/// An event validated against the pools, ready to apply.
enum Resolved {
    UpsertDeployment(Deployment),
    DeleteDeployment(String),
    UpsertKey(ApiKey),
    DeleteKey(String),
}

impl Registry {
    /// An empty registry resolving deployments against `pools`.
    pub fn new(pools: Arc<Pools>) -> Registry {
        Registry {
            by_slug: DashMap::with_hasher_and_shard_amount(Hasher::default(), SHARDS),
            by_hash: DashMap::with_hasher_and_shard_amount(Hasher::default(), SHARDS),
            writer: Mutex::new(Writer {
                deployments: HashSet::default(),
                keys: HashSet::default(),
                epoch: 0,
                last_owner: None,
                tombstones: Tombstones::default(),
            }),
            revision: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            deployment_count: AtomicUsize::new(0),
            key_count: AtomicUsize::new(0),
            pools,
            changed: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
        }
    }

    /// Waits until the state changes after the last wait (changes in between coalesce).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// How many changes were applied so far (grows with every change; for the persister).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn signal_change(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// The deployment served at `slug`, enabled or not. Takes one shard's read lock.
    pub fn deployment(&self, slug: &Slug) -> Option<Arc<Deployment>> {
        self.by_slug.get(slug).map(|e| Arc::clone(&e.key().0))
    }

    /// The key with this hash, live or revoked. Takes one shard's read lock.
    pub fn key(&self, hash: &KeyHash) -> Option<Arc<ApiKey>> {
        self.by_hash.get(hash).map(|e| Arc::clone(&e.key().0))
    }

    /// Highest revision applied so far.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Whether a whole state (a snapshot) has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Number of deployments and keys held.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.deployment_count.load(Ordering::Relaxed),
            self.key_count.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> WriterGuard<'_> {
        // A panic while holding the lock cannot leave the caches half-written in a way readers
        // could misread (each insert is atomic), so a poisoned lock is still usable.
        WriterGuard {
            registry: self,
            guard: self.writer.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn bump_revision(&self, revision: u64) {
        self.revision.fetch_max(revision, Ordering::AcqRel);
    }

    /// Parses and applies one event; a malformed event is rejected alone.
    pub fn apply_json_event(&self, text: &[u8]) -> Applied {
        match serde_json::from_slice::<Event>(text) {
            Ok(event) => self.apply_event(event),
            Err(e) => Applied::Rejected(format!("event does not parse: {e}")),
        }
    }

    /// Applies one event under the revision rules. Returns once the change is visible to every
    /// request that starts afterwards.
    pub fn apply_event(&self, event: Event) -> Applied {
        let revision = event.revision;
        match self.resolve(event) {
            Ok(resolved) => {
                let mut w = self.lock();
                let outcome = self.apply_resolved(&mut w, revision, resolved);
                drop(w);
                self.after_change(revision, &outcome);
                outcome
            }
            Err(why) => Applied::Rejected(why),
        }
    }

    /// Applies a batch all or nothing as far as validation goes: when any event does not
    /// validate, nothing is applied and its index and reason are returned. Otherwise every
    /// event is applied in order under one lock (each may still be stale, or refused for a
    /// revision conflict, which its outcome says).
    pub fn apply_batch(&self, events: Vec<Event>) -> Result<Vec<Applied>, (usize, String)> {
        let resolved = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let revision = e.revision;
                self.resolve(e)
                    .map(|r| (revision, r))
                    .map_err(|why| (i, why))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut w = self.lock();
        let outcomes: Vec<(u64, Applied)> = resolved
            .into_iter()
            .map(|(revision, r)| (revision, self.apply_resolved(&mut w, revision, r)))
            .collect();
        drop(w);
        Ok(outcomes
            .into_iter()
            .map(|(revision, outcome)| {
                self.after_change(revision, &outcome);
                outcome
            })
            .collect())
    }

    fn resolve(&self, event: Event) -> Result<Resolved, String> {
        Ok(match event.op {
            Op::UpsertDeployment { deployment } => {
                Resolved::UpsertDeployment(Deployment::resolve(deployment, &self.pools)?)
            }
            Op::DeleteDeployment { id } => Resolved::DeleteDeployment(id),
            Op::UpsertKey { key } => Resolved::UpsertKey(ApiKey::resolve(key)?),
            Op::DeleteKey { id } => Resolved::DeleteKey(id),
        })
    }

    fn apply_resolved(&self, w: &mut Writer, revision: u64, event: Resolved) -> Applied {
        match event {
            Resolved::UpsertDeployment(d) => self.upsert_deployment(w, d, None),
            Resolved::DeleteDeployment(id) => self.delete_deployment(w, &id, revision),
            Resolved::UpsertKey(k) => self.upsert_key(w, k, None),
            Resolved::DeleteKey(id) => self.delete_key(w, &id, revision),
        }
    }

    fn after_change(&self, revision: u64, outcome: &Applied) {
        if !matches!(outcome, Applied::Rejected(_)) {
            self.bump_revision(revision);
        }
        if *outcome == Applied::Changed {
            self.signal_change();
        }
    }

    fn tombstoned(w: &Writer, kind: Kind, id: &str, revision: u64) -> bool {
        w.tombstones
            .get(kind, id)
            .is_some_and(|deleted_at| deleted_at >= revision)
    }

    /// Upserts `d` under the revision rules. With `mark` (a snapshot's number), the deployment
    /// under this id is marked as held by the snapshot, whether it is replaced or stays.
    fn upsert_deployment(&self, w: &mut Writer, d: Deployment, mark: Option<u32>) -> Applied {
        let current = w.deployments.get(&*d.id).map(|e| Arc::clone(&e.0));
        if let (Some(c), Some(mark)) = (&current, mark) {
            c.mark.store(mark, Ordering::Relaxed);
        }
        if current.as_ref().is_some_and(|c| c.revision >= d.revision)
            || Self::tombstoned(w, Kind::Deployment, &d.id, d.revision)
        {
            return Applied::Stale;
        }
        if let Some(mark) = mark {
            d.mark.store(mark, Ordering::Relaxed);
        }
        let d = Arc::new(d);
        // One look-up in the slug table: take the slot unless a newer deployment holds it.
        match self.by_slug.entry(BySlug(Arc::clone(&d))) {
            Entry::Occupied(slot) => {
                let holder = &slot.key().0;
                if holder.id != d.id {
                    if holder.revision > d.revision {
                        return Applied::Rejected(format!(
                            "deployment {}: slug {} belongs to a newer deployment",
                            d.id, d.slug
                        ));
                    }
                    // The holder moved or was deleted in events not seen yet; the newer claim
                    // wins.
                    w.deployments.remove(&*holder.id);
                }
                slot.replace_entry(());
            }
            Entry::Vacant(slot) => {
                slot.insert(());
            }
        }
        if let Some(c) = current.filter(|c| c.slug != d.slug) {
            self.by_slug.remove_if(&c.slug, |e, _| e.0.id == c.id);
        }
        w.tombstones.remove(Kind::Deployment, &d.id);
        w.deployments.replace(DeploymentById(d));
        Applied::Changed
    }

    fn delete_deployment(&self, w: &mut Writer, id: &str, revision: u64) -> Applied {
        if Self::tombstoned(w, Kind::Deployment, id, revision) {
            return Applied::Stale;
        }
        match w.deployments.get(id) {
            Some(c) if c.0.revision > revision => return Applied::Stale,
            _ => {}
        }
        w.tombstones.insert(Kind::Deployment, id, revision);
        let Some(DeploymentById(d)) = w.deployments.take(id) else {
            return Applied::Stale;
        };
        self.by_slug.remove_if(&d.slug, |e, _| e.0.id == d.id);
        Applied::Changed
    }

    /// Upserts `k` under the revision rules; `mark` as for [`Registry::upsert_deployment`].
    fn upsert_key(&self, w: &mut Writer, mut k: ApiKey, mark: Option<u32>) -> Applied {
        let current = w.keys.get(&*k.id).map(|e| Arc::clone(&e.0));
        if let (Some(c), Some(mark)) = (&current, mark) {
            c.mark.store(mark, Ordering::Relaxed);
        }
        if current.as_ref().is_some_and(|c| c.revision >= k.revision)
            || Self::tombstoned(w, Kind::Key, &k.id, k.revision)
        {
            return Applied::Stale;
        }
        // One copy of the deployment id for the deployment and all its keys. A deployment's
        // keys usually come one after another, so the last one found is tried first.
        match &w.last_owner {
            Some(id) if **id == *k.deployment_id => k.deployment_id = Arc::clone(id),
            _ => {
                if let Some(d) = w.deployments.get(&*k.deployment_id) {
                    k.deployment_id = Arc::clone(&d.0.id);
                    w.last_owner = Some(Arc::clone(&d.0.id));
                }
            }
        }
        if let Some(mark) = mark {
            k.mark.store(mark, Ordering::Relaxed);
        }
        let k = Arc::new(k);
        // One look-up in the hash table: take the slot unless a newer key holds it.
        match self.by_hash.entry(ByHash(Arc::clone(&k))) {
            Entry::Occupied(slot) => {
                let holder = &slot.key().0;
                if holder.id != k.id {
                    if holder.revision > k.revision {
                        return Applied::Rejected(format!(
                            "key {}: hash belongs to a newer key",
                            k.id
                        ));
                    }
                    w.keys.remove(&*holder.id);
                }
                slot.replace_entry(());
            }
            Entry::Vacant(slot) => {
                slot.insert(());
            }
        }
        if let Some(c) = current.filter(|c| c.hash != k.hash) {
            self.by_hash.remove_if(&c.hash, |e, _| e.0.id == c.id);
        }
        w.tombstones.remove(Kind::Key, &k.id);
        w.keys.replace(KeyById(k));
        Applied::Changed
    }

    fn delete_key(&self, w: &mut Writer, id: &str, revision: u64) -> Applied {
        if Self::tombstoned(w, Kind::Key, id, revision) {
            return Applied::Stale;
        }
        match w.keys.get(id) {
            Some(c) if c.0.revision > revision => return Applied::Stale,
            _ => {}
        }
        w.tombstones.insert(Kind::Key, id, revision);
        let Some(KeyById(k)) = w.keys.take(id) else {
            return Applied::Stale;
        };
        self.by_hash.remove_if(&k.hash, |e, _| e.0.id == k.id);
        Applied::Changed
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
