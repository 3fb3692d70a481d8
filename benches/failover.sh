#!/usr/bin/env bash
# One of three backends dies in the middle of a load run: how many requests failed, how many
# were retried, and how long until the dead endpoint was ejected.
#
#   bash benches/failover.sh [SECONDS]
#
# Three mock backends (arkor-mock-backend) behind one pool (retries = 2), wrk for SECONDS
# (default 20) at 16 connections, non-streamed; the second backend is killed at a third of the
# run. Loopback only, bounded. Reads the edge's own metrics from its admin listener.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"

. benches/common.sh

edge_port=18090
admin_port=19190
ports=(19111 19112 19113)
cat > "$work/deployments.json" <<JSON
{"revision":1,"deployments":[{"id":"d-fail","slug":"failover","enabled":true,"authMode":"none",
 "target":{"type":"base_model","baseModel":"bench/model"},"revision":1}],"keys":[]}
JSON
cat > "$work/edge.toml" <<TOML
state_dir = "state"
[listen]
http = "127.0.0.1:$edge_port"
admin = "127.0.0.1:$admin_port"
[log]
access = false
[[pools]]
name = "failover"
base_models = ["bench/model"]
endpoints = ["http://127.0.0.1:${ports[0]}", "http://127.0.0.1:${ports[1]}", "http://127.0.0.1:${ports[2]}"]
retries = 2
TOML

mock_pids=()
for p in "${ports[@]}"; do
  "$mock" --listen "127.0.0.1:$p" >/dev/null &
  mock_pids+=($!); pids+=($!)
done
RUST_LOG=error "${CARGO_TARGET_DIR:-target}/release/arkor-edge" --config "$work/edge.toml" &
pids+=($!)
for _ in $(seq 50); do
  curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz" 2>/dev/null && break
  sleep 0.1
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"x","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Host"] = "failover.arkor.app"
LUA

metric() { # name-with-labels prefix
  curl -fsS "http://127.0.0.1:$admin_port/metrics" | awk -v m="$1" 'index($0, m) == 1 { print $NF; found = 1 } END { if (!found) print 0 }' | head -1
}

wrk -t1 -c16 -d"${secs}s" -s "$work/post.lua" "http://127.0.0.1:$edge_port/v1/chat/completions" > "$work/wrk.txt" &
wrk_pid=$!
sleep "$(echo "$secs / 3" | bc -l)"
dead="http://127.0.0.1:${ports[1]}"
kill "${mock_pids[1]}"
killed=$(date +%s.%N)
ejected=""
while kill -0 "$wrk_pid" 2>/dev/null; do
  if [ -z "$ejected" ] && [ "$(metric "arkor_edge_endpoint_ejections_total{pool=\"failover\",endpoint=\"$dead\"}")" != "0" ]; then
    ejected=$(date +%s.%N)
  fi
  sleep 0.02
done
wait "$wrk_pid" || true

total=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $5}' "$work/wrk.txt")
errors=$(awk '/Socket errors/ {print $0}' "$work/wrk.txt")
echo "wrk -t1 -c16 -d${secs}s through arkor-edge, 3 backends, backend 2 killed at $(echo "$secs / 3" | bc)s"
echo "requests:            ${total:-0}"
echo "non-2xx responses:   ${non2xx:-0}"
if [ -n "$errors" ]; then echo "wrk: $errors"; fi
echo "retried attempts:    $(metric 'arkor_edge_pool_retries_total{pool="failover"}')"
echo "budget refusals:     $(metric 'arkor_edge_pool_retry_budget_exhausted_total{pool="failover"}')"
echo "503 upstream_unavailable: $(metric 'arkor_edge_requests_total{class="5xx",code="upstream_unavailable"}')"
echo "502 upstream_error:       $(metric 'arkor_edge_requests_total{class="5xx",code="upstream_error"}')"
for p in "${ports[@]}"; do
  echo "picks http://127.0.0.1:$p: $(metric "arkor_edge_endpoint_picks_total{pool=\"failover\",endpoint=\"http://127.0.0.1:$p\"}")   ejections: $(metric "arkor_edge_endpoint_ejections_total{pool=\"failover\",endpoint=\"http://127.0.0.1:$p\"}")"
done
if [ -n "$ejected" ]; then
  echo "time from kill to ejection: $(echo "($ejected - $killed) * 1000" | bc -l | xargs printf '%.0f') ms"
else
  echo "time from kill to ejection: not ejected during the run"
fi
