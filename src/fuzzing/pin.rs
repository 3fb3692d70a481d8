//! Model pinning, differentially: whatever the body, the pinned output either is refused (400)
//! or reads — with serde_json and with the duplicate-aware [`json_reader`] — as exactly the
//! client's members minus every owned one, plus the edge's members (`model`, and `lora` on
//! llama.cpp) and, for a stream, the edge's `stream_options.include_usage`.
//!
//! Input: one selector byte (flavour, target, adapter or not), then the body.
//!
//! Refusals of a body that serde_json reads as an object are counted by reason
//! ([`serde_accepted_refusals`]); each must have an explanation in the pinner's rules (a
//! case-variant or NUL-suffixed owned key, too many owned members, the depth bound, a number
//! serde_json cannot hold), otherwise the check fails.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::{Map, Value};

use super::json_reader::{self, Kind, Member, Node};
use super::{Outcome, ensure};
use crate::error::BodyProblem;
use crate::proxy::pin::{MAX_OWNED_OCCURRENCES, pin};
use crate::proxy::pool::{Flavor, render_members};

/// Target ids the selector picks from: adapters in the llama.cpp map, and names that need
/// escaping or are not ASCII.
const TARGETS: [&str; 4] = [
    "job-a",
    "job-b:step-5",
    "meta/llama \"q\"\\",
    "modèle/ü\u{1F600}",
];
const FLAVORS: [Flavor; 4] = [
    Flavor::OpenAi,
    Flavor::Vllm,
    Flavor::Sglang,
    Flavor::LlamaCpp,
];

/// Why a body serde_json reads as an object was refused, as counted.
const REASONS: [&str; 8] = [
    "case-variant owned key",
    "NUL-suffixed owned key",
    "more than 64 owned members",
    "ambiguous include_usage in stream_options",
    "nested deeper than 128",
    "other",
    "accepted; serde_json refuses (number out of range)",
    "accepted and checked",
];
static COUNTS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// How many bodies serde_json accepts as an object were refused by the pinner, by reason
/// (then how many the pinner accepted that serde_json refused, and how many pinned bodies
/// passed every check), since the process began.
pub fn serde_accepted_refusals() -> Vec<(&'static str, u64)> {
    REASONS
        .iter()
        .zip(&COUNTS)
        .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
        .collect()
}

fn count(reason: usize) {
    if let Some(c) = COUNTS.get(reason) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The llama.cpp adapter map every pool of the check uses.
fn adapters() -> BTreeMap<String, u32> {
    BTreeMap::from([("job-a".to_owned(), 0), ("job-b:step-5".to_owned(), 1)])
}

/// Pins `data[1..]` as the pool picked by `data[0]` would, and checks the result.
pub fn check(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return Ok(());
    };
    let flavor = FLAVORS[usize::from(sel & 3)];
    let target = TARGETS[usize::from((sel >> 2) & 3)];
    let Ok(members) = render_members(flavor, &adapters(), target, "base/model", sel & 0x10 != 0)
    else {
        return Ok(());
    };
    let owned = flavor.owned_members();
    let body = Bytes::copy_from_slice(body);
    let reader_in = json_reader::parse(&body);
    let serde_in = serde_json::from_slice::<Value>(&body);
    let pinned = match pin(&body, owned, &members) {
        Ok(p) => p,
        Err(problem) => return refused(problem, owned, &reader_in, &serde_in),
    };
    let Ok(Node {
        kind: Kind::Object(input),
        ..
    }) = reader_in
    else {
        return Err(format!(
            "pinned a body the strict reader refuses: {reader_in:?}"
        ));
    };
    let out = pinned.to_vec();
    ensure!(
        pinned.len == out.len(),
        "Pinned::len is not the body's length"
    );
    let text = String::from_utf8_lossy(&out);
    let output = match json_reader::parse(&out) {
        Ok(Node {
            kind: Kind::Object(m),
            ..
        }) => m,
        other => {
            return Err(format!(
                "pinned body {text:?} does not read as an object: {other:?}"
            ));
        }
    };
    let head = format!("{{{}}}", String::from_utf8_lossy(&members));
    let Ok(Node {
        kind: Kind::Object(edge),
        ..
    }) = json_reader::parse(head.as_bytes())
    else {
        return Err(format!("the edge's members {head:?} do not read"));
    };
    let want = expected(&body, &input, owned, head.as_bytes(), &edge);
    ensure!(
        same_members(&want, &out, &output),
        "pinned body {text:?}\nexpected members {:?}",
        want.iter()
            .map(|(k, v)| (String::from_utf16_lossy(&to_u16(k)), v))
            .collect::<Vec<_>>()
    );
    ensure!(
        pinned.stream == want_stream(&body, &input),
        "Pinned::stream is {} for {text:?}",
        pinned.stream
    );
    let strip = want_strip(&body, &input, owned);
    ensure!(
        pinned.strip_usage == strip,
        "Pinned::strip_usage is {}, expected {strip}",
        pinned.strip_usage
    );
    match serde_in {
        Ok(Value::Object(map)) => serde_check(map, owned, &head, &out)?,
        Ok(other) => {
            return Err(format!(
                "serde_json reads {other} where the pinner saw an object"
            ));
        }
        // serde_json cannot hold some valid numbers (1e400): nothing to compare with.
        Err(_) => count(6),
    }
    // The output is itself a body the edge would accept.
    let again = pin(&Bytes::copy_from_slice(&out), owned, &members);
    ensure!(
        again.is_ok(),
        "the pinned body {text:?} is refused when pinned again: {again:?}"
    );
    count(7);
    Ok(())
}

/// A refusal: allowed, but a body serde_json reads as an object needs an explanation.
fn refused(
    problem: BodyProblem,
    owned: &[&str],
    reader_in: &Result<Node, String>,
    serde_in: &Result<Value, serde_json::Error>,
) -> Outcome {
    if !matches!(serde_in, Ok(Value::Object(_))) {
        return Ok(());
    }
    let members = match reader_in {
        Ok(Node {
            kind: Kind::Object(m),
            ..
        }) => m,
        _ => {
            return Err(format!(
                "serde_json reads an object the strict reader refuses: {reader_in:?}"
            ));
        }
    };
    let reason = match problem {
        BodyProblem::NotJson | BodyProblem::NotObject => None,
        BodyProblem::TooDeep => Some(4),
        BodyProblem::AmbiguousMember => ambiguity(members, owned),
    };
    match reason {
        Some(r) => {
            count(r);
            Ok(())
        }
        None => Err(format!(
            "refused with {problem:?} a body serde_json and the strict reader read as an object"
        )),
    }
}

/// Which of the pinner's rules makes these members ambiguous, if any.
fn ambiguity(members: &[Member], owned: &[&str]) -> Option<usize> {
    if members
        .iter()
        .any(|m| owned.iter().any(|n| folds_to(&m.key, n) && !m.is(n)))
    {
        return Some(0);
    }
    if members
        .iter()
        .any(|m| owned.iter().any(|n| nul_suffixed(&m.key, n)))
    {
        return Some(1);
    }
    let tracked = members
        .iter()
        .filter(|m| m.is("stream_options") || owned.iter().any(|n| m.is(n)))
        .count();
    if tracked > MAX_OWNED_OCCURRENCES {
        return Some(2);
    }
    let options = members.iter().rev().find(|m| m.is("stream_options"));
    if let Some(Kind::Object(inner)) = options.map(|m| &m.value.kind) {
        if inner.iter().any(|m| {
            (folds_to(&m.key, "include_usage") && !m.is("include_usage"))
                || nul_suffixed(&m.key, "include_usage")
        }) {
            return Some(3);
        }
    }
    None
}

/// The key equals `name` ignoring ASCII case.
fn folds_to(key: &[u32], name: &str) -> bool {
    key.len() == name.len()
        && key.iter().zip(name.bytes()).all(|(&c, n)| {
            u8::try_from(c).is_ok_and(|c| c.is_ascii() && c.eq_ignore_ascii_case(&n))
        })
}

/// The key up to its first NUL equals `name` ignoring ASCII case (a C string reads `name`).
fn nul_suffixed(key: &[u32], name: &str) -> bool {
    key.iter()
        .position(|&c| c == 0)
        .is_some_and(|nul| folds_to(&key[..nul], name))
}

/// A member of the expected output: its key and its value's bytes, or (for the rewritten
/// `stream_options`) the inner members' keys and value bytes.
#[derive(Debug)]
enum Want<'a> {
    Raw(&'a [u8]),
    Object(Vec<(Vec<u32>, &'a [u8])>),
}

fn key_of(name: &str) -> Vec<u32> {
    name.chars().map(u32::from).collect()
}

fn to_u16(key: &[u32]) -> Vec<u16> {
    key.iter()
        .flat_map(|&c| match char::from_u32(c) {
            Some(ch) => {
                let mut buf = [0u16; 2];
                ch.encode_utf16(&mut buf).to_vec()
            }
            None => vec![u16::try_from(c).unwrap_or(0xFFFD)],
        })
        .collect()
}

/// The (last) top-level `stream` is `true`.
fn want_stream(body: &[u8], input: &[Member]) -> bool {
    input
        .iter()
        .rev()
        .find(|m| m.is("stream"))
        .is_some_and(|m| &body[m.value.raw.clone()] == b"true")
}

/// The edge asked for usage and the client did not.
fn want_strip(body: &[u8], input: &[Member], owned: &[&str]) -> bool {
    if !want_stream(body, input) {
        return false;
    }
    let last = input
        .iter()
        .filter(|m| !owned.iter().any(|n| m.is(n)))
        .rfind(|m| m.is("stream_options"));
    match last.map(|m| &m.value.kind) {
        Some(Kind::Object(inner)) => inner
            .iter()
            .rfind(|m| m.is("include_usage"))
            .is_none_or(|m| &body[m.value.raw.clone()] != b"true"),
        _ => true,
    }
}

/// The members the output must have, in order: the edge's, then (for a stream without a
/// client `stream_options` object) the edge's `stream_options`, then the client's members that
/// are not owned, with `stream_options` rewritten for a stream.
fn expected<'a>(
    body: &'a [u8],
    input: &'a [Member],
    owned: &[&str],
    head: &'a [u8],
    edge: &'a [Member],
) -> Vec<(Vec<u32>, Want<'a>)> {
    let mut out: Vec<(Vec<u32>, Want<'a>)> = edge
        .iter()
        .map(|m| (m.key.clone(), Want::Raw(&head[m.value.raw.clone()])))
        .collect();
    let kept: Vec<&Member> = input
        .iter()
        .filter(|m| !owned.iter().any(|n| m.is(n)))
        .collect();
    let stream = want_stream(body, input);
    let last_options = kept.iter().rposition(|m| m.is("stream_options"));
    let rewrite = last_options.filter(|&i| matches!(kept[i].value.kind, Kind::Object(_)));
    if stream && rewrite.is_none() {
        let usage = vec![(key_of("include_usage"), &b"true"[..])];
        out.push((key_of("stream_options"), Want::Object(usage)));
    }
    for (i, m) in kept.iter().enumerate() {
        if stream && m.is("stream_options") {
            if Some(i) != rewrite {
                continue;
            }
            let mut inner = vec![(key_of("include_usage"), &b"true"[..])];
            if let Kind::Object(members) = &m.value.kind {
                inner.extend(
                    members
                        .iter()
                        .filter(|m| !m.is("include_usage"))
                        .map(|m| (m.key.clone(), &body[m.value.raw.clone()])),
                );
            }
            out.push((m.key.clone(), Want::Object(inner)));
        } else {
            out.push((m.key.clone(), Want::Raw(&body[m.value.raw.clone()])));
        }
    }
    out
}

fn same_members(want: &[(Vec<u32>, Want<'_>)], out: &[u8], got: &[Member]) -> bool {
    want.len() == got.len()
        && want.iter().zip(got).all(|((key, value), m)| {
            *key == m.key
                && match (value, &m.value.kind) {
                    (Want::Raw(raw), _) => *raw == &out[m.value.raw.clone()],
                    (Want::Object(inner), Kind::Object(members)) => {
                        inner.len() == members.len()
                            && inner.iter().zip(members).all(|((k, raw), m)| {
                                *k == m.key && *raw == &out[m.value.raw.clone()]
                            })
                    }
                    (Want::Object(_), _) => false,
                }
        })
}

/// serde_json's reading of the output (last duplicate wins) is its reading of the input with
/// the owned members replaced by the edge's.
fn serde_check(mut want: Map<String, Value>, owned: &[&str], head: &str, out: &[u8]) -> Outcome {
    for name in owned {
        want.remove(*name);
    }
    let edge: Map<String, Value> =
        serde_json::from_str(head).map_err(|e| format!("edge members {head:?}: {e}"))?;
    want.extend(edge);
    if want.get("stream") == Some(&Value::Bool(true)) {
        match want.get_mut("stream_options") {
            Some(Value::Object(o)) => {
                o.insert("include_usage".to_owned(), Value::Bool(true));
            }
            _ => {
                let usage = serde_json::json!({"include_usage": true});
                want.insert("stream_options".to_owned(), usage);
            }
        }
    }
    let got: Value = serde_json::from_slice(out)
        .map_err(|e| format!("serde_json refuses the pinned body: {e}"))?;
    ensure!(
        got == Value::Object(want.clone()),
        "serde_json reads the pinned body as {got}\nexpected {}",
        Value::Object(want)
    );
    Ok(())
}
