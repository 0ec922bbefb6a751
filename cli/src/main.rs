//! `filterbox`: run the conformance suite, inspect plugins, list engines.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use filterbox::abi::{ImportModule, ModuleInfo};
use filterbox::{AbiVersion, EngineKind};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: per-thread heaps with lock-free frees from other threads, where glibc malloc
/// makes the threads of `serve` wait on each other's arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod registry;
mod routes;
mod run;
mod serve;
#[cfg(feature = "suite")]
mod suite;
mod tls;
mod upstream;

#[derive(Parser)]
#[command(
    name = "filterbox",
    version,
    about = "A proxy-wasm host runtime: conformance suite and plugin tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one plugin on one request (and response) and print what it did: the request as
    /// forwarded or its local response, the response, logs, metrics (--trace: hostcalls).
    Run(Box<run::RunArgs>),
    /// Run the conformance suite on every built engine (or the ones named) and print the table.
    #[cfg(feature = "suite")]
    Conformance {
        /// Output: a case × engine table, or one JSON object per case and engine.
        #[arg(long, value_enum, default_value_t = suite::Format::Table)]
        format: suite::Format,
        /// Engines to run on (repeatable); default: every engine in this build.
        #[arg(long = "engine")]
        engines: Vec<String>,
        /// Only cases whose name or group contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Show a plugin's ABI version, its imports (and whether filterbox provides them) and exports.
    Inspect {
        /// The plugin's .wasm file.
        plugin: PathBuf,
    },
    /// List the engines filterbox knows and whether this build has them.
    Engines,
    /// Run a reverse proxy with a chain of plugins (reloads its config on change or SIGHUP).
    Serve {
        /// The config file (YAML): listeners, upstreams, admin, plugins.
        #[arg(long, default_value = "filterbox.yaml")]
        config: PathBuf,
    },
    /// Push a plugin to an OCI registry as a Wasm artifact (REF: host[:port]/repo:tag).
    Push {
        /// The plugin's .wasm file.
        plugin: PathBuf,
        /// Where to push it.
        reference: String,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Pull a plugin from an OCI registry (REF: host[:port]/repo[:tag|@sha256:…]).
    Pull {
        /// What to pull.
        reference: String,
        /// Write the module here.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("FILTERBOX_LOG")
        .unwrap_or_else(|_| "warn".into());
    if let Command::Run(args) = &cli.command
        && args.trace
        && let Ok(directive) = "filterbox::hostcall=trace".parse()
    {
        filter = filter.add_directive(directive);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run_cli(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("filterbox: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_cli(cli: Cli) -> Result<ExitCode> {
    let mut out = String::new();
    let code = match cli.command {
        #[cfg(feature = "suite")]
        Command::Conformance {
            format,
            engines,
            filter,
        } => suite::conformance(&mut out, format, &engines, filter.as_deref())?,
        Command::Inspect { plugin } => inspect(&mut out, &plugin).map(|()| ExitCode::SUCCESS)?,
        Command::Run(args) => {
            out = run::run(&args)?;
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            serve::serve(&config)?;
            ExitCode::SUCCESS
        }
        Command::Push {
            plugin,
            reference,
            registry,
        } => {
            out = registry::push(&plugin, &reference, &registry)?;
            ExitCode::SUCCESS
        }
        Command::Pull {
            reference,
            output,
            registry,
        } => {
            out = registry::pull(&reference, output.as_ref(), &registry)?;
            ExitCode::SUCCESS
        }
        Command::Engines => {
            for kind in EngineKind::ALL {
                writeln!(
                    out,
                    "{:18} {}",
                    kind.name(),
                    if kind.is_built() {
                        "built"
                    } else {
                        "not in this build"
                    }
                )?;
            }
            ExitCode::SUCCESS
        }
    };
    // A closed pipe (`filterbox ... | head`) is not an error worth a panic.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(code),
    }
}

fn inspect(out: &mut String, path: &PathBuf) -> Result<()> {
    let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let info = ModuleInfo::parse(&wasm).with_context(|| format!("parsing {}", path.display()))?;
    match info.abi_version() {
        Ok(version) => writeln!(out, "ABI version: {version}")?,
        Err(e) => writeln!(out, "ABI version: none ({e})")?,
    }
    let abi = info.abi_version().ok();
    writeln!(out, "imports ({}):", info.imports.len())?;
    let mut wasi = Vec::new();
    for import in &info.imports {
        let status = match import.provided_by() {
            None if import.is_func => "unsupported: the plugin will not load".to_owned(),
            None => "unsupported (not a function): the plugin will not load".to_owned(),
            Some(i) if !filterbox::is_implemented(i) => "stub: answers ENOSYS".to_owned(),
            Some(i)
                if i.module() == ImportModule::Env
                    && abi.is_some_and(|v: AbiVersion| !i.versions().contains(v)) =>
            {
                format!(
                    "supported (not part of ABI {})",
                    abi.map_or("?", AbiVersion::as_str)
                )
            }
            Some(_) => "supported".to_owned(),
        };
        if import
            .provided_by()
            .is_some_and(|i| i.module() == ImportModule::Wasi)
        {
            wasi.push(import.name.as_str());
        }
        writeln!(out, "  {}.{}  {status}", import.module, import.name)?;
    }
    match wasi.is_empty() {
        true => writeln!(out, "WASI needs: none")?,
        false => writeln!(out, "WASI needs: {}", wasi.join(", "))?,
    }
    writeln!(out, "exports ({}):", info.exports.len())?;
    for export in &info.exports {
        let role = export
            .callback()
            .map_or_else(String::new, |c| format!("  (callback {})", c.name()));
        writeln!(out, "  {} {:?}{role}", export.name, export.kind)?;
    }
    // Linking checks every callback export's type against the ABI (and everything else a
    // load checks); say what it found.
    match filterbox::Plugin::load(filterbox::PluginConfig::named("inspect"), &wasm) {
        Ok(_) => writeln!(
            out,
            "load check (wasmtime): ok, every callback export has its ABI type"
        )?,
        Err(error) => writeln!(out, "load check (wasmtime): {error}")?,
    }
    Ok(())
}
