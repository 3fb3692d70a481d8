//! The whole edge in pull mode against a real in-test control plane: propagation seen by
//! requests, push ordering against pull, a restart with the control plane down, usage reports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use arkor_edge::auth::KeyHash;
use http::Method;
use serde_json::{Value, json};
use support::backend::Backend;
use support::control_plane::ControlPlane;
use support::*;

const TOKEN: &str = "admin-test-token";

fn pull_toml(backend: &Backend, cp: &ControlPlane, extra: &str) -> String {
    config_toml(
        &[backend.url()],
        "",
        &format!(
            "url = \"{}\"\ntoken = \"cp-secret\"\nbackoff_max = \"200ms\"\nrequest_timeout = \"2s\"",
            cp.url()
        ),
        &format!("[admin]\ntoken = \"{TOKEN}\"\n{extra}"),
    )
}

fn key_event(revision: u64, enabled: bool) -> Value {
    json!({"revision": revision, "op": "upsert_key", "key": {
        "id": "k-keyed", "deploymentId": "d-keyed", "prefix": &KEYED_KEY[..12],
        "sha256": KeyHash::of(KEYED_KEY.as_bytes()).to_hex(), "enabled": enabled,
        "revision": revision}})
}

async fn keyed_status(edge: &TestEdge) -> u16 {
    send(
        edge.addr,
        Method::GET,
        "keyed.arkor.app",
        "/v1/models",
        &[("authorization", &bearer(KEYED_KEY))],
        "",
    )
    .await
    .status
    .as_u16()
}

/// Polls until `check` holds (bounded); returns whether it did.
async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn pulled_changes_reach_requests() {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &pull_toml(&backend, &cp, "")).await;
    assert_eq!(keyed_status(&edge).await, 200);
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);

    // A new deployment.
    cp.push(
        json!({"revision": 4, "op": "upsert_deployment", "deployment": {
        "id": "d-new", "slug": "fresh", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "test/model"}, "revision": 4}}),
    );
    assert!(
        eventually(|| async {
            send(
                edge.addr,
                Method::GET,
                "fresh.arkor.app",
                "/v1/models",
                &[],
                "",
            )
            .await
            .status
                == 200
        })
        .await
    );
    // A disabled deployment.
    cp.push(
        json!({"revision": 5, "op": "upsert_deployment", "deployment": {
        "id": "d-open", "slug": "open", "enabled": false, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "test/model"}, "revision": 5}}),
    );
    assert!(
        eventually(|| async {
            send(
                edge.addr,
                Method::GET,
                "open.arkor.app",
                "/v1/models",
                &[],
                "",
            )
            .await
            .status
                == 404
        })
        .await
    );
    // A revoked key.
    cp.push(key_event(6, false));
    assert!(eventually(|| async { keyed_status(&edge).await == 401 }).await);
    // Garbage in the stream changes nothing and the stream goes on.
    cp.send_raw("data: {garbage\n\n");
    cp.push(key_event(7, true));
    assert!(eventually(|| async { keyed_status(&edge).await == 200 }).await);
    for r in cp.requests() {
        assert_eq!(
            r.authorization.as_deref(),
            Some("Bearer cp-secret"),
            "{r:?}"
        );
    }
    let state = edge
        .admin(Method::GET, "/admin/v1/state", Some(TOKEN), "")
        .await
        .json();
    assert_eq!(state["source"], "pull");
    assert_eq!(state["revision"], 7);
    edge.stop().await;
}

#[tokio::test]
async fn a_push_is_never_undone_by_an_older_pulled_event() {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &pull_toml(&backend, &cp, "")).await;
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);
    // Pushed revocation at revision 20 …
    let a = edge
        .admin(
            Method::POST,
            "/admin/v1/events",
            Some(TOKEN),
            key_event(20, false).to_string(),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(keyed_status(&edge).await, 401);
    // … then the stream delivers the older enabling event (15) and a marker event (16).
    cp.push(key_event(15, true));
    cp.push(
        json!({"revision": 16, "op": "upsert_deployment", "deployment": {
        "id": "d-marker", "slug": "marker", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "test/model"}, "revision": 16}}),
    );
    assert!(
        eventually(|| async {
            send(
                edge.addr,
                Method::GET,
                "marker.arkor.app",
                "/v1/models",
                &[],
                "",
            )
            .await
            .status
                == 200
        })
        .await
    );
    assert_eq!(
        keyed_status(&edge).await,
        401,
        "an older pulled event undid a push"
    );
    // A newer pulled event does apply.
    cp.push(key_event(21, true));
    assert!(eventually(|| async { keyed_status(&edge).await == 200 }).await);
    edge.stop().await;
}

#[tokio::test]
async fn a_restart_with_the_control_plane_down_serves_the_persisted_state() {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &pull_toml(&backend, &cp, "")).await;
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);
    cp.push(key_event(4, false));
    assert!(eventually(|| async { keyed_status(&edge).await == 401 }).await);
    let dir = edge.stop_keep_dir().await;

    cp.stop().await;
    let edge = TestEdge::launch(dir, &pull_toml(&backend, &cp, "")).await;
    let ready = edge.admin(Method::GET, "/readyz", None, "").await;
    assert_eq!(ready.status, 200, "persisted state not loaded");
    assert_eq!(keyed_status(&edge).await, 401);
    let a = post_chat(edge.addr, "open.arkor.app", &[]).await;
    assert_eq!(a.status, 200, "not serving while the control plane is down");

    // The control plane comes back: the edge resumes from its revision, no snapshot needed.
    let snapshots_before = cp.paths().iter().filter(|p| p.contains("snapshot")).count();
    cp.restart().await;
    cp.push(key_event(5, true));
    assert!(eventually(|| async { keyed_status(&edge).await == 200 }).await);
    let resumed = cp.paths();
    assert!(
        resumed.iter().any(|p| p.ends_with("events?after=4")),
        "{resumed:?}"
    );
    assert_eq!(
        resumed.iter().filter(|p| p.contains("snapshot")).count(),
        snapshots_before
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_first_start_with_the_control_plane_down_is_not_ready_until_it_is_up() {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    cp.stop().await;
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &pull_toml(&backend, &cp, "")).await;
    assert_eq!(
        edge.admin(Method::GET, "/readyz", None, "").await.status,
        503
    );
    assert_eq!(keyed_status(&edge).await, 404);
    cp.restart().await;
    assert!(
        eventually(|| async { edge.admin(Method::GET, "/readyz", None, "").await.status == 200 })
            .await
    );
    assert_eq!(keyed_status(&edge).await, 200);
    edge.stop().await;
}

#[tokio::test]
async fn usage_reports_match_the_requests_made() {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    let toml = pull_toml(&backend, &cp, "[usage]\nreport_interval = \"100ms\"\n");
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &toml).await;
    let auth = bearer(KEYED_KEY);
    let keyed = |mock: &'static str, body: String| {
        let auth = auth.clone();
        let addr = edge.addr;
        async move {
            send(
                addr,
                Method::POST,
                "keyed.arkor.app",
                "/v1/chat/completions",
                &[("authorization", auth.as_str()), ("x-mock", mock)],
                body,
            )
            .await
        }
    };
    // Two non-streamed (backend usage 1 + 1 each).
    for _ in 0..2 {
        assert_eq!(keyed("", chat("x", false)).await.status, 200);
    }
    // A stream whose client did not ask for usage: the edge asks, counts, and hides the chunk.
    let hidden = keyed("usage-stream", chat("x", true)).await;
    assert_eq!(hidden.status, 200);
    assert!(
        !hidden.text().contains("prompt_tokens"),
        "usage chunk leaked: {}",
        hidden.text()
    );
    assert!(hidden.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(
        backend.seen().last().unwrap().json()["stream_options"]["include_usage"],
        true
    );
    // A stream whose client asked: it sees the chunk.
    let asked = json!({"model": "x", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let shown = keyed("usage-stream", asked).await;
    assert!(
        shown.text().contains("\"prompt_tokens\":7"),
        "{}",
        shown.text()
    );
    // A refused body still counts as a proxied request, with no tokens.
    assert_eq!(keyed("", "[]".to_owned()).await.status, 400);
    // A public deployment: no key.
    let a = post_chat(edge.addr, "open.arkor.app", &[]).await;
    assert_eq!(a.status, 200);
    // Not proxied: never counted.
    assert_eq!(
        send(
            edge.addr,
            Method::GET,
            "open.arkor.app",
            "/v1/models",
            &[],
            ""
        )
        .await
        .status,
        200
    );

    let totals = || {
        let mut by_pair: std::collections::BTreeMap<(String, String), (u64, u64, u64)> =
            Default::default();
        for post in cp.usage_posts() {
            let v: Value = serde_json::from_slice(&post).unwrap();
            for r in v["reports"].as_array().unwrap() {
                assert!(r["lastUsedAt"].as_str().unwrap().ends_with('Z'));
                let e = by_pair
                    .entry((
                        r["deploymentId"].as_str().unwrap().to_owned(),
                        r["keyId"].to_string(),
                    ))
                    .or_default();
                e.0 += r["requests"].as_u64().unwrap();
                e.1 += r["promptTokens"].as_u64().unwrap();
                e.2 += r["completionTokens"].as_u64().unwrap();
            }
        }
        by_pair
    };
    let expected: std::collections::BTreeMap<(String, String), (u64, u64, u64)> = [
        (("d-keyed".to_owned(), "\"k-keyed\"".to_owned()), (5, 16, 8)),
        (("d-open".to_owned(), "null".to_owned()), (1, 1, 1)),
    ]
    .into_iter()
    .collect();
    assert!(
        eventually(|| async { totals() == expected }).await,
        "usage reports {:?} != {expected:?}",
        totals()
    );
    assert!(
        cp.requests()
            .iter()
            .filter(|r| r.path.contains("usage"))
            .all(|r| r.authorization.as_deref() == Some("Bearer cp-secret"))
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_failed_usage_post_is_kept_for_the_next_report() {
    let backend = Backend::start().await;
    let cp = ControlPlane::start().await;
    cp.set_snapshot(fixture(3));
    cp.set_usage_status(503);
    let toml = pull_toml(&backend, &cp, "[usage]\nreport_interval = \"100ms\"\n");
    let edge = TestEdge::launch(tempfile::tempdir().unwrap(), &toml).await;
    for _ in 0..3 {
        let a = post_chat(edge.addr, "open.arkor.app", &[]).await;
        assert_eq!(a.status, 200);
    }
    assert!(
        eventually(|| async { cp.usage_posts().len() >= 2 }).await,
        "no retried post"
    );
    cp.set_usage_status(200);
    let delivered = || {
        cp.usage_posts()
            .last()
            .map(|p| serde_json::from_slice::<Value>(p).unwrap()["reports"][0]["requests"].as_u64())
    };
    // Once the control plane accepts again, the three requests arrive in one report.
    assert!(
        eventually(|| async { delivered() == Some(Some(3)) }).await,
        "{:?}",
        delivered()
    );
    edge.stop().await;
}
