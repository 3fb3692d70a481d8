//! Usage accounting: token counts read from backend responses as they stream by
//! ([`scan`]), aggregated per deployment and key ([`UsageSink`]), and posted to the control
//! plane every `usage.report_interval` ([`report`]).
//!
//! Memory is bounded: at most `usage.max_entries` (deployment, key) pairs are held between
//! reports; a report that cannot be delivered is merged back for the next one within the same
//! bound, and what does not fit is dropped with a warning and a metric.

pub mod report;
pub mod scan;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use crate::metrics as m;
use crate::registry::{ApiKey, Deployment};
pub use scan::Usage;

/// Counts for one (deployment, key) pair since the last accepted report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    last_used_ms: u64,
}

type PairKey = (Arc<str>, Option<Arc<str>>);

/// One line of a usage report (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub key_id: Option<Arc<str>>,
    pub deployment_id: Arc<str>,
    /// RFC 3339.
    pub last_used_at: String,
    #[serde(skip)]
    last_used_ms: u64,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Where proxied requests' usage is counted.
pub struct UsageSink {
    entries: DashMap<PairKey, Counts>,
    max_entries: usize,
    /// Whether reports are collected at all (only when there is a control plane to post to).
    collect: bool,
    dropped: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl UsageSink {
    /// A sink holding at most `max_entries` pairs; with `collect` false only metrics are kept.
    pub fn new(max_entries: usize, collect: bool) -> UsageSink {
        UsageSink {
            entries: DashMap::new(),
            max_entries,
            collect,
            dropped: AtomicU64::new(0),
        }
    }

    /// Counts one proxied request (whatever its status) and its usage, if the backend sent one.
    pub fn record(&self, deployment: &Deployment, key: Option<&ApiKey>, usage: Option<Usage>) {
        let u = usage.unwrap_or_default();
        if u.prompt_tokens > 0 {
            m::hot().prompt_tokens.increment(u.prompt_tokens);
        }
        if u.completion_tokens > 0 {
            m::hot().completion_tokens.increment(u.completion_tokens);
        }
        if !self.collect {
            return;
        }
        let add = Counts {
            requests: 1,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            last_used_ms: now_ms(),
        };
        // The common case, a pair already present, takes no allocation: ids are shared `Arc`s.
        let pair = (Arc::clone(&deployment.id), key.map(|k| Arc::clone(&k.id)));
        self.merge(pair, add);
    }

    fn merge(&self, pair: PairKey, add: Counts) {
        if let Some(mut c) = self.entries.get_mut(&pair) {
            add_into(&mut c, add);
            return;
        }
        if self.entries.len() >= self.max_entries {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        add_into(&mut self.entries.entry(pair).or_default(), add);
    }

    /// Takes everything counted since the last drain.
    pub fn drain(&self) -> Vec<Report> {
        let keys: Vec<PairKey> = self.entries.iter().map(|e| e.key().clone()).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(((deployment_id, key_id), c)) = self.entries.remove(&k) {
                out.push(Report {
                    key_id,
                    deployment_id,
                    last_used_at: rfc3339(c.last_used_ms),
                    last_used_ms: c.last_used_ms,
                    requests: c.requests,
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                });
            }
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "usage pairs beyond usage.max_entries were not reported"
            );
            metrics::counter!(m::USAGE_REPORTS, "result" => "dropped").increment(dropped);
        }
        out
    }

    /// Puts back reports that could not be delivered, to go out with the next report.
    pub fn restore(&self, reports: Vec<Report>) {
        for r in reports {
            let add = Counts {
                requests: r.requests,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                last_used_ms: r.last_used_ms,
            };
            self.merge((r.deployment_id, r.key_id), add);
        }
    }
}

fn add_into(c: &mut Counts, add: Counts) {
    c.requests = c.requests.saturating_add(add.requests);
    c.prompt_tokens = c.prompt_tokens.saturating_add(add.prompt_tokens);
    c.completion_tokens = c.completion_tokens.saturating_add(add.completion_tokens);
    c.last_used_ms = c.last_used_ms.max(add.last_used_ms);
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::pool::Pools;

    fn deployment(id: &str) -> Deployment {
        let doc = serde_json::from_value(serde_json::json!({"id": id, "slug": "acme",
            "enabled": true, "authMode": "none",
            "target": {"type": "base_model", "baseModel": "m"}, "revision": 1}))
        .unwrap();
        Deployment::resolve(doc, &Pools::default()).unwrap()
    }

    fn key(id: &str) -> ApiKey {
        let doc = serde_json::from_value(serde_json::json!({"id": id, "deploymentId": "d1",
            "sha256": "a".repeat(64), "enabled": true, "revision": 1}))
        .unwrap();
        ApiKey::resolve(doc).unwrap()
    }

    fn usage(p: u64, c: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
        })
    }

    #[test]
    fn aggregates_per_pair_and_drains() {
        let sink = UsageSink::new(10, true);
        let (d, k) = (deployment("d1"), key("k1"));
        sink.record(&d, Some(&k), usage(3, 5));
        sink.record(&d, Some(&k), usage(1, 2));
        sink.record(&d, Some(&k), None);
        sink.record(&d, None, usage(7, 0));
        let mut reports = sink.drain();
        reports.sort_by_key(|r| r.key_id.is_none());
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].key_id.as_deref(), Some("k1"));
        assert_eq!(
            (
                reports[0].requests,
                reports[0].prompt_tokens,
                reports[0].completion_tokens
            ),
            (3, 4, 7)
        );
        assert_eq!((reports[1].requests, reports[1].prompt_tokens), (1, 7));
        assert!(reports[0].last_used_at.ends_with('Z'));
        assert!(sink.drain().is_empty());
        let json = serde_json::to_value(&reports[1]).unwrap();
        assert_eq!(json["keyId"], serde_json::Value::Null);
        assert_eq!(json["deploymentId"], "d1");
        assert!(json.get("lastUsedMs").is_none());
    }

    #[test]
    fn bounded_and_restorable() {
        let sink = UsageSink::new(2, true);
        let d = deployment("d1");
        for i in 0..5 {
            sink.record(&d, Some(&key(&format!("k{i}"))), usage(1, 1));
        }
        let reports = sink.drain();
        assert_eq!(reports.len(), 2);
        // A failed post puts them back; new counts merge in.
        sink.restore(reports);
        sink.record(&d, Some(&key("k0")), usage(1, 1));
        let total: u64 = sink.drain().iter().map(|r| r.requests).sum();
        assert_eq!(total, 3, "k0 was kept, so its new request merged in");
    }

    #[test]
    fn without_a_control_plane_nothing_is_held() {
        let sink = UsageSink::new(10, false);
        sink.record(&deployment("d1"), None, usage(1, 1));
        assert!(sink.drain().is_empty());
    }
}
