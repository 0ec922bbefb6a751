//! The property-path decoder never panics and never yields an empty or NUL-containing segment.
#![no_main]
use filterbox_abi::property_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(segments) = property_path::decode(data) {
        assert!(segments.iter().all(|s| !s.is_empty() && !s.contains(&0)));
        let reencoded = property_path::encode(&segments);
        assert_eq!(property_path::decode(&reencoded).ok(), Some(segments));
    }
});
