//! Runs every benchmark scenario on every built engine and writes BENCHMARKS.md.
//!
//! `cargo run -p filterbox-benches --release --bin bench-report [-- --quick] [--out FILE]`

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "BENCHMARKS.md".into());
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; numbers are only meaningful with --release");
    }
    let mut report = filterbox_benches::report::run(quick).map_err(anyhow::Error::msg)?;
    // bench-proxy's block (wrk through `filterbox serve`), benches/peer's block (the other
    // Rust host) and bench-shared's (shared state on Redis) are measured by their own
    // programs, and the notes block holds hand-made profiles: keep them.
    let old = std::fs::read_to_string(&out).unwrap_or_default();
    for (start, end) in [
        ("<!-- proxy-bench -->", "<!-- /proxy-bench -->"),
        ("<!-- peer-bench -->", "<!-- /peer-bench -->"),
        ("<!-- shared-bench -->", "<!-- /shared-bench -->"),
        ("<!-- notes -->", "<!-- /notes -->"),
    ] {
        if let (Some(from), Some(to)) = (old.find(start), old.find(end))
            && from < to
        {
            report.push('\n');
            report.push_str(&old[from..to + end.len()]);
            report.push('\n');
        }
    }
    std::fs::write(&out, report)?;
    eprintln!("wrote {out}");
    Ok(())
}
