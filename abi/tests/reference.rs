//! The ABI table against the hostcall list of the project's ABI document (`abi/ABI.md` §4.0,
//! written from the specification and the reference host): every row's name, parameter types
//! and versions.

use filterbox_abi::{AbiVersion, Import, ValType};

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ABI.md");

/// One row of the §4.0 table: name, `(type, param name)` pairs, versions.
type Row = (String, Vec<(String, String)>, String);

/// Every row of the §4.0 table.
fn reference_rows() -> Vec<Row> {
    let text = std::fs::read_to_string(REFERENCE)
        .unwrap_or_else(|e| panic!("cannot read {REFERENCE}: {e}"));
    let start = text
        .find("### 4.0 Summary table")
        .expect("§4.0 in the reference");
    let end = text[start..]
        .find("\n### ")
        .map_or(text.len(), |n| start + n);
    text[start..end]
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | # | name | params | Ver |
            let [_, number, name, params, versions, ..] = cells.as_slice() else {
                return None;
            };
            number.parse::<u32>().ok()?;
            let params = params
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let p = p.replace("**", "");
                    let (ty, name) = p.split_once(' ').expect("`type name` parameter");
                    (ty.to_owned(), name.to_owned())
                })
                .collect();
            Some((name.to_string(), params, versions.to_string()))
        })
        .collect()
}

fn type_name(t: ValType) -> &'static str {
    match t {
        ValType::I32 => "i32",
        ValType::I64 => "i64",
    }
}

#[test]
fn every_reference_hostcall_is_in_the_table_with_its_signature() {
    let rows = reference_rows();
    assert_eq!(rows.len(), 43, "the reference lists 43 hostcalls");
    for (name, params, versions) in &rows {
        let import = Import::lookup("env", name)
            .unwrap_or_else(|| panic!("{name} is in the reference but not in the ABI table"));
        let ours: Vec<(String, String)> = import
            .params()
            .iter()
            .zip(import.param_names())
            .map(|(t, n)| (type_name(*t).to_owned(), (*n).to_owned()))
            .collect();
        // Names may differ in wording (`msg` / `message`); types and count may not.
        let types = |p: &[(String, String)]| p.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
        assert_eq!(types(&ours), types(params), "{name}: parameter types");
        assert_eq!(import.result(), Some(ValType::I32), "{name}: result");
        let expected: &[AbiVersion] = match versions.as_str() {
            "all" => &[AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1],
            "0.1.0" => &[AbiVersion::V0_1_0],
            "0.2.x" => &[AbiVersion::V0_2_0, AbiVersion::V0_2_1],
            "0.2.1" => &[AbiVersion::V0_2_1],
            other => panic!("{name}: unknown version cell {other:?}"),
        };
        for version in [AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1] {
            assert_eq!(
                import.versions().contains(version),
                expected.contains(&version),
                "{name}: registered for {version:?}"
            );
        }
    }
    let in_table = Import::ALL.iter().filter(|i| i.is_hostcall()).count();
    assert_eq!(
        in_table,
        rows.len(),
        "the table has hostcalls the reference does not list"
    );
}
