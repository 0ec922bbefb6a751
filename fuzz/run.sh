#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after another:
#   bash fuzz/run.sh [SECONDS] [TARGET...]      (default 60 s, every target)
# JOBS=N runs N targets at once. Needs the nightly toolchain; installs cargo-fuzz if absent.
# SANITIZER=none builds without AddressSanitizer (in target-nosan/, logs as <target>-nosan):
# then modules and differential run wasmer too, whose trap unwinding ASan cannot follow.
# Each target starts from fuzz/seeds/<target> and fuzz/regressions/<target> and keeps what it
# finds in fuzz/corpus/<target> (not committed); a crash lands in fuzz/artifacts/<target>:
# fix it, then copy the input into fuzz/regressions/<target>/ so `cargo test` replays it.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
build=()
suffix=""
if [ "${SANITIZER:-address}" = none ]; then
    build=(-s none --target-dir target-nosan)
    suffix="-nosan"
    export FILTERBOX_FUZZ_WASMER=1
fi
cargo +nightly fuzz build "${build[@]}"
run_one() {
    local target="$1" extra=() log="logs/$1$suffix.log"
    mkdir -p "corpus/$target" "seeds/$target" "regressions/$target" logs
    [ -f "dicts/$target.dict" ] && extra+=("-dict=dicts/$target.dict")
    # Each input compiles modules (seconds under ASan): start at full length instead of
    # growing it from 4 bytes, which at a few executions per second takes the whole run.
    case "$target" in modules | differential) extra+=("-len_control=0" "-max_len=512") ;; esac
    echo "== $target ($seconds s), log: fuzz/$log"
    cargo +nightly fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -timeout=120 -rss_limit_mb=3072 -print_final_stats=1 \
        "${extra[@]}" >"$log" 2>&1
    local status=$?
    grep -E "^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|stat::peak_rss_mb)" "$log" || true
    grep -E "cov: [0-9]+" "$log" | tail -1 || true
    return $status
}
jobs="${JOBS:-1}"
failed=0
for target in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || failed=1; done
    run_one "$target" &
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
exit $failed
