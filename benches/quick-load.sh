#!/usr/bin/env bash
# A quick loopback load comparison: the same wrk load direct to the mock backend and through
# arkor-edge (key check and model pinning on), non-streamed and streamed (32 chunks).
#
#   bash benches/quick-load.sh [SECONDS] [CONNECTIONS]
#
# Installs wrk from Debian's packages when missing. Bounded: four wrk runs of SECONDS each
# (default 10), 127.0.0.1 only. Prints requests/s and p99 per target and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
conns="${2:-32}"

. benches/common.sh

mock_port=19100
edge_port=18080
. benches/bench-deployment.sh
write_bench_deployment "$work"
write_bench_edge_config "$work" "$edge_port" "$mock_port"

"$mock" --listen "127.0.0.1:$mock_port" --tokens 32 >/dev/null &
pids+=($!)
RUST_LOG=warn "${CARGO_TARGET_DIR:-target}/release/arkor-edge" --config "$work/edge.toml" &
pids+=($!)
for _ in $(seq 50); do
  curl -fsS -o /dev/null -H "Host: bench.arkor.app" -H "Authorization: Bearer $key" \
    "http://127.0.0.1:$edge_port/v1/models" 2>/dev/null && break
  sleep 0.1
done

for stream in false true; do
  cat > "$work/post-$stream.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o","stream":$stream,"messages":[{"role":"user","content":"Say hello to the edge router, politely."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Host"] = "bench.arkor.app"
wrk.headers["Authorization"] = "Bearer $key"
LUA
done

run() { # name port stream
  local out
  out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$work/post-$3.lua" "http://127.0.0.1:$2/v1/chat/completions")
  local rps p99 errs
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  printf '%-8s %-7s %12s req/s   p99 %9s   non-2xx %s\n' "$1" "$3" "$rps" "$p99" "${errs:-0}"
  echo "$rps" > "$work/rps-$1-$3"
}

echo "wrk -t1 -c$conns -d${secs}s, mock backend answering at once (stream: 32 chunks)"
for stream in false true; do
  run direct "$mock_port" "$stream"
  run edge "$edge_port" "$stream"
done
for stream in false true; do
  awk -v a="$(cat "$work/rps-edge-$stream")" -v b="$(cat "$work/rps-direct-$stream")" -v s="$stream" \
    'BEGIN { printf "stream=%-5s edge/direct throughput ratio: %.2f\n", s, a / b }'
done
