//! Pull sync from a control plane: `GET {url}/v1/edge/snapshot`, then the SSE stream
//! `GET {url}/v1/edge/events?after=N`, reconnecting with jittered exponential backoff.
//! TEMPORARY interface copy while the real module is written on the `pull` branch.
use std::sync::Arc;
use std::time::Duration;
pub struct PullSettings {
    pub request_timeout: Duration,
    pub stream_idle: Duration,
    pub backoff_max: Duration,
}
pub struct PullSource;
impl PullSource {
    pub fn new(
        _base_url: String,
        _token: Option<crate::config::Secret>,
        _registry: Arc<crate::registry::Registry>,
        _status: Arc<crate::sync::SyncStatus>,
        _settings: PullSettings,
    ) -> PullSource {
        PullSource
    }
    pub async fn load_snapshot(&self) -> Result<crate::registry::SnapshotReport, String> {
        Err("stub".into())
    }
    pub async fn run(self, _shutdown: tokio_util::sync::CancellationToken) {}
}
