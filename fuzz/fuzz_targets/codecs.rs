//! cargo-fuzz target `codecs`: see `filterbox_conformance::fuzzing::codecs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| filterbox_conformance::fuzzing::codecs(data));
