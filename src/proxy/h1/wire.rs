//! HTTP/1.1 on the wire to a backend (RFC 9112): the request head written, the response head
//! parsed and its body's framing chosen (the body is decoded by [`super::decode`]). Functions
//! over buffers, no I/O, so the tests and the fuzz target drive them byte by byte.

use std::fmt;
use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};

use super::decode::Decoder;

/// Most header lines a response head may have.
pub const MAX_HEADERS: usize = 100;
/// Largest response head accepted; each interim (1xx) response before it is held to it too.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers the edge adds to a response it passes on.
const EDGE_HEADERS: usize = 6;

/// A response that is not well-formed HTTP/1.1, or that ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The head does not parse (httparse's reason).
    Head(httparse::Error),
    /// The head is larger than [`MAX_HEAD`].
    HeadTooLarge,
    /// A `101 Switching Protocols`, never asked for.
    Upgrade,
    /// More than `MAX_INTERIM` interim (1xx) responses before the final one.
    Interim,
    /// `Content-Length` is not one decimal number.
    ContentLength,
    /// A chunk-size line is malformed or too long.
    ChunkSize,
    /// Chunk data is not followed by CRLF.
    ChunkEnd,
    /// The trailer section is malformed or too large.
    Trailers,
    /// The connection closed before the response's end.
    Closed,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Head(e) => write!(f, "malformed response head: {e}"),
            WireError::HeadTooLarge => write!(f, "response head larger than {MAX_HEAD} bytes"),
            WireError::Upgrade => f.write_str("unrequested protocol switch"),
            WireError::Interim => write!(f, "more than {MAX_INTERIM} interim (1xx) responses"),
            WireError::ContentLength => f.write_str("invalid content-length"),
            WireError::ChunkSize => f.write_str("malformed chunk size line"),
            WireError::ChunkEnd => f.write_str("chunk data not followed by CRLF"),
            WireError::Trailers => f.write_str("malformed or oversized trailers"),
            WireError::Closed => f.write_str("connection closed before the response ended"),
        }
    }
}

impl std::error::Error for WireError {}

/// Appends a request head to `out`: the request line with `target` (origin form), then
/// `headers` as they are. The `http` types hold no CR or LF, so nothing can be injected.
pub fn write_head(out: &mut Vec<u8>, method: &Method, target: &str, headers: &HeaderMap) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head: the response (its body is the decoder of its framing) and whether
/// the connection may carry another exchange once the body was read to its end.
#[derive(Debug)]
pub struct Head {
    pub response: Response<Decoder>,
    pub keep_alive: bool,
}

/// Interim (1xx) responses accepted before a final one: a backend may send `100 Continue` and
/// a few `103 Early Hints`; one that keeps sending them would hold the request until
/// `timeouts.upstream_first_byte` while the edge parses them.
pub const MAX_INTERIM: u32 = 8;

/// Parses the response head at the front of `buf` and removes it; `Ok(None)` while it is
/// incomplete. Interim (1xx) responses before it are removed and skipped, counted in `interim`
/// (the request's count across calls; more than [`MAX_INTERIM`] is an error). `head_request`:
/// the request was a HEAD, so no body follows whatever the head says.
pub fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    interim: &mut u32,
) -> Result<Option<Head>, WireError> {
    loop {
        if buf.is_empty() {
            // Before the first read, or when interim responses were all the buffer held: what
            // httparse would say, without the set-up below.
            return Ok(None);
        }
        // Where each name and value lies in `buf`, so they can be sliced once it is frozen
        // (offsets below MAX_HEAD fit in u32; the array is zeroed per parse, so it is kept small).
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
            Ok(_) => return Err(WireError::HeadTooLarge),
            Err(e) => return Err(WireError::Head(e)),
        };
        let code = parsed.code.unwrap_or_default();
        let http10 = parsed.version == Some(0);
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            let (name, value) = (offset(h.name.as_bytes()), offset(h.value));
            *span = (
                name,
                name + h.name.len() as u32,
                value,
                value + h.value.len() as u32,
            );
        }
        let count = parsed.headers.len();
        if code == 101 {
            return Err(WireError::Upgrade);
        }
        if (100..200).contains(&code) {
            *interim += 1;
            if *interim > MAX_INTERIM {
                return Err(WireError::Interim);
            }
            buf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| WireError::Head(httparse::Error::Status))?;
        let head = buf.split_to(len).freeze();
        // Room for the headers the edge adds on the way to the client (request id, CORS,
        // the event-stream pair), so that adding them does not grow the map twice.
        let mut map = HeaderMap::with_capacity(count + EDGE_HEADERS);
        for &(n0, n1, v0, v1) in &spans[..count] {
            let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
            // httparse checked both (token characters; no CR, LF or NUL in values).
            let name = HeaderName::from_bytes(&head[n0..n1])
                .map_err(|_| WireError::Head(httparse::Error::HeaderName))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
                .map_err(|_| WireError::Head(httparse::Error::HeaderValue))?;
            map.append(name, value);
        }
        let no_body = head_request || matches!(code, 204 | 304);
        let (decoder, framed) = if no_body {
            (Decoder::Done, true)
        } else {
            framing(&map)?
        };
        let keep_alive = framed && persistent(&map, http10);
        let mut response = Response::new(decoder);
        *response.status_mut() = status;
        *response.version_mut() = if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *response.headers_mut() = map;
        return Ok(Some(Head {
            response,
            keep_alive,
        }));
    }
}

/// The body's framing (RFC 9112 §6.3), and whether it leaves the connection in a known state.
/// `Transfer-Encoding` wins over `Content-Length`; with both, the connection is not reused.
fn framing(headers: &HeaderMap) -> Result<(Decoder, bool), WireError> {
    let te = headers.get_all(http::header::TRANSFER_ENCODING);
    if te.iter().next().is_some() {
        let last = te.iter().flat_map(tokens).last();
        let sized = headers.contains_key(http::header::CONTENT_LENGTH);
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => (Decoder::chunked(), !sized),
            _ => (Decoder::UntilClose, false),
        });
    }
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        if value.as_bytes().trim_ascii().is_empty() {
            return Err(WireError::ContentLength);
        }
        for token in tokens(value) {
            let n = parse_decimal(token).ok_or(WireError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Decoder::length(n), true),
        None => (Decoder::UntilClose, false),
    })
}

/// Whether the connection stays open after this response: HTTP/1.1 unless it says `close`,
/// HTTP/1.0 only when it says `keep-alive`.
fn persistent(headers: &HeaderMap, http10: bool) -> bool {
    let has = |word: &[u8]| {
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .any(|t| t.eq_ignore_ascii_case(word))
    };
    if http10 {
        has(b"keep-alive")
    } else {
        !has(b"close")
    }
}

/// The comma-separated elements of a header value, trimmed, empty ones skipped.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
