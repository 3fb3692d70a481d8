//! [`Seconds`]: a Prometheus histogram of durations that folds each sample into its bucket as it
//! is recorded, for the histograms recorded on every request and every streamed chunk.
//!
//! The `metrics` crate's Prometheus recorder keeps every raw sample (8 bytes, in 1 KiB blocks it
//! allocates) until a scrape or upkeep folds them into buckets. Per streamed chunk that cost about
//! 200 instructions with the fold, and one allocation every 128 chunks. Here a sample is a bucket
//! search over [`BOUNDS`] and two relaxed atomic additions; the rendering reuses the recorder's
//! own formatting, so the page reads the same.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics_exporter_prometheus::LabelSet;
use metrics_exporter_prometheus::formatting::{
    write_help_line, write_metric_line, write_type_line,
};

/// Upper bounds of the buckets, seconds; the same for every histogram of the edge.
pub const BOUNDS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// One histogram (one name and label set): a count per bucket of [`BOUNDS`] plus one for what lies
/// above them, and the sum. Readers may see a sample in its bucket before it is in the sum: a
/// scrape is a snapshot, not a transaction.
#[derive(Debug, Default)]
pub struct Seconds {
    /// Not cumulative: `counts[i]` holds the samples in `(BOUNDS[i-1], BOUNDS[i]]`, the last one
    /// those above every bound.
    counts: [AtomicU64; BOUNDS.len() + 1],
    /// The sum of the samples, seconds, as `f64` bits.
    sum: AtomicU64,
}

impl Seconds {
    /// Records one sample; allocates nothing, takes no lock.
    pub fn record(&self, sample: Duration) {
        let secs = sample.as_secs_f64();
        let bucket = BOUNDS.partition_point(|&le| le < secs);
        self.counts[bucket].fetch_add(1, Relaxed);
        // An f64 cannot be added atomically: swap in the new sum unless another thread got
        // there first. Uncontended that is one try.
        let mut old = self.sum.load(Relaxed);
        while let Err(now) = self.sum.compare_exchange_weak(
            old,
            (f64::from_bits(old) + secs).to_bits(),
            Relaxed,
            Relaxed,
        ) {
            old = now;
        }
    }

    /// Cumulative counts per bound (`le`), the total count, and the sum.
    fn snapshot(&self) -> ([u64; BOUNDS.len()], u64, f64) {
        let mut cumulative = [0; BOUNDS.len()];
        let mut total = 0;
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Relaxed);
            if let Some(c) = cumulative.get_mut(i) {
                *c = total;
            }
        }
        (cumulative, total, f64::from_bits(self.sum.load(Relaxed)))
    }
}

struct Entry {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    histogram: Arc<Seconds>,
}

/// Every histogram registered, in order of registration. Registration happens when the edge
/// starts and its pools are built; the request path only holds the `Arc`s.
static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The histogram `name` with `labels`, registered on first use (later calls with the same name
/// and labels share it, as `metrics::histogram!` does).
pub fn register(name: &'static str, labels: &[(&'static str, &str)]) -> Arc<Seconds> {
    let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    let same = |e: &&Entry| {
        e.name == name
            && e.labels.len() == labels.len()
            && e.labels
                .iter()
                .zip(labels)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
    };
    if let Some(e) = registry.iter().find(same) {
        return Arc::clone(&e.histogram);
    }
    let histogram = Arc::new(Seconds::default());
    registry.push(Entry {
        name,
        labels: labels.iter().map(|&(k, v)| (k, v.to_owned())).collect(),
        histogram: Arc::clone(&histogram),
    });
    histogram
}

/// Appends every registered histogram to `out` in the Prometheus text format, each family under
/// one `HELP` (from `help`) and `TYPE` line.
pub fn render(out: &mut String, help: impl Fn(&str) -> &'static str) {
    let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    let mut names: Vec<&'static str> = registry.iter().map(|e| e.name).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        write_help_line(out, name, None, None, help(name));
        write_type_line(out, name, None, None, "histogram");
        for e in registry.iter().filter(|e| e.name == name) {
            let key = metrics::Key::from_parts(
                name,
                e.labels
                    .iter()
                    .map(|(k, v)| metrics::Label::new(*k, v.clone()))
                    .collect::<Vec<_>>(),
            );
            let labels = LabelSet::from_key_and_global(&key, &Default::default());
            let (cumulative, count, sum) = e.histogram.snapshot();
            for (le, n) in BOUNDS.iter().zip(cumulative) {
                write_metric_line(
                    out,
                    name,
                    Some("bucket"),
                    &labels,
                    Some(("le", le)),
                    n,
                    None,
                );
            }
            let inf = Some(("le", "+Inf"));
            write_metric_line(out, name, Some("bucket"), &labels, inf, count, None);
            write_metric_line::<&str, f64>(out, name, Some("sum"), &labels, None, sum, None);
            write_metric_line::<&str, u64>(out, name, Some("count"), &labels, None, count, None);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn a_sample_on_a_bound_counts_in_that_bucket() {
        let h = Seconds::default();
        for us in [0, 500, 1000, 1001, 250_000] {
            h.record(Duration::from_micros(us));
        }
        h.record(Duration::from_secs(121));
        let (cumulative, count, sum) = h.snapshot();
        // le=0.0005 holds 0 and 0.0005; le=0.001 adds 0.001; le=0.0025 adds 0.001001;
        // 0.25 lands in le=0.25; 121 s only in +Inf.
        assert_eq!(cumulative[..4], [2, 3, 4, 4]);
        assert_eq!(cumulative[8], 5);
        assert_eq!(cumulative[16], 5);
        assert_eq!(count, 6);
        assert!((sum - (0.0005 + 0.001 + 0.001001 + 0.25 + 121.0)).abs() < 1e-9);
    }

    #[test]
    fn samples_from_many_threads_all_count() {
        let h = Arc::new(Seconds::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        h.record(Duration::from_millis(3));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (cumulative, count, sum) = h.snapshot();
        assert_eq!((cumulative[2], cumulative[3], count), (0, 40_000, 40_000));
        assert!((sum - 120.0).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn renders_one_family_per_name_with_escaped_labels() {
        let name = "arkor_edge_test_render_seconds";
        let a = register(name, &[("endpoint", "http://a\"b\\c")]);
        let b = register(name, &[("endpoint", "http://b")]);
        assert!(Arc::ptr_eq(
            &a,
            &register(name, &[("endpoint", "http://a\"b\\c")])
        ));
        a.record(Duration::from_millis(2));
        a.record(Duration::from_secs(200));
        b.record(Duration::from_millis(20));
        let mut out = String::new();
        render(&mut out, |n| if n == name { "Test." } else { "Other." });
        let ours: Vec<&str> = out.lines().filter(|l| l.contains(name)).collect();
        assert_eq!(ours.len(), 2 + 2 * (BOUNDS.len() + 3), "{out}");
        assert_eq!(ours[0], format!("# HELP {name} Test."));
        assert_eq!(ours[1], format!("# TYPE {name} histogram"));
        let a_lines = format!("{name}_bucket{{endpoint=\"http://a\\\"b\\\\c\"");
        assert!(
            ours.contains(&format!("{a_lines},le=\"0.001\"}} 0").as_str()),
            "{out}"
        );
        assert!(
            ours.contains(&format!("{a_lines},le=\"0.0025\"}} 1").as_str()),
            "{out}"
        );
        assert!(
            ours.contains(&format!("{a_lines},le=\"120\"}} 1").as_str()),
            "{out}"
        );
        assert!(
            ours.contains(&format!("{a_lines},le=\"+Inf\"}} 2").as_str()),
            "{out}"
        );
        let sum = format!("{name}_sum{{endpoint=\"http://a\\\"b\\\\c\"}} ");
        let sum: f64 = ours
            .iter()
            .find_map(|l| l.strip_prefix(&sum))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 200.002).abs() < 1e-9, "{sum}");
        assert!(ours.contains(&format!("{name}_count{{endpoint=\"http://b\"}} 1").as_str()));
        assert!(
            ours.contains(
                &format!("{name}_bucket{{endpoint=\"http://b\",le=\"0.025\"}} 1").as_str()
            )
        );
    }
}
