//! Figures: per-connection histograms (merged at the end), the live progress line, and the
//! text and JSON reports.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::Args;
use crate::worker::Target;

/// Histograms hold microseconds, 1 µs to 1 hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What one connection (or, merged, the run) saw.
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub latency: Histogram<u64>,
    pub first_chunk: Histogram<u64>,
    pub gaps: Histogram<u64>,
    pub chunks: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub last_failed: bool,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            ok: 0,
            failed: 0,
            errors: BTreeMap::new(),
            latency: histogram(),
            first_chunk: histogram(),
            gaps: histogram(),
            chunks: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            last_failed: false,
        }
    }

    /// A request ended (its latency counts whether it failed or not).
    pub fn record_end(&mut self, started: Instant, error: Option<String>) {
        let _ = self.latency.record(micros(started.elapsed()));
        self.last_failed = error.is_some();
        match error {
            None => self.ok += 1,
            Some(e) => {
                self.failed += 1;
                *self.errors.entry(e).or_default() += 1;
            }
        }
    }

    pub fn record_first_chunk(&mut self, d: Duration) {
        let _ = self.first_chunk.record(micros(d));
    }

    pub fn record_gap(&mut self, d: Duration) {
        let _ = self.gaps.record(micros(d));
    }

    pub fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        let _ = self.latency.add(&other.latency);
        let _ = self.first_chunk.add(&other.first_chunk);
        let _ = self.gaps.add(&other.gaps);
        self.chunks += other.chunks;
        self.bytes += other.bytes;
    }

    fn requests(&self) -> u64 {
        self.ok + self.failed
    }

    fn rate(&self) -> f64 {
        self.requests() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_text(&self, args: &Args, target: &Target) -> String {
        let mut out = String::new();
        let mode = match args.rate {
            Some(r) => format!("open loop at {r}/s"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "POST {} (Host: {}), stream={}, {} connections, {mode}",
            target.display,
            target.host.to_str().unwrap_or("?"),
            args.stream,
            args.concurrency
        );
        let _ = writeln!(
            out,
            "requests     {} in {:.2}s = {:.1}/s   ok {}   failed {}",
            self.requests(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.ok,
            self.failed
        );
        let _ = writeln!(out, "latency      {}", percentiles_text(&self.latency));
        if args.stream {
            let _ = writeln!(out, "first chunk  {}", percentiles_text(&self.first_chunk));
            let _ = writeln!(out, "chunk gap    {}", percentiles_text(&self.gaps));
            let per = self.chunks as f64 / self.ok.max(1) as f64;
            let _ = writeln!(out, "chunks       {} ({per:.1} per request)", self.chunks);
        }
        let _ = writeln!(out, "bytes        {}", self.bytes);
        for (e, n) in &self.errors {
            let _ = writeln!(out, "error        {e}: {n}");
        }
        out
    }

    pub fn to_json(&self, args: &Args, target: &Target) -> serde_json::Value {
        serde_json::json!({
            "url": target.display,
            "host": target.host.to_str().unwrap_or_default(),
            "stream": args.stream,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "requests": self.requests(),
            "ok": self.ok,
            "failed": self.failed,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_per_s": self.rate(),
            "latency_ms": percentiles_json(&self.latency),
            "first_chunk_ms": percentiles_json(&self.first_chunk),
            "chunk_gap_ms": percentiles_json(&self.gaps),
            "chunks": self.chunks,
            "bytes": self.bytes,
            "errors": self.errors,
        })
    }
}

const QUANTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn percentiles_text(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::new();
    for (name, q) in QUANTILES {
        let _ = write!(out, "{name} {:.3}ms  ", ms(h.value_at_quantile(q)));
    }
    let _ = write!(out, "max {:.3}ms", ms(h.max()));
    out
}

fn percentiles_json(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let mut map = serde_json::Map::new();
    for (name, q) in QUANTILES {
        map.insert(name.to_owned(), ms(h.value_at_quantile(q)).into());
    }
    map.insert("max".to_owned(), ms(h.max()).into());
    map.insert("mean".to_owned(), (h.mean() / 1000.0).into());
    serde_json::Value::Object(map)
}

/// Counters the progress line reads.
#[derive(Default)]
pub struct Progress {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Progress {
    pub fn add(&self, failed: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prints a progress line on stderr every second until aborted.
    pub async fn report(progress: Arc<Progress>) {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = 0;
        loop {
            tick.tick().await;
            let done = progress.done.load(Ordering::Relaxed);
            let failed = progress.failed.load(Ordering::Relaxed);
            eprint!(
                "\r[{:>6.1}s] {done:>10} requests  {:>9} /s  {failed} failed   ",
                start.elapsed().as_secs_f64(),
                done - last
            );
            last = done;
        }
    }
}
