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
    /// `usage.prompt_tokens` (0 when missing or not an integer that fits in a `u64`).
    pub prompt_tokens: u64,
    /// `usage.completion_tokens` (0 when missing or not an integer that fits in a `u64`).
    pub completion_tokens: u64,
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

mod json;
mod sse;

pub use json::JsonUsageScan;
pub use sse::SseUsageScan;

#[cfg(test)]
mod tests;
