#!/usr/bin/env bash
# Reactive rules benchmark: stimulus → rule → response delivered, at fixed rates, with N rules,
# beside the event bus's own publish → deliver latency in the same run (the same meshctl
# loop, clock and load). One `agentmesh serve eventbus scheduler` process (standalone, release
# build); loopback only. Also reads the engine's own histogram (`rules_fire_seconds`: stimulus
# accepted by the bus → responses done, inside the service) from /metrics around each run.
# Prints Markdown rows for BENCHMARKS.md.
#   scripts/bench-rules.sh [seconds-per-run] [rules] [rates]     (default: 10 100 "1000 10000")
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rules=${2:-100}
rates=${3:-1000 10000}
scripts/install-deps.sh --build >/dev/null
cargo build --release --quiet --bins
bin=$PWD/target/release
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

"$bin/agentmesh" serve eventbus scheduler \
  --eventbus-listen 127.0.0.1:7861 --eventbus-admin-listen 127.0.0.1:9861 \
  --scheduler-listen 127.0.0.1:7862 --scheduler-admin-listen 127.0.0.1:9862 >"$dir/server.log" 2>&1 &
pids+=($!)
for port in 7861 7862; do
  for _ in $(seq 1 50); do "$bin/agentmesh" probe "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.2; done
done

# p50/p99 (ms) of rules_fire_seconds between two scrapes, from the summed buckets.
fire_quantiles() {
  python3 - "$1" "$2" <<'PY'
import re, sys
def buckets(path):
    out = {}
    for line in open(path):
        m = re.match(r'rules_fire_seconds_bucket\{.*le="([^"]+)".*\} (\S+)', line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            out[le] = out.get(le, 0) + float(m.group(2))
    return out
a, b = buckets(sys.argv[1]), buckets(sys.argv[2])
d = sorted((le, b.get(le, 0) - a.get(le, 0)) for le in b)
total = d[-1][1] if d else 0
def q(p):
    if not total: return "-"
    prev_le, prev_c = 0.0, 0.0
    for le, c in d:
        if c >= p * total:
            if le == float("inf"): return f">{prev_le*1000:g}"
            frac = (p * total - prev_c) / max(c - prev_c, 1e-9)
            return f"{(prev_le + (le - prev_le) * frac) * 1000:.2f}"
        prev_le, prev_c = le, c
    return "-"
print(f"{q(0.5)} / {q(0.99)}")
PY
}

echo "| rate (stimuli/s) | rules | path | delivered/s | p50 ms | p99 ms | p99.9 ms | not delivered | engine p50 / p99 ms (in service) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for rate in $rates; do
  curl -s 127.0.0.1:9862/metrics >"$dir/before"
  out=$(TOKIO_WORKER_THREADS=1 "$bin/meshctl" bench rules --addr http://127.0.0.1:7861 \
    --scheduler http://127.0.0.1:7862 --rules "$rules" --rate "$rate" --publishers 2 \
    --duration "${secs}s" --warmup 2s -o json)
  curl -s 127.0.0.1:9862/metrics >"$dir/after"
  engine=$(fire_quantiles "$dir/before" "$dir/after")
  python3 - "$rate" "$rules" "$engine" "$out" <<'PY'
import json, sys
rate, rules, engine, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
runs = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
for path, d, eng in zip(["event bus alone (publish → deliver)", "rule (stimulus → response delivered)"], runs, ["", engine]):
    ms = lambda us: f"{us/1000:.2f}"
    print(f"| {rate} | {rules} | {path} | {d['delivered_per_sec']:.0f} | {ms(d['p50_us'])} | {ms(d['p99_us'])} | {ms(d['p999_us'])} | {d['not_delivered']} | {eng} |")
PY
done
