//! Run-time adapter loading on vLLM pools, against the recording backend playing vLLM: one load
//! per (endpoint, target) however many requests arrive together, a failed load moves the request
//! to another endpoint, no endpoint able to load it is a 503, "already loaded" counts as loaded,
//! base models load nothing, and a restarted server gets its adapter again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use arkor_edge::proxy::balance::rendezvous_weight;
use http::Method;
use serde_json::json;
use support::backend::Backend;
use support::*;

/// The checkpoint target of `ckpt`, the final target of `final`, the base model of `base`.
const CHECKPOINT: &str = "job-a:step-7";
const FINAL: &str = "job-b";
const BASE: &str = "test/model";

fn snapshot() -> serde_json::Value {
    let dep = |slug: &str, target: serde_json::Value| {
        json!({"id": format!("d-{slug}"), "slug": slug, "enabled": true, "authMode": "none",
               "revision": 1, "target": target})
    };
    json!({"revision": 1, "keys": [], "deployments": [
        dep("ckpt", json!({"type": "adapter", "jobId": "job-a", "checkpointStep": 7, "baseModel": BASE})),
        dep("final", json!({"type": "adapter", "jobId": "job-b", "baseModel": BASE})),
        dep("base", json!({"type": "base_model", "baseModel": BASE})),
    ]})
}

/// The edge with a `vllm` pool named `pool` over `endpoints` that loads adapters, plus `extra`
/// lines in the pool table.
async fn launch(endpoints: &[String], pool: &str, extra: &str) -> TestEdge {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deployments.json"), snapshot().to_string()).unwrap();
    let pool_extra = format!(
        "flavor = \"vllm\"\nload_adapters = true\napi_key = \"backend-secret\"\n\
         adapter_source = \"/adapters/{{job_id}}/checkpoint-{{step}}\"\n\
         final_adapter_source = \"/adapters/{{job_id}}/final\"\n{extra}"
    );
    let toml = config_toml(endpoints, &pool_extra, "file = \"deployments.json\"", "")
        .replace("name = \"test\"", &format!("name = \"{pool}\""));
    TestEdge::launch(dir, &toml).await
}

/// A backend that checks models like vLLM serving `test/model`.
async fn vllm() -> Backend {
    let b = Backend::start().await;
    b.check_models(BASE);
    b
}

async fn post(edge: &TestEdge, slug: &str) -> Answer {
    post_chat(edge.addr, &format!("{slug}.arkor.app"), &[]).await
}

async fn metric(edge: &TestEdge, pool: &str, result: &str) -> f64 {
    let line = format!("arkor_edge_adapter_loads_total{{pool=\"{pool}\",result=\"{result}\"}}");
    let text = edge.admin(Method::GET, "/metrics", None, "").await.text();
    text.lines()
        .find(|l| l.starts_with(&line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The endpoint (index into `n`) a target's requests go to first.
fn home(target: &str, n: usize) -> usize {
    (0..n)
        .max_by_key(|&e| rendezvous_weight(target, e))
        .unwrap()
}

async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn concurrent_requests_share_one_load_per_endpoint_and_target() {
    let backend = vllm().await;
    backend.delay_loads(Duration::from_millis(300));
    let edge = launch(&[backend.url()], "coalesce", "").await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let addr = edge.addr;
        requests.spawn(async move { post_chat(addr, "ckpt.arkor.app", &[]).await });
    }
    while let Some(answer) = requests.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let loads = backend.loads();
    assert_eq!(
        loads.len(),
        1,
        "20 concurrent requests made {} loads",
        loads.len()
    );
    assert_eq!(
        loads[0].json(),
        json!({"lora_name": CHECKPOINT, "lora_path": "/adapters/job-a/checkpoint-7"})
    );
    assert_eq!(loads[0].method, "POST");
    assert_eq!(loads[0].headers["authorization"], "Bearer backend-secret");
    assert_eq!(loads[0].headers["content-type"], "application/json");
    let chats = backend.chats();
    assert_eq!(chats.len(), 20);
    assert!(chats.iter().all(|c| c.json()["model"] == CHECKPOINT));
    // Marked loaded: later requests go straight through.
    for _ in 0..5 {
        assert_eq!(post(&edge, "ckpt").await.status, 200);
    }
    assert_eq!(backend.loads().len(), 1);
    // A final adapter has its own source.
    assert_eq!(post(&edge, "final").await.status, 200);
    let loads = backend.loads();
    assert_eq!(loads.len(), 2);
    assert_eq!(
        loads[1].json(),
        json!({"lora_name": FINAL, "lora_path": "/adapters/job-b/final"})
    );
    assert_eq!(backend.chats().last().unwrap().json()["model"], FINAL);
    assert_eq!(metric(&edge, "coalesce", "loaded").await, 2.0);
    edge.stop().await;
}

#[tokio::test]
async fn a_failed_load_sends_the_request_to_another_endpoint() {
    let backends = [vllm().await, vllm().await];
    let h = home(CHECKPOINT, 2);
    let other = 1 - h;
    backends[h].answer_loads(
        500,
        r#"{"error":{"message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}}"#,
    );
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let edge = launch(&urls, "failover", "").await;
    for round in 1..=2 {
        let answer = post(&edge, "ckpt").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        // A failed load is not remembered: the home endpoint is asked again each time.
        assert_eq!(backends[h].loads().len(), round);
        assert!(
            backends[h].chats().is_empty(),
            "request sent to the failed endpoint"
        );
    }
    assert_eq!(backends[other].loads().len(), 1);
    let chats = backends[other].chats();
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|c| c.json()["model"] == CHECKPOINT));
    assert_eq!(metric(&edge, "failover", "failed").await, 2.0);
    assert_eq!(metric(&edge, "failover", "loaded").await, 1.0);
    edge.stop().await;
}

#[tokio::test]
async fn no_endpoint_able_to_load_is_503() {
    let (off, broken) = (vllm().await, vllm().await);
    // Run-time loading switched off: vLLM has no such route.
    off.answer_loads(404, r#"{"detail":"Not Found"}"#);
    broken.answer_loads(500, r#"{"error":{"message":"boom"}}"#);
    let dead = format!("http://{}", dead_addr().await);
    let edge = launch(&[dead, off.url(), broken.url()], "noload", "retries = 2").await;
    let answer = post(&edge, "ckpt").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.code(), "upstream_unavailable");
    assert_eq!(answer.json()["error"]["type"], "server_error");
    assert!(answer.headers.contains_key("retry-after"));
    assert_eq!((off.loads().len(), broken.loads().len()), (1, 1));
    assert!(off.chats().is_empty() && broken.chats().is_empty());
    for (result, n) in [("rejected", 1.0), ("failed", 1.0), ("unreachable", 1.0)] {
        assert_eq!(metric(&edge, "noload", result).await, n, "{result}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn already_loaded_counts_as_loaded() {
    let backend = vllm().await;
    backend.preload(CHECKPOINT); // e.g. --lora-modules, or another edge loaded it
    let edge = launch(&[backend.url()], "already", "").await;
    for _ in 0..3 {
        let answer = post(&edge, "ckpt").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(backend.loads().len(), 1);
    assert_eq!(backend.chats().len(), 3);
    assert_eq!(metric(&edge, "already", "already_loaded").await, 1.0);
    edge.stop().await;
}

#[tokio::test]
async fn base_model_targets_load_nothing() {
    let backend = vllm().await;
    let edge = launch(&[backend.url()], "base", "").await;
    for _ in 0..3 {
        assert_eq!(post(&edge, "base").await.status, 200);
    }
    assert!(backend.loads().is_empty());
    let chats = backend.chats();
    assert_eq!(chats.len(), 3);
    assert!(chats.iter().all(|c| c.json()["model"] == BASE));
    edge.stop().await;
}

#[tokio::test]
async fn a_restarted_server_gets_its_adapter_again() {
    let backend = vllm().await;
    let edge = launch(&[backend.url()], "restart", "").await;
    assert_eq!(post(&edge, "ckpt").await.status, 200);
    assert_eq!(backend.loads().len(), 1);
    backend.forget_adapters();
    // The server's own 404 is passed through, and the mark dropped …
    let answer = post(&edge, "ckpt").await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["error"]["type"], "NotFoundError");
    // … so the next request loads it again.
    assert_eq!(post(&edge, "ckpt").await.status, 200);
    assert_eq!(backend.loads().len(), 2);
    assert_eq!(backend.chats().len(), 3);
    edge.stop().await;
}

#[tokio::test]
async fn a_slow_load_gives_up_and_moves_on() {
    let backends = [vllm().await, vllm().await];
    let h = home(CHECKPOINT, 2);
    backends[h].delay_loads(Duration::from_secs(30));
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let edge = launch(&urls, "slow", "load_timeout = \"200ms\"").await;
    let started = std::time::Instant::now();
    let answer = post(&edge, "ckpt").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(backends[h].chats().is_empty());
    assert_eq!(backends[1 - h].chats().len(), 1);
    assert_eq!(metric(&edge, "slow", "timeout").await, 1.0);
    edge.stop().await;
}
