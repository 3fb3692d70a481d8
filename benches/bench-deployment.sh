# Sourced by the load scripts: the keyed adapter deployment they load, `bench.arkor.app` on base
# model `bench/model`. Sets $key; `write_bench_deployment DIR` writes DIR/deployments.json and
# `write_bench_edge_config DIR EDGE_PORT MOCK_PORT` the edge's config for it (plain HTTP, no admin
# listener, access log off, one pool of the mock backend: `bench_pool_toml MOCK_PORT`).
key="ark_live_benchbenchbenchbenchbench0001"
write_bench_deployment() {
  local hash
  hash=$(printf %s "$key" | sha256sum | cut -d' ' -f1)
  cat > "$1/deployments.json" <<JSON
{"revision":1,"deployments":[{"id":"d-bench","slug":"bench","enabled":true,"authMode":"fixed_api_key",
 "target":{"type":"adapter","jobId":"job-bench","checkpointStep":1,"baseModel":"bench/model"},"revision":1}],
 "keys":[{"id":"k-bench","deploymentId":"d-bench","sha256":"$hash","enabled":true,"revision":1}]}
JSON
}

# The `[[pools]]` block of the mock backend on port $1, for an edge config.
bench_pool_toml() {
  cat <<TOML
[[pools]]
name = "bench"
base_models = ["bench/model"]
endpoints = ["http://127.0.0.1:$1"]
TOML
}

write_bench_edge_config() {
  {
    cat <<TOML
state_dir = "state"
[log]
access = false
[listen]
http = "127.0.0.1:$2"
admin = ""
TOML
    bench_pool_toml "$3"
  } > "$1/edge.toml"
}
