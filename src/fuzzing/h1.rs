//! The backend HTTP/1.1 response reader (`proxy::h1::wire` and `decode`) over a response cut at arbitrary
//! points: the same head, body, ending and unread bytes whatever the cuts; every byte accounted
//! for; a chunked body equal to a whole-buffer reading of RFC 9112 with the decoder's limits, and
//! a sized body equal to the bytes after the head.
//!
//! Input: one selector byte (bit 0: the request was a HEAD), eight seed bytes for the cuts, then
//! the bytes the backend sent.

use bytes::BytesMut;
use http::Version;

use super::{Outcome, ensure, splits};
use crate::proxy::h1::decode::{Decoded, Decoder, MAX_CHUNK_LINE, MAX_TRAILERS};
use crate::proxy::h1::wire::{WireError, parse_head};

/// Bytes before the response: selector and seed.
const HEADER: usize = 9;

/// What one cutting of the response read to: a head error, an incomplete head, or this.
type Summary = Result<Option<Box<Parsed>>, WireError>;

#[derive(Debug, PartialEq)]
struct Parsed {
    status: u16,
    version: Version,
    headers: Vec<(String, Vec<u8>)>,
    keep_alive: bool,
    decoder: Decoder,
    head_len: usize,
    body: Vec<u8>,
    ending: Ending,
    /// The bytes after the body's end (only when it ended with `End`).
    leftover: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum Ending {
    End,
    Close,
    Error(WireError),
}

/// Reads `data[9..]` as a backend's response under every cutting and checks the readings.
pub fn check(data: &[u8]) -> Outcome {
    let Some((header, response)) = data.split_at_checked(HEADER) else {
        return Ok(());
    };
    let (head_request, seed) = (header[0] & 1 != 0, &header[1..]);
    let mut results = Vec::new();
    for pieces in splits(response, seed) {
        results.push(read(response.len(), &pieces, head_request)?);
    }
    let whole = &results[0];
    for r in &results[1..] {
        ensure!(
            r == whole,
            "the reading depends on the cuts:\n{r:?}\nvs whole\n{whole:?}"
        );
    }
    let Ok(Some(p)) = whole else {
        return Ok(());
    };
    let after = &response[p.head_len..];
    if p.ending == Ending::End {
        // Every byte accounted for: head + body (+ chunk framing) + unread = the response.
        ensure!(
            after.ends_with(&p.leftover),
            "the unread bytes are not the tail"
        );
        let (consumed, body) = (after.len() - p.leftover.len(), p.body.len());
        let framed = matches!(p.decoder, Decoder::Chunked(_));
        ensure!(
            consumed == body || framed && consumed > body,
            "head {} + body {body} + unread {} of {} bytes",
            p.head_len,
            p.leftover.len(),
            response.len()
        );
    }
    match p.decoder {
        Decoder::Chunked(_) => {
            let want = reference_chunked(after);
            if let Some((body, consumed)) = &want {
                ensure!(
                    p.ending == Ending::End && p.body == *body && p.leftover == after[*consumed..],
                    "a valid chunked body ({consumed} bytes) read as {:?}, body {:?}, unread {:?}",
                    p.ending,
                    String::from_utf8_lossy(&p.body),
                    String::from_utf8_lossy(&p.leftover)
                );
            }
            ensure!(
                p.ending != Ending::End || want.is_some(),
                "the decoder ended a chunked body the reference refuses"
            );
        }
        Decoder::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let (want, ending) = match after.get(..n) {
                Some(b) => (b, Ending::End),
                None => (after, Ending::Error(WireError::Closed)),
            };
            ensure!(
                p.body == want && p.ending == ending,
                "a {n}-byte body is not the bytes after the head, or ended {:?}",
                p.ending
            );
        }
        Decoder::UntilClose => ensure!(
            p.body == after && p.ending == Ending::Close,
            "a body read to the close is not the rest of the response"
        ),
        Decoder::Done => ensure!(
            p.body.is_empty() && p.ending == Ending::End,
            "an empty body read as {:?}",
            p.ending
        ),
    }
    Ok(())
}

/// Feeds `pieces` one at a time to the head parser, then to the body decoder.
fn read(total: usize, pieces: &[&[u8]], head_request: bool) -> Result<Summary, String> {
    let mut buf = BytesMut::new();
    let mut next = pieces.iter();
    let mut interim = 0;
    let head = loop {
        match parse_head(&mut buf, head_request, &mut interim) {
            Ok(Some(head)) => break head,
            Ok(None) => match next.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Ok(Ok(None)),
            },
            Err(e) => return Ok(Err(e)),
        }
    };
    let head_len = total - buf.len() - next.clone().map(|p| p.len()).sum::<usize>();
    let (parts, mut decoder) = head.response.into_parts();
    let initial = decoder;
    let mut body = Vec::new();
    let mut leftover = Vec::new();
    let ending = loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(d)) => {
                ensure!(!d.is_empty(), "an empty data frame");
                body.extend_from_slice(&d);
            }
            Ok(Decoded::NeedMore) => match next.next() {
                Some(p) => buf.extend_from_slice(p),
                None => match decoder.at_close() {
                    Ok(()) => break Ending::Close,
                    Err(e) => break Ending::Error(e),
                },
            },
            Ok(Decoded::End) => {
                leftover.extend_from_slice(&buf);
                leftover.extend(next.flat_map(|p| p.iter().copied()));
                break Ending::End;
            }
            Err(e) => break Ending::Error(e),
        }
    };
    let done = matches!(ending, Ending::End | Ending::Close);
    ensure!(decoder.is_done() == done, "done: {done}, after {ending:?}");
    let headers = parts.headers.iter();
    Ok(Ok(Some(Box::new(Parsed {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: headers
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        keep_alive: head.keep_alive,
        decoder: initial,
        head_len,
        body,
        ending,
        leftover,
    }))))
}

/// A whole-buffer reading of a chunked body (RFC 9112 §7.1) at the front of `b`, with the
/// decoder's limits: the body and the bytes it took, or `None` when `b` does not start with a
/// complete, valid one.
fn reference_chunked(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line = crlf_line(&b[at..])?;
        at += line.len() + 2;
        let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        let (hex, ext) = line.split_at(digits);
        let ext_ok = ext.first().is_none_or(|c| matches!(c, b';' | b' ' | b'\t'));
        if !(1..=16).contains(&digits) || !ext_ok || line.len() >= usize::from(MAX_CHUNK_LINE) {
            return None;
        }
        let size = hex.iter().fold(0u64, |n, c| n << 4 | hex_value(*c));
        if size == 0 {
            break;
        }
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        body.extend_from_slice(b.get(at..end)?);
        if b.get(end..end + 2)? != b"\r\n" {
            return None;
        }
        at = end + 2;
    }
    let mut trailers = 0;
    loop {
        let line = crlf_line(&b[at..])?;
        at += line.len() + 2;
        trailers += line.len() + 1;
        if trailers > usize::from(MAX_TRAILERS) {
            return None;
        }
        if line.is_empty() {
            return Some((body, at));
        }
    }
}

/// The line at the front of `b` without its CRLF: up to the first LF, which must follow the
/// line's only CR.
fn crlf_line(b: &[u8]) -> Option<&[u8]> {
    let (line, _) = super::first_line(b)?;
    let line = line.strip_suffix(b"\r")?;
    (!line.contains(&b'\r')).then_some(line)
}

fn hex_value(c: u8) -> u64 {
    u64::from(char::from(c).to_digit(16).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_reads_chunked_bodies_within_the_decoder_limits() {
        let r = |b: &[u8]| reference_chunked(b).map(|(body, n)| (String::from_utf8(body), n));
        let wire = b"5;a=b\r\nhello\r\n1 \r\n!\r\n0\r\nx: 1\r\n\r\nNEXT";
        assert_eq!(r(wire), Some((Ok("hello!".into()), 32)));
        for bad in [
            &b"5\r\nhello\r\n0\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"x\r\n",
        ] {
            assert_eq!(reference_chunked(bad), None);
        }
        // At and just past each limit, the check (so the decoder) agrees with the reference.
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let ext = |n: usize| format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(n - 2));
        let trailers = |n: usize| format!("0\r\n{}\r\n\r\n", "t".repeat(n - 2));
        let (line, section) = (usize::from(MAX_CHUNK_LINE), usize::from(MAX_TRAILERS));
        for (body, valid) in [
            (ext(line - 1), true),
            (ext(line), false),
            (trailers(section), true),
            (trailers(section + 1), false),
        ] {
            assert_eq!(reference_chunked(body.as_bytes()).is_some(), valid);
            let input = [&[0u8; HEADER][..], head.as_bytes(), body.as_bytes()].concat();
            assert_eq!(check(&input), Ok(()));
        }
    }
}
