//! Runs the whole conformance suite on every engine this build has.

use filterbox::EngineKind;
use filterbox_conformance::{Outcome, run, table};

#[test]
fn every_case_passes_on_every_built_engine() {
    let engines = EngineKind::built();
    assert!(!engines.is_empty(), "no engine is built");
    let reports = run(&engines, None);
    println!("{}", table(&reports));
    // Every engine run here is built, so nothing may be skipped.
    let failed: Vec<_> = reports
        .iter()
        .filter(|r| r.outcome != Outcome::Pass)
        .map(|r| format!("{}/{} on {}: {}", r.group, r.case, r.engine, r.detail))
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    let hostile = reports
        .iter()
        .filter(|r| r.group == "hostile" && r.outcome == Outcome::Pass)
        .count();
    assert!(
        hostile >= engines.len(),
        "hostile cases must run on every engine"
    );
}

#[test]
fn json_lines_keep_their_shape() {
    let reports = run(&[EngineKind::Wasmtime], Some("start-and-configure"));
    assert_eq!(reports.len(), 1);
    let line = reports[0].json_line();
    let positions: Vec<usize> = [
        "\"case\":",
        "\"group\":",
        "\"engine\":",
        "\"outcome\":",
        "\"detail\":",
    ]
    .iter()
    .map(|key| {
        line.find(key)
            .unwrap_or_else(|| panic!("{key} missing from {line}"))
    })
    .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "keys out of order: {line}"
    );
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value.as_object().unwrap().len(), 5, "{line}");
    assert_eq!(value["outcome"], "pass");
    assert_eq!(value["engine"], "wasmtime");
    assert_eq!(value["group"], "lifecycle");
}
