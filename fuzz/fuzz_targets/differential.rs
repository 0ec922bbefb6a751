//! cargo-fuzz target `differential`: see `filterbox_conformance::fuzzing::differential`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| filterbox_conformance::fuzzing::differential(data));
