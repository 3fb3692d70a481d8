//! The data listeners are served by `listen.workers` threads: the edge starts that many, every
//! connection is served, and the threads end with the shutdown. One test in its own binary, so
//! the threads counted are this edge's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
#![cfg(target_os = "linux")]

mod support;

use std::time::Duration;

use support::backend::Backend;
use support::*;

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

    edge.stop().await;
    assert_eq!(
        settled_workers(0).await,
        0,
        "worker threads outlived the shutdown"
    );
}
