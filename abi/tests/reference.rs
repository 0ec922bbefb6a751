//! Checks the hostcall table against the summary table of the ABI reference
//! (`../shared/abi/REFERENCE.md` §4.0): same names, same parameter types, same versions.

use filterbox_abi::{AbiVersion, Import, ValType};
use std::path::Path;

#[test]
fn hostcall_table_matches_the_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/abi/REFERENCE.md");
    let Ok(reference) = std::fs::read_to_string(&path) else {
        eprintln!("skipping: {} is not beside the checkout", path.display());
        return;
    };
    let mut seen = 0;
    for line in reference.lines() {
        // | 38 | proxy_increment_metric | (i32 metric_id, **i64** offset) | all |
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, number, name, params, versions, _] = cells.as_slice() else {
            continue;
        };
        if number.parse::<u32>().is_err() || !name.starts_with("proxy_") {
            continue;
        }
        seen += 1;
        let import = Import::lookup("env", name)
            .unwrap_or_else(|| panic!("{name} is in the reference, not in the table"));
        let types: Vec<ValType> = params
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                if p.contains("i64") {
                    ValType::I64
                } else {
                    ValType::I32
                }
            })
            .collect();
        assert_eq!(import.params(), types.as_slice(), "{name} parameters");
        let expected: Vec<AbiVersion> = match *versions {
            "all" => AbiVersion::ALL.to_vec(),
            "0.1.0" => vec![AbiVersion::V0_1_0],
            "0.2.x" => vec![AbiVersion::V0_2_0, AbiVersion::V0_2_1],
            "0.2.1" => vec![AbiVersion::V0_2_1],
            other => panic!("{name}: unknown version cell {other:?}"),
        };
        let actual: Vec<AbiVersion> = AbiVersion::ALL
            .into_iter()
            .filter(|v| import.versions().contains(*v))
            .collect();
        assert_eq!(actual, expected, "{name} versions");
    }
    let in_table = Import::ALL.iter().filter(|i| i.is_hostcall()).count();
    assert_eq!(
        seen, in_table,
        "the reference lists {seen} hostcalls, the table {in_table}"
    );
}
