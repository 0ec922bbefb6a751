//! `filterbox conformance`: the suite on the built engines (feature `suite`).

use anyhow::{Result, bail};
use clap::ValueEnum;
use filterbox::EngineKind;
use filterbox_conformance::{Outcome, run, table};
use std::fmt::Write as _;
use std::process::ExitCode;

/// How the suite's results are printed.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    /// A case × engine table.
    Table,
    /// One JSON object per case and engine.
    Json,
}

/// Runs the suite and writes its table or JSON lines to `out`; fails the run (exit code)
/// when a case fails or a built engine skips one.
pub(crate) fn conformance(
    out: &mut String,
    format: Format,
    names: &[String],
    filter: Option<&str>,
) -> Result<ExitCode> {
    let engines = if names.is_empty() {
        EngineKind::built()
    } else {
        names
            .iter()
            .map(|n| EngineKind::from_name(n))
            .collect::<Result<Vec<_>, _>>()?
    };
    if engines.is_empty() {
        bail!("this build has no engine; enable one of the engine features");
    }
    let reports = run(&engines, filter);
    if reports.is_empty() {
        bail!("no case matches {:?}", filter.unwrap_or_default());
    }
    match format {
        Format::Table => out.push_str(&table(&reports)),
        Format::Json => {
            for r in &reports {
                writeln!(out, "{}", r.json_line())?;
            }
        }
    }
    // A skip says an engine is not in this build; a built engine that skips is a failure.
    let built = EngineKind::built();
    let failed = reports.iter().any(|r| {
        r.outcome == Outcome::Fail
            || (r.outcome == Outcome::Skip && built.iter().any(|e| e.name() == r.engine))
    });
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
