//! `arkor-mock-backend`: an OpenAI-compatible chat backend for load tests without a GPU.
//!
//! ```text
//! cargo run --release --bin arkor-mock-backend -- --listen 127.0.0.1:9100 \
//!     [--tokens 32] [--token-bytes 5] [--first-token 0ms] [--token-interval 0ms] \
//!     [--error-rate 0.0] [--break-rate 0.0] [--threads 1]
//! ```
//!
//! Point a pool's endpoint at it (`endpoints = ["http://127.0.0.1:9100"]`). See
//! `benches/support/mock.rs` for what it answers.

#![allow(clippy::print_stdout)] // a command-line tool: it prints where it listens

#[path = "../support/mock.rs"]
mod mock;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// An OpenAI-compatible chat backend for load tests: pre-rendered completions and event
/// streams, with configurable latency, size and injected errors.
#[derive(Parser, Debug)]
#[command(name = "arkor-mock-backend", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Tokens (content events) per completion.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Bytes of content per token.
    #[arg(long, default_value_t = 5)]
    token_bytes: usize,
    /// Time to the first token (the response head), e.g. `150ms`.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    first_token: Duration,
    /// Pause between two tokens of a stream, e.g. `20ms` (50 tokens/s).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    token_interval: Duration,
    /// Share of requests answered 500 with an OpenAI error body, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    error_rate: f64,
    /// Share of streams cut halfway by dropping the connection, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    break_rate: f64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0.0 and 1.0")),
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let options = mock::MockOptions {
        tokens: args.tokens,
        token_bytes: args.token_bytes,
        first_token: args.first_token,
        token_interval: args.token_interval,
        error_rate: args.error_rate,
        break_rate: args.break_rate,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!(
            "mock backend on {} ({} tokens per completion)",
            listener.local_addr()?,
            args.tokens
        );
        mock::serve(listener, options).await;
        Ok(())
    })
}
