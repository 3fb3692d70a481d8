//! A connection-level load client for `benches/tls-load.sh`: full TLS handshakes per second, and
//! many idle keep-alive connections held open while the edge's memory is read.
//!
//! ```text
//! cargo bench --bench conn_load -- connect --addr 127.0.0.1:8443 [--sni bench.arkor.app \
//!     --ca ca.pem] --key ark_live_… [--conns 32] [--secs 10] [--max 25000] [--threads 1]
//! cargo bench --bench conn_load -- idle --addr 127.0.0.1:8080 [--sni NAME --ca ca.pem] \
//!     --key ark_live_… [--count 10000] [--secs 60] [--hold 300] [--h2]
//! ```
//!
//! `connect`: `--conns` loops, each opening a new TCP connection, doing a TLS handshake when
//! `--ca` is given (session resumption disabled in the client, and every handshake checked to be
//! a full one with rustls' `handshake_kind`), sending one `POST /v1/chat/completions` with
//! `Connection: close`, reading the whole response and closing, until `--secs` have passed or
//! `--max` connections were attempted. Prints one line of `name=value` pairs: connections
//! completed, full / resumed handshakes, errors, rate, p50 and p99 of connect-to-last-byte.
//!
//! `idle`: opens `--count` connections (64 being opened at once), TLS when `--ca` is given, each
//! sending one request and reading its whole response, then keeps them all open and idle. With
//! `--h2` the connections speak HTTP/2: ALPN `h2` over TLS, prior knowledge (h2c) without.
//! Prints `ready open=N …` once done (or when `--secs` have passed), then holds the
//! connections until it is killed or `--hold` seconds have passed.

#![allow(clippy::print_stdout)] // a command-line tool: its output is the measurement

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const BODY: &str = r#"{"model":"gpt-4o","stream":false,"messages":[{"role":"user","content":"Say hello to the edge router, politely."}]}"#;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    mode: String,
    addr: SocketAddr,
    sni: String,
    ca: Option<String>,
    key: String,
    host: String,
    conns: usize,
    count: usize,
    max: u64,
    secs: u64,
    hold: u64,
    threads: usize,
    h2: bool,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        mode: String::new(),
        addr: ([127, 0, 0, 1], 8443).into(),
        sni: "bench.arkor.app".to_owned(),
        ca: None,
        key: String::new(),
        host: "bench.arkor.app".to_owned(),
        conns: 32,
        count: 10_000,
        max: 25_000,
        secs: 10,
        hold: 300,
        threads: 1,
        h2: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg}: missing value"));
        match arg.as_str() {
            "connect" | "idle" => a.mode = arg.clone(),
            "--addr" => a.addr = value()?.parse()?,
            "--sni" => a.sni = value()?,
            "--ca" => a.ca = Some(value()?),
            "--key" => a.key = value()?,
            "--host" => a.host = value()?,
            "--conns" => a.conns = value()?.parse()?,
            "--count" => a.count = value()?.parse()?,
            "--max" => a.max = value()?.parse()?,
            "--secs" => a.secs = value()?.parse()?,
            "--hold" => a.hold = value()?.parse()?,
            "--threads" => a.threads = value()?.parse()?,
            "--h2" => a.h2 = true,
            _ => {} // `cargo bench` adds `--bench`
        }
    }
    if a.mode.is_empty() {
        return Err("usage: conn_load connect|idle --addr HOST:PORT --key KEY [...]".into());
    }
    Ok(a)
}

/// A client trusting only the CA in `ca`, with session resumption off: every handshake is a
/// full one (certificate, signature, key exchange).
fn connector(ca: &str, h2: bool) -> Result<TlsConnector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    config.resumption = Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn request(a: &Args, close: bool) -> Result<Request<Full<Bytes>>, Error> {
    let mut r = Request::post("/v1/chat/completions")
        .header("host", &a.host)
        .header("authorization", format!("Bearer {}", a.key))
        .header("content-type", "application/json");
    if close {
        r = r.header("connection", "close");
    }
    Ok(r.body(Full::new(Bytes::from_static(BODY.as_bytes())))?)
}

/// What a connection keeps alive while it idles: the request sender (dropping it would let
/// hyper close the connection).
enum Held {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Held {
    /// Starts the connection's driver on the runtime and returns its sender: HTTP/2 when `h2`.
    async fn handshake<T>(io: T, h2: bool) -> Result<Held, Error>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        Ok(if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Held::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Held::H1(sender)
        })
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Held::H1(s) => s.send_request(req).await,
            Held::H2(s) => s.send_request(req).await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Held::H1(s) => s.is_closed(),
            Held::H2(s) => s.is_closed(),
        }
    }
}

/// An open connection, and whether its TLS handshake was a full one (`None`: plain).
struct Opened {
    held: Held,
    full: Option<bool>,
}

/// Connects (TLS when `tls` is given), sends one request, reads the whole response.
async fn open(a: &Args, tls: Option<&TlsConnector>, close: bool) -> Result<Opened, Error> {
    let tcp = TcpStream::connect(a.addr).await?;
    tcp.set_nodelay(true)?;
    let (mut held, full) = match tls {
        Some(tls) => {
            let name = ServerName::try_from(a.sni.clone())?;
            let stream = tls.connect(name, tcp).await?;
            let full = matches!(
                stream.get_ref().1.handshake_kind(),
                Some(
                    rustls::HandshakeKind::Full | rustls::HandshakeKind::FullWithHelloRetryRequest
                )
            );
            (Held::handshake(stream, a.h2).await?, Some(full))
        }
        None => (Held::handshake(tcp, a.h2).await?, None),
    };
    let resp = held.send(request(a, close && !a.h2)?).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        return Err(format!("status {status}").into());
    }
    Ok(Opened { held, full })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

async fn connect(a: Arc<Args>) -> Result<(), Error> {
    let tls = a.ca.as_deref().map(|ca| connector(ca, a.h2)).transpose()?;
    let full = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let started = Arc::clone(&started);
        let (a, tls) = (Arc::clone(&a), tls.clone());
        let (full, resumed, errors) =
            (Arc::clone(&full), Arc::clone(&resumed), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < a.max {
                let t = Instant::now();
                match tokio::time::timeout_at(deadline.into(), open(&a, tls.as_ref(), true)).await {
                    Ok(Ok(o)) => {
                        times.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        match o.full {
                            Some(true) => full.fetch_add(1, Ordering::Relaxed),
                            Some(false) => resumed.fetch_add(1, Ordering::Relaxed),
                            None => 0,
                        };
                    }
                    Ok(Err(_)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break, // cut off by the deadline: not counted
                }
            }
            times
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await?);
    }
    let secs = start.elapsed().as_secs_f64();
    times.sort_unstable();
    println!(
        "completed={} full={} resumed={} errors={} secs={secs:.2} rate={:.1} p50_ms={:.2} p99_ms={:.2}",
        times.len(),
        full.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        times.len() as f64 / secs,
        percentile(&times, 0.50),
        percentile(&times, 0.99),
    );
    Ok(())
}

async fn idle(a: Arc<Args>) -> Result<(), Error> {
    let tls = a.ca.as_deref().map(|ca| connector(ca, a.h2)).transpose()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.secs);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64.min(a.count) {
        let (a, tls, next, errors) = (
            Arc::clone(&a),
            tls.clone(),
            Arc::clone(&next),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < a.count as u64 {
                match tokio::time::timeout_at(deadline.into(), open(&a, tls.as_ref(), false)).await
                {
                    Ok(Ok(o)) => held.push(o.held),
                    Ok(Err(_)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            held
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.extend(t.await?);
    }
    // Every connection must still be open (a keep-alive connection the edge did not close).
    let open = held.iter().filter(|h| !h.is_closed()).count();
    println!(
        "ready open={open} errors={} secs={:.2}",
        errors.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    drop(held);
    Ok(())
}

fn main() -> Result<(), Error> {
    let a = Arc::new(parse_args()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    match a.mode.as_str() {
        "connect" => rt.block_on(connect(a)),
        _ => rt.block_on(idle(a)),
    }
}
