#!/usr/bin/env bash
# What `--auth required` costs the rate limiter's hot paths: two `agentmesh serve ratelimit`
# processes on loopback, one with auth off and one with auth required (HS256, a service token;
# the verified identity is cached per token), driven alternately by the same `meshctl bench`
# loop in one run: unary Check (64 in flight over 4 connections) and StreamCheck (64 in flight
# over 4 connections). One tokio worker per process, as in scripts/bench.sh. Prints a Markdown
# table for BENCHMARKS.md with the on/off throughput ratio of each pair.
#   scripts/bench-auth.sh [seconds-per-run] [runs]
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
scratch=$(mktemp -d)
head -c 48 /dev/urandom | base64 >"$scratch/secret"
"$bin/meshctl" token issue --secret-file "$scratch/secret" --sub bench --roles service,operator \
  --ttl 24h >"$scratch/token"

"$bin/agentmesh" serve ratelimit --ratelimit-listen 127.0.0.1:7304 \
  --ratelimit-admin-listen 127.0.0.1:9304 --log-format json 2>/dev/null &
"$bin/agentmesh" serve ratelimit --ratelimit-listen 127.0.0.1:7305 \
  --ratelimit-admin-listen 127.0.0.1:9305 --log-format json \
  --auth required --auth-hs256-secret-file "$scratch/secret" \
  --auth-token-file "$scratch/token" 2>/dev/null &
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT
for addr in 127.0.0.1:7304 127.0.0.1:7305; do
  for _ in $(seq 1 50); do
    "$bin/agentmesh" probe "$addr" >/dev/null 2>&1 && break
    sleep 0.2
  done
done

run() { "$bin/meshctl" bench ratelimit "$@" --duration "${secs}s" --warmup 1s -o json; }

echo "machine: $(nproc) cores, $(uname -r); release build, one tokio worker per process"
echo "| run | load | auth off calls/s | auth on calls/s | on / off | off p50 / p99 (µs) | on p50 / p99 (µs) |"
echo "| --- | --- | ---: | ---: | ---: | --- | --- |"
for r in $(seq 1 "$runs"); do
  for load in "Check|--concurrency 64 --connections 4" "StreamCheck|--stream --concurrency 64 --connections 4"; do
    label=${load%%|*}
    flags=${load#*|}
    # shellcheck disable=SC2086 # the flags are meant to split
    off=$(run --addr 127.0.0.1:7304 $flags)
    # shellcheck disable=SC2086
    on=$(run --addr 127.0.0.1:7305 --token-file "$scratch/token" $flags)
    python3 - "$r" "$label ($flags)" "$off" "$on" <<'PY'
import json, sys
r, label, off, on = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"| {r} | {label} | {off['calls_per_sec']:.0f} | {on['calls_per_sec']:.0f} | {on['calls_per_sec']/off['calls_per_sec']:.3f} | {off['p50_us']} / {off['p99_us']} | {on['p50_us']} / {on['p99_us']} |")
PY
  done
done
