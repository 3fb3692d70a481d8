#!/usr/bin/env bash
# Writes the tiny model and its two LoRA adapters for the real llama-server tests.
# Usage: tests/llama/ensure-fixtures.sh OUT_DIR — writes OUT_DIR/{base,adapter-a,adapter-b}.gguf
# (make_fixtures.py says how the weights are arranged) and prints OUT_DIR.
# The `gguf` package (pinned in requirements.txt) goes into a venv in the cache, created once:
#   ${ARKOR_CACHE:-$HOME/.cache/arkor-edge}/gguf-venv
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?output folder}"
venv="${ARKOR_CACHE:-$HOME/.cache/arkor-edge}/gguf-venv"
stamp="$venv/.requirements"
ready() { [ -x "$venv/bin/python" ] && cmp -s "$here/requirements.txt" "$stamp"; }
if ! ready; then
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9 # one install at a time
fi
if ! ready; then
  "${PYTHON:-python3}" -m venv --clear "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  cp "$here/requirements.txt" "$stamp"
fi
"$venv/bin/python" "$here/make_fixtures.py" "$out"
