#!/usr/bin/env bash
# What TLS costs arkor-edge on 127.0.0.1: full handshakes per second, requests per second over
# plain and TLS HTTP/1.1 and HTTP/2, and memory per idle keep-alive connection (plain and TLS,
# HTTP/1.1 and HTTP/2).
#
#   bash benches/tls-load.sh [SECONDS]
#
# Installs wrk, h2load (nghttp2-client) and openssl from Debian's packages when missing, makes a
# throwaway CA and a *.arkor.app certificate in a temp dir, and runs the edge (plain and HTTPS
# listeners) in front of the mock backend (arkor-mock-backend, benches/support/mock.rs). Bounded: seven load phases of
# SECONDS each (default 10), then four idle phases of at most 10,000 connections (60 s at most
# each, on a fresh edge each); 127.0.0.1 only. Prints one table, the TLS/plain ratios and, for
# every phase, the edge's own CPU time per request or connection (from /proc), which stays
# meaningful when the load tools compete with the edge for the same cores.
#
# Tools: full handshakes are made by benches/conn_load.rs (rustls client, session resumption off,
# every handshake checked to be a full one), because wrk and h2load resume TLS sessions when
# they reconnect; openssl s_time -new is a cross-check (full handshakes, but no SNI and no
# request). wrk (HTTP/1.1) and h2load (HTTP/2) give requests per second. wrk takes the TLS name
# from the URL, so it runs in a private mount namespace whose /etc/hosts maps bench.arkor.app to
# 127.0.0.1 (the machine's /etc/hosts is not touched; without unshare it gets one marked line
# for the run, removed on exit).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 64; }
idle_count=10000
idle_limit=60

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
fi

# 10,000 connections need as many descriptors in the edge and in the client.
fds=$((idle_count + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$fds" ]; then
  ulimit -n "$fds" 2>/dev/null || {
    echo "tls-load: need at least $fds open files (ulimit -n is $(ulimit -n), hard limit $(ulimit -Hn))" >&2
    exit 1
  }
fi

# The bench build first: it links the binaries with the dev-dependencies' features too, and the
# release build after it puts the shipped ones back in target/release.
benches=$(cargo bench --no-run --bench conn_load 2>&1)
cargo build --release --quiet --bins
edge="${CARGO_TARGET_DIR:-target}/release/arkor-edge"
mock="${CARGO_TARGET_DIR:-target}/release/arkor-mock-backend"
[ -x "$edge" ] || { echo "arkor-edge not built" >&2; exit 1; }
client=$(echo "$benches" | sed -n 's/.*Executable .*conn_load.*(\(.*\)).*/\1/p' | tail -1)
if [ ! -x "$mock" ] || [ ! -x "$client" ]; then
  echo "$benches" >&2
  echo "bench targets not built" >&2
  exit 1
fi

mock_port=19131
http_port=18131
https_port=18531
for p in $mock_port $http_port $https_port; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "tls-load: port $p is already in use on 127.0.0.1" >&2
    exit 1
  fi
done

work=$(mktemp -d)
pids=()
edge_pid=
hosts_mark="# arkor-edge tls-load $$"
hosts_mode=
cleanup() {
  local status=$? i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$hosts_mode" = file ]; then
    grep -vF "$hosts_mark" /etc/hosts > "$work/hosts.restore" || true
    cat "$work/hosts.restore" > /etc/hosts
  fi
  if [ "$status" -ne 0 ] && [ "$status" -lt 128 ] && [ -s "$work/edge.log" ]; then
    echo "--- edge log (last lines)" >&2
    tail -20 "$work/edge.log" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
run() { # OUT COMMAND...: in the background, so that the exit trap can stop it at once
  local out=$1 p
  shift
  "$@" > "$out" &
  p=$!
  pids+=("$p")
  wait "$p"
}

# A throwaway CA and a *.arkor.app certificate it signs (ECDSA P-256).
(
  cd "$work"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=arkor-edge tls-load CA" -out ca.pem
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out wildcard.key
  openssl req -new -key wildcard.key -subj "/CN=*.arkor.app" -out wildcard.csr
  printf '%s\n' "subjectAltName=DNS:*.arkor.app" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > wildcard.ext
  openssl x509 -req -in wildcard.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 \
    -extfile wildcard.ext -out wildcard.pem
  openssl verify -CAfile ca.pem wildcard.pem
) >/dev/null 2>&1 || { echo "tls-load: openssl could not make the certificates" >&2; exit 1; }

. benches/bench-deployment.sh
write_bench_deployment "$work"
{
  cat <<TOML
state_dir = "state"
[listen]
http = "127.0.0.1:$http_port"
https = "127.0.0.1:$https_port"
admin = ""
[tls]
certs = [{ cert = "wildcard.pem", key = "wildcard.key" }]
[log]
access = false
[limits]
max_connections = 20000
[timeouts]
client_header = "300s"
client_idle = "300s"
TOML
  bench_pool_toml "$mock_port"
} > "$work/edge.toml"
body='{"model":"gpt-4o","stream":false,"messages":[{"role":"user","content":"Say hello to the edge router, politely."}]}'
printf %s "$body" > "$work/body.json"
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Host"] = "bench.arkor.app"
wrk.headers["Authorization"] = "Bearer $key"
LUA

# bench.arkor.app -> 127.0.0.1 for wrk only: a private mount namespace with its own /etc/hosts.
{ cat /etc/hosts; echo "127.0.0.1 bench.arkor.app"; } > "$work/hosts"
# shellcheck disable=SC2016 # $0 and $@ are the inner shell's
with_hosts=(unshare -m -- sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$work/hosts")
if "${with_hosts[@]}" getent hosts bench.arkor.app >/dev/null 2>&1; then
  hosts_mode="ns"
else
  hosts_mode="file"
  with_hosts=()
  echo "127.0.0.1 bench.arkor.app $hosts_mark" >> /etc/hosts
fi

"$mock" --listen "127.0.0.1:$mock_port" --tokens 32 >/dev/null &
pids+=($!)

post() { # url: one keyed POST, 200 expected
  curl -fsS -o /dev/null --cacert "$work/ca.pem" --resolve "bench.arkor.app:$https_port:127.0.0.1" \
    -H "Host: bench.arkor.app" -H "Authorization: Bearer $key" -H "Content-Type: application/json" \
    -d "$body" "$1"
}
start_edge() { # a fresh edge process; waits until it answers on both listeners
  if [ -n "$edge_pid" ]; then
    kill "$edge_pid" 2>/dev/null || true
    wait "$edge_pid" 2>/dev/null || true
  fi
  RUST_LOG=warn "$edge" --config "$work/edge.toml" 2>>"$work/edge.log" &
  edge_pid=$!
  pids+=("$edge_pid")
  for _ in $(seq 100); do
    post "http://127.0.0.1:$http_port/v1/chat/completions" 2>/dev/null && break
    kill -0 "$edge_pid" 2>/dev/null || { echo "tls-load: the edge exited at start" >&2; exit 1; }
    sleep 0.1
  done
  post "http://127.0.0.1:$http_port/v1/chat/completions"
  post "https://bench.arkor.app:$https_port/v1/chat/completions"
}
tck=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$edge_pid/stat"; }             # edge CPU, clock ticks
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$edge_pid/status"; }        # KiB
nfds() { find "/proc/$edge_pid/fd" -mindepth 1 -maxdepth 1 | wc -l; }
per_op() { awk -v t="$1" -v n="$2" -v hz="$tck" 'BEGIN { if (n > 0) printf "%.0f us", t * 1e6 / hz / n; else print "-" }'; }

row() { printf '%-40s %-30s %14s %15s %8s %11s\n' "$@"; }
echo "arkor-edge TLS load: $secs s per phase, 127.0.0.1, $(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "certificate: ECDSA P-256 *.arkor.app; mock backend answering at once; non-streamed keyed POST /v1/chat/completions"
echo
row "measurement" "tool" "rate" "latency" "errors" "edge CPU/op"

start_edge

connect_phase() { # name port conns [--ca file]
  local name=$1 port=$2 conns=$3 out c0 c1
  shift 3
  c0=$(cpu)
  run "$work/out" "$client" connect --addr "127.0.0.1:$port" --sni bench.arkor.app --key "$key" \
    --conns "$conns" --threads 2 --secs "$secs" --max 25000 "$@"
  out=$(cat "$work/out")
  c1=$(cpu)
  local n rate p99 errs full resumed
  n=$(echo "$out" | sed -n 's/.*completed=\([0-9]*\).*/\1/p')
  full=$(echo "$out" | sed -n 's/.* full=\([0-9]*\).*/\1/p')
  resumed=$(echo "$out" | sed -n 's/.*resumed=\([0-9]*\).*/\1/p')
  errs=$(echo "$out" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
  rate=$(echo "$out" | sed -n 's/.*rate=\([0-9.]*\).*/\1/p')
  p99=$(echo "$out" | sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p')
  row "$name" "conn_load connect -c$conns" "$rate conn/s" "p99 $p99 ms" "$errs" "$(per_op $((c1 - c0)) "$n")"
  echo "$n $full $resumed $((c1 - c0))" > "$work/connect-$port"
}
connect_phase "TLS full handshakes, new conn + 1 POST" "$https_port" 64 --ca "$work/ca.pem"
connect_phase "plain new conn + 1 POST (baseline)" "$http_port" 64

# openssl s_time: one connection at a time per process, so two processes, one per core.
stime_pids=()
c0=$(cpu)
t0=$(date +%s.%N)
for i in 1 2; do
  openssl s_time -connect "127.0.0.1:$https_port" -new -time "$secs" > "$work/s_time-$i" 2>&1 &
  pids+=($!)
  stime_pids+=($!)
done
for p in "${stime_pids[@]}"; do wait "$p"; done
t1=$(date +%s.%N)
c1=$(cpu)
n=$(cat "$work"/s_time-* | awk '/connections in [0-9.]+s;/ { s += $1 } END { print s + 0 }')
rate=$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a) }')
row "TLS full handshakes, no request" "openssl s_time -new x2" "$rate conn/s" "-" "-" "$(per_op $((c1 - c0)) "$n")"

wrk_phase() { # name url: 32 connections, keep-alive
  local c0 c1 out rps p99 errs n
  c0=$(cpu)
  run "$work/out" "${with_hosts[@]}" wrk -t1 -c32 -d"${secs}s" --latency -s "$work/post.lua" \
    "$2/v1/chat/completions"
  out=$(cat "$work/out")
  c1=$(cpu)
  rps=$(echo "$out" | awk '/Requests\/sec/ { print $2 }')
  p99=$(echo "$out" | awk '$1 == "99%" { print $2 }')
  errs=$(echo "$out" | awk '/Non-2xx/ { s += $5 } /Socket errors/ { gsub(",", ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }')
  n=$(echo "$out" | awk '/requests in/ { print $1 }')
  row "$1" "wrk -t1 -c32" "$rps req/s" "p99 $p99" "$errs" "$(per_op $((c1 - c0)) "$n")"
  echo "$rps $((c1 - c0)) $n" > "$work/rps-$3"
}
h2_phase() { # name url: 8 connections x 4 streams
  local c0 c1 out rps mean errs n
  c0=$(cpu)
  run "$work/out" h2load -D "$secs" -c8 -m4 -d "$work/body.json" -H "Authorization: Bearer $key" \
    -H "Content-Type: application/json" --connect-to="127.0.0.1:${2##*:}" "$2/v1/chat/completions"
  out=$(cat "$work/out")
  c1=$(cpu)
  rps=$(echo "$out" | awk '/^finished in/ { print $4 }')
  mean=$(echo "$out" | awk '/^time for request:/ { print $6 }')
  # requests: T total, S started, D done, OK succeeded, F failed (non-2xx included), E errored, ...
  n=$(echo "$out" | awk '/^requests:/ { print $8 }')
  errs=$(echo "$out" | awk '/^requests:/ { print $10 }')
  row "$1" "h2load -c8 -m4" "$rps req/s" "mean $mean" "$errs" "$(per_op $((c1 - c0)) "$n")"
  echo "$rps $((c1 - c0)) $n" > "$work/rps-$3"
}
wrk_phase "HTTP/1.1 plain" "http://127.0.0.1:$http_port" h1-plain
wrk_phase "HTTP/1.1 TLS" "https://bench.arkor.app:$https_port" h1-tls
h2_phase "HTTP/2 h2c (prior knowledge)" "http://bench.arkor.app:$http_port" h2-plain
h2_phase "HTTP/2 TLS (ALPN h2)" "https://bench.arkor.app:$https_port" h2-tls

idle_phase() { # name port [--ca file]: a fresh edge, 10,000 keep-alive connections held idle
  local name=$1 port=$2 out before open after fds0 fds1 cp
  shift 2
  start_edge
  sleep 0.5
  before=$(rss)
  fds0=$(nfds)
  "$client" idle --addr "127.0.0.1:$port" --sni bench.arkor.app --key "$key" --count "$idle_count" \
    --secs "$idle_limit" --hold $((idle_limit + 60)) "$@" > "$work/idle.out" &
  cp=$!
  pids+=("$cp")
  for _ in $(seq $((idle_limit * 10 + 50))); do
    grep -q '^ready' "$work/idle.out" && break
    kill -0 "$cp" 2>/dev/null || break
    sleep 0.1
  done
  out=$(cat "$work/idle.out")
  [[ "$out" == ready* ]] || { echo "tls-load: idle client failed: $out" >&2; exit 1; }
  sleep 1
  open=$(rss)
  local n errs took
  n=$(echo "$out" | sed -n 's/.*open=\([0-9]*\).*/\1/p')
  errs=$(echo "$out" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
  took=$(echo "$out" | sed -n 's/.*secs=\([0-9.]*\).*/\1/p')
  kill "$cp"
  wait "$cp" 2>/dev/null || true
  for _ in $(seq 100); do
    [ "$(nfds)" -le $((fds0 + 64)) ] && break
    sleep 0.1
  done
  sleep 1
  after=$(rss)
  fds1=$(nfds)
  printf '%-34s %7s %7s %8s %11s %11s %13s %16s %13s\n' "$name" "$n" "${took}s" "$errs" \
    "$(awk -v k="$before" 'BEGIN { printf "%.1f MiB", k / 1024 }')" \
    "$(awk -v k="$open" 'BEGIN { printf "%.1f MiB", k / 1024 }')" \
    "$(awk -v a="$before" -v b="$open" -v n="$n" 'BEGIN { if (n > 0) printf "%.1f KiB", (b - a) / n; else print "-" }')" \
    "$(awk -v k="$after" 'BEGIN { printf "%.1f MiB", k / 1024 }')" "$fds0 -> $fds1"
}
echo
echo "idle keep-alive connections, each made one POST; a fresh edge per row; RSS = VmRSS of /proc/<edge>/status;"
echo "edge fds: before -> after the client closed them (what remains above 'before' is the upstream pool)"
printf '%-34s %7s %7s %8s %11s %11s %13s %16s %13s\n' "connections" "opened" "in" "errors" \
  "RSS before" "RSS open" "RSS per conn" "RSS after close" "edge fds"
idle_phase "$idle_count plain HTTP/1.1" "$http_port"
idle_phase "$idle_count TLS HTTP/1.1" "$https_port" --ca "$work/ca.pem"
idle_phase "$idle_count plain HTTP/2 (h2c)" "$http_port" --h2
idle_phase "$idle_count TLS HTTP/2" "$https_port" --ca "$work/ca.pem" --h2

echo
read -r tls_n tls_full tls_resumed tls_cpu < "$work/connect-$https_port"
read -r plain_n _ _ plain_cpu < "$work/connect-$http_port"
if [ "$tls_resumed" -eq 0 ] && [ "$tls_full" -eq "$tls_n" ]; then
  echo "handshakes: all $tls_n of conn_load's TLS handshakes were full ones (rustls handshake_kind; client resumption off)"
else
  echo "handshakes: WARNING: $tls_resumed of $tls_n TLS handshakes were resumed, not full"
fi
awk -v tn="$tls_n" -v tc="$tls_cpu" -v pn="$plain_n" -v pc="$plain_cpu" -v hz="$tck" 'BEGIN {
  if (tn > 0 && pn > 0) printf "TLS handshake cost on the edge: %.0f us CPU per connection (TLS new conn minus plain new conn)\n", (tc / tn - pc / pn) * 1e6 / hz }'
for v in h1 h2; do
  read -r tr tc tn < "$work/rps-$v-tls"
  read -r pr pc pn < "$work/rps-$v-plain"
  awk -v v="$v" -v tr="$tr" -v pr="$pr" -v tc="$tc" -v tn="$tn" -v pc="$pc" -v pn="$pn" 'BEGIN {
    name = v == "h1" ? "HTTP/1.1" : "HTTP/2"
    printf "%-8s TLS/plain throughput ratio: %.2f   TLS/plain edge CPU per request: %.2f\n", name, tr / pr, (tc / tn) / (pc / pn) }'
done
