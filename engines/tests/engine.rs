//! The engine interface on every built engine, with hand-written modules: trap classes,
//! panics in host functions, guest allocation from inside a hostcall, export checks.

use filterbox_abi::{AbiVersion, Callback, Import, Status};
use filterbox_engines::{
    Caller, Engine, EngineConfig, EngineError, EngineKind, Hostcalls, InstanceLimits, Returned,
    TrapKind,
};

/// A `proxy_log` level at which the host sleeps before logging.
const SLEEPING_LOG_LEVEL: i32 = 99;

/// A host that implements two calls: `proxy_log` records the message, and
/// `proxy_get_property` hands "hello" back through the guest allocator. `proxy_done` panics.
#[derive(Default)]
struct TestHost {
    logged: Vec<String>,
}

impl Hostcalls for TestHost {
    fn unimplemented(_cx: &mut dyn Caller<Self>, _import: Import) -> i32 {
        Status::Unimplemented.as_i32()
    }

    fn proxy_log(cx: &mut dyn Caller<Self>, level: i32, ptr: i32, len: i32) -> i32 {
        if level == SLEEPING_LOG_LEVEL {
            // A thread that does not run (as if preempted) while the call's clock goes on.
            std::thread::sleep(std::time::Duration::from_millis(40));
        }
        let (host, memory) = cx.split();
        match memory.read(ptr as u32, len as u32) {
            Ok(bytes) => {
                host.logged
                    .push(String::from_utf8_lossy(bytes).into_owned());
                Status::Ok.as_i32()
            }
            Err(e) => Status::from(e).as_i32(),
        }
    }

    fn proxy_get_property(
        cx: &mut dyn Caller<Self>,
        _p: i32,
        _s: i32,
        ret_ptr: i32,
        ret_size: i32,
    ) -> i32 {
        let ptr = match cx.allocate(5) {
            Ok(ptr) => ptr,
            Err(e) => return Status::from(e).as_i32(),
        };
        let mut memory = cx.memory();
        let written = memory
            .write(ptr, b"hello")
            .and_then(|()| memory.write_u32(ret_ptr as u32, ptr))
            .and_then(|()| memory.write_u32(ret_size as u32, 5));
        match written {
            Ok(()) => Status::Ok.as_i32(),
            Err(e) => Status::from(e).as_i32(),
        }
    }

    fn proxy_done(_cx: &mut dyn Caller<Self>) -> i32 {
        panic!("host bug");
    }
}

const PRELUDE: &str = r#"
    (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
    (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
    (import "env" "proxy_done" (func $done (result i32)))
    (memory (export "memory") 1)
    (global $trap_in_alloc (mut i32) (i32.const 0))
    (func (export "proxy_abi_version_0_2_1"))
    (func (export "proxy_on_memory_allocate") (param i32) (result i32)
        (if (global.get $trap_in_alloc) (then unreachable))
        (i32.const 1024))
"#;

fn module(engine: &Engine, body: &str) -> filterbox_engines::Instance<TestHost> {
    let wasm = wat::parse_str(format!("(module {PRELUDE} {body})")).expect("test module parses");
    let module = engine.compile(&wasm).expect("compiles");
    let pre = module.link::<TestHost>(AbiVersion::V0_2_1).expect("links");
    pre.instantiate(TestHost::default(), &InstanceLimits::default())
        .expect("instantiates")
}

fn engines() -> Vec<Engine> {
    EngineKind::built()
        .into_iter()
        .map(|k| Engine::new(k, &EngineConfig::default()).expect("engine"))
        .collect()
}

#[test]
fn traps_are_classified_the_same_on_every_engine() {
    for engine in engines() {
        let mut instance = module(
            &engine,
            r#"
            (func $recurse (param i32) (result i32) (call $recurse (i32.add (local.get 0) (i32.const 1))))
            (func (export "proxy_on_tick") (param i32) unreachable)
            (func (export "proxy_on_log") (param i32) (drop (i32.load (i32.const 70000))))
            (func (export "proxy_on_delete") (param i32) (drop (call $recurse (i32.const 0))))
            (func (export "proxy_on_queue_ready") (param i32 i32) (drop (i32.div_u (i32.const 1) (local.get 1))))
            "#,
        );
        let cases = [
            (Callback::ProxyOnTick, TrapKind::Unreachable),
            (Callback::ProxyOnLog, TrapKind::OutOfBounds),
            (Callback::ProxyOnDelete, TrapKind::StackOverflow),
            (Callback::ProxyOnQueueReady, TrapKind::Arithmetic),
        ];
        for (callback, kind) in cases {
            let trap = instance.call(callback, &[1, 0]).expect_err("traps");
            assert_eq!(
                trap.kind,
                kind,
                "{} on {}: {trap}",
                callback.name(),
                engine.kind()
            );
        }
    }
}

#[test]
fn memory_size_follows_growth_in_the_guest_and_refused_growth() {
    for engine in engines() {
        let mut instance = module(
            &engine,
            r#"
            (func (export "proxy_on_tick") (param i32) (drop (memory.grow (local.get 0))))
            "#,
        );
        let page = 64 * 1024;
        assert_eq!(instance.memory_size(), page, "{}", engine.kind());
        // Read twice without a call between: the same answer.
        assert_eq!(instance.memory_size(), page, "{}", engine.kind());
        instance.call(Callback::ProxyOnTick, &[3]).expect("grows");
        assert_eq!(instance.memory_size(), 4 * page, "{}", engine.kind());
        instance
            .call(Callback::ProxyOnTick, &[0])
            .expect("grows by nothing");
        assert_eq!(instance.memory_size(), 4 * page, "{}", engine.kind());
        // Past the default limit: memory.grow answers -1 and the size stays.
        instance
            .call(Callback::ProxyOnTick, &[60_000])
            .expect("refused, no trap");
        assert_eq!(instance.memory_size(), 4 * page, "{}", engine.kind());
        instance.call(Callback::ProxyOnTick, &[1]).expect("grows");
        assert_eq!(instance.memory_size(), 5 * page, "{}", engine.kind());
    }
}

#[test]
fn a_panicking_hostcall_becomes_a_host_trap() {
    for engine in engines() {
        let mut instance = module(
            &engine,
            r#"(func (export "proxy_on_tick") (param i32) (drop (call $done)))"#,
        );
        let trap = instance
            .call(Callback::ProxyOnTick, &[1])
            .expect_err("traps");
        assert_eq!(trap.kind, TrapKind::Host);
        assert!(
            trap.message.contains("proxy_done panicked: host bug"),
            "{trap}"
        );
    }
}

#[test]
fn hostcalls_allocate_in_the_guest_and_check_memory() {
    for engine in engines() {
        let mut instance = module(
            &engine,
            r#"
            (func (export "proxy_on_tick") (param i32)
                (drop (call $get_property (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 20)))
                (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
                (drop (call $log (i32.const 2) (i32.const 65535) (i32.const 2))))
            (func (export "proxy_on_done") (param i32) (result i32)
                (global.set $trap_in_alloc (i32.const 1))
                (call $get_property (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 20)))
            "#,
        );
        assert_eq!(
            instance.call(Callback::ProxyOnTick, &[1]),
            Ok(Returned::Nothing)
        );
        assert_eq!(instance.host().logged, ["hello"]);
        // A trap in the allocator, called from inside a hostcall, fails the outer call.
        let trap = instance
            .call(Callback::ProxyOnDone, &[1])
            .expect_err("allocator trap propagates");
        assert_eq!(trap.kind, TrapKind::Unreachable, "{trap}");
        assert_eq!(
            instance.call(Callback::ProxyOnVmStart, &[1, 0]),
            Ok(Returned::Missing)
        );
    }
}

#[test]
fn exports_with_the_wrong_type_are_refused() {
    for engine in engines() {
        let wasm = wat::parse_str(format!(
            r#"(module {PRELUDE} (func (export "proxy_on_request_headers") (param i32 i32) (result i32) (i32.const 0)))"#
        ))
        .expect("parses");
        let module = engine.compile(&wasm).expect("compiles");
        match module.link::<TestHost>(AbiVersion::V0_2_1) {
            Err(EngineError::BadExportSignature { name, .. }) => {
                assert_eq!(name, "proxy_on_request_headers")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("linked a mistyped export"),
        }
        // The same export is right for ABI 0.1.0, where the header callbacks have two params.
        assert!(module.link::<TestHost>(AbiVersion::V0_1_0).is_ok());
    }
}

#[test]
fn unknown_and_unbuilt_engines_are_named() {
    let err = EngineKind::from_name("v8").unwrap_err();
    assert!(err.to_string().contains("unknown engine \"v8\""), "{err}");
    for kind in EngineKind::ALL.into_iter().filter(|k| !k.is_built()) {
        let Err(err) = Engine::new(kind, &EngineConfig::default()) else {
            panic!("{kind} is not built")
        };
        assert!(err.to_string().contains("not in this build"), "{err}");
    }
}

#[test]
fn compile_errors_are_errors() {
    for engine in engines() {
        assert!(matches!(
            engine.compile(b"not wasm"),
            Err(EngineError::Compile(_))
        ));
    }
}

#[test]
fn the_pooling_allocator_instantiates_and_runs() {
    use filterbox_engines::PoolingConfig;
    if !EngineKind::Wasmtime.is_built() {
        return;
    }
    let pool = PoolingConfig::new(4, 1 << 20);
    let engine = Engine::new(
        EngineKind::Wasmtime,
        &EngineConfig::default().with_pooling(pool),
    )
    .expect("pooling engine");
    for _ in 0..8 {
        // More instances than slots over time: slots are reused as instances drop.
        let mut instance = module(
            &engine,
            r#"(func (export "proxy_on_tick") (param i32) (drop (call $log (i32.const 2) (i32.const 0) (i32.const 4))))"#,
        );
        assert_eq!(
            instance.call(Callback::ProxyOnTick, &[1]),
            Ok(Returned::Nothing)
        );
        assert_eq!(instance.host().logged.len(), 1);
    }
}

#[test]
fn a_reused_pool_slot_starts_from_the_module_s_own_memory_and_table() {
    use filterbox_engines::PoolingConfig;
    // The engines that pool: wasmtime's slots, and wasmi's memory mappings.
    for kind in [EngineKind::Wasmtime, EngineKind::Wasmi] {
        if kind.is_built() {
            reused_pool_slot_starts_clean(kind, PoolingConfig::new(1, 4 << 20));
        }
    }
}

/// A pooled instance's memory stops at the pool's largest memory: growing past it answers -1
/// (as past any limit), it does not trap.
#[test]
fn pooled_memory_growth_stops_at_the_pool_s_largest_memory() {
    use filterbox_engines::PoolingConfig;
    for kind in [EngineKind::Wasmtime, EngineKind::Wasmi] {
        if !kind.is_built() {
            continue;
        }
        let config = EngineConfig::default().with_pooling(PoolingConfig::new(2, 4 << 20));
        let engine = Engine::new(kind, &config).expect("pooling engine");
        let mut instance = module(
            &engine,
            r#"(func (export "proxy_on_tick") (param i32) (drop (memory.grow (local.get 0))))"#,
        );
        // 4 MiB is 64 pages: one more than that past the first page is refused.
        assert_eq!(
            instance.call(Callback::ProxyOnTick, &[64]),
            Ok(Returned::Nothing),
            "{kind}"
        );
        assert_eq!(instance.memory_size(), 64 * 1024, "{kind}");
        instance.call(Callback::ProxyOnTick, &[63]).expect("grows");
        assert_eq!(instance.memory_size(), 4 << 20, "{kind}");
    }
}

fn reused_pool_slot_starts_clean(kind: EngineKind, pool: filterbox_engines::PoolingConfig) {
    // One slot, so every instance reuses it; the slot's pages stay mapped and are reset in
    // place (keep_resident_bytes), which must look the same as fresh memory to the guest.
    let engine =
        Engine::new(kind, &EngineConfig::default().with_pooling(pool)).expect("pooling engine");
    let body = r#"
        (data (i32.const 16) "seed")
        (table 2 funcref)
        (func $one (result i32) (i32.const 1))
        (elem (i32.const 0) $one)
        (type $answer (func (result i32)))
        ;; Logs the 4 bytes at 16, the byte at 60000 (0 after a fresh start) and what table
        ;; slot 0 answers; then dirties both bytes, grows memory, logs a byte of the grown
        ;; part (0), dirties it and clears table slot 0.
        (func (export "proxy_on_tick") (param i32)
            (drop (call $log (i32.const 2) (i32.const 16) (i32.const 4)))
            (i32.store8 (i32.const 8) (i32.add (i32.const 48) (i32.load8_u (i32.const 60000))))
            (drop (call $log (i32.const 2) (i32.const 8) (i32.const 1)))
            (i32.store8 (i32.const 9) (i32.add (i32.const 48) (call_indirect (type $answer) (i32.const 0))))
            (drop (call $log (i32.const 2) (i32.const 9) (i32.const 1)))
            (i32.store (i32.const 16) (i32.const 0x21212121))
            (i32.store8 (i32.const 60000) (i32.const 7))
            (drop (memory.grow (i32.const 3)))
            (i32.store8 (i32.const 10) (i32.add (i32.const 48) (i32.load8_u (i32.const 200000))))
            (drop (call $log (i32.const 2) (i32.const 10) (i32.const 1)))
            (i32.store8 (i32.const 200000) (i32.const 7))
            (table.set (i32.const 0) (ref.null func)))
    "#;
    for round in 0..3 {
        let mut instance = module(&engine, body);
        assert_eq!(instance.memory_size(), 64 * 1024, "{kind} round {round}");
        assert_eq!(
            instance.call(Callback::ProxyOnTick, &[1]),
            Ok(Returned::Nothing),
            "{kind} round {round}: the table entry is back"
        );
        assert_eq!(
            instance.host().logged,
            ["seed", "0", "1", "0"],
            "{kind} round {round}: data segment and zeroed memory"
        );
        assert_eq!(
            instance.memory_size(),
            4 * 64 * 1024,
            "{kind} round {round}"
        );
    }
}

/// Every instance is `Send`, so a host can keep instances of different engines together;
/// one of a thread-bound engine refuses to run away from its thread, and runs again at home.
#[test]
fn instances_move_between_threads_and_thread_bound_ones_only_run_at_home() {
    for engine in engines() {
        let instance = module(&engine, r#"(func (export "proxy_on_tick") (param i32))"#);
        let kind = engine.kind();
        let (mut instance, away) = std::thread::spawn(move || {
            let mut instance = instance;
            let away = instance.call(Callback::ProxyOnTick, &[1]);
            (instance, away)
        })
        .join()
        .expect("the other thread ends");
        match kind.thread_bound() {
            true => {
                let trap = away.expect_err("a thread-bound instance refuses to run away");
                assert_eq!(trap.kind, TrapKind::Other, "{kind}: {trap}");
            }
            false => assert_eq!(away, Ok(Returned::Nothing), "{kind}"),
        }
        assert!(instance.is_home(), "{kind}");
        assert_eq!(
            instance.call(Callback::ProxyOnTick, &[1]),
            Ok(Returned::Nothing),
            "{kind} at home"
        );
    }
}

/// On wasmtime and wasmi a deadline counts the time the call's thread runs: a call whose
/// thread was not running (here: asleep in a hostcall, as a preempted thread on a loaded
/// machine) past the deadline goes on, while a call that runs past it stops.
#[test]
fn a_deadline_counts_running_time_not_time_the_thread_was_off_the_cpu() {
    for engine in engines() {
        if engine.kind().thread_bound() {
            continue; // wasmer: wall-clock deadlines
        }
        deadline_counts_running_time(&engine);
    }
}

fn deadline_counts_running_time(engine: &Engine) {
    let mut instance = module(
        engine,
        r#"
        (func (export "proxy_on_tick") (param i32) (local $i i32)
            (drop (call $log (i32.const 99) (i32.const 0) (i32.const 0)))
            ;; another hostcall after the sleep, where wasmi checks its clock
            (drop (call $log (i32.const 1) (i32.const 0) (i32.const 0)))
            ;; some work after the sleep, so that the epoch is checked again
            (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $l (i32.lt_u (local.get $i) (i32.const 1000)))))
        (func (export "proxy_on_log") (param i32) (loop $forever (br $forever)))
        "#,
    );
    instance.set_deadline(Some(std::time::Duration::from_millis(10)));
    assert_eq!(
        instance.call(Callback::ProxyOnTick, &[1]),
        Ok(Returned::Nothing),
        "{}: 40 ms asleep is not 10 ms of running",
        engine.kind()
    );
    let trap = instance
        .call(Callback::ProxyOnLog, &[1])
        .expect_err("a loop that runs past its deadline stops");
    assert_eq!(trap.kind, TrapKind::Interrupted, "{}", engine.kind());
}

/// Wasmtime's epoch thread sleeps once calls stop for a while, and the next call wakes it:
/// a loop that starts after a pause still stops at its deadline, not at the sleeping
/// thread's own check a second later. (Other tests of this binary may keep the thread awake;
/// then this checks the plain path.)
#[test]
fn a_call_after_the_epoch_thread_slept_stops_at_its_deadline() {
    let Ok(engine) = Engine::new(EngineKind::Wasmtime, &EngineConfig::default()) else {
        return; // wasmtime is not built
    };
    let mut instance = module(
        &engine,
        r#"(func (export "proxy_on_log") (param i32) (loop $forever (br $forever)))"#,
    );
    instance.set_deadline(Some(std::time::Duration::from_millis(10)));
    for round in 0..3 {
        // Longer than the epoch thread's idle ticks (100 ms) before it sleeps, so that
        // its own check comes about 900 ms into the call.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        let trap = instance
            .call(Callback::ProxyOnLog, &[1])
            .expect_err("the loop stops");
        assert_eq!(trap.kind, TrapKind::Interrupted, "round {round}");
        // Ten deadlines (100 ms) on the clock at most, however loaded the machine.
        assert!(
            started.elapsed() < std::time::Duration::from_millis(500),
            "round {round}: stopped after {:?}",
            started.elapsed()
        );
    }
}

/// Resident memory of this process (Linux: `/proc/self/statm`, in pages of 4 KiB).
#[cfg(target_os = "linux")]
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// A guest's initial memory costs only the pages it writes (wasmi's too: its module's memory
/// becomes an import backed by a mapping of the host's), and dropping the instance returns it.
/// Four instances of a 32 MiB memory would hold 128 MiB if their pages were resident; other
/// tests running beside this one allocate far less than the margin.
#[cfg(target_os = "linux")]
#[test]
fn untouched_initial_memory_is_not_resident_and_is_returned_on_drop() {
    const MIB: usize = 1 << 20;
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 512)
            (data (i32.const 1048576) "written")
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024)))"#,
    )
    .expect("test module parses");
    for engine in engines() {
        let kind = engine.kind();
        let pre = engine
            .compile(&wasm)
            .expect("compiles")
            .link::<TestHost>(AbiVersion::V0_2_1)
            .expect("links");
        let before = resident_bytes();
        let mut instances: Vec<_> = (0..4)
            .map(|_| {
                pre.instantiate(TestHost::default(), &InstanceLimits::default())
                    .expect("instantiates")
            })
            .collect();
        for instance in &mut instances {
            assert_eq!(instance.memory_size(), 512 * 64 * 1024, "{kind}");
        }
        let live = resident_bytes().saturating_sub(before);
        assert!(
            live < 32 * MIB,
            "{kind}: 4 instances hold {} MiB",
            live / MIB
        );
        drop(instances);
        let after = resident_bytes().saturating_sub(before);
        assert!(
            after < 16 * MIB,
            "{kind}: {} MiB held after drop",
            after / MIB
        );
    }
}
