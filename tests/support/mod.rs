//! Shared harness for end-to-end tests: the whole edge on an ephemeral port, fed by a snapshot
//! file in a temporary folder, in front of in-test backends.

#![allow(dead_code)]

pub mod backend;
pub mod control_plane;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use arkor_edge::auth::KeyHash;
use arkor_edge::config::Config;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Keys of the fixture.
pub const KEYED_KEY: &str = "ark_live_keyedkeyedkeyedkeyedkeyed01";
pub const OTHER_KEY: &str = "ark_live_otherotherotherotherother02";
pub const REVOKED_KEY: &str = "ark_live_revokedrevokedrevokedrevo03";

/// The upstream model of the `keyed` deployment (adapter checkpoint).
pub const KEYED_MODEL: &str = "job-1:step-7";

/// The fixture's deployments: `open` (no auth, base model), `keyed` (key, adapter checkpoint),
/// `other` (key), `off` (disabled), `nopool` (base model nobody serves), `echo` (builtin echo).
pub fn fixture(revision: u64) -> Value {
    let dep = |id: &str, slug: &str, enabled: bool, auth: &str, target: Value| {
        json!({"id": id, "slug": slug, "enabled": enabled, "authMode": auth, "target": target,
               "revision": 1})
    };
    let base = |m: &str| json!({"type": "base_model", "baseModel": m});
    let key = |id: &str, dep: &str, plain: &str, enabled: bool| {
        json!({"id": id, "deploymentId": dep, "prefix": &plain[..12],
               "sha256": KeyHash::of(plain.as_bytes()).to_hex(), "enabled": enabled, "revision": 1})
    };
    json!({
        "revision": revision,
        "deployments": [
            dep("d-open", "open", true, "none", base("test/model")),
            dep("d-keyed", "keyed", true, "fixed_api_key",
                json!({"type": "adapter", "jobId": "job-1", "checkpointStep": 7, "baseModel": "test/model"})),
            dep("d-other", "other", true, "fixed_api_key", base("test/model")),
            dep("d-off", "off", false, "none", base("test/model")),
            dep("d-nopool", "nopool", true, "none", base("unknown/model")),
            dep("d-echo", "echo", true, "none", base("demo/echo")),
        ],
        "keys": [
            key("k-keyed", "d-keyed", KEYED_KEY, true),
            key("k-other", "d-other", OTHER_KEY, true),
            key("k-revoked", "d-keyed", REVOKED_KEY, false),
        ],
    })
}

/// A config for tests: ephemeral ports, two worker threads (whatever the machine's CPUs, so
/// every test crosses workers), state in the config folder, the `test` pool over `endpoints`
/// (with `pool_extra` lines), the `demo` echo pool, the given `[control_plane]` table body, and
/// `extra` appended.
pub fn config_toml(
    endpoints: &[String],
    pool_extra: &str,
    control_plane: &str,
    extra: &str,
) -> String {
    let endpoints = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
base_domains = ["arkor.app"]
state_dir = "state"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 2
[control_plane]
{control_plane}
[[pools]]
name = "test"
base_models = ["test/model"]
endpoints = [{endpoints}]
{pool_extra}
[[pools]]
name = "demo"
base_models = ["demo/echo"]
endpoints = ["builtin:echo"]
{extra}
"#
    )
}

pub struct TestEdge {
    pub addr: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub running: Option<arkor_edge::Running>,
}

impl TestEdge {
    /// Starts the edge with the fixture and a `test` pool over `endpoints`. `extra` is appended
    /// to the config (e.g. a `[timeouts]` table).
    pub async fn start(endpoints: &[String], extra: &str) -> TestEdge {
        Self::start_pool(endpoints, "", extra).await
    }

    /// Like [`TestEdge::start`], with extra lines inside the `test` pool table.
    pub async fn start_pool(endpoints: &[String], pool_extra: &str, extra: &str) -> TestEdge {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("deployments.json"), fixture(1).to_string()).unwrap();
        let control_plane = "file = \"deployments.json\"\npoll_interval = \"20ms\"";
        Self::launch(
            dir,
            &config_toml(endpoints, pool_extra, control_plane, extra),
        )
        .await
    }

    /// Starts the edge on `toml` with `dir` as its config folder (for snapshot files, tokens
    /// and the state folder).
    pub async fn launch(dir: tempfile::TempDir, toml: &str) -> TestEdge {
        let config = Config::from_toml(toml, dir.path().to_path_buf()).expect("test config");
        let running = arkor_edge::start(config).await.expect("edge starts");
        TestEdge {
            addr: running.http_addr.expect("plain listener enabled"),
            https: running.https_addr,
            admin: running.admin_addr,
            dir,
            running: Some(running),
        }
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.path().join("deployments.json")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Stops the edge and hands back its folder (for a restart on the same state).
    pub async fn stop_keep_dir(self) -> tempfile::TempDir {
        let TestEdge { dir, running, .. } = self;
        if let Some(r) = running {
            r.shutdown().await;
        }
        dir
    }

    /// A request to the admin listener.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Answer {
        let addr = self.admin.expect("admin listener enabled");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
            .await
            .expect("admin answered in time")
            .expect("admin request sent");
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

/// A plain HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, fully read.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request to the edge at `addr` with `Host: <host>`.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("edge answered in time")
        .expect("request sent");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `POST /v1/chat/completions` with a non-streamed chat body.
pub async fn post_chat(addr: SocketAddr, host: &str, headers: &[(&str, &str)]) -> Answer {
    send(
        addr,
        Method::POST,
        host,
        "/v1/chat/completions",
        headers,
        chat("x", false),
    )
    .await
}

/// A chat completion body.
pub fn chat(model: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream,
           "messages": [{"role": "user", "content": "hello edge"}]})
    .to_string()
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Sends raw bytes on a fresh TCP connection and reads until the peer closes or `within`.
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a project install script (`tests/python/ensure-venv.sh`, `tests/node/ensure-node-deps.sh`)
/// on its folder — `$<env_var>` or `target/<default_dir>` — and returns the path it prints.
/// Fails the test loudly when the install fails.
pub fn installed(script: &str, env_var: &str, default_dir: &str) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os(env_var)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target").join(default_dir));
    let out = std::process::Command::new("bash")
        .arg(root.join(script))
        .arg(&dir)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{script} could not install into {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}
