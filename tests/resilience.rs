//! Upstream resilience: adapter affinity and spill, ejection and return, the retry budget under
//! a full outage, no retry once a backend may have started.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use arkor_edge::proxy::balance::rendezvous_weight;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use support::backend::Backend;
use support::*;

/// A snapshot with `n` public adapter deployments `a000…` (target `job-<i>`) on `test/model`.
fn adapters(n: usize) -> serde_json::Value {
    let deployments: Vec<_> = (0..n)
        .map(|i| {
            json!({"id": format!("d-a{i:03}"), "slug": format!("a{i:03}"), "enabled": true,
                   "authMode": "none", "revision": 1,
                   "target": {"type": "adapter", "jobId": format!("job-{i}"), "baseModel": "test/model"}})
        })
        .collect();
    json!({"revision": 1, "deployments": deployments, "keys": []})
}

async fn launch(
    snapshot: serde_json::Value,
    endpoints: &[String],
    pool_extra: &str,
    extra: &str,
    pool: &str,
) -> TestEdge {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deployments.json"), snapshot.to_string()).unwrap();
    let toml = config_toml(endpoints, pool_extra, "file = \"deployments.json\"", extra)
        .replace("name = \"test\"", &format!("name = \"{pool}\""));
    TestEdge::launch(dir, &toml).await
}

async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// The value of one metric line (name with labels) on the admin listener.
async fn metric(edge: &TestEdge, line_start: &str) -> f64 {
    let text = edge.admin(Method::GET, "/metrics", None, "").await.text();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn post(edge: &TestEdge, slug: &str, mock: &str) -> Answer {
    post_chat(edge.addr, &format!("{slug}.arkor.app"), &[("x-mock", mock)]).await
}

#[tokio::test]
async fn adapters_stick_to_one_endpoint_and_spill_under_load() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let edge = launch(adapters(100), &urls, "", "", "affinity").await;
    for i in 0..100 {
        for _ in 0..3 {
            assert_eq!(post(&edge, &format!("a{i:03}"), "").await.status, 200);
        }
    }
    // Where each adapter's requests went.
    let mut homes: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (b, backend) in backends.iter().enumerate() {
        for seen in backend.seen() {
            homes
                .entry(seen.json()["model"].as_str().unwrap().to_owned())
                .or_default()
                .insert(b);
        }
    }
    assert_eq!(homes.len(), 100);
    assert!(
        homes.values().all(|set| set.len() == 1),
        "an adapter moved under light load: {homes:?}"
    );
    let spread: Vec<usize> = (0..4)
        .map(|b| homes.values().filter(|s| s.contains(&b)).count())
        .collect();
    eprintln!("affinity: 100 adapters over 4 endpoints: {spread:?}");
    assert!(spread.iter().all(|&n| n >= 10), "{spread:?}");
    // The home is the adapter's rendezvous choice, the same on every edge.
    for (model, set) in &homes {
        let home = (0..4).max_by_key(|&e| rendezvous_weight(model, e)).unwrap();
        assert_eq!(set.iter().next(), Some(&home), "{model}");
    }

    // Overload one adapter: concurrent streams held open spill to other endpoints.
    let before: Vec<usize> = backends.iter().map(|b| b.seen().len()).collect();
    let mut held = Vec::new();
    for _ in 0..8 {
        let req = Request::post(format!("http://{}/v1/chat/completions", edge.addr))
            .header("host", "a000.arkor.app")
            .header("x-mock", "gated")
            .body(Full::new(Bytes::from(chat("x", true))))
            .unwrap();
        let mut body = client().request(req).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        held.push(body);
    }
    let spilled: Vec<usize> = backends
        .iter()
        .zip(&before)
        .map(|(b, n)| b.seen().len() - n)
        .collect();
    eprintln!("spill: 8 concurrent streams of one adapter landed {spilled:?}");
    assert_eq!(spilled.iter().sum::<usize>(), 8);
    assert!(
        spilled.iter().filter(|&&n| n > 0).count() >= 2,
        "no spill: {spilled:?}"
    );
    for b in &backends {
        for _ in 0..8 {
            b.open_gate();
        }
    }
    for body in held {
        body.collect().await.unwrap();
    }
    // Load gone: back home.
    let home = *homes["job-0"].iter().next().unwrap();
    let n = backends[home].seen().len();
    assert_eq!(post(&edge, "a000", "").await.status, 200);
    assert_eq!(backends[home].seen().len(), n + 1);
    edge.stop().await;
}

#[tokio::test]
async fn a_dead_endpoint_is_ejected_and_comes_back_by_itself() {
    let dead = dead_addr().await;
    let live = Backend::start().await;
    let endpoints = [format!("http://{dead}"), live.url()];
    // An adapter whose home is the dead endpoint.
    let i = (0..100)
        .find(|i| {
            let t = format!("job-{i}");
            rendezvous_weight(&t, 0) > rendezvous_weight(&t, 1)
        })
        .unwrap();
    let slug = format!("a{i:03}");
    let edge = launch(
        adapters(100),
        &endpoints,
        "health_path = \"/health\"\nhealth_interval = \"50ms\"\neject_after = 2\nejection_time = \"200ms\"",
        "",
        "eject",
    )
    .await;
    // While the home is down, its requests are served by the other endpoint.
    for _ in 0..5 {
        assert_eq!(post(&edge, &slug, "").await.status, 200);
    }
    let ejections =
        format!("arkor_edge_endpoint_ejections_total{{pool=\"eject\",endpoint=\"http://{dead}\"}}");
    let mut ejected = false;
    for _ in 0..100 {
        if metric(&edge, &ejections).await >= 1.0 {
            ejected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ejected, "the dead endpoint was never ejected");
    // It comes back to life; the health check brings it back and the adapter goes home.
    let revived = Backend::start_on(dead).await;
    let mut home_again = false;
    for _ in 0..100 {
        let n = revived
            .seen()
            .iter()
            .filter(|s| s.path.starts_with("/v1/"))
            .count();
        assert_eq!(post(&edge, &slug, "").await.status, 200);
        if revived
            .seen()
            .iter()
            .filter(|s| s.path.starts_with("/v1/"))
            .count()
            > n
        {
            home_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(home_again, "the endpoint never came back");
    assert!(
        revived
            .seen()
            .iter()
            .any(|s| s.path == "/health" && s.method == "GET")
    );
    edge.stop().await;
}

#[tokio::test]
async fn the_retry_budget_holds_under_a_full_outage() {
    let endpoints = [
        format!("http://{}", dead_addr().await),
        format!("http://{}", dead_addr().await),
        format!("http://{}", dead_addr().await),
    ];
    let edge = launch(
        fixture(1),
        &endpoints,
        "retries = 2\neject_after = 1000",
        "",
        "outage",
    )
    .await;
    let started = tokio::time::Instant::now();
    let requests = 300;
    for _ in 0..requests {
        let a = post(&edge, "open", "").await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (503, "upstream_unavailable")
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let retries = metric(&edge, "arkor_edge_pool_retries_total{pool=\"outage\"}").await;
    let refused = metric(
        &edge,
        "arkor_edge_pool_retry_budget_exhausted_total{pool=\"outage\"}",
    )
    .await;
    let bound = 0.2 * requests as f64 + 10.0 * (secs.ceil() + 1.0);
    eprintln!(
        "outage: {requests} requests in {secs:.2}s, {retries} retries (bound {bound}), {refused} refused by the budget"
    );
    assert!(retries <= bound, "{retries} retries > {bound}");
    assert!(refused > 0.0, "the budget never refused a retry");
    assert!(
        retries < 2.0 * requests as f64,
        "retries not bounded at all"
    );
    edge.stop().await;
}

#[tokio::test]
async fn no_retry_once_a_backend_may_have_started() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let edge = launch(
        fixture(1),
        &[a.url(), b.url()],
        "retries = 2",
        "[timeouts]\nupstream_first_byte = \"300ms\"\n",
        "started",
    )
    .await;
    let r = post(&edge, "open", "hang").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (504, "upstream_timeout")
    );
    assert_eq!(
        a.seen().len() + b.seen().len(),
        1,
        "a started request was sent twice"
    );
    // A backend 5xx is passed through, not retried.
    let r = post(&edge, "open", "status:500").await;
    assert_eq!(r.status, 500);
    assert_eq!(a.seen().len() + b.seen().len(), 2);
    edge.stop().await;
}
