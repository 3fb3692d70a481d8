//! Pull propagation: the time from an event leaving the control plane to the first request that
//! sees it, over many events, on loopback.
//!
//! `cargo bench --bench propagation [-- ROUNDS]`
//!
//! Runs the whole edge in pull mode against the in-test control plane (`tests/support/`), pushes
//! ROUNDS (default 300) events into the SSE stream that alternately revoke and re-enable a key,
//! and after each one sends requests with that key until the answer matches (401 or 200).
//! Prints p50 / p99 / max. (The push path is measured by `state_bench`: there the change is in
//! force when the push call returns.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)] // a bench binary

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use arkor_edge::auth::KeyHash;
use http::Method;
use serde_json::json;
use support::backend::Backend;
use support::control_plane::ControlPlane;
use support::*;

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(rounds));
}

async fn run(rounds: usize) {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    let toml = config_toml(
        &[backend.url()],
        "",
        &format!("url = \"{}\"\nbackoff_max = \"200ms\"", cp.url()),
        // Polls with a revoked key are failed key checks: keep the per-address brake out of it.
        "[log]\naccess = false\n[limits]\nmax_auth_failures = 0\n",
    );
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &toml).await;
    assert!(
        cp.wait_streams(1, Duration::from_secs(10)).await,
        "no event stream"
    );
    let auth = bearer(KEYED_KEY);
    let mut samples = Vec::with_capacity(rounds);
    let mut polls = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    for round in 0..rounds {
        let enabled = round % 2 == 1;
        let revision = 4 + round as u64;
        let event = json!({"revision": revision, "op": "upsert_key", "key": {
            "id": "k-keyed", "deploymentId": "d-keyed",
            "sha256": KeyHash::of(KEYED_KEY.as_bytes()).to_hex(), "enabled": enabled,
            "revision": revision}});
        let sent = Instant::now();
        cp.push(event);
        let want = if enabled { 200 } else { 401 };
        loop {
            polls += 1;
            let a = send(
                edge.addr,
                Method::GET,
                "keyed.arkor.app",
                "/v1/models",
                &[("authorization", auth.as_str())],
                "",
            )
            .await;
            if a.status.as_u16() == want {
                break;
            }
            assert!(Instant::now() < deadline, "bench ran out of time");
        }
        let took = sent.elapsed();
        if took > Duration::from_millis(100) {
            println!(
                "  slow: round {round} took {:.1} ms (reconnects so far: {})",
                took.as_secs_f64() * 1e3,
                edge.admin(Method::GET, "/metrics", None, "")
                    .await
                    .text()
                    .lines()
                    .find(|l| l.starts_with("arkor_edge_sync_reconnects_total"))
                    .unwrap_or("-")
            );
        }
        samples.push(took);
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    println!(
        "pull propagation over {rounds} events (event written to the SSE stream -> first request that sees it):"
    );
    println!(
        "  p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms   ({} requests polled, each on a new connection)",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
        polls
    );
    edge.stop().await;
}
