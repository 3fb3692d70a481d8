//! Incremental scanners that find the `usage` object of a response without buffering it.
//!
//! The edge forwards a backend's body frame by frame, as it arrives, and counts tokens on the way:
//!
//! * [`JsonUsageScan`] reads one JSON document (a non-streamed completion);
//! * [`SseUsageScan`] reads a `text/event-stream` of chunks, scans each event's data with a fresh
//!   [`JsonUsageScan`], keeps the last usage seen, and can cut the usage-only final chunk out of
//!   what the client receives (the edge asked for it, the client did not).
//!
//! Both are byte-level state machines with fixed-size state: no tree, no recursion, no allocation
//! per byte, none per frame in the common case (only the pieces of an event split over frames
//! are joined), and any split point (inside a key, a number, an escape, a `\r\n`) gives the
//! answer the whole body would. They are scanners, not validators: they follow
//! strings, escapes and nesting, read the top-level keys they need, and trust the backend for the
//! rest. They only report what a client could see too: a document counts once its top-level
//! object has closed with nothing but whitespace after it, an event once its blank line arrived.

use bytes::{Bytes, BytesMut};
use memchr::memchr2;

/// Most bytes of one unfinished SSE event held back while deciding whether to cut it. A bigger
/// event is released as it is and no longer cut: a usage-only chunk is a few hundred bytes.
pub const MAX_HELD_EVENT: usize = 64 * 1024;

/// Parts a [`Forward`] holds without allocating. Held bytes, the run before a cut and the run
/// after it make three; more (several usage-only events in one frame) are joined into one copy.
pub const FORWARD_INLINE: usize = 4;

/// Longest top-level or usage key compared; longer keys are none of ours (`completion_tokens`
/// is 17 bytes).
const KEY_CAP: usize = 24;

/// Token counts of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `usage.prompt_tokens` (0 when missing or not an integer).
    pub prompt_tokens: u64,
    /// `usage.completion_tokens` (0 when missing or not an integer).
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    /// Before the document's first byte that is not whitespace.
    Before,
    /// Inside the top-level object.
    Root,
    /// The top-level object has closed; only whitespace may follow.
    After,
    /// Not an object, or data after it: nothing to report.
    Invalid,
}

/// The last key read at depth 1 (top level) or depth 2 (inside the top-level `usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Key {
    #[default]
    Other,
    Usage,
    Choices,
    Prompt,
    Completion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Escape {
    #[default]
    None,
    Backslash,
    /// `\u` and this many hex digits so far, with their value.
    Hex(u8, u32),
}

/// Incremental scan of one JSON document for its top-level `usage` object. Fixed-size state.
#[derive(Debug, Clone, Default)]
pub struct JsonUsageScan {
    phase: Phase,
    depth: u32,
    in_string: bool,
    /// Whether the current string is a key worth decoding (top level, or directly in `usage`).
    capture: bool,
    escape: Escape,
    key: [u8; KEY_CAP],
    key_len: usize,
    /// The key cannot be one of ours (too long, non-ASCII escape, bad escape).
    key_bad: bool,
    want_key: bool,
    want_value: bool,
    last_key: Key,
    /// Digits so far of a token count being read.
    number: Option<u64>,
    in_usage: bool,
    acc: Usage,
    usage: Option<Usage>,
    /// The last `choices` value opened an array whose first byte is still to come.
    choices_first: bool,
    choices_empty: bool,
}

impl JsonUsageScan {
    /// A scanner before the document's first byte.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the document, split anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if self.in_string {
                i = self.string(chunk, i);
                continue;
            }
            let c = chunk[i];
            i += 1;
            match self.phase {
                Phase::Root => self.root_byte(c),
                Phase::Before if c == b'{' => {
                    self.phase = Phase::Root;
                    self.depth = 1;
                    self.want_key = true;
                }
                Phase::Before | Phase::After if is_ws(c) => {}
                Phase::Before | Phase::After => self.phase = Phase::Invalid,
                Phase::Invalid => return,
            }
        }
    }

    /// The top-level usage (`prompt_tokens` / `completion_tokens` integers directly inside the
    /// top-level `"usage"` object; a missing member counts as 0), if the document had a non-null
    /// one. `None` until the top-level object has closed, and for anything but one object.
    pub fn usage(&self) -> Option<Usage> {
        match self.phase {
            Phase::After => self.usage,
            _ => None,
        }
    }

    /// Whether the document is a usage-only chunk: top-level `choices` is an empty array and
    /// `usage` a non-null object.
    fn usage_only(&self) -> bool {
        self.choices_empty && self.usage().is_some()
    }

    fn root_byte(&mut self, c: u8) {
        if let Some(v) = self.number {
            match c {
                b'0'..=b'9' => {
                    self.number = Some(v.saturating_mul(10).saturating_add(u64::from(c - b'0')));
                    return;
                }
                // A fraction or an exponent: not a count, which stays 0. The rest of the number
                // is ignored like any value byte.
                b'.' | b'e' | b'E' => self.number = None,
                _ => {
                    self.set_count(v);
                    self.number = None;
                }
            }
        }
        if self.choices_first && !is_ws(c) {
            self.choices_first = false;
            self.choices_empty = c == b']';
        }
        // Keys and values matter only at the top level and directly inside `usage`.
        let tracked = self.depth == 1 || (self.depth == 2 && self.in_usage);
        match c {
            b'"' => {
                self.in_string = true;
                self.capture = tracked && self.want_key;
                if self.capture {
                    self.key_len = 0;
                    self.key_bad = false;
                    self.want_key = false;
                } else if tracked && self.want_value {
                    self.value_start(c);
                }
            }
            b'{' | b'[' => {
                if tracked && self.want_value {
                    self.value_start(c);
                }
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => self.close(),
            b':' if tracked => self.want_value = true,
            b',' if tracked => self.want_key = true,
            _ if tracked && self.want_value && !is_ws(c) => self.value_start(c),
            _ => {}
        }
    }

    /// The first byte of a member's value at a tracked depth.
    fn value_start(&mut self, c: u8) {
        self.want_value = false;
        match self.last_key {
            Key::Usage => {
                // A later `usage` member replaces an earlier one, as in a parsed map.
                self.usage = None;
                if c == b'{' {
                    self.in_usage = true;
                    self.want_key = true;
                    self.acc = Usage::default();
                }
            }
            Key::Choices => {
                self.choices_empty = false;
                self.choices_first = c == b'[';
            }
            Key::Prompt | Key::Completion => {
                self.set_count(0);
                // A sign, a string, `null`: not a count, which stays 0.
                if c.is_ascii_digit() {
                    self.number = Some(u64::from(c - b'0'));
                }
            }
            Key::Other => {}
        }
    }

    fn set_count(&mut self, v: u64) {
        match self.last_key {
            Key::Prompt => self.acc.prompt_tokens = v,
            Key::Completion => self.acc.completion_tokens = v,
            _ => {}
        }
    }

    fn close(&mut self) {
        if self.depth == 2 && self.in_usage {
            self.in_usage = false;
            self.usage = Some(self.acc);
        }
        self.depth = self.depth.saturating_sub(1);
        // Whatever closed was a value: next comes a comma or a close, at any depth.
        self.want_key = false;
        self.want_value = false;
        if self.depth == 0 {
            self.phase = Phase::After;
        }
    }

    /// Scans string bytes from `i`; returns where scanning stopped (after the closing quote, or
    /// the chunk's end).
    fn string(&mut self, b: &[u8], mut i: usize) -> usize {
        if !self.capture {
            // Values and nested keys: jump from quote or backslash to the next.
            loop {
                if self.escape != Escape::None {
                    if i >= b.len() {
                        return i;
                    }
                    // The escaped byte; `\u` hex digits that follow are plain bytes.
                    i += 1;
                    self.escape = Escape::None;
                }
                let Some(n) = memchr2(b'"', b'\\', &b[i..]) else {
                    return b.len();
                };
                i += n + 1;
                if b[i - 1] == b'"' {
                    self.in_string = false;
                    return i;
                }
                self.escape = Escape::Backslash;
            }
        }
        // A key we compare: decode it, so `"us\u0061ge"` is `usage` as for any JSON parser.
        while i < b.len() {
            let c = b[i];
            i += 1;
            match self.escape {
                Escape::None => match c {
                    b'"' => {
                        self.in_string = false;
                        self.key_done();
                        return i;
                    }
                    b'\\' => self.escape = Escape::Backslash,
                    _ => self.key_push(c),
                },
                Escape::Backslash => {
                    self.escape = Escape::None;
                    match c {
                        b'u' => self.escape = Escape::Hex(0, 0),
                        b'"' | b'\\' | b'/' => self.key_push(c),
                        // Control characters: in no key of ours.
                        _ => self.key_bad = true,
                    }
                }
                Escape::Hex(n, v) => {
                    let v = (v << 4) | char::from(c).to_digit(16).unwrap_or(0xFF);
                    if n < 3 {
                        self.escape = Escape::Hex(n + 1, v);
                    } else {
                        self.escape = Escape::None;
                        match u8::try_from(v) {
                            Ok(ascii) if ascii.is_ascii() => self.key_push(ascii),
                            _ => self.key_bad = true,
                        }
                    }
                }
            }
        }
        i
    }

    fn key_push(&mut self, c: u8) {
        match self.key.get_mut(self.key_len) {
            Some(slot) => {
                *slot = c;
                self.key_len += 1;
            }
            None => self.key_bad = true,
        }
    }

    fn key_done(&mut self) {
        let key = if self.key_bad {
            &[][..]
        } else {
            &self.key[..self.key_len]
        };
        self.last_key = match (self.depth, key) {
            (1, b"usage") => Key::Usage,
            (1, b"choices") => Key::Choices,
            (2, b"prompt_tokens") => Key::Prompt,
            (2, b"completion_tokens") => Key::Completion,
            _ => Key::Other,
        };
    }
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// What to send on after a frame: zero, one or a few [`Bytes`], in order, never an empty one.
///
/// Drain it as an iterator (one data frame per part) or read [`Forward::parts`]. Parts are slices
/// of the frames fed, not copies, except the pieces of one event held over several frames (joined)
/// and runs past [`FORWARD_INLINE`] in one frame (joined into one part).
#[derive(Debug, Default)]
pub struct Forward {
    /// `parts[next..end]` are still to send; taken ones are left empty.
    parts: [Bytes; FORWARD_INLINE],
    next: usize,
    end: usize,
    bytes: usize,
}

impl Forward {
    /// The parts not yet taken.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts[self.next..self.end]
    }

    /// Total length of the parts not yet taken.
    pub fn byte_len(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is left to send.
    pub fn is_empty(&self) -> bool {
        self.next == self.end
    }

    fn push(&mut self, part: Bytes) {
        if part.is_empty() {
            return;
        }
        if self.end == FORWARD_INLINE {
            // Several cuts in one frame: rare enough to pay for one copy instead of a `Vec`.
            let mut joined = BytesMut::with_capacity(self.bytes + part.len());
            for p in &mut self.parts {
                joined.extend_from_slice(&std::mem::take(p));
            }
            self.parts[0] = joined.freeze();
            self.end = 1;
        }
        self.bytes += part.len();
        self.parts[self.end] = part;
        self.end += 1;
    }
}

impl Iterator for Forward {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let part = std::mem::take(self.parts.get_mut(self.next..self.end)?.first_mut()?);
        self.next += 1;
        self.bytes -= part.len();
        Some(part)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Forward {}

/// Where the scanner is within the current SSE line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Line {
    /// No byte of the line yet: a line end here is a blank line.
    #[default]
    Start,
    /// This many bytes of `data` matched (1..=4).
    Name(u8),
    /// In a `data` value: bytes go to the event's JSON scan. The optional space after the colon
    /// goes too: it is JSON whitespace, so it needs no special case.
    Data,
    /// A comment or another field: ignored up to the line end.
    Other,
}

/// Incremental scan of an SSE stream of chat-completion chunks.
///
/// Framing follows the WHATWG event-stream rules: lines end in LF, CRLF or CR, a blank line ends
/// an event, `data` values joined with LF are the event's JSON, comments and other fields are
/// ignored (but forwarded). An event counts when its blank line arrives; an unterminated one at
/// the end of the stream is dropped by clients, and not counted either.
#[derive(Debug, Default)]
pub struct SseUsageScan {
    strip: bool,
    line: Line,
    /// The last byte scanned was a CR ending a line: a LF next is part of that line end.
    pending_cr: bool,
    json: JsonUsageScan,
    usage: Option<Usage>,
    /// The unfinished event's bytes while it may still be cut: one slice of a frame, or the
    /// pieces of several frames joined (the only copy this scanner makes).
    held: Bytes,
    joined: BytesMut,
    /// The unfinished event outgrew [`MAX_HELD_EVENT`] and went out as it came: it is not cut.
    released: bool,
    /// The last event ended on a CR at the end of a frame; `Some(cut)`: a LF first in the next
    /// frame still belongs to it, and goes where it went.
    tail_cr: Option<bool>,
}

impl SseUsageScan {
    /// A scanner before the stream's first byte.
    ///
    /// `strip_usage_only`: cut usage-only events (top-level `choices` is an empty array and
    /// `usage` a non-null object) out of what is forwarded — the edge asked the backend for
    /// usage itself and the client did not.
    pub fn new(strip_usage_only: bool) -> Self {
        Self {
            strip: strip_usage_only,
            ..Self::default()
        }
    }

    /// Feeds one frame exactly as received; returns what to forward now.
    ///
    /// Without stripping that is the frame itself, untouched. With it, whole events go out as
    /// slices of the frame, usage-only events are left out, and the tail of an unfinished event
    /// is held until its blank line (at most [`MAX_HELD_EVENT`] bytes, then it goes out as is).
    pub fn feed(&mut self, frame: Bytes) -> Forward {
        let mut out = Forward::default();
        if frame.is_empty() {
            return out;
        }
        if !self.strip {
            let mut at = 0;
            while self.next_event(&frame, &mut at).is_some() {}
            out.push(frame);
            return out;
        }
        let mut at = 0; // scan position
        let mut run = 0; // start of the bytes to forward not yet pushed
        if let Some(cut) = self.tail_cr.take() {
            if frame.first() == Some(&b'\n') {
                self.pending_cr = false;
                at = 1;
                run = usize::from(cut);
            }
        }
        let mut region = at; // start of the current event
        let mut last_cut = false;
        while let Some(usage_only) = self.next_event(&frame, &mut at) {
            let held = self.take_held();
            last_cut = usage_only && !self.released;
            if last_cut {
                out.push(frame.slice(run..region));
                run = at;
            } else {
                out.push(held); // held bytes come before anything of this frame
            }
            self.released = false;
            region = at;
        }
        if region == frame.len() {
            out.push(frame.slice(run..));
            if self.pending_cr {
                self.tail_cr = Some(last_cut);
            }
        } else if self.released {
            out.push(frame.slice(run..));
        } else {
            out.push(frame.slice(run..region));
            let rest = frame.slice(region..);
            if self.held_len() + rest.len() > MAX_HELD_EVENT {
                out.push(self.take_held());
                out.push(rest);
                self.released = true;
            } else {
                self.hold(rest);
            }
        }
        out
    }

    /// End of stream: whatever is still held (an unterminated event) is released as is.
    pub fn finish(&mut self) -> Forward {
        let mut out = Forward::default();
        out.push(self.take_held());
        *self = Self {
            strip: self.strip,
            usage: self.usage,
            ..Self::default()
        };
        out
    }

    /// The last non-null usage seen in any event.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes held back right now (never more than [`MAX_HELD_EVENT`]).
    fn held_len(&self) -> usize {
        self.held.len() + self.joined.len()
    }

    fn hold(&mut self, piece: Bytes) {
        if self.held_len() == 0 {
            self.held = piece;
        } else {
            self.joined
                .extend_from_slice(&std::mem::take(&mut self.held));
            self.joined.extend_from_slice(&piece);
        }
    }

    fn take_held(&mut self) -> Bytes {
        if self.joined.is_empty() {
            std::mem::take(&mut self.held)
        } else {
            self.joined.split().freeze()
        }
    }

    /// Scans from `*at` to just past the next blank line and returns whether the event it ended
    /// was usage-only; `None` when the frame ran out first. `*at` is where scanning stopped.
    fn next_event(&mut self, b: &[u8], at: &mut usize) -> Option<bool> {
        let mut i = *at;
        while i < b.len() {
            if std::mem::take(&mut self.pending_cr) && b[i] == b'\n' {
                i += 1;
                continue;
            }
            let end = memchr2(b'\n', b'\r', &b[i..]).map_or(b.len(), |n| i + n);
            self.line_bytes(&b[i..end]);
            if end == b.len() {
                break;
            }
            i = end + 1;
            if b[end] == b'\r' {
                match b.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            if let Some(usage_only) = self.end_line() {
                *at = i;
                return Some(usage_only);
            }
        }
        *at = b.len();
        None
    }

    /// Bytes of one line, without its line end.
    fn line_bytes(&mut self, mut seg: &[u8]) {
        while let Some((&c, rest)) = seg.split_first() {
            self.line = match self.line {
                Line::Data => return self.json.feed(seg),
                Line::Other => return,
                Line::Start if c == b'd' => Line::Name(1),
                Line::Name(4) if c == b':' => {
                    self.data_line();
                    Line::Data
                }
                Line::Name(n) if usize::from(n) < 4 && b"data"[usize::from(n)] == c => {
                    Line::Name(n + 1)
                }
                Line::Start | Line::Name(_) => Line::Other,
            };
            seg = rest;
        }
    }

    /// A line ended. Returns `Some(usage_only)` when it was blank, ending an event.
    fn end_line(&mut self) -> Option<bool> {
        match std::mem::take(&mut self.line) {
            Line::Start => return Some(self.dispatch()),
            // `data` without a colon: a data line with an empty value.
            Line::Name(4) => self.data_line(),
            _ => {}
        }
        None
    }

    /// A data line starts: the event's data values are joined with LF. One before the first
    /// value too is leading whitespace to JSON, so no flag is kept for it.
    fn data_line(&mut self) {
        self.json.feed(b"\n");
    }

    /// The event's blank line: its data was scanned whole. An event without data leaves the
    /// scan at its start, which reports nothing.
    fn dispatch(&mut self) -> bool {
        let json = std::mem::take(&mut self.json);
        if let Some(usage) = json.usage() {
            self.usage = Some(usage);
        }
        json.usage_only()
    }
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
