//! The admin listener: health, readiness, metrics, push (all or nothing, enforced on return),
//! state summary, and static stability across a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use arkor_edge::auth::KeyHash;
use http::Method;
use serde_json::json;
use support::backend::Backend;
use support::*;

const TOKEN: &str = "admin-test-token";

async fn edge() -> (TestEdge, Backend) {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deployments.json"), fixture(1).to_string()).unwrap();
    let toml = config_toml(
        &[backend.url()],
        "",
        "file = \"deployments.json\"\npoll_interval = \"20ms\"",
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
    );
    (TestEdge::launch(dir, &toml).await, backend)
}

fn revoke(revision: u64) -> serde_json::Value {
    json!({"revision": revision, "op": "upsert_key", "key": {
        "id": "k-keyed", "deploymentId": "d-keyed", "prefix": &KEYED_KEY[..12],
        "sha256": KeyHash::of(KEYED_KEY.as_bytes()).to_hex(), "enabled": false, "revision": revision}})
}

async fn keyed_status(edge: &TestEdge) -> u16 {
    post_chat(
        edge.addr,
        "keyed.arkor.app",
        &[("authorization", &bearer(KEYED_KEY))],
    )
    .await
    .status
    .as_u16()
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_token() {
    let (edge, _backend) = edge().await;
    let a = edge.admin(Method::GET, "/healthz", None, "").await;
    assert_eq!(a.status, 200);
    let a = edge.admin(Method::GET, "/readyz", None, "").await;
    assert_eq!(a.status, 200);
    assert_eq!(keyed_status(&edge).await, 200);
    let needles = [
        "arkor_edge_requests_total{class=\"2xx\",code=\"ok\"}",
        "arkor_edge_upstream_ttfb_seconds_bucket{le=\"120\"}",
        "# TYPE arkor_edge_request_duration_seconds histogram",
        "arkor_edge_endpoint_chunk_gap_seconds_count{pool=\"test\",endpoint=\"http://",
        "arkor_edge_state_entries{kind=\"deployments\"} 6",
        "arkor_edge_state_revision 1",
    ];
    // A request is counted when its body is finished on the server, which may be a moment
    // after the client has read it.
    let mut text = String::new();
    for _ in 0..100 {
        let a = edge.admin(Method::GET, "/metrics", None, "").await;
        assert_eq!(a.status, 200);
        assert!(
            a.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        text = a.text();
        if needles.iter().all(|n| text.contains(n)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for needle in needles {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    assert!(!text.contains("keyed"), "a slug leaked into metric labels");
    // None of these are served on the data listener.
    for path in ["/healthz", "/metrics", "/admin/v1/state"] {
        let a = send(edge.addr, Method::GET, "keyed.arkor.app", path, &[], "").await;
        assert_eq!(a.status, 401, "{path}"); // the key check comes before the route
        let a = send(edge.addr, Method::GET, "open.arkor.app", path, &[], "").await;
        assert_eq!(a.status, 404, "{path}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn admin_paths_need_the_token() {
    let (edge, _backend) = edge().await;
    for token in [None, Some("wrong"), Some("admin-test-toke")] {
        let a = edge.admin(Method::GET, "/admin/v1/state", token, "").await;
        assert_eq!(a.status, 401, "{token:?}");
        let a = edge
            .admin(
                Method::POST,
                "/admin/v1/events",
                token,
                revoke(5).to_string(),
            )
            .await;
        assert_eq!(a.status, 401);
    }
    assert_eq!(
        keyed_status(&edge).await,
        200,
        "an unauthorised push changed the state"
    );
    let a = edge
        .admin(Method::GET, "/admin/v1/state", Some(TOKEN), "")
        .await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["revision"], 1);
    assert_eq!(v["deployments"], 6);
    assert_eq!(v["keys"], 3);
    assert_eq!(v["source"], "file");
    assert_eq!(v["loaded"], true);
    assert!(v["lastSyncAt"].as_str().unwrap().ends_with('Z'));
    edge.stop().await;
}

#[tokio::test]
async fn a_pushed_revocation_is_enforced_when_the_push_returns() {
    let (edge, _backend) = edge().await;
    for round in 0..20u64 {
        let revision = 10 + 2 * round;
        let mut enable = revoke(revision);
        enable["key"]["enabled"] = true.into();
        let a = edge
            .admin(
                Method::POST,
                "/admin/v1/events",
                Some(TOKEN),
                enable.to_string(),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(keyed_status(&edge).await, 200);
        let a = edge
            .admin(
                Method::POST,
                "/admin/v1/events",
                Some(TOKEN),
                revoke(revision + 1).to_string(),
            )
            .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["applied"], 1);
        // The very next request, started after the 200, is refused.
        assert_eq!(keyed_status(&edge).await, 401, "round {round}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn a_bad_batch_applies_nothing_and_says_why() {
    let (edge, _backend) = edge().await;
    let new_dep = json!({"revision": 5, "op": "upsert_deployment", "deployment": {
        "id": "d-new", "slug": "fresh", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "test/model"}, "revision": 5}});
    let bad_slug = json!({"revision": 6, "op": "upsert_deployment", "deployment": {
        "id": "d-bad", "slug": "admin", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "test/model"}, "revision": 6}});
    let cases = [
        ("{not json".to_owned(), "not JSON"),
        ("42".to_owned(), "event object or an array"),
        (
            json!([new_dep, {"revision": 6, "op": "explode"}]).to_string(),
            "event 1",
        ),
        (json!([new_dep, revoke(7), bad_slug]).to_string(), "event 2"),
    ];
    for (body, needle) in cases {
        let a = edge
            .admin(Method::POST, "/admin/v1/events", Some(TOKEN), body.clone())
            .await;
        assert_eq!(a.status, 400, "{body}");
        let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(needle), "{msg}");
        let a = send(
            edge.addr,
            Method::GET,
            "fresh.arkor.app",
            "/v1/models",
            &[],
            "",
        )
        .await;
        assert_eq!(a.status, 404, "part of a bad batch was applied");
        assert_eq!(keyed_status(&edge).await, 200);
    }
    // The same events without the bad one: all applied, stale ones counted as such.
    let body = json!([new_dep, revoke(7), revoke(3)]).to_string();
    let a = edge
        .admin(Method::POST, "/admin/v1/events", Some(TOKEN), body)
        .await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(
        (
            v["applied"].as_u64(),
            v["stale"].as_u64(),
            v["revision"].as_u64()
        ),
        (Some(2), Some(1), Some(7))
    );
    let a = send(
        edge.addr,
        Method::GET,
        "fresh.arkor.app",
        "/v1/models",
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(keyed_status(&edge).await, 401);
    edge.stop().await;
}

#[tokio::test]
async fn a_restart_serves_the_persisted_state_when_the_source_is_gone() {
    let (edge, backend) = edge().await;
    let a = edge
        .admin(
            Method::POST,
            "/admin/v1/events",
            Some(TOKEN),
            revoke(9).to_string(),
        )
        .await;
    assert_eq!(a.status, 200);
    let dir = edge.stop_keep_dir().await;
    assert!(dir.path().join("state/state.json").exists());
    let persisted = std::fs::read_to_string(dir.path().join("state/state.json")).unwrap();
    assert!(!persisted.contains(KEYED_KEY), "plaintext key persisted");

    // The snapshot file is gone and garbage is in its place: the persisted state is served.
    std::fs::write(dir.path().join("deployments.json"), "{ garbage").unwrap();
    let toml = config_toml(
        &[backend.url()],
        "",
        "file = \"deployments.json\"\npoll_interval = \"20ms\"",
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
    );
    let edge = TestEdge::launch(dir, &toml).await;
    let a = edge.admin(Method::GET, "/readyz", None, "").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        keyed_status(&edge).await,
        401,
        "the pushed revocation was lost"
    );
    let a = post_chat(edge.addr, "open.arkor.app", &[]).await;
    assert_eq!(a.status, 200);
    edge.stop().await;
}
