//! A large, realistic snapshot document (SPEC §3–4), written straight to disk.
//!
//! Deployment `i` (0-based) has a uuid-like id, a slug `d0000001`…`d1000000` padded to 8–20
//! characters, and alternates between a base-model target and an adapter checkpoint target.
//! Every tenth deployment is `authMode: "none"`, a few are disabled. Each deployment has two
//! keys; key `j` belongs to deployment `j / 2` and its plaintext is derived from `j`, so the
//! bench can present a real key for any deployment. Everything is a pure function of the index,
//! so the document is streamed without holding it in memory, and the same objects can be
//! written again at a higher revision.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Keys per deployment.
pub const KEYS_PER_DEPLOYMENT: u64 = 2;

/// The base models the echo pool serves; targets alternate between them.
pub const BASE_MODELS: [&str; 2] = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
];

/// A bijective mix of a `u64` (splitmix64's finaliser): distinct inputs give distinct outputs.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seeds of different kinds of id never meet.
const DEPLOYMENT_ID: u64 = 1 << 40;
const JOB_ID: u64 = 2 << 40;
const KEY_ID: u64 = 3 << 40;

/// A uuid-shaped (version 4 layout) id for `seed`.
pub fn uuid(seed: u64) -> String {
    let (a, b) = (mix(seed), mix(seed ^ 0x5555_5555_5555_5555));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// `d0000001`-style, 8 to 20 characters of `[a-z0-9-]`, unique by its first 8.
pub fn slug(i: u64) -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = format!("d{:07}", i + 1);
    let h = mix(i);
    let extra = (h % 13) as usize;
    for k in 0..extra {
        if k == 0 && extra >= 2 {
            s.push('-');
        } else {
            s.push(ALNUM[((h >> (4 + 5 * (k % 11))) % 36) as usize] as char);
        }
    }
    s
}

pub fn is_auth_none(i: u64) -> bool {
    i % 10 == 0
}

pub fn deployment_enabled(i: u64) -> bool {
    i % 100 != 7
}

pub fn key_enabled(j: u64) -> bool {
    j % 50 != 1
}

fn is_adapter(i: u64) -> bool {
    i % 2 == 1
}

fn base_model(i: u64) -> &'static str {
    BASE_MODELS[((i / 2) % 2) as usize]
}

fn checkpoint_step(i: u64) -> u64 {
    100 * (1 + mix(i) % 40)
}

/// The model `GET /v1/models` names for deployment `i` (SPEC §3).
pub fn target_id(i: u64) -> String {
    if is_adapter(i) {
        format!("{}:step-{}", uuid(JOB_ID | i), checkpoint_step(i))
    } else {
        base_model(i).to_owned()
    }
}

/// The plaintext of key `j`: `ark_live_` and 32 hex digits, distinct for every `j`.
pub fn key_plaintext(j: u64) -> String {
    format!("ark_live_{:016x}{:016x}", mix(j), mix(j ^ (1 << 63)))
}

/// The last deployment with `authMode: "none"` and the last keyed one (with a live first key),
/// both enabled: what the lookup checks ask for.
pub fn probes(deployments: u64) -> (u64, u64) {
    let last = |keep: &dyn Fn(u64) -> bool| (0..deployments).rev().find(|&i| keep(i));
    let open = last(&|i| is_auth_none(i) && deployment_enabled(i)).unwrap_or(0);
    let keyed = last(&|i| {
        !is_auth_none(i) && deployment_enabled(i) && key_enabled(i * KEYS_PER_DEPLOYMENT)
    })
    .unwrap_or(0);
    (open, keyed)
}

/// The revision of a document of `deployments` objects written with `bump`: every object's
/// revision is at or below it.
pub fn doc_revision(deployments: u64, bump: u64) -> u64 {
    deployments * (1 + KEYS_PER_DEPLOYMENT) + bump
}

/// Writes the document to `path` (one object per line) and syncs it, so the page-cache
/// write-back does not run into the measurements that follow. Every revision is raised by
/// `bump`, which makes every object newer than a copy written with a lower `bump`. Returns
/// the file's size.
pub fn write(path: &Path, deployments: u64, bump: u64) -> std::io::Result<u64> {
    let file = File::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write!(
        w,
        "{{\"revision\":{},\"deployments\":[",
        doc_revision(deployments, bump)
    )?;
    for i in 0..deployments {
        let sep = if i == 0 { "\n" } else { ",\n" };
        let auth = if is_auth_none(i) {
            "none"
        } else {
            "fixed_api_key"
        };
        let target = if is_adapter(i) {
            format!(
                r#"{{"type":"adapter","jobId":"{}","checkpointStep":{},"baseModel":"{}"}}"#,
                uuid(JOB_ID | i),
                checkpoint_step(i),
                base_model(i)
            )
        } else {
            format!(r#"{{"type":"base_model","baseModel":"{}"}}"#, base_model(i))
        };
        write!(
            w,
            r#"{sep}{{"id":"{}","slug":"{}","enabled":{},"authMode":"{auth}","target":{target},"revision":{}}}"#,
            uuid(DEPLOYMENT_ID | i),
            slug(i),
            deployment_enabled(i),
            i + 1 + bump
        )?;
    }
    w.write_all(b"],\"keys\":[")?;
    let mut hex = [0u8; 64];
    for j in 0..deployments * KEYS_PER_DEPLOYMENT {
        let sep = if j == 0 { "\n" } else { ",\n" };
        let plain = key_plaintext(j);
        hex::encode_to_slice(Sha256::digest(plain.as_bytes()), &mut hex)
            .map_err(std::io::Error::other)?;
        let hex = std::str::from_utf8(&hex).map_err(std::io::Error::other)?;
        write!(
            w,
            r#"{sep}{{"id":"{}","deploymentId":"{}","prefix":"{}","sha256":"{hex}","enabled":{},"revision":{}}}"#,
            uuid(KEY_ID | j),
            uuid(DEPLOYMENT_ID | (j / KEYS_PER_DEPLOYMENT)),
            &plain[..12],
            key_enabled(j),
            deployments + j + 1 + bump
        )?;
    }
    w.write_all(b"\n]}\n")?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}
