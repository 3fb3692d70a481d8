//! Criterion micro-benches of every step a request takes through the edge, each next to the
//! obvious alternative where there is one:
//!
//! * `host_to_slug` — `Slug::from_host` on the `Host` header forms clients send;
//! * `deployment_lookup` — `Registry::deployment`, hit and miss, at 1k and 1M deployments;
//! * `key_lookup` — SHA-256 of the presented key and the lookup by hash: moka (what the
//!   registry uses) vs `DashMap` vs a read-only `HashMap` behind an `Arc`, at 1k and 1M keys,
//!   the hash and the lookup apart, and the real `Registry::key`;
//! * `pin` — model pinning on 1 KiB / 64 KiB / 1 MiB chat bodies for each pool flavour, vs
//!   parsing into a `serde_json::Value` and serialising it again;
//! * `usage_scan` — the usage scan of a 32-event stream per chunk, whole events or split
//!   mid-event, and of a non-streamed body, vs `serde_json` per event.
//!
//! `cargo bench --bench micro` runs all (under four minutes on two shared cores);
//! `cargo bench --bench micro -- --quick` or a filter such as `-- key_lookup/lookup` gives a quick
//! look. The 1M-entry registries are built once per group, only when one of its benches is
//! selected, and never inside a timed loop.

// A bench binary: a broken fixture may stop it outright.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "micro/fixtures.rs"]
mod fixtures;
#[path = "micro/keys.rs"]
mod keys;
#[path = "micro/pin.rs"]
mod pin;
#[path = "micro/usage.rs"]
mod usage;

use std::cell::OnceCell;
use std::hint::black_box;
use std::time::Duration;

use arkor_edge::host::Slug;
use arkor_edge::registry::Registry;
use criterion::{Criterion, criterion_group, criterion_main};

use fixtures::{BASES, absent_slug, probe_indexes, registry_with_deployments, slug};

/// Registry sizes of the lookup groups: (label, entries).
pub const SIZES: [(&str, u64); 2] = [("1k", 1_000), ("1M", 1_000_000)];

fn host_to_slug(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_to_slug");
    let hosts: [(&str, &[u8]); 4] = [
        ("plain", b"acme-support.arkor.app"),
        ("port_trailing_dot", b"acme-support.arkor.app.:443"),
        ("uppercase", b"ACME-Support.Arkor.APP"),
        ("other_domain", b"acme-support.arkor.app.evil.com"),
    ];
    for (name, host) in hosts {
        group.bench_function(name, |b| {
            b.iter(|| Slug::from_host(black_box(host), black_box(&BASES)))
        });
    }
    group.finish();
}

fn deployment_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("deployment_lookup");
    for (label, n) in SIZES {
        // Built on first use, so a filter that skips this size skips the build too.
        let registry: OnceCell<Registry> = OnceCell::new();
        let hits: Vec<Slug> = probe_indexes(n).into_iter().map(slug).collect();
        let misses: Vec<Slug> = probe_indexes(n).into_iter().map(absent_slug).collect();
        for (kind, probes, found) in [("hit", &hits, true), ("miss", &misses, false)] {
            group.bench_function(format!("{kind}/{label}"), |b| {
                let registry = registry.get_or_init(|| registry_with_deployments(n));
                assert_eq!(registry.deployment(&probes[0]).is_some(), found);
                let mask = probes.len() - 1;
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) & mask;
                    registry.deployment(&probes[i])
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = host_to_slug, deployment_lookup, keys::key_lookup, pin::pin, usage::usage_scan
}
criterion_main!(micro);
