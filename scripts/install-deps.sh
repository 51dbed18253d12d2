#!/usr/bin/env bash
# Installs what building and testing agentmesh needs, where missing: protoc (etcd-client's
# build script runs it), etcd 3.4 and Redis 7 (the tests start real servers), cargo-nextest.
# Debian/Ubuntu via apt; run as root or with sudo.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)

if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

protoc --version
v="$(etcd --version)"
echo "${v%%$'\n'*}"
redis-server --version
