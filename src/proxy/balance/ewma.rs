//! Peak-EWMA latency estimate of one endpoint (Finagle's load metric, as in tower and linkerd).
//!
//! A sample above the current estimate replaces it at once, so a GPU that starts queueing is
//! avoided from its first slow answer; a lower sample only pulls the estimate toward itself
//! with weight `1 − exp(−elapsed / decay)`, so one lucky answer does not undo a slowdown.
//!
//! Between samples the estimate drifts back toward the default latency with the same time
//! constant: old evidence fades into the prior. That is what brings a once-slow endpoint back
//! into play when nothing is sent to it any more, and it drifts toward the default rather than
//! toward zero (as tower does) so a long-idle endpoint does not look free and draw a herd of
//! requests before its first answer.

use std::time::Duration;

use tokio::time::Instant;

/// An endpoint's latency estimate, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PeakEwma {
    secs: f64,
    /// When the last sample came in; `None` while `secs` is still the default guess.
    at: Option<Instant>,
}

impl PeakEwma {
    /// An estimate holding the default latency until the first sample.
    pub(super) fn new(initial: Duration) -> PeakEwma {
        PeakEwma {
            secs: initial.as_secs_f64(),
            at: None,
        }
    }

    /// The estimate at `now`, in seconds: the last value, moved toward `prior` by the time
    /// since the last sample.
    pub(super) fn estimate(&self, now: Instant, prior: Duration, decay: Duration) -> f64 {
        match self.at {
            None => self.secs,
            Some(at) => {
                let kept = retained(now.saturating_duration_since(at), decay);
                let prior = prior.as_secs_f64();
                prior + (self.secs - prior) * kept
            }
        }
    }

    /// Takes one sample. The first sample replaces the default outright: that was a guess,
    /// the sample is evidence.
    pub(super) fn observe(
        &mut self,
        sample: Duration,
        now: Instant,
        prior: Duration,
        decay: Duration,
    ) {
        let current = self.estimate(now, prior, decay);
        let sample = sample.as_secs_f64();
        self.secs = match self.at {
            Some(at) if sample <= current => {
                let kept = retained(now.saturating_duration_since(at), decay);
                current * kept + sample * (1.0 - kept)
            }
            _ => sample,
        };
        // Samples reported out of order (concurrent requests) must not move time backwards.
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }
}

/// Weight the old value keeps after `elapsed`: `exp(−elapsed / decay)`. A zero decay keeps
/// nothing, so latency is then ignored and picks follow in-flight counts alone.
fn retained(elapsed: Duration, decay: Duration) -> f64 {
    if decay.is_zero() {
        return 0.0;
    }
    (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIOR: Duration = Duration::from_secs(1);
    const DECAY: Duration = Duration::from_secs(10);

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn starts_at_the_default_and_the_first_sample_replaces_it() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(PRIOR);
        assert!(close(e.estimate(t0 + DECAY * 5, PRIOR, DECAY), 1.0));
        e.observe(Duration::from_millis(200), t0, PRIOR, DECAY);
        assert!(close(e.estimate(t0, PRIOR, DECAY), 0.2));
    }

    #[test]
    fn peaks_jump_and_lower_samples_pull_gradually() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(PRIOR);
        e.observe(Duration::from_millis(500), t0, PRIOR, DECAY);
        e.observe(
            Duration::from_secs(4),
            t0 + Duration::from_millis(100),
            PRIOR,
            DECAY,
        );
        assert!(close(
            e.estimate(t0 + Duration::from_millis(100), PRIOR, DECAY),
            4.0
        ));
        // One second later a 0.5 s sample: the estimate (drifting toward 1 s) keeps
        // exp(-0.1) of itself and takes the rest from the sample.
        let t1 = t0 + Duration::from_millis(1100);
        e.observe(Duration::from_millis(500), t1, PRIOR, DECAY);
        let kept = (-0.1f64).exp();
        let current = 1.0 + 3.0 * kept;
        let want = current * kept + 0.5 * (1.0 - kept);
        assert!(close(e.estimate(t1, PRIOR, DECAY), want));
        assert!(
            want > 3.0,
            "one fast answer does not undo a slowdown: {want}"
        );
    }

    #[test]
    fn idle_estimates_drift_back_to_the_default() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(PRIOR);
        e.observe(Duration::from_secs(10), t0, PRIOR, DECAY);
        let after_one_decay = e.estimate(t0 + DECAY, PRIOR, DECAY);
        assert!(close(after_one_decay, 1.0 + 9.0 * (-1.0f64).exp()));
        assert!((e.estimate(t0 + DECAY * 20, PRIOR, DECAY) - 1.0).abs() < 1e-6);
        let mut fast = PeakEwma::new(PRIOR);
        fast.observe(Duration::from_millis(100), t0, PRIOR, DECAY);
        assert!((fast.estimate(t0 + DECAY * 20, PRIOR, DECAY) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn out_of_order_samples_do_not_move_time_back() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(PRIOR);
        e.observe(Duration::from_secs(2), t0 + DECAY, PRIOR, DECAY);
        e.observe(Duration::from_secs(1), t0, PRIOR, DECAY);
        // Zero elapsed: the low sample has no weight yet.
        assert!(close(e.estimate(t0 + DECAY, PRIOR, DECAY), 2.0));
    }

    #[test]
    fn zero_decay_forgets_at_once() {
        // No memory at all: every endpoint looks like the default, and picks follow load only.
        let t0 = Instant::now();
        let mut e = PeakEwma::new(PRIOR);
        e.observe(Duration::from_secs(3), t0, PRIOR, Duration::ZERO);
        assert!(close(e.estimate(t0, PRIOR, Duration::ZERO), 1.0));
        e.observe(Duration::from_millis(300), t0, PRIOR, Duration::ZERO);
        assert!(close(e.estimate(t0, PRIOR, Duration::ZERO), 1.0));
    }
}
