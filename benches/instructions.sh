#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind, 127.0.0.1 only:
#
#   bash benches/instructions.sh [REQUESTS]     # default 20000 per phase and target; ~2 minutes
#
# arkor-edge (key check and model pinning on, access log off) and the bare hyper forwarder
# (benches/bare_forwarder.rs) in front of the mock backend (32 tokens), each run under callgrind
# and driven by arkor-loadgen with 4 connections: a warm-up of 1,000 requests, then REQUESTS
# non-streamed and REQUESTS streamed ones, counted from zeroed counters. Unlike CPU time, an
# instruction count does not move with the load of a shared machine, so a change to the request
# path shows in it run to run. It is not time: a cache miss and an instruction count the same.
# valgrind hides SHA extensions from the program, so the edge's key hash runs in software here
# (about 3,400 instructions per request, where SHA-NI takes a few hundred).
# Keeps the dumps in target/instructions/ for `callgrind_annotate` (the split per function).
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-20000}"

if ! command -v valgrind >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind) >/dev/null
fi

bare=$(cargo bench --no-run --bench bare_forwarder 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
. benches/common.sh # builds the binaries ($mock), makes $work, stops $pids on exit
target_dir="${CARGO_TARGET_DIR:-target}"
[ -x "$bare" ] || { echo "bare forwarder not built" >&2; exit 1; }
out="$target_dir/instructions"
rm -rf "$out" && mkdir -p "$out"

mock_port=19110 bare_port=18181 edge_port=18180
. benches/bench-deployment.sh
write_bench_deployment "$work"
write_bench_edge_config "$work" "$edge_port" "$mock_port"

"$mock" --listen "127.0.0.1:$mock_port" --tokens 32 >/dev/null &
pids+=($!)
valgrind -q --tool=callgrind --callgrind-out-file="$out/bare.cg" \
  "$bare" --listen "127.0.0.1:$bare_port" --upstream "127.0.0.1:$mock_port" >/dev/null &
bare_pid=$!
pids+=($bare_pid)
RUST_LOG=warn valgrind -q --tool=callgrind --callgrind-out-file="$out/edge.cg" \
  "$target_dir/release/arkor-edge" --config "$work/edge.toml" &
edge_pid=$!
pids+=($edge_pid)

# Under callgrind a start takes seconds.
for port in $mock_port $bare_port $edge_port; do
  for _ in $(seq 1 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.5
  done
done

load() { # PORT COUNT [--stream]
  "$target_dir/release/arkor-loadgen" --url "http://127.0.0.1:$1/v1" --host bench.arkor.app \
    --key "$key" -c 4 -n "$2" -q --json ${3:-} >/dev/null
}

# Instructions of one phase: counters zeroed, REQUESTS sent, counters dumped; prints Ir/request.
measure() { # NAME PORT PID [--stream]
  local before after
  callgrind_control -z "$3" >/dev/null 2>&1
  before=$(ls "$out/$1.cg".* 2>/dev/null | wc -l)
  load "$2" "$requests" "${4:-}"
  callgrind_control -d "$3" >/dev/null 2>&1
  for _ in $(seq 1 60); do
    after=$(ls "$out/$1.cg".* 2>/dev/null | wc -l)
    [ "$after" -gt "$before" ] && grep -q '^totals:' "$(ls -t "$out/$1.cg".* | head -1)" && break
    sleep 0.5
  done
  awk -v n="$requests" '/^totals:/ { printf "%.0f\n", $2 / n }' "$(ls -t "$out/$1.cg".* | head -1)"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); valgrind $(valgrind --version | cut -d- -f2)"
echo "instructions per request, $requests requests per phase, 4 connections"
printf '%-28s %12s %12s %8s\n' phase bare arkor-edge edge/bare
for phase in non-stream stream; do
  flag=""
  [ "$phase" = stream ] && flag="--stream"
  load $bare_port 1000 "$flag"
  load $edge_port 1000 "$flag"
  b=$(measure bare $bare_port $bare_pid "$flag")
  e=$(measure edge $edge_port $edge_pid "$flag")
  label=$phase
  [ "$phase" = stream ] && label="stream (32 chunks)"
  awk -v p="$label" -v b="$b" -v e="$e" 'BEGIN { printf "%-28s %12d %12d %8.2f\n", p, b, e, e / b }'
done
echo "dumps: $out (callgrind_annotate FILE)"
