//! The access log: one structured line per request with the fields operators need, and never
//! more than 12 characters of a key. Its own test binary, since it installs the process-wide
//! log subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::backend::Backend;
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn access_lines(c: &Captured) -> Vec<serde_json::Value> {
    let text = String::from_utf8(c.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "arkor_edge::access")
        .collect()
}

#[tokio::test]
async fn one_json_line_per_request_without_keys() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .init();

    let backend = Backend::start().await;
    let edge = TestEdge::start(&[backend.url()], "").await;
    let ok = post_chat(
        edge.addr,
        "keyed.arkor.app",
        &[
            ("authorization", &bearer(KEYED_KEY)),
            ("x-request-id", "log-ok"),
        ],
    )
    .await;
    assert_eq!(ok.status, 200);
    let wrong = "ark_live_wrongwrongwrongwrongwrong77";
    let bad = post_chat(
        edge.addr,
        "keyed.arkor.app",
        &[
            ("authorization", &bearer(wrong)),
            ("x-request-id", "log-bad"),
        ],
    )
    .await;
    assert_eq!(bad.status, 401);

    // A client that leaves before the backend answers is logged as 499 client_closed.
    let body = chat("x", false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: open.arkor.app\r\nx-mock: hang\r\n\
         x-request-id: log-gone\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .unwrap();
    for _ in 0..100 {
        if backend.seen().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);

    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = access_lines(&captured);
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    let gone = lines
        .iter()
        .find(|l| l["request_id"] == "log-gone")
        .unwrap();
    assert_eq!(gone["status"], 499);
    assert_eq!(gone["code"], "client_closed");
    assert_eq!(gone["slug"], "open");
    let ok_line = lines.iter().find(|l| l["request_id"] == "log-ok").unwrap();
    assert_eq!(ok_line["slug"], "keyed");
    assert_eq!(ok_line["key"], &KEYED_KEY[..12]);
    assert_eq!(ok_line["status"], 200);
    assert_eq!(ok_line["code"], "ok");
    assert_eq!(ok_line["endpoint"], backend.url());
    assert!(ok_line["ttfb_ms"].as_f64().unwrap() >= 0.0);
    assert!(ok_line["total_ms"].as_f64().unwrap() >= ok_line["ttfb_ms"].as_f64().unwrap());
    assert_eq!(ok_line["bytes"].as_u64().unwrap(), ok.body.len() as u64);
    let bad_line = lines.iter().find(|l| l["request_id"] == "log-bad").unwrap();
    assert_eq!(bad_line["status"], 401);
    assert_eq!(bad_line["code"], "invalid_api_key");
    assert_eq!(bad_line["key"], &wrong[..12]);

    let everything = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for key in [KEYED_KEY, wrong] {
        assert!(
            !everything.contains(&key[..13]),
            "more than 12 characters of a key were logged"
        );
    }
    edge.stop().await;
}
