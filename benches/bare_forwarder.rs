//! The bare hyper forwarder of the load comparison, as a process of its own.
//!
//! `cargo bench --bench bare_forwarder -- --listen 127.0.0.1:18081 --upstream 127.0.0.1:19100`
//!
//! See `benches/support/forwarder.rs`: no auth, no rewrite — the floor for any hyper proxy.

#![allow(clippy::print_stdout)] // a command-line tool: it prints where it listens

#[path = "support/forwarder.rs"]
mod forwarder;

use std::net::SocketAddr;

fn main() -> std::io::Result<()> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 18081).into();
    let mut upstream: SocketAddr = ([127, 0, 0, 1], 9100).into();
    let mut threads = 2;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()).unwrap_or(listen),
            "--upstream" => upstream = args.next().and_then(|v| v.parse().ok()).unwrap_or(upstream),
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).unwrap_or(threads),
            _ => {} // `cargo bench` adds `--bench`
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("bare forwarder on {} -> {upstream}", listener.local_addr()?);
        forwarder::serve(listener, upstream).await;
        Ok(())
    })
}
