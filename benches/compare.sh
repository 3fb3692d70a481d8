#!/usr/bin/env bash
# The end-to-end comparison, one command, one run, 127.0.0.1 only:
#
#   bash benches/compare.sh [SECONDS] [CONNECTIONS]
#
# Starts the mock backend (arkor-mock-backend, 32 tokens per completion), the bare hyper
# forwarder (benches/bare_forwarder.rs), arkor-edge (key check and model pinning on, access log
# off) and nginx (installed from Debian's packages when missing: host map, key map,
# proxy_buffering off, upstream keep-alive, access log off), then drives each with
# arkor-loadgen: non-streamed and streamed, at saturation and at half of direct's saturated
# rate, and at half of the slowest proxy's. Bounded: 2 phases x 4 targets x 3 runs of SECONDS
# (default 8) plus a 1 s warm-up each.
# Prints the tables of benches/compare.py and keeps the raw JSON in target/compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
conns="${2:-32}"

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

bare=$(cargo bench --no-run --bench bare_forwarder 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
. benches/common.sh # builds the binaries ($mock), makes $work, stops $pids on exit
target_dir="${CARGO_TARGET_DIR:-target}"
[ -x "$bare" ] || { echo "bare forwarder not built" >&2; exit 1; }

mock_port=19100 bare_port=18081 edge_port=18080 nginx_port=18082
. benches/bench-deployment.sh
write_bench_deployment "$work"
write_bench_edge_config "$work" "$edge_port" "$mock_port"

mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 2;
user root;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  map \$host \$deployment { bench.arkor.app bench; default ""; }
  map \$http_authorization \$key_ok { "Bearer $key" 1; default 0; }
  upstream bench { server 127.0.0.1:$mock_port; keepalive 128; }
  server {
    listen 127.0.0.1:$nginx_port;
    location = /v1/chat/completions {
      if (\$deployment = "") { return 404; }
      if (\$key_ok = 0) { return 401; }
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_buffering off;
    }
  }
}
NGINX

"$mock" --listen "127.0.0.1:$mock_port" --tokens 32 >/dev/null &
pids+=($!)
"$bare" --listen "127.0.0.1:$bare_port" --upstream "127.0.0.1:$mock_port" >/dev/null &
bare_pid=$!
pids+=($bare_pid)
RUST_LOG=warn "$target_dir/release/arkor-edge" --config "$work/edge.toml" &
edge_pid=$!
pids+=($edge_pid)
"$nginx_bin" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
nginx_pid=$!
pids+=($nginx_pid)

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "nginx: $("$nginx_bin" -v 2>&1 | cut -d/ -f2); rustc: $(rustc -V | cut -d' ' -f2)"
python3 benches/compare.py "$(cat <<JSON
{"secs": $secs, "conns": $conns, "key": "$key", "loadgen": "$target_dir/release/arkor-loadgen",
 "out": "$target_dir/compare.json",
 "targets": [["direct", $mock_port, null], ["bare", $bare_port, $bare_pid],
             ["edge", $edge_port, $edge_pid], ["nginx", $nginx_port, $nginx_pid]]}
JSON
)"
