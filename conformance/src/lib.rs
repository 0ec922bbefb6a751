//! The filterbox conformance suite: one table of cases, each run on every built engine.
//!
//! A case is data plus a check: which guest, which config, which stream to drive, what must
//! be observed. [`run`] executes cases × engines and returns one [`Report`] per pair;
//! [`Report::json_line`] is the stable JSON-lines contract of
//! `filterbox conformance --format json`.

#![warn(missing_docs)]

mod calls;
mod cases;
mod envoy_parity;
pub mod fuzzing;
pub mod guests;
mod hardening;
mod harness;
mod hostile;
pub mod redis_server;
pub mod servers;

pub use cases::{CASES, Case};
pub use harness::{CaseResult, Failure, Harness, LogCapture, headers, pairs_of};

use filterbox::EngineKind;
use serde::Serialize;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A case's outcome on one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The host behaved as required.
    Pass,
    /// It did not.
    Fail,
    /// The case could not run on this engine.
    Skip,
}

impl Outcome {
    /// `pass`, `fail` or `skip`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        }
    }
}

/// One row of the results: a case on an engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The case's name.
    pub case: String,
    /// Its group (`hostile` for hostile-module cases).
    pub group: String,
    /// The engine's name.
    pub engine: String,
    /// What happened.
    pub outcome: Outcome,
    /// Why it failed or was skipped (empty on pass).
    pub detail: String,
}

impl Report {
    /// The report as one JSON object: `{"case","group","engine","outcome","detail"}`.
    pub fn json_line(&self) -> String {
        // Serializing a struct of strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Runs every case whose name or group contains `filter` (all if `None`) on each engine.
/// An engine this build lacks gives skips that say so.
pub fn run(engines: &[EngineKind], filter: Option<&str>) -> Vec<Report> {
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f) || c.group.contains(f)))
        .collect();
    let mut reports = Vec::new();
    for &engine in engines {
        let harness = Harness::new(engine);
        for case in &selected {
            let (outcome, detail) = match &harness {
                Err(why) => (Outcome::Skip, why.clone()),
                Ok(harness) => match catch_unwind(AssertUnwindSafe(|| (case.run)(harness))) {
                    Ok(Ok(())) => (Outcome::Pass, String::new()),
                    Ok(Err(Failure::Fail(why))) => (Outcome::Fail, why),
                    Ok(Err(Failure::Skip(why))) => (Outcome::Skip, why),
                    Err(panic) => (Outcome::Fail, format!("panicked: {}", panic_text(&*panic))),
                },
            };
            reports.push(Report {
                case: case.name.to_owned(),
                group: case.group.to_owned(),
                engine: engine.name().to_owned(),
                outcome,
                detail,
            });
        }
    }
    reports
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// Renders reports as a table: one row per case, one column per engine.
pub fn table(reports: &[Report]) -> String {
    let mut engines: Vec<&str> = Vec::new();
    let mut cases: Vec<(&str, &str)> = Vec::new();
    for r in reports {
        if !engines.contains(&r.engine.as_str()) {
            engines.push(&r.engine);
        }
        if !cases.contains(&(r.group.as_str(), r.case.as_str())) {
            cases.push((&r.group, &r.case));
        }
    }
    let name_width = cases
        .iter()
        .map(|(g, c)| g.len() + c.len() + 1)
        .max()
        .unwrap_or(4)
        .max(4);
    let col = engines.iter().map(|e| e.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:name_width$}", "case");
    for e in &engines {
        out.push_str(&format!("  {e:col$}"));
    }
    out.push('\n');
    let mut notes = Vec::new();
    for (group, case) in &cases {
        out.push_str(&format!("{:name_width$}", format!("{group}/{case}")));
        for e in &engines {
            let cell = reports
                .iter()
                .find(|r| r.engine == *e && r.case == *case && r.group == *group);
            let text = cell.map_or("-", |r| r.outcome.as_str());
            out.push_str(&format!("  {text:col$}"));
            if let Some(r) = cell.filter(|r| r.outcome != Outcome::Pass) {
                notes.push(format!(
                    "{group}/{case} on {e}: {}: {}",
                    r.outcome.as_str(),
                    r.detail
                ));
            }
        }
        out.push('\n');
    }
    let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
    out.push_str(&format!(
        "\n{} passed, {} failed, {} skipped ({} cases x {} engines)\n",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
        cases.len(),
        engines.len()
    ));
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    out
}
