//! One `[[pools]]` entry of the configuration: its backends, how the target is written for their
//! server, adapter loading, credentials, connections, balancing and health.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Secret;
use crate::proxy::pool::Flavor;

/// One `[[pools]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Name, for logs.
    pub name: String,
    /// Base models this pool serves.
    pub base_models: Vec<String>,
    /// `builtin:echo`, `http://host:port[/prefix]` or `h2c://host:port[/prefix]`.
    pub endpoints: Vec<String>,
    /// Extra attempts on another endpoint, only when no request byte was sent.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// How the pinned target is written into the upstream body.
    #[serde(default)]
    pub flavor: Flavor,
    /// `llamacpp` only: target id → adapter id (load order of `--lora`).
    #[serde(default)]
    pub adapters: std::collections::BTreeMap<String, u32>,
    /// `vllm` only: load an adapter target on an endpoint (`POST /v1/load_lora_adapter`) the
    /// first time a request for it is routed there. Needs `adapter_source`.
    #[serde(default)]
    pub load_adapters: bool,
    /// With `load_adapters`: where the server finds a checkpoint adapter (`lora_path`), a
    /// template over `{job_id}`, `{step}` and `{target_id}`.
    #[serde(default)]
    pub adapter_source: Option<String>,
    /// With `load_adapters`: the template for final adapters (no step); defaults to
    /// `adapter_source`, and is required when that one uses `{step}`.
    #[serde(default)]
    pub final_adapter_source: Option<String>,
    /// With `load_adapters`: longest wait for one load (also bounded by
    /// `timeouts.upstream_first_byte`).
    #[serde(default = "default_load_timeout", with = "humantime_serde")]
    pub load_timeout: Duration,
    /// With `load_adapters`: most adapters remembered as loaded per endpoint.
    #[serde(default = "default_max_loaded_adapters")]
    pub max_loaded_adapters: usize,
    /// The backend's own credential, sent as `Authorization: Bearer …` (or `api_key_file`,
    /// or `api_key_env`).
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Idle connections kept per endpoint, shared out between the data workers (each has its
    /// own idle list).
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// How long an idle backend connection is kept. Shorter than the backend's own keep-alive
    /// timeout, so the edge never sends a request on a connection the backend is closing (the
    /// request would fail after it was sent, too late to retry).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Adapter affinity: an endpoint above `load_factor` × the pool's mean in-flight requests
    /// is skipped for an adapter's next request.
    #[serde(default = "default_load_factor")]
    pub load_factor: f64,
    /// Active health check: `GET <endpoint><health_path>` every `health_interval`; 2xx is
    /// healthy. Off unless set.
    #[serde(default)]
    pub health_path: Option<String>,
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Consecutive failures (connect failures, 5xx, failed health checks) that eject an endpoint.
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// How long a first ejection lasts; each ejection in a row doubles it, up to 5 minutes.
    #[serde(default = "default_ejection_time", with = "humantime_serde")]
    pub ejection_time: Duration,
    /// The largest share of the pool's endpoints ejected at once (one always stays in).
    #[serde(default = "default_max_ejected_share")]
    pub max_ejected_share: f64,
    /// The resolved backend credential.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

fn default_retries() -> u32 {
    2
}

fn default_max_idle() -> usize {
    256
}

/// Below the 5 s keep-alive of uvicorn (vLLM, SGLang) and of llama.cpp's server.
fn default_idle_timeout() -> Duration {
    Duration::from_secs(4)
}

fn default_load_factor() -> f64 {
    1.25
}

fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_eject_after() -> u32 {
    5
}

fn default_ejection_time() -> Duration {
    Duration::from_secs(10)
}

fn default_max_ejected_share() -> f64 {
    0.5
}

fn default_load_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_loaded_adapters() -> usize {
    4096
}
