//! Static stability: the applied state is written to `state_dir` so a restart with the control
//! plane down still serves what the edge knew.
//!
//! Writes are atomic (temp file, fsync, rename, fsync of the folder) and coalesced: after a
//! change the writer waits [`COALESCE`] so a burst of events costs one write. Nothing is written
//! before a whole state was loaded, so an empty start never overwrites a good file.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Registry, SnapshotReport};

/// File name inside `state_dir`.
pub const STATE_FILE: &str = "state.json";
/// Pause after a change before writing, so bursts coalesce.
pub const COALESCE: Duration = Duration::from_millis(200);
/// The pause after a change is also at least this many times the last write's duration.
pub const WRITE_SPACING: u32 = 4;

/// Loads the persisted state, if there is one. A file that does not parse is an error (and the
/// registry is left as it was).
pub async fn load(dir: &Path, registry: &Arc<Registry>) -> Result<Option<SnapshotReport>, String> {
    let path = dir.join(STATE_FILE);
    let r = Arc::clone(registry);
    let applied = tokio::task::spawn_blocking(move || match std::fs::File::open(&path) {
        Ok(file) => r
            .apply_snapshot_from(file)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    });
    applied.await.map_err(|e| format!("{e}"))?
}

/// Writes the registry's state to `dir/state.json` atomically, streamed through a buffer.
fn write_blocking(dir: &Path, registry: &Registry) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp.{}", std::process::id()));
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    registry.export_to(&mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    // The rename is durable only once the folder's entry is.
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the state after changes, coalesced, until `shutdown`; then writes once more.
/// Returns how many writes succeeded.
///
/// A write costs time in proportion to the state (a million deployments is hundreds of
/// megabytes), so the pause after a change is at least [`COALESCE`] and at least
/// [`WRITE_SPACING`] times the last write's duration: a large state is written less often
/// rather than all the time.
pub async fn run(dir: PathBuf, registry: Arc<Registry>, shutdown: CancellationToken) -> u64 {
    let mut writes = 0;
    let mut last_write = Duration::ZERO;
    // The generation the last good write started from: at shutdown, a state that has not
    // moved since is not written again.
    let mut written: Option<u64> = None;
    loop {
        tokio::select! {
            _ = registry.changed() => {}
            _ = shutdown.cancelled() => break,
        }
        let pause = COALESCE.max(last_write * WRITE_SPACING);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => {}
        }
        let started = tokio::time::Instant::now();
        let generation = registry.generation();
        if persist(&dir, &registry).await {
            writes += 1;
            written = Some(generation);
        }
        last_write = started.elapsed();
        if shutdown.is_cancelled() {
            break;
        }
    }
    if written != Some(registry.generation()) {
        writes += u64::from(persist(&dir, &registry).await);
    }
    writes
}

async fn persist(dir: &Path, registry: &Arc<Registry>) -> bool {
    if !registry.is_loaded() {
        return false;
    }
    // Serialising a large state is CPU work: off the runtime workers, with the write.
    let (r, d) = (Arc::clone(registry), dir.to_path_buf());
    let written = tokio::task::spawn_blocking(move || write_blocking(&d, &r))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    match written {
        Ok(()) => {
            metrics::counter!(crate::metrics::STATE_WRITES, "result" => "ok").increment(1);
            true
        }
        Err(e) => {
            metrics::counter!(crate::metrics::STATE_WRITES, "result" => "failed").increment(1);
            tracing::error!(dir = %dir.display(), "cannot persist the state: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::pool::Pools;

    fn event(revision: u64, slug: &str) -> Vec<u8> {
        serde_json::json!({"revision": revision, "op": "upsert_deployment", "deployment": {
            "id": format!("id-{slug}"), "slug": slug, "enabled": true, "authMode": "none",
            "target": {"type": "base_model", "baseModel": "m"}, "revision": revision}})
        .to_string()
        .into_bytes()
    }

    #[tokio::test]
    async fn bursts_coalesce_and_the_file_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let registry = Arc::new(Registry::new(Arc::new(Pools::default())));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(state.clone(), Arc::clone(&registry), stop.clone()));

        // Not loaded yet: changes are not written.
        registry.apply_json_event(&event(1, "early"));
        tokio::time::sleep(COALESCE * 2).await;
        assert!(!state.join(STATE_FILE).exists());

        registry
            .apply_snapshot(br#"{"revision":1,"deployments":[],"keys":[]}"#)
            .unwrap();
        for i in 2..50 {
            registry.apply_json_event(&event(i, &format!("s{i}")));
        }
        // The write itself (fsync) can take long on a busy machine: wait for it, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !state.join(STATE_FILE).exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "state file not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        stop.cancel();
        let writes = task.await.unwrap();
        // One coalesced write for the burst (two if the snapshot's own notification was seen
        // first); none more at shutdown, since nothing changed after it.
        assert!((1..=2).contains(&writes), "{writes} writes for one burst");
        let copy = Arc::new(Registry::new(Arc::new(Pools::default())));
        let report = load(&state, &copy).await.unwrap().unwrap();
        assert_eq!(report.revision, 49);
        assert_eq!(copy.counts().0, 48);
        assert!(
            !std::fs::read_dir(&state)
                .unwrap()
                .any(|e| { e.unwrap().file_name().to_string_lossy().contains(".tmp.") })
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_no_state_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::new(Arc::new(Pools::default())));
        assert_eq!(load(dir.path(), &registry).await.unwrap(), None);
        std::fs::write(dir.path().join(STATE_FILE), "{garbage").unwrap();
        assert!(load(dir.path(), &registry).await.is_err());
        assert!(!registry.is_loaded());
    }
}
