#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Replays every checked-in fuzz corpus file (`fuzz/corpus/<target>/`) through the checks the
//! fuzz targets run (`arkor_edge::fuzzing`), so each input the fuzzers kept — and each crash
//! they found — stays a regression test on the stable toolchain.

use std::path::PathBuf;

use arkor_edge::fuzzing::{self, Outcome};

/// One fuzz target's check.
type Check = fn(&[u8]) -> Outcome;

/// Every target and its check; a target without a corpus folder or with an empty one fails.
const TARGETS: [(&str, Check); 8] = [
    ("host", fuzzing::host::check),
    ("sni", fuzzing::sni::check),
    ("auth", fuzzing::auth::check),
    ("pin", fuzzing::pin::check),
    ("usage_scan", fuzzing::usage::check),
    ("control_plane", fuzzing::control::check),
    ("config", fuzzing::config::check),
    ("h1_response", fuzzing::h1::check),
];

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus folder {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus folder {} is empty",
        dir.display()
    );
    files
}

fn replay(target: &str, check: Check) {
    let mut failures = Vec::new();
    let files = corpus_files(target);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if let Err(why) = check(&data) {
            failures.push(format!("{}: {why}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} inputs fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn host_corpus() {
    replay(TARGETS[0].0, TARGETS[0].1);
}

#[test]
fn sni_corpus() {
    replay(TARGETS[1].0, TARGETS[1].1);
}

#[test]
fn auth_corpus() {
    replay(TARGETS[2].0, TARGETS[2].1);
}

#[test]
fn pin_corpus() {
    replay(TARGETS[3].0, TARGETS[3].1);
    // The pinner's refusals of bodies serde_json accepts, by reason (see `fuzzing::pin`).
    for (reason, n) in fuzzing::pin::serde_accepted_refusals() {
        eprintln!("pin: {reason}: {n}");
    }
}

#[test]
fn usage_scan_corpus() {
    replay(TARGETS[4].0, TARGETS[4].1);
}

#[test]
fn control_plane_corpus() {
    replay(TARGETS[5].0, TARGETS[5].1);
}

#[test]
fn config_corpus() {
    replay(TARGETS[6].0, TARGETS[6].1);
}

#[test]
fn h1_response_corpus() {
    replay(TARGETS[7].0, TARGETS[7].1);
}

/// Every corpus folder belongs to a target this test replays, so none is silently skipped.
#[test]
fn every_corpus_folder_is_replayed() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} has no replay"
        );
    }
}

/// Replays a whole corpus folder given by `ARKOR_FUZZ_CORPUS=<target>:<dir>` (e.g. the
/// fuzzer's full working corpus before `cargo fuzz cmin`); ignored unless asked for.
#[test]
#[ignore]
fn replay_external_corpus() {
    let spec = std::env::var("ARKOR_FUZZ_CORPUS").expect("ARKOR_FUZZ_CORPUS=<target>:<dir>");
    let (target, dir) = spec.split_once(':').unwrap();
    let (_, check) = TARGETS.iter().find(|(t, _)| *t == target).unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        check(&data).unwrap();
        n += 1;
    }
    eprintln!("{target}: {n} inputs pass");
    if target == "pin" {
        for (reason, n) in fuzzing::pin::serde_accepted_refusals() {
            eprintln!("pin: {reason}: {n}");
        }
    }
}
