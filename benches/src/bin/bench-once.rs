//! Runs one scenario a fixed number of times, for tools that count work instead of timing it.
//! On a busy machine timings of one row move by tens of percent between runs; instruction
//! counts repeat to a fraction of a percent, so they can show a change of a few percent:
//!
//! ```sh
//! cargo build --release -p filterbox-benches --bin bench-once
//! valgrind --tool=callgrind --toggle-collect='*bench_once::measured*' \
//!     target/release/bench-once service/1_plugins 2000
//! ```
//!
//! callgrind's total (`Collected`) divided by the runs is the scenario's instructions per run
//! (`callgrind_annotate` shows where they go). The scenarios are the exchange rows
//! (`exchange/N_plugins`, `service/N_plugins`), the chains driven on the VMs
//! (`chain/N_plugins`, N = 1, 5) and the native ones (`native/…`, `convert/…`), as
//! `bench-report` times them. `--engine NAME` picks the engine (default `wasmtime`). The
//! engine runs without deadlines (`interruptible: false`): no epoch thread and no epoch checks
//! in the compiled code, which count the same on both sides of a comparison.
//! `--interruptible` turns deadlines on, as `filterbox serve` runs plugins, to count what
//! they cost.

use filterbox::{Engine, EngineConfig, EngineKind};
use filterbox_benches::{Scenario, chain_scenarios, exchange, header_plugin, native_scenarios};

/// What to run, from the command line.
struct Args {
    scenario: String,
    runs: u32,
    engine: EngineKind,
    /// Whether the engine enforces deadlines ([`EngineConfig::interruptible`]).
    interruptible: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut scenario = None;
    let mut runs = 1000;
    let mut engine = EngineKind::Wasmtime;
    let mut interruptible = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--engine" => {
                let name = args.next().unwrap_or_default();
                engine = EngineKind::from_name(&name)?;
            }
            "--interruptible" => interruptible = true,
            _ if scenario.is_none() => scenario = Some(arg),
            _ => runs = arg.parse()?,
        }
    }
    let Some(scenario) = scenario else {
        anyhow::bail!("usage: bench-once SCENARIO [RUNS] [--engine NAME] [--interruptible]");
    };
    Ok(Args {
        scenario,
        runs,
        engine,
        interruptible,
    })
}

/// The runs to count: a function of its own, so that a profiler can count only it.
#[inline(never)]
fn measured(scenario: &mut Scenario, runs: u32) {
    for _ in 0..runs {
        (scenario.run)();
    }
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let mut scenarios = native_scenarios();
    // Only a scenario that runs plugins needs the engine and the plugins: compiling them is
    // most of a run's time under valgrind.
    if !scenarios.iter().any(|s| s.name == args.scenario) {
        let mut config = EngineConfig::default();
        config.interruptible = args.interruptible;
        let engine = Engine::new(args.engine, &config)?;
        let plugin = header_plugin(&engine).map_err(anyhow::Error::msg)?;
        scenarios.extend(exchange::service_scenarios(&engine).map_err(anyhow::Error::msg)?);
        scenarios.extend(chain_scenarios(&plugin, &[1, 5]).map_err(anyhow::Error::msg)?);
    }
    let names: Vec<String> = scenarios.iter().map(|s| s.name.clone()).collect();
    let Some(scenario) = scenarios.iter_mut().find(|s| s.name == args.scenario) else {
        anyhow::bail!(
            "no scenario {:?}; there are: {}",
            args.scenario,
            names.join(", ")
        );
    };
    // Warm: the first runs fill caches and pools (what a steady proxy has). Not counted.
    for _ in 0..args.runs.min(100) {
        (scenario.run)();
    }
    let started = std::time::Instant::now();
    measured(scenario, args.runs);
    eprintln!(
        "{}: {} runs on {} in {:?}",
        scenario.name,
        args.runs,
        args.engine.name(),
        started.elapsed()
    );
    Ok(())
}
