//! Tests of the usage scanners: fixed cases, then a differential test against serde_json over
//! many generated streams and documents, split at random points.

use super::*;
use serde_json::Value;

fn u(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens,
        completion_tokens,
    })
}

/// Scans a document fed in frames of `step` bytes.
fn json_usage(doc: &str, step: usize) -> Option<Usage> {
    let mut scan = JsonUsageScan::new();
    for piece in doc.as_bytes().chunks(step) {
        scan.feed(piece);
    }
    scan.usage()
}

/// Runs a stream through both modes in frames of `step` bytes; returns the usage and what the
/// stripping scanner forwarded. Checks the pass-through mode on the way.
fn sse(stream: &str, step: usize) -> (Option<Usage>, String) {
    let mut plain = SseUsageScan::new(false);
    let mut strip = SseUsageScan::new(true);
    let mut out = Vec::new();
    for piece in stream.as_bytes().chunks(step) {
        let frame = Bytes::copy_from_slice(piece);
        let fwd: Vec<Bytes> = plain.feed(frame.clone()).collect();
        assert_eq!(fwd.len(), 1);
        assert_eq!(fwd[0].as_ptr(), frame.as_ptr());
        for part in strip.feed(frame) {
            out.extend_from_slice(&part);
        }
        assert!(strip.held_len() <= MAX_HELD_EVENT);
    }
    assert!(plain.finish().is_empty());
    for part in strip.finish() {
        out.extend_from_slice(&part);
    }
    assert_eq!(plain.usage(), strip.usage(), "{stream:?}");
    (strip.usage(), String::from_utf8(out).unwrap())
}

/// Asserts the same answer at every frame size from 1 byte to the whole stream.
fn sse_all_splits(stream: &str, usage: Option<Usage>, forwarded: &str) {
    for step in 1..=stream.len().max(1) {
        let (got, out) = sse(stream, step);
        assert_eq!(got, usage, "step {step}: {stream:?}");
        assert_eq!(out, forwarded, "step {step}: {stream:?}");
    }
}

const ROLE: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
const TEXT: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi \"usage\":{\"prompt_tokens\":99}"},"finish_reason":null}]}"#;
const STOP: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
const USAGE_ONLY: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;

fn events(datas: &[&str]) -> String {
    datas.iter().map(|d| format!("data: {d}\n\n")).collect()
}

#[test]
fn openai_stream_with_usage_only_chunk() {
    let stream = events(&[ROLE, TEXT, STOP, USAGE_ONLY, "[DONE]"]);
    let stripped = events(&[ROLE, TEXT, STOP, "[DONE]"]);
    sse_all_splits(&stream, u(12, 34), &stripped);
}

#[test]
fn whole_events_without_the_word_usage_are_skipped_but_escaped_keys_are_not() {
    // Whole events in one frame are skipped unscanned when no key in them can be `usage`; a
    // `\u` escape or a second data line still takes the full scan.
    let escaped = r#"{"choices":[],"us\u0061ge":{"prompt_tokens":3,"completion_tokens":4}}"#;
    for eol in ["\n", "\r\n", "\r"] {
        // The event after the cut one starts a frame, at some split, with the LF of a CRLF
        // that belongs to the cut event.
        let stream =
            format!("data: {ROLE}{eol}{eol}data: {escaped}{eol}{eol}data: {STOP}{eol}{eol}");
        let stripped = format!("data: {ROLE}{eol}{eol}data: {STOP}{eol}{eol}");
        sse_all_splits(&stream, u(3, 4), &stripped);
        let two_lines = format!(
            "data: {{\"choices\":[],{eol}data: \"usage\":{{\"prompt_tokens\":1}}}}{eol}{eol}"
        );
        sse_all_splits(&two_lines, u(1, 0), "");
    }
}

#[test]
fn usage_null_chunks_and_no_usage() {
    let null = r#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#;
    let empty_null = r#"{"choices":[],"usage":null}"#;
    let stream = events(&[null, empty_null, null, "[DONE]"]);
    sse_all_splits(&stream, None, &stream);
    let stream = events(&[ROLE, TEXT, STOP, "[DONE]"]);
    sse_all_splits(&stream, None, &stream);
    sse_all_splits("", None, "");
    // A later null does not erase a usage already seen.
    let stream = events(&[USAGE_ONLY, null]);
    sse_all_splits(&stream, u(12, 34), &events(&[null]));
}

#[test]
fn frames_whose_only_usage_is_null_pass_unscanned() {
    // With include_usage, OpenAI-compatible backends put `"usage":null` in every chunk but the
    // last: such frames go on as they came, unscanned.
    let scan = SseUsageScan::new(true);
    let chunk = |tail: &str| {
        format!(r#"data: {{"choices":[{{"index":0,"delta":{{"content":"a"}}}}]{tail}}}"#) + "\n\n"
    };
    for tail in [
        r#","usage":null"#,
        r#", "usage" : null "#,
        "\t,\"usage\":\tnull",
        r#","x_usage":null,"usage":null"#,
    ] {
        let frame = chunk(tail);
        assert!(scan.passes(frame.as_bytes()), "{frame:?}");
        assert!(
            scan.passes(format!("{frame}{frame}").as_bytes()),
            "{frame:?}"
        );
    }
    for tail in [
        r#","usage":{"prompt_tokens":1}"#,
        r#","usage":"null""#,
        r#","usage":nullx"#,
        r#","usage":nul"#,
        r#","usage":null,"usage":{"prompt_tokens":1}"#,
        r#","usage":null,"us\u0061ge":{"prompt_tokens":1}"#,
        r#","usage":null,"meta":{"usage":{}}"#,
    ] {
        let frame = chunk(tail);
        assert!(!scan.passes(frame.as_bytes()), "{frame:?}");
    }
    // A value on the next data line: scanned.
    let split = "data: {\"usage\":\ndata: null}\n\n";
    assert!(!scan.passes(split.as_bytes()));
    // And what passes counts as it would scanned: nothing, and a later usage still counts.
    let null = r#"{"choices":[{"delta":{"content":"x"}}], "usage" : null}"#;
    let stream = events(&[null, null, USAGE_ONLY, "[DONE]"]);
    sse_all_splits(&stream, u(12, 34), &events(&[null, null, "[DONE]"]));
}

#[test]
fn vllm_continuous_usage_last_wins() {
    let c = |p: u64, c: u64, choices: &str| {
        format!(
            r#"{{"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":{choices},"usage":{{"prompt_tokens":{p},"total_tokens":{},"completion_tokens":{c}}}}}"#,
            p + c
        )
    };
    let delta = r#"[{"index":0,"delta":{"content":"a"},"logprobs":null,"finish_reason":null}]"#;
    let (a, b, last) = (c(7, 1, delta), c(7, 2, delta), c(7, 3, "[]"));
    let stream = events(&[&a, &b, &last, "[DONE]"]);
    sse_all_splits(&stream, u(7, 3), &events(&[&a, &b, "[DONE]"]));
    // Without a usage-only chunk, the last chunk's usage counts and nothing is cut.
    let stream = events(&[&a, &b]);
    sse_all_splits(&stream, u(7, 2), &stream);
}

#[test]
fn usage_in_strings_nested_objects_and_other_fields_is_not_counted() {
    let nested = r#"{"choices":[],"meta":{"usage":{"prompt_tokens":5}},"x":"\"usage\":{}"}"#;
    let in_choice = r#"{"choices":[{"usage":{"prompt_tokens":5}}]}"#;
    let escaped_quote = r#"{"a":"\\","usage":{"prompt_tokens":3}, "b":"\"usage\""}"#;
    let stream = format!(
        "data: {nested}\n\ndata: {in_choice}\n\nevent: usage\nid: 1\ndatax: {USAGE_ONLY}\nDATA: {USAGE_ONLY}\n\n: {USAGE_ONLY}\n\n"
    );
    sse_all_splits(&stream, None, &stream);
    let stream = events(&[escaped_quote]);
    sse_all_splits(&stream, u(3, 0), &stream);
}

#[test]
fn crlf_cr_comments_and_multi_line_data() {
    for eol in ["\n", "\r\n", "\r"] {
        let stream = format!(
            ": ping{eol}{eol}data: {ROLE}{eol}{eol}data:{USAGE_ONLY}{eol}{eol}data: [DONE]{eol}{eol}"
        );
        let stripped = format!(": ping{eol}{eol}data: {ROLE}{eol}{eol}data: [DONE]{eol}{eol}");
        sse_all_splits(&stream, u(12, 34), &stripped);
    }
    // Data split over lines, a comment between them, a bare `data` line, mixed line ends.
    let stream = "data: {\"choices\":\r: c\rdata:  []\ndata\r\ndata: ,\"usage\":\n\
                  data: {\"completion_tokens\":\r\ndata: 8}}\r\r\ndata: [DONE]\n\n";
    sse_all_splits(stream, u(0, 8), "data: [DONE]\n\n");
    // Data lines join with LF, which splits a key, so this is no usage.
    let stream = "data: {\"choices\":[],\"usa\ndata:ge\":{\"prompt_tokens\":5}}\n\n";
    sse_all_splits(stream, None, stream);
}

#[test]
fn a_stray_colon_after_a_null_usage_counts_nothing_however_the_stream_is_cut() {
    // Found by the `usage_scan` fuzz target: the whole frame passed unscanned as a
    // `"usage":null` chunk, while the scan of a cut one read the keyless `:{…}` as usage.
    let stream = "data:{\"usage\":null,:{\"\"}}\n\n";
    sse_all_splits(stream, None, stream);
}

#[test]
fn non_json_data_and_unterminated_events() {
    let stream = "data: hello\n\ndata: [DONE]\n\ndata: {\"choices\":[],\"usage\":{}} x\n\n";
    sse_all_splits(stream, None, stream);
    // An event the stream never ends is forwarded, not counted (clients drop it too).
    let stream = format!("data: {ROLE}\n\ndata: {USAGE_ONLY}\n");
    sse_all_splits(&stream, None, &stream);
    // A truncated document is no document.
    let stream = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}\n\n";
    sse_all_splits(stream, None, stream);
}

#[test]
fn non_streamed_documents() {
    let cases: [(&str, Option<Usage>); 17] = [
        (
            r#"{"id":"x","choices":[{"message":{"content":"usage"}}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#,
            u(9, 4),
        ),
        (
            "{\r\n  \"usage\" : {\r\n    \"completion_tokens\" : 2 ,\n\t\"prompt_tokens\":1\r\n  }\r\n}\n",
            u(1, 2),
        ),
        (r#"{"usage":{}}"#, u(0, 0)),
        (r#"{"usage":null}"#, None),
        (r#"{"usage":[1]}"#, None),
        (r#"{"choices":[]}"#, None),
        (r#"{"usage":{"prompt_tokens":1},"usage":null}"#, None),
        (r#"{"usage":null,"usage":{"prompt_tokens":1}}"#, u(1, 0)),
        (
            r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":-3,"x":{"prompt_tokens":8}}}"#,
            u(0, 0),
        ),
        (
            r#"{"usage":{"prompt_tokens":"7","completion_tokens":2e1,"prompt_tokens_details":{"cached_tokens":3}}}"#,
            u(0, 0),
        ),
        (
            r#"{"us\u0061ge":{"prompt\u005ftokens":4,"completion_tokens\u0000":5}}"#,
            u(4, 0),
        ),
        (
            // Past u64::MAX a parser reads a float, not a count (and a saturated count would
            // wrap the Prometheus token counter): 0. u64::MAX itself is a count.
            r#"{"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":18446744073709551615}}"#,
            u(0, u64::MAX),
        ),
        (r#"[{"usage":{"prompt_tokens":1}}]"#, None),
        // Only the colon after a key opens its value: a stray one opens none.
        (r#"{"usage":null,:{"prompt_tokens":5}}"#, None),
        (r#"{"usage":null :{"prompt_tokens":5}}"#, None),
        (
            r#"{"x":1,"usage":{"a":[{"b":"}"}],"completion_tokens":6}, "y":[]}"#,
            u(0, 6),
        ),
        (r#"{"usage":{"prompt_tokens":1}} {}"#, None),
    ];
    for (doc, usage) in cases {
        for step in 1..=doc.len() {
            assert_eq!(json_usage(doc, step), usage, "step {step}: {doc}");
        }
    }
    assert_eq!(json_usage(r#"{"usage":{"prompt_tokens":1}"#, 4), None);
    assert_eq!(json_usage("", 1), None);
}

#[test]
fn whole_event_frames_are_forwarded_without_copy() {
    let stream = Bytes::from(events(&[STOP, USAGE_ONLY, "[DONE]"]));
    let mut scan = SseUsageScan::new(true);
    let fwd = scan.feed(stream.clone());
    assert_eq!(fwd.len(), 2);
    let base = stream.as_ptr() as usize;
    for part in fwd.parts() {
        let start = part.as_ptr() as usize;
        assert!(start >= base && start + part.len() <= base + stream.len());
    }
    let total = fwd.byte_len();
    let out: Vec<u8> = fwd.flat_map(|b| b.to_vec()).collect();
    assert_eq!(out.len(), total);
    assert_eq!(out, events(&[STOP, "[DONE]"]).into_bytes());
    assert_eq!(scan.usage(), u(12, 34));
}

#[test]
fn many_cuts_in_one_frame_are_joined() {
    let mut datas: Vec<&str> = [ROLE, USAGE_ONLY].repeat(4);
    datas.push(ROLE);
    let stream = Bytes::from(events(&datas));
    let mut scan = SseUsageScan::new(true);
    let fwd = scan.feed(stream);
    assert_eq!(
        fwd.len(),
        2,
        "five runs do not fit inline: four joined, then the fifth"
    );
    let out: Vec<u8> = fwd.flat_map(|b| b.to_vec()).collect();
    assert_eq!(out, events(&[ROLE; 5]).into_bytes());
}

#[test]
fn held_event_is_bounded_and_then_passes_unfiltered() {
    // Bigger than the bound by more than any frame below: it cannot end in the frame that
    // takes it over the bound.
    let pad = "x".repeat(2 * MAX_HELD_EVENT);
    let big = format!(r#"{{"choices":[],"pad":"{pad}","usage":{{"prompt_tokens":5}}}}"#);
    let stream = events(&[ROLE, &big, "[DONE]"]);
    for step in [1000, 7, MAX_HELD_EVENT / 2] {
        let (usage, out) = sse(&stream, step);
        assert_eq!(usage, u(5, 0));
        assert!(
            out == stream,
            "step {step}: released whole once over the bound"
        );
    }
    // An event released over the bound is not cut, but the next usage-only one is, though the
    // frame that ends the released event is all whole events without usage.
    let comment = format!(": {pad}\n");
    let frames = [
        comment.clone(),
        format!("\ndata: {ROLE}\n\n"),
        format!("data: {USAGE_ONLY}\n\n"),
        "data: [DONE]\n\n".to_string(),
    ];
    let mut scan = SseUsageScan::new(true);
    let mut out = Vec::new();
    for frame in frames {
        scan.feed(Bytes::from(frame))
            .for_each(|b| out.extend_from_slice(&b));
    }
    scan.finish().for_each(|b| out.extend_from_slice(&b));
    assert_eq!(scan.usage(), u(12, 34));
    let kept = format!("{comment}\ndata: {ROLE}\n\ndata: [DONE]\n\n");
    assert!(
        out == kept.as_bytes(),
        "the usage-only event after it is cut"
    );
    // In one frame nothing is held: the event is cut as usual.
    let (usage, out) = sse(&stream, stream.len());
    assert_eq!(usage, u(5, 0));
    assert!(out == events(&[ROLE, "[DONE]"]));
    // Just under the bound it is still held and cut.
    let pad = "x".repeat(MAX_HELD_EVENT - 100);
    let big = format!(r#"{{"choices":[],"pad":"{pad}","usage":{{"prompt_tokens":5}}}}"#);
    let (usage, out) = sse(&events(&[&big, "[DONE]"]), 1000);
    assert_eq!(usage, u(5, 0));
    assert_eq!(out, events(&["[DONE]"]));
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    /// JSON whitespace; in a stream a raw LF becomes a new `data:` line.
    fn ws(&mut self, doc: bool) -> &'static str {
        let all = ["", "", "", " ", "\t", "\n", "  ", "\r\n  "];
        all[self.below(if doc { 8 } else { 6 })]
    }
    fn text(&mut self) -> String {
        let mut s = String::from("\"");
        for _ in 0..self.below(6) {
            s.push_str(self.pick(&[
                "hello",
                " ",
                "\\\"",
                "\\\\",
                "\\n",
                "\\r\\n",
                "\\u00e9",
                "\\ud83d\\ude00",
                "é€😀",
                "usage",
                "\\\"usage\\\":{\\\"prompt_tokens\\\":9}",
                "\\\"choices\\\":[]",
                "data: [DONE]\\n\\n",
                "}]{[,:",
                "\\/",
            ]));
        }
        s.push('"');
        s
    }
    fn count(&mut self) -> String {
        match self.below(12) {
            0 => "1.5".into(),
            1 => "-4".into(),
            2 => "3e2".into(),
            3 => "\"12\"".into(),
            4 => "null".into(),
            5 => "0".into(),
            _ => self.below(100_000).to_string(),
        }
    }
    fn object(&mut self, members: Vec<(String, String)>, doc: bool) -> String {
        let mut members = members;
        for i in (1..members.len()).rev() {
            members.swap(i, self.below(i + 1));
        }
        let mut out = String::from("{");
        out.push_str(self.ws(doc));
        for (i, (k, v)) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
                out.push_str(self.ws(doc));
            }
            for part in [k.as_str(), ":", v.as_str()] {
                out.push_str(part);
                out.push_str(self.ws(doc));
            }
        }
        out.push('}');
        out
    }
    fn usage(&mut self, doc: bool) -> String {
        let mut m = Vec::new();
        let prompt_key = self.pick(&[r#""prompt_tokens""#, r#""prompt\u005ftokens""#]);
        if !self.chance(8) {
            m.push((prompt_key.to_owned(), self.count()));
        }
        if !self.chance(8) {
            m.push((r#""completion_tokens""#.to_owned(), self.count()));
        }
        m.push((r#""total_tokens""#.to_owned(), self.count()));
        if self.chance(3) {
            let inner = vec![
                (r#""cached_tokens""#.to_owned(), self.count()),
                (r#""prompt_tokens""#.to_owned(), self.count()),
            ];
            m.push((
                r#""prompt_tokens_details""#.to_owned(),
                self.object(inner, doc),
            ));
        }
        self.object(m, doc)
    }
    /// One chat-completion object (a chunk, or a whole response when `doc`).
    fn completion(&mut self, doc: bool, usage_only: bool, usage: &str) -> String {
        let mut m = vec![
            (r#""id""#.to_owned(), self.text()),
            (r#""created""#.to_owned(), "1700000000".to_owned()),
            (r#""model""#.to_owned(), self.text()),
        ];
        let kind = if doc {
            "chat.completion"
        } else {
            "chat.completion.chunk"
        };
        m.push((r#""object""#.to_owned(), format!("\"{kind}\"")));
        let choices = if usage_only {
            format!("[{}]", self.ws(doc))
        } else {
            let content = (r#""content""#.to_owned(), self.text());
            let mut inner = vec![content];
            if self.chance(4) {
                inner.push((r#""usage""#.to_owned(), self.usage(doc)));
            }
            let delta = self.object(inner, doc);
            let finish = self.pick(&["null", r#""stop""#]).to_owned();
            let choice = vec![
                (r#""index""#.to_owned(), "0".to_owned()),
                (self.pick(&[r#""delta""#, r#""message""#]).to_owned(), delta),
                (r#""finish_reason""#.to_owned(), finish),
            ];
            format!("[{}]", self.object(choice, doc))
        };
        m.push((r#""choices""#.to_owned(), choices));
        match usage {
            "" => {}
            "obj" => m.push((
                self.pick(&[r#""usage""#, r#""usage""#, r#""us\u0061ge""#])
                    .to_owned(),
                self.usage(doc),
            )),
            other => m.push((r#""usage""#.to_owned(), other.to_owned())),
        }
        if self.chance(4) {
            let decoy = self.pick(&[r#""x_usage""#, r#""usages""#, r#""Usage""#, r#""meta""#]);
            let value = vec![(r#""usage""#.to_owned(), self.usage(doc))];
            m.push((decoy.to_owned(), self.object(value, doc)));
        }
        self.object(m, doc)
    }
    /// A line end; after a lone CR an empty line must not end in a lone LF (that is one CRLF).
    fn eol(&mut self, prev: &mut &'static str, empty: bool) -> &'static str {
        let mut e = self.pick(&["\n", "\n", "\r\n", "\r"]);
        if empty && *prev == "\r" && e == "\n" {
            e = "\r\n";
        }
        *prev = e;
        e
    }
}

/// Expected usage of one document, by serde_json, and whether it is a usage-only chunk.
fn serde_usage(doc: &str) -> (Option<Usage>, bool) {
    let Ok(v) = serde_json::from_str::<Value>(doc) else {
        return (None, false);
    };
    let Some(usage) = v.get("usage").and_then(Value::as_object) else {
        return (None, false);
    };
    let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let usage_only = v.get("choices") == Some(&Value::Array(vec![]));
    (u(n("prompt_tokens"), n("completion_tokens")), usage_only)
}

/// A generated stream: its text, expected usage, and the text with usage-only events removed.
fn gen_stream(g: &mut Gen) -> (String, Option<Usage>, String) {
    let (mut all, mut kept) = (String::new(), String::new());
    let mut usage = None;
    let mut prev = "\n";
    let continuous = g.chance(4);
    let include = g.chance(2);
    let chunks = g.below(6) + 1;
    for i in 0..=chunks + 1 {
        if i == chunks && !include {
            continue;
        }
        // Keep-alives before the event: blank lines end events of their own, never cut.
        let mut ev = String::new();
        for _ in 0..g.below(4) {
            if g.chance(2) {
                ev.push_str(g.pick(&[
                    ": keep-alive",
                    "event: x",
                    "id: 7",
                    "retry: 5",
                    "datax: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}",
                ]));
                ev.push_str(g.eol(&mut prev, false));
            } else {
                ev.push_str(g.eol(&mut prev, true));
                all.push_str(&ev);
                kept.push_str(&ev);
                ev.clear();
            }
        }
        let data = if i == chunks + 1 {
            if g.chance(5) {
                g.pick(&["hello", "{\"usage\""]).to_owned()
            } else {
                "[DONE]".to_owned()
            }
        } else if i == chunks {
            g.completion(false, true, "obj")
        } else {
            let u = if continuous {
                "obj"
            } else if include {
                "null"
            } else {
                ""
            };
            let usage_only = g.chance(10);
            g.completion(false, usage_only, u)
        };
        for (n, line) in data.split('\n').enumerate() {
            if n > 0 && g.chance(5) {
                ev.push_str(": between");
                ev.push_str(g.eol(&mut prev, false));
            }
            ev.push_str(g.pick(&["data: ", "data:"]));
            ev.push_str(line);
            ev.push_str(g.eol(&mut prev, false));
        }
        ev.push_str(g.eol(&mut prev, true));
        let (found, usage_only) = serde_usage(&data);
        if found.is_some() {
            usage = found;
        }
        all.push_str(&ev);
        if !usage_only {
            kept.push_str(&ev);
        }
    }
    if g.chance(10) {
        // Unterminated: forwarded, never counted.
        let tail = format!("data: {}\n", g.completion(false, true, "obj"));
        all.push_str(&tail);
        kept.push_str(&tail);
    }
    (all, usage, kept)
}

/// Random frame lengths covering `len` bytes: 1-byte frames (1 in 20), small, large, or one frame.
fn split(g: &mut Gen, len: usize) -> Vec<usize> {
    let max = match g.below(20) {
        0 => 1,
        1..=3 => 4,
        4..=7 => 32,
        8..=12 => 256,
        13..=15 => 4096,
        _ => len.max(1),
    };
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (g.below(max) + 1).min(len - at);
        cuts.push(n);
        at += n;
    }
    cuts
}

#[test]
fn differential_streams_against_serde_json() {
    let mut g = Gen(0x2545_F491_4F6C_DD1D);
    let (mut with_usage, mut cut, mut one_byte) = (0, 0, 0);
    for case in 0..4_000 {
        let (stream, usage, kept) = gen_stream(&mut g);
        let input = Bytes::from(stream.clone());
        let mut plain = SseUsageScan::new(false);
        let mut strip = SseUsageScan::new(true);
        let (mut out_plain, mut out_strip) = (Vec::new(), Vec::new());
        let mut at = 0;
        let lens = split(&mut g, input.len());
        one_byte += usize::from(lens.iter().all(|&n| n == 1) && lens.len() > 1);
        for n in lens {
            let frame = input.slice(at..at + n);
            at += n;
            for part in plain.feed(frame.clone()) {
                assert!(part.as_ptr() == frame.as_ptr() && part.len() == frame.len());
                out_plain.extend_from_slice(&part);
            }
            for part in strip.feed(frame) {
                out_strip.extend_from_slice(&part);
            }
            assert!(strip.held_len() <= MAX_HELD_EVENT);
        }
        for part in strip.finish() {
            out_strip.extend_from_slice(&part);
        }
        assert!(plain.finish().is_empty());
        assert_eq!(plain.usage(), usage, "case {case}: {stream:?}");
        assert_eq!(strip.usage(), usage, "case {case}: {stream:?}");
        assert_eq!(out_plain, stream.as_bytes());
        assert_eq!(
            String::from_utf8(out_strip).unwrap(),
            kept,
            "case {case}: {stream:?}"
        );
        with_usage += usize::from(usage.is_some());
        cut += usize::from(kept.len() < stream.len());
    }
    // The generator must exercise both sides, or this test proves nothing.
    assert!(with_usage > 1_600, "with usage {with_usage}");
    assert!(cut > 1_200, "cut {cut}");
    assert!(one_byte > 120, "one-byte framings {one_byte}");
}

#[test]
fn differential_documents_against_serde_json() {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut with_usage = 0;
    for case in 0..6_000 {
        let usage = g.pick(&["obj", "obj", "null", "", "[]", "3"]);
        let doc = format!(
            "{}{}{}",
            g.ws(true),
            g.completion(true, false, usage),
            g.ws(true)
        );
        let (expected, _) = serde_usage(&doc);
        let mut scan = JsonUsageScan::new();
        let mut at = 0;
        for n in split(&mut g, doc.len()) {
            scan.feed(&doc.as_bytes()[at..at + n]);
            at += n;
        }
        assert_eq!(scan.usage(), expected, "case {case}: {doc}");
        with_usage += usize::from(expected.is_some());
    }
    assert!(with_usage > 1_500, "with usage {with_usage}");
}
