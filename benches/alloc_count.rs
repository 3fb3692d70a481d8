//! Heap allocations per proxied request and per streamed chunk, arkor-edge vs the bare hyper
//! forwarder, counted by a global allocator.
//!
//! `cargo bench --bench alloc_count [-- REQUESTS]` (default 2000 per phase, after 200 warm-up)
//!
//! Everything runs in this process on 127.0.0.1, on two runtimes: the proxies (arkor-edge
//! through `arkor_edge::start`, with key checks and model pinning on; the bare forwarder of
//! `benches/support/forwarder.rs`) on a counted one, the mock backends and the client on an
//! uncounted one (a thread-local flag set on its threads). Requests are sequential on one
//! keep-alive connection, so each phase's count divided by its requests is exact, and an idle
//! phase of the same length measures the background tasks' share (reported, not subtracted).
//! Per chunk = (allocations of a 64-token stream - those of an 8-token stream) / 56.
//!
//! `ALLOC_TRACE=1` also prints, on stderr, where each allocation of one request per phase was
//! made: its size and the first frames of its backtrace.

// A measurement tool: it prints its figures and stops outright on a broken setup; the counting
// allocator is the one unsafe impl in the project (it only forwards to the system allocator).
#![allow(
    unsafe_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

#[path = "support/forwarder.rs"]
mod forwarder;
#[path = "support/mock.rs"]
mod mock;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sha2::Digest;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread's allocations count (false on the client's and mocks' threads).
    static COUNTED: Cell<bool> = const { Cell::new(true) };
}

/// Set while one traced request runs (`ALLOC_TRACE=1`).
static TRACING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread is printing a trace: its own allocations are not traced.
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
        if TRACING.load(Ordering::Relaxed) && !IN_TRACE.try_with(Cell::get).unwrap_or(true) {
            IN_TRACE.set(true);
            trace(size);
            IN_TRACE.set(false);
        }
    }
}

/// Prints where an allocation of `size` bytes was made: the first frames outside the standard
/// library and this file.
fn trace(size: usize) {
    let backtrace = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = backtrace
        .lines()
        .map(str::trim_start)
        .filter_map(|l| l.strip_prefix("at "))
        .filter(|l| !l.contains("/rustc/") && !l.contains("alloc_count.rs"))
        // A dependency's file from its crate folder on.
        .map(|l| match l.find("index.crates.io-") {
            Some(i) => l[i..].split_once('/').map_or(l, |(_, rest)| rest),
            None => l,
        })
        .take(4)
        .collect();
    eprintln!("{size:>6} B  {}", frames.join("  <  "));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// atomics and a const-initialised thread-local without a destructor (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEY8: &str = "ark_live_allocallocallocallocalloc0008";
const KEY64: &str = "ark_live_allocallocallocallocalloc0064";

fn snapshot() -> String {
    let dep = |slug: &str, base: &str, rev: u32| {
        serde_json::json!({"id": format!("d-{slug}"), "slug": slug, "enabled": true,
            "authMode": "fixed_api_key", "revision": rev,
            "target": {"type": "adapter", "jobId": format!("job-{slug}"), "checkpointStep": 1,
                       "baseModel": base}})
    };
    let key = |slug: &str, key: &str, rev: u32| {
        serde_json::json!({"id": format!("k-{slug}"), "deploymentId": format!("d-{slug}"),
            "sha256": hex::encode(sha2::Sha256::digest(key.as_bytes())), "enabled": true,
            "revision": rev})
    };
    serde_json::json!({"revision": 4,
        "deployments": [dep("bench8", "bench/m8", 1), dep("bench64", "bench/m64", 2)],
        "keys": [key("bench8", KEY8, 3), key("bench64", KEY64, 4)]})
    .to_string()
}

fn edge_config(mock8: SocketAddr, mock64: SocketAddr) -> String {
    format!(
        r#"state_dir = "state"
[log]
access = false
[listen]
http = "127.0.0.1:0"
admin = ""
[control_plane]
file = "deployments.json"
[[pools]]
name = "m8"
base_models = ["bench/m8"]
endpoints = ["http://{mock8}"]
[[pools]]
name = "m64"
base_models = ["bench/m64"]
endpoints = ["http://{mock64}"]
"#
    )
}

/// One keep-alive connection sending requests one after the other.
struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { send }
    }

    async fn post(&mut self, host: &str, key: &str, stream: bool) -> usize {
        let body = format!(
            r#"{{"model":"gpt-4o","stream":{stream},"messages":[{{"role":"user","content":"Say hello to the edge router, politely."}}]}}"#
        );
        let req = http::Request::post("/v1/chat/completions")
            .header("host", host)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.send.ready().await.unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{host}");
        let mut body = resp.into_body();
        let mut frames = 0;
        while let Some(f) = body.frame().await {
            f.unwrap();
            frames += 1;
        }
        frames
    }
}

#[derive(Clone, Copy)]
struct Count {
    allocs: u64,
    bytes: u64,
}

fn read() -> Count {
    Count {
        allocs: ALLOCS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    }
}

/// Allocations per request of `n` sequential requests (after `warm` unmeasured ones).
async fn phase(client: &mut Client, host: &str, key: &str, stream: bool, n: u64) -> (f64, f64) {
    for _ in 0..n / 10 {
        client.post(host, key, stream).await;
    }
    if std::env::var_os("ALLOC_TRACE").is_some() {
        eprintln!("allocations of one request to {host} (stream: {stream}):");
        TRACING.store(true, Ordering::Relaxed);
        client.post(host, key, stream).await;
        TRACING.store(false, Ordering::Relaxed);
    }
    let before = read();
    for _ in 0..n {
        client.post(host, key, stream).await;
    }
    let after = read();
    (
        (after.allocs - before.allocs) as f64 / n as f64,
        (after.bytes - before.bytes) as f64 / n as f64,
    )
}

struct Figures {
    request: (f64, f64),
    stream8: (f64, f64),
    stream64: (f64, f64),
}

impl Figures {
    fn chunk(&self) -> (f64, f64) {
        (
            (self.stream64.0 - self.stream8.0) / 56.0,
            (self.stream64.1 - self.stream8.1) / 56.0,
        )
    }
}

async fn measure(addr8: SocketAddr, addr64: SocketAddr, n: u64) -> Figures {
    let mut c8 = Client::connect(addr8).await;
    let mut c64 = Client::connect(addr64).await;
    Figures {
        request: phase(&mut c8, "bench8.arkor.app", KEY8, false, n).await,
        stream8: phase(&mut c8, "bench8.arkor.app", KEY8, true, n).await,
        stream64: phase(&mut c64, "bench64.arkor.app", KEY64, true, n).await,
    }
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    COUNTED.set(false);
    let world = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| COUNTED.set(false))
        .enable_all()
        .build()
        .unwrap();
    let proxies = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    let listen = |rt: &tokio::runtime::Runtime| {
        rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
    };
    let (m8, m64) = (listen(&world), listen(&world));
    let (mock8, mock64) = (m8.local_addr().unwrap(), m64.local_addr().unwrap());
    let tokens = |n| mock::MockOptions {
        tokens: n,
        ..mock::MockOptions::default()
    };
    world.spawn(mock::serve(m8, tokens(8)));
    world.spawn(mock::serve(m64, tokens(64)));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deployments.json"), snapshot()).unwrap();
    let config = arkor_edge::config::Config::from_toml(
        &edge_config(mock8, mock64),
        dir.path().to_path_buf(),
    )
    .unwrap();
    let edge = proxies.block_on(arkor_edge::start(config)).unwrap();
    let edge_addr = edge.http_addr.unwrap();
    let (b8, b64) = (listen(&proxies), listen(&proxies));
    let (bare8, bare64) = (b8.local_addr().unwrap(), b64.local_addr().unwrap());
    proxies.spawn(forwarder::serve(b8, mock8));
    proxies.spawn(forwarder::serve(b64, mock64));

    let idle = {
        let before = read();
        std::thread::sleep(Duration::from_secs(1));
        read().allocs - before.allocs
    };
    let edge_f = world.block_on(measure(edge_addr, edge_addr, n));
    let bare_f = world.block_on(measure(bare8, bare64, n));

    println!(
        "heap allocations (counting global allocator), {n} sequential requests per phase on one \
         keep-alive connection; background tasks while idle: {idle} allocations/s"
    );
    println!(
        "{:<34} {:>22} {:>22} {:>12}",
        "", "arkor-edge", "bare forwarder", "edge - bare"
    );
    let row = |name: &str, e: (f64, f64), b: (f64, f64)| {
        println!(
            "{name:<34} {:>8.2} allocs {:>7.0} B {:>8.2} allocs {:>7.0} B {:>+12.2}",
            e.0,
            e.1,
            b.0,
            b.1,
            e.0 - b.0
        );
    };
    row("per request (not streamed)", edge_f.request, bare_f.request);
    row(
        "per streamed request (8 tokens)",
        edge_f.stream8,
        bare_f.stream8,
    );
    row(
        "per streamed request (64 tokens)",
        edge_f.stream64,
        bare_f.stream64,
    );
    row("per streamed chunk", edge_f.chunk(), bare_f.chunk());
    drop(edge);
}
