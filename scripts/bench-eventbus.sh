#!/usr/bin/env bash
# Event bus benchmarks, each beside its anchor measured in the same run: NATS core (Debian's
# nats-server, driven by the same harness through async-nats) for ephemeral delivery, Redis
# Streams used directly (XADD / XREADGROUP / XACK) for durable delivery, and the bus's own
# queue-wait histogram for priorities. Loopback only. The event bus runs with its default
# runtime (a worker per core), as NATS (GOMAXPROCS = cores) does; the load generator has one
# tokio worker.
# Prints Markdown rows for BENCHMARKS.md.   scripts/bench-eventbus.sh [seconds-per-run] [tables]
# tables: any of "ephemeral durable priority" (default: all three).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
tables=${2:-ephemeral durable priority}
want() { [[ " $tables " == *" $1 "* ]]; }
scripts/install-deps.sh >/dev/null
command -v nats-server >/dev/null 2>&1 || { echo "needs nats-server (apt-get install -y nats-server)" >&2; exit 1; }
cargo build --release --quiet --bins
bin=$PWD/target/release
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

redis-server --port 63851 --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)
nats-server -a 127.0.0.1 -p 42251 >"$dir/nats.log" 2>&1 &
pids+=($!)
# A: standalone (ephemeral subjects, in-memory durable log); B: durable subjects in Redis.
"$bin/agentmesh" serve eventbus --eventbus-durable 'bench.durable.>' \
  --eventbus-listen 127.0.0.1:7851 --eventbus-admin-listen 127.0.0.1:9851 >"$dir/a.log" 2>&1 &
pids+=($!)
"$bin/agentmesh" serve eventbus --redis redis://127.0.0.1:63851 --eventbus-durable 'bench.durable.>' \
  --eventbus-listen 127.0.0.1:7852 --eventbus-admin-listen 127.0.0.1:9852 >"$dir/b.log" 2>&1 &
pids+=($!)
for port in 7851 7852; do
  for _ in $(seq 1 50); do "$bin/agentmesh" probe "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.2; done
done
sleep 1

bench() { TOKIO_WORKER_THREADS=1 "$bin/meshctl" bench "$@" --duration "${secs}s" --warmup 2s -o json; }
row() {
  python3 - "$1" "$2" <<'PY'
import json, sys
label, d = sys.argv[1], json.loads(sys.argv[2].splitlines()[0])
lost = d["not_delivered"]
extra = f" ({lost} not delivered)" if lost else ""
print(f"| {label} | {d['published_per_sec']:.0f} | {d['delivered_per_sec']:.0f}{extra} | {d['p50_us']} | {d['p99_us']} | {d['p999_us']} | {d['errors']} |")
PY
}
priority_rows() {
  python3 - "$1" "$2" <<'PY'
import json, sys
label, lines = sys.argv[1], sys.argv[2].splitlines()
d, waits = json.loads(lines[0]), json.loads(lines[1])["queue_wait"]
wait = {w["priority"]: w for w in waits}
for p in d["priorities"]:
    w = wait.get(p["priority"], {})
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    print(f"| {label} | {p['priority']} | {p['published']} | {p['delivered']} ({100 * p['delivered_share']:.1f}%) | {p['shed']} | {p['p50_us']} / {p['p99_us']} | {fmt(w.get('p50_us'))} / {fmt(w.get('p99_us'))} |")
PY
}

if want ephemeral || want durable; then
echo "| load | published/s | delivered/s | p50 µs | p99 µs | p99.9 µs | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
fi
if want ephemeral; then
row "eventbus ephemeral, PublishStream (window 256), saturation" "$(bench eventbus --addr http://127.0.0.1:7851)"
row "NATS core, saturation (anchor)" "$(bench nats --addr nats://127.0.0.1:42251)"
row "eventbus ephemeral at 10k/s" "$(bench eventbus --addr http://127.0.0.1:7851 --rate 10000)"
row "NATS core at 10k/s (anchor)" "$(bench nats --addr nats://127.0.0.1:42251 --rate 10000)"
fi
if want durable; then
durable="--subject bench.durable.events --durable --ack"
row "eventbus durable + acks, Redis Streams, 1 publisher, saturation" "$(bench eventbus --addr http://127.0.0.1:7852 $durable)"
row "eventbus durable + acks, Redis Streams, 2 publishers, saturation" "$(bench eventbus --addr http://127.0.0.1:7852 $durable --publishers 2)"
row "raw Redis Streams XADD / XREADGROUP / XACK, saturation (anchor)" "$(bench redis-streams --redis redis://127.0.0.1:63851)"
redis-cli -p 63851 flushall >/dev/null
row "raw Redis Streams at 130k/s (anchor)" "$(bench redis-streams --redis redis://127.0.0.1:63851 --rate 130000)"
redis-cli -p 63851 flushall >/dev/null
row "eventbus durable + acks, Redis Streams, at 10k/s" "$(bench eventbus --addr http://127.0.0.1:7852 $durable --rate 10000)"
row "raw Redis Streams at 10k/s (anchor)" "$(bench redis-streams --redis redis://127.0.0.1:63851 --rate 10000)"
row "eventbus durable + acks, in-memory log, saturation" "$(bench eventbus --addr http://127.0.0.1:7851 $durable)"
fi

want priority || exit 0
echo
echo "| mix (40k/s in, subscriber acks 20k/s, credit 100) | priority | published | delivered (share) | shed | publish → deliver p50 / p99 µs | wait in the bus p50 / p99 µs |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
prio="--ack --max-in-flight 100 --consume-rate 20000 --rate 40000 --metrics-url http://127.0.0.1:9851/metrics"
priority_rows "CRITICAL 10% (low=3,normal=3,high=3,critical=1)" \
  "$(bench eventbus --addr http://127.0.0.1:7851 --subject bench.prio.a --priority-mix low=3,normal=3,high=3,critical=1 $prio)"
priority_rows "equal shares" \
  "$(bench eventbus --addr http://127.0.0.1:7851 --subject bench.prio.b --priority-mix $prio)"
