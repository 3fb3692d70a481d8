//! The SNI / `Host` check (421 `misdirected_request`): a request may only reach the deployment
//! its TLS server name names, and a client that sends matching names is never refused.
//!
//! Input: the SNI on the first line (as rustls reports it, before [`normalise_sni`]), then the
//! `Host` / `:authority` bytes.

use super::host::BASES;
use super::{Outcome, ensure, first_line};
use crate::host::Slug;
use crate::router::same_host;
use crate::tls::normalise_sni;

/// Checks [`same_host`] with [`normalise_sni`] against the slugs both names resolve to.
pub fn check(data: &[u8]) -> Outcome {
    let Some((sni, host)) = first_line(data) else {
        return Ok(());
    };
    let Ok(sni) = std::str::from_utf8(sni) else {
        return Ok(());
    };
    let normal = normalise_sni(sni);
    // One trailing dot goes; a name ending in two is no DNS name, and rustls refuses it.
    ensure!(
        !normal.bytes().any(|b| b.is_ascii_uppercase())
            && (!normal.ends_with('.') || sni.ends_with("..")),
        "normalise_sni({sni:?}) = {normal:?} is not normal"
    );
    let matches = same_host(host, &normal);
    let host_slug = Slug::from_host(host, &BASES);
    // A DNS name has no port and no brackets: only such names can name a deployment.
    let sni_slug = if normal.contains([':', '[']) {
        None
    } else {
        Slug::from_host(normal.as_bytes(), &BASES)
    };
    if matches && host_slug.is_some() {
        ensure!(
            sni_slug == host_slug,
            "SNI {sni:?} passes for Host {:?}, but names {sni_slug:?} where the Host names \
             {host_slug:?}",
            String::from_utf8_lossy(host)
        );
    }
    if host_slug.is_some() {
        // The same name, as a browser would send it in both places: never misdirected.
        let name = host_name(host);
        if name.as_deref() == Some(&*normal) {
            ensure!(
                matches,
                "SNI {sni:?} names the Host {:?} itself, but is refused",
                String::from_utf8_lossy(host)
            );
        }
    }
    Ok(())
}

/// The name of a `Host` value: without its port and one trailing dot, lower-cased.
fn host_name(host: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(host).ok()?;
    let name = text.rsplit_once(':').map_or(text, |(name, _)| name);
    let name = name.strip_suffix('.').unwrap_or(name);
    Some(name.to_ascii_lowercase())
}
