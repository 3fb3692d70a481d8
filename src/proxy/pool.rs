//! Backend pools: endpoints from config, the pool of a base model, the endpoint pick, and how
//! each server flavour is told which model or adapter to use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use serde::Deserialize;

use crate::config::PoolConfig;
use crate::error::EdgeError;
use crate::metrics as m;
use crate::proxy::adapters::{AdapterLoads, AdapterSources};
use crate::proxy::balance::{BalanceConfig, Balancer, RetryBudget};
use crate::proxy::client::PoolClient;
use crate::proxy::h1::Conns;

/// How a pool's servers select a model or adapter, and so which body members the edge owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Plain OpenAI-compatible: `model` selects.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// vLLM: `model` is the LoRA module name or the base model.
    Vllm,
    /// SGLang: `model` names the base model and `lora_path` the adapter (its `--lora-paths`
    /// name), both set by the edge.
    Sglang,
    /// llama.cpp `llama-server`: a `lora` array of adapter ids and scales.
    #[serde(rename = "llamacpp")]
    LlamaCpp,
}

impl Flavor {
    /// Top-level body members the edge owns on this flavour: removed from the client's body,
    /// and (for those the edge sets) written by the edge.
    pub fn owned_members(self) -> &'static [&'static str] {
        match self {
            Flavor::OpenAi | Flavor::Vllm => &["model"],
            Flavor::Sglang => &["model", "lora_path"],
            Flavor::LlamaCpp => &["model", "lora"],
        }
    }
}

/// A parsed endpoint string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    /// The in-process echo backend; optional pause between streamed words.
    Echo { word_delay: Option<Duration> },
    /// A remote server over HTTP/1.1 (`http://`) or h2c prior knowledge (`h2c://`).
    Http {
        authority: Authority,
        prefix: String,
        h2c: bool,
        /// The `Host` header for HTTP/1.1 requests, made once: a clone shares its bytes, where
        /// the client would format one for every request.
        host: HeaderValue,
    },
}

impl EndpointSpec {
    /// Parses `builtin:echo[?word_delay=30ms]`, `http://host:port[/prefix]`, `h2c://host:port[/prefix]`.
    pub fn parse(s: &str) -> Result<EndpointSpec, String> {
        if let Some(rest) = s.strip_prefix("builtin:echo") {
            let word_delay = match rest {
                "" => None,
                _ => {
                    let d = rest
                        .strip_prefix("?word_delay=")
                        .ok_or("the echo endpoint takes only ?word_delay=<duration>")?;
                    Some(humantime::parse_duration(d).map_err(|e| e.to_string())?)
                }
            };
            return Ok(EndpointSpec::Echo { word_delay });
        }
        let (h2c, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("h2c://") {
            (true, r)
        } else {
            return Err("expected builtin:echo, http://… or h2c://…".to_owned());
        };
        let uri: Uri = format!("http://{rest}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let authority = uri.authority().cloned().ok_or("no host")?;
        if authority.host().is_empty() || authority.as_str().contains('@') {
            return Err("expected host:port".to_owned());
        }
        if uri.query().is_some() {
            return Err("a query is not allowed".to_owned());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let host =
            HeaderValue::from_maybe_shared(Bytes::copy_from_slice(authority.as_str().as_bytes()))
                .map_err(|e| e.to_string())?;
        Ok(EndpointSpec::Http {
            authority,
            prefix,
            h2c,
            host,
        })
    }
}

/// One backend endpoint, ready to address.
#[derive(Debug)]
pub struct Endpoint {
    /// The endpoint as configured, for logs.
    pub label: Arc<str>,
    /// What it is.
    pub spec: EndpointSpec,
    /// Metric handles, registered once so the request path only increments them.
    pub metrics: EndpointMetrics,
    /// Connections for proxied requests, for an HTTP/1.1 endpoint.
    pub conns: Option<Arc<Conns>>,
    /// Behind a prefix: the upstream path of every proxied operation, made once (a clone shares
    /// its bytes; joining them per request would allocate).
    prefixed: Box<[(&'static str, PathAndQuery)]>,
}

/// Per-endpoint metric handles.
#[derive(Debug, Clone)]
pub struct EndpointMetrics {
    pub in_flight: metrics::Gauge,
    pub picks: metrics::Counter,
    pub ejections: metrics::Counter,
    pub ttfb: Arc<m::Seconds>,
    pub chunk_gap: Arc<m::Seconds>,
}

impl EndpointMetrics {
    fn new(pool: &str, endpoint: &str) -> EndpointMetrics {
        let labels = [("pool", pool.to_owned()), ("endpoint", endpoint.to_owned())];
        EndpointMetrics {
            in_flight: metrics::gauge!(m::ENDPOINT_IN_FLIGHT, &labels),
            picks: metrics::counter!(m::ENDPOINT_PICKS, &labels),
            ejections: metrics::counter!(m::ENDPOINT_EJECTIONS, &labels),
            ttfb: m::seconds(m::ENDPOINT_TTFB, &[("pool", pool), ("endpoint", endpoint)]),
            chunk_gap: m::seconds(
                m::ENDPOINT_CHUNK_GAP,
                &[("pool", pool), ("endpoint", endpoint)],
            ),
        }
    }
}

/// Per-pool metric handles.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    pub retries: metrics::Counter,
    pub budget_exhausted: metrics::Counter,
}

impl Endpoint {
    /// An endpoint of pool `pool` from its config string; HTTP/1.1 endpoints get their own
    /// connections (connect timeout `connect`, at most `max_idle` kept idle for `idle_for`,
    /// shared out between `workers` worker threads).
    pub fn new(
        pool: &str,
        label: &str,
        connect: Duration,
        max_idle: usize,
        idle_for: Duration,
        workers: usize,
    ) -> Result<Endpoint, String> {
        let spec = EndpointSpec::parse(label)?;
        let conns = match &spec {
            EndpointSpec::Http {
                authority,
                h2c: false,
                ..
            } => {
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let port = authority.port_u16().unwrap_or(80);
                Some(Arc::new(Conns::new(
                    host, port, max_idle, idle_for, connect, workers,
                )))
            }
            _ => None,
        };
        let prefixed = match &spec {
            EndpointSpec::Http { prefix, .. } if !prefix.is_empty() => crate::router::ROUTES
                .iter()
                .filter_map(|r| match r.action {
                    crate::router::Action::Proxy(path) => Some(path),
                    crate::router::Action::Models => None,
                })
                .map(|path| {
                    PathAndQuery::try_from(format!("{prefix}{path}"))
                        .map(|joined| (path, joined))
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<_, _>>()?,
            _ => Box::default(),
        };
        Ok(Endpoint {
            label: label.into(),
            spec,
            metrics: EndpointMetrics::new(pool, label),
            conns,
            prefixed,
        })
    }

    /// The upstream URI for any path (allocates; for health checks).
    pub fn uri_for(&self, path: &str) -> Option<Uri> {
        let EndpointSpec::Http {
            authority, prefix, ..
        } = &self.spec
        else {
            return None;
        };
        format!("http://{authority}{prefix}{path}").parse().ok()
    }

    /// The upstream path for an operation path like `/v1/chat/completions` (behind the
    /// endpoint's prefix, if any).
    pub fn path(&self, path: &'static str) -> Option<PathAndQuery> {
        let EndpointSpec::Http { prefix, .. } = &self.spec else {
            return None;
        };
        if prefix.is_empty() {
            Some(PathAndQuery::from_static(path))
        } else if let Some((_, joined)) = self.prefixed.iter().find(|(p, _)| *p == path) {
            Some(joined.clone())
        } else {
            PathAndQuery::try_from(format!("{prefix}{path}")).ok()
        }
    }

    /// The absolute upstream URI for an operation path like `/v1/chat/completions`.
    pub fn uri(&self, path: &'static str) -> Option<Uri> {
        let EndpointSpec::Http { authority, .. } = &self.spec else {
            return None;
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(self.path(path)?);
        Uri::from_parts(parts).ok()
    }
}

/// A pool of endpoints serving the same base models.
#[derive(Debug)]
pub struct Pool {
    /// Name from config.
    pub name: Box<str>,
    /// Endpoints, in config order.
    pub endpoints: Vec<Endpoint>,
    /// Extra attempts allowed before any request byte was sent.
    pub retries: u32,
    /// How targets are expressed upstream.
    pub flavor: Flavor,
    /// llama.cpp adapter ids by target id.
    pub adapters: BTreeMap<String, u32>,
    /// Keep-alive connections to the endpoints.
    pub client: PoolClient,
    /// `Authorization` sent to the backends (the pool's own credential), if configured.
    pub authorization: Option<http::HeaderValue>,
    /// Which endpoint gets the next attempt.
    pub balancer: Arc<Balancer>,
    /// Bounds retries to a share of requests.
    pub budget: RetryBudget,
    /// Run-time adapter loading (`load_adapters = true`, vLLM pools), if configured.
    pub loads: Option<AdapterLoads>,
    /// Active health check path, if configured.
    pub health_path: Option<String>,
    /// How often the health check runs.
    pub health_interval: Duration,
    pub metrics: PoolMetrics,
}

/// Retries may be at most this share of a pool's requests …
pub const RETRY_RATIO: f64 = 0.2;
/// … plus this many per second …
pub const RETRY_FLOOR_PER_SECOND: u32 = 10;
/// … over this window.
pub const RETRY_WINDOW: Duration = Duration::from_secs(10);

impl Pool {
    /// The members the edge writes into the body for `target_id` (an adapter of `base_model`
    /// when `is_adapter`), e.g. `"model":"job-1"`. Fails when the pool cannot express the
    /// target (a llama.cpp adapter missing from the map).
    pub fn render_members(
        &self,
        target_id: &str,
        base_model: &str,
        is_adapter: bool,
    ) -> Result<Bytes, EdgeError> {
        render_members(
            self.flavor,
            &self.adapters,
            target_id,
            base_model,
            is_adapter,
        )
    }
}

/// The members a pool of `flavor` (with llama.cpp `adapters`) writes for `target_id`; see
/// [`Pool::render_members`]. Free of the pool so the fuzz harness pins exactly these bytes.
pub fn render_members(
    flavor: Flavor,
    adapters: &BTreeMap<String, u32>,
    target_id: &str,
    base_model: &str,
    is_adapter: bool,
) -> Result<Bytes, EdgeError> {
    let mut out = String::from("\"model\":");
    if flavor == Flavor::Sglang {
        // SGLang checks `model` against the model it serves (a `base:adapter` spelling selects
        // an adapter, so base names must not hold a colon: config refuses them) and takes the
        // adapter from `lora_path`; with no `lora_path` it serves the base.
        out.push_str(&serde_json::Value::from(base_model).to_string());
        if is_adapter {
            out.push_str(",\"lora_path\":");
            out.push_str(&serde_json::Value::from(target_id).to_string());
        }
        return Ok(Bytes::from(out));
    }
    out.push_str(&serde_json::Value::from(target_id).to_string());
    if flavor == Flavor::LlamaCpp {
        let chosen = if is_adapter {
            Some(*adapters.get(target_id).ok_or(EdgeError::NoPool)?)
        } else {
            None
        };
        out.push_str(",\"lora\":[");
        // Every adapter of the map is listed, so server-wide scales never leak one in.
        let mut ids: Vec<u32> = adapters.values().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let scale = if Some(*id) == chosen { "1.0" } else { "0.0" };
            out.push_str(&format!("{{\"id\":{id},\"scale\":{scale}}}"));
        }
        out.push(']');
    }
    Ok(Bytes::from(out))
}

/// All pools, and the pool of each base model.
#[derive(Debug, Default)]
pub struct Pools {
    by_model: HashMap<Arc<str>, Arc<Pool>>,
    all: Vec<Arc<Pool>>,
}

impl Pools {
    /// Builds pools from validated config; `connect` bounds every backend connect, and
    /// `workers` threads serve the data listeners.
    pub fn from_config(
        pools: &[PoolConfig],
        connect: Duration,
        workers: usize,
    ) -> Result<Pools, String> {
        let mut by_model = HashMap::new();
        let mut all = Vec::new();
        for p in pools {
            let endpoints = p
                .endpoints
                .iter()
                .map(|e| {
                    Endpoint::new(
                        &p.name,
                        e,
                        connect,
                        p.max_idle_per_endpoint,
                        p.idle_timeout,
                        workers,
                    )
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("pool {}: {e}", p.name))?;
            let authorization = match &p.secret {
                None => None,
                Some(secret) => {
                    let mut v = http::HeaderValue::try_from(format!("Bearer {}", secret.expose()))
                        .map_err(|_| format!("pool {}: api_key is not a header value", p.name))?;
                    v.set_sensitive(true);
                    Some(v)
                }
            };
            let balance = BalanceConfig {
                load_factor: p.load_factor,
                failures_to_eject: p.eject_after,
                base_ejection: p.ejection_time,
                max_ejected_share: p.max_ejected_share,
                ..BalanceConfig::default()
            };
            let loads = match (&p.adapter_source, p.load_adapters) {
                (Some(source), true) => {
                    let sources = AdapterSources::parse(source, p.final_adapter_source.as_deref())
                        .map_err(|(field, why)| format!("pool {}: {field}: {why}", p.name))?;
                    Some(AdapterLoads::new(
                        &p.name,
                        sources,
                        endpoints.len(),
                        p.load_timeout,
                        p.max_loaded_adapters,
                    ))
                }
                _ => None,
            };
            let name = p.name.clone();
            let pool = Arc::new(Pool {
                name: p.name.as_str().into(),
                balancer: Arc::new(Balancer::new(endpoints.len(), balance)),
                endpoints,
                retries: p.retries,
                flavor: p.flavor,
                adapters: p.adapters.clone(),
                client: PoolClient::new(connect, p.max_idle_per_endpoint, p.idle_timeout),
                authorization,
                budget: RetryBudget::new(RETRY_RATIO, RETRY_FLOOR_PER_SECOND, RETRY_WINDOW),
                loads,
                health_path: p.health_path.clone(),
                health_interval: p.health_interval,
                metrics: PoolMetrics {
                    retries: metrics::counter!(m::POOL_RETRIES, "pool" => name.clone()),
                    budget_exhausted: metrics::counter!(m::POOL_BUDGET_EXHAUSTED, "pool" => name),
                },
            });
            all.push(Arc::clone(&pool));
            for m in &p.base_models {
                by_model.insert(Arc::from(m.as_str()), Arc::clone(&pool));
            }
        }
        Ok(Pools { by_model, all })
    }

    /// Every pool, in config order.
    pub fn all(&self) -> &[Arc<Pool>] {
        &self.all
    }

    /// The pool serving a base model.
    pub fn for_model(&self, base_model: &str) -> Option<&Arc<Pool>> {
        self.by_model.get(base_model)
    }

    /// The pool serving a base model, with the pools' own copy of the name (so the many
    /// deployments of one base model share it).
    pub fn model_entry(&self, base_model: &str) -> Option<(&Arc<str>, &Arc<Pool>)> {
        self.by_model.get_key_value(base_model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_specs() {
        assert_eq!(
            EndpointSpec::parse("builtin:echo"),
            Ok(EndpointSpec::Echo { word_delay: None })
        );
        assert_eq!(
            EndpointSpec::parse("builtin:echo?word_delay=30ms"),
            Ok(EndpointSpec::Echo {
                word_delay: Some(Duration::from_millis(30))
            })
        );
        let EndpointSpec::Http {
            authority,
            prefix,
            h2c,
            host,
        } = EndpointSpec::parse("h2c://10.0.0.6:8000/openai/").unwrap()
        else {
            panic!("not http")
        };
        assert_eq!(authority.as_str(), "10.0.0.6:8000");
        assert_eq!(host, "10.0.0.6:8000");
        assert_eq!(prefix, "/openai");
        assert!(h2c);
        for bad in [
            "builtin:echo?x=1",
            "builtin:echoes",
            "https://x:1",
            "http://",
            "http://u:p@h:1",
            "http://h:1/?q=1",
            "10.0.0.1:80",
        ] {
            assert!(EndpointSpec::parse(bad).is_err(), "{bad}");
        }
    }

    fn pool(endpoints: &[&str], retries: u32, flavor: Flavor) -> Pool {
        Pool {
            name: "p".into(),
            endpoints: endpoints
                .iter()
                .map(|e| {
                    Endpoint::new("p", e, Duration::from_secs(1), 1, Duration::from_secs(1), 1)
                        .unwrap()
                })
                .collect(),
            retries,
            flavor,
            adapters: BTreeMap::from([("job-a".to_owned(), 0), ("job-b:step-5".to_owned(), 1)]),
            client: PoolClient::new(Duration::from_secs(1), 1, Duration::from_secs(1)),
            authorization: None,
            balancer: Arc::new(Balancer::new(endpoints.len(), BalanceConfig::default())),
            budget: RetryBudget::new(RETRY_RATIO, RETRY_FLOOR_PER_SECOND, RETRY_WINDOW),
            loads: None,
            health_path: None,
            health_interval: Duration::from_secs(10),
            metrics: PoolMetrics {
                retries: metrics::counter!("test_retries"),
                budget_exhausted: metrics::counter!("test_exhausted"),
            },
        }
    }

    #[test]
    fn uri_keeps_the_prefix() {
        let p = pool(&["http://h:8000/base"], 0, Flavor::OpenAi);
        let e = &p.endpoints[0];
        assert_eq!(
            e.uri("/v1/chat/completions").unwrap(),
            "http://h:8000/base/v1/chat/completions"
        );
        // A proxied operation's path is made once: every request shares its bytes.
        let (a, b) = (
            e.path("/v1/chat/completions"),
            e.path("/v1/chat/completions"),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, "/base/v1/chat/completions");
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
        assert_eq!(e.path("/v1/other").unwrap(), "/base/v1/other");
        let plain = pool(&["http://h:8000"], 0, Flavor::OpenAi);
        assert_eq!(
            plain.endpoints[0].path("/v1/chat/completions").unwrap(),
            "/v1/chat/completions"
        );
    }

    #[test]
    fn members_per_flavour() {
        let p = pool(&["http://h:1"], 0, Flavor::Vllm);
        assert_eq!(
            p.render_members("job \"x\"", "b/m", true).unwrap(),
            r#""model":"job \"x\"""#
        );
        let l = pool(&["http://h:1"], 0, Flavor::LlamaCpp);
        assert_eq!(
            l.render_members("job-b:step-5", "b/m", true).unwrap(),
            r#""model":"job-b:step-5","lora":[{"id":0,"scale":0.0},{"id":1,"scale":1.0}]"#
        );
        assert_eq!(
            l.render_members("base/model", "base/model", false).unwrap(),
            r#""model":"base/model","lora":[{"id":0,"scale":0.0},{"id":1,"scale":0.0}]"#
        );
        assert_eq!(
            l.render_members("job-c", "b/m", true),
            Err(EdgeError::NoPool)
        );
        let s = pool(&["http://h:1"], 0, Flavor::Sglang);
        assert_eq!(
            s.render_members("job-b:step-5", "b/m", true).unwrap(),
            r#""model":"b/m","lora_path":"job-b:step-5""#
        );
        assert_eq!(
            s.render_members("b/m", "b/m", false).unwrap(),
            r#""model":"b/m""#
        );
        assert_eq!(Flavor::Sglang.owned_members(), ["model", "lora_path"]);
    }
}
