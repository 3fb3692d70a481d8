//! What the micro-benches run on: pools of every flavour, registries of generated deployments
//! and keys, and probe lists.
//!
//! Everything is a pure function of an index, so a probe can name any entry without keeping a
//! copy of the generated documents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arkor_edge::auth::KeyHash;
use arkor_edge::config::Config;
use arkor_edge::host::Slug;
use arkor_edge::proxy::pool::Pools;
use arkor_edge::registry::{
    Applied, AuthMode, Deployment, DeploymentDoc, Event, KeyDoc, Op, Registry, TargetDoc,
};

/// The production base domain.
pub const BASES: [&str; 1] = ["arkor.app"];

/// Base model of the vLLM pool (most deployments), and of the other flavours' pools.
pub const VLLM_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
pub const OPENAI_MODEL: &str = "gpt-oss-20b";
pub const SGLANG_MODEL: &str = "Qwen/Qwen2.5-7B-Instruct";
pub const LLAMACPP_MODEL: &str = "mistralai/Mistral-7B-Instruct-v0.3";

/// Probes cycled through by a lookup bench: enough that a 1M-entry table is read all over
/// memory rather than from a few warm cache lines. A power of two, so the cycle is a mask.
pub const MAX_PROBES: usize = 1 << 16;

const POOLS_TOML: &str = r#"
[[pools]]
name = "vllm"
base_models = ["meta-llama/Llama-3.1-8B-Instruct"]
endpoints = ["http://127.0.0.1:9"]
flavor = "vllm"

[[pools]]
name = "openai"
base_models = ["gpt-oss-20b"]
endpoints = ["http://127.0.0.1:9"]
flavor = "openai"

[[pools]]
name = "sglang"
base_models = ["Qwen/Qwen2.5-7B-Instruct"]
endpoints = ["http://127.0.0.1:9"]
flavor = "sglang"

[[pools]]
name = "llamacpp"
base_models = ["mistralai/Mistral-7B-Instruct-v0.3"]
endpoints = ["http://127.0.0.1:9"]
flavor = "llamacpp"
adapters = { "0b1d2c3e-0000-4000-8000-000000000001" = 0, "0b1d2c3e-0000-4000-8000-000000000002:step-300" = 1, "3f6c2a9e-71b4-4d0a-9c55-0e8b7d2f1a64:step-1200" = 2, "7a8b9c0d-1111-4222-8333-444455556666" = 3 }
"#;

/// One pool per flavour, built from config text the way the edge builds them.
pub fn pools() -> Arc<Pools> {
    let config = Config::from_toml(POOLS_TOML, PathBuf::from(".")).expect("bench config");
    Arc::new(Pools::from_config(&config.pools, Duration::from_secs(1), 1).expect("bench pools"))
}

/// splitmix64's finaliser: a bijection, so distinct indexes give distinct values.
pub fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The slug of deployment `i`: `tenant-0000042` style, 14 characters.
pub fn slug(i: u64) -> Slug {
    Slug::parse(format!("tenant-{i:07}").as_bytes()).expect("generated slug")
}

/// A valid slug that no generated deployment has.
pub fn absent_slug(i: u64) -> Slug {
    Slug::parse(format!("absent-{i:07}").as_bytes()).expect("generated slug")
}

/// The plaintext of key `j`: `ark_live_` and 32 hex digits.
pub fn key_plaintext(j: u64) -> String {
    format!("ark_live_{:016x}{:016x}", mix(j), mix(j ^ (1 << 63)))
}

fn deployment_doc(i: u64, target: TargetDoc) -> DeploymentDoc {
    DeploymentDoc {
        id: format!("dep-{i:08}"),
        slug: slug(i).as_str().to_owned(),
        enabled: true,
        auth_mode: AuthMode::FixedApiKey,
        target,
        revision: i + 1,
    }
}

/// Deployment `i` of the vLLM pool: every other one an adapter checkpoint.
fn generated_target(i: u64) -> TargetDoc {
    if i % 2 == 1 {
        TargetDoc::Adapter {
            job_id: format!("{:016x}-job", mix(i)),
            checkpoint_step: Some(100 * (1 + i % 40)),
            base_model: VLLM_MODEL.to_owned(),
        }
    } else {
        TargetDoc::BaseModel {
            base_model: VLLM_MODEL.to_owned(),
        }
    }
}

fn apply(registry: &Registry, revision: u64, op: Op) {
    let outcome = registry.apply_event(Event { revision, op });
    assert_eq!(outcome, Applied::Changed, "generated event refused");
}

/// A registry holding `n` deployments, applied one event at a time as the control plane sends
/// them.
pub fn registry_with_deployments(n: u64) -> Registry {
    let registry = Registry::new(pools());
    for i in 0..n {
        let deployment = deployment_doc(i, generated_target(i));
        apply(&registry, i + 1, Op::UpsertDeployment { deployment });
    }
    assert_eq!(registry.counts(), (n as usize, 0));
    registry
}

/// A registry holding `n` keys (of deployments it does not hold: key lookups never touch them).
pub fn registry_with_keys(n: u64) -> Registry {
    let registry = Registry::new(pools());
    for j in 0..n {
        let plain = key_plaintext(j);
        let key = KeyDoc {
            id: format!("key-{j:08}"),
            deployment_id: format!("dep-{:08}", j / 2),
            prefix: Some(plain[..12].to_owned()),
            sha256: KeyHash::of(plain.as_bytes()).to_hex(),
            enabled: true,
            revision: j + 1,
        };
        apply(&registry, j + 1, Op::UpsertKey { key });
    }
    assert_eq!(registry.counts(), (0, n as usize));
    registry
}

/// Indexes of the entries a lookup bench cycles through: `min(n, MAX_PROBES)` rounded up to a
/// power of two, scattered over `0..n`.
pub fn probe_indexes(n: u64) -> Vec<u64> {
    let count = (n as usize).min(MAX_PROBES).next_power_of_two();
    (0..count as u64).map(|k| mix(k ^ 0xabcd) % n).collect()
}

/// One resolved deployment per flavour (name, deployment): what `pin` gets its owned member
/// list and rendered members from on the request path.
pub fn flavour_deployments() -> Vec<(&'static str, Arc<Deployment>)> {
    let registry = Registry::new(pools());
    let targets = [
        (
            "vllm",
            TargetDoc::Adapter {
                job_id: "9d3e5f70-2b1a-4c8d-9e0f-1a2b3c4d5e6f".to_owned(),
                checkpoint_step: Some(800),
                base_model: VLLM_MODEL.to_owned(),
            },
        ),
        (
            "openai",
            TargetDoc::BaseModel {
                base_model: OPENAI_MODEL.to_owned(),
            },
        ),
        (
            "sglang",
            TargetDoc::Adapter {
                job_id: "5c4b3a29-1807-4f6e-8d5c-4b3a29180706".to_owned(),
                checkpoint_step: None,
                base_model: SGLANG_MODEL.to_owned(),
            },
        ),
        (
            "llamacpp",
            TargetDoc::Adapter {
                job_id: "3f6c2a9e-71b4-4d0a-9c55-0e8b7d2f1a64".to_owned(),
                checkpoint_step: Some(1200),
                base_model: LLAMACPP_MODEL.to_owned(),
            },
        ),
    ];
    let mut out = Vec::new();
    for (i, (flavour, target)) in targets.into_iter().enumerate() {
        let i = i as u64;
        apply(
            &registry,
            i + 1,
            Op::UpsertDeployment {
                deployment: deployment_doc(i, target),
            },
        );
        let deployment = registry.deployment(&slug(i)).expect("just applied");
        assert!(deployment.upstream.is_ok(), "{flavour}: no upstream");
        out.push((flavour, deployment));
    }
    out
}
