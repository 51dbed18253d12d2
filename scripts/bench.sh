#!/usr/bin/env bash
# End-to-end benchmarks, each agentmesh figure beside its anchor measured in the same run:
# a bare tonic echo server (`meshctl bench echo-server`) and `agentmesh dev`, both on loopback,
# one tokio worker per process (the 2-core machine is shared by client and servers), driven by
# the same `meshctl bench` loop. Prints a Markdown table for BENCHMARKS.md.
# One event bus row follows each run's rate-limiter rows (ephemeral publish -> deliver through
# `agentmesh dev`'s event bus at saturation, one publisher with 256 in flight).
#   scripts/bench.sh [seconds-per-run] [runs]
#   AGENTMESH_BENCH_BIN=dir scripts/bench.sh ...   # prebuilt agentmesh + meshctl (e.g. an older
#                                                  # commit's, for a before/after in one sitting)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
runs=${2:-3}

bin=${AGENTMESH_BENCH_BIN:-}
if [[ -z "$bin" ]]; then
  scripts/install-deps.sh --build >/dev/null
  cargo build --release --quiet --bins
  bin=target/release
fi
export TOKIO_WORKER_THREADS=1

"$bin/meshctl" bench echo-server --listen 127.0.0.1:7199 2>/dev/null &
echo_pid=$!
"$bin/agentmesh" dev --log-format json 2>/dev/null &
mesh_pid=$!
trap 'kill $echo_pid $mesh_pid 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  "$bin/agentmesh" probe 127.0.0.1:7104 >/dev/null 2>&1 && break
  sleep 0.2
done

run() { "$bin/meshctl" bench "$@" --duration "${secs}s" --warmup 1s -o json; }

echo "| run | load | anchor calls/s | agentmesh calls/s | ratio | agentmesh items/s | agentmesh p50 / p99 (µs) | anchor p50 / p99 (µs) |"
echo "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"
for r in $(seq 1 "$runs"); do
  for load in "1 1" "64 4"; do
    set -- $load
    a=$(run echo --addr 127.0.0.1:7199 --concurrency "$1" --connections "$2")
    m=$(run ratelimit --addr 127.0.0.1:7104 --concurrency "$1" --connections "$2")
    python3 - "$r" "Check, $1 in flight / $2 conn" "$a" "$m" <<'PY'
import json, sys
r, label, a, m = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"| {r} | {label} | {a['calls_per_sec']:.0f} | {m['calls_per_sec']:.0f} | {m['calls_per_sec']/a['calls_per_sec']:.2f} | {m['items_per_sec']:.0f} | {m['p50_us']} / {m['p99_us']} | {a['p50_us']} / {a['p99_us']} |")
PY
  done
  for extra in "--batch 100 --concurrency 16 --connections 2" "--stream --concurrency 64 --connections 4"; do
    m=$(run ratelimit --addr 127.0.0.1:7104 $extra)
    python3 - "$r" "$extra" "$m" <<'PY'
import json, sys
r, label, m = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kind = "StreamCheck" if "stream" in label else "Check batch 100"
print(f"| {r} | {kind} ({label}) | – | {m['calls_per_sec']:.0f} | – | {m['items_per_sec']:.0f} | {m['p50_us']} / {m['p99_us']} | – |")
PY
  done
  e=$("$bin/meshctl" bench eventbus --addr http://127.0.0.1:7101 --duration "${secs}s" --warmup 1s -o json | head -1)
  python3 - "$r" "$e" <<'PY'
import json, sys
r, d = sys.argv[1], json.loads(sys.argv[2])
print(f"| {r} | eventbus ephemeral publish -> deliver, 1 publisher / 256 in flight | – | {d['published_per_sec']:.0f} | – | {d['delivered_per_sec']:.0f} delivered | {d['p50_us']} / {d['p99_us']} | – |")
PY
done
