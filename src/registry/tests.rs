//! Revision rules of the registry.

use super::*;
use serde_json::json;

fn registry() -> Registry {
    Registry::new(Arc::new(Pools::default()))
}

fn slug(s: &str) -> Slug {
    Slug::parse(s.as_bytes()).unwrap()
}

fn upsert_dep(revision: u64, id: &str, slug: &str, enabled: bool) -> Vec<u8> {
    json!({"revision": revision, "op": "upsert_deployment", "deployment": {
        "id": id, "slug": slug, "enabled": enabled, "authMode": "fixed_api_key",
        "target": {"type": "base_model", "baseModel": "m"}, "revision": revision}})
    .to_string()
    .into_bytes()
}

fn upsert_key(revision: u64, id: &str, dep: &str, plaintext: &str, enabled: bool) -> Vec<u8> {
    json!({"revision": revision, "op": "upsert_key", "key": {
        "id": id, "deploymentId": dep, "prefix": &plaintext[..12],
        "sha256": KeyHash::of(plaintext.as_bytes()).to_hex(), "enabled": enabled,
        "revision": revision}})
    .to_string()
    .into_bytes()
}

fn delete(revision: u64, op: &str, id: &str) -> Vec<u8> {
    json!({"revision": revision, "op": op, "id": id})
        .to_string()
        .into_bytes()
}

const KEY: &str = "ark_live_aaaaaaaaaaaaaaaaaaaaaaaa";

#[test]
fn upsert_is_idempotent_and_never_goes_back() {
    let r = registry();
    assert_eq!(
        r.apply_json_event(&upsert_dep(5, "d1", "acme", true)),
        Applied::Changed
    );
    assert_eq!(
        r.apply_json_event(&upsert_dep(5, "d1", "acme", true)),
        Applied::Stale
    );
    assert_eq!(
        r.apply_json_event(&upsert_dep(4, "d1", "acme", false)),
        Applied::Stale
    );
    assert!(r.deployment(&slug("acme")).unwrap().enabled);
    assert_eq!(
        r.apply_json_event(&upsert_dep(6, "d1", "acme", false)),
        Applied::Changed
    );
    assert!(!r.deployment(&slug("acme")).unwrap().enabled);
    assert_eq!(r.revision(), 6);
}

#[test]
fn slug_change_moves_the_deployment() {
    let r = registry();
    r.apply_json_event(&upsert_dep(1, "d1", "old-name", true));
    r.apply_json_event(&upsert_dep(2, "d1", "new-name", true));
    assert!(r.deployment(&slug("old-name")).is_none());
    assert_eq!(&*r.deployment(&slug("new-name")).unwrap().id, "d1");
    assert_eq!(r.counts(), (1, 0));
}

#[test]
fn newer_claim_on_a_slug_wins_older_is_refused() {
    let r = registry();
    r.apply_json_event(&upsert_dep(5, "d1", "acme", true));
    assert!(matches!(
        r.apply_json_event(&upsert_dep(3, "d2", "acme", true)),
        Applied::Rejected(_)
    ));
    assert_eq!(&*r.deployment(&slug("acme")).unwrap().id, "d1");
    assert_eq!(
        r.apply_json_event(&upsert_dep(7, "d2", "acme", true)),
        Applied::Changed
    );
    assert_eq!(&*r.deployment(&slug("acme")).unwrap().id, "d2");
    assert_eq!(r.counts(), (1, 0));
}

#[test]
fn delete_leaves_a_tombstone() {
    let r = registry();
    r.apply_json_event(&upsert_dep(1, "d1", "acme", true));
    assert_eq!(
        r.apply_json_event(&delete(3, "delete_deployment", "d1")),
        Applied::Changed
    );
    assert!(r.deployment(&slug("acme")).is_none());
    // A late upsert older than the delete cannot bring it back …
    assert_eq!(
        r.apply_json_event(&upsert_dep(2, "d1", "acme", true)),
        Applied::Stale
    );
    assert!(r.deployment(&slug("acme")).is_none());
    // … a newer one can.
    assert_eq!(
        r.apply_json_event(&upsert_dep(4, "d1", "acme", true)),
        Applied::Changed
    );
    assert!(r.deployment(&slug("acme")).is_some());
    // A delete older than the object is stale.
    assert_eq!(
        r.apply_json_event(&delete(3, "delete_deployment", "d1")),
        Applied::Stale
    );
    assert!(r.deployment(&slug("acme")).is_some());
}

#[test]
fn delete_before_upsert_still_wins() {
    let r = registry();
    assert_eq!(
        r.apply_json_event(&delete(9, "delete_key", "k1")),
        Applied::Stale
    );
    assert_eq!(
        r.apply_json_event(&upsert_key(8, "k1", "d1", KEY, true)),
        Applied::Stale
    );
    assert!(r.key(&KeyHash::of(KEY.as_bytes())).is_none());
}

#[test]
fn keys_follow_revisions_and_hash_changes() {
    let r = registry();
    let h = KeyHash::of(KEY.as_bytes());
    assert_eq!(
        r.apply_json_event(&upsert_key(1, "k1", "d1", KEY, true)),
        Applied::Changed
    );
    assert!(r.key(&h).unwrap().enabled);
    assert_eq!(
        r.apply_json_event(&upsert_key(2, "k1", "d1", KEY, false)),
        Applied::Changed
    );
    assert!(!r.key(&h).unwrap().enabled);
    assert_eq!(
        r.apply_json_event(&upsert_key(1, "k1", "d1", KEY, true)),
        Applied::Stale
    );
    assert!(!r.key(&h).unwrap().enabled);
    let other = "ark_live_bbbbbbbbbbbbbbbbbbbbbbbb";
    r.apply_json_event(&upsert_key(3, "k1", "d1", other, true));
    assert!(r.key(&h).is_none());
    assert!(r.key(&KeyHash::of(other.as_bytes())).is_some());
    r.apply_json_event(&delete(4, "delete_key", "k1"));
    assert!(r.key(&KeyHash::of(other.as_bytes())).is_none());
}

#[test]
fn malformed_events_are_rejected_alone() {
    let r = registry();
    for bad in [
        &b"not json"[..],
        br#"{"revision":1,"op":"explode"}"#,
        br#"{"revision":1,"op":"upsert_deployment","deployment":{"id":"d"}}"#,
        br#"{"op":"delete_key","id":"k"}"#,
    ] {
        assert!(matches!(r.apply_json_event(bad), Applied::Rejected(_)));
    }
    let bad_hash = json!({"revision": 2, "op": "upsert_key", "key": {"id": "k", "deploymentId": "d",
        "sha256": "XYZ", "enabled": true, "revision": 2}});
    assert!(matches!(
        r.apply_json_event(bad_hash.to_string().as_bytes()),
        Applied::Rejected(_)
    ));
    assert_eq!(r.revision(), 0);
    assert_eq!(
        r.apply_json_event(&upsert_dep(3, "d1", "acme", true)),
        Applied::Changed
    );
}

fn snapshot(revision: u64, deployments: serde_json::Value, keys: serde_json::Value) -> Vec<u8> {
    json!({"revision": revision, "deployments": deployments, "keys": keys})
        .to_string()
        .into_bytes()
}

fn dep(id: &str, slug: &str, revision: u64) -> serde_json::Value {
    json!({"id": id, "slug": slug, "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "m"}, "revision": revision})
}

#[test]
fn snapshot_is_the_whole_truth_at_its_revision() {
    let r = registry();
    assert!(!r.is_loaded());
    let rep = r
        .apply_snapshot(&snapshot(
            10,
            json!([dep("d1", "one", 1), dep("d2", "two", 2)]),
            json!([]),
        ))
        .unwrap();
    assert_eq!((rep.changed, rep.removed), (2, 0));
    assert!(r.is_loaded());
    // A pushed object newer than the next snapshot survives it; an older absent one goes.
    r.apply_json_event(&upsert_dep(12, "d3", "three", true));
    let rep = r
        .apply_snapshot(&snapshot(11, json!([dep("d1", "one", 1)]), json!([])))
        .unwrap();
    assert_eq!(rep.removed, 1);
    assert!(r.deployment(&slug("two")).is_none());
    assert!(r.deployment(&slug("one")).is_some());
    assert!(r.deployment(&slug("three")).is_some());
    assert_eq!(r.revision(), 12);
}

#[test]
fn snapshot_that_does_not_parse_changes_nothing() {
    let r = registry();
    r.apply_snapshot(&snapshot(1, json!([dep("d1", "one", 1)]), json!([])))
        .unwrap();
    assert!(
        r.apply_snapshot(b"{\"revision\":2,\"deployments\":[")
            .is_err()
    );
    assert!(r.apply_snapshot(b"[]").is_err());
    assert!(r.deployment(&slug("one")).is_some());
    assert_eq!(r.revision(), 1);
}

#[test]
fn a_bad_object_in_a_snapshot_is_rejected_alone_and_not_dropped() {
    let r = registry();
    r.apply_snapshot(&snapshot(
        1,
        json!([dep("d1", "one", 1), dep("d2", "two", 1)]),
        json!([]),
    ))
    .unwrap();
    let broken = json!({"id": "d1", "slug": "one", "enabled": "yes"});
    let rep = r
        .apply_snapshot(&snapshot(
            2,
            json!([broken, dep("d2", "two", 2), dep("d3", "www", 2)]),
            json!([]),
        ))
        .unwrap();
    assert_eq!(rep.rejected.len(), 2, "{:?}", rep.rejected);
    assert!(
        r.deployment(&slug("one")).is_some(),
        "unreadable object was dropped"
    );
    assert!(r.deployment(&slug("two")).is_some());
}

/// An exported document with its objects in id order, to compare states.
fn sorted(doc: &[u8]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(doc).unwrap();
    for list in ["deployments", "keys"] {
        v[list]
            .as_array_mut()
            .unwrap()
            .sort_by_key(|o| o["id"].as_str().unwrap().to_owned());
    }
    v
}

#[test]
fn export_round_trips_through_a_snapshot() {
    let r = registry();
    r.apply_json_event(&upsert_dep(1, "d1", "acme", true));
    r.apply_json_event(&upsert_key(2, "k1", "d1", KEY, true));
    r.apply_json_event(&upsert_dep(3, "d2", "beta", false));
    let doc = r.export();
    let text = String::from_utf8(doc.clone()).unwrap();
    assert!(!text.contains(KEY), "plaintext key persisted");
    let copy = registry();
    let rep = copy.apply_snapshot(&doc).unwrap();
    assert_eq!((rep.changed, rep.removed, rep.revision), (3, 0, 3));
    assert_eq!(copy.counts(), (2, 1));
    let k = copy.key(&KeyHash::of(KEY.as_bytes())).unwrap();
    assert_eq!(&*k.deployment_id, "d1");
    assert_eq!(k.prefix.as_ref().map(|p| p.as_str()), Some("ark_live_aaa"));
    assert!(!copy.deployment(&slug("beta")).unwrap().enabled);
    assert_eq!(sorted(&copy.export()), sorted(&doc));
}

fn event(v: serde_json::Value) -> Event {
    serde_json::from_value(v).unwrap()
}

#[test]
fn a_batch_with_an_invalid_event_applies_nothing() {
    let r = registry();
    let good = event(serde_json::from_slice(&upsert_dep(1, "d1", "acme", true)).unwrap());
    let bad = event(
        json!({"revision": 2, "op": "upsert_deployment", "deployment": {
        "id": "d2", "slug": "www", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "m"}, "revision": 2}}),
    );
    let err = r.apply_batch(vec![good.clone(), bad]).unwrap_err();
    assert_eq!(err.0, 1);
    assert!(r.deployment(&slug("acme")).is_none());
    assert_eq!(r.revision(), 0);
    let stale = event(serde_json::from_slice(&upsert_dep(1, "d1", "acme", true)).unwrap());
    let out = r.apply_batch(vec![good, stale]).unwrap();
    assert_eq!(out, [Applied::Changed, Applied::Stale]);
    assert!(r.deployment(&slug("acme")).is_some());
}

/// A first load (read on a second thread) and a later one (read on the caller's) must end in the
/// same state and report, over several batches, with duplicates, slug conflicts and bad objects.
#[test]
fn first_and_later_loads_agree() {
    let mut deployments = Vec::new();
    let mut keys = Vec::new();
    for i in 0..3000u64 {
        let slug = format!("d{}", i % 2900); // later ones fight over earlier slugs
        deployments.push(
            json!({"id": format!("d{i}"), "slug": slug, "enabled": i % 7 != 0,
            "authMode": "fixed_api_key", "target": {"type": "base_model", "baseModel": "m"},
            "revision": i + 1}),
        );
        let key = format!("ark_live_{i:024}");
        keys.push(
            json!({"id": format!("k{i}"), "deploymentId": format!("d{i}"),
            "sha256": KeyHash::of(key.as_bytes()).to_hex(), "enabled": true,
            "revision": 10_000 + i}),
        );
    }
    // The same id again, older and then newer; an object that is not one; a bad hash.
    deployments.push(
        json!({"id": "d5", "slug": "older", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "m"}, "revision": 1}),
    );
    deployments.push(
        json!({"id": "d6", "slug": "newer", "enabled": true, "authMode": "none",
        "target": {"type": "base_model", "baseModel": "m"}, "revision": 99_999}),
    );
    deployments.push(json!(17));
    keys.push(
        json!({"id": "k-bad", "deploymentId": "d1", "sha256": "xyz", "enabled": true,
        "revision": 3}),
    );
    let doc = json!({"revision": 100_000, "deployments": deployments, "keys": keys}).to_string();

    let first = registry();
    let a = first.apply_snapshot(doc.as_bytes()).unwrap();
    let later = registry();
    later
        .apply_snapshot(br#"{"revision":0,"deployments":[],"keys":[]}"#)
        .unwrap();
    let b = later.apply_snapshot(doc.as_bytes()).unwrap();
    assert_eq!(
        (a.changed, a.removed, &a.rejected),
        (b.changed, b.removed, &b.rejected)
    );
    // The object that is not one and the bad hash; the later slug claims win over the older
    // (d2905 takes slug d5 from d5, which then comes back under a slug of its own).
    assert_eq!(a.rejected.len(), 2, "{:?}", a.rejected);
    assert_eq!(first.counts(), later.counts());
    assert_eq!(first.counts(), (3000 - 100 + 2, 3000));
    assert_eq!(&*first.deployment(&slug("d5")).unwrap().id, "d2905");
    assert_eq!(&*first.deployment(&slug("older")).unwrap().id, "d5");
    assert_eq!(sorted(&first.export()), sorted(&later.export()));
    assert_eq!(&*first.deployment(&slug("newer")).unwrap().id, "d6");
}
