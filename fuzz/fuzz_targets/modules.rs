//! cargo-fuzz target `modules`: see `filterbox_conformance::fuzzing::modules`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| filterbox_conformance::fuzzing::modules(data));
