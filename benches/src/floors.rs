//! The bare-engine floors (no filterbox: the engine's own API) and the deadline-overhead
//! pair.

use crate::{HOSTCALLS_PER_ITER, Scenario, fail};
use filterbox::{Engine, EngineConfig, EngineKind, HeaderMap, LogLevel, Plugin, PluginConfig, Vm};
use std::hint::black_box;

/// An empty export called from the host.
pub const EXPORT_CALL: &str = "floor/export_call";
/// An empty host function called from wasm (per call, in a loop of [`HOSTCALLS_PER_ITER`]).
pub const HOST_CALL: &str = "floor/host_call";

/// `f` is empty; `g` calls the empty import `h` [`HOSTCALLS_PER_ITER`] times.
fn floor_module() -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            (import "env" "h" (func $h (param i32) (result i32)))
            (func (export "f"))
            (func (export "g") (local $i i32)
                (loop $next
                    (drop (call $h (local.get $i)))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br_if $next (i32.lt_u (local.get $i) (i32.const {HOSTCALLS_PER_ITER}))))))"#
    ))
    .expect("floor module")
}

/// The two floors on the bare engine of `kind`.
pub fn scenarios(kind: EngineKind) -> Result<Vec<Scenario>, String> {
    let wasm = floor_module();
    let (f, g): Floors = match kind {
        EngineKind::Wasmtime => wasmtime_floor(&wasm)?,
        EngineKind::Wasmi => wasmi_floor(&wasm)?,
        EngineKind::WasmerCranelift | EngineKind::WasmerSinglepass => wasmer_floor(kind, &wasm)?,
    };
    Ok(vec![
        Scenario {
            name: EXPORT_CALL.into(),
            ops: 1,
            floor: None,
            native: None,
            run: f,
        },
        Scenario {
            name: HOST_CALL.into(),
            ops: HOSTCALLS_PER_ITER,
            floor: None,
            native: None,
            run: g,
        },
    ])
}

type Floors = (Box<dyn FnMut()>, Box<dyn FnMut()>);

/// The two floor closures over one store they share (each engine's store is `&mut`-only).
fn share<S: 'static>(
    store: S,
    mut f: impl FnMut(&mut S) + 'static,
    mut g: impl FnMut(&mut S) + 'static,
) -> Floors {
    let store = std::rc::Rc::new(std::cell::RefCell::new(store));
    let other = store.clone();
    (
        Box::new(move || f(&mut store.borrow_mut())),
        Box::new(move || g(&mut other.borrow_mut())),
    )
}

#[cfg(feature = "wasmtime")]
fn wasmtime_floor(wasm: &[u8]) -> Result<Floors, String> {
    use wasmtime::{Engine, Linker, Module, Store};
    let engine = Engine::default();
    let module = Module::new(&engine, wasm).map_err(|e| fail("wasmtime module", e))?;
    let mut linker = Linker::new(&engine);
    linker
        .func_wrap("env", "h", |x: i32| x)
        .map_err(|e| fail("wasmtime import", e))?;
    let mut store = Store::new(&engine, ());
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(|e| fail("wasmtime instance", e))?;
    let f = instance
        .get_typed_func::<(), ()>(&mut store, "f")
        .map_err(|e| fail("f", e))?;
    let g = instance
        .get_typed_func::<(), ()>(&mut store, "g")
        .map_err(|e| fail("g", e))?;
    Ok(share(
        store,
        move |s| f.call(s, ()).expect("f"),
        move |s| g.call(s, ()).expect("g"),
    ))
}

#[cfg(not(feature = "wasmtime"))]
fn wasmtime_floor(_: &[u8]) -> Result<Floors, String> {
    Err("wasmtime is not built".into())
}

#[cfg(feature = "wasmi")]
fn wasmi_floor(wasm: &[u8]) -> Result<Floors, String> {
    use wasmi::{Engine, Linker, Module, Store};
    let engine = Engine::default();
    let module = Module::new(&engine, wasm).map_err(|e| fail("wasmi module", e))?;
    let mut linker = Linker::<()>::new(&engine);
    linker
        .func_wrap("env", "h", |x: i32| x)
        .map_err(|e| fail("wasmi import", e))?;
    let mut store = Store::new(&engine, ());
    let instance = linker
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| fail("wasmi instance", e))?;
    let f = instance
        .get_typed_func::<(), ()>(&store, "f")
        .map_err(|e| fail("f", e))?;
    let g = instance
        .get_typed_func::<(), ()>(&store, "g")
        .map_err(|e| fail("g", e))?;
    Ok(share(
        store,
        move |s| f.call(s, ()).expect("f"),
        move |s| g.call(s, ()).expect("g"),
    ))
}

#[cfg(not(feature = "wasmi"))]
fn wasmi_floor(_: &[u8]) -> Result<Floors, String> {
    Err("wasmi is not built".into())
}

#[cfg(feature = "wasmer")]
fn wasmer_floor(kind: EngineKind, wasm: &[u8]) -> Result<Floors, String> {
    use wasmer::{Function, Instance, Module, Store, TypedFunction, imports};
    let engine: wasmer::Engine = match kind {
        EngineKind::WasmerSinglepass => wasmer::sys::Singlepass::default().into(),
        _ => wasmer::sys::Cranelift::default().into(),
    };
    let mut store = Store::new(engine);
    let module = Module::new(&store, wasm).map_err(|e| fail("wasmer module", e))?;
    let h = Function::new_typed(&mut store, |x: i32| x);
    let imports = imports! { "env" => { "h" => h } };
    let instance =
        Instance::new(&mut store, &module, &imports).map_err(|e| fail("wasmer instance", e))?;
    let f: TypedFunction<(), ()> = instance
        .exports
        .get_typed_function(&store, "f")
        .map_err(|e| fail("f", e))?;
    let g: TypedFunction<(), ()> = instance
        .exports
        .get_typed_function(&store, "g")
        .map_err(|e| fail("g", e))?;
    Ok(share(
        store,
        move |s| f.call(s).expect("f"),
        move |s| g.call(s).expect("g"),
    ))
}

#[cfg(not(feature = "wasmer"))]
fn wasmer_floor(_: EngineKind, _: &[u8]) -> Result<Floors, String> {
    Err("wasmer is not built".into())
}

/// A CPU-bound callback (1 M iterations of integer work) with the deadline mechanism on
/// (`deadline/cpu_bound_on`) and off (`deadline/cpu_bound_off`).
pub fn deadline_scenarios(kind: EngineKind) -> Result<Vec<Scenario>, String> {
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                (local $i i32) (local $x i32)
                (loop $l
                    (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 31)) (local.get $i)))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000))))
                (i32.and (local.get $x) (i32.const 0))))"#,
    )
    .map_err(|e| fail("busy module", e))?;
    let mut out = Vec::new();
    for (label, on) in [("on", true), ("off", false)] {
        let engine = Engine::new(kind, &EngineConfig::default().with_interruptible(on))
            .map_err(|e| fail("engine", e))?;
        let mut config = PluginConfig::named("busy")
            .with_engine(kind)
            .with_log_level(LogLevel::Warn);
        config.limits.callback_deadline_ms = on.then_some(10_000);
        let plugin = Plugin::builder(config)
            .engine(&engine)
            .build(&wasm)
            .map_err(|e| fail("busy plugin", e))?;
        let mut vm = Vm::new(&plugin).map_err(|e| fail("vm", e))?;
        let stream = vm.create_http_stream().map_err(|e| fail("stream", e))?;
        let mut headers = HeaderMap::new();
        out.push(Scenario::new(
            format!("deadline/cpu_bound_{label}"),
            move || {
                black_box(
                    vm.on_request_headers(&stream, &mut headers, true)
                        .expect("busy"),
                );
            },
        ));
    }
    Ok(out)
}
