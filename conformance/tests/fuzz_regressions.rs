//! Replays what the fuzzers keep (`fuzz/seeds/<target>/`, the starting inputs, and
//! `fuzz/regressions/<target>/`, inputs that once found a bug) through the same harnesses
//! the cargo-fuzz targets call, plus a few hundred pseudo-random inputs per target, so
//! `cargo test` on stable keeps every fuzz target working and every fixed bug fixed.

use filterbox_conformance::fuzzing::TARGETS;
use std::path::Path;

fn stored_inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if let Ok(bytes) = std::fs::read(&path) {
                inputs.push((path.display().to_string(), bytes));
            }
        }
    }
    inputs.sort();
    inputs
}

/// xorshift64*: the same pseudo-random inputs on every run.
fn random_inputs(seed: u64, count: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    (0..count)
        .map(|_| {
            let len = (next() as usize) % max_len;
            (0..len).map(|_| next() as u8).collect()
        })
        .collect()
}

#[test]
fn stored_and_random_inputs_pass_every_target() {
    for (n, (name, run)) in TARGETS.iter().enumerate() {
        for (path, bytes) in stored_inputs(name) {
            eprintln!("{name}: {path}");
            run(&bytes);
        }
        // Modules and differential runs compile a module per input on every engine.
        let count = match *name {
            "modules" | "differential" => 40,
            _ => 200,
        };
        for bytes in random_inputs(n as u64 + 1, count, 2048) {
            run(&bytes);
        }
    }
}
