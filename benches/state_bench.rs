//! The state bench: how the edge's control-plane state behaves, measured on the release binary
//! run as a child process on 127.0.0.1.
//!
//! `cargo bench --bench state_bench` (set `STATE_BENCH_DEPLOYMENTS` for a smaller snapshot
//! than 1,000,000 deployments / 2,000,000 keys while trying it out):
//!
//! 1. **push** — 500 rounds of revoke / re-enable of a key through `POST /admin/v1/events`,
//!    each followed at once by a request with that key: it must be 401 after the revoke and 200
//!    after the re-enable (SPEC §4: a revoke that returned 200 is enforced for every request
//!    that starts afterwards). Prints the push call's p50/p99/max and the violations.
//! 2. **load** — a fresh edge on a snapshot file of 1M deployments and 2M keys: file size, time
//!    from spawn to `/readyz` 200, peak and current RSS, then one lookup near the end of the list.
//! 3. **reload** — `GET /v1/models` latency on a keep-alive connection while idle, then while
//!    the same snapshot at a higher revision (every object newer) is re-read and re-applied.
//!
//! Prints plain text; exits non-zero when a check fails (a push not enforced, a lookup that is
//! not 200, a request that fails during the reload).

// A bench binary: it prints its figures, and a broken setup may stop it outright.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

#[path = "state_bench/snapshot.rs"]
mod snapshot;
#[path = "state_bench/support.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use support::{
    BenchResult, EdgeChild, Http, ReloadSeen, free_addrs, mib, ms, proc_status_bytes, summarize,
    watch_reload, write_config,
};

const ADMIN_TOKEN: &str = "state-bench-admin-token-0123456789";
const PUSH_ROUNDS: u64 = 500;
const RELOAD_REQUESTS: usize = 2000;
const DEFAULT_DEPLOYMENTS: u64 = 1_000_000;

fn main() -> ExitCode {
    // `cargo bench` appends `--bench`; there are no other arguments.
    let started = Instant::now();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("state_bench: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(run());
    println!("total time: {:.1} s", started.elapsed().as_secs_f64());
    match outcome {
        Ok(0) => {
            println!("result: all checks passed");
            ExitCode::SUCCESS
        }
        Ok(failed) => {
            println!("result: {failed} check(s) FAILED");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("result: ERROR: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the phases; returns how many checks failed.
async fn run() -> BenchResult<u32> {
    let deployments = match std::env::var("STATE_BENCH_DEPLOYMENTS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("STATE_BENCH_DEPLOYMENTS={v:?}"))?,
        Err(_) => DEFAULT_DEPLOYMENTS,
    };
    // Declared first so it is removed last, after every child using it was killed.
    let tmp = tempfile::Builder::new()
        .prefix("arkor-state-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    // Canonical, because the reload watcher compares it with the child's open file paths.
    let root = tmp.path().canonicalize().map_err(|e| format!("{e}"))?;
    let bin = support::build_edge()?;
    println!(
        "state_bench: {} on 127.0.0.1, work dir {}",
        bin.display(),
        root.display()
    );

    let mut failed = 0;
    failed += push_phase(&bin, &root).await?;
    let mut loaded = load_phase(&bin, &root, deployments).await?;
    failed += loaded.failed;
    failed += reload_phase(&mut loaded).await?;
    Ok(failed)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Phase 1: push a revoke, then a re-enable, each checked by the very next request.
async fn push_phase(bin: &Path, root: &Path) -> BenchResult<u32> {
    let dir = root.join("push");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{e}"))?;
    let key = "ark_live_pushbenchpushbenchpushbench01";
    let (dep_id, key_id) = (snapshot::uuid(1), snapshot::uuid(2));
    let key_doc = |enabled: bool, revision: u64| {
        json!({"id": key_id, "deploymentId": dep_id, "prefix": &key[..12],
               "sha256": sha256_hex(key), "enabled": enabled, "revision": revision})
    };
    let doc = json!({"revision": 2, "deployments": [{"id": dep_id, "slug": "push-bench",
        "enabled": true, "authMode": "fixed_api_key", "revision": 1,
        "target": {"type": "adapter", "jobId": snapshot::uuid(3), "checkpointStep": 42,
                   "baseModel": snapshot::BASE_MODELS[0]}}],
        "keys": [key_doc(true, 2)]});
    std::fs::write(dir.join("deployments.json"), doc.to_string()).map_err(|e| format!("{e}"))?;
    let addrs = free_addrs()?;
    let config = write_config(&dir, addrs, ADMIN_TOKEN, "1s", &snapshot::BASE_MODELS)?;
    let mut edge = EdgeChild::spawn(bin, &config, dir.join("edge.log"))?;
    edge.wait_ready(addrs.1, Duration::from_secs(30)).await?;
    let (mut admin, mut data) = (Http::connect(addrs.1).await?, Http::connect(addrs.0).await?);
    let admin_host = addrs.1.to_string();

    let (mut revision, mut pushes) = (2, Vec::with_capacity(2 * PUSH_ROUNDS as usize));
    let (mut not_revoked, mut not_restored) = (0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..PUSH_ROUNDS {
        if Instant::now() > deadline {
            return Err("push phase: over 120 s".to_owned());
        }
        for enabled in [false, true] {
            revision += 1;
            let event = json!({"revision": revision, "op": "upsert_key",
                               "key": key_doc(enabled, revision)});
            let body = Bytes::from(event.to_string());
            let t = Instant::now();
            let (status, answer) = admin
                .send(
                    Method::POST,
                    "/admin/v1/events",
                    &admin_host,
                    Some(ADMIN_TOKEN),
                    body,
                )
                .await?;
            pushes.push(t.elapsed());
            let applied = serde_json::from_slice::<Value>(&answer)
                .ok()
                .map(|v| v["applied"].clone());
            if status != StatusCode::OK || applied != Some(json!(1)) {
                return Err(format!(
                    "push answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                ));
            }
            let (status, _) = data
                .get("/v1/models", "push-bench.arkor.app", Some(key))
                .await?;
            match (enabled, status) {
                (false, StatusCode::UNAUTHORIZED) | (true, StatusCode::OK) => {}
                (false, _) => not_revoked += 1,
                (true, _) => not_restored += 1,
            }
        }
    }
    let s = summarize(&pushes).ok_or("no pushes")?;
    println!(
        "[push] {PUSH_ROUNDS} rounds, {} push calls (revoke + re-enable), one event each",
        s.n
    );
    println!("[push] push call: {s}");
    let violations = not_revoked + not_restored;
    println!(
        "[push] violations: {violations} (revoked key not 401: {not_revoked}, re-enabled key not 200: {not_restored})"
    );
    Ok(u32::from(violations > 0))
}

/// The 1M edge, left running for phase 3.
struct Loaded {
    edge: EdgeChild,
    addrs: (SocketAddr, SocketAddr),
    dir: PathBuf,
    deployments: u64,
    load_time: Duration,
    failed: u32,
}

/// Phase 2: a fresh edge on a large snapshot file.
async fn load_phase(bin: &Path, root: &Path, deployments: u64) -> BenchResult<Loaded> {
    let dir = root.join("load");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{e}"))?;
    let file = dir.join("deployments.json");
    let t = Instant::now();
    let size = snapshot::write(&file, deployments, 0).map_err(|e| format!("snapshot: {e}"))?;
    println!(
        "[load] snapshot: {deployments} deployments, {} keys, {} ({size} bytes), written in {:.1} s",
        deployments * snapshot::KEYS_PER_DEPLOYMENT,
        mib(size),
        t.elapsed().as_secs_f64()
    );
    let addrs = free_addrs()?;
    let config = write_config(&dir, addrs, ADMIN_TOKEN, "100ms", &snapshot::BASE_MODELS)?;
    let mut edge = EdgeChild::spawn(bin, &config, dir.join("edge.log"))?;
    let load_time = edge.wait_ready(addrs.1, Duration::from_secs(120)).await?;
    let pid = edge.pid();
    let mem = |field| proc_status_bytes(pid, field).map_or("?".to_owned(), mib);
    println!(
        "[load] spawn -> /readyz 200: {:.2} s",
        load_time.as_secs_f64()
    );
    println!(
        "[load] at ready: peak RSS (VmHWM) {}, RSS (VmRSS) {}",
        mem("VmHWM"),
        mem("VmRSS")
    );

    let mut failed = 0;
    let mut data = Http::connect(addrs.0).await?;
    let (open, keyed) = snapshot::probes(deployments);
    let keyed_key = snapshot::key_plaintext(keyed * snapshot::KEYS_PER_DEPLOYMENT);
    for (i, key) in [(open, None), (keyed, Some(keyed_key.as_str()))] {
        let host = format!("{}.arkor.app", snapshot::slug(i));
        let t = Instant::now();
        let (status, body) = data.get("/v1/models", &host, key).await?;
        let took = t.elapsed();
        let model_ok = String::from_utf8_lossy(&body).contains(&snapshot::target_id(i));
        let auth = if key.is_some() { "key" } else { "no auth" };
        println!(
            "[load] lookup of deployment #{} ({host}, {auth}): {status} in {}{}",
            i + 1,
            ms(took),
            if model_ok { "" } else { ", WRONG MODEL" }
        );
        if status != StatusCode::OK || !model_ok {
            failed += 1;
        }
    }

    // The persister writes the whole state once after the first load; wait for it so phase 3
    // starts from an idle edge, and show what it costs.
    let t = Instant::now();
    let written = wait_persisted(&mut edge, &dir.join("state"), Duration::from_secs(120)).await?;
    println!(
        "[load] first state persist done {:.1} s after ready (state.json {}): peak RSS {}, RSS {}",
        t.elapsed().as_secs_f64(),
        mib(written),
        mem("VmHWM"),
        mem("VmRSS")
    );
    Ok(Loaded {
        edge,
        addrs,
        dir,
        deployments,
        load_time,
        failed,
    })
}

/// Waits until `state_dir/state.json` exists with no temp file beside it; returns its size.
async fn wait_persisted(edge: &mut EdgeChild, state: &Path, bound: Duration) -> BenchResult<u64> {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        edge.check_alive()?;
        let writing = std::fs::read_dir(state).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".tmp"))
        });
        if let (false, Ok(meta)) = (writing, std::fs::metadata(state.join("state.json"))) {
            return Ok(meta.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("state not persisted within {bound:?}"))
}

/// One timed request of a paced run.
struct Sample {
    start: Instant,
    took: Duration,
    ok: bool,
}

/// `count` sequential `GET /v1/models`, one starting every `pace` (or as soon as the previous
/// answered, when it took longer).
async fn paced_run(
    conn: &mut Http,
    (host, key): (&str, &str),
    count: usize,
    pace: Duration,
    deadline: Instant,
) -> BenchResult<Vec<Sample>> {
    let mut samples = Vec::with_capacity(count);
    let mut next = Instant::now();
    for _ in 0..count {
        if Instant::now() > deadline {
            return Err(format!(
                "paced run: over its time bound after {} requests",
                samples.len()
            ));
        }
        tokio::time::sleep_until(next.into()).await;
        let start = Instant::now();
        let (status, _) = conn.get("/v1/models", host, Some(key)).await?;
        samples.push(Sample {
            start,
            took: start.elapsed(),
            ok: status == StatusCode::OK,
        });
        next = start + pace;
    }
    Ok(samples)
}

/// Phase 3: request latency idle, then while the whole snapshot is re-applied.
async fn reload_phase(l: &mut Loaded) -> BenchResult<u32> {
    let phase_start = Instant::now();
    let n = l.deployments;
    let file = l.dir.join("deployments.json");
    let next = l.dir.join("deployments.json.next");
    snapshot::write(&next, n, 1).map_err(|e| format!("snapshot: {e}"))?;
    // Sequential requests take well under a millisecond, so back to back they would all finish
    // before the edge even notices the new file. Spread over about the time the first load
    // took, they cover the reload; the idle run uses the same pace so the two compare.
    let pace = (l.load_time.mul_f64(1.25) / RELOAD_REQUESTS as u32)
        .clamp(Duration::from_millis(1), Duration::from_millis(10));
    let (_, keyed) = snapshot::probes(n);
    let host = format!("{}.arkor.app", snapshot::slug(keyed));
    let key = snapshot::key_plaintext(keyed * snapshot::KEYS_PER_DEPLOYMENT);
    let mut conn = Http::connect(l.addrs.0).await?;
    let bound = Instant::now() + Duration::from_secs(90);
    let idle = paced_run(&mut conn, (&host, &key), RELOAD_REQUESTS, pace, bound).await?;

    let pid = l.edge.pid();
    let log_from = std::fs::metadata(&l.edge.log).map_or(0, |m| m.len());
    let stop = Arc::new(AtomicBool::new(false));
    let watch_deadline = Instant::now() + Duration::from_secs(90);
    let watcher = {
        let (stop, paths) = (
            Arc::clone(&stop),
            (file.clone(), l.edge.log.clone(), log_from),
        );
        std::thread::spawn(move || watch_reload(pid, paths, stop, watch_deadline))
    };
    let renamed = Instant::now();
    std::fs::rename(&next, &file).map_err(|e| format!("rename: {e}"))?;
    let during = paced_run(&mut conn, (&host, &key), RELOAD_REQUESTS, pace, bound).await;
    // The watcher ends by itself once the log line appears (bounded by its deadline).
    if during.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let seen = watcher
        .join()
        .map_err(|_| "reload watcher panicked".to_owned())?;
    let during = during?;
    report_reload(&idle, &during, &seen, (renamed, pace))?;
    let failed = u32::from(idle.iter().chain(&during).any(|s| !s.ok))
        + u32::from(seen.applied.is_none())
        + check_state(l).await?;
    let mem = |field| proc_status_bytes(pid, field).map_or("?".to_owned(), mib);
    println!(
        "[reload] after reload: peak RSS (VmHWM) {}, RSS (VmRSS) {}",
        mem("VmHWM"),
        mem("VmRSS")
    );
    println!(
        "[reload] phase took {:.1} s (including writing the new file)",
        phase_start.elapsed().as_secs_f64()
    );
    Ok(failed)
}

/// Durations of the requests that started before the reload was seen, while it ran, and after
/// it was applied.
fn split_by_reload(samples: &[Sample], seen: &ReloadSeen) -> [Vec<Duration>; 3] {
    let mut parts: [Vec<Duration>; 3] = Default::default();
    for s in samples {
        let class = if seen.applied.is_some_and(|a| s.start >= a) {
            2
        } else if seen.opened.is_some_and(|o| s.start >= o) {
            1
        } else {
            0
        };
        parts[class].push(s.took);
    }
    parts
}

/// Prints the latencies, split by when each request started relative to the reload.
fn report_reload(
    idle: &[Sample],
    during: &[Sample],
    seen: &ReloadSeen,
    (renamed, pace): (Instant, Duration),
) -> BenchResult<()> {
    let since = |t: Option<Instant>| {
        t.map_or("never seen".to_owned(), |t| {
            format!("+{}", ms(t.duration_since(renamed)))
        })
    };
    println!(
        "[reload] {RELOAD_REQUESTS} sequential GET /v1/models on one keep-alive connection, one every {} (from the first load time)",
        ms(pace)
    );
    println!(
        "[reload] new file renamed in; edge opened it {} (seen by {}), applied {} after the rename",
        since(seen.opened),
        if seen.opened.is_some() {
            seen.opened_by
        } else {
            "-"
        },
        since(seen.applied)
    );
    if let Some(line) = &seen.line {
        let fields = line
            .split("snapshot file applied")
            .nth(1)
            .unwrap_or("")
            .trim();
        println!("[reload] edge log: snapshot file applied {fields}");
    }
    let parts = split_by_reload(during, seen);
    println!(
        "[reload] requests started before the reload: {}, while it ran: {}, after it was applied: {}",
        parts[0].len(),
        parts[1].len(),
        parts[2].len()
    );
    let took = |v: &[Sample]| v.iter().map(|s| s.took).collect::<Vec<_>>();
    let idle_s = summarize(&took(idle)).ok_or("no idle samples")?;
    let during_s = summarize(&took(during)).ok_or("no samples")?;
    println!("[reload] idle:           {idle_s}");
    println!("[reload] during reload:  {during_s}");
    for (name, part) in ["before", "while", "after"].iter().zip(&parts) {
        if let Some(s) = summarize(part) {
            println!("[reload]   {name:<7}       {s}");
        }
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    let mut ratios = vec![("during", during_s)];
    ratios.extend(summarize(&parts[1]).map(|w| ("while-only", w)));
    for (name, s) in ratios {
        println!(
            "[reload] {name}/idle ratio: p50 {:.2}x, p99 {:.2}x",
            ratio(s.p50, idle_s.p50),
            ratio(s.p99, idle_s.p99)
        );
    }
    let failed = idle.iter().chain(during).filter(|s| !s.ok).count();
    println!("[reload] requests not 200 (idle + during): {failed}");
    Ok(())
}

/// `GET /admin/v1/state` after the reload: the new revision and every object present.
async fn check_state(l: &Loaded) -> BenchResult<u32> {
    let mut admin = Http::connect(l.addrs.1).await?;
    let (status, body) = admin
        .get("/admin/v1/state", &l.addrs.1.to_string(), Some(ADMIN_TOKEN))
        .await?;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = l.deployments;
    let want = (
        snapshot::doc_revision(n, 1),
        n,
        n * snapshot::KEYS_PER_DEPLOYMENT,
    );
    let got = (
        v["revision"].as_u64(),
        v["deployments"].as_u64(),
        v["keys"].as_u64(),
    );
    println!(
        "[reload] /admin/v1/state: {status}, revision {:?} (want {}), deployments {:?}, keys {:?}",
        got.0, want.0, got.1, got.2
    );
    Ok(u32::from(
        status != StatusCode::OK || got != (Some(want.0), Some(want.1), Some(want.2)),
    ))
}
