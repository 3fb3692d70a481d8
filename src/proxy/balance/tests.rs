//! Balancer behaviour: affinity, spill, power of two choices, ejection, concurrency. Every
//! test passes explicit instants (or runs on paused tokio time) and seeds `fastrand`, so runs
//! are deterministic.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn balancer(n: usize) -> Arc<Balancer> {
    Arc::new(Balancer::new(n, BalanceConfig::default()))
}

fn adapters() -> Vec<String> {
    (0..100)
        .map(|i| format!("job-{i:03}:step-{}", i * 7))
        .collect()
}

/// Where each adapter goes, given `exclude`.
fn placement(b: &Balancer, exclude: &[usize], now: Instant) -> Vec<usize> {
    adapters()
        .iter()
        .map(|id| b.pick(Some(id), exclude, now).unwrap())
        .collect()
}

fn eject(b: &Balancer, endpoint: usize, now: Instant) {
    let ejected: Vec<bool> = (0..5).map(|_| b.failure(endpoint, now)).collect();
    assert_eq!(
        ejected,
        [false, false, false, false, true],
        "endpoint {endpoint}"
    );
}

#[test]
fn adapters_stick_to_one_endpoint_and_spread_over_all() {
    let b = balancer(4);
    let now = Instant::now();
    let first = placement(&b, &[], now);
    assert_eq!(placement(&b, &[], now), first, "repeatable");
    // Another replica (or the same edge after a restart) places them identically.
    let replica = balancer(4);
    assert_eq!(
        placement(&replica, &[], now + Duration::from_secs(3600)),
        first
    );
    let mut per_endpoint = [0; 4];
    for e in &first {
        per_endpoint[*e] += 1;
    }
    eprintln!("100 adapters over 4 endpoints: {per_endpoint:?}");
    for n in per_endpoint {
        assert!((10..=40).contains(&n), "{per_endpoint:?}");
    }
}

#[test]
fn ejecting_an_endpoint_moves_only_its_adapters() {
    let b = balancer(4);
    let now = Instant::now();
    let before = placement(&b, &[], now);
    eject(&b, 2, now);
    let after = placement(&b, &[], now);
    let mut moved_to = BTreeSet::new();
    for (i, (was, is)) in before.iter().zip(&after).enumerate() {
        if *was == 2 {
            assert_ne!(*is, 2);
            moved_to.insert(*is);
        } else {
            assert_eq!(was, is, "adapter {i} moved though its endpoint is fine");
        }
    }
    let moved = before.iter().filter(|e| **e == 2).count();
    eprintln!("ejecting endpoint 2 moved {moved} adapters, onto endpoints {moved_to:?}");
    // Rendezvous: the orphans spread over the survivors instead of piling onto one neighbour.
    assert!(moved_to.len() >= 2, "{moved_to:?}");
    // Back home once the ejection is over.
    assert_eq!(placement(&b, &[], now + Duration::from_secs(10)), before);
}

#[test]
fn a_hot_adapter_spills_to_its_next_choice_and_comes_back() {
    let b = balancer(4);
    let now = Instant::now();
    let hot = "job-hot";
    let home = b.pick(Some(hot), &[], now).unwrap();
    let next = b.pick(Some(hot), &[home], now).unwrap();
    // Other traffic: 8 in flight everywhere.
    let _background: Vec<InFlight> = (0..4)
        .flat_map(|e| (0..8).map(move |_| e))
        .map(|e| b.start(e))
        .collect();
    let mut on_home = Vec::new();
    while b.pick(Some(hot), &[], now) == Some(home) {
        on_home.push(b.start(home));
        assert!(on_home.len() < 100, "never spilled");
    }
    let held = b.in_flight(home);
    let total: u32 = (0..4).map(|e| b.in_flight(e)).sum();
    // The rule, computed independently: spill once held + 1 > ceil(1.25 × (total + 1) / 4).
    let bound = (1.25 * f64::from(total + 1) / 4.0).ceil() as u32;
    assert!(
        held + 1 > bound && held <= bound,
        "held {held}, bound {bound}"
    );
    eprintln!(
        "spill: home {home} holds {held} of {total} in flight (mean {:.2}, c × mean {:.2}); \
         next pick goes to {next}",
        f64::from(total) / 4.0,
        1.25 * f64::from(total) / 4.0
    );
    assert_eq!(held, 12);
    assert_eq!(b.pick(Some(hot), &[], now), Some(next));
    // Load falls back: the adapter returns home.
    on_home.pop();
    assert_eq!(b.pick(Some(hot), &[], now), Some(home));
}

#[test]
fn on_an_idle_pool_the_second_concurrent_request_already_spills() {
    // The bound is relative to the pool's mean, so at low load it is tight: with 4 endpoints
    // and nothing else running, ceil(1.25 × 2 / 4) = 1.
    let b = balancer(4);
    let now = Instant::now();
    let home = b.pick(Some("job-a"), &[], now).unwrap();
    let _one = b.start(home);
    assert_ne!(b.pick(Some("job-a"), &[], now), Some(home));
}

#[test]
fn power_of_two_avoids_a_slow_endpoint() {
    fastrand::seed(7);
    let b = balancer(3);
    let now = Instant::now();
    b.observe_latency(0, Duration::from_millis(100), now);
    b.observe_latency(1, Duration::from_millis(100), now);
    b.observe_latency(2, Duration::from_secs(1), now);
    // Every pick stays in flight, so costs climb as load piles up, as under a real burst.
    let held: Vec<InFlight> = (0..10_000)
        .map(|_| b.start(b.pick(None, &[], now).unwrap()))
        .collect();
    let counts: Vec<u32> = (0..3).map(|e| b.in_flight(e)).collect();
    eprintln!("p2c, 100 ms / 100 ms / 1 s: {counts:?}");
    assert!(
        counts[2] * 3 < counts[0] && counts[2] * 3 < counts[1],
        "{counts:?}"
    );
    assert!(counts[0].abs_diff(counts[1]) < 200, "{counts:?}");
    drop(held);
}

#[test]
fn power_of_two_avoids_a_busy_endpoint() {
    fastrand::seed(11);
    let b = balancer(3);
    let now = Instant::now();
    let _busy: Vec<InFlight> = (0..20).map(|_| b.start(2)).collect();
    let mut counts = [0u32; 3];
    for _ in 0..10_000 {
        let e = b.pick(None, &[], now).unwrap();
        let _attempt = b.start(e);
        counts[e] += 1;
    }
    eprintln!("p2c, 20 in flight on endpoint 2: {counts:?}");
    assert!(counts[2] * 3 < counts[0].min(counts[1]), "{counts:?}");
}

#[test]
fn power_of_two_shares_equal_endpoints_evenly() {
    fastrand::seed(3);
    let b = balancer(4);
    let now = Instant::now();
    let mut counts = [0u32; 4];
    for _ in 0..10_000 {
        counts[b.pick(None, &[], now).unwrap()] += 1;
    }
    eprintln!("p2c, 4 equal endpoints: {counts:?}");
    for n in counts {
        assert!((2250..=2750).contains(&n), "{counts:?}");
    }
}

#[test]
fn consecutive_failures_eject_and_a_success_resets_the_count() {
    let b = balancer(4);
    let now = Instant::now();
    for _ in 0..4 {
        assert!(!b.failure(1, now));
    }
    b.success(1);
    for _ in 0..4 {
        assert!(!b.failure(1, now));
    }
    assert!(!b.is_ejected(1, now));
    assert!(b.failure(1, now));
    assert!(b.is_ejected(1, now));
    fastrand::seed(5);
    for _ in 0..1000 {
        assert_ne!(b.pick(None, &[], now), Some(1));
    }
    // Failures of requests already running during the ejection belong to the same outage.
    for _ in 0..10 {
        assert!(!b.failure(1, now + Duration::from_secs(1)));
    }
    let back = now + Duration::from_secs(10);
    assert!(!b.is_ejected(1, back));
    for _ in 0..4 {
        assert!(!b.failure(1, back));
    }
}

#[tokio::test(start_paused = true)]
async fn ejection_time_doubles_up_to_the_cap_and_resets_after_a_success() {
    let config = BalanceConfig {
        max_ejection: Duration::from_secs(35),
        ..BalanceConfig::default()
    };
    let b = Balancer::new(4, config);
    let mut observed = Vec::new();
    for _ in 0..4 {
        eject(&b, 0, Instant::now());
        let start = Instant::now();
        while b.is_ejected(0, Instant::now()) {
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        observed.push(start.elapsed());
    }
    let secs = |s: &[u64]| {
        s.iter()
            .map(|&s| Duration::from_secs(s))
            .collect::<Vec<_>>()
    };
    assert_eq!(observed, secs(&[10, 20, 35, 35]));
    b.success(0);
    eject(&b, 0, Instant::now());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!b.is_ejected(0, Instant::now()));
}

#[test]
fn never_more_than_the_allowed_share_is_ejected() {
    let b = balancer(4);
    let now = Instant::now();
    eject(&b, 0, now);
    eject(&b, 1, now + Duration::from_secs(1));
    // Half of 4 are out: the failure that would make it 3 does not eject, nor do later ones.
    for _ in 0..8 {
        assert!(!b.failure(2, now + Duration::from_secs(2)));
    }
    assert!(!b.is_ejected(2, now + Duration::from_secs(2)));
    // Endpoint 0 returns; endpoint 2 kept its count, so its next failure ejects it.
    assert!(b.failure(2, now + Duration::from_secs(10)));
    // A pool of one never ejects its only endpoint; of three at share 1.0, one stays in.
    let single = balancer(1);
    for _ in 0..20 {
        assert!(!single.failure(0, now));
    }
    let all = Balancer::new(
        3,
        BalanceConfig {
            max_ejected_share: 1.0,
            ..BalanceConfig::default()
        },
    );
    eject(&all, 0, now);
    eject(&all, 1, now);
    for _ in 0..20 {
        assert!(!all.failure(2, now));
    }
}

#[test]
fn with_only_ejected_endpoints_left_the_soonest_back_is_tried() {
    let b = balancer(4);
    let now = Instant::now();
    eject(&b, 1, now + Duration::from_secs(1));
    eject(&b, 0, now + Duration::from_secs(2));
    let at = now + Duration::from_secs(3);
    for affinity in [None, Some("job-a")] {
        assert_eq!(b.pick(affinity, &[2, 3], at), Some(1));
        assert_eq!(b.pick(affinity, &[1, 2, 3], at), Some(0));
        assert_eq!(b.pick(affinity, &[0, 1, 2, 3], at), None);
    }
    assert_eq!(balancer(0).pick(None, &[], at), None);
}

#[test]
fn excluded_endpoints_are_never_picked() {
    fastrand::seed(9);
    let b = balancer(5);
    let now = Instant::now();
    for id in adapters() {
        let first = b.pick(Some(&id), &[], now).unwrap();
        let second = b.pick(Some(&id), &[first], now).unwrap();
        let third = b.pick(Some(&id), &[first, second], now).unwrap();
        assert!(first != second && second != third && first != third);
    }
    for _ in 0..1000 {
        let e = b.pick(None, &[0, 3], now).unwrap();
        assert!(e != 0 && e != 3);
    }
    assert_eq!(b.pick(None, &[0, 1, 2, 4], now), Some(3));
}

#[test]
fn health_checks_end_ejections_and_count_failures() {
    let b = balancer(4);
    let now = Instant::now();
    eject(&b, 3, now);
    b.health_check(3, true, now + Duration::from_secs(1));
    assert!(!b.is_ejected(3, now + Duration::from_secs(1)));
    assert_eq!(
        b.pick(None, &[0, 1, 2], now + Duration::from_secs(1)),
        Some(3)
    );
    for _ in 0..4 {
        b.health_check(3, false, now + Duration::from_secs(2));
    }
    assert!(!b.is_ejected(3, now + Duration::from_secs(2)));
    b.health_check(3, false, now + Duration::from_secs(2));
    assert!(b.is_ejected(3, now + Duration::from_secs(2)));
    // The pass did not reset the backoff: this second ejection lasts 20 s.
    assert!(b.is_ejected(3, now + Duration::from_secs(21)));
    assert!(!b.is_ejected(3, now + Duration::from_secs(22)));
}

#[test]
fn unknown_endpoints_are_ignored() {
    let b = balancer(2);
    let now = Instant::now();
    let guard = b.start(7);
    assert_eq!(guard.endpoint(), 7);
    drop(guard);
    assert_eq!(b.in_flight(7), 0);
    assert!(!b.failure(7, now));
    b.success(7);
    b.observe_latency(7, Duration::from_secs(1), now);
    b.health_check(7, true, now);
    assert!(!b.is_ejected(7, now));
    assert_eq!((b.in_flight(0), b.in_flight(1)), (0, 0));
}

#[test]
fn concurrent_picks_and_guards_leave_nothing_in_flight() {
    let b = balancer(4);
    let now = Instant::now();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                fastrand::seed(t);
                let mut held = Vec::new();
                for i in 0..20_000u64 {
                    let id = format!("job-{}", i % 13);
                    let affinity = (i % 2 == 0).then_some(id.as_str());
                    let Some(e) = b.pick(affinity, &[], now) else {
                        continue;
                    };
                    held.push(b.start(e));
                    match i % 7 {
                        0 => b.observe_latency(e, Duration::from_millis(i % 500), now),
                        1 => {
                            b.failure(e, now);
                        }
                        2 => b.success(e),
                        _ => {}
                    }
                    if held.len() > 16 {
                        held.drain(..8);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!((0..4).map(|e| b.in_flight(e)).collect::<Vec<_>>(), [0; 4]);
}
