//! Header names and values used on the request path, hop-by-hop filtering and request ids.
//!
//! Names are `static` so the hot path never parses a header name; values that never change are
//! built once.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

/// `retry-after-ms`, read by the OpenAI SDKs before `retry-after`.
pub static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `x-should-retry: false` tells the OpenAI SDKs not to retry at all.
pub static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// Request id, accepted from the client when well formed, sent upstream and back.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Tells nginx-like intermediaries not to buffer a stream.
pub static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
/// Client address as the edge saw it (replaces whatever the client sent).
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `application/json`.
pub static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Whether `name` is a hop-by-hop header (RFC 9110 §7.6.1), or a proxy-era one, never forwarded
/// either way. `te` is dropped too: the edge speaks for itself to each side. Names are compared
/// lower-case, as they are stored; a `match` on strings compares lengths first.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
    )
}

/// Removes hop-by-hop headers, including every name listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop_and(headers, |_| false);
}

/// [`strip_hop_by_hop`], and every header whose name `also` picks, in the same walk over the
/// message's names.
pub fn strip_hop_by_hop_and(headers: &mut HeaderMap, also: impl Fn(&str) -> bool) {
    // Names listed in `Connection` are hop-by-hop too; collect them before removing `Connection`.
    // The rare case allocates; a request without `Connection` tokens does not.
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    // The message's own names are walked once and only those picked are looked up again: a
    // message carries a handful of headers, and a removal per listed name would hash each.
    let picked: SmallVec<[HeaderName; 8]> = headers
        .keys()
        .filter(|name| hop_by_hop(name.as_str()) || also(name.as_str()))
        .cloned()
        .collect();
    for name in picked {
        headers.remove(name);
    }
}

/// The request id of one request: the client's when it is 1–128 visible ASCII characters,
/// otherwise a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (values.next(), values.next()) {
        let bytes = v.as_bytes();
        if (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
            // Cloning a HeaderValue shares its bytes: no copy.
            return v.clone();
        }
    }
    RequestIds::global().next()
}

/// Generates request ids: a per-process random prefix and a counter, so ids are unique across
/// restarts and replicas without a random draw per request.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn global() -> &'static RequestIds {
        static IDS: std::sync::OnceLock<RequestIds> = std::sync::OnceLock::new();
        IDS.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            // RandomState is seeded from the OS once per process; that is all the randomness
            // an id prefix needs.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            RequestIds {
                prefix: h.finish(),
                counter: AtomicU64::new(0),
            }
        })
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 36];
        buf[..4].copy_from_slice(b"req_");
        hex_into(&mut buf[4..20], self.prefix);
        hex_into(&mut buf[20..36], n);
        // Only ASCII hex digits and '_': always a valid header value.
        small_value(&buf).unwrap_or_else(|| HeaderValue::from_static("req_"))
    }
}

/// Bytes of one block of [`small_value`]s: about a hundred request ids.
const SMALL_VALUE_BLOCK: usize = 4096;

thread_local! {
    /// The unused rest of this thread's current block.
    static SMALL_VALUES: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value made per request (a request id, a content length), cut from a per-thread
/// block: the value shares the block, so making it (and cloning it for both directions) costs
/// no allocation of its own; a block is allocated once per ~4 KiB of values, and freed when
/// the last value cut from it is dropped. `None` when `bytes` is not a valid header value.
pub fn small_value(bytes: &[u8]) -> Option<HeaderValue> {
    let cut = SMALL_VALUES.try_with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() - block.len() < bytes.len() {
            *block = BytesMut::with_capacity(SMALL_VALUE_BLOCK.max(bytes.len()));
        }
        block.extend_from_slice(bytes);
        block.split().freeze()
    });
    let bytes = cut.unwrap_or_else(|_| Bytes::copy_from_slice(bytes));
    HeaderValue::from_maybe_shared(bytes).ok()
}

/// A `content-length` value for `len`, by [`small_value`].
pub fn content_length(len: usize) -> HeaderValue {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = len;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    small_value(&digits[at..]).unwrap_or_else(|| HeaderValue::from(len))
}

fn hex_into(out: &mut [u8], value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = (15 - i) * 4;
        *slot = DIGITS[((value >> shift) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_share_blocks_and_stay_intact() {
        let values: Vec<HeaderValue> = (0..500usize).map(content_length).collect();
        for (n, v) in values.iter().enumerate() {
            assert_eq!(v.to_str().unwrap(), n.to_string());
        }
        assert_eq!(
            content_length(usize::MAX).to_str().unwrap(),
            usize::MAX.to_string()
        );
        let big = "x".repeat(SMALL_VALUE_BLOCK + 10);
        assert_eq!(
            small_value(big.as_bytes()).unwrap().as_bytes(),
            big.as_bytes()
        );
        assert!(small_value(b"bad\nvalue").is_none());
        // Ids from a block are distinct values.
        let (a, b) = (RequestIds::global().next(), RequestIds::global().next());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["content-type"], "application/json");
    }

    #[test]
    fn request_id_from_client_when_well_formed() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");

        let long = "a".repeat(129);
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(&long).unwrap());
        assert!(request_id(&h).to_str().unwrap().starts_with("req_"));

        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(request_id(&h).to_str().unwrap().starts_with("req_"));

        h.insert(&X_REQUEST_ID, HeaderValue::from_static(""));
        assert!(request_id(&h).to_str().unwrap().starts_with("req_"));

        let max = "b".repeat(128);
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(&max).unwrap());
        assert_eq!(request_id(&h), max.as_str());

        h.append(&X_REQUEST_ID, HeaderValue::from_static("second"));
        assert!(request_id(&h).to_str().unwrap().starts_with("req_"));
    }

    #[test]
    fn generated_ids_are_distinct() {
        let h = HeaderMap::new();
        let a = request_id(&h);
        let b = request_id(&h);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }
}
