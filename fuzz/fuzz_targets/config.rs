//! cargo-fuzz target `config`: see `filterbox_conformance::fuzzing::config`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| filterbox_conformance::fuzzing::config(data));
