//! Benchmarks for filterbox live in `benches/`; run them with `cargo bench -p filterbox-benches`.
