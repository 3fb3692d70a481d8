//! SPEC §2 decision order, end to end: host → deployment → preflight → key → route.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use http::Method;
use support::backend::Backend;
use support::*;

async fn edge() -> (TestEdge, Backend) {
    let backend = Backend::start().await;
    let edge = TestEdge::start(&[backend.url()], "").await;
    (edge, backend)
}

#[tokio::test]
async fn unknown_disabled_and_bad_hosts_are_the_same_404() {
    let (edge, backend) = edge().await;
    let reference = send(
        edge.addr,
        Method::GET,
        "nope.arkor.app",
        "/v1/models",
        &[],
        "",
    )
    .await;
    assert_eq!(reference.status, 404);
    assert_eq!(reference.code(), "deployment_not_found");
    assert_eq!(reference.headers["x-should-retry"], "false");
    let names = |a: &Answer| {
        let mut v: Vec<String> = a.headers.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    };
    for host in [
        "off.arkor.app",              // disabled
        "OFF.Arkor.App.",             // disabled, other spelling
        "www.arkor.app",              // reserved
        "a.b.arkor.app",              // two labels
        "open.example.com",           // other domain
        "open.arkor.app.example.com", // suffix trick
        "127.0.0.1",                  // no slug
        "open_x.arkor.app",           // bad slug
        "x.arkor.app",                // too short
    ] {
        let a = send(edge.addr, Method::GET, host, "/v1/models", &[], "").await;
        assert_eq!(a.status, 404, "{host}");
        assert_eq!(a.body, reference.body, "{host}: body differs");
        assert_eq!(names(&a), names(&reference), "{host}: header names differ");
    }
    // Even a correct key for a disabled deployment reveals nothing, and nothing reaches a backend.
    let a = send(
        edge.addr,
        Method::POST,
        "off.arkor.app",
        "/v1/chat/completions",
        &[("authorization", &bearer(KEYED_KEY))],
        chat("m", false),
    )
    .await;
    assert_eq!(a.body, reference.body);
    assert!(backend.seen().is_empty());
    edge.stop().await;
}

#[tokio::test]
async fn missing_or_doubled_host_is_404() {
    let (edge, _backend) = edge().await;
    let no_host = raw(
        edge.addr,
        b"GET /v1/models HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(no_host.starts_with("HTTP/1.0 404"), "{no_host}");
    assert!(no_host.contains("deployment_not_found"));
    let two = raw(
        edge.addr,
        b"GET /v1/models HTTP/1.1\r\nhost: open.arkor.app\r\nhost: keyed.arkor.app\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(two.starts_with("HTTP/1.1 404"), "{two}");
    // Absolute-form target: its authority names the deployment (RFC 9112), not the Host header.
    let abs = raw(
        edge.addr,
        b"GET http://open.arkor.app/v1/models HTTP/1.1\r\nhost: nope.arkor.app\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(abs.starts_with("HTTP/1.1 200"), "{abs}");
    edge.stop().await;
}

#[tokio::test]
async fn preflight_needs_no_key_and_names_what_browsers_need() {
    let (edge, backend) = edge().await;
    let a = send(
        edge.addr,
        Method::OPTIONS,
        "keyed.arkor.app",
        "/v1/chat/completions",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            ),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 204);
    assert_eq!(a.headers["access-control-allow-origin"], "*");
    assert_eq!(
        a.headers["access-control-allow-methods"],
        "GET, POST, OPTIONS"
    );
    assert_eq!(
        a.headers["access-control-allow-headers"],
        "authorization, content-type, x-stainless-os"
    );
    assert!(a.body.is_empty());
    // Preflight on an unknown deployment is still a 404.
    let a = send(
        edge.addr,
        Method::OPTIONS,
        "nope.arkor.app",
        "/v1/chat/completions",
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 404);
    assert!(backend.seen().is_empty());
    edge.stop().await;
}

#[tokio::test]
async fn keys_are_checked_against_this_deployment() {
    let (edge, backend) = edge().await;
    let post = |auth: Option<String>| {
        let addr = edge.addr;
        async move {
            let mut h: Vec<(&str, String)> = Vec::new();
            if let Some(a) = auth {
                h.push(("authorization", a));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(
                addr,
                Method::POST,
                "keyed.arkor.app",
                "/v1/chat/completions",
                &h,
                chat("gpt-4", false),
            )
            .await
        }
    };
    let a = post(None).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (401, "missing_api_key")
    );
    assert_eq!(a.headers["x-should-retry"], "false");
    for auth in [
        format!("Basic {KEYED_KEY}"),
        "Bearer not-a-key".to_owned(),
        bearer("ark_live_unknownunknownunknownunknown"),
        bearer(OTHER_KEY),   // a live key, of another deployment
        bearer(REVOKED_KEY), // revoked
    ] {
        let a = post(Some(auth.clone())).await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (401, "invalid_api_key"),
            "{auth}"
        );
        assert!(
            !a.text().contains("ark_live_"),
            "error echoes a key: {}",
            a.text()
        );
    }
    assert!(
        backend.seen().is_empty(),
        "a refused request reached the backend"
    );
    let a = post(Some(format!("bEaReR {KEYED_KEY}"))).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].headers.get("authorization").is_none(),
        "client key forwarded"
    );
    edge.stop().await;
}

#[tokio::test]
async fn open_deployments_ignore_and_drop_authorization() {
    let (edge, backend) = edge().await;
    let a = post_chat(
        edge.addr,
        "open.arkor.app",
        &[("authorization", "Bearer whatever")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(backend.seen()[0].headers.get("authorization").is_none());
    edge.stop().await;
}

#[tokio::test]
async fn routes_models_unknown_paths_and_methods() {
    let (edge, backend) = edge().await;
    let auth = [("authorization", bearer(KEYED_KEY))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = send(
        edge.addr,
        Method::GET,
        "keyed.arkor.app",
        "/v1/models",
        &auth,
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], KEYED_MODEL);
    // Models needs the key too.
    let a = send(
        edge.addr,
        Method::GET,
        "keyed.arkor.app",
        "/v1/models",
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 401);

    let a = send(
        edge.addr,
        Method::POST,
        "keyed.arkor.app",
        "/v1/embeddings",
        &auth,
        "{}",
    )
    .await;
    assert_eq!((a.status.as_u16(), a.code().as_str()), (404, "unknown_url"));
    assert_eq!(a.headers["x-should-retry"], "false");
    let a = send(
        edge.addr,
        Method::GET,
        "keyed.arkor.app",
        "/v1/chat/completions",
        &auth,
        "",
    )
    .await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(a.headers["allow"], "POST, OPTIONS");
    let a = send(
        edge.addr,
        Method::DELETE,
        "keyed.arkor.app",
        "/v1/models",
        &auth,
        "",
    )
    .await;
    assert_eq!(a.status, 405);
    assert_eq!(a.headers["allow"], "GET, OPTIONS");
    // The key is checked before the route: a wrong key on an unknown path is 401.
    let a = send(edge.addr, Method::GET, "keyed.arkor.app", "/admin", &[], "").await;
    assert_eq!(a.status, 401);
    assert!(backend.seen().is_empty());
    edge.stop().await;
}

#[tokio::test]
async fn error_envelope_is_openai_shaped() {
    let (edge, _backend) = edge().await;
    let a = send(
        edge.addr,
        Method::GET,
        "nope.arkor.app",
        "/v1/models",
        &[],
        "",
    )
    .await;
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    let e = v["error"].as_object().unwrap();
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "param", "type"]);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["param"].is_null());
    assert!(!a.text().contains("nope"), "the message names the slug");
    edge.stop().await;
}

#[tokio::test]
async fn request_id_in_and_out() {
    let (edge, backend) = edge().await;
    let a = post_chat(
        edge.addr,
        "open.arkor.app",
        &[("x-request-id", "client-chosen-42")],
    )
    .await;
    assert_eq!(a.headers["x-request-id"], "client-chosen-42");
    assert_eq!(
        backend.seen()[0].headers["x-request-id"],
        "client-chosen-42"
    );

    let long = "x".repeat(129);
    let a = post_chat(edge.addr, "open.arkor.app", &[("x-request-id", &long)]).await;
    let id = a.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
    assert_eq!(backend.seen()[1].headers["x-request-id"], id.as_str());

    // Errors carry one too.
    let a = send(
        edge.addr,
        Method::GET,
        "nope.arkor.app",
        "/v1/models",
        &[],
        "",
    )
    .await;
    assert!(
        a.headers["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    edge.stop().await;
}

#[tokio::test]
async fn snapshot_file_changes_are_served() {
    let (edge, backend) = edge().await;
    let a = post_chat(
        edge.addr,
        "keyed.arkor.app",
        &[("authorization", &bearer(KEYED_KEY))],
    )
    .await;
    assert_eq!(a.status, 200);
    // Revoke the key and disable `open` in a new snapshot.
    let mut doc = fixture(2);
    doc["keys"][0]["enabled"] = false.into();
    doc["keys"][0]["revision"] = 2.into();
    doc["deployments"][0]["enabled"] = false.into();
    doc["deployments"][0]["revision"] = 2.into();
    let tmp = edge.dir.path().join("next.json");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, edge.snapshot_path()).unwrap();
    let mut revoked = false;
    let mut served_before = 0;
    for _ in 0..200 {
        let a = post_chat(
            edge.addr,
            "keyed.arkor.app",
            &[("authorization", &bearer(KEYED_KEY))],
        )
        .await;
        if a.status == 401 {
            revoked = true;
            break;
        }
        assert_eq!(a.status, 200);
        served_before += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked, "revocation in the file was never enforced");
    let a = send(
        edge.addr,
        Method::GET,
        "open.arkor.app",
        "/v1/models",
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(backend.seen().len(), 1 + served_before);
    edge.stop().await;
}
