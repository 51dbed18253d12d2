#!/usr/bin/env bash
# The scheduler end to end beside its anchor in the same run: AcquireAgent + ReleaseAgent
# pairs (`meshctl bench scheduler`, 100 heartbeating agents registered by the load generator)
# against `agentmesh serve scheduler`, and the bare tonic echo (`meshctl bench echo`) at the
# same concurrency; one tokio worker per process, loopback, release build.
#   scripts/bench-scheduler.sh [seconds-per-run] [concurrency ...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
shift || true
levels=("${@:-16 64}")
read -r -a levels <<<"${levels[*]}"

scripts/install-deps.sh --build >/dev/null
cargo build --release --quiet --bins
bin=target/release
export TOKIO_WORKER_THREADS=1

"$bin/meshctl" bench echo-server --listen 127.0.0.1:7199 2>/dev/null &
echo_pid=$!
"$bin/agentmesh" serve scheduler --scheduler-listen 127.0.0.1:7102 --scheduler-admin-listen 127.0.0.1:9102 --log-format json 2>/dev/null &
sched_pid=$!
trap 'kill $echo_pid $sched_pid 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  "$bin/agentmesh" probe 127.0.0.1:7102 >/dev/null 2>&1 && break
  sleep 0.2
done

field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d[sys.argv[2]])" "$1" "$2"; }

echo "| in flight | echo calls/s | scheduler pairs/s | scheduler RPCs/s | RPCs ÷ echo | pair p50 / p99 (µs) | echo p50 / p99 (µs) |"
echo "| ---: | ---: | ---: | ---: | ---: | --- | --- |"
for c in "${levels[@]}"; do
  echo_out=$("$bin/meshctl" bench echo --concurrency "$c" --connections 4 --duration "${secs}s" --warmup 1s -o json | tail -n 1)
  sched_out=$("$bin/meshctl" bench scheduler --concurrency "$c" --connections 4 --duration "${secs}s" --warmup 1s -o json | tail -n 1)
  python3 - "$c" "$echo_out" "$sched_out" <<'PY'
import json, sys
c, e, s = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
rpcs = s["calls_per_sec"] * 2
print(f"| {c} | {e['calls_per_sec']:.0f} | {s['calls_per_sec']:.0f} | {rpcs:.0f} | {rpcs / e['calls_per_sec']:.2f} | "
      f"{s['p50_us']:.0f} / {s['p99_us']:.0f} | {e['p50_us']:.0f} / {e['p99_us']:.0f} |")
PY
done

# Tasks: submit -> assigned -> completed through 16 SDK agents run by the load generator (each
# in-flight slot submits a task and watches it to the end), at saturation and at half of it,
# with the scheduler's own submit -> assign histogram over the measured window.
echo
echo "| tasks load | tasks/s | submit -> completed p50 / p99 (µs) | submit -> assigned in the scheduler p50 / p99 (µs) |"
echo "| --- | ---: | --- | --- |"
tasks_row() {
  out=$("$bin/meshctl" bench tasks --agents 16 --concurrency 64 --connections 4 --duration "${secs}s" --warmup 1s \
    --metrics-url http://127.0.0.1:9102/metrics -o json "$@")
  python3 - "$out" "$*" <<'PY'
import json, sys
lines = sys.argv[1].splitlines()
d = json.loads(lines[0]); h = json.loads(lines[1])["at_the_scheduler"][0]
label = "saturation" if not sys.argv[2] else sys.argv[2]
print(f"| {label} | {d['calls_per_sec']:.0f} | {d['p50_us']:.0f} / {d['p99_us']:.0f} | {h['p50_us']:.0f} / {h['p99_us']:.0f} |")
PY
  python3 -c "import json,sys; print(json.loads(sys.argv[1].splitlines()[0])['calls_per_sec'])" "$out" > "${TMPDIR:-/tmp}/tasks_peak"
}
tasks_row
half=$(python3 -c "import sys; print(int(float(open(sys.argv[1]).read()) / 2))" "${TMPDIR:-/tmp}/tasks_peak")
tasks_row --rate "$half"

# 10,000 agents heartbeating at 1 Hz (registered and kept by the load generator over 100
# connections, with a trickle of 10 AcquireAgent pairs/s) against a freshly started scheduler:
# its CPU over 10 s and its resident memory, read from /proc. Target: < 0.5 core, < 512 MiB.
# A fresh scheduler: the one above holds the tasks of the runs before (kept an hour).
kill $sched_pid 2>/dev/null; wait $sched_pid 2>/dev/null || true
"$bin/agentmesh" serve scheduler --scheduler-listen 127.0.0.1:7102 --scheduler-admin-listen 127.0.0.1:9102 --log-format json 2>/dev/null &
sched_pid=$!
for _ in $(seq 1 50); do
  "$bin/agentmesh" probe 127.0.0.1:7102 >/dev/null 2>&1 && break
  sleep 0.2
done
echo
echo "| agents | scheduler CPU (cores) over 10 s | scheduler RSS (MiB) |"
echo "| ---: | ---: | ---: |"
"$bin/meshctl" bench scheduler --agents 10000 --capacity 1 --concurrency 1 --rate 10 --duration 25s --warmup 1s >/dev/null 2>&1 &
load_pid=$!
sleep 12
ticks() { awk '{print $14 + $15}' "/proc/$sched_pid/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks); sleep 10; t1=$(ticks)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$sched_pid/status")
agents=$("$bin/meshctl" agents stats -o json 2>/dev/null | grep -o '"ready":[0-9]*' | head -1 | cut -d: -f2)
echo "| ${agents:-?} ready | $(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN {printf "%.2f", d / hz / 10}') | $((rss / 1024)) |"
wait $load_pid || true
