//! The official OpenAI Node SDK (installed by `tests/node/ensure-node-deps.sh`) through the
//! HTTPS listener: real TLS with SNI and certificate verification against a test CA, HTTP/1.1 or
//! HTTP/2 as the client negotiates, non-stream and stream calls, wrong key, unknown slug.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::path::PathBuf;

use support::tls::start_tls_edge;
use support::*;

fn node_script() -> PathBuf {
    installed(
        "tests/node/ensure-node-deps.sh",
        "ARKOR_NODE_DEPS",
        "node-deps",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_sdk_over_tls() {
    let script = tokio::task::spawn_blocking(node_script).await.unwrap();
    let (edge, ca, _, _) = start_tls_edge(&["builtin:echo".to_owned()]).await;
    let ca_file = edge.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("EDGE_SCHEME", "https")
        .env("EDGE_PORT", edge.https.unwrap().port().to_string())
        .env("EDGE_CA_FILE", &ca_file)
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
        "Node SDK check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("node sdk: 13 checks passed"), "{stdout}");
    edge.stop().await;
}
