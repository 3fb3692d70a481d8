//! The TOML configuration of SPEC §7: serde structs with defaults, then one validation pass that
//! reports every bad setting at once, naming each field.
//!
//! Unknown fields are refused (`deny_unknown_fields`), durations are humantime strings, and
//! relative paths are resolved against the config file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod pool;
mod validate;

pub use pool::PoolConfig;

use crate::host::normalise_base_domain;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Domains under which `<slug>.<base>` is served.
    pub base_domains: Vec<String>,
    /// Where the applied control-plane state is persisted (static stability).
    pub state_dir: PathBuf,
    /// Listening addresses.
    pub listen: Listen,
    /// Certificates of the HTTPS listener.
    pub tls: TlsConfig,
    /// The admin listener's credentials and limits.
    pub admin: Admin,
    /// Where deployments and keys come from.
    pub control_plane: ControlPlane,
    /// Optional token-bucket rate limit per key (per deployment for `authMode: "none"`).
    pub rate_limits: Option<RateLimits>,
    /// Usage reporting.
    pub usage: Usage,
    /// Logging.
    pub log: Log,
    /// Backend pools, chosen by a deployment's base model.
    pub pools: Vec<PoolConfig>,
    /// Size and count limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Folder of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base_domains: vec!["arkor.app".to_owned()],
            state_dir: PathBuf::from("../var/state"),
            listen: Listen::default(),
            tls: TlsConfig::default(),
            admin: Admin::default(),
            control_plane: ControlPlane::default(),
            rate_limits: None,
            usage: Usage::default(),
            log: Log::default(),
            pools: Vec::new(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            base_dir: PathBuf::from("."),
        }
    }
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Plain HTTP (HTTP/1.1 and h2c prior knowledge); `""` disables it.
    pub http: String,
    /// HTTPS (HTTP/1.1 and HTTP/2 by ALPN); off unless set; needs `[tls]`.
    pub https: String,
    /// Admin listener (health, metrics, push); `""` disables it.
    pub admin: String,
    /// Threads serving the data listeners, each with its own event loop; 0 means one per CPU
    /// the process may use.
    pub workers: usize,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: "127.0.0.1:8080".to_owned(),
            https: String::new(),
            admin: "127.0.0.1:9090".to_owned(),
            workers: 0,
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chains and keys (PEM), picked by SNI; the first also serves handshakes
    /// without SNI.
    pub certs: Vec<CertFiles>,
    /// How often the files are checked for a change.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// A TLS handshake must finish within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            certs: Vec::new(),
            reload_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// One certificate chain and its private key, PEM files (relative to the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A credential from config: the value, a file holding it, or an environment variable.
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// The credential itself, for an outgoing `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares a presented value in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented);
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Bearer token for `/admin/…` (or `token_file`, or `token_env`). Without one, `/admin/…`
    /// answers 401 and only health and metrics are served.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    /// Largest pushed batch.
    pub max_body_bytes: usize,
    /// The resolved token.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            token: None,
            token_file: None,
            token_env: None,
            max_body_bytes: 16 * 1024 * 1024,
            secret: None,
        }
    }
}

/// `[rate_limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Sustained rate per key.
    pub requests_per_second: f64,
    /// Requests allowed at once (the bucket size).
    pub burst: u32,
    /// Most keys tracked at once; beyond it, new keys are not limited until idle ones expire.
    #[serde(default = "default_max_subjects")]
    pub max_subjects: usize,
}

fn default_max_subjects() -> usize {
    crate::limits::DEFAULT_MAX_SUBJECTS
}

/// `[usage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Usage {
    /// How often usage is posted to the control plane (pull mode).
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// Most (deployment, key) pairs held between reports; beyond it, new pairs are counted in
    /// metrics only and a warning is logged.
    pub max_entries: usize,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            report_interval: Duration::from_secs(10),
            max_entries: 100_000,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Default filter (`RUST_LOG` overrides it): `error`, `warn`, `info`, `debug`, `trace`, or
    /// a tracing filter such as `info,arkor_edge::access=off`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
    /// One line per request at `info` on the `arkor_edge::access` target.
    pub access: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".to_owned(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[control_plane]`: a snapshot file (the default) or a control-plane URL to pull from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlane {
    /// Snapshot file, relative to the config file; re-read when it changes. Defaults to
    /// `deployments.json` when no `url` is set.
    pub file: Option<PathBuf>,
    /// Control plane base URL (`http://…`): snapshot, event stream and usage reports.
    pub url: Option<String>,
    /// Bearer token sent to the control plane (or `token_file`, or `token_env`).
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    /// How often the file's metadata is checked for a change.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Bound on a snapshot download or a usage post.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// An event stream silent for longer than this is reconnected (the control plane is
    /// expected to send keep-alive comments).
    #[serde(with = "humantime_serde")]
    pub stream_idle: Duration,
    /// Longest pause between reconnection attempts (the backoff starts at 100 ms, doubles, and
    /// is jittered).
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// The resolved token.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

impl Default for ControlPlane {
    fn default() -> Self {
        ControlPlane {
            file: None,
            url: None,
            token: None,
            token_file: None,
            token_env: None,
            poll_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            stream_idle: Duration::from_secs(60),
            backoff_max: Duration::from_secs(30),
            secret: None,
        }
    }
}

/// Where deployments and keys come from, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    /// A snapshot file (absolute path).
    File(PathBuf),
    /// A control plane to pull from: base URL without a trailing slash.
    Pull(String),
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest request head (HTTP/1.1 read buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Most client connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// HTTP/1.1 client connections that may hold their buffers (about 16 KiB each) through up to
    /// a second of idleness once they carried a second request; beyond this many, idle ones are
    /// parked after 10 ms.
    pub warm_connections: usize,
    /// Failed key checks allowed per client address within `auth_failure_window` before the
    /// address gets 429 for the rest of the window; 0 turns the brake off.
    pub max_auth_failures: u32,
    /// The window of `max_auth_failures`.
    #[serde(with = "humantime_serde")]
    pub auth_failure_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            warm_connections: 256,
            max_auth_failures: 100,
            auth_failure_window: Duration::from_secs(60),
        }
    }
}

/// `[timeouts]`, humantime strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A client must send a whole request head within this once its first bytes came
    /// (HTTP/1.1), and a new connection its first bytes.
    #[serde(with = "humantime_serde")]
    pub client_header: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1.1 and HTTP/2).
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    /// A client must send its whole request body within this.
    #[serde(with = "humantime_serde")]
    pub client_body: Duration,
    /// TCP connect to a backend.
    #[serde(with = "humantime_serde")]
    pub upstream_connect: Duration,
    /// From sending the request to the backend's response head.
    #[serde(with = "humantime_serde")]
    pub upstream_first_byte: Duration,
    /// Longest silence between two chunks of a response body.
    #[serde(with = "humantime_serde")]
    pub upstream_idle: Duration,
    /// How long in-flight requests may run on after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            client_body: Duration::from_secs(60),
            upstream_connect: Duration::from_secs(2),
            upstream_first_byte: Duration::from_secs(120),
            upstream_idle: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A configuration that failed to load: every problem found, each naming its field.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(problem)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Config::from_toml(&text, base_dir).map_err(|e| {
            ConfigError(
                e.0.into_iter()
                    .map(|m| format!("{}: {m}", path.display()))
                    .collect(),
            )
        })
    }

    /// Parses and validates config text; `base_dir` anchors relative paths.
    pub fn from_toml(text: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError(vec![e.to_string()]))?;
        config.base_dir = base_dir;
        config.validate()?;
        Ok(config)
    }

    /// Resolves a path from the config against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The plain HTTP listen address, if enabled (validated).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listen.http.parse().ok()
    }

    /// How many threads serve the data listeners: `listen.workers`, or when that is 0, as many
    /// as the CPUs the process may use (its affinity and cgroup quota count).
    pub fn workers(&self) -> usize {
        match self.listen.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

    /// The HTTPS listen address, if enabled (validated).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.listen.https.parse().ok()
    }

    /// The certificate files, resolved against the config folder.
    pub fn cert_files(&self) -> Vec<CertFiles> {
        self.tls
            .certs
            .iter()
            .map(|c| CertFiles {
                cert: self.resolve(&c.cert),
                key: self.resolve(&c.key),
            })
            .collect()
    }

    /// The admin listen address, if enabled (validated).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.listen.admin.parse().ok()
    }

    /// Where deployments and keys come from.
    pub fn state_source(&self) -> StateSource {
        match (&self.control_plane.url, &self.control_plane.file) {
            (Some(url), _) => StateSource::Pull(url.trim_end_matches('/').to_owned()),
            (None, Some(file)) => StateSource::File(self.resolve(file)),
            (None, None) => StateSource::File(self.resolve(Path::new("deployments.json"))),
        }
    }

    /// The persisted-state folder, resolved.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.state_dir)
    }

    /// Base domains, normalised (validated).
    pub fn normalised_base_domains(&self) -> Vec<String> {
        self.base_domains
            .iter()
            .filter_map(|b| normalise_base_domain(b))
            .collect()
    }
}

#[cfg(test)]
mod tests;
