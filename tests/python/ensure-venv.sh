#!/usr/bin/env bash
# Creates (once) a Python venv with the official OpenAI SDK for the SDK end-to-end test.
# Usage: tests/python/ensure-venv.sh VENV_DIR   — prints the venv's python path on success.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:?venv folder}"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$here/requirements.txt" "$stamp"; then
  echo "$venv/bin/python"
  exit 0
fi
python="${PYTHON:-python3}"
"$python" -m venv --clear "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
cp "$here/requirements.txt" "$stamp"
echo "$venv/bin/python"
