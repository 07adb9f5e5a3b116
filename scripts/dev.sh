#!/usr/bin/env bash
# The one run command: sets up the local services (as the tests do), then runs Berth's engine and all
# four agents in one process on the dev profile (SQLite, a local directory for objects).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
"$here/scripts/services.sh"
cargo build --release --bin berth
exec "$here/target/release/berth" --profile "${BERTH_PROFILE:-dev}" dev
