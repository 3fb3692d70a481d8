//! Host → slug: every host rule of SPEC §2, applied once when a [`Slug`] is made.
//!
//! A `Slug` lives on the stack (at most 50 bytes), so turning a `Host` header into a lookup key
//! never allocates, whatever letter case the client used.

use std::fmt;

/// Longest slug, per SPEC §2.
pub const MAX_SLUG_LEN: usize = 50;
/// Shortest slug, per SPEC §2.
pub const MIN_SLUG_LEN: usize = 2;

/// Labels that are never served as deployments (SPEC §2). The control plane refuses them too;
/// the edge keeps exactly the contract's list so it never hides a slug the control plane allowed.
pub const RESERVED: [&str; 7] = ["www", "api", "admin", "app", "edge", "static", "status"];

/// A validated, lower-cased deployment slug.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Slug {
    buf: [u8; MAX_SLUG_LEN],
    len: u8,
}

/// Hashes the slug's own bytes, not the whole buffer (equal slugs have equal buffers: the
/// bytes past `len` are always zero).
impl std::hash::Hash for Slug {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.buf[..usize::from(self.len)]);
    }
}

impl Slug {
    /// Parses a bare slug (as the control plane sends it): 2–50 of `[a-z0-9-]`, not starting or
    /// ending with `-`, not reserved. Upper-case ASCII is folded to lower case.
    pub fn parse(label: &[u8]) -> Option<Slug> {
        if !(MIN_SLUG_LEN..=MAX_SLUG_LEN).contains(&label.len()) {
            return None;
        }
        let mut buf = [0u8; MAX_SLUG_LEN];
        for (slot, &b) in buf.iter_mut().zip(label) {
            let b = b.to_ascii_lowercase();
            if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return None;
            }
            *slot = b;
        }
        if buf[0] == b'-' || buf[label.len() - 1] == b'-' {
            return None;
        }
        let slug = Slug {
            buf,
            len: label.len() as u8,
        };
        if RESERVED.contains(&slug.as_str()) {
            return None;
        }
        Some(slug)
    }

    /// Extracts the slug from a `Host` / `:authority` value: lower-cased, port stripped, one
    /// trailing dot ignored, and exactly `<slug>.<base>` for one of `bases` (which must be
    /// lower-case, without leading or trailing dots).
    pub fn from_host<S: AsRef<str>>(host: &[u8], bases: &[S]) -> Option<Slug> {
        let name = strip_port(host)?;
        let name = name.strip_suffix(b".").unwrap_or(name);
        // A slug has no dot, so the label ends at the first one and the rest must be a base
        // (matching the rest against every base, not just the first whose suffix fits, keeps
        // `acme.eu.arkor.app` served when both `arkor.app` and `eu.arkor.app` are bases).
        let dot = memchr::memchr(b'.', name)?;
        let (label, base) = (&name[..dot], &name[dot + 1..]);
        bases
            .iter()
            .any(|b| base.eq_ignore_ascii_case(b.as_ref().as_bytes()))
            .then(|| Slug::parse(label))
            .flatten()
    }

    /// The slug as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII was admitted by `parse`.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

/// Removes `:port` (1–5 digits) from a host; refuses IPv6 literals and empty names.
fn strip_port(host: &[u8]) -> Option<&[u8]> {
    if host.is_empty() || host[0] == b'[' {
        return None;
    }
    match memchr::memrchr(b':', host) {
        None => Some(host),
        Some(i) => {
            let port = &host[i + 1..];
            if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(&host[..i])
        }
    }
}

impl fmt::Debug for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slug({})", self.as_str())
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Normalises a configured base domain: lower-cased, no trailing dot. `None` if it is not a
/// plausible DNS name of at least one label.
pub fn normalise_base_domain(base: &str) -> Option<String> {
    let base = base.strip_suffix('.').unwrap_or(base).to_ascii_lowercase();
    let ok = !base.is_empty()
        && base.len() <= 253
        && base.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    ok.then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASES: [&str; 2] = ["arkor.app", "localhost"];

    fn slug(host: &str) -> Option<String> {
        Slug::from_host(host.as_bytes(), &BASES).map(|s| s.as_str().to_owned())
    }

    #[test]
    fn accepts_the_spec_forms() {
        assert_eq!(
            slug("acme-support.arkor.app").as_deref(),
            Some("acme-support")
        );
        assert_eq!(
            slug("ACME-Support.Arkor.APP").as_deref(),
            Some("acme-support")
        );
        assert_eq!(slug("acme.arkor.app:443").as_deref(), Some("acme"));
        assert_eq!(slug("acme.arkor.app.").as_deref(), Some("acme"));
        assert_eq!(slug("acme.arkor.app.:8080").as_deref(), Some("acme"));
        assert_eq!(slug("demo.localhost:8080").as_deref(), Some("demo"));
        assert_eq!(slug("a1.arkor.app").as_deref(), Some("a1"));
        let fifty = "a".repeat(50);
        assert_eq!(slug(&format!("{fifty}.arkor.app")), Some(fifty));
    }

    #[test]
    fn refuses_everything_else() {
        for host in [
            "",
            "arkor.app",
            ".arkor.app",
            "a.arkor.app",
            "a.b.arkor.app",
            "-ab.arkor.app",
            "ab-.arkor.app",
            "a_b.arkor.app",
            "acme.arkor.app.evil.com",
            "acme.evilarkor.app",
            "acmearkor.app",
            "acme.arkor.ap",
            "www.arkor.app",
            "API.arkor.app",
            "status.arkor.app",
            "acme.arkor.app:",
            "acme.arkor.app:123456",
            "acme.arkor.app:80x",
            "acme.arkor.app..",
            "[::1]:8080",
            "127.0.0.1:8080",
            "acmé.arkor.app",
            "ac me.arkor.app",
            "acme.arkor.app:80:80",
        ] {
            assert_eq!(slug(host), None, "{host:?}");
        }
        let fifty_one = "a".repeat(51);
        assert_eq!(slug(&format!("{fifty_one}.arkor.app")), None);
    }

    #[test]
    fn a_base_inside_another_base_is_served() {
        let bases = ["arkor.app", "eu.arkor.app"];
        let slug = |host: &str| Slug::from_host(host.as_bytes(), &bases).map(|s| s.to_string());
        assert_eq!(slug("acme.eu.arkor.app").as_deref(), Some("acme"));
        assert_eq!(slug("eu.arkor.app").as_deref(), Some("eu"));
        assert_eq!(slug("acme.xx.arkor.app"), None);
    }

    #[test]
    fn base_domains_are_normalised() {
        assert_eq!(
            normalise_base_domain("Arkor.App.").as_deref(),
            Some("arkor.app")
        );
        assert_eq!(normalise_base_domain(""), None);
        assert_eq!(normalise_base_domain("a..b"), None);
        assert_eq!(normalise_base_domain("*.arkor.app"), None);
    }
}
