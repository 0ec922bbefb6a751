//! The header-map decoder never panics, and whatever it accepts re-encodes to the input.
#![no_main]
use filterbox_abi::pairs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = pairs::decode(data) {
        if !data.is_empty() {
            assert_eq!(pairs::encode(&decoded), data);
        }
    }
});
