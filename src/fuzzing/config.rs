//! The configuration file: any text either is refused with messages, or is a configuration the
//! edge can start from — its pools build, its addresses and base domains read, and every
//! duration can be added to the current time (the request path sets deadlines with them).
//!
//! Input: the TOML text. Texts naming a `*_file` credential are skipped, so the fuzzer never
//! makes the check read files of the machine it runs on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Outcome, ensure};
use crate::config::Config;
use crate::limits::{RateLimitConfig, RateLimiter};
use crate::proxy::pool::Pools;

/// Checks [`Config::from_toml`] and what a valid configuration must allow.
pub fn check(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    if names_a_file(text) {
        return Ok(());
    }
    let Ok(config) = Config::from_toml(text, PathBuf::from("/nonexistent/arkor-edge-fuzz")) else {
        return Ok(());
    };
    Pools::from_config(
        &config.pools,
        config.timeouts.upstream_connect,
        config.workers(),
    )
    .map_err(|e| format!("a valid configuration's pools do not build: {e}"))?;
    ensure!(
        config.normalised_base_domains().len() == config.base_domains.len(),
        "a valid configuration has a base domain that does not normalise: {:?}",
        config.base_domains
    );
    ensure!(
        config.http_addr().is_some() != config.listen.http.is_empty()
            && config.https_addr().is_some() != config.listen.https.is_empty()
            && config.admin_addr().is_some() != config.listen.admin.is_empty(),
        "a valid configuration has a listen address that does not read: {:?}",
        config.listen
    );
    if let Some(r) = &config.rate_limits {
        let limits = RateLimitConfig {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        };
        RateLimiter::new(limits, r.max_subjects);
    }
    let now = Instant::now();
    for (name, d) in durations(&config) {
        ensure!(
            now.checked_add(d).is_some(),
            "a valid configuration's {name} = {d:?} overflows a deadline"
        );
    }
    Ok(())
}

/// Whether the text names a credential file anywhere (keys are read decoded, as the config
/// parser reads them).
fn names_a_file(text: &str) -> bool {
    fn walk(v: &toml::Value) -> bool {
        match v {
            toml::Value::Table(t) => t.iter().any(|(k, v)| k.ends_with("_file") || walk(v)),
            toml::Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    match toml::from_str::<toml::Table>(text) {
        Ok(t) => t.iter().any(|(k, v)| k.ends_with("_file") || walk(v)),
        // Not TOML: the config parser refuses it before reading anything.
        Err(_) => false,
    }
}

/// Every duration of a configuration, with its field name.
fn durations(c: &Config) -> Vec<(String, Duration)> {
    let t = &c.timeouts;
    let cp = &c.control_plane;
    let mut out: Vec<(String, Duration)> = [
        ("tls.reload_interval", c.tls.reload_interval),
        ("tls.handshake_timeout", c.tls.handshake_timeout),
        ("usage.report_interval", c.usage.report_interval),
        ("control_plane.poll_interval", cp.poll_interval),
        ("control_plane.request_timeout", cp.request_timeout),
        ("control_plane.stream_idle", cp.stream_idle),
        ("control_plane.backoff_max", cp.backoff_max),
        ("limits.auth_failure_window", c.limits.auth_failure_window),
        ("timeouts.client_header", t.client_header),
        ("timeouts.client_idle", t.client_idle),
        ("timeouts.client_body", t.client_body),
        ("timeouts.upstream_connect", t.upstream_connect),
        ("timeouts.upstream_first_byte", t.upstream_first_byte),
        ("timeouts.upstream_idle", t.upstream_idle),
        ("timeouts.shutdown_grace", t.shutdown_grace),
    ]
    .into_iter()
    .map(|(n, d)| (n.to_owned(), d))
    .collect();
    for (i, p) in c.pools.iter().enumerate() {
        out.push((format!("pools[{i}].idle_timeout"), p.idle_timeout));
        out.push((format!("pools[{i}].health_interval"), p.health_interval));
        out.push((format!("pools[{i}].ejection_time"), p.ejection_time));
    }
    out
}
