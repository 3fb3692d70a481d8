//! Request rate limits (SPEC §2 step 5, §7 `[rate_limits]`) and the failed-auth brake.
//!
//! [`RateLimiter`] is a token bucket per subject: the key id when the deployment uses keys, the
//! deployment id when `authMode` is `none`. It is kept in its GCRA form: a bucket is one integer,
//! the time at which it will be full again, so a check is a few integer operations under the
//! DashMap shard lock, quotas are exact, and no global lock is taken.
//!
//! [`AuthFailures`] counts failed key checks per client address (IPv6 grouped by /64), so a
//! client guessing keys is blocked after `max_failures` in one window.
//!
//! Both tables are bounded for fleets with millions of keys: an entry that carries no state any
//! more (a full bucket, an ended window) can be dropped at any time, by [`sweep_loop`] or inline
//! when a table is full. When a table is still full, a new subject or address is served as if it
//! had fresh state and is not stored: it **fails open**, so one flood of new subjects can neither
//! grow memory nor lock out clients, and a warning is logged at most once a minute. Subjects
//! already tracked stay limited exactly.
//!
//! Times are tokio [`Instant`]s, passed in by the caller, so tests run on paused time.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::headers::RETRY_AFTER_MS;

/// Rate-limit subjects tracked by default: 24 bytes an entry plus hash-table slack, some
/// 30–55 MB at the bound.
pub const DEFAULT_MAX_SUBJECTS: usize = 1_000_000;
/// Client addresses (or IPv6 /64s) with recent failed key checks tracked by default.
pub const DEFAULT_MAX_ADDRESSES: usize = 100_000;
/// How often [`sweep_loop`] should run: well under the time a typical bucket takes to refill,
/// so idle subjects rarely fill a table.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Entries examined by the inline sweep of a full table: enough to usually free a slot, few
/// enough that one request never walks a large table.
const INLINE_SWEEP_SCAN: usize = 64;
/// Shortest gap between two "table full" warnings of one table.
const FULL_WARNING_EVERY: u64 = 60_000_000_000;
/// Accepted `requests_per_second`: one request in ~12 days to one per nanosecond.
const MIN_RATE: f64 = 1e-6;
const MAX_RATE: f64 = 1e9;
/// Longest time a bucket may take to refill (`burst / requests_per_second`), one year.
const MAX_REFILL_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// `x-ratelimit-limit-requests`: the bucket size (`burst`).
pub static X_RATELIMIT_LIMIT_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-remaining-requests`: whole tokens left after this request.
pub static X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-reset-requests`: see [`Quota::reset`].
pub static X_RATELIMIT_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-requests");

/// `[rate_limits]`: a bucket of `burst` tokens, refilled at `requests_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
}

impl RateLimitConfig {
    /// Every bad value, each message naming its `rate_limits.` field; empty when valid. Values
    /// refused here are clamped by [`RateLimiter::new`] rather than trusted.
    pub fn problems(&self) -> Vec<String> {
        let rate = self.requests_per_second;
        let bad_rate = !(MIN_RATE..=MAX_RATE).contains(&rate);
        let slow_refill = !bad_rate && f64::from(self.burst) / rate > MAX_REFILL_SECS;
        [
            (
                bad_rate,
                "requests_per_second: must be between 0.000001 and 1000000000",
            ),
            (self.burst == 0, "burst: must be at least 1"),
            (
                slow_refill,
                "burst: must refill within a year (burst / requests_per_second)",
            ),
        ]
        .into_iter()
        .filter(|(bad, _)| *bad)
        .map(|(_, problem)| format!("rate_limits.{problem}"))
        .collect()
    }
}

/// What a check decided, with the quota to report either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request took a token.
    Allowed(Quota),
    /// No token: answer 429 `rate_limit_exceeded`.
    Limited(Quota),
}

impl Decision {
    /// Whether the request may go on.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }

    /// The quota, whichever the decision.
    pub fn quota(&self) -> Quota {
        match *self {
            Decision::Allowed(q) | Decision::Limited(q) => q,
        }
    }

    /// Writes the quota headers, with the retry hints when limited ([`Quota::apply`]).
    pub fn apply(&self, headers: &mut HeaderMap) {
        self.quota().apply(!self.is_allowed(), headers);
    }
}

/// A subject's quota as OpenAI clients read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The bucket size (`burst`).
    pub limit: u32,
    /// Whole tokens left after this request (0 when limited).
    pub remaining: u32,
    /// Limited: the time until one token is available. Allowed: the time until the bucket is
    /// full again.
    pub reset: Duration,
}

impl Quota {
    /// Writes `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` and
    /// `x-ratelimit-reset-requests` (a Go-style duration as OpenAI sends it: `0s`, `120ms`, `1s`,
    /// `1.5s`, `6m0s`, `1h0m0s`, rounded up to the millisecond). When `limited`, also
    /// `retry-after` (whole seconds, rounded up, at least 1) and `retry-after-ms` (rounded up, at
    /// least 1), so a client that waits as told finds a token.
    pub fn apply(&self, limited: bool, headers: &mut HeaderMap) {
        headers.insert(&X_RATELIMIT_LIMIT_REQUESTS, HeaderValue::from(self.limit));
        headers.insert(
            &X_RATELIMIT_REMAINING_REQUESTS,
            HeaderValue::from(self.remaining),
        );
        headers.insert(&X_RATELIMIT_RESET_REQUESTS, reset_value(self.reset));
        if limited {
            let ms = ceil_ms(self.reset).max(1);
            headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            headers.insert(&RETRY_AFTER_MS, HeaderValue::from(ms));
        }
    }
}

/// One subject's bucket: the time (ns on the table's clock) at which it is full again. Before
/// that time it holds `burst - (full_at - now) / interval` tokens.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    full_at: u64,
}

impl Expiring for Bucket {
    fn expired(&self, now: u64) -> bool {
        self.full_at <= now
    }
}

/// Token buckets per subject (key id or deployment id), bounded to `max_subjects`.
pub struct RateLimiter {
    table: Table<Arc<str>, Bucket>,
    /// Nanoseconds per token.
    interval: u64,
    /// `burst × interval`: how far `full_at` may run ahead of now.
    capacity: u64,
    burst: u32,
}

impl RateLimiter {
    /// A limiter holding at most `max_subjects` buckets. Out-of-range values are clamped
    /// (`burst` to at least 1, the rate into 1e-6..=1e9 per second); validate with
    /// [`RateLimitConfig::problems`] first.
    pub fn new(config: RateLimitConfig, max_subjects: usize) -> RateLimiter {
        let rate = if config.requests_per_second.is_nan() {
            MIN_RATE
        } else {
            config.requests_per_second.clamp(MIN_RATE, MAX_RATE)
        };
        // `as` saturates; the clamp keeps the result within 1..=1e15 anyway.
        let interval = ((1e9 / rate).round() as u64).max(1);
        let burst = config.burst.max(1);
        RateLimiter {
            table: Table::new(
                max_subjects,
                "rate limit table full: new subjects are not limited until idle ones are swept",
            ),
            interval,
            capacity: u64::from(burst).saturating_mul(interval),
            burst,
        }
    }

    /// Takes one token for `subject` at `now`. Runs on every request that reached a known route;
    /// a subject already tracked costs one shard-locked lookup and no allocation. A new subject
    /// that finds the table full is allowed with a fresh bucket that is not stored (fail open).
    pub fn check(&self, subject: &Arc<str>, now: Instant) -> Decision {
        let now = self.table.ns(now);
        self.table
            .update(subject, now, Bucket { full_at: 0 }, |b| self.take(b, now))
    }

    fn take(&self, bucket: &mut Bucket, now: u64) -> Decision {
        let next = bucket.full_at.max(now).saturating_add(self.interval);
        let ahead = next.saturating_sub(now);
        if ahead <= self.capacity {
            bucket.full_at = next;
            let used = ahead.div_ceil(self.interval);
            Decision::Allowed(Quota {
                limit: self.burst,
                remaining: u32::try_from(u64::from(self.burst).saturating_sub(used)).unwrap_or(0),
                reset: Duration::from_nanos(ahead),
            })
        } else {
            // One token is back once `full_at` is within `burst - 1` intervals of now.
            Decision::Limited(Quota {
                limit: self.burst,
                remaining: 0,
                reset: Duration::from_nanos(ahead - self.capacity),
            })
        }
    }

    /// Drops buckets that are full again (they carry no state); returns how many. Called every
    /// [`SWEEP_INTERVAL`] by [`sweep_loop`]; locks one shard at a time.
    pub fn sweep(&self, now: Instant) -> usize {
        self.table.sweep(self.table.ns(now))
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.table.map.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.table.map.is_empty()
    }
}

/// The failed-auth brake: block an address after `max_failures` failed key checks within one
/// `window`. The default is 20 per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureConfig {
    pub max_failures: u32,
    pub window: Duration,
}

impl Default for AuthFailureConfig {
    fn default() -> Self {
        AuthFailureConfig {
            max_failures: 20,
            window: Duration::from_secs(60),
        }
    }
}

/// Failed key checks of one address in its current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    /// When the window ends (ns on the table's clock); the next failure after it opens a new one.
    ends: u64,
    count: u32,
}

impl Expiring for Failures {
    fn expired(&self, now: u64) -> bool {
        self.ends <= now
    }
}

/// Failed key checks per client address, so guessing keys is slow: at most `max_failures`
/// guesses per window and address (IPv6 per /64, see [`client_group`]).
///
/// Windows are fixed, starting at an address's first failure: a blocked address is free again
/// when its window ends, however it behaves meanwhile (blocked requests are answered before the
/// key check, so they record nothing). A correct key does not clear the count, so one valid key
/// cannot be used to keep guessing.
pub struct AuthFailures {
    table: Table<IpAddr, Failures>,
    max_failures: u32,
    window: u64,
}

impl AuthFailures {
    /// A brake holding at most `max_addresses` addresses. `max_failures` is at least 1 and the
    /// window at least 1 ms.
    pub fn new(config: AuthFailureConfig, max_addresses: usize) -> AuthFailures {
        let window = config.window.max(Duration::from_millis(1)).as_nanos();
        AuthFailures {
            table: Table::new(
                max_addresses,
                "auth failure table full: new addresses are not counted until old windows end",
            ),
            max_failures: config.max_failures.max(1),
            window: u64::try_from(window).unwrap_or(u64::MAX),
        }
    }

    /// Counts one failed key check (401 `invalid_api_key` or `missing_api_key`) from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let group = client_group(ip);
        let now = self.table.ns(now);
        let fresh = Failures { ends: 0, count: 0 };
        let blocked_now = self.table.update(&group, now, fresh, |f| {
            if f.expired(now) {
                *f = Failures {
                    ends: now.saturating_add(self.window),
                    count: 0,
                };
            }
            f.count = f.count.saturating_add(1);
            f.count == self.max_failures
        });
        if blocked_now {
            tracing::info!(client = %group, "too many failed key checks; address blocked");
        }
    }

    /// Whether requests from `ip` are refused (429 `rate_limit_exceeded`) before the key check,
    /// and for how long. Read-only: one shard read lock, no allocation.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let now = self.table.ns(now);
        let entry = self.table.map.get(&client_group(ip))?;
        (entry.count >= self.max_failures && !entry.expired(now))
            .then(|| Duration::from_nanos(entry.ends - now))
    }

    /// Drops addresses whose window has ended; returns how many. Called by [`sweep_loop`].
    pub fn sweep(&self, now: Instant) -> usize {
        self.table.sweep(self.table.ns(now))
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.table.map.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.table.map.is_empty()
    }
}

/// The address failures are counted under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64,
/// since one host is usually given a whole /64 and could otherwise rotate through 2^64 addresses.
pub fn client_group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

/// Runs until `shutdown`: every `every` (use [`SWEEP_INTERVAL`]), drops idle buckets and ended
/// failure windows, so the tables hold only subjects with state.
pub async fn sweep_loop(
    rate: Option<Arc<RateLimiter>>,
    auth: Option<Arc<AuthFailures>>,
    every: Duration,
    shutdown: CancellationToken,
) {
    // `interval` refuses a zero period.
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Not the tick's own instant: that is when it was due, which lags after a stall.
        let now = Instant::now();
        let buckets = rate.as_ref().map_or(0, |r| r.sweep(now));
        let addresses = auth.as_ref().map_or(0, |a| a.sweep(now));
        if buckets + addresses > 0 {
            tracing::debug!(buckets, addresses, "limit tables swept");
        }
    }
}

/// `d` in milliseconds, rounded up so a client waiting as told is never early.
fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// `x-ratelimit-reset-requests` as OpenAI writes it (Go's `time.Duration` format) at
/// millisecond precision, rounded up. One allocation, handed to the header value without a copy.
fn reset_value(d: Duration) -> HeaderValue {
    let mut text = String::with_capacity(16);
    // Writing to a String cannot fail; the text is digits, '.' and unit letters.
    let _ = write_go_duration(&mut text, d);
    HeaderValue::from_maybe_shared(Bytes::from(text)).unwrap_or(HeaderValue::from_static("0s"))
}

fn write_go_duration(out: &mut impl fmt::Write, d: Duration) -> fmt::Result {
    let ms = ceil_ms(d);
    if ms == 0 {
        return out.write_str("0s");
    }
    if ms < 1000 {
        return write!(out, "{ms}ms");
    }
    let (hours, minutes) = (ms / 3_600_000, ms / 60_000 % 60);
    if hours > 0 {
        write!(out, "{hours}h{minutes}m")?;
    } else if minutes > 0 {
        write!(out, "{minutes}m")?;
    }
    let (secs, frac) = (ms / 1000 % 60, ms % 1000);
    // Go prints the shortest fraction: 1.5s, 8.64s, 1.005s.
    match frac {
        0 => write!(out, "{secs}s"),
        f if f % 100 == 0 => write!(out, "{secs}.{}s", f / 100),
        f if f % 10 == 0 => write!(out, "{secs}.{:02}s", f / 10),
        f => write!(out, "{secs}.{f:03}s"),
    }
}

mod table;
#[cfg(test)]
mod tests;

use table::{Expiring, Table};
