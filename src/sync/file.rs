//! The file control plane: a snapshot document on disk, loaded at start and re-applied when it
//! changes.
//!
//! The loop checks the file's metadata (modification time, size, inode) every poll interval,
//! which notices editors that write in place and tools that rename a new file over the old one
//! alike. A file that does not parse is refused and the last good state kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::registry::{Registry, SnapshotReport};
use crate::sync::SyncStatus;

/// What identifies one version of the file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

async fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let meta = tokio::fs::metadata(path).await?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok(Fingerprint {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

/// Reads the file and applies it as a snapshot, on a blocking thread: a fleet's snapshot takes
/// seconds of CPU, which must not hold a runtime worker that serves requests.
pub async fn load(path: &Path, registry: &Arc<Registry>) -> Result<SnapshotReport, String> {
    let (r, file_path) = (Arc::clone(registry), path.to_path_buf());
    let report = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&file_path)
            .map_err(|e| e.to_string())
            .and_then(|file| r.apply_snapshot_from(file))
    })
    .await
    .map_err(|e| format!("{}: {e}", path.display()))?
    .map_err(|e| format!("{}: {e}", path.display()))?;
    for why in &report.rejected {
        tracing::error!(file = %path.display(), "control-plane object rejected: {why}");
    }
    Ok(report)
}

/// Watches a snapshot file and re-applies it when it changes, until `shutdown`.
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    registry: Arc<Registry>,
    status: Arc<SyncStatus>,
    /// The version last applied; taken before reading, so a change made while reading is seen.
    last: Option<Fingerprint>,
}

impl FileSource {
    /// A source for `path`, checked every `interval`.
    pub fn new(
        path: PathBuf,
        interval: Duration,
        registry: Arc<Registry>,
        status: Arc<SyncStatus>,
    ) -> FileSource {
        FileSource {
            path,
            interval,
            registry,
            status,
            last: None,
        }
    }

    /// Loads the file once; the edge refuses to start without a first state.
    pub async fn load_initial(&mut self) -> Result<SnapshotReport, String> {
        self.last = fingerprint(&self.path).await.ok();
        let report = load(&self.path, &self.registry).await?;
        self.status.touch();
        Ok(report)
    }

    /// Runs the watch loop until `shutdown` is cancelled.
    pub async fn watch(self, shutdown: CancellationToken) {
        let mut last = self.last;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = match fingerprint(&self.path).await {
                Ok(f) => f,
                Err(e) => {
                    if last.is_some() {
                        tracing::warn!(file = %self.path.display(), "snapshot file unreadable, keeping the last state: {e}");
                    }
                    last = None;
                    continue;
                }
            };
            if last == Some(now) {
                continue;
            }
            last = Some(now);
            match load(&self.path, &self.registry).await {
                Ok(r) => {
                    self.status.touch();
                    tracing::info!(
                    file = %self.path.display(),
                    revision = r.revision,
                    changed = r.changed,
                    removed = r.removed,
                    rejected = r.rejected.len(),
                    took_ms = r.took.as_millis() as u64,
                    "snapshot file applied"
                    );
                }
                Err(e) => tracing::error!("snapshot file refused, keeping the last state: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Slug;
    use crate::proxy::pool::Pools;

    fn doc(revision: u64, slugs: &[&str]) -> String {
        let deployments: Vec<_> = slugs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": format!("d{i}-{s}"), "slug": s, "enabled": true,
                "authMode": "none", "target": {"type": "base_model", "baseModel": "m"},
                "revision": revision})
            })
            .collect();
        serde_json::json!({"revision": revision, "deployments": deployments, "keys": []})
            .to_string()
    }

    async fn wait_for(registry: &Registry, slug: &str, present: bool) {
        let s = Slug::parse(slug.as_bytes()).unwrap();
        for _ in 0..200 {
            if registry.deployment(&s).is_some() == present {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{slug} present={present} never observed");
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("arkor-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("deployments.json");
        std::fs::write(&path, doc(1, &["one"])).unwrap();
        let registry = Arc::new(Registry::new(Arc::new(Pools::default())));
        let mut source = FileSource::new(
            path.clone(),
            Duration::from_millis(20),
            registry.clone(),
            Arc::default(),
        );
        source.load_initial().await.unwrap();
        wait_for(&registry, "one", true).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.watch(stop.clone()));

        // Replaced by rename, as deploy tools do.
        let tmp = dir.join("deployments.json.tmp");
        std::fs::write(&tmp, doc(2, &["two"])).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_for(&registry, "two", true).await;
        wait_for(&registry, "one", false).await;

        // Garbage is refused; the last good state stays.
        std::fs::write(&path, "{ not json").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        wait_for(&registry, "two", true).await;
        assert_eq!(registry.revision(), 2);

        // Fixed again: applied.
        std::fs::write(&path, doc(3, &["two", "three"])).unwrap();
        wait_for(&registry, "three", true).await;

        stop.cancel();
        task.await.unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}
