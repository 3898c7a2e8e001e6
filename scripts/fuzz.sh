#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ for SECONDS each (default 20), starting from
# its committed seed corpus (fuzz/corpus/<target>); what a run discovers goes to a
# temporary directory, so the tree stays clean. A crash fails the run and leaves the
# input under fuzz/artifacts/<target>/. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
# Coverage instrumentation without a sanitizer: the code is memory-safe Rust
# (#![forbid(unsafe_code)]); what is looked for is panics, overflows, hangs and
# broken invariants, with debug assertions on.
# Instrumented builds share nothing with the others: a directory of their own, so they
# never hold the build lock of the workspace's.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
cargo fuzz build --sanitizer none --debug-assertions
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "fuzz/corpus/$t"
    set +e
    cargo fuzz run --sanitizer none --debug-assertions "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/$t.log" 2>&1
    rc=$?
    set -e
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$work/$t.log" | grep -oE '[0-9]+$' || echo 0)
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$work/$t.log"
        echo "fuzz: $t FAILED after $runs inputs (the input is under fuzz/artifacts/$t/)"
        exit "$rc"
    fi
    echo "fuzz: $t ran ${seconds}s, $runs inputs, nothing found"
done
