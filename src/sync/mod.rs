//! Keeping the registry in step with the control plane.
//!
//! Each source is a background loop that feeds [`crate::registry::Registry`] through its one
//! writer, stops on shutdown, and keeps the last good state when a source fails:
//! [`file`] (a snapshot on disk) or [`pull`] (snapshot + SSE events over HTTP). Pushed events
//! arrive through the admin listener. [`SyncStatus`] is what the admin listener reports.

pub mod file;
pub mod pull;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the sync loops share with the admin listener and metrics.
#[derive(Debug, Default)]
pub struct SyncStatus {
    /// Unix milliseconds of the last successful contact with the source (0: never).
    last_contact_ms: AtomicU64,
    /// Reconnections of the pull stream.
    reconnects: AtomicU64,
}

impl SyncStatus {
    /// Records a successful contact (snapshot loaded, event or keep-alive received).
    pub fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_contact_ms.store(now, Ordering::Relaxed);
    }

    /// Unix milliseconds of the last contact, if any.
    pub fn last_contact_ms(&self) -> Option<u64> {
        match self.last_contact_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Counts one reconnection of the pull stream.
    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::SYNC_RECONNECTS).increment(1);
    }

    /// Reconnections so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}
