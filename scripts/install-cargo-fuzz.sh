#!/usr/bin/env bash
# Installs cargo-fuzz (the libFuzzer driver of `make fuzz` and of the short fuzzing
# runs in `make test`) from crates.io. Idempotent: does nothing when it is there.
set -euo pipefail
if cargo fuzz --version >/dev/null 2>&1; then
    echo "$(cargo fuzz --version) already installed"
    exit 0
fi
cargo install cargo-fuzz --locked --version 0.13.2
cargo fuzz --version
