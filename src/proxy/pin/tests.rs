//! Tests of model pinning: fixed attack cases, then a differential test against serde_json over
//! many generated bodies.

use super::*;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

const PINNED: &str = r#""model":"tenant-a""#;

fn pin_str(body: &str) -> Result<String, BodyProblem> {
    let members = Bytes::from_static(PINNED.as_bytes());
    pin(
        &Bytes::copy_from_slice(body.as_bytes()),
        &["model"],
        &members,
    )
    .map(|p| String::from_utf8(p.to_vec()).unwrap())
}

/// Every top-level member in order, duplicates kept, keys decoded, values raw.
struct Members(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v.get().to_owned()));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn members(text: &str) -> Vec<(String, String)> {
    serde_json::from_str::<Members>(text).unwrap().0
}

/// The property every accepted body must have: the output parses, has exactly one top-level
/// `model` with the pinned value, and its other members are the input's, in order, unchanged —
/// except that a streamed request gets exactly one `stream_options` whose `include_usage` is
/// `true` and whose other members are those of the client's last `stream_options` object.
/// Returns whether the client itself asked for usage.
fn assert_pinned(input: &str, output: &str) -> Option<bool> {
    serde_json::from_str::<serde_json::Value>(output)
        .unwrap_or_else(|e| panic!("output does not parse ({e}): {output:?} from {input:?}"));
    let out = members(output);
    let models: Vec<_> = out.iter().filter(|(k, _)| k == "model").collect();
    assert_eq!(models.len(), 1, "{input:?} -> {output:?}");
    assert_eq!(models[0].1, r#""tenant-a""#);
    let input_members = members(input);
    let stream = input_members
        .iter()
        .rev()
        .find(|(k, _)| k == "stream")
        .is_some_and(|(_, v)| v == "true");
    let kept = |k: &str| k != "model" && !(stream && k == "stream_options");
    let rest_out: Vec<_> = out.iter().filter(|(k, _)| kept(k)).collect();
    let rest_in: Vec<_> = input_members.iter().filter(|(k, _)| kept(k)).collect();
    assert_eq!(rest_out, rest_in, "{input:?} -> {output:?}");
    if !stream {
        return None;
    }
    let options: Vec<_> = out.iter().filter(|(k, _)| k == "stream_options").collect();
    assert_eq!(options.len(), 1, "{input:?} -> {output:?}");
    let inner = members(&options[0].1);
    assert_eq!(
        inner[0],
        ("include_usage".to_owned(), "true".to_owned()),
        "{output:?}"
    );
    assert_eq!(
        inner.iter().filter(|(k, _)| k == "include_usage").count(),
        1
    );
    let client = input_members
        .iter()
        .rev()
        .find(|(k, _)| k == "stream_options");
    let (client_rest, asked) = match client {
        Some((_, v)) if v.starts_with('{') => {
            let m = members(v);
            let asked = m
                .iter()
                .rev()
                .find(|(k, _)| k == "include_usage")
                .is_some_and(|(_, v)| v == "true");
            (
                m.into_iter()
                    .filter(|(k, _)| k != "include_usage")
                    .collect(),
                asked,
            )
        }
        _ => (Vec::new(), false),
    };
    assert_eq!(inner[1..].to_vec(), client_rest, "{input:?} -> {output:?}");
    Some(asked)
}

#[test]
fn pins_the_usual_shapes() {
    let cases = [
        (r#"{"model":"x","a":1}"#, r#"{"model":"tenant-a","a":1}"#),
        (r#"{"a":1,"model":"x"}"#, r#"{"model":"tenant-a","a":1}"#),
        (r#"{"a":1}"#, r#"{"model":"tenant-a","a":1}"#),
        (r#"{}"#, r#"{"model":"tenant-a"}"#),
        (r#" { } "#, r#" {"model":"tenant-a" } "#),
        (r#"{"model":"x"}"#, r#"{"model":"tenant-a"}"#),
        (
            r#"{ "a" : 1 , "model" : "x" , "b" : [2] }"#,
            r#"{"model":"tenant-a", "a" : 1 , "b" : [2] }"#,
        ),
        (
            r#"{"model":1,"model":{"x":[]},"model":null}"#,
            r#"{"model":"tenant-a"}"#,
        ),
        (
            r#"{"m\u006fdel":"other","a":{"model":"nested"}}"#,
            r#"{"model":"tenant-a","a":{"model":"nested"}}"#,
        ),
        (
            r#"{"a":"model","\u006d\u006F\u0064\u0065\u006c":"x","b":1}"#,
            r#"{"model":"tenant-a","a":"model","b":1}"#,
        ),
    ];
    for (input, expected) in cases {
        let got = pin_str(input).unwrap();
        assert_eq!(got, expected, "{input}");
        assert_pinned(input, &got);
    }
}

#[test]
fn refuses_names_that_other_parsers_could_read_as_model() {
    for input in [
        r#"{"Model":"x"}"#,
        r#"{"MODEL":"x"}"#,
        r#"{"mod\u0045l":"x"}"#,
        r#"{"model\u0000":"x"}"#,
        r#"{"model\u0000junk":"x"}"#,
        r#"{"MoDeL\u0000":"x"}"#,
    ] {
        assert_eq!(pin_str(input), Err(BodyProblem::AmbiguousMember), "{input}");
    }
    // Near misses that no parser reads as `model` pass through.
    for input in [
        r#"{"model ":"x"}"#,
        r#"{"models":"x"}"#,
        r#"{"\u0000model":"x"}"#,
        r#"{"mode":"x"}"#,
        r#"{"modèl":"x"}"#,
    ] {
        let got = pin_str(input).unwrap();
        assert_pinned(input, &got);
    }
    let many = format!("{{{}\"a\":1}}", r#""model":0,"#.repeat(65));
    assert_eq!(pin_str(&many), Err(BodyProblem::AmbiguousMember));
    let allowed = format!("{{{}\"a\":1}}", r#""model":0,"#.repeat(64));
    assert_pinned(&allowed, &pin_str(&allowed).unwrap());
}

#[test]
fn refuses_anything_that_is_not_strict_json() {
    for input in [
        "",
        " ",
        "{",
        "}",
        r#"{"a":1,}"#,
        r#"{"a":1 "b":2}"#,
        r#"{"a" 1}"#,
        r#"{a:1}"#,
        r#"{'a':1}"#,
        r#"{"a":1}{"model":"x"}"#,
        r#"{"a":1} x"#,
        r#"{"a":NaN}"#,
        r#"{"a":Infinity}"#,
        r#"{"a":-}"#,
        r#"{"a":01}"#,
        r#"{"a":1.}"#,
        r#"{"a":.5}"#,
        r#"{"a":1e}"#,
        r#"{"a":+1}"#,
        r#"{"a":tru}"#,
        r#"{"a":[1,]}"#,
        r#"{"a":[1 2]}"#,
        r#"{"a":{"b":1,}}"#,
        r#"{"a":"\x"}"#,
        r#"{"a":"\u12"}"#,
        r#"{"a":"\ud800"}"#,
        r#"{"a":"\udc00"}"#,
        r#"{"a":"\ud800\u0041"}"#,
        r#"{"a":"tab	in string"}"#,
        "{\"a\":\"nl\nin string\"}",
        "\u{feff}{\"a\":1}",
        "{\"a\":1}\u{a0}",
        "{\"a\":1 /* c */}",
        "{\"a\":1}\0",
        "\x0c{\"a\":1}",
    ] {
        assert_eq!(pin_str(input), Err(BodyProblem::NotJson), "{input:?}");
    }
    // A raw control byte anywhere in a string: past the first word, past a vector block.
    for at in [13, 21, 5000] {
        let input = format!("{{\"a\":\"{}\u{1f}x\"}}", "y".repeat(at));
        assert_eq!(pin_str(&input), Err(BodyProblem::NotJson), "at {at}");
        let fine = input.replace('\u{1f}', "\\u001f");
        assert!(pin_str(&fine).is_ok(), "at {at}");
    }
    let bad_utf8 = Bytes::from_static(b"{\"a\":\"\xff\"}");
    let members = Bytes::from_static(PINNED.as_bytes());
    assert!(matches!(
        pin(&bad_utf8, &["model"], &members),
        Err(BodyProblem::NotJson)
    ));
    let utf16 = Bytes::from_static(b"{\0\"\0a\0\"\0:\x001\0}\0");
    assert!(pin(&utf16, &["model"], &members).is_err());
    // Every kind of ill-formed UTF-8 (RFC 3629), in a short body and deep in long ones, where the
    // check reads whole vectors: a lone continuation byte, overlong forms, a surrogate, a code
    // point above U+10FFFF, a 5-byte lead, and sequences cut short (at 0, by the string's end).
    let ill_formed: [&[u8]; 8] = [
        b"\x80",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xe2\x82x",
        b"\xf0\x9f\x98",
    ];
    for bad in ill_formed {
        for at in [0, 13, 31, 32, 63, 64, 1000] {
            let mut body = format!("{{\"a\":\"{}", "\u{e9}y".repeat(at / 3)).into_bytes();
            body.extend_from_slice(bad);
            body.extend_from_slice(format!("{}\"}}", "z".repeat(at)).as_bytes());
            assert!(std::str::from_utf8(&body).is_err(), "{bad:?}");
            assert!(
                matches!(
                    pin(&Bytes::from(body), &["model"], &members),
                    Err(BodyProblem::NotJson)
                ),
                "{bad:?} at {at}"
            );
        }
    }
    // The same places hold well-formed text of each length: the check refuses nothing valid.
    for good in [
        "\u{7f}",
        "\u{80}",
        "\u{7ff}",
        "\u{800}",
        "\u{ffff}",
        "\u{10000}",
        "\u{10ffff}",
    ] {
        for at in [0, 13, 31, 32, 63, 64, 1000] {
            let input = format!(
                "{{\"a\":\"{}{good}{}\"}}",
                "\u{e9}y".repeat(at / 3),
                "z".repeat(at)
            );
            assert!(pin_str(&input).is_ok(), "{good:?} at {at}");
        }
    }
}

#[test]
fn refuses_other_top_level_types() {
    for input in [
        "[]",
        r#"[{"model":"x"}]"#,
        "1",
        r#""model""#,
        "null",
        " true ",
    ] {
        assert_eq!(pin_str(input), Err(BodyProblem::NotObject), "{input:?}");
    }
}

#[test]
fn depth_is_bounded_without_recursion() {
    let ok = format!("{{\"a\":{}1{}}}", "[".repeat(127), "]".repeat(127));
    assert!(pin_str(&ok).is_ok());
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(128), "]".repeat(128));
    assert_eq!(pin_str(&deep), Err(BodyProblem::TooDeep));
    let huge = "[".repeat(1_000_000);
    assert!(pin_str(&huge).is_err());
}

#[test]
fn stream_flag_follows_the_last_member() {
    let members = Bytes::from_static(PINNED.as_bytes());
    let p = |s: &'static str| pin(&Bytes::from_static(s.as_bytes()), &["model"], &members);
    assert!(p(r#"{"stream":true}"#).unwrap().stream);
    assert!(!p(r#"{"stream":false}"#).unwrap().stream);
    assert!(!p(r#"{"stream":true,"stream":false}"#).unwrap().stream);
    assert!(!p(r#"{"a":{"stream":true}}"#).unwrap().stream);
}

#[test]
fn streamed_requests_ask_the_backend_for_usage() {
    let cases = [
        (
            r#"{"stream":true,"messages":[]}"#,
            r#"{"model":"tenant-a","stream_options":{"include_usage":true},"stream":true,"messages":[]}"#,
            true,
        ),
        (
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"tenant-a","stream":true,"stream_options":{"include_usage":true}}"#,
            false,
        ),
        (
            r#"{"stream_options":{"include_usage":false,"x":1},"stream":true}"#,
            r#"{"model":"tenant-a","stream_options":{"include_usage":true,"x":1},"stream":true}"#,
            true,
        ),
        (
            r#"{"stream_options":null,"stream":true,"stream_options":{}}"#,
            r#"{"model":"tenant-a","stream":true,"stream_options":{"include_usage":true}}"#,
            true,
        ),
        (
            r#"{"stream":true,"stream_options":null}"#,
            r#"{"model":"tenant-a","stream_options":{"include_usage":true},"stream":true}"#,
            true,
        ),
        (
            r#"{"stream":false,"stream_options":{"include_usage":false}}"#,
            r#"{"model":"tenant-a","stream":false,"stream_options":{"include_usage":false}}"#,
            false,
        ),
    ];
    let members = Bytes::from_static(PINNED.as_bytes());
    for (input, expected, strip) in cases {
        let p = pin(&Bytes::from_static(input.as_bytes()), &["model"], &members).unwrap();
        assert_eq!(String::from_utf8(p.to_vec()).unwrap(), expected, "{input}");
        assert_eq!(p.strip_usage, strip, "{input}");
    }
}

#[test]
fn output_shares_the_client_buffer() {
    let body = Bytes::from(format!(
        r#"{{"messages":"{}","model":"x"}}"#,
        "a".repeat(4096)
    ));
    let members = Bytes::from_static(PINNED.as_bytes());
    let p = pin(&body, &["model"], &members).unwrap();
    let big = p.chunks.iter().max_by_key(|c| c.len()).unwrap();
    // A slice of the same allocation, not a copy.
    let start = big.as_ptr() as usize;
    let base = body.as_ptr() as usize;
    assert!(start >= base && start + big.len() <= base + body.len());
    assert_eq!(p.len, p.to_vec().len());
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
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
    fn ws(&mut self) -> &'static str {
        ["", "", "", " ", "\n", "\t", " \r\n "][self.below(7) as usize]
    }
    fn key(&mut self) -> String {
        self.pick(&[
            r#""model""#,
            r#""model""#,
            r#""m\u006fdel""#,
            r#""\u006d\u006f\u0064\u0065\u006c""#,
            r#""mod\u0065l""#,
            r#""model\/""#,
            r#""models""#,
            r#""messages""#,
            r#""stream""#,
            r#""temperature""#,
            r#""\u00e9""#,
            r#""\ud83d\ude00""#,
            r#""""#,
            r#""a\"b""#,
            r#""mo\\del""#,
            r#""Model""#,
            r#""stream_options""#,
            r#""stream_options""#,
            r#""include_usage""#,
            r#""include_\u0075sage""#,
        ])
        .to_owned()
    }
    fn value(&mut self, depth: u32) -> String {
        let kind = if depth > 3 {
            self.below(6)
        } else {
            self.below(8)
        };
        match kind {
            0 => self
                .pick(&[
                    r#""gpt-4""#,
                    r#""""#,
                    r#""\"model\":\"x\"""#,
                    r#""\u0000""#,
                    r#""é€😀""#,
                ])
                .to_owned(),
            1 => self
                .pick(&[
                    "0",
                    "-1",
                    "1.5e10",
                    "-0.0",
                    "123456789012345678901234567890",
                ])
                .to_owned(),
            2 => self.pick(&["true", "true", "false", "null"]).to_owned(),
            3 => r#""line\nbreak\ttab\\slash\/""#.to_owned(),
            4 => self.pick(&[r#""model""#, r#""}""#, r#""{""#]).to_owned(),
            5 => "[]".to_owned(),
            6 => {
                let n = self.below(4);
                let items: Vec<String> = (0..n).map(|_| self.value(depth + 1)).collect();
                format!("[{}]", items.join(","))
            }
            _ => self.object(depth + 1),
        }
    }
    fn object(&mut self, depth: u32) -> String {
        let n = self.below(6);
        let mut out = String::from("{");
        out.push_str(self.ws());
        for i in 0..n {
            if i > 0 {
                out.push_str(self.ws());
                out.push(',');
                out.push_str(self.ws());
            }
            out.push_str(&self.key());
            out.push_str(self.ws());
            out.push(':');
            out.push_str(self.ws());
            out.push_str(&self.value(depth));
        }
        out.push_str(self.ws());
        out.push('}');
        out
    }
    /// Damages a document the way an attacker or a broken client would.
    fn mutate(&mut self, doc: &str) -> Vec<u8> {
        let mut b = doc.as_bytes().to_vec();
        let tokens: [&[u8]; 10] = [
            b",",
            b"}",
            b"{",
            b"\"",
            b"\\",
            b":",
            b"\x00",
            b"\xff",
            b"]",
            b"\"model\":1,",
        ];
        for _ in 0..=self.below(3) {
            let at = self.below(b.len() as u64 + 1) as usize;
            match self.below(3) {
                0 if at < b.len() => {
                    b.remove(at);
                }
                _ => {
                    let t = tokens[self.below(tokens.len() as u64) as usize];
                    b.splice(at..at, t.iter().copied());
                }
            }
        }
        b
    }
}

#[test]
fn differential_against_serde_json() {
    let members_bytes = Bytes::from_static(PINNED.as_bytes());
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let (mut accepted, mut refused, mut mutated) = (0, 0, 0);
    let (mut streamed, mut asked_usage) = (0, 0);
    for round in 0..20_000 {
        let mut doc = g.object(0);
        if round % 4 == 1 {
            // A streamed request, so the usage rewrite is exercised as often as pinning.
            let rest = &doc[1..];
            let sep = if rest.trim_start().starts_with('}') {
                ""
            } else {
                ","
            };
            let asks = if round % 8 == 1 {
                r#","stream_options":{"x":[1],"include_usage":true}"#
            } else {
                ""
            };
            doc = format!("{{\"stream\":true{asks}{sep}{rest}");
        }
        let input: Vec<u8> = if round % 3 == 0 {
            mutated += 1;
            g.mutate(&doc)
        } else {
            doc.into_bytes()
        };
        let serde_ok = serde_json::from_slice::<serde_json::Value>(&input)
            .map(|v| v.is_object())
            .unwrap_or(false);
        match pin(&Bytes::from(input.clone()), &["model"], &members_bytes) {
            Ok(p) => {
                accepted += 1;
                assert!(serde_ok, "accepted what serde_json refuses: {input:?}");
                let text = String::from_utf8(p.to_vec()).unwrap();
                match assert_pinned(std::str::from_utf8(&input).unwrap(), &text) {
                    Some(asked) => {
                        streamed += 1;
                        asked_usage += usize::from(asked);
                        assert_eq!(p.strip_usage, !asked, "{text}");
                    }
                    None => assert!(!p.strip_usage),
                }
            }
            Err(problem) => {
                refused += 1;
                if serde_ok {
                    // The only valid objects refused are the ambiguous ones.
                    assert_eq!(problem, BodyProblem::AmbiguousMember, "{input:?}");
                    let text = std::str::from_utf8(&input).unwrap();
                    assert!(
                        members(text)
                            .iter()
                            .any(|(k, _)| k != "model" && k.eq_ignore_ascii_case("model")),
                        "refused a valid body: {text:?}"
                    );
                }
            }
        }
    }
    // The generator must exercise both sides, or this test proves nothing.
    assert!(accepted > 5_000, "accepted {accepted}");
    assert!(refused > 1_000, "refused {refused}");
    assert!(mutated > 5_000);
    assert!(streamed > 1_000, "streamed {streamed}");
    assert!(asked_usage > 20, "asked {asked_usage}");
}
