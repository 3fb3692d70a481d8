//! `Host` / `:authority` → slug, against a reference reading of SPEC §2 written independently
//! of [`crate::host`].
//!
//! Input: an optional first line naming an extra base domain (kept when
//! [`normalise_base_domain`] accepts it), then the host bytes.

use super::{Outcome, ensure, first_line};
use crate::host::{MAX_SLUG_LEN, MIN_SLUG_LEN, RESERVED, Slug, normalise_base_domain};

/// The base domains every input is checked against, before the input's own.
pub const BASES: [&str; 3] = ["arkor.app", "localhost", "eu.arkor.app"];

/// Checks [`Slug::from_host`], [`Slug::parse`] and [`normalise_base_domain`] on `data`.
pub fn check(data: &[u8]) -> Outcome {
    let mut bases: Vec<String> = BASES.iter().map(|b| (*b).to_owned()).collect();
    let host = match first_line(data) {
        Some((base, host)) => {
            let text = String::from_utf8_lossy(base);
            check_base_domain(&text)?;
            bases.extend(normalise_base_domain(&text));
            host
        }
        None => data,
    };
    let got = Slug::from_host(host, &bases);
    let want = reference_from_host(host, &bases);
    ensure!(
        got.map(|s| s.as_str().to_owned()) == want,
        "from_host({:?}, {bases:?}) = {got:?}, the SPEC reading gives {want:?}",
        String::from_utf8_lossy(host)
    );
    check_slug(host)?;
    if let Some(slug) = got {
        check_slug(slug.as_str().as_bytes())?;
    }
    Ok(())
}

/// [`Slug::parse`] agrees with the reference, and a parsed slug reads back as itself.
fn check_slug(label: &[u8]) -> Outcome {
    let got = Slug::parse(label);
    let want = reference_slug(label);
    ensure!(
        got.map(|s| s.as_str().to_owned()) == want,
        "parse({:?}) = {got:?}, the SPEC reading gives {want:?}",
        String::from_utf8_lossy(label)
    );
    if let Some(slug) = got {
        ensure!(
            Slug::parse(slug.as_str().as_bytes()) == Some(slug),
            "{slug:?} does not parse back to itself"
        );
    }
    Ok(())
}

/// A normalised base domain is lower case, has no trailing dot and normalises to itself.
fn check_base_domain(text: &str) -> Outcome {
    if let Some(base) = normalise_base_domain(text) {
        ensure!(
            !base.ends_with('.') && !base.bytes().any(|b| b.is_ascii_uppercase()),
            "normalise_base_domain({text:?}) = {base:?} is not normal"
        );
        ensure!(
            normalise_base_domain(&base).as_deref() == Some(base.as_str()),
            "normalise_base_domain is not idempotent on {base:?}"
        );
    }
    Ok(())
}

/// SPEC §2: lower-cased, port stripped, a trailing dot ignored, exactly `<slug>.<base>` for one
/// of the bases.
fn reference_from_host(host: &[u8], bases: &[String]) -> Option<String> {
    let text = std::str::from_utf8(host).ok()?;
    if text.is_empty() || text.starts_with('[') {
        return None;
    }
    let name = match text.rsplit_once(':') {
        Some((name, port)) => {
            let digits = port.bytes().all(|b| b.is_ascii_digit());
            if port.is_empty() || port.len() > 5 || !digits {
                return None;
            }
            name
        }
        None => text,
    };
    let name = name.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let (label, rest) = name.split_once('.')?;
    if !bases.iter().any(|b| b == rest) {
        return None;
    }
    reference_slug(label.as_bytes())
}

/// SPEC §2: 2–50 of `[a-z0-9-]` (after lower-casing), not starting or ending with `-`, not
/// reserved.
fn reference_slug(label: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(label).ok()?.to_ascii_lowercase();
    let ok = (MIN_SLUG_LEN..=MAX_SLUG_LEN).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
        && !RESERVED.contains(&text.as_str());
    ok.then_some(text)
}
