#!/usr/bin/env bash
# The health aggregator's figures (release build, loopback, one etcd in a temporary directory):
#  1. CPU of the aggregator watching N instances (`meshctl bench health-targets`: N grpc.health.v1
#     servers in the load generator, registered in etcd; each gets a Watch stream and a Check per
#     second), read from its own process_cpu_seconds_total over 30 s;
#  2. WatchClusterHealth to M clients: change → every stream (`meshctl bench health-watch`);
#  3. kill -9 of an instance → the aggregator's DOWN, R runs (`meshctl bench health-detect`).
#   scripts/bench-health.sh [instances=1000] [watchers=1000] [runs=20]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000}
watchers=${2:-1000}
runs=${3:-20}

scripts/install-deps.sh >/dev/null
cargo build --release --quiet --bins
bin=target/release
scratch=$(mktemp -d)
ulimit -n 65536 2>/dev/null || true

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_client=$(port); etcd_peer=$(port)
etcd --data-dir "$scratch/etcd" --listen-client-urls "http://127.0.0.1:$etcd_client" \
  --advertise-client-urls "http://127.0.0.1:$etcd_client" --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
  >"$scratch/etcd.log" 2>&1 &
etcd_pid=$!
etcd_url="http://127.0.0.1:$etcd_client"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT
for _ in $(seq 1 50); do
  etcdctl --endpoints "$etcd_url" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done

"$bin/agentmesh" serve health --etcd "$etcd_url" --health-listen 127.0.0.1:7105 \
  --health-admin-listen 127.0.0.1:9105 --log-format json >"$scratch/health.log" 2>&1 &
for _ in $(seq 1 50); do
  "$bin/agentmesh" probe 127.0.0.1:7105 >/dev/null 2>&1 && break
  sleep 0.2
done

echo "machine: $(nproc) cores, $(uname -r); aggregator: release, default settings (Check every 1 s, 500 ms deadline)"
"$bin/meshctl" bench health-targets --etcd "$etcd_url" --count "$count" \
  --aggregator-metrics 127.0.0.1:9105 --duration 30s &
targets_pid=$!
wait $targets_pid
# The targets are gone (their leases expire); the watch and detect runs use the service they
# leave behind only as the component toggled.
"$bin/meshctl" bench health-targets --etcd "$etcd_url" --count 10 &
sleep 3
"$bin/meshctl" bench health-watch --clients "$watchers" --changes 50 --component service/bench-target
"$bin/meshctl" bench health-detect --etcd "$etcd_url" --agentmesh "$bin/agentmesh" --runs "$runs"
