//! `arkor-loadgen`: the operators' load generator for OpenAI chat completions.
//!
//! ```text
//! cargo run --release --bin arkor-loadgen -- --url http://127.0.0.1:8080/v1 \
//!     --host bench.arkor.app --key ark_live_… [--stream] [-c 32] [-d 10s | -n 100000] \
//!     [--rate 2000] [--json]
//! ```
//!
//! `-c` connections (one HTTP/1.1 connection each, reopened when it breaks) send chat
//! completions, streamed or not, for a duration or a count. Closed loop by default (each
//! connection sends its next request when the last one ended: saturation). With `--rate R` it
//! is open loop: request `i` is due at `start + i/R` whatever happened before, and its latency is
//! measured from when it was due, so a stalled server shows up as latency instead of silently
//! lowering the offered load (no coordinated omission). Reports requests/s, latency
//! percentiles, for streams the time to the first chunk and the gaps between chunks, and errors
//! by status and OpenAI error code; a progress line on stderr while it runs; `--json` for
//! scripts.

// A command-line tool: its output is the measurement; its histogram bounds are constants.
#![allow(clippy::print_stdout, clippy::expect_used)]

#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/worker.rs"]
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// Load generator for OpenAI-compatible chat completions (arkor-edge deployments or any
/// OpenAI-compatible server).
#[derive(Parser, Debug, Clone)]
#[command(name = "arkor-loadgen", version)]
pub struct Args {
    /// Base URL of the API (the SDK's `base_url`); requests go to `{url}/chat/completions`.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    pub url: String,
    /// `Host` header to send (the deployment's host, e.g. `demo.arkor.app`); default: the URL's.
    #[arg(long)]
    pub host: Option<String>,
    /// Shorthand for `--host <slug>.arkor.app`.
    #[arg(long, conflicts_with = "host")]
    pub slug: Option<String>,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "ARKOR_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// How long to run (default 10s when neither `-d` nor `-n` is given).
    #[arg(short = 'd', long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How many requests to send.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Ask for a streamed completion (`"stream": true`).
    #[arg(long)]
    pub stream: bool,
    /// Open loop at this many requests per second (latency measured from when each was due).
    #[arg(long)]
    pub rate: Option<f64>,
    /// The user message.
    #[arg(long, default_value = "Say hello to the edge router, politely.")]
    pub prompt: String,
    /// `model` to send (a deployment pins its own; other servers need the right one).
    #[arg(long, default_value = "gpt-4o")]
    pub model: String,
    /// `max_tokens` to send.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Per-request limit, from when the request was due to its last byte.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// PEM file of CA certificates for `https://` (default: the system's bundle).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress line.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(slug) = args.slug.take() {
        args.host = Some(format!("{slug}.arkor.app"));
    }
    if args.duration.is_none() && args.requests.is_none() {
        args.duration = Some(Duration::from_secs(10));
    }
    if args.concurrency == 0 || args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        eprintln!("arkor-loadgen: --concurrency and --rate must be positive");
        return ExitCode::from(2);
    }
    let target = match worker::Target::new(&args) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("arkor-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arkor-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(worker::run(Arc::clone(&target), args.clone()));
    if args.json {
        println!("{}", result.to_json(&args, &target));
    } else {
        print!("{}", result.to_text(&args, &target));
    }
    if result.ok == 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
