#!/usr/bin/env bash
# The whole test suite, from a fresh clone: formatting, lints, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
export RUST_BACKTRACE=1
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --no-fail-fast
