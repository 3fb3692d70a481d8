#!/usr/bin/env bash
# Installs (once) the official OpenAI Node SDK for the SDK end-to-end test, with `npm ci` from the
# committed package-lock.json, into DIR (outside the source tree, e.g. target/node-deps).
# Usage: tests/node/ensure-node-deps.sh DIR   — prints the path of the check script to run,
#   DIR/sdk_check.mjs, a fresh copy of tests/node/sdk_check.mjs placed next to DIR/node_modules
#   (ESM imports resolve from the script's own folder, not from NODE_PATH):
#     node "$(bash tests/node/ensure-node-deps.sh target/node-deps)"
# Re-installs only when package.json or package-lock.json changed (stamp DIR/.deps-stamp).
# npm's output goes to stderr; a failed install exits non-zero and leaves no stamp.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?deps folder}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

# Concurrent callers (parallel tests) must not run two installs into the same folder.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$dir/.lock"
  flock 9
fi

stamp="$dir/.deps-stamp"
want="$(cat "$here/package.json" "$here/package-lock.json" | cksum)"
if ! { [ -f "$dir/node_modules/openai/package.json" ] && [ -f "$stamp" ] \
       && [ "$(cat "$stamp")" = "$want" ]; }; then
  command -v npm >/dev/null 2>&1 || { echo "ensure-node-deps: npm not found on PATH" >&2; exit 1; }
  rm -f "$stamp"
  cp "$here/package.json" "$here/package-lock.json" "$dir/"
  if ! (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts --prefer-offline >&2); then
    echo "ensure-node-deps: npm ci failed in $dir (see npm's output above)" >&2
    exit 1
  fi
  printf '%s\n' "$want" >"$stamp"
fi

# The script itself is copied on every call (it changes more often than the dependencies).
cp "$here/sdk_check.mjs" "$dir/.sdk_check.mjs.tmp"
mv -f "$dir/.sdk_check.mjs.tmp" "$dir/sdk_check.mjs"
echo "$dir/sdk_check.mjs"
