//! cargo-fuzz target `streams`: see `filterbox_conformance::fuzzing::streams`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| filterbox_conformance::fuzzing::streams(data));
