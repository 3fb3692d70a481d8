//! Byte searches the JSON readers share (the usage scan, pinning): what ends a run of plain
//! string bytes, and where the next bracket or quote is.
//!
//! Most strings in a chat body or a completion are a few bytes long (keys, roles, one token),
//! shorter than it takes a vector search to pay for its set-up: their first 16 bytes are read a
//! word (8 bytes) at a time, with the bit tricks below. Past that, `memchr` takes over, which
//! picks the machine's vector instructions at run time.

use memchr::memchr2;

/// Bytes read a word at a time before a run is handed to a vector search.
const SHORT: usize = 16;

/// The first `"` or `\` in `b`.
pub(crate) fn quote_or_backslash(b: &[u8]) -> Option<usize> {
    let head = &b[..b.len().min(SHORT)];
    match first_hit(head, |w| equal_bytes(w, b'"') | equal_bytes(w, b'\\')) {
        Some(n) => Some(n),
        None if b.len() > SHORT => memchr2(b'"', b'\\', &b[SHORT..]).map(|n| n + SHORT),
        None => None,
    }
}

/// The first byte of `b` that ends a run of plain string bytes: `"`, `\` or a control byte
/// (below 0x20, which RFC 8259 does not allow unescaped); `b.len()` when there is none.
pub(crate) fn string_special(b: &[u8]) -> usize {
    /// Past the head, runs are searched this much at a time: a quote or backslash first, then
    /// the bytes before it for control bytes, while both are in the nearest cache.
    const BLOCK: usize = 4096;
    let head = &b[..b.len().min(SHORT)];
    let hits = |w| equal_bytes(w, b'"') | equal_bytes(w, b'\\') | bytes_below(w, 0x20);
    if let Some(n) = first_hit(head, hits) {
        return n;
    }
    let mut at = head.len();
    while at < b.len() {
        let block = &b[at..b.len().min(at + BLOCK)];
        let end = memchr2(b'"', b'\\', block).unwrap_or(block.len());
        // Control bytes are an error, so rare: one branch-free pass the compiler vectorises.
        let run = &block[..end];
        if run.iter().fold(0u8, |any, &c| any | u8::from(c < 0x20)) != 0 {
            return at + run.iter().position(|&c| c < 0x20).unwrap_or(end);
        }
        if end < block.len() {
            return at + end;
        }
        at += block.len();
    }
    b.len()
}

/// The offset of the first `"`, `{`, `}`, `[` or `]` in `b` (`b.len()` when there is none).
pub(crate) fn bracket_or_quote(b: &[u8]) -> usize {
    // `[` and `]` are `{` and `}` with bit 5 clear, and no other byte is.
    first_hit(b, |w| {
        let folded = w | lanes(0x20);
        equal_bytes(w, b'"') | equal_bytes(folded, b'{') | equal_bytes(folded, b'}')
    })
    .unwrap_or(b.len())
}

/// `byte` in each of a word's eight bytes.
const fn lanes(byte: u8) -> u64 {
    u64::from_ne_bytes([byte; 8])
}

/// The high bit of each byte of `word` (read little-endian) equal to `byte`. Exact up to the
/// first such byte; a borrow may mark bytes after it, never before, so the lowest mark is the
/// first match.
fn equal_bytes(word: u64, byte: u8) -> u64 {
    let x = word ^ lanes(byte);
    x.wrapping_sub(lanes(0x01)) & !x & lanes(0x80)
}

/// The high bit of each byte of `word` below `limit` (at most 0x80), exact up to the first
/// such byte as in [`equal_bytes`].
fn bytes_below(word: u64, limit: u8) -> u64 {
    word.wrapping_sub(lanes(limit)) & !word & lanes(0x80)
}

/// The offset of the first byte of `b` that `hits` marks (with [`equal_bytes`] and
/// [`bytes_below`]), reading 8 bytes at a time; the last few are read as one short word whose
/// missing bytes count for nothing.
fn first_hit(b: &[u8], hits: impl Fn(u64) -> u64) -> Option<usize> {
    let mut words = b.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let mut le = [0u8; 8];
        le.copy_from_slice(word);
        let marks = hits(u64::from_le_bytes(le));
        if marks != 0 {
            return Some(at + marks.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let tail = words.remainder();
    let word = tail.iter().rev().fold(0, |w, &c| (w << 8) | u64::from(c));
    let present = (1u64 << (tail.len() * 8)) - 1;
    let marks = hits(word) & present;
    (marks != 0).then(|| at + marks.trailing_zeros() as usize / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each search against the obvious byte loop: every slice of up to 40 bytes of a buffer
    /// that puts each kind of byte at every offset of a word, and runs past the vector block.
    #[test]
    fn searches_agree_with_a_byte_loop() {
        let special = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
        let bracket = |c: u8| matches!(c, b'"' | b'{' | b'}' | b'[' | b']');
        let kinds = [
            b'"', b'\\', 0x00, 0x1f, b'{', b'}', b'[', b']', b'a', 0x20, 0x7f, 0xff,
        ];
        let mut buf = Vec::new();
        for (n, c) in kinds.into_iter().enumerate() {
            buf.extend(std::iter::repeat_n(b'x', n % 9));
            buf.push(c);
            buf.extend_from_slice("é;[{ \x01".as_bytes());
        }
        let mut long = vec![b'y'; 3 * 4096 + 77];
        long.extend_from_slice(b"\x05 \"\\ ");
        let mut cases: Vec<&[u8]> = Vec::new();
        for i in 0..buf.len() {
            for j in i..=buf.len().min(i + 40) {
                cases.push(&buf[i..j]);
            }
        }
        for k in 0..24 {
            cases.push(&long[k..]);
            cases.push(&long[..long.len() - k]);
        }
        for s in cases {
            let want = s.iter().position(|&c| special(c)).unwrap_or(s.len());
            assert_eq!(string_special(s), want, "{s:?}");
            let want = s.iter().position(|&c| c == b'"' || c == b'\\');
            assert_eq!(quote_or_backslash(s), want, "{s:?}");
            let want = s.iter().position(|&c| bracket(c)).unwrap_or(s.len());
            assert_eq!(bracket_or_quote(s), want, "{s:?}");
        }
    }
}
