//! `pin`: model pinning of realistic chat bodies, per pool flavour, next to the obvious
//! alternative (parse into a `serde_json::Value`, replace `model`, serialise again).

use std::hint::black_box;

use arkor_edge::proxy::pin::pin as pin_body;
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use serde_json::Value;

use crate::fixtures::flavour_deployments;

/// Body sizes: (label, bytes).
const SIZES: [(&str, usize); 3] = [("1KiB", 1 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)];

/// The size the flavour comparison runs at.
const FLAVOUR_SIZE: usize = 64 << 10;

/// Conversation text: ASCII prose with the escapes and non-ASCII characters chat content has.
const PARAGRAPH: &str = "The quarterly report shows revenue up 12% year over year, driven by \
    the \"Enterprise\" tier; churn fell to 2.1%.\nNext steps:\n\t1. Review the café pricing \
    page — ask Zoë about the “annual” plan.\n\t2. Draft the FAQ (see C:\\docs\\faq.md) and \
    the 🚀 launch post.\n";

/// A chat-completion body of exactly `size` bytes: a system prompt, alternating user and
/// assistant turns of a few KiB, a `model` member after the messages (where SDKs write it),
/// and the usual sampling members. `stream` adds `"stream":true`.
pub fn chat_body(size: usize, stream: bool) -> Bytes {
    let tail = if stream {
        r#"],"model":"gpt-4o-mini","temperature":0.7,"max_tokens":1024,"stream":true}"#
    } else {
        r#"],"model":"gpt-4o-mini","temperature":0.7,"max_tokens":1024}"#
    };
    let mut out = String::from(r#"{"messages":["#);
    out.push_str(r#"{"role":"system","content":"You are a concise assistant for Acme Corp."}"#);
    let turn = PARAGRAPH.repeat(24);
    let mut role = ["user", "assistant"].into_iter().cycle();
    // Whole turns while they fit, leaving room for the last user turn and the tail.
    let overhead = r#",{"role":"assistant","content":""}"#.len() + tail.len();
    loop {
        let content = serde_json::to_string(&turn).expect("a string");
        if out.len() + content.len() + 2 * overhead + 64 > size {
            break;
        }
        let role = role.next().unwrap_or("user");
        out.push_str(&format!(r#",{{"role":"{role}","content":{content}}}"#));
    }
    // The last user turn fills the body to the byte, with plain ASCII so any length works.
    let start = r#",{"role":"user","content":"Summarise: "#;
    let fill = size.saturating_sub(out.len() + start.len() + 2 + tail.len());
    out.push_str(start);
    out.extend(
        PARAGRAPH
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .cycle()
            .take(fill),
    );
    out.push_str("\"}");
    out.push_str(tail);
    assert_eq!(out.len(), size, "body generator is off");
    serde_json::from_str::<Value>(&out).expect("generated body is valid JSON");
    Bytes::from(out)
}

/// The obvious alternative: a tree, the member replaced, the tree written again.
fn pin_via_value(body: &[u8], target: &str) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let object = doc.as_object_mut()?;
    object.remove("model");
    object.insert("model".to_owned(), Value::from(target));
    serde_json::to_vec(&doc).ok()
}

pub fn pin(c: &mut Criterion) {
    let mut group = c.benchmark_group("pin");
    // A 1 MiB body takes milliseconds through serde_json: fewer samples fit the 2 s budget.
    group.sample_size(25);
    let deployments = flavour_deployments();
    let upstream = |flavour: &str| {
        deployments
            .iter()
            .find(|(name, _)| *name == flavour)
            .and_then(|(_, d)| d.upstream.as_ref().ok())
            .expect("flavour deployment")
    };
    let vllm = upstream("vllm");
    let vllm_target = deployments
        .iter()
        .find(|(name, _)| *name == "vllm")
        .map(|(_, d)| d.target_id.to_string())
        .expect("vllm deployment");
    for (label, size) in SIZES {
        let body = chat_body(size, false);
        group.throughput(Throughput::Bytes(body.len() as u64));
        assert!(pin_body(&body, vllm.owned, &vllm.members).is_ok());
        group.bench_function(format!("vllm/{label}"), |b| {
            b.iter(|| pin_body(black_box(&body), vllm.owned, &vllm.members))
        });
        assert!(pin_via_value(&body, &vllm_target).is_some());
        group.bench_function(format!("serde_json_value/{label}"), |b| {
            b.iter(|| pin_via_value(black_box(&body), &vllm_target))
        });
    }
    let body = chat_body(FLAVOUR_SIZE, false);
    group.throughput(Throughput::Bytes(body.len() as u64));
    for flavour in ["openai", "sglang", "llamacpp"] {
        let up = upstream(flavour);
        assert!(pin_body(&body, up.owned, &up.members).is_ok());
        group.bench_function(format!("{flavour}/64KiB"), |b| {
            b.iter(|| pin_body(black_box(&body), up.owned, &up.members))
        });
    }
    let body = chat_body(FLAVOUR_SIZE, true);
    let pinned = pin_body(&body, vllm.owned, &vllm.members).expect("stream body pins");
    assert!(pinned.stream && pinned.strip_usage);
    group.bench_function("vllm_stream/64KiB", |b| {
        b.iter(|| pin_body(black_box(&body), vllm.owned, &vllm.members))
    });
    group.finish();
}
