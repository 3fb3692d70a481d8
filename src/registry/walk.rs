//! Reading a snapshot document (`{"revision":N,"deployments":[…],"keys":[…]}`) from a reader in
//! blocks, without holding the document whole: a fleet's snapshot is hundreds of megabytes, the
//! state built from it about as much again.
//!
//! [`walk`] reads the outer object itself and hands each element of `deployments` and `keys`
//! to a callback as the exact bytes of that one JSON value. serde_json finds where each value
//! ends (and so checks its syntax), every value is checked to be UTF-8, and the outer grammar
//! follows what serde's derive accepts for the same document: `revision` required, the two
//! arrays optional, other members ignored, a repeated member refused, nothing after the object.
//! A document that does not parse fails the walk; the callback has then seen a prefix of it,
//! which is why the registry walks a document twice (check, then apply).

use std::borrow::Cow;
use std::io::Read;

use serde::de::IgnoredAny;

/// Bytes asked of the reader at a time.
const BLOCK: usize = 1 << 20;
/// Largest single value (one deployment, one key, one skipped member) accepted.
pub const MAX_VALUE_BYTES: usize = 16 << 20;

/// Which array an element is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Array {
    Deployments,
    Keys,
}

/// One element of the document's arrays, as its JSON text.
pub enum Element<'a> {
    Deployment(&'a [u8]),
    Key(&'a [u8]),
}

/// What [`Visit::front`] made of the bytes at the start of an element.
pub enum Front {
    /// It read one whole object, array or string of this many bytes (a value that shows its
    /// own end: a number ending where the bytes end might go on, so numbers are not read there).
    Read(usize),
    /// It could not read one: the walker finds where the value ends and calls
    /// [`Visit::whole`] with exactly its bytes.
    Unread,
}

/// What a walk does with each element.
pub trait Visit {
    /// Offered the buffered bytes from the start of an element (possibly more than it, possibly
    /// a cut-short part of it). A visitor that parses elements anyway can read one here and
    /// spare the walker finding its end first. Only worth it on a document already checked by
    /// a walk: a value read here is not checked to be UTF-8 beyond what the parse looks at.
    fn front(&mut self, _array: Array, _bytes: &[u8]) -> Front {
        Front::Unread
    }

    /// Called with exactly the bytes of an element that [`Visit::front`] did not read.
    fn whole(&mut self, array: Array, value: &[u8]);
}

/// A closure as a visitor that sees every element whole.
impl<F: FnMut(Element<'_>)> Visit for F {
    fn whole(&mut self, array: Array, value: &[u8]) {
        self(match array {
            Array::Deployments => Element::Deployment(value),
            Array::Keys => Element::Key(value),
        })
    }
}

/// What a walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outline {
    pub revision: u64,
    pub deployments: usize,
    pub keys: usize,
}

/// Walks the document read from `reader`, showing every array element to `visit` in document
/// order. `block` is how many bytes are read at a time ([`BLOCK`] outside tests).
pub fn walk<R: Read>(reader: R, block: usize, visit: &mut impl Visit) -> Result<Outline, String> {
    let mut w = Walker {
        reader,
        buf: Vec::new(),
        start: 0,
        end: 0,
        consumed: 0,
        eof: false,
        block: block.max(1),
    };
    w.document(visit)
        .map_err(|e| format!("snapshot does not parse near byte {}: {e}", w.position()))
}

/// [`walk`] with the default block size.
pub fn walk_blocks<R: Read>(reader: R, visit: &mut impl Visit) -> Result<Outline, String> {
    walk(reader, BLOCK, visit)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Member {
    Revision,
    Deployments,
    Keys,
    Other,
}

struct Walker<R> {
    reader: R,
    buf: Vec<u8>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes dropped from the front of `buf` so far (for error positions).
    consumed: u64,
    eof: bool,
    block: usize,
}

impl<R: Read> Walker<R> {
    fn position(&self) -> u64 {
        self.consumed + self.start as u64
    }

    fn document(&mut self, visit: &mut impl Visit) -> Result<Outline, String> {
        let mut outline = Outline {
            revision: 0,
            deployments: 0,
            keys: 0,
        };
        let mut seen: [bool; 3] = [false; 3];
        self.expect(b'{', "a JSON object")?;
        if self.peek()? == Some(b'}') {
            self.start += 1;
        } else {
            loop {
                let member = self.member_name()?;
                self.expect(b':', "`:` after a member name")?;
                if let Some(i) = [Member::Revision, Member::Deployments, Member::Keys]
                    .iter()
                    .position(|m| *m == member)
                {
                    if seen[i] {
                        let name = ["revision", "deployments", "keys"][i];
                        return Err(format!("duplicate field `{name}`"));
                    }
                    seen[i] = true;
                }
                match member {
                    Member::Revision => {
                        let len = self.value_len()?;
                        outline.revision = serde_json::from_slice(self.take(len))
                            .map_err(|e| format!("revision: {e}"))?;
                    }
                    Member::Deployments => {
                        outline.deployments = self.array(Array::Deployments, visit)?
                    }
                    Member::Keys => outline.keys = self.array(Array::Keys, visit)?,
                    Member::Other => {
                        // Ignored, so not checked to be UTF-8 (serde does not check it either).
                        let len = self.value_len_unchecked()?;
                        self.take(len);
                    }
                }
                match self.peek()? {
                    Some(b',') => self.start += 1,
                    Some(b'}') => {
                        self.start += 1;
                        break;
                    }
                    _ => return Err("expected `,` or `}` in the object".to_owned()),
                }
            }
        }
        if !seen[0] {
            return Err("missing field `revision`".to_owned());
        }
        match self.peek()? {
            None => Ok(outline),
            Some(_) => Err("trailing characters".to_owned()),
        }
    }

    /// Reads a member name and tells which member it is (escapes decoded, as serde does).
    fn member_name(&mut self) -> Result<Member, String> {
        if self.peek()? != Some(b'"') {
            return Err("expected a member name".to_owned());
        }
        let len = self.value_len()?;
        let name: Cow<'_, str> =
            serde_json::from_slice(self.take(len)).map_err(|e| e.to_string())?;
        Ok(match &*name {
            "revision" => Member::Revision,
            "deployments" => Member::Deployments,
            "keys" => Member::Keys,
            _ => Member::Other,
        })
    }

    /// Reads an array, showing each element to `visit`; returns how many there were.
    fn array(&mut self, array: Array, visit: &mut impl Visit) -> Result<usize, String> {
        self.expect(b'[', "an array")?;
        let mut n = 0;
        if self.peek()? == Some(b']') {
            self.start += 1;
            return Ok(0);
        }
        loop {
            self.element(array, visit)?;
            n += 1;
            match self.peek()? {
                Some(b',') => self.start += 1,
                Some(b']') => {
                    self.start += 1;
                    return Ok(n);
                }
                _ => return Err("expected `,` or `]` in an array".to_owned()),
            }
        }
    }

    /// One element, at the next byte: read by the visitor's [`Visit::front`] if it can,
    /// otherwise delimited here and shown whole.
    fn element(&mut self, array: Array, visit: &mut impl Visit) -> Result<(), String> {
        let unread = &self.buf[self.start..self.end];
        match visit.front(array, unread) {
            Front::Read(len) => {
                self.start += len.clamp(1, unread.len().max(1));
                Ok(())
            }
            Front::Unread => {
                let len = self.value_len()?;
                visit.whole(array, self.take(len));
                Ok(())
            }
        }
    }

    /// Skips whitespace, then checks that the next byte is `byte` and steps over it.
    fn expect(&mut self, byte: u8, what: &str) -> Result<(), String> {
        if self.peek()? == Some(byte) {
            self.start += 1;
            Ok(())
        } else {
            Err(format!("expected {what}"))
        }
    }

    /// Skips whitespace and returns the next byte without consuming it; `None` at the end.
    fn peek(&mut self) -> Result<Option<u8>, String> {
        loop {
            while self.start < self.end {
                let b = self.buf[self.start];
                if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                    return Ok(Some(b));
                }
                self.start += 1;
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Consumes `len` bytes (already in the buffer) and returns them.
    fn take(&mut self, len: usize) -> &[u8] {
        let at = self.start;
        self.start += len;
        &self.buf[at..at + len]
    }

    /// The length of the JSON value that starts at the next byte (after whitespace), reading
    /// more until it is whole. Checks its syntax and that it is UTF-8.
    fn value_len(&mut self) -> Result<usize, String> {
        let len = self.value_len_unchecked()?;
        std::str::from_utf8(&self.buf[self.start..self.start + len])
            .map_err(|_| "a value is not UTF-8".to_owned())?;
        Ok(len)
    }

    /// [`Walker::value_len`] without the UTF-8 check.
    fn value_len_unchecked(&mut self) -> Result<usize, String> {
        if self.peek()?.is_none() {
            return Err("unexpected end of the document".to_owned());
        }
        loop {
            let unread = &self.buf[self.start..self.end];
            let mut values = serde_json::Deserializer::from_slice(unread).into_iter::<IgnoredAny>();
            match values.next() {
                Some(Ok(_)) => {
                    let len = values.byte_offset();
                    if len > MAX_VALUE_BYTES {
                        return Err(format!("a value is over {MAX_VALUE_BYTES} bytes"));
                    }
                    // A value that ends where the bytes end may go on (a number): read more.
                    if len < unread.len() || self.eof {
                        return Ok(len);
                    }
                }
                // Cut short by the end of what was read (a number cut after `-` or `.` reads
                // as invalid, not as cut): read more and look again.
                Some(Err(e)) if !self.eof && near_end(unread, &e) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("unexpected end of the document".to_owned()),
            }
            if unread.len() > MAX_VALUE_BYTES {
                return Err(format!("a value is over {MAX_VALUE_BYTES} bytes"));
            }
            if !self.fill()? {
                // At the end: the next round decides with `eof` set.
                continue;
            }
        }
    }

    /// Reads one more block. Returns false at the end of the input.
    fn fill(&mut self) -> Result<bool, String> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.consumed += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + self.block {
            self.buf.resize(self.end + self.block, 0);
        }
        loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    }
}

/// Whether `error`, from parsing `data`, lies in its last few bytes, where more input could
/// change it. Runs once per block read at most, so counting lines is cheap enough.
fn near_end(data: &[u8], error: &serde_json::Error) -> bool {
    const SLACK: usize = 64;
    if error.is_eof() {
        return true;
    }
    let line_start = if error.line() <= 1 {
        0
    } else {
        match memchr::memchr_iter(b'\n', data).nth(error.line() - 2) {
            Some(newline) => newline + 1,
            None => return true,
        }
    };
    line_start + error.column() + SLACK >= data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(doc: &[u8], block: usize) -> Result<(Outline, Vec<String>), String> {
        let mut seen = Vec::new();
        let outline = walk(doc, block, &mut |e: Element<'_>| {
            seen.push(match e {
                Element::Deployment(v) => format!("d {}", String::from_utf8_lossy(v)),
                Element::Key(v) => format!("k {}", String::from_utf8_lossy(v)),
            })
        })?;
        Ok((outline, seen))
    }

    /// What serde's derive makes of the same document, for comparison.
    fn reference(doc: &[u8]) -> Result<(u64, Vec<String>), String> {
        let (revision, elements) = crate::fuzzing::control::serde_snapshot(doc)?;
        let seen = elements
            .into_iter()
            .map(|(deployment, v)| format!("{} {v}", if deployment { "d" } else { "k" }))
            .collect();
        Ok((revision, seen))
    }

    const GOOD: &[&str] = &[
        r#"{"revision":7,"deployments":[{"id":"a"},{"id":"b","x":[1,2,{"y":"}]"}]}],"keys":[{"id":"k"}]}"#,
        r#" { "keys" : [ 1 , "two" , null ] , "extra" : {"deployments":[9]} , "revision" : 12345678901234 } "#,
        r#"{"revision":0}"#,
        r#"{"revision":1,"deployments":[],"keys":[]}"#,
        "{\"revi\\u0073ion\":3,\"deployments\":[\"\\\"]\\\\\"]}\n",
        r#"{"revision":1,"other":123456789,"keys":[-1.5e3]}"#,
    ];

    const BAD: &[&str] = &[
        "",
        "   ",
        "[]",
        r#"{"deployments":[]}"#,
        r#"{"revision":1,"revision":2}"#,
        r#"{"revision":1,"keys":[],"keys":[]}"#,
        r#"{"revision":-1}"#,
        r#"{"revision":1,"keys":null}"#,
        r#"{"revision":1,"keys":[1,]}"#,
        r#"{"revision":1,}"#,
        r#"{"revision":1,"keys":[{"id":"k"}"#,
        r#"{"revision":1,"keys":[{"id":"k"}]"#,
        r#"{"revision":1} x"#,
        r#"{"revision":1}{}"#,
        r#"{"revision":1,"keys":[{"id":"k" "x":1}]}"#,
        r#"{"revision":1,"keys":[tru]}"#,
        r#"{"revision":1 "keys":[]}"#,
        r#"{revision:1}"#,
        r#"{"revision":1,"keys":[12a]}"#,
    ];

    #[test]
    fn agrees_with_serde_at_every_block_size() {
        for doc in GOOD {
            let (revision, want) = reference(doc.as_bytes()).unwrap();
            for block in 1..=doc.len() + 1 {
                let (outline, got) = collect(doc.as_bytes(), block).unwrap();
                assert_eq!(outline.revision, revision, "{doc} at block {block}");
                assert_eq!(got, want, "{doc} at block {block}");
                let ds = got.iter().filter(|s| s.starts_with("d ")).count();
                assert_eq!(
                    (outline.deployments, outline.keys),
                    (ds, got.len() - ds),
                    "{doc}"
                );
            }
        }
    }

    #[test]
    fn refuses_what_serde_refuses_at_every_block_size() {
        for doc in BAD {
            assert!(
                reference(doc.as_bytes()).is_err(),
                "reference accepts {doc}"
            );
            for block in 1..=doc.len() + 1 {
                let err = collect(doc.as_bytes(), block).unwrap_err();
                assert!(err.starts_with("snapshot does not parse"), "{doc}: {err}");
            }
        }
    }

    #[test]
    fn refuses_invalid_utf8_and_oversized_values() {
        let mut doc = br#"{"revision":1,"keys":[{"x":"#.to_vec();
        doc.extend_from_slice(b"\"\xff\xfe\"}]}");
        let err = collect(&doc, 4).unwrap_err();
        assert!(err.contains("UTF-8"), "{err}");
        assert!(reference(&doc).is_err());
        // In a member that is ignored, serde does not look, and neither does the reader.
        let mut doc = br#"{"revision":1,"other":{"x":"#.to_vec();
        doc.extend_from_slice(b"\"\xff\xfe\"}}");
        assert!(reference(&doc).is_ok());
        assert_eq!(collect(&doc, 4).unwrap().0.revision, 1);

        let big = format!(
            r#"{{"revision":1,"keys":["{}"]}}"#,
            "a".repeat(MAX_VALUE_BYTES + 1)
        );
        let err = collect(big.as_bytes(), BLOCK).unwrap_err();
        assert!(err.contains("over"), "{err}");
    }

    #[test]
    fn a_snapshot_is_an_object_not_serdes_array_form() {
        // serde's derive reads `[0]` as revision 0 with no objects, which applied as a
        // snapshot would remove everything; the reader wants the object of SPEC §4.
        assert!(reference(b"[0]").is_ok());
        assert!(collect(b"[0]", 8).is_err());
        assert!(collect(b"[0, [], []]", 8).is_err());
    }

    #[test]
    fn errors_name_the_byte_position() {
        let doc = br#"{"revision":1,"keys":[{"id":"k"},  oops]}"#;
        let err = collect(doc, 3).unwrap_err();
        assert!(err.contains("near byte 35"), "{err}");
    }
}
