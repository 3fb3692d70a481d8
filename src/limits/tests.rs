//! Unit tests of [`super`]: paused tokio time, so every quota is exact.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::HeaderMap;
use tokio::time::{Instant, advance};
use tokio_util::sync::CancellationToken;

use super::*;

fn limiter(rps: f64, burst: u32, max: usize) -> RateLimiter {
    RateLimiter::new(
        RateLimitConfig {
            requests_per_second: rps,
            burst,
        },
        max,
    )
}

fn subject(s: &str) -> Arc<str> {
    Arc::from(s)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn allowed(remaining: u32, reset: Duration, limit: u32) -> Decision {
    Decision::Allowed(Quota {
        limit,
        remaining,
        reset,
    })
}

fn limited(reset: Duration, limit: u32) -> Decision {
    Decision::Limited(Quota {
        limit,
        remaining: 0,
        reset,
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn burst_then_limited() {
    let rl = limiter(1.0, 5, 100);
    let k = subject("key-1");
    let now = Instant::now();
    for _ in 0..5 {
        assert!(rl.check(&k, now).is_allowed());
    }
    for _ in 0..3 {
        assert!(!rl.check(&k, now).is_allowed());
    }
    assert_eq!(rl.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn refills_one_token_per_interval() {
    // 10 rps: one token every 100 ms.
    let rl = limiter(10.0, 1, 100);
    let k = subject("key-1");
    assert!(rl.check(&k, Instant::now()).is_allowed());
    assert!(!rl.check(&k, Instant::now()).is_allowed());
    advance(ms(99)).await;
    assert!(!rl.check(&k, Instant::now()).is_allowed());
    advance(ms(1)).await;
    assert!(rl.check(&k, Instant::now()).is_allowed());

    // Hammering every 10 ms for 10 s grants exactly 100 tokens.
    let mut granted = 0;
    for _ in 0..1000 {
        advance(ms(10)).await;
        granted += u32::from(rl.check(&k, Instant::now()).is_allowed());
    }
    assert_eq!(granted, 100);
}

#[tokio::test(start_paused = true)]
async fn remaining_and_reset_are_exact() {
    let rl = limiter(10.0, 3, 100);
    let k = subject("key-1");
    let t0 = Instant::now();
    assert_eq!(rl.check(&k, t0), allowed(2, ms(100), 3));
    assert_eq!(rl.check(&k, t0), allowed(1, ms(200), 3));
    assert_eq!(rl.check(&k, t0), allowed(0, ms(300), 3));
    assert_eq!(rl.check(&k, t0), limited(ms(100), 3));
    // A refused request takes nothing.
    assert_eq!(rl.check(&k, t0 + ms(40)), limited(ms(60), 3));
    assert_eq!(rl.check(&k, t0 + ms(100)), allowed(0, ms(300), 3));
    // Half a token back is not a token: 50 ms to go.
    assert_eq!(rl.check(&k, t0 + ms(150)), limited(ms(50), 3));
    // 1.5 tokens back at 250 ms; one taken leaves 0.5, reported as 0 whole tokens.
    assert_eq!(rl.check(&k, t0 + ms(250)), allowed(0, ms(250), 3));
    // Long idle: full again, and never more than burst.
    assert_eq!(rl.check(&k, t0 + ms(60_000)), allowed(2, ms(100), 3));
}

#[test]
fn retry_after_is_rounded_up_whole_seconds_at_least_one() {
    let cases = [
        (Duration::from_nanos(1), "1", "1"),
        (ms(100), "1", "100"),
        (ms(1000), "1", "1000"),
        (ms(1001), "2", "1001"),
        (ms(1500), "2", "1500"),
        (ms(2000), "2", "2000"),
        (Duration::from_micros(2_000_001), "3", "2001"),
        (Duration::ZERO, "1", "1"),
    ];
    for (reset, secs, millis) in cases {
        let mut h = HeaderMap::new();
        limited(reset, 7).quota().apply(true, &mut h);
        assert_eq!(h["retry-after"], secs, "{reset:?}");
        assert_eq!(h["retry-after-ms"], millis, "{reset:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn headers_are_written() {
    let rl = limiter(2.0, 2, 100);
    let k = subject("key-1");
    let now = Instant::now();

    let mut h = HeaderMap::new();
    rl.check(&k, now).apply(&mut h);
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-reset-requests"], "500ms");
    assert!(h.get("retry-after").is_none());
    assert!(h.get("retry-after-ms").is_none());

    rl.check(&k, now);
    let mut h = HeaderMap::new();
    rl.check(&k, now).apply(&mut h);
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-reset-requests"], "500ms");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["retry-after-ms"], "500");
}

#[test]
fn reset_uses_go_duration_format() {
    let cases = [
        (Duration::ZERO, "0s"),
        (Duration::from_nanos(1), "1ms"),
        (Duration::from_micros(12_300), "13ms"),
        (ms(120), "120ms"),
        (ms(999), "999ms"),
        (ms(1000), "1s"),
        (ms(1500), "1.5s"),
        (ms(8640), "8.64s"),
        (ms(1005), "1.005s"),
        (ms(59_999), "59.999s"),
        (ms(60_000), "1m0s"),
        (ms(360_000), "6m0s"),
        (ms(84_500), "1m24.5s"),
        (ms(3_600_000), "1h0m0s"),
        (ms(7_384_050), "2h3m4.05s"),
    ];
    for (d, text) in cases {
        assert_eq!(reset_value(d), text, "{d:?}");
    }
    // The largest value still fits the stack buffer and is a valid header value.
    let max = reset_value(Duration::MAX);
    assert!(max.to_str().unwrap().ends_with('s'));
    assert_ne!(max, "0s");
}

#[tokio::test(start_paused = true)]
async fn subjects_are_independent() {
    let rl = limiter(1.0, 2, 100);
    let (a, b) = (subject("key-a"), subject("deployment-b"));
    let now = Instant::now();
    assert!(rl.check(&a, now).is_allowed());
    assert!(rl.check(&a, now).is_allowed());
    assert!(!rl.check(&a, now).is_allowed());
    assert_eq!(rl.check(&b, now), allowed(1, ms(1000), 2));
    assert!(rl.check(&b, now).is_allowed());
    assert!(!rl.check(&b, now).is_allowed());
    // The same id in another allocation is the same subject.
    assert!(!rl.check(&subject("key-a"), now).is_allowed());
    assert_eq!(rl.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn sweep_drops_only_buckets_full_again() {
    let rl = limiter(1.0, 3, 100);
    let (a, b) = (subject("a"), subject("b"));
    let t0 = Instant::now();
    rl.check(&a, t0); // full again at 1 s
    for _ in 0..3 {
        rl.check(&b, t0); // full again at 3 s
    }
    assert_eq!(rl.sweep(t0 + ms(999)), 0);
    assert_eq!(rl.sweep(t0 + ms(1000)), 1);
    assert_eq!(rl.len(), 1);
    // b kept its state: 1 token back at 1 s, 2 at 2 s.
    assert_eq!(rl.check(&b, t0 + ms(2000)), allowed(1, ms(2000), 3));
    // a starts over full.
    assert_eq!(rl.check(&a, t0 + ms(2000)), allowed(2, ms(1000), 3));
    assert_eq!(rl.sweep(t0 + ms(60_000)), 2);
    assert!(rl.is_empty());
}

#[tokio::test(start_paused = true)]
async fn bound_holds_under_a_flood_of_new_subjects() {
    let max = 100;
    let rl = limiter(1.0, 2, max);
    let hot = subject("hot");
    let t0 = Instant::now();
    rl.check(&hot, t0);
    rl.check(&hot, t0);
    assert!(!rl.check(&hot, t0).is_allowed());

    // 10× the bound of new subjects, all within one second: nothing is idle yet.
    for i in 0..10 * max {
        let s = subject(&format!("new-{i}"));
        let now = t0 + ms(i as u64 / 2);
        // New subjects fail open: a fresh bucket, whether stored or not.
        assert_eq!(rl.check(&s, now), allowed(1, ms(1000), 2), "{i}");
        assert!(rl.len() <= max, "len {} at {i}", rl.len());
    }
    assert_eq!(rl.len(), max);
    // The tracked subject is still limited exactly.
    assert_eq!(rl.check(&hot, t0 + ms(500)), limited(ms(500), 2));
    assert!(rl.check(&hot, t0 + ms(1000)).is_allowed());

    // Once stored buckets are full again, the inline sweep frees slots: a new subject is tracked.
    let later = t0 + ms(10_000);
    let fresh = subject("after-idle");
    rl.check(&fresh, later);
    assert_eq!(rl.check(&fresh, later), allowed(0, ms(2000), 2));
    assert_eq!(rl.check(&fresh, later), limited(ms(1000), 2));
    assert!(rl.len() <= max);
    assert!(rl.len() < max, "the inline sweep freed some slots");
}

#[tokio::test(start_paused = true)]
async fn full_table_warns_at_most_once_a_minute() {
    let rl = limiter(1.0, 1, 1);
    let t0 = Instant::now();
    rl.check(&subject("a"), t0);
    let ns = |d: Duration| rl.table.ns(t0 + d);
    assert!(rl.table.note_untracked(ns(ms(0))));
    assert!(!rl.table.note_untracked(ns(ms(59_999))));
    assert_eq!(rl.table.untracked.load(Ordering::Relaxed), 1);
    assert!(rl.table.note_untracked(ns(ms(60_000))));
    assert_eq!(rl.table.untracked.load(Ordering::Relaxed), 0);
}

#[test]
fn concurrent_checks_at_one_instant_grant_exactly_burst() {
    let rl = Arc::new(limiter(1.0, 50, 100));
    let k = subject("shared");
    let now = Instant::now();
    let granted = Arc::new(AtomicU32::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (rl, k, granted) = (Arc::clone(&rl), Arc::clone(&k), Arc::clone(&granted));
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    if rl.check(&k, now).is_allowed() {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 50);
}

#[test]
fn concurrent_checks_on_the_clock_never_exceed_burst_plus_refill() {
    let (rps, burst) = (2000.0, 20);
    let rl = Arc::new(limiter(rps, burst, 100));
    let k = subject("shared");
    let granted = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (rl, k, granted) = (Arc::clone(&rl), Arc::clone(&k), Arc::clone(&granted));
            std::thread::spawn(move || {
                while start.elapsed() < ms(200) {
                    if rl.check(&k, Instant::now()).is_allowed() {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let granted = f64::from(granted.load(Ordering::Relaxed));
    assert!(
        granted <= f64::from(burst) + rps * elapsed,
        "{granted} granted in {elapsed}s"
    );
    // And the limiter does grant: at least the burst.
    assert!(granted >= f64::from(burst));
}

#[test]
fn concurrent_new_subjects_never_overshoot_the_bound() {
    let max = 50;
    let rl = Arc::new(limiter(1.0, 1, max));
    let now = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let rl = Arc::clone(&rl);
            std::thread::spawn(move || {
                for i in 0..500 {
                    rl.check(&subject(&format!("{t}-{i}")), now);
                    assert!(rl.len() <= max);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(rl.len(), max);
    assert_eq!(rl.table.slots.load(Ordering::Relaxed), max);
}

#[test]
fn bad_config_is_reported_and_clamped() {
    let cfg = |requests_per_second, burst| RateLimitConfig {
        requests_per_second,
        burst,
    };
    assert!(cfg(50.0, 100).problems().is_empty());
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e10] {
        let p = cfg(bad, 1).problems();
        assert_eq!(p.len(), 1, "{bad}");
        assert!(p[0].starts_with("rate_limits.requests_per_second:"));
    }
    let p = cfg(1.0, 0).problems();
    assert_eq!(p, ["rate_limits.burst: must be at least 1"]);
    let p = cfg(1e-6, 100).problems();
    assert!(p[0].starts_with("rate_limits.burst:"), "{p:?}");

    // Clamped, never a panic: burst 0 behaves as 1, a NaN rate as the slowest.
    let now = Instant::now();
    let k = subject("k");
    for rl in [limiter(1.0, 0, 10), limiter(f64::NAN, 1, 10)] {
        assert!(rl.check(&k, now).is_allowed());
        assert!(!rl.check(&k, now).is_allowed());
    }
    let rl = limiter(f64::INFINITY, u32::MAX, 10);
    assert!(rl.check(&k, now).is_allowed());
}

#[tokio::test(start_paused = true)]
async fn sweep_loop_empties_idle_tables_and_stops_on_shutdown() {
    let rl = Arc::new(limiter(10.0, 1, 100));
    let auth = Arc::new(AuthFailures::new(AuthFailureConfig::default(), 100));
    rl.check(&subject("a"), Instant::now());
    auth.record_failure(ip("192.0.2.1"), Instant::now());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sweep_loop(
        Some(Arc::clone(&rl)),
        Some(Arc::clone(&auth)),
        SWEEP_INTERVAL,
        shutdown.clone(),
    ));
    advance(SWEEP_INTERVAL + ms(1)).await;
    tokio::task::yield_now().await;
    assert!(rl.is_empty());
    assert_eq!(auth.len(), 1, "its window has 50 s to go");
    advance(Duration::from_secs(60)).await;
    tokio::task::yield_now().await;
    assert!(auth.is_empty());
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn auth_blocks_after_max_failures_until_the_window_ends() {
    let af = AuthFailures::new(AuthFailureConfig::default(), 100);
    let client = ip("198.51.100.7");
    let t0 = Instant::now();
    for i in 0..19 {
        af.record_failure(client, t0 + ms(i * 1000));
        assert_eq!(af.is_blocked(client, t0 + ms(i * 1000)), None, "{i}");
    }
    af.record_failure(client, t0 + ms(30_000));
    assert_eq!(af.is_blocked(client, t0 + ms(30_000)), Some(ms(30_000)));
    assert_eq!(af.is_blocked(client, t0 + ms(59_999)), Some(ms(1)));
    assert_eq!(af.is_blocked(client, t0 + ms(60_000)), None);
    // Another address is untouched.
    assert_eq!(af.is_blocked(ip("198.51.100.8"), t0 + ms(30_000)), None);

    // A new window starts from zero.
    af.record_failure(client, t0 + ms(60_000));
    assert_eq!(af.is_blocked(client, t0 + ms(60_000)), None);
}

#[tokio::test(start_paused = true)]
async fn auth_failures_spread_over_windows_never_block() {
    let af = AuthFailures::new(
        AuthFailureConfig {
            max_failures: 3,
            window: Duration::from_secs(10),
        },
        100,
    );
    let client = ip("203.0.113.9");
    for _ in 0..5 {
        af.record_failure(client, Instant::now());
        af.record_failure(client, Instant::now());
        assert_eq!(af.is_blocked(client, Instant::now()), None);
        advance(Duration::from_secs(10)).await;
    }
    af.record_failure(client, Instant::now());
    af.record_failure(client, Instant::now());
    af.record_failure(client, Instant::now());
    assert_eq!(
        af.is_blocked(client, Instant::now()),
        Some(Duration::from_secs(10))
    );
}

#[test]
fn ipv6_is_grouped_by_64_and_mapped_ipv4_is_ipv4() {
    assert_eq!(
        client_group(ip("2001:db8:1:2:aaaa::1")),
        ip("2001:db8:1:2::")
    );
    assert_eq!(
        client_group(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
        ip("2001:db8:1:2::")
    );
    assert_eq!(client_group(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    assert_eq!(client_group(ip("192.0.2.1")), ip("192.0.2.1"));

    let af = AuthFailures::new(
        AuthFailureConfig {
            max_failures: 2,
            window: Duration::from_secs(60),
        },
        100,
    );
    let now = Instant::now();
    af.record_failure(ip("2001:db8:1:2::1"), now);
    af.record_failure(ip("2001:db8:1:2:dead:beef:0:7"), now);
    assert!(af.is_blocked(ip("2001:db8:1:2::99"), now).is_some());
    assert!(af.is_blocked(ip("2001:db8:1:3::1"), now).is_none());
    af.record_failure(ip("::ffff:192.0.2.1"), now);
    af.record_failure(ip("192.0.2.1"), now);
    assert!(af.is_blocked(ip("192.0.2.1"), now).is_some());
    assert!(af.is_blocked(ip("192.0.2.2"), now).is_none());
    assert_eq!(af.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn auth_table_is_bounded_and_fails_open() {
    let max = 10;
    let af = AuthFailures::new(
        AuthFailureConfig {
            max_failures: 1,
            window: Duration::from_secs(60),
        },
        max,
    );
    let now = Instant::now();
    for i in 0..10 * max {
        let a = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
        af.record_failure(a, now);
        assert!(af.len() <= max);
    }
    assert_eq!(af.len(), max);
    // The first ten are tracked and blocked; the rest were not stored, so not blocked.
    assert!(af.is_blocked(IpAddr::from([10, 0, 0, 0]), now).is_some());
    assert!(af.is_blocked(IpAddr::from([10, 0, 0, 50]), now).is_none());

    // After the windows end, the inline sweep makes room and new addresses count again.
    let later = now + Duration::from_secs(61);
    af.record_failure(ip("10.9.9.9"), later);
    assert!(af.is_blocked(ip("10.9.9.9"), later).is_some());
    assert!(af.len() <= max);
    let held = af.len();
    assert_eq!(af.sweep(later), held - 1);
    assert_eq!(af.len(), 1);
}
