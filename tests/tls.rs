//! The HTTPS listener: certificates by SNI, ALPN, 421 on a misdirected request, certificate
//! reload keeping the last good set, and HTTP/2 streaming over TLS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::backend::Backend;
use support::tls::{TestCa, alpn, connect, peer_cert, start_tls_edge};
use support::*;

struct TlsEdge {
    edge: TestEdge,
    ca: TestCa,
    wildcard: rustls::pki_types::CertificateDer<'static>,
    special: rustls::pki_types::CertificateDer<'static>,
    _backend: Backend,
}

async fn tls_edge() -> TlsEdge {
    let backend = Backend::start().await;
    let (edge, ca, wildcard, special) = start_tls_edge(&[backend.url()]).await;
    TlsEdge {
        edge,
        ca,
        wildcard,
        special,
        _backend: backend,
    }
}

/// Sends one request over a fresh TLS connection; returns (status, ALPN, body).
async fn request_over_tls(
    t: &TlsEdge,
    sni: &str,
    host: &str,
    alpn_offer: &[&[u8]],
    path: &str,
) -> (u16, Option<Vec<u8>>, Bytes) {
    let stream = connect(&t.ca.client(alpn_offer), t.edge.https.unwrap(), sni)
        .await
        .unwrap();
    let negotiated = alpn(&stream);
    let io = TokioIo::new(stream);
    let req = Request::builder()
        .method(Method::GET)
        .header("authorization", bearer(KEYED_KEY))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = if negotiated.as_deref() == Some(b"h2") {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = format!("https://{host}{path}").parse().unwrap();
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse().unwrap();
        parts.headers.insert("host", host.parse().unwrap());
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, negotiated, body)
}

#[tokio::test]
async fn certificates_are_chosen_by_sni() {
    let t = tls_edge().await;
    let client = t.ca.client(&[b"http/1.1"]);
    let s = connect(&client, t.edge.https.unwrap(), "keyed.arkor.app")
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), t.wildcard);
    // The exact certificate wins over the wildcard listed before it.
    let s = connect(&client, t.edge.https.unwrap(), "special.arkor.app")
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), t.special);
    // A name no certificate serves: no handshake.
    assert!(
        connect(&client, t.edge.https.unwrap(), "api.example.com")
            .await
            .is_err()
    );
    t.edge.stop().await;
}

#[tokio::test]
async fn alpn_picks_http2_or_http1() {
    let t = tls_edge().await;
    let (status, proto, body) = request_over_tls(
        &t,
        "keyed.arkor.app",
        "keyed.arkor.app",
        &[b"h2", b"http/1.1"],
        "/v1/models",
    )
    .await;
    assert_eq!((status, proto.as_deref()), (200, Some(&b"h2"[..])));
    assert!(String::from_utf8_lossy(&body).contains(KEYED_MODEL));
    let (status, proto, _) = request_over_tls(
        &t,
        "keyed.arkor.app",
        "keyed.arkor.app",
        &[b"http/1.1"],
        "/v1/models",
    )
    .await;
    assert_eq!((status, proto.as_deref()), (200, Some(&b"http/1.1"[..])));
    t.edge.stop().await;
}

#[tokio::test]
async fn a_host_other_than_the_sni_is_421() {
    let t = tls_edge().await;
    for offer in [&[&b"h2"[..]][..], &[&b"http/1.1"[..]][..]] {
        let (status, _, body) =
            request_over_tls(&t, "open.arkor.app", "keyed.arkor.app", offer, "/v1/models").await;
        assert_eq!(status, 421, "{offer:?}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "misdirected_request");
        // Same name in another spelling is fine.
        let (status, _, _) = request_over_tls(
            &t,
            "keyed.arkor.app",
            "KEYED.arkor.app.:443",
            offer,
            "/v1/models",
        )
        .await;
        assert_eq!(status, 200, "{offer:?}");
    }
    t.edge.stop().await;
}

#[tokio::test]
async fn certificates_reload_and_a_broken_reload_keeps_the_last_good_set() {
    let t = tls_edge().await;
    let dir = t.edge.dir.path();
    let client = t.ca.client(&[b"http/1.1"]);
    // A connection opened before the reload keeps working afterwards.
    let old = connect(&client, t.edge.https.unwrap(), "keyed.arkor.app")
        .await
        .unwrap();
    let (mut old_sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old))
        .await
        .unwrap();
    tokio::spawn(conn);
    let models = || {
        Request::get("/v1/models")
            .header("host", "keyed.arkor.app")
            .header("authorization", bearer(KEYED_KEY))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        old_sender.send_request(models()).await.unwrap().status(),
        200
    );
    let renewed = t.ca.issue(dir, "wildcard", &["*.arkor.app"]);
    assert_ne!(renewed, t.wildcard);
    let mut seen = None;
    for _ in 0..100 {
        let s = connect(&client, t.edge.https.unwrap(), "keyed.arkor.app")
            .await
            .unwrap();
        if peer_cert(&s) == renewed {
            seen = Some(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.is_some(), "the renewed certificate was never served");
    let resp = old_sender.send_request(models()).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "a connection from before the reload was dropped"
    );
    // A broken key file: the renewed set stays in service.
    std::fs::write(
        dir.join("wildcard.key"),
        "-----BEGIN PRIVATE KEY-----\nbroken\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = connect(&client, t.edge.https.unwrap(), "keyed.arkor.app")
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), renewed);
    t.edge.stop().await;
}

#[tokio::test]
async fn streams_over_tls_and_http2() {
    let t = tls_edge().await;
    let stream = connect(
        &t.ca.client(&[b"h2"]),
        t.edge.https.unwrap(),
        "keyed.arkor.app",
    )
    .await
    .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("https://keyed.arkor.app/v1/chat/completions")
        .header("authorization", bearer(KEYED_KEY))
        .header("x-mock", "gated")
        .body(Full::new(Bytes::from(chat("x", true))))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .expect("first event before the backend finished")
        .unwrap()
        .unwrap();
    assert!(first.into_data().unwrap().starts_with(b"data: "));
    t._backend.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    t.edge.stop().await;
}

#[tokio::test]
async fn an_idle_tls_connection_is_parked_and_served_again() {
    let t = tls_edge().await;
    let stream = connect(
        &t.ca.client(&[b"http/1.1"]),
        t.edge.https.unwrap(),
        "keyed.arkor.app",
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for host in ["keyed.arkor.app", "keyed.arkor.app", "other.arkor.app"] {
        // Longer than the edge's parking delay: every request after the first wakes a parked
        // connection, which keeps its TLS session and its SNI.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let req = Request::get("/v1/models")
            .header("host", host)
            .header("authorization", bearer(KEYED_KEY))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let want = if host == "keyed.arkor.app" { 200 } else { 421 };
        assert_eq!(resp.status().as_u16(), want, "{host}");
        resp.into_body().collect().await.unwrap();
    }
    assert!(!conn.is_finished(), "the connection was closed");
    t.edge.stop().await;
}
