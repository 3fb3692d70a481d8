//! API keys: Bearer parsing and the SHA-256 [`KeyHash`] the registry is keyed by.
//!
//! The edge never keeps a plaintext key. A presented key is checked for shape, hashed on the stack,
//! and only its hash and its 12-character [`KeyPrefix`] (for logs) outlive this module.

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};

use crate::error::EdgeError;

/// Fixed start of every key.
pub const KEY_PREFIX: &str = "ark_live_";
/// Shortest random part after `ark_live_`.
pub const MIN_SECRET_LEN: usize = 24;
/// Longest key the edge will hash; anything longer cannot be a key.
pub const MAX_KEY_LEN: usize = 256;
/// How many leading characters of a key may appear in logs.
pub const LOG_PREFIX_LEN: usize = 12;

/// SHA-256 of a whole plaintext key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

/// A SHA-256 is already uniform: its first eight bytes are hash enough for a table (whose
/// hasher is seeded, so nobody can aim keys at one bucket).
impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

impl KeyHash {
    /// Hashes a plaintext key.
    pub fn of(key: &[u8]) -> KeyHash {
        KeyHash(Sha256::digest(key).into())
    }

    /// Parses the control plane's 64 lower-case hex digits.
    pub fn from_hex(hex_digits: &str) -> Option<KeyHash> {
        /// Lower-case hex digit values; 0xff marks every other byte.
        const NIBBLE: [u8; 256] = {
            let mut table = [0xff_u8; 256];
            let mut i = 0;
            while i < 10 {
                table[b'0' as usize + i] = i as u8;
                i += 1;
            }
            let mut i = 0;
            while i < 6 {
                table[b'a' as usize + i] = 10 + i as u8;
                i += 1;
            }
            table
        };
        let digits = hex_digits.as_bytes();
        if digits.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
            bad |= hi | lo;
            *byte = hi << 4 | lo;
        }
        // Valid digits are below 16; a refused byte sets the high bits.
        (bad < 16).then_some(KeyHash(out))
    }

    /// Lower-case hex, as the control plane writes it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not secret, but a short form keeps logs readable.
        write!(f, "KeyHash({}…)", &hex::encode(&self.0[..4]))
    }
}

/// The first 12 characters of a presented key, the most a log may show.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyPrefix {
    buf: [u8; LOG_PREFIX_LEN],
}

impl KeyPrefix {
    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf).unwrap_or("")
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.as_str())
    }
}

/// A key presented by a client, reduced to what the edge may keep.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PresentedKey {
    /// SHA-256 of the whole key.
    pub hash: KeyHash,
    /// First 12 characters, for logs.
    pub prefix: KeyPrefix,
}

impl fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey({:?})", self.prefix)
    }
}

/// Reads the Bearer key of a request, per SPEC §2 step 3: no `Authorization` → `MissingApiKey`;
/// more than one, another scheme or a token that is not shaped like a key → `InvalidApiKey`.
pub fn presented_key(headers: &HeaderMap) -> Result<PresentedKey, EdgeError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(EdgeError::MissingApiKey),
        (Some(v), None) => v.as_bytes(),
        (Some(_), Some(_)) => return Err(EdgeError::InvalidApiKey),
    };
    let token = bearer_token(value).ok_or(EdgeError::InvalidApiKey)?;
    if !is_key_shaped(token) {
        return Err(EdgeError::InvalidApiKey);
    }
    let mut prefix = [0u8; LOG_PREFIX_LEN];
    prefix.copy_from_slice(&token[..LOG_PREFIX_LEN]);
    Ok(PresentedKey {
        hash: KeyHash::of(token),
        prefix: KeyPrefix { buf: prefix },
    })
}

/// `Bearer <token>` with a case-insensitive scheme, spaces or tabs between, and optional trailing
/// white space (which header parsing usually already removed).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    let start = rest.iter().position(|b| *b != b' ' && *b != b'\t')?;
    if start == 0 {
        // "Bearerxyz": no separator.
        return None;
    }
    let token = &rest[start..];
    let end = token
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    Some(&token[..end])
}

/// `ark_live_` followed by at least 24 (and a bounded number of) `[A-Za-z0-9]`.
pub fn is_key_shaped(token: &[u8]) -> bool {
    token.len() >= KEY_PREFIX.len() + MIN_SECRET_LEN
        && token.len() <= MAX_KEY_LEN
        && token.starts_with(KEY_PREFIX.as_bytes())
        && token[KEY_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const KEY: &str = "ark_live_abcdefghijklmnopqrstuvwx";

    fn with_auth(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_schemes_and_spacing() {
        for v in [
            format!("Bearer {KEY}"),
            format!("bearer {KEY}"),
            format!("BEARER   {KEY}"),
            format!("Bearer\t{KEY}"),
        ] {
            let k = presented_key(&with_auth(&[&v])).unwrap();
            assert_eq!(k.hash, KeyHash::of(KEY.as_bytes()), "{v}");
            assert_eq!(k.prefix.as_str(), "ark_live_abc");
        }
    }

    #[test]
    fn missing_and_invalid() {
        assert_eq!(
            presented_key(&HeaderMap::new()),
            Err(EdgeError::MissingApiKey)
        );
        for v in [
            "Basic dXNlcjpwYXNz".to_owned(),
            format!("Bearer{KEY}"),
            "Bearer ".to_owned(),
            "Bearer".to_owned(),
            format!("Token {KEY}"),
            "Bearer ark_live_short".to_owned(),
            format!("Bearer {KEY}!"),
            format!("Bearer {KEY} extra"),
            format!("Bearer ark_test_{}", &KEY[9..]),
            format!("Bearer ark_live_{}", "a".repeat(300)),
        ] {
            assert_eq!(
                presented_key(&with_auth(&[&v])),
                Err(EdgeError::InvalidApiKey),
                "{v}"
            );
        }
        let ok = format!("Bearer {KEY}");
        assert_eq!(
            presented_key(&with_auth(&[&ok, &ok])),
            Err(EdgeError::InvalidApiKey)
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = presented_key(&with_auth(&[&format!("Bearer {KEY}")])).unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains(KEY));
        assert!(shown.contains("ark_live_abc"));
        assert!(!shown.contains("ark_live_abcd"));
    }

    #[test]
    fn hex_round_trip() {
        let h = KeyHash::of(KEY.as_bytes());
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex(&h.to_hex().to_uppercase()), None);
        assert_eq!(KeyHash::from_hex("abc"), None);
    }
}
