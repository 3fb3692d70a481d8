# Sourced by the load scripts: the keyed adapter deployment they load, `bench.arkor.app` on base
# model `bench/model`. Sets $key and writes DIR/deployments.json.
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
