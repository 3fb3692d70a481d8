//! The official OpenAI Python SDK, installed into a venv by `tests/python/ensure-venv.sh`,
//! talks to the edge over a real socket: non-stream and stream calls, a wrong key
//! (`AuthenticationError`) and an unknown slug (`NotFoundError`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::path::PathBuf;

use support::*;

fn venv_python() -> PathBuf {
    installed("tests/python/ensure-venv.sh", "ARKOR_PY_VENV", "py-venv")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_through_the_edge() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let edge = TestEdge::start(&["builtin:echo".to_owned()], "").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_check.py");
    let base = format!("{}/v1", edge.url());
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("EDGE_BASE_URL", base)
        .env("KEYED_HOST", "keyed.arkor.app")
        .env("KEYED_KEY", KEYED_KEY)
        .env("KEYED_MODEL", KEYED_MODEL)
        .env("OPEN_HOST", "open.arkor.app")
        .env("UNKNOWN_HOST", "nope.arkor.app")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("sdk: 12 checks passed"), "{stdout}");
    edge.stop().await;
}
