#!/usr/bin/env bash
# Cluster-wide rate-limiter benchmarks, each beside its baseline measured in the same run:
# the earlier platform's design (every caller runs a token-bucket Lua script in Redis per
# decision) against OWNER and STRICT mode over three `agentmesh serve ratelimit` instances
# sharing one etcd and one Redis, all on loopback; TOKIO_WORKER_THREADS=1: each server on one
# thread (current-thread runtime), the load generator with one worker.
# Prints Markdown rows for BENCHMARKS.md.   scripts/bench-cluster.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
scripts/install-deps.sh >/dev/null
cargo build --release --quiet --bins
bin=$PWD/target/release
export TOKIO_WORKER_THREADS=1
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
  --listen-peer-urls http://127.0.0.1:23801 >"$dir/etcd.log" 2>&1 &
pids+=($!)
redis-server --port 63791 --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)
sleep 1.5
start_instance() {
  "$bin/agentmesh" serve ratelimit --etcd http://127.0.0.1:23791 --redis redis://127.0.0.1:63791 \
    --ratelimit-listen "127.0.0.1:$1" --ratelimit-admin-listen "127.0.0.1:$2" >"$dir/rl-$1.log" 2>&1 &
  pids+=($!)
}
start_instance 7411 9411
start_instance 7412 9412
start_instance 7413 9413
for port in 7411 7412 7413; do
  for _ in $(seq 1 50); do "$bin/agentmesh" probe "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.2; done
done
sleep 1
addrs=127.0.0.1:7411,127.0.0.1:7412,127.0.0.1:7413

row() {
  python3 - "$1" "$2" <<'PY'
import json, sys
label, d = sys.argv[1], json.loads(sys.argv[2])
fwd = f"{d['forwarded_p50_us']} / {d['forwarded_p99_us']} / {d['forwarded_p999_us']}" if d.get('forwarded_calls') else "–"
print(f"| {label} | {d['concurrency']} | {d['calls_per_sec']:.0f} | {d['items_per_sec']:.0f} | {d['p50_us']} | {d['p99_us']} | {d['p999_us']} | {fwd} | {d['errors']} |")
PY
}
bench() { "$bin/meshctl" bench "$@" --duration "${secs}s" --warmup 1s -o json; }

echo "| load | in flight | calls/s | decisions/s | p50 µs | p99 µs | p99.9 µs | forwarded calls p50 / p99 / p99.9 µs | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
base=$(bench redis-script --redis redis://127.0.0.1:63791 --concurrency 64)
row "baseline: token-bucket Lua script per decision, from the client" "$base"
row "baseline at 1600 decisions in flight (as many as the 100-item rows below)" \
  "$(bench redis-script --redis redis://127.0.0.1:63791 --concurrency 1600)"
owner=$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 64 --consistency owner)
row "OWNER, unary Check (1 item)" "$owner"
row "OWNER, Check of 100 items" "$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 16 --batch 100 --consistency owner)"
row "STRICT, unary Check (1 item)" "$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 64 --consistency strict)"
row "STRICT, Check of 100 items" "$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 16 --batch 100 --consistency strict)"
stream=$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 64 --stream --consistency owner)
row "OWNER, StreamCheck (1 item per message, 64 streams)" "$stream"
row "OWNER, StreamCheck of 16 items (4 streams: 64 decisions in flight)" \
  "$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 4 --batch 16 --stream --consistency owner)"
shalf=$(python3 -c "import json,sys; print(int(json.loads(sys.argv[1])['calls_per_sec']/2))" "$stream")
# Also read the instances' own per-check histogram over this row's window (a second JSON line).
metrics=http://127.0.0.1:9411/metrics,http://127.0.0.1:9412/metrics,http://127.0.0.1:9413/metrics
shalf_out=$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 64 --stream --consistency owner \
  --rate "$shalf" --metrics-url "$metrics")
row "OWNER StreamCheck at half of its peak ($shalf/s; 2/3 of checks forwarded)" "$(head -n 1 <<<"$shalf_out")"
half=$(python3 -c "import json,sys; print(int(json.loads(sys.argv[1])['calls_per_sec']/2))" "$owner")
row "OWNER at half of its peak ($half/s, open loop; 2/3 of checks forwarded)" \
  "$(bench ratelimit --addr "$addrs" --connections 1 --concurrency 64 --consistency owner --rate "$half")"
# A dependency down: answers come from the failure policy within the 5 ms budget.
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
row "OWNER at $half/s with one of three instances killed (its keys fail over until its lease expires)" \
  "$(bench ratelimit --addr 127.0.0.1:7411,127.0.0.1:7412 --connections 1 --concurrency 64 --consistency owner --rate "$half")"
kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
row "STRICT at $half/s with Redis stopped (FAIL_CLOSED answers)" \
  "$(bench ratelimit --addr 127.0.0.1:7411,127.0.0.1:7412 --connections 1 --concurrency 64 --consistency strict --rate "$half")"
echo
python3 - "$(tail -n 1 <<<"$shalf_out")" <<'PY'
import json, sys
for r in json.loads(sys.argv[1])["at_the_instances"]:
    print(f"Inside the instances called, StreamCheck at half of its peak, {r['path']} checks: {r['count']}, "
          f"p50 / p99 / p99.9 {r['p50_us']:.0f} / {r['p99_us']:.0f} / {r['p999_us']:.0f} µs")
PY
