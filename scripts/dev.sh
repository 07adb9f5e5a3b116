#!/usr/bin/env bash
# The one run command: sets up the local services (as the tests do), then runs Berth's engine and all
# four agents in one process on the dev profile (SQLite, a local directory for objects) and prints
# the console's one-click sign-in link.
#
# The build is Cargo's dev profile (Cargo.toml [profile.dev]: dependencies at opt-level 1, Berth's
# own crates unoptimized, no debug info for dependencies): the fastest build that still materializes
# thousands of files in a second or two, and the very build `cargo test` makes, so after the tests
# it is already there. A cold build is about 12 CPU-minutes (README.md: "How long the first run
# takes"); the release build this script used to make was most of a 10-minute first run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
"$here/scripts/services.sh"
echo "dev: building berth (the first build takes a few minutes; see README.md)" >&2
cargo build --bin berth
exec "${CARGO_TARGET_DIR:-$here/target}/debug/berth" --profile "${BERTH_PROFILE:-dev}" dev
