#!/usr/bin/env bash
# Updates the web console's vendored front-end libraries (agents/session/console/vendor/) from their
# npm packages at the versions pinned below, with their license files. The one way to update them:
# change a version here, run this script, commit the result. Nothing is fetched at build or run time:
# the files are embedded in the `berth` binary.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
vendor="$here/agents/session/console/vendor"
packages=(
  "@xterm/xterm@6.0.0:lib/xterm.mjs css/xterm.css"
  "@xterm/addon-attach@0.12.0:lib/addon-attach.mjs"
  "@xterm/addon-fit@0.11.0:lib/addon-fit.mjs"
)
command -v npm >/dev/null || { echo "vendor-console: npm is needed (apt-get install npm)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$vendor"
mkdir -p "$vendor"
for entry in "${packages[@]}"; do
  spec=${entry%%:*}
  files=${entry#*:}
  name=${spec%@*}
  short=${name#@xterm/}
  (cd "$work" && npm pack --silent "$spec" >/dev/null)
  tarball=$(ls "$work"/*.tgz)
  mkdir -p "$work/$short" "$vendor/$short"
  tar -xzf "$tarball" -C "$work/$short"
  rm -f "$tarball"
  for file in $files LICENSE; do
    cp "$work/$short/package/$file" "$vendor/$short/"
  done
  # Source maps are not shipped: drop the reference so browsers do not ask for them.
  for module in "$vendor/$short"/*.mjs; do
    [ -f "$module" ] && sed -i '/^\/\/# sourceMappingURL=/d' "$module"
  done
  echo "$spec" >>"$vendor/VERSIONS"
done
echo "vendor-console: $(tr '\n' ' ' <"$vendor/VERSIONS")→ $vendor"
