//! `Authorization` → key, against a reference reading of SPEC §2 step 3 and §3 written
//! independently of [`crate::auth`].
//!
//! Input: `\n`-separated `Authorization` values (none, one or several headers); the last line
//! also goes to [`KeyHash::from_hex`].

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use super::{Outcome, ensure};
use crate::auth::{KeyHash, LOG_PREFIX_LEN, presented_key};
use crate::error::EdgeError;

/// Most `Authorization` headers one input makes.
const MAX_HEADERS: usize = 4;

/// Checks [`presented_key`], [`crate::auth::is_key_shaped`] and the [`KeyHash`] hex forms.
pub fn check(data: &[u8]) -> Outcome {
    let mut headers = HeaderMap::new();
    let lines: Vec<&[u8]> = if data.is_empty() {
        Vec::new()
    } else {
        data.split(|b| *b == b'\n').take(MAX_HEADERS).collect()
    };
    for line in &lines {
        // hyper never hands the router a value `HeaderValue` refuses.
        let Ok(value) = HeaderValue::from_bytes(line) else {
            return Ok(());
        };
        headers.append(AUTHORIZATION, value);
    }
    let got = presented_key(&headers);
    let want = reference(&lines);
    match (&got, &want) {
        (Ok(key), Ok(token)) => {
            ensure!(
                key.hash.0 == <[u8; 32]>::from(Sha256::digest(token)),
                "the hash of {:?} is not its SHA-256",
                String::from_utf8_lossy(token)
            );
            ensure!(
                key.prefix.as_str().as_bytes() == &token[..LOG_PREFIX_LEN],
                "the log prefix {:?} is not the key's first {LOG_PREFIX_LEN} characters",
                key.prefix
            );
            let shown = format!("{key:?}");
            ensure!(
                !shown.contains(&*String::from_utf8_lossy(&token[..LOG_PREFIX_LEN + 1])),
                "Debug shows more than the prefix: {shown}"
            );
        }
        (Err(a), Err(b)) => ensure!(
            a == b,
            "presented_key = {a:?}, the SPEC reading gives {b:?}"
        ),
        _ => {
            return Err(format!(
                "presented_key({lines:?}) = {got:?}, the SPEC reading gives {:?}",
                want.map(|t| String::from_utf8_lossy(t).into_owned())
            ));
        }
    }
    if let Some(last) = lines.last() {
        check_hex(&String::from_utf8_lossy(last))?;
    }
    Ok(())
}

/// `KeyHash::from_hex` takes exactly the control plane's form and round-trips it.
fn check_hex(text: &str) -> Outcome {
    let want = text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let got = KeyHash::from_hex(text);
    ensure!(
        got.is_some() == want,
        "from_hex({text:?}) = {got:?}, expected {}",
        if want { "a hash" } else { "none" }
    );
    if let Some(hash) = got {
        ensure!(
            hash.to_hex() == text,
            "from_hex({text:?}) does not round-trip"
        );
    }
    let of = KeyHash::of(text.as_bytes());
    ensure!(
        KeyHash::from_hex(&of.to_hex()) == Some(of),
        "to_hex of {of:?} does not parse back"
    );
    Ok(())
}

/// SPEC §2 step 3: exactly one header, `Bearer` in any case, spaces or tabs, then a token
/// shaped like a key (§3: `ark_live_` and 24–247 ASCII letters or digits); trailing spaces or
/// tabs are not part of it.
fn reference<'a>(lines: &[&'a [u8]]) -> Result<&'a [u8], EdgeError> {
    let value = match lines {
        [] => return Err(EdgeError::MissingApiKey),
        [one] => *one,
        _ => return Err(EdgeError::InvalidApiKey),
    };
    let scheme = value.get(..6).ok_or(EdgeError::InvalidApiKey)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(EdgeError::InvalidApiKey);
    }
    let rest = &value[6..];
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    if !rest.first().is_some_and(is_space) {
        return Err(EdgeError::InvalidApiKey);
    }
    let start = rest.iter().position(|b| !is_space(b)).unwrap_or(rest.len());
    let end = rest
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    let token = &rest[start..end.max(start)];
    let secret = token
        .strip_prefix(b"ark_live_")
        .ok_or(EdgeError::InvalidApiKey)?;
    if secret.len() < 24 || token.len() > 256 || !secret.iter().all(u8::is_ascii_alphanumeric) {
        return Err(EdgeError::InvalidApiKey);
    }
    Ok(token)
}
