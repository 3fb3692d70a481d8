//! The edge's view of deployments and keys: one writer, lock-free readers.
//!
//! Readers (every request) look deployments up by slug and keys by SHA-256 in moka caches, which
//! take no global lock. Every change — a snapshot from the file or the control plane, a single
//! event pulled or pushed — goes through [`Registry::apply_event`] or
//! [`Registry::apply_snapshot`], serialised by one writer mutex, so revision rules hold whichever
//! path brings a change and in whatever order:
//!
//! * an object is never replaced by an older (or equal) revision of itself;
//! * a delete leaves a tombstone for [`TOMBSTONE_TTL`], so a late older upsert cannot revive it;
//! * an event or object that does not parse is rejected alone and never poisons the rest.
//!
//! A fleet's millions of entries are updated one event at a time, never rebuilt whole.

pub mod model;
pub mod persist;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::KeyHash;
use crate::host::Slug;
use crate::proxy::pool::Pools;
pub use model::{ApiKey, AuthMode, Deployment, DeploymentDoc, KeyDoc, TargetDoc, Upstream};

/// How long a delete is remembered against late, older upserts.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most tombstones remembered at once (oldest evicted first).
pub const MAX_TOMBSTONES: u64 = 1_000_000;

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
}

#[derive(Deserialize)]
struct SnapshotDoc<'a> {
    revision: u64,
    #[serde(borrow, default)]
    deployments: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    keys: Vec<&'a RawValue>,
}

#[derive(serde::Serialize)]
struct ExportDoc {
    revision: u64,
    deployments: Vec<DeploymentDoc>,
    keys: Vec<KeyDoc>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Deployment,
    Key,
}

/// The writer's own indexes, only touched under the writer mutex.
struct Writer {
    deployments: HashMap<Arc<str>, Arc<Deployment>>,
    keys: HashMap<Arc<str>, Arc<ApiKey>>,
    tombstones: Cache<(Kind, Box<str>), u64>,
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
    by_slug: Cache<Slug, Arc<Deployment>>,
    by_hash: Cache<KeyHash, Arc<ApiKey>>,
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
            by_slug: Cache::builder().build(),
            by_hash: Cache::builder().build(),
            writer: Mutex::new(Writer {
                deployments: HashMap::new(),
                keys: HashMap::new(),
                tombstones: Cache::builder()
                    .max_capacity(MAX_TOMBSTONES)
                    .time_to_live(TOMBSTONE_TTL)
                    .build(),
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

    /// The deployment served at `slug`, enabled or not. Lock-free.
    pub fn deployment(&self, slug: &Slug) -> Option<Arc<Deployment>> {
        self.by_slug.get(slug)
    }

    /// The key with this hash, live or revoked. Lock-free.
    pub fn key(&self, hash: &KeyHash) -> Option<Arc<ApiKey>> {
        self.by_hash.get(hash)
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
            Resolved::UpsertDeployment(d) => self.upsert_deployment(w, d),
            Resolved::DeleteDeployment(id) => self.delete_deployment(w, &id, revision),
            Resolved::UpsertKey(k) => self.upsert_key(w, k),
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

    /// The whole state as a snapshot document (`{"revision","deployments","keys"}`), the form
    /// [`Registry::apply_snapshot`] reads back. The writer lock is held only to collect
    /// references, not while serialising.
    pub fn export(&self) -> Vec<u8> {
        // Read before locking: every change at or below this revision finished under the lock
        // before its revision was published, so the content is at least this new (replaying a
        // newer event on top is harmless; skipping one would not be).
        let revision = self.revision();
        let w = self.lock();
        let deployments: Vec<Arc<Deployment>> = w.deployments.values().cloned().collect();
        let keys: Vec<Arc<ApiKey>> = w.keys.values().cloned().collect();
        drop(w);
        let doc = ExportDoc {
            revision,
            deployments: deployments.iter().map(|d| d.to_doc()).collect(),
            keys: keys.iter().map(|k| k.to_doc()).collect(),
        };
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// Applies a whole snapshot (`{"revision":N,"deployments":[…],"keys":[…]}`): every object
    /// in it is upserted, and objects it no longer holds (known at a revision not newer than the
    /// snapshot) are removed. A document that does not parse changes nothing.
    pub fn apply_snapshot(&self, text: &[u8]) -> Result<SnapshotReport, String> {
        let doc: SnapshotDoc<'_> =
            serde_json::from_slice(text).map_err(|e| format!("snapshot does not parse: {e}"))?;
        let mut report = SnapshotReport {
            revision: doc.revision,
            ..SnapshotReport::default()
        };
        let mut seen_deployments: HashSet<String> = HashSet::with_capacity(doc.deployments.len());
        let mut seen_keys: HashSet<String> = HashSet::with_capacity(doc.keys.len());
        let mut w = self.lock();
        for raw in &doc.deployments {
            let parsed = serde_json::from_str::<DeploymentDoc>(raw.get())
                .map_err(|e| e.to_string())
                .and_then(|d| {
                    seen_deployments.insert(d.id.clone());
                    Deployment::resolve(d, &self.pools)
                });
            match parsed {
                Ok(d) => self.count(&mut report, self.upsert_deployment(&mut w, d)),
                Err(why) => {
                    // Keep what we had for an object we cannot read rather than drop it.
                    if let Ok(IdOnly { id }) = serde_json::from_str(raw.get()) {
                        seen_deployments.insert(id);
                    }
                    report.rejected.push(format!("deployment: {why}"));
                }
            }
        }
        for raw in &doc.keys {
            let parsed = serde_json::from_str::<KeyDoc>(raw.get())
                .map_err(|e| e.to_string())
                .and_then(|k| {
                    seen_keys.insert(k.id.clone());
                    ApiKey::resolve(k)
                });
            match parsed {
                Ok(k) => self.count(&mut report, self.upsert_key(&mut w, k)),
                Err(why) => {
                    if let Ok(IdOnly { id }) = serde_json::from_str(raw.get()) {
                        seen_keys.insert(id);
                    }
                    report.rejected.push(format!("key: {why}"));
                }
            }
        }
        let gone: Vec<Arc<str>> = w
            .deployments
            .values()
            .filter(|d| d.revision <= doc.revision && !seen_deployments.contains(&*d.id))
            .map(|d| d.id.clone())
            .collect();
        for id in gone {
            if self.delete_deployment(&mut w, &id, doc.revision) == Applied::Changed {
                report.removed += 1;
            }
        }
        let gone: Vec<Arc<str>> = w
            .keys
            .values()
            .filter(|k| k.revision <= doc.revision && !seen_keys.contains(&*k.id))
            .map(|k| k.id.clone())
            .collect();
        for id in gone {
            if self.delete_key(&mut w, &id, doc.revision) == Applied::Changed {
                report.removed += 1;
            }
        }
        drop(w);
        self.bump_revision(doc.revision);
        self.loaded.store(true, Ordering::Release);
        if report.changed + report.removed > 0 {
            self.signal_change();
        }
        Ok(report)
    }

    fn count(&self, report: &mut SnapshotReport, outcome: Applied) {
        match outcome {
            Applied::Changed => report.changed += 1,
            Applied::Stale => {}
            Applied::Rejected(why) => report.rejected.push(why),
        }
    }

    fn tombstoned(w: &Writer, kind: Kind, id: &str, revision: u64) -> bool {
        w.tombstones
            .get(&(kind, id.into()))
            .is_some_and(|deleted_at| deleted_at >= revision)
    }

    fn upsert_deployment(&self, w: &mut Writer, d: Deployment) -> Applied {
        let current = w.deployments.get(&d.id).cloned();
        if current.as_ref().is_some_and(|c| c.revision >= d.revision)
            || Self::tombstoned(w, Kind::Deployment, &d.id, d.revision)
        {
            return Applied::Stale;
        }
        if let Some(holder) = self.by_slug.get(&d.slug).filter(|h| h.id != d.id) {
            if holder.revision > d.revision {
                return Applied::Rejected(format!(
                    "deployment {}: slug {} belongs to a newer deployment",
                    d.id, d.slug
                ));
            }
            // The holder moved or was deleted in events not seen yet; the newer claim wins.
            w.deployments.remove(&holder.id);
        }
        if let Some(c) = current.filter(|c| c.slug != d.slug) {
            self.by_slug.invalidate(&c.slug);
        }
        w.tombstones
            .invalidate(&(Kind::Deployment, d.id.as_ref().into()));
        let d = Arc::new(d);
        self.by_slug.insert(d.slug, Arc::clone(&d));
        w.deployments.insert(d.id.clone(), d);
        Applied::Changed
    }

    fn delete_deployment(&self, w: &mut Writer, id: &str, revision: u64) -> Applied {
        if Self::tombstoned(w, Kind::Deployment, id, revision) {
            return Applied::Stale;
        }
        match w.deployments.get(id) {
            Some(c) if c.revision > revision => return Applied::Stale,
            _ => {}
        }
        w.tombstones.insert((Kind::Deployment, id.into()), revision);
        let Some(d) = w.deployments.remove(id) else {
            return Applied::Stale;
        };
        if self.by_slug.get(&d.slug).is_some_and(|h| h.id == d.id) {
            self.by_slug.invalidate(&d.slug);
        }
        Applied::Changed
    }

    fn upsert_key(&self, w: &mut Writer, k: ApiKey) -> Applied {
        let current = w.keys.get(&k.id).cloned();
        if current.as_ref().is_some_and(|c| c.revision >= k.revision)
            || Self::tombstoned(w, Kind::Key, &k.id, k.revision)
        {
            return Applied::Stale;
        }
        if let Some(holder) = self.by_hash.get(&k.hash).filter(|h| h.id != k.id) {
            if holder.revision > k.revision {
                return Applied::Rejected(format!("key {}: hash belongs to a newer key", k.id));
            }
            w.keys.remove(&holder.id);
        }
        if let Some(c) = current.filter(|c| c.hash != k.hash) {
            self.by_hash.invalidate(&c.hash);
        }
        w.tombstones.invalidate(&(Kind::Key, k.id.as_ref().into()));
        let k = Arc::new(k);
        self.by_hash.insert(k.hash, Arc::clone(&k));
        w.keys.insert(k.id.clone(), k);
        Applied::Changed
    }

    fn delete_key(&self, w: &mut Writer, id: &str, revision: u64) -> Applied {
        if Self::tombstoned(w, Kind::Key, id, revision) {
            return Applied::Stale;
        }
        match w.keys.get(id) {
            Some(c) if c.revision > revision => return Applied::Stale,
            _ => {}
        }
        w.tombstones.insert((Kind::Key, id.into()), revision);
        let Some(k) = w.keys.remove(id) else {
            return Applied::Stale;
        };
        if self.by_hash.get(&k.hash).is_some_and(|h| h.id == k.id) {
            self.by_hash.invalidate(&k.hash);
        }
        Applied::Changed
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
