//! Model pinning: the body a backend receives names exactly the deployment's model.
//!
//! This is a security boundary. Many tenants' adapters share one backend, and the backend reads
//! the body with its own JSON parser, so the edge must leave no room for two parsers to disagree:
//!
//! * the whole body must be one strictly valid JSON document (RFC 8259: UTF-8, no BOM, no comments,
//!   no trailing commas, no `NaN`, no lone surrogates, no trailing data) whose top level is an
//!   object; anything else is refused with 400, so a lenient backend parser never sees input this
//!   scanner read differently;
//! * every top-level member whose key *decodes* to an owned name (`"model"`, `"m\u006fdel"`, each
//!   duplicate) is cut out, whatever its value type, and the edge's own member is inserted first;
//! * a key that matches an owned name only case-insensitively (`"Model"`, read as `model` by
//!   case-insensitive parsers) or only up to an escaped NUL (`"model\u0000"`, read as `model` by
//!   C-string parsers) is refused rather than guessed about.
//!
//! The output is a list of [`Bytes`] slices of the client's body around the cuts, plus the
//! pre-rendered owned members: no tree, no re-serialisation, no copy of the client's bytes.

use bytes::Bytes;
use smallvec::SmallVec;

use crate::error::BodyProblem;

mod scanner;

use scanner::{Scanner, hex4};

/// Deepest nesting accepted (serde_json's default recursion limit is 128 too).
pub const MAX_DEPTH: usize = 128;
/// Body slices a [`Pinned`] holds without a heap allocation.
pub const INLINE_CHUNKS: usize = 12;
/// Most owned members one body may carry before it is refused as an attack.
pub const MAX_OWNED_OCCURRENCES: usize = 64;

/// A pinned body, ready to send: slices of the client's bytes and the edge's members.
#[derive(Debug, Clone)]
pub struct Pinned {
    /// The body, in order. Concatenated, it is the pinned JSON document. Inline: a usual body
    /// is a handful of slices, so pinning allocates no list for them.
    pub chunks: SmallVec<[Bytes; INLINE_CHUNKS]>,
    /// Total length of `chunks`.
    pub len: usize,
    /// Whether the (last) top-level `stream` member is `true`.
    pub stream: bool,
    /// The edge asked the backend for `stream_options.include_usage` and the client did not:
    /// the usage-only final chunk must not reach the client.
    pub strip_usage: bool,
}

impl Pinned {
    /// The body as one buffer (copies; for in-process backends and tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

/// Pins `body`: removes every top-level member named in `owned` and inserts `members` (the
/// edge's rendered members, e.g. `"model":"acme"`, never empty) right after the opening brace.
///
/// When the body asks for a stream (`"stream": true`), the edge also makes sure the backend
/// reports usage: `stream_options.include_usage` is set to `true` (inside the client's last
/// `stream_options` object, whose other members are kept; earlier duplicates are cut), and
/// [`Pinned::strip_usage`] says whether the client did not ask for it itself.
pub fn pin(body: &Bytes, owned: &[&str], members: &Bytes) -> Result<Pinned, BodyProblem> {
    let top = scan(body, 0, owned)?;
    // Inline: a usual body needs a handful of edits, and the request path allocates little.
    let mut edits: SmallVec<[Edit; 8]> = SmallVec::new();
    let mut head: [Option<Bytes>; 3] = [Some(members.clone()), None, None];
    let mut cut_first = top.first_cut;
    let mut strip_usage = false;
    if top.stream {
        let (last, earlier) = match top.options.split_last() {
            Some((last, earlier)) => (Some(*last), earlier),
            None => (None, &[][..]),
        };
        for m in earlier {
            edits.push(Edit::cut(m.cut_start, m.value.1));
            cut_first |= m.index == 0;
        }
        match last.filter(|m| body.get(m.value.0) == Some(&b'{')) {
            Some(m) => {
                // Rewrite inside the client's object: its include_usage members go, ours comes first.
                let inner = scan(&body[..m.value.1], m.value.0, &["include_usage"])?;
                strip_usage = inner.last_owned_value.map(|(a, b)| &body[a..b]) != Some(b"true");
                edits.push(Edit::insert(
                    inner.open + 1,
                    Bytes::from_static(br#""include_usage":true"#),
                ));
                if inner.members > 0 && !inner.first_cut {
                    edits.push(Edit::insert(inner.open + 1, Bytes::from_static(b",")));
                }
                edits.extend(inner.cuts.iter().map(|&(a, b)| Edit::cut(a, b)));
            }
            None => {
                if let Some(m) = last {
                    edits.push(Edit::cut(m.cut_start, m.value.1));
                    cut_first |= m.index == 0;
                }
                head[1] = Some(Bytes::from_static(
                    br#","stream_options":{"include_usage":true}"#,
                ));
                strip_usage = true;
            }
        }
    }
    // The first original member has no comma of its own in front; give it one unless it is cut.
    if top.members > 0 && !cut_first {
        head[2] = Some(Bytes::from_static(b","));
    }
    edits.extend(top.cuts.iter().map(|&(a, b)| Edit::cut(a, b)));
    // Stable: two inserts at one place keep their order.
    edits.sort_by_key(|e| e.start);

    let mut chunks = SmallVec::new();
    chunks.push(body.slice(..top.open + 1));
    chunks.extend(head.into_iter().flatten());
    let mut at = top.open + 1;
    for e in edits {
        if e.start > at {
            chunks.push(body.slice(at..e.start));
        }
        at = at.max(e.end);
        chunks.extend(e.insert);
    }
    chunks.push(body.slice(at..));
    let len = chunks.iter().map(Bytes::len).sum();
    Ok(Pinned {
        chunks,
        len,
        stream: top.stream,
        strip_usage,
    })
}

/// One change to the client's bytes: `start..end` is dropped and `insert` put in its place.
struct Edit {
    start: usize,
    end: usize,
    insert: Option<Bytes>,
}

impl Edit {
    fn cut(start: usize, end: usize) -> Edit {
        Edit {
            start,
            end,
            insert: None,
        }
    }

    fn insert(at: usize, bytes: Bytes) -> Edit {
        Edit {
            start: at,
            end: at,
            insert: Some(bytes),
        }
    }
}

/// A top-level `stream_options` member.
#[derive(Debug, Clone, Copy)]
struct Options {
    /// Member index in the object.
    index: usize,
    /// Where a cut of this member starts (the end of the previous member).
    cut_start: usize,
    /// The value's range.
    value: (usize, usize),
}

/// What one pass over an object found.
struct Scan {
    /// Offset of the object's `{`.
    open: usize,
    /// Number of members.
    members: usize,
    /// Byte ranges to cut: each owned member with the separator before it.
    cuts: SmallVec<[(usize, usize); 4]>,
    /// Whether the first member is cut (then the next member brings its own comma).
    first_cut: bool,
    /// The value range of the last owned member.
    last_owned_value: Option<(usize, usize)>,
    /// Whether the (last) `stream` member is `true`.
    stream: bool,
    /// Every `stream_options` member, in order.
    options: SmallVec<[Options; 2]>,
}

/// Scans the object at `b[start..]`, which must be the whole rest of `b` (with optional white
/// space around it). For the top level `start` is 0; for a nested object `b` ends where the
/// object does.
fn scan(b: &[u8], start: usize, owned: &[&str]) -> Result<Scan, BodyProblem> {
    // One UTF-8 check up front; afterwards any byte >= 0x80 inside a string is known valid.
    // SIMD: 5-9x std's check on a chat body with non-ASCII text (BENCHMARKS.md).
    if start == 0 && simdutf8::basic::from_utf8(b).is_err() {
        return Err(BodyProblem::NotJson);
    }
    let mut s = Scanner { b, i: start };
    s.ws();
    if s.peek() != Some(b'{') {
        // Tell "valid JSON, wrong type" from "not JSON" for a better message.
        s.value(0)?;
        s.ws();
        return Err(if s.i == b.len() {
            BodyProblem::NotObject
        } else {
            BodyProblem::NotJson
        });
    }
    let open = s.i;
    s.i += 1;
    let mut out = Scan {
        open,
        members: 0,
        cuts: SmallVec::new(),
        first_cut: false,
        last_owned_value: None,
        stream: false,
        options: SmallVec::new(),
    };
    let mut prev_end = open + 1;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.expect(b'"')?;
            let (key_start, key_end) = s.string()?;
            let key = &b[key_start..key_end];
            s.ws();
            s.expect(b':')?;
            s.ws();
            let value_start = s.i;
            s.value(1)?;
            let value_end = s.i;

            let mut is_owned = false;
            for name in owned {
                match key_match(key, name) {
                    KeyMatch::Exact => is_owned = true,
                    KeyMatch::Ambiguous => return Err(BodyProblem::AmbiguousMember),
                    KeyMatch::No => {}
                }
            }
            let tracked = out.cuts.len() + out.options.len();
            if is_owned {
                if tracked == MAX_OWNED_OCCURRENCES {
                    return Err(BodyProblem::AmbiguousMember);
                }
                out.cuts.push((prev_end, value_end));
                out.first_cut |= out.members == 0;
                out.last_owned_value = Some((value_start, value_end));
            } else if key_match(key, "stream") == KeyMatch::Exact {
                out.stream = &b[value_start..value_end] == b"true";
            } else if key_match(key, "stream_options") == KeyMatch::Exact {
                if tracked == MAX_OWNED_OCCURRENCES {
                    return Err(BodyProblem::AmbiguousMember);
                }
                out.options.push(Options {
                    index: out.members,
                    cut_start: prev_end,
                    value: (value_start, value_end),
                });
            }
            out.members += 1;
            prev_end = value_end;

            s.ws();
            match s.bump() {
                Some(b',') => s.ws(),
                Some(b'}') => break,
                _ => return Err(BodyProblem::NotJson),
            }
        }
    }
    s.ws();
    if s.i != b.len() {
        return Err(BodyProblem::NotJson);
    }
    Ok(out)
}

/// How a decoded key relates to an owned name.
#[derive(Debug, PartialEq, Eq)]
enum KeyMatch {
    No,
    Exact,
    Ambiguous,
}

/// Compares a raw (still escaped) key with an ASCII name, decoding as it goes.
fn key_match(raw: &[u8], name: &str) -> KeyMatch {
    let name = name.as_bytes();
    if !raw.contains(&b'\\') {
        // Nothing to decode, and no NUL: the scanner refused raw control bytes.
        return if raw == name {
            KeyMatch::Exact
        } else if raw.eq_ignore_ascii_case(name) {
            KeyMatch::Ambiguous
        } else {
            KeyMatch::No
        };
    }
    let mut exact = true;
    let mut folded = true;
    let mut n = 0; // decoded characters so far
    // Whether the decoded key up to its first NUL equals the name, ignoring case.
    let mut before_nul = false;
    let mut seen_nul = false;
    let mut i = 0;
    while i < raw.len() {
        let (ch, used) = match raw[i] {
            b'\\' => decode_escape(&raw[i + 1..]),
            c => (u32::from(c), 1),
        };
        i += used;
        if ch == 0 && !seen_nul {
            seen_nul = true;
            before_nul = folded && n == name.len();
        }
        match (name.get(n), u8::try_from(ch)) {
            (Some(e), Ok(c)) if c.is_ascii() => {
                exact &= c == *e;
                folded &= c.eq_ignore_ascii_case(e);
            }
            _ => {
                exact = false;
                folded = false;
            }
        }
        n += 1;
    }
    if n != name.len() {
        exact = false;
        folded = false;
    }
    if exact {
        KeyMatch::Exact
    } else if folded || before_nul {
        KeyMatch::Ambiguous
    } else {
        KeyMatch::No
    }
}

/// Decodes one escape of an already validated string (`rest` starts after the backslash).
/// Returns the code point (surrogate pairs combined) and the bytes used including the backslash.
fn decode_escape(rest: &[u8]) -> (u32, usize) {
    match rest.first() {
        Some(b'u') => {
            let hi = hex4(&rest[1..]).unwrap_or(0xFFFD);
            if (0xD800..0xDC00).contains(&hi) {
                // Validated: a low surrogate escape follows.
                let lo = hex4(&rest[7..]).unwrap_or(0xDC00);
                (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 12)
            } else {
                (hi, 6)
            }
        }
        Some(b'b') => (0x08, 2),
        Some(b'f') => (0x0C, 2),
        Some(b'n') => (u32::from(b'\n'), 2),
        Some(b'r') => (u32::from(b'\r'), 2),
        Some(b't') => (u32::from(b'\t'), 2),
        Some(&c) => (u32::from(c), 2),
        None => (0xFFFD, 1),
    }
}

#[cfg(test)]
mod tests;
