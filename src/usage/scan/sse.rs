//! [`SseUsageScan`]: usage across an event stream, and the cut of the usage-only event.

use std::sync::LazyLock;

use memchr::memmem::{Finder, FinderRev};

use super::*;

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
        match self.scan(&frame) {
            Some(out) => out,
            None => {
                let mut out = Forward::default();
                out.push(frame);
                out
            }
        }
    }

    /// [`feed`](Self::feed), but `None` when the frame would go on as it came and leave the
    /// scan where it was (the scan stands between events, and the frame is whole events none of
    /// which can carry usage): then no [`Forward`] is filled. The frame is searched for usage
    /// once either way.
    pub fn scan(&mut self, frame: &Bytes) -> Option<Forward> {
        let mut ahead = Ahead::new(frame);
        if self.passes_with(frame, ahead.usage) {
            return None;
        }
        let mut out = Forward::default();
        if frame.is_empty() {
            return Some(out);
        }
        if !self.strip {
            let mut at = 0;
            while self.next_event(frame, &mut at, &mut ahead).is_some() {}
            out.push(frame.clone());
            return Some(out);
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
        while let Some(usage_only) = self.next_event(frame, &mut at, &mut ahead) {
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
        Some(out)
    }

    /// Whether [`feed`](Self::feed) would send `frame` on as it came and leave the scan where
    /// it was: the scan stands between events, and the frame is whole events (it ends with a
    /// blank line), none of which can carry usage (so none is usage-only). [`scan`](Self::scan)
    /// then returns `None` without scanning.
    #[cfg(test)]
    pub(super) fn passes(&self, frame: &[u8]) -> bool {
        self.passes_with(frame, first_usage(frame))
    }

    /// [`passes`](Self::passes), with `frame`'s first possible usage already found.
    fn passes_with(&self, frame: &[u8], usage_at: Option<usize>) -> bool {
        !frame.is_empty() && self.between_events() && ends_event(frame) && usage_at.is_none()
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

    /// Whether the scan stands between events: no data of an unfinished event was seen, and
    /// none of it was held or released; no line end is half seen (a CR last in the previous
    /// frame, whose LF may open this one: when stripping, `tail_cr` is then set too). Comment
    /// lines may have been seen; they carry no data.
    fn between_events(&self) -> bool {
        self.line == Line::Start
            && self.json.is_fresh()
            && !self.pending_cr
            && !self.released
            && self.held_len() == 0
    }

    /// Bytes held back right now (never more than [`MAX_HELD_EVENT`]).
    pub(super) fn held_len(&self) -> usize {
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
    /// `ahead`: what is known of `b` past `*at`.
    fn next_event(&mut self, b: &[u8], at: &mut usize, ahead: &mut Ahead) -> Option<bool> {
        let mut i = *at;
        while i < b.len() {
            if std::mem::take(&mut self.pending_cr) && b[i] == b'\n' {
                i += 1;
                continue;
            }
            ahead.move_to(b, i);
            if self.line == Line::Start && self.json.is_fresh() {
                // Whole events before the first possible usage change nothing: step past them
                // at once, as if each had been scanned and dispatched.
                if let Some(next) = ahead.past_events(b, i) {
                    *at = next;
                    return Some(false);
                }
            }
            let end = memchr2(b'\n', b'\r', &b[i..]).map_or(b.len(), |n| i + n);
            let usage_free = ahead.usage.is_none_or(|u| u >= end);
            if self.line == Line::Start
                && self.json.is_fresh()
                && usage_free
                && skippable(&b[i..end], &b[end..])
            {
                // The event's one data line, and no key in it can be `usage`: as if scanned.
                self.line = Line::Other;
            } else {
                self.line_bytes(&b[i..end]);
            }
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

/// Whether a line without a possible usage in it ([`first_usage`]) can go unscanned: it is a
/// `data` line, and a blank line follows it in the same frame (`rest` starts at its line end),
/// so it is its event's only data. Most chunks of a stream are such lines; only the last one
/// carries usage.
fn skippable(line: &[u8], rest: &[u8]) -> bool {
    let blank_follows = matches!(
        rest,
        [b'\n', b'\n' | b'\r', ..] | [b'\r', b'\r', ..] | [b'\r', b'\n', b'\n' | b'\r', ..]
    );
    blank_follows && line.starts_with(b"data:")
}

/// Where the first key in `bytes` that could decode to `usage` with a value other than
/// `null` may start: the literal word other than as `"usage":null` (spaces allowed around
/// the colon), or a `\u` escape that could spell it. A JSON string cannot span lines, so a
/// line before that offset holds no usage.
///
/// With `stream_options.include_usage` (which the edge asks for), OpenAI-compatible backends
/// put `"usage":null` in every chunk but the last: such a chunk cannot change the usage
/// counted, nor be a usage-only chunk, so it is passed on unscanned like a chunk without the
/// word.
fn first_usage(bytes: &[u8]) -> Option<usize> {
    static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"usage"));
    let word = USAGE
        .find_iter(bytes)
        .find(|&at| !null_member(&bytes[at + b"usage".len()..]));
    // Backslashes are rare in a chunk: one search for them is cheaper than one for `\u`,
    // and none is needed past the word.
    let end = word.unwrap_or(bytes.len());
    let escape =
        memchr::memchr_iter(b'\\', &bytes[..end]).find(|&i| bytes.get(i + 1) == Some(&b'u'));
    escape.or(word)
}

/// What the scan of one frame knows of the bytes ahead of it.
struct Ahead {
    /// Where the first possible usage at or after the scan position is ([`first_usage`]).
    usage: Option<usize>,
    /// Events were looked for up to here: there is no LF LF between the scan position and here.
    searched: usize,
}

impl Ahead {
    fn new(frame: &[u8]) -> Ahead {
        Ahead {
            usage: first_usage(frame),
            searched: 0,
        }
    }

    /// The scan reached `i`: a usage found before it was scanned, so look for the next one.
    fn move_to(&mut self, b: &[u8], i: usize) {
        if self.usage.is_some_and(|u| u < i) {
            self.usage = first_usage(&b[i..]).map(|u| i + u);
        }
    }

    /// At an event's start `i`: the end of the last whole event before the next possible usage,
    /// found as the last LF LF before it (a line end, then a blank line; a CRLF stream is read
    /// line by line instead). Each byte is searched once per frame.
    fn past_events(&mut self, b: &[u8], i: usize) -> Option<usize> {
        static BLANK_LINE: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\n\n"));
        let limit = self.usage.unwrap_or(b.len());
        if limit <= self.searched {
            return None;
        }
        self.searched = limit;
        BLANK_LINE.rfind(&b[i..limit]).map(|n| i + n + 2)
    }
}

/// Whether `rest`, what follows the word `usage`, closes a key whose value is `null`: a quote,
/// a colon, `null`, and then a byte that ends the value, with spaces or tabs between them.
fn null_member(rest: &[u8]) -> bool {
    fn spaces(b: &[u8]) -> &[u8] {
        let n = b.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
        &b[n..]
    }
    let Some(rest) = rest.strip_prefix(b"\"") else {
        return false;
    };
    let Some(rest) = spaces(rest).strip_prefix(b":") else {
        return false;
    };
    match spaces(rest).strip_prefix(b"null") {
        Some(after) => matches!(
            after.first(),
            Some(b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n')
        ),
        None => false,
    }
}

/// Whether `frame` ends with a blank line, so an event ends at its last byte: the last LF (alone
/// or in a CRLF) follows another line end. A CR last may still be followed by a LF: not counted.
fn ends_event(frame: &[u8]) -> bool {
    frame.ends_with(b"\n\n") || frame.ends_with(b"\n\r\n") || frame.ends_with(b"\r\r\n")
}
