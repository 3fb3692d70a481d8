//! `arkor-edge [--config PATH]`: load the config (exit 64 listing every bad setting), serve until
//! SIGTERM or SIGINT, then drain.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use arkor_edge::config::{Config, LogFormat};

const USAGE: &str = "usage: arkor-edge [--config PATH]   (default: config/edge.toml)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut path = PathBuf::from("config/edge.toml");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = PathBuf::from(p),
                None => return usage_error("--config needs a path"),
            },
            "--help" | "-h" => {
                eprintln!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" | "-V" => {
                eprintln!("arkor-edge {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }

    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arkor-edge: invalid configuration:\n{e}");
            return ExitCode::from(64);
        }
    };
    init_logging(&config.log);
    // The control side: sync, admin, persistence, health checks. The data listeners are served
    // by worker threads of their own (`listen.workers`); two threads here keep the admin
    // listener answering while a large snapshot is applied.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("arkor-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arkor-edge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let running = match arkor_edge::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = running.shutdown_token();
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    shutdown.cancel();
    running.wait().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Log lines go to stderr, as text or JSON; `RUST_LOG` overrides `log.level`.
fn init_logging(log: &arkor_edge::config::Log) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn usage_error(why: &str) -> ExitCode {
    eprintln!("arkor-edge: {why}\n{USAGE}");
    ExitCode::from(64)
}
