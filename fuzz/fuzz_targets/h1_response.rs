#![no_main]
//! Fuzz target: `arkor_edge::fuzzing::h1::check`; a violated property is a crash.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(why) = arkor_edge::fuzzing::h1::check(data) {
        panic!("{why}");
    }
});
