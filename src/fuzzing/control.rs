//! Control-plane input: snapshots, events, and the pull SSE parser that carries them.
//!
//! Input: one selector byte. Bit 0 clear: the rest is a snapshot document. Bit 0 set: eight
//! seed bytes for the cuts, then an event stream, parsed with an event size limit taken from
//! the selector's other bits; every event's data is applied as an event, or as a snapshot when
//! it is not an event.
//!
//! Checked: the SSE parser reports the same parts whatever the cuts, and (when nothing was over
//! the limit) what a whole-buffer reading of the WHATWG rules gives; a repeated event changes
//! nothing; the registry's revision is the highest one applied; every object of the state is
//! found by its slug or hash, and every slug or hash the input named finds only such objects;
//! the exported state applies to an empty registry as itself.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;

use super::{Outcome, ensure, splits};
use crate::auth::KeyHash;
use crate::config::Config;
use crate::host::Slug;
use crate::proxy::pool::Pools;
use crate::registry::{Applied, Event, Registry, walk};
use crate::sync::pull::sse::{EventPart, SseParser};

/// Pools of every flavour, so deployments resolve to each.
const POOLS: &str = r#"
[[pools]]
name = "openai"
base_models = ["demo/echo", "meta-llama/Llama-2-7b-hf"]
endpoints = ["builtin:echo"]

[[pools]]
name = "sglang"
base_models = ["sg/base"]
endpoints = ["http://127.0.0.1:9"]
flavor = "sglang"

[[pools]]
name = "llama"
base_models = ["llama/base"]
endpoints = ["http://127.0.0.1:9"]
flavor = "llamacpp"
adapters = { "job-a" = 0, "job-b:step-5" = 1 }
"#;

fn pools() -> Result<Arc<Pools>, String> {
    static POOLS_ONCE: OnceLock<Result<Arc<Pools>, String>> = OnceLock::new();
    POOLS_ONCE
        .get_or_init(|| {
            let config = Config::from_toml(POOLS, PathBuf::from("/nonexistent"))
                .map_err(|e| e.to_string())?;
            Pools::from_config(&config.pools, Duration::from_secs(1), 1).map(Arc::new)
        })
        .clone()
}

/// One part the SSE parser reported, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Data(Vec<u8>),
    Comment,
    Discarded,
}

/// Applies `data[1..]` as the selector says and checks the registry.
pub fn check(data: &[u8]) -> Outcome {
    let Some((&sel, rest)) = data.split_first() else {
        return Ok(());
    };
    let registry = Registry::new(pools()?);
    let mut seen = Seen::default();
    let mut highest = 0;
    if sel & 1 == 0 {
        apply_snapshot(&registry, rest, &mut seen, &mut highest)?;
    } else {
        let Some((seed, stream)) = rest.split_at_checked(8) else {
            return Ok(());
        };
        let max = 16 + usize::from(sel >> 1) * 64;
        for part in parse_stream(stream, seed, max)? {
            if let Part::Data(text) = part {
                apply_data(&registry, &text, &mut seen, &mut highest)?;
            }
        }
    }
    ensure!(
        registry.revision() == highest,
        "revision {} after applying up to {highest}",
        registry.revision()
    );
    check_indexes(&registry, &seen)?;
    round_trip(&registry)
}

/// Parses the stream under every split; all must agree, and with the reference when no event
/// was over the limit.
fn parse_stream(stream: &[u8], seed: &[u8], max: usize) -> Result<Vec<Part>, String> {
    let mut results = Vec::new();
    for pieces in splits(stream, seed) {
        let mut parser = SseParser::new(max);
        let mut parts = Vec::new();
        for p in pieces {
            parser.feed(p, |e| {
                parts.push(match e {
                    EventPart::Data(d) => Part::Data(d.to_vec()),
                    EventPart::Comment => Part::Comment,
                    EventPart::Discarded => Part::Discarded,
                })
            });
        }
        results.push(parts);
    }
    let whole = results.swap_remove(0);
    for r in &results {
        ensure!(
            *r == whole,
            "SSE parts depend on the cuts: {r:?} vs {whole:?}"
        );
    }
    for p in &whole {
        if let Part::Data(d) = p {
            ensure!(
                d.len() <= max,
                "an event of {} bytes passed the {max} limit",
                d.len()
            );
        }
    }
    if !whole.contains(&Part::Discarded) {
        let want = reference_sse(stream);
        ensure!(
            whole == want,
            "SSE parts {whole:?}, the WHATWG reading gives {want:?}"
        );
    }
    Ok(whole)
}

/// The WHATWG event-stream rules over the whole buffer: a leading BOM is skipped, lines end in
/// CRLF, LF or CR, `:` lines are comments, `data` values are joined with LF, a blank line
/// dispatches an event that had data; an unterminated last event is not dispatched.
fn reference_sse(stream: &[u8]) -> Vec<Part> {
    let body = stream.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(stream);
    let mut out = Vec::new();
    let mut data: Option<Vec<u8>> = None;
    let mut at = 0;
    while let Some(n) = body[at..].iter().position(|b| *b == b'\n' || *b == b'\r') {
        let end = at + n;
        let line = &body[at..end];
        at = end + 1;
        if body[end] == b'\r' && body.get(at) == Some(&b'\n') {
            at += 1;
        }
        if line.is_empty() {
            if let Some(d) = data.take() {
                out.push(Part::Data(d));
            }
        } else if line[0] == b':' {
            out.push(Part::Comment);
        } else {
            super::sse_data_line(line, &mut data);
        }
    }
    out
}

/// Slugs and key hashes the input named anywhere.
#[derive(Default)]
struct Seen {
    slugs: HashSet<String>,
    hashes: HashSet<String>,
}

impl Seen {
    fn collect(&mut self, text: &[u8]) {
        if let Ok(v) = serde_json::from_slice::<Value>(text) {
            self.walk(&v);
        }
    }

    fn walk(&mut self, v: &Value) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("slug", Value::String(s)) => {
                            self.slugs.insert(s.clone());
                        }
                        ("sha256", Value::String(s)) => {
                            self.hashes.insert(s.clone());
                        }
                        _ => self.walk(v),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| self.walk(v)),
            _ => {}
        }
    }
}

fn apply_snapshot(r: &Registry, text: &[u8], seen: &mut Seen, highest: &mut u64) -> Outcome {
    seen.collect(text);
    walk_agrees(text)?;
    if let Ok(report) = r.apply_snapshot(text) {
        *highest = (*highest).max(report.revision);
    }
    Ok(())
}

/// What serde's derive reads from a snapshot document (the form the edge parsed it in before
/// the block-wise reader): its revision and the raw text of each element, `true` for a
/// deployment. The reference the reader is compared with, here and in its unit tests.
pub fn serde_snapshot(text: &[u8]) -> Result<(u64, Vec<(bool, String)>), String> {
    #[derive(serde::Deserialize)]
    struct Doc<'a> {
        revision: u64,
        #[serde(borrow, default)]
        deployments: Vec<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        keys: Vec<&'a serde_json::value::RawValue>,
    }
    let d: Doc<'_> = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let mut elements: Vec<(bool, String)> = d
        .deployments
        .iter()
        .map(|v| (true, v.get().to_owned()))
        .collect();
    elements.extend(d.keys.iter().map(|v| (false, v.get().to_owned())));
    Ok((d.revision, elements))
}

/// The block-wise snapshot reader, at a block size picked from the text, must accept exactly
/// the documents serde's derive accepts, and find the same revision and elements.
fn walk_agrees(text: &[u8]) -> Outcome {
    // serde's derive also reads a struct from an array (`[revision, deployments, keys]`); a
    // snapshot is an object (SPEC §4), and the reader refuses anything else.
    let is_object = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let serde = serde_snapshot(text);
    let reference = serde.as_ref().ok().filter(|_| is_object);
    let block = 1 + text
        .iter()
        .fold(0usize, |a, &b| a.wrapping_add(usize::from(b)))
        % 97;
    let mut elements = Vec::new();
    let walked = walk::walk(text, block, &mut |e: walk::Element<'_>| {
        elements.push(match e {
            walk::Element::Deployment(v) => (true, String::from_utf8_lossy(v).into_owned()),
            walk::Element::Key(v) => (false, String::from_utf8_lossy(v).into_owned()),
        })
    });
    match (walked, reference) {
        (Ok(outline), Some((revision, want))) => {
            ensure!(
                outline.revision == *revision && elements == *want,
                "the snapshot reader (block {block}) read {} elements at revision {}, serde {} at {revision}",
                elements.len(),
                outline.revision,
                want.len()
            );
        }
        (Err(_), None) => {}
        (Ok(_), None) if !is_object => {
            return Err(format!(
                "the snapshot reader accepted a document that is not an object: {:?}",
                String::from_utf8_lossy(text)
            ));
        }
        (Ok(_), None) => {
            // serde's derive refuses a few things past the syntax the reader checks: nesting
            // deeper than 128 inside one element counts from the document's top for it.
            let why = serde.err().unwrap_or_default();
            ensure!(
                why.contains("recursion limit"),
                "the snapshot reader accepted a document serde refuses ({why}): {:?}",
                String::from_utf8_lossy(text)
            );
        }
        (Err(e), Some(_)) => {
            return Err(format!(
                "the snapshot reader refused a document serde accepts: {e}: {:?}",
                String::from_utf8_lossy(text)
            ));
        }
    }
    Ok(())
}

/// Applies one event (twice: the second time must change nothing), or a snapshot.
fn apply_data(r: &Registry, text: &[u8], seen: &mut Seen, highest: &mut u64) -> Outcome {
    let Ok(event) = serde_json::from_slice::<Event>(text) else {
        ensure!(
            matches!(r.apply_json_event(text), Applied::Rejected(_)),
            "an event that does not parse was applied"
        );
        return apply_snapshot(r, text, seen, highest);
    };
    seen.collect(text);
    let first = r.apply_json_event(text);
    if !matches!(first, Applied::Rejected(_)) {
        *highest = (*highest).max(event.revision);
    }
    let again = r.apply_json_event(text);
    ensure!(
        again != Applied::Changed,
        "applying {:?} twice changed the state twice ({first:?})",
        String::from_utf8_lossy(text)
    );
    Ok(())
}

/// The exported state: its objects, each with its id and slug or hash.
fn exported(r: &Registry) -> Result<(Vec<Value>, Vec<Value>), String> {
    let doc: Value = serde_json::from_slice(&r.export()).map_err(|e| format!("export: {e}"))?;
    let list = |name: &str| -> Result<Vec<Value>, String> {
        doc.get(name)
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| format!("export has no {name} array"))
    };
    Ok((list("deployments")?, list("keys")?))
}

fn text_of<'a>(v: &'a Value, field: &str) -> Result<&'a str, String> {
    v.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("exported object without {field}: {v}"))
}

/// Readers' indexes and the writer's state agree, in both directions.
fn check_indexes(r: &Registry, seen: &Seen) -> Outcome {
    let (deployments, keys) = exported(r)?;
    ensure!(
        r.counts() == (deployments.len(), keys.len()),
        "counts {:?}, export holds {} deployments and {} keys",
        r.counts(),
        deployments.len(),
        keys.len()
    );
    let mut by_slug = std::collections::HashMap::new();
    for d in &deployments {
        let (id, slug) = (text_of(d, "id")?, text_of(d, "slug")?);
        ensure!(
            by_slug.insert(slug, id).is_none(),
            "two deployments hold slug {slug}"
        );
        let found = Slug::parse(slug.as_bytes()).and_then(|s| r.deployment(&s));
        ensure!(
            found.as_ref().is_some_and(|f| &*f.id == id),
            "deployment {id} is not found at its slug {slug} ({found:?})"
        );
    }
    let mut by_hash = std::collections::HashMap::new();
    for k in &keys {
        let (id, hash) = (text_of(k, "id")?, text_of(k, "sha256")?);
        ensure!(
            by_hash.insert(hash, id).is_none(),
            "two keys hold hash {hash}"
        );
        let found = KeyHash::from_hex(hash).and_then(|h| r.key(&h));
        ensure!(
            found.as_ref().is_some_and(|f| &*f.id == id),
            "key {id} is not found by its hash ({found:?})"
        );
    }
    for slug in &seen.slugs {
        if let Some(d) = Slug::parse(slug.as_bytes()).and_then(|s| r.deployment(&s)) {
            ensure!(
                by_slug.get(d.slug.as_str()) == Some(&&*d.id),
                "slug {slug} finds deployment {}, which the state does not hold there",
                d.id
            );
        }
    }
    for hash in &seen.hashes {
        if let Some(k) = KeyHash::from_hex(hash).and_then(|h| r.key(&h)) {
            ensure!(
                by_hash.get(k.hash.to_hex().as_str()) == Some(&&*k.id),
                "hash {hash} finds key {}, which the state does not hold",
                k.id
            );
        }
    }
    Ok(())
}

/// The export, applied to an empty registry, gives the same state.
fn round_trip(r: &Registry) -> Outcome {
    let copy = Registry::new(pools()?);
    let report = copy.apply_snapshot(&r.export())?;
    ensure!(
        report.rejected.is_empty(),
        "the exported state does not apply: {:?}",
        report.rejected
    );
    let sorted = |r: &Registry| -> Result<(Vec<String>, Vec<String>), String> {
        let (d, k) = exported(r)?;
        let mut d: Vec<String> = d.iter().map(Value::to_string).collect();
        let mut k: Vec<String> = k.iter().map(Value::to_string).collect();
        d.sort();
        k.sort();
        Ok((d, k))
    };
    ensure!(
        sorted(r)? == sorted(&copy)?,
        "the exported state does not round-trip"
    );
    ensure!(
        copy.revision() == r.revision(),
        "the exported revision does not round-trip"
    );
    Ok(())
}
