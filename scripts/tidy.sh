#!/usr/bin/env bash
# The code keeps itself tidy: formatting, lints and the dependency policy, each a hard failure.
# Called by scripts/test.sh; run alone with `scripts/tidy.sh`. Installs cargo-deny when missing.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
step() {
  local name=$1
  shift
  if "$@"; then
    echo "tidy: $name ok"
  else
    echo "tidy: $name FAILED"
    failed=1
  fi
}

if ! cargo deny --version >/dev/null 2>&1; then
  echo "tidy: installing cargo-deny"
  cargo install cargo-deny --locked --version 0.20.2 --quiet || echo "tidy: cargo-deny did not install"
fi

step "cargo fmt --check" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
# Advisories need the RustSec database on GitHub, which these machines cannot reach.
step "cargo deny (licenses, bans, sources)" cargo deny --log-level error check licenses bans sources
exit "$failed"
