//! Builds the guest plugins in `guests/` for wasm32-wasip1 with the Rust proxy-wasm SDK and
//! puts the `.wasm` files in OUT_DIR, where `src/guests.rs` embeds them. Nothing built is
//! committed: a fresh clone needs only the toolchain and the wasm32-wasip1 target.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &["headers", "body", "deny", "logger", "callouts", "abi010"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guests = manifest_dir.join("guests");
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("Cargo.lock").display()
    );
    for guest in GUESTS {
        println!("cargo:rerun-if-changed={}", guests.join(guest).display());
    }

    // Guests get their own target dir beside the host's, so the two builds never wait on
    // each other's lock and the guest build is cached across host rebuilds.
    let target_dir = guest_target_dir(&out_dir);
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip1",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Nothing of the host build's configuration may leak into the guest build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let keep = key == "CARGO_HOME"
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_")
            || key.starts_with("CARGO_REGISTRIES_");
        if (key.starts_with("CARGO_") && !keep)
            || key.starts_with("RUSTC_")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            command.env_remove(key.as_ref());
        }
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo to build the guest plugins: {e}"));
    if !status.success() {
        panic!(
            "building the guest plugins failed ({status}). They need the wasm32-wasip1 target: \
             run `rustup target add wasm32-wasip1` (rust-toolchain.toml names it)."
        );
    }
    for guest in GUESTS {
        let file = format!("guest_{guest}.wasm");
        let built = target_dir.join("wasm32-wasip1/release").join(&file);
        std::fs::copy(&built, out_dir.join(&file))
            .unwrap_or_else(|e| panic!("guest {guest} was not built at {}: {e}", built.display()));
    }
}

/// `<target>/guests`, found from OUT_DIR (`<target>/<profile>/build/<pkg>/out`).
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("guests"),
        None => out_dir
            .ancestors()
            .nth(4)
            .map_or_else(|| out_dir.join("guests"), |t| t.join("guests")),
    }
}
