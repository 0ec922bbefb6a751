//! The compiled-module cache on every built engine: a second load reuses the artifact, a
//! corrupt or foreign entry is detected and rebuilt.

use filterbox_engines::{CacheOutcome, Engine, EngineConfig, EngineKind, ModuleCache};

fn module(n: i32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
            (func (export "malloc") (param i32) (result i32) (i32.const {n})))"#
    ))
    .expect("test module parses")
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "filterbox-cache-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn second_load_hits_and_bad_entries_are_rebuilt() {
    for kind in EngineKind::built() {
        let engine = Engine::new(kind, &EngineConfig::default()).expect("engine");
        let dir = scratch_dir(kind.name());
        let cache = ModuleCache::new(&dir);
        let (wasm_a, wasm_b) = (module(1024), module(2048));

        let (_, first) = engine.compile_cached(&wasm_a, &cache).expect("compiles");
        let Some(path) = cache.entry_path(&engine, &wasm_a) else {
            assert_eq!(first, CacheOutcome::Unsupported, "{kind}");
            continue;
        };
        assert_eq!(first, CacheOutcome::Miss, "{kind}");
        let (_, second) = engine.compile_cached(&wasm_a, &cache).expect("loads");
        assert_eq!(second, CacheOutcome::Hit, "{kind}");

        // Flip one byte of the artifact: the checksum catches it.
        let mut entry = std::fs::read(&path).expect("entry exists");
        let last = entry.len() - 1;
        entry[last] ^= 0xff;
        std::fs::write(&path, &entry).expect("write");
        let (_, corrupt) = engine.compile_cached(&wasm_a, &cache).expect("rebuilds");
        assert!(
            matches!(&corrupt, CacheOutcome::Rebuilt(why) if why.contains("checksum")),
            "{kind}: {corrupt:?}"
        );
        assert_eq!(
            engine.compile_cached(&wasm_a, &cache).expect("loads").1,
            CacheOutcome::Hit,
            "{kind}"
        );

        // Another module's entry under this module's name: refused, not loaded.
        engine.compile_cached(&wasm_b, &cache).expect("compiles");
        let path_b = cache.entry_path(&engine, &wasm_b).expect("same engine");
        std::fs::copy(&path_b, &path).expect("copy");
        let (_, foreign) = engine.compile_cached(&wasm_a, &cache).expect("rebuilds");
        assert!(
            matches!(&foreign, CacheOutcome::Rebuilt(why) if why.contains("another module")),
            "{kind}: {foreign:?}"
        );

        // Garbage: refused.
        std::fs::write(&path, b"garbage").expect("write");
        let (_, garbage) = engine.compile_cached(&wasm_a, &cache).expect("rebuilds");
        assert!(
            matches!(garbage, CacheOutcome::Rebuilt(_)),
            "{kind}: {garbage:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
