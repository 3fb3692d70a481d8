//! A strict RFC 8259 reader: every value type, iteratively (no recursion), bounded depth, and
//! string escapes checked (surrogates must pair). It only reads; [`super`] decides what to cut.

use super::MAX_DEPTH;
use crate::error::BodyProblem;

/// A strict RFC 8259 reader over bytes already known to be UTF-8.
pub(super) struct Scanner<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

impl Scanner<'_> {
    pub(super) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    pub(super) fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    pub(super) fn expect(&mut self, c: u8) -> Result<(), BodyProblem> {
        if self.bump() == Some(c) {
            Ok(())
        } else {
            Err(BodyProblem::NotJson)
        }
    }

    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Reads one value of any type, iteratively, at nesting `depth` (0 for the document).
    pub(super) fn value(&mut self, depth: usize) -> Result<(), BodyProblem> {
        self.ws();
        // A string, the most common member value, needs no container stack.
        if self.peek() == Some(b'"') {
            self.i += 1;
            return self.string().map(drop);
        }
        // true = object, false = array; bounded by MAX_DEPTH.
        let mut stack = [false; MAX_DEPTH];
        let mut top = 0usize;
        'value: loop {
            self.ws();
            match self.bump() {
                Some(open @ (b'{' | b'[')) => {
                    if depth + top + 1 > MAX_DEPTH {
                        return Err(BodyProblem::TooDeep);
                    }
                    let close = if open == b'{' { b'}' } else { b']' };
                    self.ws();
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        stack[top] = open == b'{';
                        top += 1;
                        if open == b'{' {
                            self.member_key()?;
                        }
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.literal(b"rue")?,
                Some(b'f') => self.literal(b"alse")?,
                Some(b'n') => self.literal(b"ull")?,
                Some(c @ (b'-' | b'0'..=b'9')) => self.number(c)?,
                _ => return Err(BodyProblem::NotJson),
            }
            // A value is complete: close containers until one expects another element.
            loop {
                if top == 0 {
                    return Ok(());
                }
                self.ws();
                let in_object = stack[top - 1];
                match self.bump() {
                    Some(b',') => {
                        if in_object {
                            self.ws();
                            self.member_key()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if in_object => top -= 1,
                    Some(b']') if !in_object => top -= 1,
                    _ => return Err(BodyProblem::NotJson),
                }
            }
        }
    }

    /// `"key" :` inside a nested object.
    fn member_key(&mut self) -> Result<(), BodyProblem> {
        self.expect(b'"')?;
        self.string()?;
        self.ws();
        self.expect(b':')
    }

    fn literal(&mut self, rest: &[u8]) -> Result<(), BodyProblem> {
        if self.b[self.i..].starts_with(rest) {
            self.i += rest.len();
            Ok(())
        } else {
            Err(BodyProblem::NotJson)
        }
    }

    /// A number whose first byte (`-` or a digit) was already read.
    fn number(&mut self, first: u8) -> Result<(), BodyProblem> {
        let lead = if first == b'-' {
            self.bump().ok_or(BodyProblem::NotJson)?
        } else {
            first
        };
        match lead {
            b'0' => {}
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return Err(BodyProblem::NotJson),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(BodyProblem::NotJson);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(BodyProblem::NotJson);
            }
        }
        Ok(())
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// A string whose opening quote was already read. Returns the raw content's range.
    pub(super) fn string(&mut self) -> Result<(usize, usize), BodyProblem> {
        let start = self.i;
        loop {
            // Plain bytes in one tight loop; the match below sees only the ones that matter.
            self.i += crate::search::string_special(&self.b[self.i..]);
            match self.bump() {
                Some(b'"') => return Ok((start, self.i - 1)),
                Some(b'\\') => self.escape()?,
                Some(c) if c < 0x20 => return Err(BodyProblem::NotJson),
                Some(_) => {}
                None => return Err(BodyProblem::NotJson),
            }
        }
    }

    /// One escape after its backslash; surrogates must come in proper pairs.
    fn escape(&mut self) -> Result<(), BodyProblem> {
        match self.bump() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(()),
            Some(b'u') => {
                let unit = self.hex4()?;
                if (0xDC00..0xE000).contains(&unit) {
                    return Err(BodyProblem::NotJson);
                }
                if (0xD800..0xDC00).contains(&unit) {
                    self.expect(b'\\')?;
                    self.expect(b'u')?;
                    let low = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(BodyProblem::NotJson);
                    }
                }
                Ok(())
            }
            _ => Err(BodyProblem::NotJson),
        }
    }

    fn hex4(&mut self) -> Result<u32, BodyProblem> {
        let v = hex4(&self.b[self.i..]).ok_or(BodyProblem::NotJson)?;
        self.i += 4;
        Ok(v)
    }
}

pub(super) fn hex4(b: &[u8]) -> Option<u32> {
    let digits = b.get(..4)?;
    let mut v = 0u32;
    for &d in digits {
        v = (v << 4) | char::from(d).to_digit(16)?;
    }
    Some(v)
}
