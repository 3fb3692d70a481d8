//! One record per request, finished when the response body is done or dropped: the access log
//! line, the request metrics, and the usage count of a proxied request.
//!
//! The record travels inside the response body ([`crate::stream::EdgeBody`]), so its end is the
//! real end of the exchange — the last byte written, or the client gone — for streams too.
//! Everything in it is copied or shared (`Arc`), nothing formatted until the line is emitted.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::auth::KeyPrefix;
use crate::host::Slug;
use crate::metrics as m;
use crate::registry::{ApiKey, Deployment};
use crate::usage::{Usage, UsageSink};

/// Where a proxied request's usage is counted.
pub struct UsageTarget {
    pub sink: Arc<UsageSink>,
    pub deployment: Arc<Deployment>,
    pub key: Option<Arc<ApiKey>>,
}

/// What is known about one request; emitted on drop.
pub struct Access {
    start: Instant,
    pub request_id: HeaderValue,
    pub slug: Option<Slug>,
    pub key: Option<KeyPrefix>,
    pub status: u16,
    /// `ok`, `upstream` (the backend's own error status passed through), the edge's code, or
    /// `client_closed` (status 499) when the client went away before a response existed.
    pub code: &'static str,
    pub endpoint: Option<Arc<str>>,
    pub ttfb: Option<Duration>,
    pub bytes: u64,
    pub usage: Option<Usage>,
    pub usage_target: Option<UsageTarget>,
    /// The rate-limit quota left, for the `x-ratelimit-*` headers.
    pub quota: Option<crate::limits::Quota>,
    log: bool,
}

impl Access {
    /// A record for a request whose head just arrived. Until a response exists it describes a
    /// client that went away first (499, as nginx logs it).
    pub fn begin(request_id: HeaderValue, log: bool) -> Access {
        Access {
            start: Instant::now(),
            request_id,
            slug: None,
            key: None,
            status: CLIENT_CLOSED,
            code: "client_closed",
            endpoint: None,
            ttfb: None,
            bytes: 0,
            usage: None,
            usage_target: None,
            quota: None,
            log,
        }
    }

    /// Time since the request head arrived.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// The status logged for a request whose client went away before it was answered.
pub const CLIENT_CLOSED: u16 = 499;

fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        let total = self.start.elapsed();
        let hot = m::hot();
        hot.requests(class(self.status), self.code).increment(1);
        hot.request_duration.record(total);
        hot.response_bytes.increment(self.bytes);
        if let Some(t) = self.usage_target.take() {
            t.sink.record(&t.deployment, t.key.as_deref(), self.usage);
        }
        if self.log {
            tracing::info!(
                target: "arkor_edge::access",
                request_id = self.request_id.to_str().unwrap_or("-"),
                slug = self.slug.as_ref().map_or("-", Slug::as_str),
                key = self.key.as_ref().map_or("-", KeyPrefix::as_str),
                status = self.status,
                code = self.code,
                endpoint = self.endpoint.as_deref().unwrap_or("-"),
                ttfb_ms = self.ttfb.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
                total_ms = total.as_secs_f64() * 1000.0,
                bytes = self.bytes,
                prompt_tokens = self.usage.map_or(0, |u| u.prompt_tokens),
                completion_tokens = self.usage.map_or(0, |u| u.completion_tokens),
            );
        }
    }
}
