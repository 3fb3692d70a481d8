//! Pull sync against an in-test control plane: `PullSource` feeding a real `Registry` over
//! real HTTP, through snapshots, event streams, garbage, `410 Gone`, outages and silence.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use arkor_edge::auth::KeyHash;
use arkor_edge::config::{Config, Secret};
use arkor_edge::host::Slug;
use arkor_edge::proxy::pool::Pools;
use arkor_edge::registry::Registry;
use arkor_edge::sync::SyncStatus;
use arkor_edge::sync::pull::{PullSettings, PullSource};
use serde_json::{Value, json};
use support::control_plane::ControlPlane;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cp-secret-token";
const KEY_A: &str = "ark_live_aaaaaaaaaaaaaaaaaaaaaaaa01";
const KEY_B: &str = "ark_live_bbbbbbbbbbbbbbbbbbbbbbbb02";

fn registry() -> Arc<Registry> {
    Arc::new(Registry::new(Arc::new(Pools::default())))
}

fn token() -> Secret {
    let toml = format!("[control_plane]\nurl = \"http://127.0.0.1:1\"\ntoken = \"{TOKEN}\"\n");
    Config::from_toml(&toml, std::env::temp_dir())
        .expect("config with a token")
        .control_plane
        .secret
        .expect("token resolved")
}

fn settings() -> PullSettings {
    PullSettings {
        request_timeout: Duration::from_secs(1),
        stream_idle: Duration::from_secs(5),
        backoff_max: Duration::from_millis(200),
    }
}

fn dep(revision: u64, id: &str, slug: &str, enabled: bool) -> Value {
    json!({"id": id, "slug": slug, "enabled": enabled, "authMode": "fixed_api_key",
           "target": {"type": "base_model", "baseModel": "m"}, "revision": revision})
}

fn key(revision: u64, id: &str, dep: &str, plain: &str, enabled: bool) -> Value {
    json!({"id": id, "deploymentId": dep, "prefix": &plain[..12],
           "sha256": KeyHash::of(plain.as_bytes()).to_hex(), "enabled": enabled,
           "revision": revision})
}

fn snapshot(revision: u64, deployments: Vec<Value>, keys: Vec<Value>) -> Value {
    json!({"revision": revision, "deployments": deployments, "keys": keys})
}

fn upsert_dep(revision: u64, id: &str, slug: &str, enabled: bool) -> Value {
    json!({"revision": revision, "op": "upsert_deployment",
           "deployment": dep(revision, id, slug, enabled)})
}

fn upsert_key(revision: u64, id: &str, dep: &str, plain: &str, enabled: bool) -> Value {
    json!({"revision": revision, "op": "upsert_key", "key": key(revision, id, dep, plain, enabled)})
}

fn deployment(r: &Registry, slug: &str) -> Option<bool> {
    r.deployment(&Slug::parse(slug.as_bytes()).unwrap())
        .map(|d| d.enabled)
}

fn key_enabled(r: &Registry, plain: &str) -> Option<bool> {
    r.key(&KeyHash::of(plain.as_bytes())).map(|k| k.enabled)
}

/// Polls `check` every 10 ms for up to 5 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..2000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn events_requests(cp: &ControlPlane) -> usize {
    cp.paths()
        .iter()
        .filter(|p| p.starts_with("/v1/edge/events"))
        .count()
}

struct Pull {
    status: Arc<SyncStatus>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Pull {
    fn start(cp: &ControlPlane, registry: &Arc<Registry>, settings: PullSettings) -> Pull {
        let status = Arc::new(SyncStatus::default());
        let source = PullSource::new(
            cp.url(),
            Some(token()),
            Arc::clone(registry),
            Arc::clone(&status),
            settings,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.run(stop.clone()));
        Pull { status, stop, task }
    }

    /// Cancels and checks the loop ends promptly, wherever it was.
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .expect("pull loop stops promptly on shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn snapshot_then_events_in_order_with_the_bearer_token() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(
        3,
        vec![dep(3, "d-a", "alpha", true)],
        vec![key(3, "k-a", "d-a", KEY_A, true)],
    ));
    // Already in the history when the edge connects, plus some older than the snapshot.
    cp.push(upsert_dep(2, "d-old", "old", true));
    cp.push(upsert_dep(4, "d-b", "beta", true));
    cp.push(upsert_dep(5, "d-b", "beta", false));
    cp.push(upsert_key(6, "k-b", "d-b", KEY_B, true));
    let r = registry();
    let pull = Pull::start(&cp, &r, settings());

    eventually("revision 6", || r.revision() == 6).await;
    assert_eq!(deployment(&r, "alpha"), Some(true));
    assert_eq!(deployment(&r, "beta"), Some(false));
    assert_eq!(deployment(&r, "old"), None, "older than the snapshot");
    assert_eq!(key_enabled(&r, KEY_A), Some(true));
    assert_eq!(key_enabled(&r, KEY_B), Some(true));

    // Live events after the replay.
    cp.push(upsert_dep(7, "d-c", "gamma", true));
    eventually("gamma", || deployment(&r, "gamma") == Some(true)).await;

    let paths = cp.paths();
    assert_eq!(paths[0], "/v1/edge/snapshot");
    assert_eq!(paths[1], "/v1/edge/events?after=3");
    let expected = format!("Bearer {TOKEN}");
    for req in cp.requests() {
        assert_eq!(req.method, "GET");
        assert_eq!(req.authorization.as_deref(), Some(expected.as_str()));
    }
    assert!(pull.status.last_contact_ms().is_some());
    pull.shutdown().await;
}

#[tokio::test]
async fn new_disabled_and_revoked_objects_propagate() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(
        1,
        vec![dep(1, "d-a", "alpha", true), dep(1, "d-x", "doomed", true)],
        vec![key(1, "k-a", "d-a", KEY_A, true)],
    ));
    let r = registry();
    let pull = Pull::start(&cp, &r, settings());
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);
    assert_eq!(key_enabled(&r, KEY_A), Some(true));

    cp.push(upsert_dep(2, "d-n", "newcomer", true));
    eventually("new deployment", || {
        deployment(&r, "newcomer") == Some(true)
    })
    .await;
    cp.push(upsert_dep(3, "d-a", "alpha", false));
    eventually("disabled deployment", || {
        deployment(&r, "alpha") == Some(false)
    })
    .await;
    cp.push(upsert_key(4, "k-a", "d-a", KEY_A, false));
    eventually("revoked key", || key_enabled(&r, KEY_A) == Some(false)).await;
    cp.push(json!({"revision": 5, "op": "delete_deployment", "id": "d-x"}));
    eventually("deleted deployment", || deployment(&r, "doomed").is_none()).await;
    assert_eq!(r.revision(), 5);
    pull.shutdown().await;
}

#[tokio::test]
async fn garbage_and_malformed_events_are_skipped_and_the_stream_goes_on() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(1, vec![dep(1, "d-a", "alpha", true)], vec![]));
    let r = registry();
    let pull = Pull::start(&cp, &r, settings());
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);

    cp.send_raw("this is not sse at all\r\n: keep-alive\n\n");
    cp.send_raw("data: {\"revision\": 2, \"op\": \n\n");
    cp.send_raw("data: {\"revision\":3,\"op\":\"explode\"}\r\n\r\n");
    cp.send_raw("data: \"just a string\"\n\nevent: x\nid: 9\n\n\u{0}\u{1}\n\n");
    // An event split across writes, with a multi-line (still valid JSON) body.
    cp.send_raw("data: {\"revision\":4,\"op\":\"upsert_deployment\",\ndata: \"deployment\":");
    cp.send_raw(dep(4, "d-s", "split", true).to_string() + "}\n\n");
    cp.push(upsert_dep(5, "d-b", "beta", true));

    eventually("events after the garbage", || {
        deployment(&r, "beta") == Some(true) && deployment(&r, "split") == Some(true)
    })
    .await;
    assert_eq!(r.revision(), 5);
    assert_eq!(deployment(&r, "alpha"), Some(true));
    assert_eq!(events_requests(&cp), 1, "garbage never broke the stream");
    pull.shutdown().await;
}

#[tokio::test]
async fn gone_takes_a_new_snapshot_and_resumes_from_it() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(
        2,
        vec![dep(1, "d-a", "alpha", true), dep(2, "d-b", "beta", true)],
        vec![key(1, "k-a", "d-a", KEY_A, true)],
    ));
    let r = registry();
    let pull = Pull::start(&cp, &r, settings());
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);
    assert_eq!(r.revision(), 2);

    // The control plane compacts its history past our revision and drops us.
    cp.set_snapshot(snapshot(
        10,
        vec![dep(9, "d-b", "beta", false), dep(10, "d-c", "gamma", true)],
        vec![],
    ));
    cp.set_gone_below(10);
    cp.disconnect_all();

    eventually("the new snapshot", || r.revision() == 10).await;
    assert_eq!(
        deployment(&r, "alpha"),
        None,
        "absent from the new snapshot"
    );
    assert_eq!(key_enabled(&r, KEY_A), None, "absent from the new snapshot");
    assert_eq!(deployment(&r, "beta"), Some(false));
    assert_eq!(deployment(&r, "gamma"), Some(true));

    cp.push(upsert_dep(11, "d-d", "delta", true));
    eventually("events after the new snapshot", || {
        deployment(&r, "delta").is_some()
    })
    .await;
    let paths = cp.paths();
    let gone_at = paths
        .iter()
        .position(|p| p == "/v1/edge/events?after=2")
        .unwrap();
    assert!(paths[gone_at + 1..].contains(&"/v1/edge/snapshot".to_owned()));
    assert!(paths.contains(&"/v1/edge/events?after=10".to_owned()));
    pull.shutdown().await;
}

#[tokio::test]
async fn a_control_plane_down_at_start_is_retried_until_it_is_up() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(4, vec![dep(4, "d-a", "alpha", true)], vec![]));
    cp.stop().await;
    let r = registry();
    let pull = Pull::start(&cp, &r, settings());

    eventually("retried while down", || pull.status.reconnects() >= 1).await;
    assert!(!r.is_loaded());
    assert!(pull.status.last_contact_ms().is_none());

    cp.restart().await;
    eventually("loaded once up", || r.is_loaded()).await;
    assert_eq!(deployment(&r, "alpha"), Some(true));
    cp.push(upsert_dep(5, "d-b", "beta", true));
    eventually("events once up", || deployment(&r, "beta").is_some()).await;
    pull.shutdown().await;
}

#[tokio::test]
async fn a_dropped_stream_reconnects_from_the_last_revision_and_misses_nothing() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(1, vec![], vec![]));
    let r = registry();
    let pull = Pull::start(&cp, &r, settings());
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);
    cp.push(upsert_dep(2, "d-2", "two", true));
    cp.push(upsert_dep(3, "d-3", "three", true));
    eventually("revision 3", || r.revision() == 3).await;

    // Cut mid-stream; events pushed while the edge is away are replayed on reconnect.
    cp.disconnect_all();
    cp.push(upsert_dep(4, "d-4", "four", true));
    cp.push(upsert_dep(5, "d-5", "five", true));
    eventually("revision 5", || r.revision() == 5).await;
    assert!(cp.paths().contains(&"/v1/edge/events?after=3".to_owned()));

    // The whole control plane restarts while events keep coming.
    cp.stop().await;
    cp.push(upsert_dep(6, "d-6", "six", true));
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.restart().await;
    cp.push(upsert_dep(7, "d-7", "seven", true));
    eventually("revision 7", || r.revision() == 7).await;
    for slug in ["two", "three", "four", "five", "six", "seven"] {
        assert_eq!(deployment(&r, slug), Some(true), "{slug} missed");
    }
    assert!(cp.paths().contains(&"/v1/edge/events?after=5".to_owned()));
    assert_eq!(
        cp.paths()
            .iter()
            .filter(|p| *p == "/v1/edge/snapshot")
            .count(),
        1,
        "reconnects resume from the revision, not a new snapshot"
    );
    assert!(pull.status.reconnects() >= 2);
    pull.shutdown().await;
}

#[tokio::test]
async fn a_persisted_state_goes_straight_to_the_events() {
    let cp = ControlPlane::start().await;
    for rev in 3..=7 {
        cp.push(upsert_dep(
            rev,
            &format!("d-{rev}"),
            &format!("slug{rev}"),
            true,
        ));
    }
    let r = registry();
    r.apply_snapshot(
        snapshot(5, vec![dep(5, "d-5", "slug5", true)], vec![])
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let status = Arc::new(SyncStatus::default());
    let source = PullSource::new(cp.url(), None, Arc::clone(&r), status, settings());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(stop.clone()));

    eventually("revision 7", || r.revision() == 7).await;
    assert_eq!(deployment(&r, "slug6"), Some(true));
    assert_eq!(
        deployment(&r, "slug3"),
        None,
        "not replayed: older than the state"
    );
    let requests = cp.requests();
    assert_eq!(requests[0].path, "/v1/edge/events?after=5");
    assert!(requests.iter().all(|q| q.path != "/v1/edge/snapshot"));
    assert!(
        requests.iter().all(|q| q.authorization.is_none()),
        "no token configured"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn keepalives_hold_a_stream_and_silence_drops_it() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(1, vec![], vec![]));
    let r = registry();
    let settings = PullSettings {
        stream_idle: Duration::from_millis(300),
        ..settings()
    };
    let pull = Pull::start(&cp, &r, settings);
    assert!(cp.wait_streams(1, Duration::from_secs(5)).await);

    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cp.send_raw(": keep-alive\n\n");
    }
    assert_eq!(events_requests(&cp), 1, "keep-alives hold the stream");
    let contact = pull.status.last_contact_ms().unwrap();

    // Now silent: dropped after 300 ms and reconnected from the same revision.
    eventually("a reconnect after silence", || events_requests(&cp) >= 2).await;
    assert!(pull.status.reconnects() >= 1);
    assert!(
        cp.paths()
            .iter()
            .skip(1)
            .all(|p| p == "/v1/edge/events?after=1")
    );
    cp.push(upsert_dep(2, "d-2", "two", true));
    eventually("events after the reconnect", || r.revision() == 2).await;
    assert!(pull.status.last_contact_ms().unwrap() > contact);
    pull.shutdown().await;
}

#[tokio::test]
async fn a_failed_snapshot_keeps_the_last_good_state() {
    let cp = ControlPlane::start().await;
    cp.set_snapshot(snapshot(2, vec![dep(2, "d-a", "alpha", true)], vec![]));
    let r = registry();
    let source = PullSource::new(
        cp.url(),
        Some(token()),
        Arc::clone(&r),
        Arc::new(SyncStatus::default()),
        settings(),
    );
    let report = source.load_snapshot().await.unwrap();
    assert_eq!((report.revision, report.changed), (2, 1));

    cp.set_snapshot_status(503);
    let err = source.load_snapshot().await.unwrap_err();
    assert!(err.contains("503"), "{err}");
    cp.set_snapshot_status(200);
    cp.set_snapshot(json!({"revision": "three", "deployments": "garbage"}));
    let err = source.load_snapshot().await.unwrap_err();
    assert!(err.contains("does not parse"), "{err}");
    assert!(!err.contains(TOKEN), "the token never shows in errors");
    assert_eq!(r.revision(), 2);
    assert_eq!(deployment(&r, "alpha"), Some(true));
}

/// A raw TCP peer that answers every connection with `head` (and nothing more, keeping the
/// connection open).
async fn raw_server(head: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn snapshot_downloads_are_bounded() {
    let quick = PullSettings {
        request_timeout: Duration::from_millis(300),
        ..settings()
    };
    let source = |url: String| {
        PullSource::new(
            url,
            None,
            registry(),
            Arc::new(SyncStatus::default()),
            quick,
        )
    };
    let started = tokio::time::Instant::now();

    let huge = raw_server("HTTP/1.1 200 OK\r\ncontent-length: 3000000000\r\n\r\n{").await;
    let err = source(huge).load_snapshot().await.unwrap_err();
    assert!(err.contains("limit"), "{err}");

    let mute = raw_server("").await;
    let err = source(mute).load_snapshot().await.unwrap_err();
    assert!(err.contains("no answer"), "{err}");

    let stalled = raw_server("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"revision\"").await;
    let err = source(stalled).load_snapshot().await.unwrap_err();
    assert!(err.contains("stalled"), "{err}");

    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn shutdown_interrupts_a_backoff_wait() {
    let cp = ControlPlane::start().await;
    cp.stop().await;
    let r = registry();
    let settings = PullSettings {
        backoff_max: Duration::from_secs(60),
        ..settings()
    };
    let pull = Pull::start(&cp, &r, settings);
    // Let a few failures grow the backoff well past the shutdown bound.
    tokio::time::sleep(Duration::from_millis(500)).await;
    pull.shutdown().await;
}
