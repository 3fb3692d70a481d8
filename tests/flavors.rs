//! What body reaches the backend on each server flavour: the members that select a model or an
//! adapter on that server are the edge's (pinned, or removed whatever the client wrote), and every
//! other byte is the client's. vLLM selects by `model` (the target id); SGLang by `model` (the
//! base model it serves) and `lora_path` (the adapter's name).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use http::Method;
use serde_json::json;
use support::backend::Backend;
use support::*;

/// The adapter target of both deployments.
const TARGET: &str = "job-a:step-7";

/// `vl` is served by a `vllm` pool (`test/model`), `sg` by an `sglang` pool (`sg/model`), both
/// over `backend`; `sgbase` is the SGLang pool's base model.
async fn launch(backend: &Backend) -> TestEdge {
    let dir = tempfile::tempdir().unwrap();
    let dep = |slug: &str, base: &str| {
        json!({"id": format!("d-{slug}"), "slug": slug, "enabled": true, "authMode": "none",
               "revision": 1, "target": {"type": "adapter", "jobId": "job-a",
               "checkpointStep": 7, "baseModel": base}})
    };
    let base = json!({"id": "d-sgbase", "slug": "sgbase", "enabled": true, "authMode": "none",
        "revision": 1, "target": {"type": "base_model", "baseModel": "sg/model"}});
    let snapshot = json!({"revision": 1, "keys": [],
        "deployments": [dep("vl", "test/model"), dep("sg", "sg/model"), base]});
    std::fs::write(dir.path().join("deployments.json"), snapshot.to_string()).unwrap();
    let sglang = format!(
        "[[pools]]\nname = \"sg\"\nbase_models = [\"sg/model\"]\nendpoints = [{:?}]\nflavor = \"sglang\"\n",
        backend.url()
    );
    let toml = config_toml(
        &[backend.url()],
        "flavor = \"vllm\"",
        "file = \"deployments.json\"",
        &sglang,
    );
    TestEdge::launch(dir, &toml).await
}

async fn post_raw(edge: &TestEdge, slug: &str, body: &str) -> Answer {
    send(
        edge.addr,
        Method::POST,
        &format!("{slug}.arkor.app"),
        "/v1/chat/completions",
        &[],
        body.to_owned(),
    )
    .await
}

/// The body the backend received last, as text.
fn last_body(backend: &Backend) -> String {
    String::from_utf8(backend.chats().last().unwrap().body.to_vec()).unwrap()
}

/// Every way a client could name a model in one body: plain, escaped, duplicated, odd types;
/// nested `model` members and strings that merely contain the word are not selectors.
const MODEL_ATTACKS: &str = concat!(
    r#"{"model":"other-tenant","messages":[{"role":"user","content":"say \"model\""}],"#,
    r#""mod\u0065l":"other-2", "temperature" : 0.5,"model":{"name":"other-3"},"#,
    r#""\u006d\u006f\u0064\u0065\u006c":["other-4"],"tools":[{"model":"inner"}],"model":null}"#
);

#[tokio::test]
async fn vllm_bodies_name_only_the_pinned_model() {
    let backend = Backend::start().await;
    let edge = launch(&backend).await;
    let answer = post_raw(&edge, "vl", MODEL_ATTACKS).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Exactly the client's bytes, less every top-level `model`, with the edge's first.
    assert_eq!(
        last_body(&backend),
        concat!(
            r#"{"model":"job-a:step-7","messages":[{"role":"user","content":"say \"model\""}],"#,
            r#" "temperature" : 0.5,"tools":[{"model":"inner"}]}"#
        )
    );
    // vLLM selects by `model` only: other members, `lora_path` included, are the client's.
    let body = r#"{"lora_path":"/x", "model":"other","messages":[],"lora_request":{"a":1}}"#;
    assert_eq!(post_raw(&edge, "vl", body).await.status, 200);
    assert_eq!(
        last_body(&backend),
        r#"{"model":"job-a:step-7","lora_path":"/x","messages":[],"lora_request":{"a":1}}"#
    );
    // A spelling another parser could read as `model` is refused, not guessed about.
    let answer = post_raw(&edge, "vl", r#"{"Model":"other","messages":[]}"#).await;
    assert_eq!(
        (answer.status.as_u16(), answer.code().as_str()),
        (400, "invalid_body")
    );
    assert_eq!(backend.chats().len(), 2);
    edge.stop().await;
}

#[tokio::test]
async fn sglang_bodies_carry_only_the_edges_model_and_lora_path() {
    let backend = Backend::start().await;
    let edge = launch(&backend).await;
    let body = concat!(
        r#"{"lora_path":"/adapters/other-tenant","model":"other","messages":[],"#,
        r#""lora_p\u0061th":["a","b"], "top_p":1,"lora_path":null,"lora_path":{"path":"/x"},"#,
        r#""lora_path":7,"metadata":{"lora_path":"kept: nested"},"\u006cora_path":true}"#
    );
    let answer = post_raw(&edge, "sg", body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        last_body(&backend),
        concat!(
            r#"{"model":"sg/model","lora_path":"job-a:step-7","messages":[], "top_p":1,"#,
            r#""metadata":{"lora_path":"kept: nested"}}"#
        )
    );
    // The model attacks are closed on SGLang too (`base:adapter` spellings included).
    assert_eq!(post_raw(&edge, "sg", MODEL_ATTACKS).await.status, 200);
    let seen = backend.chats().last().unwrap().json();
    assert_eq!(
        (&seen["model"], &seen["lora_path"]),
        (&json!("sg/model"), &json!(TARGET))
    );
    assert_eq!(seen["temperature"], 0.5);
    let body = r#"{"model":"sg/model:other-tenant","messages":[]}"#;
    assert_eq!(post_raw(&edge, "sg", body).await.status, 200);
    assert_eq!(
        last_body(&backend),
        r#"{"model":"sg/model","lora_path":"job-a:step-7","messages":[]}"#
    );
    // A streamed request: the same members, and the usage request added as on any flavour.
    let body = r#"{"stream":true,"lora_path":"/x","messages":[],"model":"m"}"#;
    assert_eq!(post_raw(&edge, "sg", body).await.status, 200);
    let seen = backend.chats().last().unwrap().json();
    assert_eq!(
        seen,
        json!({"model": "sg/model", "lora_path": TARGET, "stream": true, "messages": [],
               "stream_options": {"include_usage": true}})
    );
    // The base model: no adapter at all, whatever the client asked for.
    let body = r#"{"lora_path":"job-a:step-7","messages":[],"model":"sg/model:job-a:step-7"}"#;
    assert_eq!(post_raw(&edge, "sgbase", body).await.status, 200);
    assert_eq!(last_body(&backend), r#"{"model":"sg/model","messages":[]}"#);
    // A spelling that differs only in letter case is refused.
    for bad in [
        r#"{"Lora_Path":"/x","messages":[]}"#,
        r#"{"lora_path\u0000":"/x","messages":[]}"#,
    ] {
        let answer = post_raw(&edge, "sg", bad).await;
        assert_eq!(
            (answer.status.as_u16(), answer.code().as_str()),
            (400, "invalid_body"),
            "{bad}"
        );
    }
    assert_eq!(backend.chats().len(), 5);
    edge.stop().await;
}
