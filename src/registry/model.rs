//! Deployments and keys: the control plane's JSON shapes (SPEC §3, §4) and the resolved forms
//! the request path reads.
//!
//! Everything a request needs from a deployment is computed once, when an event is applied: the
//! upstream model and the body members that pin it, the pool, and the `GET /v1/models` answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::KeyHash;
use crate::error::EdgeError;
use crate::host::Slug;
use crate::proxy::adapters::AdapterLoad;
use crate::proxy::pool::{Pool, Pools};

/// How a deployment authenticates requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// A live key of this deployment is required.
    FixedApiKey,
    /// Anyone with the URL may call it.
    None,
}

/// What a deployment serves, as the control plane sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TargetDoc {
    /// A fine-tuned adapter: the job's final adapter, or one checkpoint.
    #[serde(rename_all = "camelCase")]
    Adapter {
        job_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint_step: Option<u64>,
        base_model: String,
    },
    /// A base model.
    #[serde(rename_all = "camelCase")]
    BaseModel { base_model: String },
}

impl TargetDoc {
    /// The target id, which is also the upstream `model`: base model name, `<jobId>`, or
    /// `<jobId>:step-<N>`.
    pub fn id(&self) -> String {
        match self {
            TargetDoc::Adapter {
                job_id,
                checkpoint_step: Some(step),
                ..
            } => format!("{job_id}:step-{step}"),
            TargetDoc::Adapter { job_id, .. } => job_id.clone(),
            TargetDoc::BaseModel { base_model } => base_model.clone(),
        }
    }

    /// The base model, which chooses the pool.
    pub fn base_model(&self) -> &str {
        match self {
            TargetDoc::Adapter { base_model, .. } | TargetDoc::BaseModel { base_model } => {
                base_model
            }
        }
    }
}

/// A deployment as the control plane sends it. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentDoc {
    pub id: String,
    pub slug: String,
    pub enabled: bool,
    pub auth_mode: AuthMode,
    pub target: TargetDoc,
    pub revision: u64,
}

/// An API key as the control plane sends it (hash only). Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyDoc {
    pub id: String,
    pub deployment_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    pub sha256: String,
    pub enabled: bool,
    pub revision: u64,
}

/// Where a deployment's requests go, resolved against the configured pools.
#[derive(Debug)]
pub struct Upstream {
    /// The pool that serves the deployment's base model.
    pub pool: Arc<Pool>,
    /// Top-level body members the edge owns on this pool's flavour.
    pub owned: &'static [&'static str],
    /// The members the edge writes, e.g. `"model":"<target id>"`.
    pub members: Bytes,
    /// For adapter targets, the target id: requests stick to the endpoints that hold it.
    pub affinity: Option<Arc<str>>,
    /// For adapter targets on a pool that loads adapters at run time, the load to run on an
    /// endpoint before its first request there.
    /// Boxed: most deployments have none, and it keeps the deployment small.
    pub load: Option<Box<AdapterLoad>>,
}

/// A deployment, resolved for the request path.
///
/// A fleet holds millions, so it keeps one copy of each string: the base model's name is the
/// pools' own, the target id is shared with the pinning affinity, and the job id and the
/// `GET /v1/models` body are derived when needed.
#[derive(Debug)]
pub struct Deployment {
    pub id: Arc<str>,
    pub slug: Slug,
    pub enabled: bool,
    pub auth_mode: AuthMode,
    /// An adapter (a job's final adapter or one checkpoint), or else a base model.
    pub adapter: bool,
    /// The adapter checkpoint; `None` for a final adapter or a base model.
    pub checkpoint_step: Option<u64>,
    pub base_model: Arc<str>,
    pub revision: u64,
    /// Target id (the model clients see in `/v1/models`): base model, `<jobId>` or
    /// `<jobId>:step-<N>`.
    pub target_id: Arc<str>,
    /// The pool and pinned members, or why the deployment cannot be served (503).
    pub upstream: Result<Upstream, EdgeError>,
    /// The last snapshot that held this deployment (the registry's writer only).
    pub(super) mark: AtomicU32,
}

impl Deployment {
    /// The control-plane document this deployment was made from (for persistence).
    pub fn to_doc(&self) -> DeploymentDoc {
        let base_model = self.base_model.to_string();
        let target = if self.adapter {
            let job_id = match self.checkpoint_step {
                Some(step) => self
                    .target_id
                    .strip_suffix(&format!(":step-{step}"))
                    .unwrap_or(&self.target_id),
                None => &self.target_id,
            };
            TargetDoc::Adapter {
                job_id: job_id.to_owned(),
                checkpoint_step: self.checkpoint_step,
                base_model,
            }
        } else {
            TargetDoc::BaseModel { base_model }
        };
        DeploymentDoc {
            id: self.id.to_string(),
            slug: self.slug.as_str().to_owned(),
            enabled: self.enabled,
            auth_mode: self.auth_mode,
            target,
            revision: self.revision,
        }
    }

    /// The `GET /v1/models` answer: an OpenAI model list holding the target id.
    pub fn models_body(&self) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "object": "list",
                "data": [{"id": &*self.target_id, "object": "model", "created": 0, "owned_by": "arkor"}],
            })
            .to_string(),
        )
    }

    /// Validates and resolves a control-plane document.
    pub fn resolve(doc: DeploymentDoc, pools: &Pools) -> Result<Deployment, String> {
        let slug = Slug::parse(doc.slug.as_bytes())
            .filter(|s| s.as_str() == doc.slug)
            .ok_or_else(|| format!("deployment {}: slug {:?} is not servable", doc.id, doc.slug))?;
        if doc.id.is_empty() {
            return Err("deployment with an empty id".to_owned());
        }
        let target_id: Arc<str> = doc.target.id().into();
        if target_id.is_empty() {
            return Err(format!("deployment {}: empty target", doc.id));
        }
        let pool = pools.model_entry(doc.target.base_model());
        let base_model = match pool {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(doc.target.base_model()),
        };
        let upstream = match pool {
            None => Err(EdgeError::NoPool),
            Some((_, pool)) => upstream(pool, &doc.target, &target_id),
        };
        let (adapter, checkpoint_step) = match doc.target {
            TargetDoc::Adapter {
                checkpoint_step, ..
            } => (true, checkpoint_step),
            TargetDoc::BaseModel { .. } => (false, None),
        };
        Ok(Deployment {
            id: doc.id.into(),
            slug,
            enabled: doc.enabled,
            auth_mode: doc.auth_mode,
            adapter,
            checkpoint_step,
            base_model,
            revision: doc.revision,
            target_id,
            upstream,
            mark: AtomicU32::new(0),
        })
    }
}

/// How a target is sent to `pool`: the pinned members, the affinity and, for adapters on a pool
/// that loads them, the load. Fails when the pool cannot express the target.
fn upstream(
    pool: &Arc<Pool>,
    target: &TargetDoc,
    target_id: &Arc<str>,
) -> Result<Upstream, EdgeError> {
    let adapter = match target {
        TargetDoc::Adapter {
            job_id,
            checkpoint_step,
            ..
        } => Some((job_id, *checkpoint_step)),
        TargetDoc::BaseModel { .. } => None,
    };
    let members = pool.render_members(target_id, target.base_model(), adapter.is_some())?;
    let affinity = adapter.map(|_| Arc::clone(target_id));
    let load = match (adapter, &affinity, &pool.loads) {
        (Some((job_id, step)), Some(id), Some(loads)) => {
            Some(Box::new(loads.request_for(Arc::clone(id), job_id, step)?))
        }
        _ => None,
    };
    Ok(Upstream {
        pool: Arc::clone(pool),
        owned: pool.flavor.owned_members(),
        members,
        affinity,
        load,
    })
}

/// An API key, resolved for the request path: never the plaintext.
#[derive(Debug)]
pub struct ApiKey {
    pub id: Arc<str>,
    /// The deployment's id; the registry shares the deployment's own copy when it knows it.
    pub deployment_id: Arc<str>,
    /// The displayable prefix the control plane sent (at most 12 characters are kept).
    pub prefix: Option<ShortText>,
    pub hash: KeyHash,
    pub enabled: bool,
    pub revision: u64,
    /// The last snapshot that held this key (the registry's writer only).
    pub(super) mark: AtomicU32,
}

impl ApiKey {
    /// The control-plane document of this key (hash only; for persistence).
    pub fn to_doc(&self) -> KeyDoc {
        KeyDoc {
            id: self.id.to_string(),
            deployment_id: self.deployment_id.to_string(),
            prefix: self.prefix.as_ref().map(|p| p.as_str().to_owned()),
            sha256: self.hash.to_hex(),
            enabled: self.enabled,
            revision: self.revision,
        }
    }

    /// Validates a control-plane key document.
    pub fn resolve(doc: KeyDoc) -> Result<ApiKey, String> {
        ApiKey::resolve_wire(KeyWire {
            id: Cow::Owned(doc.id),
            deployment_id: Cow::Owned(doc.deployment_id),
            prefix: doc.prefix.map(Cow::Owned),
            sha256: Cow::Owned(doc.sha256),
            enabled: doc.enabled,
            revision: doc.revision,
        })
    }

    /// Validates a key document borrowed from the text it was read from.
    pub fn resolve_wire(doc: KeyWire<'_>) -> Result<ApiKey, String> {
        let hash = KeyHash::from_hex(&doc.sha256)
            .ok_or_else(|| format!("key {}: sha256 is not 64 lower-case hex digits", doc.id))?;
        if doc.id.is_empty() || doc.deployment_id.is_empty() {
            return Err("key with an empty id or deploymentId".to_owned());
        }
        Ok(ApiKey {
            id: Arc::from(&*doc.id),
            deployment_id: Arc::from(&*doc.deployment_id),
            prefix: doc.prefix.as_deref().map(ShortText::new),
            hash,
            enabled: doc.enabled,
            revision: doc.revision,
            mark: AtomicU32::new(0),
        })
    }
}

/// [`KeyDoc`] borrowing its strings from the text it is read from, so that reading a snapshot
/// of millions of keys does not copy each string on the way. Accepts exactly what `KeyDoc` does.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyWire<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub deployment_id: Cow<'a, str>,
    #[serde(default, borrow)]
    pub prefix: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub sha256: Cow<'a, str>,
    pub enabled: bool,
    pub revision: u64,
}

/// Up to [`crate::auth::LOG_PREFIX_LEN`] characters kept inline (no allocation per key), cut
/// at a character boundary so it stays within [`ShortText::CAPACITY`] bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortText {
    len: u8,
    buf: [u8; ShortText::CAPACITY],
}

impl ShortText {
    /// Bytes kept at most: 12 ASCII characters, fewer wider ones.
    pub const CAPACITY: usize = 16;

    /// The leading characters of `text` that fit.
    pub fn new(text: &str) -> ShortText {
        let mut out = ShortText {
            len: 0,
            buf: [0; ShortText::CAPACITY],
        };
        for c in text.chars().take(crate::auth::LOG_PREFIX_LEN) {
            let at = usize::from(out.len);
            let Some(slot) = out.buf.get_mut(at..at + c.len_utf8()) else {
                break;
            };
            c.encode_utf8(slot);
            out.len += c.len_utf8() as u8;
        }
        out
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for ShortText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_ids_follow_the_spec() {
        let t: TargetDoc = serde_json::from_str(
            r#"{"type":"adapter","jobId":"4b2e","checkpointStep":42,"baseModel":"m"}"#,
        )
        .unwrap();
        assert_eq!(t.id(), "4b2e:step-42");
        let t: TargetDoc = serde_json::from_str(
            r#"{"type":"adapter","jobId":"4b2e","checkpointStep":null,"baseModel":"m"}"#,
        )
        .unwrap();
        assert_eq!(t.id(), "4b2e");
        let t: TargetDoc =
            serde_json::from_str(r#"{"type":"adapter","jobId":"4b2e","baseModel":"m"}"#).unwrap();
        assert_eq!(t.id(), "4b2e");
        let t: TargetDoc =
            serde_json::from_str(r#"{"type":"base_model","baseModel":"meta/x","extra":1}"#)
                .unwrap();
        assert_eq!(t.id(), "meta/x");
        assert_eq!(t.base_model(), "meta/x");
    }

    #[test]
    fn documents_round_trip_through_the_compact_form() {
        let pools = Pools::default();
        for target in [
            serde_json::json!({"type": "adapter", "jobId": "j:step-1", "checkpointStep": 7, "baseModel": "m"}),
            serde_json::json!({"type": "adapter", "jobId": "j:step-7", "baseModel": "m"}),
            serde_json::json!({"type": "base_model", "baseModel": "m/x"}),
        ] {
            let doc: DeploymentDoc = serde_json::from_value(serde_json::json!({
                "id": "d1", "slug": "acme", "enabled": false, "authMode": "none",
                "target": target, "revision": 9
            }))
            .unwrap();
            let back = Deployment::resolve(doc.clone(), &pools).unwrap().to_doc();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&doc).unwrap()
            );
        }
    }

    #[test]
    fn short_text_keeps_twelve_characters_within_its_bytes() {
        assert_eq!(ShortText::new("ark_live_abcdef").as_str(), "ark_live_abc");
        assert_eq!(ShortText::new("ab").as_str(), "ab");
        assert_eq!(ShortText::new("").as_str(), "");
        // Four-byte characters: four fit in 16 bytes.
        assert_eq!(ShortText::new("😀😀😀😀😀").as_str(), "😀😀😀😀");
        assert_eq!(ShortText::new("éééééééééééééé").as_str(), "éééééééé");
    }

    #[test]
    fn resolve_refuses_unservable_slugs_and_marks_missing_pools() {
        let doc = |slug: &str| -> DeploymentDoc {
            serde_json::from_value(serde_json::json!({
                "id": "d1", "slug": slug, "enabled": true, "authMode": "none",
                "target": {"type": "base_model", "baseModel": "nowhere"}, "revision": 1,
                "futureField": {"ignored": true}
            }))
            .unwrap()
        };
        let pools = Pools::default();
        assert!(Deployment::resolve(doc("www"), &pools).is_err());
        assert!(Deployment::resolve(doc("Acme"), &pools).is_err());
        assert!(Deployment::resolve(doc("a"), &pools).is_err());
        let d = Deployment::resolve(doc("acme"), &pools).unwrap();
        assert_eq!(d.upstream.as_ref().err(), Some(&EdgeError::NoPool));
        let models: serde_json::Value = serde_json::from_slice(&d.models_body()).unwrap();
        assert_eq!(models["data"][0]["id"], "nowhere");
    }
}
