//! Rendezvous (highest-random-weight) hashing of adapter target ids, with bounded load.
//!
//! Each (target id, endpoint) pair gets a pseudo-random weight; the adapter goes to the
//! eligible endpoint of highest weight. Removing an endpoint moves only the adapters that were
//! on it, and each of those to its own next choice, so a GPU's LoRA cache stays warm across
//! ejections. The hash is fixed and written out here (not `std`'s `DefaultHasher`, whose
//! algorithm may change between Rust releases), so every edge replica, on every version, after
//! every restart, sends an adapter to the same endpoint:
//!
//! `weight = splitmix64_finalizer(FNV-1a-64(target id UTF-8 bytes ‖ endpoint index as u64 LE))`
//!
//! FNV-1a alone mixes its last bytes poorly into the high bits; the splitmix64 finalizer
//! spreads every input bit over the whole word, which the weights need to be independent
//! across endpoints.
//!
//! Bounded load (Mirrokni, Thorup & Zadimoghaddam, "consistent hashing with bounded loads"):
//! walking endpoints in descending weight, the first one with
//! `in_flight + 1 <= ceil(c × (total_in_flight + 1) / eligible)` takes the request. With `c ≥ 1`
//! the least-loaded endpoint always fits, so the walk always ends; a hot adapter spills to its
//! second choice only while its first is above `c` × the mean, and comes back once it is not.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The rendezvous weight of `endpoint` (index in config order) for `target` (a target id):
/// higher wins. Stable across processes, replicas and Rust versions; see the module docs.
pub fn rendezvous_weight(target: &str, endpoint: usize) -> u64 {
    weight(fnv1a(FNV_OFFSET, target.as_bytes()), endpoint)
}

/// The weight from the FNV state after the target's bytes, so a walk hashes the target once.
fn weight(target_state: u64, endpoint: usize) -> u64 {
    finalize(fnv1a(target_state, &(endpoint as u64).to_le_bytes()))
}

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        state ^= u64::from(*b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// The splitmix64 output function (Stafford's "mix13"): a bijection with full avalanche.
fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The endpoint of `eligible` that takes a request for `target`: the highest-weight one under
/// the load bound, or the least loaded if racing updates left none under it. `load` gives an
/// endpoint's current in-flight count. `None` only for an empty `eligible`.
pub(super) fn choose(
    target: &str,
    eligible: &[usize],
    load_factor: f64,
    load: impl Fn(usize) -> u32,
) -> Option<usize> {
    let total: u64 = eligible.iter().map(|&i| u64::from(load(i))).sum();
    let bound = (load_factor * (total + 1) as f64 / eligible.len() as f64).ceil();
    let state = fnv1a(FNV_OFFSET, target.as_bytes());
    // Walk in descending (weight, index) order without sorting: each step takes the best
    // entry below the previous one. The first step almost always fits, so this is one pass.
    let mut below: Option<(u64, usize)> = None;
    loop {
        let next = eligible
            .iter()
            .map(|&i| (weight(state, i), i))
            .filter(|&w| below.is_none_or(|b| w < b))
            .max();
        let Some((w, i)) = next else { break };
        if f64::from(load(i).saturating_add(1)) <= bound {
            return Some(i);
        }
        below = Some((w, i));
    }
    eligible.iter().copied().min_by_key(|&i| load(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned() {
        // FNV-1a reference vectors, then golden weights: if these change, adapters move
        // between endpoints on upgrade, and replicas on different versions disagree.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(finalize(0), 0);
        let golden = [
            rendezvous_weight("job-1", 0),
            rendezvous_weight("job-1", 1),
            rendezvous_weight("4b2e:step-42", 3),
        ];
        assert_eq!(golden, GOLDEN);
    }

    /// Computed independently (a few lines of Python following the module docs' formula).
    const GOLDEN: [u64; 3] = [
        0x8480_75ce_6807_27ad,
        0xd1c9_1e9e_4241_4990,
        0x91ac_74d2_fb07_3489,
    ];

    #[test]
    fn walks_in_weight_order_under_the_bound() {
        let eligible = [0, 1, 2, 3];
        let mut order = eligible.to_vec();
        order.sort_by_key(|&i| std::cmp::Reverse(rendezvous_weight("t", i)));
        assert_eq!(choose("t", &eligible, 1.25, |_| 0), Some(order[0]));
        // The first choice holds 3 of 4 in flight: bound = ceil(1.25 × 5 / 4) = 2, so it spills.
        let loaded = |i| if i == order[0] { 3 } else { 0 };
        assert_eq!(choose("t", &eligible, 1.25, loaded), Some(order[1]));
        // Both the first and second over the bound: the third.
        let two = |i| if i == order[0] || i == order[1] { 4 } else { 0 };
        assert_eq!(choose("t", &eligible, 1.25, two), Some(order[2]));
        assert_eq!(choose("t", &[], 1.25, |_| 0), None);
    }

    #[test]
    fn falls_back_to_the_least_loaded_when_nothing_fits() {
        // A factor below 1 is clamped by the balancer; here it models loads that moved during
        // the walk, leaving nothing under the bound.
        assert_eq!(choose("t", &[0, 1, 2], 0.1, |i| [5, 2, 7][i]), Some(1));
    }
}
