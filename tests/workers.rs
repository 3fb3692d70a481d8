//! The data listeners are served by `listen.workers` threads: the edge starts that many, every
//! connection is served, connections opened at once are spread over the workers, and the threads
//! end with the shutdown. One test in its own binary, so the threads and the gauges are this
//! edge's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
#![cfg(target_os = "linux")]

mod support;

use std::time::Duration;

use http::Method;
use support::backend::Backend;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The threads of this process named as the edge names its workers.
fn worker_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("arkor-worker-"))
        .count()
}

/// How many worker threads there are once their count is `n`, or after 2 s: a thread names
/// itself as it starts, and ends just after its worker reported its end.
async fn settled_workers(n: usize) -> usize {
    let mut count = worker_threads();
    for _ in 0..100 {
        if count == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        count = worker_threads();
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_every_connection_and_end_with_the_shutdown() {
    let backend = Backend::start().await;
    let toml = config_toml(&[backend.url()], "", "file = \"deployments.json\"", "")
        .replace("workers = 2", "workers = 3");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deployments.json"), fixture(1).to_string()).unwrap();
    let edge = TestEdge::launch(dir, &toml).await;
    assert_eq!(settled_workers(3).await, 3);

    // Each request on a connection of its own, all at once: whichever worker accepts one serves it.
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..24 {
        requests.spawn(post_chat(edge.addr, "open.arkor.app", &[]));
    }
    while let Some(answer) = requests.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(backend.chats().len(), 24);

    // 30 keep-alive connections opened at once and held: each worker serves 10 ± 1, whichever
    // accepted them (`arkor_edge_worker_connections`).
    assert_eq!(settled_connections(&edge, 0).await, [0.0; 3]);
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let addr = edge.addr;
        opening.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("\"data\"") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the answer");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200"));
            s
        });
    }
    let held = opening.join_all().await;
    let per_worker = settled_connections(&edge, 30).await;
    assert_eq!(per_worker.iter().sum::<f64>(), 30.0, "{per_worker:?}");
    assert!(
        per_worker.iter().all(|&n| (9.0..=11.0).contains(&n)),
        "{per_worker:?}"
    );
    drop(held);
    assert_eq!(
        settled_connections(&edge, 0).await,
        [0.0; 3],
        "closed connections still counted"
    );

    edge.stop().await;
    assert_eq!(
        settled_workers(0).await,
        0,
        "worker threads outlived the shutdown"
    );
}

/// [`worker_connections`] once they add up to `total`, or after 2 s: the edge counts a
/// connection's end when it sees the close.
async fn settled_connections(edge: &TestEdge, total: usize) -> Vec<f64> {
    let mut per_worker = worker_connections(edge).await;
    for _ in 0..100 {
        if per_worker.iter().sum::<f64>() == total as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        per_worker = worker_connections(edge).await;
    }
    per_worker
}

/// `arkor_edge_worker_connections` of workers 0, 1 and 2, from the admin listener.
async fn worker_connections(edge: &TestEdge) -> Vec<f64> {
    let text = edge.admin(Method::GET, "/metrics", None, "").await.text();
    (0..3)
        .map(|i| {
            let series = format!("arkor_edge_worker_connections{{worker=\"{i}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .map_or(0.0, |v| v.trim().parse().unwrap())
        })
        .collect()
}
