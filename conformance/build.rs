//! Builds the guest plugins in `guests/` for wasm32-wasip1 with the Rust proxy-wasm SDK (and
//! the AssemblyScript and C++ ones with their toolchains) and puts the `.wasm` files in
//! OUT_DIR, where `src/guests.rs` embeds them. Nothing built is
//! committed: a fresh clone needs only the toolchain and the wasm32-wasip1 target.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &[
    "headers",
    "body",
    "deny",
    "logger",
    "callouts",
    "abi010",
    "parity",
    "ratelimit",
];

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
    // Under `cargo +nightly` (cargo fuzz) the host toolchain is not the guests': drop the
    // override and go through rustup's `cargo`, so rust-toolchain.toml picks the toolchain
    // that has the wasm32-wasip1 target.
    let mut command = match env::var_os("RUSTUP_TOOLCHAIN") {
        Some(_) => {
            let mut command = Command::new("cargo");
            match project_channel(&manifest_dir) {
                Some(channel) => command.env("RUSTUP_TOOLCHAIN", channel),
                None => command.env_remove("RUSTUP_TOOLCHAIN"),
            };
            command
        }
        None => Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())),
    };
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
            || key.starts_with("RUSTC")
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
    build_assemblyscript(&guests.join("assemblyscript"), &target_dir, &out_dir);
    build_cpp(&guests.join("cpp"), &out_dir);
    for guest in GUESTS {
        let file = format!("guest_{guest}.wasm");
        let built = target_dir.join("wasm32-wasip1/release").join(&file);
        std::fs::copy(&built, out_dir.join(&file))
            .unwrap_or_else(|e| panic!("guest {guest} was not built at {}: {e}", built.display()));
    }
}

/// The `channel` rust-toolchain.toml names, for the guest build under another toolchain.
fn project_channel(manifest_dir: &Path) -> Option<String> {
    let file = manifest_dir.parent()?.join("rust-toolchain.toml");
    let text = std::fs::read_to_string(file).ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("channel"))?;
    let value = line.split_once('=')?.1.trim().trim_matches('"');
    (!value.is_empty()).then(|| value.to_owned())
}

/// Builds the AssemblyScript guest with npm packages pinned by its lock file: copies the
/// sources to `<target>/guests/assemblyscript` (so nothing is written into the source tree),
/// installs the packages there once per lock file, and compiles with `asc`.
fn build_assemblyscript(source: &Path, target_dir: &Path, out_dir: &Path) {
    const FILES: [&str; 3] = ["package.json", "package-lock.json", "assembly/index.ts"];
    for file in FILES {
        println!("cargo:rerun-if-changed={}", source.join(file).display());
    }
    let work = target_dir.join("assemblyscript");
    std::fs::create_dir_all(work.join("assembly"))
        .unwrap_or_else(|e| panic!("creating {}: {e}", work.display()));
    let lock = |dir: &Path| std::fs::read(dir.join("package-lock.json")).ok();
    let installed = lock(&work).is_some()
        && lock(&work) == lock(source)
        && work.join("node_modules/.bin/asc").exists();
    for file in FILES {
        std::fs::copy(source.join(file), work.join(file))
            .unwrap_or_else(|e| panic!("copying {file} of the AssemblyScript guest: {e}"));
    }
    let run = |program: &str, args: &[&str]| {
        let status = Command::new(program)
            .current_dir(&work)
            .args(args)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "could not run {program} to build the AssemblyScript guest ({e}); \
                     it needs Node.js and npm"
                )
            });
        if !status.success() {
            panic!(
                "{program} {} failed ({status}) in {}",
                args.join(" "),
                work.display()
            );
        }
    };
    if !installed {
        run(
            "npm",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
        );
    }
    let wasm = out_dir.join("guest_assemblyscript.wasm");
    let wasm = wasm.to_str().expect("OUT_DIR is UTF-8");
    run(
        "npx",
        &[
            "--no-install",
            "asc",
            "assembly/index.ts",
            "-b",
            wasm,
            "--use",
            "abort=abort_proc_exit",
            "-O",
        ],
    );
}

/// The C++ compilers tried, in order, unless `FILTERBOX_CXX` names one.
const CXX: &[&str] = &["clang++-14", "clang++"];

/// Builds the C++ guest with clang, libc++ and wasi-libc for wasm32-wasi, as a reactor that
/// exports `malloc` (as C++ SDK plugins do).
fn build_cpp(source: &Path, out_dir: &Path) {
    let file = source.join("plugin.cc");
    println!("cargo:rerun-if-changed={}", file.display());
    println!("cargo:rerun-if-env-changed=FILTERBOX_CXX");
    let compilers: Vec<String> = match env::var("FILTERBOX_CXX") {
        Ok(cxx) => vec![cxx],
        Err(_) => CXX.iter().map(|c| c.to_string()).collect(),
    };
    let wasm = out_dir.join("guest_cpp.wasm");
    let mut tried = Vec::new();
    for cxx in &compilers {
        let status = Command::new(cxx)
            .args([
                "--target=wasm32-wasi",
                "-O2",
                "-fno-exceptions",
                "-mexec-model=reactor",
                "-Wl,--export=malloc",
                "-Wl,--export=free",
                "-o",
            ])
            .arg(&wasm)
            .arg(&file)
            .status();
        match status {
            Ok(status) if status.success() => return,
            Ok(status) => tried.push(format!("{cxx}: {status}")),
            Err(error) => tried.push(format!("{cxx}: {error}")),
        }
    }
    panic!(
        "building the C++ guest plugin failed ({}). It needs clang with libc++ and wasi-libc \
         for wasm32-wasi; on Debian: apt-get install clang-14 lld-14 wasi-libc \
         libc++-14-dev-wasm32 libc++abi-14-dev-wasm32 libclang-rt-14-dev-wasm32 (or set \
         FILTERBOX_CXX to such a compiler).",
        tried.join("; ")
    );
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
