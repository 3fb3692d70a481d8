//! Pull sync from a control plane: `GET {url}/v1/edge/snapshot`, then the SSE stream
//! `GET {url}/v1/edge/events?after=N`, reconnecting with jittered exponential backoff.
//!
//! [`PullSource::run`] is one loop: take a snapshot when the registry holds none (or after the
//! control plane answered `410 Gone`: "too old"), then follow the event stream from the
//! registry's revision, applying each event through the registry's one writer. Whatever fails —
//! connect, status, timeout, a disconnect, a silent stream — the loop waits a jittered backoff
//! and reconnects from the last applied revision; the registry keeps serving what it already
//! knows meanwhile. A malformed or over-long event is rejected alone and the stream goes on.
//! The backoff (100 ms doubling to `backoff_max`, full jitter) starts over after a healthy
//! stream: one that delivered an event, or stayed open longer than `backoff_max`.
//!
//! Timeouts: `request_timeout` bounds the connect and the response head of every request, and
//! each *pause* in a snapshot body rather than the whole body, since a fleet's snapshot is
//! hundreds of megabytes and its download time grows with it; a stalled download still ends
//! within `request_timeout`. An event stream silent (not even a keep-alive comment) for
//! `stream_idle` is dropped and reconnected.
//!
//! [`crate::metrics::SYNC_LAG`] is refreshed once a second by a ticker beside the loop, so it
//! keeps growing while the loop is stuck in a download, a backoff or a silent stream.

pub mod sse;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::registry::{Applied, Registry, SnapshotReport};
use crate::sync::SyncStatus;
use sse::{EventPart, SseParser};

/// Largest snapshot document accepted (a million deployments is about 500 MB).
pub const MAX_SNAPSHOT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Largest single event (its data lines together); a longer one is discarded.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// The first reconnection delay; it doubles up to `backoff_max`.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// How often [`crate::metrics::SYNC_LAG`] is refreshed.
const LAG_TICK: Duration = Duration::from_secs(1);

/// Timing of the pull loop (from `[control_plane]`).
#[derive(Debug, Clone, Copy)]
pub struct PullSettings {
    /// Bound on connecting, on a response head, and on each pause in a snapshot body.
    pub request_timeout: Duration,
    /// An event stream silent for this long is dropped and reconnected.
    pub stream_idle: Duration,
    /// Longest wait between reconnections.
    pub backoff_max: Duration,
}

/// The control plane as a source of state: snapshot plus event stream.
pub struct PullSource {
    base_url: String,
    /// `Bearer <token>`, marked sensitive so it never shows in a `Debug` of the request.
    authorization: Option<HeaderValue>,
    registry: Arc<Registry>,
    status: Arc<SyncStatus>,
    settings: PullSettings,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Where a snapshot is downloaded to, when not into memory.
    spool_dir: Option<PathBuf>,
}

/// Why an event stream ended.
#[derive(Debug)]
enum StreamEnd {
    /// `410 Gone`: the revision we asked from is too old; a snapshot is needed.
    Gone,
    /// Anything else; the reason is logged and the stream reconnected.
    Failed(String),
}

/// How far one event stream got, to tell a healthy stream that ended from a failure in a row.
#[derive(Debug, Default)]
struct Progress {
    /// When the stream's 2xx head arrived.
    opened: Option<tokio::time::Instant>,
    /// Whether an event that parsed (applied or already known) came through.
    delivered: bool,
}

impl Progress {
    /// A stream that delivered an event, or stayed open longer than the longest pause (a load
    /// balancer's cut of a quiet stream), was healthy: the backoff starts over after it.
    fn was_healthy(&self, backoff_max: Duration) -> bool {
        self.delivered || self.opened.is_some_and(|t| t.elapsed() >= backoff_max)
    }
}

/// The reconnection delay after `attempt` failures in a row: a uniform draw (`unit` in
/// `[0, 1)`) below `BACKOFF_START · 2^attempt`, capped at `max` ("full jitter"), so a fleet of
/// edges cut off together does not come back in lockstep.
pub fn backoff_delay(attempt: u32, max: Duration, unit: f64) -> Duration {
    let ceiling = BACKOFF_START
        .checked_mul(1u32 << attempt.min(20))
        .map_or(max, |d| d.min(max));
    // Float-to-int `as` saturates (and maps NaN to 0), so no draw can panic here.
    let nanos = ceiling.as_nanos() as f64 * unit.clamp(0.0, 1.0);
    Duration::from_nanos(nanos as u64)
}

impl PullSource {
    /// A source pulling from `base_url` (`http://host:port[/prefix]`, no trailing slash). The
    /// token, when set, goes with every request as `Authorization: Bearer …`.
    pub fn new(
        base_url: String,
        token: Option<Secret>,
        registry: Arc<Registry>,
        status: Arc<SyncStatus>,
        settings: PullSettings,
    ) -> PullSource {
        let authorization = token.and_then(|t| {
            // The config only admits visible ASCII, so this cannot fail; were it to, the
            // control plane answers 401 and the log says so, without the token.
            let mut value = HeaderValue::try_from(format!("Bearer {}", t.expose())).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.request_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        PullSource {
            base_url,
            authorization,
            registry,
            status,
            settings,
            client,
            spool_dir: None,
        }
    }

    /// Downloads snapshots into an unnamed file in `dir` (the state folder) rather than into
    /// memory: a fleet's snapshot is hundreds of megabytes, as much again as the state built
    /// from it. The file is unlinked as soon as it is created, so nothing is left behind.
    pub fn spool_snapshots_in(mut self, dir: PathBuf) -> PullSource {
        self.spool_dir = Some(dir);
        self
    }

    /// Downloads the snapshot and applies it: objects it no longer holds are removed. Used at
    /// start (when no persisted state was loaded) and after `410 Gone`. On any failure the
    /// registry is left as it was.
    pub async fn load_snapshot(&self) -> Result<SnapshotReport, String> {
        let url = format!("{}/v1/edge/snapshot", self.base_url);
        let response = self.get(&url, "application/json").await?;
        if !response.status().is_success() {
            return Err(format!("{url}: status {}", response.status()));
        }
        let body = self
            .read_snapshot(response)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        // Parsing and indexing a fleet's snapshot takes seconds of CPU: keep it off the
        // runtime's workers.
        let registry = Arc::clone(&self.registry);
        let report = tokio::task::spawn_blocking(move || match body {
            Download::Memory(bytes) => registry.apply_snapshot(&bytes),
            Download::File(file) => registry.apply_snapshot_from(file),
        })
        .await
        .map_err(|e| format!("{url}: applying the snapshot failed: {e}"))?
        .map_err(|e| format!("{url}: {e}"))?;
        self.status.touch();
        for why in &report.rejected {
            tracing::error!(url = %url, "control-plane object rejected: {why}");
        }
        Ok(report)
    }

    /// Runs until `shutdown` is cancelled: a snapshot when needed, then the event stream,
    /// reconnecting forever. Cancelling interrupts any request, read or wait at once.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = refresh_lag(&self.status) => {}
            _ = self.sync_loop() => {}
        }
    }

    async fn sync_loop(&self) {
        let mut attempt: u32 = 0;
        let mut need_snapshot = !self.registry.is_loaded();
        loop {
            if need_snapshot {
                match self.load_snapshot().await {
                    Ok(r) => {
                        need_snapshot = false;
                        tracing::info!(
                            url = %self.base_url,
                            revision = r.revision,
                            changed = r.changed,
                            removed = r.removed,
                            rejected = r.rejected.len(),
                            took_ms = r.took.as_millis() as u64,
                            "control-plane snapshot applied"
                        );
                    }
                    Err(e) => tracing::warn!("control-plane snapshot failed: {e}"),
                }
            }
            if !need_snapshot {
                let mut progress = Progress::default();
                match self.follow_events(&mut progress).await {
                    StreamEnd::Gone => {
                        tracing::info!(
                            url = %self.base_url,
                            revision = self.registry.revision(),
                            "control plane no longer has our revision: taking a new snapshot"
                        );
                        need_snapshot = true;
                    }
                    StreamEnd::Failed(e) => tracing::warn!("control-plane event stream: {e}"),
                }
                if progress.was_healthy(self.settings.backoff_max) {
                    attempt = 0;
                }
            }
            let delay = backoff_delay(attempt, self.settings.backoff_max, fastrand::f64());
            attempt = attempt.saturating_add(1);
            tracing::debug!(?delay, "reconnecting to the control plane");
            tokio::time::sleep(delay).await;
            self.status.reconnected();
        }
    }

    /// Follows `events?after=<revision>` until it ends, noting its `progress` on the way.
    async fn follow_events(&self, progress: &mut Progress) -> StreamEnd {
        let url = format!(
            "{}/v1/edge/events?after={}",
            self.base_url,
            self.registry.revision()
        );
        let response = match self.get(&url, "text/event-stream").await {
            Ok(r) => r,
            Err(e) => return StreamEnd::Failed(e),
        };
        match response.status() {
            StatusCode::GONE => return StreamEnd::Gone,
            s if !s.is_success() => return StreamEnd::Failed(format!("{url}: status {s}")),
            _ => {}
        }
        progress.opened = Some(tokio::time::Instant::now());
        let mut body = response.into_body();
        let mut parser = SseParser::new(MAX_EVENT_BYTES);
        loop {
            let frame = match tokio::time::timeout(self.settings.stream_idle, body.frame()).await {
                Err(_) => {
                    return StreamEnd::Failed(format!(
                        "{url}: silent for {:?}",
                        self.settings.stream_idle
                    ));
                }
                Ok(None) => return StreamEnd::Failed(format!("{url}: closed by the server")),
                Ok(Some(Err(e))) => return StreamEnd::Failed(format!("{url}: {}", chain(&e))),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            parser.feed(&chunk, |part| {
                if self.on_part(part) {
                    progress.delivered = true;
                }
            });
        }
    }

    /// Handles one parsed piece of the stream; true when it was an event that parsed (applied
    /// or already known), which proves the stream healthy.
    fn on_part(&self, part: EventPart<'_>) -> bool {
        self.status.touch();
        let result = match part {
            EventPart::Comment => return false,
            // An empty `data:` carries nothing to apply; some servers use it as a keep-alive.
            EventPart::Data(data) if data.trim_ascii().is_empty() => return false,
            EventPart::Data(data) => match self.registry.apply_json_event(data) {
                Applied::Changed => "applied",
                Applied::Stale => "stale",
                Applied::Rejected(why) => {
                    tracing::error!(url = %self.base_url, "control-plane event rejected: {why}");
                    "rejected"
                }
            },
            EventPart::Discarded => {
                tracing::error!(
                    url = %self.base_url,
                    "control-plane event longer than {MAX_EVENT_BYTES} bytes discarded"
                );
                "rejected"
            }
        };
        metrics::counter!(crate::metrics::SYNC_EVENTS, "source" => "pull", "result" => result)
            .increment(1);
        result != "rejected"
    }

    /// Sends `GET url`; bounded by `request_timeout` up to the response head.
    async fn get(&self, url: &str, accept: &'static str) -> Result<Response<Incoming>, String> {
        let mut request = Request::get(url)
            .header(ACCEPT, accept)
            .header(CACHE_CONTROL, "no-cache")
            .body(Empty::new())
            .map_err(|e| format!("{url}: {e}"))?;
        if let Some(auth) = &self.authorization {
            request.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        match tokio::time::timeout(self.settings.request_timeout, self.client.request(request))
            .await
        {
            Err(_) => Err(format!(
                "{url}: no answer within {:?}",
                self.settings.request_timeout
            )),
            Ok(Err(e)) => Err(format!("{url}: {}", chain(&e))),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Reads a snapshot body within [`MAX_SNAPSHOT_BYTES`], each pause bounded by
    /// `request_timeout`: into a spool file when [`PullSource::spool_snapshots_in`] was set,
    /// else into memory.
    async fn read_snapshot(&self, response: Response<Incoming>) -> Result<Download, String> {
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared.filter(|&len| len > MAX_SNAPSHOT_BYTES) {
            return Err(format!(
                "snapshot of {len} bytes is over the {MAX_SNAPSHOT_BYTES}-byte limit"
            ));
        }
        let mut sink = match &self.spool_dir {
            Some(dir) => Sink::File(spool_file(dir).await?),
            // An honest length saves the copies of growing the buffer; the limit above caps it.
            None => Sink::Memory(Vec::with_capacity(declared.unwrap_or(0) as usize)),
        };
        let mut received: u64 = 0;
        let mut body = response.into_body();
        loop {
            let frame = tokio::time::timeout(self.settings.request_timeout, body.frame())
                .await
                .map_err(|_| {
                    format!(
                        "snapshot download stalled for {:?}",
                        self.settings.request_timeout
                    )
                })?;
            let Some(frame) = frame else {
                return sink.finish().await;
            };
            let frame = frame.map_err(|e| chain(&e))?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            received += chunk.len() as u64;
            if received > MAX_SNAPSHOT_BYTES {
                return Err(format!("snapshot over the {MAX_SNAPSHOT_BYTES}-byte limit"));
            }
            sink.write(&chunk).await?;
        }
    }
}

/// A downloaded snapshot.
enum Download {
    Memory(Vec<u8>),
    /// A spool file, at its start.
    File(std::fs::File),
}

/// Where a snapshot download goes while it arrives.
enum Sink {
    Memory(Vec<u8>),
    File(tokio::io::BufWriter<tokio::fs::File>),
}

impl Sink {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), String> {
        match self {
            Sink::Memory(bytes) => bytes.extend_from_slice(chunk),
            Sink::File(file) => file
                .write_all(chunk)
                .await
                .map_err(|e| format!("spooling the snapshot: {e}"))?,
        }
        Ok(())
    }

    async fn finish(self) -> Result<Download, String> {
        match self {
            Sink::Memory(bytes) => Ok(Download::Memory(bytes)),
            Sink::File(mut file) => {
                let spooled = async {
                    file.flush().await?;
                    let mut file = file.into_inner();
                    file.rewind().await?;
                    Ok::<_, std::io::Error>(file.into_std().await)
                };
                spooled
                    .await
                    .map(Download::File)
                    .map_err(|e| format!("spooling the snapshot: {e}"))
            }
        }
    }
}

/// A new spool file in `dir`, already unlinked.
async fn spool_file(dir: &Path) -> Result<tokio::io::BufWriter<tokio::fs::File>, String> {
    let path = dir.join(format!("snapshot.download.{}", std::process::id()));
    let opened = async {
        tokio::fs::create_dir_all(dir).await?;
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await?;
        tokio::fs::remove_file(&path).await?;
        Ok::<_, std::io::Error>(file)
    };
    let file = opened
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(tokio::io::BufWriter::with_capacity(1 << 20, file))
}

/// Sets [`crate::metrics::SYNC_LAG`] every [`LAG_TICK`] from the last contact; never returns.
async fn refresh_lag(status: &SyncStatus) {
    let mut ticker = tokio::time::interval(LAG_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Some(last) = status.last_contact_ms() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let lag = now.saturating_sub(last) as f64 / 1000.0;
            metrics::gauge!(crate::metrics::SYNC_LAG).set(lag);
        }
    }
}

/// An error and its sources, for a log line (hyper's own message alone is often just
/// "client error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
