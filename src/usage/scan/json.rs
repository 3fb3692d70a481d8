//! [`JsonUsageScan`]: the top-level `usage` of one JSON document, fed in arbitrary pieces.

use super::*;
use crate::search::{bracket_or_quote, quote_or_backslash};

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
    /// A key was read at a tracked depth and its colon has not come yet. Only that colon opens
    /// a value for the key: a stray one (`"usage":null,:{…}`) opens none, as the event-stream
    /// scan assumes when it passes a `"usage":null` chunk unscanned.
    colon_due: bool,
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
            if self.phase == Phase::Root {
                if self.at_member() {
                    // Whole members where they lie; the byte they stopped at goes on below.
                    i = self.members(chunk, i);
                } else if self.skippable() {
                    // Below the tracked depths only nesting and strings matter: jump to the
                    // next byte that opens or closes one.
                    i += bracket_or_quote(&chunk[i..]);
                }
                if i == chunk.len() {
                    return;
                }
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

    /// Whether nothing but whitespace has been fed yet.
    pub(super) fn is_fresh(&self) -> bool {
        self.phase == Phase::Before
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
    pub(super) fn usage_only(&self) -> bool {
        self.choices_empty && self.usage().is_some()
    }

    /// Whether the bytes up to the next quote or bracket ([`bracket_or_quote`]) change nothing:
    /// no key or value of ours can be there, and no number or `choices` array is being read.
    fn skippable(&self) -> bool {
        self.number.is_none() && !self.choices_first && !self.tracked()
    }

    /// Whether a member (a key, or whitespace before it) comes next at a tracked depth, with
    /// nothing half read: where [`members`](Self::members) can take over.
    fn at_member(&self) -> bool {
        self.want_key
            && !self.colon_due
            && !self.want_value
            && self.number.is_none()
            && !self.choices_first
            && self.tracked()
    }

    /// Reads whole members (`"key": value` and the `,` or `}` after it) from `b[i..]`, leaving
    /// the state just as the byte-by-byte scan would. It takes only a member that lies whole in
    /// `b`, plainly formed: a key without escapes, a colon, one value, then a comma or a close.
    /// Anything else (a member split by the chunk's end, an escaped key, malformed input) is
    /// left to the byte-by-byte scan. Returns where it stopped: at the first member it left, or
    /// at the object's closing `}` (for that scan to close it).
    ///
    /// The values of keys of no interest are jumped over, strings to their closing quote and
    /// objects and arrays to their matching close, without decoding a byte of them: on a
    /// completion, almost every byte.
    fn members(&mut self, b: &[u8], mut i: usize) -> usize {
        while let Some(next) = self.member(b, i) {
            i = next;
        }
        i
    }

    /// One member from `b[i..]`, as [`members`](Self::members) describes; `Some` with where the
    /// next one starts (past the comma, at the `}`, or inside a `usage` object just opened).
    fn member(&mut self, b: &[u8], i: usize) -> Option<usize> {
        let open = skip_ws(b, i);
        if *b.get(open)? != b'"' {
            return None;
        }
        let close = open + 1 + quote_or_backslash(&b[open + 1..])?;
        if b[close] != b'"' {
            return None; // decoded byte by byte, so `"us\u0061ge"` is `usage`
        }
        let key = self.key_kind(&b[open + 1..close]);
        let colon = skip_ws(b, close + 1);
        if *b.get(colon)? != b':' {
            return None;
        }
        let value = skip_ws(b, colon + 1);
        let first = *b.get(value)?;
        if key == Key::Usage && first == b'{' {
            // Into the top-level usage object, whose members are read here too.
            self.last_key = key;
            self.value_start(first);
            self.depth += 1;
            return Some(value + 1);
        }
        let after = match first {
            b'"' => skip_string(b, value + 1)?,
            b'{' | b'[' => skip_nested(b, value + 1)?,
            c if !DELIMITER[usize::from(c)] => scalar_end(b, value),
            _ => return None,
        };
        let end = skip_ws(b, after);
        let last = *b.get(end)?;
        if last != b',' && last != b'}' {
            return None;
        }
        // The member is whole: what the byte-by-byte scan would have done with it.
        self.last_key = key;
        self.value_start(first);
        match key {
            Key::Choices if first == b'[' => {
                self.choices_first = false;
                self.choices_empty = b[skip_ws(b, value + 1)] == b']';
            }
            Key::Prompt | Key::Completion if self.number.is_some() => {
                self.number = None;
                self.set_count(count(&b[value..after]));
            }
            _ => {}
        }
        if last == b',' {
            self.want_key = true;
            Some(end + 1)
        } else {
            Some(end)
        }
    }

    /// Keys and values matter only at the top level and directly inside `usage`.
    fn tracked(&self) -> bool {
        self.depth == 1 || (self.depth == 2 && self.in_usage)
    }

    fn root_byte(&mut self, c: u8) {
        if let Some(v) = self.number {
            match c {
                b'0'..=b'9' => {
                    // Past u64::MAX it is no count a parser would read as an integer (serde_json
                    // reads a float): it stays 0, like a fraction.
                    self.number = v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(c - b'0')));
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
        let tracked = self.tracked();
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
            b':' if tracked && self.colon_due => {
                self.colon_due = false;
                self.want_value = true;
            }
            b',' if tracked => {
                self.colon_due = false;
                self.want_key = true;
            }
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
        self.colon_due = false;
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
                let Some(n) = quote_or_backslash(&b[i..]) else {
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
        // A key we compare. Whole in this chunk and without escapes (the common case), it is
        // compared where it lies.
        if self.key_len == 0 && self.escape == Escape::None && !self.key_bad {
            if let Some(n) = quote_or_backslash(&b[i..]) {
                if b[i + n] == b'"' {
                    self.in_string = false;
                    self.last_key = self.key_kind(&b[i..i + n]);
                    self.colon_due = true;
                    return i + n + 1;
                }
            }
        }
        // Otherwise decode it byte by byte, so `"us\u0061ge"` is `usage` as for any JSON parser.
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
        self.last_key = if self.key_bad {
            Key::Other
        } else {
            self.key_kind(&self.key[..self.key_len])
        };
        self.colon_due = true;
    }

    /// What a decoded key at the current depth is to the scan.
    fn key_kind(&self, key: &[u8]) -> Key {
        match (self.depth, key) {
            (1, b"usage") => Key::Usage,
            (1, b"choices") => Key::Choices,
            (2, b"prompt_tokens") => Key::Prompt,
            (2, b"completion_tokens") => Key::Completion,
            _ => Key::Other,
        }
    }
}

pub(super) fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// The first byte from `i` on that is not whitespace (`b.len()` when there is none).
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

/// Past the closing quote of the string whose contents start at `b[i]`; `None` when it does
/// not close in `b`. An escape is a backslash and the next byte (`\u` hex digits are plain).
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += quote_or_backslash(b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

/// Past the close matching the object or array opened just before `b[i]`; `None` when it does
/// not close in `b`. Like the byte-by-byte scan, any `}` or `]` closes a level.
fn skip_nested(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 1usize;
    loop {
        i += bracket_or_quote(&b[i..]);
        let c = *b.get(i)?;
        i += 1;
        match c {
            b'"' => i = skip_string(b, i)?,
            b'{' | b'[' => depth += 1,
            _ => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
        }
    }
}

/// The end of a number or literal starting at `b[i]`: the next [`DELIMITER`], or `b.len()`.
fn scalar_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| DELIMITER[usize::from(c)])
        .map_or(b.len(), |n| i + n)
}

/// A token count read from a whole scalar value that starts with a digit, as the byte-by-byte
/// scan reads it: its leading digits, unless a fraction or exponent follows them or they
/// overflow a `u64` (then 0).
fn count(scalar: &[u8]) -> u64 {
    let digits = scalar.iter().take_while(|c| c.is_ascii_digit()).count();
    if matches!(scalar.get(digits), Some(b'.' | b'e' | b'E')) {
        return 0;
    }
    scalar[..digits]
        .iter()
        .try_fold(0u64, |v, &c| {
            v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        })
        .unwrap_or(0)
}

/// Bytes that end a number or literal: whitespace, the quote and brackets, `,` and `:`.
static DELIMITER: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    let delimiters = b" \t\n\r\"{}[],:";
    while i < delimiters.len() {
        t[delimiters[i] as usize] = true;
        i += 1;
    }
    t
};
