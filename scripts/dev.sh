#!/usr/bin/env bash
# Runs agentmesh standalone (no etcd, no Redis) and shows it working: builds, starts
# `agentmesh dev`, waits until it is SERVING, makes a few `meshctl` calls, then keeps the
# cluster running until Ctrl-C. `scripts/dev.sh --demo` stops after the demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v protoc >/dev/null 2>&1 || scripts/install-deps.sh
cargo build --quiet --bins
bin=target/debug

"$bin/agentmesh" dev &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT

for _ in $(seq 1 50); do
  "$bin/agentmesh" probe 127.0.0.1:7104 >/dev/null 2>&1 && break
  sleep 0.2
done
echo
echo "\$ agentmesh probe 127.0.0.1:7104"
"$bin/agentmesh" probe 127.0.0.1:7104

echo
echo "\$ meshctl ratelimit check -n demo -k agent-1 --limit 3 --period 1m   # four times"
for _ in 1 2 3 4; do
  "$bin/meshctl" ratelimit check -n demo -k agent-1 --limit 3 --period 1m || true
done

echo
echo "\$ meshctl ratelimit check -n demo -k agent-1 --limit 3 --period 1m --shadow"
"$bin/meshctl" ratelimit check -n demo -k agent-1 --limit 3 --period 1m --shadow || true

echo
echo "\$ meshctl ratelimit check -n demo -k agent-2   # the default policy: 60 per minute"
"$bin/meshctl" ratelimit check -n demo -k agent-2

echo
echo "\$ curl -s 127.0.0.1:9104/metrics | grep ratelimit_decisions_total"
exec 3<>/dev/tcp/127.0.0.1/9104
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
grep '^ratelimit_decisions_total' <&3 || true
exec 3>&-

if [ "${1:-}" = "--demo" ]; then
  exit 0
fi
echo
echo "agentmesh dev is running: rate limiter gRPC 127.0.0.1:7104, admin http://127.0.0.1:9104 — Ctrl-C stops it"
wait $pid
