//! The usage scanners over a response cut at arbitrary points: the same usage (and, for an
//! event stream, the same bytes forwarded) whatever the cuts, equal to a whole-buffer parse
//! with serde_json wherever serde_json can read the body.
//!
//! Input: one selector byte (bit 0: an event stream rather than one JSON document; bit 1: cut
//! the usage-only chunk), eight seed bytes for the cuts, then the body.

use bytes::Bytes;
use serde_json::Value;

use super::{Outcome, ensure, splits};
use crate::usage::scan::{JsonUsageScan, MAX_HELD_EVENT, SseUsageScan, Usage};

/// Bytes before the body: selector and seed.
const HEADER: usize = 9;

/// Scans `data[9..]` as the selector says, under every split, and checks the results.
pub fn check(data: &[u8]) -> Outcome {
    let Some((header, body)) = data.split_at_checked(HEADER) else {
        return Ok(());
    };
    // A held event past this size is released uncut, which depends on the cuts by design.
    if body.len() >= MAX_HELD_EVENT {
        return Ok(());
    }
    let (sel, seed) = (header[0], &header[1..]);
    if sel & 1 == 0 {
        check_json(body, seed)
    } else {
        check_sse(body, seed, sel & 2 != 0)
    }
}

fn check_json(body: &[u8], seed: &[u8]) -> Outcome {
    let mut results = Vec::new();
    for pieces in splits(body, seed) {
        let mut scan = JsonUsageScan::new();
        for p in &pieces {
            scan.feed(p);
        }
        results.push(scan.usage());
    }
    let whole = results[0];
    ensure!(
        results.iter().all(|u| *u == whole),
        "usage depends on the cuts: {results:?}"
    );
    if let Ok(doc) = serde_json::from_slice::<Value>(body) {
        let want = usage_of(&doc);
        ensure!(
            whole == want,
            "scanned usage {whole:?}, serde_json reads {want:?}"
        );
    }
    Ok(())
}

/// The usage serde_json reads: the top-level `usage` object's integer counts (0 when missing
/// or not an unsigned integer), `None` for anything else.
fn usage_of(doc: &Value) -> Option<Usage> {
    let usage = doc.as_object()?.get("usage")?.as_object()?;
    let count = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
    })
}

fn check_sse(body: &[u8], seed: &[u8], strip: bool) -> Outcome {
    let mut results = Vec::new();
    for pieces in splits(body, seed) {
        let mut scan = SseUsageScan::new(strip);
        let mut forwarded = Vec::new();
        for p in &pieces {
            for part in scan.feed(Bytes::copy_from_slice(p)) {
                ensure!(!part.is_empty(), "an empty part was forwarded");
                forwarded.extend_from_slice(&part);
            }
        }
        forwarded.extend(scan.finish().flat_map(|p| p.to_vec()));
        results.push((scan.usage(), forwarded));
    }
    let (usage, forwarded) = &results[0];
    for (u, f) in &results[1..] {
        ensure!(u == usage, "usage depends on the cuts: {u:?} vs {usage:?}");
        ensure!(
            f == forwarded,
            "forwarded bytes depend on the cuts:\n{:?}\nvs whole\n{:?}",
            String::from_utf8_lossy(f),
            String::from_utf8_lossy(forwarded)
        );
    }
    if !strip {
        ensure!(forwarded == body, "a stream not stripped was changed");
    }
    let events = reference_events(body);
    let parsed: Option<Vec<Value>> = events
        .iter()
        .filter_map(|e| e.data.as_ref())
        .map(|d| serde_json::from_slice(d).ok())
        .collect();
    let Some(parsed) = parsed else {
        // Some event's data is not JSON: the scanner does not validate, nothing to compare.
        return Ok(());
    };
    let want = parsed.iter().filter_map(usage_of).next_back();
    ensure!(
        *usage == want,
        "scanned usage {usage:?}, serde_json over the events reads {want:?}"
    );
    if strip {
        let mut kept = Vec::new();
        let mut docs = parsed.iter();
        for e in &events {
            let cut = match &e.data {
                Some(_) => docs.next().is_some_and(usage_only),
                None => false,
            };
            if !cut {
                kept.extend_from_slice(&body[e.range.clone()]);
            }
        }
        ensure!(
            *forwarded == kept,
            "forwarded {:?}\nexpected (usage-only events cut) {:?}",
            String::from_utf8_lossy(forwarded),
            String::from_utf8_lossy(&kept)
        );
    }
    Ok(())
}

/// A usage-only chunk: top-level `choices` is an empty array and `usage` an object.
fn usage_only(doc: &Value) -> bool {
    let Some(o) = doc.as_object() else {
        return false;
    };
    o.get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && o.get("usage").is_some_and(Value::is_object)
}

/// One event of the reference reading: its bytes (with its blank line) and, when it has data
/// lines and was dispatched, its data.
struct RefEvent {
    range: std::ops::Range<usize>,
    data: Option<Vec<u8>>,
}

/// The WHATWG event-stream rules over the whole buffer: lines end in CRLF, LF or CR; `data`
/// lines (`data`, `data:value`, `data: value`) are joined with LF; a blank line dispatches. A
/// last, unterminated event is not dispatched (its range is still returned).
fn reference_events(body: &[u8]) -> Vec<RefEvent> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut at = 0;
    let mut data: Option<Vec<u8>> = None;
    while at < body.len() {
        let end = body[at..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
            .map(|n| at + n);
        let Some(end) = end else { break };
        let line = &body[at..end];
        let mut next = end + 1;
        if body[end] == b'\r' && body.get(next) == Some(&b'\n') {
            next += 1;
        }
        if line.is_empty() {
            events.push(RefEvent {
                range: start..next,
                data: data.take(),
            });
            start = next;
        } else {
            super::sse_data_line(line, &mut data);
        }
        at = next;
    }
    if start < body.len() {
        events.push(RefEvent {
            range: start..body.len(),
            data: None,
        });
    }
    events
}
