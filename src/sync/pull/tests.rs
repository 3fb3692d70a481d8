//! The pure parts of the pull loop: backoff bounds and error text.

use super::*;

const MAX: Duration = Duration::from_secs(30);

#[test]
fn backoff_starts_at_100ms_and_doubles() {
    let just_below_one = 1.0 - f64::EPSILON;
    let mut expected = BACKOFF_START;
    for attempt in 0..8 {
        let top = backoff_delay(attempt, MAX, just_below_one);
        assert!(top <= expected, "attempt {attempt}: {top:?} > {expected:?}");
        assert!(
            top >= expected.mul_f64(0.999),
            "attempt {attempt}: {top:?} far below {expected:?}"
        );
        expected *= 2;
    }
}

#[test]
fn backoff_is_capped_and_never_overflows() {
    for attempt in [9, 10, 20, 21, 31, 32, 63, 64, 1000, u32::MAX] {
        assert!(backoff_delay(attempt, MAX, 0.999_999) <= MAX, "{attempt}");
        assert!(backoff_delay(attempt, MAX, 0.999_999) >= MAX.mul_f64(0.99));
    }
    // A cap below the first step caps it too.
    let small = Duration::from_millis(30);
    assert!(backoff_delay(0, small, 0.999) <= small);
}

#[test]
fn backoff_has_full_jitter() {
    assert_eq!(backoff_delay(5, MAX, 0.0), Duration::ZERO);
    // Out-of-range draws are clamped rather than trusted.
    assert!(backoff_delay(0, MAX, 7.0) <= BACKOFF_START);
    assert_eq!(backoff_delay(0, MAX, -1.0), Duration::ZERO);
    assert_eq!(backoff_delay(0, MAX, f64::NAN), Duration::ZERO);
    let mut below_half = 0;
    for attempt in 0..12 {
        let ceiling = BACKOFF_START.saturating_mul(1 << attempt).min(MAX);
        for _ in 0..200 {
            let d = backoff_delay(attempt, MAX, fastrand::f64());
            assert!(d <= ceiling, "attempt {attempt}: {d:?} over {ceiling:?}");
            if d < ceiling / 2 {
                below_half += 1;
            }
        }
    }
    // Spread over the whole range, not bunched at the top.
    assert!(below_half > 12 * 200 / 4, "{below_half}");
}

#[test]
fn error_chain_names_the_cause() {
    let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let outer = std::io::Error::other(inner);
    assert!(chain(&outer).contains("refused"));
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_healthy_after_an_event_or_a_long_life() {
    let max = Duration::from_secs(1);
    assert!(!Progress::default().was_healthy(max), "never opened");
    let delivered = Progress {
        opened: Some(tokio::time::Instant::now()),
        delivered: true,
    };
    assert!(delivered.was_healthy(max));
    let quiet = Progress {
        opened: Some(tokio::time::Instant::now()),
        delivered: false,
    };
    assert!(!quiet.was_healthy(max), "cut at once: a failure in a row");
    tokio::time::advance(max).await;
    assert!(quiet.was_healthy(max), "open longer than the longest pause");
}
