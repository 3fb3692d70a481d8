//! Whole states: applying a snapshot document, and writing the state out as one.
//!
//! A snapshot is read twice, in blocks: once to check that the whole document parses (a
//! document that does not parse changes nothing), then again to apply each object as it is
//! read. Neither the document nor a parsed copy of it is ever held whole, so loading a fleet's
//! state costs little more memory than the state itself.

use std::io::{Read, Seek, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::model::KeyWire;
use super::walk::{self, Array, Element, Front, Visit};
use super::{ApiKey, Applied, Deployment, DeploymentDoc, IdOnly, Registry, SnapshotReport, Writer};

impl Registry {
    /// Applies a whole snapshot (`{"revision":N,"deployments":[…],"keys":[…]}`): every object
    /// in it is upserted, and objects it no longer holds (known at a revision not newer than the
    /// snapshot) are removed. A document that does not parse changes nothing.
    pub fn apply_snapshot(&self, text: &[u8]) -> Result<SnapshotReport, String> {
        self.apply_snapshot_from(std::io::Cursor::new(text))
    }

    /// [`Registry::apply_snapshot`] over a document read from `source` (a file, usually), which
    /// is read twice. Should the document change between the two reads so that the second one
    /// fails, the objects read until then stay applied (each is whole and valid) and nothing is
    /// removed; the error says so.
    ///
    /// Until a first snapshot is loaded (at start, before the edge is ready), the second read
    /// runs on a thread of its own that parses and resolves objects while this one indexes
    /// them: a fleet's first load takes two cores. Later snapshots are read and applied on this
    /// thread alone, leaving the other cores to the requests being served. Both ways apply the
    /// same objects in the same order.
    pub fn apply_snapshot_from<S: Read + Seek + Send>(
        &self,
        mut source: S,
    ) -> Result<SnapshotReport, String> {
        let started = std::time::Instant::now();
        let outline = walk::walk_blocks(&mut source, &mut |_: Element<'_>| {})?;
        source
            .rewind()
            .map_err(|e| format!("snapshot cannot be read again: {e}"))?;
        let mut report = SnapshotReport {
            revision: outline.revision,
            ..SnapshotReport::default()
        };
        let mut w = self.lock();
        w.epoch = w.epoch.wrapping_add(1).max(1);
        let epoch = w.epoch;
        w.deployments.reserve(outline.deployments);
        w.keys.reserve(outline.keys);
        let mut apply = Apply {
            registry: self,
            writer: &mut w,
            epoch,
            report: &mut report,
        };
        let second = if self.is_loaded() {
            walk::walk_blocks(&mut source, &mut apply)
        } else {
            apply.pipelined(&mut source)
        };
        match second {
            Ok(o) if o.revision == outline.revision => {}
            Ok(_) | Err(_) => {
                drop(w);
                if report.changed > 0 {
                    self.signal_change();
                }
                return Err(format!(
                    "snapshot changed while being read; {} objects applied, none removed",
                    report.changed
                ));
            }
        }
        let revision = outline.revision;
        let unmarked =
            |mark: u32, object_revision: u64| mark != epoch && object_revision <= revision;
        let gone: Vec<Arc<str>> = w
            .deployments
            .iter()
            .filter(|e| unmarked(e.0.mark.load(Ordering::Relaxed), e.0.revision))
            .map(|e| Arc::clone(&e.0.id))
            .collect();
        for id in gone {
            if self.delete_deployment(&mut w, &id, revision) == Applied::Changed {
                report.removed += 1;
            }
        }
        let gone: Vec<Arc<str>> = w
            .keys
            .iter()
            .filter(|e| unmarked(e.0.mark.load(Ordering::Relaxed), e.0.revision))
            .map(|e| Arc::clone(&e.0.id))
            .collect();
        for id in gone {
            if self.delete_key(&mut w, &id, revision) == Applied::Changed {
                report.removed += 1;
            }
        }
        drop(w);
        report.took = started.elapsed();
        self.bump_revision(revision);
        self.loaded.store(true, Ordering::Release);
        if report.changed + report.removed > 0 {
            self.signal_change();
        }
        Ok(report)
    }

    /// One deployment of a snapshot: applied, and marked as held by it. One that does not
    /// parse or validate keeps what we had under its id rather than have it removed.
    fn snapshot_deployment(
        &self,
        w: &mut Writer,
        raw: &[u8],
        epoch: u32,
        report: &mut SnapshotReport,
    ) {
        let resolved = serde_json::from_slice::<DeploymentDoc>(raw)
            .map_err(|e| e.to_string())
            .and_then(|d| Deployment::resolve(d, &self.pools));
        match resolved {
            Ok(d) => count(report, self.upsert_deployment(w, d, Some(epoch))),
            Err(why) => {
                report.rejected.push(format!("deployment: {why}"));
                let held = serde_json::from_slice::<IdOnly>(raw)
                    .ok()
                    .and_then(|IdOnly { id }| w.deployments.get(id.as_str()));
                if let Some(e) = held {
                    e.0.mark.store(epoch, Ordering::Relaxed);
                }
            }
        }
    }

    /// One key of a snapshot; as [`Registry::snapshot_deployment`].
    fn snapshot_key(&self, w: &mut Writer, raw: &[u8], epoch: u32, report: &mut SnapshotReport) {
        let resolved = serde_json::from_slice::<KeyWire<'_>>(raw)
            .map_err(|e| e.to_string())
            .and_then(ApiKey::resolve_wire);
        match resolved {
            Ok(k) => count(report, self.upsert_key(w, k, Some(epoch))),
            Err(why) => {
                report.rejected.push(format!("key: {why}"));
                let held = serde_json::from_slice::<IdOnly>(raw)
                    .ok()
                    .and_then(|IdOnly { id }| w.keys.get(id.as_str()));
                if let Some(e) = held {
                    e.0.mark.store(epoch, Ordering::Relaxed);
                }
            }
        }
    }

    /// Writes the whole state as a snapshot document (`{"revision","deployments","keys"}`),
    /// the form [`Registry::apply_snapshot`] reads back, one object at a time. The writer lock
    /// is held only to collect references, not while writing.
    pub fn export_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        // Read before locking: every change at or below this revision finished under the lock
        // before its revision was published, so the content is at least this new (replaying a
        // newer event on top is harmless; skipping one would not be).
        let revision = self.revision();
        let w = self.lock();
        let deployments: Vec<Arc<Deployment>> =
            w.deployments.iter().map(|e| Arc::clone(&e.0)).collect();
        let keys: Vec<Arc<ApiKey>> = w.keys.iter().map(|e| Arc::clone(&e.0)).collect();
        drop(w);
        write!(out, "{{\"revision\":{revision},\"deployments\":[")?;
        for (i, d) in deployments.iter().enumerate() {
            out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
            serde_json::to_writer(&mut *out, &d.to_doc())?;
        }
        out.write_all(b"],\"keys\":[")?;
        for (i, k) in keys.iter().enumerate() {
            out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
            serde_json::to_writer(&mut *out, &k.to_doc())?;
        }
        out.write_all(b"]}\n")
    }

    /// [`Registry::export_to`] into memory.
    pub fn export(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec fails only if serialising does, which these documents cannot.
        let _ = self.export_to(&mut out);
        out
    }
}

/// The second walk of a snapshot: each element applied as it is read.
struct Apply<'a> {
    registry: &'a Registry,
    writer: &'a mut Writer,
    epoch: u32,
    report: &'a mut SnapshotReport,
}

impl Visit for Apply<'_> {
    /// Parses the element straight from the buffered bytes (the first walk checked them), so
    /// most elements are scanned once here; one that does not parse comes back whole.
    fn front(&mut self, array: Array, bytes: &[u8]) -> Front {
        match parse_front(self.registry, array, bytes) {
            Some((parsed, len)) => {
                self.index(parsed);
                Front::Read(len)
            }
            None => Front::Unread,
        }
    }

    fn whole(&mut self, array: Array, value: &[u8]) {
        let (r, w, epoch) = (self.registry, &mut *self.writer, self.epoch);
        match array {
            Array::Deployments => r.snapshot_deployment(w, value, epoch, self.report),
            Array::Keys => r.snapshot_key(w, value, epoch, self.report),
        }
    }
}

/// Reads one element from the front of `bytes` and resolves it, with its length; `None` when it
/// is cut short, does not parse or does not resolve (the walker then shows it whole, and its
/// rejection is recorded from its text).
fn parse_front(registry: &Registry, array: Array, bytes: &[u8]) -> Option<(Parsed, usize)> {
    let de = serde_json::Deserializer::from_slice(bytes);
    match array {
        Array::Deployments => {
            let mut values = de.into_iter::<DeploymentDoc>();
            let doc = values.next()?.ok()?;
            let d = Deployment::resolve(doc, &registry.pools).ok()?;
            Some((Parsed::Deployment(d), values.byte_offset()))
        }
        Array::Keys => {
            let mut values = de.into_iter::<KeyWire<'_>>();
            let doc = values.next()?.ok()?;
            let k = ApiKey::resolve_wire(doc).ok()?;
            Some((Parsed::Key(k), values.byte_offset()))
        }
    }
}

/// Objects per hand-over from the reading thread to the indexing one.
const BATCH: usize = 1024;
/// Batches in flight between the two: bounds what a first load holds beyond the state itself.
const BATCHES_IN_FLIGHT: usize = 4;

/// An element read and resolved by the reading thread of a first load.
enum Parsed {
    Deployment(Deployment),
    Key(ApiKey),
    /// One that did not parse or resolve: applied (rejected) from its text.
    Whole(Array, Vec<u8>),
}

/// The reading side of a first load: parses and resolves elements, hands them over in batches.
struct Reader<'a> {
    registry: &'a Registry,
    batch: Vec<Parsed>,
    to_indexer: std::sync::mpsc::SyncSender<Vec<Parsed>>,
}

impl Reader<'_> {
    fn push(&mut self, read: Parsed) {
        self.batch.push(read);
        if self.batch.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        // The indexer stops receiving only when it has gone; the walk then ends on its own.
        let _ = self.to_indexer.send(batch);
    }
}

impl Visit for Reader<'_> {
    fn front(&mut self, array: Array, bytes: &[u8]) -> Front {
        match parse_front(self.registry, array, bytes) {
            Some((parsed, len)) => {
                self.push(parsed);
                Front::Read(len)
            }
            None => Front::Unread,
        }
    }

    fn whole(&mut self, array: Array, value: &[u8]) {
        self.push(Parsed::Whole(array, value.to_vec()));
    }
}

impl Apply<'_> {
    /// The second walk of a first load: read and resolved on a scoped thread, indexed here, in
    /// document order.
    fn pipelined<S: Read + Send>(&mut self, source: S) -> Result<walk::Outline, String> {
        let registry = self.registry;
        std::thread::scope(|scope| {
            let (to_indexer, batches) = std::sync::mpsc::sync_channel(BATCHES_IN_FLIGHT);
            let reading = std::thread::Builder::new()
                .name("snapshot-reader".to_owned())
                .spawn_scoped(scope, move || {
                    let mut reader = Reader {
                        registry,
                        batch: Vec::with_capacity(BATCH),
                        to_indexer,
                    };
                    let outline = walk::walk_blocks(source, &mut reader);
                    reader.flush();
                    outline
                })
                .map_err(|e| format!("cannot start the snapshot reader: {e}"))?;
            for batch in batches {
                for read in batch {
                    self.index(read);
                }
            }
            reading
                .join()
                .unwrap_or_else(|_| Err("the snapshot reader failed".to_owned()))
        })
    }

    fn index(&mut self, read: Parsed) {
        let (r, w, epoch) = (self.registry, &mut *self.writer, self.epoch);
        match read {
            Parsed::Deployment(d) => count(self.report, r.upsert_deployment(w, d, Some(epoch))),
            Parsed::Key(k) => count(self.report, r.upsert_key(w, k, Some(epoch))),
            Parsed::Whole(array, value) => self.whole(array, &value),
        }
    }
}

fn count(report: &mut SnapshotReport, outcome: Applied) {
    match outcome {
        Applied::Changed => report.changed += 1,
        Applied::Stale => {}
        Applied::Rejected(why) => report.rejected.push(why),
    }
}
