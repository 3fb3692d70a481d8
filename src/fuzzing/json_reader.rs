//! A second, independent JSON reader for the pinning checks: it keeps every member of an object
//! in order (duplicates included) and decodes keys the way Python's `json` module does.
//!
//! Keys decode to code points, as a Python `str` holds them: `\uXXXX` escapes are read, a high
//! surrogate escape directly followed by a low one is one code point, and a lone surrogate
//! (which Python accepts) stays a code point of its own. Keys therefore compare as Python
//! compares them: a key holding a lone surrogate equals no key spelled without one, and
//! `"m\u006fdel"` equals `"model"`. Where Python is more lenient than RFC 8259 in other ways
//! (`NaN`, `Infinity`) this reader is not: those are not JSON, and the edge refuses them.
//! Values keep their raw byte range, so a check can ask that bytes passed through unchanged.

use std::ops::Range;

/// Deepest nesting read; deeper input is refused (the pinner stops at 128).
pub const MAX_DEPTH: usize = 256;

/// A value, with the range of its bytes in the document.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the value's bytes are.
    pub raw: Range<usize>,
    /// What it is.
    pub kind: Kind,
}

/// The kinds of value; objects keep all members in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `null`, `true`, `false` or a number (its text is in [`Node::raw`]).
    Scalar,
    /// A string, decoded to code points.
    String(Vec<u32>),
    /// An array.
    Array(Vec<Node>),
    /// An object: every member, duplicates included, in document order.
    Object(Vec<Member>),
}

/// One object member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The decoded key.
    pub key: Vec<u32>,
    /// The value.
    pub value: Node,
}

impl Member {
    /// Whether the decoded key is exactly `name`.
    pub fn is(&self, name: &str) -> bool {
        self.key.iter().copied().eq(name.chars().map(u32::from))
    }
}

/// Reads a whole document (optional white space around one value). `Err` says where and why.
pub fn parse(b: &[u8]) -> Result<Node, String> {
    let text = std::str::from_utf8(b).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut r = Reader {
        b: text.as_bytes(),
        i: 0,
    };
    r.ws();
    let node = r.value(0)?;
    r.ws();
    if r.i != b.len() {
        return Err(format!("data after the document at {}", r.i));
    }
    Ok(node)
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at {}", self.i))
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(&format!("expected {:?}", char::from(c)))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, String> {
        let start = self.i;
        let kind = match self.peek() {
            Some(b'{') => self.object(depth + 1)?,
            Some(b'[') => self.array(depth + 1)?,
            Some(b'"') => Kind::String(self.string()?),
            Some(b't') => self.word("true")?,
            Some(b'f') => self.word("false")?,
            Some(b'n') => self.word("null")?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            _ => return self.err("expected a value"),
        };
        Ok(Node {
            raw: start..self.i,
            kind,
        })
    }

    fn object(&mut self, depth: usize) -> Result<Kind, String> {
        if depth > MAX_DEPTH {
            return self.err("too deep");
        }
        self.i += 1;
        let mut members = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Kind::Object(members));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.err("expected a key");
            }
            let key = self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            let value = self.value(depth)?;
            members.push(Member { key, value });
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Kind::Object(members));
                }
                _ => return self.err("expected ',' or '}'"),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Kind, String> {
        if depth > MAX_DEPTH {
            return self.err("too deep");
        }
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Kind::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Kind::Array(items));
                }
                _ => return self.err("expected ',' or ']'"),
            }
        }
    }

    fn word(&mut self, w: &str) -> Result<Kind, String> {
        if self.b[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(Kind::Scalar)
        } else {
            self.err("bad literal")
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Kind, String> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.err("bad number"),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return self.err("bad fraction");
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return self.err("bad exponent");
            }
        }
        Ok(Kind::Scalar)
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let Some(digits) = self.b.get(self.i..self.i + 4) else {
            return self.err("short \\u escape");
        };
        let text = std::str::from_utf8(digits).map_err(|e| e.to_string())?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return self.err("bad \\u escape");
        }
        let v = u32::from_str_radix(text, 16).map_err(|e| e.to_string())?;
        self.i += 4;
        Ok(v)
    }

    /// A string at its opening quote, decoded to code points (Python's rules for surrogates).
    fn string(&mut self) -> Result<Vec<u32>, String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("unterminated string");
            };
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.i += 1;
                    let esc = self.peek();
                    self.i += 1;
                    let unit = match esc {
                        Some(b'"') => 0x22,
                        Some(b'\\') => 0x5C,
                        Some(b'/') => 0x2F,
                        Some(b'b') => 0x08,
                        Some(b'f') => 0x0C,
                        Some(b'n') => 0x0A,
                        Some(b'r') => 0x0D,
                        Some(b't') => 0x09,
                        Some(b'u') => self.unicode_escape()?,
                        _ => return self.err("bad escape"),
                    };
                    out.push(unit);
                }
                0..=0x1F => return self.err("control character in a string"),
                _ => {
                    // Valid UTF-8 (checked up front): one whole character.
                    let rest = &self.b[self.i..];
                    let len = match c {
                        0x00..=0x7F => 1,
                        0xC0..=0xDF => 2,
                        0xE0..=0xEF => 3,
                        _ => 4,
                    };
                    let ch = std::str::from_utf8(&rest[..len.min(rest.len())])
                        .ok()
                        .and_then(|s| s.chars().next())
                        .ok_or_else(|| format!("bad UTF-8 at {}", self.i))?;
                    out.push(u32::from(ch));
                    self.i += len;
                }
            }
        }
    }

    /// After `\u`: one code point; a high surrogate takes a directly following low one with it,
    /// as Python does, and is kept alone otherwise.
    fn unicode_escape(&mut self) -> Result<u32, String> {
        let unit = self.hex4()?;
        if (0xD800..0xDC00).contains(&unit) && self.b[self.i..].starts_with(b"\\u") {
            let save = self.i;
            self.i += 2;
            let low = self.hex4()?;
            if (0xDC00..0xE000).contains(&low) {
                return Ok(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00));
            }
            self.i = save;
        }
        Ok(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<Vec<u32>> {
        match parse(text.as_bytes()).unwrap().kind {
            Kind::Object(m) => m.into_iter().map(|m| m.key).collect(),
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn keys_decode_like_python() {
        assert_eq!(
            keys(r#"{"m\u006fdel":1,"model":2}"#),
            vec![
                "model".chars().map(u32::from).collect::<Vec<_>>(),
                "model".chars().map(u32::from).collect()
            ]
        );
        // A pair is one code point; lone surrogates stay themselves.
        assert_eq!(keys(r#"{"\ud83d\ude00":1}"#), vec![vec![0x1F600]]);
        assert_eq!(keys(r#"{"\ud800x":1}"#), vec![vec![0xD800, u32::from('x')]]);
        assert_eq!(keys(r#"{"\udc00\ud800":1}"#), vec![vec![0xDC00, 0xD800]]);
        assert_eq!(
            keys(r#"{"\ud800\u0041":1}"#),
            vec![vec![0xD800, u32::from('A')]]
        );
    }

    #[test]
    fn refuses_what_rfc_8259_refuses() {
        for bad in [
            "",
            "{",
            "{\"a\":}",
            "[1,]",
            "NaN",
            "01",
            "1.",
            "\"\t\"",
            "{} x",
            "\u{feff}{}",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(parse(deep.as_bytes()).is_err());
    }
}
