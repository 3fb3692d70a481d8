//! The connections: each one sends requests, reads the whole response frame by frame, and
//! records what it saw into its own [`Stats`]; merged at the end.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use memchr::memmem::Finder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::Args;
use crate::report::{Progress, Stats};

/// Largest error body read to find its `code`.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Where requests go and what they carry; built once.
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub host: HeaderValue,
    pub authorization: Option<HeaderValue>,
    pub body: Bytes,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    pub display: String,
}

impl Target {
    pub fn new(args: &Args) -> Result<Target, String> {
        let uri: http::Uri = args.url.parse().map_err(|e| format!("--url: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("--url: must start with http:// or https://".into()),
        };
        let authority = uri.authority().ok_or("--url: no host")?;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let url_host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(url_host, port))
            .map_err(|e| format!("--url: cannot resolve {url_host}: {e}"))?
            .next()
            .ok_or_else(|| format!("--url: {url_host} has no address"))?;
        let host = args.host.clone().unwrap_or_else(|| authority.to_string());
        let path = format!("{}/chat/completions", uri.path().trim_end_matches('/'));
        let mut body = serde_json::json!({
            "model": args.model,
            "stream": args.stream,
            "messages": [{"role": "user", "content": args.prompt}],
        });
        if let Some(m) = args.max_tokens {
            body["max_tokens"] = m.into();
        }
        let tls = if https {
            let name = host.split(':').next().unwrap_or_default().to_owned();
            let name = ServerName::try_from(name).map_err(|e| format!("--host: {e}"))?;
            Some((connector(args.ca.as_deref())?, name))
        } else {
            None
        };
        Ok(Target {
            addr,
            display: format!("{}://{addr}{path}", if https { "https" } else { "http" }),
            path,
            host: HeaderValue::from_str(&host).map_err(|e| format!("--host: {e}"))?,
            authorization: match &args.key {
                Some(k) => Some(
                    HeaderValue::from_str(&format!("Bearer {k}"))
                        .map_err(|_| "--key: not a header value")?,
                ),
                None => None,
            },
            body: Bytes::from(body.to_string()),
            tls,
        })
    }

    async fn connect(&self) -> std::io::Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
            None => Box::new(tcp),
        };
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(Pin::from(io)))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(send)
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::try_from(self.path.as_str()).unwrap_or_default();
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(a) = &self.authorization {
            h.insert(AUTHORIZATION, a.clone());
        }
        req
    }
}

trait Io: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

fn connector(ca: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    let path = ca.unwrap_or(std::path::Path::new("/etc/ssl/certs/ca-certificates.crt"));
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The run's shared schedule: which request is next, and when the run ends.
struct Schedule {
    start: Instant,
    deadline: Option<Instant>,
    count: Option<u64>,
    rate: Option<f64>,
    next: AtomicU64,
    stop: AtomicBool,
}

impl Schedule {
    /// Claims the next request: `Some(due)` (when it is due; open loop only), `None` when the
    /// run is over.
    fn claim(&self) -> Option<Option<Instant>> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.count.is_some_and(|n| i >= n) {
            return None;
        }
        let due = self
            .rate
            .map(|r| self.start + Duration::from_secs_f64(i as f64 / r));
        let now = Instant::now();
        match (due, self.deadline) {
            (Some(due), Some(end)) if due >= end => None,
            (None, Some(end)) if now >= end => None,
            _ => Some(due),
        }
    }
}

/// Runs the load and returns the merged figures.
pub async fn run(target: Arc<Target>, args: Args) -> Stats {
    let start = Instant::now();
    let schedule = Arc::new(Schedule {
        start,
        deadline: args.duration.map(|d| start + d),
        count: args.requests,
        rate: args.rate,
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let progress = Arc::new(Progress::default());
    let reporter = (!args.quiet).then(|| tokio::spawn(Progress::report(Arc::clone(&progress))));
    let interrupted = {
        let schedule = Arc::clone(&schedule);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                schedule.stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (target, schedule, progress) = (
            Arc::clone(&target),
            Arc::clone(&schedule),
            Arc::clone(&progress),
        );
        let (stream, timeout) = (args.stream, args.timeout);
        workers
            .spawn(async move { connection(&target, &schedule, &progress, stream, timeout).await });
    }
    let mut total = Stats::new();
    while let Some(stats) = workers.join_next().await {
        if let Ok(stats) = stats {
            total.merge(&stats);
        }
    }
    total.elapsed = start.elapsed();
    interrupted.abort();
    if let Some(r) = reporter {
        r.abort();
        eprintln!();
    }
    total
}

/// One connection's loop.
async fn connection(
    target: &Target,
    schedule: &Schedule,
    progress: &Progress,
    stream: bool,
    timeout: Duration,
) -> Stats {
    let mut stats = Stats::new();
    let mut send: Option<SendRequest<Full<Bytes>>> = None;
    while let Some(due) = schedule.claim() {
        if let Some(due) = due {
            tokio::time::sleep_until(due).await;
        }
        let started = due.unwrap_or_else(Instant::now);
        let outcome = tokio::time::timeout_at(started + timeout, async {
            if send.as_ref().is_none_or(|s| s.is_closed()) {
                send = Some(
                    target
                        .connect()
                        .await
                        .map_err(|e| format!("connect: {}", e.kind()))?,
                );
            }
            let Some(s) = send.as_mut() else {
                return Err("connect".to_owned());
            };
            if s.ready().await.is_err() {
                send = None;
                return Err("connection closed".to_owned());
            }
            exchange(s, target.request(), started, stream, &mut stats).await
        })
        .await;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => {
                send = None; // the response may still be arriving on it
                Some("timeout".to_owned())
            }
        };
        if let Some(e) = &error {
            if e.starts_with("connect") || e.starts_with("io") {
                send = None;
            }
        }
        stats.record_end(started, error);
        progress.add(stats.last_failed);
    }
    stats
}

/// Sends one request and reads its whole response.
async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    started: Instant,
    stream: bool,
    stats: &mut Stats,
) -> Result<(), String> {
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("io: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("io: {e}"))?;
            if let Some(d) = frame.data_ref() {
                let room = MAX_ERROR_BODY.saturating_sub(bytes.len());
                bytes.extend_from_slice(&d[..d.len().min(room)]);
            }
        }
        return Err(format!("{} {}", status.as_u16(), error_code(&bytes)));
    }
    let mut last: Option<Instant> = None;
    let mut stream_error = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("io: broken body: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        stats.bytes += data.len() as u64;
        if stream {
            match last {
                None => stats.record_first_chunk(now - started),
                Some(prev) => stats.record_gap(now - prev),
            }
            stats.chunks += 1;
            if stream_error.is_none() && ERROR_EVENT.find(data).is_some() {
                let json = data.strip_prefix(b"data: ").unwrap_or(data);
                stream_error = Some(format!("stream {}", error_code(json)));
            }
        }
        last = Some(now);
    }
    match stream_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The start of the edge's mid-stream error event. Built once: `memmem::find` would build its
/// searcher again for every chunk, which was the load generator's largest cost per chunk.
static ERROR_EVENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"data: {\"error\""));

/// The OpenAI error `code` of an error body, or `-`.
fn error_code(body: &[u8]) -> String {
    let end = memchr::memmem::find(body, b"\n\n").unwrap_or(body.len());
    serde_json::from_slice::<serde_json::Value>(&body[..end])
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "-".to_owned())
}
