//! Every scenario of `filterbox_benches` on every built engine, under criterion. The same
//! scenarios feed the report command (`--bin bench-report`), which also writes the ratios.

use criterion::{Criterion, criterion_group, criterion_main};
use filterbox::EngineKind;
use filterbox_benches::{Scenario, native_scenarios, scenarios};

fn bench_all(c: &mut Criterion) {
    let mut run = |prefix: &str, list: Vec<Scenario>| {
        for mut s in list {
            c.bench_function(&format!("{prefix}/{}", s.name), |b| b.iter(&mut s.run));
        }
    };
    run("native", native_scenarios());
    for kind in EngineKind::built() {
        match scenarios(kind, false) {
            Ok(list) => run(kind.name(), list),
            Err(e) => eprintln!("{kind}: {e}"),
        }
    }
}

criterion_group!(benches, bench_all);
criterion_main!(benches);
