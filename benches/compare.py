#!/usr/bin/env python3
"""The end-to-end comparison: the same load direct to the mock backend, through a bare hyper
forwarder, through arkor-edge (key check and model pinning on) and through nginx (host map, key
map, proxy_buffering off), in one run on 127.0.0.1. Run by benches/compare.sh, which builds the
binaries and installs nginx; see BENCHMARKS.md.

For each phase (non-streamed, streamed) and target: a saturation run (closed loop, C
connections), then an open-loop run at half of direct's saturated rate. Prints requests/s,
latency percentiles, the proxy's CPU time per request (utime+stime of its processes during the
run / requests), its peak RSS, and the ratios to direct and to the bare forwarder; for streams,
the chunks per response the client received; and the load generator's own CPU per request, since
it shares the cores and a proxy that sends more chunks makes it spend more.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "bench.arkor.app"


def wait_port(port, secs=30):
    end = time.time() + secs
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {secs}s")


def family(pid):
    """The pid and its children (nginx's workers)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def cpu_ticks(pid):
    total = 0
    for p in family(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def peak_rss_kib(pid):
    total = 0
    for p in family(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def loadgen(args, port, stream, secs, conns, rate=None, key=None):
    cmd = [args["loadgen"], "--url", f"http://127.0.0.1:{port}/v1", "--host", HOST,
           "-c", str(conns), "-d", f"{secs}s", "--json", "--quiet", "--timeout", "10s"]
    if key:
        cmd += ["--key", key]
    if stream:
        cmd.append("--stream")
    if rate:
        cmd += ["--rate", f"{rate:.0f}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not out.stdout.strip():
        raise SystemExit(f"loadgen failed: {out.stderr}")
    r = json.loads(out.stdout)
    # The load generator shares the cores with the targets, so what a target makes it spend
    # (one body frame per chunk it receives) limits that target's requests/s too.
    spent = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    r["client_cpu_us_per_req"] = spent * 1e6 / r["requests"] if r["requests"] else None
    return r


def measure(args, target, stream, secs, conns, rate=None):
    name, port, pid = target
    loadgen(args, port, stream, 1, conns, key=args["key"])  # warm up pools and caches
    before = cpu_ticks(pid) if pid else 0
    r = loadgen(args, port, stream, secs, conns, rate, key=args["key"])
    after = cpu_ticks(pid) if pid else 0
    r["cpu_us_per_req"] = ((after - before) / CLK_TCK * 1e6 / r["requests"]) if pid and r["requests"] else None
    r["peak_rss_mib"] = peak_rss_kib(pid) / 1024 if pid else None
    return r


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(title, rows, base):
    print(f"\n{title}")
    print(f"{'target':8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'failed':>7} "
          f"{'CPU us/req':>11} {'RSS MiB':>8} {'/direct':>8} {'/bare':>7} {'chunks/req':>10} "
          f"{'client us/req':>13}")
    for name, r in rows:
        lat = r["latency_ms"] or {}
        d, b = base.get("direct"), base.get("bare")
        print(f"{name:8} {r['requests_per_s']:9.0f} {fmt(lat.get('p50'), '8.3f')} "
              f"{fmt(lat.get('p99'), '8.3f')} {fmt(lat.get('p99.9'), '9.3f')} {r['failed']:7d} "
              f"{fmt(r['cpu_us_per_req'], '11.1f')} {fmt(r['peak_rss_mib'], '8.1f')} "
              f"{fmt(r['requests_per_s'] / d if d else None, '8.2f')} "
              f"{fmt(r['requests_per_s'] / b if b else None, '7.2f')} "
              f"{fmt(r['chunks'] / r['requests'] if r['requests'] and r['chunks'] else None, '10.1f')} "
              f"{fmt(r['client_cpu_us_per_req'], '13.1f')}")


def main():
    args = json.loads(sys.argv[1])
    secs, conns = args["secs"], args["conns"]
    targets = [(n, p, pid) for n, p, pid in args["targets"]]
    for _, port, _ in targets:
        wait_port(port)
    results = {}
    for stream in (False, True):
        phase = "stream (32 chunks)" if stream else "non-stream"
        sat = []
        for t in targets:
            sat.append((t[0], measure(args, t, stream, secs, conns)))
        rates = {n: r["requests_per_s"] for n, r in sat}
        table(f"{phase}: saturation, closed loop, {conns} connections, {secs}s", sat, rates)
        # Half of direct's rate is the load the targets are held to; on a machine where the
        # load generator, the mock and the proxy share the cores it may be more than a proxy can
        # take, so the same is also measured at half of the slowest proxy's saturated rate.
        runs = {}
        for label, rate in (("half_direct", rates["direct"] / 2),
                            ("half_slowest", min(v for n, v in rates.items() if n != "direct") / 2)):
            fixed = []
            for t in targets:
                fixed.append((t[0], measure(args, t, stream, secs, conns, rate=rate)))
            what = "direct's" if label == "half_direct" else "the slowest proxy's"
            table(f"{phase}: open loop at {rate:.0f} req/s (half of {what} saturation)", fixed, {})
            d99 = fixed[0][1]["latency_ms"]["p99"]
            for name, r in fixed[1:]:
                print(f"  p99 added over direct, {name}: {r['latency_ms']['p99'] - d99:+.3f} ms")
            runs[label] = dict(fixed)
        results["stream" if stream else "non_stream"] = {"saturation": dict(sat), **runs}
    with open(args["out"], "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nraw results: {args['out']}")


if __name__ == "__main__":
    main()
