//! cargo-fuzz target `hostcalls`: see `filterbox_conformance::fuzzing::hostcalls`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| filterbox_conformance::fuzzing::hostcalls(data));
