# Shared setup of the load scripts (sourced, not run): installs wrk when missing, builds the edge
# and the mock backend ($mock), makes a work dir ($work) and a cleanup trap that stops every
# process listed in $pids and removes the work dir.
if ! command -v wrk >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi

# Scripts that need a bench target build it (`cargo bench --no-run`) before sourcing this file:
# that build links the binaries again with the dev-dependencies' features (tokio's `test-util`
# and `process`) into target/release, and this one puts the shipped ones back.
cargo build --release --quiet --bins
mock="${CARGO_TARGET_DIR:-target}/release/arkor-mock-backend"
[ -x "$mock" ] || { echo "mock backend not built" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
