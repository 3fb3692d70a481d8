//! `key_lookup`: the presented key's SHA-256 and the lookup of its hash, in the registry (sharded
//! `DashMap`s of the objects themselves) and in the alternatives, a moka cache (the registry's
//! earlier form), a plain `DashMap` and an `Arc<HashMap>`, holding the very same `Arc<ApiKey>`s.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use arkor_edge::auth::KeyHash;
use arkor_edge::registry::{ApiKey, Registry};
use criterion::Criterion;
use dashmap::DashMap;
use moka::sync::Cache;

use crate::SIZES;
use crate::fixtures::{key_plaintext, probe_indexes, registry_with_keys};

/// The registry and the same keys in each alternative map.
struct Maps {
    registry: Registry,
    /// Configured like the registry's `by_hash`: unbounded, no expiry.
    moka: Cache<KeyHash, Arc<ApiKey>>,
    dashmap: DashMap<KeyHash, Arc<ApiKey>>,
    /// Read-only, as a map swapped whole on every change would be.
    hashmap: Arc<HashMap<KeyHash, Arc<ApiKey>>>,
}

impl Maps {
    fn build(n: u64) -> Maps {
        let registry = registry_with_keys(n);
        let moka = Cache::builder().build();
        let dashmap = DashMap::new();
        let mut hashmap = HashMap::new();
        for j in 0..n {
            let hash = KeyHash::of(key_plaintext(j).as_bytes());
            let key = registry.key(&hash).expect("generated key");
            moka.insert(hash, Arc::clone(&key));
            dashmap.insert(hash, Arc::clone(&key));
            hashmap.insert(hash, key);
        }
        // Let moka finish its deferred bookkeeping, as it has long done on a running edge.
        moka.run_pending_tasks();
        Maps {
            registry,
            moka,
            dashmap,
            hashmap: Arc::new(hashmap),
        }
    }

    /// Every lookup returns what the request path keeps: an `Arc` clone of the key.
    fn get(&self, store: Store, hash: &KeyHash) -> Option<Arc<ApiKey>> {
        match store {
            Store::Registry => self.registry.key(hash),
            Store::Moka => self.moka.get(hash),
            Store::DashMap => self.dashmap.get(hash).map(|k| Arc::clone(k.value())),
            Store::HashMap => self.hashmap.get(hash).cloned(),
        }
    }
}

#[derive(Clone, Copy)]
enum Store {
    Registry,
    Moka,
    DashMap,
    HashMap,
}

const STORES: [(&str, Store); 4] = [
    ("registry", Store::Registry),
    ("moka", Store::Moka),
    ("dashmap", Store::DashMap),
    ("hashmap", Store::HashMap),
];

pub fn key_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_lookup");
    let key = key_plaintext(0);
    group.bench_function("hash_only", |b| {
        b.iter(|| KeyHash::of(black_box(key.as_bytes())))
    });
    for (label, n) in SIZES {
        let maps: OnceCell<Maps> = OnceCell::new();
        let plaintexts: Vec<String> = probe_indexes(n).into_iter().map(key_plaintext).collect();
        let hashes: Vec<KeyHash> = plaintexts
            .iter()
            .map(|p| KeyHash::of(p.as_bytes()))
            .collect();
        let mask = hashes.len() - 1;
        for (name, store) in STORES {
            group.bench_function(format!("lookup/{name}/{label}"), |b| {
                let maps = maps.get_or_init(|| Maps::build(n));
                assert!(maps.get(store, &hashes[0]).is_some());
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) & mask;
                    maps.get(store, &hashes[i])
                })
            });
        }
        for (name, store) in STORES {
            group.bench_function(format!("hash_and_lookup/{name}/{label}"), |b| {
                let maps = maps.get_or_init(|| Maps::build(n));
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) & mask;
                    maps.get(store, &KeyHash::of(plaintexts[i].as_bytes()))
                })
            });
        }
    }
    group.finish();
}
