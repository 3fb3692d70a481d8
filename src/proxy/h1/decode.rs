//! A backend response body's framing decoded from the connection's read buffer (RFC 9112 §6,
//! §7.1): by length, chunked, or up to the close.
//!
//! The chunked decoder reads control bytes (sizes, line ends, trailers) in place and hands the
//! data of all the chunks in the read buffer on as one slice of it: no copy to another buffer,
//! and no allocation per chunk.

use bytes::{Buf, Bytes, BytesMut};
use http_body::SizeHint;

use super::wire::WireError;

/// Longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: u16 = 4096;
/// Largest trailer section accepted (trailers are read and dropped).
pub const MAX_TRAILERS: u16 = 16 * 1024;

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes, a slice of the read buffer.
    Data(Bytes),
    /// The buffer holds no more of the body: read more.
    NeedMore,
    /// The body ended; the bytes after it (if any) were left in the buffer.
    End,
}

/// The state of a response body's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// `Content-Length`: this many bytes left.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// Neither: the body ends when the connection closes.
    UntilClose,
    /// The body has ended.
    Done,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// In the hex size: its value, its digits, the line's length so far.
    Size {
        size: u64,
        digits: u8,
        line: u16,
    },
    /// In chunk extensions, ignored up to the CR.
    Ext {
        size: u64,
        line: u16,
    },
    /// After the size line's CR.
    SizeLf(u64),
    /// In chunk data: this many bytes left.
    Data(u64),
    /// After chunk data: CR, then LF.
    DataCr,
    DataLf,
    /// In the trailer section after the last chunk: the current line's length, the section's.
    Trailer {
        line: u16,
        total: u16,
    },
    /// After a trailer line's CR; `blank`: it ended the section.
    TrailerLf {
        blank: bool,
        total: u16,
    },
}

impl Decoder {
    /// A body of `n` bytes.
    pub fn length(n: u64) -> Decoder {
        if n == 0 {
            Decoder::Done
        } else {
            Decoder::Length(n)
        }
    }

    /// A chunked body, before its first size line.
    pub fn chunked() -> Decoder {
        Decoder::Chunked(Chunk::Size {
            size: 0,
            digits: 0,
            line: 0,
        })
    }

    /// Takes the next piece of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        match self {
            Decoder::Done => Ok(Decoded::End),
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *self = Decoder::length(*left - n as u64);
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Decoder::UntilClose if buf.is_empty() => Ok(Decoded::NeedMore),
            Decoder::UntilClose => Ok(Decoded::Data(buf.split().freeze())),
            Decoder::Chunked(state) => {
                let (decoded, ended) = chunked(state, buf)?;
                if ended {
                    *self = Decoder::Done;
                }
                Ok(decoded)
            }
        }
    }

    /// The connection closed with `decode` wanting more: the end of a body that runs to the
    /// close, an error for any other.
    pub fn at_close(&mut self) -> Result<(), WireError> {
        match self {
            Decoder::UntilClose | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(WireError::Closed),
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// The body's exact length when it is known.
    pub fn size_hint(&self) -> SizeHint {
        match self {
            Decoder::Length(n) => SizeHint::with_exact(*n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Decodes chunked framing from the front of `buf`. The data of every chunk that has come,
/// whole or in part, goes out as one slice: the framing between chunks is consumed in place and
/// the data after it moved forward over it, so a backend that sends faster than the client reads
/// costs one frame per read, not one per chunk, and still no copy to another buffer. Returns
/// whether the body ended too: after a chunk's last data, the framing that follows it in `buf`
/// is read ahead, so that the last data says it is the last.
fn chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<(Decoded, bool), WireError> {
    let mut read = 0; // bytes of `buf` consumed, framing and data
    let mut kept = 0; // data bytes moved to the front of `buf`
    let ended = loop {
        if let Chunk::Data(left) = state {
            let n = (buf.len() - read).min(usize::try_from(*left).unwrap_or(usize::MAX));
            if n == 0 {
                break false;
            }
            if kept != read {
                buf.copy_within(read..read + n, kept);
            }
            (read, kept) = (read + n, kept + n);
            *left -= n as u64;
            if *left != 0 {
                break false;
            }
            *state = Chunk::DataCr;
        }
        let (used, result) = control(state, &buf[read..]);
        read += used;
        match result {
            Ok(true) => break true,
            Ok(false) if matches!(state, Chunk::Data(_)) => {}
            Ok(false) => break false,
            // Data comes first; the next call meets the bad byte again and reports it.
            Err(_) if kept > 0 => break false,
            Err(e) => {
                buf.advance(read);
                return Err(e);
            }
        }
    };
    let decoded = if kept == 0 {
        buf.advance(read);
        if ended {
            Decoded::End
        } else {
            Decoded::NeedMore
        }
    } else {
        let mut data = buf.split_to(read);
        data.truncate(kept);
        Decoded::Data(data.freeze())
    };
    Ok((decoded, ended))
}

/// Reads control bytes from the front of `bytes` up to chunk data, the body's end (`Ok(true)`)
/// or the end of `bytes`; returns how many it used. On an error, those are the bytes before the
/// bad one.
fn control(state: &mut Chunk, bytes: &[u8]) -> (usize, Result<bool, WireError>) {
    let mut used = 0;
    // The usual framing between two chunks, CRLF then a bare size line, in one step.
    if *state == Chunk::DataCr && bytes.starts_with(b"\r\n") {
        used = 2;
        *state = Chunk::Size {
            size: 0,
            digits: 0,
            line: 0,
        };
    }
    if let Some((size, len)) = bare_size_line(*state, &bytes[used..]) {
        used += len;
        *state = match size {
            0 => Chunk::Trailer { line: 0, total: 0 },
            n => Chunk::Data(n),
        };
        if size != 0 {
            return (used, Ok(false));
        }
    }
    for &b in &bytes[used..] {
        match step(*state, b) {
            Ok(Step::Next(next)) => *state = next,
            Ok(Step::End) => return (used + 1, Ok(true)),
            Err(e) => return (used, Err(e)),
        }
        used += 1;
        if matches!(state, Chunk::Data(_)) {
            break;
        }
    }
    (used, Ok(false))
}

/// At the start of a size line, one without extensions that is whole in `buf`: the size and
/// the line's length with its CRLF. `step` would reach the same state byte by byte.
fn bare_size_line(state: Chunk, buf: &[u8]) -> Option<(u64, usize)> {
    let start = Chunk::Size {
        size: 0,
        digits: 0,
        line: 0,
    };
    if state != start {
        return None;
    }
    let digits = buf
        .iter()
        .take(17)
        .take_while(|b| b.is_ascii_hexdigit())
        .count();
    if digits == 0 || digits > 16 || buf.get(digits..digits + 2) != Some(b"\r\n") {
        return None;
    }
    let size = buf[..digits].iter().fold(0u64, |n, &b| n << 4 | hex(b));
    Some((size, digits + 2))
}

/// The value of a hex digit (0 for any other byte; callers check first).
fn hex(b: u8) -> u64 {
    u64::from(char::from(b).to_digit(16).unwrap_or_default())
}

enum Step {
    Next(Chunk),
    End,
}

/// One control byte of chunked framing.
fn step(state: Chunk, b: u8) -> Result<Step, WireError> {
    use Chunk::*;
    let next = match state {
        Size { size, digits, line } if line < MAX_CHUNK_LINE => match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if digits < 16 => Size {
                size: size << 4 | hex(b),
                digits: digits + 1,
                line: line + 1,
            },
            b';' | b' ' | b'\t' if digits > 0 => Ext {
                size,
                line: line + 1,
            },
            b'\r' if digits > 0 => SizeLf(size),
            _ => return Err(WireError::ChunkSize),
        },
        Ext { size, line } if line < MAX_CHUNK_LINE => match b {
            b'\r' => SizeLf(size),
            b'\n' => return Err(WireError::ChunkSize),
            _ => Ext {
                size,
                line: line + 1,
            },
        },
        SizeLf(0) if b == b'\n' => Trailer { line: 0, total: 0 },
        SizeLf(size) if b == b'\n' => Data(size),
        DataCr if b == b'\r' => DataLf,
        DataLf if b == b'\n' => Size {
            size: 0,
            digits: 0,
            line: 0,
        },
        Trailer { line, total } if total < MAX_TRAILERS => match b {
            b'\r' => TrailerLf {
                blank: line == 0,
                total: total + 1,
            },
            b'\n' => return Err(WireError::Trailers),
            _ => Trailer {
                line: line + 1,
                total: total + 1,
            },
        },
        TrailerLf { blank: true, .. } if b == b'\n' => return Ok(Step::End),
        TrailerLf { total, .. } if b == b'\n' => Trailer { line: 0, total },
        Size { .. } | Ext { .. } | SizeLf(_) => return Err(WireError::ChunkSize),
        DataCr | DataLf | Data(_) => return Err(WireError::ChunkEnd),
        Trailer { .. } | TrailerLf { .. } => return Err(WireError::Trailers),
    };
    Ok(Step::Next(next))
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
