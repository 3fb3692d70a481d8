#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Model pinning over generated JSON objects: byte-level fuzzing seldom writes a valid object
//! with several spellings of the owned keys, so these bodies are built from the pieces that
//! matter (escaped, case-variant and NUL-suffixed keys, duplicates, `stream` and
//! `stream_options`, odd white space) and go through the same differential check as the fuzz
//! target (`arkor_edge::fuzzing::pin::check`).

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r#""model""#.to_owned()),
        Just(r#""m\u006fdel""#.to_owned()),
        Just(r#""\u006d\u006f\u0064\u0065\u006c""#.to_owned()),
        Just(r#""Model""#.to_owned()),
        Just(r#""model\u0000""#.to_owned()),
        Just(r#""lora""#.to_owned()),
        Just(r#""lor\u0061""#.to_owned()),
        Just(r#""lora_path""#.to_owned()),
        Just(r#""stream""#.to_owned()),
        Just(r#""stream_options""#.to_owned()),
        Just(r#""stre\u0061m_options""#.to_owned()),
        Just(r#""messages""#.to_owned()),
        Just(r#""\ud83d\ude00""#.to_owned()),
        "[a-z_]{0,12}".prop_map(|k| format!("\"{k}\"")),
    ]
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
        Just("1e400".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        "[ -~]{0,10}".prop_map(|s| serde_json::Value::from(s).to_string()),
    ]
}

fn options() -> impl Strategy<Value = String> {
    let inner = prop_oneof![
        Just(r#""include_usage""#.to_owned()),
        Just(r#""include_us\u0061ge""#.to_owned()),
        Just(r#""Include_usage""#.to_owned()),
        Just(r#""other""#.to_owned()),
    ];
    prop::collection::vec((inner, scalar()), 0..4).prop_map(|members| {
        let body: Vec<String> = members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![scalar(), options()];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key(), inner), 0..4).prop_map(|m| {
                let body: Vec<String> = m.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

fn space() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just(" "), Just("\n\t"), Just(" \r\n ")]
}

fn body() -> impl Strategy<Value = String> {
    prop::collection::vec((space(), key(), space(), value(), space()), 0..8).prop_map(|members| {
        let body: Vec<String> = members
            .iter()
            .map(|(a, k, b, v, c)| format!("{a}{k}{b}:{b}{v}{c}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

/// Counted by the check since the process began (this binary runs this one test).
fn accepted() -> u64 {
    arkor_edge::fuzzing::pin::serde_accepted_refusals()
        .iter()
        .find(|(reason, _)| *reason == "accepted and checked")
        .map_or(0, |(_, n)| *n)
}

#[test]
fn pinned_bodies_read_as_the_input_with_the_edges_members() {
    const CASES: u32 = 2000;
    let mut runner = TestRunner::new(ProptestConfig::with_cases(CASES));
    runner
        .run(&(any::<u8>(), body()), |(sel, body)| {
            let mut data = vec![sel];
            data.extend_from_slice(body.as_bytes());
            let outcome = arkor_edge::fuzzing::pin::check(&data);
            prop_assert!(outcome.is_ok(), "{outcome:?}\nbody: {body}");
            Ok(())
        })
        .unwrap();
    // The generator must keep producing bodies the pinner accepts, or the check proves little.
    let n = accepted();
    assert!(
        n >= u64::from(CASES) / 4,
        "only {n} of {CASES} bodies were pinned"
    );
    eprintln!("{n} of {CASES} generated bodies were pinned and checked");
}
