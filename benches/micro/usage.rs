//! `usage_scan`: the usage scan of a backend's response, per chunk, next to the obvious
//! alternative (each event's data parsed by `serde_json`).

use std::hint::black_box;

use arkor_edge::usage::scan::{JsonUsageScan, SseUsageScan};
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use serde_json::Value;

/// Events in the stream, `[DONE]` included.
const EVENTS: usize = 32;

const WORDS: [&str; 8] = [
    " The", " edge", " pins", " the", " model", ",", " then", " streams",
];

/// A 32-event chat-completion stream as vLLM writes it: the role, 28 content deltas, the finish
/// reason, the usage-only chunk (asked for by the edge), then `[DONE]`. One event per entry.
fn stream_events() -> Vec<String> {
    let head = r#"{"id":"chatcmpl-7f3a9c2e5b1d4e6f8a0b","object":"chat.completion.chunk","created":1732406400,"model":"9d3e5f70-2b1a-4c8d-9e0f-1a2b3c4d5e6f:step-800","choices":"#;
    let event = |choices: &str| format!("data: {head}{choices}}}\n\n");
    let mut events = vec![event(
        r#"[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]"#,
    )];
    for word in WORDS.iter().cycle().take(EVENTS - 4) {
        events.push(event(&format!(
            r#"[{{"index":0,"delta":{{"content":"{word}"}},"logprobs":null,"finish_reason":null}}]"#
        )));
    }
    events.push(event(
        r#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","stop_reason":null}]"#,
    ));
    events.push(event(
        r#"[],"usage":{"prompt_tokens":57,"total_tokens":85,"completion_tokens":28}"#,
    ));
    events.push("data: [DONE]\n\n".to_owned());
    assert_eq!(events.len(), EVENTS);
    events
}

/// One frame per event.
fn whole_frames(events: &[String]) -> Vec<Bytes> {
    events.iter().map(|e| Bytes::from(e.clone())).collect()
}

/// The same bytes cut in the middle of every event: each frame ends half-way through one event
/// and starts half-way through the one before.
fn split_frames(events: &[String]) -> Vec<Bytes> {
    let all: String = events.concat();
    let mut cuts = Vec::new();
    let mut at = 0;
    for e in events {
        cuts.push(at + e.len() / 2);
        at += e.len();
    }
    cuts.push(all.len());
    let mut frames = vec![Bytes::copy_from_slice(&all.as_bytes()[..cuts[0]])];
    for pair in cuts.windows(2) {
        frames.push(Bytes::copy_from_slice(&all.as_bytes()[pair[0]..pair[1]]));
    }
    frames
}

/// Feeds a whole stream to a fresh scanner, as one response does; returns the usage seen.
fn scan_stream(frames: &[Bytes], strip: bool) -> Option<(u64, u64)> {
    let mut scan = SseUsageScan::new(strip);
    for frame in frames {
        for part in scan.feed(frame.clone()) {
            black_box(part);
        }
    }
    black_box(scan.finish());
    scan.usage().map(|u| (u.prompt_tokens, u.completion_tokens))
}

/// The obvious alternative, on whole-event frames: each event's data through `serde_json`.
fn parse_stream(frames: &[Bytes]) -> Option<(u64, u64)> {
    let mut usage = None;
    for frame in frames {
        let data = frame
            .strip_prefix(b"data: ")
            .and_then(|d| d.strip_suffix(b"\n\n"))?;
        if data == b"[DONE]" {
            continue;
        }
        let event: Value = serde_json::from_slice(data).ok()?;
        if let Some(u) = event.get("usage").filter(|u| u.is_object()) {
            let field = |name: &str| u.get(name).and_then(Value::as_u64).unwrap_or(0);
            usage = Some((field("prompt_tokens"), field("completion_tokens")));
        }
    }
    usage
}

/// A non-streamed completion of about 1 KiB.
fn completion_body() -> Bytes {
    let content = WORDS.concat().repeat(12);
    Bytes::from(format!(
        r#"{{"id":"chatcmpl-7f3a9c2e5b1d4e6f8a0b","object":"chat.completion","created":1732406400,"model":"9d3e5f70-2b1a-4c8d-9e0f-1a2b3c4d5e6f:step-800","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","tool_calls":[]}},"logprobs":null,"finish_reason":"stop","stop_reason":null}}],"usage":{{"prompt_tokens":57,"total_tokens":153,"completion_tokens":96,"prompt_tokens_details":null}},"prompt_logprobs":null}}"#
    ))
}

pub fn usage_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_scan");
    let events = stream_events();
    let expected = Some((57, 28));
    let streams = [
        ("event_per_chunk", whole_frames(&events)),
        ("split_mid_event", split_frames(&events)),
    ];
    for (mode, strip) in [("sse", false), ("sse_strip", true)] {
        for (shape, frames) in &streams {
            assert_eq!(scan_stream(frames, strip), expected);
            group.throughput(Throughput::Elements(frames.len() as u64));
            group.bench_function(format!("{mode}/{shape}"), |b| {
                b.iter(|| scan_stream(black_box(frames), strip))
            });
        }
    }
    let frames = &streams[0].1;
    assert_eq!(parse_stream(frames), expected);
    group.throughput(Throughput::Elements(frames.len() as u64));
    group.bench_function("serde_json_per_event/event_per_chunk", |b| {
        b.iter(|| parse_stream(black_box(frames)))
    });

    let body = completion_body();
    group.throughput(Throughput::Elements(1));
    let scan_body = |body: &[u8]| {
        let mut scan = JsonUsageScan::new();
        scan.feed(body);
        scan.usage().map(|u| (u.prompt_tokens, u.completion_tokens))
    };
    assert_eq!(scan_body(&body), Some((57, 96)));
    group.bench_function("json/whole_body", |b| {
        b.iter(|| scan_body(black_box(&body)))
    });
    group.bench_function("serde_json_value/whole_body", |b| {
        b.iter(|| {
            let doc: Value = serde_json::from_slice(black_box(&body)).ok()?;
            doc.get("usage")?.get("completion_tokens")?.as_u64()
        })
    });
    group.finish();
}
