//! Validation of a parsed [`Config`]: every bad setting is reported, each naming its field, and
//! credentials are resolved (read from their file or environment variable).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Config, ConfigError, PoolConfig, Secret};
use crate::host::normalise_base_domain;
use crate::proxy::adapters::AdapterSources;
use crate::proxy::pool::{EndpointSpec, Flavor};

impl Config {
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.base_domains.is_empty() {
            problems.push("base_domains: must name at least one domain".to_owned());
        }
        for (i, b) in self.base_domains.iter().enumerate() {
            if normalise_base_domain(b).is_none() {
                problems.push(format!("base_domains[{i}]: {b:?} is not a domain name"));
            }
        }
        if self.listen.http.is_empty() && self.listen.https.is_empty() {
            problems.push("listen: neither listen.http nor listen.https is enabled".to_owned());
        } else if !self.listen.http.is_empty() && self.listen.http.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "listen.http: {:?} is not an address like \"127.0.0.1:8080\"",
                self.listen.http
            ));
        }
        if !self.listen.https.is_empty() {
            if self.listen.https.parse::<SocketAddr>().is_err() {
                problems.push(format!(
                    "listen.https: {:?} is not an address like \"0.0.0.0:443\"",
                    self.listen.https
                ));
            }
            if self.tls.certs.is_empty() {
                problems.push("tls.certs: listen.https needs at least one certificate".to_owned());
            }
        }
        positive(
            &mut problems,
            "tls.reload_interval",
            self.tls.reload_interval,
        );
        positive(
            &mut problems,
            "tls.handshake_timeout",
            self.tls.handshake_timeout,
        );
        if !self.listen.admin.is_empty() && self.listen.admin.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "listen.admin: {:?} is not an address like \"127.0.0.1:9090\"",
                self.listen.admin
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            problems.push("state_dir: must name a folder".to_owned());
        }
        self.validate_control_plane(&mut problems);
        let a = &self.admin;
        match resolve_secret(
            "admin",
            "token",
            &a.token,
            &a.token_file,
            &a.token_env,
            &self.base_dir,
        ) {
            Ok(secret) => self.admin.secret = secret,
            Err(e) => problems.push(e),
        }
        if !(1..=1 << 30).contains(&self.admin.max_body_bytes) {
            problems.push("admin.max_body_bytes: must be between 1 and 1073741824".to_owned());
        }
        positive(
            &mut problems,
            "usage.report_interval",
            self.usage.report_interval,
        );
        if self.usage.max_entries == 0 {
            problems.push("usage.max_entries: must be at least 1".to_owned());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!(
                "log.level: {:?} is not a log filter",
                self.log.level
            ));
        }
        self.validate_pools(&mut problems);
        let l = &self.limits;
        if !(1..=1 << 30).contains(&l.max_body_bytes) {
            problems.push("limits.max_body_bytes: must be between 1 and 1073741824".to_owned());
        }
        if !(8192..=1 << 20).contains(&l.max_header_bytes) {
            problems.push("limits.max_header_bytes: must be between 8192 and 1048576".to_owned());
        }
        if !(1..=1_000_000).contains(&l.max_connections) {
            problems.push("limits.max_connections: must be between 1 and 1000000".to_owned());
        }
        if self.listen.workers > MAX_WORKERS {
            problems.push(format!("listen.workers: must be at most {MAX_WORKERS}"));
        }
        if l.warm_connections > 1_000_000 {
            problems.push("limits.warm_connections: must be at most 1000000".to_owned());
        }
        positive(
            &mut problems,
            "limits.auth_failure_window",
            l.auth_failure_window,
        );
        if let Some(r) = &self.rate_limits {
            let config = crate::limits::RateLimitConfig {
                requests_per_second: r.requests_per_second,
                burst: r.burst,
            };
            problems.extend(config.problems());
            if r.max_subjects == 0 {
                problems.push("rate_limits.max_subjects: must be at least 1".to_owned());
            }
        }
        let t = &self.timeouts;
        for (name, d) in [
            ("timeouts.client_header", t.client_header),
            ("timeouts.client_idle", t.client_idle),
            ("timeouts.client_body", t.client_body),
            ("timeouts.upstream_connect", t.upstream_connect),
            ("timeouts.upstream_first_byte", t.upstream_first_byte),
            ("timeouts.upstream_idle", t.upstream_idle),
        ] {
            positive(&mut problems, name, d);
        }
        at_most(&mut problems, "timeouts.shutdown_grace", t.shutdown_grace);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    fn validate_control_plane(&mut self, problems: &mut Vec<String>) {
        let cp = &self.control_plane;
        if cp.url.is_some() && cp.file.is_some() {
            problems.push("control_plane: set either file or url, not both".to_owned());
        }
        if cp.file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            problems.push("control_plane.file: must name a snapshot file".to_owned());
        }
        if let Some(url) = &cp.url {
            let ok = url.parse::<http::Uri>().is_ok_and(|u| {
                u.scheme_str() == Some("http") && u.authority().is_some() && u.query().is_none()
            });
            if !ok {
                problems.push(format!("control_plane.url: {url:?} is not an http:// URL"));
            }
        }
        for (name, d) in [
            ("control_plane.poll_interval", cp.poll_interval),
            ("control_plane.request_timeout", cp.request_timeout),
            ("control_plane.stream_idle", cp.stream_idle),
            ("control_plane.backoff_max", cp.backoff_max),
        ] {
            positive(problems, name, d);
        }
        match resolve_secret(
            "control_plane",
            "token",
            &cp.token,
            &cp.token_file,
            &cp.token_env,
            &self.base_dir,
        ) {
            Ok(secret) => self.control_plane.secret = secret,
            Err(e) => problems.push(e),
        }
    }

    fn validate_pools(&mut self, problems: &mut Vec<String>) {
        let base_dir = self.base_dir.clone();
        for (i, pool) in self.pools.iter_mut().enumerate() {
            let at = format!("pools[{i}]");
            match resolve_secret(
                &at,
                "api_key",
                &pool.api_key,
                &pool.api_key_file,
                &pool.api_key_env,
                &base_dir,
            ) {
                Ok(secret) => pool.secret = secret,
                Err(e) => problems.push(e),
            }
            if !(1.0..=100.0).contains(&pool.load_factor) {
                problems.push(format!("{at}.load_factor: must be between 1 and 100"));
            }
            if pool.idle_timeout.is_zero()
                || pool.health_interval.is_zero()
                || pool.ejection_time.is_zero()
            {
                problems.push(format!(
                    "{at}: idle_timeout, health_interval and ejection_time must be longer than zero"
                ));
            }
            at_most(problems, &format!("{at}.idle_timeout"), pool.idle_timeout);
            at_most(
                problems,
                &format!("{at}.health_interval"),
                pool.health_interval,
            );
            at_most(problems, &format!("{at}.ejection_time"), pool.ejection_time);
            if !(0.0..=1.0).contains(&pool.max_ejected_share) {
                problems.push(format!("{at}.max_ejected_share: must be between 0 and 1"));
            }
            if pool.eject_after == 0 {
                problems.push(format!("{at}.eject_after: must be at least 1"));
            }
            if pool.max_idle_per_endpoint > 100_000 {
                problems.push(format!("{at}.max_idle_per_endpoint: at most 100000"));
            }
            if let Some(path) = &pool.health_path {
                if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                    problems.push(format!(
                        "{at}.health_path: {path:?} is not a path like \"/health\""
                    ));
                }
            }
        }
        self.check_pools(problems);
    }

    fn check_pools(&self, problems: &mut Vec<String>) {
        let mut names = HashSet::new();
        let mut models = HashSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            if pool.name.is_empty() {
                problems.push(format!("{at}.name: must not be empty"));
            } else if !names.insert(pool.name.as_str()) {
                problems.push(format!(
                    "{at}.name: {:?} is used by another pool",
                    pool.name
                ));
            }
            if pool.base_models.is_empty() {
                problems.push(format!("{at}.base_models: must name at least one model"));
            }
            for m in &pool.base_models {
                if !models.insert(m.as_str()) {
                    problems.push(format!("{at}.base_models: {m:?} is served by another pool"));
                }
                if pool.flavor == Flavor::Sglang && m.contains(':') {
                    problems.push(format!(
                        "{at}.base_models: {m:?}: SGLang reads a `model` with a colon as \
                         base:adapter, so an sglang pool's base models cannot hold one"
                    ));
                }
            }
            if pool.endpoints.is_empty() {
                problems.push(format!("{at}.endpoints: must name at least one endpoint"));
            }
            for (j, e) in pool.endpoints.iter().enumerate() {
                if let Err(why) = EndpointSpec::parse(e) {
                    problems.push(format!("{at}.endpoints[{j}]: {e:?}: {why}"));
                }
            }
            if pool.retries > 10 {
                problems.push(format!("{at}.retries: at most 10"));
            }
            if pool.flavor == Flavor::LlamaCpp {
                if pool.adapters.is_empty() {
                    problems.push(format!(
                        "{at}.adapters: a llamacpp pool needs the target id -> adapter id map"
                    ));
                }
            } else if !pool.adapters.is_empty() {
                problems.push(format!(
                    "{at}.adapters: only a llamacpp pool takes adapters"
                ));
            }
            check_adapter_loading(&at, pool, problems);
        }
    }
}

/// `load_adapters` and its settings: vLLM pools only, with a source template that parses.
fn check_adapter_loading(at: &str, pool: &PoolConfig, problems: &mut Vec<String>) {
    if !pool.load_adapters {
        for (field, value) in [
            ("adapter_source", &pool.adapter_source),
            ("final_adapter_source", &pool.final_adapter_source),
        ] {
            if value.is_some() {
                problems.push(format!("{at}.{field}: only used with load_adapters = true"));
            }
        }
        return;
    }
    if pool.flavor != Flavor::Vllm {
        problems.push(format!(
            "{at}.load_adapters: only a vllm pool loads adapters at run time"
        ));
    }
    match &pool.adapter_source {
        None => problems.push(format!(
            "{at}.adapter_source: load_adapters needs the template of an adapter's path, \
             e.g. \"/models/{{job_id}}/checkpoint-{{step}}\""
        )),
        Some(source) => {
            if let Err((field, why)) =
                AdapterSources::parse(source, pool.final_adapter_source.as_deref())
            {
                problems.push(format!("{at}.{field}: {why}"));
            }
        }
    }
    if pool.load_timeout.is_zero() {
        problems.push(format!("{at}.load_timeout: must be longer than zero"));
    }
    if !(1..=1_000_000).contains(&pool.max_loaded_adapters) {
        problems.push(format!(
            "{at}.max_loaded_adapters: must be between 1 and 1000000"
        ));
    }
}

/// Reads a credential from exactly one of `token`, `token_file` (relative to the config file)
/// and `token_env`.
fn resolve_secret(
    table: &str,
    field: &str,
    token: &Option<String>,
    file: &Option<PathBuf>,
    env: &Option<String>,
    base_dir: &Path,
) -> Result<Option<Secret>, String> {
    let value = match (token, file, env) {
        (None, None, None) => return Ok(None),
        (Some(t), None, None) => t.clone(),
        (None, Some(f), None) => {
            let path = if f.is_absolute() {
                f.clone()
            } else {
                base_dir.join(f)
            };
            std::fs::read_to_string(&path)
                .map_err(|e| format!("{table}.{field}_file: {}: {e}", path.display()))?
                .trim()
                .to_owned()
        }
        (None, None, Some(var)) => {
            std::env::var(var).map_err(|_| format!("{table}.{field}_env: ${var} is not set"))?
        }
        _ => {
            return Err(format!(
                "{table}: set only one of {field}, {field}_file and {field}_env"
            ));
        }
    };
    if value.is_empty() || value.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "{table}.{field}: must be non-empty visible ASCII without spaces"
        ));
    }
    Ok(Some(Secret(value.into())))
}

/// Most threads `listen.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// Longest duration any setting takes: the request path adds durations to the current time,
/// which a value near `u64::MAX` seconds would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn positive(problems: &mut Vec<String>, name: &str, d: Duration) {
    if d.is_zero() {
        problems.push(format!("{name}: must be longer than zero"));
    }
    at_most(problems, name, d);
}

fn at_most(problems: &mut Vec<String>, name: &str, d: Duration) {
    if d > MAX_DURATION {
        problems.push(format!("{name}: must be at most 100 years"));
    }
}
