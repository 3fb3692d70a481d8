//! What the state bench needs around the edge: building and running the release binary as a
//! child process (killed when its guard drops, also on failure), a keep-alive HTTP/1.1 client,
//! readings from `/proc` and the child's log (to see a reload from outside), and percentiles.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

pub type BenchResult<T> = Result<T, String>;

/// Longest a single request may take; a stall longer than this is a failure, not a figure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds `target/release/arkor-edge` and returns its path. `cargo bench` builds the library and
/// this bench only, so the binary the bench runs is built here (a no-op when it is up to date).
pub fn build_edge() -> BenchResult<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "arkor-edge"])
        .current_dir(manifest)
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release failed: {status}"));
    }
    // The nested cargo inherits CARGO_TARGET_DIR, so the binary is wherever that points.
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(t) if t.is_absolute() => t,
        Some(t) => manifest.join(t),
        None => manifest.join("target"),
    };
    let bin = target.join("release").join("arkor-edge");
    if !bin.is_file() {
        return Err(format!("{} was not built", bin.display()));
    }
    Ok(bin)
}

/// Two free loopback addresses (data, admin). Both listeners are held until both ports are
/// known, so the two differ; the child binds them a moment later.
pub fn free_addrs() -> BenchResult<(SocketAddr, SocketAddr)> {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"));
    let (a, b) = (bind()?, bind()?);
    let addr = |l: &std::net::TcpListener| l.local_addr().map_err(|e| format!("{e}"));
    Ok((addr(&a)?, addr(&b)?))
}

/// An `edge.toml` in `dir`: snapshot file `deployments.json`, state in `dir/state`, the admin
/// listener with `token`, and one `builtin:echo` pool serving `base_models`.
pub fn write_config(
    dir: &Path,
    (http, admin): (SocketAddr, SocketAddr),
    token: &str,
    poll_interval: &str,
    base_models: &[&str],
) -> BenchResult<PathBuf> {
    let models = base_models
        .iter()
        .map(|m| format!("{m:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"base_domains = ["arkor.app"]
state_dir = "state"

[listen]
http = "{http}"
admin = "{admin}"

[admin]
token = "{token}"

[control_plane]
file = "deployments.json"
poll_interval = "{poll_interval}"

[log]
level = "info"

# The push phase makes 500 requests with a revoked key on purpose: no failed-auth brake.
[limits]
max_auth_failures = 0

[[pools]]
name = "echo"
base_models = [{models}]
endpoints = ["builtin:echo"]
"#
    );
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// The edge as a child process; dropping it kills it (on success and on failure alike).
pub struct EdgeChild {
    child: Child,
    /// The child's stderr (its log).
    pub log: PathBuf,
    /// When the process was spawned.
    pub spawned: Instant,
}

impl EdgeChild {
    /// Starts `bin --config config`, its log going to `log`.
    pub fn spawn(bin: &Path, config: &Path, log: PathBuf) -> BenchResult<EdgeChild> {
        let stderr = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let spawned = Instant::now();
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            // The reload is detected from the log's text, so the level and colours are fixed.
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(EdgeChild {
            child,
            log,
            spawned,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the exit status and the log's last lines, if the child has ended.
    pub fn check_alive(&mut self) -> BenchResult<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "arkor-edge exited ({status}); its log ends with:\n{}",
                self.log_tail(20)
            )),
            Err(e) => Err(format!("cannot poll the child: {e}")),
        }
    }

    /// The last `lines` lines of the child's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Polls `GET /readyz` on `admin` every 20 ms until it answers 200; returns the time since
    /// the spawn. Fails after `bound` or when the child exits.
    pub async fn wait_ready(
        &mut self,
        admin: SocketAddr,
        bound: Duration,
    ) -> BenchResult<Duration> {
        let deadline = self.spawned + bound;
        while Instant::now() < deadline {
            self.check_alive()?;
            // Connection refused until the listener is bound, which happens after the first load.
            if let Ok(mut c) = Http::connect(admin).await {
                if let Ok((StatusCode::OK, _)) = c.get("/readyz", "127.0.0.1", None).await {
                    return Ok(self.spawned.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("/readyz not 200 within {bound:?}"))
    }
}

impl Drop for EdgeChild {
    fn drop(&mut self) {
        // SIGKILL, not SIGTERM: a graceful stop would persist the whole state once more, and
        // the bench has nothing left to measure.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Http {
    send: SendRequest<Full<Bytes>>,
}

impl Http {
    pub async fn connect(addr: SocketAddr) -> BenchResult<Http> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http { send })
    }

    /// `GET path` with `Host: host` and, if given, `Authorization: Bearer bearer`.
    pub async fn get(
        &mut self,
        path: &str,
        host: &str,
        bearer: Option<&str>,
    ) -> BenchResult<(StatusCode, Bytes)> {
        self.send(Method::GET, path, host, bearer, Bytes::new())
            .await
    }

    /// One request, its whole body read (so the connection can carry the next one).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        host: &str,
        bearer: Option<&str>,
        body: Bytes,
    ) -> BenchResult<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(body)).map_err(|e| format!("{e}"))?;
        let exchange = async {
            self.send.ready().await.map_err(|e| format!("{e}"))?;
            let resp = self
                .send
                .send_request(req)
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{path}: body: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes the process has read through `read(2)` and friends (`rchar` of `/proc/<pid>/io`).
pub fn proc_rchar(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let line = text.lines().find(|l| l.starts_with("rchar:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the process holds `path` open.
pub fn proc_has_open(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

/// Reads what was appended to a log file since `offset`; returns the text and the new offset.
pub fn read_log_from(path: &Path, offset: u64) -> (String, u64) {
    let Ok(mut f) = File::open(path) else {
        return (String::new(), offset);
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_end(&mut buf).is_err() {
        return (String::new(), offset);
    }
    let next = offset + buf.len() as u64;
    (String::from_utf8_lossy(&buf).into_owned(), next)
}

/// When the reload was seen to start (the file opened, or read) and to end (its log line).
#[derive(Default)]
pub struct ReloadSeen {
    pub opened: Option<Instant>,
    pub opened_by: &'static str,
    pub applied: Option<Instant>,
    pub line: Option<String>,
}

/// Watches the child from outside (no requests to it, so the watching does not load it) until
/// the reload's log line appears, `stop` is set or `deadline` passes.
pub fn watch_reload(
    pid: u32,
    (file, log, log_from): (PathBuf, PathBuf, u64),
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> ReloadSeen {
    let mut seen = ReloadSeen::default();
    let rchar_base = proc_rchar(pid).unwrap_or(0);
    let (mut offset, mut tail) = (log_from, String::new());
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if seen.opened.is_none() {
            if proc_has_open(pid, &file) {
                (seen.opened, seen.opened_by) = (Some(Instant::now()), "file descriptor");
            } else if proc_rchar(pid).unwrap_or(0) > rchar_base + (64 << 20) {
                (seen.opened, seen.opened_by) = (Some(Instant::now()), "bytes read");
            }
        }
        let (text, next) = read_log_from(&log, offset);
        offset = next;
        tail.push_str(&text);
        if let Some(line) = tail.lines().find(|l| l.contains("snapshot file applied")) {
            seen.applied = Some(Instant::now());
            seen.line = Some(line.to_owned());
            break;
        }
        // Keep a partial last line for the next read.
        let keep = tail.rfind('\n').map_or(0, |i| i + 1);
        tail.drain(..keep);
        std::thread::sleep(Duration::from_millis(1));
    }
    seen
}

/// p50, p99 and max of a set of durations.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Nearest-rank percentiles; `None` for an empty set.
pub fn summarize(samples: &[Duration]) -> Option<Summary> {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    let max = *s.last()?;
    Some(Summary {
        n: s.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max,
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {}  p99 {}  max {}  (n={})",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.n
        )
    }
}

/// A duration in milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Bytes in MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
